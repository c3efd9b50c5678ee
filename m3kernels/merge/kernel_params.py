"""The per-tensor parameter block every backend (CPU, Triton, CUDA) receives.

Everything that needs care to be identical across backends is computed here, once, in
Python: the Philox keys and keep thresholds, the float32 scale factors and the trim
thresholds as float32 bit patterns. Backends only run the per-element pipeline of
docs/KERNEL.md on these numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from m3kernels.merge.philox import dare_key, keep_threshold
from m3kernels.merge.recipe import Recipe
from m3kernels.merge.registry import MEAN, SUM, TIES

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
COMBINE_CODES = {SUM: 0, MEAN: 1, TIES: 2}
TRIM_KEEP_ALL = 0
TRIM_KEEP_NONE = 1 << 32
HIST_BINS = 1 << 16


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

    def with_trim(self, trim_min: Sequence[int]) -> KernelParams:
        p = KernelParams(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        p.trim_min = np.asarray(trim_min, dtype=np.uint64)
        return p

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
    return KernelParams(
        n=n,
        has_base=bool(has_base and recipe.uses_base),
        combine=COMBINE_CODES[recipe.combine],
        normalize=recipe.normalize,
        lam=f32(recipe.lambda_),
        mean_den=f32(sum(coefs)),
        vote_w=np.asarray(recipe.weights, np.float32),
        coef=np.asarray(coefs, np.float32),
        dare=dare,
        key0=key0,
        key1=key1,
        dare_thr=thr,
        dare_scale=scale,
        trim_min=np.zeros(n, np.uint64),
    )


def trim_k(density: float, numel: int) -> int:
    """k = floor(density * n): how many largest |δ| the magnitude trim keeps."""
    return int(np.floor(np.float64(density) * np.float64(numel)))


__all__ = [
    "KernelParams",
    "make_params",
    "DTYPE_CODES",
    "COMBINE_CODES",
    "TRIM_KEEP_ALL",
    "TRIM_KEEP_NONE",
    "HIST_BINS",
    "f32",
    "trim_k",
]
