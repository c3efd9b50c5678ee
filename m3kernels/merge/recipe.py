"""Merge methods as presets of SPEC §1, and validation of the user's arguments.

A :class:`Recipe` is everything about a merge that does not depend on the tensor: the
per-model weights, densities, M³ ratios, combine rule and flags. ``make_recipe`` turns the
keyword arguments of :func:`m3kernels.merge_tensors` (or a config file) into one, raising
``ValueError`` naming the offending argument.
"""

from __future__ import annotations

import math

import numpy as np
from dataclasses import dataclass
from typing import Optional

from m3kernels.merge.mixup import as_number, as_per_model, resolve_mix_ratios

# combine rules
SUM, MEAN, TIES = "sum", "mean", "ties"


@dataclass(frozen=True)
class MethodPreset:
    name: str
    uses_base: bool          # delta against the base model (False: base treated as zero)
    needs_base: bool
    combine: str             # SUM | MEAN | TIES
    default_normalize: bool  # for TIES: disjoint mean; for SUM/linear: mean instead of sum
    dare: bool               # random drop (DARE)
    trim: bool               # magnitude trim (TIES)


PRESETS = {
    "linear": MethodPreset("linear", False, False, MEAN, True, False, False),
    "task_arithmetic": MethodPreset("task_arithmetic", True, True, SUM, False, False, False),
    "ties": MethodPreset("ties", True, True, TIES, True, False, True),
    "dare_linear": MethodPreset("dare_linear", True, True, SUM, False, True, False),
    "dare_ties": MethodPreset("dare_ties", True, True, TIES, False, True, False),
    "ties_dare": MethodPreset("ties_dare", True, True, TIES, True, True, True),
}
ALIASES = {"average": "linear"}
METHODS = tuple(sorted(set(PRESETS) | set(ALIASES)))

DEFAULT_TRIM_DENSITY = 0.2


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
    dare_density: Optional[tuple[float, ...]]   # None: no DARE
    rescale: Optional[str]                      # "density" | "none" | "l1" (DARE only)
    trim_density: Optional[tuple[float, ...]]   # None: no magnitude trim

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
        if not (0.0 <= v <= 1.0) or math.isnan(v):
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
) -> Recipe:
    """Validate the merge arguments for ``n`` models and resolve the method preset."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, one of {', '.join(METHODS)}")
    key = ALIASES.get(method.lower(), method.lower())
    if key not in PRESETS:
        raise ValueError(f"method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    preset = PRESETS[key]
    if n < 1:
        raise ValueError("models: at least one model is needed (N = 0)")
    if preset.needs_base and not has_base:
        raise ValueError(f"base: method {key!r} needs a base model, got base=None")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")

    w = as_per_model(weights, n, "weights") or (1.0,) * n
    for x in w:
        _check_f32(x, "weights")
    lam = _check_f32(as_number(lambda_, "lambda_"), "lambda_")
    if mixup_alpha is not None and seed >= 2**32:
        raise ValueError(f"seed must be below 2**32 when mixup_alpha draws the M³ ratios, got {seed}")
    ratios = resolve_mix_ratios(n, mix_ratios, mixup_alpha, seed)

    dens = as_per_model(density, n, "density")
    drops = as_per_model(drop_rate, n, "drop_rate")
    if dens is not None:
        _check_density(dens, "density")
    if drops is not None:
        _check_density(drops, "drop_rate")

    dare_density = trim_density = None
    if preset.dare and preset.trim:  # ties_dare: DARE with drop_rate, then trim with density
        if drops is None:
            raise ValueError("drop_rate: method 'ties_dare' needs drop_rate (DARE) besides density (trim)")
        dare_density = tuple(1.0 - p for p in drops)
        trim_density = dens if dens is not None else (DEFAULT_TRIM_DENSITY,) * n
    elif preset.dare:
        if dens is None and drops is None:
            raise ValueError(f"density: method {key!r} needs density (or drop_rate = 1 - density)")
        if dens is not None and drops is not None:
            if any(abs(d - (1.0 - p)) > 1e-12 for d, p in zip(dens, drops)):
                raise ValueError("density and drop_rate disagree (density must equal 1 - drop_rate)")
        dare_density = dens if dens is not None else tuple(1.0 - p for p in drops)
    elif preset.trim:
        if drops is not None:
            raise ValueError(f"drop_rate: method {key!r} does no DARE drop; use dare_ties or ties_dare")
        trim_density = dens if dens is not None else (DEFAULT_TRIM_DENSITY,) * n
    else:
        if dens is not None:
            raise ValueError(f"density: method {key!r} does not sparsify")
        if drops is not None:
            raise ValueError(f"drop_rate: method {key!r} does not sparsify")

    if rescale is not None and not preset.dare:
        raise ValueError(f"rescale: applies to DARE methods only, not {key!r}")
    mode = _rescale_mode(rescale) if preset.dare else None

    norm = preset.default_normalize if normalize is None else bool(normalize)
    combine = preset.combine
    if combine == MEAN and not norm:
        combine = SUM
    elif combine == SUM and norm:
        combine = MEAN
    coefs = [r * x for r, x in zip(ratios, w)]
    if combine == MEAN and (sum(coefs) == 0 or float(np.float32(sum(coefs))) == 0):
        raise ValueError("weights: the weights (times the M³ ratios) sum to zero; cannot normalize")

    return Recipe(
        method=key,
        n=n,
        uses_base=preset.uses_base and has_base,
        combine=combine,
        normalize=norm,
        weights=w,
        mix_ratios=ratios,
        lambda_=lam,
        seed=seed,
        dare_density=dare_density,
        rescale=mode,
        trim_density=trim_density,
    )
