"""The mergekit-compatible YAML config: parsing, per-tensor parameter resolution, rejections.

Expected per-layer values are computed here from mergekit's documented rule, independently of
m3kernels.checkpoint.config: layer i of L sits at t = i / (L - 1) (t = 1 when L = 1), the input embeddings
at t = 0, the final norm and lm_head at t = 0 too (mergekit 0.1.5's "post" weights); a gradient's values are spread evenly over
[0, 1] and interpolated linearly (numpy.interp); filters match substrings, first match wins.
"""

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from m3kernels.checkpoint.config import MergeConfig, MergeConfigError, load_config
from m3kernels.merge.recipe import DEFAULT_TRIM_DENSITY, PRESETS, make_recipe
from m3kernels.merge.reference import reference_merge

CONFIG_DIR = Path(__file__).resolve().parents[1] / "python" / "configs"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))


def expected_t(name: str, num_layers: int) -> float:
    """mergekit's position of a tensor (llama naming)."""
    if name == "model.embed_tokens.weight":
        return 0.0
    if name in ("model.norm.weight", "lm_head.weight"):
        return 0.0  # mergekit >= 0.1.2: post weights at t = 0
    i = int(name.split(".")[2])
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def expected_gradient(values, t: float) -> float:
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


def llama_names(num_layers: int):
    names = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        names += [
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.mlp.down_proj.weight",
            f"model.layers.{i}.input_layernorm.weight",
        ]
    return names + ["model.norm.weight", "lm_head.weight"]


def base_cfg(**over):
    cfg = {
        "merge_method": "ties",
        "base_model": "m/base",
        "models": [
            {"model": "m/a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "m/b", "parameters": {"weight": 0.5, "density": 0.4}},
        ],
    }
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------
# Example configs
# ---------------------------------------------------------------------------------------


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert len(EXAMPLES) >= 5, names
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES}
    assert {"ties", "dare_ties", "linear", "task_arithmetic"} <= methods


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("num_layers", [2, 40])
def test_example_config_parses_and_feeds_make_recipe(path, num_layers):
    raw = yaml.safe_load(path.read_text())
    for source in (path, str(path), path.read_text(), raw):
        cfg = load_config(source)
        assert isinstance(cfg, MergeConfig)
        assert cfg.raw == raw
    assert cfg.method in PRESETS
    assert cfg.base_model not in cfg.models or cfg.method == "linear"
    ratios = cfg.mix_ratios()
    if cfg.mixup is not None:
        assert len(ratios) == len(cfg.models) and math.isclose(sum(ratios), 1.0)
    for name in llama_names(num_layers):
        kw = cfg.tensor_kwargs(name, num_layers)
        assert set(kw) == {"weights", "density", "drop_rate", "normalize", "rescale", "lambda_"}
        assert len(kw["weights"]) == len(cfg.models)
        rec = make_recipe(
            len(cfg.models),
            method=cfg.method,
            has_base=cfg.base_model is not None,
            seed=cfg.seed,
            mix_ratios=ratios,
            **kw,
        )
        assert rec.method == cfg.method


def test_config_given_as_yaml_text_and_path_agree(tmp_path):
    text = yaml.safe_dump(base_cfg())
    p = tmp_path / "c.yml"
    p.write_text(text)
    a, b, c = load_config(text), load_config(p), load_config(str(p))
    assert a == b == c


def test_raw_is_a_copy_of_the_dict_given():
    d = base_cfg()
    cfg = load_config(d)
    d["models"][0]["parameters"]["weight"] = 99.0
    assert cfg.raw["models"][0]["parameters"]["weight"] == 1.0
    assert cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)["weights"] == [1.0, 0.5]


# ---------------------------------------------------------------------------------------
# Scalars, gradients, filters: the values mergekit computes
# ---------------------------------------------------------------------------------------

GRADIENTS = [[0.0, 1.0], [0.1, 0.9, 0.3], [1.0, 0.2, 0.7, 0.4, 0.0], [0.25]]


