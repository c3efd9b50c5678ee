"""Synthetic Hugging Face style checkpoints for demos, tests and benchmarks.

One factory for every place that needs a model on disk (``m3kernels demo``, the tests,
``bench/gen_models.py``): the tensor names and consistent shapes of ``LlamaForCausalLM``
(:class:`LlamaShapes`), a ``config.json`` that ``transformers.LlamaConfig`` and mergekit accept,
``generation_config.json`` and (optionally) placeholder tokenizer files. Two ways to make the
values, both seeded and reproducible:

* **Small models in memory** (tests, the demo). :func:`random_tensors` / :func:`llama_tensors`
  draw a base model (N(0, std²), RMSNorm weights 1 + N(0, std²)) from one ``torch.Generator``,
  :func:`fine_tune` adds N(0, scale²) noise to every float tensor; ``seed`` is an int or a
  generator the caller keeps drawing from. :func:`write_checkpoint` writes a dict of tensors as
  ``model.safetensors`` or as several shards with ``model.safetensors.index.json``;
  :func:`make_family` writes a base and N fine-tunes.
* **Large models streamed tensor by tensor** (benchmarks: Llama-2-13B shapes, 962 M to 13 B
  parameters per model). Every value is a pure function of (seed, tensor name, model index,
  chunk index): each tensor is generated in chunks of :data:`CHUNK` elements, each chunk from its
  own seeded generator, so :func:`make_tensor` / :func:`iter_model` give any tensor on any device
  without the others, and :func:`write_streamed_family` writes base + fine-tunes in one pass in
  bounded memory (chunks generated in parallel threads, the same bytes whatever the thread
  count). Model 0 is the base: bf16(N(0, 0.02²)), norm weights bf16(1 + N(0, 0.02²)); model
  i ≥ 1 is fine-tune i: bf16(f32(base) + N(0, 0.002²)). A CUDA generator gives other (equally
  seeded, reproducible) values than the CPU one.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

Seed = int | torch.Generator

# --------------------------------------------------------------------------- shapes and config


@dataclass(frozen=True)
class LlamaShapes:
    """The sizes of a ``LlamaForCausalLM`` (defaults: the tests' tiny model)."""

    vocab: int = 101
    hidden: int = 24
    intermediate: int = 37
    layers: int = 2
    heads: int = 3
    kv_heads: int = 1  # < heads: grouped-query attention (narrower k/v projections)
    tied: bool = False  # tied embeddings: no lm_head.weight

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in file order."""
        h, f, v = self.hidden, self.intermediate, self.vocab
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        specs = [("model.embed_tokens.weight", (v, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            specs += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
            ]
        specs.append(("model.norm.weight", (h,)))
        if not self.tied:
            specs.append(("lm_head.weight", (v, h)))
        return specs

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every tensor, in file order."""
        return dict(self.specs())

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.specs())

    def config(self, dtype: str = "bfloat16", max_positions: int = 4096) -> dict:
        """``config.json`` contents that ``transformers.LlamaConfig`` (and mergekit) accept."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": dtype,
            "use_cache": True,
        }


def llama2_13b(layers: int = 2) -> LlamaShapes:
    """Llama-2-13B shapes with ``layers`` decoder layers (2: the benchmarks' l13x2, 40: l13)."""
    return LlamaShapes(vocab=32000, hidden=5120, intermediate=13824, layers=layers, heads=40, kv_heads=40)


def tiny(layers: int = 2, kv_heads: int = 4) -> LlamaShapes:
    """A few-hundred-kilobyte Llama (hidden 64, 4 heads; intermediate 172: not a multiple of 8)."""
    return LlamaShapes(vocab=128, hidden=64, intermediate=172, layers=layers, heads=4, kv_heads=kv_heads)


def llama_shapes(**sizes) -> dict[str, tuple[int, ...]]:
    """{name: shape} of ``LlamaShapes(**sizes)`` (vocab, hidden, intermediate, layers, heads, kv_heads, tied)."""
    return LlamaShapes(**sizes).shapes()


def llama_config(shapes: LlamaShapes | None = None, dtype: str = "bfloat16", **sizes) -> dict:
    """``config.json`` of ``shapes`` (or of ``LlamaShapes(**sizes)``) with ``torch_dtype`` = ``dtype``."""
    return (shapes or LlamaShapes(**sizes)).config(dtype)


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
TOKENIZER_FILES = {  # placeholders: the merger copies them, nothing here tokenizes
    "tokenizer_config.json": {"model_max_length": 64, "tokenizer_class": "LlamaTokenizer"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
}
TOKENIZER_MODEL = b"\x00fake sentencepiece model\x01"


# --------------------------------------------------------------------------- small models in memory


def _generator(seed: Seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def random_tensors(shapes, seed: Seed, dtype=torch.bfloat16, std: float = 0.05) -> dict:
    """Seeded N(0, std²) tensors (RMSNorm weights, ``*norm.weight``, around 1), in ``dtype``.

    ``shapes``: {name: shape} or a :class:`LlamaShapes`. ``seed``: an int, or a generator that is
    drawn from in the order of ``shapes``.
    """
    if isinstance(shapes, LlamaShapes):
        shapes = shapes.shapes()
    g = _generator(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float32) * std
        if name.endswith("norm.weight"):
            t = t + 1.0
        out[name] = t.to(dtype)
    return out


def llama_tensors(seed: Seed = 0, dtype=torch.bfloat16, std: float = 0.05, **sizes) -> dict:
    """A seeded random base model with the tensors of ``LlamaShapes(**sizes)``."""
    return random_tensors(LlamaShapes(**sizes), seed, dtype, std)


def fine_tune(base: dict, seed: Seed, scale: float = 0.02, dtype=None, skip=()) -> dict:
    """``base`` plus seeded N(0, scale²) noise on every float tensor (others, and ``skip``, copied).

    Computed in float32, rounded to ``dtype`` (default: each tensor's own dtype).
    """
    g = _generator(seed)
    out = {}
    for name, t in base.items():
        if not t.dtype.is_floating_point or name in skip:
            out[name] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
        out[name] = (t.to(torch.float32) + noise).to(dtype or t.dtype)
    return out


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's shard name: ``model-00001-of-00003.safetensors`` for index 0 of 3."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder, weight_map: dict, total_size: int) -> None:
    """``model.safetensors.index.json``: {tensor name: shard file} and the total tensor bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_side_files(
    folder, *, config: dict | None = None, tokenizer: bool = True, generation: bool | None = None
) -> None:
    """``config.json`` (when given), placeholder tokenizer files and ``generation_config.json``
    (``generation`` defaults to ``tokenizer``)."""
    folder = Path(folder)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        for fname, content in TOKENIZER_FILES.items():
            (folder / fname).write_text(json.dumps(content))
        (folder / "tokenizer.model").write_bytes(TOKENIZER_MODEL)
    if tokenizer if generation is None else generation:
        (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def plan_shards(specs, shard_bytes: int, elem_bytes=2) -> list[list[tuple[str, tuple]]]:
    """Split (name, shape) pairs, in order, into shards of at most ``shard_bytes`` (a tensor larger
    than that gets a shard of its own). ``elem_bytes``: bytes per element, or {name: bytes}."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * (elem_bytes[name] if isinstance(elem_bytes, dict) else elem_bytes)
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_checkpoint(
    folder,
    tensors: dict,
    *,
    shards: int = 1,
    shard_bytes: int | None = None,
    config: dict | None = None,
    tokenizer: bool = True,
    generation: bool | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``tensors`` as a Hugging Face checkpoint folder; returns the folder.

    ``shards`` files of about equal tensor counts, or (``shard_bytes``) shards of at most that many
    bytes; one shard is ``model.safetensors`` without an index. Then :func:`write_side_files`.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shard_bytes is not None:
        groups = [
            [n for n, _ in s]
            for s in plan_shards(
                [(n, tuple(tensors[n].shape)) for n in names],
                shard_bytes,
                {n: tensors[n].element_size() for n in names},
            )
        ]
    else:
        per = max(1, math.ceil(len(names) / shards))
        groups = [names[i : i + per] for i in range(0, len(names), per)]
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file(
            {n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata=meta
        )
    else:
        weight_map, total = {}, 0
        for i, g in enumerate(groups):
            fname = shard_file_name(i, len(groups))
            save_file({n: tensors[n].contiguous() for n in g}, str(folder / fname), metadata=meta)
            for n in g:
                weight_map[n] = fname
                total += tensors[n].numel() * tensors[n].element_size()
        write_index(folder, weight_map, total)
    write_side_files(folder, config=config, tokenizer=tokenizer, generation=generation)
    return folder


@dataclass
class Family:
    """A base checkpoint and fine-tunes on disk, with their tensors.

    Unpacks as ``base_dir, model_dirs, base = family`` (what :func:`make_family` returned before
    it returned this object).
    """

    base_dir: Path
    model_dirs: list
    base: dict
    models: list

    def __iter__(self):
        return iter((self.base_dir, self.model_dirs, self.base))


def make_family(
    root,
    *,
    n_models: int = 2,
    dtype=torch.bfloat16,
    shards: int = 2,
    seed: Seed = 0,
    model_dtypes=None,
    shapes: LlamaShapes | None = None,
    std: float = 0.05,
    noise: float = 0.02,
    tokenizer: bool = True,
    generation: bool | None = None,
    **sizes,
) -> Family:
    """``root/base`` and ``root/ft1`` .. ``root/ft{n_models}``: a seeded base and fine-tunes.

    Llama tensors of ``shapes`` (or ``LlamaShapes(**sizes)``) in ``dtype``, base ~ N(0, std²),
    fine-tune i = base + N(0, noise²) rounded to ``model_dtypes[i]`` (default ``dtype``). An int
    ``seed`` draws the base from ``seed`` and fine-tune i (from 0) from ``seed + 101 * (i + 1)``;
    a generator draws the base, then each fine-tune, from it in turn. The base is written in
    ``shards`` shards, fine-tune i in ``shards + i``, each with config.json (and
    :func:`write_side_files`' tokenizer / generation files).
    """
    root = Path(root)
    shapes = shapes or LlamaShapes(**sizes)
    base = random_tensors(shapes, seed, dtype, std)
    cfg = shapes.config(dtype=str(dtype).replace("torch.", ""))
    side = dict(config=cfg, tokenizer=tokenizer, generation=generation)
    base_dir = write_checkpoint(root / "base", base, shards=shards, **side)
    dirs, models = [], []
    for i in range(n_models):
        mdtype = (model_dtypes or [None] * n_models)[i]
        ft_seed = seed if isinstance(seed, torch.Generator) else seed + 101 * (i + 1)
        ft = fine_tune(base, ft_seed, noise, dtype=mdtype)
        dirs.append(write_checkpoint(root / f"ft{i + 1}", ft, shards=shards + i, **side))
        models.append(ft)
    return Family(base_dir, dirs, base, models)


LORA_EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def write_lora_adapter(
    folder,
    shapes: dict,
    *,
    targets=("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    seed: Seed = 0,
    dtype=torch.float32,
    std: float = 0.05,
    config: dict | None = None,
) -> Path:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's
    key names) for a model with tensors ``shapes`` ({name: shape}): every 2-D ``M.weight`` whose
    module's last name part is in ``targets`` gets ``M.lora_A.weight`` (r × in) and
    ``M.lora_B.weight`` (out × r), an embedding module ``M.lora_embedding_A`` (r × vocab) and
    ``M.lora_embedding_B`` (dim × r); seeded N(0, std²) values (B nonzero, unlike a fresh
    adapter) in ``dtype``. ``config`` updates the adapter config (use_rslora, rank_pattern, ...)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = _generator(seed)
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or len(shape) != 2 or module.rpartition(".")[2] not in targets:
            continue
        key = f"base_model.model.{module}."
        if module.rpartition(".")[2] in LORA_EMBEDDING_MODULES:
            parts = {"lora_embedding_A": (r, shape[0]), "lora_embedding_B": (shape[1], r)}
        else:
            parts = {"lora_A.weight": (r, shape[1]), "lora_B.weight": (shape[0], r)}
        for part, pshape in parts.items():
            out[key + part] = (torch.randn(pshape, generator=g, dtype=torch.float32) * std).to(dtype)
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "task_type": "CAUSAL_LM",
        **(config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(out, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


# --------------------------------------------------------------------------- large models, streamed

CHUNK = 1 << 22  # elements per seeded chunk (fixed: part of the definition)
BASE_STD = 0.02  # std of the base weights
NORM_MEAN = 1.0  # RMSNorm weights are centred on 1
FINETUNE_STD = 0.002  # std of the fine-tune noise (docs/SPEC.md §6)
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" shards
FORMAT_VERSION = 1  # bump when the streamed values change


def chunk_seed(seed: int, name: str, model: int, chunk: int) -> int:
    """The 64-bit generator seed of one chunk: a hash of (seed, name, model, chunk)."""
    key = f"m3kernels-bench/{FORMAT_VERSION}/{seed}/{name}/{model}/{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _normal(n: int, std: float, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(n, dtype=torch.float32, device=device).normal_(0.0, std, generator=g)


def _base_chunk(name: str, n: int, seed: int, chunk: int, device) -> torch.Tensor:
    x = _normal(n, BASE_STD, chunk_seed(seed, name, 0, chunk), device)
    if name.endswith("norm.weight"):
        x += NORM_MEAN
    return x.to(torch.bfloat16)


def _finetune_chunk(base: torch.Tensor, name: str, model: int, seed: int, chunk: int) -> torch.Tensor:
    noise = _normal(base.numel(), FINETUNE_STD, chunk_seed(seed, name, model, chunk), base.device)
    return (base.float() + noise).to(torch.bfloat16)


def _chunks(numel: int) -> list[tuple[int, int]]:
    return [(c, min(CHUNK, numel - c * CHUNK)) for c in range((numel + CHUNK - 1) // CHUNK)]


def model_chunks(name: str, numel: int, seed: int, models: list[int], chunk: int, device="cpu"):
    """Chunk ``chunk`` of tensor ``name`` for each model index in ``models`` (bf16, flat)."""
    n = min(CHUNK, numel - chunk * CHUNK)
    base = _base_chunk(name, n, seed, chunk, device)
    return [base if m == 0 else _finetune_chunk(base, name, m, seed, chunk) for m in models]


def make_tensor(name: str, shape, seed: int, model: int, device="cpu") -> torch.Tensor:
    """The whole streamed tensor ``name`` of model ``model`` (0 = base), bf16 on ``device``."""
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=torch.bfloat16, device=device)
    for c, n in _chunks(numel):
        out[c * CHUNK : c * CHUNK + n] = model_chunks(name, numel, seed, [model], c, device)[0]
    return out.view(shape)


def iter_model(
    shapes: LlamaShapes, seed: int, model: int, device="cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, bf16 tensor) of one streamed model, one tensor at a time (an in-memory source)."""
    for name, shape in shapes.specs():
        yield name, make_tensor(name, shape, seed, model, device)


def safetensors_header(specs, dtype: str = "BF16", elem_bytes: int = 2) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``specs`` in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = math.prod(shape) * elem_bytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors itself writes
    return struct.pack("<Q", len(raw)) + raw


def model_dir_names(n_finetunes: int) -> list[str]:
    return ["base"] + [f"ft{i}" for i in range(1, n_finetunes + 1)]


def generation_info(shapes: LlamaShapes, seed: int, n_finetunes: int, shard_bytes: int) -> dict:
    """What identifies a streamed set on disk (``generation.json``): reused only when all matches."""
    dims = {
        "hidden": shapes.hidden,
        "intermediate": shapes.intermediate,
        "vocab": shapes.vocab,
        "heads": shapes.heads,
        "layers": shapes.layers,
    }
    if shapes.kv_heads != shapes.heads:
        dims["kv_heads"] = shapes.kv_heads
    if shapes.tied:
        dims["tied"] = True
    return {
        "format_version": FORMAT_VERSION,
        "chunk": CHUNK,
        "seed": seed,
        "shapes": dims,
        "n_finetunes": n_finetunes,
        "shard_bytes": shard_bytes,
        "base_std": BASE_STD,
        "finetune_std": FINETUNE_STD,
    }


def existing_matches(out, info: dict) -> bool:
    try:
        return json.loads((Path(out) / "generation.json").read_text()) == info
    except (OSError, ValueError):
        return False


def _write_chunks(files, chunks) -> None:
    for f, x in zip(files, chunks):
        f.write(x.view(torch.int16).numpy())


def write_streamed_family(
    out,
    shapes: LlamaShapes,
    seed: int = 0,
    n_finetunes: int = 2,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    threads: int | None = None,
    quiet: bool = False,
) -> list[Path]:
    """Write streamed base + ``n_finetunes`` checkpoint directories under ``out``; return their paths.

    All models are written in one pass, tensor by tensor and chunk by chunk (each base chunk
    is generated once and reused for the fine-tunes), with at most ``2 * threads`` chunks in
    flight: memory stays at a few hundred MB whatever the model size. Each directory gets
    config.json and generation_config.json (no tokenizer files). The set is built in
    ``out.partial`` and renamed to ``out`` when complete, with ``generation.json``.
    """
    out = Path(out)
    info = generation_info(shapes, seed, n_finetunes, shard_bytes)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    names = model_dir_names(n_finetunes)
    models = list(range(len(names)))
    shards = plan_shards(shapes.specs(), shard_bytes)
    n_shards = len(shards)
    threads = threads or os.cpu_count() or 1
    for d in names:
        (tmp / d).mkdir(parents=True)
    t0, done, total = time.perf_counter(), 0, shapes.n_params
    last_print = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for s, shard in enumerate(shards):
            fname = shard_file_name(s, n_shards)
            header = safetensors_header(shard)
            files = [open(tmp / d / fname, "wb") for d in names]
            try:
                for f in files:
                    f.write(header)
                for name, shape in shard:
                    numel = math.prod(shape)
                    pending = collections.deque()
                    for c, _ in _chunks(numel):
                        pending.append(pool.submit(model_chunks, name, numel, seed, models, c))
                        if len(pending) >= 2 * threads:
                            _write_chunks(files, pending.popleft().result())
                    while pending:
                        _write_chunks(files, pending.popleft().result())
                    done += numel
                    if not quiet and (time.perf_counter() - last_print > 1.0 or done == total):
                        last_print = time.perf_counter()
                        rate = done / max(time.perf_counter() - t0, 1e-9) / 1e6
                        print(
                            f"\r  {done / 1e6:8.1f} / {total / 1e6:.1f} M params per model ({rate:.0f} M/s)",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                for f in files:
                    f.close()
    if not quiet:
        print(file=sys.stderr)
    weight_map = {name: shard_file_name(s, n_shards) for s, shard in enumerate(shards) for name, _ in shard}
    for d in names:
        write_index(tmp / d, weight_map, total * 2)
        write_side_files(tmp / d, config=shapes.config(), tokenizer=False, generation=True)
    (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return [out / d for d in names]


def ensure_streamed_family(
    out,
    shapes: LlamaShapes,
    seed: int = 0,
    n_finetunes: int = 2,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    quiet: bool = False,
) -> list[Path]:
    """The streamed checkpoint directories under ``out``, generated only if missing or different."""
    out = Path(out)
    info = generation_info(shapes, seed, n_finetunes, shard_bytes)
    if existing_matches(out, info):
        return [out / d for d in model_dir_names(n_finetunes)]
    return write_streamed_family(out, shapes, seed, n_finetunes, shard_bytes, quiet=quiet)


__all__ = [
    "LlamaShapes",
    "llama2_13b",
    "tiny",
    "llama_shapes",
    "llama_config",
    "GENERATION_CONFIG",
    "TOKENIZER_FILES",
    "TOKENIZER_MODEL",
    "random_tensors",
    "llama_tensors",
    "fine_tune",
    "shard_file_name",
    "write_index",
    "write_side_files",
    "plan_shards",
    "write_checkpoint",
    "Family",
    "make_family",
    "write_lora_adapter",
    "CHUNK",
    "BASE_STD",
    "NORM_MEAN",
    "FINETUNE_STD",
    "DEFAULT_SHARD_BYTES",
    "FORMAT_VERSION",
    "chunk_seed",
    "model_chunks",
    "make_tensor",
    "iter_model",
    "safetensors_header",
    "model_dir_names",
    "generation_info",
    "existing_matches",
    "write_streamed_family",
    "ensure_streamed_family",
]
