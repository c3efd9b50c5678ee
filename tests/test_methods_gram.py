"""slerp, nuslerp (flattened, row- and column-wise), multislerp, karcher and model_stock.

Through ``merge_tensors`` on every backend whose ``FEATURES`` have the Gram pieces, against the
float64 reference of m3kernels/merge/reference_methods.py (computed from the tensors, not from
a Gram matrix): every dtype mix, N, odd sizes, related (fine-tune-like) and unrelated inputs,
poisoned outputs. The method layer alone (Gram -> coefficients -> y, in float64 with a stand-in
backend) is checked too, so the coefficient math is tested where no kernel has the pieces yet.
Then the edge rules (zero vectors, t = 0, one model), parameters and bad values.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.backends import _load
from m3kernels.errors import M3KError
from m3kernels.merge import registry
from m3kernels.merge.methods import gram as gram_family
from m3kernels.merge.methods import stage
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from cases import DTYPE_CASES, FAMILY_CASES, family_kwargs
from helpers import assert_close_ulp, make_inputs
from method_matrix import BACKENDS, matrix

GRAM_CASES = [c for c, (kw, _) in FAMILY_CASES.items() if registry.get_method(kw["method"]).family == "gram"]
SHAPES = [(1,), (7,), (37, 129), (3, 5, 7)]


def _needs_base(method: str) -> bool:
    return registry.get_method(method).needs_base


def _scale(base, models, recipe=None) -> torch.Tensor:
    """The magnitude of the combined terms, |b| + Σ|c_i·v_i| with the coefficients the method
    layer computes (they can be far from 1 when unit vectors nearly cancel), for the float32
    error bound; without a recipe, coefficients of order one."""
    if recipe is None:
        s = sum(
            (m.to(torch.float64).abs() for m in models), torch.zeros(models[0].shape, dtype=torch.float64)
        )
        return 4 * (s + (base.to(torch.float64).abs() if base is not None else 0.0))
    xs, b, c = _terms64(stage(base, models, recipe, "w", _stand_in_backend()))
    n = len(xs)
    s = b.abs() + sum(c[:, i].abs() * ((xs[i] - b).abs() + b.abs()) for i in range(n))
    return 4 * s.reshape(models[0].shape)


def _inputs(case, n, shape, dtype_case, gen, related, with_base=True):
    base_dt, model_dts, _ = DTYPE_CASES[dtype_case]
    base, models = make_inputs(shape, n, (base_dt, model_dts), gen, related=related)
    kw = family_kwargs(case, n)
    if not with_base and not _needs_base(kw["method"]):
        base = None
    return base, models, kw


def _needed(kw: dict) -> list:
    """The kernel features a case needs: the Gram, and group tables for row / column groups."""
    grouped = kw.get("nuslerp_flatten") is False or kw.get("filter_wise") is True
    return ["gram"] + (["group_coef"] if grouped else [])


def _skip_unless(backend: str, kw: dict):
    have = getattr(_load(backend), "FEATURES", frozenset())
    missing = [f for f in _needed(kw) if f not in have]
    if missing:
        pytest.skip(f"backend {backend} has no {', '.join(missing)} yet (FEATURES)")


def _check(backend, case, n, shape, dtype_case, gen, related, with_base=True):
    base, models, kw = _inputs(case, n, shape, dtype_case, gen, related, with_base)
    out_dt = DTYPE_CASES[dtype_case][2]
    dev = "cuda" if backend in ("cuda",) else "cpu"
    out = torch.full(shape, float("nan"), dtype=out_dt, device=dev)  # poisoned
    b = base.to(dev) if base is not None else None
    m3kernels.merge_tensors(b, [m.to(dev) for m in models], out=out, backend=backend, name="w", **kw)
    recipe = make_recipe(n, has_base=base is not None, **kw)
    ref, _ = reference_merge(base, models, recipe, "w")
    scale = _scale(base, models, recipe)
    assert_close_ulp(out.cpu(), ref, scale, f"{backend}/{case}/N={n}/{shape}/{dtype_case}")


def _runs(case):
    return FAMILY_CASES[case][1]


MATRIX = matrix(GRAM_CASES)


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    _skip_unless(backend, FAMILY_CASES[case][0])
    interp = backend == "triton"  # the interpreter is slow: the largest N, two shapes
    for n in _runs(case)[-1:] if interp else _runs(case):
        for shape in ((7,), (3, 5, 7)) if interp else SHAPES:
            _check(backend, case, n, shape, dtype_case, gen, related=True)
            if shape[0] > 1:  # unrelated vectors: the spherical branches
                _check(backend, case, n, shape, dtype_case, gen, related=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nuslerp", "nuslerp_rows", "nuslerp_cols", "multislerp", "multislerp_w"])
def test_without_a_base(backend, case, gen):
    _skip_unless(backend, FAMILY_CASES[case][0])
    for n in _runs(case)[-1:] if backend == "triton" else _runs(case):
        for shape in ((7,), (3, 5, 7)) if backend == "triton" else ((7,), (37, 129), (3, 5, 7)):
            _check(backend, case, n, shape, "mixed", gen, related=False, with_base=False)


# ------------------------------------------------------------------ the method layer alone
def _stand_in_backend():
    """Gram matrices in float64 over the float32 vectors (the reference's own sums), and the
    FEATURES of the pieces; stage B is evaluated below in float64 from the coefficient table."""
    mod = types.ModuleType("stand_in")
    mod.FEATURES = frozenset({"gram", "group_coef"})
    mod.gram = lambda p, base, models: gram_family.finite_gram(
        base if p.has_base else None, models, p.coef_group, p.row_len
    )[0]
    return mod


def _terms64(st):
    """(the flat models, the flat base (zeros without one), the [numel, n] coefficient of each
    position and model) of a staged merge, in float64."""
    p = st.params
    xs = [m.to(torch.float64).reshape(-1) for m in st.models]
    b = st.base.to(torch.float64).reshape(-1) if p.has_base else torch.zeros_like(xs[0])
    numel, n = xs[0].numel(), len(xs)
    if p.coef_group == 0:
        c = torch.tensor(np.asarray(p.coef, dtype=np.float64))[None, :].expand(numel, n)
    else:
        table = torch.tensor(np.asarray(p.group_coef, dtype=np.float64)).reshape(-1, n)
        j = torch.arange(numel)
        c = table[j // p.row_len if p.coef_group == 1 else j % p.row_len]
    return xs, b, c


def _stage_b64(st, shape) -> torch.Tensor:
    xs, b, c = _terms64(st)
    n = len(xs)
    return (b + sum(c[:, i] * (xs[i] - b) for i in range(n))).reshape(shape)


@pytest.mark.parametrize("case", GRAM_CASES)
def test_coefficients_reproduce_the_reference(case, gen):
    """Gram -> float64 coefficients -> float32 table -> y equals the reference (which never forms a
    Gram matrix) to the float32 rounding of the coefficients."""
    be = _stand_in_backend()
    for n in _runs(case):
        for shape in ((7,), (37, 129), (3, 5, 7)):
            for related in (True, False):
                base, models, kw = _inputs(case, n, shape, "f32", gen, related)
                recipe = make_recipe(n, has_base=base is not None, **kw)
                y = _stage_b64(stage(base, models, recipe, "w", be), shape)
                ref, _ = reference_merge(base, models, recipe, "w")
                err = float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
                assert err < 3e-6, (case, n, shape, related, err)


def test_stand_in_rows_and_columns_differ_from_flattened(gen):
    """Row / column groups give other coefficients than one vector per tensor (the table is used)."""
    be = _stand_in_backend()
    base, models = make_inputs((6, 10), 2, (torch.float32, [torch.float32]), gen, related=False)
    outs = []
    for extra in ({}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        recipe = make_recipe(2, method="nuslerp", has_base=True, **extra)
        st = stage(base, models, recipe, "w", be)
        assert st.params.coef_group == (0 if not extra else 2 if extra.get("nuslerp_row_wise") else 1)
        assert st.params.row_len == (1 if not extra else 10)
        outs.append(_stage_b64(st, (6, 10)))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


# ------------------------------------------------------------------ edge rules (reference = mergekit's)
def _ref(base, models, **kw):
    recipe = make_recipe(len(models), has_base=base is not None, **kw)
    return reference_merge(base, models, recipe, "w")[0]


def _stand_in(base, models, **kw):
    recipe = make_recipe(len(models), has_base=base is not None, **kw)
    return _stage_b64(stage(base, models, recipe, "w", _stand_in_backend()), models[0].shape)


@pytest.mark.parametrize("fn", [_ref, _stand_in])
def test_edge_rules(fn, gen):
    base = torch.randn(50, generator=gen)
    x = base + 0.1 * torch.randn(50, generator=gen)
    z = torch.zeros(50)
    # slerp: t = 0 is the base, t = 1 the model; a zero tensor counts as orthogonal
    assert torch.allclose(fn(base, [x], method="slerp", t=0.0), base.double(), atol=1e-6)
    assert torch.allclose(fn(base, [x], method="slerp", t=1.0), x.double(), atol=1e-6)
    half = fn(z, [x], method="slerp", t=0.5)
    assert torch.allclose(half, np.sin(np.pi / 4) * x.double(), atol=1e-6)
    # nuslerp: an unchanged model (zero task vector) -> base + sin(t π/2) v_B
    got = fn(base, [base.clone(), x], method="nuslerp")
    assert torch.allclose(got, base.double() + np.sin(np.pi / 4) * (x.double() - base.double()), atol=1e-6)
    # parallel task vectors interpolate linearly
    d = x - base
    got = fn(base, [base + d, base + 2 * d], method="nuslerp", weights=[1.0, 3.0])
    assert torch.allclose(got, base.double() + 1.75 * d.double(), atol=1e-5)
    # multislerp / karcher with one model: that model
    assert torch.allclose(fn(base, [x], method="multislerp"), x.double(), atol=1e-6)
    assert torch.allclose(fn(None, [x], method="karcher"), x.double(), atol=1e-6)
    # karcher of two equal points: the point
    assert torch.allclose(fn(None, [x, x.clone()], method="karcher"), x.double(), atol=1e-5)
    # model_stock: identical task vectors (cos 1) give t = 1, the average
    assert torch.allclose(fn(base, [x, x.clone()], method="model_stock"), x.double(), atol=1e-5)
    # model_stock: orthogonal task vectors (cos 0) give t = 0, the base
    e1, e2 = torch.zeros(50), torch.zeros(50)
    e1[0], e2[1] = 1.0, 1.0
    assert torch.allclose(fn(base, [base + e1, base + e2], method="model_stock"), base.double(), atol=1e-6)
    # model_stock with unchanged models (all deltas 0): the clamp gives cos 0, t = 0, the base
    assert torch.allclose(fn(base, [base.clone(), base.clone()], method="model_stock"), base.double())


def test_multislerp_antipodal_inputs_are_an_error():
    base = torch.zeros(8)
    x = torch.linspace(-1, 1, 8) + 0.1
    with pytest.raises(ValueError, match="zero"):
        _ref(base, [x, -x, 2 * x], method="multislerp", weights=[1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="zero"):
        _stand_in(base, [x, -x, 2 * x], method="multislerp", weights=[1.0, 2.0, 1.0])
    # two antipodal models: mergekit's fallback, the weighted sum
    got = _stand_in(base, [x, -x], method="multislerp")
    assert torch.allclose(got, torch.zeros(8, dtype=torch.float64), atol=1e-7)


def test_slerp_m3_draws_t_from_beta():
    r = make_recipe(1, method="slerp", has_base=True, mixup_alpha=0.7, seed=9)
    lam = m3kernels.draw_mix_ratios(0.7, 2, 9)
    assert r.get("t") == pytest.approx(lam[1], rel=1e-7)
    assert make_recipe(1, method="slerp", has_base=True, mix_ratios=0.25).get("t") == 0.75
    # a tiny draw is a valid t (the coefficients are computed in float64)
    assert make_recipe(1, method="slerp", has_base=True, mix_ratios=[1.0, 1e-50]).get("t") == 1e-50
    with pytest.raises(ValueError, match="t: give t or M³"):
        make_recipe(1, method="slerp", has_base=True, t=0.5, mixup_alpha=0.7)


def test_nuslerp_and_multislerp_m3_multiply_the_weights():
    r = make_recipe(2, method="nuslerp", has_base=True, weights=[1.0, 2.0], mix_ratios=[0.3, 0.7])
    assert r.coefs == pytest.approx((0.3, 1.4))
    r = make_recipe(3, method="karcher", has_base=False, mixup_alpha=1.5, seed=2)
    assert sum(r.mix_ratios) == pytest.approx(1.0) and len(set(r.mix_ratios)) == 3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="slerp"), "t: method 'slerp' needs t"),
        (dict(method="slerp", t="0.5"), "t must be a number"),
        (dict(method="slerp", t=float("nan")), "t must be finite"),
        (dict(method="slerp", t=0.5, weights=1.0), "weight: method 'slerp' does not take it"),
        (dict(method="karcher", max_iter=-1), r"max_iter must be an integer in \[0, 100000\]"),
        (dict(method="karcher", max_iter=2.5), "max_iter must be an integer"),
        (dict(method="karcher", max_iter=True), "max_iter must be an integer"),
        (dict(method="karcher", tol=float("inf")), "tol must be finite"),
        (dict(method="multislerp", normalize_weights=1), "normalize_weights must be True or False"),
        (dict(method="nuslerp", nuslerp_flatten="no"), "nuslerp_flatten must be True or False"),
        (dict(method="model_stock", filter_wise=True, t=0.5), "t: method 'model_stock' does not take it"),
        (dict(method="model_stock", mixup_alpha=0.5), "mixup_alpha: method 'model_stock' does not take M³"),
        (dict(method="model_stock", lambda_=0.5), "lambda: method 'model_stock' does not take it"),
        (dict(method="multislerp", weights=[1.0, -1.0, 0.0]), "sum to 0"),
    ],
)
def test_bad_parameters(kw, match):
    base = torch.randn(12)
    models = [base + 0.1 * torch.randn(12) for _ in range(1 if kw["method"] == "slerp" else 3)]
    if kw["method"] == "nuslerp":
        models = models[:2]
    with pytest.raises(ValueError, match=match):
        make_recipe(len(models), has_base=True, **kw)
        _stand_in(base, models, **kw)  # errors found at the merge (multislerp's zero sum)


@pytest.mark.parametrize(
    "method,n",
    [("slerp", 2), ("nuslerp", 1), ("nuslerp", 3), ("model_stock", 1)],
)
def test_model_counts(method, n):
    with pytest.raises(ValueError, match=f"method '{method}' takes"):
        make_recipe(n, method=method, has_base=True, t=0.5) if method == "slerp" else make_recipe(
            n, method=method, has_base=True
        )


def test_gram_non_finite_is_recomputed_over_finite_elements(caplog):
    """A NaN in one model does not make every coefficient NaN (warned, as for the L1 sums)."""
    be = _stand_in_backend()
    be.gram = lambda p, base, models: np.full((1, len(models), len(models)), np.nan)
    base = torch.randn(40)
    x = base + 0.1 * torch.randn(40)
    x[3] = float("nan")
    recipe = make_recipe(1, method="slerp", has_base=True, t=0.4)
    st = stage(base, [x], recipe, "w.nan", be)
    assert np.all(np.isfinite(st.params.coef))
    assert "w.nan" in caplog.text


def test_missing_feature_is_a_clear_error():
    be = _stand_in_backend()
    be.FEATURES = frozenset({"gram"})
    base = torch.randn(4, 6)
    models = [base + 1, base - 1]
    recipe = make_recipe(2, method="model_stock", has_base=True, filter_wise=True)
    with pytest.raises(ValueError, match="not implemented on backend 'stand_in' yet.*group_coef") as ei:
        stage(base, models, recipe, "w", be)
    assert isinstance(ei.value, M3KError)  # the CLI reports it as a user error, not an internal one
    recipe = make_recipe(2, method="model_stock", has_base=True)
    stage(base, models, recipe, "w", be)  # per tensor: no group table needed
