"""The per-tensor parameter block every backend (CPU, Triton, CUDA) receives.

Everything that needs care to be identical across backends is computed here, once, in
Python: the Philox keys and keep thresholds, the float32 scale factors and the trim
thresholds as float32 bit patterns. Backends only run the per-element pipeline of
docs/KERNEL.md on these numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from m3kernels.merge.philox import dare_key, keep_threshold
from m3kernels.merge.recipe import Recipe, float32_sum
from m3kernels.merge.registry import MEAN, SUM, TIES

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
COMBINE_SUM, COMBINE_MEAN, COMBINE_TIES, COMBINE_NEARSWAP, COMBINE_RAM = 0, 1, 2, 3, 4
COMBINE_CODES = {
    SUM: COMBINE_SUM,
    MEAN: COMBINE_MEAN,
    TIES: COMBINE_TIES,
    "nearswap": COMBINE_NEARSWAP,
    "ram": COMBINE_RAM,
}
GROUP_NONE, GROUP_ROW, GROUP_COLUMN = 0, 1, 2  # KernelParams.coef_group (and the Gram matrices' groups)
TRIM_KEEP_ALL = 0
TRIM_KEEP_NONE = 1 << 32
TRIM_MAX_ALL = 0xFFFFFFFF  # trim_max keeping every element (bits(|d|) <= 0x7FFFFFFF always)
GRAM_CHUNK = 1 << 16  # Gram matrices: positions per chunk ...
GRAM_LANES = 16  # ... and float64 lanes per chunk (docs/KERNEL.md)
TIE_BLOCK = 1024  # exact-k ties: flat indices per tie block (the prefixes' granularity)
VOTE_SUM, VOTE_COUNT = 0, 1  # KernelParams.vote_kind
TIES_DIV_WEIGHTS, TIES_DIV_COUNT = 0, 1  # KernelParams.ties_div
HIST_BINS = 1 << 16


_ARRAY_DTYPES = {
    "vote_w": np.float32,
    "coef": np.float32,
    "dare": np.uint8,
    "key0": np.uint32,
    "key1": np.uint32,
    "dare_thr": np.uint64,
    "dare_scale": np.float32,
    "trim_min": np.uint64,
    "trim_max": np.uint64,
    "group_coef": np.float32,
    "unique_scale": np.float32,
    "tie_keep": np.int64,
    "tie_skip": np.int64,
    "tie_prefix_min": np.int64,
    "tie_prefix_max": np.int64,
    "agree_w": np.float32,
    "keep_mask": np.uint8,
    "mask_scale": np.float32,
    "dare_den": np.float32,
}


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (as a Python float)."""
    return float(np.float32(x))


