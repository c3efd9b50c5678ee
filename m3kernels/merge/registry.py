"""The method registry: every merge method declared once, with its parameters and kernel program.

Each :class:`Method` says what a user may pass (its :class:`Param` list: name, per-model or
merge-wide, kind, range, default, whether gradients and filters are allowed), whether it needs
a base model, which stage-A statistics it needs and how it maps onto the kernel program of
docs/KERNEL.md (:class:`Program`: delta or raw values, DARE drop, magnitude trim, combine rule).

Everything else reads from here: :func:`m3kernels.merge.recipe.make_recipe` (the tensor API),
the config parser (:mod:`m3kernels.checkpoint.config`), the dry-run plan, the CLI's "supported:
…" messages and the parameter tables of docs/CONFIG.md (:func:`markdown_tables`; a test checks
that the doc holds exactly what this module generates). docs/ADDING_A_METHOD.md walks through
adding one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# combine rules of the kernel program (docs/KERNEL.md)
SUM, MEAN, TIES = "sum", "mean", "ties"
# parameter scopes
PER_MODEL, MERGE_WIDE = "per-model", "merge-wide"
# parameter kinds: how a value is checked (config: m3kernels.checkpoint.config._leaf)
NUMBER, FRACTION, BOOL, RESCALE = "number", "fraction", "bool", "rescale"
# stage-A statistics a method may need (m3kernels.api.prepare computes them)
# (the exact k-th largest magnitude per model; the L1 sums of the deltas and of their DARE-kept part)
TRIM_HISTOGRAM = "trim thresholds"
L1_SUMS = "L1 sums (rescale: l1 only)"

DEFAULT_TRIM_DENSITY = 0.2
MERGEKIT_DOCS = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"


@dataclass(frozen=True)
class Param:
    """One parameter a method takes.

    ``name`` is the config (mergekit) name, ``api`` the keyword of ``merge_tensors`` ("": none).
    ``default``
    is what an unset parameter means (``REQUIRED``: the method cannot run without it).
    ``config=False``: the tensor API takes it but a config may not set it (mergekit has no such
    parameter for the method). ``gradient``: a list of values over the layers is allowed in a
    config (filters by tensor name are allowed for every parameter).
    """

    name: str
    api: str
    scope: str
    kind: str
    default: Any
    doc: str
    gradient: bool = True
    config: bool = True

    @property
    def range(self) -> str:
        return {
            NUMBER: "finite float32",
            FRACTION: "[0, 1]",
            BOOL: "true, false",
            RESCALE: "true, false, l1",
        }[self.kind]


REQUIRED = "required"


@dataclass(frozen=True)
class Program:
    """How a method maps onto the kernel program (docs/KERNEL.md): the per-element pipeline
    δ = x − θ0 (``uses_base``) → DARE drop (``dare``) → magnitude trim (``trim``) → combine."""

    uses_base: bool  # delta against the base model (False: the base is treated as zero)
    combine: str  # SUM | MEAN | TIES
    dare: bool  # random drop with rescale (DARE)
    trim: bool  # magnitude trim to the top-density fraction (TIES)
    normalize_default: bool  # TIES: divide by the agreeing weights; SUM/MEAN: mean instead of sum


@dataclass(frozen=True)
class Method:
    """A merge method as users see it (see the module docstring)."""

    name: str
    summary: str
    reference: str  # paper or mergekit doc
    needs_base: bool
    program: Program
    params: tuple  # Param, in the order the docs list them
    aliases: tuple = ()

    def param(self, name: str) -> Param | None:
        """The parameter by config name or API keyword (None: the method does not take it)."""
        for p in self.params:
            if name == p.name or (p.api and name == p.api):
                return p
        return None

    def takes(self, name: str, *, in_config: bool = False) -> bool:
        p = self.param(name)
        return p is not None and (p.config or not in_config)

    def config_params(self, scope: str) -> tuple:
        return tuple(p.name for p in self.params if p.config and p.scope == scope)

    @property
    def stage_a(self) -> tuple:
        """The statistics stage A computes for this method (rescale: l1 adds L1_SUMS)."""
        out = (TRIM_HISTOGRAM,) if self.program.trim else ()
        return out + ((L1_SUMS,) if self.program.dare else ())

    @property
    def default_normalize(self) -> bool:
        return self.program.normalize_default

    def __getattr__(self, name: str):
        """The kernel program's flags, read directly: ``method.uses_base``, ``.dare``, ``.trim``, ..."""
        if name in Program.__dataclass_fields__:
            return getattr(self.program, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# ------------------------------------------------------------------ the parameters, written once
def _weight() -> Param:
    return Param(
        "weight",
        "weights",
        PER_MODEL,
        NUMBER,
        1.0,
        "coefficient of the model (times its M³ ratio when M³ is on)",
    )


def _normalize(default: bool, doc: str) -> Param:
    return Param("normalize", "normalize", MERGE_WIDE, BOOL, default, doc, gradient=False)


def _lambda(config: bool = True) -> Param:
    return Param("lambda", "lambda_", MERGE_WIDE, NUMBER, 1.0, "scale s of the merged delta", config=config)


def _trim_density(default) -> Param:
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        default,
        "fraction of the largest |δ| the magnitude trim keeps (k = ⌊density·n⌋)",
    )


