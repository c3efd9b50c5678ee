"""docs/KERNEL.md transcribed once, in float32 PyTorch operations, for the backends' tests.

Written from the document, not from any backend's code: every float operation of the per-element
program is one torch operation on float32 tensors (one IEEE rounding, never fused into an FMA),
in the document's order, so a backend's output must equal it bit for bit (NaN payloads aside).

* :func:`stage_b`: the per-element program on a ``KernelParams`` ``p``: the parameters a backend
  itself ran with, its stage A results (trim thresholds, L1 scales) included;
* :func:`stage_a`: ``make_params`` plus this module's own stage A (KERNEL.md "Stage A"): L1
  scales from float64 sums, exact trim thresholds from a full sort of the ``bits(|d|)``;
* :func:`f32_program`: both, i.e. the whole float32 merge of one tensor from a recipe;
* :func:`dropped_deltas`: ``b`` and the deltas after the DARE step and the keep mask (what stage
  A histograms);
* :func:`gram`: the float64 Gram matrices of stage A in the defined summation order;
* :func:`fma32`: ``fmaf`` (one rounding) from float64 with round-to-odd, for the ``fma`` piece.
"""

from __future__ import annotations

import numpy as np
import torch

from m3kernels.merge.kernel_params import (
    COMBINE_MEAN,
    COMBINE_NEARSWAP,
    COMBINE_RAM,
    COMBINE_SUM,
    GRAM_CHUNK,
    GRAM_LANES,
    GROUP_NONE,
    GROUP_ROW,
    TRIM_KEEP_NONE,
    TRIM_MAX_ALL,
    KernelParams,
    f32,
    make_params,
    trim_k,
)
from m3kernels.merge.philox import dare_keep_mask, dare_uniform_u32

F32, F64 = torch.float32, torch.float64


def _s(x) -> torch.Tensor:
    """A float32 scalar tensor (keeps torch's arithmetic in float32)."""
    return torch.tensor(float(x), dtype=F32)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``fmaf(a, b, c)``: one correctly rounded operation. ``a * b`` is exact in float64;
    ``a * b + c`` is taken with round-to-odd (TwoSum, then the last bit forced to 1 when inexact),
    whose rounding to float32 is the correctly rounded result (53 >= 2 · 24 + 2 bits)."""
    a, b, c = (torch.broadcast_to(t, torch.broadcast_shapes(a.shape, b.shape, c.shape)) for t in (a, b, c))
    p = (a.to(F64) * b.to(F64)).numpy()
    q = c.to(F64).numpy()
    with np.errstate(all="ignore"):
        s = p + q
        bb = s - p
        e = (p - (s - bb)) + (q - bb)
        bits = s.view(np.int64)
        fix = np.isfinite(s) & (e != 0) & ((bits & 1) == 0)
        odd = np.nextafter(s, np.where(e > 0, np.inf, -np.inf))
        s = np.where(fix, odd, s)
    return torch.from_numpy(s.astype(np.float32))


def mask_bits(p: KernelParams, i: int, numel: int, index_offset: int = 0) -> torch.Tensor:
    """Model i's keep-mask bits of flat indices index_offset .. index_offset + numel - 1 (bool)."""
    raw = np.asarray(p.keep_mask, dtype=np.uint8).reshape(-1)
    start = i * int(p.mask_stride)
    bits = np.unpackbits(raw[start:], bitorder="little")
    return torch.from_numpy(bits[index_offset : index_offset + numel].astype(bool))


def round_to(d: torch.Tensor, dtype) -> torch.Tensor:
    """d rounded to ``dtype`` (RNE, fp16 overflow to inf) and back to float32."""
    return d.to(dtype).to(F32)


def dropped_deltas(p: KernelParams, base, models, seed: int, name: str, index_offset: int = 0):
    """(b, [d_i]): ``b = f32(base)`` (0 without a base) and ``d_i = f32(x_i) - b`` after the DARE
    step (kept values times ``p.dare_scale[i]``, or with ``dare_div`` divided by ``p.dare_den[i]``
    and rounded to the model's dtype; dropped ones 0) and the keep mask (bit J = index_offset + j;
    kept values times ``p.mask_scale[i]``); no trim."""
    shape = models[0].shape
    zero = torch.zeros((), dtype=F32)
    b = base.to(F32) if p.has_base else torch.zeros(shape, dtype=F32)
    ds = []
    for i, x in enumerate(models):
        d = x.to(F32) - b
        if p.dare[i]:
            u = dare_uniform_u32(seed, name, i, d.numel())
            keep = torch.from_numpy(u < np.uint64(p.dare_thr[i])).reshape(shape)
            if p.dare_div:
                d = torch.where(keep, round_to(d / _s(p.dare_den[i]), x.dtype), zero)
            else:
                d = torch.where(keep, d * _s(p.dare_scale[i]), zero)
        if p.keep_mask is not None:
            bit = mask_bits(p, i, d.numel(), index_offset).reshape(shape)
            scale = 1.0 if p.mask_scale is None else p.mask_scale[i]
            d = torch.where(bit, d * _s(scale), zero)
        ds.append(d)
    return b, ds