@dataclass
class KernelParams:
    n: int
    has_base: bool
    combine: int  # 0 sum, 1 mean, 2 ties
    normalize: bool  # ties: divide by the agreeing weights
    lam: float  # float32 scale s
    mean_den: float  # float32 Σ r_i w_i (mean combine)
    vote_w: np.ndarray  # float32[n]   w_i
    coef: np.ndarray  # float32[n]   r_i w_i
    dare: np.ndarray  # uint8[n]     1: DARE drop on
    key0: np.ndarray  # uint32[n]
    key1: np.ndarray  # uint32[n]
    dare_thr: np.ndarray  # uint64[n]    keep iff u32 < thr
    dare_scale: np.ndarray  # float32[n]   multiplier of kept values
    trim_min: np.ndarray = field(default=None)  # uint64[n] keep iff bits(|d|) >= trim_min
    # issue 8 (docs/KERNEL.md); the defaults leave the program of the five first methods unchanged
    trim_max: np.ndarray = field(default=None)  # uint64[n] keep iff bits(|d|) <= trim_max (None: all)
    coef_group: int = GROUP_NONE  # 0 none, 1 row, 2 column: group_coef instead of coef (sum, mean)
    row_len: int = 1  # C, the length of the last dimension (coef_group != 0, gram)
    group_coef: np.ndarray = field(default=None)  # float32[groups * n], group g model i at g * n + i
    clip_t: float = 0.0  # float32 t of combine 3 (nearswap)
    ram_eps: float = 0.0  # float32 epsilon of combine 4 (ram): |d| > eps counts
    unique_scale: np.ndarray = field(default=None)  # float32[n] ram: scale of an unshared delta (None: 1)
    # exact-k ties (trim_ties: k; docs/KERNEL.md "Exact-k ties"); None: every tie at a threshold kept
    tie_keep: np.ndarray = field(
        default=None
    )  # int64[n] key == trim_min kept iff tie index < tie_keep (-1 off)
    tie_skip: np.ndarray = field(
        default=None
    )  # int64[n] key == trim_max kept iff tie index >= tie_skip (0 off)
    tie_prefix_min: np.ndarray = field(
        default=None
    )  # int64[n * blocks] keys == trim_min before each tie block
    tie_prefix_max: np.ndarray = field(
        default=None
    )  # int64[n * blocks] keys == trim_max before each tie block
    # round 2 (docs/KERNEL.md "Round-2 pieces"); the defaults leave the program above unchanged
    fma: bool = False  # sum / mean: m = fmaf(coef_i, d_i, m), one rounding (mergekit's linear)
    agree_w: np.ndarray = field(default=None)  # float32[n] ties: agree by sign(agree_w_i·d_i) (None: 1)
    vote_kind: int = VOTE_SUM  # ties: 0 v += vote_w·d, 1 v += sgn(vote_w·d) (count)
    ties_div: int = TIES_DIV_WEIGHTS  # ties: 0 Σ agreeing coef (normalize), 1 the agreeing count
    den_floor: float = 0.0  # float32 ties (ties_div 0, normalize): > 0: num / max(den, den_floor)
    keep_mask: np.ndarray = field(default=None)  # uint8 bits (LSB first) of flat index J; None: keep all
    mask_stride: int = 0  # bytes between two models' masks (0: one mask shared by every model)
    mask_scale: np.ndarray = field(default=None)  # float32[n] kept d_i times mask_scale[i] (None: 1)
    dare_div: bool = False  # DARE: kept d_i = round_to(dtype_i, d_i / dare_den[i]) instead of d·scale
    dare_den: np.ndarray = field(default=None)  # float32[n] (dare_div)

    def with_trim(self, trim_min: Sequence[int], trim_max: Sequence[int] | None = None) -> KernelParams:
        """A copy with trim thresholds ``trim_min`` (and, if given, the window's ``trim_max``)."""
        p = KernelParams(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        p.trim_min = np.asarray(trim_min, dtype=np.uint64)
        if trim_max is not None:
            p.trim_max = np.asarray(trim_max, dtype=np.uint64)
        return p

    def with_fields(self, **changes) -> KernelParams:
        """A copy with the given fields replaced (arrays cast to their documented dtypes)."""
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"KernelParams has no field(s) {sorted(unknown)}")
        for k, dt in _ARRAY_DTYPES.items():
            if changes.get(k) is not None:
                changes[k] = np.asarray(changes[k], dtype=dt)
        return dataclasses.replace(self, **changes)

    def with_dare_scale(self, scale: Sequence[float]) -> KernelParams:
        p = KernelParams(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        p.dare_scale = np.asarray(scale, dtype=np.float32)
        return p


def make_params(recipe: Recipe, name: str, has_base: bool) -> KernelParams:
    """Kernel parameters for tensor ``name`` (trim thresholds start as 'keep all')."""
    n = recipe.n
    dare = np.zeros(n, np.uint8)
    key0 = np.zeros(n, np.uint32)
    key1 = np.zeros(n, np.uint32)
    thr = np.full(n, 1 << 32, np.uint64)
    scale = np.ones(n, np.float32)
    if recipe.dare_density is not None:
        for i, d in enumerate(recipe.dare_density):
            dare[i] = 1
            key0[i], key1[i] = dare_key(recipe.seed, name, i)
            thr[i] = keep_threshold(d)
            if recipe.rescale == "density":
                scale[i] = f32(1.0 / d) if d > 0 else 0.0
    coefs = recipe.coefs
    weights = np.asarray(recipe.weights, np.float32)
    from m3kernels.merge.ties_variants import kernel_fields

    # TIES vote and divisor (vote / divide_by; default: mergekit's rule, agree_w = vote_w = w)
    ties = kernel_fields(recipe, weights)
    return KernelParams(
        n=n,
        has_base=bool(has_base and recipe.uses_base),
        combine=COMBINE_CODES[recipe.combine],
        normalize=recipe.normalize,
        lam=f32(recipe.lambda_),
        mean_den=float32_sum(coefs),
        vote_w=ties["vote_w"],
        coef=np.asarray(coefs, np.float32),
        dare=dare,
        key0=key0,
        key1=key1,
        dare_thr=thr,
        dare_scale=scale,
        trim_min=np.zeros(n, np.uint64),
        trim_max=np.full(n, TRIM_MAX_ALL, np.uint64),
        unique_scale=np.ones(n, np.float32),
        # mergekit's TIES: model i agrees where sign(w_i·δ_i) is the elected sign (= sign(δ_i) for w_i > 0)
        agree_w=ties["agree_w"],
        vote_kind=ties["vote_kind"],
        ties_div=ties["ties_div"],
        fma=bool(getattr(recipe, "fma", False)),
    )


def dare_as_keep_mask(p: KernelParams, mask: np.ndarray) -> KernelParams:
    """The same stage B with DARE's keep decisions read from ``mask`` (uint8[n, stride], the keep
    bits a stage A drew, e.g. the CPU backend's ``l1_sums_keep``) instead of drawn again: DARE
    off, each model's mask row its keep bits, ``mask_scale`` its ``dare_scale`` (1 for a model
    without DARE, whose row keeps everything). docs/KERNEL.md: a kept d_i becomes d_i · scale and
    a dropped one 0 either way, so the bytes are the same; stage B no longer runs Philox."""
    if p.dare_div or p.keep_mask is not None:
        raise ValueError("dare_as_keep_mask: the params already have dare_div or a keep mask")
    on = np.asarray(p.dare, dtype=bool)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    return p.with_fields(
        dare=np.zeros(p.n, np.uint8),
        keep_mask=mask.reshape(-1),
        mask_stride=int(mask.shape[1]),
        mask_scale=np.where(on, p.dare_scale, np.float32(1.0)),
    )


def pack_mask(keep) -> np.ndarray:
    """uint8 bytes of a boolean keep mask over flat indices (``KernelParams.keep_mask``: bit J at
    byte J >> 3, least significant bit first, ``np.packbits(bitorder="little")``). ``keep`` of
    shape (n, numel) packs one mask per model (``mask_stride`` = the returned row length)."""
    k = np.asarray(keep, dtype=bool)
    return np.packbits(k, axis=-1, bitorder="little")


def tie_prefixes(counts) -> np.ndarray:
    """int64[n * blocks]: per model, the exclusive prefix sums of its per-tie-block counts
    (int64[n, blocks], e.g. a backend's ``tie_counts``), the ``tie_prefix_*`` fields."""
    c = np.asarray(counts, dtype=np.int64)
    out = np.zeros_like(c)
    out[:, 1:] = np.cumsum(c, axis=1)[:, :-1]
    return out.reshape(-1)


def trim_k(density: float, numel: int) -> int:
    """How many largest |δ| the magnitude trim keeps: k = max(1, ⌊density·n⌋) for density > 0
    (mergekit 0.1.5's rule: a tiny density still keeps the largest element), 0 for density 0."""
    k = int(np.floor(np.float64(density) * np.float64(numel)))
    return max(1, k) if density > 0 and numel > 0 else k


__all__ = [
    "KernelParams",
    "make_params",
    "DTYPE_CODES",
    "COMBINE_CODES",
    "TRIM_KEEP_ALL",
    "TRIM_KEEP_NONE",
    "TRIM_MAX_ALL",
    "COMBINE_SUM",
    "COMBINE_MEAN",
    "COMBINE_TIES",
    "COMBINE_NEARSWAP",
    "COMBINE_RAM",
    "GROUP_NONE",
    "GROUP_ROW",
    "GROUP_COLUMN",
    "GRAM_CHUNK",
    "GRAM_LANES",
    "TIE_BLOCK",
    "VOTE_SUM",
    "VOTE_COUNT",
    "TIES_DIV_WEIGHTS",
    "TIES_DIV_COUNT",
    "pack_mask",
    "tie_prefixes",
    "HIST_BINS",
    "f32",
    "trim_k",
]
