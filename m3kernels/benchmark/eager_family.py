"""Eager PyTorch baselines of the norm-and-angle methods (nuslerp, multislerp, karcher,
model_stock) and of ramplus_tl, written in mergekit 0.1.x's style: whole float32 tensors,
stacked copies, norms with ``torch.linalg.norm``, masks as float tensors. Our own code, from
the semantics in docs/MERGEKIT_METHODS.md (C2–C5, A4); the benchmark's speed-up column of these
methods is measured against it.
"""

from __future__ import annotations

from collections.abc import Sequence


def _f32(t):
    import torch

    return t.to(torch.float32)


def nuslerp(base, models: Sequence, weights, *, flatten: bool = True, row_wise: bool = False):
    """Two models at t = w_B / (w_A + w_B); task vectors when a base is given."""
    import torch

    w_a, w_b = (1.0, 1.0) if weights is None else (float(weights[0]), float(weights[1]))
    t = 0.5 if abs(w_a + w_b) < 1e-6 else w_b / (w_a + w_b)
    b = None if base is None else _f32(base)
    va, vb = (_f32(m) if b is None else _f32(m) - b for m in models)
    shape = va.shape
    if flatten or va.dim() < 2:
        va2, vb2, dim = va.reshape(1, -1), vb.reshape(1, -1), -1
    elif row_wise:  # vectors along dim 0: the columns of a 2-D weight
        va2, vb2, dim = va.reshape(shape[0], -1), vb.reshape(shape[0], -1), 0
    else:  # vectors along the last dim: the rows
        va2, vb2, dim = va.reshape(-1, shape[-1]), vb.reshape(-1, shape[-1]), -1
    ua = va2 / torch.clamp(torch.linalg.norm(va2, dim=dim, keepdim=True), min=1e-7)
    ub = vb2 / torch.clamp(torch.linalg.norm(vb2, dim=dim, keepdim=True), min=1e-7)
    c = torch.clamp((ua * ub).sum(dim=dim, keepdim=True), -1.0, 1.0)
    theta = torch.arccos(c)
    s = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * va2 + torch.sin(t * theta) * vb2) / s
    linear = (1 - t) * va2 + t * vb2
    y = torch.where(1 - c * c <= 1e-16, linear, spherical).reshape(shape)
    return y if b is None else b + y


def multislerp(base, models: Sequence, weights, *, normalize_weights: bool = True, eps: float = 1e-8):
    """Barycentric interpolation on the hypersphere around the base (or the origin)."""
    import torch

    if len(models) == 1:
        return _f32(models[0])
    n = len(models)
    w = torch.tensor([1.0] * n if weights is None else [float(x) for x in weights], dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    b = None if base is None else _f32(base)
    shape = models[0].shape
    v = torch.stack([(_f32(m) if b is None else _f32(m) - b).reshape(-1) for m in models])
    norms = torch.linalg.norm(v, dim=1, keepdim=True)
    u = v / (norms + eps)
    m = (w[:, None] * u).sum(dim=0)
    m_norm = torch.linalg.norm(m)
    if m_norm < eps:
        if n != 2:
            raise ValueError("multislerp: antipodal inputs")
        y = (w[:, None] * v).sum(dim=0)
    else:
        m_hat = m / m_norm
        d = u @ m_hat
        tangent = (w[:, None] * (u - d[:, None] * m_hat)).sum(dim=0)
        tau = torch.linalg.norm(tangent) + eps
        y = (w * norms[:, 0]).sum() * (torch.cos(tau) * m_hat + (torch.sin(tau) / tau) * tangent)
    y = y.reshape(shape)
    return y if b is None else b + y


def karcher(models: Sequence, *, max_iter: int = 10, tol: float = 1e-5):
    """The Riemannian mean of the inputs on the sphere, times their mean norm."""
    import torch

    shape = models[0].shape
    x = torch.stack([_f32(m).reshape(-1) for m in models])
    n = x.shape[0]
    alpha = torch.full((n,), 1.0 / n)
    norms = torch.linalg.norm(x, dim=1)
    units = torch.where(norms[:, None] > 0, x / torch.clamp(norms[:, None], min=1e-30), torch.zeros_like(x))
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(shape)
    a_hat = torch.where(valid, alpha, torch.zeros_like(alpha))
    a_hat = a_hat / a_hat.sum()
    mean = (a_hat[:, None] * units).sum(dim=0)
    mn = torch.linalg.norm(mean)
    mean = units[int(valid.nonzero()[0])] if mn < tol else mean / mn
    for _ in range(max_iter):
        d = torch.clamp(units @ mean, -1.0, 1.0)
        theta = torch.arccos(d)
        use = valid & (theta >= tol)
        coef = torch.where(use, a_hat * theta / torch.clamp(torch.sin(theta), min=1e-30), torch.zeros_like(d))
        tangent = (coef[:, None] * (units - d[:, None] * mean)).sum(dim=0)
        tn = torch.linalg.norm(tangent)
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        mn = torch.linalg.norm(mean)
        if mn > tol:
            mean = mean / mn
    return ((alpha * norms).sum() * mean).reshape(shape)


def model_stock(base, models: Sequence, *, filter_wise: bool = False):
    """t·mean(models) + (1 − t)·base, t from the mean pairwise cosine of the task vectors."""
    import torch

    b = _f32(base)
    xs = [_f32(m) for m in models]
    n = len(xs)
    shape = b.shape
    group = (
        (lambda t: t.reshape(-1, shape[-1])) if filter_wise and b.dim() > 1 else (lambda t: t.reshape(1, -1))
    )
    deltas = [group(x - b) for x in xs]
    norms = [torch.linalg.norm(d, dim=1) for d in deltas]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (deltas[i] * deltas[j]).sum(dim=1)
            cos.append(torch.clamp(dot / torch.clamp(norms[i] * norms[j], min=1e-6), -1.0, 1.0))
    c = torch.stack(cos).mean(dim=0)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / den)[:, None]
    avg = group(sum(xs)) / n
    return (t * avg + (1 - t) * group(b)).reshape(shape)


