"""mergekit 0.1.5's defaults and meanings in a config, where the tensor API keeps its own
(docs/CONFIG.md "Differences from mergekit", docs/MERGEKIT_PARITY.md D1, D6-D8, D10).

Each rule is checked on the config (what ``tensor_kwargs`` hands on), on the recipe it makes, and
where it changes numbers, on a merged tensor against a float64 reference computed here."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.checkpoint import config as config_mod
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.registry import DEFAULT_TRIM_DENSITY

NAME = "model.layers.1.mlp.up_proj.weight"


def cfg_for(method, models=("m/a", "m/b"), **top):
    raw = {"merge_method": method, "models": [{"model": m} for m in models]}
    if method != "linear":
        raw["base_model"] = "m/base"
    if top:
        raw["parameters"] = top
    return load_config(raw)


def recipe_of(cfg, name=NAME, layers=2):
    kw = cfg.tensor_kwargs(name, layers)
    return make_recipe(len(cfg.models), method=cfg.method, has_base=True, **kw), kw


def tensors(seed, n=2, shape=(37, 29), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    models = [base + torch.randn(shape, generator=g) * 0.02 for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


# ------------------------------------------------------------------ D6 / D7: density defaults to 1


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_trim_density_defaults_to_one_in_a_config(method):
    rec, kw = recipe_of(cfg_for(method))
    assert kw["density"] == [1.0, 1.0]
    assert rec.trim_density == (1.0, 1.0)
    # the tensor API keeps its documented default
    expect = DEFAULT_TRIM_DENSITY if method == "ties" else 1.0
    assert make_recipe(2, method=method, has_base=True).trim_density == (expect, expect)


def test_ties_dare_is_ours_and_keeps_its_defaults_in_a_config():
    rec, _ = recipe_of(cfg_for("ties_dare", drop_rate=0.5))
    assert rec.trim_density == (DEFAULT_TRIM_DENSITY,) * 2 and rec.rescale == "density"
    rec, _ = recipe_of(cfg_for("ties_dare", drop_rate=0.5, rescale=True))
    assert rec.rescale == "density"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_defaults_to_one_in_a_config(method):
    rec, kw = recipe_of(cfg_for(method))
    assert kw["density"] == [1.0, 1.0] and rec.dare_density == (1.0, 1.0)
    with pytest.raises(ValueError, match="needs density"):  # the API still requires it
        make_recipe(2, method=method, has_base=True)


def test_one_model_sets_density_the_other_gets_mergekits_one():
    raw = {
        "merge_method": "dare_linear",
        "base_model": "m/base",
        "models": [
            {"model": "m/a", "parameters": {"density": 0.3}},
            {"model": "m/b", "parameters": {"drop_rate": 0.25}},  # density = 1 - drop_rate
            {"model": "m/c"},
        ],
    }
    _, kw = recipe_of(load_config(raw))
    assert kw["density"] == pytest.approx([0.3, 0.75, 1.0])
    raw["merge_method"] = "ties"
    raw["models"][1]["parameters"] = {"weight": 0.5}
    _, kw = recipe_of(load_config(raw))
    assert kw["density"] == [0.3, 1.0, 1.0]


def test_top_level_density_still_serves_every_model():
    _, kw = recipe_of(cfg_for("ties", density=0.4))
    assert kw["density"] == [0.4, 0.4]


def test_ties_without_density_merges_like_no_trim():
    """mergekit's ties with defaults: no trim, sign election, disjoint mean (float64 here)."""
    base, models = tensors(3)
    rec, kw = recipe_of(cfg_for("ties"))
    out = torch.full_like(base, float("nan"))
    m3kernels.merge_tensors(base, models, method="ties", name=NAME, out=out, backend="cpu", **kw)
    d = np.stack([(m.double() - base.double()).numpy() for m in models])
    s = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(d) == s) & (d != 0)
    num, den = (d * agree).sum(0), agree.sum(0)
    ref = base.double().numpy() + np.where(den > 0, num / np.maximum(den, 1), 0.0)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=4e-8)
    assert not torch.isnan(out).any()


def test_dare_linear_without_density_drops_nothing():
    base, models = tensors(4)
    _, kw = recipe_of(cfg_for("dare_linear"))
    out = torch.full_like(base, float("nan"))
    m3kernels.merge_tensors(base, models, method="dare_linear", name=NAME, out=out, backend="cpu", **kw)
    ref = base.double() + sum(m.double() - base.double() for m in models)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=4e-8)


# ------------------------------------------------------------------ D8: rescale true is the L1 rule


