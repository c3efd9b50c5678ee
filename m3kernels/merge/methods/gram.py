"""The Gram family hook: slerp, nuslerp, multislerp, karcher, model_stock.

Stage A: ``backend.gram`` (float64 Gram matrices of the vectors, per tensor, row or column; the
fixed summation order of docs/KERNEL.md), non-finite entries recomputed over the finite elements
only (with a warning, as for the L1 sums), then the coefficients of
:mod:`m3kernels.merge.methods.coefficients` in float64, rounded to float32 once. Stage B: the
SUM combine ``y = b + Σ c_i·x_i`` with those coefficients, per tensor (``p.coef``) or per group
(``p.group_coef``):

* raw-value forms (slerp, karcher, nuslerp/multislerp without a base): ``has_base`` 0 and the
  base, where it takes part, passed as model 0, so y = Σ c_i·x_i in model order;
* task-vector forms (nuslerp, multislerp with a base, model_stock): ``has_base`` 1,
  y = b + Σ c_i·(x_i − b). model_stock's (1 − t)·b + (t/N)·Σ x_i is written this way: the small
  terms carry the rounding, not b (mergekit 0.1.5's own order is t·avg + (1 − t)·b).
"""

from __future__ import annotations

import numpy as np
import torch

from m3kernels.merge.finite import report_non_finite
from m3kernels.merge.kernel_params import GROUP_COLUMN, GROUP_NONE, GROUP_ROW
from m3kernels.merge.methods import Staged, coefficients, plain_params, require


def groups_for(recipe, shape) -> tuple[int, int]:
    """(coef_group, row_len) of the method's vectors for a tensor of ``shape``."""
    shape = tuple(shape)
    numel = int(np.prod(shape)) if shape else 1
    if len(shape) < 2 or numel == 0:
        return GROUP_NONE, 1
    if recipe.method == "nuslerp" and not recipe.get("nuslerp_flatten"):
        if recipe.get("nuslerp_row_wise"):  # vectors along dim 0: one per index of the other dims
            return GROUP_COLUMN, numel // shape[0]
        return GROUP_ROW, shape[-1]
    if recipe.method == "model_stock" and recipe.get("filter_wise"):
        return GROUP_ROW, shape[-1]
    return GROUP_NONE, 1


def finite_gram(base, models, coef_group: int, row_len: int) -> tuple[np.ndarray, list]:
    """The Gram matrices over the finite elements only (an element enters entry (i, k) when both
    v_i and v_k are finite there), float64 from the float32 vectors; and the non-finite counts."""
    b = base.to(torch.float32).reshape(-1) if base is not None else None
    vs = []
    for m in models:
        v = m.to(torch.float32).reshape(-1)
        vs.append((v - b) if b is not None else v)
    ok = [torch.isfinite(v) for v in vs]
    v64 = [torch.where(o, v.to(torch.float64), 0.0) for v, o in zip(vs, ok)]
    numel = vs[0].numel()
    if coef_group == GROUP_ROW:
        shape = (numel // row_len, row_len)
        axis = 1
    elif coef_group == GROUP_COLUMN:
        shape = (numel // row_len, row_len)
        axis = 0
    else:
        shape, axis = (1, numel), 1
    n = len(vs)
    groups = shape[0] if axis == 1 else shape[1]
    G = np.zeros((groups, n, n))
    for i in range(n):
        for k in range(i, n):
            prod = (v64[i] * v64[k]).reshape(shape).sum(dim=axis).cpu().numpy()
            G[:, i, k] = prod
            G[:, k, i] = prod
    return G, [int((~o).sum()) for o in ok]


def _gram(p, base, models, name: str, backend) -> np.ndarray:
    G = np.asarray(backend.gram(p, base, models), dtype=np.float64)
    if not np.all(np.isfinite(G)):
        G, bad = finite_gram(base if p.has_base else None, models, p.coef_group, p.row_len)
        report_non_finite(name, bad)
    return G


def _coefs(recipe, G: np.ndarray, name: str) -> np.ndarray:
    m = recipe.method
    if m == "slerp":
        return coefficients.slerp(G, recipe.get("t"))
    if m == "nuslerp":
        return coefficients.nuslerp(G, coefficients.nuslerp_t(recipe.coefs))
    if m == "multislerp":
        return coefficients.multislerp(
            G, recipe.coefs, recipe.get("normalize_weights"), recipe.get("eps"), name
        )
    if m == "karcher":
        r = np.asarray(recipe.mix_ratios, dtype=np.float64)
        return coefficients.karcher(G, r / r.sum(), recipe.get("max_iter"), recipe.get("tol"))
    if m == "model_stock":
        return coefficients.model_stock(G)
    raise ValueError(f"method {m!r} is not a Gram-family method")


def prepare(base, models, recipe, name: str, backend) -> Staged:
    method = recipe.method
    n = len(models)
    if (method in ("multislerp", "karcher")) and n == 1:  # mergekit: that model as it is
        return Staged(plain_params(recipe, name, 1, False), None, models)
    group, row_len = groups_for(recipe, models[0].shape)
    require(backend, method, "gram", *(("group_coef",) if group != GROUP_NONE else ()))
    # the vectors of the statistics, and the inputs of stage B
    if method in ("slerp", "karcher"):
        stat_base, stat_models = None, ([base] if method == "slerp" else []) + models
        out_base, out_models = None, stat_models
    elif method == "model_stock":  # y = b + (t/N)·Σ δ_i: the task-vector form rounds less
        stat_base, stat_models = base, models
        out_base, out_models = base, models
    else:  # nuslerp, multislerp: task vectors when a base is given
        stat_base, stat_models = base, models
        out_base, out_models = base, models
    has_stat_base = stat_base is not None
    ps = plain_params(recipe, name, len(stat_models), has_stat_base, coef_group=group, row_len=row_len)
    G = _gram(ps, stat_base, stat_models, name, backend)
    coefs = _coefs(recipe, G, name)
    if method == "model_stock":
        coefs = coefs[:, 1:]  # (1 − t)·b + (t/N)·Σ x_i = b + (t/N)·Σ (x_i − b)
    k = len(out_models)
    c32 = coefs.astype(np.float32)
    if not np.all(np.isfinite(c32)):
        raise ValueError(f"{method}: tensor {name!r} gives non-finite coefficients {coefs.tolist()[:4]}")
    if group == GROUP_NONE:
        p = plain_params(recipe, name, k, out_base is not None, coef=c32[0])
    else:
        p = plain_params(
            recipe,
            name,
            k,
            out_base is not None,
            coef_group=group,
            row_len=row_len,
            group_coef=c32.reshape(-1),
        )
    return Staged(p, out_base, out_models)
