"""The merge plan: which output tensor comes from which inputs, how, and in which shard.

Built once from the validated config and the opened checkpoints, before anything is written
(``--dry-run`` prints it and stops). The rules of docs/SPEC.md §4 live here:

* the output holds the tensors of the base model (or, without one, of the first model);
* a float tensor (float32/bfloat16/float16) with the same shape everywhere is **merged**;
* a tensor missing in some input, or with different shapes, is an error naming the tensor,
  the inputs and their shapes, with two exceptions for the vocabulary tensors:
  - **vocabulary rows**: a 2-D embedding or output-head tensor (its module is one of
    :data:`EMBEDDING_MODULES` / :data:`HEAD_MODULES`, e.g. ``model.embed_tokens.weight``,
    ``lm_head.weight``) whose row counts differ but whose other dimension agrees is merged
    over the common rows; each further row is the float32 mean of the fine-tuned models that
    have it (the base's row if none does); the output has the largest row count;
  - **tied output head**: a model without the head tensor (tied word embeddings) stands in
    its input embedding for it; if the base is tied but a fine-tuned model has its own head,
    the output gets an untied head (and ``tie_word_embeddings: false`` in config.json);
* non-float tensors (integer/bool buffers) are copied from the base (or the first model)
  unchanged; float64 / float8 tensors likewise, with a warning.

Output tensors keep the base model's order; shards are filled greedily up to the shard size
(HF-style names), and inside a shard tensors are laid out by decreasing element size so every
tensor's data is aligned to its element size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from m3kernels.checkpoint.config import MergeConfig, MergeConfigError, layer_index
from m3kernels.checkpoint.lora import reference
from m3kernels.checkpoint.safetensors_io import torch_dtype_name
from m3kernels.checkpoint.source import Checkpoint, TensorMeta
from m3kernels.errors import TensorMismatchError
from m3kernels.merge.job import MergeJob
from m3kernels.merge.recipe import Recipe, make_recipe
from m3kernels.merge.registry import get_method

MERGE, VOCAB, COPY = "merge", "vocab", "copy"
PERMUTE = "permute"  # a vocabulary tensor re-laid on the merged tokenizer (tokenizer_rows.py)
MERGEABLE = (torch.float32, torch.bfloat16, torch.float16)
EMBEDDING_MODULES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"})
HEAD_MODULES = frozenset({"lm_head", "embed_out"})
HEAD_NAMES = frozenset({"output.weight"})  # Meta's original Llama layout
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def vocab_role(name: str) -> str | None:
    """'embedding', 'head' or None: whether ``name`` is a vocabulary-indexed weight."""
    parts = name.split(".")
    if name in HEAD_NAMES:
        return "head"
    if len(parts) >= 2 and parts[-1] == "weight":
        if parts[-2] in EMBEDDING_MODULES:
            return "embedding"
        if parts[-2] in HEAD_MODULES:
            return "head"
    return None


def shard_filenames(count: int) -> list[str]:
    """HF names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass
class Source:
    """One input's tensor for an output tensor (``name`` differs for a tied-head stand-in)."""

    ckpt: Checkpoint
    name: str
    meta: TensorMeta

    def tensor(self) -> torch.Tensor:
        return self.ckpt.tensor(self.name)

    def describe(self) -> str:
        return f"{self.ckpt.label}: {list(self.meta.shape)} {torch_dtype_name(self.meta.dtype)}"


