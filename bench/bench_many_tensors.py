"""Checkpoints of many small tensors: is the cost per tensor flat as the tensor count grows?

Mixture-of-experts models have 20,000 to 100,000 tensors, most of them small. This benchmark
generates (seeded, under ``--work``, reused when present) base + 2 fine-tunes of

* an **MoE-shaped** checkpoint: ``--layers`` decoder layers (48) × ``--experts`` experts (64) ×
  3 expert matrices (gate/up ``(expert_dim, hidden)``, down ``(hidden, expert_dim)``), plus per
  layer the attention projections, the router and two norms, plus embedding, final norm and head;
  at **1×** (a tenth of the layers) and **10×** (all of them);
* **tiny-tensor** checkpoints: ``--tiny`` tensors (20,000) of 16 elements, and a tenth as many,

all bf16, and times the TIES merge (density 0.2, weights 1, normalize) of each through
``m3kernels.merge_checkpoints(..., device="cpu", progress=False)`` in this process (torch
already imported; opening, planning, merging, writing and fsync'ing all counted), median of
``--repeat`` runs. It prints the time per tensor at 1× and 10× (target: flat within 1.5×), the
overhead per tiny tensor = (t(20,000) − t(2,000)) / 18,000 (target: ≤ 100 µs) and the
20,000-tensor total (target: ≤ 10 s on the 2-core benchmark machine).

Usage::

    python bench/bench_many_tensors.py                      # the full set (~15 s on 2 cores, first run ~5 s more to generate)
    python bench/bench_many_tensors.py --scale 0.25 --tiny 4000 --repeat 1   # a quick look
    python bench/bench_many_tensors.py --json bench/out/many_tensors.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import m3kernels

try:  # the one checkpoint factory
    from m3kernels.synthetic import fine_tune, random_tensors, write_checkpoint
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from checkpoint_factory import fine_tune, random_tensors, write_checkpoint

TIES = {"merge_method": "ties", "parameters": {"normalize": True}}
MODEL_PARAMS = {"weight": 1.0, "density": 0.2}


def moe_shapes(layers: int, experts: int, hidden: int, expert_dim: int, vocab: int) -> dict:
    """{name: shape} of a small mixture-of-experts decoder (Mixtral-style names)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "block_sparse_moe.gate.weight"] = (experts, hidden)
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (expert_dim, hidden)
            shapes[q + "w3.weight"] = (expert_dim, hidden)
            shapes[q + "w2.weight"] = (hidden, expert_dim)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def tiny_shapes(count: int) -> dict:
    return {f"model.layers.{i // 500}.experts.{i % 500}.weight": (4, 4) for i in range(count)}


def make_set(folder: Path, shapes: dict, seed: int) -> Path:
    """base/, ft1/, ft2/ under ``folder`` (reused when complete)."""
    done = folder / "complete.json"
    info = {
        "tensors": len(shapes),
        "elements": sum(torch.Size(s).numel() for s in shapes.values()),
        "seed": seed,
    }
    if done.is_file() and json.loads(done.read_text()) == info:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    base = random_tensors(shapes, seed, dtype=torch.bfloat16)
    write_checkpoint(folder / "base", base, tokenizer=False)
    for k in (1, 2):
        write_checkpoint(folder / f"ft{k}", fine_tune(base, seed + 101 * k, scale=0.002), tokenizer=False)
    done.write_text(json.dumps(info))
    return folder


def time_merge(folder: Path, out_root: Path, repeat: int) -> dict:
    cfg = {
        **TIES,
        "base_model": str(folder / "base"),
        "models": [{"model": str(folder / f"ft{k}"), "parameters": dict(MODEL_PARAMS)} for k in (1, 2)],
    }
    walls, cpus = [], []
    for _ in range(repeat):
        out = Path(tempfile.mkdtemp(dir=out_root)) / "out"
        w0, c0 = time.perf_counter(), time.process_time()
        res = m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        shutil.rmtree(out.parent)
    return {
        "tensors": res.num_tensors,
        "bytes": res.total_bytes,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "walls": walls,
    }


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "m3kernels": m3kernels.__version__,
        "loadavg_before": load,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/out/many_tensors", help="generated checkpoints and outputs")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--expert-dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiplies the layer count (fit the machine's time)"
    )
    ap.add_argument("--tiny", type=int, default=20000, help="tensors of the tiny-tensor checkpoint")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    layers10 = max(10, round(a.layers * a.scale))
    layers1 = max(1, round(layers10 / 10))
    sets = {
        "moe_1x": moe_shapes(layers1, a.experts, a.hidden, a.expert_dim, a.vocab),
        "moe_10x": moe_shapes(layers10, a.experts, a.hidden, a.expert_dim, a.vocab),
        "tiny_1x": tiny_shapes(max(1, a.tiny // 10)),
        "tiny_10x": tiny_shapes(a.tiny),
    }
    t0 = time.perf_counter()
    folders = {k: make_set(work / f"{k}_{len(s)}", s, seed=7) for k, s in sets.items()}
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s under {work}", flush=True)

    res = {"machine": machine(), "args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    m3kernels.merge_checkpoints(
        {
            **TIES,
            "base_model": str(folders["tiny_1x"] / "base"),  # warm-up
            "models": [{"model": str(folders["tiny_1x"] / "ft1"), "parameters": MODEL_PARAMS}],
        },
        Path(tempfile.mkdtemp(dir=work)) / "warm",
        device="cpu",
        progress=False,
    )
    for key, folder in folders.items():
        r = time_merge(folder, work, a.repeat)
        r["us_per_tensor"] = 1e6 * r["wall_s"] / r["tensors"]
        res[key] = r
        print(
            f"{key:9s} {r['tensors']:7d} tensors {r['bytes'] / 2**20:8.1f} MiB  {r['wall_s']:7.2f} s wall "
            f"({r['cpu_s']:6.2f} s CPU)  {r['us_per_tensor']:7.1f} us/tensor",
            flush=True,
        )
    for w in work.glob("tmp*"):
        shutil.rmtree(w, ignore_errors=True)

    flat = res["moe_10x"]["us_per_tensor"] / res["moe_1x"]["us_per_tensor"]
    t1, t10 = res["tiny_1x"], res["tiny_10x"]
    overhead = 1e6 * (t10["wall_s"] - t1["wall_s"]) / (t10["tensors"] - t1["tensors"])
    res["summary"] = {
        "moe_per_tensor_ratio_10x_over_1x": flat,
        "tiny_overhead_us_per_tensor": overhead,
        "tiny_10x_total_s": t10["wall_s"],
    }
    print(
        f"\nMoE time per tensor, 10x / 1x tensors ({res['moe_10x']['tensors']} / {res['moe_1x']['tensors']}): "
        f"{flat:.2f}  (target <= 1.5)"
    )
    print(
        f"overhead per tiny tensor ((t({t10['tensors']}) - t({t1['tensors']})) / {t10['tensors'] - t1['tensors']}): "
        f"{overhead:.0f} us  (target <= 100)"
    )
    print(f"{t10['tensors']}-tensor TIES merge: {t10['wall_s']:.2f} s  (target <= 10 s for 20,000)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
