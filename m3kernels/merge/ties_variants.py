"""TIES variants of the tensor API: which sign vote and which disjoint-merge divisor a merge uses.

Two parameters of the TIES-family methods (API only: mergekit has no such keys), mapped here onto
the round-2 kernel pieces (docs/KERNEL.md: ``vote_w``, ``agree_w``, ``vote_kind``, ``ties_div``):

* ``vote``: ``"weighted"`` (default): the sign of Σ w_i·δ_i, model i agreeing by the sign of
  w_i·δ_i (mergekit's rule); ``"unweighted"``: the sign of Σ δ_i, agreement by the sign of δ_i
  (PEFT's ``"total"``), the weights only scale the values; ``"count"``: the sign of Σ sgn(δ_i),
  agreement by the sign of δ_i (PEFT's ``"frequency"``). Ties of the vote go to +.
* ``divide_by``: ``"weights"``: Σ_agree c_i δ_i / Σ_agree c_i (``normalize`` true);
  ``"count"``: divided by the number of agreeing models, at least 1 (PEFT's); ``"none"``: no
  divisor (``normalize`` false). Unset: what ``normalize`` (or the method's default) says.
"""

from __future__ import annotations

import numpy as np

VOTES = ("weighted", "unweighted", "count")
DIVISORS = ("weights", "count", "none")


def resolve_normalize(method_name: str, default: bool, normalize, divide_by) -> bool:
    """The recipe's ``normalize`` from ``normalize`` (None: unset) and ``divide_by`` (None: unset);
    ValueError naming both when they disagree."""
    if divide_by is None:
        return default if normalize is None else bool(normalize)
    want = divide_by != "none"
    if normalize is not None and bool(normalize) != want:
        raise ValueError(
            f"normalize: normalize={bool(normalize)} contradicts divide_by={divide_by!r} "
            f"(method {method_name!r}; give one of them)"
        )
    return want


def kernel_fields(recipe, weights) -> dict:
    """The KernelParams fields of the recipe's vote and divisor (``weights``: float32 w_i)."""
    from m3kernels.merge.kernel_params import TIES_DIV_COUNT, TIES_DIV_WEIGHTS, VOTE_COUNT, VOTE_SUM

    vote = recipe.get("vote") or "weighted"
    n = recipe.n
    if vote == "weighted":
        vote_w, agree_w, kind = weights, weights.copy(), VOTE_SUM
    else:
        ones = np.ones(n, np.float32)
        vote_w, agree_w, kind = ones, ones.copy(), (VOTE_COUNT if vote == "count" else VOTE_SUM)
    div = TIES_DIV_COUNT if recipe.get("divide_by") == "count" else TIES_DIV_WEIGHTS
    return {"vote_w": vote_w, "agree_w": agree_w, "vote_kind": kind, "ties_div": div}


def reference_arguments(recipe) -> dict:
    """The float64 reference's arguments (``reference_pieces.ties_merge64``) for the recipe."""
    vote = recipe.get("vote") or "weighted"
    ones = [1.0] * recipe.n
    return {
        "vote_w": list(recipe.weights) if vote == "weighted" else ones,
        "agree_w": list(recipe.weights) if vote == "weighted" else ones,
        "vote_kind": 1 if vote == "count" else 0,
        "ties_div": 1 if recipe.get("divide_by") == "count" else 0,
    }


def features(recipe) -> tuple:
    """The backend FEATURES the recipe's variants need."""
    out = ()
    if recipe.get("vote") == "count":
        out += ("vote_count",)
    if recipe.get("divide_by") == "count":
        out += ("ties_div_count",)
    return out


__all__ = ["VOTES", "DIVISORS", "resolve_normalize", "kernel_fields", "reference_arguments", "features"]