def _sgn(x: torch.Tensor) -> torch.Tensor:
    """sgn(x) in float32: 1, -1 or 0 (NaN: 0)."""
    one = torch.ones((), dtype=F32)
    return torch.where(x > 0, one, torch.where(x < 0, -one, torch.zeros((), dtype=F32)))


def _ties(p: KernelParams, ds, shape) -> torch.Tensor:
    """Combine 2 with the round-2 variants (vote_kind, agree_w, ties_div, den_floor)."""
    zero = torch.zeros((), dtype=F32)
    vote = torch.zeros(shape, dtype=F32)
    for w, d in zip(p.vote_w, ds):
        vote = vote + (_sgn(_s(w) * d) if p.vote_kind == 1 else _s(w) * d)
    pos = vote >= 0
    aw = np.ones(p.n, np.float32) if p.agree_w is None else p.agree_w
    num = torch.zeros(shape, dtype=F32)
    if p.ties_div == 1:
        want = torch.where(pos, _s(1.0), _s(-1.0))
        cnt = torch.zeros(shape, dtype=F32)
        for c, a, d in zip(p.coef, aw, ds):
            one = (_sgn(_s(a) * d) == want).to(F32)
            num = num + (_s(c) * d) * one
            cnt = cnt + one
        return num / torch.where(cnt < 1, _s(1.0), cnt)
    den = torch.zeros(shape, dtype=F32)
    for c, a, d in zip(p.coef, aw, ds):
        e = _s(a) * d
        agree = (e != 0) & ((e > 0) == pos)
        num = torch.where(agree, num + _s(c) * d, num)
        den = torch.where(agree, den + _s(c), den)
    if not p.normalize:
        return num
    if p.den_floor > 0:
        fl = _s(p.den_floor)
        return num / torch.where(den < fl, fl, den)
    return torch.where(den != 0, num / torch.where(den != 0, den, _s(1.0)), zero)


def _abs_bits(d: torch.Tensor) -> torch.Tensor:
    """bits(|d|): the uint32 pattern of fabsf, as int64."""
    return d.abs().contiguous().view(torch.int32).to(torch.int64)


def _tie_rule(p: KernelParams, i: int) -> bool:
    keep = p.tie_keep is not None and int(p.tie_keep[i]) >= 0
    skip = p.tie_skip is not None and int(p.tie_skip[i]) > 0
    return keep or skip


def _exact_ties(p: KernelParams, i: int, d: torch.Tensor, tmin: int, tmax: int) -> torch.Tensor:
    """KERNEL.md "Exact-k ties": keys equal to a threshold decided by their tie index t (the
    number of earlier elements, flat order, with the same key)."""
    key = _abs_bits(d).reshape(-1)
    keep = int(p.tie_keep[i]) if p.tie_keep is not None else -1
    skip = int(p.tie_skip[i]) if p.tie_skip is not None else 0

    def tie_index(eq):
        c = torch.cumsum(eq.to(torch.int64), 0)
        return c - eq.to(torch.int64)

    eq_min, eq_max = key == tmin, key == tmax
    lo = (key > tmin) | ((eq_min & (tie_index(eq_min) < keep)) if keep >= 0 else eq_min)
    hi = (key < tmax) | (eq_max & (tie_index(eq_max) >= skip))
    return torch.where((lo & hi).reshape(d.shape), d, torch.zeros((), dtype=F32))


