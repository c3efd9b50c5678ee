"""Distributed merge benchmark (issue 13): the per-rank split of a 40-layer Llama-2-13B merge, and
``l13x2`` merged by 1 process vs K processes on this machine.

1. **Plan** (no data read): a 40-layer ``l13`` family (base + 2 fine-tunes, bf16, Hugging Face
   5 GB shards) is written as *sparse* files — real safetensors headers, data left as holes, so
   3 × 26 GB take a few MB of disk — and ``merge_checkpoints(..., dry_run=True, ranks=K)`` plans
   the split for K = 2, 4, 8: output and input bytes per rank, and the largest share over the
   mean (1.00 = perfect; the split is whole output shards, so it is within one shard).
2. **Timing**: the ``l13x2`` TIES merge (``bench/configs/ties.yaml``) by one process and by
   ``torchrun --standalone --nproc-per-node K`` (each process with ``OMP_NUM_THREADS=1``, as the
   issue asks, so the split itself is what is measured), ``--out-shard-size`` small enough that
   every rank has shards; the outputs are compared file by file.

Usage::

    python bench/bench_distributed.py --plan-only
    python bench/bench_distributed.py --data /work/bench_data/l13x2 --json bench/out/distributed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3kernels.synthetic import (  # noqa: E402
    llama2_13b,
    plan_shards,
    safetensors_header,
    shard_file_name,
    write_index,
)

HF_SHARD = 5 * 10**9


def write_sparse_checkpoint(folder: Path, shapes) -> None:
    """Headers for real, data as holes: a checkpoint that validates and plans but reads as zeros."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(shapes.specs(), HF_SHARD)
    weight_map, total = {}, 0
    for i, specs in enumerate(groups):
        name = shard_file_name(i, len(groups))
        head = safetensors_header(specs)
        data = sum(2 * math.prod(s) for _, s in specs)
        with open(folder / name, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data)
        for n, _ in specs:
            weight_map[n] = name
        total += data
    write_index(folder, weight_map, total)
    (folder / "config.json").write_text(json.dumps(shapes.config()))


def plan_split(ks=(2, 4, 8)) -> list:
    import m3kernels

    rows = []
    with tempfile.TemporaryDirectory(prefix="m3k-l13-") as tmp:
        tmp = Path(tmp)
        shapes = llama2_13b(layers=40)
        for name in ("base", "ft1", "ft2"):
            write_sparse_checkpoint(tmp / name, shapes)
        cfg = {
            "merge_method": "ties",
            "base_model": str(tmp / "base"),
            "models": [{"model": str(tmp / m), "parameters": {"density": 0.2}} for m in ("ft1", "ft2")],
        }
        for k, shard in [(k, s) for s in (HF_SHARD, 1 << 30) for k in ks]:
            plan = m3kernels.merge_checkpoints(cfg, tmp / "out", dry_run=True, ranks=k, out_shard_size=shard)
            out_b = [sum(t.nbytes for i in run for t in plan.shards[i].tensors) for run in plan.rank_shares]
            mean = sum(out_b) / k
            rows.append(
                {
                    "K": k,
                    "out_shard_size": "5GB" if shard == HF_SHARD else "1GiB",
                    "shards": len(plan.shards),
                    "output_GB_per_rank": [round(b / 1e9, 2) for b in out_b],
                    "input_GB_per_rank": [round(3 * b / 1e9, 2) for b in out_b],
                    "max_over_mean": round(max(out_b) / mean, 3),
                }
            )
    return rows


def _run(cmd, env) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def time_split(data: Path, ks=(2,), shard="256M") -> list:
    cfg_text = (ROOT / "bench/configs/ties.yaml").read_text().replace("/work/bench_data/l13x2", str(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3k-dist-", dir=data.parent) as tmp:
        tmp = Path(tmp)
        cfg = tmp / "ties.yaml"
        cfg.write_text(cfg_text)
        for p in data.glob("*/*.safetensors"):  # page cache warm for every run
            with open(p, "rb") as f:
                while f.read(1 << 26):
                    pass
        m3k = [sys.executable, "-m", "m3kernels", "merge", str(cfg)]
        opts = ["--device", "cpu", "--quiet", "--out-shard-size", shard]
        one = _run(m3k + [str(tmp / "one")] + opts, env)
        rows.append({"processes": 1, "seconds": round(one, 2)})
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        for k in ks:
            out = tmp / f"k{k}"
            cmd = [
                torchrun,
                "--standalone",
                f"--nproc-per-node={k}",
                "-m",
                "m3kernels",
                "merge",
                str(cfg),
                str(out),
            ]
            sec = _run(cmd + opts, env)
            same = all(
                (out / p.name).read_bytes() == p.read_bytes() for p in (tmp / "one").iterdir() if p.is_file()
            )
            rows.append(
                {"processes": k, "seconds": round(sec, 2), "speedup": round(one / sec, 2), "identical": same}
            )
            shutil.rmtree(out)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench_data/l13x2"))
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--ks", default="2")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = {"plan_l13_40_layers": plan_split()}
    for row in result["plan_l13_40_layers"]:
        print(row)
    if not args.plan_only:
        result["l13x2_ties"] = time_split(args.data, tuple(int(k) for k in args.ks.split(",")))
        for row in result["l13x2_ties"]:
            print(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
