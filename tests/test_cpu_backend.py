"""The fused CPU backend (m3kernels._C) beyond the generic merge_tensors suite.

* stage B, bit for bit, against the independent float32 PyTorch transcription of
  docs/KERNEL.md in tests/kernel_program.py (separate torch ops round like the kernel's unfused
  float32 operations), and within the float32 error bound of the float64 reference;
* stage A: histograms against numpy bincounts, L1 sums against float64 numpy sums, trim
  thresholds equal to the reference's exact sort-based ones;
* DARE keep masks recovered from merged outputs equal ``dare_keep_mask``; Philox words at
  counters beyond 2**32 equal the numpy Philox;
* the same bytes for any OpenMP thread count, every SIMD variant the CPU has, and any split of
  a tensor into index ranges;
* memory-mapped read-only inputs; fp16/bf16 conversions against torch's.

Outputs are poisoned with NaN before every call, so an element the kernel skips cannot pass.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.api import prepare
from m3kernels.merge.kernel_params import DTYPE_CODES, HIST_BINS, make_params
from m3kernels.merge.philox import dare_keep_mask, dare_key, philox4x32_10
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge, reference_thresholds, sparsified_deltas

from cases import EDGE_CASES, METHOD_CASES, N_DTYPE_CASES, kwargs_for
from helpers import assert_close_ulp, have_backend, make_inputs, term_scale
from kernel_program import stage_b

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="m3kernels._C is not built")

if have_backend("cpu"):
    from m3kernels.backends import cpu
    from m3kernels.backends.cpu import _C

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
INT_VIEW = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}

# the bit-for-bit stage B matrix: every shared method case and the edge cases, N = 1 .. 6
STAGE_B_CASES = [*METHOD_CASES, *EDGE_CASES]


def _trim_n(kw: dict, n: int) -> dict:
    """The case's per-model lists cut or cycled to n models."""
    out = {}
    for k, v in kw.items():
        out[k] = [v[i % len(v)] for i in range(n)] if isinstance(v, list) else v
    if "mix_ratios" in out:
        r = out["mix_ratios"]
        out["mix_ratios"] = [x / sum(r) for x in r]
    return out


def assert_same_bits(out: torch.Tensor, expected: torch.Tensor, what: str = ""):
    """Equal bit patterns, except that NaNs only need to be NaN in both."""
    assert out.dtype == expected.dtype and out.shape == expected.shape, what
    on, en = torch.isnan(out), torch.isnan(expected)
    assert torch.equal(on, en), f"{what}: NaN positions differ ({int((on != en).sum())} elements)"
    a = out.reshape(-1).view(INT_VIEW[out.dtype])[~on.reshape(-1)]
    b = expected.reshape(-1).view(INT_VIEW[out.dtype])[~en.reshape(-1)]
    bad = a != b
    if bad.any():
        j = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements differ; first: "
            f"got {out.reshape(-1)[~on.reshape(-1)][j].item()!r}, "
            f"expected {expected.reshape(-1)[~en.reshape(-1)][j].item()!r}"
        )


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def run_merge(base, models, kw, out_dtype, name="w", seed=7):
    out = poisoned(models[0].shape, out_dtype)
    m3kernels.merge_tensors(base, models, backend="cpu", out=out, name=name, seed=seed, **kw)
    return out


def kernel_params(base, models, kw, name="w", seed=7):
    recipe = make_recipe(len(models), has_base=base is not None, seed=seed, **kw)
    p, _ = prepare(base, list(models), recipe, name, cpu)
    return recipe, p


@pytest.fixture
def restore_threads_and_simd():
    threads = _C.get_num_threads()
    level = _C.simd_level()
    yield
    _C.set_num_threads(threads)
    _C.set_simd_level(level)


# ----------------------------------------------------------------------------- stage B


