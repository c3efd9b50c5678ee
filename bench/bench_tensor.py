"""Tensor benchmark (CPU): the fused kernels against eager mergekit-style PyTorch on one tensor.

One Llama-2-13B MLP-sized tensor (default 5120 x 13824, bf16): a base ~ N(0, 0.02²) and N
fine-tunes bf16(base + N(0, 0.002²)), seeded. For each method (linear, task_arithmetic, ties,
dare_linear, dare_ties, ties_dare, ties with M³) it times, in this one process:

* ``full``: ``m3kernels.merge_tensors(..., backend="cpu")`` (stage A statistics + stage B);
* ``stage B``: the fused merge pass alone, with the stage A parameters prepared beforehand;
* ``eager``: ``eager_mergekit_style.eager_merge`` (argsort trim, bernoulli DARE, stacked
  float32 temporaries), the way mergekit computes the same merge;

and prints GB/s (bytes = every input read once + the output written once), that rate as a
percentage of the machine's copy bandwidth measured in the same run (the best of multi-threaded
memcpy through the extension, whole or in 64 KiB calls, and torch's ``copy_``, over a buffer as
large as the inputs), and the speed-up full vs eager. The 1-minute load average and the CPU time other processes used during
each measurement are recorded: a non-zero ``other_cpu_s`` means the timing shared the cores.

Usage::

    python bench/bench_tensor.py --json bench/out/tensor.json
    python bench/bench_tensor.py --size 1024x4096 --repeats 3 --eager-repeats 1   # quick look
    python bench/bench_tensor.py --only-kernel-pieces   # issue 8: the new kernel pieces alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m3kernels  # noqa: E402
from m3kernels.api import prepare  # noqa: E402
from m3kernels.backends import cpu as cpu_backend  # noqa: E402
from m3kernels.benchmark.machine import cpu_model  # noqa: E402
from m3kernels.benchmark.timing import Timing, time_call  # noqa: E402
from m3kernels.merge.mixup import draw_mix_ratios  # noqa: E402
from m3kernels.merge.recipe import make_recipe  # noqa: E402

from bench_cases import METHODS  # noqa: E402
from eager_mergekit_style import eager_merge  # noqa: E402

NAME = "model.layers.0.mlp.up_proj.weight"
SEED = 0


# ----------------------------------------------------------------------------- machine


def Timer(fn, repeats: int, warmup: int = 1) -> Timing:
    """Wall times of repeated calls, and the CPU time other processes used meanwhile (the
    package's timing; ``other_cpu_s`` nan rather than None where /proc/stat is missing)."""
    t = time_call(fn, repeats=repeats, warmup=warmup)
    if t.other_cpu_s is None:
        t.other_cpu_s = float("nan")
    return t


# ----------------------------------------------------------------------------- inputs


def make_tensors(shape, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base32 = torch.randn(shape, generator=gen) * 0.02
    base = base32.to(torch.bfloat16)
    models = []
    for _ in range(n):
        models.append((base.to(torch.float32) + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16))
    return base, models


def copy_bandwidth(nbytes: int, repeats: int) -> dict:
    """Bytes moved per second (read + write) by multi-threaded copies of nbytes, three ways:
    one memcpy per thread (glibc uses non-temporal stores for such sizes), memcpy in 64 KiB
    calls (regular stores), torch's ``copy_``. The best of them is the reference. The read-only
    rate (a multi-threaded pass over the words) is recorded too: merges read 3-4x more than they
    write, so they can move more bytes per second than a copy."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ext = cpu_backend._C
    one = Timer(lambda: ext.copy(dst.data_ptr(), src.data_ptr(), nbytes, 0), repeats)
    chunked = Timer(lambda: ext.copy(dst.data_ptr(), src.data_ptr(), nbytes, 1 << 16), repeats)
    tch = Timer(lambda: dst.copy_(src), repeats)
    read = Timer(lambda: ext.read(src.data_ptr(), nbytes), repeats)
    res = {
        "bytes": nbytes,
        "memcpy_gbps": 2 * nbytes / one.best / 1e9,
        "memcpy_64k_chunks_gbps": 2 * nbytes / chunked.best / 1e9,
        "torch_copy_gbps": 2 * nbytes / tch.best / 1e9,
        "read_only_gbps": nbytes / read.best / 1e9,
        "other_cpu_s": one.other_cpu_s + chunked.other_cpu_s + tch.other_cpu_s,
    }
    res["reference_gbps"] = max(res["memcpy_gbps"], res["memcpy_64k_chunks_gbps"], res["torch_copy_gbps"])
    return res


# ----------------------------------------------------------------------------- one method


def bench_method(label: str, kw: dict, base, models, args, copy_gbps: float) -> dict:
    n = len(models)
    kw = dict(kw)
    eager_kw = {k: v for k, v in kw.items() if k != "mixup_alpha"}
    if "mixup_alpha" in kw:
        eager_kw["mix_ratios"] = list(draw_mix_ratios(kw["mixup_alpha"], n, SEED))
    recipe = make_recipe(n, has_base=True, seed=SEED, **kw)
    uses_base = recipe.uses_base
    elem = base.element_size()
    nbytes = base.numel() * elem * (n + (1 if uses_base else 0) + 1)
    out = torch.empty_like(base)

    def full():
        m3kernels.merge_tensors(base, models, backend="cpu", out=out, name=NAME, seed=SEED, **kw)

    p, b = prepare(base, models, recipe, NAME, cpu_backend)

    def stage_b():
        cpu_backend.merge(p, b, models, out)

    t_full = Timer(full, args.repeats)
    t_b = Timer(stage_b, args.repeats)
    ours = out.clone()
    eager_out = {}

    def eager():
        eager_out["t"] = eager_merge(base, models, seed=SEED, **eager_kw)

    t_eager = Timer(eager, args.eager_repeats, warmup=0)
    same = float((eager_out["t"] == ours).to(torch.float64).mean())
    res = {
        "method": label,
        "args": kw,
        "bytes": nbytes,
        "full_s": t_full.best,
        "full_median_s": t_full.median,
        "stage_b_s": t_b.best,
        "stage_b_median_s": t_b.median,
        "eager_s": t_eager.best,
        "full_gbps": nbytes / t_full.best / 1e9,
        "stage_b_gbps": nbytes / t_b.best / 1e9,
        "eager_gbps": nbytes / t_eager.best / 1e9,
        "stage_b_pct_copy": 100 * nbytes / t_b.best / 1e9 / copy_gbps,
        "full_pct_copy": 100 * nbytes / t_full.best / 1e9 / copy_gbps,
        "speedup_vs_eager": t_eager.best / t_full.best,
        "equal_to_eager_fraction": same,
        "other_cpu_s": {"full": t_full.other_cpu_s, "stage_b": t_b.other_cpu_s, "eager": t_eager.other_cpu_s},
        "load_avg_1m": os.getloadavg()[0],
    }
    return res


# ----------------------------------------------------------------------------- family methods

# methods with their own stage A (registry ``family``): stage A = the family hook, stage B = the
# kernel pass on its parameters; no eager baseline here (bench/mergekit_parity.py compares them
# with mergekit itself)
FAMILY_METHODS = {
    "sce": dict(method="sce", select_topk=0.3),
    "sce_no_select": dict(method="sce"),
    "arcee_fusion": dict(method="arcee_fusion"),  # one model (its first)
    "della": dict(method="della", density=0.5, epsilon=0.15),
    "della_linear": dict(method="della_linear", density=0.5, epsilon=0.15),
}


def bench_family_method(label: str, kw: dict, base, models, args, copy_gbps: float) -> dict:
    from m3kernels.merge.methods import stage

    models = models[:1] if kw["method"] == "arcee_fusion" else models
    n = len(models)
    recipe = make_recipe(n, has_base=True, seed=SEED, **kw)
    nbytes = base.numel() * base.element_size() * (n + 2)
    out = torch.empty_like(base)
    staged = {}

    def stage_a():
        staged["st"] = stage(base, models, recipe, NAME, cpu_backend)

    t_a = Timer(stage_a, args.repeats)
    st = staged["st"]

    def stage_b():
        cpu_backend.merge(st.params, st.base, st.models, out)

    t_b = Timer(stage_b, args.repeats)
    return {
        "method": label,
        "args": kw,
        "n": n,
        "bytes": nbytes,
        "stage_a_s": t_a.best,
        "stage_a_median_s": t_a.median,
        "stage_b_s": t_b.best,
        "stage_b_median_s": t_b.median,
        "full_s": t_a.best + t_b.best,
        "stage_b_gbps": nbytes / t_b.best / 1e9,
        "stage_b_pct_copy": 100 * nbytes / t_b.best / 1e9 / copy_gbps,
        "full_pct_copy": 100 * nbytes / (t_a.best + t_b.best) / 1e9 / copy_gbps,
        "other_cpu_s": {"stage_a": t_a.other_cpu_s, "stage_b": t_b.other_cpu_s},
        "load_avg_1m": os.getloadavg()[0],
    }


# ----------------------------------------------------------------------------- issue-8 kernel pieces


def bench_kernel_pieces(base, models, args, copy_gbps: float) -> list:
    """The issue-8 pieces of docs/KERNEL.md straight on the CPU kernels (stage B ``merge`` with hand-made
    KernelParams, stage A ``gram`` / ``ram_counts``), next to the plain task_arithmetic pass: the
    kernels' own rate, whatever the method layer around them does. Bytes: inputs read once + output."""
    import numpy as np

    from m3kernels.merge.kernel_params import (
        COMBINE_NEARSWAP,
        COMBINE_RAM,
        GROUP_COLUMN,
        GROUP_ROW,
        make_params,
    )

    n, shape = len(models), tuple(base.shape)
    rows, cols = (shape[0], shape[-1]) if len(shape) > 1 else (1, shape[0])
    elem = base.element_size()
    ta = make_params(make_recipe(n, has_base=True, method="task_arithmetic", seed=SEED), NAME, True)
    raw = make_params(make_recipe(2, has_base=False, method="linear", seed=SEED), NAME, False)
    gen = torch.Generator().manual_seed(SEED)
    row_coef = (torch.rand(rows * 2, generator=gen) + 0.1).numpy().astype(np.float32)
    col_coef = (torch.rand(cols * 2, generator=gen) + 0.1).numpy().astype(np.float32)
    mid = int(np.float32(0.002).view(np.uint32))
    window = ta.with_trim([int(np.float32(0.0005).view(np.uint32))] * n, [mid] * n)
    out = torch.empty_like(base)
    pair = [base, models[0]]  # slerp-like: raw values, base as model 0, no base
    cases = [
        ("task_arithmetic", "B", ta, base, models, n + 2),
        ("trim window", "B", window, base, models, n + 2),
        (
            "group row (raw)",
            "B",
            raw.with_fields(coef_group=GROUP_ROW, row_len=cols, group_coef=row_coef),
            None,
            pair,
            3,
        ),
        (
            "group col (raw)",
            "B",
            raw.with_fields(coef_group=GROUP_COLUMN, row_len=cols, group_coef=col_coef),
            None,
            pair,
            3,
        ),
        (
            "nearswap",
            "B",
            make_params(make_recipe(1, has_base=True, method="task_arithmetic"), NAME, True).with_fields(
                combine=COMBINE_NEARSWAP, clip_t=0.001
            ),
            base,
            models[:1],
            3,
        ),
        ("ram", "B", ta.with_fields(combine=COMBINE_RAM, ram_eps=1e-5), base, models, n + 2),
        (
            "ramplus_tl",
            "B",
            ta.with_fields(combine=COMBINE_RAM, ram_eps=1e-5, unique_scale=[1.5] * n),
            base,
            models,
            n + 2,
        ),
        ("gram tensor", "A", ta, base, models, n + 1),
        ("gram row", "A", ta.with_fields(coef_group=GROUP_ROW, row_len=cols), base, models, n + 1),
        ("gram column", "A", ta.with_fields(coef_group=GROUP_COLUMN, row_len=cols), base, models, n + 1),
        ("ram_counts", "A", ta.with_fields(combine=COMBINE_RAM, ram_eps=1e-5), base, models, n + 1),
    ]
    print(f"issue-8 kernel pieces ({shape}, N = {n}; B: stage B merge, A: stage A pass)")
    print(f"{'piece':18s} {'stage':>5s} {'ms':>8s} {'GB/s':>7s} {'%copy':>6s} {'other cpu s':>11s}")
    results = []
    for label, stage, p, b, ms, tensors in cases:
        if stage == "B":
            fn = lambda p=p, b=b, ms=ms: cpu_backend.merge(p, b, ms, out)  # noqa: E731
        elif label.startswith("gram"):
            fn = lambda p=p, b=b, ms=ms: cpu_backend.gram(p, b, ms)  # noqa: E731
        else:
            fn = lambda p=p, b=b, ms=ms: cpu_backend.ram_counts(p, b, ms)  # noqa: E731
        t = Timer(fn, args.repeats)
        nbytes = base.numel() * elem * tensors
        r = {
            "piece": label,
            "stage": stage,
            "bytes": nbytes,
            "best_s": t.best,
            "median_s": t.median,
            "gbps": nbytes / t.best / 1e9,
            "pct_copy": 100 * nbytes / t.best / 1e9 / copy_gbps,
            "other_cpu_s": t.other_cpu_s,
        }
        results.append(r)
        print(
            f"{label:18s} {stage:>5s} {t.best * 1e3:8.1f} {r['gbps']:7.2f} {r['pct_copy']:5.0f}% {t.other_cpu_s:11.1f}",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="5120x13824", help="tensor shape, e.g. 5120x13824")
    ap.add_argument("--n", type=int, default=2, help="number of fine-tuned models")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls of our kernels (best kept)")
    ap.add_argument("--eager-repeats", type=int, default=1, help="timed calls of the eager merge")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--kernel-pieces", action="store_true", help="also time the issue-8 kernel pieces (docs/KERNEL.md)"
    )
    ap.add_argument("--only-kernel-pieces", action="store_true", help="time only the issue-8 kernel pieces")
    ap.add_argument(
        "--family-methods",
        default="",
        help=f"also time these methods with their own stage A ({', '.join(FAMILY_METHODS)}): stage A, stage B",
    )
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.size.lower().split("x"))
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    base, models = make_tensors(shape, args.n, SEED)
    in_bytes = base.numel() * base.element_size() * (args.n + 1)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kernel_threads": cpu_backend._C.get_num_threads(),
        "simd": cpu_backend.simd_level(),
        "simd_available": cpu_backend.simd_levels(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(
        f"{machine['cpu']}, {machine['cores']} cores, kernel variant {machine['simd']}, "
        f"{machine['kernel_threads']} threads; tensor {shape} bf16, N = {args.n}"
    )
    copy = copy_bandwidth(in_bytes, args.repeats)
    copy_gbps = copy["reference_gbps"]
    print(
        f"copy bandwidth (read + write, {in_bytes / 1e6:.0f} MB buffer): memcpy "
        f"{copy['memcpy_gbps']:.1f} GB/s, memcpy in 64 KiB calls {copy['memcpy_64k_chunks_gbps']:.1f}, "
        f"torch copy_ {copy['torch_copy_gbps']:.1f}; reference {copy_gbps:.1f} GB/s "
        f"(read-only: {copy['read_only_gbps']:.1f} GB/s)"
    )
    header = (
        f"{'method':16s} {'full ms':>8s} {'stageB ms':>9s} {'eager ms':>9s} {'full GB/s':>9s} "
        f"{'B GB/s':>7s} {'B %copy':>7s} {'speed-up':>8s} {'=eager':>7s} {'other cpu s':>11s}"
    )
    print(header)
    results = []
    pieces = (
        bench_kernel_pieces(base, models, args, copy_gbps)
        if args.kernel_pieces or args.only_kernel_pieces
        else []
    )
    if args.only_kernel_pieces:
        methods = []
    for m in methods:
        r = bench_method(m, METHODS[m], base, models, args, copy_gbps)
        results.append(r)
        oc = r["other_cpu_s"]
        print(
            f"{m:16s} {r['full_s'] * 1e3:8.1f} {r['stage_b_s'] * 1e3:9.1f} {r['eager_s'] * 1e3:9.0f} "
            f"{r['full_gbps']:9.2f} {r['stage_b_gbps']:7.2f} {r['stage_b_pct_copy']:6.0f}% "
            f"{r['speedup_vs_eager']:7.1f}x {100 * r['equal_to_eager_fraction']:6.1f}% "
            f"{oc['full'] + oc['stage_b']:5.1f}/{oc['eager']:5.1f}",
            flush=True,
        )
    family = []
    for m in [m for m in args.family_methods.split(",") if m]:
        if m not in FAMILY_METHODS:
            ap.error(f"unknown family method {m!r}; choose from {', '.join(FAMILY_METHODS)}")
        r = bench_family_method(m, FAMILY_METHODS[m], base, models, args, copy_gbps)
        family.append(r)
        oc = r["other_cpu_s"]
        print(
            f"{m:16s} stage A {r['stage_a_s'] * 1e3:8.1f} ms, stage B {r['stage_b_s'] * 1e3:7.1f} ms "
            f"({r['stage_b_gbps']:.2f} GB/s, {r['stage_b_pct_copy']:.0f}% of copy; full "
            f"{r['full_pct_copy']:.0f}%), N = {r['n']}, other cpu {oc['stage_a'] + oc['stage_b']:.1f} s",
            flush=True,
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "shape": shape,
                    "n": args.n,
                    "copy": copy,
                    "results": results,
                    "kernel_pieces": pieces,
                    "family_methods": family,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
