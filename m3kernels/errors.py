"""Errors of the checkpoint merge that a user can act on (bad input, full disk, existing output).

The CLI catches :class:`M3KError` (and the config's ``MergeConfigError``), prints its one-line
message and exits with :data:`EXIT_USER_ERROR`; other exceptions are bugs and keep their
traceback. Every message names the file and, where there is one, the tensor.
"""

from __future__ import annotations

from typing import Optional

EXIT_USER_ERROR = 2


class M3KError(Exception):
    """A merge cannot go on for a reason the user can fix; ``str()`` is the full message."""

    def __init__(self, message: str, *, path: Optional[str] = None, tensor: Optional[str] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.tensor = tensor


class CheckpointError(M3KError):
    """An input checkpoint is missing, unreadable, corrupt or truncated."""


class TensorMismatchError(M3KError):
    """A tensor is missing in some inputs or has different shapes (SPEC §4)."""


class OutputExistsError(M3KError):
    """OUT_DIR exists and ``force`` was not given (or it would overwrite an input)."""


class DiskFullError(M3KError):
    """Writing the output failed for lack of space (ENOSPC / EDQUOT)."""


class OutputWriteError(M3KError):
    """Writing the output failed for another OS reason (permissions, I/O error)."""


__all__ = ["M3KError", "CheckpointError", "TensorMismatchError", "OutputExistsError",
           "DiskFullError", "OutputWriteError", "EXIT_USER_ERROR"]
