"""GPU streaming benchmark: the ``l13`` model (docs/SPEC.md §6) through ``gpu_merge_stream``.

Llama-2-13B shapes, 40 layers (``--layers`` shrinks it), bf16, base + 2 fine-tunes, from a
synthetic in-memory source: per distinct tensor size, one seeded pool buffer per model (generated
once with ``bench/gen_models.py``'s generator, fine-tune = base + N(0, 0.002²)), and every tensor
is a view into it at a per-layer offset. So host RAM stays bounded (~1.6 GB of pools for l13) and
producing a tensor costs nothing: the benchmark measures the pipeline, not the generator.
``--source pageable`` (default) behaves like memory-mapped checkpoints (the pipeline stages
through its pinned buffers); ``--source pinned`` lets it upload straight from the pools.

Reported: wall time of the whole stream, host-to-device bytes/s, peak GPU memory, and the ratio
to the pure copy time of the same bytes (every tensor's inputs uploaded and its output downloaded
from pinned buffers, uploads and downloads on two streams, no kernels; target ≤ 1.3×).

    python bench/bench_gpu_pipeline.py                         # l13, TIES, auto backend
    python bench/bench_gpu_pipeline.py --layers 4 --method dare_ties --json bench/out/pipe.json
    python bench/bench_gpu_pipeline.py --layers 2 --describe   # sizes only, no GPU needed
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from m3kernels.backends import available_backends  # noqa: E402
from m3kernels.merge.job import MergeJob  # noqa: E402
from m3kernels.merge.recipe import make_recipe  # noqa: E402

from gen_models import llama2_13b, make_tensor, tensor_specs  # noqa: E402

TARGET_RATIO = 1.3
LAYER_SHIFT = 64  # elements between the views of consecutive layers inside a pool buffer
METHOD_KWARGS = {
    "linear": dict(),
    "task_arithmetic": dict(),
    "ties": dict(density=0.2),
    "dare_linear": dict(density=0.5),
    "dare_ties": dict(density=0.5),
    "ties_dare": dict(drop_rate=0.5, density=0.2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=40, help="decoder layers (40 = l13)")
    ap.add_argument("--n", type=int, default=2, help="fine-tuned models (default 2)")
    ap.add_argument("--method", choices=sorted(METHOD_KWARGS), default="ties")
    ap.add_argument("--backend", choices=["auto", "cuda", "triton"], default="auto")
    ap.add_argument("--depth", type=int, default=2, help="tensor sets in flight on the GPU")
    ap.add_argument("--source", choices=["pageable", "pinned"], default="pageable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--check",
        type=int,
        default=2,
        help="compare the first CHECK results with per-tensor merge_tensors (0: off)",
    )
    ap.add_argument("--describe", action="store_true", help="print the model's sizes and exit")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.layers < 0 or args.n < 1 or args.depth < 1 or args.check < 0:
        ap.error("--layers must be >= 0, --n and --depth >= 1, --check >= 0")
    return args


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(specs, n_models: int, elem: int = 2) -> dict:
    params = sum(numel(s) for _, s in specs)
    sizes = sorted({numel(s) for _, s in specs})
    return {
        "tensors": len(specs),
        "params_per_model": params,
        "h2d_bytes": params * elem * (n_models + 1),
        "d2h_bytes": params * elem,
        "largest_tensor_elems": sizes[-1] if sizes else 0,
        "distinct_sizes": len(sizes),
    }


class SyntheticSource:
    """Views of seeded per-size pool buffers: tensor (name, layer) of model i, in O(1)."""

    def __init__(self, specs, n_models: int, seed: int, pinned: bool, gen_device):
        self.layers = 1 + max((self._layer(name) for name, _ in specs), default=0)
        self.pools = {}  # numel -> [buffer of model 0 (base), 1, ..., n]
        for size in sorted({numel(s) for _, s in specs}):
            length = size + LAYER_SHIFT * self.layers
            bufs = []
            for m in range(n_models + 1):
                t = make_tensor(f"pool/{size}", (length,), seed, m, device=gen_device).cpu()
                bufs.append(t.pin_memory() if pinned else t)
            self.pools[size] = bufs
        self.host_bytes = sum(b.numel() * b.element_size() for bufs in self.pools.values() for b in bufs)

    @staticmethod
    def _layer(name: str) -> int:
        parts = name.split(".")
        return int(parts[2]) + 1 if len(parts) > 2 and parts[1] == "layers" else 0

    def tensor(self, name: str, shape, model: int) -> torch.Tensor:
        off = self._layer(name) * LAYER_SHIFT
        return self.pools[numel(shape)][model][off : off + numel(shape)].view(shape)


def make_jobs(specs, source: SyntheticSource, recipe, n: int):
    for name, shape in specs:
        yield MergeJob(
            name=name,
            base=source.tensor(name, shape, 0),
            models=[source.tensor(name, shape, i) for i in range(1, n + 1)],
            out_dtype=torch.bfloat16,
            recipe=recipe,
        )


def pure_copy_time(specs, n: int, device) -> dict:
    """Upload every tensor's inputs and download its output, pinned <-> device, no kernels."""
    largest = max(numel(s) for _, s in specs) * 2
    host_in = torch.empty(largest * (n + 1), dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
    dev = [torch.empty(largest * (n + 1), dtype=torch.uint8, device=device) for _ in range(2)]
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)
    uploaded = [torch.cuda.Event() for _ in range(2)]
    downloaded = [torch.cuda.Event() for _ in range(2)]

    def run(with_download: bool) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for k, (_, shape) in enumerate(specs):
            nbytes = numel(shape) * 2
            slot = k % 2
            with torch.cuda.stream(up):
                up.wait_event(downloaded[slot])
                dev[slot][: nbytes * (n + 1)].copy_(host_in[: nbytes * (n + 1)], non_blocking=True)  # noqa: F821 (deleted after the timing)
                uploaded[slot].record(up)
            if with_download:
                with torch.cuda.stream(down):
                    down.wait_event(uploaded[slot])
                    host_out[:nbytes].copy_(dev[slot][:nbytes], non_blocking=True)  # noqa: F821 (deleted after the timing)
                    downloaded[slot].record(down)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    run(True)  # warm-up
    both, h2d_only = run(True), run(False)
    del host_in, host_out, dev
    torch.cuda.empty_cache()
    return {"copy_s": both, "h2d_only_s": h2d_only}


