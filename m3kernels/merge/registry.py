"""The method registry: every merge method declared once, with its parameters and kernel program.

Each :class:`Method` says what a user may pass (its :class:`Param` list: name, per-model or
merge-wide, kind, range, default, whether gradients and filters are allowed), whether it needs
a base model, how many models it takes, how M³ applies to it (``mixup``: ``weights`` |
``interpolation`` | ``none``), which stage-A statistics it needs and how it maps onto the kernel
program of docs/KERNEL.md (:class:`Program`: delta or raw values, DARE drop, magnitude trim,
combine rule). A method with a ``family`` owns its stage A and coefficient computation in
``m3kernels.merge.methods.<family>`` (a ``prepare`` hook, docs/ADDING_A_METHOD.md); the others
run the generic task-vector program of :func:`m3kernels.api.prepare`.

A parameter name may mean different things in different methods (``t`` is slerp's fraction and
nearswap's distance; ``epsilon`` is ram's magnitude floor; ``alpha`` is ramplus_tl's cap, not
M³'s), so every lookup is per method: :func:`param_kind` and :func:`param_allows_gradient` take
the method.

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
SUM, MEAN, TIES, NEARSWAP, RAM = "sum", "mean", "ties", "nearswap", "ram"
# parameter scopes
PER_MODEL, MERGE_WIDE = "per-model", "merge-wide"
# parameter kinds: how a value is checked (config: m3kernels.checkpoint.config._leaf)
NUMBER, FRACTION, BOOL, RESCALE, INT = "number", "fraction", "bool", "rescale", "int"
CHOICE = "choice"  # one of the parameter's ``choices`` (trim_ties: all | k)
PATH = "path"  # a folder path in a config (fisher / regmean statistics), relative to the config
MAX_INT_PARAM = 100_000  # the largest value an INT parameter (karcher's max_iter) may take
# how M³ (Mixup Model Merge) applies to a method
MIX_WEIGHTS = "weights"  # the ratios multiply the per-model weights
MIX_INTERPOLATION = "interpolation"  # the drawn ratio is the interpolation weight t
MIX_NONE = "none"  # M³ is rejected with a clear error
# stage-A statistics a method may need (m3kernels.api.prepare computes them)
# (the exact k-th largest magnitude per model; the L1 sums of the deltas and of their DARE-kept part)
TRIM_HISTOGRAM = "trim thresholds"
L1_SUMS = "L1 sums (rescale: l1 only)"
GRAM = "Gram matrix of the vectors (float64)"
RAM_COUNTS = "shared/unique counts per model"
WINDOW = "two order statistics per model (window)"
KEEP_MASK = "row ranks of |δ| (sort), keep bitmask, L1 sums"

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
    config (filters by tensor name are allowed for every parameter). ``config_default``: what
    an unset parameter means in a (mergekit) config when that differs from ``default`` (None:
    the same), e.g. mergekit's density 1.
    """

    name: str
    api: str
    scope: str
    kind: str
    default: Any
    doc: str
    gradient: bool = True
    config: bool = True
    config_default: Any = None
    choices: tuple = ()  # the values of a CHOICE parameter

    @property
    def range(self) -> str:
        return {
            NUMBER: "finite float32",
            FRACTION: "[0, 1]",
            BOOL: "true, false",
            RESCALE: "true, false, l1, density",
            INT: f"integer in [0, {MAX_INT_PARAM}]",
            CHOICE: ", ".join(self.choices),
            PATH: "a statistics folder (m3kernels stats)",
        }[self.kind]

    @property
    def optional(self) -> bool:
        """No default: an unset value means 'not applied' (passthrough's ``scale``)."""
        return self.default is None


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
    trim_window: bool = False  # the trim keeps a window of ranks (breadcrumbs), not the top ones
    fma: bool = False  # sum/mean: accumulate with a fused multiply-add (mergekit's linear, parity D1)


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
    family: str | None = None  # m3kernels.merge.methods.<family> owns stage A (None: generic)
    mixup: str = MIX_WEIGHTS  # how M³ applies (MIX_WEIGHTS | MIX_INTERPOLATION | MIX_NONE)
    mixup_note: str = ""  # why M³ is rejected (MIX_NONE) or what it means, for messages
    models: tuple = (1, None)  # (least, most) non-base models (None: no upper bound)
    stats: tuple = ()  # stage-A statistics of a family method (generic ones: from the program)
    features: tuple = ()  # backend FEATURES (m3kernels.backends.*.FEATURES) the method needs
    base_as_model: bool = False  # config: an unlisted base_model is one more model (karcher)

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
        if self.family is not None:
            return self.stats
        out = (TRIM_HISTOGRAM,) if self.program.trim else ()
        return out + ((L1_SUMS,) if self.program.dare or self.takes("rescale") else ())

    def mix_count(self, n: int) -> int:
        """How many M³ ratios a merge of ``n`` models draws: the two ends (base, model) of an
        interpolation, else one per model."""
        return 2 if self.mixup == MIX_INTERPOLATION else n

    def check_model_count(self, n: int, what: str = "models") -> None:
        """ValueError naming ``what`` unless the method takes ``n`` non-base models."""
        lo, hi = self.models
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            base = " besides the base model" if self.needs_base else ""
            raise ValueError(f"{what}: method {self.name!r} takes {want} model(s){base}, got {n}")

    def kind_of(self, name: str) -> str:
        """The kind of this method's parameter ``name`` (KeyError: it does not take it)."""
        p = self.param(name)
        if p is None:
            raise KeyError(name)
        return p.kind

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


