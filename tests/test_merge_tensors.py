"""merge_tensors on every compiled backend against the float64 reference (docs/SPEC.md §1-§3).

Methods × dtypes (incl. mixed) × N ∈ {1, 2, 3} × odd sizes; output poisoned with NaN first;
values within one output ulp (plus the float32 arithmetic bound), thresholds exact, DARE
masks bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import m3kernels
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from cases import DTYPE_CASES, METHOD_CASES, kwargs_for
from helpers import assert_close_ulp, check_dare_mask_through_merge, have_backend, make_inputs, term_scale

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


BACKENDS = [b for b in ("cpu", "triton") if have_backend(b)]


def _run_and_check(backend, case, dtype_case, n, shape, gen, name="t.weight"):
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    kw = kwargs_for(case, n)
    base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
    out = torch.full(shape, float("nan"), dtype=out_dt)
    m3kernels.merge_tensors(base, models, out=out, name=name, backend=backend, **kw)
    recipe = make_recipe(n, has_base=True, **kw)
    ref, info = reference_merge(base, models, recipe, name)
    assert_close_ulp(
        out, ref, term_scale(base, models, recipe), f"{backend}/{case}/{dtype_case}/N={n}/{shape}"
    )
    if recipe.trim_density is not None:
        got = m3kernels.trim_thresholds(base, models, name=name, backend=backend, **kw)
        assert got == info["thresholds"], (got, info["thresholds"])


SMALL_SHAPES = [(1,), (7,), (37, 129)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matrix_small(backend, case, dtype_case, n, gen):
    for shape in SMALL_SHAPES:
        if backend == "triton" and shape == (37, 129) and n == 3 and dtype_case != "mixed":
            continue  # the interpreter is slow; the mixed case covers N = 3 at this size
        _run_and_check(backend, case, dtype_case, n, shape, gen)


LARGE = [(case, dt, n) for case in METHOD_CASES for dt, n in (("bf16", 2), ("mixed", 3))]


@pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")
@pytest.mark.parametrize("case,dtype_case,n", LARGE)
def test_matrix_large_cpu(case, dtype_case, n, gen):
    _run_and_check("cpu", case, dtype_case, n, (1000003,), gen, name="model.layers.3.mlp.up_proj.weight")


@pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_unrelated_models_cpu(n, gen):
    """Independent random models (no shared base): sign votes and trims are far from trivial."""
    for case in ("ties", "dare_ties_l1", "ties_dare", "linear_w"):
        kw = kwargs_for(case, n)
        base, models = make_inputs((4099,), n, (BF16, [BF16]), gen, related=False)
        out = torch.full((4099,), float("nan"), dtype=BF16)
        m3kernels.merge_tensors(base, models, out=out, backend="cpu", **kw)
        recipe = make_recipe(n, has_base=True, **kw)
        ref, _ = reference_merge(base, models, recipe, "")
        assert_close_ulp(out, ref, term_scale(base, models, recipe), case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 7, 4097])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_dare_mask_bit_for_bit(backend, numel, density):
    """base 0, model 1, no rescale: the merged tensor *is* the keep mask; it must equal the SPEC stream."""
    if backend == "triton" and numel > 1000 and density not in (0.5,):
        pytest.skip("interpreter time")
    check_dare_mask_through_merge(backend, numel, density)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixup_equals_explicit_ratios(backend, gen):
    base, models = make_inputs((513,), 3, (BF16, [BF16]), gen)
    a = m3kernels.merge_tensors(base, models, method="ties", mixup_alpha=0.7, seed=9, backend=backend)
    r = m3kernels.draw_mix_ratios(0.7, 3, 9)
    b = m3kernels.merge_tensors(base, models, method="ties", mix_ratios=r, seed=9, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")
def test_paper_variants_cpu(gen):
    """M³ formulas of docs/SPEC.md §2 written out directly, N = 2, λ fixed."""
    base, (m1, m2) = make_inputs((2001,), 2, (F32, [F32]), gen)
    lam = 0.3
    b, x1, x2 = (t.double() for t in (base, m1, m2))
    avg = m3kernels.merge_tensors(None, [m1, m2], method="linear", mix_ratios=lam, backend="cpu")
    torch.testing.assert_close(avg.double(), lam * x1 + (1 - lam) * x2, rtol=4e-7, atol=1e-7)
    ta = m3kernels.merge_tensors(
        base, [m1, m2], method="task_arithmetic", mix_ratios=lam, lambda_=0.5, backend="cpu"
    )
    torch.testing.assert_close(
        ta.double(), b + 0.5 * (lam * (x1 - b) + (1 - lam) * (x2 - b)), rtol=4e-7, atol=1e-7
    )


@pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")
def test_trim_ties_at_threshold_all_kept():
    """Many equal magnitudes at the threshold: all of them are kept (docs/SPEC.md §1)."""
    base = torch.zeros(100, dtype=F32)
    d = torch.tensor([1.0] * 10 + [0.5] * 30 + [0.25] * 60, dtype=F32)
    out = m3kernels.merge_tensors(base, [d], method="ties", density=0.2, backend="cpu")
    assert int((out != 0).sum()) == 40  # k = 20 falls inside the 0.5 group: all 30 kept
    assert m3kernels.trim_thresholds(base, [d], method="ties", density=0.2, backend="cpu") == [0.5]
    out0 = m3kernels.merge_tensors(base, [d], method="ties", density=0.001, backend="cpu")
    assert int((out0 != 0).sum()) == 10  # k = max(1, floor(0.1)) = 1: the ten tied at 1.0 are kept
    out0 = m3kernels.merge_tensors(base, [d], method="ties", density=0.0, backend="cpu")
    assert int((out0 != 0).sum()) == 0  # density 0 keeps nothing


@pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")
def test_out_argument_and_empty():
    base = torch.zeros((0, 5), dtype=BF16)
    out = m3kernels.merge_tensors(base, [base], method="ties", backend="cpu")
    assert out.shape == (0, 5)
    x = torch.ones(10, dtype=BF16)
    buf = torch.full((10,), float("nan"), dtype=F32)
    res = m3kernels.merge_tensors(None, [x, x], method="linear", out=buf, backend="cpu")
    assert res is buf and torch.equal(buf, torch.ones(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_deltas_follow_the_kernel_contract(backend, gen):
    """NaN deltas pass the trim (bit-pattern compare, KERNEL.md); an inf delta dropped by DARE does
    not spoil the L1 sums; kernel and reference agree on where NaN/inf appear."""
    base = torch.zeros(64)
    y = torch.randn(64, generator=gen)
    y[3] = float("nan")
    z = torch.randn(64, generator=gen)
    for kw in (
        dict(method="ties", density=1.0),
        dict(method="ties", density=0.5),
        dict(method="ties_dare", drop_rate=0.3, density=0.5),
    ):
        out = m3kernels.merge_tensors(base, [y, z], backend=backend, **kw)
        ref = reference_merge(base, [y, z], make_recipe(2, has_base=True, **kw), "")[0]
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), kw
    w = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, float("inf")])
    kw = dict(method="dare_linear", density=0.5, rescale="l1", seed=1)
    out = m3kernels.merge_tensors(torch.zeros(8), [w], backend=backend, **kw)
    ref = reference_merge(torch.zeros(8), [w], make_recipe(1, has_base=True, **kw), "")[0]
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(torch.isnan(out), torch.isnan(ref))
