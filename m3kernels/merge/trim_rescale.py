"""mergekit's L1 rescale after a magnitude trim: ``ties`` with ``rescale: true`` (parity D10).

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
"""

from __future__ import annotations

import numpy as np
import torch

from m3kernels.merge.kernel_params import TRIM_KEEP_NONE, KernelParams

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


__all__ = ["l1_factors", "rescale_after_trim", "MERGEKIT_EPS"]
