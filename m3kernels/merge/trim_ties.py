"""``trim_ties: k``: exactly k kept at a magnitude trim, ties broken by the lowest flat index.

Stage A of the exact-k rule of docs/KERNEL.md ("Exact-k ties"; docs/MERGEKIT_METHODS.md B1) for
the top-k trim (ties, ties_dare) and breadcrumbs' window: each model's elements are ranked by
(bits(|δ'|) descending, flat index ascending), δ' the delta after the DARE step, and exactly the
ranks of the trim are kept. The thresholds are the exact order statistics as for ``trim_ties:
all``; for each one, how many of the keys equal to it lie inside the kept ranks (``need``) comes
from :func:`m3kernels.merge.select.select_thresholds_ties` (histograms) or, for a small tensor,
from its keys; the backend's ``tie_counts`` gives the per-block counts that become the kernels'
``tie_prefix_*``. The result is one fixed set of exactly k (T) elements per model, the same for
every backend, thread count and part split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3kernels.merge import select
from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE, TRIM_MAX_ALL, tie_prefixes

CHOICES = ("all", "k")


def exact(recipe) -> bool:
    """Whether ``recipe`` asks for the exact-k rule (``trim_ties: k``)."""
    return recipe.get("trim_ties", "all") == "k"


def _from_keys(keys: np.ndarray, ks_per_model, total: int) -> list:
    """What select_thresholds_ties returns, from the keys (uint32[n, total]) of a small tensor."""
    out = []
    for i, row in enumerate(ks_per_model):
        srt = None
        res = []
        for k in row:
            k = select._k_value(k, total)
            if k is None:
                res.append((TRIM_KEEP_ALL, 0))
            elif k <= 0:
                res.append((TRIM_KEEP_NONE, 0))
            else:
                if srt is None:
                    srt = np.sort(keys[i].astype(np.int64))[::-1]
                v = int(srt[k - 1])
                res.append((v, k - int(np.count_nonzero(srt > v))))
        out.append(tuple(res))
    return out


def thresholds(p, base, models, backend, ks_per_model: Sequence[Sequence[int | None]], numel: int) -> list:
    """Per model, ``(value, need)`` for each of its ks (k-th largest bits(|δ'|), and how many keys
    equal to it are within the top k); k None: (TRIM_KEEP_ALL, 0), k <= 0: (TRIM_KEEP_NONE, 0)."""
    from m3kernels.api import SMALL_TENSOR_NUMEL, small_tensor_keys

    keys = small_tensor_keys(p, base, models, backend) if numel <= SMALL_TENSOR_NUMEL else None
    if keys is not None:
        return _from_keys(keys, ks_per_model, numel)
    return select.select_thresholds_ties(
        lambda pre: backend.histogram(p, base, models, pre), ks_per_model, numel
    )


def _with_prefixes(p, base, models, backend, tmin, tmax, keep, skip):
    q = p.with_trim(np.asarray(tmin, np.uint64), np.asarray(tmax, np.uint64)).with_fields(
        tie_keep=keep, tie_skip=skip
    )
    cmin, cmax = backend.tie_counts(q, base, models)
    return q.with_fields(tie_prefix_min=tie_prefixes(cmin), tie_prefix_max=tie_prefixes(cmax))


def top_k_params(p, base, models, backend, ks: Sequence[int], numel: int):
    """KernelParams keeping exactly the ``ks[i]`` first elements of model i (top-k trim)."""
    res = thresholds(p, base, models, backend, [[k] for k in ks], numel)
    tmin = [v for ((v, _),) in res]
    keep = [need if v not in (TRIM_KEEP_ALL, TRIM_KEEP_NONE) else -1 for ((v, need),) in res]
    n = len(ks)
    return _with_prefixes(p, base, models, backend, tmin, [TRIM_MAX_ALL] * n, keep, [0] * n)


def window_params(p, base, models, backend, windows: Sequence[tuple[int, int] | None], numel: int):
    """KernelParams keeping exactly the ranks D .. D + T − 1 of model i (``windows[i]`` = (D, T);
    None: no trim; T = 0: nothing kept): breadcrumbs' window."""
    ks = []
    for w in windows:
        if w is None:
            ks.append([None])
        elif w[1] == 0:
            ks.append([0])
        else:
            d, t = w
            ks.append([d + t, d + 1] if d > 0 else [d + t])
    res = thresholds(p, base, models, backend, ks, numel)
    tmin, tmax, keep, skip = [], [], [], []
    for w, row in zip(windows, res):
        v, need = row[0]
        tmin.append(v)
        keep.append(need if v not in (TRIM_KEEP_ALL, TRIM_KEEP_NONE) else -1)
        if w is not None and w[1] > 0 and w[0] > 0:
            vmax, nmax = row[1]
            tmax.append(vmax)
            skip.append(nmax - 1)
        else:
            tmax.append(TRIM_MAX_ALL)
            skip.append(0)
    return _with_prefixes(p, base, models, backend, tmin, tmax, keep, skip)


__all__ = ["CHOICES", "exact", "thresholds", "top_k_params", "window_params"]
