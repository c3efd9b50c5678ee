"""One merge's arguments, validated against the method registry, as a :class:`Recipe`.

A :class:`Recipe` is everything about a merge that does not depend on the tensor: the
per-model weights, densities, M³ ratios, combine rule and flags. ``make_recipe`` turns the
keyword arguments of :func:`m3kernels.merge_tensors` (or of a config, per tensor) into one,
raising ``ValueError`` naming the offending argument. What each method takes and defaults to
is declared in :mod:`m3kernels.merge.registry`; the rules shared by the API and the config
(density = 1 − drop_rate, the trim default, which method takes what) live here, once.

Method-specific parameters (slerp's ``t``, ram's ``epsilon``, karcher's ``max_iter``, ...) are
checked against their :class:`~m3kernels.merge.registry.Param` (kind, range, required) and kept
in ``Recipe.params`` as sorted ``(name, value)`` pairs (per-model ones as tuples), so a Recipe
stays immutable and hashable; ``recipe.get("t")`` reads one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m3kernels.merge.mixup import (
    MIXUP_SEED_LIMIT,
    as_number,
    as_per_model,
    check_seed,
    is_scalar,
    resolve_mix_ratios,
)
from m3kernels.merge.registry import (
    ALIASES,
    BOOL,
    CHOICE,
    DEFAULT_TRIM_DENSITY,
    FRACTION,
    INT,
    MAX_INT_PARAM,
    MEAN,
    MIX_INTERPOLATION,
    MIX_NONE,
    NUMBER,
    PER_MODEL,
    REQUIRED,
    SUM,
    Method,
    Param,
    get_method,
    method_names,
    methods_taking,
)
from m3kernels.merge.registry import METHODS as PRESETS  # name -> Method (the registry)

METHODS = method_names()  # every name a user may write


@dataclass(frozen=True)
class Recipe:
    """A resolved merge: one rule applied to every tensor."""

    method: str
    n: int
    uses_base: bool
    combine: str
    normalize: bool
    weights: tuple[float, ...]
    mix_ratios: tuple[float, ...]
    lambda_: float
    seed: int
    dare_density: tuple[float, ...] | None  # None: no DARE
    rescale: str | None  # "density" | "none" | "l1" (DARE only)
    trim_density: tuple[float, ...] | None  # None: no magnitude trim
    family: str | None = None  # m3kernels.merge.methods.<family> prepares it (None: generic)
    params: tuple = ()  # method-specific parameters: sorted (name, value) pairs
    fma: bool = False  # sum/mean combine with one fused multiply-add per model (linear: torch's addcmul_)

    def get(self, name: str, default=None):
        """A method-specific parameter by config name (``default`` when unset)."""
        for k, v in self.params:
            if k == name:
                return v
        return default

    @property
    def coefs(self) -> tuple[float, ...]:
        """r_i * w_i, the value weights of the combine step."""
        return tuple(r * w for r, w in zip(self.mix_ratios, self.weights))


def _check_f32(x: float, arg: str) -> float:
    """x must be finite and, as the kernels use it, a finite float32 that is 0 only if x is."""
    x32 = float(np.float32(x)) if math.isfinite(x) and abs(x) < 3.4e38 else math.inf
    if not math.isfinite(x32) or (x32 == 0.0 and x != 0.0):
        raise ValueError(f"{arg} must be finite and within float32 range (about 1e-38 to 3e38), got {x}")
    return float(x)


def _check_density(vals, arg):
    for v in vals:
        if v is not None and (not (0.0 <= v <= 1.0) or math.isnan(v)):
            raise ValueError(f"{arg} must be in [0, 1], got {v}")
    return vals


def _rescale_mode(rescale) -> str:
    if rescale is None or rescale is True:
        return "density"
    if rescale is False:
        return "none"
    if isinstance(rescale, str) and rescale.lower() in ("l1", "density", "none", "true", "false"):
        return {"true": "density", "false": "none"}.get(rescale.lower(), rescale.lower())
    raise ValueError(f"rescale must be True, False or 'l1', got {rescale!r}")


def _bool_rescale(method: Method, rescale) -> str | None:
    """A method whose ``rescale`` is a bool (della: true = mergekit's tensor-wide L1 rescale):
    "l1" or "none"; None for a method that takes no such parameter."""
    p = method.param("rescale")
    if p is None or p.kind != BOOL:
        return None
    value = p.default if rescale is None else rescale
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"rescale must be True or False for {method.name!r} (true: L1), got {rescale!r}")
    return "l1" if value else "none"


def _family_check(recipe: Recipe) -> None:
    """The method family's own check of a whole recipe (``check_recipe`` in its module, if any:
    della's density ± epsilon range); ValueError naming the parameter."""
    if recipe.family is None:
        return
    import importlib

    check = getattr(importlib.import_module(f"m3kernels.merge.methods.{recipe.family}"), "check_recipe", None)
    if check is not None:
        check(recipe)


class SparsityError(ValueError):
    """A density / drop_rate problem; ``model`` is the model's index when it concerns one."""

    def __init__(self, message: str, arg: str, model: int | None = None):
        super().__init__(message)
        self.arg = arg
        self.model = model


def not_taken(method: Method, arg: str) -> str:
    """The message for a parameter ``method`` does not take, naming the methods that do."""
    others = methods_taking(arg) or ["none"]
    return f"{arg}: method {method.name!r} does not take it; methods that do: {', '.join(others)}"


# the parameters the generic arguments of make_recipe carry (the others are method-specific)
GENERIC_PARAMS = frozenset({"weight", "density", "drop_rate", "normalize", "rescale", "lambda", "int8_mask"})


def _trim_default(method: Method) -> float:
    p = method.param("density")
    return p.default if p is not None and isinstance(p.default, float) else DEFAULT_TRIM_DENSITY


def resolve_sparsity(method: Method, dens: Sequence, drops: Sequence):
    """(DARE keep densities or None, trim densities or None) from per-model ``density`` and
    ``drop_rate`` values (an entry is None where that model sets none). The one place where
    density = 1 − drop_rate and the trim default are applied; SparsityError otherwise."""
    prog = method.program
    if prog.dare and prog.trim:  # ties_dare: DARE with drop_rate, then trim with density
        for i, p in enumerate(drops):
            if p is None:
                raise SparsityError(
                    f"method {method.name!r} needs drop_rate (DARE) besides density (trim)", "drop_rate", i
                )
        return tuple(1.0 - p for p in drops), tuple(_trim_default(method) if d is None else d for d in dens)
    if prog.dare:
        out = []
        for i, (d, p) in enumerate(zip(dens, drops)):
            if d is None and p is None:
                raise SparsityError(
                    f"method {method.name!r} needs density (or drop_rate = 1 - density)", "density", i
                )
            if d is not None and p is not None and abs(d - (1.0 - p)) > 1e-12:
                raise SparsityError(
                    f"density {d} and drop_rate {p} disagree (density must equal 1 - drop_rate)",
                    "drop_rate",
                    i,
                )
            out.append(d if d is not None else 1.0 - p)
        return tuple(out), None
    if any(p is not None for p in drops):
        raise SparsityError(not_taken(method, "drop_rate"), "drop_rate")
    if prog.trim:
        return None, tuple(_trim_default(method) if d is None else d for d in dens)
    if any(d is not None for d in dens):
        raise SparsityError(not_taken(method, "density"), "density")
    return None, None


def _leaf(p: Param, value, arg: str):
    """One value of parameter ``p`` checked against its kind (ValueError naming ``arg``)."""
    if p.kind == "path":  # a config's statistics folder (fisher / regmean), opened by the config merge
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{arg} must be a folder path (a non-empty string), got {value!r}")
        return value
    if p.kind == CHOICE:
        key = value.strip().lower() if isinstance(value, str) else None
        if key not in p.choices:
            raise ValueError(f"{arg} must be one of {', '.join(p.choices)}, got {value!r}")
        return key
    if p.kind == BOOL:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{arg} must be True or False, got {value!r}")
    if p.kind == INT:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"{arg} must be an integer in [0, {MAX_INT_PARAM}], got {value!r}")
        if not 0 <= int(value) <= MAX_INT_PARAM:
            raise ValueError(f"{arg} must be an integer in [0, {MAX_INT_PARAM}], got {value!r}")
        return int(value)
    x = as_number(value, arg)
    if p.kind == FRACTION:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{arg} must be in [0, 1], got {value!r}")
        return x
    assert p.kind == NUMBER, p.kind
    return _check_f32(x, arg)


