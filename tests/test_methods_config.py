"""Configs of the issue-8 methods: mergekit's parameter names, scopes, gradients (numeric
interpolation, bool picks, integer checks), filters, the M³ policy per method, model counts,
karcher's base as one more point, and bad values naming the parameter and the allowed range."""

from __future__ import annotations

import numpy as np
import pytest

from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge.recipe import make_recipe


def cfg(method, params=None, models=("x",), base="b", model_params=None, **top):
    raw = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base is not None:
        raw["base_model"] = base
    if params is not None:
        raw["parameters"] = params
    for i, p in (model_params or {}).items():
        raw["models"][i]["parameters"] = p
    raw.update(top)
    return raw


def expected(values, t):
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


ATTN = [0.0, 0.5, 0.3, 0.7, 1.0]
MLP = [1.0, 0.5, 0.7, 0.3, 0.0]


def test_classic_slerp_config():
    """The slerp config of mergekit's README: filtered gradients of t, a default value."""
    c = load_config(
        cfg(
            "slerp",
            {"t": [{"filter": "self_attn", "value": ATTN}, {"filter": "mlp", "value": MLP}, {"value": 0.5}]},
        )
    )
    L = 9
    for i in range(L):
        t = i / (L - 1)
        q = c.tensor_kwargs(f"model.layers.{i}.self_attn.q_proj.weight", L)
        assert q["t"] == pytest.approx(expected(ATTN, t))
        assert q["weights"] is None and q["lambda_"] == 1.0
        assert c.tensor_kwargs(f"model.layers.{i}.mlp.up_proj.weight", L)["t"] == pytest.approx(
            expected(MLP, t)
        )
        assert c.tensor_kwargs(f"model.layers.{i}.input_layernorm.weight", L)["t"] == 0.5
    r = make_recipe(
        1, method="slerp", has_base=True, **c.tensor_kwargs("model.layers.2.mlp.up_proj.weight", L)
    )
    assert r.get("t") == pytest.approx(expected(MLP, 0.25))


def test_post_weights_sit_at_t_0():
    """mergekit 0.1.5: the final norm and lm_head read a gradient at t = 0, like the embeddings."""
    c = load_config(cfg("slerp", {"t": [0.2, 0.8]}))
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert c.tensor_kwargs(name, 4)["t"] == pytest.approx(0.2), name
    assert c.tensor_kwargs("model.layers.3.mlp.up_proj.weight", 4)["t"] == pytest.approx(0.8)


def test_bool_gradients_pick_and_filters():
    c = load_config(
        cfg(
            "nuslerp",
            {"nuslerp_flatten": [True, False], "nuslerp_row_wise": [{"filter": "mlp", "value": True}]},
            models=("x", "y"),
        )
    )
    kw = c.tensor_kwargs
    assert kw("model.layers.0.self_attn.q_proj.weight", 3)["nuslerp_flatten"] is True
    assert kw("model.layers.1.self_attn.q_proj.weight", 3)["nuslerp_flatten"] is True  # v_⌊0.5·1⌋ = v_0
    assert kw("model.layers.2.self_attn.q_proj.weight", 3)["nuslerp_flatten"] is False
    assert kw("model.layers.2.mlp.up_proj.weight", 3)["nuslerp_row_wise"] is True
    assert "nuslerp_row_wise" not in kw("model.layers.2.self_attn.q_proj.weight", 3)  # default


def test_int_gradient_must_land_on_integers():
    c = load_config(cfg("karcher", {"max_iter": [2, 6]}, models=("x", "y"), base=None))
    assert c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 3)["max_iter"] == 4
    assert isinstance(c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 3)["max_iter"], int)
    c = load_config(cfg("karcher", {"max_iter": [2, 3]}, models=("x", "y"), base=None))
    with pytest.raises(
        MergeConfigError, match=r"max_iter: the gradient gives 2.5 .* integer in \[0, 100000\]"
    ):
        c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 3)