@pytest.mark.parametrize("numel", [1, 7, 1000, 4099])
@pytest.mark.parametrize("dtypes", N_DTYPE_CASES, ids=lambda d: f"{d[0]}-{len(d[1])}-{d[2]}")
@pytest.mark.parametrize("case", STAGE_B_CASES)
def test_merge_bits_equal_float32_pipeline(case, dtypes, numel, gen):
    base_dt, model_dts, out_dt = dtypes
    n = len(model_dts)
    kw = kwargs_for(case, n)  # per-model lists cycled to n, mix ratios normalised
    seed = kw.pop("seed", 7)
    base, models = make_inputs((numel,), n, (base_dt, model_dts), gen)
    uses_base = kw["method"] != "linear"
    if not uses_base:
        base = None
    recipe, p = kernel_params(base, models, kw, seed=seed)
    out = run_merge(base, models, kw, out_dt, seed=seed)
    assert_same_bits(out, stage_b(p, base, models, out_dt, seed, "w"), f"{kw} {dtypes}")
    # and within float32 rounding of the float64 oracle, using the kernel's own thresholds
    thresholds = [
        None if t == 0 else (float("inf") if t >= 2**32 else float(np.uint32(t).view(np.float32)))
        for t in p.trim_min
    ]
    if recipe.trim_density is None:
        thresholds = None
    ref, _ = reference_merge(base, models, recipe, "w", thresholds)
    if recipe.rescale != "l1":  # l1: the kernel's scale is float32-rounded (checked elsewhere)
        assert_close_ulp(out, ref, term_scale(base, models, recipe), f"{kw} {dtypes}")


def test_signed_zero_parameters():
    """-0.0 weights and lambda are used as given (a broadcast must not turn -0 into +0)."""
    base = torch.tensor([-0.0, 0.0, -0.0, 1.0, -0.0, 2.0, -0.0] * 3, dtype=F32)
    models = [base.clone(), base + 0.5]
    kw = dict(method="task_arithmetic", lambda_=-0.0, weights=[-0.0, 1.0])
    _, p = kernel_params(base, models, kw)
    out = run_merge(base, models, kw, F32)
    assert_same_bits(out, stage_b(p, base, models, F32, 7, "w"))
    assert (out.view(torch.int32) < 0).sum() > 0  # some -0.0 survive: -0 + (-0 * m)


@pytest.mark.parametrize("out_dt", [BF16, F32])
def test_large_outputs_use_streaming_stores(out_dt, gen, restore_threads_and_simd):
    """Outputs of 4 MiB and more are written with non-temporal stores: same bytes."""
    numel = 2_100_003
    base, models = make_inputs((numel,), 2, (BF16, [BF16, F16]), gen)
    kw = dict(method="ties_dare", drop_rate=0.3, density=0.25)
    _, p = kernel_params(base, models, kw)
    expected = stage_b(p, base, models, out_dt, 7, "w")
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        assert_same_bits(run_merge(base, models, kw, out_dt), expected, level)


def test_merge_no_base_and_shapes(gen):
    """linear ignores the base; multi-dimensional, odd shapes; out allocated by merge_tensors."""
    base, models = make_inputs((3, 5, 7), 2, (F32, [BF16, F16]), gen)
    out = m3kernels.merge_tensors(None, models, method="linear", backend="cpu", out_dtype=F16)
    _, p = kernel_params(None, models, dict(method="linear"))
    assert out.shape == (3, 5, 7)
    assert_same_bits(out, stage_b(p, None, models, F16, 7, "w"))


# ----------------------------------------------------------------------------- stage A


def _numpy_hist(d32: torch.Tensor, prefix=None) -> np.ndarray:
    bits = d32.abs().contiguous().view(torch.int32).numpy().view(np.uint32).reshape(-1)
    if prefix is None:
        return np.bincount(bits >> 16, minlength=HIST_BINS)
    sel = bits[(bits >> 16) == prefix]
    return np.bincount(sel & 0xFFFF, minlength=HIST_BINS)