def stage_b(
    p: KernelParams, base, models, out_dtype, seed: int, name: str, index_offset: int = 0
) -> torch.Tensor:
    """The float32 program of docs/KERNEL.md on parameters ``p`` (``seed``, ``name``: the DARE
    stream's), rounded to ``out_dtype``. ``index_offset``: the flat index of the first element
    (the coefficient groups' and the keep mask's; the DARE stream here always starts at 0, so use
    it without DARE)."""
    shape = models[0].shape
    zero = torch.zeros((), dtype=F32)
    b, ds = dropped_deltas(p, base, models, seed, name, index_offset)
    for i, d in enumerate(ds):
        tmin = 0 if p.trim_min is None else int(p.trim_min[i])
        tmax = TRIM_MAX_ALL if p.trim_max is None else int(p.trim_max[i])
        if _tie_rule(p, i):
            ds[i] = _exact_ties(p, i, d, tmin, tmax)
            continue
        if tmin:  # 0 keeps all; TRIM_KEEP_NONE (2**32) keeps nothing
            ds[i] = torch.where(_abs_bits(d) >= tmin, d, zero)
        ds[i] = torch.where(_abs_bits(ds[i]) <= tmax, ds[i], zero)  # the window's upper end
    if p.combine == COMBINE_NEARSWAP:
        a, x = b, models[0].to(F32)
        dist = (a - x).abs()
        dist = torch.where(dist < _s(1e-6), _s(1e-6), dist)  # max(dist, 1e-6f), NaN kept
        w = (_s(1.0) / dist) * _s(p.clip_t)  # torch's t / dist (mergekit): f32(1 / dist) * t
        w = torch.where(w < 0, _s(0.0), w)  # max(w, 0)
        w = torch.where(w > 1, _s(1.0), w)  # min(w, 1)
        return (w * x + (_s(1.0) - w) * a).to(out_dtype)
    if p.combine == COMBINE_RAM:
        eps = _s(p.ram_eps)
        c = torch.zeros(shape, dtype=F32)
        for d in ds:
            c = c + (d.abs() > eps).to(F32)
        m = torch.zeros(shape, dtype=F32)
        us = np.ones(p.n, np.float32) if p.unique_scale is None else p.unique_scale
        for d, u in zip(ds, us):
            t = torch.where(c == 1, d * _s(u), d / c)
            m = torch.where(d.abs() > eps, m + t, m)
        return (b + _s(p.lam) * m).to(out_dtype)
    if p.coef_group != GROUP_NONE and p.combine in (COMBINE_SUM, COMBINE_MEAN):
        flat = torch.arange(index_offset, index_offset + b.numel(), dtype=torch.int64).reshape(shape)
        g = flat // p.row_len if p.coef_group == GROUP_ROW else flat % p.row_len
        table = torch.from_numpy(np.asarray(p.group_coef, np.float32).reshape(-1, p.n))
        m = torch.zeros(shape, dtype=F32)
        for i, d in enumerate(ds):
            m = fma32(table[:, i][g], d, m) if p.fma else m + table[:, i][g] * d
        if p.combine == COMBINE_MEAN:
            m = m / _s(p.mean_den)
    elif p.combine == 2:
        m = _ties(p, ds, shape)
    else:
        m = torch.zeros(shape, dtype=F32)
        for c, d in zip(p.coef, ds):
            m = fma32(_s(c), d, m) if p.fma else m + _s(c) * d
        if p.combine == 1:
            m = m / _s(p.mean_den)
    return (b + _s(p.lam) * m).to(out_dtype)


def stage_a(base, models, recipe, name: str) -> KernelParams:
    """``make_params`` with this module's own stage A: for ``rescale: l1`` each DARE scale is
    ``f32(total / kept)`` (1 when kept = 0) from float64 sums of the raw ``|d_i|``; for the
    magnitude trim each threshold is the k-th largest ``bits(|d_i|)`` after the DARE step, by a
    full sort (k = 0: keep nothing)."""
    p = make_params(recipe, name, base is not None)
    numel = models[0].numel()
    if recipe.dare_density is not None and recipe.rescale == "l1":
        b = base.to(F32) if p.has_base else torch.zeros(models[0].shape, dtype=F32)
        scales = [float(s) for s in p.dare_scale]
        for i, dens in enumerate(recipe.dare_density):
            keep = dare_keep_mask(recipe.seed, name, i, (numel,), dens)
            mag = (models[i].reshape(-1).to(F32) - b.reshape(-1)).abs().to(F64)
            total, kept = float(mag.sum()), float(mag[keep].sum())
            scales[i] = f32(total / kept) if kept > 0 else 1.0
        p = p.with_dare_scale(scales)
    if recipe.trim_density is not None:
        _, ds = dropped_deltas(p, base, models, recipe.seed, name)
        thresholds = []
        for i, dens in enumerate(recipe.trim_density):
            k = trim_k(dens, numel)
            bits = _abs_bits(ds[i]).reshape(-1)
            thresholds.append(
                TRIM_KEEP_NONE if k <= 0 else int(torch.sort(bits, descending=True).values[min(k, numel) - 1])
            )
        p = p.with_trim(thresholds)
    return p