@pytest.mark.parametrize(
    "raw,match",
    [
        (
            cfg("karcher", {"max_iter": -1}, models=("x", "y"), base=None),
            r"parameters.max_iter: expected an integer in \[0, 100000\]",
        ),
        (cfg("karcher", {"max_iter": 2.5}, models=("x", "y"), base=None), r"max_iter: expected an integer"),
        (cfg("karcher", {"max_iter": True}, models=("x", "y"), base=None), r"max_iter: expected an integer"),
        (
            cfg("karcher", {"tol": "small"}, models=("x", "y"), base=None),
            r"parameters.tol: expected a number",
        ),
        (
            cfg("model_stock", {"filter_wise": 0.5}, models=("x", "y")),
            "parameters.filter_wise: expected true or false",
        ),
        (cfg("slerp", {"t": "half"}), "parameters.t: expected a number"),
        (cfg("slerp", {}), "t: method 'slerp' needs t"),
        (cfg("slerp", {"t": 0.5}, models=("x", "y")), "takes exactly 1 model"),
        (
            cfg("slerp", {"t": 0.5}, model_params={0: {"t": 0.5}}),
            "models\\[0\\].parameters.t: a merge-wide parameter",
        ),
        (
            cfg("ram", {}, model_params={0: {"epsilon": 0.1}}),
            "models\\[0\\].parameters.epsilon: a merge-wide parameter",
        ),
        (cfg("ram", {"gamma": 0.1}), "parameters.gamma: method 'ram' does not take it"),
        (cfg("nearswap", {}), "t: method 'nearswap' needs t"),
        (cfg("model_stock", {}, models=("x",)), "takes at least 2 model"),
        (
            cfg("model_stock", {}, models=("x", "y"), mixup={"alpha": 0.5}),
            "mixup: method 'model_stock' does not take M³",
        ),
        (cfg("nearswap", {"t": 0.1}, mixup={"lambda": 0.5}), "mixup: method 'nearswap' does not take M³"),
        (cfg("slerp", {"t": 0.5}, mixup={"alpha": 0.5}), "t: give t or M³"),
        (cfg("passthrough", {}, base="b"), "base_model: method 'passthrough' does not use a base model"),
        (cfg("breadcrumbs", {"gamma": 2.0}, models=("x", "y")), r"parameters.gamma: must be in \[0, 1\]"),
        (cfg("breadcrumbs", {"density": 0.5}, models=("x", "y"), trim_scope="model"), "trim_scope"),
        (cfg("passthrough", {"scale": [1.0, "x"]}, base=None), r"parameters.scale\[1\]: expected a number"),
    ],
)
def test_bad_values_name_the_parameter(raw, match):
    with pytest.raises(MergeConfigError, match=match):
        load_config(raw)


def test_slerp_with_mixup_draws_t():
    c = load_config(cfg("slerp", {}, mixup={"lambda": 0.3}))
    assert c.mix_ratios() == (0.3, 0.7)
    kw = c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    r = make_recipe(1, method="slerp", has_base=True, mix_ratios=c.mix_ratios(), **kw)
    assert r.get("t") == pytest.approx(0.7)
    c = load_config(cfg("slerp", {}, mixup={"alpha": 0.5, "seed": 4}))
    assert len(c.mix_ratios()) == 2


def test_passthrough_scale_filters_per_model():
    c = load_config(
        cfg(
            "passthrough",
            {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0.0, 1.0]}]},
            base=None,
        )
    )
    assert c.tensor_kwargs("model.layers.0.self_attn.o_proj.weight", 2)["scale"] == [0.5]
    assert c.tensor_kwargs("model.layers.1.mlp.down_proj.weight", 2)["scale"] == [1.0]
    assert "scale" not in c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 2)


def test_old_pattern_key_is_named():
    """mergekit's old examples write 'pattern:' (0.1.5 ignores it: the entry matches everything)."""
    raw = cfg("slerp", {"t": [{"pattern": "self_attn", "value": [0, 1]}, {"value": 0.5}]})
    with pytest.raises(MergeConfigError, match="'pattern' is an old name of 'filter'"):
        load_config(raw)


def test_optional_scale_may_be_null():
    """mergekit's Optional[float]: ``scale: null`` is an unscaled copy."""
    c = load_config(cfg("passthrough", {"scale": None}, base=None))
    assert "scale" not in c.tensor_kwargs("model.layers.0.self_attn.o_proj.weight", 2)
    c = load_config(cfg("passthrough", {"scale": 2.0}, base=None, model_params={0: {"scale": None}}))
    assert c.tensor_kwargs("lm_head.weight", 2)["scale"] == [2.0]  # unset per model: the top level
    with pytest.raises(MergeConfigError, match="parameters.t: a value is required"):
        load_config(cfg("slerp", {"t": None}))


