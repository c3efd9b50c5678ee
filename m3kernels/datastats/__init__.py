"""Statistics computed from data for data-aware merging: diagonal Fisher (``compute_fisher``) and
RegMean Gram matrices (``compute_regmean``), plus the checkpoint merge that uses them
(``merge_checkpoints_data_aware``). Loaded on first use: importing the package imports no torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compute_fisher": "m3kernels.datastats.fisher",
    "compute_regmean": "m3kernels.datastats.regmean",
    "merge_checkpoints_data_aware": "m3kernels.datastats.merge",
    "model_fingerprint": "m3kernels.datastats.fingerprint",
    "DataError": "m3kernels.datastats.data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm3kernels.datastats' has no attribute {name!r}")
