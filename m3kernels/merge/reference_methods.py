"""Float64 references of the issue-8 methods without a magnitude trim, from the tensors.

Written from mergekit 0.1.5's semantics (docs/MERGEKIT_METHODS.md §3), independently of the
kernel path: no Gram helper, no coefficient table; norms, dot products, angles and karcher's
iteration are computed on the float64 vectors themselves, as mergekit does on its tensors.
Decisions that the kernels make on float32 values (ram's |δ| > ε) are made on the float32
deltas here too, so a reference and a kernel never disagree about *which* values are combined.
Breadcrumbs' window trim is in :mod:`m3kernels.merge.reference`. DELLA's keep masks come from a
full sort of each line and the whole tensor's Philox words (not from the chunked stage A).
"""

from __future__ import annotations

import math

import numpy as np
import torch

F32, F64 = torch.float32, torch.float64


def _f64(t):
    return t.to(F64)


def _passthrough(base, models, recipe):
    scale = recipe.get("scale", (None,))[0]
    x = _f64(models[0])
    return x if scale is None else x * float(torch.tensor(scale, dtype=F32))


def _nearswap(base, models, recipe):
    a, x = _f64(base), _f64(models[0])
    t = float(torch.tensor(recipe.get("t"), dtype=F32))
    dist = torch.clamp((a - x).abs(), min=1e-6)
    w = torch.clamp(t / dist, 0.0, 1.0)
    return w * x + (1.0 - w) * a


def _ram_terms(base, models, recipe):
    """(float64 base, the float64 deltas, the counted masks (float32 decision), counts)."""
    eps = torch.tensor(recipe.get("epsilon"), dtype=F32)
    b32 = base.to(F32)
    d32 = [m.to(F32) - b32 for m in models]
    counted = [d.abs() > eps for d in d32]
    count = sum(c.to(torch.int64) for c in counted)
    d64 = [_f64(m) - _f64(base) for m in models]
    return _f64(base), d64, counted, count


def _ram(base, models, recipe, unique_scale=None):
    b, d64, counted, count = _ram_terms(base, models, recipe)
    out = torch.zeros_like(b)
    c64 = count.to(F64)
    for i, (d, k) in enumerate(zip(d64, counted)):
        lam = 1.0 if unique_scale is None else unique_scale[i]
        term = torch.where(count == 1, d * lam, d / torch.clamp(c64, min=1.0))
        out = out + torch.where(k, term, torch.zeros((), dtype=F64))
    return b + out


