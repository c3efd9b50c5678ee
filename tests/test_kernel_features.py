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

from m3kernels.merge.kernel_params import (
    COMBINE_NEARSWAP,
    COMBINE_RAM,
    GROUP_COLUMN,
    GROUP_NONE,
    GROUP_ROW,
    make_params,
)
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


SEED, NAME = 11, "t"


def params(n, has_base, method=None, recipe_kw=None, **fields):
    """make_params of a recipe (task_arithmetic, or linear without a base) with ``fields`` replaced."""
    method = method or ("task_arithmetic" if has_base else "linear")
    recipe = make_recipe(n, has_base=has_base, method=method, seed=SEED, **(recipe_kw or {}))
    p = make_params(recipe, NAME, has_base)
    return p.with_fields(**fields) if fields else p


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


INT_VIEW = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}


def assert_same_bits(out: torch.Tensor, expected: torch.Tensor, what: str = ""):
    """Equal bit patterns (NaNs: NaN in both; the kernels write one canonical NaN)."""
    out, expected = out.cpu(), expected.cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape, what
    on, en = torch.isnan(out), torch.isnan(expected)
    assert torch.equal(on, en), f"{what}: NaN positions differ ({int((on != en).sum())} elements)"
    a = out.reshape(-1).view(INT_VIEW[out.dtype])[~on.reshape(-1)]
    b = expected.reshape(-1).view(INT_VIEW[out.dtype])[~en.reshape(-1)]
    bad = (a != b).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {out.numel()} elements differ; first: got "
            f"{out.reshape(-1)[~on.reshape(-1)][j].item()!r}, expected {expected.reshape(-1)[~en.reshape(-1)][j].item()!r}"
        )


def run_merge(be, p, base, models, out_dtype):
    """backend ``be``'s stage B into a poisoned output, and the program's result."""
    dev = _device(be)
    out = poisoned(models[0].shape, out_dtype, dev)
    backend(be).merge(p, base, models, out)
    want = kp.stage_b(
        p, None if base is None else base.cpu(), [m.cpu() for m in models], out_dtype, SEED, NAME
    )
    return out, want


def key_at_rank(base, models, i, q) -> int:
    """bits(|d_i|) at quantile q of model i (a realistic trim bound)."""
    b = base.cpu().to(F32) if base is not None else 0.0
    bits = (models[i].cpu().to(F32) - b).abs().reshape(-1).view(torch.int32).to(torch.int64)
    return int(torch.quantile(bits.to(torch.float64), q))


@pytest.fixture
def restore_threads():
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
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


# ----------------------------------------------------------------------------- trim window

DTYPE_MIXES = [(F32, [F32], F32), (BF16, [BF16, F16], BF16), (F16, [F32, BF16], F16), (BF16, [F16], F32)]
IDS = lambda d: f"{d[0]}-{'-'.join(str(x) for x in d[1])}-{d[2]}"  # noqa: E731


@pytest.mark.parametrize("be", feature_backends("trim_max"))
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=IDS)
@pytest.mark.parametrize("numel", [1, 7, 4099])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_trim_window_bits_equal_program(be, method, numel, dtypes, gen):
    for n in (1, 3):
        base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen, device=_device(be))
        kw = {"density": 0.7} if method == "dare_ties" else {}
        p = params(n, True, method=method, recipe_kw=kw)
        lo = [key_at_rank(base, models, i, 0.2) for i in range(n)]
        hi = [key_at_rank(base, models, i, 0.8) for i in range(n)]
        lo[0] = 0  # a window with no lower end
        if n > 1:
            hi[1] = 0x7FFFFFFF  # no real upper end
        if n > 2:
            lo[2] = 1 << 32  # keep nothing
        p = p.with_trim(lo, hi)
        out, want = run_merge(be, p, base, models, dtypes[2])
        assert_same_bits(out, want, f"{be} {method} n={n}")
        # the window matters: without it the result differs (where anything lies above it)
        if numel > 100:
            plain = kp.stage_b(
                p.with_fields(trim_max=None), base.cpu(), [m.cpu() for m in models], dtypes[2], SEED, NAME
            )
            assert not torch.equal(plain, want)


@pytest.mark.parametrize("be", feature_backends("trim_max"))
def test_trim_window_drops_nan_and_inf_above_it(be, gen):
    base, models = inputs((1000,), 2, F32, [F32], gen, device=_device(be))
    models[0][5] = float("nan")
    models[1][6] = float("inf")
    p = params(2, True).with_trim([0, 0], [0x3F800000, 0x7F800000])  # |d| <= 1.0 / <= inf
    out, want = run_merge(be, p, base, models, F32)
    assert_same_bits(out, want)
    assert not torch.isnan(out[5]) and torch.isinf(out[6])


# ----------------------------------------------------------------------------- group coefficients

GROUP_CASES = [
    (GROUP_ROW, (5, 13)),
    (GROUP_ROW, (301, 3)),
    (GROUP_ROW, (4, 1)),
    (GROUP_COLUMN, (9, 37)),
    (GROUP_COLUMN, (70, 17)),
    (GROUP_COLUMN, (1, 5)),
    (GROUP_ROW, (3, 4099)),
]