def _trim_density(default, config_default=1.0) -> Param:
    """``config_default``: mergekit's 1 (no trim) for its methods; None (= ``default``) for ours."""
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        default,
        "fraction of the largest |δ| the magnitude trim keeps (k = max(1, ⌊density·n⌋); 0: none)",
        config_default=config_default,
    )


def _trim_ties() -> Param:
    return Param(
        "trim_ties",
        "trim_ties",
        MERGE_WIDE,
        CHOICE,
        "all",
        "elements tied with the trim threshold: all kept (all), or exactly k kept in all, the "
        "lowest flat index first (k; mergekit keeps k in an unspecified order)",
        gradient=False,
        choices=("all", "k"),
    )


def _dare_density() -> Param:
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        REQUIRED,
        "DARE keep probability (or give drop_rate = 1 − density)",
        config_default=1.0,
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


def _rescale(mergekit: bool = True) -> Param:
    """``mergekit``: a mergekit method, whose config ``true`` (and default) is the L1 rule."""
    if not mergekit:  # ties_dare (ours): true is × 1/density in a config too
        return Param(
            "rescale",
            "rescale",
            MERGE_WIDE,
            RESCALE,
            True,
            "kept values × 1/density (true, density), unscaled (false), or × Σ|δ| / Σ|δ kept| (l1)",
            gradient=False,
        )
    return Param(
        "rescale",
        "rescale",
        MERGE_WIDE,
        RESCALE,
        True,
        "kept values × 1/density (density; true in the API), × Σ|δ| / Σ|δ kept| per tensor (l1; "
        "true in a config, mergekit's rule), or unscaled (false)",
        gradient=False,
        config_default="l1",
    )


