"""Writing the merged checkpoint safely: sharded safetensors, a resume journal, atomic publish.

* Output goes into a temporary folder beside OUT_DIR (``.OUT_DIR.m3k-tmp-XXXX``); OUT_DIR
  itself is created only by renaming the finished folder into place (after every file and the
  folder are fsynced), so a killed run never leaves a folder that looks complete.
* :class:`ShardedWriter` runs in its own thread and writes tensors, in plan order, straight from
  the merged (or memory-mapped) tensors into ``model-0000i-of-0000N.safetensors``; every shard
  header (tensor offsets and ``__metadata__``) is known in advance from the plan. A finished
  shard is fsynced and recorded in the journal with its size and SHA-256.
* The journal (``.m3k-journal.json``) also holds a fingerprint of the config, the inputs and the
  plan; ``--resume`` reuses only a folder whose fingerprint matches and only shards whose size
  and hash still check out.
* :func:`publish` first writes a publish record beside OUT (``.OUT.m3k-publish.json``: the
  temporary folder, the folder a replaced OUT is moved to, and the journal), then removes the
  journal and renames; a run killed anywhere in between is put back by the next run that takes
  OUT's lock (:func:`tidy_temp_folders`): the previous OUT renamed back if it was moved aside,
  the journal restored into the finished temporary folder, which ``--resume`` then checks
  (shard sizes and hashes against the journal, side files written again) and publishes. The same
  run removes temporary folders that never got a journal (a run killed at its very start) and
  the leftovers of a publish that had finished its renames.
* OS errors become :class:`~m3kernels.errors.DiskFullError` (ENOSPC, EDQUOT) or
  :class:`~m3kernels.errors.OutputWriteError`, naming the file and the tensor.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from m3kernels.checkpoint.output_guard import assert_lock_held
from m3kernels.checkpoint.safetensors_io import torch_dtype_name
from m3kernels.errors import DiskFullError, OutputExistsError, OutputWriteError

JOURNAL = ".m3k-journal.json"
JOURNAL_FORMAT = 1
TMP_MARK = ".m3k-tmp-"
OLD_MARK = ".m3k-old-"
PUBLISH_MARK = ".m3k-publish.json"
PUBLISH_FORMAT = 1
_TAG = re.compile(r"[0-9a-f]{8}")  # the random part of a temporary / old folder's name
log = logging.getLogger("m3kernels")
HASH_CHUNK = 1 << 24
STAGING_BYTES = 8 << 20  # output staging buffer (a multiple of DIRECT_ALIGN)
DIRECT_ALIGN = 4096


# ------------------------------------------------------------------------------ OS helpers
@contextlib.contextmanager
def os_errors(path, tensor: str | None = None):
    """Turn OSError into a DiskFullError / OutputWriteError naming ``path`` (and ``tensor``)."""
    try:
        yield
    except OSError as exc:
        what = f" (tensor {tensor!r})" if tensor else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{path}: no space left on the device while writing{what}", path=str(path), tensor=tensor
            ) from None
        raise OutputWriteError(
            f"{path}: cannot write{what}: {exc.strerror or exc}", path=str(path), tensor=tensor
        ) from None


def _write_bytes(fd: int, data) -> None:
    """Write a whole buffer to file descriptor ``fd`` (the one place output bytes go; tests patch it)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsync, rename."""
    tmp = path.with_name(path.name + ".part")
    with os_errors(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_bytes(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def copy_file_durably(src: Path, dst: Path) -> None:
    with os_errors(dst):
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def file_sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 of the file's first ``limit`` bytes (all of it when ``limit`` is None)."""
    h = hashlib.sha256()
    left = float("inf") if limit is None else int(limit)
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(int(min(HASH_CHUNK, left)))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ headers
def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (C order) as a flat uint8 tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


DIRECT_MIN = 1 << 20  # writes of at least this many bytes may skip the staging copy ...
DIRECT_CHUNK = 64 << 20  # ... and go out in O_DIRECT writes of at most this many bytes


