"""``m3kernels demo``: a whole-checkpoint TIES + M³ merge on tiny generated models, checked.

Writes a small Llama-shaped base model and two fine-tunes (base + seeded noise) as sharded
safetensors checkpoints (:mod:`m3kernels.synthetic`, the factory the tests and benchmarks use
too), merges them with :func:`m3kernels.merge_checkpoints` (TIES, density 0.3, λ ~ Beta(0.5, 0.5)
drawn once from the seed), then checks every output tensor against
``merge_tensors`` on the same inputs (must be bit-identical) and against the float64 oracle
``m3kernels.merge.reference`` (must be within one output ulp plus float32 rounding).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from m3kernels.synthetic import LlamaShapes, make_family

DEMO_SEED = 2024
DEMO_MODEL = LlamaShapes(vocab=67, hidden=32, intermediate=45, layers=2, heads=4, kv_heads=2)
DEMO_SHAPES = DEMO_MODEL.shapes()


def make_demo_models(root: Path) -> tuple:
    """Base + two fine-tunes (bf16) under ``root``; returns (base dir, [model dirs], base, [fine-tunes])."""
    family = make_family(
        root,
        n_models=2,
        shapes=DEMO_MODEL,
        seed=DEMO_SEED,
        std=0.05,
        noise=0.01,
        tokenizer=False,
        generation=True,
    )
    return family.base_dir, family.model_dirs, family.base, family.models


def run_demo(keep: str | None = None, device: str = "auto", out: Callable = print) -> dict:
    """Run the demo, printing what happens with ``out``; returns a small report dict."""
    from safetensors.torch import load_file

    from m3kernels.api import merge_tensors
    from m3kernels.checkpoint.run import merge_checkpoints
    from m3kernels.merge.reference import reference_merge_tensors

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="m3kernels-demo-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        base_dir, model_dirs, base, fts = make_demo_models(root)
        config = {
            "merge_method": "ties",
            "base_model": str(base_dir),
            "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": 0.3}} for d in model_dirs],
            "parameters": {"lambda": 1.0, "normalize": True},
            "mixup": {"alpha": 0.5},
            "seed": DEMO_SEED,
        }
        out(f"demo models in {root}: base + 2 fine-tunes, {len(DEMO_SHAPES)} bf16 tensors each, 2-3 shards")
        result = merge_checkpoints(config, root / "merged", device=device, progress=False, force=True)
        lam = result.mix_ratios[0]
        out(
            f"TIES (density 0.3) + M³: λ ~ Beta(0.5, 0.5) drawn with seed {DEMO_SEED}: λ = {lam:.6f}, "
            f"1 − λ = {result.mix_ratios[1]:.6f}"
        )
        out(result.summary())
        merged = load_file(str(root / "merged" / "model.safetensors"))
        identical, worst_ulps = 0, 0.0
        out(f"{'tensor':46s} {'shape':>8s}  {'= merge_tensors':>15s}  {'max ulp vs reference':>20s}")
        for name in DEMO_SHAPES:
            kw = dict(
                method="ties",
                weights=[1.0, 1.0],
                density=[0.3, 0.3],
                normalize=True,
                lambda_=1.0,
                mix_ratios=result.mix_ratios,
                seed=DEMO_SEED,
                name=name,
            )
            direct = merge_tensors(base[name], [ft[name] for ft in fts], out_dtype=torch.bfloat16, **kw)
            same = torch.equal(direct.view(torch.int16), merged[name].view(torch.int16))
            identical += same
            ref = reference_merge_tensors(base[name], [ft[name] for ft in fts], **kw)
            got = merged[name].to(torch.float64)
            # one bf16 ulp at the reference value (7 mantissa bits), floored at the smallest normal
            ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp_min(2.0**-126))[1] - 8)
            ulps = float(((got - ref).abs() / ulp).max())
            worst_ulps = max(worst_ulps, ulps)
            shape = "x".join(map(str, merged[name].shape))
            out(f"{name:46s} {shape:>8s}  {'bit-identical' if same else 'DIFFERENT':>15s}  {ulps:20.3f}")
        ok = identical == len(DEMO_SHAPES) and worst_ulps <= 1.0
        out(
            f"check: {identical}/{len(DEMO_SHAPES)} tensors bit-identical to merge_tensors on the same inputs; "
            f"largest distance to the float64 reference: {worst_ulps:.3f} bf16 ulp (limit 1)"
        )
        out("demo OK" if ok else "demo FAILED")
        return {
            "ok": ok,
            "mix_ratios": result.mix_ratios,
            "identical": identical,
            "worst_ulps": worst_ulps,
            "out_dir": str(root / "merged"),
        }
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


__all__ = ["run_demo", "make_demo_models"]
