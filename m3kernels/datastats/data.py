"""The examples a statistics run reads: a text file, a JSONL of ``text``, or a JSONL of ``prompt``/``response``.

* Text (any file not ending in ``.jsonl``/``.json``, or ``fmt="text"``): one example per non-blank
  line; every token after the first is a target.
* JSONL (``fmt="jsonl"``): one JSON object per line, all of one kind: ``{"text": ...}`` (every
  token after the first is a target) or ``{"prompt": ..., "response": ...}`` (the prompt's tokens
  with the tokenizer's special tokens, then the response's tokens and the EOS token; only the
  response and EOS tokens are targets: the loss is on the response only). Every line must be
  such an object: an empty or malformed line raises :class:`~m3kernels.errors.DataError` naming the
  file and the line (a final newline at the end of the file is not a line).

Examples longer than ``max_length`` tokens are cut at the end; one left without a target token
(e.g. a response cut off entirely) is skipped and counted. A file with no usable example raises
DataError. Batches are right-padded (:func:`pad_batch`): with causal attention a real token never
sees the padding after it, so a padded batch gives every example exactly its unpadded outputs.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

from m3kernels.errors import M3KError

JSONL_SUFFIXES = (".jsonl", ".json")
MAX_LINE_BYTES = 1 << 26  # 64 MiB: a longer line is refused, not read into memory whole


class DataError(M3KError):
    """A data file is missing, unreadable, malformed, or holds no usable example."""


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``ids`` and ``targets[t]`` = whether token t is a loss target
    (predicted from tokens < t); ``line`` is its 1-based line in the data file. Stored compactly
    (``array('q')`` ids, ``array('B')`` target flags: 9 bytes a token), as every selected example is
    kept in memory for the run."""

    ids: array
    targets: array
    line: int

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


def file_sha256(path) -> str:
    """SHA-256 of the data file's bytes (recorded in the manifest)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the data file ({exc.strerror or exc})", path=str(path)
        ) from None
    return h.hexdigest()


def data_format(path, fmt: str = "auto") -> str:
    if fmt not in ("auto", "text", "jsonl"):
        raise ValueError(f"fmt must be 'auto', 'text' or 'jsonl', got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "jsonl" if Path(path).suffix.lower() in JSONL_SUFFIXES else "text"


def _lines(path):
    """(line number, text without the newline) for every line of the file (UTF-8, decoded line
    by line so that an error names its line)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(
            f"{path}: cannot open the data file ({exc.strerror or exc})", path=str(path)
        ) from None
    with f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}: line {n}: longer than {MAX_LINE_BYTES} bytes", path=str(path))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {n}: not UTF-8 text ({exc.reason})", path=str(path)) from None
            yield n, text.rstrip("\r\n")


def read_records(path, fmt: str = "auto"):
    """(line, kind, fields) per example: kind 'text' (fields: text) or 'pair' (prompt, response)."""
    fmt = data_format(path, fmt)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file", path=str(path))
    if fmt == "text":
        for n, text in _lines(path):
            if text.strip():
                yield n, "text", (text,)
        return
    kind = None
    for n, text in _lines(path):
        where = f"{path}: line {n}"
        if not text.strip():
            raise DataError(
                f"{where}: empty line (every line of a JSONL file must be a JSON object)", path=str(path)
            )
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = getattr(exc, "msg", "too deeply nested")
            raise DataError(f"{where}: not valid JSON ({msg})", path=str(path)) from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object", path=str(path))
        this = "pair" if ("prompt" in obj or "response" in obj) else "text" if "text" in obj else None
        if this is None:
            raise DataError(f"{where}: no 'text' field and no 'prompt'/'response' fields", path=str(path))
        keys = ("prompt", "response") if this == "pair" else ("text",)
        for k in keys:
            if not isinstance(obj.get(k), str):
                got = "missing" if k not in obj else f"a {type(obj[k]).__name__}"
                raise DataError(f"{where}: field {k!r} must be a string, it is {got}", path=str(path))
        if kind is None:
            kind = this
        elif this != kind:
            want = "'prompt'/'response'" if kind == "pair" else "'text'"
            raise DataError(
                f"{where}: mixes record kinds (the first records have {want} fields)", path=str(path)
            )
        yield n, this, tuple(obj[k] for k in keys)


def tokenize(tokenizer, kind: str, fields: tuple, max_length: int, line: int) -> Example:
    """One record as an :class:`Example` (cut to ``max_length`` tokens)."""
    if kind == "text":
        ids = list(tokenizer(fields[0])["input_ids"])
        targets = [False] + [True] * (len(ids) - 1)
    else:
        prompt, response = fields
        p = list(tokenizer(prompt)["input_ids"])
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            r.append(int(tokenizer.eos_token_id))
        ids = p + r
        targets = [False] * len(p) + [True] * len(r)
        if targets:
            targets[0] = False  # the first token has nothing to be predicted from
    ids, targets = ids[:max_length], targets[:max_length]
    return Example(array("q", (int(i) for i in ids)), array("B", targets), line)


def iter_examples(
    path, tokenizer, *, max_length: int, max_examples: int | None = None, fmt: str = "auto", skipped=None
):
    """The usable examples of the file in order (at most ``max_examples``); ``skipped``, a list,
    gets the line of each example without a target token. Raises DataError when none is usable."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be an integer >= 1 or None, got {max_examples!r}")
    count = 0
    for line, kind, fields in read_records(path, fmt):
        ex = tokenize(tokenizer, kind, fields, max_length, line)
        if ex.n_targets == 0:
            if skipped is not None:
                skipped.append(line)
            continue
        yield ex
        count += 1
        if max_examples is not None and count >= max_examples:
            return
    if count == 0:
        raise DataError(
            f"{path}: no usable example (every example needs at least one target token"
            f" within max_length={max_length})",
            path=str(path),
        )


def load_examples(path, tokenizer, *, max_length: int, max_examples: int | None = None, fmt: str = "auto"):
    """(examples, skipped lines): the whole selection tokenized (token ids only: small)."""
    skipped: list[int] = []
    return list(
        iter_examples(
            path, tokenizer, max_length=max_length, max_examples=max_examples, fmt=fmt, skipped=skipped
        )
    ), skipped


def pad_batch(examples, pad_id: int = 0):
    """Right-padded (ids [B, L] int64, targets [B, L] bool, real [B, L] bool) of ``examples``."""
    import torch

    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), int(pad_id), dtype=torch.int64)
    targets = torch.zeros((len(examples), length), dtype=torch.bool)
    real = torch.zeros((len(examples), length), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.frombuffer(e.ids, dtype=torch.int64)
        targets[b, :n] = torch.frombuffer(e.targets, dtype=torch.uint8).bool()
        real[b, :n] = True
    return ids, targets, real


__all__ = [
    "DataError",
    "Example",
    "file_sha256",
    "iter_examples",
    "load_examples",
    "pad_batch",
    "read_records",
    "tokenize",
]