@pytest.mark.parametrize("num_layers", [1, 2, 40])
@pytest.mark.parametrize("grad", GRADIENTS, ids=str)
def test_gradient_values_per_layer(grad, num_layers):
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"weight": grad}},
                {"model": "y", "parameters": {"weight": 0.3}},
            ],
            "parameters": {"lambda": [2.0, 1.0]},
        }
    )
    for name in llama_names(num_layers):
        t = expected_t(name, num_layers)
        kw = cfg.tensor_kwargs(name, num_layers)
        assert kw["weights"][0] == pytest.approx(expected_gradient(grad, t), rel=1e-12, abs=1e-15)
        assert kw["weights"][1] == 0.3
        assert kw["lambda_"] == pytest.approx(expected_gradient([2.0, 1.0], t), rel=1e-12)


def test_gradient_hand_values():
    """A few numbers written out: [0, 1] over 40 layers is i/39; embeddings and lm_head at t = 0."""
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": [0.0, 1.0]}}],
            "parameters": {"lambda": [0.0, 0.5, 1.0]},
        }
    )
    w = lambda n, L: cfg.tensor_kwargs(n, L)["weights"][0]  # noqa: E731
    assert w("model.layers.13.mlp.up_proj.weight", 40) == pytest.approx(1 / 3)
    assert w("model.layers.39.mlp.up_proj.weight", 40) == 1.0
    assert w("model.layers.0.mlp.up_proj.weight", 40) == 0.0
    assert w("model.embed_tokens.weight", 40) == 0.0
    assert w("lm_head.weight", 40) == 0.0  # mergekit 0.1.5: post weights at t = 0
    assert w("model.norm.weight", 2) == 0.0
    assert w("model.layers.1.mlp.up_proj.weight", 2) == 1.0
    assert w("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: t = 1
    lam = lambda n, L: cfg.tensor_kwargs(n, L)["lambda_"]  # noqa: E731
    assert lam("model.layers.10.self_attn.o_proj.weight", 40) == pytest.approx(10 / 39 * 1.0)
    assert lam("model.layers.30.self_attn.o_proj.weight", 40) == pytest.approx(30 / 39)


def test_other_layer_naming_schemes():
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": [0.0, 1.0]}}],
        }
    )
    w = lambda n: cfg.tensor_kwargs(n, 5)["weights"][0]  # noqa: E731
    assert w("transformer.h.2.attn.c_attn.weight") == pytest.approx(0.5)  # GPT-2
    assert w("gpt_neox.layers.1.mlp.dense_h_to_4h.weight") == pytest.approx(0.25)
    assert w("layers.3.attention.wq.weight") == pytest.approx(0.75)
    assert w("model.layers.4.mlp.experts.3.w1.weight") == 1.0  # MoE expert
    for pre in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "gpt_neox.embed_in.weight",
        "transformer.word_embeddings.weight",
    ):
        assert w(pre) == 0.0, pre
    for post in ("transformer.ln_f.weight", "embed_out.weight", "gpt_neox.final_layer_norm.bias"):
        assert w(post) == 0.0, post  # mergekit 0.1.5: post weights at t = 0
    with pytest.raises(MergeConfigError, match="layer 5"):
        cfg.tensor_kwargs("model.layers.5.mlp.up_proj.weight", 5)
    with pytest.raises(MergeConfigError, match="num_layers"):
        cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 0)


FILTERED = [
    {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
    {"filter": "mlp", "value": 0.7},
    {"filter": "layers.1.", "value": 0.11},
    {"value": 0.3},
]


def expected_filtered(entries, name, t):
    """First entry whose filter is a substring of the name (no filter: always)."""
    for e in entries:
        if e.get("filter") is None or e["filter"] == "*" or e["filter"] in name:
            v = e["value"]
            return expected_gradient(v, t) if isinstance(v, list) else v
    return None


@pytest.mark.parametrize("num_layers", [2, 40])
def test_filters_match_substrings_first_wins(num_layers):
    cfg = load_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"density": FILTERED}}, {"model": "y"}],
            "parameters": {"density": 0.9},
        }
    )
    seen = set()
    for name in llama_names(num_layers):
        t = expected_t(name, num_layers)
        d = cfg.tensor_kwargs(name, num_layers)["density"]
        exp = expected_filtered(FILTERED, name, t)
        assert d[0] == pytest.approx(exp, rel=1e-12, abs=1e-15), name
        assert d[1] == 0.9
        seen.add(exp)
    assert {0.7, 0.11, 0.3} <= seen  # every branch was taken
    # "layers.1." is shadowed by the earlier self_attn / mlp entries
    assert cfg.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 2)["density"][0] == 0.7
    assert cfg.tensor_kwargs("model.layers.1.input_layernorm.weight", 2)["density"][0] == 0.11


