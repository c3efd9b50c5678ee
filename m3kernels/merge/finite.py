"""Non-finite inputs (NaN, ±inf): statistics over finite values only, and what to tell the user.

A NaN or inf in an input stays in the elements the method's per-element arithmetic puts it in
(docs/KERNEL.md); it must not reach a per-tensor statistic that scales every element. The L1
rescale (``rescale: l1``) is the one such statistic: its sums are taken over the finite deltas
only. Backends sum every delta (the common case costs nothing more); when a sum comes back
non-finite, :func:`finite_l1_sums` recomputes both sums over the finite deltas, the same way for
every backend (NumPy, float64), so the result is still identical across backends. The trim
threshold needs nothing: it compares bit patterns, and a NaN or inf delta (larger than every
finite magnitude) only takes one of the k places at its own element.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from m3kernels.merge.philox import dare_keep_mask

log = logging.getLogger("m3kernels")


def float32_deltas(base: torch.Tensor | None, model: torch.Tensor) -> np.ndarray:
    """f32(x) − f32(θ0) (or f32(x) without a base), flat, on the CPU: the kernels' raw delta."""
    x = model.detach().reshape(-1).to("cpu", torch.float32)
    if base is not None:
        x = x - base.detach().reshape(-1).to("cpu", torch.float32)
    return x.numpy()


def finite_l1_sums(recipe, name: str, base, models: Sequence[torch.Tensor]):
    """(total, kept, non-finite counts): float64 Σ|δ_i| and Σ|δ_i|·keep_i over the finite δ_i,
    and how many δ_i are not finite, per model."""
    n = len(models)
    total, kept, bad = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    for i, m in enumerate(models):
        d = np.abs(float32_deltas(base, m)).astype(np.float64)
        finite = np.isfinite(d)
        bad[i] = d.size - int(np.count_nonzero(finite))
        d = np.where(finite, d, 0.0)
        total[i] = float(np.sum(d))
        keep = dare_keep_mask(recipe.seed, name, i, (d.size,), recipe.dare_density[i]).numpy()
        kept[i] = float(np.sum(np.where(keep, d, 0.0)))
    return total, kept, bad


def report_non_finite(name: str, counts, labels: Sequence[str] | None = None) -> None:
    """One warning naming the tensor and, per model, how many of its deltas are not finite."""
    parts = [f"{labels[i] if labels else f'model {i + 1}'}: {int(c):,}" for i, c in enumerate(counts) if c]
    if parts:
        log.warning(
            "tensor %r has non-finite (NaN/inf) deltas (%s); they stay in their elements, and the "
            "L1 rescale is computed over the finite ones",
            name,
            ", ".join(parts),
        )


__all__ = ["finite_l1_sums", "float32_deltas", "report_non_finite"]
