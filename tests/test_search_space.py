"""The search space (m3kernels/search/space.py): candidates of each axis, their configs, the
strict ``search:`` block and the empty-space error. No model is loaded."""

from __future__ import annotations

import math

import pytest

from m3kernels import draw_mix_ratios
from m3kernels.checkpoint.config import parse_config
from m3kernels.merge.registry import method_names
from m3kernels.search.errors import SearchError
from m3kernels.search.space import build_candidates, parse_space, simplex_points

RAW = {
    "merge_method": "ties",
    "base_model": "/m/base",
    "models": [
        {"model": "/m/a", "parameters": {"weight": 1.0, "density": 0.3}},
        {"model": "/m/b", "parameters": {"weight": 0.5, "density": 0.4}},
    ],
    "parameters": {"normalize": True},
}
RAW3 = dict(RAW, models=RAW["models"] + [{"model": "/m/c"}])


def cands(raw=RAW, **space):
    cfg = parse_config(dict(raw))
    return build_candidates(raw, len(cfg.models), parse_space(space), cfg.method, cfg.mixup)


def test_draws_follow_the_seed_scheme_and_draw_mix_ratios():
    cs = cands(alphas=[0.5, 2.0], draws=3, seed=10)
    assert [c.mix for c in cs] == ["draw"] * 6
    for a_i, alpha in enumerate((0.5, 2.0)):
        for k in range(3):
            c = cs[a_i * 3 + k]
            assert c.seed == 10 + a_i * 3 + k and c.alpha == alpha
            assert c.ratios == draw_mix_ratios(alpha, 2, c.seed)
            assert c.config["mixup"] == {"alpha": alpha, "seed": c.seed}
            # the config's own draw gives the same ratios
            assert parse_config(c.config).mix_ratios() == c.ratios
    assert len({c.key for c in cs}) == 6


def test_lambda_grid_plain_and_product_order():
    cs = cands(methods="ties,task_arithmetic", lambdas="0.25,0.75", plain=True, scales=[1.0, 0.5])
    # methods outermost, then scales, then plain before the grid
    assert [(c.method, c.scale, c.mix, c.lam) for c in cs[:3]] == [
        ("ties", 1.0, "plain", None),
        ("ties", 1.0, "lambda", 0.25),
        ("ties", 1.0, "lambda", 0.75),
    ]
    assert len(cs) == 12
    ta = [c for c in cs if c.method == "task_arithmetic"]
    for c in ta:  # task_arithmetic takes no density: dropped from every model
        assert all("density" not in (e.get("parameters") or {}) for e in c.config["models"])
        assert c.config["parameters"]["lambda"] == c.scale
    assert "mixup" not in cs[0].config and cs[1].config["mixup"] == {"lambda": 0.25}


def test_linear_drops_base_and_scale_and_dedups():
    cs = cands(methods=["linear", "ties"], scales=[1.0, 2.0], lambdas=[0.5])
    lin = [c for c in cs if c.method == "linear"]
    assert len(lin) == 1 and lin[0].scale is None  # linear takes no lambda in a config
    assert "base_model" not in lin[0].config
    assert len(cs) == 3


def test_density_axis_overrides_per_model_and_drop_rate():
    raw = dict(RAW, merge_method="dare_ties")
    raw["models"] = [
        {"model": "/m/a", "parameters": {"drop_rate": 0.3}},
        {"model": "/m/b", "parameters": {"drop_rate": 0.3}},
    ]
    cs = cands(raw, densities=[0.2, 0.9], plain=True)
    for c, d in zip(cs, (0.2, 0.9)):
        assert c.density == d and c.config["parameters"]["density"] == d
        assert all("drop_rate" not in (e.get("parameters") or {}) for e in c.config["models"])
        kw = parse_config(c.config).tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
        assert kw["density"] == [d, d]


def test_simplex_grid_for_three_models():
    pts = simplex_points(3, 4)
    assert len(pts) == math.comb(4 + 2, 2)
    assert all(abs(sum(p) - 1) < 1e-12 and min(p) >= 0 for p in pts)
    assert len(set(pts)) == len(pts)
    cs = cands(RAW3, simplex=2)
    assert [c.mix for c in cs] == ["ratios"] * 6 and "mixup" not in cs[0].config
    assert cs[0].ratios == (1.0, 0.0, 0.0)
    # for two models the simplex is the λ grid, written as mixup.lambda
    two = cands(simplex=4)
    assert [c.lam for c in two] == [1.0, 0.75, 0.5, 0.25, 0.0] and two[1].config["mixup"] == {"lambda": 0.75}
    # Dirichlet draws for N > 2
    d = cands(RAW3, alphas=[1.0], draws=2)
    assert d[1].ratios == draw_mix_ratios(1.0, 3, 1) and len(d[1].ratios) == 3


def test_config_mixup_is_the_default_axis():
    raw = dict(RAW, mixup={"alpha": 0.5, "seed": 3})
    (c,) = cands(raw)
    assert c.mix == "config" and c.ratios == draw_mix_ratios(0.5, 2, 3) and c.config["mixup"] == raw["mixup"]


def test_methods_come_from_the_registry():
    cs = cands(
        methods=list(m for m in method_names() if m in ("linear", "task_arithmetic", "ties")), plain=True
    )
    assert {c.method for c in cs} == {"linear", "task_arithmetic", "ties"}


@pytest.mark.parametrize(
    "space, needle",
    [
        (dict(alphas=[1.0], draws=0), "no candidate"),
        (dict(methods=[]), "no candidate"),
        (dict(lambdas=[]), "no candidate"),
        (dict(methods=["slerp"]), "slerp"),
        (dict(methods=["nonsense"]), "supported"),
        (dict(lambdas=[1.5]), "search.lambdas[0]"),
        (dict(alphas=[0]), "search.alphas[0]"),
        (dict(alphas="1,,2"), "empty item"),
        (dict(draws=-1), "search.draws"),
        (dict(seed=2**32), "search.seed"),
        (dict(simplex=0), "search.simplex"),
        (dict(plain="yes"), "search.plain"),
        (dict(max_candidates=0), "search.max_candidates"),
        (dict(densities=[2]), "search.densities[0]"),
        (dict(lambdaz=[0.5]), "unknown key"),
    ],
)
def test_bad_spaces_name_the_key(space, needle):
    with pytest.raises(SearchError, match=None) as e:
        cands(**space)
    assert needle in str(e.value)


def test_a_method_without_its_required_parameter_is_named():
    raw = dict(RAW, models=[{"model": "/m/a"}, {"model": "/m/b"}])
    # (dare_ties without density is mergekit's density 1 in a config now; ties_dare needs drop_rate)
    with pytest.raises(SearchError, match="candidate method=ties_dare.*drop_rate"):
        cands(raw, methods=["ties", "ties_dare"], plain=True)


def test_lambdas_need_two_models():
    with pytest.raises(SearchError, match="exactly 2 models"):
        cands(RAW3, lambdas=[0.5])


def test_max_candidates_keeps_the_first():
    cs = cands(lambdas=[0.1, 0.2, 0.3, 0.4], max_candidates=2)
    assert [c.lam for c in cs] == [0.1, 0.2]
