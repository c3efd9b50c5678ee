"""Exact k-th largest |δ| by radix select over float32 bit patterns (docs/SPEC.md §5, stage A).

|δ| is non-negative, so its float32 bit pattern (as uint32) orders exactly like its value.
Pass 1 histograms the high 16 bits; the bin holding the k-th largest is found from the
top; pass 2 histograms the low 16 bits of the elements in that bin. Two passes give the
exact threshold. Histograms are plain counts, so they add across chunks, threads and
tensors: ``trim_scope: model`` sums pass-1 histograms over all tensors, then pass-2.
Small tensors skip the histograms: :func:`select_from_keys` selects from the bit patterns.

A backend supplies ``hist(prefix)``: with ``prefix=None`` a (n, 65536) int64 array of
high-16 counts per model; with ``prefix`` (uint32[n]) the low-16 counts of the elements
whose high 16 bits equal ``prefix[i]``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE


def _locate(counts: np.ndarray, k: int) -> tuple[int, int]:
    """Bin b (from the top) holding the k-th largest, and how many of it are still needed."""
    above = np.cumsum(counts[::-1])  # above[t] = count of bins >= 65535 - t
    t = int(np.searchsorted(above, k))  # first t with above[t] >= k
    b = counts.shape[0] - 1 - t
    before = int(above[t - 1]) if t > 0 else 0
    return b, k - before


def select_thresholds(hist: Callable[[Optional[np.ndarray]], np.ndarray], ks: Sequence[Optional[int]],
                      total: int) -> np.ndarray:
    """Trim thresholds (uint64[n] bit patterns, keep iff bits(|δ|) >= value) for k-values ``ks``.

    ``ks[i] is None`` means model i is not trimmed; k = 0 keeps nothing; k >= total gives the
    smallest |δ| (which keeps everything).
    """
    n = len(ks)
    out = np.full(n, TRIM_KEEP_ALL, dtype=np.uint64)
    ks = [None if k is None else min(int(k), total) for k in ks]  # k = n: the smallest |δ|
    active = [i for i, k in enumerate(ks) if k is not None and k > 0]
    for i, k in enumerate(ks):
        if k is not None and k <= 0:
            out[i] = TRIM_KEEP_NONE
    if not active:
        return out
    h1 = hist(None)
    prefix = np.zeros(n, dtype=np.uint32)
    need = {}
    for i in active:
        b, rem = _locate(h1[i], ks[i])
        prefix[i] = b
        need[i] = rem
    h2 = hist(prefix)
    for i in active:
        lo, _ = _locate(h2[i], need[i])
        out[i] = (int(prefix[i]) << 16) | lo
    return out


def select_from_keys(keys: np.ndarray, ks: Sequence[Optional[int]], total: int) -> np.ndarray:
    """What :func:`select_thresholds` returns, from the keys themselves: ``keys`` is
    uint32[n, total], row i holding bits(|δ'_i|) of every element (the values the histograms
    count). The k-th largest comes from ``np.partition`` (an exact selection, no histogram), which
    is what small tensors want: two 65,536-bin passes cost far more than their few elements.
    """
    n = len(ks)
    out = np.full(n, TRIM_KEEP_ALL, dtype=np.uint64)
    for i, k in enumerate(ks):
        if k is None:
            continue
        k = min(int(k), total)  # k = n: the smallest |δ|
        if k <= 0:
            out[i] = TRIM_KEEP_NONE
            continue
        out[i] = int(np.partition(keys[i], total - k)[total - k])
    return out


def bits_to_float(bits: int) -> float:
    """The float32 value of a threshold bit pattern (inf for 'keep none')."""
    if bits >= TRIM_KEEP_NONE:
        return float("inf")
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


__all__ = ["select_thresholds", "select_from_keys", "bits_to_float"]