class ShardFile:
    """One output file written front to back, fingerprinted on the way.

    The fingerprint is the SHA-256 of the first write (the safetensors header, which names
    every tensor with its offsets) or, with ``full_hash=True``, of the whole file. Hashing every
    byte cost about 1 s per 2 GB on the writer thread, enough to slow the merge itself on a
    2-core machine; a shard enters the resume journal only after it is complete and fsync'd,
    so its size, modification time and header fingerprint are what resume needs to check.

    Bytes are gathered in a page-aligned staging buffer and written in large aligned blocks
    with ``O_DIRECT`` where the file system allows it: writing through the page cache costs
    about as much CPU as a merge kernel, and the output need not stay cached. The last block is
    padded and the file truncated to its size. Where ``O_DIRECT`` is refused (tmpfs, some
    network file systems) or ``M3KERNELS_NO_DIRECT_IO=1``, the same blocks go through ordinary
    buffered writes.

    A large write (at least DIRECT_MIN bytes) whose bytes lie in memory at the file's page phase
    (``data_ptr() + k`` page-aligned where file offset ``size + k`` is) skips the staging copy:
    the staging buffer is topped up to the page boundary and flushed, the whole pages go straight
    from the caller's memory in ``O_DIRECT`` writes of at most DIRECT_CHUNK bytes, the last
    partial page is staged. The producer's output buffers are placed that way
    (:func:`output_offset`, ``produce.BufferPool``); the bytes in the file are the same.
    """

    def __init__(self, path: Path, staging: int = STAGING_BYTES, full_hash: bool = False):
        self.path = Path(path)
        self.size = 0
        self.hash = hashlib.sha256()
        self.full_hash = full_hash
        self.hashed = 0  # bytes covered by the fingerprint
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT") and os.environ.get("M3KERNELS_NO_DIRECT_IO", "") in ("", "0")
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(self.path, flags, 0o644)
        self._map = mmap.mmap(-1, staging)  # page-aligned
        self._stage = torch.frombuffer(self._map, dtype=torch.uint8)
        self._fill = 0

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of a flat uint8 CPU tensor."""
        n = data.numel()
        if n == 0:
            return
        if self.full_hash or self.hashed == 0:
            self.hash.update(memoryview(data.numpy()))
            self.hashed += n
        head = -self.size % DIRECT_ALIGN  # bytes up to the file's next page boundary
        if self.direct and n - head >= DIRECT_MIN and (data.data_ptr() + head) % DIRECT_ALIGN == 0:
            body = (n - head) // DIRECT_ALIGN * DIRECT_ALIGN
            self._stage_bytes(data[:head])
            if self._fill:  # now a whole number of pages
                self._flush(self._fill)
            self._write_direct(data, head, head + body)
            self._stage_bytes(data[head + body :])
        else:
            self._stage_bytes(data)
        self.size += n

    def _write_direct(self, data: torch.Tensor, lo: int, hi: int) -> None:
        """Write data[lo:hi] (whole pages, page-aligned in memory and in the file) from where it is."""
        view = memoryview(data.numpy())
        try:
            for off in range(lo, hi, DIRECT_CHUNK):
                block = view[off : min(hi, off + DIRECT_CHUNK)]
                try:
                    self._write_block(block)
                finally:
                    block.release()
        finally:
            view.release()

    def _stage_bytes(self, data: torch.Tensor) -> None:
        """Copy data into the staging buffer, flushing it each time it is full."""
        n = data.numel()
        cap = self._stage.numel()
        pos = 0
        while pos < n:
            k = min(cap - self._fill, n - pos)
            self._stage[self._fill : self._fill + k].copy_(data[pos : pos + k])
            self._fill += k
            pos += k
            if self._fill == cap:
                self._flush(cap)

    def _write_block(self, block) -> None:
        """Write one block; if O_DIRECT is refused at write time, go on with buffered writes."""
        try:
            _write_bytes(self.fd, block)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            self._drop_direct()
            _write_bytes(self.fd, block)

    def _flush(self, nbytes: int) -> None:
        block = memoryview(self._map)[:nbytes]
        try:
            self._write_block(block)
        finally:
            block.release()
        self._fill = 0

    def _drop_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def finish(self) -> tuple[int, str]:
        """Write the tail, set the exact size, fsync, close; returns (size, fingerprint hex)."""
        if self._fill:
            if self.direct:
                padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
                self._stage[self._fill : padded].zero_()
                self._flush(padded)
                os.ftruncate(self.fd, self.size)
            else:
                self._flush(self._fill)
        os.fsync(self.fd)
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and synced: no need to cache it
        self.close()
        return self.size, self.hash.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._stage = None
        try:
            self._map.close()
        except BufferError:
            pass


def shard_header(tensors, metadata: dict) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes) for ``tensors`` in order."""
    obj = {"__metadata__": dict(metadata)}
    pos = 0
    for t in tensors:
        obj[t.name] = {
            "dtype": torch_dtype_name(t.out_dtype),
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        pos += t.nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# ------------------------------------------------------------------------------ journal
RANK_JOURNAL = ".m3k-journal.rank{rank}.json"  # a distributed merge: each rank records its own shards
RANK_FAILED = ".m3k-failed.rank{rank}.txt"  # a distributed merge: a rank's error, for the others
_RANK_FILE_RE = re.compile(r"\.m3k-(journal|failed)\.rank(\d{1,6})\.(json|txt)")


class Journal:
    """The temporary folder's record of finished shards (written atomically after each).

    ``name``: the file (the main journal, or one rank's in a distributed merge: ranks never write
    one file together). :meth:`load` of the main journal folds in the rank journals of the same
    fingerprint, and the next :meth:`save` of the main journal removes those files (and the ranks'
    failure notes), so a
    distributed run is resumed by one process or by several alike, and never published with them.
    """

    def __init__(self, folder: Path, fingerprint: str, data: dict | None = None, name: str = JOURNAL):
        self.folder = Path(folder)
        self.name = name
        self.data = data or {"format": JOURNAL_FORMAT, "fingerprint": fingerprint, "shards": {}, "extra": {}}
        self._absorbed: list = []  # rank journals folded in (removed by the next save)

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def shards(self) -> dict:
        return self.data["shards"]

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (
            not isinstance(data, dict)
            or data.get("format") != JOURNAL_FORMAT
            or not isinstance(data.get("shards"), dict)
        ):
            return None
        data.setdefault("extra", {})
        return data

    @classmethod
    def load(cls, folder: Path) -> Journal | None:
        folder = Path(folder)
        data = cls._read(folder / JOURNAL)
        if data is None:
            return None
        journal = cls(folder, data.get("fingerprint"), data)
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        for name in names:
            m = _RANK_FILE_RE.fullmatch(name)
            if m is None:
                continue
            part = cls._read(folder / name) if m.group(1) == "journal" else None
            if part is not None and part.get("fingerprint") == journal.fingerprint:
                for fname, rec in part["shards"].items():
                    journal.shards.setdefault(fname, rec)
            journal._absorbed.append(folder / name)  # failure notes, other merges' journals: dropped too
        return journal

    def save(self) -> None:
        write_file_durably(self.folder / self.name, json.dumps(self.data, indent=1).encode())
        for path in self._absorbed:  # now recorded in this journal
            with os_errors(path):
                path.unlink(missing_ok=True)
        self._absorbed = []
        with os_errors(self.folder):
            fsync_dir(self.folder)

    def shard_done(self, filename: str, size: int, digest: str, hashed: int) -> None:
        st = (self.folder / filename).stat()
        self.shards[filename] = {
            "bytes": size,
            "sha256": digest,
            "hashed_bytes": hashed,
            "mtime_ns": st.st_mtime_ns,
        }
        self.save()

    def verified_shards(self) -> tuple[set, list]:
        """(file names whose size and hash still match, messages about the others)."""
        good, bad = set(), []
        for fname, rec in list(self.shards.items()):
            p = self.folder / fname
            try:
                st = p.stat()
                ok = (
                    st.st_size == rec["bytes"]
                    and st.st_mtime_ns == rec.get("mtime_ns")
                    and file_sha256(p, rec.get("hashed_bytes")) == rec["sha256"]
                )
            except OSError:
                ok = False
            if ok:
                good.add(fname)
            else:
                bad.append(f"{p}: size or hash changed since it was written; writing it again")
                del self.shards[fname]
        return good, bad


# ------------------------------------------------------------------------------ folders
def temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}{TMP_MARK}"


