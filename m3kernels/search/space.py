"""The search space: which merges a search tries, as :class:`Candidate` configs, and its budget.

A space is given in the merge config's ``search:`` block or on the command line (the command line
wins, key by key). Its axes, combined as a product in this order (methods outermost):

* ``methods``: merge methods (the registry's names, :mod:`m3kernels.merge.registry`; default: the
  config's); parameters a method does not take are dropped from its candidates;
* ``scales``: the scale ``parameters.lambda`` (methods that take it); ``densities``:
  ``parameters.density`` for every model (methods that take it; a DARE method's ``drop_rate`` is
  then dropped, density = 1 − drop_rate);
* the M³ ratios: ``plain`` (no M³: every ratio 1), ``lambdas`` (fixed λ, two models),
  ``simplex: S`` (every ratio vector with entries k/S; for two models the λ grid k/S), and M³
  draws ``alphas`` × ``draws`` (the paper's protocol: each candidate one seeded draw, λ ~
  Beta(α, α), Dirichlet(α·1) for N > 2; draw k of the a-th α uses seed ``seed + a·draws + k``).
  Without any of them the config's own ``mixup`` (or none) is the one value of this axis.

The budget: ``max_candidates`` (the first that many candidates of the space, finished ones
included) and ``max_time`` (seconds of this run after which no new candidate starts).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

from m3kernels.search.errors import SearchError

SPACE_KEYS = (
    "methods",
    "scales",
    "densities",
    "plain",
    "lambdas",
    "simplex",
    "alphas",
    "draws",
    "seed",
    "max_candidates",
    "max_time",
)
MAX_CANDIDATES = 100_000  # a space larger than this is a mistake
MAX_LIST = 1_000  # values of one axis
MAX_SIMPLEX_STEPS = 1_000
SEED_LIMIT = 2**32  # the M³ draw's seed (NumPy's RandomState)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see the module docstring); None: as the config says."""

    methods: tuple | None = None
    scales: tuple | None = None
    densities: tuple | None = None
    plain: bool = False
    lambdas: tuple | None = None
    simplex: int | None = None
    alphas: tuple | None = None
    draws: int = 1
    seed: int = 0
    max_candidates: int | None = None
    max_time: float | None = None

    @property
    def ratio_axis_given(self) -> bool:
        return self.plain or self.lambdas is not None or self.simplex is not None or self.alphas is not None


@dataclass(frozen=True)
class Candidate:
    """One merge to try: ``config`` is a complete merge config (dict) for ``m3kernels merge``,
    except for explicit ratios of N > 2 models (``mix == "ratios"``), which no config key holds."""

    index: int
    method: str
    scale: float | None  # parameters.lambda (None: as in the config, or not taken)
    density: float | None  # parameters.density (None: as in the config, or not taken)
    mix: str  # "config" | "plain" | "lambda" | "ratios" | "draw"
    ratios: tuple | None  # the M³ ratios (drawn or given); None: no M³ (all 1)
    alpha: float | None = None
    seed: int | None = None  # the M³ draw's seed
    config: dict = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """What identifies the candidate in the results file (resume matches on it)."""
        parts = [f"method={self.method}"]
        if self.scale is not None:
            parts.append(f"lambda={self.scale!r}")
        if self.density is not None:
            parts.append(f"density={self.density!r}")
        if self.mix == "draw":
            parts.append(f"m3=alpha:{self.alpha!r},seed:{self.seed}")
        elif self.mix == "lambda":
            parts.append(f"m3=lambda:{self.ratios[0]!r}")
        elif self.mix == "ratios":
            parts.append("m3=ratios:" + ",".join(repr(r) for r in self.ratios))
        elif self.mix == "plain":
            parts.append("m3=none")
        else:
            parts.append("m3=config")
        return ";".join(parts)

    @property
    def lam(self) -> float | None:
        """λ, the first model's ratio (None without M³)."""
        return None if self.ratios is None else float(self.ratios[0])

    def describe(self) -> dict:
        return {
            "index": self.index,
            "key": self.key,
            "method": self.method,
            "scale": self.scale,
            "density": self.density,
            "mix": self.mix,
            "ratios": None if self.ratios is None else [float(r) for r in self.ratios],
            "alpha": self.alpha,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- parsing


def _items(value, key: str) -> list:
    """A list, a comma-separated string or one scalar -> list (bounded)."""
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",")]
        if items == [""]:
            items = []
        elif any(s == "" for s in items):
            raise SearchError(f"{key}: an empty item in {value!r}")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (numbers.Real)) and not isinstance(value, bool):
        items = [value]
    else:
        raise SearchError(f"{key}: expected a list or a comma-separated string, got {value!r}")
    if len(items) > MAX_LIST:
        raise SearchError(f"{key}: {len(items)} values; at most {MAX_LIST}")
    return items