def group_params(n, has_base, group, shape, gen, combine=0, method=None, recipe_kw=None, lam=1.0):
    groups = shape[0] if group == GROUP_ROW else shape[-1]
    gc = (torch.randn(groups * n, generator=gen) * 0.7).numpy().astype(np.float32)
    gc[: min(3, gc.size)] = [0.0, -0.0, 1.0][: min(3, gc.size)]
    p = params(n, has_base, method=method, recipe_kw=recipe_kw)
    return p.with_fields(
        coef_group=group, row_len=shape[-1], group_coef=gc, combine=combine, lam=lam, mean_den=1.75
    )


@pytest.mark.parametrize("be", feature_backends("group_coef"))
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=IDS)
@pytest.mark.parametrize("group,shape", GROUP_CASES, ids=str)
def test_group_coef_bits_equal_program(be, group, shape, dtypes, gen):
    for n, has_base, combine, lam in (
        (2, False, 0, 1.0),
        (3, True, 0, 0.75),
        (1, True, 1, 1.0),
        (5, True, 0, 1.0),
    ):
        base, models = inputs(shape, n, dtypes[0], dtypes[1], gen, device=_device(be))
        p = group_params(n, has_base, group, shape, gen, combine=combine, lam=lam)
        out, want = run_merge(be, p, base if has_base else None, models, dtypes[2])
        assert_same_bits(out, want, f"{be} n={n} base={has_base} combine={combine}")


@pytest.mark.parametrize("be", feature_backends("group_coef"))
def test_group_coef_with_dare_and_trim(be, gen):
    shape = (37, 41)
    base, models = inputs(shape, 3, BF16, [BF16, F32], gen, device=_device(be))
    p = group_params(3, True, GROUP_COLUMN, shape, gen, method="dare_linear", recipe_kw={"density": 0.6})
    p = p.with_trim(
        [key_at_rank(base, models, i, 0.3) for i in range(3)],
        [key_at_rank(base, models, i, 0.9) for i in range(3)],
    )
    out, want = run_merge(be, p, base, models, BF16)
    assert_same_bits(out, want)


def test_group_coef_index_ranges_give_one_merge(gen):
    """merge_range (the CPU's parts of a large tensor): flat index J = index_offset + j."""
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    cpu = backend("cpu")
    for group, shape in ((GROUP_ROW, (29, 37)), (GROUP_COLUMN, (29, 37))):
        base, models = inputs(shape, 2, F16, [BF16, F32], gen)
        p = group_params(2, True, group, shape, gen, method="dare_linear", recipe_kw={"density": 0.5})
        p = p.with_trim(
            [0, key_at_rank(base, models, 1, 0.2)], [key_at_rank(base, models, 0, 0.9), 0x7FFFFFFF]
        )
        whole = poisoned(shape, BF16)
        cpu.merge(p, base, models, whole)
        assert_same_bits(whole, kp.stage_b(p, base, models, BF16, SEED, NAME))
        flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
        parts = poisoned((base.numel(),), BF16)
        cuts = [0, 1, 38, 500, 517, 1072, base.numel()]
        for lo, hi in zip(cuts, cuts[1:]):
            cpu.merge_range(p, flat_b[lo:hi], [m[lo:hi] for m in flat_m], parts[lo:hi], lo)
        assert_same_bits(parts.reshape(shape), whole, f"group {group} in parts")


def test_group_coef_argument_checks(gen):
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    cpu = backend("cpu")
    shape = (6, 5)
    base, models = inputs(shape, 2, F32, [F32], gen)
    out = poisoned(shape, F32)
    p = group_params(2, True, GROUP_ROW, shape, gen)
    with pytest.raises(ValueError, match="group_coef"):
        cpu.merge(p.with_fields(group_coef=p.group_coef[:-2]), base, models, out)  # 5 rows, 6 needed
    with pytest.raises(ValueError, match="group_coef"):
        cpu.merge(p.with_fields(group_coef=p.group_coef[:-1]), base, models, out)  # not groups * n
    with pytest.raises(ValueError, match="group_coef is None"):
        cpu.merge(p.with_fields(group_coef=None), base, models, out)
    with pytest.raises(ValueError, match="combine"):
        cpu.merge(p.with_fields(combine=2), base, models, out)
    pc = group_params(2, True, GROUP_COLUMN, shape, gen)
    with pytest.raises(ValueError, match="exactly 6"):  # column groups: one per column
        cpu.merge(pc.with_fields(row_len=6, group_coef=np.zeros(10, np.float32)), base, models, out)
    with pytest.raises(ValueError, match="not supported"):
        cpu.merge_batch(
            p, [base.data_ptr()], F32, [m.data_ptr() for m in models], [F32, F32], [30], [out.data_ptr()], F32
        )


# ----------------------------------------------------------------------------- nearswap


