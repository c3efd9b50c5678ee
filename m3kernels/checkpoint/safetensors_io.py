"""Reading safetensors files safely and without copies: validated headers, mmap'd tensor views.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name ->
dtype, shape, [begin, end) byte offsets into the data that follows; optional string map
``__metadata__``), then the data. :func:`read_header` checks everything a corrupt or truncated
file could get wrong before any tensor is touched (length sane, JSON an object, known dtypes,
non-negative integer shapes, dtype × shape = byte size, offsets inside the file, no overlaps,
no holes) and then lets the safetensors library's own parser check the file as well.

:class:`SafetensorsFile` maps the file read-only and hands out ``torch`` tensors that are views
of the mapping (no copy; bf16 through a uint8 view), plus page hints: :meth:`prefetch`
(``MADV_WILLNEED``: start reading ahead) and :meth:`release` (``MADV_DONTNEED``: drop the pages
from this process once a tensor is merged, so resident memory stays bounded).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from m3kernels.errors import CheckpointError

# safetensors dtype name -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _dt = getattr(torch, _attr)
        ST_DTYPES[_name] = (_dt, torch.empty((), dtype=_dt).element_size())
TORCH_TO_ST = {dt: name for name, (dt, _) in ST_DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the safetensors library's own limit
PAGE = mmap.PAGESIZE
RELEASE_BATCH = 4 << 20   # consecutive released tensors are dropped together once they span this


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets relative to the data section)."""

    name: str
    st_dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.st_dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """A validated safetensors header."""

    path: Path
    header_len: int              # N, the JSON length
    file_size: int
    tensors: dict[str, TensorInfo]   # in file (offset) order
    metadata: dict[str, str]
    sha256: str                      # of the 8 + N header bytes: a cheap fingerprint of the file

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ('BF16', ...)."""
    if dtype not in TORCH_TO_ST:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return TORCH_TO_ST[dtype]


def _bad(path, msg, tensor=None) -> CheckpointError:
    where = f" (tensor {tensor!r})" if tensor else ""
    return CheckpointError(f"{path}: corrupt safetensors file{where}: {msg}", path=str(path), tensor=tensor)


def _parse_entry(path, name, entry, data_len) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, "header entry is not an object", name)
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ST_DTYPES:
        raise _bad(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise _bad(path, f"data_offsets {offs!r} is not a pair of integers", name)
    begin, end = offs
    if not 0 <= begin <= end:
        raise _bad(path, f"data_offsets {offs} are not increasing", name)
    want = math.prod(shape) * ST_DTYPES[dtype][1]
    if end - begin != want:
        raise _bad(path, f"{dtype} {shape} needs {want} bytes but data_offsets {offs} give {end - begin}", name)
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at data byte {end} but the file holds only "
            f"{data_len} data bytes", path=str(path), tensor=name)
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def read_header(path, *, check_with_library: bool = True) -> Header:
    """Read and validate the header of the safetensors file ``path`` (raises CheckpointError)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {n} is not plausible (2 .. {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated file: header needs {8 + n} bytes, file has {size}",
                                      path=str(path))
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}", path=str(path)) from exc
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    infos = [_parse_entry(path, name, entry, data_len) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in infos:
        if t.begin < pos:
            raise _bad(path, f"data overlaps the previous tensor (starts at {t.begin}, previous ends at {pos})",
                       t.name)
        if t.begin > pos:
            raise _bad(path, f"gap in the data before this tensor (bytes {pos}..{t.begin} unused)", t.name)
        pos = t.end
    if pos != data_len:
        raise _bad(path, f"data section is {data_len} bytes but the tensors cover {pos}")
    if check_with_library:
        _library_check(path)
    digest = hashlib.sha256(head + raw).hexdigest()
    return Header(path, n, size, {t.name: t for t in infos}, dict(meta), digest)


def _library_check(path: Path) -> None:
    """Let the safetensors library parse the file too (a second, independent validation)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        raise _bad(path, f"rejected by the safetensors library: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}", path=str(path)) from exc


class SafetensorsFile:
    """A validated safetensors file mapped read-only; tensors are zero-copy views of the map."""

    def __init__(self, path, *, header: Optional[Header] = None):
        self.path = Path(path)
        self.header = header if header is not None else read_header(self.path)
        self._file = None
        self._map: Optional[mmap.mmap] = None
        self._lock = threading.Lock()   # the read-ahead thread may map the file first
        self._closed = False            # after close(), read-ahead is a no-op (never re-opens)
        self._bytes: Optional[torch.Tensor] = None  # the whole mapping as uint8: tensors are slices
        self._release_lock = threading.Lock()
        self._pending = (0, 0)          # [begin, end) of released tensors not yet dropped
        self._ahead = (0, 0)            # [begin, end) last asked to be read ahead

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def _mapping(self) -> mmap.mmap:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.path}: read after the file was closed", path=str(self.path))
            if self._map is None:
                f = open(self.path, "rb")
                size = os.fstat(f.fileno()).st_size
                if size != self.header.file_size:
                    f.close()
                    raise CheckpointError(f"{self.path}: file changed size since it was validated "
                                          f"({self.header.file_size} -> {size} bytes)", path=str(self.path))
                self._file = f
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._map

    def _whole(self) -> torch.Tensor:
        """The mapped file as one uint8 tensor (made once; every tensor is a slice of it)."""
        mm = self._mapping()  # raises once the file is closed
        whole = self._bytes
        if whole is None:
            with warnings.catch_warnings():  # read-only buffer: we never write through these views
                warnings.simplefilter("ignore", UserWarning)
                whole = torch.frombuffer(mm, dtype=torch.uint8)
            self._bytes = whole
        return whole

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of the mapped file (copied only if its offset is misaligned)."""
        info = self.header.tensors[name]
        dtype, size = ST_DTYPES[info.st_dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        start = self.header.data_start + info.begin
        raw = self._whole()[start:start + info.nbytes]
        if raw.data_ptr() % size:
            raw = raw.clone()  # rare: a writer that did not align the data; kernels want aligned loads
        return raw.view(dtype).reshape(info.shape)

    def address(self, name: str) -> Optional[int]:
        """The address of tensor ``name``'s data in the mapping (None when it is misaligned for its
        dtype or empty: then only :meth:`tensor` gives it). Valid while the file is open."""
        info = self.header.tensors[name]
        if info.nbytes == 0:
            return None
        addr = self._whole().data_ptr() + self.header.data_start + info.begin
        return None if addr % ST_DTYPES[info.st_dtype][1] else addr

    def _advise(self, advice: int, begin: int, end: int) -> None:
        mm = self._map
        if mm is None or end <= begin:
            return
        start = self.header.data_start + begin
        lo = start - start % PAGE
        hi = min(self.header.data_start + end, len(mm))
        try:
            mm.madvise(advice, lo, hi - lo)
        except (OSError, ValueError):
            pass  # advice only: never fatal

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading tensor ``name`` (MADV_WILLNEED; returns at once). A small
        tensor asks for RELEASE_BATCH bytes from its start, so the small ones after it need no
        further system call."""
        info = self.header.tensors[name]
        if self._closed:
            return  # a merge that failed or finished: nothing left to read ahead for
        lo, hi = self._ahead
        if lo <= info.begin and info.end <= hi:
            return  # asked for already
        self._mapping()
        end = max(info.end, min(info.begin + RELEASE_BATCH, self.header.file_size - self.header.data_start))
        self._ahead = (info.begin, end)
        self._advise(mmap.MADV_WILLNEED, info.begin, end)

    def release(self, name: str) -> None:
        """Drop tensor ``name``'s pages from this process (MADV_DONTNEED; data stays on disk).

        Tensors released one after the other in file order are dropped together, in one call
        once they span RELEASE_BATCH bytes (or when the next one is elsewhere in the file): one
        system call per few MiB, not one per small tensor."""
        info = self.header.tensors[name]
        with self._release_lock:
            lo, hi = self._pending
            if lo < hi and info.begin == hi:
                hi = info.end
            else:
                if lo < hi:
                    self._advise(mmap.MADV_DONTNEED, lo, hi)
                lo, hi = info.begin, info.end
            if hi - lo >= RELEASE_BATCH:
                self._advise(mmap.MADV_DONTNEED, lo, hi)
                lo = hi = 0
            self._pending = (lo, hi)

    def close(self) -> None:
        """Unmap (if no tensor view is alive any more; otherwise the map goes with the last view)."""
        with self._lock:
            self._closed = True
            self._close()

    def _close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views still exported: the mapping is freed when they are
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["ST_DTYPES", "TORCH_TO_ST", "TensorInfo", "Header", "read_header", "SafetensorsFile",
           "torch_dtype_name", "MAX_HEADER_BYTES"]
