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


def _ref(base, models, **kw):
    recipe = make_recipe(len(models), has_base=base is not None, **kw)
    return reference_merge(base, models, recipe)[0]


def test_issue8_references_by_hand():
    """Numbers worked out on paper from mergekit's formulas (docs/MERGEKIT_METHODS.md §3)."""
    c45 = math.cos(math.pi / 4)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # slerp of orthogonal unit vectors at t = 0.5: the 45° unit vector; at t = 1/3: 30°
    assert torch.allclose(
        _ref(e1, [e2], method="slerp", t=0.5), torch.tensor([c45, c45], dtype=torch.float64)
    )
    got = _ref(e1, [e2], method="slerp", t=1 / 3)
    assert torch.allclose(got, torch.tensor([math.cos(math.pi / 6), 0.5], dtype=torch.float64))
    # nearly parallel (|cos| > 0.9995): linear interpolation
    x = torch.tensor([1.0, 0.01])
    assert torch.allclose(_ref(e1, [x], method="slerp", t=0.25), 0.75 * e1.double() + 0.25 * x.double())
    # model_stock, N = 2: δ1 = e1, δ2 = (e1 + e2)/√2 ⇒ cos = 1/√2, t = 2c / (1 + c)
    base = torch.tensor([0.5, -0.25])
    x1, x2 = base + e1, base + torch.tensor([c45, c45])
    t = 2 * c45 / (1 + c45)
    want = t * (x1.double() + x2.double()) / 2 + (1 - t) * base.double()
    assert torch.allclose(_ref(base, [x1, x2], method="model_stock"), want)
    # nearswap: a + clamp(x − a, ±t)
    a, b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.3, 0.95, 1.0])
    assert torch.allclose(
        _ref(a, [b], method="nearswap", t=0.1), torch.tensor([0.1, 0.95, 1.9], dtype=torch.float64)
    )
    # ram: c = 2 where both move: mean; c = 1: the one; below epsilon: nothing
    got = _ref(a, [a + torch.tensor([0.2, 0.0, 1e-7]), a + torch.tensor([0.4, 0.3, 0.0])], method="ram")
    assert torch.allclose(got, a.double() + torch.tensor([0.3, 0.3, 0.0], dtype=torch.float64), atol=1e-7)
    # karcher of two orthogonal unit vectors: the 45° unit vector (scale = mean norm = 1)
    assert torch.allclose(
        _ref(None, [e1, e2], method="karcher"), torch.tensor([c45, c45], dtype=torch.float64)
    )
    # multislerp of the same two (no base): the same point
    assert torch.allclose(
        _ref(None, [e1, e2], method="multislerp"), torch.tensor([c45, c45], dtype=torch.float64)
    )
    # nuslerp of orthogonal task vectors, weights 1:3 ⇒ t = 0.75
    got = _ref(None, [e1, e2], method="nuslerp", weights=[1.0, 3.0])
    want = torch.tensor([math.sin(0.25 * math.pi / 2), math.sin(0.75 * math.pi / 2)], dtype=torch.float64)
    assert torch.allclose(got, want)
    # passthrough: a copy, or times scale
    assert torch.equal(_ref(None, [b], method="passthrough", scale=2.0), 2.0 * b.double())