def check_results(specs, source, recipe, n, backend, device, results) -> list:
    """Names of the results that differ from a per-tensor prepare + merge on the same backend."""
    from m3kernels.api import prepare
    from m3kernels.backends import get_backend

    be = get_backend(backend, device)
    bad = []
    for (name, shape), result in zip(specs, results):
        base = source.tensor(name, shape, 0).to(device)
        models = [source.tensor(name, shape, i).to(device) for i in range(1, n + 1)]
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        p, b = prepare(base, models, recipe, name, be)
        be.merge(p, b, models, out)
        if not torch.equal(out.cpu().view(torch.int16), result.view(torch.int16)):
            bad.append(name)
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = tensor_specs(llama2_13b(args.layers))
    sizes = describe(specs, args.n)
    print(
        f"l13 shapes, {args.layers} layers: {sizes['tensors']} tensors, {sizes['params_per_model'] / 1e9:.2f} B "
        f"params per model, {sizes['h2d_bytes'] / 1e9:.1f} GB up, {sizes['d2h_bytes'] / 1e9:.1f} GB down"
    )
    if args.describe:
        return 0
    if not torch.cuda.is_available():
        msg = (
            f"bench_gpu_pipeline: no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is "
            "False); nothing measured"
        )
        print(msg)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"skipped": msg, "sizes": sizes}, indent=2))
        return 0
    from m3kernels.checkpoint.gpu_pipeline import gpu_merge_stream

    device = torch.device(args.device)
    recipe = make_recipe(
        args.n, method=args.method, has_base=True, seed=args.seed, **METHOD_KWARGS[args.method]
    )
    t0 = time.perf_counter()
    source = SyntheticSource(specs, args.n, args.seed, args.source == "pinned", device)
    gen_s = time.perf_counter() - t0
    print(
        f"synthetic source: {source.host_bytes / 1e9:.2f} GB of {args.source} pools, built in {gen_s:.1f} s"
    )

    # warm-up: backend initialisation, kernel compilation, pinned pools, on a few small tensors
    warm = [s for s in specs if numel(s[1]) <= 5120 * 5120][:4]
    for _ in gpu_merge_stream(
        make_jobs(warm, source, recipe, args.n), device=device, backend=args.backend, depth=args.depth
    ):
        pass
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device)

    kept, d2h = [], 0
    t0 = time.perf_counter()
    for _job, result in gpu_merge_stream(
        make_jobs(specs, source, recipe, args.n), device=device, backend=args.backend, depth=args.depth
    ):
        d2h += result.numel() * result.element_size()
        if len(kept) < args.check:
            kept.append(result.clone())
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base_mem

    copy = pure_copy_time(specs, args.n, device)
    bad = check_results(specs[: args.check], source, recipe, args.n, args.backend, device, kept)
    res = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": available_backends(),
        "torch_threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": sizes,
        "source_host_bytes": source.host_bytes,
        "source_build_s": gen_s,
        "wall_s": wall,
        "h2d_GBps": sizes["h2d_bytes"] / wall / 1e9,
        "d2h_bytes": d2h,
        "peak_gpu_bytes": peak,
        "largest_tensor_set_bytes": sizes["largest_tensor_elems"] * 2 * (args.n + 2),
        **copy,
        "ratio_to_copy": wall / copy["copy_s"],
        "target_ratio": TARGET_RATIO,
        "checked": len(kept),
        "check_mismatches": bad,
    }
    print(
        f"device {res['gpu']}, backend {args.backend}, method {args.method}, depth {args.depth}, "
        f"source {args.source}"
    )
    print(
        f"wall {wall:.2f} s   host->device {res['h2d_GBps']:.1f} GB/s   peak GPU memory "
        f"{peak / 2**30:.2f} GiB (largest tensor set {res['largest_tensor_set_bytes'] / 2**30:.2f} GiB)"
    )
    print(
        f"pure copy of the same bytes {copy['copy_s']:.2f} s (uploads only {copy['h2d_only_s']:.2f} s): "
        f"ratio {res['ratio_to_copy']:.2f}x (target <= {TARGET_RATIO}x)"
    )
    print(
        f"checked {len(kept)} results against per-tensor merges: "
        f"{'all equal' if not bad else 'MISMATCH in ' + ', '.join(bad)}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
