"""merge_tensors(method="fisher" | "regmean"): the dispatch to m3kernels.merge.data_aware against the
float64 references (every dtype, odd sizes, poisoned outputs, M³ ratios given and drawn), equal
Fisher = the weighted average, identity Grams = the average, and the errors: missing statistics,
parameters the methods do not take, the generic path (a recipe without statistics) refused."""

from __future__ import annotations

import pytest
import torch

import m3kernels
from m3kernels.merge.data_aware import fisher_merge_reference, regmean_merge_reference
from m3kernels.merge.job import MergeJob
from m3kernels.merge.recipe import make_recipe

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # relative to max |θ|


def close(got, want, dtype):
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.double() - want.double()).abs().max())
    assert err <= TOL[dtype] * scale, (err, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("floor_mode", ["max", "add"])
def test_fisher_against_the_reference(gen, dtype, floor_mode):
    shape = (13, 29)
    models = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    fishers = [torch.rand(shape, generator=gen) ** 3 * 1e-2 for _ in range(3)]
    fishers[1].view(-1)[:40] = 0
    kw = dict(weights=[0.5, 1.0, 2.0], mix_ratios=[0.2, 0.5, 0.3], floor=1e-4, floor_mode=floor_mode)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = m3kernels.merge_tensors(None, models, method="fisher", fishers=fishers, out=out, **kw)
    assert got is out and not torch.isnan(out).any()
    close(out, fisher_merge_reference(models, fishers, **kw), dtype)


def test_fisher_with_equal_fisher_is_the_weighted_average(gen):
    models = [torch.randn(101, generator=gen) for _ in range(3)]
    f = torch.rand(101, generator=gen) + 0.1
    w = [0.2, 1.0, 3.0]
    got = m3kernels.merge_tensors(None, models, method="fisher", fishers=[f, f, f], weights=w)
    close(got, sum(wi * m.double() for wi, m in zip(w, models)) / sum(w), torch.float32)
    # M³: drawn ratios weigh each model as the given ones do
    r = m3kernels.draw_mix_ratios(0.8, 3, 9)
    drawn = m3kernels.merge_tensors(None, models, method="fisher", fishers=[f] * 3, mixup_alpha=0.8, seed=9)
    given = m3kernels.merge_tensors(None, models, method="fisher", fishers=[f] * 3, mix_ratios=list(r))
    assert torch.equal(drawn, given)
    close(drawn, sum(ri * m.double() for ri, m in zip(r, models)) / sum(r), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regmean_against_the_reference(gen, dtype):
    out_f, in_f, n = 11, 7, 3
    models = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(n)]
    xs = [torch.randn(40, in_f, generator=gen, dtype=torch.float64) for _ in range(n)]
    grams = [(x.T @ x).float() for x in xs]
    kw = dict(weights=[1.0, 2.0, 0.5], mix_ratios=[0.3, 0.3, 0.4], alpha=0.4, ridge=1e-3)
    out = torch.full((out_f, in_f), float("nan"), dtype=dtype)
    got = m3kernels.merge_tensors(None, models, method="regmean", grams=grams, out=out, name="q", **kw)
    assert got is out and not torch.isnan(out).any()
    close(out, regmean_merge_reference(models, grams, **kw), dtype)
    # transposed ([in, out]) weights: the same merge
    tr = m3kernels.merge_tensors(
        None, [m.T.contiguous() for m in models], method="regmean", grams=grams, transposed=True, **kw
    )
    close(tr.T, regmean_merge_reference(models, grams, **kw), dtype)
    f32 = m3kernels.merge_tensors(None, models, method="regmean", grams=grams, precision="float32", **kw)
    close(f32, regmean_merge_reference(models, grams, **kw), dtype)


def test_regmean_identity_grams_is_the_average_and_one_model_itself(gen):
    models = [torch.randn(6, 9, generator=gen) for _ in range(3)]
    eye = [torch.eye(9)] * 3
    got = m3kernels.merge_tensors(None, models, method="regmean", grams=eye, alpha=1.0)
    close(got, sum(m.double() for m in models) / 3, torch.float32)
    g = torch.randn(20, 9, generator=gen)
    one = m3kernels.merge_tensors(None, models[:1], method="regmean", grams=[g.T @ g])
    close(one, models[0].double(), torch.float32)


def test_errors(gen):
    models = [torch.randn(4, 5, generator=gen) for _ in range(2)]
    f = [torch.rand(4, 5, generator=gen) for _ in range(2)]
    with pytest.raises(ValueError, match="fishers: method 'fisher' needs one statistics tensor per model"):
        m3kernels.merge_tensors(None, models, method="fisher")
    with pytest.raises(ValueError, match="grams: method 'regmean' needs"):
        m3kernels.merge_tensors(None, models, method="regmean", alpha=0.5)
    with pytest.raises(ValueError, match="fishers: 1 given for 2 models"):
        m3kernels.merge_tensors(None, models, method="fisher", fishers=f[:1])
    with pytest.raises(ValueError, match="density: method 'fisher' does not take it"):
        m3kernels.merge_tensors(None, models, method="fisher", fishers=f, density=0.5)
    with pytest.raises(ValueError, match="floor: method 'regmean' does not take it; methods that do: fisher"):
        m3kernels.merge_tensors(None, models, method="regmean", grams=[torch.eye(5)] * 2, floor=0.1)
    with pytest.raises(ValueError, match="fisher: method 'ties' does not take it; methods that do: fisher"):
        m3kernels.merge_tensors(models[0], models, method="ties", fishers=f)
    with pytest.raises(ValueError, match="floor must be a finite number >= 0"):
        m3kernels.merge_tensors(None, models, method="fisher", fishers=f, floor=-1.0)
    with pytest.raises(ValueError, match="floor_mode"):
        m3kernels.merge_tensors(None, models, method="fisher", fishers=f, floor_mode="min")
    with pytest.raises(ValueError, match="alpha must be a number in"):
        m3kernels.merge_tensors(None, models, method="regmean", grams=[torch.eye(5)] * 2, alpha=1.5)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        make_recipe(2, method="regmean", has_base=False, grams=["a", "b"], ridge=-1.0)


def test_the_generic_path_refuses_a_recipe_without_statistics(gen):
    from m3kernels.api import merge_job
    from m3kernels.backends import get_backend

    models = [torch.randn(8, generator=gen) for _ in range(2)]
    recipe = make_recipe(2, method="fisher", has_base=False, fishers=["s1", "s2"])
    out = torch.empty(8)
    with pytest.raises(
        ValueError, match=r"needs the models' statistics: merge_tensors\(\.\.\., method='fisher', fishers="
    ):
        merge_job(
            MergeJob("w", None, models, torch.float32, recipe, None),
            get_backend("cpu", models[0].device),
            out,
        )
