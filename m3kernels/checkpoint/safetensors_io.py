"""Reading safetensors files safely and without copies: validated headers, mmap'd tensor views.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name ->
dtype, shape, [begin, end) byte offsets into the data that follows; optional string map
``__metadata__``), then the data. :func:`read_header` checks everything a corrupt or truncated
file could get wrong before any tensor is touched (length sane, JSON an object, known dtypes,
non-negative integer shapes, dtype × shape = byte size, offsets inside the file, no overlaps,
no holes) and then lets the safetensors library's own parser check the file as well. The JSON
is parsed with limits (:func:`load_json`: size, nesting, integer digits, duplicate keys, UTF-8)
and every integer is range-checked before use, so a hostile header is a
:class:`~m3kernels.errors.CheckpointError` naming the file and tensor, never an internal error.

Input files are opened by :func:`open_input`: only regular files (a FIFO, device, socket or
folder is refused without blocking), and, when the caller names the model folder, only files
that resolve inside it (symbolic links out of it need ``follow_symlinks``). The open file
(:class:`InputFile`) keeps the size and mtime it had and, where the OS grants one (Linux, the
file's owner or CAP_LEASE, a local file system), a read lease (``F_SETLEASE``): whoever then
opens the file for writing or truncates it is held off by the kernel (up to
``/proc/sys/fs/lease-break-time``, 45 s by default) while the merge notices the pending break
at its next tensor and stops with :class:`~m3kernels.errors.InputChangedError`. Without a lease
the size and mtime are compared instead, before and after each tensor is read, and tensors are
read with ``pread`` into memory of our own instead of being mapped: a mapped file that someone
else truncates kills the reader with SIGBUS, a read only comes back short (one copy per tensor,
resident while it is merged).

:class:`SafetensorsFile` maps the file read-only and hands out ``torch`` tensors that are views
of the mapping (no copy; bf16 through a uint8 view), plus page hints: :meth:`prefetch`
(``MADV_WILLNEED``: start reading ahead) and :meth:`release` (``MADV_DONTNEED``: drop the pages
from this process once a tensor is merged, so resident memory stays bounded).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import signal
import stat
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from m3kernels.errors import CheckpointError, InputChangedError

log = logging.getLogger("m3kernels")

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
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        _dt = getattr(torch, _attr)
        ST_DTYPES[_name] = (_dt, torch.empty((), dtype=_dt).element_size())
TORCH_TO_ST = {dt: name for name, (dt, _) in ST_DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_JSON_BYTES = 64 << 20  # config.json, index files
MAX_JSON_DEPTH = 64  # nesting of arrays/objects in config.json and index files
MAX_INT_DIGITS = 40  # longer integer literals in JSON are refused before conversion
MAX_DIMS = 64  # dimensions of one tensor
INT_MAX = 2**63 - 1  # every shape, offset and size must fit an int64
NO_LEASE_ENV = "M3KERNELS_NO_LEASE"  # set to 1: no read leases, size/mtime checks only
PAGE = mmap.PAGESIZE
RELEASE_BATCH = 4 << 20  # consecutive released tensors are dropped together once they span this


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
    header_len: int  # N, the JSON length
    file_size: int
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]
    sha256: str  # of the 8 + N header bytes: a cheap fingerprint of the file

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ('BF16', ...)."""
    if dtype not in TORCH_TO_ST:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return TORCH_TO_ST[dtype]


# ------------------------------------------------------------------------------ bounded JSON
class _JSONLimit(ValueError):
    """A limit of :func:`load_json` was hit (the message says which)."""


def _unique_pairs(pairs):
    obj = dict(pairs)  # in C; only when a key repeats is the slow loop needed to name it
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _JSONLimit(f"key {short(k)} appears twice in one object")
            seen.add(k)
    return obj


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _JSONLimit(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str):
    raise _JSONLimit(f"{name} is not a JSON value")


