"""GPU kernel benchmark: stage B of every method vs the device-to-device copy ceiling, and TIES
end to end vs an eager-PyTorch mergekit-style TIES on the same GPU.

1. Ceiling: a large device-to-device ``copy_`` timed with CUDA events; bandwidth counts the bytes
   read plus the bytes written.
2. One 5120×13824 bf16 tensor (Llama-2-13B MLP), base + N = 2 fine-tunes (fine-tune = base +
   N(0, 0.002²), as docs/SPEC.md §6): stage B of each method through the Triton and the CUDA backend
   (stage A done once beforehand), as GB/s of bytes read + written and % of the ceiling
   (target ≥ 85 %).
3. Full TIES (stage A histograms + stage B, ``merge_tensors``, host syncs included) per backend,
   and the eager version (``bench/eager_mergekit_style.py`` when present, else a local minimal
   eager TIES, reported as such): the speed-up (target ≥ 20×).

Prints a table; ``--json PATH`` also writes every figure with the machine description. Without
a CUDA GPU it says so and exits 0 without measuring anything.

    python bench/bench_gpu.py                       # all methods, both backends
    python bench/bench_gpu.py --backends cuda --json bench/out/gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import m3kernels  # noqa: E402
from m3kernels.api import prepare  # noqa: E402
from m3kernels.backends import available_backends, get_backend  # noqa: E402
from m3kernels.merge.recipe import make_recipe  # noqa: E402

from bench_cases import METHODS  # noqa: E402

METHOD_KWARGS = {k: v for k, v in METHODS.items() if k != "ties_m3"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_PCT_OF_COPY = 85.0
TARGET_SPEEDUP = 20.0
FINETUNE_STD = 0.002


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=13824)
    ap.add_argument("--n", type=int, default=2, help="fine-tuned models (default 2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument(
        "--methods", default=",".join(METHOD_KWARGS), help=f"comma-separated, from {', '.join(METHOD_KWARGS)}"
    )
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated GPU backends")
    ap.add_argument("--copy-mib", type=int, default=2048, help="size of the D2D copy that sets the ceiling")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20, help="timed repetitions (the median is reported)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager mergekit-style TIES")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHOD_KWARGS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(METHOD_KWARGS)}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in ("cuda", "triton")]
    if bad:
        ap.error(f"unknown GPU backends {bad}; choose from cuda, triton")
    if args.n < 1 or args.repeat < 1 or args.warmup < 0 or args.rows < 1 or args.cols < 1:
        ap.error("--n, --repeat, --rows and --cols must be >= 1, --warmup >= 0")
    return args


def machine_info(device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "backends": available_backends(),
    }
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(device)
        info.update(
            gpu=prop.name,
            gpu_memory_bytes=prop.total_memory,
            sm_count=prop.multi_processor_count,
            driver=_driver_version(),
        )
    return info


def _driver_version():
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def time_events(fn, warmup: int, repeat: int) -> dict:
    """Median / min seconds of fn() on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def time_wall(fn, warmup: int, repeat: int) -> dict:
    """Median / min wall seconds of fn() including its host synchronisations."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def copy_ceiling(device, mib: int, warmup: int, repeat: int) -> dict:
    nbytes = mib << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), warmup, repeat)  # noqa: F821 (deleted after the timing)
    moved = 2 * nbytes  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_moved": moved, **t, "GBps": moved / t["median_s"] / 1e9}


def make_inputs(shape, n, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
    models = []
    for _ in range(n):
        noise = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, FINETUNE_STD, generator=g)
        models.append((base + noise).to(dtype))
    return base.to(dtype), models


def stage_b(backend_name, method, base, models, out, args) -> dict:
    be = get_backend(backend_name, base.device)
    kw = dict(METHOD_KWARGS[method])
    kw.pop("method")
    recipe = make_recipe(len(models), method=method, has_base=True, seed=args.seed, **kw)
    name = "model.layers.0.mlp.up_proj.weight"
    p, b = prepare(base, models, recipe, name, be)  # stage A once, outside the timing
    t = time_events(lambda: be.merge(p, b, models, out), args.warmup, args.repeat)
    moved = sum(m.numel() * m.element_size() for m in models) + out.numel() * out.element_size()
    if p.has_base:
        moved += base.numel() * base.element_size()
    return {"bytes_moved": moved, **t, "GBps": moved / t["median_s"] / 1e9}


def full_ties(backend_name, base, models, out, args) -> dict:
    kw = dict(METHOD_KWARGS["ties"])
    fn = lambda: m3kernels.merge_tensors(
        base,
        models,
        out=out,
        name="model.layers.0.mlp.up_proj.weight",  # noqa: E731
        backend=backend_name,
        seed=args.seed,
        **kw,
    )
    return time_wall(fn, args.warmup, max(3, args.repeat // 2))


# ----------------------------------------------------------------------------- eager baseline


def eager_ties_local(base, models, density=0.2):
    """Minimal eager TIES the way mergekit does it: float32 deltas, top-k magnitude masks,
    sign election on the summed deltas, disjoint mean of the agreeing deltas."""
    deltas = torch.stack([m.float() - base.float() for m in models])
    k = int(density * deltas[0].numel())
    for i in range(deltas.shape[0]):
        flat = deltas[i].view(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        flat.mul_(keep)
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas.sign() == sign) & (deltas != 0)
    num = (deltas * agree).sum(0)
    den = agree.sum(0).float()
    merged = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
    return (base.float() + merged).to(base.dtype)


def eager_ties_function():
    """(callable(base, models) -> tensor, description): the shared eager module's TIES if present."""
    try:
        mod = importlib.import_module("eager_mergekit_style")
    except ImportError as exc:
        return (
            lambda b, ms: eager_ties_local(b, ms, 0.2),
            f"local minimal eager TIES (bench/eager_mergekit_style.py not importable: {exc})",
        )
    fn = getattr(mod, "ties", None)
    if fn is None:
        return (
            lambda b, ms: eager_ties_local(b, ms, 0.2),
            "local minimal eager TIES (bench/eager_mergekit_style.py has no 'ties')",
        )
    params = inspect.signature(fn).parameters
    kwargs = {"density": 0.2} if "density" in params else {}
    return (lambda b, ms: fn(b, ms, **kwargs), f"eager_mergekit_style.ties{inspect.signature(fn)}")