def test_karcher_takes_an_unlisted_base_as_one_more_point():
    c = load_config(cfg("karcher", {}, models=("x", "y"), base="b"))
    assert c.models == ["x", "y", "b"]
    c = load_config(cfg("karcher", {}, models=("x", "b", "y"), base="b"))
    assert c.models == ["x", "b", "y"]  # listed: in its place


def test_same_name_different_kinds_per_method():
    """t is a number for slerp and nearswap; epsilon merge-wide for ram; alpha is ramplus_tl's cap."""
    assert load_config(cfg("nearswap", {"t": 7.5})).tensor_kwargs("lm_head.weight", 2)["t"] == 7.5
    kw = load_config(
        cfg("ramplus_tl", {"alpha": 3.0, "r": 0.4, "epsilon": 1e-3}, models=("x", "y"))
    ).tensor_kwargs("lm_head.weight", 2)
    assert (kw["alpha"], kw["r"], kw["epsilon"]) == (3.0, 0.4, 1e-3)
    kw = load_config(
        cfg("breadcrumbs_ties", {"gamma": 0.05, "density": [0.2, 0.6]}, models=("x", "y"))
    ).tensor_kwargs("model.layers.1.mlp.up_proj.weight", 2)
    assert kw["gamma"] == [0.05, 0.05] and kw["density"] == [0.6, 0.6]


SLERP_SLICES = {
    "slices": [
        {
            "sources": [
                {"model": "a", "layer_range": [0, 32]},
                {"model": "b", "layer_range": [0, 32]},
            ]
        }
    ],
    "merge_method": "slerp",
    "base_model": "a",
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
    "dtype": "bfloat16",
}


def test_trivial_slices_are_models():
    """The slices form most published slerp configs use: one slice, every source over all layers."""
    c = load_config(SLERP_SLICES)
    assert c.models == ["b"] and c.base_model == "a" and c.layer_range == 32
    flat = load_config(
        {k: v for k, v in SLERP_SLICES.items() if k != "slices"}
        | {"models": [{"model": "a"}, {"model": "b"}]}
    )
    for name in (
        "model.layers.7.self_attn.q_proj.weight",
        "model.layers.31.mlp.up_proj.weight",
        "lm_head.weight",
    ):
        assert c.tensor_kwargs(name, 32) == flat.tensor_kwargs(name, 32)
    with pytest.raises(MergeConfigError, match=r"layer_range \[0, 32\] must cover every layer .*40 layers"):
        c.tensor_kwargs("model.layers.7.self_attn.q_proj.weight", 40)
    # per-source parameters are the models' parameters
    raw = {
        "slices": [
            {
                "sources": [
                    {"model": "x", "layer_range": [0, 4], "parameters": {"weight": 0.3}},
                    {"model": "y", "layer_range": [0, 4]},
                ]
            }
        ],
        "merge_method": "nuslerp",
    }
    assert load_config(raw).tensor_kwargs("model.layers.1.mlp.up_proj.weight", 4)["weights"] == [0.3, 1.0]


@pytest.mark.parametrize(
    "slices,match",
    [
        # (several slices and partial ranges are read by slices.py: tests/test_slices.py)
        ([], "non-empty list"),
        ([{"sources": []}, {"sources": []}], r"slices\[0\].sources: expected a non-empty list"),
        (
            [{"sources": [{"model": "a", "layer_range": [0, 16]}, {"model": "b", "layer_range": [0, 32]}]}],
            "same number of layers",
        ),
        ([{"sources": [{"model": "a"}]}], r"slices\[0\].sources\[0\].layer_range"),
        ([{"sources": [{"model": "a", "layer_range": [0, 8], "weight": 1}]}], "unknown key"),
        ([{"sources": [{"model": "a", "layer_range": [0, 8]}], "merge_method": "x"}], "one merge_method"),
    ],
)
def test_other_slices_are_rejected(slices, match):
    with pytest.raises(MergeConfigError, match=match):
        load_config({"slices": slices, "merge_method": "karcher"})
    with pytest.raises(MergeConfigError, match="not both"):
        load_config({"slices": slices, "models": [{"model": "a"}], "merge_method": "karcher"})
