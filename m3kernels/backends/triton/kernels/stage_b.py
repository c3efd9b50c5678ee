"""Stage B in Triton: the fused merge pass of docs/KERNEL.md, one block of elements per program.

Each program loads the base and all N models for its block once (N is the length of the tuple
of model tensors, so every N >= 1 gets its own specialisation and every model its own dtype),
forms the deltas, applies DARE and the trim window, combines (sum / mean with per-tensor or
per-row / per-column coefficients, TIES vote and disjoint merge, RAM), scales, adds the base and
writes the output dtype once; NEARSWAP (one model) interpolates base and model directly. Float
operations are unfused (the launcher passes ``enable_fp_fusion=False``), in the documented order;
divisions are ``tl.math.div_rn`` (IEEE, correctly rounded).
"""

import triton
import triton.language as tl

from m3kernels.backends.triton.kernels.delta import (
    block_start,
    dare_delta,
    load_base,
    load_f32,
    trim_delta,
    trim_delta_ties,
)
from m3kernels.backends.triton.kernels.params import AGREE_W, COEF, UNIQUE_SCALE, VOTE_W

COMBINE_SUM = tl.constexpr(0)
COMBINE_MEAN = tl.constexpr(1)
COMBINE_TIES = tl.constexpr(2)
COMBINE_NEARSWAP = tl.constexpr(3)
COMBINE_RAM = tl.constexpr(4)

GROUP_ROW = tl.constexpr(1)  # coef_group: g = J // row_len; 2 (column): g = J % row_len

NEARSWAP_MIN_DIST = tl.constexpr(9.999999974752427e-07)  # float(np.float32(1e-6)): the float32 nearest 1e-6

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
def nearswap(a, x, clip_t):
    """w = clamp((1 / max(|a - x|, 1e-6)) * t, 0, 1); y = w * x + (1 - w) * a, one rounding per operation;
    a NaN operand of max / clamp gives NaN (the comparisons are false for NaN)."""
    dist = tl.abs(a - x)
    dist = tl.where(dist < NEARSWAP_MIN_DIST, NEARSWAP_MIN_DIST, dist)
    w = tl.math.div_rn(tl.zeros_like(dist) + 1.0, dist) * clip_t  # torch's t / dist: f32(1 / dist) * t
    w = tl.where(w < 0.0, 0.0, w)
    w = tl.where(w > 1.0, 1.0, w)
    return w * x + (1.0 - w) * a


