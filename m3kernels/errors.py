"""Errors of the checkpoint merge that a user can act on (bad input, full disk, existing output).

The CLI catches :class:`M3KError` (and the config's ``MergeConfigError``), prints its one-line
message and exits with :data:`EXIT_USER_ERROR`; other exceptions are bugs and keep their
traceback. Every message names the file and, where there is one, the tensor.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
MAX_MESSAGE = 2000


def one_line(message) -> str:
    """A message as one printable line: control characters (from file names, tensor names,
    config values) escaped, at most MAX_MESSAGE characters."""
    text = "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(message))
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " … (message cut)"


class M3KError(Exception):
    """A merge cannot go on for a reason the user can fix; ``str()`` is the full message, one
    printable line."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        super().__init__(one_line(message))
        self.path = None if path is None else str(path)
        self.tensor = tensor


class CheckpointError(M3KError):
    """An input checkpoint is missing, unreadable, corrupt or truncated."""


class InputChangedError(CheckpointError):
    """An input file was truncated, rewritten or opened for writing while the merge read it."""


class TensorMismatchError(M3KError):
    """A tensor is missing in some inputs or has different shapes (docs/SPEC.md §4)."""


class OutputExistsError(M3KError):
    """OUT_DIR exists and ``force`` was not given (or it would overwrite an input)."""


class OutputIsInputError(OutputExistsError):
    """OUT would be inside, equal to, or a parent of an input model folder (refused whatever the flags)."""


class OutputLockedError(OutputExistsError):
    """Another merge holds the lock on OUT (``holder``: its pid, when its lock file says so)."""

    def __init__(
        self, message: str, *, path: str | None = None, tensor: str | None = None, holder: int | None = None
    ):
        super().__init__(message, path=path, tensor=tensor)
        self.holder = holder


class DiskFullError(M3KError):
    """Writing the output failed for lack of space (ENOSPC / EDQUOT)."""


class OutputWriteError(M3KError):
    """Writing the output failed for another OS reason (permissions, I/O error)."""


__all__ = [
    "M3KError",
    "CheckpointError",
    "InputChangedError",
    "TensorMismatchError",
    "OutputExistsError",
    "OutputIsInputError",
    "OutputLockedError",
    "DiskFullError",
    "OutputWriteError",
    "EXIT_USER_ERROR",
]