def eager_ties(base, models, args) -> dict:
    fn, desc = eager_ties_function()
    try:
        t = time_wall(lambda: fn(base, models), 1, max(3, args.repeat // 4))
    except TypeError as exc:  # the shared module's signature differs from (base, models, density)
        desc = f"local minimal eager TIES (eager_mergekit_style.ties failed: {exc})"
        t = time_wall(lambda: eager_ties_local(base, models, 0.2), 1, max(3, args.repeat // 4))
    return {"impl": desc, **t}


# ----------------------------------------------------------------------------- report


def print_report(res: dict) -> None:
    c = res["copy_ceiling"]
    print(
        f"device: {res['machine'].get('gpu')}  torch {res['machine']['torch']}  CUDA {res['machine']['torch_cuda']}"
    )
    print(
        f"D2D copy ceiling: {c['GBps']:.1f} GB/s (read + write, {c['bytes_moved'] / 2**20:.0f} MiB moved, "
        f"{c['median_s'] * 1e3:.3f} ms)"
    )
    print(f"tensor {res['shape']} {res['dtype']}, base + N={res['n']}; stage B (median of {res['repeat']}):")
    print(f"  {'method':<16}{'backend':<8}{'ms':>9}{'GB/s':>9}{'% copy':>8}")
    for row in res["stage_b"]:
        if "error" in row:
            print(f"  {row['method']:<16}{row['backend']:<8}  error: {row['error']}")
            continue
        flag = "" if row["pct_of_copy"] >= TARGET_PCT_OF_COPY else "  (< target)"
        print(
            f"  {row['method']:<16}{row['backend']:<8}{row['median_s'] * 1e3:>9.3f}{row['GBps']:>9.1f}"
            f"{row['pct_of_copy']:>7.1f}%{flag}"
        )
    print("full TIES (stage A + B, host syncs included):")
    for row in res["full_ties"]:
        if "error" in row:
            print(f"  {row['backend']:<8} error: {row['error']}")
            continue
        sp = row.get("speedup_vs_eager")
        extra = (
            f"  speed-up vs eager {sp:.1f}x" + ("" if sp >= TARGET_SPEEDUP else " (< target)") if sp else ""
        )
        print(f"  {row['backend']:<8}{row['median_s'] * 1e3:>9.3f} ms{extra}")
    if res.get("eager"):
        e = res["eager"]
        print(f"  eager   {e['median_s'] * 1e3:>9.3f} ms  [{e['impl']}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        msg = (
            f"bench_gpu: no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "nothing measured"
        )
        print(msg)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"skipped": msg, "args": vars(args) | {"json": str(args.json)}}, indent=2)
            )
        return 0
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = (args.rows, args.cols)
    res = {
        "machine": machine_info(device),
        "shape": list(shape),
        "dtype": args.dtype,
        "n": args.n,
        "repeat": args.repeat,
        "targets": {"pct_of_copy": TARGET_PCT_OF_COPY, "speedup": TARGET_SPEEDUP},
    }
    res["copy_ceiling"] = copy_ceiling(device, args.copy_mib, args.warmup, args.repeat)
    ceiling = res["copy_ceiling"]["GBps"]
    base, models = make_inputs(shape, args.n, dtype, device, args.seed)
    out = torch.empty(shape, dtype=dtype, device=device)
    res["stage_b"] = []
    for method in args.methods:
        for be in args.backends:
            row = {"method": method, "backend": be}
            try:
                row.update(stage_b(be, method, base, models, out, args))
                row["pct_of_copy"] = 100.0 * row["GBps"] / ceiling
            except Exception as exc:  # one backend missing must not hide the others' figures
                row["error"] = f"{type(exc).__name__}: {exc}"
            res["stage_b"].append(row)
    res["eager"] = None if args.no_eager else eager_ties(base, models, args)
    res["full_ties"] = []
    for be in args.backends:
        row = {"backend": be}
        try:
            row.update(full_ties(be, base, models, out, args))
            if res["eager"]:
                row["speedup_vs_eager"] = res["eager"]["median_s"] / row["median_s"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        res["full_ties"].append(row)
    print_report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
