"""breadcrumbs, breadcrumbs_ties: the magnitude-window trim of Model Breadcrumbs.

Per model with 0 < density < 1 over n elements: T = ⌊density·n⌋ kept, G = ⌊gamma·n⌋ outliers,
B = max(0, n − T − G) smallest dropped, so the kept ranks (0-based, descending |δ|) are
D .. D + T − 1 with D = n − B − T. Stage A finds two exact order statistics of bits(|δ_i|) per
model, the (D + T)-th and the (D + 1)-th largest; stage B keeps iff
trim_min <= bits(|δ|) <= trim_max (every element tied with a kept value is kept, at both ends:
the ``trim_ties: all`` rule). density >= 1: no trim (gamma ignored); T = 0: nothing kept.
Then the combine of the method (sum, or TIES election) as for the other task-vector methods.
"""

from __future__ import annotations

import math

import numpy as np

from m3kernels.merge import select, trim_ties
from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE, make_params
from m3kernels.merge.methods import Staged, require

TRIM_MAX_ALL = 0xFFFFFFFF


def window(density: float, gamma: float, numel: int) -> tuple[int, int] | None:
    """(D, T): the kept descending ranks D .. D + T − 1; None: no trim (density >= 1)."""
    if density >= 1.0:
        return None
    t = int(math.floor(np.float64(density) * np.float64(numel))) if density > 0 else 0
    g = int(math.floor(np.float64(gamma) * np.float64(numel)))
    b = max(0, numel - t - g)
    return numel - b - t, t


def window_ks(recipe, numel: int) -> list:
    """Per model (k_min, k_max): the ranks (1-based, descending) of the window's two bounds;
    None: no trim; (0, None): keep nothing; k_max None: no upper cut."""
    out = []
    for d, g in zip(recipe.trim_density, recipe.get("gamma")):
        w = window(d, g, numel)
        if w is None:
            out.append(None)
            continue
        lo, t = w
        out.append((0, None) if t == 0 else (lo + t, lo + 1 if lo > 0 else None))
    return out


def _select(p, base, models, backend, ks: list, numel: int) -> np.ndarray:
    """The k-th largest bits(|δ_i|) for each model's k (None: skip), exactly."""
    from m3kernels.api import SMALL_TENSOR_NUMEL, large_tensor_thresholds, small_tensor_keys

    keys = small_tensor_keys(p, base, models, backend) if numel <= SMALL_TENSOR_NUMEL else None
    if keys is not None:
        return select.select_from_keys(keys, ks, numel)
    if all(k is None for k in ks):
        return np.full(len(ks), TRIM_KEEP_ALL, dtype=np.uint64)
    return large_tensor_thresholds(p, base, models, backend, ks, numel)


def thresholds(p, base, models, recipe, backend) -> tuple[np.ndarray, np.ndarray]:
    """(trim_min, trim_max) bit patterns per model for the window trim."""
    numel = models[0].numel()
    ks = window_ks(recipe, numel)
    n = len(models)
    tmin = np.full(n, TRIM_KEEP_ALL, dtype=np.uint64)
    tmax = np.full(n, TRIM_MAX_ALL, dtype=np.uint64)
    lo_ks = [None if k is None or k[0] == 0 else k[0] for k in ks]
    hi_ks = [None if k is None or k[1] is None else k[1] for k in ks]
    from m3kernels.api import SMALL_TENSOR_NUMEL

    multi = getattr(select, "select_thresholds_multi", None)
    per_model = [tuple(k for k in (a, b) if k is not None) for a, b in zip(lo_ks, hi_ks)]
    if multi is not None and numel > SMALL_TENSOR_NUMEL and all(per_model):  # two passes in all

        def hist(prefix):
            return backend.histogram(p, base, models, prefix)

        res = multi(hist, per_model, numel)
        for i, vals in enumerate(res):
            it = iter(vals)
            if lo_ks[i] is not None:
                tmin[i] = next(it)
            if hi_ks[i] is not None:
                tmax[i] = next(it)
    else:
        if any(k is not None for k in lo_ks):
            found = _select(p, base, models, backend, lo_ks, numel)
            for i, k in enumerate(lo_ks):
                if k is not None:
                    tmin[i] = found[i]
        if any(k is not None for k in hi_ks):
            found = _select(p, base, models, backend, hi_ks, numel)
            for i, k in enumerate(hi_ks):
                if k is not None:
                    tmax[i] = found[i]
    for i, k in enumerate(ks):
        if k == (0, None):
            tmin[i] = TRIM_KEEP_NONE
    return tmin, tmax


def prepare(base, models, recipe, name: str, backend) -> Staged:
    require(backend, recipe.method, "trim_max")
    p = make_params(recipe, name, True)
    if trim_ties.exact(recipe):  # exactly the ranks D .. D + T − 1 (ties by the lowest flat index)
        require(backend, recipe.method, "trim_ties_k")
        numel = models[0].numel()
        wins = [window(d, g, numel) for d, g in zip(recipe.trim_density, recipe.get("gamma"))]
        p = trim_ties.window_params(p, base, models, backend, wins, numel)
        return Staged(_rescaled(p, recipe, base, models), base, models)
    tmin, tmax = thresholds(p, base, models, recipe, backend)
    return Staged(_rescaled(p.with_trim(tmin, tmax), recipe, base, models), base, models)


def _rescaled(p, recipe, base, models):
    """mergekit's L1 rescale after the window (``rescale: true``; m3kernels.merge.trim_rescale)."""
    if recipe.rescale != "l1":
        return p
    from m3kernels.merge.trim_rescale import rescale_after_window

    numel = models[0].numel()
    wins = [window(d, g, numel) for d, g in zip(recipe.trim_density, recipe.get("gamma"))]
    return rescale_after_window(p, base, models, wins)
