"""Exact k-th largest |δ| by radix select over float32 bit patterns (docs/SPEC.md §5, stage A).

|δ| is non-negative, so its float32 bit pattern (as uint32) orders exactly like its value.
Pass 1 histograms the high 16 bits; the bin holding the k-th largest is found from the
top; pass 2 histograms the low 16 bits of the elements in that bin. Two passes give the
exact threshold. Histograms are plain counts, so they add across chunks, threads and
tensors: ``trim_scope: model`` sums pass-1 histograms over all tensors, then pass-2.
Small tensors skip the histograms: :func:`select_from_keys` selects from the bit patterns.
:func:`select_thresholds_multi` (and :func:`select_from_keys_multi`) give several k-th largest
per model (a window of ranks) from the same passes.

A backend supplies ``hist(prefix)``: with ``prefix=None`` a (n, 65536) int64 array of
high-16 counts per model; with ``prefix`` (uint32[n]) the low-16 counts of the elements
whose high 16 bits equal ``prefix[i]``.

:func:`select_thresholds_single_pass` gives the same thresholds from one full pass where the
backend can count a *bracket* (the CPU backend's ``sample_keys`` and ``bracket_count``): a
strided sample of the keys brackets the few high-16 buckets that hold the k-th largest, then one
pass counts, per model, the elements above the bracket and the low-16 histogram of each
bracketed bucket. That locates the k-th largest exactly whenever it lies inside the bracket,
which the counts themselves prove; when it does not (an unlucky sample, or a sample too spread
out to bracket few buckets), the two histogram passes above run for that model. The sample only
decides how fast the answer comes, never what it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE


def _locate(counts: np.ndarray, k: int) -> tuple[int, int]:
    """Bin b (from the top) holding the k-th largest, and how many of it are still needed."""
    above = np.cumsum(counts[::-1])  # above[t] = count of bins >= 65535 - t
    t = int(np.searchsorted(above, k))  # first t with above[t] >= k
    b = counts.shape[0] - 1 - t
    before = int(above[t - 1]) if t > 0 else 0
    return b, k - before


def select_thresholds(
    hist: Callable[[np.ndarray | None], np.ndarray], ks: Sequence[int | None], total: int
) -> np.ndarray:
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


SAMPLE_RUNS = 1024  # runs of 64 elements in the sample: 65,536 keys per model
SAMPLE_SIGMAS = 8.0  # the bucket range: the sample rank of the k-th largest +- this many binomial
SAMPLE_SLACK = 16  # standard deviations, + this many sample elements
MAX_RANGE = 8192  # at most this many high-16 buckets counted per model ...
FINE_BUCKETS = 4  # ... and this many of them also by their low 16 bits (the kernels' limit)
NO_BUCKET = 0xFFFF  # a high-16 prefix no bits(|x|) < 2^31 has (a model pass 2 skips)


def sample_runs(numel: int) -> int:
    """Runs of 64 elements the sample of a tensor of ``numel`` elements takes (numel >= 64 * runs)."""
    return min(SAMPLE_RUNS, numel // 64)


def bracket(sample: np.ndarray, k: int, total: int) -> tuple[int, int, list] | None:
    """Where the k-th largest of ``total`` keys should be, judged from ``sample`` (uint32 keys drawn
    from them): ``(lo, span, fine)``, the high-16 buckets lo .. lo + span - 1 that should hold it
    and up to FINE_BUCKETS of them, the likeliest, whose low 16 bits are worth counting. None when
    the range would exceed MAX_RANGE buckets. Only a guess: :func:`select_thresholds_single_pass`
    checks it against the counts."""
    s = int(sample.size)
    if s == 0 or not 0 < k <= total:
        return None
    q = k / total
    r = q * s  # expected number of sample keys >= the k-th largest
    sd = math.sqrt(s * q * (1.0 - q))
    m = SAMPLE_SIGMAS * sd + SAMPLE_SLACK
    hi_rank = math.floor(r - m)  # descending 1-based sample ranks: an upper bound of the k-th largest ...
    lo_rank = math.ceil(r + m)  # ... and a lower bound
    hi_rank, lo_rank = max(hi_rank, 1), min(lo_rank, s)  # beyond the sample: its largest / smallest
    w = 3.0 * (sd + 1.0) + 2.0  # the likeliest sample ranks: r +- w
    top, bot = max(math.floor(r - w), 1), min(math.ceil(r + w), s)
    part = np.partition(sample, sorted({s - hi_rank, s - lo_rank, s - bot, s - top}))  # ascending positions
    upper = int(part[s - hi_rank]) >> 16
    lower = int(part[s - lo_rank]) >> 16
    if upper - lower + 1 > MAX_RANGE:
        return None
    # the fine buckets: those of the sample keys ranked top .. bot, nearest to rank r first
    window = np.sort(part[s - bot : s - top + 1])[::-1] >> 16  # descending: ranks top, top + 1, ..
    dist = np.abs(np.arange(top, top + window.size, dtype=np.float64) - r)
    nearest = {}
    for b, dd in zip(window.tolist(), dist.tolist()):
        if lower <= b <= upper and dd < nearest.get(b, math.inf):
            nearest[b] = dd
    fine = sorted(nearest, key=lambda b: (nearest[b], b))[:FINE_BUCKETS]
    return lower, upper - lower + 1, fine


# Per model: selections made, those that needed a second pass over the inputs (the k-th largest
# in a bucket of the range without its low-16 counts), and those that needed two (outside the range).
SINGLE_PASS_STATS = {"selections": 0, "second_pass": 0, "two_passes": 0}


def select_thresholds_single_pass(
    sample: Callable[[], np.ndarray], count: Callable, hist: Callable, ks: Sequence[int | None], total: int
) -> np.ndarray:
    """What :func:`select_thresholds` returns (bit for bit), in one full pass where possible.

    ``sample()``: uint32[n, s] keys drawn from each model's ``total`` keys (any keys: they only
    place the bracket). ``count(lo, span, fine)`` (uint32[n], uint32[n], a list of up to
    FINE_BUCKETS buckets per model; span[i] = 0 skips model i) returns ``(above, range, fine)``:
    above[i] = how many keys are >= (lo[i] + span[i]) << 16, range[i] = int64[span[i]] the counts
    of the high-16 buckets lo[i] .. lo[i] + span[i] - 1, fine[i][j] = int64[65536] the low-16
    counts of bucket fine[i][j]. ``hist``: as for :func:`select_thresholds`; its pass 2 runs for
    a model whose k-th largest falls in a range bucket without fine counts, both passes for one
    whose k-th largest lies outside the range (or whose sample gave none).
    """
    n = len(ks)
    out = np.full(n, TRIM_KEEP_ALL, dtype=np.uint64)
    ks = [None if k is None else min(int(k), total) for k in ks]
    active = [i for i, k in enumerate(ks) if k is not None and k > 0]
    for i, k in enumerate(ks):
        if k is not None and k <= 0:
            out[i] = TRIM_KEEP_NONE
    if not active:
        return out
    keys = sample()
    lo = np.zeros(n, dtype=np.uint32)
    span = np.zeros(n, dtype=np.uint32)
    fine_buckets = [[] for _ in range(n)]
    for i in active:
        br = bracket(keys[i], ks[i], total)
        if br is not None:
            lo[i], span[i], fine_buckets[i] = br
    missed = [i for i in active if span[i] == 0]
    prefix = np.full(n, NO_BUCKET, dtype=np.uint32)
    need2 = {}
    if span.any():
        above, ranges, fine = count(lo, span, fine_buckets)
        for i in active:
            if span[i] == 0:
                continue
            row = np.asarray(ranges[i], dtype=np.int64)
            need = ks[i] - int(above[i])
            if need <= 0 or int(row.sum()) < need:  # the k-th largest is above / below the range
                missed.append(i)
                continue
            b, rem = _locate(row, need)
            b += int(lo[i])
            if b in fine_buckets[i]:
                low, _ = _locate(np.asarray(fine[i][fine_buckets[i].index(b)], dtype=np.int64), rem)
                out[i] = (b << 16) | low
            else:
                prefix[i] = b
                need2[i] = rem
    if need2:
        h2 = hist(prefix)
        for i, rem in need2.items():
            low, _ = _locate(h2[i], rem)
            out[i] = (int(prefix[i]) << 16) | low
    if missed:
        again = select_thresholds(hist, [ks[i] if i in missed else None for i in range(n)], total)
        for i in missed:
            out[i] = again[i]
    SINGLE_PASS_STATS["selections"] += len(active)
    SINGLE_PASS_STATS["second_pass"] += len(need2)
    SINGLE_PASS_STATS["two_passes"] += len(missed)
    return out


def _k_value(k: int | None, total: int) -> int | None:
    """k clamped as select_thresholds does (None: no trim; <= 0: keep nothing)."""
    return None if k is None else min(int(k), total)


def select_thresholds_multi(
    hist: Callable[[np.ndarray | None], np.ndarray], ks_per_model: Sequence[Sequence[int | None]], total: int
) -> list[tuple[int, ...]]:
    """The exact k-th largest bit pattern for **several k per model** (the two ends of a window of
    ranks, for breadcrumbs): ``ks_per_model[i]`` is a tuple of ks for model i; the result is, per
    model, the tuple of :func:`select_thresholds` values for those ks (k >= total: the smallest;
    k <= 0: TRIM_KEEP_NONE; None: TRIM_KEEP_ALL). One high-16 pass serves every k; the low-16
    pass runs once per distinct high-16 bucket a model needs, models side by side: as many
    ``hist(prefix)`` calls as the most distinct buckets one model needs (usually 1 or 2; a model
    with fewer gets the prefix NO_BUCKET, which no key has).
    """
    return [tuple(v for v, _ in row) for row in select_thresholds_ties(hist, ks_per_model, total)]


def select_thresholds_ties(
    hist: Callable[[np.ndarray | None], np.ndarray], ks_per_model: Sequence[Sequence[int | None]], total: int
) -> list[tuple[tuple[int, int], ...]]:
    """:func:`select_thresholds_multi` with, for each k, how many of the keys equal to the k-th
    largest lie within the top k (``need`` = k - #keys greater; 0 for k <= 0 or None): per model a
    tuple of ``(value, need)``. The exact-k tie rule keeps the first ``need`` of them in flat order."""
    n = len(ks_per_model)
    ks = [[_k_value(k, total) for k in row] for row in ks_per_model]
    out = [[TRIM_KEEP_ALL if k is None else (TRIM_KEEP_NONE if k <= 0 else None) for k in row] for row in ks]
    need = [[0 for _ in row] for row in ks]
    if not any(k is not None and k > 0 for row in ks for k in row):
        return [tuple((int(v), 0) for v in row) for row in out]
    h1 = hist(None)
    # per model: bucket -> [(position in the tuple, rank still needed inside the bucket)]
    wants = [dict() for _ in range(n)]
    for i, row in enumerate(ks):
        for j, k in enumerate(row):
            if k is not None and k > 0:
                b, rem = _locate(h1[i], k)
                wants[i].setdefault(b, []).append((j, rem))
    buckets = [sorted(w) for w in wants]
    for r in range(max(len(b) for b in buckets)):
        prefix = np.full(n, NO_BUCKET, dtype=np.uint32)
        for i, b in enumerate(buckets):
            if r < len(b):
                prefix[i] = b[r]
        h2 = hist(prefix)
        for i, b in enumerate(buckets):
            if r < len(b):
                for j, rem in wants[i][b[r]]:
                    low, rem2 = _locate(h2[i], rem)
                    out[i][j] = (b[r] << 16) | low
                    need[i][j] = rem2
    return [tuple((int(v), int(e)) for v, e in zip(row, nrow)) for row, nrow in zip(out, need)]


def select_from_keys_multi(
    keys: np.ndarray, ks_per_model: Sequence[Sequence[int | None]], total: int
) -> list[tuple[int, ...]]:
    """What :func:`select_thresholds_multi` returns, from the keys themselves (uint32[n, total],
    as for :func:`select_from_keys`): one ``np.partition`` per model for all its ks."""
    out = []
    for i, row in enumerate(ks_per_model):
        ks = [_k_value(k, total) for k in row]
        pos = sorted({total - k for k in ks if k is not None and k > 0})
        part = np.partition(keys[i], pos) if pos else None
        out.append(
            tuple(
                TRIM_KEEP_ALL if k is None else (TRIM_KEEP_NONE if k <= 0 else int(part[total - k]))
                for k in ks
            )
        )
    return out


def select_from_keys(keys: np.ndarray, ks: Sequence[int | None], total: int) -> np.ndarray:
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


__all__ = [
    "select_thresholds",
    "select_thresholds_single_pass",
    "select_from_keys",
    "select_thresholds_multi",
    "select_thresholds_ties",
    "select_from_keys_multi",
    "bits_to_float",
    "bracket",
    "sample_runs",
]