def special_values(numel, dtype, gen) -> torch.Tensor:
    """Random values with NaN, +-inf, +-0 and subnormals sprinkled in."""
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    specials = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e-39, 6e-8], dtype=torch.float64
    )
    idx = torch.randint(0, numel, (max(1, numel // 15),), generator=gen)
    x[idx] = specials[torch.randint(0, len(specials), (len(idx),), generator=gen)]
    return x.to(dtype)


@pytest.mark.parametrize("be", feature_backends("nearswap"))
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=IDS)
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_nearswap_bits_equal_program(be, numel, dtypes, gen):
    dev = _device(be)
    for t in (0.001, 0.1, 0.0, 5.0, -0.5):
        base, models = inputs((numel,), 1, dtypes[0], dtypes[1][:1], gen, device=dev, scale=0.01)
        models[0][: numel // 3] = base[: numel // 3].to(models[0].dtype)  # dist 0 (clamped to 1e-6)
        p = params(1, True).with_fields(combine=COMBINE_NEARSWAP, clip_t=float(np.float32(t)))
        out, want = run_merge(be, p, base, models, dtypes[2])
        assert_same_bits(out, want, f"t={t}")
    base = special_values(numel, dtypes[0], gen).to(dev)
    models = [special_values(numel, dtypes[1][0], gen).to(dev)]
    p = params(1, True).with_fields(combine=COMBINE_NEARSWAP, clip_t=0.25)
    out, want = run_merge(be, p, base, models, dtypes[2])
    assert_same_bits(out, want, "special values")


def test_nearswap_against_float64_formula(gen):
    """The program is mergekit's nearswap: w = clamp(t / max(|a - x|, 1e-6), 0, 1), y = w x + (1 - w) a."""
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    base, models = inputs((5000,), 1, F32, [F32], gen, scale=0.01)
    p = params(1, True).with_fields(combine=COMBINE_NEARSWAP, clip_t=float(np.float32(0.0005)))
    out, _ = run_merge("cpu", p, base, models, F32)
    a, x = base.double(), models[0].double()
    w = (0.0005 / (a - x).abs().clamp_min(1e-6)).clamp(0, 1)
    ref = w * x + (1 - w) * a
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- ram


def ram_inputs(numel, n, dtypes, gen, dev):
    """Models equal to the base at random places, so that c (the models with |d| > eps) varies."""
    base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen, device=dev)
    for m in models:
        same = torch.rand(numel, generator=gen) < 0.4
        m[same.to(dev)] = base[same.to(dev)].to(m.dtype)
    return base, models


@pytest.mark.parametrize("be", feature_backends("ram"))
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=IDS)
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_ram_bits_equal_program(be, numel, dtypes, gen):
    dev = _device(be)
    for n, eps, scales in ((1, 0.0, None), (2, 1e-3, None), (3, 0.0, [0.5, 2.0, 1.25]), (5, 5e-3, [1.5] * 5)):
        base, models = ram_inputs(numel, n, dtypes, gen, dev)
        p = params(n, True).with_fields(combine=COMBINE_RAM, ram_eps=float(np.float32(eps)))
        if scales is not None:
            p = p.with_fields(unique_scale=scales)
        out, want = run_merge(be, p, base, models, dtypes[2])
        assert_same_bits(out, want, f"{be} n={n} eps={eps}")
    base = special_values(numel, dtypes[0], gen).to(dev)
    models = [special_values(numel, d, gen).to(dev) for d in dtypes[1]]
    p = params(len(models), True).with_fields(combine=COMBINE_RAM, ram_eps=0.01)
    out, want = run_merge(be, p, base, models, dtypes[2])
    assert_same_bits(out, want, "special values")


def test_ram_against_float64_formula(gen):
    """RAM: a delta no other model has is kept (times its unique scale), shared ones are averaged."""
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    base, models = ram_inputs(6000, 3, (F32, [F32]), gen, "cpu")
    p = params(3, True).with_fields(combine=COMBINE_RAM, ram_eps=0.0, unique_scale=[1.0, 2.0, 0.5])
    out, _ = run_merge("cpu", p, base, models, F32)
    d = torch.stack([m.double() - base.double() for m in models])
    mask = d.abs() > 0
    c = mask.sum(0)
    uniq = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:, None]
    term = torch.where(c == 1, d * uniq, d / c.clamp_min(1))
    ref = base.double() + (term * mask).sum(0)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-7)
    assert (c == 1).any() and (c > 1).any() and (c == 0).any()


@pytest.mark.parametrize("be", feature_backends("ram_counts"))
@pytest.mark.parametrize("numel", [1, 7, 70_001])
def test_ram_counts_equal_program(be, numel, gen):
    skip_big(be, numel)
    dev = _device(be)
    for n, eps in ((1, 0.0), (3, 2e-3)):
        base, models = ram_inputs(numel, n, (BF16, [BF16, F16, F32]), gen, dev)
        p = params(n, True, method="dare_linear", recipe_kw={"density": 0.8}).with_fields(
            combine=COMBINE_RAM, ram_eps=float(np.float32(eps))
        )
        shared, unique = backend(be).ram_counts(p, base, models)
        ws, wu = kp.ram_counts(p, base.cpu(), [m.cpu() for m in models], SEED, NAME)
        np.testing.assert_array_equal(np.asarray(shared), ws)
        np.testing.assert_array_equal(np.asarray(unique), wu)
        if numel > 1000:
            assert (wu > 0).all() and ((ws > 0).all() or n == 1)


# ----------------------------------------------------------------------------- CPU entry points