def make_temp_dir(out_dir: Path) -> Path:
    parent = out_dir.parent
    with os_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / (temp_prefix(out_dir) + secrets.token_hex(4))
        tmp.mkdir()
        return tmp


def publish_record_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{PUBLISH_MARK}"


def _ours(out_dir: Path, name: str, mark: str) -> bool:
    """Whether ``name`` (in OUT's parent) is a folder name m3kernels made for ``out_dir`` with ``mark``."""
    prefix = f".{out_dir.name}{mark}"
    return name.startswith(prefix) and bool(_TAG.fullmatch(name[len(prefix) :]))


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _read_publish_record(out_dir: Path) -> dict | None:
    path = publish_record_path(out_dir)
    try:
        raw = path.read_bytes()[: 1 << 26]
        rec = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}
    return rec if isinstance(rec, dict) else {}


def tidy_temp_folders(out_dir: Path, sweep: bool = True) -> list:
    """Put back what a run killed in :func:`publish` left, and remove orphaned folders of OUT.

    Only under OUT's exclusive lock (no other run can be using a temporary folder of OUT then).
    * A publish record whose temporary folder is still there (the rename did not happen): the
      previous OUT is renamed back if it had been moved aside, and the journal is written back
      into the finished folder, which is then an unfinished run like any other (``--resume``
      checks its shards and publishes it).
    * A publish record whose temporary folder is gone (the rename happened): the moved-aside
      previous OUT is removed.
    * A temporary folder of OUT without a journal (killed before its first journal write):
      removed (``sweep``). (A moved-aside OUT that no record names is never removed.)
    Returns messages about what was done (for the log)."""
    assert_lock_held(out_dir)
    parent, notes = out_dir.parent, []
    rec = _read_publish_record(out_dir)
    if rec is not None:
        tmp_name, old_name = rec.get("tmp"), rec.get("old")
        tmp = parent / tmp_name if isinstance(tmp_name, str) and _ours(out_dir, tmp_name, TMP_MARK) else None
        old = parent / old_name if isinstance(old_name, str) and _ours(out_dir, old_name, OLD_MARK) else None
        with os_errors(publish_record_path(out_dir)):
            if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
                if old is not None and old.is_dir() and not (out_dir.exists() or out_dir.is_symlink()):
                    os.rename(old, out_dir)  # undo the first rename of a publish with force
                    notes.append(f"{out_dir}: put back (a merge was killed while replacing it)")
                    log.warning(notes[-1])
                elif old is not None and old.exists():  # OUT is there again in some other form
                    notes.append(
                        f"{old}: the output a killed merge was replacing; {out_dir} exists again, "
                        f"so it is left for you"
                    )
                    log.warning(notes[-1])
                data = rec.get("journal")
                if (
                    not (tmp / JOURNAL).exists()
                    and isinstance(data, dict)
                    and data.get("format") == JOURNAL_FORMAT
                    and isinstance(data.get("shards"), dict)
                ):
                    data.setdefault("extra", {})
                    Journal(tmp, data.get("fingerprint"), data).save()
                    notes.append(
                        f"{tmp}: a finished merge killed while being published; --resume publishes it"
                    )
                    log.warning(notes[-1])
            elif old is not None and (old.exists() or old.is_symlink()):
                _remove_tree(old)  # the output was published: the folder it replaced goes
            publish_record_path(out_dir).unlink(missing_ok=True)
            fsync_dir(parent)
    if not sweep:
        return notes
    try:
        names = os.listdir(parent)
    except OSError:
        return notes
    for name in names:
        p = parent / name
        if (
            _ours(out_dir, name, TMP_MARK)
            and p.is_dir()
            and not p.is_symlink()
            and not os.path.lexists(p / JOURNAL)
        ):
            with os_errors(p):
                shutil.rmtree(p)
            notes.append(f"{p}: removed (a merge killed before it had written anything)")
            log.info(notes[-1])
    return notes