def method_params(preset: Method, n: int, given: dict) -> tuple:
    """The method-specific parameters of ``preset`` from the API keywords in ``given`` (None:
    unset): checked, defaults filled in (a REQUIRED one that is unset is left out for the caller
    to report), as sorted (config name, value) pairs. A keyword the method does not take is a
    ValueError naming it and the methods that do."""
    out = {}
    for p in preset.params:
        if p.name in GENERIC_PARAMS:
            continue
        value = given.pop(p.api, None)
        if p.scope == PER_MODEL:
            if value is None:
                vals = (p.default,) * n
            elif is_scalar(value) or isinstance(value, (bool, np.bool_)):
                vals = (_leaf(p, value, p.api),) * n
            else:
                items = list(value.tolist() if hasattr(value, "tolist") else value)
                if len(items) != n:
                    raise ValueError(
                        f"{p.api}: expected a scalar or {n} values (one per model), got {len(items)}"
                    )
                vals = tuple(p.default if v is None else _leaf(p, v, p.api) for v in items)
            if REQUIRED in vals:
                continue
            out[p.name] = vals
        else:
            if value is None:
                if p.default is REQUIRED:
                    continue
                value = p.default
            else:
                value = _leaf(p, value, p.api)
            out[p.name] = value
    for key, value in given.items():
        if value is not None:
            if methods_taking(key) or key in _API_NAMES:
                raise ValueError(not_taken(preset, _API_NAMES.get(key, key)))
            raise ValueError(f"{key}: unknown argument")
    return tuple(sorted(out.items()))


