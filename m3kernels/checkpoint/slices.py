"""mergekit's ``slices:`` (and ``modules:``): output layers built from layer ranges of the inputs.

A sliced config lists output slices; each slice takes the same number of consecutive layers
from each of its sources (``{model, layer_range: [a, b], parameters}``) and merges them layer
by layer with the config's one ``merge_method``, under the slice's ``base_model`` (else the
top-level one) and ``parameters`` (between the sources' and the top level's). The output
layers are the slices' layers in order, renumbered from 0, so ``passthrough`` slices that
repeat or reorder layers make a frankenmerge. As mergekit 0.1.5's planner (``plan.py``):

* a gradient is read at t = k / (n − 1) for the k-th layer of an n-layer slice (t = 1 when
  n = 1), not at the layer's place in the output or in its source model;
* the tensors before the layers (embeddings, mergekit's "pre" weights) are merged from the
  first slice's sources with its base and parameters, those after them (final norm,
  ``lm_head``: "post") from the last slice's sources — only as many of them as the first slice
  has, as mergekit pairs them — with the last slice's base and parameters, both at t = 0;
* per-model parameters (``weight``, ``density``, ...) see the source's own tensor name (its
  own layer index) in filters, merge-wide ones the output name;
* a ``base_model`` that is not among a slice's sources is an error for the methods that merge
  against the base and is ignored by the others (``linear``, ``karcher``, ``passthrough``).

Each slice is checked as a ``models:`` config of its own (its *view*: the same method, its
sources as models, the parameters chained source > slice > module > top level), so every
parameter rule of :mod:`m3kernels.checkpoint.config` applies. The plan
(:func:`build_sliced_plan`) is an ordinary :class:`~m3kernels.checkpoint.plan.MergePlan`
whose tensors read differently named (renumbered) input tensors, so the streaming, journal,
resume and distributed machinery run it unchanged; config.json's layer count is rewritten.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from m3kernels.checkpoint.config import (
    _EMBEDDING_PARTS,
    _LAYER_RE,
    CONFIG_CHECKS,
    TOP_LEVEL_KEYS,
    ConfigProblems,
    MergeConfig,
    MergeConfigError,
    Problems,
    _parse_chat_template,
    _parse_method,
    _parse_parameters,
    _parse_tokenizer_source,
    _same_path,
    parse_config,
)
from m3kernels.errors import TensorMismatchError
from m3kernels.merge.registry import get_method

SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
# mergekit's name of the one module of a single-module architecture (architecture/json_definitions.py)
DEFAULT_MODULE = "default"
# top-level keys that describe the inputs (handled here), not settings every slice shares
_INPUT_KEYS = ("slices", "modules", "models", "base_model", "parameters")
_TOKENIZER_KEYS = ("tokenizer_source", "tokenizer", "chat_template")


@dataclass
class SliceSource:
    """One source of a slice: the layers [start, end) of ``model``."""

    model: str
    start: int
    end: int
    key: str  # 'slices[i].sources[j]', for messages


@dataclass
class SliceSpec:
    """One output slice, with the models: config it is merged as (``view``)."""

    index: int
    sources: list  # SliceSource
    base: str | None  # the base the view merges against (None: none, or ignored)
    view: MergeConfig
    base_source: int | None  # index into sources of the view's base (None: no base tensor read)
    model_sources: list  # index into sources of each of view.models, in order

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class SlicedConfig:
    """A parsed ``slices:`` config: the slices, and the views of the pre and post weights."""

    slices: list  # SliceSpec
    post: SliceSpec  # the last slice's view over as many sources as the first slice has

    @property
    def num_layers(self) -> int:
        return sum(s.length for s in self.slices)

    def mix_ratios(self):
        return self.slices[0].view.mix_ratios()


# ---------------------------------------------------------------------------------------
# Parameters: precedence chains written as one parameters block
# ---------------------------------------------------------------------------------------


def _is_filters(value) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and any(isinstance(e, dict) for e in value)
    )


def _as_filters(value) -> list:
    if isinstance(value, dict):
        return [value]
    if _is_filters(value):
        return list(value)
    return [{"value": value}]


def chain_parameters(high, low):
    """One ``parameters`` block meaning "``high``, else ``low``", as mergekit resolves its
    settings (``parameter_resolver.py``: the first scope whose value is not None wins): a
    scalar or gradient in ``high`` hides ``low``; filters in ``high`` are followed by ``low``'s
    (its filters, or its value as a catch-all entry), so a tensor no filter of ``high`` matches
    gets ``low``'s value; null in ``high`` means unset."""
    if not isinstance(high, dict) or not high:
        return low
    if not isinstance(low, dict) or not low:
        return {k: v for k, v in high.items() if v is not None} or None
    out = dict(low)
    for name, value in high.items():
        below = low.get(name)
        if value is None:
            continue
        if _is_filters(value) and below is not None:
            out[name] = _as_filters(value) + _as_filters(below)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------
