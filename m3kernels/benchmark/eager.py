"""The same merges in eager PyTorch, written the way mergekit (0.1.x) and PEFT's merge utilities
write them: the baseline of the benchmark's speed-up column. Our own code.

What makes this style slow is its data flow, not its arithmetic:

* each model's delta is materialised in float32 and the deltas are stacked into an (N, ...)
  tensor; the weights broadcast against it as an (N, 1, ..., 1) column;
* magnitude trim (TIES): per model, a sort of the flattened |δ| (``argsort``, as mergekit's
  ``magnitude``; PEFT takes ``topk``), a 0/1 mask with ones at the k = int(density x numel)
  largest, δ x mask;
* DARE: a ``torch.bernoulli`` keep mask at the density, δ x mask / density (rescale);
* sign consensus: the sign of Σ w_i δ_i (>= 0 counts as +), agreement mask sign(δ_i) == it,
  Σ w_i δ_i over the agreeing models, divided by Σ w_i over them when normalising (a zero
  divisor counted as 1);
* linear: the weighted mean of the stacked models; task arithmetic: θ0 + λ Σ w_i δ_i.

The later methods in the same style (docs/MERGEKIT_METHODS.md has their semantics): passthrough
(a copy, or x·scale), nearswap (w = clamp(t / max(|a − x|, 1e-6), 0, 1), y = w·x + (1 − w)·a),
ram (a count of |δ_i| > ε over the stacked deltas, δ_i / count summed), slerp (normalised copies
of the whole tensors, their dot product, the spherical or, beyond 0.9995, linear blend),
breadcrumbs / breadcrumbs_ties (an ascending sort of |δ| per model, a mask keeping the window
between the small and the outlier ranks, then the sum or the sign consensus); nuslerp, multislerp,
karcher, model_stock and ramplus_tl in :mod:`.eager_family`; sce, della, della_linear,
arcee_fusion and magnitude_prune in :mod:`.eager_sparsify`.

M³ ratios (``mix_ratios``, or ``mixup_alpha`` drawn as the package draws them) multiply the
combine weights; the TIES vote keeps the user weights. :func:`eager_supported` says which
methods this covers; the others get no eager time (and no speed-up) in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

from m3kernels.benchmark.eager_family import FAMILY_METHODS, family_merge
from m3kernels.benchmark.eager_sparsify import SPARSIFY_METHODS, sparsify_merge

EAGER_METHODS = (
    "linear",
    "average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "ties_dare",
    "passthrough",
    "nearswap",
    "ram",
    "slerp",
    "breadcrumbs",
    "breadcrumbs_ties",
    *FAMILY_METHODS,
    *SPARSIFY_METHODS,
)


def eager_supported(method: str, kwargs: dict | None = None) -> str:
    """'' if :func:`eager_merge` computes ``method`` with ``kwargs``, else why not."""
    if method not in EAGER_METHODS:
        return "no eager version"
    kwargs = kwargs or {}
    if kwargs.get("rescale") == "l1":
        return "no eager version of rescale: l1"
    unknown = set(kwargs) - {
        "weights",
        "density",
        "drop_rate",
        "lambda_",
        "normalize",
        "rescale",
        "mix_ratios",
        "mixup_alpha",
        "seed",
        "t",
        "scale",
        "gamma",
        "epsilon",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "normalize_weights",
        "eps",
        "max_iter",
        "tol",
        "filter_wise",
        "r",
        "alpha",
        "select_topk",
    }
    return f"eager merge does not take {', '.join(sorted(unknown))}" if unknown else ""


def _per_model(value, n: int, default: float) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


def _column(values, ndim: int, device):
    import torch

    return torch.tensor(list(values), dtype=torch.float32, device=device).reshape(-1, *([1] * ndim))


def trim_by_sort(delta, density: float):
    """Keep the k = int(density x numel) largest |δ| (a full sort; ties broken by the sort)."""
    import torch

    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    if k >= delta.numel():
        return delta
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros_like(delta)
    mask.reshape(-1)[order[:k]] = 1.0
    return delta * mask


def bernoulli_drop(delta, density: float, generator, rescale: bool = True):
    """DARE: keep each element with probability ``density``; kept values divided by it."""
    import torch

    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * mask
    return out / density if rescale and density > 0 else out


def sign_consensus(deltas, vote_w, mix_w, normalize: bool):
    """TIES: elect the sign of Σ w_i δ_i, combine the agreeing models."""
    import torch

    elected = torch.where((deltas * vote_w).sum(dim=0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == elected
    mixed = (deltas * mix_w * agree).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (mix_w * agree).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return mixed / divisor


def trim_window(delta, density: float, gamma: float):
    """Breadcrumbs: sort |δ| ascending, keep ranks [B, B + T) with T = int(density·n),
    G = int(gamma·n), B = max(0, n − T − G) (the small ones and the outliers dropped)."""
    import torch

    if density >= 1.0:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.argsort(delta.abs().reshape(-1), descending=False)
    mask = torch.zeros_like(delta)
    mask.reshape(-1)[order[bottom : bottom + keep]] = 1.0
    return delta * mask


def slerp_pair(v0, v1, t: float, eps: float = 1e-8):
    """mergekit's slerp of two whole tensors (float32): normalised copies, their dot product,
    linear interpolation when nearly (anti)parallel, else the spherical blend."""
    import torch

    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = torch.clamp((u0 * u1).sum(), -1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1


def _later_method(method, base, models, out_dtype, kw):
    """passthrough, nearswap, ram, slerp (see the module docstring)."""
    import torch

    f32 = torch.float32
    if method == "passthrough":
        scale = kw.get("scale")
        return models[0].clone() if scale is None else (models[0].to(f32) * scale).to(out_dtype)
    a = base.to(f32)
    if method == "nearswap":
        x = models[0].to(f32)
        w = torch.clamp(kw["t"] / torch.clamp((a - x).abs(), min=1e-6), 0.0, 1.0)
        return (w * x + (1 - w) * a).to(out_dtype)
    if method == "slerp":
        return slerp_pair(a, models[0].to(f32), kw["t"]).to(out_dtype)
    eps = 1e-5 if kw.get("epsilon") is None else kw["epsilon"]
    stacked = torch.stack([m.to(f32) - a for m in models], dim=0)  # ram
    member = (stacked.abs() > eps).to(f32)
    count = member.sum(dim=0)
    return (a + (stacked * member / torch.clamp(count, min=1.0)).sum(dim=0)).to(out_dtype)


def eager_merge(
    base,
    models: Sequence,
    *,
    method: str,
    weights=None,
    density=None,
    drop_rate=None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    rescale=True,
    mix_ratios=None,
    mixup_alpha=None,
    seed: int = 0,
    t=None,
    scale=None,
    gamma=None,
    epsilon=None,
    **family_kw,
):
    """One tensor merged eagerly (output in the base's dtype, else the first model's)."""
    import torch

    why = eager_supported(method, {"rescale": rescale})
    if why:
        raise ValueError(why)
    f32 = torch.float32
    n = len(models)
    device = models[0].device
    out_dtype = base.dtype if base is not None else models[0].dtype
    if method in FAMILY_METHODS:
        if mixup_alpha is not None or mix_ratios is not None:
            raise ValueError(f"no eager version of {method} with M3 ratios")
        kw = dict(family_kw, weights=weights, epsilon=epsilon)
        return family_merge(method, base if method != "karcher" else None, models, out_dtype, kw)
    if method in SPARSIFY_METHODS:
        if mixup_alpha is not None or mix_ratios is not None:
            raise ValueError(f"no eager version of {method} with M3 ratios")
        kw = dict(
            family_kw, weights=weights, density=density, epsilon=epsilon, normalize=normalize, lambda_=lambda_
        )
        gen = torch.Generator(device=models[0].device).manual_seed(seed)
        return sparsify_merge(method, base, models, out_dtype, kw, gen)
    if method in ("passthrough", "nearswap", "ram", "slerp"):
        return _later_method(method, base, models, out_dtype, {"t": t, "scale": scale, "epsilon": epsilon})
    if mixup_alpha is not None and mix_ratios is None:
        from m3kernels.merge.mixup import draw_mix_ratios

        mix_ratios = list(draw_mix_ratios(mixup_alpha, n, seed))
    if isinstance(mix_ratios, (int, float)) and n == 2:
        mix_ratios = [float(mix_ratios), 1.0 - float(mix_ratios)]
    w = _per_model(weights, n, 1.0)
    r = _per_model(mix_ratios, n, 1.0)
    ndim = models[0].dim()
    vote_w = _column(w, ndim, device)
    mix_w = _column([a * b for a, b in zip(r, w)], ndim, device)
    gen = torch.Generator(device=device).manual_seed(seed)

    if method in ("linear", "average"):
        stacked = torch.stack([m.to(f32) for m in models], dim=0)
        total = (stacked * mix_w).sum(dim=0)
        if normalize is False:
            return (lambda_ * total).to(out_dtype)
        return (lambda_ * total / mix_w.sum()).to(out_dtype)

    base32 = base.to(f32)
    deltas = [m.to(f32) - base32 for m in models]
    if method in ("dare_linear", "dare_ties", "ties_dare"):
        if method == "ties_dare" or density is None:
            keep = [1.0 - p for p in _per_model(drop_rate, n, 0.0)]
        else:
            keep = _per_model(density, n, 1.0)
        deltas = [bernoulli_drop(d, p, gen, rescale is not False) for d, p in zip(deltas, keep)]
    if method in ("ties", "ties_dare"):
        deltas = [trim_by_sort(d, p) for d, p in zip(deltas, _per_model(density, n, 0.2))]
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        g = _per_model(gamma, n, 0.01)
        deltas = [trim_window(d, p, q) for d, p, q in zip(deltas, _per_model(density, n, 1.0), g)]
    stacked = torch.stack(deltas, dim=0)
    del deltas
    if method in ("ties", "dare_ties", "ties_dare", "breadcrumbs_ties"):
        norm = (method in ("ties", "ties_dare")) if normalize is None else normalize
        mixed = sign_consensus(stacked, vote_w, mix_w, norm)
    else:  # task_arithmetic, dare_linear, breadcrumbs
        mixed = (stacked * mix_w).sum(dim=0)
        if normalize:
            mixed = mixed / mix_w.sum()
    return (base32 + lambda_ * mixed).to(out_dtype)


__all__ = [
    "EAGER_METHODS",
    "trim_window",
    "slerp_pair",
    "eager_supported",
    "eager_merge",
    "trim_by_sort",
    "bernoulli_drop",
    "sign_consensus",
]