def _dare_density() -> Param:
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        REQUIRED,
        "DARE keep probability (or give drop_rate = 1 − density)",
    )


def _drop_rate(required: bool) -> Param:
    return Param(
        "drop_rate",
        "drop_rate",
        PER_MODEL,
        FRACTION,
        REQUIRED if required else None,
        "DARE drop probability" + (" (required)" if required else " = 1 − density"),
    )


def _rescale() -> Param:
    return Param(
        "rescale",
        "rescale",
        MERGE_WIDE,
        RESCALE,
        True,
        "kept values × 1/density (true), unscaled (false), or × Σ|δ| / Σ|δ kept| (l1)",
        gradient=False,
    )


_INT8_MASK = Param(
    "int8_mask",
    "",
    MERGE_WIDE,
    BOOL,
    False,
    "accepted for mergekit compatibility; no effect (masks are never materialised)",
    gradient=False,
    config=True,
)

_TIES_NORM = "divide the agreeing sum by the agreeing weights (disjoint mean)"
_SUM_NORM = "divide the weighted sum by the sum of the weights (mean)"

METHODS: dict = {}
ALIASES: dict = {}


def register(method: Method) -> Method:
    """Add a method (and its aliases) to the registry; names are unique."""
    for key in (method.name, *method.aliases):
        if key in METHODS or key in ALIASES:
            raise ValueError(f"method name {key!r} is registered twice")
    METHODS[method.name] = method
    for a in method.aliases:
        ALIASES[a] = method.name
    return method


register(
    Method(
        "linear",
        "weighted average of the models (the base, if given, is not used)",
        "https://arxiv.org/abs/2203.05482",
        needs_base=False,
        program=Program(uses_base=False, combine=MEAN, dare=False, trim=False, normalize_default=True),
        params=(_weight(), _normalize(True, _SUM_NORM), _lambda(config=False), _INT8_MASK),
        aliases=("average",),
    )
)
register(
    Method(
        "task_arithmetic",
        "base + s · Σ w_i δ_i (task vectors)",
        "https://arxiv.org/abs/2212.04089",
        needs_base=True,
        program=Program(uses_base=True, combine=SUM, dare=False, trim=False, normalize_default=False),
        params=(_weight(), _lambda(), _normalize(False, _SUM_NORM), _INT8_MASK),
    )
)
register(
    Method(
        "ties",
        "trim each δ to its top-density magnitudes, elect signs, disjoint merge",
        "https://arxiv.org/abs/2306.01708",
        needs_base=True,
        program=Program(uses_base=True, combine=TIES, dare=False, trim=True, normalize_default=True),
        params=(
            _weight(),
            _trim_density(DEFAULT_TRIM_DENSITY),
            _normalize(True, _TIES_NORM),
            _lambda(),
            _INT8_MASK,
        ),
    )
)
register(
    Method(
        "dare_linear",
        "DARE random drop with rescale, then a weighted sum of the deltas",
        "https://arxiv.org/abs/2311.03099",
        needs_base=True,
        program=Program(uses_base=True, combine=SUM, dare=True, trim=False, normalize_default=False),
        params=(
            _weight(),
            _dare_density(),
            _drop_rate(False),
            _rescale(),
            _normalize(False, _SUM_NORM),
            _lambda(),
            _INT8_MASK,
        ),
    )
)
register(
    Method(
        "dare_ties",
        "DARE random drop with rescale, then TIES sign election and disjoint sum",
        "https://arxiv.org/abs/2311.03099",
        needs_base=True,
        program=Program(uses_base=True, combine=TIES, dare=True, trim=False, normalize_default=False),
        params=(
            _weight(),
            _dare_density(),
            _drop_rate(False),
            _rescale(),
            _normalize(False, _TIES_NORM),
            _lambda(),
            _INT8_MASK,
        ),
    )
)
register(
    Method(
        "ties_dare",
        "DARE drop (drop_rate), then the TIES trim (density), election and disjoint mean",
        "https://arxiv.org/abs/2311.03099",
        needs_base=True,
        program=Program(uses_base=True, combine=TIES, dare=True, trim=True, normalize_default=True),
        params=(
            _weight(),
            _trim_density(DEFAULT_TRIM_DENSITY),
            _drop_rate(True),
            _rescale(),
            _normalize(True, _TIES_NORM),
            _lambda(),
            _INT8_MASK,
        ),
    )
)

