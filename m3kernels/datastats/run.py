"""The driver of a statistics run: options, model and data loading, the pass over the data with a
progress bar, periodic saves and resume, then the output files and the manifest.

An accumulator (:mod:`.fisher`, :mod:`.regmean`) supplies the per-batch work; this module owns
everything around it. A run is split into one or more passes over the data (RegMean, when its
statistics would not fit ``max_memory`` at once); within a pass the accumulators are saved to
``OUT/.partial`` every ``save_every`` seconds (and every ``save_every_examples`` examples, when
given), so a run that dies loses at most that much work: ``resume=True`` continues from the last
save and gives the same bytes as an uninterrupted run (the same batches, in the same order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3kernels.errors import M3KError, OutputExistsError

log = logging.getLogger("m3kernels")

STORE_DTYPES = ("float32", "float64", "bfloat16", "float16")
ACC_DTYPES = ("float32", "float64")
MODEL_DTYPES = ("float32", "bfloat16", "auto")


class StopRequested(KeyboardInterrupt):
    """Raised by the test hook ``stop_after`` after a save: a crash at a known point."""


@dataclass
class StatsOptions:
    """Options of a statistics run (the CLI flags; ``m3kernels stats fisher --help``)."""

    device: str = "cpu"
    max_examples: int | None = None
    max_length: int = 512
    batch_size: int = 1
    seed: int = 0
    dtype: str = "float32"  # of the stored statistics
    accumulate: str = "float32"
    model_dtype: str = "float32"
    fmt: str = "auto"
    sampled: bool = False  # fisher: labels drawn from the model
    per_example: str = "vmap"  # fisher: vmap | loop
    max_memory: int | None = None  # bytes of statistics held at once (more passes when smaller)
    tokenizer: str | None = None
    save_every: float = 300.0
    save_every_examples: int | None = None
    stop_after: int | None = field(
        default=None, repr=False
    )  # tests: stop after this many examples (all passes)

    def check(self) -> None:
        def pos_int(name, v, lo=1, none_ok=False):
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(
                    f"{name} must be an integer >= {lo}{' or None' if none_ok else ''}, got {v!r}"
                )

        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        pos_int("max_examples", self.max_examples, none_ok=True)
        pos_int("max_length", self.max_length, lo=2)
        pos_int("batch_size", self.batch_size)
        pos_int("seed", self.seed, lo=0)
        pos_int("max_memory", self.max_memory, none_ok=True)
        pos_int("save_every_examples", self.save_every_examples, none_ok=True)
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        if self.accumulate not in ACC_DTYPES:
            raise ValueError(f"accumulate must be float32 or float64, got {self.accumulate!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(
                f"model_dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.model_dtype!r}"
            )
        if self.per_example not in ("vmap", "loop"):
            raise ValueError(f"per_example must be 'vmap' or 'loop', got {self.per_example!r}")
        if not self.save_every > 0:
            raise ValueError(f"save_every must be > 0 seconds, got {self.save_every!r}")

    def recorded(self, kind: str) -> dict:
        """The options that change the result (manifest, resume key)."""
        keep = [
            "max_examples",
            "max_length",
            "batch_size",
            "seed",
            "dtype",
            "accumulate",
            "model_dtype",
            "fmt",
        ]
        keep += ["max_memory"] + (["sampled", "per_example"] if kind == "fisher" else [])
        d = asdict(self)
        return {k: d[k] for k in keep}


def torch_dtype(name: str):
    import torch

    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


def load_model(path, opts: StatsOptions):
    """(model in eval mode on the device, tokenizer), from local files only."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise M3KError("m3kernels stats needs transformers (pip install transformers)") from None
    import torch

    if not Path(path).is_dir():
        raise M3KError(f"model: {path} is not a checkpoint folder", path=str(path))
    if str(opts.device).startswith("cuda") and not torch.cuda.is_available():
        raise M3KError("device 'cuda' was asked for, but torch sees no CUDA device")
    tok_path = opts.tokenizer or path
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    except Exception as exc:  # many types: missing files, bad JSON, unknown class
        raise M3KError(
            f"tokenizer: cannot load one from {tok_path} ({type(exc).__name__}: {exc}); --tokenizer names another folder",
            path=str(tok_path),
        ) from None
    dtype = "auto" if opts.model_dtype == "auto" else torch_dtype(opts.model_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise M3KError(
            f"model: cannot load {path} with transformers ({type(exc).__name__}: {exc})", path=str(path)
        ) from None
    model.to(opts.device).eval()
    return model, tok


def pad_id(tok) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


STATS_FILE = re.compile(r"^(fisher|regmean)-\d{5}(-\d{3})?\.safetensors(\.tmp)?$")


def _ours(p: Path) -> bool:
    from m3kernels.datastats.output import MANIFEST, PARTIAL

    return p.name in (MANIFEST, MANIFEST + ".tmp", PARTIAL) or bool(STATS_FILE.match(p.name))


def _prepare_out(out_dir: Path, force: bool, resume: bool, model_path: Path) -> None:
    """OUT as a statistics folder: new, or one of ours (finished: only with ``force``; unfinished:
    ``resume`` keeps it, ``force`` clears it). A folder holding anything else is never touched."""
    from m3kernels.datastats.output import MANIFEST

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder", path=str(out_dir))
    if out_dir.resolve() == model_path.resolve():
        raise OutputExistsError(
            f"{out_dir} is the model folder: the statistics need a folder of their own", path=str(out_dir)
        )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = sorted(p.name for p in out_dir.iterdir() if not _ours(p))
        if foreign:
            raise OutputExistsError(
                f"{out_dir} holds files that are not statistics ({foreign[0]}{' …' if len(foreign) > 1 else ''}): "
                f"choose another OUT (nothing there is replaced)",
                path=str(out_dir),
            )
        finished = (out_dir / MANIFEST).exists()
        if resume and not finished:
            return
        if not force:
            hint = "--force replaces them" + ("" if finished else ", --resume continues the unfinished run")
            what = "finished statistics" if finished else "an unfinished statistics run"
            raise OutputExistsError(f"{out_dir} already holds {what} ({hint})", path=str(out_dir))
        for p in out_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def run_stats(
    kind: str,
    model_path,
    data_path,
    out_dir,
    opts: StatsOptions,
    make_accumulator,
    *,
    resume=False,
    force=False,
    progress=True,
) -> dict:
    """Compute ``kind`` statistics of the model at ``model_path`` over ``data_path`` into
    ``out_dir``; returns the manifest. ``make_accumulator(model, opts, pad)`` -> accumulator."""
    import torch
    from tqdm import tqdm

    import m3kernels
    from m3kernels.datastats import output
    from m3kernels.datastats.data import file_sha256, load_examples
    from m3kernels.datastats.fingerprint import model_fingerprint

    opts.check()
    model_path, data_path, out_dir = Path(model_path), Path(data_path), Path(out_dir)
    t0 = time.perf_counter()
    data_sha = file_sha256(data_path)
    fingerprint = model_fingerprint(model_path)
    model, tok = load_model(model_path, opts)
    examples, skipped = load_examples(
        data_path, tok, max_length=opts.max_length, max_examples=opts.max_examples, fmt=opts.fmt
    )
    if skipped:
        log.warning(
            "%s: %d example(s) without a target token skipped (first: line %d)",
            data_path,
            len(skipped),
            skipped[0],
        )
    key = hashlib.sha256(
        json.dumps([kind, fingerprint, data_sha, opts.recorded(kind)], sort_keys=True).encode()
    ).hexdigest()
    _prepare_out(out_dir, force, resume, model_path)
    acc = make_accumulator(model, opts, pad_id(tok))
    files, start_pass, start_done = [], 0, 0
    state = output.load_state_info(out_dir) if resume else None
    if resume and state is None:
        log.warning("--resume: no unfinished run in %s; starting from the beginning", out_dir)
    if state is not None:
        if state.get("key") != key:
            raise M3KError(
                f"{out_dir}: the unfinished run there is of another model, data file or options; --force starts afresh",
                path=str(out_dir),
            )
        start_pass, start_done, files = state["pass"], state["examples_done"], list(state["files"])
        acc.begin_pass(start_pass)
        if start_done > 0:  # saved between two passes: nothing accumulated yet
            acc.load_state(output.load_state_tensors(out_dir, state), state["acc"])
        log.info("resuming %s: pass %d, %d examples done", out_dir, start_pass + 1, start_done)
    n, bs, passes = len(examples), opts.batch_size, acc.n_passes
    bar = tqdm(
        total=n * passes,
        initial=start_pass * n + start_done,
        desc=f"{kind} statistics",
        unit="ex",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )

    def save(p, done):
        output.save_state(
            out_dir,
            acc.state_tensors(),
            {"key": key, "pass": p, "examples_done": done, "files": files, "acc": acc.state_info()},
        )

    seen_tokens, t_loop = 0, time.perf_counter()
    try:
        for p in range(start_pass, passes):
            if not (state is not None and p == start_pass):
                acc.begin_pass(p)
            done = start_done if p == start_pass else 0
            last_save, since = time.monotonic(), 0
            while done < n:
                batch = examples[done : done + bs]
                with torch.enable_grad():
                    acc.step(batch, first_index=done)
                done += len(batch)
                since += len(batch)
                seen_tokens += sum(len(e.ids) for e in batch)
                bar.set_postfix_str(
                    f"{seen_tokens / max(time.perf_counter() - t_loop, 1e-9):,.0f} tok/s", refresh=False
                )
                bar.update(len(batch))
                every = opts.save_every_examples
                if (every and since >= every) or time.monotonic() - last_save >= opts.save_every:
                    if done < n:
                        save(p, done)
                    last_save, since = time.monotonic(), 0
                    if opts.stop_after is not None and p * n + done >= opts.stop_after:
                        raise StopRequested()
            files += acc.end_pass(p, out_dir, torch_dtype(opts.dtype))
            if p + 1 < passes:
                save(p + 1, 0)
                if opts.stop_after is not None and (p + 1) * n >= opts.stop_after:
                    raise StopRequested()
    finally:
        bar.close()
    manifest = {
        "format": output.FORMAT,
        "format_version": output.FORMAT_VERSION,
        "kind": kind,
        "m3kernels_version": m3kernels.__version__,
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "model": {
            "path": str(model_path.absolute()),
            "fingerprint": fingerprint,
            "class": type(model).__name__,
        },
        "data": {
            "path": str(data_path.absolute()),
            "sha256": data_sha,
            "skipped_lines": skipped[:100],
            "skipped": len(skipped),
        },
        "options": opts.recorded(kind) | {"device": opts.device},
        "counts": acc.counts(),
        "dtype": opts.dtype,
        "files": files,
        "seconds": round(time.perf_counter() - t0, 3),
    } | acc.manifest_extra()
    output.write_manifest(out_dir, manifest)
    output.clear_state(out_dir)
    return manifest


__all__ = ["StatsOptions", "run_stats", "load_model", "StopRequested"]
