"""Checking a tensor argument of a compiled backend and turning it into (pointer, dtype code)."""

from __future__ import annotations

import torch

from m3kernels.merge.kernel_params import DTYPE_CODES


def pointer_and_code(
    t: torch.Tensor, what: str, numel: int, device_type: str, backend: str
) -> tuple[int, int]:
    """``t``'s data pointer and dtype code, after checking type, device, dtype, layout and size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device_type:
        raise ValueError(f"{what} is on {t.device}; the {backend} backend needs {device_type} tensors")
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"{what} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if t.numel() != numel:
        raise ValueError(f"{what} has {t.numel()} elements, expected {numel}")
    return t.data_ptr(), DTYPE_CODES[t.dtype]
