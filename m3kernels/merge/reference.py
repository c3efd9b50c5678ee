"""Plain-PyTorch float64 implementation of the merge contract: the oracle for every test.

Decisions (DARE keep, trim, sign vote) are made on the float32 deltas exactly as the kernels
make them (SPEC: all kernel arithmetic is float32), so a reference and a kernel never
disagree about *which* values are merged; the merged *values* are computed in float64.
Thresholds come from a full sort, DARE masks from :mod:`m3kernels.merge.philox`: nothing here
shares code with the kernels' stage A or stage B. Breadcrumbs' window is here too (a full sort);
the other issue-8 methods are in :mod:`m3kernels.merge.reference_methods`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from m3kernels.merge.philox import dare_keep_mask
from m3kernels.merge.recipe import Recipe, make_recipe
from m3kernels.merge.reference_pieces import ties_merge64
from m3kernels.merge.registry import MEAN, TIES

F32, F64 = torch.float32, torch.float64


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact k-th largest entry of a float32 tensor (k >= 1), by full sort."""
    flat = values.reshape(-1)
    return float(torch.sort(flat, descending=True).values[k - 1])


def sparsified_deltas(base, models, recipe: Recipe, name: str = ""):
    """DARE-dropped deltas, before the trim: (float32 list, float64 list, keep masks)."""
    shape = models[0].shape
    b32 = base.to(F32) if recipe.uses_base else torch.zeros(shape, dtype=F32)
    b64 = base.to(F64) if recipe.uses_base else torch.zeros(shape, dtype=F64)
    d32 = [m.to(F32) - b32 for m in models]
    d64 = [m.to(F64) - b64 for m in models]
    masks = [None] * recipe.n
    if recipe.dare_density is not None:
        for i, dens in enumerate(recipe.dare_density):
            keep = dare_keep_mask(recipe.seed, name, i, shape, dens)
            if recipe.rescale == "density":
                s64 = 1.0 / dens if dens > 0 else 0.0
            elif recipe.rescale == "none":
                s64 = 1.0
            else:  # l1: Σ|δ| / Σ|kept δ|
                # sums of the float32 deltas' magnitudes, in float64 (docs/KERNEL.md)
                # over the finite deltas only (m3kernels/merge/finite.py)
                a64 = d32[i].abs().to(F64)
                a64 = torch.where(torch.isfinite(a64), a64, 0.0)
                total = float(a64.sum())
                kept = float(torch.where(keep, a64, 0.0).sum())
                s64 = total / kept if kept > 0 else 1.0
            d32[i] = torch.where(keep, d32[i] * _f32(s64), torch.zeros((), dtype=F32))
            d64[i] = torch.where(keep, d64[i] * s64, torch.zeros((), dtype=F64))
            masks[i] = keep
    return d32, d64, masks


def trim_keep(d32: torch.Tensor, t: float) -> torch.Tensor:
    """|δ| >= t compared as float32 bit patterns, as the kernels do (so NaN deltas are kept);
    t = +inf keeps nothing."""
    if math.isinf(t):
        return torch.zeros(d32.shape, dtype=torch.bool)
    t_bits = int(torch.tensor([t], dtype=F32).view(torch.int32)) & 0x7FFFFFFF
    return (d32.view(torch.int32).to(torch.int64) & 0x7FFFFFFF) >= t_bits


def trim_k_values(recipe: Recipe, numel: int) -> list[int | None]:
    if recipe.trim_density is None:
        return [None] * recipe.n
    # k = max(1, ⌊d·n⌋) for d > 0 (mergekit 0.1.5), written here independently of kernel_params
    return [max(1, int(math.floor(d * numel))) if d > 0 and numel > 0 else 0 for d in recipe.trim_density]