def test_filter_star_and_single_entry_and_fallthrough():
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [
                # no default entry: tensors that match no filter fall through to the top level
                {"model": "x", "parameters": {"weight": [{"filter": "lm_head", "value": 0.1}]}},
                {"model": "y", "parameters": {"weight": {"filter": "*", "value": [0.0, 1.0]}}},
                {"model": "z"},
            ],
            "parameters": {"weight": [{"filter": "mlp", "value": 0.6}]},
        }
    )
    kw = cfg.tensor_kwargs
    assert kw("lm_head.weight", 4)["weights"] == [0.1, 0.0, 1.0]  # lm_head at t = 0
    assert kw("model.layers.1.mlp.up_proj.weight", 4)["weights"] == pytest.approx([0.6, 1 / 3, 0.6])
    # nothing matches anywhere: mergekit-style default weight 1
    assert kw("model.layers.3.self_attn.q_proj.weight", 4)["weights"] == [1.0, 1.0, 1.0]


def test_per_model_overrides_top_level():
    cfg = load_config(
        {
            "merge_method": "dare_ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 2.0, "density": 0.9}}, {"model": "y"}],
            "parameters": {"weight": 0.25, "density": 0.5, "normalize": True, "rescale": "l1", "lambda": 0.7},
        }
    )
    kw = cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    assert kw == {
        "weights": [2.0, 0.25],
        "density": [0.9, 0.5],
        "drop_rate": None,
        "normalize": True,
        "rescale": "l1",
        "lambda_": 0.7,
    }


def test_defaults_left_to_recipe():
    cfg = load_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]})
    kw = cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    assert kw == {
        "weights": [1.0, 1.0],
        "density": [1.0, 1.0],  # mergekit's default density (no trim), not the API's 0.2
        "drop_rate": None,
        "normalize": None,
        "rescale": None,
        "lambda_": 1.0,
    }
    rec = make_recipe(2, method="ties", has_base=True, **kw)
    assert rec.trim_density == (1.0,) * 2 and rec.normalize is True
    assert cfg.seed == 0 and cfg.trim_scope == "tensor" and cfg.mixup is None
    # a density for one model only: the others get mergekit's 1.0 (tests/test_config_defaults.py)
    cfg = load_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"density": 0.6}}, {"model": "y"}],
        }
    )
    assert cfg.tensor_kwargs("lm_head.weight", 2)["density"] == [0.6, 1.0]


def test_drop_rate_and_density_for_dare_methods():
    cfg = load_config(
        {
            "merge_method": "dare_linear",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"drop_rate": 0.75}},
                {"model": "y", "parameters": {"density": 0.4, "drop_rate": 0.6}},
            ],
        }
    )
    kw = cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    assert kw["density"] == pytest.approx([0.25, 0.4]) and kw["drop_rate"] is None
    rec = make_recipe(2, method="dare_linear", has_base=True, **kw)
    assert rec.dare_density == pytest.approx((0.25, 0.4)) and rec.trim_density is None
    cfg = load_config(
        {
            "merge_method": "ties_dare",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"drop_rate": [0.1, 0.9]}},
                {"model": "y", "parameters": {"drop_rate": 0.5, "density": 0.3}},
            ],
        }
    )
    kw = cfg.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 2)
    assert kw["drop_rate"] == pytest.approx([0.9, 0.5])
    assert kw["density"] == [DEFAULT_TRIM_DENSITY, 0.3]  # ties_dare is ours: its own default
    rec = make_recipe(2, method="ties_dare", has_base=True, **kw)
    assert rec.dare_density == pytest.approx((0.1, 0.5)) and rec.trim_density == (0.2, 0.3)


def test_numbers_written_as_strings():
    """PyYAML reads 1e-1 (no dot) as a string; it is read as the number."""
    cfg = load_config(
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n"
        "    parameters: {density: 1e-1, weight: 5e-1}\n"
    )
    kw = cfg.tensor_kwargs("lm_head.weight", 2)
    assert kw["density"] == [0.1] and kw["weights"] == [0.5]


# ---------------------------------------------------------------------------------------
# Every method: tensor_kwargs -> make_recipe -> the merge (float64 oracle)
# ---------------------------------------------------------------------------------------

