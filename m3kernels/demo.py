"""``m3kernels demo``: a whole-checkpoint TIES + M³ merge on tiny generated models, checked.

Writes a small Llama-shaped base model and two fine-tunes (base + seeded noise) as sharded
safetensors checkpoints, merges them with :func:`m3kernels.merge_checkpoints` (TIES, density
0.3, λ ~ Beta(0.5, 0.5) drawn once from the seed), then checks every output tensor against
``merge_tensors`` on the same inputs (must be bit-identical) and against the float64 oracle
``m3kernels.merge.reference`` (must be within one output ulp plus float32 rounding).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

DEMO_SEED = 2024
DEMO_SHAPES = {"model.embed_tokens.weight": (67, 32), "model.norm.weight": (32,), "lm_head.weight": (67, 32)}
for _i in range(2):
    DEMO_SHAPES.update({f"model.layers.{_i}.self_attn.q_proj.weight": (32, 32),
                        f"model.layers.{_i}.mlp.up_proj.weight": (45, 32),
                        f"model.layers.{_i}.mlp.down_proj.weight": (32, 45),
                        f"model.layers.{_i}.input_layernorm.weight": (32,)})


def _write_model(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    names = list(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, group in parts.items():
        save_file({n: tensors[n] for n in group}, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, g in parts.items() for n in g}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                    "hidden_size": 32, "vocab_size": 67,
                                                    "torch_dtype": "bfloat16"}, indent=2))


def make_demo_models(root: Path) -> tuple:
    """Base + two fine-tunes (bf16) under ``root``; returns (base dir, [model dirs], tensors by model)."""
    g = torch.Generator().manual_seed(DEMO_SEED)
    base = {n: (torch.randn(s, generator=g) * 0.05 + (1.0 if "norm" in n else 0.0)).to(torch.bfloat16)
            for n, s in DEMO_SHAPES.items()}
    fts = [{n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
           for _ in range(2)]
    _write_model(root / "base", base)
    for i, ft in enumerate(fts):
        _write_model(root / f"ft{i + 1}", ft)
    return root / "base", [root / "ft1", root / "ft2"], base, fts


def run_demo(keep: Optional[str] = None, device: str = "auto", out: Callable = print) -> dict:
    """Run the demo, printing what happens with ``out``; returns a small report dict."""
    from safetensors.torch import load_file

    from m3kernels.api import merge_tensors
    from m3kernels.checkpoint.run import merge_checkpoints
    from m3kernels.merge.reference import reference_merge_tensors

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="m3kernels-demo-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        base_dir, model_dirs, base, fts = make_demo_models(root)
        config = {"merge_method": "ties", "base_model": str(base_dir),
                  "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": 0.3}} for d in model_dirs],
                  "parameters": {"lambda": 1.0, "normalize": True},
                  "mixup": {"alpha": 0.5}, "seed": DEMO_SEED}
        out(f"demo models in {root}: base + 2 fine-tunes, {len(DEMO_SHAPES)} bf16 tensors each, 2 shards")
        result = merge_checkpoints(config, root / "merged", device=device, progress=False, force=True)
        lam = result.mix_ratios[0]
        out(f"TIES (density 0.3) + M³: λ ~ Beta(0.5, 0.5) drawn with seed {DEMO_SEED}: λ = {lam:.6f}, "
            f"1 − λ = {result.mix_ratios[1]:.6f}")
        out(result.summary())
        merged = load_file(str(root / "merged" / "model.safetensors"))
        identical, worst_ulps = 0, 0.0
        out(f"{'tensor':42s} {'shape':>8s}  {'= merge_tensors':>15s}  {'max ulp vs reference':>20s}")
        for name in DEMO_SHAPES:
            kw = dict(method="ties", weights=[1.0, 1.0], density=[0.3, 0.3], normalize=True, lambda_=1.0,
                      mix_ratios=result.mix_ratios, seed=DEMO_SEED, name=name)
            direct = merge_tensors(base[name], [ft[name] for ft in fts], out_dtype=torch.bfloat16, **kw)
            same = torch.equal(direct.view(torch.int16), merged[name].view(torch.int16))
            identical += same
            ref = reference_merge_tensors(base[name], [ft[name] for ft in fts], **kw)
            got = merged[name].to(torch.float64)
            # one bf16 ulp at the reference value (7 mantissa bits), floored at the smallest normal
            ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp_min(2.0 ** -126))[1] - 8)
            ulps = float(((got - ref).abs() / ulp).max())
            worst_ulps = max(worst_ulps, ulps)
            shape = "x".join(map(str, merged[name].shape))
            out(f"{name:42s} {shape:>8s}  {'bit-identical' if same else 'DIFFERENT':>15s}  {ulps:20.3f}")
        ok = identical == len(DEMO_SHAPES) and worst_ulps <= 1.0
        out(f"check: {identical}/{len(DEMO_SHAPES)} tensors bit-identical to merge_tensors on the same inputs; "
            f"largest distance to the float64 reference: {worst_ulps:.3f} bf16 ulp (limit 1)")
        out("demo OK" if ok else "demo FAILED")
        return {"ok": ok, "mix_ratios": result.mix_ratios, "identical": identical, "worst_ulps": worst_ulps,
                "out_dir": str(root / "merged")}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


__all__ = ["run_demo", "make_demo_models"]