def _trim_rescale() -> Param:
    return Param(
        "rescale",
        "rescale",
        MERGE_WIDE,
        BOOL,
        False,
        "mergekit's L1 rescale after the trim: kept δ × Σ|δ| / Σ|kept δ| per model and tensor "
        "(m3kernels.merge.trim_rescale)",
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


def _vote() -> Param:
    """TIES sign vote (m3kernels.merge.ties_variants); API only: mergekit has no such key."""
    return Param(
        "vote",
        "vote",
        MERGE_WIDE,
        CHOICE,
        "weighted",
        "sign vote: of Σ w_i·δ_i, agreement by sign(w_i·δ_i) (weighted); of Σ δ_i, agreement by "
        "sign(δ_i), weights only scale values (unweighted; PEFT's total); of Σ sgn(δ_i) (count; "
        "PEFT's frequency). m3kernels' extension: mergekit has no such key",
        gradient=False,
        config=False,
        choices=("weighted", "unweighted", "count"),
    )


def _divide_by() -> Param:
    """TIES disjoint-merge divisor (m3kernels.merge.ties_variants); API only."""
    return Param(
        "divide_by",
        "divide_by",
        MERGE_WIDE,
        CHOICE,
        None,
        "disjoint-merge divisor: the agreeing weights (weights = normalize true), the number of "
        "agreeing models, at least 1 (count; PEFT's), none (= normalize false); unset: normalize "
        "decides. m3kernels' extension: mergekit has no such key",
        gradient=False,
        config=False,
        choices=("weights", "count", "none"),
    )


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
        program=Program(
            uses_base=False, combine=MEAN, dare=False, trim=False, normalize_default=True, fma=True
        ),
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
            _trim_rescale(),
            _normalize(True, _TIES_NORM),
            _lambda(),
            _INT8_MASK,
            _vote(),
            _divide_by(),
            _trim_ties(),
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
            _vote(),
            _divide_by(),
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
            _trim_density(DEFAULT_TRIM_DENSITY, config_default=None),
            _drop_rate(True),
            _rescale(mergekit=False),
            _normalize(True, _TIES_NORM),
            _lambda(),
            _INT8_MASK,
            _vote(),
            _divide_by(),
            _trim_ties(),
        ),
    )
)


register(
    Method(
        "magnitude_prune",
        "trim each δ to its top-density magnitudes, then a weighted sum (no sign vote; PEFT's magnitude_prune)",
        "https://huggingface.co/docs/peft/developer_guides/model_merging",
        needs_base=True,
        program=Program(uses_base=True, combine=SUM, dare=False, trim=True, normalize_default=False),
        params=(
            _weight(),
            _trim_density(DEFAULT_TRIM_DENSITY, config_default=None),
            _normalize(False, _SUM_NORM),
            _lambda(),
            _trim_ties(),
        ),
    )
)


# ------------------------------------------------------------------ mergekit's other methods (issue 8)
def _shared(name, kind, default, doc, *, api=None, gradient=True) -> Param:
    return Param(name, name if api is None else api, MERGE_WIDE, kind, default, doc, gradient=gradient)


def _raw_program(uses_base: bool) -> Program:
    """Family methods: the hook builds the kernel program itself (SUM with its coefficients, or a
    combine of its own); ``uses_base``: the merge reads the base tensor."""
    return Program(uses_base=uses_base, combine=SUM, dare=False, trim=False, normalize_default=False)


_NO_M3_WEIGHTS = "it has no per-model weights for M³ ratios to multiply"

register(
    Method(
        "passthrough",
        "copy the one input model's tensor, optionally times scale (no kernel pass)",
        MERGEKIT_DOCS,
        needs_base=False,
        program=_raw_program(False),
        params=(
            Param(
                "scale",
                "scale",
                PER_MODEL,
                NUMBER,
                None,
                "multiply the copied tensor by this (float32; unset: an exact copy)",
            ),
        ),
        family="passthrough",
        mixup=MIX_NONE,
        mixup_note="it copies one model",
        models=(1, 1),
    )
)
register(
    Method(
        "nearswap",
        "base + clamp(x − base, −t, t) per element (mergekit's interpolation form, float32)",
        MERGEKIT_DOCS,
        needs_base=True,
        program=Program(uses_base=True, combine=NEARSWAP, dare=False, trim=False, normalize_default=False),
        params=(
            _shared(
                "t",
                NUMBER,
                REQUIRED,
                "distance limit: differences below t are taken whole, larger ones move t toward "
                "the model (t <= 0 gives the base)",
            ),
        ),
        family="elementwise",
        mixup=MIX_NONE,
        mixup_note="t is a distance in weight units, not a ratio",
        models=(1, 1),
        features=("nearswap",),
    )
)
_RAM_EPS = "|δ| must exceed this for a model to count at an element"
register(
    Method(
        "ram",
        "disjoint mean of the task vectors that move by more than epsilon (no sign election)",
        MERGEKIT_DOCS,
        needs_base=True,
        program=Program(uses_base=True, combine=RAM, dare=False, trim=False, normalize_default=False),
        params=(_shared("epsilon", NUMBER, 1e-5, _RAM_EPS),),
        family="elementwise",
        mixup=MIX_NONE,
        mixup_note=_NO_M3_WEIGHTS,
        features=("ram",),
    )
)
register(
    Method(
        "ramplus_tl",
        "ram with the unique contributions scaled by 1 + r·min(shared/unique, alpha) per model "
        "(counts per tensor)",
        MERGEKIT_DOCS,
        needs_base=True,
        program=Program(uses_base=True, combine=RAM, dare=False, trim=False, normalize_default=False),
        params=(
            _shared("r", NUMBER, 0.1, "strength of the boost of a model's unique contributions"),
            _shared("alpha", NUMBER, 0.2, "cap on shared/unique (not M³'s mixup.alpha)"),
            _shared("epsilon", NUMBER, 1e-5, _RAM_EPS),
        ),
        family="elementwise",
        mixup=MIX_NONE,
        mixup_note=_NO_M3_WEIGHTS,
        stats=(RAM_COUNTS,),
        features=("ram", "ram_counts"),
    )
)


