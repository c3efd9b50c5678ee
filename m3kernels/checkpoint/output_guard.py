"""Keeping the output safe: OUT never touches an input, and only one merge writes OUT at a time.

* :func:`check_out_dir` runs before anything is created or deleted: OUT (resolved, symlinks
  followed) may not be inside, equal to, or a parent of any input model folder, or of a folder
  an input file resolves into (a Hugging Face ``blobs`` folder, anywhere with
  ``--follow-symlinks``), whatever the flags (its temporary folders and lock file live in OUT's
  parent, so they are covered too); without ``force`` OUT may not exist.
* :class:`OutputLock` is an exclusive, non-blocking ``fcntl.flock`` on ``.OUT.m3k.lock`` beside
  OUT, held for the whole run, publish included. Every temporary folder of OUT
  (``.OUT.m3k-tmp-XXXX``) is created, resumed, renamed or deleted only under that lock, so two
  runs never share one, and ``--force`` never removes a folder another run is writing. A second
  run fails at once with :class:`~m3kernels.errors.OutputLockedError` naming the holder (pid,
  host, start time, read from the lock file). The lock file is never deleted (deleting a file
  others may be about to lock races); an unlocked one left behind is harmless. The kernel drops
  the lock when its holder exits, however it exits (kill -9 included).
* :func:`assert_lock_held` is what publish calls before it renames anything: this process must
  hold OUT's lock, on the file that is at the lock path now.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from m3kernels.errors import (
    DiskFullError,
    OutputExistsError,
    OutputIsInputError,
    OutputLockedError,
    OutputWriteError,
)

log = logging.getLogger("m3kernels")

LOCK_SUFFIX = ".m3k.lock"
SIDE_MARK = ".m3k"  # every file m3kernels puts beside OUT starts with ".OUT.m3k"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)

_held: dict = {}  # (st_dev, st_ino) of a lock file -> the OutputLock of this process holding it
_held_guard = threading.Lock()


def lock_path(out_dir: Path) -> Path:
    """The lock file of ``out_dir``: ``.OUT.m3k.lock`` in OUT's parent."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{LOCK_SUFFIX}"


# ------------------------------------------------------------------------------ output vs inputs
def _relation(path: Path, root: Path) -> str | None:
    if path == root:
        return "equal"
    if root in path.parents:
        return "inside"
    if path in root.parents:
        return "parent"
    return None


def check_out_dir(out_dir: Path, force: bool, inputs: list, *, under_lock: bool = False) -> None:
    """Refuse an OUT that is inside, equal to, or a parent of an input folder; or exists without force.

    ``inputs`` are opened :class:`~m3kernels.checkpoint.source.Checkpoint` objects (their
    ``root`` is the model folder, the file's folder for a single-file input). Creates nothing.
    An existing OUT that another run holds the lock of is reported as locked (naming that
    run) rather than as existing, unless ``under_lock`` (this run holds it).
    """
    out_dir = Path(out_dir)
    target = out_dir.resolve()  # where OUT's path leads
    placed = out_dir.parent.resolve() / out_dir.name  # the name publish renames
    side_prefix = f".{out_dir.name}{SIDE_MARK}"
    for ck in inputs:
        root = Path(ck.root).resolve()
        what = f"the input {ck.label}"
        folders = getattr(ck, "folders", None)  # and where its files lie (links followed)
        roots = dict.fromkeys([root] + (folders() if folders is not None else []))
        for path, folder in ((p, r) for p in dict.fromkeys((target, placed)) for r in roots):
            rel = _relation(path, folder)
            if rel == "equal":
                msg = f"{out_dir}: the output folder would replace {what}"
            elif rel == "inside":
                msg = f"{out_dir}: the output folder would be inside the folder of {what}"
            elif rel == "parent":
                msg = f"{out_dir}: the output folder would contain {what}"
            else:
                continue
            raise OutputIsInputError(
                msg + "; inputs are never written, whatever the flags: choose an output "
                "folder outside every input",
                path=str(out_dir),
            )
        if root.parent == placed.parent and root.name.startswith(side_prefix):
            raise OutputIsInputError(
                f"{out_dir}: {what} is named like a temporary folder of this output; "
                f"choose another output folder",
                path=str(out_dir),
            )
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        if not under_lock:
            _probe_lock(out_dir)
        raise OutputExistsError(
            f"{out_dir} already exists; choose another folder or pass --force (force=True) to replace it",
            path=str(out_dir),
        )


