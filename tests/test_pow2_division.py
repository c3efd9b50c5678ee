"""Divisions the CPU kernels turn into multiplications (csrc/cpu/variant_impl.h, ``mean_rcp`` and
``den_pow2``): the mean's ``acc / mean_den`` and TIES' ``num / Σ agreeing coef`` when every such
divisor is a power of two with a normal reciprocal. Then ``x / d == x * (1 / d)`` exactly; the
output must equal docs/KERNEL.md's float32 program (true divisions) bit for bit, at the edges too:
overflow to inf, subnormal quotients, signed zeros, NaN, and coefficients that are not powers of
two (the division kept), on every SIMD variant.
"""

import pytest
import torch

import m3kernels
from m3kernels.api import prepare
from m3kernels.merge.recipe import make_recipe

from helpers import have_backend, make_inputs
from kernel_program import stage_b

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

if have_backend("cpu"):
    from m3kernels.backends import cpu
    from m3kernels.backends.cpu import _C

INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

CASES = {  # name -> (merge_tensors keywords, n)
    "ties_w1_n2": (dict(method="ties", density=0.6), 2),
    "ties_w1_n4": (dict(method="ties", density=0.6), 4),  # divisors 1..4: 3 is not a power of two
    "ties_pow2_w": (dict(method="ties", density=0.7, weights=[0.5, 0.25, 2.0]), 3),  # 0.75: divide
    "ties_quarters": (dict(method="ties", density=0.7, weights=[0.25, 0.25]), 2),
    "ties_tiny_w": (dict(method="ties", density=0.7, weights=[2.0**-120, 2.0**-120]), 2),
    "ties_big_w": (dict(method="ties", density=0.7, weights=[2.0**100, 2.0**100]), 2),
    "ties_neg_w": (dict(method="ties", density=0.7, weights=[1.0, -1.0]), 2),
    "ties_count_vote": (dict(method="ties", density=0.7, vote="count"), 2),
    "linear_n2": (dict(method="linear"), 2),
    "linear_n4": (dict(method="linear", weights=[0.5, 0.5, 1.0, 2.0]), 4),
    "linear_n3": (dict(method="linear"), 3),
    "task_mean": (dict(method="task_arithmetic", weights=[0.5, 1.5], normalize=True), 2),
}


def edge_inputs(n, dtype, gen):
    base, models = make_inputs((5000,), n, (torch.float32, [torch.float32]), gen)
    for m in models:
        m[:40] = 3.0e38 * torch.sign(m[:40])  # num overflows to inf before or after the scale
        m[40:80] = base[40:80] + 1e-39  # subnormal deltas and quotients
        m[80:90] = float("nan")
        m[90:100] = -0.0
    base[90:100] = -0.0
    models[0][100:110] = float("inf")
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the float32 program's casts
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_multiplied_divisions_equal_the_float32_program(case, dtype, level, restore_simd):
    if level not in _C.simd_levels():
        pytest.skip(f"{level} not supported here")
    _C.set_simd_level(level)
    kw, n = CASES[case]
    gen = torch.Generator().manual_seed(len(case) * 31 + n)
    base, models = edge_inputs(n, dtype, gen)
    if kw["method"] == "linear":
        base = None
    recipe = make_recipe(n, has_base=base is not None, seed=3, **kw)
    p, _ = prepare(base, models, recipe, "w", cpu)
    out = torch.full(models[0].shape, float("nan"), dtype=dtype)
    m3kernels.merge_tensors(base, models, backend="cpu", out=out, name="w", seed=3, **kw)
    want = stage_b(p, base, models, dtype, 3, "w")
    nan_o, nan_w = torch.isnan(out), torch.isnan(want)
    assert torch.equal(nan_o, nan_w), f"{case}: NaN positions differ"
    bad = out.view(INTS[dtype])[~nan_o] != want.view(INTS[dtype])[~nan_w]
    assert not bad.any(), f"{case} {level}: {int(bad.sum())} elements differ"
