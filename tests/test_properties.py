"""Property tests (hypothesis): any shape, density, weights, ratios and seed, CPU kernel = reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import m3kernels
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from helpers import assert_close_ulp, have_backend, term_scale

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
METHODS = st.sampled_from(["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "ties_dare"])


@st.composite
def merge_case(draw):
    n = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 37), min_size=1, max_size=3)))
    method = draw(METHODS)
    kw = dict(
        method=method,
        seed=draw(st.integers(0, 2**64 - 1)),
        weights=draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n)),
        lambda_=draw(st.floats(0.1, 1.5)),
    )
    if method in ("ties", "ties_dare", "dare_linear", "dare_ties"):
        kw["density"] = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    if method == "ties_dare":
        kw["drop_rate"] = draw(st.floats(0.0, 0.95))
    if method.startswith("dare"):
        kw["rescale"] = draw(st.sampled_from([True, False, "l1"]))
        kw["density"] = [max(d, 0.05) for d in kw["density"]]
    if n >= 2 and draw(st.booleans()):
        kw["mixup_alpha"] = draw(st.floats(0.1, 5.0))
        kw["seed"] %= 2**32  # the M³ draw takes a 32-bit seed
    if method in ("ties", "ties_dare", "dare_ties") or method == "task_arithmetic":
        kw["normalize"] = draw(st.booleans())
    dtypes = [draw(DTYPES) for _ in range(n + 2)]
    related = draw(st.booleans())
    return n, shape, kw, dtypes, related


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=merge_case(), data_seed=st.integers(0, 2**31 - 1))
def test_cpu_kernel_equals_reference(case, data_seed):
    n, shape, kw, dtypes, related = case
    g = torch.Generator().manual_seed(data_seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [
        (base + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64))
        if related
        else torch.randn(shape, generator=g, dtype=torch.float64)
        for _ in range(n)
    ]
    base = base.to(dtypes[0])
    models = [m.to(dt) for m, dt in zip(models, dtypes[1:])]
    out = torch.full(shape, float("nan"), dtype=dtypes[-1])
    m3kernels.merge_tensors(base, models, out=out, name="p", backend="cpu", **kw)
    recipe = make_recipe(n, has_base=True, **kw)
    ref, _ = reference_merge(base, models, recipe, "p")
    finite = torch.isfinite(ref.to(dtypes[-1]).to(torch.float64))  # fp16 may overflow to inf in both
    assert torch.equal(torch.isinf(out), ~finite)
    assert_close_ulp(
        torch.where(finite, out, torch.zeros_like(out)),
        torch.where(finite, ref, torch.zeros_like(ref)),
        term_scale(base, models, recipe),
        str(kw),
    )