def partial_runs(out_dir: Path) -> list:
    """[(folder, journal)] of unfinished runs for ``out_dir``, newest first."""
    prefix = temp_prefix(out_dir)
    try:
        names = os.listdir(out_dir.parent)  # not a glob: OUT's name may hold glob characters (out[1])
    except OSError:
        return []
    found = []
    for name in names:
        # the rest is a random hex tag: not the temporary folder of an OUT named "OUT.m3k-tmp-x"
        if not name.startswith(prefix) or "." in name[len(prefix) :]:
            continue
        p = out_dir.parent / name
        j = Journal.load(p) if p.is_dir() and not p.is_symlink() else None
        if j is not None:
            found.append((p, j))
    found.sort(key=lambda pj: pj[0].stat().st_mtime_ns, reverse=True)
    return found


def publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir`` (replacing it only with ``force``).

    Only under OUT's lock (:mod:`m3kernels.checkpoint.output_guard`), held by this process on
    the file now at the lock path, and only a real temporary folder of ``out_dir``: those are
    used by no other run, so nothing another run is writing is renamed or deleted.

    Steps (a kill between any two is undone by :func:`tidy_temp_folders` in the next run): the
    publish record (with the journal) is written and synced; the journal is removed from
    ``tmp``; an existing OUT (``force``) is renamed aside; ``tmp`` is renamed to OUT; the
    folder set aside is removed; the record is removed.
    """
    assert_lock_held(out_dir)
    if (
        tmp.parent != out_dir.parent
        or not tmp.name.startswith(temp_prefix(out_dir))
        or tmp.is_symlink()
        or not tmp.is_dir()
    ):
        raise OutputWriteError(
            f"{tmp}: not a temporary folder of {out_dir} written by this run; not publishing it",
            path=str(tmp),
        )
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise OutputExistsError(
            f"{out_dir} appeared while merging; the finished merge is in {tmp} "
            f"(rename it yourself, or rerun with --resume --force)",
            path=str(out_dir),
        )
    journal = Journal.load(tmp)
    if journal is not None and journal._absorbed:
        journal.save()  # ranks' journals and notes folded into the main one: none is published
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}{OLD_MARK}{secrets.token_hex(4)}"
    record = {
        "format": PUBLISH_FORMAT,
        "tmp": tmp.name,
        "old": None if old is None else old.name,
        "journal": None if journal is None else journal.data,
    }
    rec_path = publish_record_path(out_dir)
    write_file_durably(rec_path, json.dumps(record).encode())
    with os_errors(tmp):
        fsync_dir(out_dir.parent)
        (tmp / JOURNAL).unlink(missing_ok=True)
        fsync_dir(tmp)
    try:
        if old is not None:
            with os_errors(out_dir):
                os.rename(out_dir, old)
        with os_errors(out_dir):
            try:
                os.rename(tmp, out_dir)
            except OSError:
                if old is not None:
                    os.rename(old, out_dir)  # put the previous folder back
                    old = None
                raise
            fsync_dir(out_dir.parent)
    except BaseException:
        try:  # not published: the journal goes back, so --resume can still publish it
            tidy_temp_folders(out_dir, sweep=False)
        except Exception:  # the record stays; the next run tries again
            pass
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    with os_errors(rec_path):
        rec_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ shard writer
QUEUE_BYTES = 256 << 20  # beyond queue_size tensors, more may queue while they total this much:
# merged bytes wait here while the producer runs ahead, so the writer goes on writing while the
# producer spends time on a stage A that makes no output (l13x2 TIES on 2 cores: 2.98 -> 2.75 s
# against 32 MiB, bench/RESULTS.md issue 7)
WAKE_BYTES = 1 << 20  # an idle writer thread is woken for this many queued bytes ...
WAKE_ITEMS = 256  # ... or tensors (or a last one)


class _Handover:
    """Tensors from the producer to the writer thread, in order.

    Holds up to ``count`` tensors of any size or, beyond that, more while they total at most
    ``max_bytes`` (QUEUE_BYTES). The writer takes everything queued at once and an idle writer is woken
    only when there is a batch worth writing, so a checkpoint of many small tensors crosses in a
    few thread switches, not two per tensor; large tensors go one by one, as through a queue of
    ``count``. (Producer and writer never wait at the same time: one waits for room, the other
    for items.)
    """

    def __init__(self, count: int, max_bytes: int = QUEUE_BYTES):
        self.count = max(1, int(count))
        self.max_bytes = int(max_bytes)
        self.items: collections.deque = collections.deque()
        self.bytes = 0
        self.cond = threading.Condition(threading.Lock())
        self.idle = False

    def put(self, item, nbytes: int = 0) -> None:
        with self.cond:
            while self.items and len(self.items) >= self.count and self.bytes + nbytes > self.max_bytes:
                self.cond.notify()  # full: the writer may be idle below the wake-up sizes
                self.cond.wait()
            self.items.append(item)
            self.bytes += nbytes
            if self.idle and (item is None or self.bytes >= WAKE_BYTES or len(self.items) >= WAKE_ITEMS):
                self.cond.notify()

    def take(self) -> list:
        with self.cond:
            while not self.items:
                self.idle = True
                self.cond.wait()
            self.idle = False
            batch = list(self.items)
            self.items.clear()
            self.bytes = 0
            self.cond.notify()  # a producer waiting for room
            return batch


class TensorPart:
    """Bytes ``offset .. offset + tensor.nbytes`` of one planned tensor's output: a producer may
    hand a large tensor to :meth:`ShardedWriter.put` as consecutive parts (``last`` on the final
    one), so the writer starts on its first part while the rest is being merged."""

    __slots__ = ("tensor", "offset", "last")

    def __init__(self, tensor: torch.Tensor, offset: int, last: bool):
        self.tensor, self.offset, self.last = tensor, int(offset), bool(last)

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes


_ACTIVE_LOCK = threading.Lock()
_ACTIVE: list = []  # ShardedWriters between their start and close() / abort()


def output_offset(planned) -> int | None:
    """The file offset at which a running :class:`ShardedWriter` will write ``planned``'s bytes
    (None when no running writer has it): the producer places its output buffer at the same page
    phase, so the writer can send the tensor's whole pages to the file without a copy."""
    with _ACTIVE_LOCK:
        for w in _ACTIVE:
            off = w.offsets.get(id(planned))  # ids of tensors its shards hold: alive, so unique
            if off is not None:
                return off
    return None


