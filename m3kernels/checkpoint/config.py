"""mergekit-compatible YAML merge configs: parse, validate, resolve per-tensor parameters.

``load_config`` reads a config (YAML file, YAML text or dict) into a :class:`MergeConfig`;
``MergeConfig.tensor_kwargs`` resolves the parameters of one tensor (scalars, gradients over
the layer index, substring filters) into the keyword arguments of
:func:`m3kernels.merge_tensors` / :func:`m3kernels.merge.recipe.make_recipe`. Every problem is a
:class:`MergeConfigError` naming the key and what is supported. docs/CONFIG.md describes the
format, our extensions and the differences from mergekit.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from m3kernels.errors import M3KError
from m3kernels.merge.mixup import MIXUP_SEED_LIMIT, SEED_LIMIT, draw_mix_ratios, normalize_mix_ratios
from m3kernels.merge.recipe import GENERIC_PARAMS, SparsityError, make_recipe, not_taken, resolve_sparsity
from m3kernels.merge.registry import (
    BOOL,
    INT,
    MAX_INT_PARAM,
    MERGE_WIDE,
    MIX_NONE,
    PER_MODEL,
    REQUIRED,
    RESCALE,
    Method,
    all_config_params,
    get_method,
    method_names,
    param_allows_gradient,
    param_kind,
)


class MergeConfigError(M3KError, ValueError):
    """A config problem; the message names the offending key/value and what is supported.

    Part of the package's one error hierarchy (:class:`m3kernels.errors.M3KError`), and a
    ``ValueError`` like every other bad-argument error of the API."""


class ConfigProblems(MergeConfigError):
    """Several blockers of one config, reported at once: ``problems`` holds one message each
    (the method's first, then in the order of the file), the message all of them on one line."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(join_problems(self.problems))


class MultiDocumentConfig(MergeConfigError):
    """A file of several YAML documents (mergekit-multi's format) where one config was expected;
    ``documents``: how many the file holds (at least 2)."""

    def __init__(self, message: str, documents: int):
        super().__init__(message)
        self.documents = documents


log = logging.getLogger("m3kernels")

MAX_PROBLEMS_SHOWN = 15  # a config with more blockers lists these and counts the rest
MAX_MESSAGE_CHARS = 2000  # the joined message stays one line of about this length


def join_problems(messages) -> str:
    """Every blocker on one line: ``N problems: [1] ...; [2] ...`` (each cut evenly when the line
    would pass MAX_MESSAGE_CHARS, so that every one stays named)."""
    msgs = list(messages)
    shown, rest = msgs[:MAX_PROBLEMS_SHOWN], len(msgs) - MAX_PROBLEMS_SHOWN
    head = f"{len(msgs)} problems in this config (fix all of them): "
    tail = f"; and {rest} more" if rest > 0 else ""
    room = (MAX_MESSAGE_CHARS - len(head) - len(tail)) // len(shown) - 6
    parts = [f"[{i}] {m if len(m) <= room else m[: room - 1] + '…'}" for i, m in enumerate(shown, 1)]
    return head + "; ".join(parts) + tail


class Problems:
    """Collects the blockers of a config while it is read, so that one error lists them all.

    ``with problems.catch(): ...`` records the MergeConfigError a step raises and goes on;
    ``problems.add(msg)`` records one directly; ``first=True`` puts it before the others (the
    method). ``raise_if_any`` raises one MergeConfigError for one problem, ConfigProblems for more.
    """

    def __init__(self):
        self._items: list = []

    def add(self, message: str, *, first: bool = False) -> None:
        if all(message != m for _, _, m in self._items):
            self._items.append((0 if first else 1, len(self._items), message))

    @contextmanager
    def catch(self, *, first: bool = False):
        try:
            yield
        except ConfigProblems as exc:
            for m in exc.problems:
                self.add(m, first=first)
        except MergeConfigError as exc:
            self.add(str(exc), first=first)

    def messages(self) -> list:
        return [m for _, _, m in sorted(self._items)]

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        msgs = self.messages()
        if len(msgs) == 1:
            raise MergeConfigError(msgs[0])
        if msgs:
            raise ConfigProblems(msgs)


# ---------------------------------------------------------------------------------------
# Vocabulary: keys, methods, dtypes
# ---------------------------------------------------------------------------------------

SUPPORTED_METHODS = method_names()

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "seed",
    "trim_scope",
    "mixup",
    "name",
    "slices",
    "modules",
    "tokenizer",  # m3kernels.checkpoint.tokenizer
    "chat_template",  # m3kernels.checkpoint.chat_template
)
# mergekit keys that change the output and that we do not implement (a null value is fine);
# 'slices' and 'modules' are read by m3kernels.checkpoint.slices
REJECTED_TOP_LEVEL: dict = {}

# parameter names of all methods, from the registry (m3kernels.merge.registry)
PER_MODEL_PARAMETERS = all_config_params(PER_MODEL)
MERGE_WIDE_PARAMETERS = all_config_params(MERGE_WIDE)
ALL_PARAMETERS = tuple(dict.fromkeys(PER_MODEL_PARAMETERS + MERGE_WIDE_PARAMETERS))
# methods whose mergekit 0.1.5 implementation returns the base when no other model is given
# (generalized task arithmetic, ram, sce): such a config writes the base model
BASE_ONLY_GIVES_BASE = frozenset(
    {
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "ram",
        "ramplus_tl",
        "sce",
    }
)
# a parameter a method does not take is an error, except mergekit's own no-op default for it
NO_OP_WHEN_NOT_TAKEN = {"rescale": False}

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TRIM_SCOPES = ("tensor", "model")
MAX_SEED = SEED_LIMIT  # DARE seed range
MAX_MIXUP_SEED = MIXUP_SEED_LIMIT  # the M³ draw's seed range


