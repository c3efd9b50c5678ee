"""Evaluators: score a live ``transformers`` causal LM on one task of EVAL.yaml.

* ``loss``: the mean next-token negative log-likelihood (nats per target token) and its
  perplexity, over a local file: a ``.txt`` (the whole text in consecutive windows of
  ``max_length`` tokens) or a JSONL of ``text`` (each line one example) or of
  ``prompt``/``response`` (the loss on the response tokens only; the prompt is context);
* ``exact_match``: greedy decoding of each JSONL ``prompt`` (up to ``max_new_tokens``, stopping at
  the end-of-sequence token), the text cut at the first ``stop`` string, compared stripped with
  the stripped ``answer``; the score is the fraction that match;
* ``function``: a user function ``module:function(model, tokenizer) -> dict`` of scores.

Data files are read and tokenized once (:func:`make_evaluator`), then each evaluation runs on the
current weights, under ``torch.no_grad``. Problems (a file that is not there, a line that is not
JSON or lacks the field, a function that raises) are :class:`SearchError` naming the file and line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

from m3kernels.search.errors import SearchError
from m3kernels.search.evalspec import TaskSpec

MAX_DATA_BYTES = 1 << 30
MAX_LINE = 1 << 24


def read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise SearchError(
                f"{path}: {size:,} bytes; an evaluation file may have at most {MAX_DATA_BYTES:,}"
            )
        data = path.read_bytes()
    except OSError as e:
        raise SearchError(f"{path}: can not be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SearchError(f"{path}: not UTF-8 text (offset {e.start})") from None


def read_jsonl(path: Path, limit: int | None) -> list:
    """The objects of a JSONL file (blank lines skipped), at most ``limit``."""
    rows = []
    for no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise SearchError(f"{path}:{no}: a line of {len(line):,} characters; at most {MAX_LINE:,}")
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise SearchError(
                f"{path}:{no}: not a JSON object ({getattr(e, 'msg', 'nested too deeply')})"
            ) from None
        if not isinstance(obj, dict):
            raise SearchError(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}")
        rows.append((no, obj))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise SearchError(f"{path}: no examples (an empty file)")
    return rows


def _field(path, no, obj, name) -> str:
    v = obj.get(name)
    if v is None:
        raise SearchError(f"{path}:{no}: no {name!r} field (keys: {', '.join(map(str, obj)) or 'none'})")
    if not isinstance(v, str):
        raise SearchError(f"{path}:{no}: field {name!r} is {type(v).__name__}, expected a string")
    return v


def _ids(tokenizer, text: str, special: bool) -> list:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class LossEvaluator:
    """Token-weighted mean NLL over the task's target tokens (and perplexity = exp of it)."""

    def __init__(self, task: TaskSpec, tokenizer):
        self.task = task
        self.examples = self._examples(task, tokenizer)  # [(input ids, first target position)]
        if not self.examples:
            raise SearchError(f"task {task.name}: {task.data} gives no example with a target token")
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (tokenizer.eos_token_id or 0)

    @staticmethod
    def _examples(task: TaskSpec, tok) -> list:
        path, L = task.data, task.max_length
        out = []
        if path.suffix.lower() != ".jsonl":
            ids = _ids(tok, read_text(path), True)
            for lo in range(0, max(len(ids) - 1, 0), L):
                chunk = ids[lo : lo + L]
                if len(chunk) >= 2:
                    out.append((chunk, 1))
                if task.max_examples is not None and len(out) >= task.max_examples:
                    break
            return out
        rows = read_jsonl(path, task.max_examples)
        mode = "text" if "text" in rows[0][1] else "pair"
        for no, obj in rows:
            if mode == "text":
                ids = _ids(tok, _field(path, no, obj, "text"), True)[:L]
                start = 1
            else:
                prompt = _ids(tok, _field(path, no, obj, "prompt"), True)
                resp = _ids(tok, _field(path, no, obj, "response"), False)
                if tok.eos_token_id is not None:
                    resp = resp + [tok.eos_token_id]
                ids = (prompt + resp)[:L]
                start = max(len(prompt), 1)
            if len(ids) > start:
                out.append((ids, start))
        return out

    def __call__(self, model, tokenizer) -> dict:
        import torch

        dev = next(model.parameters()).device
        total, count = 0.0, 0
        bs = self.task.batch_size
        with torch.no_grad():
            for lo in range(0, len(self.examples), bs):
                batch = self.examples[lo : lo + bs]
                width = max(len(ids) for ids, _ in batch)
                ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                target = torch.zeros((len(batch), width), dtype=torch.bool)
                for i, (x, start) in enumerate(batch):
                    ids[i, : len(x)] = torch.tensor(x)
                    mask[i, : len(x)] = 1
                    target[i, start : len(x)] = True
                ids, mask, target = ids.to(dev), mask.to(dev), target.to(dev)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
                sel = target[:, 1:]
                total += float(nll[sel].double().sum())
                count += int(sel.sum())
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class ExactMatchEvaluator:
    """Greedy decoding, one prompt at a time (no padding), compared with the answer."""

    def __init__(self, task: TaskSpec, tokenizer):
        self.task = task
        self.examples = []
        for no, obj in read_jsonl(task.data, task.max_examples):
            prompt = _field(task.data, no, obj, "prompt")
            answer = _field(task.data, no, obj, "answer")
            ids = _ids(tokenizer, prompt, True)[-task.max_length :]
            if not ids:
                raise SearchError(f"{task.data}:{no}: the prompt gives no token")
            self.examples.append((ids, answer.strip()))

    def generate(self, model, tokenizer, ids: list) -> str:
        """Greedy continuation of ``ids``, cut at a stop string. The whole sequence is fed at each
        step (no KV cache: its calling convention differs between transformers versions, and
        the answers are short)."""
        import torch

        dev = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        new: list = []
        for _ in range(self.task.max_new_tokens):
            cur = torch.tensor([ids + new], dtype=torch.long, device=dev)
            logits = model(input_ids=cur, use_cache=False).logits
            nxt = int(logits[0, -1].float().argmax())
            if eos is not None and nxt == eos:
                break
            new.append(nxt)
            if any(s in tokenizer.decode(new, skip_special_tokens=True) for s in self.task.stop):
                break
        text = tokenizer.decode(new, skip_special_tokens=True)
        for s in self.task.stop:
            text = text.split(s, 1)[0]
        return text.strip()

    def __call__(self, model, tokenizer) -> dict:
        import torch

        hits = 0
        with torch.no_grad():
            for ids, answer in self.examples:
                hits += self.generate(model, tokenizer, ids) == answer
        return {"exact_match": hits / len(self.examples)}


