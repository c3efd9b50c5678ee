"""Seeded synthetic Llama checkpoints for the benchmarks (docs/SPEC.md §6).

* ``l13x2``: Llama-2-13B tensor shapes (hidden 5120, intermediate 13824, vocab 32000, 40
  heads) with 2 decoder layers, bf16: a base model and fine-tunes (fine-tune = base +
  N(0, 0.002²) noise), 962 M parameters each, written as Hugging Face checkpoint directories
  (sharded safetensors + ``model.safetensors.index.json`` + ``config.json`` +
  ``generation_config.json``).
* ``l13``: the same shapes with all 40 layers (13.0 B parameters per model). Too big for this
  disk four times over, so it is described in memory: :func:`tensor_specs` lists the names and
  shapes and :func:`iter_model` yields the tensors one by one on any device (the GPU benchmark's
  synthetic source).

Every value is a pure function of (seed, tensor name, model index, chunk index): each tensor is
generated in chunks of ``CHUNK`` elements, each chunk from its own seeded ``torch.Generator``.
So the checkpoints are the same whatever the thread count, they can be written tensor by tensor
(chunk by chunk) in bounded memory, and the chunks are generated in parallel threads. The
same seed gives the same values on every CPU; a CUDA generator gives other (equally seeded,
reproducible) values, which is fine for a synthetic GPU source.

Model 0 is the base: linear weights ~ N(0, 0.02²), norm weights ~ 1 + N(0, 0.02²), rounded to
bf16. Model i ≥ 1 is fine-tune i: bf16(f32(base) + N(0, 0.002²)).

Usage::

    python bench/gen_models.py --out /work/bench_data/l13x2            # base, ft1, ft2
    python bench/gen_models.py --tiny --out /tmp/tiny                  # smoke-test sizes
    python bench/gen_models.py --layers 40 --describe                  # l13 names/shapes only
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

CHUNK = 1 << 22                # elements per seeded chunk (fixed: part of the definition)
BASE_STD = 0.02                # std of the base weights
NORM_MEAN = 1.0                # RMSNorm weights are centred on 1
FINETUNE_STD = 0.002           # std of the fine-tune noise (docs/SPEC.md §6)
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" shards
FORMAT_VERSION = 1             # bump when the generated values change


@dataclass(frozen=True)
class LlamaShapes:
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    layers: int

    @property
    def n_params(self) -> int:
        return sum(_numel(shape) for _, shape in tensor_specs(self))


def llama2_13b(layers: int = 2) -> LlamaShapes:
    """Llama-2-13B shapes with ``layers`` decoder layers (2: l13x2, 40: l13)."""
    return LlamaShapes(hidden=5120, intermediate=13824, vocab=32000, heads=40, layers=layers)


def tiny(layers: int = 2) -> LlamaShapes:
    """A few-hundred-kilobyte Llama for smoke tests (odd intermediate size on purpose)."""
    return LlamaShapes(hidden=64, intermediate=172, vocab=128, heads=4, layers=layers)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_specs(shapes: LlamaShapes) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a ``LlamaForCausalLM`` with these shapes, in file order."""
    h, f, v = shapes.hidden, shapes.intermediate, shapes.vocab
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(shapes.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


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
    """The whole tensor ``name`` of model ``model`` (0 = base), bf16 on ``device``."""
    numel = _numel(shape)
    out = torch.empty(numel, dtype=torch.bfloat16, device=device)
    for c, n in _chunks(numel):
        out[c * CHUNK:c * CHUNK + n] = model_chunks(name, numel, seed, [model], c, device)[0]
    return out.view(shape)


def iter_model(shapes: LlamaShapes, seed: int, model: int, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, bf16 tensor) of one model, one tensor at a time (the in-memory ``l13``)."""
    for name, shape in tensor_specs(shapes):
        yield name, make_tensor(name, shape, seed, model, device)


# --------------------------------------------------------------------------- checkpoint writing

def plan_shards(specs, shard_bytes: int, elem_bytes: int = 2) -> list[list[tuple[str, tuple]]]:
    """Split the tensors, in order, into shards of at most ``shard_bytes`` (one tensor may exceed)."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = _numel(shape) * elem_bytes
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def safetensors_header(specs, dtype: str = "BF16", elem_bytes: int = 2) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``specs`` in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = _numel(shape) * elem_bytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors itself writes
    return struct.pack("<Q", len(raw)) + raw


def llama_config(shapes: LlamaShapes) -> dict:
    """A ``config.json`` that ``transformers.LlamaConfig`` (and mergekit) accept."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shapes.hidden,
        "intermediate_size": shapes.intermediate,
        "num_attention_heads": shapes.heads,
        "num_key_value_heads": shapes.heads,
        "num_hidden_layers": shapes.layers,
        "vocab_size": shapes.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}


def model_dir_names(n_finetunes: int) -> list[str]:
    return ["base"] + [f"ft{i}" for i in range(1, n_finetunes + 1)]


def generation_info(shapes: LlamaShapes, seed: int, n_finetunes: int, shard_bytes: int) -> dict:
    """What identifies a generated set: reused only when all of this matches."""
    return {"format_version": FORMAT_VERSION, "chunk": CHUNK, "seed": seed, "shapes": asdict(shapes),
            "n_finetunes": n_finetunes, "shard_bytes": shard_bytes,
            "base_std": BASE_STD, "finetune_std": FINETUNE_STD}


def existing_matches(out: Path, info: dict) -> bool:
    try:
        return json.loads((out / "generation.json").read_text()) == info
    except (OSError, ValueError):
        return False


def _write_chunks(files, chunks) -> None:
    for f, x in zip(files, chunks):
        f.write(x.view(torch.int16).numpy())


def write_checkpoints(out: Path, shapes: LlamaShapes, seed: int = 0, n_finetunes: int = 2,
                      shard_bytes: int = DEFAULT_SHARD_BYTES, threads: int | None = None,
                      quiet: bool = False) -> list[Path]:
    """Write base + ``n_finetunes`` checkpoint directories under ``out``; return their paths.

    All models are written in one pass, tensor by tensor and chunk by chunk (each base chunk
    is generated once and reused for the fine-tunes), with at most ``2 * threads`` chunks in
    flight: memory stays at a few hundred MB whatever the model size. The set is built in
    ``out.partial`` and renamed to ``out`` when complete.
    """
    out = Path(out)
    info = generation_info(shapes, seed, n_finetunes, shard_bytes)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    names = model_dir_names(n_finetunes)
    models = list(range(len(names)))
    specs = tensor_specs(shapes)
    shards = plan_shards(specs, shard_bytes)
    n_shards = len(shards)
    threads = threads or os.cpu_count() or 1
    for d in names:
        (tmp / d).mkdir(parents=True)
    t0, done, total = time.perf_counter(), 0, shapes.n_params
    last_print = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for s, shard in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            header = safetensors_header(shard)
            files = [open(tmp / d / fname, "wb") for d in names]
            try:
                for f in files:
                    f.write(header)
                for name, shape in shard:
                    numel = _numel(shape)
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
                        print(f"\r  {done / 1e6:8.1f} / {total / 1e6:.1f} M params per model "
                              f"({rate:.0f} M/s)", end="", file=sys.stderr, flush=True)
            finally:
                for f in files:
                    f.close()
    if not quiet:
        print(file=sys.stderr)
    weight_map = {name: f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
                  for s, shard in enumerate(shards) for name, _ in shard}
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for d in names:
        (tmp / d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / d / "config.json").write_text(json.dumps(llama_config(shapes), indent=2) + "\n")
        (tmp / d / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return [out / d for d in names]


def ensure_checkpoints(out: Path, shapes: LlamaShapes, seed: int = 0, n_finetunes: int = 2,
                       shard_bytes: int = DEFAULT_SHARD_BYTES, quiet: bool = False) -> list[Path]:
    """The checkpoint directories under ``out``, generated only if missing or different."""
    out = Path(out)
    info = generation_info(shapes, seed, n_finetunes, shard_bytes)
    if existing_matches(out, info):
        return [out / d for d in model_dir_names(n_finetunes)]
    return write_checkpoints(out, shapes, seed, n_finetunes, shard_bytes, quiet=quiet)


def parse_size(text: str) -> int:
    """'5G', '500M', '4096' -> bytes (decimal units, as Hugging Face's shard sizes)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().rstrip("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/bench_data/l13x2"),
                    help="directory that receives base/, ft1/, ft2/ (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetunes", type=int, default=2, help="number of fine-tunes (default: 2)")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama shapes (hidden 64) for smoke tests")
    ap.add_argument("--shard-size", default="5G", help="max bytes per safetensors shard (default: 5G)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    ap.add_argument("--describe", action="store_true",
                    help="print the tensor names and shapes (the in-memory l13 source) and exit")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    layers = args.layers if args.layers is not None else 2
    shapes = tiny(layers) if args.tiny else llama2_13b(layers)
    if args.describe:
        for name, shape in tensor_specs(shapes):
            print(f"{name}\t{list(shape)}")
        print(f"# {shapes.n_params:,} parameters per model", file=sys.stderr)
        return 0
    shard_bytes = parse_size(args.shard_size)
    info = generation_info(shapes, args.seed, args.finetunes, shard_bytes)
    if not args.force and existing_matches(args.out, info):
        print(f"{args.out}: up to date ({shapes.n_params:,} params per model)")
        return 0
    t0 = time.perf_counter()
    dirs = write_checkpoints(args.out, shapes, args.seed, args.finetunes, shard_bytes,
                             threads=args.threads, quiet=args.quiet)
    print(f"wrote {', '.join(str(d) for d in dirs)}: {shapes.n_params:,} params per model "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
