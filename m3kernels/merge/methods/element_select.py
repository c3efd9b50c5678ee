"""Exact order statistics of a per-element float32 statistic, and the packed keep mask they give.

Stage A of ``sce`` (the variance of the task vectors) and ``arcee_fusion`` (the importance) ends
in the same two steps over a float32 array ``v`` of one value per element (the one tensor-sized
temporary those hooks keep): find exact order statistics of ``v``, then turn a per-element keep
decision into the bitmask stage B reads (docs/KERNEL.md V6: bit J of byte J >> 3, LSB first, i.e.
``np.packbits(bitorder="little")``; numel / 8 bytes).

Order: :func:`order_keys` maps each float32 to a uint32 whose unsigned order is the value order
(-0 counts as +0; every NaN is one key above +inf, as torch's sort and topk place NaN last /
first). The k-th largest key is found by the radix select of :mod:`m3kernels.merge.select` (two
65,536-bin histogram passes over the keys, chunked; a direct ``np.partition`` below
:data:`SMALL`), with ``need``, how many of the keys equal to it lie within the top k. The exact-k
tie rule keeps, among the keys equal to the k-th largest, the ``need`` with the lowest flat index
(key descending, flat index ascending): deterministic on every backend and thread count.
"""

from __future__ import annotations

import numpy as np

from m3kernels.merge import select
from m3kernels.merge.kernel_params import HIST_BINS

CHUNK = 1 << 20  # elements per chunk of every pass here (a multiple of 8: masks pack per chunk)
SMALL = 1 << 16  # up to this many elements: np.partition instead of the histograms
NAN_KEY = np.uint32(0xFFC00000)  # the key of every NaN: above +inf's 0xFF800000
_SIGN = np.uint32(0x80000000)


def order_keys(v: np.ndarray) -> np.ndarray:
    """uint32 keys of a float32 array, ordered as the values (-0 = +0, NaN above +inf); computed
    in chunks, so the keys are the only array of the input's size it allocates."""
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    keys = np.empty(v.size, dtype=np.uint32)
    for s in range(0, v.size, CHUNK):
        c = v[s : s + CHUNK]
        u = c.view(np.uint32)
        k = np.where(u >= _SIGN, ~u, u | _SIGN)
        k[u == _SIGN] = _SIGN  # -0 -> the key of +0
        k[np.isnan(c)] = NAN_KEY
        keys[s : s + CHUNK] = k
    return keys


def key_value(key: int) -> np.float32:
    """The float32 value of a key of :func:`order_keys` (NaN for the NaN key)."""
    k = np.uint32(key)
    u = (k & ~_SIGN) if k >= _SIGN else ~k
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def _hist(keys: np.ndarray, prefix) -> np.ndarray:
    """select.py's histogram over one row of keys: high 16 bits, or the low 16 of bucket prefix."""
    out = np.zeros((1, HIST_BINS), dtype=np.int64)
    for s in range(0, keys.size, CHUNK):
        c = keys[s : s + CHUNK]
        if prefix is None:
            out[0] += np.bincount(c >> 16, minlength=HIST_BINS)
        else:
            sel = c[(c >> 16) == np.uint32(prefix[0])]
            out[0] += np.bincount(sel & 0xFFFF, minlength=HIST_BINS)
    return out


def kth_largest(keys: np.ndarray, ks) -> list[tuple[int, int]]:
    """For each k (1 <= k <= keys.size) the k-th largest key and ``need`` (k − #keys greater)."""
    n = keys.size
    if n <= SMALL:
        part = np.sort(keys)  # ascending; small
        out = []
        for k in ks:
            v = int(part[n - k])
            greater = n - int(np.searchsorted(part, np.uint32(v), side="right"))
            out.append((v, k - greater))
        return out
    (row,) = select.select_thresholds_ties(lambda prefix: _hist(keys, prefix), [tuple(ks)], n)
    return [(int(v), int(need)) for v, need in row]


def pack(keep: np.ndarray) -> np.ndarray:
    """Pack a bool array (flat order) into the LSB-first bitmask of docs/KERNEL.md V6."""
    return np.packbits(np.asarray(keep, dtype=bool).reshape(-1), bitorder="little")


def top_k_mask(keys: np.ndarray, k: int) -> np.ndarray:
    """The packed mask of exactly the k largest keys (ties: lowest flat index first)."""
    n = keys.size
    if k <= 0:
        return np.zeros((n + 7) // 8, dtype=np.uint8)
    if k >= n:
        return pack(np.ones(n, dtype=bool))
    ((thr, need),) = kth_largest(keys, [k])
    t = np.uint32(thr)
    parts, seen = [], 0
    for s in range(0, n, CHUNK):
        c = keys[s : s + CHUNK]
        eq = c == t
        rank = np.cumsum(eq, dtype=np.int64) - 1 + seen  # tie index of each equal key
        seen += int(eq.sum())
        parts.append(pack((c > t) | (eq & (rank < need))))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def mask_bits(mask: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The keep bits of flat indices start .. stop − 1 as bools (start a multiple of 8)."""
    return np.unpackbits(mask[start // 8 : (stop + 7) // 8], bitorder="little")[: stop - start].astype(bool)


__all__ = ["order_keys", "key_value", "kth_largest", "top_k_mask", "pack", "mask_bits", "CHUNK"]