@pytest.mark.parametrize("numel", [1, 7, 4099, 70001])
@pytest.mark.parametrize("dtypes", N_DTYPE_CASES[:3] + N_DTYPE_CASES[6:], ids=lambda d: f"{d[0]}-{len(d[1])}")
@pytest.mark.parametrize(
    "kw",
    [
        dict(method="ties"),
        dict(method="ties_dare", drop_rate=0.35, density=0.3),
        dict(method="dare_ties", density=[0.5, 0.0, 1.0]),
    ],
    ids=["ties", "ties_dare", "dare_ties_0_1"],
)
def test_histograms_match_numpy(kw, dtypes, numel, gen):
    base_dt, model_dts, _ = dtypes
    n = len(model_dts)
    kw = _trim_n(kw, n)
    base, models = make_inputs((numel,), n, (base_dt, model_dts), gen)
    recipe = make_recipe(n, has_base=True, seed=11, **kw)
    p = make_params(recipe, "layer.0", True)
    d32, _, _ = sparsified_deltas(base, models, recipe, "layer.0")
    h1 = cpu.histogram(p, base, models, None)
    assert h1.dtype == np.int64 and h1.shape == (n, HIST_BINS)
    prefix = np.zeros(n, np.uint32)
    for i in range(n):
        np.testing.assert_array_equal(h1[i], _numpy_hist(d32[i]), err_msg=f"pass 1, model {i}")
        prefix[i] = int(np.argmax(h1[i]))  # the fullest bin: many matches in pass 2
    h2 = cpu.histogram(p, base, models, prefix)
    for i in range(n):
        np.testing.assert_array_equal(h2[i], _numpy_hist(d32[i], prefix[i]), err_msg=f"pass 2, model {i}")
    # a prefix nobody has
    h3 = cpu.histogram(p, base, models, np.full(n, 0x7F80, np.uint32))
    assert h3.sum() == sum(int((d.abs() == float("inf")).sum()) for d in d32)


@pytest.mark.parametrize("numel", [1, 7, 65537, 200003])
def test_l1_sums_match_numpy(numel, gen):
    base, models = make_inputs((numel,), 3, (BF16, [BF16, F16, F32]), gen)
    recipe = make_recipe(
        3, method="dare_linear", has_base=True, density=[0.6, 0.0, 1.0], rescale="l1", seed=3
    )
    p = make_params(recipe, "emb", True)
    total, kept = cpu.l1_sums(p, base, models)
    b = base.to(F32)
    for i, m in enumerate(models):
        ad = (m.to(F32) - b).abs().to(torch.float64)
        keep = dare_keep_mask(3, "emb", i, (numel,), recipe.dare_density[i])
        np.testing.assert_allclose(total[i], float(ad.sum()), rtol=1e-12, atol=0)
        np.testing.assert_allclose(kept[i], float((ad * keep).sum()), rtol=1e-12, atol=0)
    assert kept[1] == 0.0 and kept[2] == total[2]


@pytest.mark.parametrize("numel", [1, 7, 1000, 33333])
@pytest.mark.parametrize(
    "kw",
    [
        dict(method="ties", density=0.2),
        dict(method="ties", density=[0.0, 1.0]),
        dict(method="ties", density=[1e-4, 0.999]),
        dict(method="ties_dare", drop_rate=0.5, density=0.3),
    ],
    ids=["ties", "k0_kall", "tiny_k", "ties_dare"],
)
def test_thresholds_equal_reference(kw, numel, gen):
    base, models = make_inputs((numel,), 2, (BF16, [BF16, F16]), gen)
    recipe = make_recipe(2, has_base=True, seed=5, **kw)
    ref = reference_thresholds(base, models, recipe, "blk.3")
    got = m3kernels.trim_thresholds(base, models, name="blk.3", backend="cpu", seed=5, **kw)
    assert got == ref


def test_thresholds_with_ties_at_the_threshold():
    """Many equal |delta|: the exact k-th largest is one of the repeated values."""
    base = torch.zeros(4001, dtype=F32)
    vals = torch.tensor([0.5, -0.25, 0.25, 0.125, -0.5], dtype=F32)
    models = [vals.repeat(801)[:4001].clone(), -vals.repeat(801)[:4001].flip(0).clone()]
    for density in (0.1, 0.2, 0.4, 0.41, 0.6, 0.99):
        recipe = make_recipe(2, method="ties", has_base=True, density=density)
        got = m3kernels.trim_thresholds(base, models, method="ties", density=density, backend="cpu")
        assert got == reference_thresholds(base, models, recipe)


# ----------------------------------------------------------------------------- DARE stream


