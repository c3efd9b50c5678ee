"""Eager PyTorch merges computed the way mergekit (0.1.x) computes them: the baseline of
``bench/bench_tensor.py``. The code is the package's, :mod:`m3kernels.benchmark.eager` (its
docstring says what makes this style slow); this module keeps the name the bench scripts import,
and the older names of its pieces."""

from __future__ import annotations

from m3kernels.benchmark.eager import bernoulli_drop, eager_merge
from m3kernels.benchmark.eager import sign_consensus as sign_consensus_merge
from m3kernels.benchmark.eager import trim_by_sort as magnitude_trim

__all__ = ["eager_merge", "magnitude_trim", "bernoulli_drop", "sign_consensus_merge"]