@dataclass
class PlannedTensor:
    """One output tensor: how it is made, from what, and where it goes."""

    name: str
    action: str  # MERGE | VOCAB | COPY
    shape: tuple
    out_dtype: torch.dtype
    base: Source | None  # θ0 for the merge (None: no base, or the method ignores it)
    models: list  # Source per fine-tuned model (COPY: the one copied)
    kwargs: dict = field(default_factory=dict)  # MergeConfig.tensor_kwargs for this tensor
    recipe: Recipe | None = None
    common_rows: int | None = None  # VOCAB: rows merged; the rest come from the longer inputs
    fallback: Source | None = None  # VOCAB: the base's (or first input's) rows when no model has them
    rows: object | None = None  # PERMUTE: the tokenizer_rows.RowMap that lays the inputs out
    shard: int = -1
    index: int = -1  # position in the write order

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize

    @property
    def merged_numel(self) -> int:
        """Elements that go through the kernels (VOCAB: the common rows only)."""
        if self.action in (MERGE, PERMUTE):
            return self.numel
        if self.action == VOCAB:
            return self.common_rows * math.prod(self.shape[1:])
        return 0

    def sources(self) -> list:
        """Every input tensor this output tensor reads (for page hints)."""
        out = ([self.base] if self.base is not None else []) + list(self.models)
        if self.fallback is not None and all(self.fallback is not s for s in out):
            out.append(self.fallback)
        for r in self.rows.sources if self.rows is not None else ():
            if all(r is not s for s in out):
                out.append(r)
        return out

    def inputs(self):
        """(base, models) as CPU tensors for the kernels (VOCAB: the common rows; PERMUTE: laid out
        on the merged vocabulary)."""
        if self.rows is not None:
            return self.rows.inputs(self.base, self.models)
        b = self.base.tensor() if self.base is not None else None
        ms = [s.tensor() for s in self.models]
        if self.action == VOCAB:
            c = self.common_rows
            b = b[:c] if b is not None else None
            ms = [m[:c] for m in ms]
        return b, ms

    def job(self, thresholds=None) -> MergeJob:
        """This tensor as the one job type every merge path takes (VOCAB: the common rows)."""
        b, ms = self.inputs()
        return MergeJob(
            self.name, b, ms, self.out_dtype, self.recipe, thresholds=thresholds, meta={"planned": self}
        )

    def prefetch(self) -> None:
        for s in self.sources():
            s.ckpt.prefetch(s.name)

    def release(self) -> None:
        for s in self.sources():
            s.ckpt.release(s.name)


