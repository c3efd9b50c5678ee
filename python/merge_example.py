"""Merging whole checkpoints from Python with ``m3kernels.merge_checkpoints``.

    python python/merge_example.py                      # tiny generated models, TIES + M³
    python python/merge_example.py CONFIG.yaml OUT_DIR  # your own config (mergekit format)

The same call is behind ``m3kernels merge CONFIG.yaml OUT_DIR``: first a dry run (validates the
config and every input, returns the plan, writes nothing), then the merge itself.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors import safe_open

import m3kernels
from m3kernels.demo import make_demo_models


def example_config(root: Path) -> dict:
    """TIES + M³ over generated models: a config is a dict as well as a YAML file."""
    base, models, _, _ = make_demo_models(root)
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.2}} for m in models],
        "parameters": {"normalize": True, "lambda": 1.0},
        "mixup": {"alpha": 2.0},  # λ ~ Beta(2, 2), one draw per merge, from the seed below
        "seed": 42,
        "dtype": "bfloat16",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="merge config (default: generated tiny models)")
    ap.add_argument("out_dir", nargs="?", help="output folder (default: a temporary one)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="m3k-example-"))
    config = args.config or example_config(work)
    out_dir = Path(args.out_dir) if args.out_dir else work / "merged"

    plan = m3kernels.merge_checkpoints(config, out_dir, dry_run=True)
    print(plan.summary(), end="\n\n")

    result = m3kernels.merge_checkpoints(config, out_dir, device=args.device, out_shard_size=2 * 2**30)
    print(result.summary())

    first = out_dir / result.files[0]
    with safe_open(str(first), framework="pt") as f:
        name = next(iter(f.keys()))
        t = f.get_tensor(name)
        print(f"{first.name}: {name} {tuple(t.shape)} {t.dtype}, mean {t.float().mean():.6f}")
        print("merge record keys in the header:", sorted(f.metadata()))
    print(f"output in {out_dir}")


if __name__ == "__main__":
    main()
