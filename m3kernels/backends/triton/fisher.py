"""Fisher stage B in Triton (docs/DATA_AWARE.md, "Fisher in the fused kernel"): one block of
elements per program, 2N + 1 streams (N models, N Fisher tensors, the output).

Per element, in float32, unfused (``enable_fp_fusion=False``; divisions ``tl.math.div_rn``), in
the documented order: ``f = f32(F_i)``, the floor (``f < floor ? floor : f`` or ``f + floor``),
``cf = coef_i * f``, ``num = num + cf * x_i``, ``den = den + cf``, ``avg = avg + coef_i * x_i``;
``y = den != 0 ? num / den : avg / coef_sum``; then the stage-B store (canonical NaN, RNE cast).
The same bits as the CPU and CUDA kernels. Importing this module defines the kernel (Triton
decides then whether it is interpreted, as for :mod:`m3kernels.backends.triton.kernels`).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from m3kernels.backends.triton import _block, _is_big, _launch_options, _on_device
from m3kernels.backends.triton.kernels.delta import block_start, load_f32
from m3kernels.backends.triton.kernels.stage_b import store_output
from m3kernels.merge.kernel_params import DTYPE_CODES


@triton.jit
def fisher_kernel(
    models,
    stats,
    out_ptr,
    params,
    numel,
    N: tl.constexpr,
    FLOOR_ADD: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[j] = Σ coef_i F̃_i x_i / Σ coef_i F̃_i for one block; params = [coef_0 .. coef_{N-1},
    coef_sum, floor] (float32)."""
    start = block_start(BLOCK, BIG)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    coef_sum = tl.load(params + N)
    floor = tl.load(params + N + 1)
    zero = tl.zeros([BLOCK], tl.float32)
    num = zero
    den = zero
    avg = zero
    for i in tl.static_range(N):
        f = load_f32(stats[i], offs, mask)
        x = load_f32(models[i], offs, mask)
        if FLOOR_ADD:
            f = f + floor
        else:
            f = tl.where(f < floor, floor, f)  # a NaN f fails the test and stays NaN
        c = tl.load(params + i)
        cf = c * f
        num = num + cf * x
        den = den + cf
        avg = avg + c * x
    nz = den != 0.0
    y = tl.where(nz, tl.math.div_rn(num, tl.where(nz, den, 1.0)), tl.math.div_rn(avg, zero + coef_sum))
    store_output(out_ptr, offs, mask, y, OUT_KIND)


def fisher_merge(models, stats, coef, coef_sum: float, floor: float, floor_mode: int, out: torch.Tensor):
    """Launch the kernel: ``models`` / ``stats`` contiguous float32/bf16/fp16 tensors of out's
    shape and device, ``coef`` float32[n], ``coef_sum`` / ``floor`` float32 values, floor_mode 0
    (max) or 1 (add); out contiguous."""
    from m3kernels.backends.triton import kernels as k

    models, stats = tuple(models), tuple(stats)
    numel = out.numel()
    if numel == 0:
        return out
    params = np.concatenate([np.asarray(coef, np.float32), np.float32([coef_sum, floor])])
    block = _block()
    with _on_device(out):
        table = torch.from_numpy(params).to(out.device)
        fisher_kernel[(triton.cdiv(numel, block),)](
            models,
            stats,
            out,
            table,
            numel,
            N=len(models),
            FLOOR_ADD=floor_mode == 1,
            OUT_KIND=DTYPE_CODES[out.dtype],
            BIG=_is_big(numel, block),
            BLOCK=block,
            **_launch_options(k),
        )
    return out
