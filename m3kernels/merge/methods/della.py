"""della, della_linear: DELLA's magnitude-ranked random drop (mergekit 0.1.5's ``della_magprune``).

Per model i with 0 < density d < 1 (docs/MERGEKIT_METHODS.md E1): the elements are ranked by
|δ_i| along dim 1 (a 2-D [R, C] weight: within each row; a 1-D tensor is one row; a k-D tensor:
along its second dim for each index of the others), rank r = 0 for the smallest. Our tie rule:
ascending (bits(|δ|), flat index), i.e. equal magnitudes rank in index order. Element of rank r
in a line of C is kept with probability p_r = (d − ε) + 2ε·r/(C − 1) (float64, from the exact
integer rank; C = 1: p = d, where mergekit divides 0 by 0 and crashes), decided by the Philox
stream: keep iff philox_u32(seed, name, i, J) < ⌊p_r·2³²⌋ (docs/RANDOMNESS.md, "della"). With
``rescale`` (default true) the kept values are scaled by Σ|δ_i| / Σ|δ_i kept| over the tensor,
in float64 over the finite deltas, rounded to float32 (1 when either sum is below mergekit's
1e-7 guard). d >= 1: unchanged; d <= 0: nothing kept.

Stage A (here, on the host, one model at a time in chunks of whole dim-0 slabs, so the memory is
bounded by :data:`CHUNK` elements for any tensor whose slab fits) computes the keep bits into one
bitmask per model (``np.packbits`` little bit order, ``ceil(numel / 8)`` bytes each) and the L1
factors (each dim-0 slab's Σ|δ| summed in flat order, the slabs added in order: the same bits
on every path and thread count). When the CPU extension has it, ``m3kernels._C.della_stage_a``
(csrc/cpu/della_stage_a.cpp: OpenMP over slabs, a radix sort per line) does stage A chunk by
chunk; the NumPy / torch path stays as the fallback and the oracle (tests/test_della_stage_a.py).
Stage B is the fused kernel with ``keep_mask`` / ``mask_scale`` (docs/KERNEL.md), then
the TIES election (della) or the weighted sum (della_linear) as for the other task-vector methods.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from m3kernels.merge.finite import report_non_finite
from m3kernels.merge.kernel_params import f32, make_params
from m3kernels.merge.methods import Staged, require
from m3kernels.merge.philox import M32, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, dare_key

CHUNK = 1 << 20  # elements per stage-A chunk (whole dim-0 slabs; at least one slab)
WORKERS = 2  # stage-A chunks in flight (NumPy's Philox runs on one core; the sort on torch's threads)
L1_GUARD = 1e-7  # mergekit's rescale guard: no rescale when Σ|δ| or Σ|δ kept| is below it
TWO32 = 4294967296.0
FAST = True  # use the C++ stage A when the CPU extension has it (False: the NumPy path, the oracle)


def rank_layout(shape) -> tuple[int, int, int]:
    """(slabs, C, inner): the tensor as [slabs, C, inner] with the ranks along C (dim 1)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, shape[0], 1
    return shape[0], shape[1], math.prod(shape[2:])


def keep_thresholds(density: float, epsilon: float, length: int) -> np.ndarray:
    """uint64[length]: ⌊p_r·2³²⌋ for ranks r = 0 .. length − 1, p_r = (d − ε) + (2ε)·(r / (C − 1))
    in float64 (C = 1: p = d)."""
    if length == 1:
        return np.array([math.floor(float(density) * TWO32)], dtype=np.uint64)
    r = np.arange(length, dtype=np.float64)
    p = (float(density) - float(epsilon)) + (2.0 * float(epsilon)) * (r / float(length - 1))
    return np.floor(p * TWO32).astype(np.uint64)


def check_recipe(recipe) -> None:
    """mergekit's range check: for 0 < density < 1, density − epsilon > 0 and density + epsilon < 1
    (with |epsilon|: a negative epsilon, which lowers the probability with the rank as mergekit
    does, must keep both ends in (0, 1) too)."""
    for i, (d, e) in enumerate(zip(recipe.trim_density, recipe.get("epsilon"))):
        if 0.0 < d < 1.0 and not (d - abs(e) > 0.0 and d + abs(e) < 1.0):
            raise ValueError(
                f"epsilon: density - epsilon and density + epsilon must lie in (0, 1) for 0 < density < 1 "
                f"(method {recipe.method!r}), got density {d} and epsilon {e} for model {i}"
            )