def _ordered_sum(prods: np.ndarray) -> np.ndarray:
    """float64 sums of the rows of ``prods`` (float64[S, L], S sequences of L positions) in
    KERNEL.md's order: chunks of GRAM_CHUNK positions, position q into lane q mod GRAM_LANES (each
    lane summed in position order from +0.0), a chunk's lanes added in lane order, the chunks in
    chunk order. ``np.cumsum`` adds sequentially (``np.sum`` would add pairwise)."""
    s, length = prods.shape
    nchunks = max(1, -(-length // GRAM_CHUNK))
    per_chunk = GRAM_CHUNK if nchunks > 1 else max(1, -(-length // GRAM_LANES)) * GRAM_LANES
    pad = np.zeros((s, nchunks * per_chunk), np.float64)
    pad[:, :length] = prods  # trailing +0.0 leave every sum unchanged
    lanes = pad.reshape(s, nchunks, per_chunk // GRAM_LANES, GRAM_LANES)
    zero = np.zeros((s, nchunks, 1, GRAM_LANES))
    lane_sums = np.cumsum(np.concatenate([zero, lanes], axis=2), axis=2)[:, :, -1, :]
    chunk = np.cumsum(np.concatenate([np.zeros((s, nchunks, 1)), lane_sums], axis=2), axis=2)[:, :, -1]
    return np.cumsum(np.concatenate([np.zeros((s, 1)), chunk], axis=1), axis=1)[:, -1]


def gram(p: KernelParams, base, models) -> np.ndarray:
    """float64[groups, n, n]: KERNEL.md's Gram matrices of ``v_i = f32(x_i) - b`` (float32, no
    DARE, no trim), per tensor / row / column (``p.coef_group``), in the defined summation order."""
    b = base.reshape(-1).to(F32) if p.has_base else torch.zeros(models[0].numel(), dtype=F32)
    vs = [(x.reshape(-1).to(F32) - b).to(F64).numpy() for x in models]
    numel, n = b.numel(), p.n
    if p.coef_group == GROUP_NONE:
        seqs = [v.reshape(1, numel) for v in vs]
    else:
        rows = [v.reshape(numel // p.row_len, p.row_len) for v in vs]
        seqs = rows if p.coef_group == GROUP_ROW else [np.ascontiguousarray(r.T) for r in rows]
    out = np.zeros((seqs[0].shape[0], n, n), np.float64)
    for i in range(n):
        for k in range(i, n):
            out[:, i, k] = out[:, k, i] = _ordered_sum(seqs[i] * seqs[k])
    return out


def ram_counts(p: KernelParams, base, models, seed: int = 0, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(shared, unique) int64[n]: per model, #elements with |d_i| > ram_eps where c > 1 / c == 1
    (d after the DARE step and the trim window, c as in combine 4)."""
    zero = torch.zeros((), dtype=F32)
    _, ds = dropped_deltas(p, base, models, seed, name)
    for i, d in enumerate(ds):
        tmin = 0 if p.trim_min is None else int(p.trim_min[i])
        tmax = TRIM_MAX_ALL if p.trim_max is None else int(p.trim_max[i])
        ds[i] = torch.where((_abs_bits(d) >= tmin) & (_abs_bits(d) <= tmax), d, zero)
    masks = [d.abs() > _s(p.ram_eps) for d in ds]
    c = sum(mk.to(torch.int64) for mk in masks)
    shared = np.array([int((mk & (c > 1)).sum()) for mk in masks], np.int64)
    unique = np.array([int((mk & (c == 1)).sum()) for mk in masks], np.int64)
    return shared, unique


def f32_program(base, models, recipe, name: str, out_dtype) -> torch.Tensor:
    """The whole float32 merge of one tensor: :func:`stage_a`, then :func:`stage_b`."""
    return stage_b(stage_a(base, models, recipe, name), base, models, out_dtype, recipe.seed, name)


__all__ = ["dropped_deltas", "stage_b", "stage_a", "f32_program", "gram", "ram_counts", "fma32", "mask_bits"]
