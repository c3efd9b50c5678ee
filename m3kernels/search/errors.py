"""The search's user errors: one line, exit status 2 from the CLI (part of :class:`M3KError`)."""

from __future__ import annotations

from m3kernels.errors import M3KError


class SearchError(M3KError, ValueError):
    """A search cannot go on for a reason the user can fix (bad EVAL.yaml, bad search space, an
    evaluator that fails); the message names the key, file or task."""


__all__ = ["SearchError"]