def u32_range(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """uint64[count]: the Philox words of flat elements start .. start + count − 1 (docs/RANDOMNESS.md),
    the same words as :func:`m3kernels.merge.philox.philox4x32_10` computed with in-place NumPy
    operations (four times fewer temporaries)."""
    q0, q1 = start >> 2, (start + count - 1) >> 2
    n = q1 - q0 + 1
    q = np.arange(q0, q1 + 1, dtype=np.uint64)
    mask, s32 = np.uint64(M32), np.uint64(32)
    c0, c1 = q & mask, q >> s32
    c2, c3 = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    p0, p1 = np.empty(n, np.uint64), np.empty(n, np.uint64)
    k0, k1 = key[0] & M32, key[1] & M32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
        np.multiply(c0, np.uint64(PHILOX_M0), out=p0)
        np.multiply(c2, np.uint64(PHILOX_M1), out=p1)
        np.right_shift(p1, s32, out=c0)  # c0 = hi1 ^ c1 ^ k0 (c1, c3 still the old words)
        np.bitwise_xor(c0, c1, out=c0)
        np.bitwise_xor(c0, np.uint64(k0), out=c0)
        np.bitwise_and(p1, mask, out=c1)  # c1 = lo1
        np.right_shift(p0, s32, out=c2)  # c2 = hi0 ^ c3 ^ k1
        np.bitwise_xor(c2, c3, out=c2)
        np.bitwise_xor(c2, np.uint64(k1), out=c2)
        np.bitwise_and(p0, mask, out=c3)  # c3 = lo0
    out = np.empty((n, 4), np.uint64)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = c0, c1, c2, c3
    off = start - 4 * q0
    return out.reshape(-1)[off : off + count]


class _Packer:
    """Packs a stream of keep bits into ``out`` (little bit order), whatever the chunk sizes."""

    def __init__(self, out: np.ndarray):
        self.out, self.pos, self.pending = out, 0, np.zeros(0, dtype=bool)

    def add(self, bits: np.ndarray) -> None:
        if self.pending.size:
            bits = np.concatenate([self.pending, bits])
        full = bits.size // 8 * 8
        self.out[self.pos : self.pos + full // 8] = np.packbits(bits[:full], bitorder="little")
        self.pos += full // 8
        self.pending = bits[full:]

    def close(self) -> None:
        if self.pending.size:
            self.out[self.pos] = np.packbits(self.pending, bitorder="little")[0]
            self.pos += 1
            self.pending = np.zeros(0, dtype=bool)


def _host_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _chunk_delta(flat_x, flat_b, s: int, e: int) -> torch.Tensor:
    """float32 δ of flat elements s .. e − 1, as the kernel computes it (both paths share it, so
    even a NaN's bits, which rank it, are the same)."""
    return _host_f32(flat_x[s:e]) - _host_f32(flat_b[s:e])


def _slab_sums(a64: np.ndarray, keep: np.ndarray, slab: int) -> tuple[np.ndarray, np.ndarray, int]:
    """float64 per-slab (Σ|δ|, Σ|δ|·keep) over the finite deltas, each summed in flat order (the
    order the C++ stage A uses; ``np.cumsum`` is sequential), and the non-finite count."""
    finite = np.isfinite(a64)
    bad = 0
    if not finite.all():
        bad = int(a64.size - np.count_nonzero(finite))
        a64 = np.where(finite, a64, 0.0)
    a2 = a64.reshape(-1, slab)
    return (
        np.cumsum(a2, axis=1)[:, -1],
        np.cumsum(np.where(keep.reshape(a2.shape), a2, 0.0), axis=1)[:, -1],
        bad,
    )


def _chunk_keep(flat_x, flat_b, s: int, e: int, c: int, inner: int, thr, key) -> tuple:
    """The keep bits of flat elements s .. e − 1 (whole dim-0 slabs), their per-slab float64
    (Σ|δ|, Σ|δ|·keep) and non-finite count: the NumPy / torch path (the oracle of the C++ one)."""
    d32 = _chunk_delta(flat_x, flat_b, s, e).view(-1, c, inner)
    keys = d32.view(torch.int32) & 0x7FFFFFFF  # bits(|δ|): equal keys keep their index order
    perm = torch.sort(keys, dim=1, stable=True).indices
    u = torch.from_numpy(u32_range(key, s, e - s).astype(np.int64)).view(perm.shape)
    keep = torch.empty(perm.shape, dtype=torch.bool)
    keep.scatter_(1, perm, torch.gather(u, 1, perm) < thr)  # rank r's threshold at its element
    keep_np = keep.reshape(-1).numpy()
    a64 = np.abs(d32.reshape(-1).numpy().astype(np.float64))
    return (keep_np, *_slab_sums(a64, keep_np, c * inner))


def _ordered_sum(parts: list) -> float:
    """The per-slab sums added in slab order (sequentially), the same on every path and thread count."""
    v = np.concatenate(parts) if parts else np.zeros(0)
    return float(np.cumsum(v)[-1]) if v.size else 0.0


def _fast_stage_a():
    """The C++ stage A (``m3kernels._C.della_stage_a``) when the CPU extension has it, else None."""
    if not FAST:
        return None
    from m3kernels.backends import cpu

    return cpu.della_stage_a if cpu.has_della_stage_a() else None


def _model_keep_fast(fast, base, model, density, epsilon, key, out: np.ndarray) -> tuple[float, float, int]:
    """model_keep through the C++ stage A: chunks of whole slabs one after the other (each on the
    OpenMP threads), the keep bits ORed into ``out`` (zeroed here) at their flat offsets."""
    slabs, c, inner = rank_layout(model.shape)
    slab = c * inner
    rows = max(1, CHUNK // slab)
    thr = keep_thresholds(density, epsilon, c)
    flat_x, flat_b = model.reshape(-1), base.reshape(-1)
    out[:] = 0
    tots, kepts, bad = [], [], 0
    for a0 in range(0, slabs, rows):
        a1 = min(slabs, a0 + rows)
        d32 = _chunk_delta(flat_x, flat_b, a0 * slab, a1 * slab).contiguous().numpy()
        t, k, nb = fast(d32, a1 - a0, c, inner, a0 * slab, key, thr, out)
        tots.append(t)
        kepts.append(k)
        bad += nb
    return _ordered_sum(tots), _ordered_sum(kepts), bad


def model_keep(base, model, density, epsilon, key, out: np.ndarray) -> tuple[float, float, int]:
    """One model's keep bits packed into ``out`` (uint8[ceil(numel / 8)]), for 0 < density < 1;
    returns (Σ|δ|, Σ|δ|·keep, non-finite count), float64 over the finite deltas, each slab summed
    in flat order and the slabs added in order. The C++ stage A when the extension has it (see
    :func:`_fast_stage_a`), else chunks on :data:`WORKERS` threads, at most that many ahead; the
    same bits either way, whatever the threads."""
    slabs, c, inner = rank_layout(model.shape)
    slab = c * inner
    if slabs * slab == 0:
        return 0.0, 0.0, 0
    fast = _fast_stage_a()
    if fast is not None and c < (1 << 32):
        return _model_keep_fast(fast, base, model, density, epsilon, key, out)
    rows = max(1, CHUNK // slab)
    thr = torch.from_numpy(keep_thresholds(density, epsilon, c).astype(np.int64)).view(1, c, 1)
    flat_x, flat_b = model.reshape(-1), base.reshape(-1)
    bounds = [(a0 * slab, min(slabs, a0 + rows) * slab) for a0 in range(0, slabs, rows)]
    packer = _Packer(out)
    tots, kepts = [], []
    bad = 0
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending = deque()
        for s, e in bounds:
            pending.append(pool.submit(_chunk_keep, flat_x, flat_b, s, e, c, inner, thr, key))
            while len(pending) > WORKERS or (pending and s == bounds[-1][0]):
                keep_np, t, k, nb = pending.popleft().result()
                tots.append(t)
                kepts.append(k)
                bad += nb
                packer.add(keep_np)
    packer.close()
    return _ordered_sum(tots), _ordered_sum(kepts), bad


def keep_masks(base, models, recipe, name: str):
    """(keep_mask uint8[n · stride], stride, mask_scale float32[n]) for the tensor, or None when no
    model drops anything (every density >= 1)."""
    dens, eps = recipe.trim_density, recipe.get("epsilon")
    if all(d >= 1.0 for d in dens):
        return None
    numel = models[0].numel()
    stride = (numel + 7) // 8
    masks = np.zeros((len(models), stride), dtype=np.uint8)
    scale = np.ones(len(models), dtype=np.float32)
    bad = np.zeros(len(models), dtype=np.int64)
    for i, (m, d, e) in enumerate(zip(models, dens, eps)):
        if d >= 1.0:  # unchanged, unscaled (mergekit returns the delta as it is)
            masks[i] = 0xFF
            if numel % 8:
                masks[i, -1] = (1 << (numel % 8)) - 1
        elif d > 0.0:
            total, kept, bad[i] = model_keep(base, m, d, e, dare_key(recipe.seed, name, i), masks[i])
            if recipe.rescale == "l1" and total >= L1_GUARD and kept >= L1_GUARD:
                scale[i] = f32(total / kept)
    report_non_finite(name, bad)
    return masks.reshape(-1), stride, scale


def prepare(base, models, recipe, name: str, backend) -> Staged:
    p = make_params(recipe, name, True)
    if all(d >= 1.0 for d in recipe.trim_density):
        return Staged(p, base, models)  # nothing dropped: the plain TIES / sum program
    require(backend, recipe.method, "keep_mask")
    mask, stride, scale = keep_masks(base, models, recipe, name)
    return Staged(p.with_fields(keep_mask=mask, mask_stride=stride, mask_scale=scale), base, models)