def ramplus_lambdas(base, models, recipe) -> list:
    """λ_i = 1 + r·min(max(shared_i / max(unique_i, ε), 0), α) in float64 from the counts."""
    _, _, counted, count = _ram_terms(base, models, recipe)
    r, alpha, eps = recipe.get("r"), recipe.get("alpha"), recipe.get("epsilon")
    out = []
    for k in counted:
        shared = int((k & (count > 1)).sum())
        unique = int((k & (count == 1)).sum())
        rho = shared / max(float(unique), eps) if max(float(unique), eps) > 0 else math.inf
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def _slerp_pair(v0, v1, t):
    """mergekit's slerp of two float64 vectors (whole tensors)."""
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = n0 if n0 > 1e-8 else torch.ones((), dtype=F64)
    n1 = n1 if n1 > 1e-8 else torch.ones((), dtype=F64)
    c = float(torch.clamp(((v0 / n0) * (v1 / n1)).sum(), -1.0, 1.0))
    if abs(c) > 0.9995:
        return (1.0 - t) * v0 + t * v1
    theta = math.acos(c)
    return (math.sin((1.0 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def _vectors_along(x: torch.Tensor, recipe):
    """nuslerp / model_stock: the tensor as a [groups, length] matrix of its vectors, and the
    function that puts such a matrix back into the tensor's shape."""
    shape = x.shape
    if x.dim() < 2:
        return x.reshape(1, -1), lambda y: y.reshape(shape)
    if recipe.method == "nuslerp" and not recipe.get("nuslerp_flatten"):
        if recipe.get("nuslerp_row_wise"):  # along dim 0
            mat = x.reshape(shape[0], -1).transpose(0, 1)
            return mat, lambda y: y.transpose(0, 1).reshape(shape)
        return x.reshape(-1, shape[-1]), lambda y: y.reshape(shape)
    if recipe.method == "model_stock" and recipe.get("filter_wise"):
        return x.reshape(-1, shape[-1]), lambda y: y.reshape(shape)
    return x.reshape(1, -1), lambda y: y.reshape(shape)


def _nuslerp(base, models, recipe):
    wa, wb = recipe.coefs
    t = 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
    b = _f64(base) if base is not None else None
    va, vb = (_f64(m) - b if b is not None else _f64(m) for m in models)
    A, back = _vectors_along(va, recipe)
    B, _ = _vectors_along(vb, recipe)
    ua = A / torch.clamp(torch.linalg.vector_norm(A, dim=1, keepdim=True), min=1e-7)
    ub = B / torch.clamp(torch.linalg.vector_norm(B, dim=1, keepdim=True), min=1e-7)
    c = torch.clamp((ua * ub).sum(dim=1, keepdim=True), -1.0, 1.0)
    colinear = (1.0 - c * c) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(c), c))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    res = (torch.sin((1.0 - t) * theta) * A + torch.sin(t * theta) * B) / s
    res = torch.where(colinear, (1.0 - t) * A + t * B, res)
    y = back(res)
    return y + b if b is not None else y


def _multislerp(base, models, recipe, name):
    if len(models) == 1:
        return _f64(models[0])
    b = _f64(base) if base is not None else None
    vs = torch.stack([(_f64(m) - b) if b is not None else _f64(m) for m in models]).reshape(len(models), -1)
    w = torch.tensor(recipe.coefs, dtype=F64)
    eps = recipe.get("eps")
    if recipe.get("normalize_weights"):
        w = w / w.sum()
    norms = torch.linalg.vector_norm(vs, dim=1, keepdim=True)
    units = vs / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mn = torch.linalg.vector_norm(mean)
    if mn < eps:
        if len(models) != 2:
            raise ValueError(f"multislerp: zero weighted mean for tensor {name!r}")
        res = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean = mean / mn
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * w[:, None]).sum(0)
        tn = float(torch.linalg.vector_norm(tangent)) + eps
        res = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * float((norms[:, 0] * w).sum())
    res = res.reshape(models[0].shape)
    return res + b if b is not None else res


