"""A Hugging Face checkpoint directory as a read-only source of tensors.

Finds the weights (``model.safetensors.index.json`` with its shards, a single
``model.safetensors``, other ``*.safetensors`` files, or, only when allowed, PyTorch ``.bin``
files loaded with ``torch.load(weights_only=True)``), validates every safetensors header before
use, keeps the tensor -> file map and reads ``config.json``. Tensors are handed out as
zero-copy views of memory-mapped files; :meth:`Checkpoint.prefetch` / :meth:`release` pass page
hints through to the file that holds the tensor.

Every file inside the model folder (weights, index, ``config.json``, the tokenizer files the
merge copies) is opened only if it is a regular file and, unless ``follow_symlinks``, resolves
inside the folder (or, for a Hugging Face cache snapshot, its repository's ``blobs`` folder):
:func:`~m3kernels.checkpoint.safetensors_io.open_input`. JSON files are parsed with limits
(:func:`~m3kernels.checkpoint.safetensors_io.load_json`). Each weight file stays open (with a
read lease where the OS grants one) until :meth:`Checkpoint.close`, and every tensor handed out
is checked against a change of its file (:class:`~m3kernels.errors.InputChangedError`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from m3kernels.checkpoint.safetensors_io import (
    MAX_JSON_BYTES,
    InputFile,
    SafetensorsFile,
    load_json,
    model_roots,
    open_input,
    read_input_bytes,
    short,
    torch_dtype_name,
)
from m3kernels.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)  # copied from the config source into the output
CONFIG_INT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "vocab_size")
CONFIG_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class TensorMeta:
    """What the merge plan needs to know about one input tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _inside(root: Path, name, index: Path) -> Path:
    """The shard path ``name`` from an index, refusing anything that leaves ``root``."""
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or os.path.isabs(name)
        or ".." in Path(name).parts
        or len(name) > 4096
    ):
        raise CheckpointError(
            f"{index}: shard file name {short(name)} is not a plain relative path", path=str(index)
        )
    return root / name


def _present(path: Path) -> bool:
    """Whether anything (a file, a FIFO, a dangling link ...) is at ``path``."""
    return os.path.lexists(path)


def bin_load_message(path, exc: BaseException) -> str:
    """One line for a failed ``torch.load``: the file and the gist of torch's (multi-line) text."""
    boiler = (
        "Weights only load failed",
        "In PyTorch 2.6",
        "Please file an issue",
        "Check the documentation",
        "Re-running `torch.load`",
    )
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    gist = ""
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            ln = ln.split("WeightsUnpickler error:", 1)[1].strip()
        if ln and not ln.startswith(boiler):
            gist = ln
            break
    if not gist:
        gist = lines[0] if lines else type(exc).__name__
    gist = gist.split(". ", 1)[0].rstrip(".")
    if len(gist) > 200:
        gist = gist[:200] + "…"
    kind = "not a weights-only PyTorch file: " if "Weights only load failed" in str(exc) else ""
    return f"{path}: cannot load .bin weights ({kind}{gist})"


