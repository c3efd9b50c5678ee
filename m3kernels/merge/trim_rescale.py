"""mergekit's L1 rescale after a magnitude trim: ``ties`` / ``breadcrumbs*`` with ``rescale: true`` (D10).

mergekit 0.1.5 rescales each model's trimmed task vector to the untrimmed one's L1 norm, per
tensor: kept δ × Σ|δ| / Σ|kept δ| (nothing rescaled when either sum is below 1e-7, or when the
density is 1), then weights, votes and sums the rescaled deltas. Its trim keeps exactly the k
largest |δ|, so its kept sum is that of the k largest values whichever tied ones it picks.

Stage A here, once the trim thresholds t_i are known: Σ|δ_i| and Σ of the k_i largest |δ_i| per
model in float64 over the finite deltas (the same rule as ``rescale: l1``,
m3kernels/merge/finite.py), f_i = f32(Σ|δ_i| / Σ|kept δ_i|). Stage B applies it with the
kernel's DARE step dropping nothing (``d_i × f_i``, one float32 rounding as mergekit's
``masked × factor``) and the threshold moved to f32(t_i·f_i): float32 rounding is monotone, so
every element at or above t_i stays kept, and the combine (vote, agreement, sum) sees the
rescaled deltas as mergekit's do. What differs from mergekit: its two sums are float32 (ours
are float64, then one rounding of the ratio), so f_i can differ from mergekit's by one float32
rounding; and an element just below t_i whose scaled value rounds up to f32(t_i·f_i) (only when
t_i·f_i crosses a power of two) is kept as a tie.

Breadcrumbs' window (``rescale_after_window``) is the same with two thresholds: mergekit keeps
exactly the descending ranks D .. D + T − 1, so its kept sum is that of those ranks (the values
between the two thresholds, plus as many of each threshold's ties as fall in the ranks); both
thresholds move to f32(t·f_i) (an element just above the upper one whose scaled value rounds down
to it would be kept as a tie).
"""

from __future__ import annotations

import numpy as np
import torch

from m3kernels.merge.kernel_params import TRIM_KEEP_NONE, TRIM_MAX_ALL, KernelParams

MERGEKIT_EPS = 1e-7  # mergekit leaves the deltas unscaled when either L1 sum is below this
KEEP_ALL_THRESHOLD = 1 << 32  # the DARE step's keep threshold that keeps every element


