"""Data-statistics benchmark (CPU): ``m3kernels stats`` throughput, statistics file sizes, the
Fisher merge's bandwidth and RegMean's solve time per layer.

* A small Llama (default hidden 512, 4 layers, intermediate 1376, 8 heads / 4 KV heads, a
  byte-level BPE tokenizer trained on random-word text; ``m3kernels.datastats.tiny``) is trained
  2 steps and saved in float32; ``--examples`` texts of ~``--words`` words are its data.
* Stats throughput: tokens/s of ``compute_fisher`` (vmap, batch 4; loop, batch 1; sampled,
  batch 4) and ``compute_regmean`` (batch 8), end to end (model load and fingerprint included)
  and of the pass over the data alone (the run's time minus that of the same run on one
  example: model load, fingerprint and output), with the sizes of the files against the model's.
* Fisher merge: GB/s of the fused stage-B kernel (``fisher_merge``'s default backend: the C++
  kernel on the CPU) and of the chunked torch code (``backend="torch"``) over the 2N+1 streams (N
  bf16 models, N float32 Fisher tensors, one bf16 output) of a 4096 x 4096 tensor, N = 2, against
  the copy bandwidth over the same bytes in the same run (``m3kernels._C.copy``, the reference of
  the other benchmarks, and torch's ``copy_``). ``--fisher-only`` runs this part alone.
* RegMean: one layer at Llama-2-13B size, W 5120 x 5120, N = 2 float32 Grams, the float64
  Cholesky solve on the CPU and the float32 one with its residual check (``--big`` adds the
  13824-input down projection: minutes on 2 cores).

Usage: ``python bench/bench_datastats.py [--json bench/out/datastats.json] [--big]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3kernels.datastats import compute_fisher, compute_regmean  # noqa: E402
from m3kernels.datastats.tiny import make_tiny_llama, sample_texts  # noqa: E402
from m3kernels.merge.data_aware import fisher_backend, fisher_merge, regmean_merge  # noqa: E402


def folder_bytes(folder, suffix=".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(suffix))


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stats_runs(root: Path, args) -> list[dict]:
    model = root / "model"
    make_tiny_llama(
        model,
        sample_texts(64, words=args.words),
        hidden=args.hidden,
        layers=args.layers,
        heads=8,
        kv_heads=4,
        intermediate=args.intermediate,
        steps=2,
        vocab_size=400,
    )
    n_params = sum(
        t.numel()
        for t in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(str(model / "model.safetensors"))
        .values()
    )
    data = root / "data.txt"
    data.write_text("\n".join(sample_texts(args.examples, seed=3, words=args.words)) + "\n")
    one = root / "one.txt"
    one.write_text(sample_texts(1, seed=3, words=args.words)[0] + "\n")
    model_bytes = folder_bytes(model)
    rows = []
    runs = [
        ("fisher, vmap, batch 4", compute_fisher, dict(batch_size=4)),
        ("fisher, loop, batch 1", compute_fisher, dict(batch_size=1, per_example="loop")),
        ("fisher --sampled, vmap, batch 4", compute_fisher, dict(batch_size=4, sampled=True)),
        ("fisher, bf16 storage", compute_fisher, dict(batch_size=4, dtype="bfloat16")),
        ("regmean, batch 8", compute_regmean, dict(batch_size=8)),
    ]
    for i, (label, fn, kw) in enumerate(runs):
        load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        m = fn(model, data, root / f"s{i}", progress=False, **kw)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        c0, t0 = time.process_time(), time.perf_counter()
        fn(model, one, root / f"o{i}", progress=False, **kw)
        fixed, fixed_cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = m["counts"]["tokens"]
        loop = max(total - fixed, 1e-9)
        rows.append(
            {
                "run": label,
                "examples": m["counts"]["examples"],
                "tokens": tokens,
                "seconds": round(total, 2),
                "tokens_per_s_end_to_end": round(tokens / total, 1),
                "tokens_per_s_data_pass": round(tokens / loop, 1),
                "cpu_s": round(cpu, 2),
                "tokens_per_cpu_s_data_pass": round(tokens / max(cpu - fixed_cpu, 1e-9), 1),
                "load1": round((load0 + os.getloadavg()[0]) / 2, 2),
                "stats_bytes": folder_bytes(root / f"s{i}"),
                "model_bytes": model_bytes,
                "stats_over_model": round(folder_bytes(root / f"s{i}") / model_bytes, 3),
            }
        )
        print(json.dumps(rows[-1]))
    return rows, n_params


def fisher_bandwidth(args) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (4096, 4096)
    n = 2
    models = [torch.randn(shape, generator=g).bfloat16() for _ in range(n)]
    fishers = [torch.rand(shape, generator=g) for _ in range(n)]
    out = torch.empty(shape, dtype=torch.bfloat16)
    streams = sum(t.nbytes for t in models + fishers) + out.nbytes
    r = {"bytes": streams, "fused_backend": fisher_backend("auto", "cpu", n)}
    load0 = os.getloadavg()[0]
    src = torch.empty(streams // 2, dtype=torch.uint8)
    dst = torch.empty_like(src)
    fns = {
        "fused": lambda: fisher_merge(models, fishers, out=out),
        "torch_copy": lambda: dst.copy_(src),
    }
    try:
        from m3kernels import _C

        fns["kernel_copy"] = lambda: _C.copy(dst.data_ptr(), src.data_ptr(), src.nbytes)
    except ImportError:
        pass
    best = dict.fromkeys(fns, float("inf"))
    cpu = 0.0
    for _ in range(args.repeats):  # interleaved: the kernel and the copies see the same machine load
        for key, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
            cpu += time.process_time() - c0 if key == "fused" else 0.0
    r["fused_ms"] = round(best["fused"] * 1e3, 1)
    r["fused_GB_per_s"] = round(streams / best["fused"] / 1e9, 2)
    r["fused_cpu_s_per_call"] = round(cpu / args.repeats, 3)
    for key in ("kernel_copy", "torch_copy"):
        if key in best:
            r[f"{key}_GB_per_s"] = round(streams / best[key] / 1e9, 2)  # read + write of streams / 2
    c0 = time.process_time()
    t = best_of(lambda: fisher_merge(models, fishers, out=out, backend="torch"), max(1, args.repeats // 3))
    r["torch_chunked_ms"] = round(t * 1e3, 1)
    r["torch_chunked_GB_per_s"] = round(streams / t / 1e9, 2)
    r["torch_chunked_cpu_s_per_call"] = round((time.process_time() - c0) / max(1, args.repeats // 3), 3)
    copy_gbs = max(r.get("kernel_copy_GB_per_s", 0.0), r["torch_copy_GB_per_s"])
    r["fused_pct_of_copy"] = round(100 * r["fused_GB_per_s"] / copy_gbs, 1)
    r["torch_chunked_pct_of_copy"] = round(100 * r["torch_chunked_GB_per_s"] / copy_gbs, 1)
    r["load1"] = round((load0 + os.getloadavg()[0]) / 2, 2)
    print(json.dumps(r))
    return r


def regmean_solve(d_in: int, d_out: int, n: int = 2, repeats: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(d_out, d_in, generator=g).bfloat16() for _ in range(n)]
    grams = []
    for _ in range(n):
        x = torch.randn(d_in + 512, d_in, generator=g)
        grams.append(x.T @ x)
        del x
    r = {"layer": f"W {d_out} x {d_in}, N = {n}", "gram": f"{d_in}^2", "threads": torch.get_num_threads()}
    for precision in ("float64", "float32"):
        load0, c0 = os.getloadavg()[0], time.process_time()
        t = best_of(lambda p=precision: regmean_merge(ws, grams, precision=p), repeats)
        r[f"{precision}_s"] = round(t, 2)
        r[f"{precision}_cpu_s"] = round((time.process_time() - c0) / repeats, 2)
        r[f"{precision}_load1"] = round((load0 + os.getloadavg()[0]) / 2, 2)
    print(json.dumps(r))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also the 13824-input layer (minutes)")
    ap.add_argument("--skip-solve", action="store_true")
    ap.add_argument("--fisher-only", action="store_true", help="only the Fisher merge bandwidth")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            from m3kernels import _C

            _C.set_num_threads(args.threads)  # the fused kernel's OpenMP threads too
        except ImportError:
            pass
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load1_start": os.getloadavg()[0],
    }
    if not args.fisher_only:
        with tempfile.TemporaryDirectory() as tmp:
            res["stats"], res["model_params"] = stats_runs(Path(tmp), args)
    res["fisher_merge"] = fisher_bandwidth(args)
    if not args.skip_solve and not args.fisher_only:
        res["regmean"] = [regmean_solve(5120, 5120)]
        if args.big:
            res["regmean"].append(regmean_solve(13824, 5120))
    res["load1_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
