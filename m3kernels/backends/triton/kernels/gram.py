"""Stage A gram sums in Triton: Σ v_i * v_k per group in float64, in the order of docs/KERNEL.md.

``v_i = f32(x_i) - b`` (the delta before DARE and trim; ``b = 0`` without a base). A group (the whole
tensor, a row, or a column; the element of position ``q`` of group ``g`` is at ``g * g_stride + q *
q_stride``) is cut into chunks of ``CHUNK`` positions; a work unit ``u = g * chunks + c`` is one chunk
of one group. One program handles ``BU`` consecutive units side by side as the columns of a
``[LANES, BU]`` float64 accumulator: a sequential loop over the chunk's positions adds position ``q``
into lane ``q % LANES`` (so each lane is summed in position order); the lanes are then added in lane
order into the unit's value (``tl.sum`` over a column with one non-zero lane is exact; no lane sum
is -0.0, since they start at +0.0). ``partial[(u * N + i) * N + k]`` (``k >= i``) holds it; the host
adds a group's chunks in order. One step reads the base and every model once and updates the
accumulators of all pairs (a tuple carried through the loop); ``STEPS`` steps are unrolled per loop
iteration (compiled: 4, so that several steps' loads are in flight). The additions are the same whatever
the grid or ``BU``, compiled or interpreted.
"""

import triton
import triton.language as tl

from m3kernels.backends.triton.kernels.delta import load_f32


@triton.jit
def gram_kernel(
    base_ptr,
    models,
    partial_ptr,
    units,
    length,
    g_stride,
    q_stride,
    chunks,
    N: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BU: tl.constexpr,
    LANES: tl.constexpr,
    CHUNK: tl.constexpr,
    STEPS: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64) * BU + tl.arange(0, BU).to(tl.int64)
    umask = u < units
    g = u // chunks
    q0 = (u - g * chunks) * CHUNK  # first position of each unit's chunk
    q_end = tl.minimum(q0 + CHUNK, length)
    nr = tl.cdiv(tl.minimum(length, CHUNK), LANES)  # iterations of the longest chunk
    lane = tl.arange(0, LANES)
    q = q0[None, :] + lane[:, None]  # [LANES, BU] positions of the current step
    e = q * q_stride + (g * g_stride)[None, :]  # their elements
    e_step = LANES * q_stride
    q_end = tl.where(umask, q_end, 0)[None, :]  # units past the end: no position
    accs = ()  # pair (i, k), k >= i, at i * N - i * (i - 1) // 2 + k - i
    for i in tl.static_range(N):
        for _k in tl.static_range(i, N):
            accs = accs + (tl.zeros([LANES, BU], tl.float64),)
    for _r in range(0, tl.cdiv(nr, STEPS)):
        for _s in tl.static_range(STEPS):  # unrolled: the steps' loads are independent of the sums
            m = q < q_end  # steps past a chunk's end add exact zeros (no lane sum is -0.0)
            if HAS_BASE:
                b = load_f32(base_ptr, e, m)
            else:
                b = tl.zeros([LANES, BU], tl.float32)
            vs = ()
            for i in tl.static_range(N):
                vs = vs + ((load_f32(models[i], e, m) - b).to(tl.float64),)
            new = ()
            for i in tl.static_range(N):
                for k in tl.static_range(i, N):
                    new = new + (accs[i * N - i * (i - 1) // 2 + k - i] + vs[i] * vs[k],)
            accs = new
            q += LANES
            e += e_step
    for i in tl.static_range(N):
        for k in tl.static_range(i, N):
            acc = accs[i * N - i * (i - 1) // 2 + k - i]
            v = tl.zeros([BU], tl.float64)
            for ln in tl.static_range(LANES):
                v = v + tl.sum(tl.where(lane[:, None] == ln, acc, 0.0), axis=0)
            tl.store(partial_ptr + u * (N * N) + i * N + k, v, mask=umask)
