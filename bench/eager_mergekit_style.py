"""Eager PyTorch merges computed the way mergekit (0.1.x) computes them: the baseline of
``bench/bench_tensor.py``. Our own code, written from mergekit's documented behaviour.

What makes this "mergekit style" (and slow) is the data flow, not the arithmetic:

* every model's delta is materialised as a float32 tensor and the deltas are stacked
  (``torch.stack``) into an (N, ...) temporary; weights broadcast as (N, 1, ..., 1);
* magnitude trim: per model, ``argsort`` of the flattened |δ| (descending), a 0/1 mask with
  ones at the first k = int(density * numel) positions, δ * mask;
* DARE: ``torch.bernoulli`` mask at the density, δ * mask, divided by the density (rescale);
* TIES sign consensus: the sign of the sum of the weighted stacked deltas (≥ 0 counts as +),
  agreement = sign(δ_i) equal to it, merged = Σ w_i δ_i over agreeing models divided by
  Σ w_i over them (a zero divisor replaced by 1);
* linear: weighted mean of the stacked models; task arithmetic: base + λ Σ w_i δ_i.

M³ mixing ratios multiply the weights of the combine; the TIES vote keeps the user weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def _per_model(value, n: int, default: float) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


def _weights_column(values: Sequence[float], ndim: int) -> torch.Tensor:
    """(N, 1, ..., 1) float32 weights that broadcast against stacked (N, ...) tensors."""
    return torch.tensor(list(values), dtype=F32).reshape(-1, *([1] * ndim))


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * numel) largest |δ| (argsort, ties broken arbitrarily)."""
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    if k >= delta.numel():
        return delta
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros_like(delta)
    mask.reshape(-1)[order[:k]] = 1
    return delta * mask


def bernoulli_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each element with probability ``density``; kept values divided by it."""
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * mask
    if rescale and density > 0:
        out = out / density
    return out


def sign_consensus_merge(
    deltas: torch.Tensor, vote_w: torch.Tensor, mix_w: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """TIES: elect the sign of Σ w_i δ_i, merge the agreeing models (disjoint mean)."""
    majority = torch.where((deltas * vote_w).sum(dim=0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == majority
    mixed = (deltas * mix_w * agree).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (mix_w * agree).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return mixed / divisor


def eager_merge(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    method: str,
    weights=None,
    density=None,
    drop_rate=None,
    lambda_: float = 1.0,
    mix_ratios=None,
    normalize: bool | None = None,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One tensor merged eagerly; same arguments as ``m3kernels.merge_tensors`` (subset)."""
    n = len(models)
    out_dtype = out_dtype or (base.dtype if base is not None else models[0].dtype)
    w = _per_model(weights, n, 1.0)
    r = _per_model(mix_ratios, n, 1.0)
    gen = torch.Generator().manual_seed(seed)
    ndim = models[0].dim()
    vote_w = _weights_column(w, ndim)
    mix_w = _weights_column([a * b for a, b in zip(r, w)], ndim)

    if method in ("linear", "average"):
        stacked = torch.stack([m.to(F32) for m in models], dim=0)
        merged = (stacked * mix_w).sum(dim=0) / mix_w.sum()
        return merged.to(out_dtype)

    base32 = base.to(F32)
    deltas = [m.to(F32) - base32 for m in models]
    if method in ("dare_linear", "dare_ties", "ties_dare"):
        if method == "ties_dare":
            dens = [1.0 - p for p in _per_model(drop_rate, n, 0.0)]
        else:
            dens = _per_model(density, n, 1.0)
        deltas = [bernoulli_drop(d, p, gen) for d, p in zip(deltas, dens)]
    if method in ("ties", "ties_dare"):
        dens = _per_model(density, n, 0.2)
        deltas = [magnitude_trim(d, p) for d, p in zip(deltas, dens)]
    stacked = torch.stack(deltas, dim=0)
    del deltas
    if method in ("ties", "dare_ties", "ties_dare"):
        norm = (method != "dare_ties") if normalize is None else normalize
        mixed = sign_consensus_merge(stacked, vote_w, mix_w, norm)
    elif method in ("task_arithmetic", "dare_linear"):
        mixed = (stacked * mix_w).sum(dim=0)
    else:
        raise ValueError(f"eager_merge: method {method!r} is not implemented")
    return (base32 + lambda_ * mixed).to(out_dtype)


__all__ = ["eager_merge", "magnitude_trim", "bernoulli_drop", "sign_consensus_merge"]