def _api_names() -> dict:
    """API keyword -> config name, over every method's parameters."""
    from m3kernels.merge.registry import METHODS as _ALL

    return {p.api: p.name for m in _ALL.values() for p in m.params if p.api}


_API_NAMES: dict = {}


def float32_sum(values) -> float:
    """Σ values added in order in float32 (each value rounded to float32 first), as mergekit (and
    torch) add float32 weights: the mean combine's divisor (docs/MERGEKIT_PARITY.md D3)."""
    acc = np.float32(0.0)
    for v in values:
        acc = np.float32(acc + np.float32(v))
    return float(acc)


def _check_mixup(preset: Method, mix_ratios, mixup_alpha) -> None:
    if preset.mixup == MIX_NONE and (mix_ratios is not None or mixup_alpha is not None):
        arg = "mix_ratios" if mix_ratios is not None else "mixup_alpha"
        why = f" ({preset.mixup_note})" if preset.mixup_note else ""
        raise ValueError(f"{arg}: method {preset.name!r} does not take M³{why}")


def make_recipe(
    n: int,
    *,
    method: str,
    has_base: bool,
    weights=None,
    density=None,
    drop_rate=None,
    normalize=None,
    rescale=None,
    lambda_=1.0,
    mix_ratios=None,
    mixup_alpha=None,
    seed=0,
    deltas=False,
    **extra,
) -> Recipe:
    """Validate the merge arguments for ``n`` models against the method's registry entry.

    ``extra``: the method-specific keywords of :func:`m3kernels.merge_tensors` (``t``,
    ``scale``, ``epsilon``, ``r``, ``alpha``, ``gamma``, ``max_iter``, ``tol``, ``eps``,
    ``normalize_weights``, ``nuslerp_flatten``, ``nuslerp_row_wise``, ``filter_wise``; None:
    unset). ``deltas``: the models are task vectors and there is no base (``has_base`` false;
    the task-vector methods only, m3kernels.merge.deltas_input)."""
    preset = get_method(method)
    key = preset.name
    if n < 1:
        raise ValueError("models: at least one model is needed (N = 0)")
    if deltas is not False:
        from m3kernels.merge.deltas_input import check_deltas

        check_deltas(preset, deltas, has_base)
    elif preset.needs_base and not has_base:
        raise ValueError(f"base: method {key!r} needs a base model, got base=None")
    preset.check_model_count(n)
    check_seed(seed)
    if not _API_NAMES:
        _API_NAMES.update(_api_names())
    if weights is not None and not preset.takes("weight"):
        raise ValueError(not_taken(preset, "weight"))
    if normalize is not None and not preset.takes("normalize"):
        raise ValueError(not_taken(preset, "normalize"))
    if not preset.takes("lambda") and not (isinstance(lambda_, (int, float)) and lambda_ == 1.0):
        raise ValueError(not_taken(preset, "lambda"))
    _check_mixup(preset, mix_ratios, mixup_alpha)
    params = method_params(preset, n, dict(extra))

    w = as_per_model(weights, n, "weights") or (1.0,) * n
    for x in w:
        _check_f32(x, "weights")
    lam = _check_f32(as_number(lambda_, "lambda_"), "lambda_")
    if mixup_alpha is not None:
        check_seed(seed, "seed", MIXUP_SEED_LIMIT)
    ratios = resolve_mix_ratios(preset.mix_count(n), mix_ratios, mixup_alpha, seed)
    if preset.mixup == MIX_INTERPOLATION:  # slerp: t is the model's drawn ratio
        drawn = mix_ratios is not None or mixup_alpha is not None
        if drawn and dict(params).get("t") is not None:
            raise ValueError("t: give t or M³ (mix_ratios / mixup_alpha), not both")
        if drawn:
            params = tuple(sorted({**dict(params), "t": float(ratios[1])}.items()))  # may be tiny
        ratios = (1.0,) * n
    for p in preset.params:
        if p.default is REQUIRED and p.name not in GENERIC_PARAMS and p.name not in dict(params):
            how = " (or M³: mix_ratios / mixup_alpha)" if preset.mixup == MIX_INTERPOLATION else ""
            raise ValueError(f"{p.api}: method {key!r} needs {p.name}{how}")

    dens = _check_density(as_per_model(density, n, "density") or (None,) * n, "density")
    drops = _check_density(as_per_model(drop_rate, n, "drop_rate") or (None,) * n, "drop_rate")
    try:
        dare_density, trim_density = resolve_sparsity(preset, dens, drops)
    except SparsityError as exc:
        raise ValueError(f"{exc.arg}: {exc}" if not str(exc).startswith(exc.arg) else str(exc)) from None

    if rescale is not None and not preset.takes("rescale"):
        raise ValueError(not_taken(preset, "rescale"))
    mode = _rescale_mode(rescale) if preset.program.dare else _bool_rescale(preset, rescale)

    from m3kernels.merge.ties_variants import resolve_normalize

    norm = resolve_normalize(key, preset.default_normalize, normalize, dict(params).get("divide_by"))
    combine = preset.program.combine
    if combine == MEAN and not norm:
        combine = SUM
    elif combine == SUM and norm:
        combine = MEAN
    coefs = [r * x for r, x in zip(ratios, w)]
    if combine == MEAN and (sum(coefs) == 0 or float(np.float32(sum(coefs))) == 0 or float32_sum(coefs) == 0):
        raise ValueError("weights: the weights (times the M³ ratios) sum to zero; cannot normalize")

    recipe = Recipe(
        method=key,
        n=n,
        uses_base=preset.program.uses_base and has_base,
        combine=combine,
        normalize=norm,
        weights=w,
        mix_ratios=ratios,
        lambda_=lam,
        seed=seed,
        dare_density=dare_density,
        rescale=mode,
        trim_density=trim_density,
        family=preset.family,
        params=params,
        fma=preset.program.fma,
    )
    _family_check(recipe)
    return recipe


__all__ = [
    "Recipe",
    "make_recipe",
    "resolve_sparsity",
    "not_taken",
    "SparsityError",
    "GENERIC_PARAMS",
    "method_params",
    "METHODS",
    "PRESETS",
    "ALIASES",
    "DEFAULT_TRIM_DENSITY",
]