def test_dare_keep_mask_recovered_from_output():
    """dare_linear on constant deltas 16**i with densities 1/2, 1/4, 1/8 (exact scales 2, 4, 8):
    the output's integer value encodes which models kept each element."""
    shape = (37, 129)
    seed, name = 2**63 + 12345, "model.layers.7.mlp.down_proj.weight"
    densities = [0.5, 0.25, 0.125]
    base = torch.zeros(shape, dtype=F32)
    models = [torch.full(shape, float(16**i), dtype=F32) for i in range(3)]
    out = poisoned(shape, F32)
    m3kernels.merge_tensors(
        base, models, method="dare_linear", density=densities, seed=seed, name=name, backend="cpu", out=out
    )
    code = out.to(torch.int64)
    assert torch.equal(code.to(F32), out)
    for i, dens in enumerate(densities):
        contribution = int(16**i / dens)  # 2, 64, 2048: disjoint bits
        kept = (code & contribution) != 0
        assert torch.equal(kept, dare_keep_mask(seed, name, i, shape, dens)), f"model {i}"
    assert int(code.max()) <= 2 + 64 + 2048


@pytest.mark.parametrize("first", [0, 3, 2**32 * 4 - 6, 2**34 + 1, 2**40 - 2])
def test_philox_words_match_numpy_at_large_indices(first, restore_threads_and_simd):
    key = dare_key(99, "x", 2)
    count = 1031
    j = np.arange(first, first + count, dtype=np.uint64)
    q = j >> np.uint64(2)
    ctr = np.zeros((count, 4), np.uint64)
    ctr[:, 0] = q & np.uint64(0xFFFFFFFF)
    ctr[:, 1] = q >> np.uint64(32)
    expected = philox4x32_10(ctr, key)[np.arange(count), (j & np.uint64(3)).astype(np.int64)]
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        got = _C.philox_u32(key[0], key[1], first, count)
        np.testing.assert_array_equal(got, expected.astype(np.uint32), err_msg=level)


def test_index_ranges_give_the_same_bytes(gen):
    """Merging [0, s) and [s, n) with index_offset = s equals merging [0, n): unaligned Philox
    starts and block boundaries do not change any element."""
    numel, split = 10007, 4097 + 2
    base, models = make_inputs((numel,), 2, (BF16, [BF16, F16]), gen)
    kw = dict(method="ties_dare", drop_rate=0.4, density=0.3)
    _, p = kernel_params(base, models, kw)
    whole = run_merge(base, models, kw, BF16)
    parts = poisoned((numel,), BF16)
    codes = [DTYPE_CODES[m.dtype] for m in models]
    for lo, hi in [(0, split), (split, numel)]:
        ptrs = [m.data_ptr() + lo * m.element_size() for m in models]
        _C.merge(
            p,
            base.data_ptr() + lo * 2,
            DTYPE_CODES[BF16],
            ptrs,
            codes,
            hi - lo,
            parts.data_ptr() + lo * 2,
            DTYPE_CODES[BF16],
            lo,
        )
    assert_same_bits(parts, whole)
    # histograms add over ranges
    h_whole = cpu.histogram(p, base, models, None)
    h_parts = sum(
        _C.histogram(
            p,
            base.data_ptr() + lo * 2,
            DTYPE_CODES[BF16],
            [m.data_ptr() + lo * m.element_size() for m in models],
            codes,
            hi - lo,
            None,
            lo,
        )
        for lo, hi in [(0, split), (split, numel)]
    )
    np.testing.assert_array_equal(h_parts, h_whole)


# ----------------------------------------------------------------------------- determinism

DETERMINISM_CASES = [
    dict(method="ties", density=0.3),
    dict(method="dare_ties", density=0.6),
    dict(method="dare_linear", density=0.5, rescale="l1"),
    dict(method="ties_dare", drop_rate=0.2, density=0.25, mix_ratios=[0.4, 0.6]),
]


def _all_outputs(base, models):
    """Merged bytes, histograms and L1 sums of every determinism case."""
    res = []
    for kw in DETERMINISM_CASES:
        for out_dt in (BF16, F16, F32):
            res.append(run_merge(base, models, kw, out_dt).view(INT_VIEW[out_dt]).clone())
        _, p = kernel_params(base, models, kw)
        res.append(cpu.histogram(p, base, models, None))
        res.append(cpu.histogram(p, base, models, np.array([0x3A00, 0x3B00], np.uint32)))
        res.append(np.concatenate(cpu.l1_sums(p, base, models)))
    return res


