"""Drives every CUDA kernel once per case, for compute-sanitizer (memcheck, racecheck, initcheck).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 tests/cuda_sanitize_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 tests/cuda_sanitize_driver.py --small

Small tensors (odd sizes, unaligned views, N = 1..3 and 16, uniform and mixed dtypes; the method
and dtype cases of tests/cases.py) so the sanitizer's slow-down stays bearable; each result is also compared with the CPU backend, so a kernel that
reads out of bounds without crashing still shows up as a mismatch. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

import m3kernels

from cases import DTYPE_CASES, METHOD_CASES, kwargs_for  # tests/ is this script's folder: on sys.path

# tests/cases.py entries: one per kernel variant (sum, mean, ties, DARE, L1, trim + DARE, M³) and
# three dtype mixes, so the sanitizer's slow-down stays within gpu_session.sh's time limits
METHODS = ["linear", "task_arith", "ties", "dare_linear", "dare_ties_l1", "ties_dare", "ties_m3"]
DTYPES = ["bf16", "mixed_bf16out", "mixed_f32out"]
assert set(METHODS) <= set(METHOD_CASES) and set(DTYPES) <= set(DTYPE_CASES)


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
    for name in METHODS:
        for dtype_case in DTYPES:
            bdt, mdts, odt = DTYPE_CASES[dtype_case]
            for n in counts:
                kw = kwargs_for(name, n)
                for size in sizes:
                    base = torch.randn(size + 1, generator=g)
                    models = [
                        (base + 0.01 * torch.randn(size + 1, generator=g)).to(mdts[i % len(mdts)])
                        for i in range(n)
                    ]
                    base = base.to(bdt)
                    # element 1 onwards: unaligned views on the device
                    dev = [t.cuda()[1:] for t in [base, *models]]
                    out = torch.full((size,), float("nan"), dtype=odt, device="cuda")
                    m3kernels.merge_tensors(
                        dev[0], dev[1:], out=out, name=f"w{size}", backend=args.backend, **kw
                    )
                    ref = m3kernels.merge_tensors(
                        base[1:], [m[1:] for m in models], out_dtype=odt, name=f"w{size}", backend="cpu", **kw
                    )
                    runs += 1
                    if not torch.equal(out.cpu(), ref) and not (torch.isnan(ref).any()):
                        bad += 1
                        print(f"MISMATCH {name} dtypes={dtype_case} N={n} size={size}")
    torch.cuda.synchronize()
    print(f"{runs} merges on {args.backend}, {bad} mismatches against the CPU backend")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
