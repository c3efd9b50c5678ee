"""PEFT on m3kernels: ``add_weighted_adapter`` with the drop-in, and the five functions called directly.

    python python/peft_dropin_example.py [--rows 1024 --cols 1024] [--n 2 3] [--repeat 3]

Builds a small model with three LoRA adapters, merges them with TIES through PEFT's own code and
inside ``m3kernels.integrations.peft.patched()``, and checks that the merged LoRA factors are the
same; then times PEFT's ``magnitude_prune``, ``ties`` (both votes), ``dare_linear`` and
``dare_ties`` against the drop-in on one task tensor per N, in one process, and checks the bytes
(DARE: PEFT run once more with the drop-in's masks in place of ``torch.bernoulli``).
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

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


class MaskSequence:
    """Stands in for ``torch.bernoulli`` in PEFT's DARE: returns the given masks in order (so PEFT's
    output can be compared with the drop-in's, whose masks come from the Philox stream)."""

    def __init__(self, masks):
        self.masks, self.i = masks, 0

    def __call__(self, probs, *args, **kwargs):
        m = self.masks[self.i % len(self.masks)]
        self.i += 1
        return m.to(probs.dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0))


CASES = (
    ("magnitude_prune", (0.2,)),
    ("ties", (0.2, "total")),
    ("ties", (0.2, "frequency")),
    ("dare_linear", (0.3,)),
    ("dare_ties", (0.3, "total")),
)


def time_functions(rows: int, cols: int, n: int, weights, repeat: int) -> None:
    g = torch.Generator().manual_seed(1)
    tasks = [0.02 * torch.randn(rows, cols, generator=g) for _ in range(n)]
    w = torch.tensor(weights[:n])
    print(f"one {rows}x{cols} float32 task tensor, N = {n} (best of {repeat}, this machine):")
    for fn, extra in CASES:
        theirs, mine = getattr(merge_utils, fn), getattr(m3k_peft, fn)
        kw = {"seed": 0, "name": "bench"} if fn.startswith("dare") else {}
        t_ours = best_of(functools.partial(mine, **kw), (tasks, w, *extra), repeat)
        t_peft = best_of(theirs, (tasks, w, *extra), repeat)
        ours = mine(tasks, w, *extra, **kw)
        if fn.startswith("dare"):  # PEFT with our masks, for the comparison only
            real = torch.bernoulli
            torch.bernoulli = MaskSequence(m3k_peft._dare_masks(tasks, extra[0], 0, "bench"))
            try:
                ref = theirs(tasks, w, *extra)
            finally:
                torch.bernoulli = real
        else:
            ref = theirs(tasks, w, *extra)
        label = f"{fn}({extra[-1]})" if len(extra) > 1 else fn
        print(
            f"  {label:22s} PEFT {t_peft * 1e3:9.1f} ms   m3kernels {t_ours * 1e3:9.1f} ms   "
            f"x{t_peft / t_ours:5.1f}   identical: {same_bytes(ref, ours)}"
        )
        del ours, ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--n", type=int, nargs="+", default=[3], help="numbers of task tensors (<= 5)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per function (the best is shown)")
    args = ap.parse_args(argv)

    model = lora_model()
    adapters, weights = ["math", "code", "chat"], [1.0, 0.6, -0.3]
    model.add_weighted_adapter(adapters, weights, "peft_ties", combination_type="ties", density=0.3)
    with m3k_peft.patched(seed=0):
        model.add_weighted_adapter(adapters, weights, "m3k_ties", combination_type="ties", density=0.3)
    a, b = factors(model, "peft_ties"), factors(model, "m3k_ties")
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"add_weighted_adapter(ties): {len(a)} merged LoRA factors, identical to PEFT's: {same}")

    warnings.simplefilter("ignore")
    for n in args.n:
        time_functions(args.rows, args.cols, n, [1.0, 0.6, -0.3, 0.8, -1.1], args.repeat)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
