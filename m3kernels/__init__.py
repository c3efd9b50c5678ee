"""m3kernels: exact, fused kernels for merging fine-tuned LLMs (TIES, DARE, SLERP, Model Stock, M³, ...).

The public names are loaded on first use (PEP 562), so ``import m3kernels`` and the command
line's start-up stay cheap until a merge needs PyTorch and the kernels.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_EXPORTS = {
    "merge_tensors": "m3kernels.api",
    "trim_thresholds": "m3kernels.api",
    "available_backends": "m3kernels.backends",
    "draw_mix_ratios": "m3kernels.merge.mixup",
    "dare_keep_mask": "m3kernels.merge.philox",
    "merge_checkpoints": "m3kernels.checkpoint.run",
    "METHODS": "m3kernels.merge.recipe",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm3kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
