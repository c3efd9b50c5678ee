"""Stage B in Triton: the fused merge pass of docs/KERNEL.md, one block of elements per program.

Each program loads the base and all N models for its block once (N is the length of the tuple
of model tensors, so every N >= 1 gets its own specialisation and every model its own dtype),
forms the deltas, applies DARE and the trim, combines (sum / mean / TIES vote and disjoint
merge), scales, adds the base and writes the output dtype once. Float operations are unfused
(the launcher passes ``enable_fp_fusion=False``), in the documented order; divisions are
``tl.math.div_rn`` (IEEE, correctly rounded).
"""

import triton
import triton.language as tl

from m3kernels.backends.triton.kernels.delta import block_start, dare_delta, load_base
from m3kernels.backends.triton.kernels.params import COEF, TRIM_MIN, VOTE_W

COMBINE_SUM = tl.constexpr(0)
COMBINE_MEAN = tl.constexpr(1)
COMBINE_TIES = tl.constexpr(2)

OUT_F32 = tl.constexpr(0)
OUT_BF16 = tl.constexpr(1)
OUT_F16 = tl.constexpr(2)


@triton.jit
def to_bf16_bits(y):
    """float32 -> bfloat16 bits, round-to-nearest-even; NaN -> 0x7FC0 with its sign."""
    u = y.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = ((u >> 16) & 0x8000) | 0x7FC0
    return tl.where(y != y, nan, rounded).to(tl.uint16)


@triton.jit
def to_f16_bits(y):
    """float32 -> float16 bits, round-to-nearest-even (IEEE cast); NaN -> quiet NaN, payload top bits."""
    h = y.to(tl.float16).to(tl.uint16, bitcast=True)
    u = y.to(tl.uint32, bitcast=True)
    nan = (((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)).to(tl.uint16)
    return tl.where(y != y, nan, h)


@triton.jit
def store_output(out_ptr, offs, mask, y, OUT_KIND: tl.constexpr):
    """Write y (float32) as the output dtype; every NaN as the canonical quiet NaN (KERNEL.md)."""
    canon = tl.full(y.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    y = tl.where(y != y, canon, y)
    if OUT_KIND == OUT_BF16:
        tl.store(out_ptr + offs, to_bf16_bits(y).to(tl.bfloat16, bitcast=True), mask=mask)
    elif OUT_KIND == OUT_F16:
        tl.store(out_ptr + offs, to_f16_bits(y).to(tl.float16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def merge_kernel(
    base_ptr,
    models,
    out_ptr,
    table,
    numel,
    lam,
    mean_den,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DARE: tl.constexpr,
    TRIM: tl.constexpr,
    COMBINE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[j] = base[j] + lam * combine_i(sparsify(models[i][j] - base[j])) for one block."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)

    ds = ()
    for i in tl.static_range(N):
        d = dare_delta(models[i], b, offs, mask, table, i, N, start, DARE, BLOCK, BIG)
        if TRIM:  # keep iff bits(|d|) >= trim_min (0 keeps all; 2**31 after clamping none)
            a = d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
            d = tl.where(a >= tl.load(table + TRIM_MIN * N + i).to(tl.uint32), d, 0.0)
        ds = ds + (d,)

    zero = tl.zeros([BLOCK], tl.float32)
    if COMBINE == COMBINE_TIES:
        v = zero
        for i in tl.static_range(N):
            w = tl.load(table + VOTE_W * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
            v = v + w * ds[i]
        pos = v >= 0.0
        num = zero
        den = zero
        for i in tl.static_range(N):
            c = tl.load(table + COEF * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
            agree = (ds[i] != 0.0) & ((ds[i] > 0.0) == pos)
            num = tl.where(agree, num + c * ds[i], num)
            den = tl.where(agree, den + c, den)
        if NORMALIZE:
            nonzero = den != 0.0
            m = tl.where(nonzero, tl.math.div_rn(num, tl.where(nonzero, den, 1.0)), 0.0)
        else:
            m = num
    else:
        m = zero
        for i in tl.static_range(N):
            c = tl.load(table + COEF * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
            m = m + c * ds[i]
        if COMBINE == COMBINE_MEAN:
            m = tl.math.div_rn(m, zero + mean_den)
    y = b + lam * m
    store_output(out_ptr, offs, mask, y, OUT_KIND)
