"""mergekit's ``slices:`` / ``modules:`` (m3kernels/checkpoint/slices.py) on tiny synthetic Llamas:
frankenmerges copy the right source layers under the new indices, per-slice merges give, tensor
by tensor, the bytes ``merge_tensors`` gives for the parameters mergekit's planner resolves
(gradients over a slice's layers, filters on the source's own tensor name), config.json's layer
count follows, bad slices stop before anything is written, and a killed sliced merge resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3kernels import cli
from m3kernels.api import merge_tensors
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.checkpoint.run import merge_checkpoints
from m3kernels.checkpoint.slices import chain_parameters, is_post_weight, is_pre_weight
from m3kernels.synthetic import make_family

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(vocab=29, hidden=16, intermediate=20, layers=4, heads=4, kv_heads=2)
LAYER = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]


@pytest.fixture(scope="module")
def fam(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("slices")
    f = make_family(root, n_models=3, shards=2, seed=11, **SIZES)
    dirs = {"base": str(f.base_dir), **{f"ft{i + 1}": str(d) for i, d in enumerate(f.model_dirs)}}
    tensors = {"base": f.base, **{f"ft{i + 1}": m for i, m in enumerate(f.models)}}
    return dirs, tensors


def load_dir(d) -> dict:
    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def run(tmp_path, raw, out="out", *extra) -> int:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return cli.main(["merge", str(path), str(tmp_path / out), "--device", "cpu", "-q", *extra])


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def src(d, key, a, b, **params):
    e = {"model": d[key], "layer_range": [a, b]}
    if params:
        e["parameters"] = params
    return e


def test_passthrough_frankenmerge_repeats_and_reorders_layers(fam, tmp_path):
    d, T = fam
    raw = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [src(d, "ft1", 0, 3)]},
            {"sources": [src(d, "ft2", 1, 4)]},
            {"sources": [src(d, "ft1", 2, 3)]},  # ft1's layer 2 a second time
            {"sources": [src(d, "ft3", 0, 1)], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]}},
        ],
    }
    assert run(tmp_path, raw) == 0
    got = load_dir(tmp_path / "out")
    plan = [("ft1", 0), ("ft1", 1), ("ft1", 2), ("ft2", 1), ("ft2", 2), ("ft2", 3), ("ft1", 2), ("ft3", 0)]
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for j, (key, i) in enumerate(plan):
        for s in LAYER:
            names.add(f"model.layers.{j}.{s}")
            want = T[key][f"model.layers.{i}.{s}"]
            if j == 7 and "o_proj" in s:  # the last slice's scale filter
                want = (want.float() * 0.5).to(torch.bfloat16)
            assert same_bits(got[f"model.layers.{j}.{s}"], want), (j, s)
    assert set(got) == names
    # pre weights from the first slice's source, post weights from the last one's
    assert same_bits(got["model.embed_tokens.weight"], T["ft1"]["model.embed_tokens.weight"])
    assert same_bits(got["model.norm.weight"], T["ft3"]["model.norm.weight"])
    assert same_bits(got["lm_head.weight"], T["ft3"]["lm_head.weight"])
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 8
    base_conf = json.loads((Path(d["ft1"]) / "config.json").read_text())
    assert {k: v for k, v in conf.items() if k != "num_hidden_layers"} == {
        k: v for k, v in base_conf.items() if k != "num_hidden_layers"
    }


def test_two_slices_with_their_own_parameters_and_gradients(fam, tmp_path):
    """task_arithmetic over two slices: slice-level gradients read at k / (n − 1) of the slice,
    a source's filter on its own layer index, the slice's merge-wide lambda, top-level fallbacks."""
    d, T = fam
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": d["base"],
        "dtype": "float32",
        "parameters": {"weight": 0.25, "lambda": 1.0},
        "slices": [
            {
                "sources": [src(d, "base", 0, 3), src(d, "ft1", 1, 4), src(d, "ft2", 0, 3)],
                "parameters": {"weight": [0.2, 1.0], "lambda": [{"filter": "mlp", "value": 0.5}]},
            },
            {
                "sources": [
                    src(d, "base", 2, 4),
                    src(d, "ft1", 0, 2, weight=[{"filter": "layers.1.", "value": 0.9}, {"value": 0.1}]),
                    src(d, "ft2", 2, 4),
                ],
            },
        ],
    }
    assert run(tmp_path, raw) == 0
    got = load_dir(tmp_path / "out")
    # (out layer, base layer, ft1 layer, ft2 layer, t in its slice, slice)
    rows = [
        (0, 0, 1, 0, 0.0, 0),
        (1, 1, 2, 1, 0.5, 0),
        (2, 2, 3, 2, 1.0, 0),
        (3, 2, 0, 2, 0.0, 1),
        (4, 3, 1, 3, 1.0, 1),
    ]
    for j, b, i1, i2, t, sl in rows:
        for s in LAYER:
            if sl == 0:
                w = [0.2 + 0.8 * t] * 2
                lam = 0.5 if "mlp" in s else 1.0
            else:
                w = [0.9 if i1 == 1 else 0.1, 0.25]  # ft1's filter sees ft1's own layer index
                lam = 1.0
            want = merge_tensors(
                T["base"][f"model.layers.{b}.{s}"],
                [T["ft1"][f"model.layers.{i1}.{s}"], T["ft2"][f"model.layers.{i2}.{s}"]],
                method="task_arithmetic",
                weights=w,
                lambda_=lam,
                name=f"model.layers.{j}.{s}",
                out_dtype=torch.float32,
            )
            assert same_bits(got[f"model.layers.{j}.{s}"], want), (j, s)
    for name, w in (("model.embed_tokens.weight", [0.2, 0.2]), ("model.norm.weight", [0.1, 0.25])):
        # pre: the first slice at t = 0; post: the last slice at t = 0 (ft1's filter misses)
        want = merge_tensors(
            T["base"][name],
            [T["ft1"][name], T["ft2"][name]],
            method="task_arithmetic",
            weights=w,
            name=name,
            out_dtype=torch.float32,
        )
        assert same_bits(got[name], want), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_post_weights_pair_the_last_slice_with_the_first_slice_count(fam, tmp_path):
    """mergekit merges the post weights from the last slice's first len(slices[0].sources) sources."""
    d, T = fam
    raw = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {"sources": [src(d, "ft1", 0, 2)]},
            {"sources": [src(d, "ft2", 2, 4), src(d, "ft3", 2, 4)]},
        ],
    }
    assert run(tmp_path, raw) == 0
    got = load_dir(tmp_path / "out")
    assert same_bits(got["lm_head.weight"], T["ft2"]["lm_head.weight"].float())  # ft2 alone
    want = merge_tensors(
        None,
        [T["ft2"]["model.layers.3.mlp.up_proj.weight"], T["ft3"]["model.layers.3.mlp.up_proj.weight"]],
        method="linear",
        name="model.layers.3.mlp.up_proj.weight",
        out_dtype=torch.float32,
    )
    assert same_bits(got["model.layers.3.mlp.up_proj.weight"], want)