@triton.jit
def sgn(x):
    """1.0, -1.0 or 0.0 (NaN, +-0) as float32: the count vote's and count divisor's sign (V3, V4)."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def ties_combine(
    ds,
    table,
    den_floor,
    N: tl.constexpr,
    NORMALIZE: tl.constexpr,
    AGREE: tl.constexpr,
    DEN_FLOOR: tl.constexpr,
    VOTE_KIND: tl.constexpr,
    TIES_DIV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The TIES combine (docs/KERNEL.md combine 2 with V2 agree_w, V3 vote_kind, V4 ties_div, V5 den_floor)
    of the trimmed deltas ``ds``: the sign vote, then the disjoint merge of the agreeing models."""
    zero = tl.zeros([BLOCK], tl.float32)
    v = zero
    for i in tl.static_range(N):
        w = tl.load(table + VOTE_W * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
        if VOTE_KIND == 1:
            v = v + sgn(w * ds[i])
        else:
            v = v + w * ds[i]
    pos = v >= 0.0
    num = zero
    den = zero
    for i in tl.static_range(N):
        c = tl.load(table + COEF * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
        if AGREE:
            e = tl.load(table + AGREE_W * N + i).to(tl.uint32).to(tl.float32, bitcast=True) * ds[i]
        else:
            e = ds[i]  # agree_w 1.0: e_i == d_i bit for bit
        if TIES_DIV == 1:
            agree = sgn(e) == tl.where(pos, 1.0, -1.0)
            num = num + (c * ds[i]) * agree.to(tl.float32)  # times 0: a non-agreeing inf / NaN gives NaN
            den = den + agree.to(tl.float32)  # the count, exact in float32
        else:
            agree = (e != 0.0) & ((e > 0.0) == pos)
            num = tl.where(agree, num + c * ds[i], num)
            den = tl.where(agree, den + c, den)
    if TIES_DIV == 1:
        m = tl.math.div_rn(num, tl.where(den < 1.0, 1.0, den))
    elif NORMALIZE:
        if DEN_FLOOR:
            m = tl.math.div_rn(num, tl.where(den < den_floor, den_floor, den))
        else:
            nonzero = den != 0.0
            m = tl.where(nonzero, tl.math.div_rn(num, tl.where(nonzero, den, 1.0)), 0.0)
    else:
        m = num
    return m


@triton.jit
def merge_kernel(
    base_ptr,
    models,
    out_ptr,
    table,
    group_coef,
    numel,
    lam,
    mean_den,
    row_len,
    index_offset,
    clip_t,
    ram_eps,
    tie_prefix_min,
    tie_prefix_max,
    tie_blocks,
    keep_masks,
    den_floor,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DARE: tl.constexpr,
    TRIM: tl.constexpr,
    COMBINE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COEF_GROUP: tl.constexpr,
    TIES_K: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
    KEEP_MASK: tl.constexpr = False,
    DARE_DIV: tl.constexpr = False,
    AGREE: tl.constexpr = False,
    DEN_FLOOR: tl.constexpr = False,
    VOTE_KIND: tl.constexpr = 0,
    TIES_DIV: tl.constexpr = 0,
    FMA: tl.constexpr = False,
):
    """out[j] = base[j] + lam * combine_i(sparsify(models[i][j] - base[j])) for one block
    (NEARSWAP: the interpolation of base and model)."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_base(base_ptr, offs, mask, HAS_BASE, BLOCK)

    zero = tl.zeros([BLOCK], tl.float32)
    if COMBINE == COMBINE_NEARSWAP:
        x = load_f32(models[0], offs, mask)
        y = nearswap(b, x, clip_t)
    else:
        ds = ()
        for i in tl.static_range(N):
            d = dare_delta(
                models[i],
                b,
                offs,
                mask,
                table,
                i,
                N,
                start,
                DARE,
                BLOCK,
                BIG,
                keep_masks[i],
                DARE_DIV,
                KEEP_MASK,
            )
            if TIES_K:
                d = trim_delta_ties(
                    d, table, i, N, offs, mask, tie_prefix_min, tie_prefix_max, tie_blocks, BLOCK
                )
            elif TRIM:
                d = trim_delta(d, table, i, N)
            ds = ds + (d,)

        if COMBINE == COMBINE_TIES:
            m = ties_combine(ds, table, den_floor, N, NORMALIZE, AGREE, DEN_FLOOR, VOTE_KIND, TIES_DIV, BLOCK)
        elif COMBINE == COMBINE_RAM:
            cnt = tl.zeros([BLOCK], tl.int32)
            for i in tl.static_range(N):
                cnt += (tl.abs(ds[i]) > ram_eps).to(tl.int32)
            one = cnt == 1
            cf = tl.where(one, 1, cnt).to(tl.float32)  # c > 1 where it divides
            m = zero
            for i in tl.static_range(N):
                us = tl.load(table + UNIQUE_SCALE * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
                t = tl.where(one, ds[i] * us, tl.math.div_rn(ds[i], cf))
                m = tl.where(tl.abs(ds[i]) > ram_eps, m + t, m)
        else:
            m = zero
            if COEF_GROUP != 0:
                J = offs + index_offset  # int32 unless BIG (the host checks numel + offset < 2**31)
                if COEF_GROUP == GROUP_ROW:
                    g = J // row_len
                else:
                    g = J % row_len
                gi = tl.where(mask, g.to(tl.int64) * N, 0)
            for i in tl.static_range(N):
                if COEF_GROUP != 0:
                    c = tl.load(group_coef + gi + i, mask=mask, other=0.0)
                else:
                    c = tl.load(table + COEF * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
                if FMA:
                    m = tl.fma(c, ds[i], m)  # one rounding (torch's addcmul_, mergekit's linear)
                else:
                    m = m + c * ds[i]
            if COMBINE == COMBINE_MEAN:
                m = tl.math.div_rn(m, zero + mean_den)
        y = b + lam * m
    store_output(out_ptr, offs, mask, y, OUT_KIND)