def _window_density() -> Param:
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        1.0,
        "fraction of |δ| the window keeps (T = ⌊density·n⌋; 1: no trim, gamma ignored)",
    )


def _gamma() -> Param:
    return Param(
        "gamma",
        "gamma",
        PER_MODEL,
        FRACTION,
        0.01,
        "fraction of the largest |δ| dropped as outliers (G = ⌊gamma·n⌋, shrunk to keep T)",
    )


for _name, _combine, _summary, _norm_doc in (
    (
        "breadcrumbs",
        SUM,
        "drop the smallest and the largest magnitudes of each task vector, then sum",
        _SUM_NORM,
    ),
    (
        "breadcrumbs_ties",
        TIES,
        "breadcrumbs' window trim, then TIES sign election and disjoint sum",
        _TIES_NORM,
    ),
):
    register(
        Method(
            _name,
            _summary,
            "https://arxiv.org/abs/2312.06795",
            needs_base=True,
            program=Program(
                uses_base=True,
                combine=_combine,
                dare=False,
                trim=True,
                normalize_default=False,
                trim_window=True,
            ),
            params=(
                _weight(),
                _window_density(),
                _gamma(),
                _trim_rescale(),
                _normalize(False, _norm_doc),
                _lambda(),
                _INT8_MASK,
                _trim_ties(),
            )
            + ((_vote(), _divide_by()) if _combine == TIES else ()),
            family="breadcrumbs",
            stats=(WINDOW,),
            features=("trim_max",),
        )
    )


def _della_density() -> Param:
    return Param(
        "density",
        "density",
        PER_MODEL,
        FRACTION,
        1.0,
        "mean keep probability of the rank-based drop (1: no drop; 0: nothing kept)",
    )


def _della_epsilon() -> Param:
    return Param(
        "epsilon",
        "epsilon",
        PER_MODEL,
        NUMBER,
        0.15,
        "keep probability spread: density − epsilon for a row's smallest |δ|, density + epsilon "
        "for its largest (both must lie in (0, 1) when 0 < density < 1)",
    )


def _della_rescale() -> Param:
    return Param(
        "rescale",
        "rescale",
        MERGE_WIDE,
        BOOL,
        True,
        "kept values × Σ|δ| / Σ|δ kept| over the tensor (mergekit's L1 rescale), or unscaled",
        gradient=False,
    )


for _name, _combine, _norm, _summary, _norm_doc in (
    (
        "della",
        TIES,
        True,
        "drop each δ at random with a keep probability rising with its magnitude rank in its row, "
        "L1 rescale, elect signs, disjoint mean",
        _TIES_NORM,
    ),
    (
        "della_linear",
        SUM,
        False,
        "della's rank-based random drop and L1 rescale, then a weighted sum of the deltas",
        _SUM_NORM,
    ),
):
    register(
        Method(
            _name,
            _summary,
            "https://arxiv.org/abs/2406.11617",
            needs_base=True,
            program=Program(uses_base=True, combine=_combine, dare=False, trim=True, normalize_default=_norm),
            params=(
                _weight(),
                _della_density(),
                _della_epsilon(),
                _della_rescale(),
                _normalize(_norm, _norm_doc),
                _lambda(),
                _INT8_MASK,
            )
            + ((_vote(), _divide_by()) if _combine == TIES else ()),
            family="della",
            stats=(KEEP_MASK,),
            features=("keep_mask",),
        )
    )

