"""Philox4x32-10 in Triton and the DARE keep stream built on it (docs/RANDOMNESS.md).

All arithmetic is on uint32: ``tl.umulhi`` gives the high word of each 32x32 product and the
wrapping uint32 multiply the low word (``sanitize_overflow=False``: wrapping is intended, and the
interpreter then skips its overflow checks). One Philox evaluation serves four consecutive elements:
element ``j`` uses counter ``(j >> 2)`` (two 32-bit words, words 2 and 3 zero) and takes output
word ``j & 3``. The keys come from :func:`m3kernels.merge.philox.dare_key` via the parameter table,
so the result equals :func:`m3kernels.merge.philox.dare_uniform_u32` bit for bit.
"""

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counter words ``c0..c3`` (tensors) and key ``(k0, k1)``."""
    m0 = tl.full([], PHILOX_M0, tl.uint32)
    m1 = tl.full([], PHILOX_M1, tl.uint32)
    w0 = tl.full([], PHILOX_W0, tl.uint32)
    w1 = tl.full([], PHILOX_W1, tl.uint32)
    for r in tl.static_range(PHILOX_ROUNDS):
        if r > 0:
            k0 = tl.add(k0, w0, sanitize_overflow=False)
            k1 = tl.add(k1, w1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, m0)
        lo0 = tl.mul(c0, m0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, m1)
        lo1 = tl.mul(c2, m1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def dare_u32(k0, k1, start, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """The uint32 stream for flat indices ``start .. start + BLOCK - 1`` (``start % 4 == 0``).

    ``BIG``: ``start`` is int64 and indices may exceed 2**31 (the counter's high word is used).
    """
    q = (start >> 2) + tl.arange(0, BLOCK // 4)
    zero = tl.zeros([BLOCK // 4], tl.uint32)
    c0 = q.to(tl.uint32)  # low 32 bits (truncation when q is int64)
    if BIG:
        c1 = (q >> 32).to(tl.uint32)
    else:
        c1 = zero
    w0, w1, w2, w3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    # element 4q + t takes word t: interleave (w0, w2) and (w1, w3), then those two.
    return tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))


@triton.jit
def philox_kernel(ctr_ptr, key_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """Test helper: Philox4x32-10 of ``count`` counters (int64 rows of four 32-bit words)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < count
    c0 = tl.load(ctr_ptr + rows * 4 + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + rows * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + rows * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + rows * 4 + 3, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr).to(tl.uint32)
    k1 = tl.load(key_ptr + 1).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + rows * 4 + 0, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 3, r3.to(tl.int64), mask=mask)


@triton.jit
def dare_u32_kernel(key_ptr, out_ptr, first, count, BLOCK: tl.constexpr):
    """Test helper: ``out[t]`` = u32 of flat index ``first + t`` (int64 ``first``, a multiple of 4)."""
    pid = tl.program_id(0)
    start = first + pid.to(tl.int64) * BLOCK
    t = pid * BLOCK + tl.arange(0, BLOCK)
    k0 = tl.load(key_ptr).to(tl.uint32)
    k1 = tl.load(key_ptr + 1).to(tl.uint32)
    u = dare_u32(k0, k1, start, BLOCK, True)
    tl.store(out_ptr + t, u.to(tl.int64), mask=t < count)