def load_function(spec: str, folder: Path | None, task: str):
    """``module:function`` (importable, or from ``folder``) or ``path/file.py:function``."""
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            p = Path(mod_name).expanduser()
            if not p.is_absolute() and folder is not None:
                p = folder / p
            if not p.is_file():
                raise SearchError(f"task {task}: function file {str(p)!r} does not exist")
            s = importlib.util.spec_from_file_location(f"m3k_search_user_{task}", p)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            added = folder is not None and str(folder) not in sys.path
            if added:
                sys.path.insert(0, str(folder))
            try:
                mod = importlib.import_module(mod_name)
            finally:
                if added:
                    sys.path.remove(str(folder))
    except SearchError:
        raise
    except Exception as exc:
        raise SearchError(f"task {task}: can not import {mod_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise SearchError(f"task {task}: {mod_name!r} has no function {fn_name!r}")
    return fn


class FunctionEvaluator:
    """A user function ``(model, tokenizer) -> {name: number}``; ``metric`` must be among them."""

    def __init__(self, task: TaskSpec, tokenizer):
        self.task = task
        self.fn = load_function(task.function, task.folder, task.name)

    def __call__(self, model, tokenizer) -> dict:
        t = self.task
        try:
            out = self.fn(model, tokenizer)
        except Exception as exc:
            raise SearchError(f"task {t.name}: {t.function} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(out, dict):
            raise SearchError(
                f"task {t.name}: {t.function} returned {type(out).__name__}, expected a dict of scores"
            )
        scores = {}
        for k, v in out.items():
            if not isinstance(k, str) or not k:
                raise SearchError(f"task {t.name}: {t.function} returned a key {k!r}; keys must be strings")
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if isinstance(v, bool) or not math.isfinite(x):
                raise SearchError(
                    f"task {t.name}: {t.function} returned {k} = {v!r}; scores must be finite numbers"
                )
            scores[k] = x
        if t.metric not in scores:
            raise SearchError(
                f"task {t.name}: {t.function} returned no {t.metric!r} (keys: {', '.join(scores) or 'none'})"
            )
        return scores


EVALUATORS = {"loss": LossEvaluator, "exact_match": ExactMatchEvaluator, "function": FunctionEvaluator}


def make_evaluator(task: TaskSpec, tokenizer):
    """The evaluator of ``task``, its data read and tokenized now."""
    return EVALUATORS[task.type](task, tokenizer)


def evaluate_all(evaluators: list, model, tokenizer) -> dict:
    """{"<task>.<key>": value} over every task."""
    was_training = model.training
    model.eval()
    scores = {}
    try:
        for ev in evaluators:
            for k, v in ev(model, tokenizer).items():
                scores[f"{ev.task.name}.{k}"] = float(v)
    finally:
        model.train(was_training)
    return scores


__all__ = [
    "LossEvaluator",
    "ExactMatchEvaluator",
    "FunctionEvaluator",
    "make_evaluator",
    "evaluate_all",
    "load_function",
    "read_jsonl",
]
