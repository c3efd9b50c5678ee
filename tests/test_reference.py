"""The oracle itself, checked against element-by-element Python written from docs/SPEC.md §1-§2."""

import math
import random

import pytest
import torch

from m3kernels.merge.philox import dare_keep_mask
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge, reference_thresholds


def naive_merge(base, models, method, weights, density, lam, ratios, normalize, dare=None, seed=0, name=""):
    """Per-element loops over Python floats; `dare` = per-model DARE density (rescale by 1/d)."""
    n, size = len(models), len(base)
    deltas = [[models[i][j] - base[j] for j in range(size)] for i in range(n)]
    if dare is not None:
        for i in range(n):
            keep = dare_keep_mask(seed, name, i, (size,), dare[i]).tolist()
            deltas[i] = [d / dare[i] if k else 0.0 for d, k in zip(deltas[i], keep)]
    if method == "ties":
        for i in range(n):
            k = math.floor(density * size)
            mags = sorted((abs(d) for d in deltas[i]), reverse=True)
            t = mags[k - 1] if k > 0 else math.inf
            deltas[i] = [d if abs(d) >= t else 0.0 for d in deltas[i]]
    out = []
    for j in range(size):
        if method in ("ties", "dare_ties"):
            vote = sum(weights[i] * deltas[i][j] for i in range(n))
            s = 1 if vote >= 0 else -1
            agree = [i for i in range(n) if deltas[i][j] != 0 and (deltas[i][j] > 0) == (s > 0)]
            num = sum(ratios[i] * weights[i] * deltas[i][j] for i in agree)
            den = sum(ratios[i] * weights[i] for i in agree)
            m = (num / den if den else 0.0) if normalize else num
        else:
            m = sum(ratios[i] * weights[i] * deltas[i][j] for i in range(n))
            if normalize:
                m /= sum(ratios[i] * weights[i] for i in range(n))
        out.append(base[j] + lam * m)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "method,normalize",
    [
        ("ties", True),
        ("ties", False),
        ("task_arithmetic", False),
        ("dare_ties", False),
        ("dare_linear", True),
    ],
)
def test_reference_matches_naive(n, method, normalize):
    rnd = random.Random(n * 7 + len(method))
    size = 61
    # values exactly representable in float32 so float32 decisions equal exact ones
    base = [rnd.randint(-64, 64) / 32 for _ in range(size)]
    models = [[b + rnd.randint(-40, 40) / 64 for b in base] for _ in range(n)]
    weights = [rnd.choice([0.5, 1.0, 2.0]) for _ in range(n)]
    ratios = [1.0 / n] * n
    dare = [0.5] * n if method.startswith("dare") else None
    kw = dict(weights=weights, normalize=normalize, lambda_=0.75, mix_ratios=ratios, seed=4)
    if method == "ties":
        kw["density"] = 0.3
    if dare:
        kw["density"] = 0.5
    recipe = make_recipe(n, method=method, has_base=True, **kw)
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)
    ref, _ = reference_merge(t(base), [t(m) for m in models], recipe, "w")
    naive = naive_merge(base, models, method, weights, 0.3, 0.75, ratios, normalize, dare, seed=4, name="w")
    torch.testing.assert_close(ref, torch.tensor(naive, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_ties_m3_paper_rule():
    """Both agree -> λδ1 + (1-λ)δ2; one agrees -> its delta; sign from unweighted trimmed deltas."""
    base = torch.zeros(4)
    d1 = torch.tensor([1.0, 2.0, -1.0, 3.0])
    d2 = torch.tensor([3.0, -1.0, -3.0, -4.0])
    recipe = make_recipe(2, method="ties", has_base=True, density=1.0, mix_ratios=0.25)
    out, _ = reference_merge(base, [d1, d2], recipe)
    expect = torch.tensor([0.25 * 1 + 0.75 * 3, 2.0, 0.25 * -1 + 0.75 * -3, -4.0], dtype=torch.float64)
    assert torch.equal(out, expect)


def test_thresholds_are_kth_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1001, generator=g)
    m = base + torch.randn(1001, generator=g)
    recipe = make_recipe(1, method="ties", has_base=True, density=0.1)
    (t,) = reference_thresholds(base, [m], recipe)
    mags = (m - base).abs()
    assert int((mags >= t).sum()) == 100 and int((mags > t).sum()) == 99
