"""The SLERP family's coefficients from Gram matrices, in float64 (stage A's Python part).

slerp, nuslerp, multislerp, karcher and model_stock all produce y = Σ_i c_i·v_i (plus the base
for task-vector forms) with coefficients that depend only on the dot products of the vectors.
Each function takes ``G``, float64[groups, k, k] (one Gram matrix per tensor, row or column), and
returns float64[groups, k]; the caller rounds them to float32 once. The formulas are mergekit
0.1.5's (docs/MERGEKIT_METHODS.md §3 C1–C5), written on the Gram matrix: a norm is √G_ii, a dot
product G_ij, and karcher's iterate is kept as coefficients on the unit vectors (its mean always
lies in their span).
"""

from __future__ import annotations

import math

import numpy as np

SLERP_DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly
SLERP_NORM_EPS = 1e-8  # slerp: a norm at most this is replaced by 1
NUSLERP_NORM_EPS = 1e-7  # nuslerp: norms clamped to at least this
NUSLERP_COLINEAR = 1e-16  # nuslerp: 1 − cos² at most this is colinear
MODEL_STOCK_EPS = 1e-6  # model_stock: norm-product clamp and singular denominator


def _clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return min(max(x, lo), hi)


def _interp(c: float, t: float) -> tuple[float, float]:
    theta = math.acos(c)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp(G: np.ndarray, t: float) -> np.ndarray:
    """(base, model) coefficients per group: linear when |cos| > 0.9995, else spherical."""
    out = np.empty((G.shape[0], 2))
    for g in range(G.shape[0]):
        n0, n1 = math.sqrt(max(G[g, 0, 0], 0.0)), math.sqrt(max(G[g, 1, 1], 0.0))
        n0 = n0 if n0 > SLERP_NORM_EPS else 1.0
        n1 = n1 if n1 > SLERP_NORM_EPS else 1.0
        c = _clamp(G[g, 0, 1] / (n0 * n1))
        out[g] = (1.0 - t, t) if abs(c) > SLERP_DOT_THRESHOLD else _interp(c, t)
    return out


def nuslerp_t(weights) -> float:
    """t = w_B / (w_A + w_B), 0.5 when the weights sum to (almost) 0."""
    wa, wb = weights
    total = wa + wb
    return 0.5 if abs(total) < 1e-6 else wb / total


def nuslerp(G: np.ndarray, t: float) -> np.ndarray:
    """(A, B) coefficients per group: norms clamped to 1e-7, colinear iff 1 − cos² <= 1e-16."""
    out = np.empty((G.shape[0], 2))
    for g in range(G.shape[0]):
        na = max(math.sqrt(max(G[g, 0, 0], 0.0)), NUSLERP_NORM_EPS)
        nb = max(math.sqrt(max(G[g, 1, 1], 0.0)), NUSLERP_NORM_EPS)
        c = _clamp(G[g, 0, 1] / (na * nb))
        out[g] = (1.0 - t, t) if 1.0 - c * c <= NUSLERP_COLINEAR else _interp(c, t)
    return out


def multislerp(G: np.ndarray, weights, normalize: bool, eps: float, name: str = "") -> np.ndarray:
    """Coefficients of the N vectors (one group): the tangent-space barycentre of their units,
    scaled by Σ w_i‖v_i‖ (weights divided by their sum when ``normalize``)."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        total = float(w.sum())
        if total == 0.0:
            raise ValueError(
                f"weights: multislerp normalises the weights but they sum to 0 (tensor {name!r})"
            )
        w = w / total
    out = np.empty((G.shape[0], len(w)))
    for g in range(G.shape[0]):
        gram = G[g]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        inv = 1.0 / (norms + eps)  # u_i = v_i · inv_i
        mu = w * inv  # mean = Σ mu_i v_i
        m_norm = math.sqrt(max(float(mu @ gram @ mu), 0.0))
        if m_norm < eps:
            if len(w) == 2:
                out[g] = w
                continue
            raise ValueError(
                f"multislerp: the weighted mean of the unit vectors of tensor {name!r} is zero "
                "(antipodal inputs with balancing weights); use other weights"
            )
        mhat = mu / m_norm  # coefficients of the unit mean
        dots = (gram @ mhat) * inv  # <u_i, m̂>
        tangent = w * inv - float(w @ dots) * mhat  # Σ w_i (u_i − d_i m̂)
        tau = math.sqrt(max(float(tangent @ gram @ tangent), 0.0)) + eps
        scale = float(w @ norms)
        out[g] = scale * (math.cos(tau) * mhat + (math.sin(tau) / tau) * tangent)
    return out


def karcher(G: np.ndarray, alphas, max_iter: int, tol: float) -> np.ndarray:
    """Coefficients of the N points (one group) for their weighted Karcher mean on the sphere,
    times Σ α_i‖x_i‖. The iterate m = Σ β_j u_j over the valid units (‖x_j‖ > tol)."""
    a = np.asarray(alphas, dtype=np.float64)
    out = np.zeros((G.shape[0], len(a)))
    for g in range(G.shape[0]):
        gram = G[g]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        valid = [i for i in range(len(a)) if norms[i] > tol]
        if not valid:
            continue  # zeros
        nv = norms[valid]
        unit = gram[np.ix_(valid, valid)] / np.outer(nv, nv)  # Gram of the unit vectors
        ah = a[valid] / a[valid].sum()
        beta = ah.copy()
        mn = math.sqrt(max(float(beta @ unit @ beta), 0.0))
        if mn < tol:
            beta = np.zeros(len(valid))
            beta[0] = 1.0
        else:
            beta = beta / mn
        for _ in range(max_iter):
            d = np.clip(unit @ beta, -1.0, 1.0)
            c = np.zeros(len(valid))
            for j in range(len(valid)):
                theta = math.acos(d[j])
                if theta >= tol:
                    c[j] = ah[j] * theta / math.sin(theta)
            tang = c - float(c @ d) * beta
            tn = math.sqrt(max(float(tang @ unit @ tang), 0.0))
            if tn < tol:
                break
            beta = math.cos(tn) * beta + math.sin(tn) * tang / tn
            un = math.sqrt(max(float(beta @ unit @ beta), 0.0))
            if un > tol:
                beta = beta / un
        scale = float(a @ norms)
        out[g, valid] = scale * beta / nv
    return out


def model_stock(G: np.ndarray) -> np.ndarray:
    """(base, model_1..model_N) coefficients per group from the Gram of the N task vectors:
    t from the mean pairwise cosine, y = (1 − t)·base + (t / N)·Σ x_i."""
    n = G.shape[1]
    out = np.empty((G.shape[0], n + 1))
    for g in range(G.shape[0]):
        norms = np.sqrt(np.maximum(np.diag(G[g]), 0.0))
        cos = [
            _clamp(G[g, i, j] / max(norms[i] * norms[j], MODEL_STOCK_EPS))
            for i in range(n)
            for j in range(i + 1, n)
        ]
        c = sum(cos) / len(cos)
        den = 1.0 + (n - 1) * c
        t = 0.0 if abs(den) < MODEL_STOCK_EPS else n * c / den
        out[g, 0] = 1.0 - t
        out[g, 1:] = t / n
    return out
