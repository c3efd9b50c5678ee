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
import math
import os
import re
import stat
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
)
# mergekit keys that change the output and that we do not implement (a null value is fine);
# 'slices' is read in its trivial form only (one slice, every source over all layers: _slices)
REJECTED_TOP_LEVEL = {
    "modules": "multi-module merges are not supported; list whole models under 'models'",
    "tokenizer": "the tokenizer block (token unions, added tokens) is not supported; "
    "only 'tokenizer_source: base' is",
    "chat_template": "writing a chat template is not supported; the base model's tokenizer "
    "files are copied unchanged",
}

# parameter names of all methods, from the registry (m3kernels.merge.registry)
PER_MODEL_PARAMETERS = all_config_params(PER_MODEL)
MERGE_WIDE_PARAMETERS = all_config_params(MERGE_WIDE)
ALL_PARAMETERS = tuple(dict.fromkeys(PER_MODEL_PARAMETERS + MERGE_WIDE_PARAMETERS))
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


def _leaf(value, kind: str, key: str):
    """Check and normalise one scalar value of a parameter of the given kind."""
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
        if isinstance(value, bool):
            return value
        raise MergeConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "rescale":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() == "l1":
            return "l1"
        raise MergeConfigError(f"{key}: expected true, false or 'l1', got {value!r}")
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
    tokenizer_source: str | None  # None or 'base'
    seed: int
    trim_scope: str  # 'tensor' | 'model'
    mixup: dict | None  # {'alpha': a, 'seed': s} or {'lambda': l}
    raw: dict  # the config exactly as given
    # parsed parameters: per model (aligned with `models`) and top level
    model_parameters: list = field(default_factory=list, repr=False)
    parameters: dict = field(default_factory=dict, repr=False)
    layer_range: int | None = None  # slices: L of the one [0, L] range (must be every layer)

    def _per_model(self, name: str, tensor_name: str, t: float) -> list:
        """A per-model parameter for each model: the model's own setting, else the top
        level's (also when the model's filters match nothing), else None."""
        out = []
        top = self.parameters.get(name)
        for params in self.model_parameters:
            value = None
            own = params.get(name)
            if own is not None:
                value = own.at(tensor_name, t)
            if value is None and top is not None:
                value = top.at(tensor_name, t)
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
                f"({num_layers} layers); only a whole-model slice (the same as 'models') is supported"
            )
        t = tensor_position(tensor_name, num_layers)
        method = get_method(self.method)
        out: dict = dict(
            weights=None, density=None, drop_rate=None, normalize=None, rescale=None, lambda_=1.0
        )
        if method.takes("weight"):
            out["weights"] = [1.0 if w is None else w for w in self._per_model("weight", tensor_name, t)]
        dens = self._per_model("density", tensor_name, t)
        drops = self._per_model("drop_rate", tensor_name, t)
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
        if method.takes("lambda"):
            lam = self._merge_wide("lambda", tensor_name, t)
            out["lambda_"] = 1.0 if lam is None else float(lam)
        for p in method.params:  # the method's own parameters
            if p.name in GENERIC_PARAMS or not p.config:
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


