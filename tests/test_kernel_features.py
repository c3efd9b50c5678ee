"""The issue-8 kernel pieces of docs/KERNEL.md on every backend that lists them in ``FEATURES``.

Each piece is checked bit for bit against its transcription in tests/kernel_program.py (float32
torch operations for stage B, float64 in the defined summation order for the Gram matrices),
on fresh random inputs of odd sizes, every dtype mix, outputs poisoned before the call; the CPU
also for 1 and 2 threads, every SIMD variant and split calls (``index_offset``). A backend is
tested for a piece as soon as its module's ``FEATURES`` names it (the Triton and CUDA backends
join by adding the names).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from m3kernels.merge.kernel_params import GROUP_COLUMN, GROUP_NONE, GROUP_ROW, make_params
from m3kernels.merge.recipe import make_recipe

import kernel_program as kp
from helpers import have_backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MODULES = {
    "cpu": "m3kernels.backends.cpu",
    "triton": "m3kernels.backends.triton",
    "cuda": "m3kernels.backends.cuda",
}


def _device(name: str) -> str:
    return "cpu" if name == "cpu" or not torch.cuda.is_available() else "cuda"


def feature_backends(feature: str) -> list:
    """pytest params (backend module name) of the backends available here whose FEATURES has ``feature``;
    the others appear skipped, with the reason."""
    out = []
    for name, mod_name in MODULES.items():
        if not have_backend(name):
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"backend {name} not available")))
            continue
        mod = importlib.import_module(mod_name)
        if feature not in getattr(mod, "FEATURES", frozenset()) or not mod.supports(_device(name)):
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} lacks {feature!r}")))
            continue
        out.append(pytest.param(name))
    return out


def interpreted(name: str) -> bool:
    """True for a GPU backend run by Triton's CPU interpreter (slow: small sizes only)."""
    return name != "cpu" and not torch.cuda.is_available()


def skip_big(name: str, numel: int) -> None:
    if interpreted(name) and numel > 5_000:
        pytest.skip(f"{numel} elements: too slow for the Triton interpreter")


def backend(name: str):
    return importlib.import_module(MODULES[name])


def inputs(shape, n, base_dtype, model_dtypes, gen, device="cpu", scale=1.0):
    """A base (None when base_dtype is None) and n models = base + noise."""
    b = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    models = [
        (b + 0.05 * scale * torch.randn(shape, generator=gen, dtype=torch.float64))
        .to(model_dtypes[i % len(model_dtypes)])
        .to(device)
        for i in range(n)
    ]
    return (None if base_dtype is None else b.to(base_dtype).to(device)), models


def params(n, has_base, **fields):
    """make_params of a task_arithmetic recipe (or linear without a base) with ``fields`` replaced."""
    method = "task_arithmetic" if has_base else "linear"
    p = make_params(make_recipe(n, has_base=has_base, method=method), "t", has_base)
    return p.with_fields(**fields) if fields else p


@pytest.fixture
def restore_threads():
    from m3kernels import _C

    threads, level = _C.get_num_threads(), _C.simd_level()
    yield _C
    _C.set_num_threads(threads)
    _C.set_simd_level(level)


def _cpu_gram(p, base, models):
    return backend("cpu").gram(p, base, models)


def assert_gram_equal(name, got, want, what=""):
    """Bit for bit (NaN where NaN); a backend that cannot follow the summation order says so with
    ``GRAM_EXACT_ORDER = False`` and must then agree to 1e-12 relative (docs/KERNEL.md)."""
    got = np.asarray(got)
    assert got.dtype == np.float64 and got.shape == want.shape, (what, got.shape, want.shape)
    if getattr(backend(name), "GRAM_EXACT_ORDER", True):
        np.testing.assert_array_equal(got, want, err_msg=what)  # NaN == NaN here
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=what)


# ----------------------------------------------------------------------------- gram

GRAM_SHAPES = [
    (GROUP_NONE, (1,)),
    (GROUP_NONE, (7,)),
    (GROUP_NONE, (70_001,)),  # two chunks, a partial last one
    (GROUP_ROW, (5, 13)),
    (GROUP_ROW, (2, 65_541)),  # rows longer than a chunk
    (GROUP_ROW, (3001, 3)),
    (GROUP_COLUMN, (9, 37)),  # columns not a multiple of the kernels' column blocks
    (GROUP_COLUMN, (65_539, 3)),  # columns longer than a chunk
    (GROUP_COLUMN, (1, 5)),
]
GRAM_DTYPES = [
    (F32, [F32]),
    (BF16, [BF16, F16, F32]),
    (F16, [BF16]),
    (None, [F32, BF16]),  # no base: v_i = f32(x_i)
]