def _assert_all_equal(a, b, what):
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), what
        else:
            np.testing.assert_array_equal(x, y, err_msg=what)


def test_thread_count_independence(gen, restore_threads_and_simd):
    base, models = make_inputs((300_001,), 2, (BF16, [BF16, F16]), gen)
    _C.set_num_threads(1)
    one = _all_outputs(base, models)
    for threads in (2, 3):
        _C.set_num_threads(threads)
        _assert_all_equal(one, _all_outputs(base, models), f"{threads} threads vs 1")


def _special_values(numel, dtype, gen):
    """Random values with NaN, +-inf, +-0, subnormals and dtype extremes sprinkled in."""
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-30, 18, (numel,), generator=gen).to(torch.float64))
    specials = torch.tensor(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            0.0,
            -0.0,
            1e-45,
            -3e-39,
            6e-8,
            3e-8,
            65504.0,
            65520.0,
            -65519.0,
            3.4e38,
            6.1e-5,
            6.09e-5,
        ],
        dtype=torch.float64,
    )
    idx = torch.randint(0, numel, (numel // 20,), generator=gen)
    x[idx] = specials[torch.randint(0, len(specials), (len(idx),), generator=gen)]
    return x.to(dtype)


def test_simd_variants_identical(gen, restore_threads_and_simd):
    levels = _C.simd_levels()
    assert levels[0] == "generic"
    base, models = make_inputs((20_011,), 2, (BF16, [BF16, F16]), gen)
    odd_base = _special_values(20_011, F32, gen)
    odd_models = [_special_values(20_011, F16, gen), _special_values(20_011, BF16, gen)]
    results = {}
    for level in levels:
        _C.set_simd_level(level)
        assert _C.simd_level() == level and cpu.simd_level() == level
        res = _all_outputs(base, models)
        for kw in (
            dict(method="task_arithmetic"),
            dict(method="ties", density=0.5),
            dict(method="dare_ties", density=0.5),
        ):
            for out_dt in (BF16, F16, F32):
                res.append(run_merge(odd_base, odd_models, kw, out_dt).view(INT_VIEW[out_dt]).clone())
        results[level] = res
    for level in levels[1:]:
        _assert_all_equal(results["generic"], results[level], f"{level} vs generic")


def test_simd_env_forces_generic():
    code = "import m3kernels._C as C; print(C.simd_level())"
    env = dict(os.environ, M3KERNELS_SIMD="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"
    env["M3KERNELS_SIMD"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "M3KERNELS_SIMD" in bad.stderr


# ----------------------------------------------------------------------------- conversions


def test_float16_and_bfloat16_rounding_match_torch(gen, restore_threads_and_simd):
    """linear on one float32 model is the identity (with -0 -> +0): the output cast is torch's."""
    patterns = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    x = patterns.to(torch.int32).view(F32)
    edges = torch.tensor(
        [
            65504.0,
            65519.99,
            65520.0,
            2**-14,
            2**-24,
            2**-25,
            1.5 * 2**-25,
            2**-25 * 1.0000001,
            3.0 * 2**-26,
            1 - 2**-12,
            1 + 2**-11,
            1 + 3 * 2**-11,
        ],
        dtype=F32,
    )
    x = torch.cat([x, edges, -edges])
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        for out_dt in (F16, BF16):
            out = poisoned(x.shape, out_dt)
            m3kernels.merge_tensors(None, [x], method="linear", backend="cpu", out=out)
            assert_same_bits(out, (x + 0.0).to(out_dt), f"{level} -> {out_dt}")
    # every fp16 pattern in, float32 out (exact widening)
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(F16)
    for level in _C.simd_levels():
        _C.set_simd_level(level)
        out = poisoned(h.shape, F32)
        m3kernels.merge_tensors(None, [h], method="linear", backend="cpu", out=out)
        assert_same_bits(out, h.to(F32) + 0.0, f"{level} fp16 -> f32")


def test_nan_outputs_are_the_canonical_quiet_nan(restore_threads_and_simd):
    """Whatever NaN the arithmetic propagates (sign, payload), the output is 0x7FC0.. (KERNEL.md)."""
    x = torch.tensor([float("nan"), 1.0, 2.0, 3.0], dtype=F32)
    x[0] = -x[0].abs()  # negative NaN in
    payload = torch.tensor([0x7FA12345], dtype=torch.int32).view(F32)  # signalling NaN with payload
    y = torch.tensor([1.0, float("inf"), 2.0, 3.0], dtype=F32)
    y[2] = payload[0]
    expect = {
        BF16: (torch.int16, 0x7FC0, 0xFFFF),
        F16: (torch.int16, 0x7E00, 0xFFFF),
        F32: (torch.int32, 0x7FC00000, 0xFFFFFFFF),
    }
    for dt, (view, canon, mask) in expect.items():
        for level in _C.simd_levels():
            _C.set_simd_level(level)
            out = poisoned((4,), dt)
            # element 1: inf - inf in the mean is an invalid operation (x86's default NaN is negative)
            m3kernels.merge_tensors(None, [x, y, -y], method="linear", backend="cpu", out=out)
            bits = [int(v) & mask for v in out.view(view).tolist()]
            assert bits[:3] == [canon] * 3, (dt, level, [hex(b) for b in bits])


# ----------------------------------------------------------------------------- memory


def test_memory_mapped_read_only_inputs(tmp_path, gen):
    numel = 50_003
    base, models = make_inputs((numel,), 2, (BF16, [BF16, F16]), gen)
    path = tmp_path / "weights.bin"
    blobs = [t.view(torch.uint8).numpy().tobytes() for t in (base, *models)]
    path.write_bytes(b"".join(blobs))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # PROT_READ: a write would fault
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
                off, mapped = 0, []
                for t in (base, *models):
                    nbytes = t.numel() * t.element_size()
                    mapped.append(torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=off))
                    off += nbytes
            for kw in (
                dict(method="ties", density=0.3),
                dict(method="dare_ties", density=0.5),
                dict(method="dare_linear", density=0.5, rescale="l1"),
            ):
                got = run_merge(mapped[0], mapped[1:], kw, BF16)
                assert_same_bits(got, run_merge(base, models, kw, BF16), f"mmap {kw}")
            del mapped
        finally:
            mm.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_empty_tensors_and_argument_checks(gen):
    empty = [torch.empty(0, dtype=BF16) for _ in range(3)]
    _, p = kernel_params(empty[0], empty[1:], dict(method="ties"))
    assert cpu.histogram(p, empty[0], empty[1:], None).sum() == 0
    total, kept = cpu.l1_sums(p, empty[0], empty[1:])
    assert total.tolist() == [0.0, 0.0] and kept.tolist() == [0.0, 0.0]
    cpu.merge(p, empty[0], empty[1:], torch.empty(0, dtype=BF16))
    base, models = make_inputs((10,), 2, (BF16, [BF16]), gen)
    _, p = kernel_params(base, models, dict(method="ties"))
    with pytest.raises(ValueError, match="models"):
        cpu.merge(p, base, models[:1], torch.empty(10, dtype=BF16))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.merge(p, base, models, torch.empty(20, dtype=BF16)[::2])
    with pytest.raises(ValueError, match="elements"):
        cpu.merge(p, base, models, torch.empty(11, dtype=BF16))
    with pytest.raises(ValueError, match="dtype"):
        cpu.merge(p, base, models, torch.empty(10, dtype=torch.float64))
    assert cpu.supports("cpu") and not cpu.supports("meta")


def test_benchmark_copy_and_read_helpers(restore_threads_and_simd):
    src = torch.arange(1_000_003, dtype=torch.int64).to(torch.uint8)
    words = src[: len(src) // 8 * 8].view(torch.int64)
    expected_xor = int(np.bitwise_xor.reduce(words.numpy()).astype(np.uint64))
    for threads in (1, 2):
        _C.set_num_threads(threads)
        for chunk in (0, 4096, 65536):
            dst = torch.zeros_like(src)
            _C.copy(dst.data_ptr(), src.data_ptr(), src.numel(), chunk)
            assert torch.equal(dst, src)
        assert _C.read(src.data_ptr(), src.numel()) == expected_xor