def test_trivial_slice_over_fewer_layers_truncates(fam, tmp_path):
    d, T = fam
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": d["base"],
        "dtype": "bfloat16",
        "parameters": {"weight": [0.0, 1.0]},
        "slices": [{"sources": [src(d, "base", 0, 3), src(d, "ft1", 0, 3)]}],
    }
    assert run(tmp_path, raw) == 0
    got = load_dir(tmp_path / "out")
    assert not any(n.startswith("model.layers.3.") for n in got)
    name = "model.layers.1.self_attn.q_proj.weight"
    want = merge_tensors(
        T["base"][name],
        [T["ft1"][name]],
        method="task_arithmetic",
        weights=[0.5],
        name=name,
        out_dtype=torch.bfloat16,
    )
    assert same_bits(got[name], want)  # t = 1/2 over the slice's 3 layers (of the model's 4)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_modules_default_is_the_slices_form(fam, tmp_path):
    d, _ = fam
    sl = [
        {"sources": [src(d, "base", 0, 2), src(d, "ft1", 2, 4)], "parameters": {"t": 0.3}},
        {"sources": [src(d, "base", 1, 4), src(d, "ft2", 1, 4)]},
    ]
    flat = {"merge_method": "slerp", "base_model": d["base"], "dtype": "float32"}
    a = {**flat, "slices": sl, "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.6}]}}
    b = {
        **flat,
        "parameters": {"t": 0.6},
        "modules": {"default": {"slices": sl, "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}]}}},
    }
    assert run(tmp_path, a, "a") == 0 and run(tmp_path, b, "b") == 0
    ga, gb = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert set(ga) == set(gb) and all(same_bits(ga[k], gb[k]) for k in ga)
    models = {
        "merge_method": "slerp",
        "base_model": d["base"],
        "models": [{"model": d["ft1"]}],
        "parameters": {"t": 0.4},
    }
    mods = {**models, "modules": {"default": {"models": models["models"]}}}
    del mods["models"]
    assert run(tmp_path, models, "c") == 0 and run(tmp_path, mods, "d") == 0
    gc_, gd = load_dir(tmp_path / "c"), load_dir(tmp_path / "d")
    assert all(same_bits(gc_[k], gd[k]) for k in gc_)


def test_chain_parameters():
    top = {"weight": 0.5, "t": [{"filter": "mlp", "value": 1.0}]}
    assert chain_parameters(None, top) is top
    assert chain_parameters({"weight": [0.1, 0.2]}, top) == {"weight": [0.1, 0.2], "t": top["t"]}
    got = chain_parameters({"weight": {"filter": "attn", "value": 0.9}, "t": None}, top)
    assert got == {"weight": [{"filter": "attn", "value": 0.9}, {"value": 0.5}], "t": top["t"]}
    got = chain_parameters({"t": [{"filter": "attn", "value": 0.2}]}, top)
    assert got["t"] == [{"filter": "attn", "value": 0.2}, {"filter": "mlp", "value": 1.0}]
    assert is_pre_weight("model.embed_tokens.weight") and is_post_weight("lm_head.weight")
    assert not is_pre_weight("model.layers.0.mlp.up_proj.weight") and is_post_weight("model.norm.weight")


def _bad(d):
    ta = {"merge_method": "task_arithmetic", "base_model": d["base"]}
    return [
        (
            {
                **ta,
                "slices": [
                    {"sources": [src(d, "base", 0, 2), src(d, "ft1", 0, 2)]},
                    {"sources": [src(d, "base", 2, 5), src(d, "ft1", 1, 4)]},
                ],
            },
            r"slices\[1\]\.sources\[0\]\.layer_range: \[2, 5\] goes past the last layer of .*4 layers",
        ),
        (
            {**ta, "slices": [{"sources": [src(d, "base", 0, 2), src(d, "ft1", 0, 3)]}]},
            r"slices\[0\]\.sources: every source of a slice must take the same number of layers",
        ),
        (
            {**ta, "slices": [{"sources": [src(d, "base", -1, 2)]}]},
            r"slices\[0\]\.sources\[0\]\.layer_range: .* negative",
        ),
        (
            {**ta, "slices": [{"sources": [src(d, "base", 2, 2)]}, {"sources": [src(d, "base", 0, 1)]}]},
            r"slices\[0\].*empty",
        ),
        (
            {**ta, "slices": [{"sources": [src(d, "ft1", 0, 2), src(d, "ft2", 0, 2)]}]},
            r"slices\[0\]: the base model .* is not among the slice's sources",
        ),
        (  # the whole-model form (read as models): slerp with the base beside two sources
            {
                **ta,
                "merge_method": "slerp",
                "parameters": {"t": 0.5},
                "slices": [{"sources": [src(d, "ft1", 0, 4), src(d, "ft2", 0, 4)]}],
            },
            r"takes exactly 1 model.*; the base model .* is not among slices\[0\]'s sources .*Base input is not present",
        ),
        (
            {
                **ta,
                "slices": [{"sources": [src(d, "base", 0, 2), src(d, "ft1", 0, 2)], "merge_method": "ties"}],
            },
            r"slices\[0\]\.merge_method: mergekit 0\.1\.5 has one merge_method",
        ),
        (
            {**ta, "slices": [{"sources": [src(d, "base", 0, 2), src(d, "ft1", 0, 2, t=0.5)]}]},
            r"^m3kernels: error: slices\[0\]\.sources\[1\]\.parameters\.t: method 'task_arithmetic'",
        ),
        (
            {**ta, "modules": {"text_decoder": {"slices": [{"sources": [src(d, "base", 0, 2)]}]}}},
            r"modules: only mergekit's single module 'default'",
        ),
        (
            {
                **ta,
                "trim_scope": "model",
                "slices": [{"sources": [src(d, "base", 0, 2), src(d, "ft1", 1, 3)]}],
            },
            r"trim_scope: 'model' .* does not apply to slices",
        ),
    ]


def test_bad_slices_stop_before_anything_is_written(fam, tmp_path, capsys):
    d, _ = fam
    for k, (raw, match) in enumerate(_bad(d)):
        out = f"bad{k}"
        assert run(tmp_path, raw, out) == 2, match
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and __import__("re").search(match, err), (match, err)
        assert not (tmp_path / out).exists() and not list(tmp_path.glob(f".{out}*"))


def test_config_of_slices(fam):
    d, _ = fam
    cfg = load_config(
        {
            "merge_method": "nuslerp",
            "slices": [
                {"sources": [src(d, "ft1", 0, 2, weight=2.0), src(d, "ft2", 2, 4)], "residual_weight": 0.5}
            ],
        }
    )
    (spec,) = cfg.slices.slices
    assert cfg.models == [d["ft1"], d["ft2"]] and spec.base is None and spec.model_sources == [0, 1]
    assert spec.view.kwargs_at("model.layers.0.mlp.up_proj.weight", 0.0)["weights"] == [2.0, 1.0]
    with pytest.raises(MergeConfigError, match="not both"):
        load_config(
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "slices": [{"sources": [src(d, "ft1", 0, 1)]}],
            }
        )


def test_dry_run_and_distributed_split(fam, tmp_path):
    d, _ = fam
    raw = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(d, "ft1", 0, 4)]}, {"sources": [src(d, "ft2", 0, 4)]}],
    }
    plan = merge_checkpoints(raw, tmp_path / "o", dry_run=True, ranks=2, out_shard_size=4000)
    assert plan.out_num_layers == 8 and len(plan.shards) > 2 and len(plan.rank_shares) == 2
    assert [t.name for t in plan.tensors if t.name.startswith("model.layers.7.")]
    assert plan.layout == [
        f"slice 1: layers 0-3 <- {d['ft1']} [0, 4)",
        f"slice 2: layers 4-7 <- {d['ft2']} [0, 4)",
    ]
    assert "\n".join(plan.layout) in plan.summary()
    assert not (tmp_path / "o").exists()