def _bits_value(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def l1_factors(base, models, trim_min, ks) -> list:
    """f_i = f32(Σ|δ_i| / Σ|kept δ_i|) per model (1.0 where mergekit rescales nothing).

    ``trim_min``: the kernel thresholds (bits of |δ|, uint64; TRIM_KEEP_NONE keeps nothing);
    ``ks``: how many elements the trim keeps per model (None: every element at or above the
    threshold, as for given thresholds)."""
    out = []
    for i, x in enumerate(models):
        tb = int(trim_min[i])
        if tb >= TRIM_KEEP_NONE or tb == 0:  # nothing kept, or everything: no rescale
            out.append(1.0)
            continue
        d = x.float() - base.float() if base is not None else x.float()
        a = d.abs().reshape(-1)
        keys = a.view(torch.int32)  # bits(|δ|): non-negative, ordered as the values (NaN above inf)
        finite = torch.isfinite(a)
        total = float(torch.where(finite, a, 0.0).double().sum())
        above = keys > tb
        kept = float(torch.where(above & finite, a, 0.0).double().sum())
        thr = _bits_value(tb)
        if np.isfinite(thr):
            at = int(((keys == tb) & finite).sum())
            n_ties = at if ks is None or ks[i] is None else max(0, min(at, int(ks[i]) - int(above.sum())))
            kept += n_ties * thr
        if total < MERGEKIT_EPS or kept < MERGEKIT_EPS:
            out.append(1.0)
        else:
            out.append(float(np.float32(total / kept)))
    return out


def _overlap(lo: int, hi: int, a: int, b: int) -> int:
    """|[lo, hi) ∩ [a, b)|."""
    return max(0, min(hi, b) - max(lo, a))


def window_l1_factors(base, models, trim_min, trim_max, windows) -> list:
    """f_i for breadcrumbs' window: ``windows[i]`` = (D, T) (None: no trim), the kernel's
    ``trim_min`` / ``trim_max`` bits of the ranks D + T and D + 1 (TRIM_MAX_ALL: no upper cut)."""
    out = []
    for i, x in enumerate(models):
        w = windows[i]
        lo_b, hi_b = int(trim_min[i]), int(trim_max[i])
        if w is None or w[1] == 0 or lo_b >= TRIM_KEEP_NONE:
            out.append(1.0)
            continue
        d0, t = w
        d = x.float() - base.float() if base is not None else x.float()
        a = d.abs().reshape(-1)
        keys = a.view(torch.int32).to(torch.int64)
        finite = torch.isfinite(a)
        total = float(torch.where(finite, a, 0.0).double().sum())
        upper = hi_b if hi_b < TRIM_MAX_ALL else None
        inside = (keys > lo_b) if upper is None else ((keys > lo_b) & (keys < upper))
        kept = float(torch.where(inside & finite, a, 0.0).double().sum())
        # each threshold's ties occupy descending ranks [#(keys > bits), + #(keys == bits)); as
        # many of them count as fall in the window [D, D + T)
        for bits in (upper, lo_b) if upper is not None and upper != lo_b else (lo_b,):
            v = _bits_value(bits)
            if np.isfinite(v):
                start, count = int((keys > bits).sum()), int((keys == bits).sum())
                kept += _overlap(start, start + count, d0, d0 + t) * v
        if total < MERGEKIT_EPS or kept < MERGEKIT_EPS:
            out.append(1.0)
        else:
            out.append(float(np.float32(total / kept)))
    return out


def _scaled_bits(bits: int, f: float) -> int:
    t = np.float32(_bits_value(bits))
    return int(np.array([np.float32(t * np.float32(f))], dtype=np.float32).view(np.uint32)[0])


def rescale_after_window(p: KernelParams, base, models, windows) -> KernelParams:
    """``p`` (window thresholds filled in) with the L1 factors applied by the DARE step and both
    thresholds of each rescaled model moved to f32(t · f_i)."""
    factors = window_l1_factors(base, models, p.trim_min, p.trim_max, windows)
    if all(f == 1.0 for f in factors):
        return p
    dare = np.array(p.dare, dtype=np.uint8)
    thr = np.array(p.dare_thr, dtype=np.uint64)
    scale = np.array(p.dare_scale, dtype=np.float32)
    tmin = np.array(p.trim_min, dtype=np.uint64)
    tmax = np.array(p.trim_max, dtype=np.uint64)
    for i, f in enumerate(factors):
        if f == 1.0:
            continue
        dare[i], thr[i], scale[i] = 1, KEEP_ALL_THRESHOLD, f
        tmin[i] = _scaled_bits(int(tmin[i]), f)
        if int(tmax[i]) < TRIM_MAX_ALL:
            tmax[i] = _scaled_bits(int(tmax[i]), f)
    return p.with_fields(dare=dare, dare_thr=thr, dare_scale=scale, trim_min=tmin, trim_max=tmax)


def rescale_after_trim(p: KernelParams, base, models, ks=None) -> KernelParams:
    """``p`` (trim thresholds filled in) with the L1 factors applied by the DARE step (keeping
    every element) and each rescaled model's threshold moved to f32(t_i · f_i)."""
    factors = l1_factors(base, models, p.trim_min, ks)
    n = p.n
    dare = np.array(p.dare, dtype=np.uint8)
    thr = np.array(p.dare_thr, dtype=np.uint64)
    scale = np.array(p.dare_scale, dtype=np.float32)
    trim_min = np.array(p.trim_min, dtype=np.uint64)
    for i, f in enumerate(factors):
        if f == 1.0:
            continue
        dare[i], thr[i], scale[i] = 1, KEEP_ALL_THRESHOLD, f
        t = np.float32(_bits_value(int(trim_min[i])))
        trim_min[i] = int(np.array([np.float32(t * np.float32(f))], dtype=np.float32).view(np.uint32)[0])
    if n and all(f == 1.0 for f in factors):
        return p
    return p.with_fields(dare=dare, dare_thr=thr, dare_scale=scale, trim_min=trim_min)


__all__ = ["l1_factors", "window_l1_factors", "rescale_after_trim", "rescale_after_window", "MERGEKIT_EPS"]