def ramplus_tl(base, models: Sequence, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5):
    """ram with each model's unique contributions scaled by 1 + r·min(shared/unique, alpha)."""
    import torch

    b = _f32(base)
    deltas = torch.stack([_f32(m) - b for m in models])
    member = (deltas.abs() > epsilon).to(torch.float32)
    count = member.sum(dim=0)
    unique = member * (count == 1)
    shared = member * (count > 1)
    flat = (deltas.shape[0], -1)
    sh = shared.reshape(flat).sum(dim=1)
    un = unique.reshape(flat).sum(dim=1)
    rho = sh / torch.clamp(un, min=epsilon)
    lam = 1 + r * torch.clamp(rho, min=0.0, max=alpha)
    lam = lam.reshape(-1, *([1] * (deltas.dim() - 1)))
    terms = deltas * lam * unique + deltas / torch.clamp(count, min=1.0) * shared
    return b + terms.sum(dim=0)


FAMILY_METHODS = ("nuslerp", "multislerp", "karcher", "model_stock", "ramplus_tl")


def family_merge(method: str, base, models: Sequence, out_dtype, kw: dict):
    """One tensor of a :data:`FAMILY_METHODS` method, output in ``out_dtype``."""
    if method == "nuslerp":
        y = nuslerp(
            base,
            models,
            kw.get("weights"),
            flatten=kw.get("nuslerp_flatten", True),
            row_wise=kw.get("nuslerp_row_wise", False),
        )
    elif method == "multislerp":
        y = multislerp(
            base,
            models,
            kw.get("weights"),
            normalize_weights=kw.get("normalize_weights", True),
            eps=kw.get("eps", 1e-8),
        )
    elif method == "karcher":
        inputs = list(models) if base is None else [base, *models]
        y = karcher(inputs, max_iter=kw.get("max_iter", 10), tol=kw.get("tol", 1e-5))
    elif method == "model_stock":
        y = model_stock(base, models, filter_wise=kw.get("filter_wise", False))
    elif method == "ramplus_tl":
        y = ramplus_tl(
            base,
            models,
            r=kw.get("r", 0.1),
            alpha=kw.get("alpha", 0.2),
            epsilon=1e-5 if kw.get("epsilon") is None else kw["epsilon"],
        )
    else:
        raise ValueError(f"no eager version of {method!r}")
    return y.to(out_dtype)


__all__ = ["FAMILY_METHODS", "family_merge", "nuslerp", "multislerp", "karcher", "model_stock", "ramplus_tl"]
