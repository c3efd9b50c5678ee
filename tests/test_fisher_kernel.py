"""The fused Fisher stage-B kernels (C++, Triton, the CUDA chunk code emulated on the host) against
the float64 reference and against each other bit for bit (docs/DATA_AWARE.md, "Fisher in the fused
kernel"): fresh random inputs, odd sizes, N = 1, 2, 3, every model / statistic / output dtype,
poisoned outputs, both floor modes, zero Fisher (the den == 0 average), NaN / inf inputs, thread
counts and SIMD variants."""

from __future__ import annotations

import pytest
import torch

from m3kernels.merge.data_aware import (
    coefficients,
    fisher_backend,
    fisher_kernel_args,
    fisher_merge,
    fisher_merge_reference,
    run_fisher_kernel,
)

from helpers import assert_close_ulp

# inf / inf and 0 * inf in Triton's interpreter (NumPy) warn; the NaN they give is what is tested
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}
CANON_NAN = {F32: 0x7FC00000, BF16: 0x7FC0, F16: 0x7E00}


def _has(kind: str) -> bool:
    if kind == "cpu":
        return fisher_backend("auto", "cpu", 1) == "cpu"
    if kind == "triton":
        try:
            fisher_backend("triton", "cpu", 1)
        except (ValueError, ImportError):
            return False
        return True
    try:
        from m3kernels import _cuda
    except ImportError:
        return False
    return hasattr(_cuda, "fisher_merge")


KINDS = [
    pytest.param(k, marks=pytest.mark.skipif(not _has(k), reason=f"no {k} Fisher kernel in this build"))
    for k in ("cpu", "triton", "cuda-emulated")
]
need_cpu = pytest.mark.skipif(not _has("cpu"), reason="m3kernels._C without fisher_merge")


def kernel(kind, models, fishers, out, *, weights=None, mix_ratios=None, floor=1e-6, floor_mode="max"):
    """The kernel of ``kind`` into ``out`` (the public fisher_merge for cpu / triton)."""
    if kind == "cuda-emulated":
        c = coefficients(len(models), weights, mix_ratios)
        run_fisher_kernel(kind, fisher_kernel_args(models, fishers, c, floor, floor_mode, out))
        return out
    got = fisher_merge(
        models,
        fishers,
        weights=weights,
        mix_ratios=mix_ratios,
        floor=floor,
        floor_mode=floor_mode,
        out=out,
        backend=kind,
    )
    assert got is out
    return got


def inputs(gen, shape, n, model_dts, stat_dts):
    models = [torch.randn(shape, generator=gen).to(model_dts[i % len(model_dts)]) for i in range(n)]
    fishers = [
        (torch.rand(shape, generator=gen) ** 4 * 1e-3).to(stat_dts[i % len(stat_dts)]) for i in range(n)
    ]
    fishers[0].view(-1)[:7] = 0  # the floor decides there
    return models, fishers


def reference_scale(models, fishers, c, floor, floor_mode):
    """Σ cᵢF̃ᵢ|xᵢ| / Σ cᵢF̃ᵢ (float64): the size of the terms the float32 sums add, times n."""
    f = [x.double() for x in fishers]
    f = [x.clamp_min(floor) if floor_mode == "max" else x + floor for x in f]
    num = sum(ci * fi * m.double().abs() for ci, fi, m in zip(c, f, models))
    den = sum(ci * fi for ci, fi in zip(c, f))
    return len(models) * torch.where(den == 0, sum(m.double().abs() for m in models), num / den)


def bits(t):
    return t.view(BITS[t.dtype])


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("model_dt", DTYPES)
@pytest.mark.parametrize("stat_dt", DTYPES)
@pytest.mark.parametrize("floor_mode", ["max", "add"])
def test_against_the_float64_reference(gen, kind, n, model_dt, stat_dt, floor_mode):
    shape = (37, 53)
    models, fishers = inputs(gen, shape, n, [model_dt], [stat_dt])
    kw = dict(weights=[0.5 + i for i in range(n)], mix_ratios=[1.0 / (i + 1) for i in range(n)])
    floor = 1e-5
    out = kernel(kind, models, fishers, poisoned(shape, model_dt), floor=floor, floor_mode=floor_mode, **kw)
    ref = fisher_merge_reference(models, fishers, floor=floor, floor_mode=floor_mode, **kw)
    c = coefficients(n, **kw)
    assert_close_ulp(out, ref, reference_scale(models, fishers, c, floor, floor_mode), f"{kind}/{n}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dt", DTYPES)