def _too_deep(obj, limit: int) -> bool:
    """Whether ``obj`` nests arrays/objects more than ``limit`` deep (iterative: no recursion)."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        items = o.values() if isinstance(o, dict) else o
        stack.extend((c, d + 1) for c in items if isinstance(c, (dict, list)))
    return False


def short(value, limit: int = 60) -> str:
    """A value from a file for a message: scalars as repr (cut), containers by kind and size."""
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_json(raw: bytes, *, max_depth: int | None = MAX_JSON_DEPTH, constants: bool = True):
    """(object, None) or (None, what is wrong: 'is not valid JSON (...)', ...) for JSON bytes,
    parsed with limits: UTF-8, at most ``max_depth`` levels of nesting (None: only the parser's
    recursion limit, for a caller that checks the structure itself), integers of at most
    MAX_INT_DIGITS digits, no key twice in one object, NaN/Infinity only with ``constants``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            None,
            f"is not valid JSON: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
        )
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_pairs,
            parse_int=_bounded_int,
            **({} if constants else {"parse_constant": _no_constant}),
        )
    except RecursionError:
        return None, "nests arrays/objects too deeply"
    except _JSONLimit as exc:
        return None, f"is refused: {exc}"
    except ValueError as exc:  # JSONDecodeError, and any other refusal by the parser
        return None, f"is not valid JSON ({exc})"
    if max_depth is not None and _too_deep(obj, max_depth):
        return None, f"nests arrays/objects more than {max_depth} levels deep"
    return obj, None


def load_json(raw: bytes, path, what: str, **limits):
    """:func:`parse_json`, raising CheckpointError naming ``path`` and ``what``."""
    obj, problem = parse_json(raw, **limits)
    if problem is not None:
        raise CheckpointError(f"{path}: {what} {problem}", path=str(path))
    return obj


# ------------------------------------------------------------------------------ input files
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def model_roots(root) -> tuple:
    """The real folders a model folder's files may resolve into: the folder itself and, for a
    Hugging Face cache snapshot (``.../snapshots/REV``, whose files link to ``../../blobs``), that
    repository's ``blobs`` folder."""
    real = os.path.realpath(root)
    parent = os.path.dirname(real)
    roots = [real]
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return tuple(roots)