@pytest.mark.parametrize(
    "value,mode",
    [(None, "l1"), (True, "l1"), ("l1", "l1"), ("density", "density"), (False, "none")],
)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_rescale_in_a_config(method, value, mode):
    top = {"density": 0.5}
    if value is not None:
        top["rescale"] = value
    rec, _ = recipe_of(cfg_for(method, **top))
    assert rec.rescale == mode


def test_api_rescale_true_stays_one_over_density():
    r = make_recipe(2, method="dare_linear", has_base=True, density=0.5, rescale=True)
    assert r.rescale == "density"
    assert make_recipe(2, method="dare_linear", has_base=True, density=0.5).rescale == "density"


def test_config_rescale_true_keeps_each_tensors_l1_norm():
    """One model, dare_linear, density 0.3: with the L1 rule Σ|y − b| = Σ|δ| per tensor (to
    float32 rounding); the 1/density rule only on average (differs on a small tensor)."""
    base, models = tensors(5, n=1, shape=(36,))
    ratios = {}
    for value in (True, "density"):
        _, kw = recipe_of(cfg_for("dare_linear", models=("m/a",), density=0.3, rescale=value))
        out = m3kernels.merge_tensors(
            base, models, method="dare_linear", name=NAME, seed=3, backend="cpu", **kw
        )
        ratios[value] = float(
            (out.double() - base.double()).abs().sum() / (models[0].double() - base.double()).abs().sum()
        )
    assert ratios[True] == pytest.approx(1.0, abs=2e-6)
    assert abs(ratios["density"] - 1.0) > 1e-3


def test_bad_rescale_values_name_the_choices():
    with pytest.raises(MergeConfigError, match="parameters.rescale.*'density'"):
        cfg_for("dare_linear", density=0.5, rescale="l2")


# ------------------------------------------------------------------ D10: declared but ignored


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"density": 0.5}),
        ("task_arithmetic", {"rescale": True}),
        ("task_arithmetic", {"density": [0.1, 0.9], "rescale": False, "int8_mask": True}),
        ("linear", {"density": 0.5, "rescale": True, "lambda": 0.5}),
    ],
)
def test_parameters_mergekit_ignores_are_accepted_without_effect(method, params, caplog):
    config_mod._warned.clear()
    plain = cfg_for(method)
    with caplog.at_level(logging.WARNING, logger="m3kernels"):
        cfg = cfg_for(method, **params)
        cfg_for(method, **params)  # a second read: no second warning
    for name in ("model.embed_tokens.weight", NAME, "lm_head.weight"):
        assert cfg.tensor_kwargs(name, 2) == plain.tensor_kwargs(name, 2)
    # rescale: false is mergekit's own default (no warning); the others warn once
    ignored = [
        p for p, v in params.items() if p in config_mod.IGNORED_LIKE_MERGEKIT[method] and v is not False
    ]
    warnings = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(warnings) == len(ignored), warnings
    for p in ignored:
        assert any(repr(p) in w and method in w for w in warnings)


def test_ignored_parameter_per_model_is_accepted_too():
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": "m/base",
        "models": [{"model": "m/a", "parameters": {"weight": 0.7, "density": 0.5}}, {"model": "m/b"}],
    }
    assert load_config(raw).tensor_kwargs(NAME, 2)["weights"] == [0.7, 1.0]


def breadcrumbs_l1_reference(base, models, weights, densities, gammas):
    """mergekit's breadcrumbs with rescale: true, from its semantics: per model the descending
    ranks D .. D + T − 1 of |δ| kept (T = ⌊d·n⌋, G = ⌊γ·n⌋, B = max(0, n − T − G), D = n − B − T;
    every element tied with an end kept, as m3kernels does), × f = Σ|δ| / Σ(those T values),
    then the weighted sum (float64)."""
    b = base.float()
    out = b.double().clone()
    for x, w, dens, gam in zip(models, weights, densities, gammas):
        d = x.float() - b
        a = d.abs().reshape(-1)
        n = a.numel()
        t, g = int(np.floor(dens * n)), int(np.floor(gam * n))
        top = n - max(0, n - t - g) - t
        vals = torch.sort(a, descending=True).values
        f = np.float32(float(a.double().sum()) / float(vals[top : top + t].double().sum()))
        keep = d.abs() >= vals[top + t - 1]
        if top > 0:
            keep &= d.abs() <= vals[top]
        kept = torch.where(keep, d * torch.tensor(f), torch.zeros(()))
        out += float(np.float32(w)) * kept.double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 29), (500,)])
