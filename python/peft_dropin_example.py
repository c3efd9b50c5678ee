"""PEFT on m3kernels: ``add_weighted_adapter`` with the drop-in, and the five functions called directly.

    python python/peft_dropin_example.py [--rows 1024 --cols 1024]

Builds a small model with three LoRA adapters, merges them with TIES through PEFT's own code and
inside ``m3kernels.integrations.peft.patched()``, and checks that the merged LoRA factors are the
same; then times PEFT's ``magnitude_prune`` / ``ties`` against the drop-in on one task tensor.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils

from m3kernels.integrations import peft as m3k_peft


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    cfg = dict(r=8, lora_alpha=16, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**cfg), adapter_name="math")
    for name in ("code", "chat"):
        model.add_adapter(name, LoraConfig(**cfg))
    return model


def factors(model, adapter: str) -> dict:
    return {
        k.replace(adapter, "*"): v.detach().clone()
        for k, v in model.state_dict().items()
        if f".{adapter}." in k
    }


def best_of(fn, args, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args(argv)

    model = lora_model()
    adapters, weights = ["math", "code", "chat"], [1.0, 0.6, -0.3]
    model.add_weighted_adapter(adapters, weights, "peft_ties", combination_type="ties", density=0.3)
    with m3k_peft.patched(seed=0):
        model.add_weighted_adapter(adapters, weights, "m3k_ties", combination_type="ties", density=0.3)
    a, b = factors(model, "peft_ties"), factors(model, "m3k_ties")
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"add_weighted_adapter(ties): {len(a)} merged LoRA factors, identical to PEFT's: {same}")

    g = torch.Generator().manual_seed(1)
    tasks = [0.02 * torch.randn(args.rows, args.cols, generator=g) for _ in range(3)]
    w = torch.tensor(weights)
    print(f"one {args.rows}x{args.cols} float32 task tensor, N = 3 (best of 3, this machine):")
    for fn, extra in (("magnitude_prune", (0.2,)), ("ties", (0.2, "total"))):
        theirs, mine = getattr(merge_utils, fn), getattr(m3k_peft, fn)
        ref, ours = theirs(tasks, w, *extra), mine(tasks, w, *extra)
        t_peft = best_of(theirs, (tasks, w, *extra))
        t_ours = best_of(mine, (tasks, w, *extra))
        print(
            f"  {fn:16s} PEFT {t_peft * 1e3:8.1f} ms   m3kernels {t_ours * 1e3:8.1f} ms   "
            f"x{t_peft / t_ours:5.1f}   identical: {torch.equal(ref, ours)}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
