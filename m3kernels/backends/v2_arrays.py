"""The round-2 kernel fields of KernelParams (docs/KERNEL.md V1..V7) as the GPU backends (CUDA,
Triton) read them: defaults for unset fields, checked on the host the same way for both.

Every field is read with ``getattr(p, name, default)``, so a KernelParams without the field runs
today's program unchanged.
"""

from __future__ import annotations

import numpy as np


def per_model_f32(p, name: str, default: float = 1.0) -> np.ndarray:
    """float32[n] field ``name`` of ``p`` (``default`` everywhere when unset), checked to hold n values."""
    v = getattr(p, name, None)
    if v is None:
        return np.full(p.n, default, np.float32)
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.size != p.n:
        raise ValueError(f"KernelParams.{name} has {v.size} values; {p.n} needed (one per model)")
    return v


def has_keep_mask(p) -> bool:
    return getattr(p, "keep_mask", None) is not None


def keep_mask_array(p, numel: int, index_offset: int = 0) -> tuple[np.ndarray, int]:
    """(p.keep_mask as contiguous uint8, mask_stride), checked to cover bit ``index_offset + numel - 1``
    of every model's mask (model i's mask starts at byte ``i * mask_stride``; stride 0: one shared)."""
    m = np.ascontiguousarray(p.keep_mask).reshape(-1)
    if m.dtype != np.uint8:
        raise ValueError(
            f"KernelParams.keep_mask must be uint8 (np.packbits, bitorder='little'), got {m.dtype}"
        )
    stride = int(getattr(p, "mask_stride", 0) or 0)
    one = (index_offset + numel + 7) // 8  # bytes of one model's mask
    if stride < 0 or 0 < stride < one:
        raise ValueError(
            f"KernelParams.mask_stride must be 0 (one shared mask) or >= {one} bytes (one model's mask), "
            f"got {stride}"
        )
    if numel > 0:
        need = (p.n - 1) * stride + one
        if m.size < need:
            raise ValueError(
                f"KernelParams.keep_mask has {m.size} bytes; {need} needed "
                f"(n = {p.n}, mask_stride = {stride}, {index_offset + numel} flat indices)"
            )
    return m, stride


def ties_variant(p) -> tuple[int, int, float]:
    """(vote_kind, ties_div, den_floor) of ``p`` (0, 0, 0.0 when unset), checked: kinds 0 or 1."""
    vote_kind = int(getattr(p, "vote_kind", 0) or 0)
    ties_div = int(getattr(p, "ties_div", 0) or 0)
    if vote_kind not in (0, 1):
        raise ValueError(f"KernelParams.vote_kind must be 0 (weighted sum) or 1 (count), got {vote_kind}")
    if ties_div not in (0, 1):
        raise ValueError(f"KernelParams.ties_div must be 0 (weights) or 1 (count), got {ties_div}")
    den_floor = float(np.float32(getattr(p, "den_floor", 0.0) or 0.0))
    if not (0.0 <= den_floor < float("inf")):
        raise ValueError(f"KernelParams.den_floor must be a finite float >= 0, got {den_floor}")
    return vote_kind, ties_div, den_floor


def agree_weights_on(p) -> bool:
    """Whether the TIES agreement test needs its weights: some agree_w[i] != 1.0 (weight 1.0 gives
    e_i == d_i bit for bit, NaN and -0.0 included)."""
    return bool(np.any(per_model_f32(p, "agree_w") != np.float32(1.0)))


def dare_div_on(p) -> bool:
    """Whether the DARE step divides by dare_den and rounds to the input dtype (V7) for some model
    with DARE on; checks that dare_den is given then."""
    if not bool(getattr(p, "dare_div", False)):
        return False
    if getattr(p, "dare_den", None) is None:
        raise ValueError("KernelParams.dare_div needs dare_den (float32[n]), got None")
    per_model_f32(p, "dare_den")
    return bool(np.any(np.asarray(p.dare) != 0))


def fma_on(p) -> bool:
    """V1: the sum / mean accumulate as one fused multiply-add (other combines ignore it)."""
    return bool(getattr(p, "fma", False)) and int(p.combine) in (0, 1)
