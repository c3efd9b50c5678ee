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


CHUNK = 1 << 16  # elements per step of the statistics pass (cache-resident temporaries)
INF_BITS = 0x7F800000  # bits(+inf): a magnitude is finite iff its bits are below


def magnitude_stats(base, x, cuts) -> tuple:
    """One pass over |δ| = |f32(x) − f32(base)| (base None: 0) in chunks: (Σ|δ| over the finite
    deltas, in float64; and per cut c (bits of |δ|): [Σ finite |δ| with bits > c, #(bits > c),
    #(bits == c)]). NaN and inf count in the ranks (their bits are above every finite value)
    but not in the sums, as ``rescale: l1`` (m3kernels/merge/finite.py)."""
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)  # chunk-sized ops: one thread is faster, much faster on a busy machine
    try:
        return _magnitude_stats(base, x, cuts)
    finally:
        torch.set_num_threads(threads)


def _magnitude_stats(base, x, cuts) -> tuple:
    xf = x.reshape(-1)
    bf = base.reshape(-1) if base is not None else None
    total = 0.0
    stats = [[0.0, 0, 0] for _ in cuts]
    for s in range(0, xf.numel(), CHUNK):
        d = xf[s : s + CHUNK].to(torch.float32, copy=True)
        if bf is not None:
            d.sub_(bf[s : s + CHUNK].to(torch.float32))
        mag = d.abs_()
        keys = mag.view(torch.int32)
        finite = keys < INF_BITS
        vals = mag if bool(finite.all()) else mag.masked_fill(~finite, 0.0)
        total += float(vals.sum(dtype=torch.float64))
        for st, c in zip(stats, cuts):
            gt = keys > c
            st[0] += float(torch.where(gt, vals, 0.0).sum(dtype=torch.float64))
            st[1] += int(gt.sum())
            st[2] += int((keys == c).sum())
    return total, stats


def _factor(total: float, kept: float) -> float:
    if total < MERGEKIT_EPS or kept < MERGEKIT_EPS:
        return 1.0
    return float(np.float32(total / kept))


def _value_or_zero(bits: int) -> float:
    v = _bits_value(bits)
    return v if np.isfinite(v) else 0.0  # a non-finite tie adds nothing to the sums


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
        total, ((above_sum, n_above, n_at),) = magnitude_stats(base, x, [tb])
        n_ties = n_at if ks is None or ks[i] is None else max(0, min(n_at, int(ks[i]) - n_above))
        out.append(_factor(total, above_sum + n_ties * _value_or_zero(tb)))
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
        cuts = [lo_b] if hi_b >= TRIM_MAX_ALL or hi_b == lo_b else [lo_b, hi_b]
        total, stats = magnitude_stats(base, x, cuts)
        if hi_b == lo_b:  # every kept rank has the one value: only the ties count
            kept = 0.0
        else:  # Σ over bits > lo_b, less those at or above the upper cut (if any)
            kept = stats[0][0]
            if len(cuts) == 2:
                kept -= stats[1][0] + stats[1][2] * _value_or_zero(hi_b)
        # each cut's ties occupy descending ranks [#(bits > c), + #(bits == c)); as many of them
        # count as fall in the window [D, D + T)
        for (_, n_gt, n_eq), c in zip(stats, cuts):
            kept += _overlap(n_gt, n_gt + n_eq, d0, d0 + t) * _value_or_zero(c)
        out.append(_factor(total, kept))
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