def _parse_parameters(raw, key: str, scope: str | None, method: Method) -> dict:
    """The parameters of one ``parameters`` block (``scope`` PER_MODEL: a model's own block,
    which may hold per-model parameters only; None: the top level, which may hold any): each
    must be one ``method`` takes (except mergekit's no-op defaults), parsed as that method's
    parameter."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{key}: expected a mapping of parameter names, got {raw!r}")
    out = {}
    for name, value in raw.items():
        if name not in ALL_PARAMETERS:
            raise MergeConfigError(
                f"{key}.{name}: unknown or unsupported parameter; supported: {', '.join(ALL_PARAMETERS)}"
            )
        if not method.takes(name, in_config=True):
            if name in NO_OP_WHEN_NOT_TAKEN and value is NO_OP_WHEN_NOT_TAKEN[name]:
                continue  # e.g. rescale: false, mergekit's default: no effect
            raise MergeConfigError(f"{key}.{not_taken(method, name)}")
        if scope == PER_MODEL and method.param(name).scope != PER_MODEL:
            raise MergeConfigError(
                f"{key}.{name}: a merge-wide parameter; set it in the top-level 'parameters' "
                f"(mergekit ignores it per model). Per-model parameters: "
                f"{', '.join(method.config_params(PER_MODEL)) or 'none'}"
            )
        out[name] = parse_setting(value, name, f"{key}.{name}", method)
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


def _check_model_trim(cfg: MergeConfig) -> None:
    """trim_scope: model needs a top-k trim and one density per model for every tensor."""
    m = get_method(cfg.method)
    if not m.trim or m.family is not None:  # breadcrumbs' window, della's drop: no top-k threshold
        raise MergeConfigError(
            f"trim_scope: 'model' applies to methods with a magnitude trim "
            f"(ties, ties_dare), not {cfg.method!r}"
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


def _slices(raw: dict) -> tuple[list, int]:
    """mergekit's ``slices`` in its trivial form, as ``models`` entries: one slice whose sources
    all cover the same layer range [0, L] (checked against the models' layer count when the
    plan is made). Anything else (several slices, partial ranges: frankenmerges) is rejected."""
    sl = raw["slices"]
    if raw.get("models") is not None:
        raise MergeConfigError("slices: give 'models' or 'slices', not both")
    if not isinstance(sl, list) or len(sl) != 1 or not isinstance(sl[0], dict):
        raise MergeConfigError(
            "slices: only one slice covering every layer is supported (the same as 'models'); "
            "layer slicing across models (frankenmerges) is not"
        )
    extra = set(sl[0]) - {"sources"}
    if extra:
        raise MergeConfigError(f"slices[0].{sorted(extra)[0]}: unknown key; a slice has 'sources'")
    sources = sl[0].get("sources")
    if not isinstance(sources, list) or not sources:
        raise MergeConfigError("slices[0].sources: expected a non-empty list of {model, layer_range}")
    entries, ends = [], set()
    for i, src in enumerate(sources):
        key = f"slices[0].sources[{i}]"
        if not isinstance(src, dict):
            raise MergeConfigError(f"{key}: expected {{model, layer_range, parameters}}, got {src!r}")
        extra = set(src) - {"model", "layer_range", "parameters"}
        if extra:
            raise MergeConfigError(
                f"{key}.{sorted(extra)[0]}: unknown key; a source has model, layer_range, parameters"
            )
        lr = src.get("layer_range")
        if (
            not isinstance(lr, list)
            or len(lr) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
            or lr[0] != 0
            or lr[1] < 1
        ):
            raise MergeConfigError(
                f"{key}.layer_range: expected [0, L] (every layer of the model), got {lr!r}; "
                "partial layer ranges (frankenmerges) are not supported"
            )
        ends.add(lr[1])
        entry = {"model": src.get("model")}
        if src.get("parameters") is not None:
            entry["parameters"] = src["parameters"]
        entries.append(entry)
    if len(ends) != 1:
        raise MergeConfigError(
            f"slices[0].sources: every source must cover the same layers [0, L], got {sorted(ends)}"
        )
    return entries, ends.pop()


def parse_config(raw: dict) -> MergeConfig:
    """Validate a config dict (as read from YAML) into a MergeConfig."""
    for key in raw:
        if key in REJECTED_TOP_LEVEL:
            if raw[key] is not None:
                raise MergeConfigError(f"{key}: {REJECTED_TOP_LEVEL[key]}")
        elif key not in TOP_LEVEL_KEYS:
            raise MergeConfigError(f"{key}: unknown key; supported: {', '.join(TOP_LEVEL_KEYS)}")

    method = _parse_method(raw.get("merge_method"))
    preset = get_method(method)

    base = raw.get("base_model")
    if base is not None:
        base = _model_path(base, "base_model")
    if preset.needs_base and base is None:
        raise MergeConfigError(f"base_model: method {method!r} needs a base model")

    layer_range = None
    if raw.get("slices") is not None:
        entries, layer_range = _slices(raw)
    else:
        entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeConfigError(
            "models: expected a non-empty list of {model: PATH, parameters: {...}} entries"
        )
    models, per_model, seen = [], [], []
    base_listed = False
    for i, entry in enumerate(entries):
        key = f"models[{i}]"
        if not isinstance(entry, dict):
            raise MergeConfigError(f"{key}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise MergeConfigError(
                f"{key}.{sorted(extra)[0]}: unknown key; a model entry has 'model' and 'parameters'"
            )
        path = _model_path(entry.get("model"), f"{key}.model")
        params = _parse_parameters(entry.get("parameters"), f"{key}.parameters", PER_MODEL, preset)
        if any(_same_path(path, p) for p in seen):
            raise MergeConfigError(f"{key}.model: {path!r} is listed twice")
        seen.append(path)
        if base is not None and _same_path(path, base):
            base_listed = True
            if preset.uses_base:  # the base is θ0, not one of the merged models
                continue
        models.append(path)
        per_model.append((i, params))
    if base is not None and not preset.uses_base and not base_listed and preset.base_as_model:
        models.append(base)  # mergekit: an unlisted base is one more input, appended last
        per_model.append((len(entries), {}))
    elif base is not None and not preset.uses_base and not base_listed:
        raise MergeConfigError(
            f"base_model: method {method!r} does not use a base model; mergekit would add an "
            f"unlisted base_model as one more averaged model. List it under models (with its "
            f"weight) to average it in, or remove base_model"
        )
    if not models:
        raise MergeConfigError("models: no model to merge besides the base model")

    top = _parse_parameters(raw.get("parameters"), "parameters", None, preset)
    try:
        preset.check_model_count(len(models))
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None

    dtype = canonical_dtype(raw.get("dtype"), "dtype")
    out_dtype = canonical_dtype(raw.get("out_dtype"), "out_dtype")

    tok = raw.get("tokenizer_source")
    if tok is not None:
        if tok != "base":
            raise MergeConfigError(
                f"tokenizer_source: {tok!r} is not supported; only 'base' "
                f"(copy the base model's tokenizer) or leaving it out"
            )
        if base is None:
            raise MergeConfigError("tokenizer_source: 'base' needs a base_model")

    seed = _check_int(raw.get("seed", 0), "seed", MAX_SEED)
    scope = raw.get("trim_scope", "tensor")
    if scope not in TRIM_SCOPES:
        raise MergeConfigError(f"trim_scope: {scope!r} is not supported; use 'tensor' or 'model'")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise MergeConfigError(f"name: expected a string, got {name!r}")

    cfg = MergeConfig(
        method=method,
        base_model=base,
        models=models,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tok,
        seed=seed,
        trim_scope=scope,
        mixup=_parse_mixup(raw.get("mixup"), len(models), seed, preset),
        raw=raw,
        model_parameters=[p for _, p in per_model],
        parameters=top,
        layer_range=layer_range,
    )
    if scope == "model":
        _check_model_trim(cfg)
    _dry_run(cfg)
    return cfg


def load_config(source) -> MergeConfig:
    """Read and validate a merge config: a YAML file path (str or Path), YAML text or a dict."""
    return parse_config(read_config_source(source))


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