def _number(value, key: str, lo=-math.inf, hi=math.inf, lo_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise SearchError(f"{key}: expected a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise SearchError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SearchError(f"{key}: {value!r} is out of range; allowed: finite numbers in {rng}")
    return x


def _integer(value, key: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("+").isdigit() and len(value) <= 40:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise SearchError(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _floats(value, key, **rng) -> tuple:
    vals = tuple(_number(v, f"{key}[{i}]", **rng) for i, v in enumerate(_items(value, key)))
    return tuple(dict.fromkeys(vals))  # repeated values once, in order


def _methods(value, key: str) -> tuple:
    from m3kernels.merge.registry import get_method

    out = []
    for i, v in enumerate(_items(value, key)):
        try:
            out.append(get_method(v, what=f"{key}[{i}]:").name)
        except ValueError as exc:
            raise SearchError(str(exc)) from None
    return tuple(dict.fromkeys(out))


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise SearchError(f"{key}: expected true or false, got {value!r}")
    return value


def parse_space(raw, where: str = "search", base: SearchSpace | None = None) -> SearchSpace:
    """A ``search:`` mapping (or the CLI's options as a dict; None values are ignored) -> a
    SearchSpace, over ``base``'s values. Unknown keys and bad values raise SearchError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SearchError(f"{where}: expected a mapping of {', '.join(SPACE_KEYS)}, got {raw!r}")
    for k in raw:
        if k not in SPACE_KEYS:
            raise SearchError(f"{where}.{k}: unknown key; a search space has {', '.join(SPACE_KEYS)}")
    s = base or SearchSpace()
    kw = dict(s.__dict__)
    for k, v in raw.items():
        if v is None:
            continue
        key = f"{where}.{k}"
        if k == "methods":
            kw[k] = _methods(v, key)
        elif k == "scales":
            kw[k] = _floats(v, key)
        elif k == "densities":
            kw[k] = _floats(v, key, lo=0.0, hi=1.0)
        elif k == "plain":
            kw[k] = _bool(v, key)
        elif k == "lambdas":
            kw[k] = _floats(v, key, lo=0.0, hi=1.0)
        elif k == "simplex":
            kw[k] = _integer(v, key, 1, MAX_SIMPLEX_STEPS)
        elif k == "alphas":
            kw[k] = _floats(v, key, lo=0.0, lo_open=True)
        elif k == "draws":
            kw[k] = _integer(v, key, 0, MAX_CANDIDATES)
        elif k == "seed":
            kw[k] = _integer(v, key, 0, SEED_LIMIT - 1)
        elif k == "max_candidates":
            kw[k] = _integer(v, key, 1, MAX_CANDIDATES)
        elif k == "max_time":
            kw[k] = _number(v, key, lo=0.0, lo_open=True)
    out = SearchSpace(**kw)
    if out.alphas and out.seed + len(out.alphas) * out.draws > SEED_LIMIT:
        raise SearchError(f"{where}.seed: seed + alphas × draws must stay below 2**32, got seed {out.seed}")
    return out


# --------------------------------------------------------------------------- candidates


def simplex_points(n: int, steps: int) -> list:
    """Every ratio vector of ``n`` entries k_i/steps (k_i ≥ 0 integers summing to ``steps``),
    in lexicographic order of (k_1, ..., k_n) from the largest k_1."""
    out = []

    def rec(prefix, left, slots):
        if slots == 1:
            out.append(tuple(prefix + [left]))
            return
        for k in range(left, -1, -1):
            rec(prefix + [k], left - k, slots - 1)
            if len(out) > MAX_CANDIDATES:
                raise SearchError(f"search.simplex: more than {MAX_CANDIDATES:,} points for {n} models")

    rec([], steps, n)
    return [tuple(k / steps for k in p) for p in out]


def _ratio_axis(space: SearchSpace, n: int, cfg_mixup) -> list:
    """[(mix, ratios, alpha, seed, mixup config)] along the M³ axis."""
    from m3kernels.merge.mixup import draw_mix_ratios, normalize_mix_ratios

    if not space.ratio_axis_given:
        if cfg_mixup is None:
            return [("config", None, None, None, "keep")]
        if "lambda" in cfg_mixup:
            return [("config", normalize_mix_ratios(cfg_mixup["lambda"], n), None, None, "keep")]
        a, s = cfg_mixup["alpha"], cfg_mixup["seed"]
        return [("config", draw_mix_ratios(a, n, s), a, s, "keep")]
    axis = []
    if space.plain:
        axis.append(("plain", None, None, None, None))
    if space.lambdas:
        if n != 2:
            raise SearchError(
                f"search.lambdas: a fixed λ needs exactly 2 models, the config has {n}; "
                f"use simplex (a grid of ratio vectors) or alphas (Dirichlet draws)"
            )
        axis += [("lambda", (lam, 1.0 - lam), None, None, {"lambda": lam}) for lam in space.lambdas]
    if space.simplex is not None:
        for r in simplex_points(n, space.simplex):
            if n == 2:
                axis.append(("lambda", (r[0], 1.0 - r[0]), None, None, {"lambda": r[0]}))
            else:
                axis.append(("ratios", r, None, None, None))
    for ai, alpha in enumerate(space.alphas or ()):
        for k in range(space.draws):
            seed = space.seed + ai * space.draws + k
            axis.append(
                ("draw", draw_mix_ratios(alpha, n, seed), alpha, seed, {"alpha": alpha, "seed": seed})
            )
    return axis


def candidate_config(raw: dict, method: str, scale, density, mixup) -> tuple:
    """The merge config of one candidate: ``raw`` with the method, scale, density and M³ block
    replaced (``mixup``: "keep", None to remove, or the block), the parameters the method does
    not take dropped. Returns (config, scale used, density used) (None: the method takes none)."""
    from m3kernels.merge.registry import get_method

    m = get_method(method)
    cfg = copy.deepcopy(raw)
    cfg["merge_method"] = m.name
    top = dict(cfg.get("parameters") or {})
    entries = [dict(e) if isinstance(e, dict) else e for e in cfg.get("models") or []]
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("parameters"), dict):
            e["parameters"] = dict(e["parameters"])
    per_model = [
        e["parameters"] for e in entries if isinstance(e, dict) and isinstance(e.get("parameters"), dict)
    ]
    for params in [top, *per_model]:
        for name in list(params):
            if not m.takes(name, in_config=True):
                del params[name]
    if scale is not None and m.takes("lambda", in_config=True):
        top["lambda"] = scale
    else:
        scale = None
    if density is not None and m.takes("density", in_config=True):
        top["density"] = density
        for params in per_model:
            params.pop("density", None)
        if m.dare and not m.trim:  # dare_*: density = 1 − drop_rate, one of them
            top.pop("drop_rate", None)
            for params in per_model:
                params.pop("drop_rate", None)
    else:
        density = None
    cfg["parameters"] = top
    if not top:
        del cfg["parameters"]
    cfg["models"] = entries
    for e in entries:
        if isinstance(e, dict) and e.get("parameters") == {}:
            del e["parameters"]
    base = cfg.get("base_model")
    if not m.uses_base and base is not None:
        listed = any(isinstance(e, dict) and e.get("model") == base for e in entries)
        if not listed:  # linear does not use a base: merge the models alone
            cfg.pop("base_model", None)
            cfg.pop("tokenizer_source", None)
    if mixup != "keep":
        if mixup is None:
            cfg.pop("mixup", None)
        else:
            cfg["mixup"] = dict(mixup)
    return cfg, scale, density


def build_candidates(raw: dict, n_models: int, space: SearchSpace, default_method: str, cfg_mixup) -> list:
    """Every candidate of ``space`` for the config ``raw`` (its ``search`` block removed), each
    config validated (:func:`m3kernels.checkpoint.config.parse_config`); SearchError if none."""
    from m3kernels.checkpoint.config import MergeConfigError, parse_config

    methods = space.methods if space.methods is not None else (default_method,)
    scales = space.scales if space.scales is not None else (None,)
    densities = space.densities if space.densities is not None else (None,)
    axis = _ratio_axis(space, n_models, cfg_mixup)
    out, seen = [], set()
    for method in methods:
        for scale in scales:
            for density in densities:
                for mix, ratios, alpha, seed, mixup in axis:
                    cfg, sc, de = candidate_config(raw, method, scale, density, mixup)
                    c = Candidate(len(out), method, sc, de, mix, ratios, alpha, seed, cfg)
                    if c.key in seen:
                        continue
                    try:
                        parse_config(copy.deepcopy(cfg))
                    except MergeConfigError as exc:
                        raise SearchError(f"candidate {c.key}: {exc}") from None
                    seen.add(c.key)
                    out.append(c)
                    if len(out) > MAX_CANDIDATES:
                        raise SearchError(f"the search space has more than {MAX_CANDIDATES:,} candidates")
    if space.max_candidates is not None:
        out = out[: space.max_candidates]
    if not out:
        raise SearchError(
            "the search space has no candidate (an empty list, or draws: 0); give methods and "
            "at least one of plain, lambdas, simplex, alphas with draws ≥ 1"
        )
    return out


__all__ = [
    "SearchSpace",
    "Candidate",
    "parse_space",
    "build_candidates",
    "candidate_config",
    "simplex_points",
    "SPACE_KEYS",
]