register(
    Method(
        "slerp",
        "spherical interpolation from the base (t = 0) to the model (t = 1), per tensor",
        "https://en.wikipedia.org/wiki/Slerp",
        needs_base=True,
        program=_raw_program(True),
        params=(
            _shared(
                "t",
                NUMBER,
                REQUIRED,
                "interpolation fraction: 0 the base, 1 the model (outside [0, 1] extrapolates; "
                "with M³: the drawn ratio, not set)",
            ),
        ),
        family="gram",
        mixup=MIX_INTERPOLATION,
        mixup_note="t ~ Beta(α, α) (or mixup.lambda's 1 − λ): the drawn ratio of the model",
        models=(1, 1),
        stats=(GRAM,),
        features=("gram",),
    )
)
register(
    Method(
        "nuslerp",
        "SLERP of two models (task vectors with a base) at t = w_B / (w_A + w_B), per tensor, row or column",
        MERGEKIT_DOCS,
        needs_base=False,
        program=_raw_program(True),
        params=(
            _weight(),
            _shared(
                "nuslerp_flatten",
                BOOL,
                True,
                "one vector per tensor (true), else per row or column (nuslerp_row_wise)",
            ),
            _shared(
                "nuslerp_row_wise",
                BOOL,
                False,
                "with nuslerp_flatten false: vectors along dim 0 (columns of a 2-D weight; "
                "true) or the last dim (rows; false)",
            ),
        ),
        family="gram",
        models=(2, 2),
        stats=(GRAM,),
        features=("gram", "group_coef"),
    )
)
register(
    Method(
        "multislerp",
        "barycentric interpolation of N models on the hypersphere (around the base if given)",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        needs_base=False,
        program=_raw_program(True),
        params=(
            _weight(),
            _shared("normalize_weights", BOOL, True, "divide the weights by their sum"),
            _shared("eps", NUMBER, 1e-8, "added to the norms (and to the tangent norm)"),
        ),
        family="gram",
        stats=(GRAM,),
        features=("gram",),
    )
)
register(
    Method(
        "karcher",
        "Riemannian (Karcher) mean of the models on the hypersphere, times their mean norm",
        "https://arxiv.org/abs/2603.04972",
        needs_base=False,
        program=_raw_program(False),
        params=(
            _shared("max_iter", INT, 10, "most iterations of the mean"),
            _shared("tol", NUMBER, 1e-5, "norm, angle and convergence tolerance"),
        ),
        family="gram",
        mixup_note="the ratios are the points' weights (direction and norm)",
        stats=(GRAM,),
        features=("gram",),
        base_as_model=True,
    )
)
register(
    Method(
        "model_stock",
        "t·mean(models) + (1 − t)·base with t from the mean pairwise cosine of the task vectors",
        "https://arxiv.org/abs/2403.19522",
        needs_base=True,
        program=_raw_program(True),
        params=(
            _shared(
                "filter_wise",
                BOOL,
                False,
                "one t per row (slice along the last dim) instead of per tensor",
            ),
        ),
        family="gram",
        mixup=MIX_NONE,
        mixup_note="its t is geometric and its average unweighted",
        models=(2, None),
        stats=(GRAM,),
        features=("gram", "group_coef"),
    )
)