@dataclass
class Shard:
    index: int
    filename: str
    tensors: list  # PlannedTensor in file order

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    """Everything decided before the first byte is written (see the module docstring)."""

    config: MergeConfig
    base: Checkpoint | None
    models: list  # Checkpoint per fine-tuned model
    tensors: list  # PlannedTensor in write order
    shards: list  # Shard
    num_layers: int
    mix_ratios: tuple | None
    seed: int
    out_dtype: torch.dtype  # the dtype written into config.json
    out_vocab_rows: int | None  # embedding rows of the output when they changed
    untied_head: bool  # the base ties its head but the output does not
    notes: list = field(default_factory=list)  # warnings about the merge, one line each
    out_num_layers: int | None = None  # a sliced merge: the output's layer count (config.json)
    layout: list = field(default_factory=list)  # a sliced merge: one summary line per slice
    tokenizer: object | None = None  # tokenizer.TokenizerOutput: a merged tokenizer / chat template

    @property
    def config_source(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(s.meta.nbytes for t in self.tensors for s in t.sources())

    def table(self) -> str:
        """One line per output tensor (name, action, shape, dtype, shard, bytes)."""
        rows = [("tensor", "action", "shape", "dtype", "shard", "bytes")]
        for t in self.tensors:
            act = t.action if t.action != VOCAB else f"vocab({t.common_rows})"
            rows.append(
                (
                    t.name,
                    act,
                    "x".join(map(str, t.shape)) or "scalar",
                    torch_dtype_name(t.out_dtype),
                    str(t.shard + 1),
                    f"{t.nbytes:,}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i != 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        cfg = self.config
        counts = {a: sum(t.action == a for t in self.tensors) for a in (MERGE, VOCAB, COPY)}
        lines = [
            f"method:   {cfg.method}  (seed {self.seed}, trim_scope {cfg.trim_scope})",
            f"base:     {reference(self.base) if self.base is not None else '(none)'}",
        ]
        lines += [f"model {i + 1}:  {reference(m)}" for i, m in enumerate(self.models)]
        lines += self.layout
        if self.mix_ratios is not None:
            lines.append("M³ ratios: " + ", ".join(f"{r:.6f}" for r in self.mix_ratios))
        lines.append(
            f"tensors:  {len(self.tensors)} ({counts[MERGE]} merged, {counts[VOCAB]} vocabulary-row "
            f"merges, {counts[COPY]} copied)"
        )
        if self.tokenizer is not None:
            lines.append(self.tokenizer.summary())
        lines.append(
            f"output:   {self.total_bytes:,} bytes in {len(self.shards)} shard(s), "
            f"{torch_dtype_name(self.out_dtype)}; reads {self.input_bytes:,} input bytes"
        )
        for s in self.shards:
            lines.append(f"  {s.filename}: {len(s.tensors)} tensors, {s.nbytes:,} bytes")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def count_layers(ckpt: Checkpoint) -> int:
    """Decoder layers: from config.json if it says, at least as many as the names show."""
    from_names = 1 + max((layer_index(n) for n in ckpt.names if layer_index(n) is not None), default=0)
    for key in LAYER_COUNT_KEYS:
        v = (ckpt.config or {}).get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return max(v, from_names)
    return max(1, from_names)


def _embedding_of(ckpt: Checkpoint, cols: int | None) -> str | None:
    """The input-embedding tensor a tied head stands in with."""
    for n in ckpt.names:
        if vocab_role(n) == "embedding":
            shape = ckpt.meta(n).shape
            if len(shape) == 2 and (cols is None or shape[1] == cols):
                return n
    return None


def _source(ckpt: Checkpoint, name: str, head_cols: int | None) -> tuple[Source | None, bool]:
    """(source, stood_in): the tensor itself, or for a missing head the tied embedding (unless the
    model's config.json says ``tie_word_embeddings: false``: then the head is simply missing)."""
    if name in ckpt:
        return Source(ckpt, name, ckpt.meta(name)), False
    declared_untied = isinstance(ckpt.config, dict) and ckpt.config.get("tie_word_embeddings") is False
    if vocab_role(name) == "head" and not declared_untied:
        emb = _embedding_of(ckpt, head_cols)
        if emb is not None:
            return Source(ckpt, emb, ckpt.meta(emb)), True
    return None, False


def _missing_error(name, inputs, found) -> TensorMismatchError:
    missing = [c.label for c, s in zip(inputs, found) if s is None]
    present = [c.label for c, s in zip(inputs, found) if s is not None]
    return TensorMismatchError(
        f"tensor {name!r} is missing in {', '.join(missing)}; present in {', '.join(present) or 'no input'}",
        tensor=name,
        path=str(inputs[[s is None for s in found].index(True)].path),
    )


def _frozen(value):
    """A hashable copy of a tensor_kwargs value (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _recipe(
    cfg: MergeConfig, name: str, kwargs: dict, n: int, has_base: bool, ratios, seed, cache: dict | None = None
) -> Recipe:
    """``make_recipe`` for one tensor; tensors with the same arguments share one (immutable)
    Recipe through ``cache``, so a plan of 100,000 tensors validates each distinct setting once."""
    key = None
    if cache is not None:
        key = (n, has_base, tuple((k, _frozen(v)) for k, v in sorted(kwargs.items())))
        hit = cache.get(key)
        if hit is not None:
            return hit
    try:
        recipe = make_recipe(n, method=cfg.method, has_base=has_base, mix_ratios=ratios, seed=seed, **kwargs)
    except ValueError as exc:
        raise MergeConfigError(f"tensor {name!r}: {exc}") from None
    if cache is not None:
        cache[key] = recipe
    return recipe


def build_plan(
    cfg: MergeConfig,
    base: Checkpoint | None,
    models: list,
    out_shard_size: int,
    *,
    only=None,
    tokenizer: tuple | None = None,
) -> MergePlan:
    """Match tensors across the inputs, apply docs/SPEC.md §4, choose dtypes and shards.
    ``only(name)``: plan just the tensors it accepts; ``tokenizer``: the (TokenizerOutput, notes)
    to use instead of the config's own (the slice planner's pre/post weights: the whole merge's)."""
    if cfg.slices is not None or (
        cfg.layer_range is not None
        and cfg.layer_range != count_layers(base if base is not None else models[0])
    ):  # slices (or the whole-model slice over fewer layers than the models have): slices.py
        from m3kernels.checkpoint.slices import build_sliced_plan

        return build_sliced_plan(cfg, base, models, out_shard_size)
    preset = get_method(cfg.method)
    recipes: dict = {}  # shared Recipes (see _recipe)
    source = base if base is not None else models[0]
    inputs = ([base] if base is not None else []) + list(models)
    num_layers = count_layers(source)
    ratios = cfg.mix_ratios()
    notes: list[str] = []
    from m3kernels.checkpoint.tokenizer import tokenizer_for  # tokenizer_source / chat_template

    tok_out, tok_notes = tokenizer if tokenizer is not None else tokenizer_for(cfg, base, list(models))
    notes += tok_notes
    vocab = tok_out.vocab if tok_out is not None else None

    names = [n for n in source.names if only is None or only(n)]
    untied = False
    for ck in inputs:
        for n in ck.names:
            if n in source or n in names or (only is not None and not only(n)):
                continue
            if vocab_role(n) == "head" and _embedding_of(source, None) is not None:
                names.append(n)  # the base ties its head; this model has its own: untie the output
                untied = True
                notes.append(
                    f"{n}: {source.label} ties it to the input embedding but {ck.label} has its own; "
                    f"the output gets an untied {n} (tie_word_embeddings: false)"
                )
            else:
                raise TensorMismatchError(
                    f"tensor {n!r} is in {ck.label} but missing in {source.label}",
                    tensor=n,
                    path=str(source.path),
                )

    planned, out_vocab_rows = [], None
    for name in names:
        head_cols = None
        for ck in inputs:
            if name in ck and len(ck.meta(name).shape) == 2:
                head_cols = ck.meta(name).shape[1]
                break
        found, stand_ins = [], []
        for ck in inputs:
            s, stood = _source(ck, name, head_cols)
            found.append(s)
            if stood:
                stand_ins.append(f"{ck.label} uses {s.name}")
        src0 = found[0]
        if any(s is None for s in found):
            raise _missing_error(name, inputs, found)
        if not src0.meta.dtype.is_floating_point or src0.meta.dtype not in MERGEABLE:
            # copied from the base (or first model) unchanged, but it must exist alike everywhere
            if len({s.meta.shape for s in found}) > 1:
                odd = next(s for s in found if s.meta.shape != src0.meta.shape)
                raise TensorMismatchError(
                    f"tensor {name!r} has different shapes: " + "; ".join(s.describe() for s in found),
                    tensor=name,
                    path=str(odd.ckpt.path),
                )
            if src0.meta.dtype.is_floating_point:
                notes.append(
                    f"{name}: dtype {torch_dtype_name(src0.meta.dtype)} cannot be merged; copied "
                    f"from {src0.ckpt.label}"
                )
            planned.append(PlannedTensor(name, COPY, src0.meta.shape, src0.meta.dtype, None, [src0]))
            continue
        if stand_ins:
            notes.append(f"{name}: tied head, {'; '.join(stand_ins)}")
        for s in found:
            if s.meta.dtype not in MERGEABLE:
                raise TensorMismatchError(
                    f"tensor {name!r} has dtype {torch_dtype_name(s.meta.dtype)} in {s.ckpt.label} but "
                    f"{torch_dtype_name(src0.meta.dtype)} in {src0.ckpt.label}; cannot merge",
                    tensor=name,
                    path=str(s.ckpt.path),
                )
        base_src = found[0] if base is not None else None
        model_srcs = found[1:] if base is not None else found
        shapes = [s.meta.shape for s in found]
        action, common, shape, rows = MERGE, None, src0.meta.shape, None
        if vocab is not None and vocab_role(name) is not None:  # mergekit's embed permutation
            from m3kernels.checkpoint.tokenizer_rows import plan_rows

            rows = plan_rows(name, vocab, cfg, base, list(models), found)
            out_vocab_rows = vocab.rows
            if rows is not None:
                action, shape = PERMUTE, rows.shape
        elif len(set(shapes)) > 1:
            two_d = all(len(sh) == 2 for sh in shapes) and len({sh[1] for sh in shapes}) == 1
            if not (vocab_role(name) is not None and two_d):
                raise TensorMismatchError(
                    f"tensor {name!r} has different shapes: " + "; ".join(s.describe() for s in found),
                    tensor=name,
                    path=str(found[[sh != shapes[0] for sh in shapes].index(True)].ckpt.path),
                )
            action, common = VOCAB, min(sh[0] for sh in shapes)
            shape = (max(sh[0] for sh in shapes), shapes[0][1])
            notes.append(
                f"{name}: row counts differ ("
                + ", ".join(f"{s.ckpt.role} {s.meta.shape[0]}" for s in found)
                + f"); merged the first {common} rows, the others come from the inputs that have "
                f"them; output has {shape[0]} rows"
            )
            if vocab_role(name) == "embedding" or out_vocab_rows is None:
                out_vocab_rows = shape[0]
        try:
            out_dtype = cfg.out_torch_dtype(src0.meta.dtype)
            kwargs = cfg.tensor_kwargs(name, num_layers)
        except MergeConfigError as exc:
            raise MergeConfigError(f"tensor {name!r}: {exc}") from None
        use_base = base_src if preset.uses_base else None
        recipe = _recipe(cfg, name, kwargs, len(model_srcs), use_base is not None, ratios, cfg.seed, recipes)
        planned.append(
            PlannedTensor(
                name,
                action,
                tuple(shape),
                out_dtype,
                use_base,
                model_srcs,
                kwargs,
                recipe,
                common,
                src0 if action == VOCAB else None,
                rows=rows,
            )
        )

    shards = assign_shards(planned, out_shard_size)
    order = [t for s in shards for t in s.tensors]
    for i, t in enumerate(order):
        t.index = i
    float_bytes: dict = {}
    for t in order:
        if t.action != COPY:
            float_bytes[t.out_dtype] = float_bytes.get(t.out_dtype, 0) + t.nbytes
    out_dtype = max(float_bytes, key=float_bytes.get) if float_bytes else torch.float32
    return MergePlan(
        cfg,
        base,
        list(models),
        order,
        shards,
        num_layers,
        ratios,
        cfg.seed,
        out_dtype,
        out_vocab_rows,
        untied,
        notes,
        tokenizer=tok_out,
    )


def assign_shards(tensors: list, max_bytes: int) -> list:
    """Greedy HF-style sharding in input order; a tensor larger than the limit gets its own shard."""
    groups, cur, size = [], [], 0
    for t in tensors:
        if cur and size + t.nbytes > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        groups.append(cur)
    names = shard_filenames(len(groups))
    shards = []
    for i, (g, fname) in enumerate(zip(groups, names)):
        g = sorted(g, key=lambda t: -t.out_dtype.itemsize)  # stable: aligned data
        for t in g:
            t.shard = i
        shards.append(Shard(i, fname, g))
    return shards


__all__ = [
    "MergePlan",
    "PlannedTensor",
    "Shard",
    "Source",
    "build_plan",
    "assign_shards",
    "shard_filenames",
    "vocab_role",
    "count_layers",
    "MERGE",
    "VOCAB",
    "COPY",
    "PERMUTE",
    "MERGEABLE",
]
