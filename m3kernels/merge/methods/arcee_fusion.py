"""arcee_fusion (mergekit 0.1.5's semantics, docs/MERGEKIT_METHODS.md E2): the base plus the
model's delta where it is "important", y = b + (x − b)·[importance >= τ].

Stage A, all float32 as mergekit computes it with ``dtype: float32`` (torch on the CPU, so the
bits are torch's and the same whichever backend runs stage B):

* per row (the last dim; a 1-D tensor is one row): p = softmax(x) + 1e-8, q = softmax(b) + 1e-8,
  KL = Σ p·log(p / q) (torch's float32 softmax, log and row sum, rows in chunks: each row's value
  does not depend on the others);
* importance_j = |x_j − b_j|·KL_row(j) (float32; a tiny negative KL gives a negative importance);
* the quartiles Q25, Q50, Q75: the values at the ascending sorted positions ⌊q·(n − 1)⌋, exact
  (radix select, :mod:`m3kernels.merge.methods.element_select`). mergekit sorts all n values up to
  n = 10⁶ and, above, 10⁶ values drawn with replacement (unseeded torch.randint): ours stays exact
  for every n, so for n > 10⁶ our τ is the value mergekit's estimate scatters around;
* τ = f32(Q50 + f32(1.5·f32(Q75 − Q25))); the keep mask importance >= τ (NaN: not kept), packed.

Stage B: the SUM combine with the keep mask, coef 1, lam 1: y = b + d where kept, b + 0 elsewhere.
The importance (float32) and its order keys (uint32, for the select) are the two
tensor-sized temporaries; everything else is chunked.
"""

from __future__ import annotations

import numpy as np
import torch

from m3kernels.merge.methods import Staged, plain_params, require
from m3kernels.merge.methods.element_select import CHUNK, key_value, kth_largest, order_keys, pack

SOFTMAX_EPS = 1e-8  # mergekit adds it to both softmaxes
ROW_CHUNK = 1 << 20  # about this many elements per chunk of rows


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as [rows, last dim] on the CPU (a 0-d or 1-D tensor is one row)."""
    t = t.detach()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def row_kl(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) + ε ‖ softmax(b) + ε) per row of float32 [rows, C] tensors: [rows, 1]."""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(b, dim=-1) + SOFTMAX_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(base: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """|x − b|·KL_row, float32, flat (the tensor's element order)."""
    xr, br = _rows(model), _rows(base)
    rows, cols = xr.shape
    out = np.empty(rows * cols, dtype=np.float32)
    for r, e in row_chunks(rows, cols):
        x = xr[r:e].to("cpu", torch.float32)
        b = br[r:e].to("cpu", torch.float32)
        imp = (x - b).abs() * row_kl(x, b)
        out[r * cols : e * cols] = imp.reshape(-1).numpy()
    return out


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges of about ROW_CHUNK elements, **never one row alone** unless the tensor has one: torch
    reduces a single long row (one output) in a thread-split two-pass order, several rows each in
    its own serial order, so a one-row chunk of a many-row tensor would change that row's bits."""
    step = max(2, ROW_CHUNK // max(cols, 1))
    bounds = [[r, min(rows, r + step)] for r in range(0, rows, step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        last = bounds.pop()
        bounds[-1][1] = last[1]
    return [tuple(b) for b in bounds]


def quartile_positions(n: int) -> tuple[int, int, int]:
    """Ascending sorted positions ⌊q·(n − 1)⌋ for q = 0.25, 0.5, 0.75 (exact integers)."""
    m = n - 1
    return m // 4, m // 2, (3 * m) // 4


def threshold(imp: np.ndarray) -> np.float32:
    """τ = Q50 + 1.5·(Q75 − Q25) in float32, from the exact quartiles."""
    n = imp.size
    keys = order_keys(imp)
    found = kth_largest(keys, [n - pos for pos in quartile_positions(n)])
    q1, med, q3 = (key_value(v) for v, _ in found)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.float32(med + np.float32(np.float32(1.5) * np.float32(q3 - q1)))


def fusion_mask(base, model) -> np.ndarray:
    """The packed keep mask importance >= τ."""
    imp = importance(base, model)
    tau = threshold(imp)
    with np.errstate(invalid="ignore"):
        return np.concatenate([pack(imp[s : s + CHUNK] >= tau) for s in range(0, imp.size, CHUNK)])


def prepare(base, models, recipe, name: str, backend) -> Staged:
    require(backend, recipe.method, "keep_mask")
    mask = fusion_mask(base, models[0])
    p = plain_params(recipe, name, 1, True, keep_mask=mask, mask_stride=0)
    return Staged(p, base, models)