# Reading the config
# ---------------------------------------------------------------------------------------


def _layer_range(raw, key: str) -> tuple[int, int]:
    if (
        not isinstance(raw, (list, tuple))
        or len(raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        raise MergeConfigError(f"{key}.layer_range: expected [first, end] (two integers), got {raw!r}")
    a, b = raw
    if a < 0 or b < 0:
        raise MergeConfigError(f"{key}.layer_range: {list(raw)!r} is negative; layers count from 0")
    if b <= a:
        raise MergeConfigError(
            f"{key}.layer_range: {list(raw)!r} is empty; [a, b] takes layers a .. b-1, so b must exceed a"
        )
    return a, b


def _path(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MergeConfigError(f"{key}: expected a model directory path (string), got {value!r}")
    return value


def _params(raw, key: str, preset) -> dict:
    """A parameters block parsed for ``preset`` (every problem in one MergeConfigError)."""
    problems = Problems()
    out = _parse_parameters(raw, key, None, preset, problems)
    problems.raise_if_any()
    return out


def _with_key(exc: MergeConfigError, prefix: str, sources_key: str, whole: bool = False) -> MergeConfigError:
    """A view's error, named as the slice: 'models[j]' of the view is source j of the slice.
    ``whole``: the whole-model slice read as the config itself, whose other messages are about
    the top level (only the 'models' ones are the slice's)."""
    msgs = exc.problems if isinstance(exc, ConfigProblems) else [str(exc)]
    msgs = [m.replace("models[", f"{sources_key}[") for m in msgs]
    if whole:
        msgs = [f"{sources_key}{m[len('models') :]}" if m.startswith("models:") else m for m in msgs]
    else:
        msgs = [m if m.startswith(prefix) else f"{prefix}: {m}" for m in msgs]
    return ConfigProblems(msgs) if len(msgs) > 1 else MergeConfigError(msgs[0])


def _unwrap_modules(raw: dict) -> dict:
    """``modules: {default: {slices | models, parameters}}`` as the top-level form (the module's
    parameters between its slices' and the top level's)."""
    mods = raw["modules"]
    for other in ("slices", "models"):
        if raw.get(other) is not None:
            raise MergeConfigError(
                f"modules: give one of 'models', 'slices' or 'modules', not '{other}' as well"
            )
    if not isinstance(mods, dict) or len(mods) != 1 or DEFAULT_MODULE not in mods:
        names = sorted(map(str, mods)) if isinstance(mods, dict) else mods
        raise MergeConfigError(
            f"modules: only mergekit's single module {DEFAULT_MODULE!r} is supported (the one module of "
            f"a text model: Llama, Mistral, Qwen, ...), got {names!r}; multi-module models "
            f"(vision towers, encoder-decoders) are not"
        )
    mod = mods[DEFAULT_MODULE]
    key = f"modules.{DEFAULT_MODULE}"
    if not isinstance(mod, dict):
        raise MergeConfigError(f"{key}: expected a mapping with 'slices' or 'models', got {mod!r}")
    extra = set(mod) - set(MODULE_KEYS)
    if extra:
        raise MergeConfigError(
            f"{key}.{sorted(extra)[0]}: unknown key; a module has {', '.join(MODULE_KEYS)}"
        )
    if (mod.get("slices") is None) == (mod.get("models") is None):
        raise MergeConfigError(f"{key}: give exactly one of 'slices' or 'models'")
    if mod.get("parameters") is not None:
        _params(mod["parameters"], f"{key}.parameters", get_method(_parse_method(raw.get("merge_method"))))
    out = {k: v for k, v in raw.items() if k != "modules"}
    params = chain_parameters(mod.get("parameters"), raw.get("parameters"))
    if params is not None:
        out["parameters"] = params
    if mod.get("slices") is not None:
        out["slices"] = mod["slices"]
    else:
        out["models"] = mod["models"]
    return out


def _read_slice(i: int, sl, raw: dict, preset, top_base: str | None, shared: dict) -> SliceSpec:
    key = f"slices[{i}]"
    if not isinstance(sl, dict):
        raise MergeConfigError(f"{key}: expected {{sources: [...], base_model, parameters}}, got {sl!r}")
    for k in sl:
        if k == "merge_method":
            raise MergeConfigError(
                f"{key}.merge_method: mergekit 0.1.5 has one merge_method per config (it ignores this "
                f"key in a slice); split the merge into several configs (or documents) instead"
            )
        if k not in SLICE_KEYS:
            raise MergeConfigError(f"{key}.{k}: unknown key; a slice has {', '.join(SLICE_KEYS)}")
    rw = sl.get("residual_weight")
    if rw is not None and (isinstance(rw, bool) or not isinstance(rw, (int, float))):
        raise MergeConfigError(f"{key}.residual_weight: expected a number, got {rw!r}")
    raw_sources = sl.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise MergeConfigError(f"{key}.sources: expected a non-empty list of {{model, layer_range}}")
    sources = []
    for j, src in enumerate(raw_sources):
        skey = f"{key}.sources[{j}]"
        if not isinstance(src, dict):
            raise MergeConfigError(f"{skey}: expected {{model, layer_range, parameters}}, got {src!r}")
        extra = set(src) - set(SOURCE_KEYS)
        if extra:
            raise MergeConfigError(
                f"{skey}.{sorted(extra)[0]}: unknown key; a source has {', '.join(SOURCE_KEYS)}"
            )
        path = _path(src.get("model"), f"{skey}.model")
        a, b = _layer_range(src.get("layer_range"), skey)
        if any(_same_path(path, s.model) for s in sources):
            raise MergeConfigError(f"{skey}.model: {path!r} is a source of this slice twice")
        sources.append(SliceSource(path, a, b, skey))
    lengths = [s.end - s.start for s in sources]
    if len(set(lengths)) > 1:
        raise MergeConfigError(
            f"{key}.sources: every source of a slice must take the same number of layers, got "
            + ", ".join(f"{s.model!r} [{s.start}, {s.end}] ({n})" for s, n in zip(sources, lengths))
        )
    if sl.get("parameters") is not None:  # checked alone first, so that errors name the slice's key
        _params(sl["parameters"], f"{key}.parameters", preset)
    base = sl.get("base_model")
    base = top_base if base is None else _path(base, f"{key}.base_model")
    base_at = next((j for j, s in enumerate(sources) if base is not None and _same_path(s.model, base)), None)
    if base is not None and base_at is None:
        if preset.uses_base:
            raise MergeConfigError(
                f"{key}: the base model {base!r} is not among the slice's sources; method "
                f"{preset.name!r} merges against it, so list it as a source with the same layer "
                f"count (mergekit 0.1.5: 'Base input is not present in merge inputs')"
            )
        base = None  # linear, karcher, passthrough: mergekit ignores a base that is not an input
    view_raw = {k: v for k, v in shared.items() if k not in _TOKENIZER_KEYS}  # the merge's, not a slice's
    view_raw["models"] = [
        {
            "model": s.model,
            **({"parameters": p} if (p := raw_sources[j].get("parameters")) is not None else {}),
        }
        for j, s in enumerate(sources)
    ]
    if base is not None:
        view_raw["base_model"] = base
    params = chain_parameters(sl.get("parameters"), raw.get("parameters"))
    if params is not None:
        view_raw["parameters"] = params
    try:
        view = parse_config(view_raw)
    except MergeConfigError as exc:
        raise _with_key(exc, key, f"{key}.sources") from None
    if view.method != preset.name:  # parse_config's "only the base: write the base" (flat configs only)
        raise MergeConfigError(f"{key}.sources: no model to merge besides the base model")
    base_source = base_at if (base_at is not None and preset.uses_base) else None
    model_sources = [j for j in range(len(sources)) if j != base_source]
    if len(model_sources) != len(view.models):  # parse_config's base rules, replayed: a bug
        raise AssertionError(f"{key}: {len(view.models)} models for {len(model_sources)} sources")
    return SliceSpec(i, sources, base, view, base_source, model_sources)


def parse_sliced(raw: dict, force: bool = False) -> MergeConfig:
    """A config with ``slices`` or ``modules`` as a :class:`MergeConfig` whose ``slices`` holds
    the :class:`SlicedConfig`; the trivial form (one slice, every source over [0, L], no
    slice-level keys, the base among the sources) unless ``force``: as ``models`` (``slices``
    None, ``layer_range`` L: the plan checks that L is every layer, else plans it as slices)."""
    if raw.get("modules") is not None:
        return parse_config(_unwrap_modules(raw))
    if raw.get("models") is not None:
        raise MergeConfigError("slices: give 'models' or 'slices', not both")
    sl = raw["slices"]
    if not isinstance(sl, list) or not sl:
        raise MergeConfigError("slices: expected a non-empty list of {sources: [...]} slices")
    preset = get_method(_parse_method(raw.get("merge_method")))
    top_base = raw.get("base_model")
    if top_base is not None:
        top_base = _path(top_base, "base_model")
    if not force and _trivial(sl, top_base, preset):
        return _whole_model(raw, sl[0]["sources"])
    # settings every slice shares (unknown top-level keys are reported once, here)
    shared = {k: v for k, v in raw.items() if k not in _INPUT_KEYS and k in TOP_LEVEL_KEYS}
    problems = Problems()
    for check in CONFIG_CHECKS:
        for message in check(raw) or ():
            problems.add(message)
    if raw.get("trim_scope", "tensor") == "model":
        problems.add(
            "trim_scope: 'model' (one trim threshold per model over all its tensors) does not apply "
            "to slices, whose layers come from different models; use 'tensor'"
        )
    top_params = None
    with problems.catch():  # once here: every slice's view holds them too
        top_params = _params(raw.get("parameters"), "parameters", preset)
    specs = []
    for i, s in enumerate(sl):
        if top_params is None:  # their problems would be named again by each slice
            break
        with problems.catch():
            specs.append(_read_slice(i, s, raw, preset, top_base, shared))
    problems.raise_if_any()
    if raw.get("mixup") is not None and len({len(s.view.models) for s in specs}) > 1:
        raise MergeConfigError(
            "mixup: the slices merge different numbers of models; M³ draws one ratio per model"
        )
    first, last = specs[0], specs[-1]
    post = last
    if len(last.sources) > len(first.sources):
        # mergekit pairs the post weights of the last slice's sources with the first slice's count
        trimmed = dict(sl[-1])
        trimmed["sources"] = list(sl[-1]["sources"])[: len(first.sources)]
        post = _read_slice(len(sl) - 1, trimmed, raw, preset, top_base, shared)
    paths: list = []
    for s in specs:
        for p in [src.model for src in s.sources] + ([s.base] if s.base is not None else []):
            if not (top_base is not None and _same_path(p, top_base)) and not any(
                _same_path(p, q) for q in paths
            ):
                paths.append(p)
    # the tokenizer is the whole merge's (mergekit: over every referenced model, with the top-level base)
    tok, settings, chat = None, None, None
    with problems.catch():
        tok, settings = _parse_tokenizer_source(raw, top_base, paths)
    with problems.catch():
        chat = _parse_chat_template(raw.get("chat_template"))
    problems.raise_if_any()
    return dataclasses.replace(
        first.view,
        tokenizer_source=tok,
        tokenizer=settings,
        chat_template=chat,
        base_model=top_base,
        models=paths,
        model_parameters=[{} for _ in paths],
        parameters=top_params,
        raw=raw,
        layer_range=None,
        slices=SlicedConfig(specs, post),
    )


def _trivial(sl: list, top_base: str | None, preset) -> bool:
    """One slice of well-formed sources only, all over the same [0, L], with the base (if any)
    among them (anything else goes the slices way, which names every problem). A method that
    merges against the base may leave it out of the sources here, as under ``models`` (mergekit
    0.1.5 refuses that; a method that ignores the base ignores it there, so that goes the slices
    way)."""
    if len(sl) != 1 or not isinstance(sl[0], dict) or set(sl[0]) != {"sources"}:
        return False
    sources = sl[0]["sources"]
    if not isinstance(sources, list) or not sources:
        return False
    ranges = set()
    for s in sources:
        if not isinstance(s, dict) or set(s) - set(SOURCE_KEYS) or not isinstance(s.get("model"), str):
            return False
        lr = s.get("layer_range")
        if not isinstance(lr, list) or len(lr) != 2 or not all(type(v) is int for v in lr):
            return False
        ranges.add(tuple(lr))
    if len(ranges) != 1 or next(iter(ranges))[0] != 0 or next(iter(ranges))[1] < 1:
        return False
    return top_base is None or preset.uses_base or any(_same_path(s["model"], top_base) for s in sources)


def _whole_model(raw: dict, sources: list) -> MergeConfig:
    """The trivial slice read as ``models`` (mergekit's own rewrite of ``models`` into one
    slice over every layer, backwards), remembering L."""
    entries = [{k: v for k, v in s.items() if k != "layer_range"} for s in sources]
    try:
        cfg = parse_config({**{k: v for k, v in raw.items() if k != "slices"}, "models": entries})
    except MergeConfigError as exc:
        err = _with_key(exc, "slices[0]", "slices[0].sources", whole=True)
        base = raw.get("base_model")
        if isinstance(base, str) and not any(_same_path(s["model"], base) for s in sources):
            hint = (
                f"; the base model {base!r} is not among slices[0]'s sources (mergekit 0.1.5 refuses "
                f"this config: 'Base input is not present in merge inputs'): add it as a source over "
                f"the same layers"
            )
            msgs = err.problems if isinstance(err, ConfigProblems) else [str(err)]
            err = MergeConfigError(msgs[0] + hint) if len(msgs) == 1 else ConfigProblems(msgs + [hint[2:]])
        raise err from None
    return dataclasses.replace(cfg, raw=raw, layer_range=sources[0]["layer_range"][1])


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


def _split(name: str):
    """(prefix, layer, suffix) of a layer tensor's name; None outside the layers."""
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    return name[: m.start(1)], int(m.group(1)), name[m.end(1) :]


def is_pre_weight(name: str) -> bool:
    """A tensor before the layers (mergekit's "pre" weights: the input embeddings)."""
    return _split(name) is None and any(part in _EMBEDDING_PARTS for part in name.split("."))


def is_post_weight(name: str) -> bool:
    """A tensor after the layers (final norm, ``lm_head``, ...): every other tensor outside them."""
    return _split(name) is None and not is_pre_weight(name)


class _LayerIndex:
    """The tensor names of each layer of one checkpoint: layer -> [(prefix, suffix, name)]."""

    def __init__(self, ckpt):
        self.layers: dict = {}
        for n in ckpt.names:
            parts = _split(n)
            if parts is not None:
                self.layers.setdefault(parts[1], []).append((parts[0], parts[2], n))

    def names(self, layer: int) -> dict:
        return {(p, s): n for p, s, n in self.layers.get(layer, [])}


def build_sliced_plan(cfg: MergeConfig, base, models: list, out_shard_size: int):
    """The :class:`~m3kernels.checkpoint.plan.MergePlan` of a sliced config (see the module
    docstring); ``base``/``models``: the opened checkpoints of ``cfg.base_model``/``cfg.models``."""
    from m3kernels.checkpoint import plan as P

    sliced = cfg.slices
    if sliced is None:  # the trivial form, over fewer layers than the models have
        sliced = parse_sliced(cfg.raw, force=True).slices
    opened = list(zip(cfg.models, models))
    if base is not None:
        opened.insert(0, (cfg.base_model, base))

    def ckpt_of(path: str):
        for p, ck in opened:
            if _same_path(p, path):
                return ck
        for p, ck in opened:  # the same folder written two ways (a LoRA input only by its own name)
            if "+" not in p and "+" not in path and os.path.realpath(ck.path) == os.path.realpath(path):
                return ck
        raise AssertionError(f"model {path!r} was not opened")  # parse_sliced lists every one

    counts: dict = {}
    for spec in sliced.slices:
        for src in spec.sources:
            ck = ckpt_of(src.model)
            n = counts.setdefault(id(ck), P.count_layers(ck))
            if src.end > n:
                raise MergeConfigError(
                    f"{src.key}.layer_range: [{src.start}, {src.end}] goes past the last layer of "
                    f"{src.model!r} ({ck.path}: {n} layers, 0 .. {n - 1})"
                )
    indexes: dict = {}

    def index_of(ck) -> _LayerIndex:
        if id(ck) not in indexes:
            indexes[id(ck)] = _LayerIndex(ck)
        return indexes[id(ck)]

    def side(spec: SliceSpec, keep, tokenizer):
        v = spec.view
        vb = ckpt_of(v.base_model) if v.base_model is not None else None
        return P.build_plan(
            v, vb, [ckpt_of(m) for m in v.models], out_shard_size, only=keep, tokenizer=tokenizer
        )

    from m3kernels.checkpoint.tokenizer import tokenizer_for

    tok_out, tok_notes = tokenizer_for(cfg, base, list(models))  # one vocabulary for the merge
    pre = side(sliced.slices[0], is_pre_weight, (tok_out, []))
    post = side(sliced.post, is_post_weight, (tok_out, []))
    recipes: dict = {}
    ratios = cfg.mix_ratios()
    preset = get_method(cfg.method)
    layers, out_layer, notes = [], 0, []
    for spec in sliced.slices:
        cks = [ckpt_of(s.model) for s in spec.sources]
        v = spec.view
        for k in range(spec.length):
            t = k / (spec.length - 1) if spec.length > 1 else 1.0
            maps = [index_of(ck).names(s.start + k) for ck, s in zip(cks, spec.sources)]
            for j, (src, ck, mp) in enumerate(zip(spec.sources, cks, maps)):
                if not mp:
                    raise TensorMismatchError(
                        f"{src.key}: {src.model!r} has no tensors of layer {src.start + k}",
                        path=str(ck.path),
                    )
                if j and set(mp) != set(maps[0]):
                    odd = sorted(set(mp) ^ set(maps[0]))[0]
                    where = src if odd in mp else spec.sources[0]
                    other = spec.sources[0] if odd in mp else src
                    name = odd[0] + str(where.start + k) + odd[1]
                    raise TensorMismatchError(
                        f"tensor {name!r} of {where.model!r} ({where.key}) has no counterpart in layer "
                        f"{other.start + k} of {other.model!r} ({other.key})",
                        tensor=name,
                        path=str(ckpt_of(other.model).path),
                    )
            for ps in maps[0]:
                out_name = ps[0] + str(out_layer) + ps[1]
                found = [P.Source(ck, mp[ps], ck.meta(mp[ps])) for ck, mp in zip(cks, maps)]
                layers.append(_layer_tensor(cfg, v, spec, out_name, found, t, ratios, preset, recipes, notes))
            out_layer += 1

    planned = pre.tensors + layers + post.tensors
    shards = P.assign_shards(planned, out_shard_size)
    order = [t for s in shards for t in s.tensors]
    for i, t in enumerate(order):
        t.index = i
    float_bytes: dict = {}
    for t in order:
        if t.action != P.COPY:
            float_bytes[t.out_dtype] = float_bytes.get(t.out_dtype, 0) + t.nbytes
    out_dtype = max(float_bytes, key=float_bytes.get) if float_bytes else torch.float32
    plan = P.MergePlan(
        cfg,
        base,
        list(models),
        order,
        shards,
        out_layer,
        ratios,
        cfg.seed,
        out_dtype,
        pre.out_vocab_rows if pre.out_vocab_rows is not None else post.out_vocab_rows,
        post.untied_head,
        list(tok_notes) + pre.notes + notes + post.notes,
        tokenizer=tok_out,
    )
    plan.tokenizer = pre.tokenizer  # a merged tokenizer / chat template (tokenizer.py), as build_plan sets it
    plan.layout = _layout(sliced)
    plan.out_num_layers = out_layer  # config.json's layer count (plan.config_source: the base, else
    # cfg.models[0], the first source of the first slice)
    return plan


def _layout(sliced: SlicedConfig) -> list:
    """One summary line per slice: its output layers, its sources' ranges and its base."""
    lines, first = [], 0
    for spec in sliced.slices:
        last = first + spec.length - 1
        srcs = ", ".join(f"{s.model} [{s.start}, {s.end})" for s in spec.sources)
        base = f"; base {spec.base}" if spec.base is not None else ""
        lines.append(f"slice {spec.index + 1}: layers {first}-{last} <- {srcs}{base}")
        first = last + 1
    return lines


def _layer_tensor(cfg, view, spec: SliceSpec, out_name: str, found: list, t, ratios, preset, recipes, notes):
    from m3kernels.checkpoint import plan as P

    src0 = found[0]
    if not src0.meta.dtype.is_floating_point or src0.meta.dtype not in P.MERGEABLE:
        if len({s.meta.shape for s in found}) > 1:
            raise TensorMismatchError(
                f"tensor {out_name!r} has different shapes: " + "; ".join(s.describe() for s in found),
                tensor=out_name,
                path=str(src0.ckpt.path),
            )
        keep = found[spec.base_source] if spec.base_source is not None else src0
        if keep.meta.dtype.is_floating_point:
            notes.append(
                f"{out_name}: dtype {keep.meta.dtype} cannot be merged; copied from {keep.ckpt.label}"
            )
        return P.PlannedTensor(out_name, P.COPY, keep.meta.shape, keep.meta.dtype, None, [keep])
    for s in found:
        if s.meta.dtype not in P.MERGEABLE or s.meta.shape != src0.meta.shape:
            raise TensorMismatchError(
                f"tensor {out_name!r} has different shapes or dtypes: "
                + "; ".join(x.describe() for x in found),
                tensor=out_name,
                path=str(s.ckpt.path),
            )
    model_srcs = [found[j] for j in spec.model_sources]
    base_src = found[spec.base_source] if spec.base_source is not None else None
    try:
        out_dtype = cfg.out_torch_dtype((base_src or src0).meta.dtype)
        kwargs = view.kwargs_at(out_name, t, model_names=[s.name for s in model_srcs])
    except MergeConfigError as exc:
        raise MergeConfigError(f"slices[{spec.index}]: tensor {out_name!r}: {exc}") from None
    use_base = base_src if preset.uses_base else None
    recipe = P._recipe(
        view, out_name, kwargs, len(model_srcs), use_base is not None, ratios, cfg.seed, recipes
    )
    return P.PlannedTensor(
        out_name, P.MERGE, tuple(src0.meta.shape), out_dtype, use_base, model_srcs, kwargs, recipe
    )


__all__ = [
    "SliceSource",
    "SliceSpec",
    "SlicedConfig",
    "parse_sliced",
    "build_sliced_plan",
    "chain_parameters",
    "is_pre_weight",
    "is_post_weight",
]
