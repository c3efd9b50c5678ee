"""The per-tensor parameter table the Triton kernels read: its layout, and how it is built.

A :class:`m3kernels.merge.kernel_params.KernelParams` holds per-model numbers (Philox keys, keep
thresholds, scale factors, trim thresholds, weights). Passing them as kernel scalars would make
Triton specialise (and recompile) on their values, so they travel as one small int64 tensor of
shape ``(FIELDS, n)``: row ``f`` holds field ``f`` for every model, floats as their float32 bit
patterns. One host-to-device copy per tensor, no synchronisation. Kernels read field ``F`` of
model ``i`` as ``tl.load(table + F * N + i)`` (floats: ``.to(tl.uint32).to(tl.float32, bitcast=True)``).
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl

from m3kernels.backends.v2_arrays import per_model_f32

KEY0 = tl.constexpr(0)  # Philox key word 0
KEY1 = tl.constexpr(1)  # Philox key word 1
KEEP_THR = tl.constexpr(2)  # DARE: keep iff u32 < value (0 .. 2**32); 2**32 for models without DARE
SCALE = tl.constexpr(3)  # float32 bits: multiplier of kept values (1.0 for models without DARE)
TRIM_MIN = tl.constexpr(4)  # keep iff bits(|d|) >= value, clamped to 2**31 (still "keep none")
COEF = tl.constexpr(5)  # float32 bits: r_i * w_i
VOTE_W = tl.constexpr(6)  # float32 bits: w_i (the TIES sign vote)
PREFIX = tl.constexpr(7)  # histogram pass 2: the high 16 bits selected for model i
TRIM_MAX = tl.constexpr(8)  # keep iff bits(|d|) <= value, clamped to 0xFFFFFFFF (keeps all)
UNIQUE_SCALE = tl.constexpr(9)  # float32 bits: RAM, the multiplier of a delta no other model shares
TIE_KEEP = tl.constexpr(10)  # exact-k ties: key == trim_min kept iff tie index < value (< 0: off)
TIE_SKIP = tl.constexpr(11)  # exact-k ties: key == trim_max kept iff tie index >= value (<= 0: off)
MASK_SCALE = tl.constexpr(12)  # float32 bits: keep mask, the multiplier of a kept delta (1.0: none)
AGREE_W = tl.constexpr(13)  # float32 bits: TIES agreement weight (e_i = agree_w[i] * d_i; 1.0: none)
DARE_DEN = tl.constexpr(14)  # float32 bits: dare_div, the divisor of a kept delta
DARE_ON = tl.constexpr(15)  # 1: model i has the DARE step on (dare_div rounds only those)
TIE_BLOCK = tl.constexpr(1024)  # flat indices per tie block (docs/KERNEL.md "Exact-k ties")
FIELDS = 16

# bits(|d|) <= 0x7fffffff, so any threshold above 2**31 keeps nothing; clamping lets the
# kernel compare in uint32.
_TRIM_CLAMP = 1 << 31
TRIM_MAX_ALL = 0xFFFFFFFF


def tie_rule(p) -> bool:
    """Whether ``p`` asks for exact-k ties: some tie_keep >= 0 or tie_skip > 0."""
    keep, skip = getattr(p, "tie_keep", None), getattr(p, "tie_skip", None)
    return (keep is not None and bool(np.any(np.asarray(keep) >= 0))) or (
        skip is not None and bool(np.any(np.asarray(skip) > 0))
    )


def trims(p) -> bool:
    """Whether the trim step can drop anything: some trim_min != 0 or trim_max < 0x7FFFFFFF."""
    tmin = getattr(p, "trim_min", None)
    tmax = getattr(p, "trim_max", None)
    lo = tmin is not None and bool(np.any(np.asarray(tmin) != 0))
    hi = tmax is not None and bool(np.any(np.asarray(tmax, dtype=np.uint64) < np.uint64(0x7FFFFFFF)))
    return lo or hi


def _f32_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


def param_table(p, device, prefix: np.ndarray | None = None) -> torch.Tensor:
    """The int64 ``(FIELDS, p.n)`` table of ``p`` on ``device`` (copied without a sync)."""
    n = p.n
    dare = np.asarray(p.dare, dtype=bool)
    table = np.zeros((FIELDS, n), dtype=np.int64)
    table[KEY0.value] = np.asarray(p.key0, dtype=np.int64)
    table[KEY1.value] = np.asarray(p.key1, dtype=np.int64)
    # A model without DARE keeps every element and multiplies it by exactly 1.0.
    table[KEEP_THR.value] = np.where(dare, np.asarray(p.dare_thr, dtype=np.int64), 1 << 32)
    table[SCALE.value] = np.where(dare, _f32_bits(p.dare_scale), _f32_bits(np.ones(n)))
    trim = np.zeros(n, np.int64) if p.trim_min is None else np.asarray(p.trim_min, dtype=np.int64)
    table[TRIM_MIN.value] = np.minimum(trim, _TRIM_CLAMP)
    tmax = getattr(p, "trim_max", None)
    tmax = np.full(n, TRIM_MAX_ALL, np.uint64) if tmax is None else np.asarray(tmax, dtype=np.uint64)
    table[TRIM_MAX.value] = np.minimum(tmax, np.uint64(TRIM_MAX_ALL)).astype(np.int64)
    keep, skip = getattr(p, "tie_keep", None), getattr(p, "tie_skip", None)
    table[TIE_KEEP.value] = -1 if keep is None else np.asarray(keep, dtype=np.int64)
    table[TIE_SKIP.value] = 0 if skip is None else np.asarray(skip, dtype=np.int64)
    scale = getattr(p, "unique_scale", None)
    table[UNIQUE_SCALE.value] = _f32_bits(np.ones(n) if scale is None else scale)
    table[MASK_SCALE.value] = _f32_bits(per_model_f32(p, "mask_scale"))
    table[AGREE_W.value] = _f32_bits(per_model_f32(p, "agree_w"))
    table[DARE_DEN.value] = _f32_bits(per_model_f32(p, "dare_den"))
    table[DARE_ON.value] = dare.astype(np.int64)
    table[COEF.value] = _f32_bits(p.coef)
    table[VOTE_W.value] = _f32_bits(p.vote_w)
    if prefix is not None:
        table[PREFIX.value] = np.asarray(prefix, dtype=np.int64)
    host = torch.from_numpy(table)
    if torch.device(device).type == "cpu":
        return host
    return host.to(device, non_blocking=True)