def test_mixed_dtypes_and_odd_sizes(gen, kind, out_dt):
    for shape in [(1,), (7,), (3, 5, 11), (8193,)]:
        models, fishers = inputs(gen, shape, 3, [BF16, F16, F32], [F32, F16, BF16])
        fishers.append(fishers.pop(0))  # the zeroed statistics on the last model
        out = kernel(kind, models, fishers, poisoned(shape, out_dt), weights=[1.0, 2.0, 0.25])
        ref = fisher_merge_reference(models, fishers, weights=[1.0, 2.0, 0.25])
        scale = reference_scale(models, fishers, [1.0, 2.0, 0.25], 1e-6, "max")
        assert_close_ulp(out, ref, scale, f"{kind}/{shape}/{out_dt}")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_fisher_is_the_weighted_average(gen, kind):
    """floor 0 and every F 0 at an element: den == 0, the c-weighted average Σ cᵢxᵢ / Σ cᵢ; where
    only model 1 has Fisher, model 1's value."""
    shape = (203,)
    models = [torch.randn(shape, generator=gen) for _ in range(3)]
    fishers = [torch.zeros(shape) for _ in range(3)]
    fishers[1][100:] = torch.rand(103, generator=gen) + 0.5
    w = [1.0, 3.0, 0.5]
    for mode in ("max", "add"):
        out = kernel(kind, models, fishers, poisoned(shape, F32), weights=w, floor=0.0, floor_mode=mode)
        avg = sum(wi * m.double() for wi, m in zip(w, models)) / sum(w)
        assert torch.allclose(out[:100].double(), avg[:100], rtol=1e-6, atol=1e-6)
        # one model with Fisher: (cf·x) / cf, two roundings: within 1 float32 ulp of x
        assert_close_ulp(out[100:], models[1][100:].double(), torch.zeros(103, dtype=torch.float64), kind)
        ref = fisher_merge_reference(models, fishers, weights=w, floor=0.0, floor_mode=mode)
        assert_close_ulp(out, ref, reference_scale(models, fishers, w, 0.0, mode), kind)


def hostile(gen, shape, n, model_dts=(BF16, F32, F16), stat_dts=(F16, BF16, F32)):
    """Inputs with NaN / inf / -inf models, NaN / inf / zero Fisher values, bf16 / fp16 subnormals."""
    models, fishers = inputs(gen, shape, n, list(model_dts), list(stat_dts))
    numel = models[0].numel()
    for i in range(n):
        m, f = models[i].view(-1), fishers[i].view(-1)
        idx = torch.randint(0, numel, (12,), generator=gen)
        m[idx[:3]] = float("nan")
        m[idx[3:5]] = float("inf")
        m[idx[5:7]] = -float("inf")
        f[idx[6:8]] = float("nan")
        f[idx[8:10]] = float("inf")
        f[idx[10:]] = 0.0
        m[i * 5 : i * 5 + 5] = 0.0
    return models, fishers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("floor_mode", ["max", "add"])
def test_nan_and_inf_inputs(gen, kind, floor_mode):
    shape = (41, 29)
    models, fishers = hostile(gen, shape, 3)
    for out_dt in DTYPES:
        out = kernel(
            kind, models, fishers, poisoned(shape, out_dt), weights=[1.0, 0.5, 2.0], floor_mode=floor_mode
        )
        ref = fisher_merge_reference(models, fishers, weights=[1.0, 0.5, 2.0], floor_mode=floor_mode)
        nan = torch.isnan(ref)
        assert nan.any() and torch.equal(torch.isnan(out), nan)
        assert (bits(out)[nan] == CANON_NAN[out_dt]).all()  # one canonical NaN
        inf = torch.isinf(ref)
        assert torch.equal(out[inf].double(), ref[inf])
        fin = ~nan & ~inf
        scale = reference_scale(models, fishers, [1.0, 0.5, 2.0], 1e-6, floor_mode)
        assert_close_ulp(out[fin], ref[fin], scale[fin], f"{kind}/{out_dt}")


@pytest.mark.parametrize("kind", KINDS)
def test_bit_identical_to_the_cpu_kernel(gen, kind):
    if not _has("cpu"):
        pytest.skip("m3kernels._C without fisher_merge")
    # mixed dtypes (the any-N loop on the CPU), one model dtype with float32 statistics (its
    # unrolled instances, N <= 4), N = 5 (the loop again)
    cases = [((9, 7), 1, None), ((1000,), 2, None), ((33, 65), 3, None), ((5, 201), 5, BF16)]
    cases += [((77, 13), n, dt) for n, dt in ((1, F32), (2, BF16), (3, F16), (4, BF16))]
    for shape, n, dt in cases:
        models, fishers = hostile(gen, shape, n) if dt is None else hostile(gen, shape, n, [dt], [F32])
        if kind == "cuda-emulated" and n > 2:  # one element off the 16-byte boundary: the scalar path
            models = [torch.cat([m.new_zeros(1), m.reshape(-1)])[1:].view(shape) for m in models]
        w = [0.3 + i for i in range(n)]
        for out_dt in DTYPES:
            for mode, floor in (("max", 1e-6), ("add", 1e-4), ("max", 0.0)):
                want = fisher_merge(
                    models, fishers, weights=w, floor=floor, floor_mode=mode, out_dtype=out_dt, backend="cpu"
                )
                got = kernel(
                    kind, models, fishers, poisoned(shape, out_dt), weights=w, floor=floor, floor_mode=mode
                )
                assert torch.equal(bits(got), bits(want)), (kind, shape, out_dt, mode)


