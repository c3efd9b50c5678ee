"""DARE's keep bits drawn once (CPU backend): the L1 pass of ``rescale: l1`` writes each element's
Philox keep bit (``l1_sums_keep``), and stage B reads them as its keep mask
(``kernel_params.dare_as_keep_mask``) instead of drawing the words again. The bits must be those
of docs/RANDOMNESS.md and the merged bytes those of the Philox path, on every SIMD variant,
thread count, dtype, model count and part split.
"""

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.merge.kernel_params import dare_as_keep_mask, make_params
from m3kernels.merge.philox import dare_keep_mask
from m3kernels.merge.recipe import make_recipe

from cases import DTYPE_CASES, kwargs_for
from helpers import have_backend, make_inputs

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

if have_backend("cpu"):
    from m3kernels import _C
    from m3kernels.backends import cpu

L1_CASES = ["dare_ties_l1", "dare_linear_l1", "dare_linear_l1_06"]
SIZES = [1, 7, 16, 17, 1000, 65536 + 13, 3 * 65536 + 5]


@pytest.fixture
def restore_threads_and_simd():
    threads, level = _C.get_num_threads(), _C.simd_level()
    yield
    _C.set_num_threads(threads)
    _C.set_simd_level(level)


def same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    bad = int((a.view(ints[a.dtype])[~nan_a] != b.view(ints[b.dtype])[~nan_b]).sum())
    assert bad == 0, f"{what}: {bad} of {a.numel()} elements differ"


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("numel", SIZES)
def test_the_keep_bits_are_the_philox_decisions(numel, level, restore_threads_and_simd):
    if level not in _C.simd_levels():
        pytest.skip(f"{level} not supported here")
    _C.set_simd_level(level)
    gen = torch.Generator().manual_seed(numel)
    densities = [0.3, 0.0, 1.0]
    base, models = make_inputs((numel,), 3, (torch.bfloat16, [torch.bfloat16, torch.float32]), gen)
    recipe = make_recipe(3, has_base=True, seed=5, method="dare_ties", density=densities, rescale="l1")
    p = make_params(recipe, "t", True)
    total, kept, mask = cpu.l1_sums_keep(p, base, models)
    assert mask.shape == (3, (numel + 7) // 8) and mask.dtype == np.uint8
    want_total, want_kept = cpu.l1_sums(p, base, models)
    assert np.array_equal(total, want_total) and np.array_equal(kept, want_kept)
    for i, d in enumerate(densities):
        keep = dare_keep_mask(5, "t", i, (numel,), d)
        want = np.packbits(np.asarray(keep, dtype=bool), bitorder="little")
        assert np.array_equal(mask[i], want), f"model {i} (density {d})"
    # a model without DARE keeps everything; the bits past numel stay 0
    total, kept, mask = cpu.l1_sums_keep(p.with_fields(dare=[1, 0, 1]), base, models)
    assert np.array_equal(mask[1], np.packbits(np.ones(numel, bool), bitorder="little"))


def _merge(base, models, kw, out_dtype, monkeypatch=None):
    if monkeypatch is not None:  # the Philox path: no keep bits from stage A
        monkeypatch.delattr(cpu, "l1_sums_keep")
    out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)
    m3kernels.merge_tensors(base, models, backend="cpu", out=out, name="blk.3.w", **{"seed": 9, **kw})
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("case", L1_CASES)
def test_stage_b_from_the_keep_bits_gives_the_philox_bytes(case, dtype_case, n, threads, monkeypatch):
    _C.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(hash((case, dtype_case, n)) % 2**31)
        base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
        base, models = make_inputs((97, 131), n, (base_dt, model_dts), gen)
        models[0].view(-1)[5] = float("nan")  # a non-finite delta: the finite L1 sums, the same bits
        kw = kwargs_for(case, n)
        calls = []
        real = cpu.l1_sums_keep
        with monkeypatch.context() as m:
            m.setattr(cpu, "l1_sums_keep", lambda *a: calls.append(1) or real(*a))
            fast = _merge(base, models, kw, out_dt)
        assert calls, "the keep bits were not used"
        with monkeypatch.context() as m:
            slow = _merge(base, models, kw, out_dt, m)
        same_bits(fast, slow, f"{case} {dtype_case} n={n}")
    finally:
        _C.set_num_threads(2)


def test_the_keep_mask_params_merge_in_parts_as_one():
    gen = torch.Generator().manual_seed(3)
    numel, split = 70001, 32768 + 5
    base, models = make_inputs((numel,), 2, (torch.bfloat16, [torch.bfloat16]), gen)
    recipe = make_recipe(2, has_base=True, seed=1, method="dare_ties", density=0.4, rescale="l1")
    p0 = make_params(recipe, "x", True)
    total, kept, mask = cpu.l1_sums_keep(p0, base, models)
    p = dare_as_keep_mask(p0.with_dare_scale([np.float32(t / k) for t, k in zip(total, kept)]), mask)
    whole = torch.full((numel,), float("nan"), dtype=torch.bfloat16)
    cpu.merge(p, base, models, whole)
    parts = torch.full((numel,), float("nan"), dtype=torch.bfloat16)
    for lo, hi in [(0, split), (split, numel)]:
        cpu.merge_range(p, base[lo:hi], [m[lo:hi] for m in models], parts[lo:hi], lo)
    same_bits(parts, whole, "parts")
    with pytest.raises(ValueError, match="already"):
        dare_as_keep_mask(p, mask)


def test_keep_bits_above_the_memory_cap_are_drawn_again(monkeypatch):
    from m3kernels import api

    gen = torch.Generator().manual_seed(8)
    base, models = make_inputs((3001,), 2, (torch.bfloat16, [torch.bfloat16]), gen)
    kw = kwargs_for("dare_ties_l1", 2)
    want = _merge(base, models, kw, torch.bfloat16)
    calls = []
    real = cpu.l1_sums_keep
    monkeypatch.setattr(cpu, "l1_sums_keep", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(api, "KEEP_BITS_MAX_BYTES", 2 * (3001 + 7) // 8 - 1)  # one byte short
    got = _merge(base, models, kw, torch.bfloat16)
    assert not calls
    same_bits(got, want, "above the cap")