def _opened_path(fd: int) -> str | None:
    """The path the kernel has for an open file (Linux /proc), None where it cannot say."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith(os.sep) and not target.endswith(" (deleted)") else None


def _within(real: str, roots) -> bool:
    return any(real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class InputFile:
    """An input file opened read-only by :func:`open_input`: its descriptor, the size and mtime
    it had then, and (when granted) a read lease that keeps it from being changed unseen."""

    def __init__(self, path, fd: int, real: str):
        self.path = Path(path)
        self.real = real  # the file's resolved path
        self.fd = fd
        st = os.fstat(fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.leased = False

    def take_lease(self) -> bool:
        """Ask for a read lease (False where the OS refuses: not Linux, not the file's owner,
        a network file system, or the file is open for writing somewhere)."""
        if (
            self.leased
            or not hasattr(fcntl, "F_SETLEASE")
            or os.environ.get(NO_LEASE_ENV, "") not in ("", "0")
        ):
            return self.leased
        try:
            if hasattr(fcntl, "F_SETSIG"):
                fcntl.fcntl(self.fd, fcntl.F_SETSIG, signal.SIGURG)  # ignored by default
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                log.info(
                    "%s is open for writing by another process: no read lease; size and mtime are "
                    "checked instead",
                    self.path,
                )
            return False
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, 0)  # no signal when the lease is broken: polled instead
        except OSError:
            pass
        self.leased = True
        return True

    def changed(self) -> str | None:
        """None while the file is as it was opened; else what happened to it."""
        if self.fd < 0:
            return "the file was closed"
        if self.leased:
            try:
                intact = fcntl.fcntl(self.fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
            except OSError:
                intact = False
            if intact:
                return None
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            return f"it can no longer be read ({exc.strerror or exc})"
        if st.st_size != self.size:
            return f"it changed size from {self.size:,} to {st.st_size:,} bytes"
        if st.st_mtime_ns != self.mtime_ns:
            return "it was rewritten (its modification time changed)"
        if self.leased:
            return "another process opened it for writing or is truncating it"
        return None

    def check(self, tensor: str | None = None, when: str = "before reading") -> None:
        """Raise InputChangedError if the file changed since it was opened (``when``: for the message)."""
        what = self.changed()
        if what is not None:
            where = f" tensor {tensor!r}" if tensor is not None else ""
            raise InputChangedError(
                f"{self.path}: input file changed while the merge was reading it ({what}; "
                f"noticed {when}{where}); inputs must not change during a merge",
                path=str(self.path),
                tensor=tensor,
            )

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` (fewer only at the end of the file)."""
        chunks, got = [], 0
        while got < n:
            chunk = os.pread(self.fd, min(n - got, 1 << 26), offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self.leased:
            self.leased = False
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)  # a mapping of the file may outlive fd
            except OSError:
                pass
        os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_input(path, *, roots=None, what: str = "file", lease: bool = True) -> InputFile:
    """Open an input file read-only, refusing anything but a regular file (FIFOs, devices,
    sockets and folders are refused without being opened for use: nothing blocks) and, when
    ``roots`` (see :func:`model_roots`) is given, a file that resolves outside those folders
    (a symbolic link out of the model folder). Takes a read lease when ``lease``."""
    path = Path(path)
    try:
        real = os.path.realpath(path)
        if roots is not None and not _within(real, roots):
            raise CheckpointError(
                f"{path}: {what} resolves to {real}, outside the model folder {roots[0]}; links out of a "
                f"model folder are not followed (pass --follow-symlinks, follow_symlinks=True, to read it)",
                path=str(path),
            )
        target = real if roots is not None else path
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{path}: {what} is {_kind(st.st_mode)}, not a regular file; not read", path=str(path)
            )
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        if roots is not None:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open {what}: {exc.strerror or exc}", path=str(path)) from None
    except ValueError as exc:  # a NUL byte in the name
        raise CheckpointError(f"{path}: cannot open {what}: {exc}", path=str(path)) from None
    try:
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise CheckpointError(f"{path}: {what} was replaced while being opened; not read", path=str(path))
        opened = _opened_path(fd) if roots is not None else None
        if opened is not None and not _within(opened, roots):  # a folder on the way became a link meanwhile
            raise CheckpointError(
                f"{path}: {what} was moved outside the model folder while being opened; not read",
                path=str(path),
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        f = InputFile(path, fd, real)
    except BaseException:
        os.close(fd)
        raise
    if lease:
        f.take_lease()
    return f


def read_input_bytes(f: InputFile, limit: int, what: str) -> bytes:
    """All of an opened input file, refusing one larger than ``limit`` bytes."""
    if f.size > limit:
        raise CheckpointError(
            f"{f.path}: {what} is {f.size:,} bytes, more than the {limit:,} accepted", path=str(f.path)
        )
    try:
        return f.read(0, limit + 1)[:limit]
    except OSError as exc:
        raise CheckpointError(
            f"{f.path}: cannot read {what}: {exc.strerror or exc}", path=str(f.path)
        ) from None


# ------------------------------------------------------------------------------ headers
def _bad(path, msg, tensor=None) -> CheckpointError:
    where = f" (tensor {tensor!r})" if tensor else ""
    return CheckpointError(f"{path}: corrupt safetensors file{where}: {msg}", path=str(path), tensor=tensor)


def _parse_entry(path, name, entry, data_len) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry is {short(entry)}, not an object", name)
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _bad(path, f"dtype is {short(dtype)}, not a dtype name such as 'BF16'", name)
    if dtype not in ST_DTYPES:
        raise _bad(path, f"unknown dtype {short(dtype)} (m3kernels reads {', '.join(ST_DTYPES)})", name)
    # (type(d) is int: JSON gives int or bool, and bool is not an int shape here)
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= INT_MAX for d in shape):
        raise _bad(
            path,
            f"shape {short(shape) if not isinstance(shape, list) or len(shape) > 8 else shape!r} "
            f"is not a list of non-negative integers below 2**63",
            name,
        )
    if len(shape) > MAX_DIMS:
        raise _bad(path, f"shape has {len(shape)} dimensions (at most {MAX_DIMS})", name)
    if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int:
        raise _bad(
            path,
            f"data_offsets {short(offs) if not isinstance(offs, list) or len(offs) > 2 else offs!r} "
            f"is not a pair of integers",
            name,
        )
    begin, end = offs
    if not 0 <= begin <= end:
        raise _bad(path, f"data_offsets {offs} are not increasing", name)
    if end > INT_MAX:
        raise _bad(path, f"data_offsets {offs} are beyond 2**63", name)
    numel = math.prod(d for d in shape if d)
    if numel * ST_DTYPES[dtype][1] > INT_MAX:
        raise _bad(path, f"shape {shape} holds more than 2**63 bytes", name)
    want = math.prod(shape) * ST_DTYPES[dtype][1]
    if end - begin != want:
        raise _bad(
            path, f"{dtype} {shape} needs {want} bytes but data_offsets {offs} give {end - begin}", name
        )
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at data byte {end} but the file holds only "
            f"{data_len} data bytes",
            path=str(path),
            tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def read_header(path, *, check_with_library: bool = True, file: InputFile | None = None) -> Header:
    """Read and validate the header of the safetensors file ``path`` (raises CheckpointError).

    ``file``: the file already opened (:func:`open_input`); else ``path`` is opened here (a
    regular file only) and closed again."""
    path = Path(path)
    own = file is None
    if own:
        file = open_input(path, what="safetensors file", lease=False)
    try:
        return _read_header(path, file, check_with_library)
    finally:
        if own:
            file.close()