@need_cpu
def test_thread_counts_and_simd_variants_bit_identical(gen):
    from m3kernels import _C

    shape = (129, 257)  # 9 blocks of 4096: several per thread
    models, fishers = hostile(gen, shape, 3)
    threads, level = _C.get_num_threads(), _C.simd_level()
    results = {}
    try:
        for lv in _C.simd_levels():
            _C.set_simd_level(lv)
            for t in (1, 2):
                _C.set_num_threads(t)
                results[(lv, t)] = bits(
                    fisher_merge(models, fishers, weights=[1, 2, 3], out_dtype=BF16, backend="cpu")
                )
    finally:
        _C.set_num_threads(threads)
        _C.set_simd_level(level)
    first = next(iter(results.values()))
    assert len(results) >= 2 and all(torch.equal(first, r) for r in results.values())


@need_cpu
def test_public_api(gen):
    models, fishers = inputs(gen, (5, 3), 2, [F32], [F32])
    assert fisher_backend("auto", "cpu", 2) == "cpu"
    torch_out = fisher_merge(models, fishers, backend="torch", chunk=4)
    ref = fisher_merge_reference(models, fishers)
    assert_close_ulp(torch_out, ref, reference_scale(models, fishers, [1, 1], 1e-6, "max"), "torch")
    fused = fisher_merge(models, fishers)  # auto: the C++ kernel
    assert_close_ulp(fused, ref, reference_scale(models, fishers, [1, 1], 1e-6, "max"), "auto")
    f64 = fisher_merge(models, [f.double() for f in fishers])  # float64 statistics: f32 first
    assert torch.equal(f64, fused)
    nc = fisher_merge([m.T for m in models], [f.T for f in fishers])  # non-contiguous inputs
    assert torch.equal(nc, fused.T)
    assert fisher_merge([torch.zeros(0)], [torch.zeros(0)]).shape == (0,)
    with pytest.raises(ValueError, match="backend must be one of"):
        fisher_merge(models, fishers, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda': needs CUDA tensors"):
        fisher_merge(models, fishers, backend="cuda")


@need_cpu
@pytest.mark.parametrize("out_dt", DTYPES)
def test_large_output_non_temporal_stores(gen, out_dt):
    """Outputs of >= 8 MiB on a 64-byte boundary take the non-temporal store path: the same bits as
    the plain stores (the same output one element off the boundary) and the reference's values."""
    numel = (1 << 23) // (4 if out_dt == F32 else 2) + 37
    models = [torch.randn(numel, generator=gen).to(BF16)]
    fishers = [torch.rand(numel, generator=gen) * 1e-3]
    aligned = torch.full((numel + 64,), float("nan"), dtype=out_dt)
    off = (-aligned.data_ptr() % 64) // aligned.element_size()
    a = fisher_merge(models, fishers, out=aligned[off : off + numel], backend="cpu")
    plain = torch.full((numel + 64,), float("nan"), dtype=out_dt)
    off = (-plain.data_ptr() % 64) // plain.element_size() + 1  # not on a 64-byte boundary
    b = fisher_merge(models, fishers, out=plain[off : off + numel], backend="cpu")
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 != 0
    assert torch.equal(bits(a), bits(b))
    assert_close_ulp(a, fisher_merge_reference(models, fishers), models[0].double().abs(), "nt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@need_cpu
def test_gpu_kernels_bit_identical_to_the_cpu_kernel(gen):
    """On a GPU: the compiled CUDA and Triton kernels give the C++ kernel's bits (odd sizes, mixed
    dtypes, NaN / inf, an unaligned view for the CUDA scalar path)."""
    for shape, n in [((333, 77), 3), (((1 << 20) + 3,), 2)]:
        models, fishers = hostile(gen, shape, n)
        w = [0.3 + i for i in range(n)]
        for out_dt in DTYPES:
            for mode in ("max", "add"):
                want = fisher_merge(
                    models, fishers, weights=w, floor_mode=mode, out_dtype=out_dt, backend="cpu"
                )
                dm, df = [m.cuda() for m in models], [f.cuda() for f in fishers]
                for kind in ("cuda", "triton"):
                    if kind == "cuda" and not _has("cuda-emulated"):
                        continue
                    got = fisher_merge(dm, df, weights=w, floor_mode=mode, out_dtype=out_dt, backend=kind)
                    assert torch.equal(bits(got.cpu()), bits(want)), (kind, shape, out_dt, mode)
                un = [torch.cat([m.new_zeros(1), m.reshape(-1)])[1:].view(shape) for m in dm]  # 2-byte offset
                got = fisher_merge(un, df, weights=w, floor_mode=mode, out_dtype=out_dt, backend="auto")
                assert torch.equal(bits(got.cpu()), bits(want)), ("unaligned", shape, out_dt, mode)
