"""A Hugging Face checkpoint directory as a read-only source of tensors.

Finds the weights (``model.safetensors.index.json`` with its shards, a single
``model.safetensors``, other ``*.safetensors`` files, or, only when allowed, PyTorch ``.bin``
files loaded with ``torch.load(weights_only=True)``), validates every safetensors header before
use, keeps the tensor -> file map and reads ``config.json``. Tensors are handed out as
zero-copy views of memory-mapped files; :meth:`Checkpoint.prefetch` / :meth:`release` pass page
hints through to the file that holds the tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from m3kernels.errors import CheckpointError
from m3kernels.checkpoint.safetensors_io import SafetensorsFile, read_header, torch_dtype_name

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"


@dataclass(frozen=True)
class TensorMeta:
    """What the merge plan needs to know about one input tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str          # file name inside the checkpoint

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _inside(root: Path, name: str, index: Path) -> Path:
    """The shard path ``name`` from an index, refusing anything that leaves ``root``."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: shard file name {name!r} is not a plain relative path", path=str(index))
    return root / name


def _read_json(path: Path, what: str):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc}", path=str(path)) from None


class Checkpoint:
    """One input model (``role`` like 'base' or 'model 1' names it in messages)."""

    def __init__(self, path, *, role: str = "model", allow_bin: bool = False):
        self.path = Path(path)
        self.role = role
        self.allow_bin = allow_bin
        self._st: dict[str, SafetensorsFile] = {}   # file name -> mapped file
        self._bin: dict[str, torch.Tensor] = {}     # tensor name -> loaded tensor (.bin only)
        self.weight_map: dict[str, str] = {}        # tensor name -> file name, in read order
        self.config: Optional[dict] = None
        if not self.path.exists():
            raise CheckpointError(f"{role}: {self.path} does not exist (only local checkpoints are supported)",
                                  path=str(self.path))
        if self.path.is_file():
            self.root = self.path.parent
            self._open_single_file(self.path)
        else:
            self.root = self.path
            self._open_directory()
        cfg = self.root / CONFIG if self.path.is_dir() else None
        if cfg is not None and cfg.is_file():
            self.config = _read_json(cfg, CONFIG)
            if not isinstance(self.config, dict):
                raise CheckpointError(f"{cfg}: config.json is not a JSON object", path=str(cfg))

    # ----------------------------------------------------------------- discovery
    def _open_single_file(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            self._add_safetensors([path])
        elif path.suffix in (".bin", ".pt", ".pth"):
            self._add_bin([path])
        else:
            raise CheckpointError(f"{self.role}: {path} is neither a .safetensors file nor a directory",
                                  path=str(path))

    def _open_directory(self) -> None:
        root = self.root
        if (root / SAFE_INDEX).is_file():
            self._add_indexed(root / SAFE_INDEX, self._add_safetensors)
        elif (root / SAFE_SINGLE).is_file():
            self._add_safetensors([root / SAFE_SINGLE])
        elif sorted(root.glob("*.safetensors")):
            self._add_safetensors(sorted(root.glob("*.safetensors")))
        elif (root / BIN_INDEX).is_file():
            self._add_indexed(root / BIN_INDEX, self._add_bin)
        elif (root / BIN_SINGLE).is_file():
            self._add_bin([root / BIN_SINGLE])
        else:
            raise CheckpointError(f"{self.role}: no weights in {root} (expected {SAFE_INDEX}, {SAFE_SINGLE} "
                                  f"or *.safetensors)", path=str(root))
        if not self.weight_map:
            raise CheckpointError(f"{self.role}: {root} holds no tensors", path=str(root))

    def _add_indexed(self, index: Path, add) -> None:
        obj = _read_json(index, "the shard index")
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: no 'weight_map' object", path=str(index))
        files, wanted = [], {}
        for name, fname in wm.items():
            p = _inside(self.root, fname, index)
            wanted[name] = str(Path(fname))
            if p not in files:
                files.append(p)
        for p in files:
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {p.name} is listed but missing in {self.root}",
                                      path=str(p))
        add(sorted(files), wanted=wanted, index=index)

    def _add_safetensors(self, paths, wanted: Optional[dict] = None, index: Optional[Path] = None) -> None:
        found: dict[str, str] = {}
        for p in paths:
            f = SafetensorsFile(p, header=read_header(p))
            rel = str(p.relative_to(self.root)) if index is not None else p.name
            self._st[rel] = f
            for name in f.tensors:  # offset order inside the file
                if wanted is not None and wanted.get(name) != rel:
                    continue  # not what the index says lives here: ignored, as transformers does
                if name in found:
                    raise CheckpointError(f"{self.role}: tensor {name!r} is stored twice ({found[name]} and "
                                          f"{rel})", path=str(p), tensor=name)
                found[name] = rel
        if wanted is not None:
            for name, fname in wanted.items():
                if name not in found:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in shard {fname} but that file "
                                          f"does not hold it", path=str(self.root / fname), tensor=name)
        self.weight_map = found

    def _add_bin(self, paths, wanted: Optional[dict] = None, index: Optional[Path] = None) -> None:
        if not self.allow_bin:
            raise CheckpointError(
                f"{self.role}: {self.root} only has PyTorch .bin weights; pickled files can run code when "
                f"loaded, so they need --allow-bin (allow_bin=True; loaded with torch.load(weights_only=True))",
                path=str(paths[0]))
        for p in paths:
            try:
                try:
                    sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    sd = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # unpickling errors come in many types
                raise CheckpointError(f"{p}: cannot load .bin weights: {exc}", path=str(p)) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{p}: not a state dict (got {type(sd).__name__})", path=str(p))
            rel = p.name
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{p}: entry {name!r} is not a tensor", path=str(p), tensor=str(name))
                if wanted is not None and wanted.get(name) != rel:
                    continue
                if name in self.weight_map:
                    raise CheckpointError(f"{self.role}: tensor {name!r} is stored twice", path=str(p), tensor=name)
                self._bin[name] = t
                self.weight_map[name] = rel
        if wanted is not None:
            missing = [n for n in wanted if n not in self.weight_map]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but missing", path=str(index),
                                      tensor=missing[0])

    # ----------------------------------------------------------------- access
    @property
    def label(self) -> str:
        return f"{self.role} ({self.path})"

    @property
    def names(self) -> list[str]:
        """Tensor names in read order (shard by shard, by offset inside a shard)."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def meta(self, name: str) -> TensorMeta:
        fname = self.weight_map[name]
        if name in self._bin:
            t = self._bin[name]
            return TensorMeta(name, t.dtype, tuple(t.shape), fname)
        info = self._st[fname].tensors[name]
        return TensorMeta(name, info.dtype, info.shape, fname)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, a zero-copy view of the mapped file (CPU)."""
        if name in self._bin:
            return self._bin[name]
        return self._st[self.weight_map[name]].tensor(name)

    def address(self, name: str) -> Optional[int]:
        """Where tensor ``name``'s data lies in its mapped file (None for .bin weights or
        misaligned data: use :meth:`tensor`)."""
        if name in self._bin:
            return None
        return self._st[self.weight_map[name]].address(name)

    def prefetch(self, name: str) -> None:
        if name not in self._bin:
            self._st[self.weight_map[name]].prefetch(name)

    def release(self, name: str) -> None:
        if name not in self._bin:
            self._st[self.weight_map[name]].release(name)

    def files(self) -> list[dict]:
        """[{name, bytes, ...}] for each weight file: what the merge record and fingerprint hold."""
        out = []
        for rel, f in self._st.items():
            out.append({"name": rel, "bytes": f.header.file_size, "header_sha256": f.header.sha256})
        for rel in dict.fromkeys(self.weight_map[n] for n in self._bin):
            p = self.root / rel
            out.append({"name": rel, "bytes": p.stat().st_size})
        return out

    def metadata(self) -> dict:
        """{file name: the safetensors header's ``__metadata__``} for each safetensors file."""
        return {rel: dict(f.header.metadata) for rel, f in self._st.items()}

    def file_stamps(self) -> list[tuple]:
        """(name, size, mtime_ns) per weight file: detects inputs changed between a crash and --resume."""
        stamps = []
        for d in self.files():
            st = (self.root / d["name"]).stat()
            stamps.append((d["name"], st.st_size, st.st_mtime_ns, d.get("header_sha256")))
        return stamps

    def dtype_name(self, name: str) -> str:
        return torch_dtype_name(self.meta(name).dtype)

    def close(self) -> None:
        for f in self._st.values():
            f.close()
        self._bin.clear()


__all__ = ["Checkpoint", "TensorMeta", "SAFE_INDEX", "SAFE_SINGLE", "CONFIG"]