def _karcher(models, recipe):
    xs = [_f64(m).reshape(-1) for m in models]
    if len(xs) == 1:
        return xs[0].reshape(models[0].shape)
    r = torch.tensor(recipe.mix_ratios, dtype=F64)
    alphas = (r / r.sum()).tolist()
    tol, max_iter = recipe.get("tol"), recipe.get("max_iter")
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    units = [x / nrm if nrm != 0.0 else torch.zeros_like(x) for x, nrm in zip(xs, norms)]
    valid = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not valid:
        return torch.zeros(models[0].shape, dtype=F64)
    total = sum(alphas[i] for i in valid)
    ah = [alphas[i] / total for i in valid]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(ah, vu))
    mn = float(torch.linalg.vector_norm(mean))
    mean = vu[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(ah, vu):
            d = min(max(float(mean @ u), -1.0), 1.0)
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent = tangent + a * (theta / math.sin(theta)) * (u - d * mean)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean = mean / un
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    return (scale * mean).reshape(models[0].shape)


def _model_stock(base, models, recipe):
    b = _f64(base)
    B, back = _vectors_along(b, recipe)
    ws = [_vectors_along(_f64(m), recipe)[0] for m in models]
    offsets = [w - B for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            prod = torch.linalg.vector_norm(oa, dim=1) * torch.linalg.vector_norm(ob, dim=1)
            cos.append(torch.clamp((oa * ob).sum(dim=1) / torch.clamp(prod, min=1e-6), -1.0, 1.0))
    c = torch.stack(cos).mean(dim=0)[:, None]
    n = len(ws)
    den = 1.0 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    avg = sum(ws) / n
    return back(t * avg + (1.0 - t) * B)


def exact_rank_keep(d32: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``trim_ties: k``: the elements of ranks start .. start + count − 1 in the order (bits(|δ|)
    descending, flat index ascending), by a full sort (NaN above every finite magnitude)."""
    keys = (d32.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF).numpy()
    order = np.lexsort((np.arange(keys.size), -keys))
    keep = np.zeros(keys.size, dtype=bool)
    keep[order[max(start, 0) : max(start, 0) + max(count, 0)]] = True
    return torch.from_numpy(keep).reshape(d32.shape)


def exact_window_keep(d32: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs' window with ``trim_ties: k``: exactly the ranks D .. D + T − 1 (T = ⌊d·n⌋,
    G = ⌊γ·n⌋, B = max(0, n − T − G), D = n − B − T); None for density >= 1 (no trim)."""
    if density >= 1.0:
        return None
    n = d32.numel()
    t = math.floor(density * n) if density > 0 else 0
    b = max(0, n - t - math.floor(gamma * n))
    return exact_rank_keep(d32, n - b - t, t)


def della_keep(d32: torch.Tensor, density: float, epsilon: float, seed: int, name: str, i: int):
    """DELLA's keep mask of one float32 delta, by a full sort of each line along dim 1 on the key
    (bits(|δ|), flat index) and the whole tensor's Philox words (docs/RANDOMNESS.md, "della")."""
    from m3kernels.merge.philox import dare_uniform_u32

    shape, numel = d32.shape, d32.numel()
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    if density <= 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    x = d32.reshape(1, -1) if d32.dim() < 2 else d32
    idx = torch.arange(numel, dtype=torch.int64).reshape(x.shape).movedim(1, -1)
    keys = (x.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF).movedim(1, -1)
    c = keys.shape[-1]
    rank = (keys * numel + idx).argsort(dim=-1).argsort(dim=-1)  # ascending, ties by flat index
    if c == 1:  # one column: p = d (mergekit divides 0 by 0 there)
        p = torch.full(rank.shape, float(density), dtype=F64)
    else:
        p = (density - epsilon) + (2.0 * epsilon) * (rank.to(F64) / float(c - 1))
    thr = torch.floor(p * 4294967296.0).to(torch.int64)
    u = torch.from_numpy(dare_uniform_u32(seed, name, i, numel).astype("int64"))
    keep = torch.empty(numel, dtype=torch.bool)
    keep[idx.reshape(-1)] = u[idx.reshape(-1)] < thr.reshape(-1)
    return keep.reshape(shape)


def _della(base, models, recipe, name):
    """della / della_linear: keep masks, the tensor-wide L1 rescale (finite deltas, mergekit's 1e-7
    guard), then the TIES election (decisions on the float32 values) or the (weighted) sum."""
    b32, b64 = base.to(F32), _f64(base)
    d32, d64 = [], []
    for i, (m, dens, eps) in enumerate(zip(models, recipe.trim_density, recipe.get("epsilon"))):
        a, a64 = m.to(F32) - b32, _f64(m) - b64
        keep = della_keep(a, dens, eps, recipe.seed, name, i)
        s64 = 1.0
        if recipe.rescale == "l1" and 0.0 < dens < 1.0:
            mag = a.abs().to(F64)
            mag = torch.where(torch.isfinite(mag), mag, 0.0)
            total, kept = float(mag.sum()), float(torch.where(keep, mag, 0.0).sum())
            s64 = total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0
        zero32, zero64 = torch.zeros((), dtype=F32), torch.zeros((), dtype=F64)
        d32.append(torch.where(keep, a * torch.tensor(s64, dtype=F32), zero32))
        d64.append(torch.where(keep, a64 * s64, zero64))
    from m3kernels.merge.reference import combine64

    m, _ = combine64(recipe, d32, d64)
    return b64 + recipe.lambda_ * m


def sce_keep(d32: list, select_topk: float) -> torch.Tensor | None:
    """sce's select on the float32 task vectors, by a full sort: the float64 population variance
    rounded to float32, k = ⌊f32(f32(nnz)·f32(s))⌋, exactly the k largest bits(|σ²|), ties by
    lowest flat index (a stable descending sort). None: s >= 1 (no select)."""
    if select_topk >= 1:
        return None
    shape = d32[0].shape
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    var = torch.var(torch.stack(d32).to(F64), dim=0, unbiased=False).to(F32).reshape(-1)
    nnz = int(torch.count_nonzero(var))
    prod = torch.tensor(float(nnz), dtype=F32) * torch.tensor(select_topk, dtype=F32)
    k = int(prod)
    keys = var.abs().view(torch.int32).to(torch.int64)
    order = torch.sort(keys, descending=True, stable=True).indices
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(shape)


def sce_weights(d32: list) -> list:
    """sce's Calculate step in float64 from the (masked) float32 task vectors: the mean squares,
    uniform when their float32 sum is below 1e-6 (mergekit's test on its float32 sum)."""
    n = len(d32)
    means = []
    for d in d32:
        a = d.to(F64)
        a = torch.where(torch.isfinite(a), a, 0.0)
        means.append(float((a * a).mean()))
    w32 = [float(torch.tensor(x, dtype=F32)) for x in means]
    total = 0.0
    for x in w32:  # the float32 running sum
        total = float(torch.tensor(total, dtype=F32) + torch.tensor(x, dtype=F32))
    if abs(total) < 1e-6:
        return [1.0 / n] * n
    s = sum(means)
    return [x / s for x in means]


def _sce(base, models, recipe):
    b32, b64 = base.to(F32), _f64(base)
    d32 = [m.to(F32) - b32 for m in models]
    d64 = [_f64(m) - b64 for m in models]
    keep = sce_keep(d32, recipe.get("select_topk"))
    if keep is not None:
        d32 = [torch.where(keep, d, torch.zeros((), dtype=F32)) for d in d32]
        d64 = [torch.where(keep, d, torch.zeros((), dtype=F64)) for d in d64]
    w = sce_weights(d32)
    vote = torch.zeros_like(d32[0])
    for d in d32:
        vote = vote + d  # float32, model order: the unweighted sign
    pos = vote >= 0
    num, den = torch.zeros_like(b64), torch.zeros_like(b64)
    for wi, a, a64 in zip(w, d32, d64):
        agree = ((a != 0) & ((a > 0) == pos)).to(F64)
        num, den = num + agree * (wi * a64), den + agree * wi
    floor = float(torch.tensor(1e-6, dtype=F32))
    return b64 + num / torch.clamp(den, min=floor)


def fusion_keep(base, model) -> torch.Tensor:
    """arcee_fusion's mask: torch's float32 row softmax KL of the whole tensor (one call), the
    importance |x − b|·KL, the quartiles at the exact sorted positions ⌊q·(n − 1)⌋ of a full sort,
    τ = Q50 + 1.5·(Q75 − Q25) in float32; importance >= τ."""
    x32, b32 = model.to(F32), base.to(F32)
    rows = (lambda t: t.reshape(1, -1)) if x32.dim() < 2 else (lambda t: t.reshape(-1, t.shape[-1]))
    xr, br = rows(x32), rows(b32)
    p = torch.softmax(xr, dim=-1) + 1e-8
    q = torch.softmax(br, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    imp = ((xr - br).abs() * kl).reshape(-1)
    ranked = torch.sort(imp).values  # ascending, NaN last
    m = imp.numel() - 1
    q1, med, q3 = ranked[m // 4], ranked[m // 2], ranked[(3 * m) // 4]
    tau = med + torch.tensor(1.5, dtype=F32) * (q3 - q1)
    return (imp >= tau).reshape(model.shape)


def _arcee_fusion(base, models):
    b64 = _f64(base)
    keep = fusion_keep(base, models[0])
    return b64 + torch.where(keep, _f64(models[0]) - b64, torch.zeros((), dtype=F64))


def reference_family_merge(base, models, recipe, name: str = "") -> torch.Tensor:
    """The float64 result of one of the methods above for one tensor."""
    m = recipe.method
    if m == "passthrough":
        return _passthrough(base, models, recipe)
    if m == "nearswap":
        return _nearswap(base, models, recipe)
    if m == "ram":
        return _ram(base, models, recipe)
    if m == "ramplus_tl":
        return _ram(base, models, recipe, ramplus_lambdas(base, models, recipe))
    if m == "slerp":
        y = _slerp_pair(_f64(base).reshape(-1), _f64(models[0]).reshape(-1), recipe.get("t"))
        return y.reshape(models[0].shape)
    if m == "nuslerp":
        return _nuslerp(base, models, recipe)
    if m == "multislerp":
        return _multislerp(base, models, recipe, name)
    if m == "karcher":
        return _karcher(models, recipe)
    if m == "model_stock":
        return _model_stock(base, models, recipe)
    if m in ("della", "della_linear"):
        return _della(base, models, recipe, name)
    if m == "sce":
        return _sce(base, models, recipe)
    if m == "arcee_fusion":
        return _arcee_fusion(base, models)
    raise ValueError(f"no family reference for method {m!r}")


__all__ = ["reference_family_merge", "ramplus_lambdas", "della_keep", "exact_rank_keep", "exact_window_keep"]