# mergekit methods not implemented yet: named in the error so users know it is not a typo
MERGEKIT_ONLY_METHODS = (
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "sce",
    "slerp",
)


def method_names() -> tuple:
    """Every name a user may write (methods and aliases), sorted."""
    return tuple(sorted(set(METHODS) | set(ALIASES)))


def supported() -> str:
    """'a, b, c' for error messages."""
    return ", ".join(method_names())


def get_method(name, *, what: str = "method") -> Method:
    """The method called ``name`` (case-insensitive, aliases resolved); ValueError naming the
    supported ones otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, one of {supported()}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        why = " (a mergekit method we do not implement yet)" if key in MERGEKIT_ONLY_METHODS else ""
        raise ValueError(f"{what} {name!r} is not supported{why}; supported: {supported()}")
    return METHODS[key]


def all_config_params(scope: str | None = None) -> tuple:
    """Every config parameter name some method takes (in a stable order), optionally by scope."""
    seen: dict = {}
    for m in METHODS.values():
        for p in m.params:
            if p.config and (scope is None or p.scope == scope):
                seen.setdefault(p.name, p)
    return tuple(seen)


def param_kind(name: str) -> str:
    """The kind of a config parameter (the same for every method that takes it)."""
    kinds = {p.kind for m in METHODS.values() for p in m.params if p.name == name}
    if len(kinds) != 1:
        raise KeyError(name)
    return kinds.pop()


def param_allows_gradient(name: str) -> bool:
    """Whether a config parameter may be a gradient (the same for every method that takes it)."""
    flags = {p.gradient for m in METHODS.values() for p in m.params if p.name == name}
    if len(flags) != 1:
        raise KeyError(name)
    return flags.pop()


def methods_taking(name: str) -> list:
    return [m.name for m in METHODS.values() if m.takes(name, in_config=True)]


# ------------------------------------------------------------------ generated documentation
DOC_BEGIN = "<!-- BEGIN generated by m3kernels.merge.registry.markdown_tables(); do not edit -->"
DOC_END = "<!-- END generated -->"


def _default_text(p: Param) -> str:
    if p.default is REQUIRED:
        return "required"
    if p.default is None:
        return "—"
    if isinstance(p.default, bool):
        return str(p.default).lower()
    return f"{p.default:g}" if isinstance(p.default, float) else str(p.default)


def markdown_tables() -> str:
    """The methods and their parameters as Markdown (docs/CONFIG.md holds exactly this)."""
    lines = [
        DOC_BEGIN,
        "",
        "| method | aliases | base | stage A | what it does | reference |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        stage = "; ".join(m.stage_a) or "—"
        lines.append(
            f"| `{m.name}` | {', '.join(f'`{a}`' for a in m.aliases) or '—'} | "
            f"{'required' if m.needs_base else 'not used'} | {stage} | {m.summary} | "
            f"[link]({m.reference}) |"
        )
    for m in METHODS.values():
        lines += [
            "",
            f"**`{m.name}`**",
            "",
            "| parameter | API keyword | scope | values | default | gradient | meaning |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in m.params:
            name = f"`{p.name}`" if p.config else f"(`{p.name}`: API only)"
            api = f"`{p.api}`" if p.api else "—"
            lines.append(
                f"| {name} | {api} | {p.scope} | {p.range} | {_default_text(p)} | "
                f"{'yes' if p.gradient else 'no'} | {p.doc} |"
            )
    lines += ["", DOC_END]
    return "\n".join(lines)


def refresh_doc(path) -> bool:
    """Rewrite the generated block of ``path`` (docs/CONFIG.md) from the registry; True if it changed.

    ``python -c "from m3kernels.merge.registry import refresh_doc; refresh_doc('docs/CONFIG.md')"``
    """
    from pathlib import Path

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    a, b = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
    new = text[:a] + markdown_tables() + text[b:]
    if new != text:
        p.write_text(new, encoding="utf-8")
    return new != text


__all__ = [
    "Method",
    "Param",
    "Program",
    "METHODS",
    "ALIASES",
    "register",
    "get_method",
    "method_names",
    "supported",
    "markdown_tables",
    "MERGEKIT_ONLY_METHODS",
    "DEFAULT_TRIM_DENSITY",
    "SUM",
    "MEAN",
    "TIES",
    "PER_MODEL",
    "MERGE_WIDE",
    "REQUIRED",
    "all_config_params",
    "param_kind",
    "param_allows_gradient",
    "methods_taking",
    "refresh_doc",
    "DOC_BEGIN",
    "DOC_END",
]