class ShardedWriter:
    """Background thread writing planned tensors, in order, into their shard files.

    ``put(planned, tensor, done)`` hands over one tensor (``done()`` is called once its bytes
    are written, e.g. to release input pages), or one :class:`TensorPart` of it (parts of one
    tensor in order; ``on_written`` runs after the last); ``close()`` waits for the last shard and
    raises any error the thread hit. ``skip`` holds shard indices already finished (resume).
    """

    def __init__(
        self,
        folder: Path,
        shards: list,
        metadata: dict,
        journal: Journal,
        *,
        skip=(),
        on_written: Callable | None = None,
        after_shard: Callable | None = None,
        queue_size: int = 1,
    ):
        self.folder = Path(folder)
        self.shards = shards
        self.metadata = metadata
        self.journal = journal
        self.skip = set(skip)
        self.on_written = on_written
        self.after_shard = after_shard
        self._q = _Handover(queue_size)
        self._error: BaseException | None = None
        self._expected = iter(
            [(s, i, t) for s in shards if s.index not in self.skip for i, t in enumerate(s.tensors)]
        )
        self._file: ShardFile | None = None
        self._part = None  # (shard, position, planned tensor, bytes so far) of a tensor in parts
        self._headers: dict = {}  # shard index -> its header bytes
        self.offsets: dict = {}  # id(planned tensor) -> file offset of its bytes
        for s in shards:
            if s.index in self.skip:
                continue
            head = self._headers[s.index] = shard_header(s.tensors, metadata)
            pos = len(head)
            for t in s.tensors:
                self.offsets[id(t)] = pos
                pos += t.nbytes
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        self._finished = threading.Event()  # set by the thread as it returns (see _wait_finished)
        self._thread = threading.Thread(target=self._run, name="m3k-writer", daemon=True)
        self._thread.start()

    def _unregister(self) -> None:
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    # -- main-thread side
    def put(self, planned, tensor: torch.Tensor, done: Callable | None = None) -> None:
        if self._error is not None:
            self._raise()
        self._q.put((planned, tensor, done), tensor.nbytes)

    def close(self) -> None:
        self._q.put(None)
        self._wait_finished()
        self._unregister()
        if self._error is not None:
            self._raise()

    def abort(self) -> None:
        """Stop after an error in the producer (drops what is queued)."""
        self._error = self._error or RuntimeError("aborted")
        self._q.put(None)
        self._wait_finished()
        self._unregister()
        if self._file is not None:
            self._file.close()

    def _wait_finished(self) -> None:
        """Return once the writer thread has returned, whatever interrupts the wait.

        Not ``Thread.join`` alone: on CPython 3.11 a join interrupted by a signal handler's
        exception (Ctrl-C, the command line's SIGTERM) marks the thread as stopped although it
        still runs, so a later ``join`` returns at once, and abort() then unmapped the staging
        buffer the thread was copying into (a SIGSEGV after "interrupted", 3 in 100 runs of
        test_output_safety's signal test under load). An interrupt that comes while waiting
        makes the thread drop what is still queued (it finishes the write in hand, at most one
        DIRECT_CHUNK) and is raised once the thread is done."""
        pending = None
        while True:
            try:
                self._finished.wait()
                break
            except BaseException as exc:  # KeyboardInterrupt, Terminated
                pending = pending or exc
                self._error = self._error or RuntimeError("aborted")
        self._thread.join()  # the thread has returned: at once
        if pending is not None:
            raise pending

    def _raise(self):
        err = self._error
        if isinstance(err, BaseException):
            raise err

    # -- writer thread
    def _run(self) -> None:
        try:
            self._drain()
        finally:
            self._finished.set()

    def _drain(self) -> None:
        while True:
            for item in self._q.take():
                if item is None:
                    return
                if self._error is not None:
                    continue  # keep draining so the producer never blocks
                planned, tensor, done = item
                try:
                    self._write(planned, tensor)
                    if done is not None:
                        done()
                    if self.on_written is not None and (not isinstance(tensor, TensorPart) or tensor.last):
                        self.on_written(planned)
                except BaseException as exc:  # handed to the main thread
                    self._error = exc

    def _write(self, planned, tensor) -> None:
        part = tensor if isinstance(tensor, TensorPart) else None
        if part is not None and part.offset > 0:  # the next part of the tensor being written
            shard, pos, want, so_far = self._part or (None, 0, None, 0)
            if want is not planned or part.offset != so_far:
                raise RuntimeError(f"writer got bytes {part.offset}.. of {planned.name!r} out of order")
        else:
            if self._part is not None:
                raise RuntimeError(f"writer got {planned.name!r} before the rest of {self._part[2].name!r}")
            shard, pos, want = next(self._expected)
            if want is not planned:
                raise RuntimeError(f"writer got tensor {planned.name!r} but expected {want.name!r}")
        data = tensor if part is None else part.tensor
        if part is None:
            bad = tuple(data.shape) != tuple(want.shape) or data.dtype != want.out_dtype
        else:
            end = part.offset + data.nbytes
            bad = data.dtype != want.out_dtype or end > want.nbytes or (end == want.nbytes) != part.last
        if bad:
            at = "" if part is None else f" at byte {part.offset}"
            raise RuntimeError(
                f"tensor {want.name!r}: got {data.dtype} {tuple(data.shape)}{at}, planned "
                f"{want.out_dtype} {want.shape}"
            )
        path = self.folder / shard.filename
        with os_errors(path, want.name):
            if pos == 0 and (part is None or part.offset == 0):
                self._file = ShardFile(path)
                head = self._headers.pop(shard.index, None) or shard_header(shard.tensors, self.metadata)
                self._file.write(torch.frombuffer(bytearray(head), dtype=torch.uint8))
            self._file.write(tensor_bytes(data.cpu() if data.device.type != "cpu" else data))
            if part is not None:
                self._part = None if part.last else (shard, pos, want, part.offset + data.nbytes)
                if not part.last:
                    return
            if pos < len(shard.tensors) - 1:
                return
            size, digest = self._file.finish()
            hashed = self._file.hashed
            self._file = None
            self.journal.shard_done(shard.filename, size, digest, hashed)
            if self.after_shard is not None:
                self.after_shard(shard)


__all__ = [
    "ShardedWriter",
    "TensorPart",
    "output_offset",
    "Journal",
    "shard_header",
    "tensor_bytes",
    "make_temp_dir",
    "partial_runs",
    "publish",
    "tidy_temp_folders",
    "publish_record_path",
    "write_file_durably",
    "copy_file_durably",
    "fsync_dir",
    "os_errors",
    "file_sha256",
    "JOURNAL",
    "RANK_JOURNAL",
    "RANK_FAILED",
    "TMP_MARK",
]
