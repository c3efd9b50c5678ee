"""breadcrumbs and breadcrumbs_ties: the magnitude window (two order statistics per model) on
every backend whose ``FEATURES`` have ``trim_max``, against the float64 reference (a full sort):
dtypes, N, odd sizes, poisoned outputs, windows at the edges; the window arithmetic; parameters."""

from __future__ import annotations

import pytest
import torch

import m3kernels
from m3kernels.merge.methods.breadcrumbs import window, window_ks
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge, window_keep

from cases import FAMILY_CASES
from helpers import assert_close_ulp, make_inputs, term_scale
from method_matrix import BACKENDS, check_against_reference, matrix, skip_unless

CASES = [c for c, (kw, _) in FAMILY_CASES.items() if kw["method"].startswith("breadcrumbs")]
SHAPES = [(1,), (7,), (37, 129)]
MATRIX = matrix(CASES)


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    check_against_reference(backend, case, dtype_case, gen, SHAPES, term_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensor_window(backend, gen):
    """Above the small-tensor size the thresholds come from histograms (or the multi-k select)."""
    skip_unless(backend, "breadcrumbs")
    base, models = make_inputs((301, 517), 2, (torch.bfloat16, [torch.bfloat16]), gen)
    kw = dict(method="breadcrumbs_ties", density=[0.4, 0.8], gamma=[0.05, 0.3])
    out = torch.full((301, 517), float("nan"), dtype=torch.bfloat16)
    m3kernels.merge_tensors(base, models, out=out, backend=backend, **kw)
    recipe = make_recipe(2, has_base=True, **kw)
    ref, _ = reference_merge(base, models, recipe, "w")
    assert_close_ulp(out, ref, term_scale(base, models, recipe), f"{backend}/large")


def test_window_arithmetic():
    # n = 100, density 0.6, gamma 0.1: T = 60, G = 10, B = 30, D = 10: ranks 10..69 kept
    assert window(0.6, 0.1, 100) == (10, 60)
    # density + gamma > 1: the outlier cut shrinks (B = 0, D = n - T)
    assert window(0.95, 0.1, 100) == (5, 95)
    assert window(1.0, 0.5, 100) is None  # no trim, gamma ignored
    assert window(0.0, 0.1, 100) == (10, 0)  # nothing kept
    assert window(0.5, 0.0, 10) == (0, 5)  # no outliers: the top 5
    recipe = make_recipe(
        3, method="breadcrumbs", has_base=True, density=[0.6, 1.0, 0.0], gamma=[0.1, 0.2, 0.1]
    )
    assert window_ks(recipe, 100) == [(70, 11), None, (0, None)]
    recipe = make_recipe(1, method="breadcrumbs", has_base=True, density=0.5, gamma=0.0)
    assert window_ks(recipe, 10) == [(5, None)]


def test_reference_window_keeps_ties_at_both_ends():
    d = torch.tensor([5.0, 4.0, 4.0, 3.0, 2.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    # T = 5, G = 1: B = 4, D = 1 -> ranks 1..5 = 4, 4, 3, 2, 2 (rank 5 = 2 ties rank 4)
    keep = window_keep(d, 0.5, 0.1)
    assert keep.tolist() == [False, True, True, True, True, True, False, False, False, False]
    d2 = torch.tensor([4.0, 4.0, 3.0, 1.0])  # T = 2, G = 1: D = 1 -> ranks 1..2 (4 ties the cut rank 0)
    assert window_keep(d2, 0.5, 0.25).tolist() == [True, True, True, False]
    assert window_keep(d, 1.0, 0.3) is None


def test_defaults_are_mergekits():
    r = make_recipe(2, method="breadcrumbs", has_base=True)
    assert r.trim_density == (1.0, 1.0) and r.get("gamma") == (0.01, 0.01)
    assert r.combine == "sum" and not r.normalize
    r = make_recipe(2, method="breadcrumbs_ties", has_base=True)
    assert r.combine == "ties" and not r.normalize  # unlike ties, normalize false by default


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
        (dict(gamma=[0.1, 0.2, 0.3]), "gamma: expected a scalar or 2 values"),
        (dict(density=-0.1), r"density must be in \[0, 1\]"),
        (dict(rescale="l1"), "rescale must be True or False for 'breadcrumbs'"),  # true: L1 after the window
        (dict(drop_rate=0.3), "drop_rate"),
        (dict(t=0.3), "t: method 'breadcrumbs' does not take it"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(2, method="breadcrumbs", has_base=True, **kw)


def test_whole_model_thresholds_are_refused():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="thresholds: method 'breadcrumbs'"):
        m3kernels.merge_tensors(x, [x + 1, x - 1], method="breadcrumbs", density=0.5, thresholds=[0.1, 0.1])


def test_multi_k_select_is_used_as_specified(gen, monkeypatch):
    """With ``select_thresholds_multi`` (issue 8's interface: the k-th largest for several k per
    model, in the order given), the window's bounds come from it, each in its place."""
    from m3kernels.merge import select

    skip_unless("cpu", "breadcrumbs")
    calls = []

    def multi(hist, ks_per_model, total):
        calls.append(ks_per_model)
        n = len(ks_per_model)
        out = []
        for i, ks in enumerate(ks_per_model):
            vals = []
            for k in ks:
                one = select.select_thresholds(hist, [k if j == i else None for j in range(n)], total)
                vals.append(int(one[i]))
            out.append(tuple(vals))
        return out

    monkeypatch.setattr(select, "select_thresholds_multi", multi, raising=False)
    base, models = make_inputs((301, 517), 2, (torch.float32, [torch.float32]), gen)
    kw = dict(method="breadcrumbs", density=[0.4, 0.8], gamma=[0.05, 0.3])
    out = m3kernels.merge_tensors(base, models, backend="cpu", **kw)
    assert calls and all(len(ks) == 2 and ks[0] > ks[1] for ks in calls[0])
    recipe = make_recipe(2, has_base=True, **kw)
    ref, _ = reference_merge(base, models, recipe, "w")
    assert_close_ulp(out, ref, term_scale(base, models, recipe), "multi")
