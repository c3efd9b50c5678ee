"""``--strict``: refuse inputs holding NaN or inf before anything is merged.

By default a non-finite input value stays in the elements the method's arithmetic puts it in,
and the statistics that scale whole tensors ignore it (m3kernels/merge/finite.py): the merge
goes on, with a warning where a statistic saw one. ``strict=True`` reads every input tensor
that will be merged once more, before the merge pass (one extra read of the inputs: about the
time of a linear merge), and stops with :class:`NonFiniteInputError` naming the first tensor,
the model and the count.
"""

from __future__ import annotations

import torch

from m3kernels.checkpoint.plan import COPY, MergePlan
from m3kernels.errors import M3KError

CHUNK = 1 << 24  # elements checked at a time (bounded temporary memory)


class NonFiniteInputError(M3KError):
    """An input tensor holds NaN or inf and ``strict`` was asked for."""


def count_non_finite(t: torch.Tensor) -> int:
    """How many elements of a floating-point tensor are NaN or ±inf."""
    flat = t.reshape(-1)
    bad = 0
    for lo in range(0, flat.numel(), CHUNK):
        part = flat[lo : lo + CHUNK]
        bad += part.numel() - int(torch.isfinite(part).sum())
    return bad


def check_finite_inputs(plan: MergePlan, progress: bool = False) -> None:
    """Raise NonFiniteInputError at the first merged input tensor holding NaN or inf."""
    from tqdm import tqdm

    todo = [pt for pt in plan.tensors if pt.action != COPY]
    for pt in tqdm(todo, desc="checking inputs", unit="tensor", disable=not progress, leave=False):
        for s in pt.sources():
            if not s.meta.dtype.is_floating_point:
                continue
            bad = count_non_finite(s.tensor())
            s.ckpt.release(s.name)
            if bad:
                raise NonFiniteInputError(
                    f"tensor {pt.name!r} of {s.ckpt.label} holds {bad:,} NaN/inf value(s) "
                    f"({s.name!r} in {s.ckpt.path}); without --strict they stay in their elements",
                    path=str(s.ckpt.path),
                    tensor=pt.name,
                )


__all__ = ["NonFiniteInputError", "check_finite_inputs", "count_non_finite"]