METHOD_PARAMS = {
    "linear": {"weight": [1.0, 3.0]},
    "task_arithmetic": {"weight": [0.5, 1.5], "lambda": 0.8},
    "ties": {"weight": 1.0, "density": [0.3, 0.9], "normalize": True},
    "dare_linear": {"weight": 0.5, "density": 0.6, "rescale": True},
    "dare_ties": {"weight": 1.0, "drop_rate": 0.4, "rescale": False},
    "ties_dare": {"weight": 1.0, "density": 0.5, "drop_rate": 0.3},
    "magnitude_prune": {"weight": [0.5, -1.0], "density": [0.3, 0.9], "lambda": 0.5},
    "passthrough": {"scale": 0.5},
    "nearswap": {"t": 0.01},
    "ram": {"epsilon": 0.001},
    "ramplus_tl": {"r": 0.2, "alpha": 0.5, "epsilon": 0.001},
    "breadcrumbs": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": [0.5, 1.0], "density": [0.3, 0.9], "gamma": 0.02},
    "slerp": {"t": [0.0, 0.3, 1.0]},
    "nuslerp": {"weight": [1.0, 2.0], "nuslerp_flatten": False},
    "multislerp": {"weight": [0.3, 0.7], "normalize_weights": True, "eps": 1e-7},
    "karcher": {"max_iter": 5, "tol": 1e-6},
    "model_stock": {"filter_wise": True},
    "della": {"weight": [0.5, 1.0], "density": [0.3, 0.7], "epsilon": 0.1},
    "della_linear": {"weight": 1.0, "density": 0.5, "epsilon": [0.05, 0.2], "rescale": False},
    "sce": {"select_topk": [0.2, 0.8], "int8_mask": True},
    "arcee_fusion": {},
}


# fisher, regmean need statistics folders per model: tests/test_data_aware_config.py
@pytest.mark.parametrize("method", sorted(m for m in PRESETS if PRESETS[m].family != "data_aware"))
@pytest.mark.parametrize("mixup", [None, {"alpha": 0.5, "seed": 3}, {"lambda": 0.25}])
def test_every_method_feeds_make_recipe(method, mixup):
    preset = PRESETS[method]
    n = max(preset.models[0], 1 if preset.models[1] == 1 else 2)
    raw = {
        "merge_method": method,
        "models": [{"model": m} for m in ("x", "y")[:n]],
        "parameters": METHOD_PARAMS[method],
        "seed": 11,
    }
    if preset.uses_base:
        raw["base_model"] = "b"
    if mixup:
        raw["mixup"] = mixup
        if method == "slerp":
            raw["parameters"] = {}  # M³ gives t
    if mixup and preset.mixup == "none":
        with pytest.raises(MergeConfigError, match=f"mixup: method '{method}' does not take M³"):
            load_config(raw)
        return
    cfg = load_config(raw)
    assert cfg.method == method and cfg.mixup == mixup
    ratios = cfg.mix_ratios()
    for num_layers in (2, 40):
        for name in llama_names(num_layers)[:4] + ["lm_head.weight"]:
            kw = cfg.tensor_kwargs(name, num_layers)
            rec = make_recipe(
                n, method=method, has_base=cfg.base_model is not None, mix_ratios=ratios, seed=cfg.seed, **kw
            )
            assert rec.seed == 11
            if mixup is not None and "lambda" in mixup and method == "slerp":
                assert rec.get("t") == 0.75  # the model's ratio of (λ, 1 − λ)
            elif mixup is not None and "lambda" in mixup:
                assert rec.mix_ratios == (0.25, 0.75)


