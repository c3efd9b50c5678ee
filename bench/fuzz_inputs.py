"""The input fuzzer of tests/test_fuzz_inputs.py, at scale: outcome counts per category.

Runs the same seeded generator (safetensors headers, shard indexes, config.json, merge
parameters) for ``--cases`` cases and prints, per category, how many cases m3kernels and the
safetensors library both accepted (read bit-identically), both rejected, only the library read
(m3kernels stricter, for the documented reasons), merged correctly, and bugs (an internal error,
a hang past the per-case limit, a file read differently, one the library rejects accepted), with
the mean and largest time per case. Exit status 1 if there was any bug.

Usage::

    python bench/fuzz_inputs.py --cases 10000
    python bench/fuzz_inputs.py --cases 10000 --seed 7 --json bench/out/fuzz_inputs.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_fuzz_inputs as fuzz  # noqa: E402

COLUMNS = ("accepted", "rejected", "stricter", "merged", "bug")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=fuzz.SEED)
    ap.add_argument("--limit", type=float, default=fuzz.CASE_LIMIT_S, help="seconds allowed per case")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="m3k-fuzz-") as scratch:
        work = Path(args.work or scratch)
        t0 = time.perf_counter()
        outcomes = fuzz.run_cases(args.cases, work, seed=args.seed, limit_s=args.limit)
        wall = time.perf_counter() - t0
    table = fuzz.summary(outcomes)
    head = (
        f"{'category':12s} {'cases':>6s} "
        + " ".join(f"{c:>9s}" for c in COLUMNS)
        + f" {'ms/case':>8s} {'max ms':>8s}"
    )
    print(head)
    total = {c: 0 for c in COLUMNS + ("cases",)}
    for cat, row in table.items():
        print(
            f"{cat:12s} {row['cases']:6d} "
            + " ".join(f"{row.get(c, 0):9d}" for c in COLUMNS)
            + f" {row['ms_mean']:8.2f} {row['ms_max']:8.1f}"
        )
        for c in total:
            total[c] += row.get(c, 0)
    print(
        f"{'total':12s} {total['cases']:6d} "
        + " ".join(f"{total[c]:9d}" for c in COLUMNS)
        + f" {1000 * wall / max(1, args.cases):8.2f}"
    )
    print(
        f"{args.cases} cases in {wall:.1f} s (seed {args.seed}; {os.cpu_count()} CPUs, {platform.machine()})"
    )
    bugs = [o for o in outcomes if o.outcome == "bug"]
    for o in bugs[:20]:
        print(f"BUG {o.category}: {o.detail}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "cases": args.cases,
                    "seed": args.seed,
                    "seconds": wall,
                    "table": table,
                    "bugs": [o.detail for o in bugs],
                },
                indent=1,
            )
        )
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
