"""Argument validation (ValueError naming the argument) and the method presets of docs/SPEC.md §1."""

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.merge.mixup import draw_mix_ratios
from m3kernels.merge.recipe import make_recipe

X = torch.zeros(8, dtype=torch.bfloat16)


def call(**kw):
    base = kw.pop("base", X)
    models = kw.pop("models", [X, X])
    kw.setdefault("method", "ties")
    kw.setdefault("backend", "cpu")
    return m3kernels.merge_tensors(base, models, **kw)


@pytest.mark.parametrize(
    "kw,arg",
    [
        (dict(density=1.5), "density"),
        (dict(density=-0.1), "density"),
        (dict(density=[0.2, 0.3, 0.4]), "density"),
        (dict(method="dare_ties", drop_rate=1.2), "drop_rate"),
        (dict(method="dare_ties"), "density"),
        (dict(method="ties_dare", density=0.2), "drop_rate"),
        (dict(mixup_alpha=0.0), "mixup_alpha"),
        (dict(mixup_alpha=-1.0), "mixup_alpha"),
        (dict(mix_ratios=[0.5]), "mix_ratios"),
        (dict(mix_ratios=0.5, mixup_alpha=1.0), "mix_ratios"),
        (dict(models=[]), "models"),
        (dict(models=[X, torch.zeros(9, dtype=torch.bfloat16)]), "models"),
        (dict(base=torch.zeros(9, dtype=torch.bfloat16)), "base"),
        (dict(models=[X, torch.zeros(8, dtype=torch.float64)]), "models"),
        (dict(models=[X, torch.zeros(8, dtype=torch.int32)]), "models"),
        (dict(base=None), "base"),
        (dict(method="task_arithmetic", base=None), "base"),
        (dict(method="frankenmerge"), "method"),
        (dict(method="slerp"), "t"),  # one model, but no t
        (dict(weights=[1.0, 2.0, 3.0]), "weights"),
        (dict(method="linear", weights=[1.0, -1.0]), "weights"),
        (dict(out=torch.zeros(9, dtype=torch.bfloat16)), "out"),
        (dict(out=torch.zeros(8, dtype=torch.float32), out_dtype=torch.bfloat16), "out"),
        (dict(out_dtype=torch.float64), "out_dtype"),
        (dict(method="linear", density=0.5), "density"),
        (dict(rescale="l1"), "rescale"),
        (dict(seed=-1), "seed"),
        (dict(backend="tpu"), "backend"),
        (dict(thresholds=[-0.25, None]), "thresholds"),
        (dict(thresholds=[float("nan"), None]), "thresholds"),
        (dict(method="task_arithmetic", thresholds=[3.0, 3.0]), "thresholds"),
        (dict(method="task_arithmetic", lambda_=1e39), "lambda_"),
        (dict(method="task_arithmetic", lambda_=None), "lambda_"),
        (dict(method="linear", weights=[1e-46, 1e-46]), "weights"),
        (dict(weights=[1e39, 1.0]), "weights"),
        (dict(mixup_alpha=0.4, seed=2**32 + 5), "seed"),
        (dict(mix_ratios=True), "mix_ratios"),
        (dict(density="0.2"), "density"),
        (dict(weights=object()), "weights"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        call(**kw)


def test_presets():
    r = make_recipe(2, method="average", has_base=False)
    assert (r.combine, r.uses_base) == ("mean", False)
    r = make_recipe(2, method="ties", has_base=True)
    assert r.trim_density == (0.2, 0.2) and r.normalize and r.dare_density is None
    r = make_recipe(2, method="dare_ties", has_base=True, drop_rate=0.9)
    assert r.dare_density == pytest.approx((0.1, 0.1)) and r.rescale == "density" and r.trim_density is None
    r = make_recipe(2, method="ties_dare", has_base=True, drop_rate=[0.5, 0.1], density=0.3)
    assert r.dare_density == (0.5, 0.9) and r.trim_density == (0.3, 0.3)
    r = make_recipe(2, method="task_arithmetic", has_base=True, normalize=True)
    assert r.combine == "mean"
    r = make_recipe(3, method="dare_linear", has_base=True, density=0.5, rescale="l1")
    assert r.rescale == "l1"


def test_mix_ratios_reproducible_and_distributed():
    assert draw_mix_ratios(0.4, 2, 1) == draw_mix_ratios(0.4, 2, 1)
    assert draw_mix_ratios(0.4, 2, 1) != draw_mix_ratios(0.4, 2, 2)
    lam = np.random.RandomState(1).beta(0.4, 0.4)
    assert draw_mix_ratios(0.4, 2, 1) == (lam, 1 - lam)
    d = np.random.RandomState(4).dirichlet([2.0] * 3)
    assert draw_mix_ratios(2.0, 3, 4) == tuple(d)
    assert draw_mix_ratios(2.0, 1, 4) == (1.0,)
    draws = np.array([draw_mix_ratios(0.5, 2, s)[0] for s in range(2000)])
    assert abs(draws.mean() - 0.5) < 0.03 and abs(draws.var() - 0.125) < 0.015  # Beta(.5,.5): var 1/8
    assert sum(draw_mix_ratios(0.3, 5, 2)) == pytest.approx(1.0)


def test_numpy_and_tensor_scalars_are_accepted_as_numbers():
    a = call(density=np.float32(0.5), weights=torch.tensor(0.5), lambda_=np.float64(0.9))
    b = call(density=0.5, weights=0.5, lambda_=0.9)
    assert torch.equal(a, b)
    c = call(weights=np.array([0.3, 0.7]), density=torch.tensor([0.2, 0.4]))
    assert torch.equal(c, call(weights=[0.3, 0.7], density=[0.2, 0.4]))


def test_tiny_mixup_ratios_are_not_an_error():
    """Dirichlet draws with a small alpha can fall below float32's range: still a valid merge."""
    x = torch.randn(16)
    out = m3kernels.merge_tensors(
        None, [x, x, x], method="linear", mix_ratios=[1e-50, 0.5, 0.5], backend="cpu"
    )
    assert torch.allclose(out, x)