def _read_header(path: Path, file: InputFile, check_with_library: bool) -> Header:
    size = file.size
    try:
        head = file.read(0, 8)
        if len(head) < 8:
            raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES:  # (a huge value is not printed: it is 8 bytes of a foreign file)
            shown = f" {n}" if n < 1 << 40 else " (the first 8 bytes, little-endian)"
            raise _bad(path, f"header length{shown} is not plausible (2 .. {MAX_HEADER_BYTES})")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated file: header needs {8 + n} bytes, file has {size}", path=str(path)
            )
        raw = file.read(8, n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}", path=str(path)) from None
    if len(raw) < n:
        raise CheckpointError(
            f"{path}: truncated file: header needs {8 + n} bytes, file has {8 + len(raw)}", path=str(path)
        )
    obj, problem = parse_json(raw, max_depth=None, constants=False)
    if problem is not None:
        raise _bad(path, f"header {problem}")
    if not isinstance(obj, dict):
        raise _bad(path, f"header is {short(obj)}, not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        bad = (
            next((k for k, v in meta.items() if not isinstance(v, str)), None)
            if isinstance(meta, dict)
            else None
        )
        what = f"{short(meta)}" if bad is None else f"{short(bad)} -> {short(meta[bad])}"
        raise _bad(path, f"__metadata__ must map strings to strings (got {what})")
    data_len = size - 8 - n
    infos = [_parse_entry(path, name, entry, data_len) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in infos:
        if t.begin < pos:
            raise _bad(
                path,
                f"data overlaps the previous tensor (starts at {t.begin}, previous ends at {pos})",
                t.name,
            )
        if t.begin > pos:
            raise _bad(path, f"gap in the data before this tensor (bytes {pos}..{t.begin} unused)", t.name)
        pos = t.end
    if pos != data_len:
        raise _bad(path, f"data section is {data_len} bytes but the tensors cover {pos}")
    if check_with_library:
        _library_check(path, file.fd)
    digest = hashlib.sha256(head + raw).hexdigest()
    return Header(path, n, size, {t.name: t for t in infos}, dict(meta), digest)


def _library_check(path: Path, fd: int | None = None) -> None:
    """Let the safetensors library parse the file too (a second, independent validation), through
    the open descriptor where /proc allows (the very file our checks read, whatever the name)."""
    from safetensors import SafetensorError, safe_open

    name = str(path)
    if fd is not None and os.path.isdir("/proc/self/fd"):
        name = f"/proc/self/fd/{fd}"
    try:
        with safe_open(name, framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        raise _bad(path, f"rejected by the safetensors library: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}", path=str(path)) from exc


class SafetensorsFile:
    """A validated safetensors file mapped read-only; tensors are zero-copy views of the map.

    The file is opened once (:func:`open_input`, with ``roots`` when it lies in a model folder),
    its header read from that descriptor, and the same descriptor mapped. :meth:`tensor` and
    :meth:`address` check that the file is unchanged before handing out its data, and
    :meth:`release` checks again after it was used (:meth:`InputFile.check`)."""

    def __init__(self, path, *, header: Header | None = None, roots=None, file: InputFile | None = None):
        self.path = Path(path)
        self._file = file if file is not None else open_input(self.path, roots=roots, what="safetensors file")
        try:
            self.header = header if header is not None else read_header(self.path, file=self._file)
            if self.header.file_size != self._file.size:
                raise InputChangedError(
                    f"{self.path}: file changed size since it was validated "
                    f"({self.header.file_size} -> {self._file.size} bytes)",
                    path=str(self.path),
                )
        except BaseException:
            self._file.close()
            raise
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()  # the read-ahead thread may map the file first
        self._closed = False  # after close(), read-ahead is a no-op (never re-opens)
        self._bytes: torch.Tensor | None = None  # the whole mapping as uint8: tensors are slices
        self._release_lock = threading.Lock()
        self._pending = (0, 0)  # [begin, end) of released tensors not yet dropped
        self._ahead = (0, 0)  # [begin, end) last asked to be read ahead

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def input_file(self) -> InputFile:
        return self._file

    def check(self, tensor: str | None = None, when: str = "before reading") -> None:
        """Raise InputChangedError if the file changed since it was opened (CheckpointError once closed)."""
        if self._closed:
            raise CheckpointError(f"{self.path}: read after the file was closed", path=str(self.path))
        self._file.check(tensor, when)

    def _mapping(self) -> mmap.mmap:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.path}: read after the file was closed", path=str(self.path))
            if self._map is None:
                self._file.check(when="when mapping it")
                try:
                    self._map = mmap.mmap(self._file.fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as exc:
                    raise CheckpointError(
                        f"{self.path}: cannot map the file: {exc}", path=str(self.path)
                    ) from None
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
        self.check(name)
        start = self.header.data_start + info.begin
        if not self._file.leased:
            return self._read_copy(name, start, info.nbytes).view(dtype).reshape(info.shape)
        raw = self._whole()[start : start + info.nbytes]
        if raw.data_ptr() % size:
            raw = raw.clone()  # rare: a writer that did not align the data; kernels want aligned loads
        return raw.view(dtype).reshape(info.shape)

    def _read_copy(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        """Tensor ``name``'s bytes read into memory of our own (``pread``): used when the file has no
        read lease. A mapped file truncated by someone else kills the reader with SIGBUS at the
        first access past the new end; a read only comes back short, which we report."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            try:
                n = os.preadv(self._file.fd, [view[got:]], start + got)
            except OSError as exc:
                raise InputChangedError(
                    f"{self.path}: cannot read tensor {name!r}: {exc.strerror or exc}",
                    path=str(self.path),
                    tensor=name,
                ) from None
            if n <= 0:
                self._file.check(name, "while reading")  # names what happened (size or mtime)
                raise InputChangedError(
                    f"{self.path}: input file changed while the merge was reading it (it ended "
                    f"{nbytes - got:,} bytes early, in tensor {name!r}); inputs must not change during a merge",
                    path=str(self.path),
                    tensor=name,
                )
            got += n
        return buf

    def address(self, name: str) -> int | None:
        """The address of tensor ``name``'s data in the mapping (None when it is misaligned for its
        dtype or empty, or the file has no read lease: then only :meth:`tensor` gives it, as a
        copy). Valid while the file is open."""
        info = self.header.tensors[name]
        if info.nbytes == 0 or not self._file.leased:
            return None
        self.check(name)
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
        end = max(info.end, min(info.begin + RELEASE_BATCH, self.header.file_size - self.header.data_start))
        self._ahead = (info.begin, end)
        if not self._file.leased:  # read with pread (no mapping): ask the page cache instead
            try:
                start = self.header.data_start + info.begin
                os.posix_fadvise(self._file.fd, start, end - info.begin, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                pass  # advice only
            return
        self._mapping()
        self._advise(mmap.MADV_WILLNEED, info.begin, end)

    def release(self, name: str) -> None:
        """Drop tensor ``name``'s pages from this process (MADV_DONTNEED; data stays on disk).

        Tensors released one after the other in file order are dropped together, in one call
        once they span RELEASE_BATCH bytes (or when the next one is elsewhere in the file): one
        system call per few MiB, not one per small tensor.

        Checks the file first: a change while the tensor was being read raises InputChangedError
        (its data may be torn), so the merged result is never written."""
        info = self.header.tensors[name]
        if self._closed:
            return
        if info.nbytes:
            self._file.check(name, "after reading")
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
        self._file.close()  # drops the read lease too (a mapping kept alive by views may outlive it)


__all__ = [
    "ST_DTYPES",
    "TORCH_TO_ST",
    "TensorInfo",
    "Header",
    "read_header",
    "SafetensorsFile",
    "torch_dtype_name",
    "MAX_HEADER_BYTES",
    "InputFile",
    "open_input",
    "model_roots",
    "load_json",
    "parse_json",
    "read_input_bytes",
    "short",
]