def test_gradient_weights_reach_the_merge():
    """task_arithmetic with gradient and filtered weights, through make_recipe into the float64
    reference merge, equals base + λ Σ w_i(t) δ_i with the weights computed here."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    grad, filt = [0.2, 1.0, -0.4], [{"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"weight": grad}},
                {"model": "y", "parameters": {"weight": filt}},
            ],
            "parameters": {"lambda": 0.75},
        }
    )
    base = torch.randn(5, 7, generator=gen)
    models = [base + 0.1 * torch.randn(5, 7, generator=gen) for _ in range(2)]
    for name in (
        "model.layers.3.mlp.up_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
    ):
        t = expected_t(name, 9)
        w = [expected_gradient(grad, t), expected_filtered(filt, name, t)]
        rec = make_recipe(2, method=cfg.method, has_base=True, **cfg.tensor_kwargs(name, 9))
        got, _ = reference_merge(base, models, rec, name)
        b64 = base.double()
        want = b64 + 0.75 * sum(wi * (m.double() - b64) for wi, m in zip(w, models))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The base model listed among the models; dtypes; other accepted keys
# ---------------------------------------------------------------------------------------


def test_base_listed_among_models_is_removed():
    cfg = load_config(
        {
            "merge_method": "dare_ties",
            "base_model": "./m/base",
            "models": [
                {"model": "m/a", "parameters": {"weight": 0.1}},
                {"model": "m/base", "parameters": {"weight": 9.0}},
                {"model": "m/c", "parameters": {"weight": 0.3}},
            ],
            "parameters": {"density": 0.5},
        }
    )
    assert cfg.base_model == "./m/base"
    assert cfg.models == ["m/a", "m/c"]
    assert cfg.tensor_kwargs("lm_head.weight", 2)["weights"] == [0.1, 0.3]


def test_linear_keeps_a_listed_base_as_a_model():
    """mergekit's linear averages every listed model, the base included."""
    cfg = load_config(
        {
            "merge_method": "linear",
            "base_model": "m/base",
            "models": [
                {"model": "m/base", "parameters": {"weight": 0.2}},
                {"model": "m/a", "parameters": {"weight": 0.8}},
            ],
        }
    )
    assert cfg.models == ["m/base", "m/a"]
    assert cfg.tensor_kwargs("lm_head.weight", 2)["weights"] == [0.2, 0.8]


@pytest.mark.parametrize(
    "alias,canon",
    [
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("FP32", "float32"),
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
    ],
)
def test_dtype_aliases(alias, canon):
    cfg = load_config(base_cfg(dtype=alias, out_dtype=alias))
    assert cfg.dtype == canon and cfg.out_dtype == canon
    assert cfg.out_torch_dtype(torch.float32) == getattr(torch, canon)


def test_out_torch_dtype_priority():
    assert (
        load_config(base_cfg(dtype="fp16", out_dtype="bf16")).out_torch_dtype(torch.float32) == torch.bfloat16
    )
    assert load_config(base_cfg(dtype="fp16")).out_torch_dtype(torch.float32) == torch.float16
    cfg = load_config(base_cfg())
    assert cfg.dtype is None and cfg.out_dtype is None
    assert cfg.out_torch_dtype(torch.bfloat16) == torch.bfloat16
    assert cfg.out_torch_dtype("fp16") == torch.float16
    with pytest.raises(MergeConfigError, match="out_dtype"):
        cfg.out_torch_dtype(None)


def test_accepted_mergekit_keys_without_effect():
    plain = load_config(base_cfg())
    cfg = load_config(
        base_cfg(
            name="my-merge",
            chat_template=None,
            slices=None,
            parameters={"int8_mask": True, "rescale": False},
            tokenizer_source="base",
        )
    )
    assert cfg.tokenizer_source == "base"
    for name in llama_names(2):
        kw, ref = cfg.tensor_kwargs(name, 2), plain.tensor_kwargs(name, 2)
        assert kw.pop("rescale") is False and ref.pop("rescale") is None  # ties' own default, given
        assert kw == ref


def test_extensions_seed_trim_scope_mixup():
    cfg = load_config(base_cfg(seed=2**40, trim_scope="model", mixup={"alpha": 2, "seed": 5}))
    assert cfg.seed == 2**40 and cfg.trim_scope == "model"
    assert cfg.mixup == {"alpha": 2.0, "seed": 5}
    from m3kernels.merge.mixup import draw_mix_ratios

    assert cfg.mix_ratios() == draw_mix_ratios(2.0, 2, 5)
    # the M³ seed defaults to the merge seed
    assert load_config(base_cfg(seed=9, mixup={"alpha": 1.5})).mixup == {"alpha": 1.5, "seed": 9}
    assert load_config(base_cfg(mixup={"lambda": 0.3})).mix_ratios() == pytest.approx((0.3, 0.7))


# ---------------------------------------------------------------------------------------
# Rejections: each names the key
# ---------------------------------------------------------------------------------------


def with_model_params(**params):
    c = base_cfg()
    c["models"][0]["parameters"] = params
    return c


