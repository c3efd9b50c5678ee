"""Float64 oracle of the round-2 kernel pieces (docs/KERNEL.md "Round-2 pieces").

Like :mod:`m3kernels.merge.reference`, the *decisions* (the vote, the agreement, which divisor,
which deltas the keep mask keeps) are made on float32 values exactly as the kernels make them; the
merged *values* are computed in float64. Used by ``reference.reference_merge`` (TIES with
``agree_w = vote_w``) and by the method references that set the other pieces (sce, della,
arcee_fusion, the PEFT variants).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

F32, F64 = torch.float32, torch.float64


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=F32)


def sgn32(x: torch.Tensor) -> torch.Tensor:
    """sgn of a float32 tensor as float32: 1, -1 or 0, and 0 for NaN (the kernels' rule)."""
    one = torch.ones((), dtype=F32)
    return torch.where(x > 0, one, torch.where(x < 0, -one, torch.zeros((), dtype=F32)))


def ties_merge64(
    d32: Sequence[torch.Tensor],
    d64: Sequence[torch.Tensor],
    coefs: Sequence[float],
    vote_w: Sequence[float],
    *,
    agree_w: Sequence[float] | None = None,
    normalize: bool = True,
    vote_kind: int = 0,
    ties_div: int = 0,
    den_floor: float = 0.0,
):
    """TIES' sign election and disjoint merge of the sparsified deltas: (float64 m, sign S >= 0).

    ``vote_kind`` 0: v = Σ f32(w_i)·d_i, 1: v = Σ sgn(f32(w_i)·d_i) (count), in float32 model
    order; model i agrees by the sign of ``f32(agree_w_i)·d_i`` (None: of d_i); ``ties_div`` 0:
    Σ_agree c_i δ_i divided by Σ_agree c_i when ``normalize`` (0 where that is 0; with
    ``den_floor`` > 0 by the floor where the float32 running sum of the agreeing c_i is below it),
    1: divided by the number of agreeing models (at least 1; non-agreeing terms times 0)."""
    n = len(d32)
    shape = d32[0].shape
    aw = [1.0] * n if agree_w is None else list(agree_w)
    vote = torch.zeros(shape, dtype=F32)
    for w, d in zip(vote_w, d32):
        term = _f32(w) * d  # float32, no fused multiply-add
        vote = vote + (sgn32(term) if vote_kind == 1 else term)
    pos = vote >= 0
    num = torch.zeros(shape, dtype=F64)
    if ties_div == 1:
        want = torch.where(pos, 1.0, -1.0).to(F32)
        cnt = torch.zeros(shape, dtype=F64)
        for c, a, x32, x64 in zip(coefs, aw, d32, d64):
            agree = (sgn32(_f32(a) * x32) == want).to(F64)
            num = num + (c * x64) * agree
            cnt = cnt + agree
        return num / torch.clamp(cnt, min=1.0), pos
    den = torch.zeros(shape, dtype=F64)
    den32 = torch.zeros(shape, dtype=F32)  # the kernel's divisor, for the floor decision
    for c, a, x32, x64 in zip(coefs, aw, d32, d64):
        e = _f32(a) * x32
        agree = (e != 0) & ((e > 0) == pos)
        num = num + agree.to(F64) * (c * x64)
        den = den + agree.to(F64) * c
        den32 = torch.where(agree, den32 + _f32(c), den32)
    if not normalize:
        return num, pos
    if den_floor > 0:
        floor = float(np.float32(den_floor))
        return num / torch.where(den32 < _f32(floor), torch.tensor(floor, dtype=F64), den), pos
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe, torch.zeros_like(num)), pos


def apply_keep_mask(d32: torch.Tensor, d64: torch.Tensor, keep: torch.Tensor, scale: float = 1.0):
    """The keep-mask step on one model's deltas: kept values times ``scale`` (float32 product
    for the decisions that follow, float64 for the values), the others 0."""
    keep = keep.reshape(d32.shape).to(torch.bool)
    z32, z64 = torch.zeros((), dtype=F32), torch.zeros((), dtype=F64)
    return torch.where(keep, d32 * _f32(scale), z32), torch.where(keep, d64 * float(scale), z64)


def dare_div_deltas(d32: torch.Tensor, keep: torch.Tensor, density: float, dtype):
    """``dare_div``: kept deltas divided by f32(density) in float32 and rounded to the model's dtype
    (PEFT's ``(t·mask)/density`` stored in that dtype), the others 0; (float32, its float64 value)."""
    q = (d32 / _f32(density)).to(dtype).to(F32)
    out = torch.where(keep.reshape(d32.shape).to(torch.bool), q, torch.zeros((), dtype=F32))
    return out, out.to(F64)


__all__ = ["sgn32", "ties_merge64", "apply_keep_mask", "dare_div_deltas"]
