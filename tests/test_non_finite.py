"""Non-finite inputs (issue 14): a NaN or inf in an input stays in its own elements. The L1
rescale is computed over the finite deltas (on every backend alike, equal to the reference), a
warning names the tensor and the count per model, and the other elements equal a merge of the
same tensors with that element cleaned."""

from __future__ import annotations

import logging

import pytest
import torch

import m3kernels
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from helpers import have_backend

BACKENDS = [b for b in ("cpu", "triton") if have_backend(b)]
BAD = [float("nan"), float("inf"), -float("inf")]


def _inputs(gen, numel=4099, dtype=torch.bfloat16):
    base = torch.randn(numel, generator=gen).to(dtype)
    models = [(base.float() + 0.02 * torch.randn(numel, generator=gen)).to(dtype) for _ in range(3)]
    return base, models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "ties_dare"])
def test_l1_rescale_ignores_non_finite_deltas(backend, bad, method, gen, caplog):
    base, models = _inputs(gen)
    poisoned = [m.clone() for m in models]
    spots = [5, 1000, 4098]
    for j in spots:
        poisoned[1][j] = bad
    kw = dict(method=method, rescale="l1", seed=9, name="model.layers.3.mlp.up_proj.weight")
    kw |= dict(drop_rate=0.4, density=0.5) if method == "ties_dare" else dict(density=0.6)
    with caplog.at_level(logging.WARNING, logger="m3kernels"):
        out = m3kernels.merge_tensors(base, poisoned, backend=backend, out_dtype=torch.float32, **kw)
    assert "model.layers.3.mlp.up_proj.weight" in caplog.text and "model 2: 3" in caplog.text
    recipe = make_recipe(3, has_base=True, **{k: v for k, v in kw.items() if k != "name"})
    ref, _ = reference_merge(base, poisoned, recipe, kw["name"])
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)  # non-finite exactly where the reference has it
    assert int((~finite).sum()) <= len(spots)  # ... only at the poisoned elements
    assert torch.allclose(out[finite].double(), ref[finite], rtol=1e-6, atol=1e-6)
    # elsewhere the merge is (nearly) the clean one: only model 2's scale moved, by 3 of 4099 terms
    clean = m3kernels.merge_tensors(base, models, backend=backend, out_dtype=torch.float32, **kw)
    assert torch.allclose(out[finite], clean[finite], rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_bit_for_bit_with_non_finite_inputs(backend, gen):
    base, models = _inputs(gen, numel=777, dtype=torch.float16)
    models[0][[0, 10, 776]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float16)
    kw = dict(method="dare_ties", density=0.7, rescale="l1", seed=3, name="w")
    a = m3kernels.merge_tensors(base, models, backend="cpu", **kw)
    b = m3kernels.merge_tensors(base, models, backend=backend, **kw)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_finite_inputs_take_the_kernel_sums(gen, monkeypatch):
    """The finite-only recomputation runs only when a sum is not finite."""
    from m3kernels import api

    calls = []
    monkeypatch.setattr(api, "finite_l1_sums", lambda *a: calls.append(a))
    base, models = _inputs(gen)
    m3kernels.merge_tensors(base, models, method="dare_linear", density=0.5, rescale="l1", backend="cpu")
    assert not calls


@pytest.mark.usefixtures("fresh_cli_logging")  # the CLI handler must write to this test's stderr
def test_checkpoint_merge_warns_by_default_and_strict_refuses(tmp_path, capsys):
    from m3kernels import cli
    from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, write_checkpoint

    sizes = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)
    base = llama_tensors(seed=1, **sizes)
    ft1, ft2 = fine_tune(base, 1), fine_tune(base, 2)
    name = "model.layers.1.mlp.up_proj.weight"
    ft2[name] = ft2[name].clone()
    ft2[name].view(-1)[[3, 7]] = float("nan")
    dirs = [
        write_checkpoint(tmp_path / d, t, config=llama_config(**sizes))
        for d, t in (("base", base), ("ft1", ft1), ("ft2", ft2))
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: dare_ties\nbase_model: {dirs[0]}\nmodels:\n  - model: {dirs[1]}\n"
        f"  - model: {dirs[2]}\nparameters: {{density: 0.5, rescale: l1}}\n"
    )
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    err = capsys.readouterr().err
    assert name in err and "model 2: 2" in err and "warning" in err, err
    from safetensors.torch import load_file

    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged |= load_file(f)
    assert int((~torch.isfinite(merged[name].float())).sum()) <= 2  # the NaN stayed in its elements
    assert all(torch.isfinite(t.float()).all() for k, t in merged.items() if k != name)
    status = cli.main(["merge", str(cfg), str(tmp_path / "strict"), "--device", "cpu", "-q", "--strict"])
    err = capsys.readouterr().err
    assert status == 2 and name in err and "2 NaN/inf" in err and "model 2" in err, err
    assert not (tmp_path / "strict").exists()