def test_killed_sliced_merge_resumes(fam, tmp_path):
    d, _ = fam
    raw = {
        "merge_method": "ties",
        "base_model": d["base"],
        "parameters": {"weight": 0.5, "density": 0.4},
        "slices": [
            {"sources": [src(d, "base", 0, 2), src(d, "ft1", 1, 3), src(d, "ft2", 0, 2)]},
            {"sources": [src(d, "base", 1, 4), src(d, "ft1", 0, 3), src(d, "ft3", 1, 4)]},
        ],
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "m3kernels", "merge", str(path), str(tmp_path / "out")]
    cmd += ["--device", "cpu", "--out-shard-size", "3000", "--quiet"]
    env = {**os.environ, "M3KERNELS_TEST_CRASH_AFTER_SHARDS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "out").exists()
    (tmp,) = tmp_path.glob(".out.m3k-tmp-*")
    (first,) = tmp.glob("model-00001-of-*.safetensors")
    stamp = first.stat().st_mtime_ns
    assert (
        cli.main(
            [
                "merge",
                str(path),
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--out-shard-size",
                "3000",
                "-q",
                "--resume",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / first.name).stat().st_mtime_ns == stamp  # reused, not rewritten
    assert run(tmp_path, raw, "fresh", "--out-shard-size", "3000") == 0
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "fresh")
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)


def test_a_merged_tokenizer_is_the_whole_merges(tmp_path):
    """tokenizer_source: union over slices: one vocabulary for the merge (every referenced model,
    the top-level base), the embeddings and head laid out on it; slices with the whole merge's
    sources and parameters give the bytes and tokenizer files of the models form."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_models import make_tokenizer_family

    d = {
        k: str(v)
        for k, v in make_tokenizer_family(tmp_path / "tok", keys=("base", "ft1", "ft2")).dirs.items()
    }
    flat = {
        "merge_method": "task_arithmetic",
        "base_model": d["base"],
        "tokenizer_source": "union",
        "parameters": {"weight": 0.6},
        "models": [{"model": d["ft1"]}, {"model": d["ft2"]}],
    }
    sliced = {k: v for k, v in flat.items() if k != "models"}
    sliced["slices"] = [{"sources": [src(d, k, i, i + 1) for k in ("base", "ft1", "ft2")]} for i in range(2)]
    assert run(tmp_path, flat, "flat") == 0 and run(tmp_path, sliced, "sliced") == 0
    from transformers import AutoTokenizer

    a, b = load_dir(tmp_path / "flat"), load_dir(tmp_path / "sliced")
    va, vb = (AutoTokenizer.from_pretrained(str(tmp_path / n)).get_vocab() for n in ("flat", "sliced"))
    assert set(a) == set(b) and va.keys() == vb.keys()
    assert len(va) > len(AutoTokenizer.from_pretrained(d["base"]).get_vocab())  # the union
    # (compared by token: which id a token the base lacks gets is left to the tokenizer merge)
    for k in a:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            for t in va:
                assert same_bits(a[k][va[t]], b[k][vb[t]]), (k, t)
        else:
            assert same_bits(a[k], b[k]), k
    assert (tmp_path / "sliced" / "config.json").read_text() == (
        tmp_path / "flat" / "config.json"
    ).read_text()
