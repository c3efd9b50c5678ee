"""Deltas-only input of the tensor API: ``merge_tensors(None, task_vectors, method=..., deltas=True)``.

The models are task vectors δ_i themselves and there is no base: the kernel runs with
``has_base = 0`` (θ0 = 0), so the result is s·m, the merged delta (PEFT's convention). Only the
methods of the generic task-vector program take it (those whose program reads the base and that
have no family hook of their own).
"""

from __future__ import annotations


def deltas_methods() -> tuple:
    """The method names that take ``deltas=True``."""
    from m3kernels.merge.registry import METHODS

    return tuple(m.name for m in METHODS.values() if m.program.uses_base and m.family is None)


def check_deltas(preset, deltas, has_base: bool) -> None:
    """ValueError naming ``deltas`` unless it is a bool, there is no base, and ``preset`` takes it."""
    if not isinstance(deltas, bool):
        raise ValueError(f"deltas must be True or False, got {deltas!r}")
    if not deltas:
        return
    if has_base:
        raise ValueError("deltas: with deltas=True the models are task vectors; give base=None")
    if preset.name not in deltas_methods():
        raise ValueError(
            f"deltas: method {preset.name!r} does not take task vectors without a base; "
            f"methods that do: {', '.join(deltas_methods())}"
        )


__all__ = ["check_deltas", "deltas_methods"]
