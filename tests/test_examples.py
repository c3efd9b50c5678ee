"""The runnable examples in python/ run and give what the library gives."""

import subprocess
import sys
from pathlib import Path

import torch

import m3kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from state_dict_adapter import merge_state_dicts  # noqa: E402


def test_state_dict_adapter_equals_per_tensor_merges():
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(11, generator=g), "step": torch.tensor(3)}
    tunes = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    out = merge_state_dicts(
        base, tunes, method="ties_dare", drop_rate=0.2, density=0.5, mixup_alpha=0.8, seed=4
    )
    r = m3kernels.draw_mix_ratios(0.8, 3, 4)
    for name in ("a", "b"):
        expect = m3kernels.merge_tensors(
            base[name],
            [t[name] for t in tunes],
            method="ties_dare",
            drop_rate=0.2,
            density=0.5,
            mix_ratios=r,
            seed=4,
            name=name,
        )
        assert torch.equal(out[name], expect)
    assert torch.equal(out["step"], base["step"])


def test_state_dict_adapter_demo_runs():
    res = subprocess.run(
        [sys.executable, str(ROOT / "python" / "state_dict_adapter.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "DARE-TIES + M³" in res.stdout
