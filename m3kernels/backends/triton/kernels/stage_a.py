"""Stage A in Triton: magnitude histograms for the exact trim, and L1 sums for ``rescale: l1``.

* ``histogram_kernel``: with ``d`` the delta after the DARE step (and the keep mask), ``a = bits(|d|)``; pass 1
  (``LOW=False``) counts ``a >> 16`` into 65536 bins per model, pass 2 (``LOW=True``) counts
  ``a & 0xffff`` of the elements whose high half equals the model's prefix. Counts go straight
  into a global histogram with relaxed atomics; integer counts make any block split exact.
* ``l1_partial_kernel``: per block, float64 sums of ``|d|`` (raw delta) and of ``|d|`` over the
  DARE-kept elements, written to ``partial[2 * i + {0, 1}, block]``; the host adds them in block
  order, so the result does not depend on scheduling.
* ``ram_counts_kernel``: per block, the RAM shared / unique counts of each model (integers).
* ``tie_counts_kernel``: per tie block, the keys equal to each model's thresholds (exact-k ties).

The gram sums (float64, a fixed summation order) are in :mod:`.gram`.
"""

import triton
import triton.language as tl

from m3kernels.backends.triton.kernels.delta import (
    block_start,
    dare_delta,
    load_base,
    load_f32,
    model_keep,
    tie_keys,
    trim_delta,
)
from m3kernels.backends.triton.kernels.params import PREFIX, TIE_BLOCK

HIST_BINS = tl.constexpr(65536)


@triton.jit
def histogram_kernel(
    base_ptr,
    models,
    hist_ptr,
    table,
    numel,
    keep_masks,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DARE: tl.constexpr,
    LOW: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
    DARE_DIV: tl.constexpr = False,
    KEEP_MASK: tl.constexpr = False,
):
    """Add this block's counts to ``hist[i, bin]`` (int32 or int64, zeroed by the caller)."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)
    one = tl.full([BLOCK], 1, hist_ptr.dtype.element_ty)
    for i in tl.static_range(N):
        d = dare_delta(
            models[i], b, offs, mask, table, i, N, start, DARE, BLOCK, BIG, keep_masks[i], DARE_DIV, KEEP_MASK
        )
        a = d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF  # bits(|d|)
        hi = a >> 16
        if LOW:
            sel = mask & (hi == tl.load(table + PREFIX * N + i).to(tl.uint32))
            bins = (a & 0xFFFF).to(tl.int32)
        else:
            sel = mask
            bins = hi.to(tl.int32)
        tl.atomic_add(hist_ptr + i * HIST_BINS + bins, one, mask=sel, sem="relaxed")


@triton.jit
def l1_partial_kernel(
    base_ptr,
    models,
    partial_ptr,
    table,
    numel,
    nblocks,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partial[2i, block] = Σ|d_i|, partial[2i+1, block] = Σ|d_i|·keep_i (float64)."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)
    pid = tl.program_id(0)
    for i in tl.static_range(N):
        d = load_f32(models[i], offs, mask) - b
        a = tl.abs(d).to(tl.float64)
        a = tl.where(mask, a, 0.0)
        keep = model_keep(table, i, N, start, BLOCK, BIG)
        tl.store(partial_ptr + (2 * i) * nblocks + pid, tl.sum(a, axis=0))
        tl.store(partial_ptr + (2 * i + 1) * nblocks + pid, tl.sum(tl.where(keep, a, 0.0), axis=0))


@triton.jit
def ram_counts_kernel(
    base_ptr,
    models,
    partial_ptr,
    table,
    numel,
    nblocks,
    ram_eps,
    keep_masks,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DARE: tl.constexpr,
    TRIM: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
    DARE_DIV: tl.constexpr = False,
    KEEP_MASK: tl.constexpr = False,
):
    """partial[2i, block] / partial[2i+1, block] (int32): this block's elements where |d_i| > ram_eps
    and more than one model / only model i has such a delta (d_i after DARE and trim, as stage B's
    RAM combine sees them)."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)
    pid = tl.program_id(0)
    sel = ()
    cnt = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(N):
        d = dare_delta(
            models[i], b, offs, mask, table, i, N, start, DARE, BLOCK, BIG, keep_masks[i], DARE_DIV, KEEP_MASK
        )
        if TRIM:
            d = trim_delta(d, table, i, N)
        s = mask & (tl.abs(d) > ram_eps)
        cnt += s.to(tl.int32)
        sel = sel + (s,)
    for i in tl.static_range(N):
        shared = tl.sum((sel[i] & (cnt > 1)).to(tl.int32), axis=0)
        unique = tl.sum((sel[i] & (cnt == 1)).to(tl.int32), axis=0)
        tl.store(partial_ptr + (2 * i) * nblocks + pid, shared)
        tl.store(partial_ptr + (2 * i + 1) * nblocks + pid, unique)


@triton.jit
def tie_counts_kernel(
    base_ptr,
    models,
    cmin_ptr,
    cmax_ptr,
    table,
    numel,
    nblocks,
    keep_masks,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DARE: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
    DARE_DIV: tl.constexpr = False,
    KEEP_MASK: tl.constexpr = False,
):
    """Exact-k ties, stage A: per model and tie block (TIE_BLOCK flat indices) of this program, how
    many keys bits(|d'|) (after DARE, no trim) equal trim_min and trim_max (int32 [n, nblocks])."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)
    TB: tl.constexpr = BLOCK // TIE_BLOCK
    blk = tl.program_id(0) * TB + tl.arange(0, TB)
    for i in tl.static_range(N):
        d = dare_delta(
            models[i], b, offs, mask, table, i, N, start, DARE, BLOCK, BIG, keep_masks[i], DARE_DIV, KEEP_MASK
        )
        _, _, _, eqmin, eqmax = tie_keys(d, table, i, N, mask)
        cmin = tl.sum(tl.reshape(eqmin.to(tl.int32), [TB, TIE_BLOCK]), axis=1)
        cmax = tl.sum(tl.reshape(eqmax.to(tl.int32), [TB, TIE_BLOCK]), axis=1)
        tl.store(cmin_ptr + i * nblocks + blk, cmin, mask=blk < nblocks)
        tl.store(cmax_ptr + i * nblocks + blk, cmax, mask=blk < nblocks)