def canonical_dtype(value, key: str) -> str | None:
    """'bf16', 'torch.float16', 'FP32', ... -> 'bfloat16' | 'float16' | 'float32' (None stays)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value)
    if isinstance(value, str):
        name = value.strip().lower()
        if name.startswith("torch."):
            name = name[len("torch.") :]
        if name in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[name]
    raise MergeConfigError(
        f"{key}: unsupported dtype {value!r}; use float32, bfloat16 or float16 "
        f"(aliases: {', '.join(sorted(k for k in _DTYPE_ALIASES if k not in _TORCH_DTYPES))})"
    )


# ---------------------------------------------------------------------------------------
# Where a tensor sits in the model: the position t in [0, 1] that gradients are read at
# ---------------------------------------------------------------------------------------

# the leftmost "<container>.<i>." in the name is the decoder layer index
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# name components of the input embeddings (mergekit's "pre" weights); every other tensor outside
# the layers (final norm, lm_head, ...) is a "post" weight; both are read at t = 0 (mergekit >= 0.1.2)
_EMBEDDING_PARTS = frozenset(
    {
        "embed_tokens",
        "embed_in",
        "tok_embeddings",
        "wte",
        "wpe",
        "embeddings",
        "embedding",
        "word_embeddings",
        "word_embeddings_layernorm",
    }
)


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer of a tensor (``model.layers.7.mlp...`` -> 7), None outside the layers."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def tensor_position(tensor_name: str, num_layers: int) -> float:
    """mergekit 0.1.5's t for a tensor: i / (L − 1) in layer i of L (1 when L = 1); 0 for every
    tensor outside the layers, the input embeddings ("pre") and the final norm and lm_head
    ("post") alike (mergekit gives post weights t = 0 since 0.1.2; 0.1.1 and older gave 1)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise MergeConfigError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if idx >= num_layers:
        raise MergeConfigError(
            f"tensor {tensor_name!r} is in layer {idx} but the model has {num_layers} layers"
        )
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------------------------------
# Parameter settings: a scalar, a gradient (list of numbers) or a list of filters
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One parameter as written: ``kind`` is 'scalar', 'gradient' or 'filters'.

    scalar: ``value`` is the value; gradient: a tuple of floats; filters: a tuple of
    (substring or None, Setting) pairs, the first match wins (None and '*' match all).
    """

    kind: str
    value: Any
    key: str  # where it was written, for messages
    discrete: bool = False  # a gradient of non-numbers (bools): picks v_⌊t·K⌋, no interpolation

    def at(self, tensor_name: str, t: float):
        """The value for a tensor at position t (None: no filter matched)."""
        if self.kind == "scalar":
            return self.value
        if self.kind == "gradient":
            if self.discrete:
                last = len(self.value) - 1
                return self.value[min(last, int(t * last))]
            return interpolate_gradient(self.value, t)
        for flt, inner in self.value:
            if flt is None or flt == "*" or flt in tensor_name:
                return inner.at(tensor_name, t)
        return None

    @property
    def is_scalar(self) -> bool:
        return self.kind == "scalar"


def interpolate_gradient(values, t: float) -> float:
    """Piecewise-linear interpolation of ``values`` placed evenly on [0, 1], read at t."""
    last = len(values) - 1
    pos = t * last
    lo = int(pos)
    hi = min(last, lo + 1)
    frac = pos - lo
    return (1.0 - frac) * values[lo] + frac * values[hi]


# the values mergekit 0.1.5 (pydantic's lax bool) reads as a bool; anything else is an error
_LAX_TRUE = frozenset({"true", "yes", "on", "1", "t", "y"})
_LAX_FALSE = frozenset({"false", "no", "off", "0", "f", "n"})


def lax_bool(value) -> bool | None:
    """``value`` as mergekit reads a bool parameter (pydantic's lax mode): true/false, the
    numbers 1/0 (1.0/0.0), and the strings true/false, yes/no, on/off, 1/0, t/f, y/n in any case;
    None for anything else (``normalize: 1.0`` in a published config is true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _LAX_TRUE:
            return True
        if v in _LAX_FALSE:
            return False
    return None


def _leaf(value, kind: str, key: str):
    """Check and normalise one scalar value of a parameter of the given kind."""
    if kind == "path":  # fisher / regmean statistics folder (m3kernels.checkpoint.data_aware_run)
        if isinstance(value, str) and value.strip():
            return value
        raise MergeConfigError(f"{key}: expected a statistics folder path (string), got {_short(value)}")
    if kind == "choice":  # trim_ties: the value is checked against its choices by make_recipe
        if isinstance(value, str):
            return value.strip().lower()
        raise MergeConfigError(f"{key}: expected one of the method's choices (a string), got {value!r}")
    if kind == INT:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT_PARAM:
            raise MergeConfigError(f"{key}: expected an integer in [0, {MAX_INT_PARAM}], got {value!r}")
        return value
    if kind == "bool":
        lax = lax_bool(value)
        if lax is not None:
            return lax
        raise MergeConfigError(
            f"{key}: expected true or false (or 1/0, yes/no, on/off as mergekit reads them), got {_short(value)}"
        )
    if kind == "rescale":
        if isinstance(value, str) and value.strip().lower() in ("l1", "density"):
            return value.strip().lower()
        if lax_bool(value) is not None:
            return lax_bool(value)
        raise MergeConfigError(
            f"{key}: expected true (mergekit's L1 rescale), false, 'l1' or 'density' (× 1/density, "
            f"the DARE paper's), got {_short(value)}"
        )
    # number / fraction
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MergeConfigError(f"{key}: expected a number, got {value!r}")
    try:
        x = float(value)  # strings: PyYAML reads 1e-3 (no dot) as a string
    except ValueError:
        raise MergeConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise MergeConfigError(f"{key}: expected a finite number, got {value!r}")
    if kind == "fraction" and not 0.0 <= x <= 1.0:
        raise MergeConfigError(f"{key}: must be in [0, 1], got {value!r}")
    return x


def _value_setting(raw, kind: str, key: str, gradient: bool) -> Setting:
    """A scalar or a gradient (the 'value' of a filter entry, or a whole parameter)."""
    if isinstance(raw, list):
        if not raw:
            raise MergeConfigError(f"{key}: an empty list is not a valid value")
        if not gradient:
            raise MergeConfigError(
                f"{key}: a gradient (list of values) is not supported for this parameter "
                f"(a scalar or filters only)"
            )
        if any(isinstance(v, (list, dict)) for v in raw):
            raise MergeConfigError(
                f"{key}: a gradient must be a flat list of numbers, got {raw!r} "
                f"(filters can not be nested inside a filter's value)"
            )
        values = tuple(_leaf(v, kind, f"{key}[{j}]") for j, v in enumerate(raw))
        return Setting("gradient", values, key, discrete=kind in (BOOL, RESCALE))
    if isinstance(raw, dict):
        raise MergeConfigError(f"{key}: filters can not be nested inside a filter's value")
    if raw is None:
        raise MergeConfigError(f"{key}: a value is required, got null")
    return Setting("scalar", _leaf(raw, kind, key), key)


def _as_method(method) -> Method:
    return method if isinstance(method, Method) else get_method(method)


def parse_setting(raw, name: str, key: str, method: Method | str) -> Setting:
    """A parameter of ``method`` as written in the YAML -> Setting (validated for that method's
    parameter: the same name may have another kind in another method)."""
    kind, gradient = param_kind(method, name), param_allows_gradient(method, name)
    if isinstance(raw, dict):  # a single filter entry
        raw = [raw]
    if isinstance(raw, list) and raw and any(isinstance(e, dict) for e in raw):
        if not all(isinstance(e, dict) for e in raw):
            raise MergeConfigError(f"{key}: mixes filter entries ({{filter, value}}) and plain values")
        entries = []
        for j, e in enumerate(raw):
            ekey = f"{key}[{j}]"
            extra = set(e) - {"filter", "value"}
            if extra:
                hint = (
                    " ('pattern' is an old name of 'filter'; mergekit 0.1.5 ignores it, so there the "
                    "entry matches every tensor)"
                    if "pattern" in extra
                    else ""
                )
                raise MergeConfigError(
                    f"{ekey}: unknown key(s) {sorted(extra)}; a filter entry has 'filter' "
                    f"(substring of the tensor name, optional) and 'value'{hint}"
                )
            if "value" not in e:
                raise MergeConfigError(f"{ekey}: a filter entry needs a 'value'")
            flt = e.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise MergeConfigError(f"{ekey}.filter: expected a string, got {flt!r}")
            entries.append((flt, _value_setting(e["value"], kind, f"{ekey}.value", gradient)))
        return Setting("filters", tuple(entries), key)
    if raw is None and _as_method(method).param(name).optional:
        return Setting("scalar", None, key)  # an optional parameter (passthrough's scale) left unset
    return _value_setting(raw, kind, key, gradient)


def _mergekit_densities(method: Method, dens: list, drops: list) -> list:
    """The per-model densities with mergekit's default filled in where a model sets none: 1.0
    (no trim, no drop) for every mergekit method that takes density (docs/MERGEKIT_PARITY.md D6,
    D7; the registry's ``config_default``). A DARE model with a drop_rate keeps it (density =
    1 − drop_rate). The tensor API keeps its own defaults (ties 0.2; DARE needs a density), and
    so does ``ties_dare`` (ours) in a config."""
    p = method.param("density")
    if p is None or not p.config:
        return dens
    default = p.default if p.config_default is None else p.config_default
    if default is REQUIRED:
        return dens
    dare_only = method.dare and not method.trim
    return [default if d is None and (not dare_only or q is None) else d for d, q in zip(dens, drops)]


def config_rescale(method: Method, value):
    """A DARE method's ``rescale`` as a config means it, for make_recipe: for mergekit's methods
    (dare_linear, dare_ties) true (and unset: the default) is mergekit 0.1.5's L1
    norm-preserving rescale ('l1', D8), 'density' the DARE paper's × 1/density (the tensor API's
    true), false no rescale; ``ties_dare`` (ours) keeps the API's meaning."""
    p = method.param("rescale")
    if p is None or p.config_default != "l1":  # ties_dare (ours): the API's meaning
        return value
    if value is None:
        value = p.config_default
    return "l1" if value is True else value


def _integral(value, p, tensor_name: str):
    """An INT parameter's value at a tensor (a gradient may interpolate to a non-integer)."""
    if value is None or p.kind != INT or isinstance(value, int):
        return value
    if float(value).is_integer():
        return int(value)
    raise MergeConfigError(
        f"{p.name}: the gradient gives {value!r} at tensor {tensor_name!r}; an integer in "
        f"[0, {MAX_INT_PARAM}] is required"
    )


# ---------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------


@dataclass
class MergeConfig:
    """A validated merge config (see docs/CONFIG.md)."""

    method: str  # the registry's method name (m3kernels.merge.registry)
    base_model: str | None  # path as written
    models: list  # fine-tuned model paths, in order
    dtype: str | None  # 'float32' | 'bfloat16' | 'float16'
    out_dtype: str | None
    tokenizer_source: str | None  # None, 'base', 'union' or a model path (see `tokenizer`)
    seed: int
    trim_scope: str  # 'tensor' | 'model'
    mixup: dict | None  # {'alpha': a, 'seed': s} or {'lambda': l}
    raw: dict  # the config exactly as given
    # parsed parameters: per model (aligned with `models`) and top level
    model_parameters: list = field(default_factory=list, repr=False)
    parameters: dict = field(default_factory=dict, repr=False)
    layer_range: int | None = None  # slices: L of the one [0, L] range (must be every layer)
    slices: Any = None  # a sliced config: m3kernels.checkpoint.slices.SlicedConfig
    tokenizer: Any = None  # tokenizer_source / tokenizer: m3kernels.checkpoint.tokenizer.TokenizerSettings
    chat_template: str | None = None  # as written (a built-in name, 'auto' or a template)

    def _per_model(self, name: str, tensor_name: str, t: float) -> list:
        """A per-model parameter for each model: the model's own setting, else the top
        level's (also when the model's filters match nothing), else None."""
        out = []
        top = self.parameters.get(name)
        # kwargs_at's per-model names (a sliced merge: each source's own layer index)
        names = getattr(self, "_model_names", None) or [tensor_name] * len(self.model_parameters)
        for params, own_name in zip(self.model_parameters, names):
            value = None
            own = params.get(name)
            if own is not None:
                value = own.at(own_name, t)
            if value is None and top is not None:
                value = top.at(own_name, t)
            out.append(value)
        return out

    def _merge_wide(self, name: str, tensor_name: str, t: float):
        s = self.parameters.get(name)
        return None if s is None else s.at(tensor_name, t)

    def tensor_kwargs(self, tensor_name: str, num_layers: int) -> dict:
        """Keyword arguments of ``merge_tensors`` / ``make_recipe`` for this tensor: those of
        weights, density, drop_rate, normalize, rescale, lambda_ the method takes, and its own
        parameters (t, scale, epsilon, ...) where set (no M³ arguments). The six generic keys
        are always there (None, or lambda_ 1.0, where the method does not take them)."""
        if self.layer_range is not None and num_layers != self.layer_range:
            raise MergeConfigError(
                f"slices[0]: layer_range [0, {self.layer_range}] must cover every layer of the model "
                f"({num_layers} layers) to be read as 'models'; merge_checkpoints plans it as slices "
                f"(m3kernels.checkpoint.slices)"
            )
        return self.kwargs_at(tensor_name, tensor_position(tensor_name, num_layers))

    def kwargs_at(self, tensor_name: str, t: float, model_names: list | None = None) -> dict:
        """``tensor_kwargs`` at the gradient position ``t`` (a slice's own: slices.py);
        ``model_names``: the input tensor name of each model, which its per-model filters match
        (mergekit: a source's own layer index), else ``tensor_name``."""
        if self._all_scalar():  # the same for every tensor: resolved once (20,000-tensor plans)
            cached = self.__dict__.get("_scalar_kwargs")
            if cached is None:
                cached = self.__dict__["_scalar_kwargs"] = self._kwargs_at(tensor_name, t)
            return {k: list(v) if isinstance(v, list) else v for k, v in cached.items()}
        self._model_names = model_names
        try:
            return self._kwargs_at(tensor_name, t)
        finally:
            self._model_names = None

    def _all_scalar(self) -> bool:
        """Whether every parameter is a plain value (no gradient, no filters): then
        :meth:`kwargs_at` does not depend on the tensor's name or position."""
        got = self.__dict__.get("_scalar_only")
        if got is None:
            settings = [*self.parameters.values()]
            for params in self.model_parameters:
                settings.extend(params.values())
            got = self.__dict__["_scalar_only"] = all(
                isinstance(v, Setting) and v.is_scalar for v in settings
            )
        return got

    def _kwargs_at(self, tensor_name: str, t: float) -> dict:
        method = get_method(self.method)
        out: dict = dict(
            weights=None, density=None, drop_rate=None, normalize=None, rescale=None, lambda_=1.0
        )
        if method.takes("weight"):
            out["weights"] = [1.0 if w is None else w for w in self._per_model("weight", tensor_name, t)]
        dens = self._per_model("density", tensor_name, t)
        drops = self._per_model("drop_rate", tensor_name, t)
        dens = _mergekit_densities(method, dens, drops)
        try:
            dare_density, trim_density = resolve_sparsity(method, dens, drops)
        except SparsityError as exc:
            who = "" if exc.model is None else f"models[{exc.model}] ({self.models[exc.model]!r}): "
            raise MergeConfigError(f"{who}{exc} for tensor {tensor_name!r}") from None
        density = drop_rate = None
        if method.dare and not method.trim:  # dare_linear, dare_ties: the resolved keep densities
            density = list(dare_density)
        elif method.trim:  # ties, ties_dare, breadcrumbs*: density is the trim density
            if any(d is not None for d in dens):
                density = list(trim_density)
            if method.dare:  # ties_dare: drop_rate is the DARE drop
                drop_rate = drops
        if method.takes("density"):
            out["density"] = density
        if method.takes("drop_rate"):
            out["drop_rate"] = drop_rate
        if method.takes("normalize"):
            out["normalize"] = self._merge_wide("normalize", tensor_name, t)
        if method.takes("rescale"):
            takes = method.dare or method.kind_of("rescale") == "bool"  # della: true = the L1 rescale
            out["rescale"] = self._merge_wide("rescale", tensor_name, t) if takes else None
            if method.dare:  # true (and unset) in a config: mergekit's L1 rescale (D8)
                out["rescale"] = config_rescale(method, out["rescale"])
        if method.takes("lambda"):
            lam = self._merge_wide("lambda", tensor_name, t)
            out["lambda_"] = 1.0 if lam is None else float(lam)
        for p in method.params:  # the method's own parameters
            if p.name in GENERIC_PARAMS or not p.config or not p.api:  # no API keyword: config only
                continue
            if p.scope == PER_MODEL:
                vals = self._per_model(p.name, tensor_name, t)
                if all(v is None for v in vals):
                    continue
                value = [_integral(v, p, tensor_name) for v in vals]
            else:
                value = _integral(self._merge_wide(p.name, tensor_name, t), p, tensor_name)
                if value is None:
                    continue
            out[p.api] = value
        return out

    def out_torch_dtype(self, base_dtype=None) -> torch.dtype:
        """The output dtype: out_dtype, else dtype, else the base model's dtype."""
        name = self.out_dtype or self.dtype
        if name is None:
            if base_dtype is None:
                raise MergeConfigError(
                    "out_dtype: the config sets neither out_dtype nor dtype and no base dtype was given"
                )
            name = canonical_dtype(base_dtype, "base dtype")
        return _TORCH_DTYPES[name]

    def mix_ratios(self) -> tuple | None:
        """The M³ ratios of this merge (one draw, from mixup.seed), None without M³."""
        if self.mixup is None:
            return None
        if self.slices is not None:  # every slice merges the same number of models (slices.py)
            return self.slices.mix_ratios()
        n = get_method(self.method).mix_count(len(self.models))
        if "lambda" in self.mixup:
            return normalize_mix_ratios(self.mixup["lambda"], n)
        return draw_mix_ratios(self.mixup["alpha"], n, self.mixup["seed"])


# ---------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------

# Bounds on what a config may be (docs/CONFIG.md, "Bounded parsing"): a config is a few
# hundred bytes; these leave room for large slice lists while keeping a hostile file cheap.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 32  # nested mappings/sequences
MAX_YAML_NODES = 100_000  # scalars, mappings and sequences in all
MAX_INT_DIGITS = 40  # an integer literal (a 2**64 seed has 20 digits)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with bounds: no aliases (no "billion laughs"), a depth and node limit, short
    integer literals, and no key written twice in one mapping."""

    origin = "config"

    def _fail(self, mark, what: str):
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise MergeConfigError(f"{self.origin}{where}: {what}")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            self._fail(
                ev.start_mark,
                f"YAML aliases (*{ev.anchor}) are not supported in a merge config; write the value out",
            )
        depth = getattr(self, "_m3k_depth", 0) + 1
        nodes = getattr(self, "_m3k_nodes", 0) + 1
        self._m3k_depth, self._m3k_nodes = depth, nodes
        if depth > MAX_YAML_DEPTH:
            self._fail(self.peek_event().start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels")
        if nodes > MAX_YAML_NODES:
            self._fail(self.peek_event().start_mark, f"more than {MAX_YAML_NODES} values")
        try:
            return super().compose_node(parent, index)
        finally:
            self._m3k_depth = depth - 1


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            loader._fail(key_node.start_mark, "a mapping key must be a plain value, not a list or mapping")
        if key in seen:
            raise MergeConfigError(f"{_short(key)}: key written twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


def _construct_int(loader, node):
    digits = sum(ch.isdigit() for ch in str(node.value))
    if digits > MAX_INT_DIGITS:
        loader._fail(node.start_mark, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _parse_yaml(text: str, origin: str) -> Any:
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader checks the characters here
        loader.origin = origin
        return loader.get_single_data()
    except yaml.composer.ComposerError as e:
        if "single document" not in str(e.context):
            raise MergeConfigError(f"{origin}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
        raise _multi_document(text, origin) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(e.problem or e.context or "syntax error").split())
        raise MergeConfigError(f"{origin}{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        what = " ".join(str(e).split())[:200]
        raise MergeConfigError(f"{origin}: not valid YAML (one document expected): {what}") from None
    except RecursionError:
        raise MergeConfigError(f"{origin}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def count_documents(text: str) -> int:
    """How many YAML documents ``text`` holds (its parse events only: no node is built)."""
    try:
        return sum(isinstance(ev, yaml.DocumentStartEvent) for ev in yaml.parse(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return 2  # a later document does not parse; there are at least two


def _multi_document(text: str, origin: str) -> MultiDocumentConfig:
    """The error for a file of several YAML documents: mergekit-multi's format (each document a
    merge with a ``name``, later ones naming earlier outputs as models). A reader of such files
    catches MultiDocumentConfig (its ``documents`` counts them)."""
    n = count_documents(text)
    return MultiDocumentConfig(
        f"{origin}: {n} YAML documents (separated by '---') in one file, the format of "
        f"mergekit-multi (several merges, later ones naming earlier outputs); a merge config here "
        f"is one document: run the file with 'm3kernels merge FILE OUT' "
        f"(m3kernels.checkpoint.multi.merge_documents)",
        n,
    )


def _read_config_file(path: str) -> str:
    """The text of a config file: a regular file, at most MAX_CONFIG_BYTES, UTF-8."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MergeConfigError(f"config file {path!r} can not be read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MergeConfigError(f"config file {path!r} is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise MergeConfigError(
            f"config file {path!r} has {st.st_size:,} bytes; a merge config may have at "
            f"most {MAX_CONFIG_BYTES:,}"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise MergeConfigError(f"config file {path!r} can not be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeConfigError(
            f"config file {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def read_config_source(source) -> dict:
    """A path to a YAML file, YAML text or a dict -> the config as a (fresh) dict."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    elif isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        is_path = isinstance(source, os.PathLike) or (
            "\n" not in s and (os.path.isfile(s) or s.lower().endswith((".yaml", ".yml")))
        )
        if is_path:
            raw = _parse_yaml(_read_config_file(s), s)
        else:
            if len(s) > MAX_CONFIG_BYTES:
                raise MergeConfigError(f"config: {len(s):,} characters of YAML; at most {MAX_CONFIG_BYTES:,}")
            raw = _parse_yaml(s, "config")
            if isinstance(raw, str) and "\n" not in s:
                raise MergeConfigError(
                    f"config: {s!r} is neither an existing file nor YAML text with merge_method, models, ..."
                )
    else:
        raise MergeConfigError(f"config: expected a path, YAML text or a dict, got {type(source).__name__}")
    if not isinstance(raw, dict):
        raise MergeConfigError(
            f"config: expected a mapping of keys (merge_method, models, ...), got {type(raw).__name__}"
        )
    return raw


def _model_path(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergeConfigError(f"{key}: expected a model directory path (string), got {value!r}")
    if "+" in value:  # a LoRA: MODEL+ADAPTER (m3kernels.checkpoint.lora)
        from m3kernels.checkpoint.lora import split_reference

        try:
            split_reference(value)
        except ValueError as exc:
            raise MergeConfigError(f"{key}: {exc}") from None
    if "@" in value:
        raise MergeConfigError(
            f"{key}: {value!r} names a revision ('model@revision'); only local checkpoint "
            f"directories are supported"
        )
    return value


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


# mergekit 0.1.5 accepts these for a method and does nothing with them (task_arithmetic has no
# sparsifier; linear reads neither): accepted with no effect and one warning (docs/CONFIG.md)
IGNORED_LIKE_MERGEKIT = {
    "task_arithmetic": ("density", "rescale"),
    "linear": ("density", "rescale", "lambda"),
    "sce": ("weight",),  # published sce configs set per-model weights; mergekit never reads them
    "model_stock": ("weight",),  # the same for model_stock (its average is unweighted)
    "karcher": ("weight",),  # and karcher (equal weights)
}
# what mergekit does with a parameter we do not implement for that method (the error says so)
# ((method, parameter) -> message; none at present: ties' and breadcrumbs' rescale: true are
# implemented, m3kernels/merge/trim_rescale.py)
NOT_IMPLEMENTED_PARAMS: dict = {}
_IGNORED = object()  # _parse_parameter's result for an accepted parameter without effect
_warned: set = set()


def _warn_ignored(method: Method, name: str, key: str) -> None:
    if (method.name, name) not in _warned:
        _warned.add((method.name, name))
        log.warning(
            "%s: method %r does not use %r; accepted with no effect, as mergekit 0.1.5 does",
            key,
            method.name,
            name,
        )


def _parse_parameter(name, value, key: str, scope: str | None, method: Method):
    """One entry of a ``parameters`` block: its Setting, or _IGNORED (MergeConfigError otherwise)."""
    if name not in ALL_PARAMETERS:
        raise MergeConfigError(
            f"{key}: unknown or unsupported parameter; supported: {', '.join(ALL_PARAMETERS)}"
        )
    if not method.takes(name, in_config=True):
        if name in NO_OP_WHEN_NOT_TAKEN and value is NO_OP_WHEN_NOT_TAKEN[name]:
            return _IGNORED  # e.g. rescale: false, mergekit's default: no effect
        if name in IGNORED_LIKE_MERGEKIT.get(method.name, ()):
            _warn_ignored(method, name, key)
            return _IGNORED
        if (method.name, name) in NOT_IMPLEMENTED_PARAMS:
            raise MergeConfigError(f"{key}: {NOT_IMPLEMENTED_PARAMS[method.name, name]}")
        raise MergeConfigError(f"{key[: -len(name)]}{not_taken(method, name)}")
    if scope == PER_MODEL and method.param(name).scope != PER_MODEL:
        raise MergeConfigError(
            f"{key}: a merge-wide parameter; set it in the top-level 'parameters' "
            f"(mergekit ignores it per model). Per-model parameters: "
            f"{', '.join(method.config_params(PER_MODEL)) or 'none'}"
        )
    return parse_setting(value, name, key, method)


def _parse_parameters(raw, key: str, scope: str | None, method: Method | None, problems: Problems) -> dict:
    """The parameters of one ``parameters`` block (``scope`` PER_MODEL: a model's own block,
    which may hold per-model parameters only; None: the top level, which may hold any): each
    must be one ``method`` takes (except mergekit's no-op defaults), parsed as that method's
    parameter. Every problem goes to ``problems``; ``method`` None (not supported): names only."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add(f"{key}: expected a mapping of parameter names, got {_short(raw)}")
        return {}
    out = {}
    for name, value in raw.items():
        pkey = f"{key}.{name}"
        if method is None:  # the method is reported; unknown names still are
            if name not in ALL_PARAMETERS:
                problems.add(
                    f"{pkey}: unknown or unsupported parameter; supported: {', '.join(ALL_PARAMETERS)}"
                )
            continue
        with problems.catch():
            setting = _parse_parameter(name, value, pkey, scope, method)
            if setting is not _IGNORED:
                out[name] = setting
    return out


def _check_int(value, key: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise MergeConfigError(f"{key}: expected an integer in [0, {upper}), got {value!r}")
    return value


def _parse_mixup(raw, n: int, seed: int, method: Method | None = None) -> dict | None:
    if raw is None:
        return None
    if method is not None:
        if method.mixup == MIX_NONE:
            why = f" ({method.mixup_note})" if method.mixup_note else ""
            raise MergeConfigError(f"mixup: method {method.name!r} does not take M³{why}")
        n = method.mix_count(n)
    if not isinstance(raw, dict):
        raise MergeConfigError(f"mixup: expected a mapping {{alpha, seed}} or {{lambda}}, got {raw!r}")
    extra = set(raw) - {"alpha", "seed", "lambda"}
    if extra:
        raise MergeConfigError(
            f"mixup.{sorted(extra)[0]}: unknown key; mixup takes alpha (with optional seed) or lambda"
        )
    if "alpha" in raw and "lambda" in raw:
        raise MergeConfigError("mixup: give alpha (drawn λ) or lambda (fixed λ), not both")
    if "lambda" in raw:
        if "seed" in raw:
            raise MergeConfigError("mixup.seed: only used with mixup.alpha (a fixed lambda draws nothing)")
        lam = _leaf(raw["lambda"], "fraction", "mixup.lambda")
        if n != 2:
            raise MergeConfigError(
                f"mixup.lambda: a fixed λ needs exactly 2 models, got {n}; "
                f"use mixup.alpha (Dirichlet) for {n} models"
            )
        return {"lambda": lam}
    if "alpha" not in raw:
        raise MergeConfigError("mixup: needs alpha (Beta/Dirichlet concentration) or lambda")
    alpha = _leaf(raw["alpha"], "number", "mixup.alpha")
    if not alpha > 0:
        raise MergeConfigError(f"mixup.alpha: must be > 0, got {raw['alpha']!r}")
    if "seed" in raw:
        mseed = _check_int(raw["seed"], "mixup.seed", MAX_MIXUP_SEED)
    else:
        if seed >= MAX_MIXUP_SEED:
            raise MergeConfigError(f"seed: the M³ draw needs a seed below 2**32, got {seed}; set mixup.seed")
        mseed = seed
    return {"alpha": alpha, "seed": mseed}


def _parse_method(raw) -> str:
    if raw is None:
        raise MergeConfigError(f"merge_method: required; supported: {', '.join(SUPPORTED_METHODS)}")
    if not isinstance(raw, str):
        raise MergeConfigError(f"merge_method: expected a string, got {raw!r}")
    try:
        return get_method(raw, what="").name
    except ValueError as exc:
        raise MergeConfigError(f"merge_method:{exc}") from None


def _any_value(s, value) -> bool:
    """Whether Setting ``s`` (None: unset) can give ``value`` for some tensor."""
    if s is None:
        return False
    if s.kind == "filters":
        return any(_any_value(inner, value) for _, inner in s.value)
    return value in (s.value if s.kind == "gradient" else (s.value,))


def _check_model_trim(cfg: MergeConfig) -> None:
    """trim_scope: model needs a top-k trim and one density per model for every tensor."""
    m = get_method(cfg.method)
    if not m.trim or m.family is not None:  # breadcrumbs' window, della's drop: no top-k threshold
        raise MergeConfigError(
            f"trim_scope: 'model' applies to methods with a magnitude trim "
            f"(ties, ties_dare), not {cfg.method!r}"
        )
    if _any_value(cfg.parameters.get("trim_ties"), "k"):
        raise MergeConfigError(
            "parameters.trim_ties: 'k' with trim_scope 'model' is not implemented (the tie budget "
            "would run over the tensors in order); use trim_ties 'all' or trim_scope 'tensor'"
        )
    for params in cfg.model_parameters:
        s = params.get("density", cfg.parameters.get("density"))
        if s is not None and not s.is_scalar:
            raise MergeConfigError(
                f"{s.key}: trim_scope 'model' needs one density per model (a plain number), "
                f"not a gradient or filters"
            )


# tensors used to dry-run the resolved arguments through make_recipe at load time
_PROBE_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


def _dry_run(cfg: MergeConfig) -> None:
    ratios = cfg.mix_ratios()
    for name in _PROBE_TENSORS:
        kw = cfg.tensor_kwargs(name, cfg.layer_range or 2)
        try:
            make_recipe(
                len(cfg.models),
                method=cfg.method,
                has_base=cfg.base_model is not None,
                seed=cfg.seed,
                mix_ratios=ratios,
                **kw,
            )
        except ValueError as e:
            raise MergeConfigError(f"{e} (checking the parameters of tensor {name!r})") from None


def _check_top_level_keys(raw: dict) -> list:
    """mergekit keys we do not implement (REJECTED_TOP_LEVEL; null is fine). A top-level key
    neither tool knows is ignored by mergekit 0.1.5 (its configuration model drops it), so it
    is ignored here too, with a warning that names the key and the keys it may stand for (a
    top-level ``int8_mask``, ``normalize`` or ``select_topk`` belongs under ``parameters:``; a
    typo such as ``dype``); a key that is not a string is an error."""
    out = []
    for key in raw:
        if key in REJECTED_TOP_LEVEL:
            if raw[key] is not None:
                out.append(f"{key}: {REJECTED_TOP_LEVEL[key]}")
        elif key not in TOP_LEVEL_KEYS:
            if not isinstance(key, str):
                out.append(f"{_short(key)}: unknown key; supported: {', '.join(TOP_LEVEL_KEYS)}")
                continue
            import difflib

            hint = ""
            if key in ALL_PARAMETERS:
                hint = "; as a merge parameter it belongs under 'parameters:'"
            else:
                near = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
            log.warning(
                "%s: unknown top-level key, ignored as mergekit 0.1.5 ignores it%s (supported: %s)",
                key,
                hint,
                ", ".join(TOP_LEVEL_KEYS),
            )
    return out


# Whole-config checks run first, each ``check(raw) -> list of messages`` (one per blocker it finds;
# the parse then goes on and reports its own): every blocker of a config is reported at once.
# A feature that gets supported removes its message from its check (or its entry from here).
CONFIG_CHECKS: list = [_check_top_level_keys]

from m3kernels.checkpoint.data_aware_run import check_statistics_keys  # noqa: E402  (fisher, regmean)

CONFIG_CHECKS.append(check_statistics_keys)


def _parse_tokenizer_source(raw: dict, base, models):
    """(tokenizer_source as given or 'union' for a tokenizer block, TokenizerSettings) or (None, None)."""
    from m3kernels.checkpoint.tokenizer import parse_tokenizer_settings  # builds on this module

    settings = parse_tokenizer_settings(raw, base, ([base] if base is not None else []) + list(models))
    return (None, None) if settings is None else (settings.source, settings)


def _parse_chat_template(value):
    from m3kernels.checkpoint.chat_template import ChatTemplateError, check_chat_template

    try:
        return check_chat_template(value)
    except ChatTemplateError as exc:
        raise MergeConfigError(str(exc)) from None


def _parse_models(entries, base, preset: Method | None, problems: Problems):
    """The ``models`` entries -> (model paths, [(entry index, parsed parameters)]); every problem
    goes to ``problems``. ``preset`` None: the method is not supported (parameters not checked
    against it; the base is kept out of the models as most methods do)."""
    models, per_model, seen = [], [], []
    base_listed = False
    for i, entry in enumerate(entries):
        key = f"models[{i}]"
        if not isinstance(entry, dict):
            problems.add(f"{key}: expected {{model: PATH, parameters: {{...}}}}, got {_short(entry)}")
            continue
        extra = set(entry) - {"model", "parameters"}
        if extra:
            problems.add(
                f"{key}.{sorted(map(str, extra))[0]}: unknown key; a model entry has 'model' and 'parameters'"
            )
        params = _parse_parameters(entry.get("parameters"), f"{key}.parameters", PER_MODEL, preset, problems)
        path = None
        with problems.catch():
            path = _model_path(entry.get("model"), f"{key}.model")
        if path is None:
            continue
        if any(_same_path(path, p) for p in seen):
            problems.add(f"{key}.model: {path!r} is listed twice")
            continue
        seen.append(path)
        if base is not None and _same_path(path, base):
            base_listed = True
            if preset is None or preset.uses_base:  # the base is θ0, not one of the merged models
                continue
        models.append(path)
        per_model.append((i, params))
    return models, per_model, base_listed


def parse_config(raw: dict) -> MergeConfig:
    """Validate a config dict (as read from YAML) into a MergeConfig.

    Every blocker is collected (:class:`Problems`) and reported in one MergeConfigError
    (:class:`ConfigProblems` when there are several), the method's first."""
    if raw.get("slices") is not None or raw.get("modules") is not None:
        from m3kernels.checkpoint.slices import parse_sliced  # builds on this module

        return parse_sliced(raw)  # the whole-model slice is read as models there
    problems = Problems()
    for check in CONFIG_CHECKS:
        for message in check(raw) or ():
            problems.add(message)

    method = preset = None
    with problems.catch(first=True):
        method = _parse_method(raw.get("merge_method"))
        preset = get_method(method)

    base = raw.get("base_model")
    if base is not None:
        with problems.catch():
            base = None
            base = _model_path(raw.get("base_model"), "base_model")
    elif preset is not None and preset.needs_base:
        problems.add(f"base_model: method {method!r} needs a base model")

    layer_range = None  # slices (m3kernels.checkpoint.slices) returned above
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        problems.add("models: expected a non-empty list of {model: PATH, parameters: {...}} entries")
        entries = None
    models, per_model, base_listed = [], [], False
    if entries is not None:
        models, per_model, base_listed = _parse_models(entries, base, preset, problems)
    if preset is not None and base is not None and not preset.uses_base and not base_listed:
        if preset.base_as_model:
            models.append(base)  # mergekit: an unlisted base is one more input, appended last
            per_model.append((len(entries or ()), {}))
        else:
            problems.add(
                f"base_model: method {method!r} does not use a base model; mergekit would add an "
                f"unlisted base_model as one more averaged model. List it under models (with its "
                f"weight) to average it in, or remove base_model"
            )
    base_only = False
    if entries is not None and not models and not problems:
        if preset is not None and preset.name in BASE_ONLY_GIVES_BASE and base is not None:
            base_only = True  # mergekit 0.1.5: the base, unchanged (with its LoRA, if any)
        else:
            problems.add("models: no model to merge besides the base model")

    top = _parse_parameters(raw.get("parameters"), "parameters", None, preset, problems)
    if preset is not None and models:
        try:
            preset.check_model_count(len(models))
        except ValueError as exc:
            problems.add(str(exc))

    dtype = out_dtype = tok = tok_settings = chat = None
    with problems.catch():
        dtype = canonical_dtype(raw.get("dtype"), "dtype")
    with problems.catch():
        out_dtype = canonical_dtype(raw.get("out_dtype"), "out_dtype")
    with problems.catch():
        tok, tok_settings = _parse_tokenizer_source(raw, base, models)
    with problems.catch():
        chat = _parse_chat_template(raw.get("chat_template"))

    seed = 0
    with problems.catch():
        seed = _check_int(raw.get("seed", 0), "seed", MAX_SEED)
    scope = raw.get("trim_scope", "tensor")
    if scope not in TRIM_SCOPES:
        problems.add(f"trim_scope: {_short(scope)} is not supported; use 'tensor' or 'model'")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        problems.add(f"name: expected a string, got {_short(name)}")
    mixup = None
    if preset is not None and models:
        with problems.catch():
            mixup = _parse_mixup(raw.get("mixup"), len(models), seed, preset)
    problems.raise_if_any()
    base_only_note = None
    if base_only:
        base_only_note = (
            f"models: no model besides the base model: the output is the base model ({base}), "
            f"as mergekit 0.1.5's {method} writes it"
        )
        method, models, per_model, top, mixup = "passthrough", [base], [(0, {})], {}, None

    cfg = MergeConfig(
        method=method,
        base_model=base,
        models=models,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tok,
        seed=seed,
        trim_scope=scope,
        mixup=mixup,
        raw=raw,
        model_parameters=[p for _, p in per_model],
        parameters=top,
        layer_range=layer_range,
        tokenizer=tok_settings,
        chat_template=chat,
    )
    if scope == "model":
        _check_model_trim(cfg)
    _dry_run(cfg)
    cfg.base_only_note = base_only_note  # load_config says it (a slice's view refuses it instead)
    return cfg


def load_config(source) -> MergeConfig:
    """Read and validate a merge config: a YAML file path (str or Path), YAML text or a dict."""
    cfg = parse_config(read_config_source(source))
    if getattr(cfg, "base_only_note", None):
        log.warning("%s", cfg.base_only_note)
    return cfg


__all__ = [
    "load_config",
    "parse_config",
    "read_config_source",
    "MergeConfig",
    "MergeConfigError",
    "Setting",
    "parse_setting",
    "interpolate_gradient",
    "tensor_position",
    "layer_index",
    "canonical_dtype",
    "SUPPORTED_METHODS",
]
