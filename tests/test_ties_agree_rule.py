"""The TIES combine's shortcuts in the CPU kernels (csrc/cpu/variant_impl.h, ``ties_combine``) and
the bf16 store that canonicalises NaN while rounding (``store_vec_canon``): the output must equal
docs/KERNEL.md's float32 program bit for bit, NaN bits included (one canonical quiet NaN), on every
SIMD variant and output dtype.

The shortcuts: the vote starts from the first term (not 0 + it); a delta agrees iff
``!(d ^ flip <= 0)`` (flip: the sign bit when the elected sign is -) instead of ``(d != 0) &
((d > 0) == pos)``; no select after ``num * 2^-e`` when no subset of the coefficients sums to 0;
the compile-time plan (every model trimmed, none dropped). Every pair (and triple) of delta classes
is tried: NaN, ±inf, ±0, subnormals, opposite signs, values whose weighted vote cancels; and
subnormal outputs, which the AVX512_BF16 conversion (``store_bf16_cvt``) must not flush to zero.
"""

import itertools

import pytest
import torch

import m3kernels
from m3kernels.api import prepare
from m3kernels.merge.recipe import make_recipe

from helpers import have_backend
from kernel_program import stage_b

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

if have_backend("cpu"):
    from m3kernels.backends import cpu
    from m3kernels.backends.cpu import _C

F32 = torch.float32
INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}  # KERNEL.md

# deltas model - base; the base is 0.5 (exact in every dtype), so x = 0.5 + d
DELTA_CLASSES = [
    float("nan"),
    float("inf"),
    -float("inf"),
    0.0,
    -0.5,  # x = +0: d = -0.5
    0.25,
    -0.25,
    0.75,
    -0.125,
    1.0e-3,
    -1.0e-3,
    3.0e4,
    -3.0e4,
]

# n -> weight vectors: subsets summing to powers of two, to 0, and to neither. With density 0.7
# the first of each takes the kernels' compile-time TIES plan (kPlTies), the others kPlTrim;
# density 1.0 (no trim) the run-time plan.
WEIGHTS = {
    2: [[1.0, 1.0], [0.5, 0.25], [1.0, -1.0], [0.3, 0.7]],
    3: [[1.0, 1.0, 1.0], [0.5, 0.25, 0.25], [2.0, -2.0, 1.0], [1.0, 1.0, 2.0]],
}


def combos(n):
    """Every n-tuple of delta classes (n = 2) or a seeded sample of them (n = 3), repeated so that
    each SIMD lane position sees them and the vector loop (not only the tail) runs."""
    tuples = list(itertools.product(DELTA_CLASSES, repeat=n))
    if n == 3:
        g = torch.Generator().manual_seed(7)
        tuples = [tuples[i] for i in torch.randperm(len(tuples), generator=g)[:600].tolist()]
    cols = [torch.tensor([t[i] for t in tuples] * 3, dtype=F32) for i in range(n)]
    return cols


def subnormal_part(n):
    """Elements whose output is a subnormal (bf16 and f32 share the exponent range): a subnormal
    base with deltas of 0 or a few subnormal steps, both signs, each vector of 16 holding some."""
    g = torch.Generator().manual_seed(11)
    k = 160
    tiny = 2.0**-133
    base = (torch.randint(-40, 40, (k,), generator=g) * tiny).to(F32)
    models = [base + torch.randint(-3, 4, (k,), generator=g) * tiny for _ in range(n)]
    base[::5] = 0.5  # normal lanes among them
    return base, models


def inputs(n, dtype):
    ds = combos(n)
    base = torch.full_like(ds[0], 0.5)
    models = [base + d for d in ds]
    sb, sm = subnormal_part(n)
    base = torch.cat([base, sb])
    models = [torch.cat([m, s]) for m, s in zip(models, sm)]
    # x = 0.5 + (-0.5) = +0; make some of them -0 (d = -0 - 0.5 stays -0.5, the sign of x differs)
    for m in models:
        m[::7] = torch.where(m[::7] == 0, torch.tensor(-0.0), m[::7])
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("density", [1.0, 0.7])
def test_ties_agreement_equals_the_float32_program(n, dtype, level, density, restore_simd):
    if level not in _C.simd_levels():
        pytest.skip(f"{level} not supported here")
    _C.set_simd_level(level)
    base, models = inputs(n, dtype)
    for weights in WEIGHTS[n]:
        kw = dict(method="ties", density=density, weights=weights)
        recipe = make_recipe(n, has_base=True, seed=5, **kw)
        p, _ = prepare(base, models, recipe, "w", cpu)
        out = torch.full(models[0].shape, 123.0, dtype=dtype)  # poisoned
        m3kernels.merge_tensors(base, models, backend="cpu", out=out, name="w", seed=5, **kw)
        want = stage_b(p, base, models, dtype, 5, "w")
        nan_got, nan_want = torch.isnan(out), torch.isnan(want)
        assert torch.equal(nan_got, nan_want), f"n={n} weights={weights} {level}: NaN positions differ"
        nan_bits = set(out.view(INTS[dtype])[nan_got].tolist())
        assert nan_bits <= {CANONICAL_NAN[dtype]}, f"n={n} weights={weights} {level}: NaN bits {nan_bits}"
        got_bits, want_bits = out.view(INTS[dtype])[~nan_got], want.view(INTS[dtype])[~nan_want]
        bad = got_bits != want_bits
        assert not bad.any(), (
            f"n={n} weights={weights} {level}: {int(bad.sum())} of {bad.numel()} differ: got "
            f"{got_bits[bad][:3].tolist()} want {want_bits[bad][:3].tolist()}"
        )


def test_the_cases_reach_nan_inf_and_cancelled_votes():
    """The inputs hold what the shortcuts must get right: NaN outputs, infinite outputs, and
    elements whose vote is NaN without a NaN delta (+inf and -inf)."""
    base, models = inputs(2, F32)
    d0, d1 = models[0] - base, models[1] - base
    assert bool((torch.isnan(d0) & ~torch.isnan(d1)).any())
    assert bool(((d0 == float("inf")) & (d1 == -float("inf"))).any())
    assert bool(((d0 + d1) == 0).logical_and(d0 != 0).any())
    out = m3kernels.merge_tensors(base, models, backend="cpu", method="ties", density=1.0)
    assert bool(torch.isnan(out).any()) and bool(torch.isinf(out).any())
    tiny = (out != 0) & (out.abs() < torch.finfo(F32).tiny)
    assert int(tiny.sum()) > 50  # subnormal outputs (the bf16 conversion's fix-up path)
