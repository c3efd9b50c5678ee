"""Per-element building blocks shared by stage A and stage B (docs/KERNEL.md, first lines).

For one block of flat indices: load the base, form the float32 delta of model ``i`` and apply
the DARE drop (Philox keep bit, multiply by the scale). Every float operation is one IEEE
float32 operation in the order of docs/KERNEL.md. (Few, larger helpers: in Triton's interpreter
every nested ``@triton.jit`` call has a fixed cost of a few milliseconds.)
"""

import triton
import triton.language as tl

from m3kernels.backends.triton.kernels.params import (
    DARE_DEN,
    DARE_ON,
    KEEP_THR,
    KEY0,
    KEY1,
    MASK_SCALE,
    SCALE,
    TIE_BLOCK,
    TIE_KEEP,
    TIE_SKIP,
    TRIM_MAX,
    TRIM_MIN,
)
from m3kernels.backends.triton.kernels.philox import dare_u32


@triton.jit
def block_start(BLOCK: tl.constexpr, BIG: tl.constexpr):
    """First flat index of this program's block (int64 when the tensor may pass 2**31)."""
    pid = tl.program_id(0)
    if BIG:
        return pid.to(tl.int64) * BLOCK
    else:
        return pid * BLOCK


@triton.jit
def load_f32(ptr, offs, mask):
    """f32(ptr[offs]) where mask, else 0.0: exact for float32, bfloat16 and float16 inputs.

    bfloat16 is widened on its bits (``bits << 16``), which is what the hardware conversion does:
    Triton's CPU interpreter converts bfloat16 subnormals wrongly (3.03e-39 -> 3.67e-40)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (u.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_base(base_ptr, offs, mask, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """f32(base[j]) (exact for bf16/fp16), or 0.0 without a base."""
    if HAS_BASE:
        return load_f32(base_ptr, offs, mask)
    else:
        return tl.zeros([BLOCK], tl.float32)


@triton.jit
def model_keep(table, i: tl.constexpr, N: tl.constexpr, start, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """DARE keep bits of model ``i`` for the block at ``start``: u32 < thr, compared as int64."""
    k0 = tl.load(table + KEY0 * N + i).to(tl.uint32)
    k1 = tl.load(table + KEY1 * N + i).to(tl.uint32)
    thr = tl.load(table + KEEP_THR * N + i)
    return dare_u32(k0, k1, start, BLOCK, BIG).to(tl.int64) < thr


@triton.jit
def trim_delta(d, table, i: tl.constexpr, N: tl.constexpr):
    """The magnitude trim of model ``i``: keep iff trim_min <= bits(|d|) <= trim_max (uint32; trim_min
    0 and trim_max 0xFFFFFFFF keep all, a clamped 2**31 trim_min none). A value the lower test drops
    is 0, which the upper test keeps, so one combined test is the two tests of docs/KERNEL.md."""
    a = d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    lo = tl.load(table + TRIM_MIN * N + i).to(tl.uint32)
    hi = tl.load(table + TRIM_MAX * N + i).to(tl.uint32)
    return tl.where((a >= lo) & (a <= hi), d, 0.0)


@triton.jit
def block_exclusive_count(eq, BLOCK: tl.constexpr):
    """For each element, how many elements before it in its tie block (TIE_BLOCK flat indices,
    the program's block a multiple of them, aligned) have ``eq`` set: an int32 cumsum (exact)."""
    e = eq.to(tl.int32)
    c = tl.cumsum(tl.reshape(e, [BLOCK // TIE_BLOCK, TIE_BLOCK]), axis=1)
    return tl.reshape(c, [BLOCK]) - e


@triton.jit
def tie_keys(d, table, i: tl.constexpr, N: tl.constexpr, mask):
    """(bits(|d|), its == trim_min, its == trim_max) inside the tensor (uint32 thresholds as in
    trim_delta: a clamped 2**31 trim_min equals no key, 0xFFFFFFFF trim_max none either)."""
    a = d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    lo = tl.load(table + TRIM_MIN * N + i).to(tl.uint32)
    hi = tl.load(table + TRIM_MAX * N + i).to(tl.uint32)
    return a, lo, hi, mask & (a == lo), mask & (a == hi)


@triton.jit
def trim_delta_ties(
    d,
    table,
    i: tl.constexpr,
    N: tl.constexpr,
    offs,
    mask,
    prefix_min,
    prefix_max,
    nblocks,
    BLOCK: tl.constexpr,
):
    """The trim with the exact-k tie rule (docs/KERNEL.md "Exact-k ties"): a key above trim_min and
    below trim_max is kept; a key equal to trim_min only while its tie index t < tie_keep (rule on),
    one equal to trim_max only once t >= tie_skip (rule on); t = the block's prefix + the equal keys
    before it in its tie block."""
    a, lo, hi, eqmin, eqmax = tie_keys(d, table, i, N, mask)
    keep_k = tl.load(table + TIE_KEEP * N + i)
    skip_k = tl.load(table + TIE_SKIP * N + i)
    tb = i * nblocks + offs // TIE_BLOCK
    tmin = tl.load(prefix_min + tb, mask=mask, other=0) + block_exclusive_count(eqmin, BLOCK)
    tmax = tl.load(prefix_max + tb, mask=mask, other=0) + block_exclusive_count(eqmax, BLOCK)
    keep = (a > lo) | (eqmin & ((keep_k < 0) | (tmin < keep_k)))
    below = (a < hi) | (eqmax & ((skip_k <= 0) | (tmax >= skip_k)))
    return tl.where(keep & below, d, 0.0)


@triton.jit
def round_to_input(d, x_ptr):
    """d rounded to the dtype of ``x_ptr``'s elements and back (RNE; fp16 overflows to inf; NaN stays
    NaN; float32: d itself): the dare_div step's rounding (docs/KERNEL.md V7)."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        u = d.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(d != d, d, r)
    elif x_ptr.dtype.element_ty == tl.float16:
        return d.to(tl.float16).to(tl.float32)
    else:
        return d


@triton.jit
def dare_delta(
    x_ptr,
    b,
    offs,
    mask,
    table,
    i: tl.constexpr,
    N: tl.constexpr,
    start,
    DARE: tl.constexpr,
    BLOCK: tl.constexpr,
    BIG: tl.constexpr,
    mask_ptr=None,
    DARE_DIV: tl.constexpr = False,
    KEEP_MASK: tl.constexpr = False,
):
    """Delta of model ``i`` after the DARE step and the keep mask (trim not applied):
    d = f32(x[j]) - b, then kept ? d * scale : 0.0 (dare_div: kept ? round_to(dtype_i, d / den) : 0.0);
    with a keep mask (``mask_ptr``: model i's bytes, bit j LSB first), bit ? d * mask_scale : 0.0."""
    d = load_f32(x_ptr, offs, mask) - b
    if DARE:
        keep = model_keep(table, i, N, start, BLOCK, BIG)
        if DARE_DIV:
            den = tl.load(table + DARE_DEN * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
            q = round_to_input(tl.math.div_rn(d, tl.zeros_like(d) + den), x_ptr)
            on = tl.load(table + DARE_ON * N + i) != 0  # off: keep is all true and d stays as it is
            d = tl.where(keep, tl.where(on, q, d), 0.0)
        else:
            scale = tl.load(table + SCALE * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
            d = tl.where(keep, d * scale, 0.0)
    if KEEP_MASK:
        byte = tl.load(mask_ptr + (offs >> 3), mask=mask, other=0).to(tl.int32)
        bit = (byte >> (offs & 7).to(tl.int32)) & 1
        ms = tl.load(table + MASK_SCALE * N + i).to(tl.uint32).to(tl.float32, bitcast=True)
        d = tl.where(bit != 0, d * ms, 0.0)
    return d