def reference_thresholds(base, models, recipe: Recipe, name: str = "") -> list[float | None]:
    """Per-model trim threshold t_i (float32 value; inf = keep nothing; None = no trim)."""
    d32, _, _ = sparsified_deltas(base, models, recipe, name)
    out = []
    for i, k in enumerate(trim_k_values(recipe, d32[0].numel())):
        if k is None:
            out.append(None)
        elif k <= 0:
            out.append(math.inf)
        else:
            out.append(kth_largest(d32[i].abs(), min(k, d32[i].numel())))
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    """bits(|x|) of a float32 tensor as int64 (NaN: above every finite value)."""
    return x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def window_keep(d32: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs' window on one float32 delta, by a full sort (None: no trim, density >= 1).

    T = ⌊density·n⌋ kept, G = ⌊gamma·n⌋ outliers, B = max(0, n − T − G) smallest dropped: the
    kept descending ranks are D .. D + T − 1, D = n − B − T; every element whose bits(|δ|) lies
    between those of ranks D + T − 1 and D (inclusive) is kept (ties at both ends kept)."""
    if density >= 1.0:
        return None
    n = d32.numel()
    t = math.floor(density * n) if density > 0 else 0
    g = math.floor(gamma * n)
    b = max(0, n - t - g)
    top = n - b - t
    if t == 0:
        return torch.zeros(d32.shape, dtype=torch.bool)
    keys = _bits(d32)
    ranked = torch.sort(keys.reshape(-1), descending=True).values
    lo = int(ranked[top + t - 1])
    keep = keys >= lo
    if top > 0:
        keep &= keys <= int(ranked[top])
    return keep


def reference_merge(
    base, models, recipe: Recipe, name: str = "", thresholds: Sequence[float | None] | None = None
):
    """Merge one tensor; returns (float64 result, info dict with thresholds, masks, sign)."""
    from m3kernels.merge.reference_methods import exact_rank_keep, exact_window_keep

    if recipe.family not in (None, "breadcrumbs"):
        from m3kernels.merge.reference_methods import reference_family_merge

        return reference_family_merge(base, list(models), recipe, name), {}
    d32, d64, masks = sparsified_deltas(base, models, recipe, name)
    exact = recipe.get("trim_ties", "all") == "k"  # exactly k kept, ties by the lowest flat index
    ks = None
    if recipe.family == "breadcrumbs":
        thresholds = [None] * recipe.n
        for i, (dens, gam) in enumerate(zip(recipe.trim_density, recipe.get("gamma"))):
            keep = (exact_window_keep if exact else window_keep)(d32[i], dens, gam)
            if keep is not None:
                d32[i] = torch.where(keep, d32[i], torch.zeros((), dtype=F32))
                d64[i] = torch.where(keep, d64[i], torch.zeros((), dtype=F64))
    if thresholds is None:
        thresholds = reference_thresholds(base, models, recipe, name)
        ks = trim_k_values(recipe, d32[0].numel()) if exact else None
    for i, t in enumerate(thresholds):
        if t is not None:
            keep = exact_rank_keep(d32[i], 0, ks[i]) if ks is not None else trim_keep(d32[i], t)
            d32[i] = torch.where(keep, d32[i], torch.zeros((), dtype=F32))
            d64[i] = torch.where(keep, d64[i], torch.zeros((), dtype=F64))
    m, sign = combine64(recipe, d32, d64)
    b64 = base.to(F64) if recipe.uses_base else torch.zeros_like(d64[0])
    out = b64 + recipe.lambda_ * m
    return out, {"thresholds": list(thresholds), "dare_masks": masks, "sign": sign}


def combine64(recipe, d32: list, d64: list):
    """The combine of ``recipe`` on the deltas after the drop and the trim (``d32`` float32 for
    the vote, ``d64`` float64 for the values): (m in float64, the elected sign or None).
    TIES: the vote on w_i·δ_i in float32, model i agreeing by the sign of w_i·δ_i (mergekit's
    rule, make_params' agree_w = vote_w) or the vote / divide_by variants
    (m3kernels.merge.ties_variants); SUM / MEAN: Σ c_i·δ_i (/ Σ c_i)."""
    coefs = recipe.coefs
    if recipe.combine == TIES:
        from m3kernels.merge.ties_variants import reference_arguments

        v = reference_arguments(recipe)
        return ties_merge64(
            d32,
            d64,
            coefs,
            v["vote_w"],
            agree_w=v["agree_w"],
            normalize=recipe.normalize,
            vote_kind=v["vote_kind"],
            ties_div=v["ties_div"],
        )
    m = sum(c * d for c, d in zip(coefs, d64))
    if recipe.combine == MEAN:
        m = m / sum(coefs)
    return m, None


def reference_merge_tensors(
    base, models, *, method, out_dtype=None, name="", thresholds=None, **kwargs
) -> torch.Tensor:
    """Same arguments as :func:`m3kernels.merge_tensors`; returns the float64 result."""
    recipe = make_recipe(len(models), method=method, has_base=base is not None, **kwargs)
    out, _ = reference_merge(base, list(models), recipe, name, thresholds)
    return out


__all__ = [
    "reference_merge",
    "combine64",
    "reference_merge_tensors",
    "reference_thresholds",
    "kth_largest",
    "sparsified_deltas",
    "window_keep",
]