# ------------------------------------------------------------------------------ the lock
def _holder_text(fd: int) -> dict:
    """The holder's record from an open lock file ({} when it is not there (yet))."""
    try:
        raw = os.pread(fd, 4096, 0)
    except OSError:
        return {}
    line = raw.split(b"\n", 1)[0]
    try:
        info = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_current(info: dict) -> bool:
    """Whether ``info`` can be the lock holder's record (not one left by an earlier, ended holder)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("host") != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _locked_error(out_dir: Path, fd: int) -> OutputLockedError:
    info = {}
    for _ in range(10):  # the holder writes its record right after taking the lock
        info = _holder_text(fd)
        if _is_current(info):
            break
        time.sleep(0.02)
    else:
        info = {}
    return OutputLockedError(
        f"{out_dir} is in use by {describe_holder(info)}; wait for it to finish, or stop "
        f"it and rerun (with --resume to continue its work); lock file {lock_path(out_dir)}",
        path=str(out_dir),
        holder=info.get("pid"),
    )


def _probe_lock(out_dir: Path) -> None:
    """Raise OutputLockedError if another run holds ``out_dir``'s lock (creates no file)."""
    try:
        fd = os.open(lock_path(out_dir), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(out_dir, fd) from None
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_holder(info: dict) -> str:
    if not info.get("pid"):
        return "another process (its pid is not recorded yet)"
    text = f"another m3kernels merge (pid {info['pid']}"
    if info.get("host"):
        text += f" on {info['host']}"
    if info.get("started"):
        text += f", started {info['started']}"
    return text + ")"


class OutputLock:
    """The exclusive lock on OUT (a context manager: ``with OutputLock(out): ...``).

    :meth:`acquire` never waits: when another process (or another ``OutputLock`` of this
    process) holds it, it raises :class:`~m3kernels.errors.OutputLockedError`. On a file system
    without ``flock`` support it warns and goes on unlocked.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = lock_path(self.out_dir)
        self.fd = -1
        self.exclusive = False
        self._key = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"{self.path}: no space left on the device for the output lock file", path=str(self.path)
                ) from None
            raise OutputWriteError(
                f"{self.path}: cannot create the output lock file: {exc.strerror or exc}", path=str(self.path)
            ) from None

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError(f"{self.path}: this OutputLock is already held")
        for _ in range(20):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                exc = _locked_error(self.out_dir, fd)
                os.close(fd)
                raise exc from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise OutputWriteError(
                        f"{self.path}: cannot lock the output: {exc.strerror or exc}", path=str(self.path)
                    ) from None
                log.warning(
                    "%s: this file system does not support file locks (%s); nothing stops another "
                    "merge from writing %s at the same time",
                    self.path,
                    exc.strerror or exc,
                    self.out_dir,
                )
                self._take(fd, exclusive=False)
                return
            # the file we locked must still be the one at the path (someone may have deleted it)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                self._take(fd, exclusive=True)
                return
            os.close(fd)
        raise OutputWriteError(
            f"{self.path}: the output lock file keeps being replaced; cannot lock {self.out_dir}",
            path=str(self.path),
        )

    def _take(self, fd: int, exclusive: bool) -> None:
        self.fd, self.exclusive = fd, exclusive
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "out": str(self.out_dir),
        }
        data = (json.dumps(info) + "\n").encode()
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:  # only the message of a competing run suffers
            log.warning("%s: cannot record this process in the lock file: %s", self.path, exc.strerror or exc)
        with _held_guard:
            _held[self._key] = self

    def release(self) -> None:
        """Drop the lock (the lock file stays)."""
        if not self.held:
            return
        with _held_guard:
            if _held.get(self._key) is self:
                del _held[self._key]
        fd, self.fd = self.fd, -1
        os.close(fd)  # closing the only descriptor of this open file releases the flock

    def check(self) -> None:
        """Raise :class:`OutputLockedError` unless this lock is held on the file now at the lock path."""
        try:
            now = os.stat(self.path)
            ok = self.held and os.path.samestat(os.fstat(self.fd), now)
        except OSError:
            ok = False
        if not ok:
            raise OutputLockedError(
                f"{self.out_dir}: this run no longer holds the output lock {self.path} "
                f"(was the lock file removed?); not publishing",
                path=str(self.out_dir),
            )


def assert_lock_held(out_dir: Path) -> OutputLock:
    """The :class:`OutputLock` of this process on ``out_dir``; raises OutputLockedError if there is none."""
    path = lock_path(out_dir)
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
    except OSError:
        key = None
    with _held_guard:
        lock = _held.get(key) if key is not None else None
    if lock is None:
        raise OutputLockedError(
            f"{out_dir}: this process does not hold the output lock {path}; not touching the output",
            path=str(out_dir),
        )
    lock.check()
    return lock


def read_holder(out_dir: Path) -> dict:
    """What the lock file of ``out_dir`` says about its (last) holder ({} if nothing)."""
    try:
        fd = os.open(lock_path(out_dir), os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _holder_text(fd)
    finally:
        os.close(fd)


__all__ = [
    "OutputLock",
    "check_out_dir",
    "assert_lock_held",
    "lock_path",
    "read_holder",
    "describe_holder",
    "LOCK_SUFFIX",
]
