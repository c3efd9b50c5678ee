"""sce (Select, Calculate, Erase; mergekit 0.1.5's semantics, docs/MERGEKIT_METHODS.md D1).

With task vectors τ_i = f32(x_i) − f32(b) (float32):

* **Select** (``select_topk`` s < 1 only): σ²_j, the population variance of τ_0[j] .. τ_{N−1}[j]
  (float64 two-pass from the float32 τ, rounded to float32: torch's CPU ``var(unbiased=False)``
  bit for bit), nnz = #{σ²_j != 0} (NaN counts), k = ⌊f32(f32(nnz)·f32(s))⌋ (mergekit's float32
  product); s <= 0 or k = 0 keeps nothing; else exactly the k largest bits(|σ²|), ties by lowest
  flat index (mergekit's topk breaks ties in an unspecified order). One mask for every model.
* **Calculate**: w_i = mean_j (mask·τ_i)² over all n elements (float64 sums of the exact squares of
  the float32 τ, in fixed chunk order, rounded to float32; mergekit: a float32 mean), W = the
  float32 sum of the w_i in model order; |W| < 1e-6 → w_i = f32(1/N), else f32(w_i / W).
  Only finite τ count (a warning names the tensor); mergekit's weights would turn NaN.
* **Erase** and merge, stage B: the TIES combine with vote_w = 1 (the unweighted sign of Σ τ),
  agree_w = 1, coef = w_i, normalize, den_floor = f32(1e-6): y = b + Σ w_i e_i τ_i / max(Σ w_i e_i,
  1e-6), and the mask as one shared keep_mask (mask_stride 0).

Stage A: one pass for σ² (its uint32 order keys are the one tensor-sized temporary),
the radix select (:mod:`m3kernels.merge.methods.element_select`), one pass for the mask (n/8
bytes) and the sums of squares. On the CPU, from chunks of the inputs (GPU tensors are copied
chunk by chunk), so the statistics are the same bits whichever backend runs stage B.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from m3kernels.merge.kernel_params import COMBINE_TIES, f32
from m3kernels.merge.methods import Staged, plain_params, require
from m3kernels.merge.methods.element_select import mask_bits, order_keys, top_k_mask
from m3kernels.merge.recipe import float32_sum

log = logging.getLogger("m3kernels")
DEN_FLOOR = f32(1e-6)  # mergekit's clamp(min=1e-6) of the agreeing weights, as a float32
UNIFORM_BELOW = 1e-6  # mergekit: |Σ w_i| < 1e-6 -> uniform weights
# elements per chunk of the passes over the inputs: the float64 temporaries stay in the L2 cache,
# and torch converts chunks of at most 32,768 elements (its parallel grain) on one thread, so a
# busy machine does not pay a thread hand-off per chunk (10x slower at 65,536 on 2 loaded cores)
PASS_CHUNK = 1 << 15


def _flat32(t: torch.Tensor, s: int, e: int) -> np.ndarray:
    return t.detach().reshape(-1)[s:e].to("cpu", torch.float32).numpy()


def task_vectors(base, models, s: int, e: int) -> list[np.ndarray]:
    """τ_i of flat elements s .. e − 1, float32."""
    b = _flat32(base, s, e)
    return [_flat32(m, s, e) - b for m in models]


def variance(tv: list[np.ndarray]) -> np.ndarray:
    """σ² over the models (population), float64 two-pass in model order, rounded to float32."""
    n = len(tv)
    t64 = [d.astype(np.float64) for d in tv]
    acc = t64[0].copy()
    for t in t64[1:]:
        acc += t
    mean = acc / n
    m2 = np.square(t64[0] - mean)
    for t in t64[1:]:
        m2 += np.square(t - mean)
    return (m2 / n).astype(np.float32)


def select_k(nnz: int, select_topk: float) -> int:
    """mergekit's k = int(nnz · s), a float32 product (0.1.5: a tensor times a Python float)."""
    if select_topk <= 0:
        return 0
    return int(np.float32(np.float32(nnz) * np.float32(select_topk)))


def select_mask(base, models, select_topk: float) -> np.ndarray | None:
    """The packed keep mask of the variance select (None: s >= 1, no select)."""
    if select_topk >= 1:
        return None
    numel = models[0].numel()
    if select_topk <= 0:
        return np.zeros((numel + 7) // 8, dtype=np.uint8)
    keys = np.empty(numel, dtype=np.uint32)
    nnz = 0
    for s in range(0, numel, PASS_CHUNK):
        e = min(numel, s + PASS_CHUNK)
        var = variance(task_vectors(base, models, s, e))
        nnz += int(np.count_nonzero(var))
        keys[s:e] = order_keys(np.abs(var))
    return top_k_mask(keys, select_k(nnz, select_topk))


def weights(base, models, mask: np.ndarray | None, name: str = "") -> np.ndarray:
    """The Calculate step: float32 w_i from the mean squares of the (masked) task vectors."""
    n, numel = len(models), models[0].numel()
    sums = np.zeros(n)
    bad = np.zeros(n, dtype=np.int64)
    for s in range(0, numel, PASS_CHUNK):
        e = min(numel, s + PASS_CHUNK)
        keep = mask_bits(mask, s, e) if mask is not None else None
        for i, d in enumerate(task_vectors(base, models, s, e)):
            d64 = d.astype(np.float64)
            fin = np.isfinite(d64)
            if not fin.all():
                bad[i] += int(d64.size - np.count_nonzero(fin))
                d64 = np.where(fin, d64, 0.0)
            sq = np.square(d64)
            sums[i] += float(np.sum(sq if keep is None else np.where(keep, sq, 0.0)))
    if bad.any():
        log.warning(
            "sce: tensor %r has non-finite task-vector elements (%s); the weights are computed "
            "over the finite ones",
            name,
            ", ".join(f"model {i + 1}: {int(c):,}" for i, c in enumerate(bad) if c),
        )
    means = (sums / numel).astype(np.float32)
    total = float32_sum(means)
    if abs(total) < UNIFORM_BELOW:
        return np.full(n, np.float32(1.0) / np.float32(n), dtype=np.float32)
    return (means / np.float32(total)).astype(np.float32)


def prepare(base, models, recipe, name: str, backend) -> Staged:
    require(backend, recipe.method, "keep_mask", "den_floor")
    n = len(models)
    mask = select_mask(base, models, recipe.get("select_topk"))
    w = weights(base, models, mask, name)
    fields = dict(
        combine=COMBINE_TIES,
        normalize=True,
        vote_w=np.ones(n, np.float32),
        agree_w=np.ones(n, np.float32),
        coef=w,
        den_floor=DEN_FLOOR,
    )
    if mask is not None:
        fields.update(keep_mask=mask, mask_stride=0)
    return Staged(plain_params(recipe, name, n, True, **fields), base, models)
