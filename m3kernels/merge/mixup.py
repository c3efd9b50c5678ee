"""M³ (Mixup Model Merge) mixing ratios: Beta(α, α) for two models, Dirichlet(α·1) beyond.

One draw per merge from a seeded generator. We use NumPy's legacy ``RandomState``: its
streams (including ``beta`` and ``dirichlet``) are frozen by NumPy's compatibility policy
(NEP 19), so the same seed gives the same ratios with any NumPy version on any machine,
which the newer ``Generator`` API does not promise.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

SEED_LIMIT = 2**64  # the merge seed (keys the DARE stream): an integer in [0, 2**64)
MIXUP_SEED_LIMIT = 2**32  # the M³ draw's seed (NumPy's RandomState takes 32 bits): [0, 2**32)


def check_seed(seed, arg: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``seed`` as an int in [0, limit), else ValueError naming ``arg`` (the one seed check)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < limit:
        bound = "2**32" if limit == MIXUP_SEED_LIMIT else "2**64" if limit == SEED_LIMIT else str(limit)
        why = " (the M³ draw's seed)" if limit == MIXUP_SEED_LIMIT else ""
        raise ValueError(f"{arg} must be an integer in [0, {bound}){why}, got {seed!r}")
    return int(seed)


def draw_mix_ratios(alpha: float, n: int, seed: int = 0) -> tuple[float, ...]:
    """Draw the M³ ratios r_1..r_n (they sum to 1) for ``n`` models.

    n = 1 gives (1.0,); n = 2 gives (λ, 1 − λ) with λ ~ Beta(α, α); n > 2 gives a
    Dirichlet(α, ..., α) draw.
    """
    alpha = as_number(alpha, "mixup_alpha")
    if not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"mixup_alpha must be a finite number > 0, got {alpha}")
    n = int(n)
    if n < 1:
        raise ValueError(f"number of models must be >= 1, got {n}")
    seed = check_seed(int(seed), "seed", MIXUP_SEED_LIMIT)
    if n == 1:
        return (1.0,)
    rs = np.random.RandomState(seed)
    if n == 2:
        lam = float(rs.beta(alpha, alpha))
        return (lam, 1.0 - lam)
    return tuple(float(x) for x in rs.dirichlet([alpha] * n))


def normalize_mix_ratios(mix_ratios, n: int) -> tuple[float, ...]:
    """Validate user-given ratios; a scalar λ for two models means (λ, 1 − λ)."""
    if is_scalar(mix_ratios):  # bool counts as a scalar here, and as_number rejects it
        if n != 2:
            raise ValueError(f"mix_ratios: a scalar λ needs exactly 2 models, got {n}")
        lam = as_number(mix_ratios, "mix_ratios")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"mix_ratios: λ must be in [0, 1], got {lam}")
        return (lam, 1.0 - lam)
    ratios = as_per_model(mix_ratios, n, "mix_ratios")
    if len(ratios) != n:
        raise ValueError(f"mix_ratios: expected {n} values (one per model), got {len(ratios)}")
    for r in ratios:
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"mix_ratios: values must be finite and >= 0, got {ratios}")
    return ratios


def resolve_mix_ratios(n: int, mix_ratios=None, mixup_alpha=None, seed: int = 0) -> tuple[float, ...]:
    """Ratios from explicit ``mix_ratios``, or drawn from ``mixup_alpha``, or all ones."""
    if mix_ratios is not None and mixup_alpha is not None:
        raise ValueError("mix_ratios and mixup_alpha: give one or the other, not both")
    if mix_ratios is not None:
        return normalize_mix_ratios(mix_ratios, n)
    if mixup_alpha is not None:
        return draw_mix_ratios(mixup_alpha, n, seed)
    return (1.0,) * n


def as_number(value, arg: str) -> float:
    """A real number (Python, NumPy or 0-d tensor scalar) as a float; anything else: ValueError."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        raise ValueError(f"{arg} must be a number, got {value!r}")
    if hasattr(value, "ndim") and value.ndim == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"{arg} must be a number, got {type(value).__name__}")


def is_scalar(value) -> bool:
    return isinstance(value, numbers.Real) or (hasattr(value, "ndim") and value.ndim == 0)


def as_per_model(value, n: int, arg: str) -> tuple[float, ...] | None:
    """A scalar or one value per model -> tuple of n floats (None stays None)."""
    if value is None:
        return None
    if is_scalar(value):
        return (as_number(value, arg),) * n
    try:
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError:
        raise ValueError(f"{arg} must be a number or one number per model, got {value!r}") from None
    vals = tuple(as_number(v, arg) for v in items)
    if len(vals) != n:
        raise ValueError(f"{arg}: expected a scalar or {n} values (one per model), got {len(vals)}")
    return vals


__all__ = ["draw_mix_ratios", "normalize_mix_ratios", "resolve_mix_ratios", "as_per_model", "as_number"]