def with_top_params(method="ties", **params):
    c = base_cfg(merge_method=method)
    c["parameters"] = params
    for m in c["models"]:
        m.pop("parameters")
    return c


REJECT = [
    # keys and structure
    ({**base_cfg(), 3: 4}, "3"),  # a key that is not a string (an unknown string one is ignored)
    (base_cfg(slices=[{"sources": []}]), "slices"),
    (base_cfg(modules={"text": {}}), "modules"),
    (base_cfg(tokenizer={"source": "union", "vocab": 1}), "tokenizer"),  # tests/test_tokenizer_merge.py
    (base_cfg(chat_template="chatml2"), "chat_template"),
    (base_cfg(models=[]), "models"),
    (base_cfg(models=None), "models"),
    (base_cfg(models=["m/a"]), "models[0]"),
    (base_cfg(models=[{"model": "m/a", "weight": 1}]), "models[0].weight"),
    (base_cfg(models=[{"parameters": {}}]), "models[0].model"),
    (base_cfg(models=[{"model": "m/a"}, {"model": "m/a/"}]), "models[1].model"),
    (base_cfg(merge_method="model_stock", models=[{"model": "m/base"}]), "models"),  # no base-only rule
    (base_cfg(models=[{"model": "m/a+lora/x+y"}]), "models[0].model"),  # one '+' is a LoRA (lora.py)
    (base_cfg(models=[{"model": "org/model@main"}]), "models[0].model"),
    (base_cfg(base_model="m/base+lora+"), "base_model"),
    (base_cfg(base_model=None), "base_model"),
    (base_cfg(merge_method="task_arithmetic", base_model=None, parameters=None), "base_model"),
    (base_cfg(merge_method="linear", models=[{"model": "m/a"}]), "base_model"),
    # methods
    (base_cfg(merge_method="sce", parameters={"select_topk": "half"}), "select_topk"),
    (base_cfg(merge_method="arcee_fusion"), "models"),  # exactly one model besides the base
    (base_cfg(merge_method="slerp"), "weight"),  # slerp takes t, not weight
    (
        base_cfg(
            merge_method="model_stock", models=[{"model": "m/a"}, {"model": "m/b"}], parameters={"t": 0.5}
        ),
        "parameters.t",
    ),
    (base_cfg(merge_method="nonsense"), "merge_method"),
    (base_cfg(merge_method=None), "merge_method"),
    (base_cfg(merge_method=3), "merge_method"),
    # tokenizer / dtypes / extensions
    (base_cfg(tokenizer_source="union", tokenizer={"source": "base"}), "tokenizer_source"),
    (base_cfg(tokenizer_source=7), "tokenizer_source"),
    (base_cfg(dtype="int8"), "dtype"),
    (base_cfg(out_dtype="fp8"), "out_dtype"),
    (base_cfg(dtype=16), "dtype"),
    (base_cfg(seed=-1), "seed"),
    (base_cfg(seed=1.5), "seed"),
    (base_cfg(seed="7"), "seed"),
    (base_cfg(seed=True), "seed"),
    (base_cfg(seed=2**64), "seed"),
    (base_cfg(trim_scope="layer"), "trim_scope"),
    (with_top_params("task_arithmetic", weight=1.0) | {"trim_scope": "model"}, "trim_scope"),
    (with_model_params(density=[0.1, 0.5]) | {"trim_scope": "model"}, "density"),
    (base_cfg(mixup={"alpha": 0}), "mixup.alpha"),
    (base_cfg(mixup={"alpha": -1.0}), "mixup.alpha"),
    (base_cfg(mixup={"alpha": ".inf"}), "mixup.alpha"),
    (base_cfg(mixup={"lambda": 1.5}), "mixup.lambda"),
    (base_cfg(mixup={"lambda": -0.1}), "mixup.lambda"),
    (base_cfg(mixup={"alpha": 1, "lambda": 0.5}), "mixup"),
    (base_cfg(mixup={"beta": 1}), "mixup.beta"),
    (base_cfg(mixup={}), "mixup"),
    (base_cfg(mixup=0.5), "mixup"),
    (base_cfg(mixup={"alpha": 1, "seed": -3}), "mixup.seed"),
    (base_cfg(mixup={"alpha": 1, "seed": 2**32}), "mixup.seed"),
    (base_cfg(mixup={"lambda": 0.5, "seed": 1}), "mixup.seed"),
    (base_cfg(seed=2**33, mixup={"alpha": 1}), "seed"),
    (
        base_cfg(models=[{"model": "a"}, {"model": "b"}, {"model": "c"}], mixup={"lambda": 0.5}),
        "mixup.lambda",
    ),
    (base_cfg(name=["x"]), "name"),
    # parameters
    (with_model_params(epsilon=0.1), "models[0].parameters.epsilon"),
    (with_top_params(t=0.5), "parameters.t"),
    (with_model_params(lambda_=1.0), "models[0].parameters.lambda_"),
    (with_model_params(**{"lambda": 1.0}), "models[0].parameters.lambda"),
    (with_model_params(normalize=True), "models[0].parameters.normalize"),
    (with_model_params(weight="abc"), "models[0].parameters.weight"),
    (with_model_params(weight=True), "models[0].parameters.weight"),
    (with_model_params(weight=float("nan")), "models[0].parameters.weight"),
    (with_model_params(weight=None), "models[0].parameters.weight"),
    (with_model_params(weight=[]), "models[0].parameters.weight"),
    (with_model_params(weight=[1.0, "x"]), "models[0].parameters.weight[1]"),
    (with_model_params(weight=[1.0, [2.0]]), "models[0].parameters.weight"),
    (with_model_params(density=1.5), "models[0].parameters.density"),
    (with_model_params(density=-0.1), "models[0].parameters.density"),
    (with_model_params(density=[0.2, 1.2]), "models[0].parameters.density[1]"),
    (
        with_model_params(density=[{"filter": "mlp", "value": 2.0}, {"value": 0.1}]),
        "models[0].parameters.density[0].value",
    ),
    (with_model_params(density=[{"filter": "mlp"}]), "models[0].parameters.density[0]"),
    (with_model_params(density=[{"filter": 3, "value": 0.1}]), "models[0].parameters.density[0].filter"),
    (with_model_params(density=[{"filter": "mlp", "value": 0.1, "x": 1}]), "models[0].parameters.density[0]"),
    (
        with_model_params(density=[{"filter": "mlp", "value": {"filter": "a", "value": 0.1}}]),
        "models[0].parameters.density[0].value",
    ),
    (with_model_params(density=[{"filter": "mlp", "value": 0.1}, 0.5]), "models[0].parameters.density"),
    (with_model_params(drop_rate=0.5), "drop_rate"),  # ties: no DARE
    (with_top_params("ties", normalize=[True, False]), "parameters.normalize"),
    (with_top_params("ties", normalize="maybe"), "parameters.normalize"),  # not a bool mergekit reads
    (with_top_params("ties", int8_mask=2), "parameters.int8_mask"),
    (with_top_params("breadcrumbs", rescale="l1"), "parameters.rescale"),  # a bool there
    (with_top_params("dare_ties", density=0.5, rescale="l2"), "parameters.rescale"),
    (with_top_params("dare_linear", density=0.5, drop_rate=0.2), "drop_rate"),  # disagree
    (with_top_params("task_arithmetic", **{"lambda": ".nan"}), "parameters.lambda"),
    (with_top_params("ties_dare", density=0.5), "drop_rate"),  # ties_dare: drop_rate too
    (with_top_params("linear", weight=0.0), "weights"),  # normalizing by 0
    (with_top_params("ties", density=0.2) | {"parameters": [1]}, "parameters"),
]