@pytest.mark.parametrize("be", feature_backends("gram"))
@pytest.mark.parametrize("dtypes", GRAM_DTYPES, ids=lambda d: f"{d[0]}-{'-'.join(str(x) for x in d[1])}")
@pytest.mark.parametrize("group,shape", GRAM_SHAPES, ids=lambda x: str(x))
def test_gram_bits_equal_program(be, group, shape, dtypes, gen):
    n = 3
    skip_big(be, int(np.prod(shape)))
    base, models = inputs(shape, n, dtypes[0], dtypes[1], gen, device=_device(be))
    row_len = shape[-1] if group != GROUP_NONE else 1
    p = params(n, base is not None, coef_group=group, row_len=row_len)
    got = backend(be).gram(p, base, models)
    want = kp.gram(p, None if base is None else base.cpu(), [m.cpu() for m in models])
    groups = {GROUP_NONE: 1, GROUP_ROW: shape[0], GROUP_COLUMN: shape[-1]}[group]
    assert want.shape == (groups, n, n)
    assert_gram_equal(be, got, want, f"{be} group {group} shape {shape}")
    np.testing.assert_array_equal(want, np.swapaxes(want, 1, 2))
    # the program itself: the exact float64 dot products to rounding
    b = base.cpu().to(F32) if base is not None else 0.0
    v = torch.stack([(m.cpu().to(F32) - b).to(torch.float64) for m in models]).reshape(n, -1)
    if group == GROUP_NONE:
        exact = (v @ v.T)[None]
    else:
        r = v.reshape(n, -1, shape[-1])
        r = r if group == GROUP_ROW else r.transpose(1, 2)
        exact = torch.einsum("igl,kgl->gik", r, r)
    np.testing.assert_allclose(want, exact.numpy(), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("be", feature_backends("gram"))
def test_gram_n1_and_many_models(be, gen):
    c = 409 if interpreted(be) else 4099
    for n in (1, 7):
        base, models = inputs((3, c), n, BF16, [F16, BF16], gen, device=_device(be))
        for group, row_len in ((GROUP_NONE, 1), (GROUP_ROW, c), (GROUP_COLUMN, c)):
            p = params(n, True, coef_group=group, row_len=row_len)
            want = kp.gram(p, base.cpu(), [m.cpu() for m in models])
            assert_gram_equal(be, backend(be).gram(p, base, models), want, f"n={n} group {group}")


@pytest.mark.parametrize("be", feature_backends("gram"))
def test_gram_non_finite_propagates(be, gen):
    base, models = inputs((4, 1001), 2, F32, [F32], gen, device=_device(be))
    models[0].view(-1)[17] = float("nan")
    models[1].view(-1)[3 * 1001 + 5] = float("inf")
    for group in (GROUP_NONE, GROUP_ROW, GROUP_COLUMN):
        p = params(2, True, coef_group=group, row_len=1001)
        got = np.asarray(backend(be).gram(p, base, models))
        want = kp.gram(p, base.cpu(), [m.cpu() for m in models])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        assert_gram_equal(be, got[fin], want[fin], f"group {group}")
        assert not np.isfinite(want).all()


def test_gram_thread_counts_and_simd_variants(gen, restore_threads):
    _C = restore_threads
    shapes = [(GROUP_NONE, (200_003,)), (GROUP_ROW, (7, 30_011)), (GROUP_COLUMN, (70_001, 5))]
    for group, shape in shapes:
        base, models = inputs(shape, 3, BF16, [BF16, F16, F32], gen)
        p = params(3, True, coef_group=group, row_len=shape[-1] if group else 1)
        want = kp.gram(p, base, models)
        for level in _C.simd_levels():
            _C.set_simd_level(level)
            for threads in (1, 2):
                _C.set_num_threads(threads)
                got = _cpu_gram(p, base, models)
                np.testing.assert_array_equal(got, want, err_msg=f"{level} {threads} threads {shape}")


def test_gram_argument_checks(gen):
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    base, models = inputs((6, 5), 2, F32, [F32], gen)
    with pytest.raises(ValueError, match="row_len"):
        _cpu_gram(params(2, True, coef_group=GROUP_ROW, row_len=4), base, models)
    with pytest.raises(ValueError, match="row_len"):
        _cpu_gram(params(2, True, coef_group=GROUP_COLUMN, row_len=0), base, models)
    with pytest.raises(ValueError, match="coef_group"):
        _cpu_gram(params(2, True, coef_group=3, row_len=5), base, models)
    empty = _cpu_gram(params(2, True), torch.zeros(0), [torch.zeros(0), torch.zeros(0)])
    np.testing.assert_array_equal(empty, np.zeros((1, 2, 2)))
