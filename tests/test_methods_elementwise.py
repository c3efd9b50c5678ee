"""passthrough, nearswap, ram and ramplus_tl through ``merge_tensors`` against the float64
reference (m3kernels/merge/reference_methods.py), on every backend whose ``FEATURES`` have the
combine: every dtype mix, N, odd sizes, poisoned outputs; ramplus_tl's float32 scales against
the reference's float64 ones; the edge rules and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.backends import _load
from m3kernels.merge import registry
from m3kernels.merge.methods.elementwise import ramplus_scales
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_methods import ramplus_lambdas

from cases import FAMILY_CASES
from helpers import make_inputs
from method_matrix import BACKENDS, check_against_reference, matrix

CASES = [
    c
    for c, (kw, _) in FAMILY_CASES.items()
    if registry.get_method(kw["method"]).family in ("passthrough", "elementwise")
]
SHAPES = [(1,), (7,), (37, 129), (3, 5, 7)]


def _scale(base, models):
    s = sum((m.to(torch.float64).abs() for m in models), torch.zeros(models[0].shape, dtype=torch.float64))
    return 2 * (s + base.to(torch.float64).abs())


MATRIX = matrix(CASES)


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    check_against_reference(backend, case, dtype_case, gen, SHAPES, lambda b, ms, _recipe: _scale(b, ms))


def test_passthrough_is_a_copy_or_one_product(gen):
    """No kernel pass: an exact copy (converted to the output dtype), or f32(x · scale) rounded once."""
    x = torch.randn(33, 7, generator=gen).to(torch.bfloat16)
    out = torch.full((33, 7), float("nan"), dtype=torch.float32)
    m3kernels.merge_tensors(None, [x], method="passthrough", out=out)
    assert torch.equal(out, x.float())
    got = m3kernels.merge_tensors(None, [x], method="passthrough", scale=0.3, out_dtype=torch.bfloat16)
    assert torch.equal(got, (x.float() * np.float32(0.3)).to(torch.bfloat16))
    # the base is not used (mergekit: passthrough takes exactly one input)
    b = torch.randn(33, 7, generator=gen).to(torch.bfloat16)
    assert torch.equal(m3kernels.merge_tensors(b, [x], method="passthrough"), x)
    with pytest.raises(ValueError, match="takes exactly 1 model"):
        m3kernels.merge_tensors(None, [x, x], method="passthrough")


def test_nearswap_is_a_clip_of_the_task_vector(gen):
    base = torch.randn(200, generator=gen, dtype=torch.float64)
    x = base + 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)
    recipe = make_recipe(1, method="nearswap", has_base=True, t=0.02)
    ref, _ = reference_merge(base.float(), [x.float()], recipe)
    b32, x32 = base.float().double(), x.float().double()
    clip = b32 + torch.clamp(x32 - b32, -np.float32(0.02), np.float32(0.02))
    assert torch.allclose(ref, clip, atol=1e-12)
    # t <= 0: the base
    recipe = make_recipe(1, method="nearswap", has_base=True, t=-1.0)
    assert torch.equal(reference_merge(base.float(), [x.float()], recipe)[0], b32)


def test_ram_counts_strictly_and_divides_each_member():
    base = torch.zeros(6)
    a = torch.tensor([0.5, 0.5, 1e-6, 0.0, -0.2, 0.3])
    b = torch.tensor([0.1, 1e-6, 1e-6, 0.0, 0.2, -0.3])
    recipe = make_recipe(2, method="ram", has_base=True, epsilon=1e-5)
    ref, _ = reference_merge(base, [a, b], recipe)
    want = torch.tensor([0.3, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # no sign election
    assert torch.allclose(ref, want, atol=1e-7)


def test_ramplus_scales_match_the_float64_reference(gen):
    base, models = make_inputs((41, 17), 3, (torch.float32, [torch.float32]), gen)
    recipe = make_recipe(3, method="ramplus_tl", has_base=True, epsilon=0.01, r=0.3, alpha=4.0)
    lam64 = ramplus_lambdas(base, models, recipe)
    b = base.float()
    d = [(m.float() - b).abs() > np.float32(0.01) for m in models]
    c = sum(x.to(torch.int64) for x in d)
    shared = [int((x & (c > 1)).sum()) for x in d]
    unique = [int((x & (c == 1)).sum()) for x in d]
    lam32 = ramplus_scales(shared, unique, 0.3, 4.0, 0.01)
    assert lam32.dtype == np.float32 and np.allclose(lam32, lam64, rtol=1e-6)
    assert all(1.0 <= x <= 1.0 + 0.3 * 4.0 for x in lam64) and len(set(lam64)) > 1
    # no unique element: ρ huge, λ = 1 + r·α
    assert ramplus_scales([5], [0], 0.1, 0.2, 1e-5)[0] == np.float32(1.0) + np.float32(0.1) * np.float32(0.2)


@pytest.mark.parametrize(
    "kw,n,match",
    [
        (dict(method="nearswap"), 1, "t: method 'nearswap' needs t"),
        (dict(method="nearswap", t=0.1), 2, "takes exactly 1 model"),
        (dict(method="nearswap", t=0.1, weights=0.5), 1, "weight: method 'nearswap' does not take it"),
        (dict(method="nearswap", t=0.1, mixup_alpha=0.5), 1, "does not take M³"),
        (dict(method="ram", epsilon="x"), 2, "epsilon must be a number"),
        (dict(method="ram", r=0.1), 2, "r: method 'ram' does not take it"),
        (dict(method="ramplus_tl", alpha=float("inf")), 2, "alpha must be finite"),
        (
            dict(method="ramplus_tl", mix_ratios=[0.5, 0.5]),
            2,
            "mix_ratios: method 'ramplus_tl' does not take M³",
        ),
        (dict(method="passthrough", scale=[1.0, 2.0]), 1, "scale: expected a scalar or 1 values"),
        (dict(method="passthrough", scale=float("nan")), 1, "scale must be finite"),
        (dict(method="passthrough", gamma=0.1), 1, "gamma: method 'passthrough' does not take it"),
    ],
)
def test_bad_parameters(kw, n, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(n, has_base=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearswap_is_bit_exact_to_mergekits_float32_order(backend, gen):
    if "nearswap" not in getattr(_load(backend), "FEATURES", ()):
        pytest.skip(f"backend {backend} has no nearswap yet")
    a = torch.randn(4099, generator=gen)
    x = a + 0.02 * torch.randn(4099, generator=gen)
    t = 0.01
    dist = (a - x).abs().clamp(min=1e-6)
    w = (dist.reciprocal() * t).clamp(min=0, max=1)  # torch's `t / dist`, as mergekit writes it
    want = w * x + (1 - w) * a
    got = m3kernels.merge_tensors(a, [x], method="nearswap", t=t, backend=backend)
    assert torch.equal(got, want)
