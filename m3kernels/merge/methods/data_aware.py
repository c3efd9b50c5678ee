"""The data-aware family: ``fisher`` and ``regmean`` (registry entries, docs/DATA_AWARE.md).

Neither is a stage-B program of the generic path: both need statistics computed from data
(``m3kernels stats``), which a (base, models) call does not carry. So:

* :func:`merge_data_aware` is :func:`m3kernels.merge_tensors`' dispatch for the two names (before
  the kernel path): the statistics come as ``fishers=[...]`` / ``grams=[...]`` (one tensor per
  model) and go to :func:`~m3kernels.merge.data_aware.fisher_merge` /
  :func:`~m3kernels.merge.data_aware.regmean_merge`, with the same keyword names;
* :func:`prepare`, the family hook every recipe with a family goes through
  (:func:`m3kernels.api.merge_job`), refuses: a merge without statistics is a ValueError saying
  where they go, never a silent plain average;
* :func:`check_recipe` checks what the parameter kinds do not (``floor`` and ``ridge`` >= 0), for
  the tensor API and the config parser (which runs every config through ``make_recipe``).

A whole-checkpoint merge (a config's ``models[].parameters.fisher|gram: PATH``) runs
:func:`m3kernels.datastats.merge_checkpoints_data_aware` (:mod:`m3kernels.checkpoint.data_aware_run`).
"""

from __future__ import annotations

import math

from m3kernels.merge.methods import Staged

DATA_AWARE = ("fisher", "regmean")
STATS_KEYWORD = {"fisher": "fishers", "regmean": "grams"}
STATS_KEY = {"fisher": "fisher", "regmean": "gram"}
# merge_tensors keywords the two methods take (besides base, models, out, out_dtype, name, backend)
TAKES = {
    "fisher": ("weights", "fishers", "floor", "floor_mode", "mix_ratios", "mixup_alpha", "seed"),
    "regmean": (
        "weights",
        "grams",
        "alpha",
        "ridge",
        "transposed",
        "precision",
        "mix_ratios",
        "mixup_alpha",
        "seed",
    ),
}


def _defaults() -> dict:
    """merge_tensors' keyword defaults: a keyword at its default is "not set"."""
    import inspect

    from m3kernels.api import merge_tensors

    return {k: v.default for k, v in inspect.signature(merge_tensors).parameters.items()}


def _non_negative(value, arg: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")


def _is_default(value, default) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, RuntimeError, ValueError):  # tensors and the like are never a default
        return False


def check_recipe(recipe) -> None:
    """``floor`` (fisher) and ``ridge`` (regmean) >= 0, weights >= 0 and not all 0; ValueError
    naming the parameter."""
    _non_negative(recipe.get("floor"), "floor")
    _non_negative(recipe.get("ridge"), "ridge")
    if any(w < 0 for w in recipe.weights) or not any(w > 0 for w in recipe.weights):
        raise ValueError(
            f"weight: method {recipe.method!r} takes weights >= 0, not all 0, got {list(recipe.weights)}"
        )


def prepare(base, models, recipe, name: str, backend) -> Staged:
    """The generic path has no statistics for these methods: refuse, saying where they go."""
    kw, key = STATS_KEYWORD[recipe.method], STATS_KEY[recipe.method]
    raise ValueError(
        f"method {recipe.method!r} needs the models' statistics: merge_tensors(..., "
        f"method={recipe.method!r}, {kw}=[one tensor per model]) or a config's "
        f"models[].parameters.{key}: PATH (m3kernels stats {recipe.method}); tensor {name!r}"
    )


def merge_data_aware(base, models, method: str, kwargs: dict, out=None, out_dtype=None, name: str = ""):
    """``merge_tensors(base, models, method=<fisher|regmean>, **kwargs)``: the dispatch to
    fisher_merge / regmean_merge. ``kwargs``: merge_tensors' other keywords (None: unset); one
    that the method does not take is a ValueError naming it. ``base`` is not used (both methods
    merge the models' raw values)."""
    from m3kernels.merge import data_aware as da
    from m3kernels.merge.mixup import resolve_mix_ratios
    from m3kernels.merge.recipe import not_taken
    from m3kernels.merge.registry import get_method

    preset = get_method(method)
    takes = TAKES[preset.name]
    unset = _defaults()
    for key, value in kwargs.items():
        if key not in takes and value is not None and not _is_default(value, unset.get(key, None)):
            arg = {"lambda_": "lambda", "weights": "weight"}.get(key, key)
            raise ValueError(not_taken(preset, arg))
    if isinstance(models, (list, tuple)):
        models = list(models)
    else:
        raise ValueError("models must be a sequence of tensors (one per fine-tuned model)")
    preset.check_model_count(len(models))
    stats_kw = STATS_KEYWORD[preset.name]
    stats = kwargs.get(stats_kw)
    if stats is None:
        raise ValueError(
            f"{stats_kw}: method {preset.name!r} needs one statistics tensor per model "
            f"({'the diagonal Fisher, the shape of the tensor' if preset.name == 'fisher' else 'the Gram matrix XᵀX of the layer inputs, [in, in]'}; "
            f"m3kernels stats {preset.name} computes them)"
        )
    mix_ratios, mixup_alpha = kwargs.get("mix_ratios"), kwargs.get("mixup_alpha")
    seed = kwargs.get("seed") or 0
    ratios = None
    if mix_ratios is not None or mixup_alpha is not None:
        from m3kernels.merge.mixup import check_seed

        if mixup_alpha is not None:
            from m3kernels.merge.mixup import MIXUP_SEED_LIMIT

            check_seed(seed, "seed", MIXUP_SEED_LIMIT)
        ratios = resolve_mix_ratios(len(models), mix_ratios, mixup_alpha, seed)
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")

    def opt(key, default):
        v = kwargs.get(key)
        return default if v is None else v

    if preset.name == "fisher":
        return da.fisher_merge(
            models,
            stats,
            weights=kwargs.get("weights"),
            mix_ratios=ratios,
            floor=opt("floor", da.FISHER_FLOOR),
            floor_mode=opt("floor_mode", "max"),
            out_dtype=out_dtype,
            out=out,
        )
    res = da.regmean_merge(
        models,
        stats,
        weights=kwargs.get("weights"),
        mix_ratios=ratios,
        alpha=opt("alpha", da.REGMEAN_ALPHA),
        ridge=opt("ridge", 0.0),
        transposed=bool(opt("transposed", False)),
        precision=opt("precision", "float64"),
        name=name,
        out_dtype=out_dtype if out_dtype is not None else (out.dtype if out is not None else None),
    )
    if out is None:
        return res
    if out.shape != res.shape or out.dtype != res.dtype or out.device != res.device:
        raise ValueError(f"out must be a {res.dtype} tensor of shape {tuple(res.shape)} on {res.device}")
    return out.copy_(res)


__all__ = ["DATA_AWARE", "merge_data_aware", "prepare", "check_recipe", "STATS_KEYWORD", "STATS_KEY"]