def test_breadcrumbs_rescale_true_is_mergekits_l1_after_the_window(dtype, shape):
    base, models = tensors(13, n=2, shape=shape, dtype=dtype)
    raw = {
        "merge_method": "breadcrumbs",
        "base_model": "m/base",
        "models": [
            {"model": "m/a", "parameters": {"weight": 0.6, "density": 0.6, "gamma": 0.05}},
            {"model": "m/b", "parameters": {"weight": 0.4, "density": 0.5, "gamma": 0.0}},
        ],
        "parameters": {"rescale": True},
    }
    rec, kw = recipe_of(load_config(raw))
    assert rec.rescale == "l1"
    out = torch.full(base.shape, float("nan"), dtype=torch.float32)
    m3kernels.merge_tensors(base, models, method="breadcrumbs", name=NAME, out=out, backend="cpu", **kw)
    ref = breadcrumbs_l1_reference(base, models, [0.6, 0.4], [0.6, 0.5], [0.05, 0.0])
    scale = float(ref.sub(base.double()).abs().max())
    assert float((out.double() - ref).abs().max()) <= 4 * scale * 2**-23
    plain = m3kernels.merge_tensors(
        base, models, method="breadcrumbs", name=NAME, backend="cpu", **{**kw, "rescale": False}
    )
    assert float((plain.double() - ref).abs().max()) > 100 * scale * 2**-23


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_rescale_keeps_one_models_l1_norm(method):
    base, models = tensors(14, n=1, shape=(53, 31))
    for density, gamma in ((0.5, 0.05), (0.3, 0.0), (0.9, 0.2), (0.05, 0.5)):
        out = m3kernels.merge_tensors(
            base, models, method=method, density=density, gamma=gamma, rescale=True, backend="cpu"
        )
        ratio = (out.double() - base.double()).abs().sum() / (models[0].double() - base.double()).abs().sum()
        assert float(ratio) == pytest.approx(1.0, abs=1e-6), (density, gamma)


def ties_l1_reference(base, models, weights, densities):
    """mergekit's ties with rescale: true, written from its semantics: per model the k largest
    |δ| kept (all ties at the k-th kept, as m3kernels does), × f = Σ|δ| / Σ(k largest |δ|) (one
    float32 rounding of the factor, then of the product), weighted vote in float32, disjoint
    weighted mean in float64."""
    b = base.float()
    kept = []
    for x, dens in zip(models, densities):
        d = x.float() - b
        a = d.abs().reshape(-1)
        k = max(1, int(np.floor(dens * a.numel())))
        top = torch.sort(a, descending=True).values
        f = np.float32(float(a.double().sum()) / float(top[:k].double().sum()))
        keep = d.abs() >= top[k - 1]
        kept.append(torch.where(keep, d * torch.tensor(f), torch.zeros(())))
    vote = torch.zeros_like(b)
    for w, d in zip(weights, kept):
        vote = vote + torch.tensor(np.float32(w)) * d
    pos = vote >= 0
    num = torch.zeros(b.shape, dtype=torch.float64)
    den = torch.zeros(b.shape, dtype=torch.float64)
    for w, d in zip(weights, kept):
        agree = (d != 0) & ((d > 0) == pos)
        num += agree * (float(np.float32(w)) * d.double())
        den += agree * float(np.float32(w))
    return b.double() + torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 29), (1000,), (7,)])