@pytest.mark.parametrize("raw,key", REJECT, ids=[f"{i}-{k}" for i, (_, k) in enumerate(REJECT)])
def test_rejections_name_the_key(raw, key):
    raw = copy.deepcopy(raw)
    if raw.get("merge_method") == "linear" and "base_model" in raw and key != "base_model":
        raw.pop("base_model")
    with pytest.raises(MergeConfigError) as ei:
        load_config(raw)
    assert isinstance(ei.value, ValueError)
    assert key in str(ei.value), str(ei.value)


def test_rejections_list_what_is_supported():
    with pytest.raises(MergeConfigError) as ei:
        load_config(base_cfg(merge_method="frankenmerge"))
    msg = str(ei.value)
    assert all(m in msg for m in sorted(PRESETS))
    with pytest.raises(MergeConfigError) as ei:
        load_config(with_model_params(gamma=0.01))
    assert all(p in str(ei.value) for p in ("gamma", "breadcrumbs", "breadcrumbs_ties"))
    with pytest.raises(MergeConfigError) as ei:
        load_config(with_model_params(bogus_param=0.01))
    assert all(p in str(ei.value) for p in ("weight", "density", "drop_rate", "lambda"))
    with pytest.raises(MergeConfigError) as ei:
        load_config({**base_cfg(), 7: 1})
    assert all(k in str(ei.value) for k in ("merge_method", "models", "mixup", "trim_scope"))
    with pytest.raises(MergeConfigError, match="float32, bfloat16 or float16"):
        load_config(base_cfg(dtype="int4"))
    with pytest.raises(MergeConfigError, match=r"MODEL\+ADAPTER"):  # one '+' is a LoRA input (lora.py)
        load_config(base_cfg(models=[{"model": "m/a+adapter+b"}]))