def test_new_combines_thread_counts_simd_and_batches(gen, restore_threads):
    """The same bytes for 1 and 2 threads, every SIMD variant, merge_range parts and merge_batch."""
    _C = restore_threads
    cpu = backend("cpu")
    numel = 30_011
    base, models = ram_inputs(numel, 3, (BF16, [BF16, F16]), gen, "cpu")
    shape2 = (70, 429)  # 30,030 elements
    cases = [
        (
            params(3, True).with_fields(combine=COMBINE_RAM, ram_eps=1e-3, unique_scale=[1.5, 1, 0.5]),
            base,
            models,
        ),
        (params(1, True).with_fields(combine=COMBINE_NEARSWAP, clip_t=0.002), base, models[:1]),
        (
            params(3, True, method="ties", recipe_kw={"density": 0.5}).with_trim([0, 1, 2], [0x3C000000] * 3),
            base,
            models,
        ),
    ]
    b2, m2 = inputs(shape2, 2, F16, [BF16], gen)
    for group in (GROUP_ROW, GROUP_COLUMN):
        cases.append((group_params(2, True, group, shape2, gen), b2, m2))
    for p, b, ms in cases:
        want = kp.stage_b(p, b, ms, BF16, SEED, NAME)
        for level in _C.simd_levels():
            _C.set_simd_level(level)
            for threads in (1, 2):
                _C.set_num_threads(threads)
                out = poisoned(ms[0].shape, BF16)
                cpu.merge(p, b, ms, out)
                assert_same_bits(out, want, f"{level} {threads} threads combine {p.combine}")
        fb, fm = b.reshape(-1), [m.reshape(-1) for m in ms]
        parts = poisoned((fb.numel(),), BF16)
        for lo in range(0, fb.numel(), 7001):
            hi = min(fb.numel(), lo + 7001)
            cpu.merge_range(p, fb[lo:hi], [m[lo:hi] for m in fm], parts[lo:hi], lo)
        assert_same_bits(parts.reshape(want.shape), want, f"parts, combine {p.combine}")
    # merge_batch: nearswap and ram (no per-tensor state) per tensor as merge does
    for p, ms in ((cases[0][0], models), (cases[1][0], models[:1])):
        sizes = [7, 1000, 3]
        bs = [base[:k].clone() for k in sizes]
        mss = [[m[:k].clone() for m in ms] for k in sizes]
        outs = [poisoned((k,), BF16) for k in sizes]
        cpu.merge_batch(
            p,
            [x.data_ptr() for x in bs],
            BF16,
            [m.data_ptr() for t in mss for m in t],
            [m.dtype for m in ms],
            sizes,
            [o.data_ptr() for o in outs],
            BF16,
        )
        for b, t, o in zip(bs, mss, outs):
            assert_same_bits(o, kp.stage_b(p, b, t, BF16, SEED, NAME), "merge_batch")
    # a trim window with per-tensor ks is refused
    p = cases[2][0]
    out = poisoned((7,), BF16)
    with pytest.raises(ValueError, match="trim_max"):
        cpu.merge_batch(
            p,
            [base.data_ptr()],
            BF16,
            [m.data_ptr() for m in models],
            [BF16, F16, BF16],
            [7],
            [out.data_ptr()],
            BF16,
            [1, 1, 1],
        )


def test_new_combine_argument_checks(gen):
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    cpu = backend("cpu")
    base, models = inputs((10,), 2, F32, [F32], gen)
    out = poisoned((10,), F32)
    with pytest.raises(ValueError, match="nearswap"):
        cpu.merge(params(2, True).with_fields(combine=COMBINE_NEARSWAP), base, models, out)
    with pytest.raises(ValueError, match="nearswap"):
        cpu.merge(params(1, False).with_fields(combine=COMBINE_NEARSWAP), None, models[:1], out)
    with pytest.raises(ValueError, match="ram"):
        cpu.merge(params(2, False).with_fields(combine=COMBINE_RAM), None, models, out)
    with pytest.raises(ValueError, match="combine"):
        cpu.merge(params(2, True).with_fields(combine=5), base, models, out)
    with pytest.raises(ValueError, match="unique_scale"):
        cpu.merge(params(2, True).with_fields(combine=COMBINE_RAM, unique_scale=[1.0]), base, models, out)
    with pytest.raises(ValueError, match="trim_max"):
        cpu.merge(params(2, True).with_fields(trim_max=[1]), base, models, out)
    with pytest.raises(ValueError, match="no field"):
        params(2, True).with_fields(clipt=1.0)


# ----------------------------------------------------------------------------- two order statistics