# sce and arcee_fusion: a keep mask from a per-element statistic (m3kernels.merge.methods.sce,
# .arcee_fusion); the weights and the mask are data-derived, so M³ has nothing to scale
VAR_SELECT = "variance over the models, exact top-k keep mask (select_topk < 1), mean squares"
IMPORTANCE_SELECT = "row softmax KL, importance quartiles (exact), keep mask"
register(
    Method(
        "sce",
        "keep the elements of highest variance over the models (select_topk), weight each task "
        "vector by its mean square, elect signs, disjoint weighted mean",
        "https://arxiv.org/abs/2408.07990",
        needs_base=True,
        program=Program(uses_base=True, combine=TIES, dare=False, trim=False, normalize_default=True),
        params=(
            _shared(
                "select_topk",
                NUMBER,
                1.0,
                "fraction of the elements with nonzero variance kept (k = ⌊nnz·s⌋ as a float32 "
                "product; >= 1: no select; <= 0: nothing kept; ties: lowest flat index)",
            ),
            _INT8_MASK,
        ),
        family="sce",
        mixup=MIX_NONE,
        mixup_note="its weights are computed from the task vectors",
        stats=(VAR_SELECT,),
        features=("keep_mask", "den_floor"),
    )
)
register(
    Method(
        "arcee_fusion",
        "the base plus the model's delta where |δ|·KL(softmax rows) reaches Q50 + 1.5·(Q75 − Q25)",
        MERGEKIT_DOCS,
        needs_base=True,
        program=_raw_program(True),
        params=(),
        family="arcee_fusion",
        mixup=MIX_NONE,
        mixup_note="its mask is computed from the tensors",
        models=(1, 1),
        stats=(IMPORTANCE_SELECT,),
        features=("keep_mask",),
    )
)

# fisher and regmean: merges with statistics computed from data (m3kernels stats; docs/DATA_AWARE.md).
# Not stage-B programs: merge_tensors dispatches them to m3kernels.merge.data_aware, a config merge to
# m3kernels.checkpoint.data_aware_run; the "data_aware" family hook refuses a call without statistics.
FISHER_STATS = "none: a diagonal Fisher per parameter, precomputed (m3kernels stats fisher)"
GRAM_STATS = "none: a Gram matrix XᵀX per linear layer, precomputed (m3kernels stats regmean)"
_DATA_FALLBACKS = ("average", "linear", "multislerp")  # no base, weights, any N: what a config may name


def _stats_path(name: str, api: str, what: str) -> Param:
    return Param(
        name,
        api,
        PER_MODEL,
        PATH,
        REQUIRED,
        f"the model's {what} folder (relative: to the config's folder, as model paths); the API "
        f"takes the tensors ({api}=[...], one per model)",
        gradient=False,
    )


def _data_weight() -> Param:
    return Param(
        "weight",
        "weights",
        PER_MODEL,
        NUMBER,
        1.0,
        "coefficient of the model (times its M³ ratio when M³ is on); >= 0, one value per model",
        gradient=False,
    )


register(
    Method(
        "fisher",
        "Fisher-weighted average: Σ wᵢF̃ᵢθᵢ / Σ wᵢF̃ᵢ per element, F̃ the floored diagonal Fisher",
        "https://arxiv.org/abs/2111.09832",
        needs_base=False,
        program=_raw_program(False),
        params=(
            _data_weight(),
            _stats_path("fisher", "fishers", "Fisher statistics"),
            Param(
                "floor",
                "floor",
                MERGE_WIDE,
                NUMBER,
                1e-6,
                "floor on F (>= 0): F̃ = max(F, floor) (floor_mode max) or F + floor (add)",
                gradient=False,
            ),
            Param(
                "floor_mode",
                "floor_mode",
                MERGE_WIDE,
                CHOICE,
                "max",
                "max: the Fisher-merging paper's floor; add: FusionBench's minimal_fisher_weight",
                gradient=False,
                choices=("max", "add"),
            ),
            Param(
                "fisher_normalize",
                "",
                MERGE_WIDE,
                CHOICE,
                "none",
                "l2: each model's F scaled by sᵢ ∝ 1/‖Fᵢ‖₂ over all its parameters (FusionBench's "
                "normalize_fisher_weight; one more read of the statistics); none: unscaled",
                gradient=False,
                choices=("none", "l2"),
            ),
        ),
        family="data_aware",
        mixup_note="the ratios weigh each model: rᵢwᵢF̃ᵢ",
        stats=(FISHER_STATS,),
    )
)
register(
    Method(
        "regmean",
        "per linear layer W = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢ (least squares on each model's inputs), "
        "G̃ = α·G + (1 − α)·diag(G); other tensors by a fallback method",
        "https://arxiv.org/abs/2212.09849",
        needs_base=False,
        program=_raw_program(False),
        params=(
            _data_weight(),
            _stats_path("gram", "grams", "RegMean Gram matrices"),
            Param(
                "alpha",
                "alpha",
                MERGE_WIDE,
                FRACTION,
                0.1,
                "off-diagonal scaling of the Grams (1: plain RegMean; 0: per-feature weighted "
                "average; not M³'s mixup.alpha)",
                gradient=False,
            ),
            Param(
                "ridge",
                "ridge",
                MERGE_WIDE,
                NUMBER,
                0.0,
                "ridge (>= 0): adds ridge·mean(diag)·I to the system (a singular layer is an error without)",
                gradient=False,
            ),
            Param(
                "fallback",
                "",
                MERGE_WIDE,
                CHOICE,
                "average",
                "the method for every tensor without a Gram matrix (biases, norms, embeddings), "
                "with the same weights and M³ ratios",
                gradient=False,
                choices=_DATA_FALLBACKS,
            ),
            Param(
                "gram_normalize",
                "",
                MERGE_WIDE,
                CHOICE,
                "none",
                "tokens: each model's Grams divided by its token count (the same say whatever its "
                "data size); none: the sums XᵀX",
                gradient=False,
                choices=("none", "tokens"),
            ),
            Param(
                "precision",
                "precision",
                MERGE_WIDE,
                CHOICE,
                "float64",
                "float64: Cholesky on the CPU; float32: on the Grams' device, checked by the "
                "residual (float64 on the CPU when the check fails); unset in a config merge on a "
                "GPU (--device cuda, or auto with one): float32 there",
                gradient=False,
                choices=("float64", "float32"),
            ),
            Param(
                "transposed",
                "transposed",
                MERGE_WIDE,
                BOOL,
                False,
                "the weight is [in, out] (GPT-2's Conv1D), not nn.Linear's [out, in]",
                gradient=False,
                config=False,
            ),
        ),
        family="data_aware",
        mixup_note="the ratios weigh each model: rᵢwᵢG̃ᵢ",
        stats=(GRAM_STATS,),
    )
)