class Checkpoint:
    """One input model (``role`` like 'base' or 'model 1' names it in messages).

    ``follow_symlinks``: read files of the model folder that are symbolic links to places
    outside it (refused by default)."""

    def __init__(self, path, *, role: str = "model", allow_bin: bool = False, follow_symlinks: bool = False):
        self.path = Path(path)
        self.role = role
        self.allow_bin = allow_bin
        self.follow_symlinks = follow_symlinks
        self._st: dict[str, SafetensorsFile] = {}  # file name -> mapped file
        self._metas: dict[str, TensorMeta] = {}  # safetensors tensor name -> its TensorMeta
        self._bin: dict[str, torch.Tensor] = {}  # tensor name -> loaded tensor (.bin only)
        self._bin_files: dict[str, InputFile] = {}  # file name -> the open .bin file (its lease, stamps)
        self.weight_map: dict[str, str] = {}  # tensor name -> file name, in read order
        self.config: dict | None = None
        self._side_files: dict | None = None  # tokenizer / generation files present (SIDE_FILES)
        if not _present(self.path):
            raise CheckpointError(
                f"{role}: {self.path} does not exist (only local checkpoints are supported)",
                path=str(self.path),
            )
        try:
            if self.path.is_dir():
                self.root = self.path
                self._roots = model_roots(self.root)
                self._open_directory()
                self._read_config()
            else:
                self.root = self.path.parent
                self._roots = model_roots(self.root)
                self._open_single_file(self.path)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- files
    def open_file(self, path: Path, what: str, lease: bool = True) -> InputFile:
        """Open a file of this model folder by the folder's rules (regular; inside unless following links)."""
        return open_input(path, roots=None if self.follow_symlinks else self._roots, what=what, lease=lease)

    def read_json(self, path: Path, what: str):
        f = self.open_file(path, what, lease=False)
        try:
            raw = read_input_bytes(f, MAX_JSON_BYTES, what)
        finally:
            f.close()
        return load_json(raw, path, what)

    def _read_config(self) -> None:
        cfg = self.root / CONFIG
        if not _present(cfg):
            return
        self.config = self.read_json(cfg, CONFIG)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg}: config.json is not a JSON object", path=str(cfg))
        for key in CONFIG_INT_KEYS:
            v = self.config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= CONFIG_INT_MAX:
                raise CheckpointError(
                    f"{cfg}: {key} = {short(v)} is out of range (0 .. {CONFIG_INT_MAX})", path=str(cfg)
                )

    @property
    def side_files(self) -> dict:
        """{name: path} of the tokenizer / generation files (SIDE_FILES) in the folder, each
        checked by the folder's rules (raises CheckpointError): the merge checks its config
        source's before merging, and copies them at the end."""
        if self._side_files is None:
            found = {}
            if self.path.is_dir():
                for name in SIDE_FILES:
                    p = self.root / name
                    if _present(p):
                        self.open_file(p, name, lease=False).close()
                        found[name] = p
            self._side_files = found
        return self._side_files

    # ----------------------------------------------------------------- discovery
    def _open_single_file(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            self._add_safetensors([path], user_named=True)
        elif path.suffix in (".bin", ".pt", ".pth"):
            self._add_bin([path], user_named=True)
        else:
            raise CheckpointError(
                f"{self.role}: {path} is neither a .safetensors file nor a directory", path=str(path)
            )

    def _open_directory(self) -> None:
        root = self.root
        if _present(root / SAFE_INDEX):
            self._add_indexed(root / SAFE_INDEX, self._add_safetensors)
        elif _present(root / SAFE_SINGLE):
            self._add_safetensors([root / SAFE_SINGLE])
        elif sorted(root.glob("*.safetensors")):
            self._add_safetensors(sorted(root.glob("*.safetensors")))
        elif _present(root / BIN_INDEX):
            self._add_indexed(root / BIN_INDEX, self._add_bin)
        elif _present(root / BIN_SINGLE):
            self._add_bin([root / BIN_SINGLE])
        else:
            raise CheckpointError(
                f"{self.role}: no weights in {root} (expected {SAFE_INDEX}, {SAFE_SINGLE} or *.safetensors)",
                path=str(root),
            )
        if not self.weight_map:
            raise CheckpointError(f"{self.role}: {root} holds no tensors", path=str(root))

    def _add_indexed(self, index: Path, add) -> None:
        obj = self.read_json(index, "the shard index")
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: no 'weight_map' object", path=str(index))
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{index}: 'metadata' is {short(meta)}, not an object", path=str(index))
        files, wanted = [], {}
        for name, fname in wm.items():
            p = _inside(self.root, fname, index)
            wanted[name] = str(Path(fname))
            if p not in files:
                files.append(p)
        for p in files:
            if not _present(p):
                raise CheckpointError(
                    f"{index}: shard {p.name} is listed but missing in {self.root}", path=str(p)
                )
        add(sorted(files), wanted=wanted, index=index)

    def _add_safetensors(
        self, paths, wanted: dict | None = None, index: Path | None = None, user_named: bool = False
    ) -> None:
        found: dict[str, str] = {}
        for p in paths:
            # a file the user named is read wherever it lies; files found in a folder follow its rules
            file = (
                open_input(p, what="safetensors file")
                if user_named
                else self.open_file(p, "safetensors file")
            )
            try:
                f = SafetensorsFile(p, file=file)
            except BaseException:
                file.close()
                raise
            rel = str(p.relative_to(self.root)) if index is not None else p.name
            self._st[rel] = f
            for name in f.tensors:  # offset order inside the file
                if wanted is not None and wanted.get(name) != rel:
                    continue  # not what the index says lives here: ignored, as transformers does
                if name in found:
                    raise CheckpointError(
                        f"{self.role}: tensor {name!r} is stored twice ({found[name]} and {rel})",
                        path=str(p),
                        tensor=name,
                    )
                found[name] = rel
        if wanted is not None:
            for name, fname in wanted.items():
                if name not in found:
                    raise CheckpointError(
                        f"{index}: tensor {name!r} is listed in shard {fname} but that file does not hold it",
                        path=str(self.root / fname),
                        tensor=name,
                    )
        self.weight_map = found

    def _add_bin(
        self, paths, wanted: dict | None = None, index: Path | None = None, user_named: bool = False
    ) -> None:
        if not self.allow_bin:
            raise CheckpointError(
                f"{self.role}: {self.root} only has PyTorch .bin weights; pickled files can run code when "
                f"loaded, so they need --allow-bin (allow_bin=True; loaded with torch.load(weights_only=True))",
                path=str(paths[0]),
            )
        for p in paths:
            file = open_input(p, what=".bin weights") if user_named else self.open_file(p, ".bin weights")
            rel = p.name
            self._bin_files[rel] = file
            try:
                with warnings.catch_warnings():  # torch's notes on pickle protocols are not for our users
                    warnings.simplefilter("ignore")
                    try:
                        sd = torch.load(file.real, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                        sd = torch.load(file.real, map_location="cpu", weights_only=True)
            except Exception as exc:  # unpickling errors come in many types
                raise CheckpointError(bin_load_message(p, exc), path=str(p)) from None
            file.check(when="after loading it")
            if not isinstance(sd, dict):
                raise CheckpointError(f"{p}: not a state dict (got {type(sd).__name__})", path=str(p))
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(
                        f"{p}: entry {short(name)} is not a tensor", path=str(p), tensor=str(name)
                    )
                if not isinstance(name, str):
                    raise CheckpointError(f"{p}: a tensor name is {short(name)}, not a string", path=str(p))
                if wanted is not None and wanted.get(name) != rel:
                    continue
                if name in self.weight_map:
                    raise CheckpointError(
                        f"{self.role}: tensor {name!r} is stored twice", path=str(p), tensor=name
                    )
                self._bin[name] = t
                self.weight_map[name] = rel
        if wanted is not None:
            missing = [n for n in wanted if n not in self.weight_map]
            if missing:
                raise CheckpointError(
                    f"{index}: tensor {missing[0]!r} is listed but missing",
                    path=str(index),
                    tensor=missing[0],
                )

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
        got = self._metas.get(name)
        if got is None:  # made once: a plan asks several times per tensor (20,000-tensor checkpoints)
            info = self._st[fname].tensors[name]
            got = self._metas[name] = TensorMeta(name, info.dtype, info.shape, fname)
        return got

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, a zero-copy view of the mapped file (CPU); checks first that its file is unchanged."""
        if name in self._bin:
            self._bin_files[self.weight_map[name]].check(name)
            return self._bin[name]
        return self._st[self.weight_map[name]].tensor(name)

    def address(self, name: str) -> int | None:
        """Where tensor ``name``'s data lies in its mapped file (None for .bin weights or
        misaligned data: use :meth:`tensor`)."""
        if name in self._bin:
            return None
        return self._st[self.weight_map[name]].address(name)

    def prefetch(self, name: str) -> None:
        if name not in self._bin:
            self._st[self.weight_map[name]].prefetch(name)

    def release(self, name: str) -> None:
        """Done with tensor ``name``: its pages may go; raises InputChangedError if its file changed
        while it was used."""
        if name in self._bin:
            f = self._bin_files.get(self.weight_map[name])
            if f is not None and f.fd >= 0:
                f.check(name, "after reading")
            return
        self._st[self.weight_map[name]].release(name)

    def files(self) -> list[dict]:
        """[{name, bytes, ...}] for each weight file: what the merge record and fingerprint hold."""
        out = []
        for rel, f in self._st.items():
            out.append({"name": rel, "bytes": f.header.file_size, "header_sha256": f.header.sha256})
        for rel in dict.fromkeys(self.weight_map[n] for n in self._bin):
            out.append({"name": rel, "bytes": self._bin_files[rel].size})
        return out

    def input_files(self) -> list[InputFile]:
        """The open weight files."""
        return [f.input_file for f in self._st.values()] + list(self._bin_files.values())

    def folders(self) -> list[Path]:
        """The real folders this checkpoint reads from: its own and those its files resolve into
        (a Hugging Face blobs folder, or anywhere with ``follow_symlinks``)."""
        out = dict.fromkeys([Path(os.path.realpath(self.root))])
        for f in self.input_files():
            out[Path(os.path.dirname(f.real))] = None
        for p in (self._side_files or {}).values():
            out[Path(os.path.dirname(os.path.realpath(p)))] = None
        return list(out)

    def metadata(self) -> dict:
        """{file name: the safetensors header's ``__metadata__``} for each safetensors file."""
        return {rel: dict(f.header.metadata) for rel, f in self._st.items()}

    def file_stamps(self) -> list[tuple]:
        """(name, size, mtime_ns) per weight file, as opened: detects inputs changed between a
        crash and --resume."""
        stamps = []
        for rel, f in self._st.items():
            stamps.append((rel, f.input_file.size, f.input_file.mtime_ns, f.header.sha256))
        for rel in dict.fromkeys(self.weight_map[n] for n in self._bin):
            stamps.append((rel, self._bin_files[rel].size, self._bin_files[rel].mtime_ns, None))
        return stamps

    def dtype_name(self, name: str) -> str:
        return torch_dtype_name(self.meta(name).dtype)

    def close(self) -> None:
        for f in self._st.values():
            f.close()
        self._bin.clear()
        for f in self._bin_files.values():
            f.close()


__all__ = [
    "Checkpoint",
    "TensorMeta",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "CONFIG",
    "SIDE_FILES",
    "bin_load_message",
]
