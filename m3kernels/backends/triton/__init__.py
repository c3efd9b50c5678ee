"""The Triton backend: stage A and stage B of docs/KERNEL.md as Triton kernels.

Runs on CUDA tensors (compiled kernels) and, when Triton's interpreter is on
(``TRITON_INTERPRET=1`` before :mod:`m3kernels.backends.triton.kernels` is first imported), on CPU
tensors, which is how the tests run without a GPU. Importing this module never fails because of
Triton: :func:`available` says whether ``triton`` can be imported, and the kernels are imported
on first use.

Per tensor the only host synchronisations are the read-backs of the histograms and L1 partial
sums that stage A exists to produce; stage B launches one kernel and returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from m3kernels.merge.kernel_params import DTYPE_CODES, HIST_BINS

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # not installed, or broken
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

# Elements per program. Compiled: 1024 elements over 4 warps = 8 per thread, i.e. one 16-byte
# load per bf16/fp16 input and two per float32 input. Interpreted: bigger blocks, fewer programs
# (the interpreter's cost is per program, not per element).
BLOCK_GPU = 1024
WARPS_GPU = 4
BLOCK_INTERPRETED = 8192
INT32_LIMIT = 2**31


def available() -> bool:
    """True when ``triton`` can be imported."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> str:
    return _IMPORT_ERROR or ""


def _kernels():
    from m3kernels.backends.triton import kernels as triton_kernels

    return triton_kernels


def supports(device) -> bool:
    """CUDA devices always; CPU devices only when the kernels were defined in interpreter mode."""
    if not available():
        return False
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        interpreted = _kernels().INTERPRETED
    except Exception:  # a Triton install that imports but cannot define kernels
        return False
    return device.type == "cuda" or interpreted


def _block() -> int:
    return BLOCK_INTERPRETED if _kernels().INTERPRETED else BLOCK_GPU


def _is_big(numel: int, block: int) -> bool:
    """Whether flat indices (plus one block of slack) can pass int32."""
    return numel + block >= INT32_LIMIT


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _launch_options(kernels) -> dict:
    if kernels.INTERPRETED:
        return {}
    # No FMA contraction: every a * b + c is two roundings (docs/KERNEL.md).
    return {"num_warps": WARPS_GPU, "enable_fp_fusion": False}


def _inputs(p, base, models: Sequence[torch.Tensor]):
    models = tuple(models)
    if len(models) != p.n:
        raise ValueError(f"expected {p.n} model tensors, got {len(models)}")
    has_base = bool(p.has_base)
    if has_base and base is None:
        raise ValueError("p.has_base is set but base is None")
    # Without a base the kernel never reads the base pointer; any tensor of the device will do.
    return (base if has_base else models[0]), models, has_base


def l1_sums(p, base, models):
    """(total, kept): float64[n] Σ|δ_i| and Σ|δ_i| over DARE-kept elements, in block order."""
    k = _kernels()
    base_t, models, has_base = _inputs(p, base, models)
    numel = models[0].numel()
    if numel == 0:
        return np.zeros(p.n), np.zeros(p.n)
    block = _block()
    nblocks = triton.cdiv(numel, block)
    dev = models[0].device
    partial = torch.empty((2 * p.n, nblocks), dtype=torch.float64, device=dev)
    with _on_device(models[0]):
        table = k.param_table(p, dev)
        k.l1_partial_kernel[(nblocks,)](
            base_t,
            models,
            partial,
            table,
            numel,
            nblocks,
            N=p.n,
            HAS_BASE=has_base,
            BIG=_is_big(numel, block),
            BLOCK=block,
            **_launch_options(k),
        )
    sums = np.cumsum(partial.cpu().numpy(), axis=1)[:, -1]  # sequential: block order
    return sums[0::2].copy(), sums[1::2].copy()


def histogram(p, base, models, prefix=None):
    """int64[n, 65536]: high-16 counts of bits(|δ'_i|), or low-16 counts within ``prefix[i]``."""
    k = _kernels()
    base_t, models, has_base = _inputs(p, base, models)
    numel = models[0].numel()
    dev = models[0].device
    if numel == 0:
        return np.zeros((p.n, HIST_BINS), dtype=np.int64)
    block = _block()
    count_dtype = torch.int32 if numel < INT32_LIMIT else torch.int64
    hist = torch.zeros((p.n, HIST_BINS), dtype=count_dtype, device=dev)
    with _on_device(models[0]):
        table = k.param_table(p, dev, prefix)
        k.histogram_kernel[(triton.cdiv(numel, block),)](
            base_t,
            models,
            hist,
            table,
            numel,
            N=p.n,
            HAS_BASE=has_base,
            DARE=bool(np.any(p.dare)),
            LOW=prefix is not None,
            BIG=_is_big(numel, block),
            BLOCK=block,
            **_launch_options(k),
        )
    return hist.cpu().numpy().astype(np.int64)


def merge(p, base, models, out):
    """Stage B into ``out`` (contiguous, same shape and device as the inputs)."""
    k = _kernels()
    base_t, models, has_base = _inputs(p, base, models)
    numel = out.numel()
    if numel == 0:
        return out
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    block = _block()
    trim = p.trim_min is not None and bool(np.any(np.asarray(p.trim_min) != 0))
    dev = out.device
    with _on_device(out):
        table = k.param_table(p, dev)
        k.merge_kernel[(triton.cdiv(numel, block),)](
            base_t,
            models,
            out,
            table,
            numel,
            float(p.lam),
            float(p.mean_den),
            N=p.n,
            HAS_BASE=has_base,
            DARE=bool(np.any(p.dare)),
            TRIM=trim,
            COMBINE=int(p.combine),
            NORMALIZE=bool(p.normalize),
            OUT_KIND=DTYPE_CODES[out.dtype],
            BIG=_is_big(numel, block),
            BLOCK=block,
            **_launch_options(k),
        )
    return out


__all__ = ["available", "unavailable_reason", "supports", "l1_sums", "histogram", "merge"]