# mergekit methods not implemented yet: named in the error so users know it is not a typo
MERGEKIT_ONLY_METHODS = ()


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


def _as_method(method) -> Method:
    return method if isinstance(method, Method) else get_method(method)


def param_kind(method, name: str) -> str:
    """The kind of parameter ``name`` of ``method`` (a Method or a name); KeyError if it does
    not take it. Per method: ``t`` is a fraction for slerp and a distance for nearswap."""
    return _as_method(method).kind_of(name)


def param_allows_gradient(method, name: str) -> bool:
    """Whether ``method``'s parameter ``name`` may be a gradient; KeyError if it does not take it."""
    p = _as_method(method).param(name)
    if p is None:
        raise KeyError(name)
    return p.gradient


def methods_taking(name: str) -> list:
    return [m.name for m in METHODS.values() if m.takes(name, in_config=True)]


# ------------------------------------------------------------------ generated documentation
DOC_BEGIN = "<!-- BEGIN generated by m3kernels.merge.registry.markdown_tables(); do not edit -->"
DOC_END = "<!-- END generated -->"


def _default_text(p: Param) -> str:
    if p.config_default is not None and p.config_default != p.default:
        return f"{_value_text(p.default)} (config: {_value_text(p.config_default)})"
    return _value_text(p.default)


def _value_text(value) -> str:
    if value is REQUIRED:
        return "required"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def base_role(m: Method) -> str:
    """'required', 'optional' (used when given), 'one more model (config)' (karcher: an unlisted
    base_model is one more input) or 'not used', for the docs and the CLI."""
    if m.needs_base:
        return "required"
    if m.base_as_model:
        return "one more model (config)"
    return "optional" if m.program.uses_base else "not used"


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
            f"{base_role(m)} | {stage} | {m.summary} | "
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
    "NEARSWAP",
    "RAM",
    "NUMBER",
    "FRACTION",
    "BOOL",
    "RESCALE",
    "INT",
    "CHOICE",
    "PATH",
    "MIX_WEIGHTS",
    "MIX_INTERPOLATION",
    "MIX_NONE",
    "PER_MODEL",
    "MERGE_WIDE",
    "REQUIRED",
    "all_config_params",
    "param_kind",
    "param_allows_gradient",
    "methods_taking",
    "base_role",
    "refresh_doc",
    "DOC_BEGIN",
    "DOC_END",
]
