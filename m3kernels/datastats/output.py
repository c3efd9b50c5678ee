"""Statistics on disk: safetensors files named after the parameters, a manifest, and the resume state.

A statistics folder holds ``<kind>-00001.safetensors`` ... (tensors named after the parameters
they belong to: a Fisher tensor has its parameter's name; a Gram matrix the name of the first
linear weight reading that input, the manifest's ``layers`` mapping every linear weight to it)
and ``manifest.json``, written last (a folder without it is unfinished). The manifest records
the model's fingerprint, the data file's hash, the counts, the options and the versions.

An unfinished run keeps its accumulators in ``OUT/.partial/`` (``state.safetensors`` and
``state.json``, each replaced atomically), from which ``resume=True`` continues.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from m3kernels.errors import CheckpointError, M3KError, TensorMismatchError

MANIFEST = "manifest.json"
FORMAT = "m3kernels-stats"
FORMAT_VERSION = 1
PARTIAL = ".partial"
KINDS = ("fisher", "regmean")


def dtype_name(dtype) -> str:
    from m3kernels.checkpoint.safetensors_io import torch_dtype_name

    return torch_dtype_name(dtype)


def _raw_bytes(t):
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


class StreamWriter:
    """A safetensors file written tensor by tensor: the header (from names, dtypes, shapes) first,
    then each tensor's bytes in the order given; ``finish()`` flushes, fsyncs and renames the
    temporary file into place. Memory: one tensor at a time."""

    def __init__(self, path, entries, metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.entries = [(n, d, tuple(s)) for n, d, s in entries]
        obj = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
        pos = 0
        for name, dtype, shape in self.entries:
            n = dtype.itemsize
            for d in shape:
                n *= d
            obj[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(obj, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor) -> None:
        want, dtype, shape = self.entries[self.next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"StreamWriter: expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self.f.write(_raw_bytes(tensor))
        self.next += 1

    def finish(self) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"StreamWriter: {len(self.entries) - self.next} tensors not written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def write_tensors(path, tensors: dict, metadata: dict | None = None) -> int:
    """Write ``tensors`` (name -> tensor, in order) to one safetensors file; returns its size."""
    w = StreamWriter(path, [(n, t.dtype, t.shape) for n, t in tensors.items()], metadata)
    try:
        for n, t in tensors.items():
            w.write(n, t)
        w.finish()
    except BaseException:
        w.abort()
        raise
    return os.path.getsize(path)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out_dir, manifest: dict) -> None:
    _atomic_json(Path(out_dir) / MANIFEST, manifest)


# ------------------------------------------------------------------ resume state
def save_state(out_dir, tensors: dict, info: dict) -> None:
    """The accumulators and the progress of an unfinished run (both replaced atomically: the
    tensors first, then the JSON that names them, so a crash in between keeps the older pair)."""
    part = Path(out_dir) / PARTIAL
    part.mkdir(parents=True, exist_ok=True)
    name = f"state-{info['examples_done']}-{info.get('pass', 0)}.safetensors"
    write_tensors(part / name, tensors)
    old = load_state_info(out_dir)
    _atomic_json(part / "state.json", dict(info, tensors_file=name))
    if old and old.get("tensors_file") not in (None, name):
        try:
            (part / old["tensors_file"]).unlink()
        except OSError:
            pass


def load_state_info(out_dir) -> dict | None:
    p = Path(out_dir) / PARTIAL / "state.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def load_state_tensors(out_dir, info: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / PARTIAL / info["tensors_file"]))


def clear_state(out_dir) -> None:
    part = Path(out_dir) / PARTIAL
    if part.is_dir():
        for p in part.iterdir():
            p.unlink()
        part.rmdir()


# ------------------------------------------------------------------ reading
def read_manifest(stats_dir) -> dict:
    """The manifest of a statistics folder, checked (CheckpointError naming the folder)."""
    p = Path(stats_dir) / MANIFEST
    if not p.is_file():
        hint = " (an unfinished run: rerun it with --resume)" if (Path(stats_dir) / PARTIAL).is_dir() else ""
        raise CheckpointError(
            f"{stats_dir}: no {MANIFEST}: not a finished statistics folder{hint}", path=str(stats_dir)
        )
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: unreadable manifest ({exc})", path=str(p)) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("kind") not in KINDS:
        raise CheckpointError(f"{p}: not an m3kernels statistics manifest", path=str(p))
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: format version {m.get('format_version')!r}, this m3kernels reads {FORMAT_VERSION}",
            path=str(p),
        )
    return m


class StatsFolder:
    """A finished statistics folder opened for a merge: the manifest and the memory-mapped
    tensors (:class:`~m3kernels.checkpoint.source.Checkpoint` rules), read one by one."""

    def __init__(self, path, *, kind: str | None = None, role: str = "statistics"):
        from m3kernels.checkpoint.source import Checkpoint

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.kind = self.manifest["kind"]
        if kind is not None and self.kind != kind:
            raise M3KError(
                f"{role}: {self.path} holds {self.kind} statistics, {kind} ones are needed",
                path=str(self.path),
            )
        self.ck = Checkpoint(self.path, role=role)
        self.role = role

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def check_model(self, fingerprint: str, model_path) -> None:
        if fingerprint != self.fingerprint:
            raise M3KError(
                f"{self.role}: {self.path} was computed from another model "
                f"({self.manifest['model'].get('path')}, fingerprint {self.fingerprint[:20]}…), not {model_path} "
                f"(fingerprint {fingerprint[:20]}…)",
                path=str(self.path),
            )

    def tensor(self, name: str, shape=None, what: str = "tensor"):
        if name not in self.ck:
            raise TensorMismatchError(
                f"{self.role}: {self.path} has no {what} {name!r}", path=str(self.path), tensor=name
            )
        t = self.ck.tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise TensorMismatchError(
                f"{self.role}: {self.path}: {what} {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                path=str(self.path),
                tensor=name,
            )
        return t

    def release(self, name: str) -> None:
        if name in self.ck:
            self.ck.release(name)

    def close(self) -> None:
        self.ck.close()


__all__ = [
    "StreamWriter",
    "StatsFolder",
    "read_manifest",
    "write_manifest",
    "write_tensors",
    "save_state",
    "load_state_info",
    "load_state_tensors",
    "clear_state",
    "MANIFEST",
]
