"""Drives every CUDA kernel once per case, for compute-sanitizer (memcheck, racecheck, initcheck).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 tests/cuda_sanitize_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 tests/cuda_sanitize_driver.py --small

Small tensors (odd sizes, unaligned views, N = 1..3 and 16, every dtype mix) so the sanitizer's
slow-down stays bearable; each result is also compared with the CPU backend, so a kernel that
reads out of bounds without crashing still shows up as a mismatch. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

import m3kernels

METHODS = {
    "linear": dict(method="linear"),
    "task_arithmetic": dict(method="task_arithmetic", lambda_=0.8),
    "ties": dict(method="ties", density=0.3),
    "dare_linear": dict(method="dare_linear", density=0.6),
    "dare_ties_l1": dict(method="dare_ties", density=0.5, rescale="l1"),
    "ties_dare": dict(method="ties_dare", drop_rate=0.4, density=0.5),
    "ties_m3": dict(method="ties", density=0.4, mixup_alpha=0.4, seed=11),
}
DTYPES = [(torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16, torch.bfloat16),
          (torch.float16, torch.float32, torch.float32)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="fewer, smaller cases (for racecheck)")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to drive")
        return 0
    sizes = [1, 7, 4099] if args.small else [1, 7, 4099, 65537, 300007]
    counts = [1, 3] if args.small else [1, 2, 3, 16]
    g = torch.Generator().manual_seed(0)
    bad = 0
    runs = 0
    for name, kw in METHODS.items():
        for bdt, mdt, odt in DTYPES:
            for n in counts:
                for size in sizes:
                    base = torch.randn(size + 1, generator=g)
                    models = [(base + 0.01 * torch.randn(size + 1, generator=g)).to(mdt) for _ in range(n)]
                    base = base.to(bdt)
                    # element 1 onwards: unaligned views on the device
                    dev = [t.cuda()[1:] for t in [base, *models]]
                    out = torch.full((size,), float("nan"), dtype=odt, device="cuda")
                    m3kernels.merge_tensors(dev[0], dev[1:], out=out, name=f"w{size}", backend=args.backend, **kw)
                    ref = m3kernels.merge_tensors(base[1:], [m[1:] for m in models], out_dtype=odt,
                                                  name=f"w{size}", backend="cpu", **kw)
                    runs += 1
                    if not torch.equal(out.cpu(), ref) and not (torch.isnan(ref).any()):
                        bad += 1
                        print(f"MISMATCH {name} dtypes={bdt},{mdt},{odt} N={n} size={size}")
    torch.cuda.synchronize()
    print(f"{runs} merges on {args.backend}, {bad} mismatches against the CPU backend")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