@pytest.mark.parametrize(
    "text,key",
    [
        ("merge_method: ties\nmerge_method: linear\nmodels: []\n", "merge_method"),  # key twice
        ("merge_method: ties\n---\nmerge_method: linear\n", "YAML"),  # two documents
        ("merge_method: [ties\n", "YAML"),  # syntax
        ("- merge_method: ties\n", "mapping"),  # not a mapping
    ],
)
def test_bad_yaml(text, key):
    with pytest.raises(MergeConfigError, match=key):
        load_config(text)


def test_bad_sources(tmp_path):
    with pytest.raises(MergeConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(MergeConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(MergeConfigError, match="config"):
        load_config(42)
    with pytest.raises(MergeConfigError, match="no/such/file.cfg"):
        load_config("no/such/file.cfg")


def test_dare_density_missing_for_a_filtered_tensor():
    """A DARE density given only by a filter: tensors it misses get mergekit's default 1 (no drop)."""
    cfg = load_config(
        {
            "merge_method": "dare_linear",
            "base_model": "b",
            "models": [
                {
                    "model": "x",
                    "parameters": {
                        "density": [
                            {"filter": "layers.", "value": 0.5},
                            {"filter": "embed", "value": 0.5},
                            {"filter": "lm_head", "value": 0.5},
                            {"filter": "norm", "value": 0.5},
                        ]
                    },
                }
            ],
        }
    )
    assert cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)["density"] == [0.5]
    assert cfg.tensor_kwargs("model.rotary.inv_freq", 2)["density"] == [1.0]


def test_the_full_example_in_docs_parses():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    text = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_config(text)
    assert cfg.method == "ties" and cfg.models == ["models/ft-math", "models/ft-code"]
    kw = cfg.tensor_kwargs("model.layers.39.mlp.up_proj.weight", 40)
    assert kw["weights"] == pytest.approx([0.6, 1.0]) and kw["density"] == [0.3, 0.25]
    kw = cfg.tensor_kwargs("model.embed_tokens.weight", 40)
    assert kw["weights"] == [1.0, 1.0] and kw["density"] == [0.2, 0.25] and kw["lambda_"] == 0.8
    assert cfg.mixup == {"alpha": 2.0, "seed": 42} and cfg.seed == 1234


def test_unknown_top_level_keys_are_ignored_with_a_warning(caplog):
    """mergekit 0.1.5 drops top-level keys it does not know, so a config with one runs there:
    it runs here too, with a warning naming the key (and what it may have meant)."""
    with caplog.at_level("WARNING", logger="m3kernels"):
        cfg = load_config(base_cfg(dype="bfloat16", int8_mask=True))
    assert cfg.dtype is None and cfg.method == "ties"
    text = caplog.text
    assert "dype: unknown top-level key, ignored" in text and "did you mean 'dtype'" in text
    assert "int8_mask: unknown top-level key" in text and "belongs under 'parameters:'" in text


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "sce"])
def test_only_the_base_model_writes_the_base(method, caplog):
    """mergekit 0.1.5's task-vector methods return the base when no other model is given (the
    'lorablated' recipe: the base with a LoRA): such a config is a copy of the base."""
    with caplog.at_level("WARNING", logger="m3kernels"):
        cfg = load_config({"merge_method": method, "base_model": "m/base", "models": [{"model": "m/base"}]})
    assert cfg.method == "passthrough" and cfg.models == [cfg.base_model]
    assert "the output is the base model" in caplog.text
