"""nearswap, ram and ramplus_tl: one elementwise combine of the kernel (combines 3 and 4 of
docs/KERNEL.md), with ramplus_tl's per-model counts as its only stage-A statistic.

* nearswap: ``p.clip_t = f32(t)``, combine NEARSWAP (mergekit's float32 operation order).
* ram: ``p.ram_eps = f32(epsilon)``, combine RAM, every unique scale 1.
* ramplus_tl: the counts ``shared_i``, ``unique_i`` of each model over the tensor (stage A,
  ``backend.ram_counts``), then in float32 as mergekit: ρ_i = f32(shared_i) / max(f32(unique_i), ε),
  λ_i = 1 + r·min(max(ρ_i, 0), α); unique contributions are scaled by λ_i.
"""

from __future__ import annotations

import numpy as np

from m3kernels.merge.kernel_params import COMBINE_CODES, f32
from m3kernels.merge.methods import Staged, plain_params, require
from m3kernels.merge.registry import NEARSWAP, RAM

F32 = np.float32


def ramplus_scales(shared, unique, r: float, alpha: float, epsilon: float) -> np.ndarray:
    """λ_i (float32[n]) from the per-model counts, in mergekit's float32 operations."""
    sh = np.asarray(shared, dtype=np.float64).astype(F32)
    un = np.asarray(unique, dtype=np.float64).astype(F32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        rho = sh / np.maximum(un, F32(epsilon))
        capped = np.minimum(np.maximum(rho, F32(0.0)), F32(alpha))
        lam = F32(1.0) + F32(r) * capped
    return lam.astype(F32)


def prepare(base, models, recipe, name: str, backend) -> Staged:
    method = recipe.method
    n = len(models)
    if method == "nearswap":
        require(backend, method, "nearswap")
        p = plain_params(recipe, name, n, True, combine=COMBINE_CODES[NEARSWAP], clip_t=f32(recipe.get("t")))
        return Staged(p, base, models)
    require(backend, method, "ram")
    eps = f32(recipe.get("epsilon"))
    p = plain_params(recipe, name, n, True, combine=COMBINE_CODES[RAM], ram_eps=eps)
    if method == "ramplus_tl":
        require(backend, method, "ram_counts")
        shared, unique = backend.ram_counts(p, base, models)
        lam = ramplus_scales(shared, unique, recipe.get("r"), recipe.get("alpha"), recipe.get("epsilon"))
        p = p.with_fields(unique_scale=lam)
    return Staged(p, base, models)