def test_ties_rescale_true_is_mergekits_l1_after_the_trim(dtype, shape):
    base, models = tensors(11, n=3, shape=shape, dtype=dtype)
    raw = {
        "merge_method": "ties",
        "base_model": "m/base",
        "models": [
            {"model": "m/a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "m/b", "parameters": {"weight": 0.4, "density": 0.3}},
            {"model": "m/c", "parameters": {"weight": 0.9, "density": 0.7}},
        ],
        "parameters": {"rescale": True},
    }
    rec, kw = recipe_of(load_config(raw))
    assert kw["rescale"] is True and rec.rescale == "l1"
    out = torch.full(base.shape, float("nan"), dtype=torch.float32)
    m3kernels.merge_tensors(base, models, method="ties", name=NAME, out=out, backend="cpu", **kw)
    ref = ties_l1_reference(base, models, [0.6, 0.4, 0.9], [0.5, 0.3, 0.7])
    scale = float(ref.sub(base.double()).abs().max())
    assert float((out.double() - ref).abs().max()) <= 4 * scale * 2**-23
    plain = m3kernels.merge_tensors(
        base, models, method="ties", name=NAME, backend="cpu", **{**kw, "rescale": False}
    )
    assert float((plain.double() - ref).abs().max()) > 100 * scale * 2**-23  # the rescale changes it


def test_ties_rescale_keeps_one_models_l1_norm_per_tensor():
    base, models = tensors(12, n=1, shape=(53, 31))
    for density in (0.1, 0.37, 0.9):
        out = m3kernels.merge_tensors(
            base, models, method="ties", density=density, rescale=True, backend="cpu"
        )
        ratio = float(
            (out.double() - base.double()).abs().sum() / (models[0].double() - base.double()).abs().sum()
        )
        assert ratio == pytest.approx(1.0, abs=1e-6)
    same = m3kernels.merge_tensors(base, models, method="ties", density=1.0, rescale=True, backend="cpu")
    assert torch.equal(same, m3kernels.merge_tensors(base, models, method="ties", density=1.0, backend="cpu"))


def test_still_rejected_where_it_would_change_the_result():
    with pytest.raises(MergeConfigError, match="drop_rate"):
        cfg_for("task_arithmetic", drop_rate=0.5)  # ours only, not mergekit's
    with pytest.raises(MergeConfigError, match="parameters.gamma"):
        cfg_for("ties", gamma=0.1)


# ------------------------------------------------------------------ D1: linear accumulates with an FMA


def test_linear_recipe_uses_fma_and_the_others_do_not():
    raw = {"merge_method": "linear", "models": [{"model": "m/a"}, {"model": "m/b"}]}
    rec, _ = recipe_of(load_config(raw))
    assert rec.fma is True
    assert make_recipe(2, method="linear", has_base=False).fma is True
    for method, kw in (("task_arithmetic", {}), ("ties", {}), ("dare_linear", {"density": 0.5})):
        assert make_recipe(2, method=method, has_base=True, **kw).fma is False


# ------------------------------------------------------------------ bools as mergekit (pydantic) reads them


@pytest.mark.parametrize(
    "value,expect",
    [(1.0, True), (0, False), ("yes", True), ("Off", False), ("t", True), ("0", False), (True, True)],
)
def test_bool_parameters_read_like_mergekit(value, expect):
    rec, kw = recipe_of(cfg_for("ties", density=0.5, normalize=value))
    assert kw["normalize"] is expect and rec.normalize is expect


@pytest.mark.parametrize("value", [2, 0.5, "maybe", "", [1, 2]])
def test_other_bool_values_are_refused(value):
    with pytest.raises(MergeConfigError, match="parameters.normalize"):
        cfg_for("ties", density=0.5, normalize=value)


def test_l1_kept_sums_equal_mergekits_exact_counts_under_ties():
    """The kept sums behind the factors equal those of exactly k (ties) / the window's T ranks
    (breadcrumbs) taken from a full sort, on inputs full of ties (the ends tied included)."""
    from m3kernels.merge.methods.breadcrumbs import window
    from m3kernels.merge.trim_rescale import l1_factors, window_l1_factors

    g = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(300):
        n = int(torch.randint(5, 300, (1,), generator=g))
        sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        x = torch.randint(0, 6, (n,), generator=g).float() * 0.25 * sign
        base = torch.zeros(n)
        dens, gam = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)) * 0.5
        a = x.abs()
        srt = torch.sort(a, descending=True).values
        total = float(a.double().sum())

        def want(kept, total=total):
            return 1.0 if total < 1e-7 or kept < 1e-7 else float(np.float32(total / kept))

        def bits(v):
            return int(v.view(torch.int32))

        k = max(1, int(np.floor(dens * n)))
        if bits(srt[k - 1]) != 0:
            assert l1_factors(base, [x], [bits(srt[k - 1])], [k])[0] == want(float(srt[:k].double().sum()))
        w = window(dens, gam, n)
        if w is not None and w[1] > 0:
            d0, t = w
            hi = bits(srt[d0]) if d0 > 0 else 0xFFFFFFFF
            got = window_l1_factors(base, [x], [bits(srt[d0 + t - 1])], [hi], [w])[0]
            assert got == want(float(srt[d0 : d0 + t].double().sum())), (n, dens, gam, w)
            checked += 1
    assert checked > 100


def test_trim_thresholds_are_of_the_unscaled_deltas_with_rescale():
    base, models = tensors(15, n=2, shape=(41, 17))
    kw = dict(method="ties", density=[0.3, 0.6], backend="cpu")
    assert m3kernels.trim_thresholds(base, models, rescale=True, **kw) == m3kernels.trim_thresholds(
        base, models, **kw
    )
