"""della's C++ stage A (csrc/cpu/della_stage_a.cpp) against the NumPy path of
m3kernels/merge/methods/della.py (the oracle) and the float64 reference's full-sort mask: the keep
bitmasks, the per-slab L1 sums and the mask_scale are the same bits on 1 and 2 OpenMP threads and
any chunking, for odd shapes (1-D, [R, 1], 3-D, lines long enough for the radix sort), every dtype,
ties, signed zeros and NaN / inf deltas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m3kernels.backends import cpu
from m3kernels.merge.methods import della
from m3kernels.merge.philox import dare_key
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference_methods import della_keep

pytestmark = pytest.mark.skipif(not cpu.has_della_stage_a(), reason="the CPU extension has no della_stage_a")

SHAPES = [(1,), (13,), (5, 1), (9, 13), (4, 3, 5), (2, 1, 3), (3, 300), (2, 70, 3), (1, 4099)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def threads():
    """Sets the OpenMP thread count of the C++ calls; restores it afterwards."""
    from m3kernels import _C

    old = _C.get_num_threads()
    yield _C.set_num_threads
    _C.set_num_threads(old)


def inputs(shape, dtype, gen, kind: str):
    """(base, [two models]) of ``dtype`` with deltas of the given kind: random, tied (few distinct
    magnitudes, signed zeros), or with NaN (several payloads) and ±inf deltas."""
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    models = []
    for i in range(2):
        if kind == "ties":
            d = torch.randint(-3, 4, shape, generator=gen).to(torch.float64) * 0.25
            m = (base.to(dtype).double() + d).to(dtype)
            flat = m.reshape(-1)
            flat[::3] = base.to(dtype).reshape(-1)[::3]  # δ = +0 (x − x)
        else:
            m = (base + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        if kind == "bad":
            flat = m.reshape(-1)
            n = flat.numel()
            flat[(5 + i) % n] = float("nan")
            flat[(2 * n) // 3] = float("inf") if i == 0 else float("-inf")
            if dtype == torch.float32 and n > 3:  # NaNs with other payloads and signs
                bits = flat.view(torch.int32)
                bits[n // 2] = 0x7FC01234
                bits[n - 1] = -0x003FFF01  # 0xFFC000FF
        models.append(m)
    b = base.to(dtype)
    if kind == "bad" and b.numel() > 7:
        b.reshape(-1)[7] = float("inf")  # inf − inf = NaN where a model is inf too
    return b, models


def run_keep(base, models, recipe, fast: bool, monkeypatch, chunk=None):
    monkeypatch.setattr(della, "FAST", fast)
    if chunk is not None:
        monkeypatch.setattr(della, "CHUNK", chunk)
    return della.keep_masks(base, models, recipe, "blk.w")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "bad"])
def test_fast_masks_and_scales_equal_the_numpy_path(dtype, kind, threads, monkeypatch):
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + ["random", "ties", "bad"].index(kind))
    recipe = make_recipe(2, method="della", has_base=True, density=[0.5, 0.3], epsilon=[0.2, 0.1], seed=11)
    for shape in SHAPES:
        base, models = inputs(shape, dtype, gen, kind)
        want = run_keep(base, models, recipe, False, monkeypatch, chunk=1 << 20)
        key, stride = dare_key(11, "blk.w", 1), (base.numel() + 7) // 8
        want_sums = della.model_keep(base, models[1], 0.3, 0.1, key, np.zeros(stride, np.uint8))
        for n_threads in (1, 2):
            threads(n_threads)
            for chunk in (1 << 20, 7, 1):
                got = run_keep(base, models, recipe, True, monkeypatch, chunk=chunk)
                assert got[1] == want[1], shape
                assert np.array_equal(got[0], want[0]), (shape, n_threads, chunk)
                assert got[2].tobytes() == want[2].tobytes(), (shape, n_threads, chunk)
                # the float64 L1 sums themselves (mask_scale is only their float32 ratio)
                out = np.full(stride, 0x5A, np.uint8)  # poisoned: model_keep zeroes it first
                sums = della.model_keep(base, models[1], 0.3, 0.1, key, out)
                assert np.array_equal(out, got[0][stride:]), (shape, n_threads, chunk)
                assert np.array(sums).tobytes() == np.array(want_sums).tobytes(), (shape, n_threads, chunk)
        # the float64 reference's full sort, on the kernel's float32 δ
        mask, stride = want[0], want[1]
        numel = base.numel()
        for i in range(2):
            d32 = models[i].float() - base.float()
            ref = della_keep(d32, recipe.trim_density[i], recipe.get("epsilon")[i], 11, "blk.w", i)
            bits = np.unpackbits(mask[i * stride : (i + 1) * stride], bitorder="little")
            assert np.array_equal(bits[:numel].astype(bool), ref.reshape(-1).numpy()), (shape, i)
            assert not bits[numel:].any()


@pytest.mark.parametrize("shape", [(6, 13), (3, 300), (2, 5, 7), (11,), (4, 1)])
def test_slab_sums_bit_for_bit_and_near_the_exact_sums(shape, threads):
    """The C++ per-slab sums are the NumPy path's (sequential in flat order) on 1 and 2 threads,
    and close to math.fsum; the mask bytes outside the chunk stay as they were (ORed in)."""
    gen = torch.Generator().manual_seed(3)
    base, models = inputs(shape, torch.bfloat16, gen, "bad")
    slabs, c, inner = della.rank_layout(shape)
    key = dare_key(2, "t", 1)
    thr = della.keep_thresholds(0.4, 0.3, c)
    first = 13  # an odd flat offset (the chunk starts inside a byte): the oracle reads the same words
    pad = torch.zeros(first, dtype=base.dtype)
    keep, t_ref, k_ref, bad_ref = della._chunk_keep(
        torch.cat([pad, models[0].reshape(-1)]), torch.cat([pad, base.reshape(-1)]), first, first + base.numel(),
        c, inner, torch.from_numpy(thr.astype(np.int64)).view(1, c, 1), key,
    )  # fmt: skip
    d32 = (models[0].float() - base.float()).reshape(-1).numpy()
    for n_threads in (1, 2):
        threads(n_threads)
        nbytes = (first + d32.size + 7) // 8 + 2
        mask = np.zeros(nbytes, dtype=np.uint8)
        mask[0] = 0x15  # bits below `first` belong to an earlier chunk: kept as they are
        mask[-1] = 0xA0  # so do the bytes past the chunk
        t, k, nb = cpu.della_stage_a(d32, slabs, c, inner, first, key, thr, mask)
        assert t.tobytes() == t_ref.tobytes() and k.tobytes() == k_ref.tobytes() and nb == bad_ref
        bits = np.unpackbits(mask, bitorder="little")
        assert np.array_equal(bits[first : first + d32.size].astype(bool), keep)
        assert (
            mask[0] & 0x15 == 0x15
            and mask[-1] == 0xA0
            and not bits[first + d32.size : 8 * (nbytes - 1)].any()
        )
        a = np.abs(d32.astype(np.float64)).reshape(slabs, -1)
        fin = np.isfinite(a)
        for s in range(slabs):
            exact = math.fsum(a[s][fin[s]])
            assert abs(t[s] - exact) <= 1e-12 * max(exact, 1e-300)


def test_bad_arguments_raise():
    d = np.zeros(12, dtype=np.float32)
    thr = della.keep_thresholds(0.5, 0.1, 4)
    key = (1, 2)
    with pytest.raises(ValueError, match="slabs"):
        cpu.della_stage_a(d, 2, 4, 1, 0, key, thr, np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="thr"):
        cpu.della_stage_a(d, 3, 4, 1, 0, key, thr[:3], np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="too short"):
        cpu.della_stage_a(d, 3, 4, 1, 0, key, thr, np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cpu.della_stage_a(d, 3, 4, 1, 0, key, thr, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="uint8"):
        cpu.della_stage_a(d, 3, 4, 1, 0, key, thr, np.zeros(4, np.uint8)[::2])