@pytest.mark.parametrize("numel", [1, 7, 5003, 70_001])
def test_select_thresholds_multi_equals_sorting(numel, gen):
    """select_thresholds_multi (histogram passes) and select_from_keys_multi: for every k of every
    model the exact k-th largest bits(|d'|), as a full sort gives; one low-16 pass per distinct bucket."""
    from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE
    from m3kernels.merge.select import select_from_keys_multi, select_thresholds, select_thresholds_multi

    n = 3
    base, models = inputs((numel,), n, BF16, [BF16, F16, F32], gen)
    models[1][: numel // 2] = base[: numel // 2].to(F16)  # many ties at 0
    keys = np.stack(
        [(m.to(F32) - base.to(F32)).abs().view(torch.int32).numpy().astype(np.uint32) for m in models]
    )
    calls = []

    def hist(prefix):
        calls.append(None if prefix is None else prefix.copy())
        h = np.zeros((n, 65536), np.int64)
        for i in range(n):
            if prefix is None:
                h[i] = np.bincount(keys[i] >> 16, minlength=65536)
            else:
                sel = keys[i][(keys[i] >> 16) == prefix[i]]
                h[i] = np.bincount(sel & 0xFFFF, minlength=65536)
        return h

    ks = [
        (1, max(1, numel // 10), numel // 2, numel),
        (numel, numel + 5, 0, None),
        (max(1, numel // 3), max(1, numel // 3 + 1)),
    ]
    got = select_thresholds_multi(hist, ks, numel)
    by_keys = select_from_keys_multi(keys, ks, numel)
    for i, row in enumerate(ks):
        desc = np.sort(keys[i])[::-1]
        want = tuple(
            TRIM_KEEP_ALL if k is None else TRIM_KEEP_NONE if k <= 0 else int(desc[min(k, numel) - 1])
            for k in row
        )
        assert got[i] == want and by_keys[i] == want, (i, row)
        for k, v in zip(row, want):  # each equals the single-k selection
            calls_before = len(calls)
            assert select_thresholds(hist, [k if j == i else None for j in range(n)], numel)[i] == v
            del calls[calls_before:]
    # one high-16 pass, then one pass per distinct bucket of the model that needs the most
    need = max(
        len({int(np.sort(keys[i])[::-1][min(k, numel) - 1]) >> 16 for k in row if k is not None and k > 0})
        for i, row in enumerate(ks)
    )
    assert calls[0] is None and len(calls) == 1 + need


# ----------------------------------------------------------------------------- exact-k ties


def exact_k_params(be, p, base, models, windows):
    """Stage A of the exact-k tie rule on backend ``be``: ``windows[i]`` = (D, T), keep ranks
    D .. D + T - 1 of model i in the order (key descending, flat index ascending) (D = 0: a top-T
    trim). Thresholds from select_thresholds_ties on the backend's histograms, prefixes from its
    tie_counts."""
    from m3kernels.merge.kernel_params import TRIM_MAX_ALL, tie_prefixes
    from m3kernels.merge.select import select_thresholds_ties

    mod, numel = backend(be), models[0].numel()
    ks = [((d + 1, d + t) if d > 0 else (d + t,)) for d, t in windows]
    sel = select_thresholds_ties(lambda pre: mod.histogram(p, base, models, pre), ks, numel)
    tmin, tmax, keep, skip = [], [], [], []
    for (d, _), row in zip(windows, sel):
        (vmin, nmin) = row[-1]
        tmin.append(vmin)
        keep.append(nmin)
        if d > 0:
            vmax, nmax = row[0]
            tmax.append(vmax)
            skip.append(nmax - 1)
        else:
            tmax.append(TRIM_MAX_ALL)
            skip.append(0)
    q = p.with_trim(tmin, tmax).with_fields(tie_keep=keep, tie_skip=skip)
    cmin, cmax = mod.tie_counts(q, base, models)
    return q.with_fields(tie_prefix_min=tie_prefixes(cmin), tie_prefix_max=tie_prefixes(cmax))


def kept_ranks(p, base, models, i):
    """(rank, key) of model i's elements: rank in the order (key descending, flat index ascending)."""
    _, ds = kp.dropped_deltas(p, base, models, SEED, NAME)
    key = ds[i].reshape(-1).abs().view(torch.int32).to(torch.int64).numpy()
    order = np.lexsort((np.arange(key.size), -key))  # key descending, then index ascending
    rank = np.empty(key.size, np.int64)
    rank[order] = np.arange(key.size)
    return rank, key


@pytest.mark.parametrize("be", feature_backends("trim_ties_k"))
@pytest.mark.parametrize("numel", [7, 5003, 70_001])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_exact_k_keeps_exactly_the_window(be, method, numel, gen):
    skip_big(be, numel)
    dev = _device(be)
    n = 3
    # bf16 fine-tunes close to the base: few distinct |d| values, many ties at any threshold
    base, models = inputs((numel,), n, BF16, [BF16], gen, device=dev)
    kw = {"density": 0.8} if method == "dare_ties" else {}
    p = params(n, True, method=method, recipe_kw=kw)
    windows = [(0, max(1, numel // 5)), (numel // 10, numel // 3), (max(0, numel // 2 - 1), 1)]
    q = exact_k_params(be, p, base, models, windows)
    out = poisoned((numel,), F32, dev)
    backend(be).merge(q, base, models, out)
    want = kp.stage_b(q, base.cpu(), [m.cpu() for m in models], F32, SEED, NAME)
    assert_same_bits(out, want, f"{be} {method}")
    ties_seen = 0
    for i, (dd, t) in enumerate(windows):
        rank, key = kept_ranks(q, base.cpu(), [m.cpu() for m in models], i)
        _, ds = kp.dropped_deltas(q, base.cpu(), [m.cpu() for m in models], SEED, NAME)
        kept = kp._exact_ties(q, i, ds[i].reshape(-1), int(q.trim_min[i]), int(q.trim_max[i]))
        # kept = exactly ranks dd .. dd + t - 1 (a kept 0 stays 0, so compare among the non-zero keys)
        in_window = (rank >= dd) & (rank < dd + t)
        nonzero = key != 0
        np.testing.assert_array_equal((kept != 0).numpy(), in_window & nonzero, err_msg=f"model {i}")
        vmin = int(q.trim_min[i])
        ties_seen += int(((key == vmin) & ~in_window).sum() > 0)
    if numel > 1000:
        assert ties_seen > 0  # the rule had ties to break


def test_exact_k_cpu_threads_simd_parts_and_checks(gen, restore_threads):
    _C = restore_threads
    cpu = backend("cpu")
    numel = 10 * 1024 + 77
    base, models = inputs((numel,), 2, BF16, [BF16, F16], gen)
    p = exact_k_params("cpu", params(2, True, method="ties"), base, models, [(0, 3000), (500, 4000)])
    want = kp.stage_b(p, base, models, BF16, SEED, NAME)
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        for threads in (1, 2):
            _C.set_num_threads(threads)
            out = poisoned((numel,), BF16)
            cpu.merge(p, base, models, out)
            assert_same_bits(out, want, f"{level} {threads} threads")
    parts = poisoned((numel,), BF16)
    for lo in range(0, numel, 3 * 1024):
        hi = min(numel, lo + 3 * 1024)
        cpu.merge_range(p, base[lo:hi], [m[lo:hi] for m in models], parts[lo:hi], lo)
    assert_same_bits(parts, want, "parts")
    with pytest.raises(ValueError, match="multiple of 1024"):
        cpu.merge_range(p, base[100:200], [m[100:200] for m in models], parts[100:200], 100)
    with pytest.raises(ValueError, match="tie_prefix_min"):
        cpu.merge(p.with_fields(tie_prefix_min=None), base, models, parts)
    with pytest.raises(ValueError, match="tie_blocks"):
        cpu.merge(p.with_fields(tie_prefix_min=p.tie_prefix_min[:-2]), base, models, parts)
    with pytest.raises(ValueError, match="tie rule"):
        cpu.merge(p.with_fields(combine=COMBINE_RAM), base, models, parts)
    with pytest.raises(ValueError, match="not supported"):
        cpu.merge_batch(
            p,
            [base.data_ptr()],
            BF16,
            [m.data_ptr() for m in models],
            [BF16, F16],
            [numel],
            [parts.data_ptr()],
            BF16,
        )
    # off (tie_keep -1, tie_skip 0): today's rule, every tie kept
    off = p.with_fields(tie_keep=[-1, -1], tie_skip=[0, 0])
    out = poisoned((numel,), BF16)
    cpu.merge(off, base, models, out)
    plain = p.with_fields(tie_keep=None, tie_skip=None, tie_prefix_min=None, tie_prefix_max=None)
    assert_same_bits(out, kp.stage_b(plain, base, models, BF16, SEED, NAME), "rule off")


# ----------------------------------------------------------------------------- round-2 pieces
#
# docs/KERNEL.md "Round-2 pieces": each backend whose FEATURES names a piece against the program,
# on odd sizes, every dtype mix, n = 1 and 3, outputs poisoned; the CPU also for every SIMD variant,
# 1 and 2 threads and merge_range parts at offsets that are not multiples of 8.

ROUND2_NUMELS = [1, 7, 4099]


def _rand_mask(n, numel, gen, density=0.6):
    return torch.rand((n, numel), generator=gen) < density


def round2_params(piece, n, numel, base, models, gen):
    """A KernelParams exercising ``piece`` (the program's other inputs realistic: TIES with a trim,
    DARE, unequal and negative weights where the piece reads them)."""
    w = [0.7, -0.4, 1.3][:n]
    if piece == "keep_mask":
        p = params(n, True, method="dare_ties", recipe_kw={"density": 0.8, "weights": w})
        shared = n > 1 and numel % 2 == 1  # one shared mask on odd sizes, per-model masks otherwise
        keep = _rand_mask(1 if shared else n, numel, gen)
        packed = kp_pack(keep)
        p = p.with_fields(
            keep_mask=packed.reshape(-1),
            mask_stride=0 if shared else packed.shape[1],
            mask_scale=[1.0, 2.5, 0.75][:n],
        )
        return p.with_trim([key_at_rank(base, models, i, 0.3) for i in range(n)])
    if piece == "den_floor":
        # tiny and negative coefficients: Σ agreeing coef falls below the floor (and below 0) often
        wts = [1e-7, 3e-7, -2e-7][:n]
        p = params(n, True, method="ties", recipe_kw={"density": 1.0, "weights": wts})
        return p.with_fields(den_floor=1e-6, agree_w=[1.0] * n)
    if piece == "agree_w":
        p = params(n, True, method="ties", recipe_kw={"density": 1.0, "weights": w})
        return p.with_fields(agree_w=[-1.0, 0.5, 2.0][:n])
    if piece == "fma":
        method = "task_arithmetic" if numel % 2 else "linear"
        p = params(n, method != "linear", method=method, recipe_kw={"weights": [0.3, 0.61, 1.7][:n]})
        return p.with_fields(fma=True, combine=1 if numel % 2 == 0 else 0)
    if piece == "vote_count":
        p = params(n, True, method="ties", recipe_kw={"density": 0.9, "weights": w})
        return p.with_fields(vote_kind=1).with_trim([key_at_rank(base, models, i, 0.2) for i in range(n)])
    if piece == "ties_div_count":
        p = params(n, True, method="ties", recipe_kw={"density": 1.0, "weights": w})
        return p.with_fields(ties_div=1, vote_w=[1.0] * n, agree_w=[1.0] * n).with_trim(
            [key_at_rank(base, models, i, 0.4) for i in range(n)]
        )
    if piece == "dare_div":
        p = params(n, True, method="dare_linear", recipe_kw={"density": [0.3, 0.7, 1.0][:n], "weights": w})
        return p.with_fields(dare_div=True, dare_den=[0.3, 0.7, 1.0][:n])
    raise AssertionError(piece)


def kp_pack(keep) -> np.ndarray:
    from m3kernels.merge.kernel_params import pack_mask

    return pack_mask(keep.numpy())


ROUND2_PIECES = ["keep_mask", "den_floor", "agree_w", "fma", "vote_count", "ties_div_count", "dare_div"]


def round2_cases():
    out = []
    for piece in ROUND2_PIECES:
        for prm in feature_backends(piece):
            out.append(pytest.param(piece, *prm.values, marks=prm.marks, id=f"{piece}-{prm.values[0]}"))
    return out


def _disabled(piece, p):
    """The same parameters with ``piece`` switched off (its default)."""
    off = {
        "keep_mask": {"keep_mask": None, "mask_scale": None, "mask_stride": 0},
        "den_floor": {"den_floor": 0.0},
        "agree_w": {"agree_w": None},
        "fma": {"fma": False},
        "vote_count": {"vote_kind": 0},
        "ties_div_count": {"ties_div": 0},
        "dare_div": {"dare_div": False},
    }[piece]
    return p.with_fields(**off)


@pytest.mark.parametrize("piece,be", round2_cases())
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=IDS)
@pytest.mark.parametrize("numel", ROUND2_NUMELS)
def test_round2_piece_bits_equal_program(piece, be, numel, dtypes, gen):
    differs = 0
    for n in (1, 3):
        base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen, device=_device(be))
        p = round2_params(piece, n, numel, base.cpu(), [m.cpu() for m in models], gen)
        out, want = run_merge(be, p, base, models, dtypes[2])
        assert_same_bits(out, want, f"{be} {piece} n={n}")
        plain = kp.stage_b(_disabled(piece, p), base.cpu(), [m.cpu() for m in models], dtypes[2], SEED, NAME)
        differs += not torch.equal(plain, want)
    if numel > 1000 and not (piece == "fma" and dtypes[2] != F32):
        assert differs, f"{piece} changed nothing: the test would not see it"


def test_fma32_is_one_rounding(gen):
    """The transcription's fmaf against exact rational arithmetic (and unlike two roundings)."""
    from fractions import Fraction

    a = torch.randn(2000, generator=gen)
    b = torch.randn(2000, generator=gen)
    c = -(a * b) * (1 + torch.randn(2000, generator=gen) * 1e-6)  # cancellation: fma matters
    got = kp.fma32(a, b, c)
    two = a * b + c
    for j in range(0, 2000, 7):
        exact = Fraction(float(a[j])) * Fraction(float(b[j])) + Fraction(float(c[j]))
        lo = np.float32(float(exact))  # float(Fraction) rounds correctly to float64 ...
        # ... then to float32: correct unless float64 rounding hit a float32 midpoint; check neighbours
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        best = min(
            cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.int32)) & 1)
        )
        assert float(got[j]) == float(best), j
    assert not torch.equal(got, two)


@pytest.mark.parametrize("piece", ROUND2_PIECES)
def test_round2_cpu_threads_simd_and_parts(piece, gen, restore_threads):
    """Every SIMD variant and thread count give the program's bytes; merge_range parts at offsets
    that are not multiples of 8 (the mask bit J = index_offset + j) give one merge's bytes."""
    _C = restore_threads
    cpu = backend("cpu")
    if piece not in cpu.FEATURES:
        pytest.skip(f"cpu lacks {piece!r}")
    numel = 20_011
    base, models = inputs((numel,), 3, BF16, [BF16, F16], gen)
    p = round2_params(piece, 3, numel, base, models, gen)
    want = kp.stage_b(p, base, models, BF16, SEED, NAME)
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        for threads in (1, 2):
            _C.set_num_threads(threads)
            out = poisoned((numel,), BF16)
            cpu.merge(p, base, models, out)
            assert_same_bits(out, want, f"{piece} {level} {threads} threads")
    parts = poisoned((numel,), BF16)
    for lo in range(0, numel, 3001):
        hi = min(numel, lo + 3001)
        cpu.merge_range(p, base[lo:hi], [m[lo:hi] for m in models], parts[lo:hi], lo)
    assert_same_bits(parts, want, f"{piece} parts")
    # the program's own index_offset (without DARE): a part against the program of that part
    if not p.dare.any():
        lo, hi = 4093, 9001
        part = poisoned((hi - lo,), BF16)
        cpu.merge_range(p, base[lo:hi], [m[lo:hi] for m in models], part, lo)
        pw = kp.stage_b(p, base[lo:hi], [m[lo:hi] for m in models], BF16, SEED, NAME, index_offset=lo)
        assert_same_bits(part, pw, f"{piece} part at {lo}")


def test_keep_mask_in_stage_a_and_checks(gen):
    """Stage A sees d' after the keep mask (delta_keys, histograms); merge_batch refuses a mask;
    a short mask or a bad stride is a ValueError."""
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    cpu = backend("cpu")
    if "keep_mask" not in cpu.FEATURES:
        pytest.skip("cpu lacks 'keep_mask'")
    numel = 5003
    base, models = inputs((numel,), 3, F32, [BF16], gen)
    p = round2_params("keep_mask", 3, numel + 1, base, models, gen)  # per-model masks
    p = p.with_fields(keep_mask=kp_pack(_rand_mask(3, numel, gen)).reshape(-1), mask_stride=(numel + 7) // 8)
    _, ds = kp.dropped_deltas(p, base, models, SEED, NAME)
    keys = cpu.delta_keys(p, base, models)
    for i, d in enumerate(ds):
        np.testing.assert_array_equal(keys[i], d.abs().view(torch.int32).numpy().view(np.uint32))
    hist = cpu.histogram(p, base, models, None)
    for i, d in enumerate(ds):
        want = np.bincount(d.abs().view(torch.int32).numpy().view(np.uint32) >> 16, minlength=1 << 16)
        np.testing.assert_array_equal(hist[i], want)
    out = poisoned((numel,), F32)
    with pytest.raises(ValueError, match="keep_mask"):
        cpu.merge(p.with_fields(keep_mask=p.keep_mask[:-1]), base, models, out)
    with pytest.raises(ValueError, match="mask_stride"):
        cpu.merge(p.with_fields(mask_stride=3), base, models, out)
    with pytest.raises(ValueError, match="mask_scale"):
        cpu.merge(p.with_fields(mask_scale=[1.0]), base, models, out)
    with pytest.raises(ValueError, match="keep_mask"):
        cpu.merge_batch(
            p,
            [base.data_ptr()],
            F32,
            [m.data_ptr() for m in models],
            [BF16] * 3,
            [numel],
            [out.data_ptr()],
            F32,
        )
    # a mask of all ones with scale 1 is the plain program
    ones = p.with_fields(keep_mask=np.full(p.keep_mask.shape, 255, np.uint8), mask_scale=None)
    cpu.merge(ones, base, models, out)
    assert_same_bits(out, kp.stage_b(_disabled("keep_mask", p), base, models, F32, SEED, NAME), "all ones")


def test_round2_argument_checks(gen):
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    cpu = backend("cpu")
    base, models = inputs((10,), 2, F32, [F32], gen)
    out = poisoned((10,), F32)
    p = params(2, True, method="ties")
    for field, bad, match in (
        ("vote_kind", 2, "vote_kind"),
        ("ties_div", -1, "ties_div"),
        ("den_floor", -1.0, "den_floor"),
        ("den_floor", float("nan"), "den_floor"),
        ("agree_w", [1.0], "agree_w"),
    ):
        with pytest.raises(ValueError, match=match):
            cpu.merge(p.with_fields(**{field: bad}), base, models, out)
    with pytest.raises(ValueError, match="dare_den"):
        cpu.merge(p.with_fields(dare_div=True), base, models, out)
    with pytest.raises(ValueError, match="dare_den"):
        cpu.merge(p.with_fields(dare_div=True, dare_den=[1.0]), base, models, out)


def test_make_params_round2_defaults():
    """make_params: agree_w = vote_w (mergekit's sign(w_i·δ_i)), fma from the recipe (False when
    absent), every other round-2 field at its default."""
    recipe = make_recipe(3, method="ties", has_base=True, weights=[0.5, -1.0, 2.0], seed=1)
    p = make_params(recipe, "t", True)
    np.testing.assert_array_equal(p.agree_w, p.vote_w)
    assert p.agree_w is not p.vote_w
    assert p.fma is bool(getattr(recipe, "fma", False))
    assert (p.vote_kind, p.ties_div, p.den_floor, p.keep_mask, p.dare_div) == (0, 0, 0.0, None, False)


@pytest.mark.parametrize("be", feature_backends("fma"))
@pytest.mark.parametrize("group,shape", GROUP_CASES, ids=str)
def test_fma_with_group_coef_bits_equal_program(be, group, shape, gen):
    """Group coefficients honour ``fma`` (sum and mean, n = 1 .. 5, the any-N loop included)."""
    if "group_coef" not in getattr(backend(be), "FEATURES", ()):
        pytest.skip(f"{be} lacks 'group_coef'")
    differs = 0
    for n, combine in ((1, 0), (3, 1), (5, 0)):
        base, models = inputs(shape, n, F32, [F32, BF16], gen, device=_device(be))
        p = group_params(n, True, group, shape, gen, combine=combine).with_fields(fma=True)
        out, want = run_merge(be, p, base, models, F32)
        assert_same_bits(out, want, f"{be} fma group {group} n={n}")
        plain = kp.stage_b(p.with_fields(fma=False), base.cpu(), [m.cpu() for m in models], F32, SEED, NAME)
        differs += not torch.equal(plain, want)
    if base.numel() > 1000:
        assert differs
