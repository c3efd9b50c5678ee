"""Eager PyTorch baselines of the sparsifying methods added last (sce, della / della_linear,
arcee_fusion, magnitude_prune), in mergekit 0.1.x's and PEFT's style: stacked float32 task
vectors, ``torch.var`` / ``topk`` / ``argsort`` / ``torch.bernoulli`` masks as float tensors,
whole-tensor softmaxes. Our own code, from the semantics in docs/MERGEKIT_METHODS.md (D1, E1,
E2); the benchmark's speed-up column of these methods is measured against it. DELLA's masks
come from ``torch.bernoulli`` here (mergekit's way), so its output is compared by statistics,
not bits.
"""

from __future__ import annotations

from collections.abc import Sequence


def _deltas(base, models):
    import torch

    b = base.to(torch.float32)
    return b, torch.stack([m.to(torch.float32) - b for m in models])


def sce(base, models: Sequence, *, select_topk: float = 1.0):
    """Select (variance top-k mask), Calculate (mean-square weights), Erase (sign election)."""
    import torch

    b, tv = _deltas(base, models)
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(tv[0])
        else:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
        tv = tv * mask
    weights = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1.0 / len(weights)) if abs(total) < 1e-6 else weights / total
    sign = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    erase = tv.sign() == sign
    ew = weights.reshape(-1, *([1] * (tv.dim() - 1))) * erase
    return b + (tv * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


def arcee_fusion(base, model):
    """Keep the deltas whose importance |δ|·KL(softmax(x) ‖ softmax(b)) per row is above
    median + 1.5·IQR of the importances (quartiles of the whole tensor, exact)."""
    import torch

    b = base.to(torch.float32)
    x = model.to(torch.float32)
    rows_b = b.reshape(-1, b.shape[-1]) if b.dim() > 1 else b.reshape(1, -1)
    rows_x = x.reshape(rows_b.shape)
    p = torch.softmax(rows_x, dim=-1) + 1e-8
    q = torch.softmax(rows_b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = ((rows_x - rows_b).abs() * kl).reshape(-1)
    s = torch.sort(importance).values
    n = s.numel()
    q1, q2, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    mask = (importance >= q2 + 1.5 * (q3 - q1)).reshape(b.shape)
    return b + (x - b) * mask


def della(base, models: Sequence, *, weights, density, epsilon, normalize: bool, lambda_: float, generator):
    """DELLA: per row, keep probabilities linear in the magnitude rank (d − ε … d + ε), a
    Bernoulli mask, the tensor-wide L1 rescale, then the sign election (della) or the sum."""
    import torch

    b, tv = _deltas(base, models)
    kept = []
    for i in range(tv.shape[0]):
        d, e = density[i], epsilon[i]
        t = tv[i]
        if d >= 1:
            kept.append(t)
            continue
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        c = rows.shape[-1]
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=-1), dim=-1).to(torch.float32)
        p = (d - e) + 2 * e * (ranks / max(c - 1, 1))
        mask = torch.bernoulli(p.clamp(0, 1), generator=generator).reshape(t.shape)
        masked = t * mask
        before, after = t.abs().sum(), masked.abs().sum()
        kept.append(masked * (before / after) if after > 1e-7 else masked)
    tv = torch.stack(kept)
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * (tv.dim() - 1)))
    wtv = tv * w
    if normalize:  # della: sign election, divided by the agreeing weights
        sign = (wtv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
        agree = (wtv.sign() == sign).to(tv.dtype)
        mixed = (wtv * agree).sum(dim=0)
        div = (w * agree).sum(dim=0)
        div[div.abs() < 1e-8] = 1
        mixed = mixed / div
    else:
        mixed = wtv.sum(dim=0)
    return b + lambda_ * mixed


def magnitude_prune(base, models: Sequence, *, weights, density):
    """PEFT's magnitude_prune on the task vectors: topk magnitudes kept (``density`` per model),
    then the weighted sum."""
    import torch

    b, tv = _deltas(base, models)
    out = []
    for t, d in zip(tv, density):
        k = int(d * t.numel())
        mask = torch.zeros(t.numel())
        if k > 0:
            mask[t.abs().reshape(-1).topk(k).indices] = 1
        out.append(t * mask.reshape(t.shape))
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * (tv.dim() - 1)))
    return b + (torch.stack(out) * w).sum(dim=0)


SPARSIFY_METHODS = ("sce", "della", "della_linear", "arcee_fusion", "magnitude_prune")


def _per_model(value, n: int, default: float) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


def sparsify_merge(method: str, base, models: Sequence, out_dtype, kw: dict, generator):
    """One tensor of a :data:`SPARSIFY_METHODS` method, output in ``out_dtype``."""
    n = len(models)
    if method == "sce":
        y = sce(base, models, select_topk=kw.get("select_topk", 1.0))
    elif method == "arcee_fusion":
        y = arcee_fusion(base, models[0])
    elif method in ("della", "della_linear"):
        normalize = kw.get("normalize")
        y = della(
            base,
            models,
            weights=_per_model(kw.get("weights"), n, 1.0),
            density=_per_model(kw.get("density"), n, 1.0),
            epsilon=_per_model(kw.get("epsilon"), n, 0.15),
            normalize=(method == "della") if normalize is None else bool(normalize),
            lambda_=kw.get("lambda_", 1.0),
            generator=generator,
        )
    elif method == "magnitude_prune":
        y = magnitude_prune(
            base,
            models,
            weights=_per_model(kw.get("weights"), n, 1.0),
            density=_per_model(kw.get("density"), n, 0.2),
        )
    else:
        raise ValueError(f"no eager version of {method!r}")
    return y.to(out_dtype)


__all__ = ["SPARSIFY_METHODS", "sparsify_merge", "sce", "arcee_fusion", "della", "magnitude_prune"]
