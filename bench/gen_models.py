"""Seeded synthetic Llama checkpoints for the benchmarks (docs/SPEC.md §6).

The generator is :mod:`m3kernels.synthetic` (the package's one checkpoint factory, shared with
the tests and ``m3kernels demo``); this script is its command line, and its names below stay
importable from here (``from gen_models import llama2_13b, iter_model``).

* ``l13x2``: Llama-2-13B tensor shapes (hidden 5120, intermediate 13824, vocab 32000, 40
  heads) with 2 decoder layers, bf16: a base model and fine-tunes (fine-tune = base +
  N(0, 0.002²) noise), 962 M parameters each, written as Hugging Face checkpoint directories
  (sharded safetensors + ``model.safetensors.index.json`` + ``config.json`` +
  ``generation_config.json``).
* ``l13``: the same shapes with all 40 layers (13.0 B parameters per model). Too big for this
  disk four times over, so it is described in memory: :func:`tensor_specs` lists the names and
  shapes and :func:`iter_model` yields the tensors one by one on any device (the GPU benchmark's
  synthetic source).

Sizes (``--shard-size``) are read by the ``m3kernels`` command line's parser: ``5G`` is 5·2³⁰
bytes, ``5GB`` is 5·10⁹ (Hugging Face's "5GB", the default).

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
import sys
import time
from pathlib import Path

from m3kernels.cli import parse_size
from m3kernels.synthetic import (  # noqa: F401  (re-exported: bench_mergekit, bench_gpu_pipeline)
    BASE_STD,
    CHUNK,
    DEFAULT_SHARD_BYTES,
    FINETUNE_STD,
    FORMAT_VERSION,
    GENERATION_CONFIG,
    LlamaShapes,
    chunk_seed,
    existing_matches,
    generation_info,
    iter_model,
    llama2_13b,
    make_tensor,
    model_chunks,
    model_dir_names,
    plan_shards,
    safetensors_header,
    tiny,
)
from m3kernels.synthetic import ensure_streamed_family as ensure_checkpoints  # noqa: F401
from m3kernels.synthetic import write_streamed_family as write_checkpoints


def tensor_specs(shapes: LlamaShapes) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a ``LlamaForCausalLM`` with these shapes, in file order."""
    return shapes.specs()


def llama_config(shapes: LlamaShapes) -> dict:
    """A ``config.json`` that ``transformers.LlamaConfig`` (and mergekit) accept."""
    return shapes.config()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("/work/bench_data/l13x2"),
        help="directory that receives base/, ft1/, ft2/ (default: %(default)s)",
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetunes", type=int, default=2, help="number of fine-tunes (default: 2)")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama shapes (hidden 64) for smoke tests")
    ap.add_argument(
        "--shard-size",
        type=parse_size,
        default="5GB",
        help="max bytes per safetensors shard, read as the m3kernels command line reads sizes: "
        "binary K/M/G (5G = 5*2**30), decimal KB/MB/GB (5GB = 5*10**9) or bytes "
        "(default: %(default)s)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    ap.add_argument(
        "--describe",
        action="store_true",
        help="print the tensor names and shapes (the in-memory l13 source) and exit",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    layers = args.layers if args.layers is not None else 2
    shapes = tiny(layers) if args.tiny else llama2_13b(layers)
    if args.describe:
        for name, shape in tensor_specs(shapes):
            print(f"{name}\t{list(shape)}")
        print(f"# {shapes.n_params:,} parameters per model", file=sys.stderr)
        return 0
    shard_bytes = args.shard_size
    info = generation_info(shapes, args.seed, args.finetunes, shard_bytes)
    if not args.force and existing_matches(args.out, info):
        print(f"{args.out}: up to date ({shapes.n_params:,} params per model)")
        return 0
    t0 = time.perf_counter()
    dirs = write_checkpoints(
        args.out, shapes, args.seed, args.finetunes, shard_bytes, threads=args.threads, quiet=args.quiet
    )
    print(
        f"wrote {', '.join(str(d) for d in dirs)}: {shapes.n_params:,} params per model "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
