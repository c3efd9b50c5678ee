"""LoRA inputs (``model: base+adapter``, m3kernels/checkpoint/lora.py): the adapter applied while
streaming equals PEFT's own ``merge_and_unload`` bit for bit (float32, bfloat16, float16 models;
float32 and bfloat16 adapters; rank/alpha patterns, rsLoRA, embeddings, modules_to_save, biases,
GPT-2's Conv1D), a whole merge with a LoRA input equals the same merge of the materialised
model, mergekit 0.1.5 gives the same output (opt-in: ``M3K_MERGEKIT_VENV``), a resumed merge
never reuses shards of another adapter, and bad adapters stop with one line naming the file and
the tensor, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.checkpoint.lora import LoraCheckpoint, pattern_key, split_reference
from m3kernels.checkpoint.source import Checkpoint
from m3kernels.cli import main
from m3kernels.synthetic import LlamaShapes, make_family, random_tensors, write_checkpoint, write_lora_adapter

ROOT = Path(__file__).resolve().parent.parent
SHAPES = LlamaShapes(vocab=53, hidden=18, intermediate=29, layers=2, heads=3, kv_heads=1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _open(base, adapter) -> LoraCheckpoint:
    return LoraCheckpoint.open(base, adapter, role="model 1", allow_bin=False, follow_symlinks=False)


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- references


def test_reference_splits_like_mergekit():
    assert split_reference("a/b") == ("a/b", None)
    assert split_reference("a/b+c/d") == ("a/b", "c/d")
    for bad in ("a+b+c", "+b", "a+", " + "):
        with pytest.raises(ValueError, match="MODEL\\+ADAPTER"):
            split_reference(bad)


def test_config_accepts_lora_references_and_rejects_malformed_ones(tmp_path):
    cfg = load_config({"merge_method": "linear", "models": [{"model": "a+b"}, {"model": "c"}]})
    assert cfg.models == ["a+b", "c"]
    with pytest.raises(MergeConfigError, match=r"models\[0\]\.model: .*MODEL\+ADAPTER"):
        load_config({"merge_method": "linear", "models": [{"model": "a+b+c"}, {"model": "c"}]})


def test_pattern_key_matches_as_peft():
    assert pattern_key(["v_proj"], "model.layers.0.self_attn.v_proj") == "v_proj"
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj") is not None
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj") is None
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None  # whole name parts only


# ----------------------------------------------------------------------------- against PEFT


def _peft_case(tmp_path, dtype, adapter_dtype, lora_kwargs, *, bias=False, seed=0):
    """A tiny Llama (with biases when ``bias``) and a trained-looking PEFT adapter made by PEFT
    itself; returns (base folder, adapter folder, PEFT's merge_and_unload state dict)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    name = str(dtype).replace("torch.", "")
    tensors = random_tensors(SHAPES, seed, dtype)
    config = SHAPES.config(name)
    if bias:
        config["attention_bias"] = True
        g = torch.Generator().manual_seed(seed + 7)
        for k, shape in list(SHAPES.shapes().items()):
            if ".self_attn." in k and k.endswith("_proj.weight"):
                tensors[k.replace(".weight", ".bias")] = (torch.randn(shape[0], generator=g) * 0.05).to(dtype)
    base = write_checkpoint(tmp_path / "base", tensors, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:  # nonzero B, trained biases and heads: every path counts
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapter = tmp_path / "adapter"
        pm.save_pretrained(adapter)
        if adapter_dtype is not None:
            f = adapter / "adapter_model.safetensors"
            save_file({k: v.to(adapter_dtype) for k, v in load_file(str(f)).items()}, str(f))
        fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
        merged = peft.PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()
    return base, adapter, merged


def _assert_same_as_peft(base, adapter, merged, min_touched):
    ck = _open(base, adapter)
    try:
        touched = [n for n in ck.names if ck.adapter.touches(n)]
        assert len(touched) >= min_touched
        for n in ck.names:
            ours, ref = ck.tensor(n), merged[n]
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, n
            assert torch.equal(ours, ref), (n, (ours.float() - ref.float()).abs().max().item())
        base_ck = Checkpoint(base)
        try:  # the touched tensors moved, the others are the base's own bytes
            for n in ck.names:
                assert torch.equal(ck.tensor(n), base_ck.tensor(n)) != (n in touched), n
        finally:
            base_ck.close()
    finally:
        ck.close()


PATTERNS = dict(
    r=4,
    lora_alpha=7,
    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    modules_to_save=["lm_head"],
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"v_proj": 3},
)


@pytest.mark.parametrize("adapter_dtype", [None, torch.bfloat16], ids=["adapter-f32", "adapter-bf16"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_bit_exact_against_peft_merge_and_unload(tmp_path, dtype, adapter_dtype):
    base, adapter, merged = _peft_case(tmp_path, dtype, adapter_dtype, PATTERNS, seed=11)
    # q, v, down in 2 layers, the embedding; lm_head (modules_to_save) and the embedding's base copy
    _assert_same_as_peft(base, adapter, merged, min_touched=8)


def test_bit_exact_against_peft_rslora_all_linear(tmp_path):
    kw = dict(r=8, lora_alpha=5, use_rslora=True, target_modules="all-linear")
    base, adapter, merged = _peft_case(tmp_path, torch.bfloat16, None, kw, seed=12)
    _assert_same_as_peft(base, adapter, merged, min_touched=14)


def test_bit_exact_against_peft_biases(tmp_path):
    kw = dict(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj"], lora_bias=True, bias="lora_only")
    base, adapter, merged = _peft_case(tmp_path, torch.bfloat16, None, kw, bias=True, seed=13)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.bias") for k in keys) and any(k.endswith("base_layer.bias") for k in keys)
    _assert_same_as_peft(base, adapter, merged, min_touched=8)


def test_bit_exact_against_peft_gpt2_conv1d(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=24, n_layer=2, n_head=3, vocab_size=61, n_positions=32)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
        model.save_pretrained(tmp_path / "base")
        pm = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
            peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        )
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        pm.save_pretrained(tmp_path / "adapter")
        fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    # c_proj of the attention is square (24 × 24): the orientation comes from the model type
    _assert_same_as_peft(tmp_path / "base", tmp_path / "adapter", merged, min_touched=6)


def test_linear_delta_against_float64(tmp_path):
    """W' = W + (alpha/r)·B·A: within one ulp of the output dtype of the float64 value."""
    base = write_checkpoint(
        tmp_path / "base", random_tensors(SHAPES, 3, torch.bfloat16), config=SHAPES.config()
    )
    write_lora_adapter(
        tmp_path / "lora", SHAPES.shapes(), targets=("o_proj", "up_proj"), r=5, alpha=3, seed=9
    )
    ck = _open(base, tmp_path / "lora")
    sd = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    try:
        names = [n for n in ck.names if ck.adapter.touches(n)]
        assert len(names) == 4
        for n in names:
            m = "base_model.model." + n[: -len(".weight")]
            exact = ck.base.tensor(n).double() + 0.6 * (
                sd[m + ".lora_B.weight"].double() @ sd[m + ".lora_A.weight"].double()
            )
            out = ck.tensor(n)
            ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2**-126)
            assert ((out.double() - exact).abs() <= ulp).all(), n
    finally:
        ck.close()


# ----------------------------------------------------------------------------- whole merges


def _family(tmp_path, dtype=torch.bfloat16):
    fam = make_family(tmp_path / "m", n_models=1, shapes=SHAPES, dtype=dtype, shards=2)
    write_lora_adapter(
        tmp_path / "lora",
        SHAPES.shapes(),
        targets=("q_proj", "v_proj", "gate_proj", "embed_tokens"),
        r=4,
        alpha=8,
        seed=21,
        config={"rank_pattern": {"gate_proj": 2}},
    )
    # rank 2 for gate_proj: rewrite those tensors at that rank
    f = tmp_path / "lora" / "adapter_model.safetensors"
    sd = load_file(str(f))
    for k in list(sd):
        if "gate_proj.lora_A" in k:
            sd[k] = sd[k][:2].contiguous()
        elif "gate_proj.lora_B" in k:
            sd[k] = sd[k][:, :2].contiguous()
    save_file(sd, str(f))
    return fam


CONFIG = """merge_method: {method}
base_model: {base}
models:
  - model: {lora}
    parameters: {{weight: 0.6{density}}}
  - model: {ft}
    parameters: {{weight: 0.4{density}}}
dtype: {dtype}
"""


def _config(tmp_path, lora_ref, method="ties", dtype="float32", name="c.yaml"):
    density = ", density: 0.5" if method == "ties" else ""
    text = CONFIG.format(
        method=method,
        base=tmp_path / "m/base",
        lora=lora_ref,
        ft=tmp_path / "m/ft1",
        dtype=dtype,
        density=density,
    )
    p = tmp_path / name
    p.write_text(text)
    return p


def _materialise(tmp_path, ref_dir):
    ck = _open(tmp_path / "m/base", tmp_path / "lora")
    try:
        tensors = {n: ck.tensor(n).clone() for n in ck.names}
        write_checkpoint(ref_dir, tensors, config=ck.config)
    finally:
        ck.close()


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_streamed_merge_equals_the_materialised_model(tmp_path, method, capsys):
    _family(tmp_path)
    before = _files(tmp_path)
    lora_ref = f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}"
    if method == "slerp":
        text = (
            f"merge_method: slerp\nbase_model: {tmp_path / 'm/ft1'}\nmodels:\n  - model: {lora_ref}\n"
            f"  - model: {tmp_path / 'm/ft1'}\nparameters: {{t: [0.2, 0.7]}}\ndtype: bfloat16\n"
        )
        (tmp_path / "c.yaml").write_text(text)
        (tmp_path / "ref.yaml").write_text(text.replace(lora_ref, str(tmp_path / "ref")))
    else:
        _config(tmp_path, lora_ref, method)
        _config(tmp_path, tmp_path / "ref", method, name="ref.yaml")
    assert (
        main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out"), "-q", "--out-shard-size", "3000"])
        == 0
    )
    assert _files(tmp_path / "m") == [f[2:] for f in before if f.startswith("m/")]  # no merged copy written
    assert _files(tmp_path / "lora") == ["adapter_config.json", "adapter_model.safetensors"]
    _materialise(tmp_path, tmp_path / "ref")
    assert (
        main(
            ["merge", str(tmp_path / "ref.yaml"), str(tmp_path / "out_ref"), "-q", "--out-shard-size", "3000"]
        )
        == 0
    )
    ours, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "out_ref")
    assert sorted(ours) == sorted(ref)
    for n in ours:
        assert torch.equal(ours[n], ref[n]), n
    record = (tmp_path / "out" / "m3kernels_merge.yaml").read_text()
    assert "lora_adapter:" in record and str(tmp_path / "lora") in record


def test_dry_run_names_the_adapter(tmp_path, capsys):
    _family(tmp_path)
    cfg = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"+{tmp_path / 'lora'} (LoRA: 7 tensors adapted, 0 replaced)" in out
    assert not (tmp_path / "out").exists()


def test_resume_never_mixes_adapters(tmp_path):
    """A merge killed after one shard with adapter A, resumed with the adapter's files replaced
    by B's: no shard of A's run is reused, and the output equals a fresh merge with B."""
    _family(tmp_path)
    cfg = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}", "task_arithmetic")
    args = [
        sys.executable,
        "-m",
        "m3kernels",
        "merge",
        str(cfg),
        str(tmp_path / "out"),
        "-q",
        "--out-shard-size",
        "2000",
    ]
    env = dict(os.environ, M3KERNELS_TEST_CRASH_AFTER_SHARDS="2")
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert any(p.name.startswith(".out.m3k-tmp") for p in tmp_path.iterdir())
    write_lora_adapter(
        tmp_path / "lora", SHAPES.shapes(), targets=("q_proj", "v_proj"), r=4, alpha=8, seed=99
    )
    env.pop("M3KERNELS_TEST_CRASH_AFTER_SHARDS")
    proc = subprocess.run(args + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no unfinished run of this merge" in proc.stderr
    assert main(["merge", str(cfg), str(tmp_path / "fresh"), "-q", "--out-shard-size", "2000"]) == 0
    a, b = _tensors(tmp_path / "out"), _tensors(tmp_path / "fresh")
    assert all(torch.equal(a[n], b[n]) for n in b) and sorted(a) == sorted(b)


# ----------------------------------------------------------------------------- mergekit itself

MK_VENV = os.environ.get("M3K_MERGEKIT_VENV")


@pytest.mark.skipif(
    not (MK_VENV and (Path(MK_VENV) / "bin" / "mergekit-yaml").exists()),
    reason="set M3K_MERGEKIT_VENV to a venv with mergekit 0.1.5 (bin/mergekit-yaml)",
)
def test_same_output_as_mergekit(tmp_path):
    """mergekit merges the adapter into a cached copy (PEFT), then merges; ``dtype: float32``."""
    _family(tmp_path)
    cfg = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}", "task_arithmetic")
    assert main(["merge", str(cfg), str(tmp_path / "ours"), "-q"]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [
            str(Path(MK_VENV) / "bin" / "mergekit-yaml"),
            str(cfg),
            str(tmp_path / "mk"),
            "--lora-merge-cache",
            str(tmp_path / "cache"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (tmp_path / "mk" / "model.safetensors").exists() or list(
        (tmp_path / "mk").glob("*.safetensors")
    ), proc.stderr[-3000:]
    ours, mk = _tensors(tmp_path / "ours"), _tensors(tmp_path / "mk")
    assert sorted(ours) == sorted(mk)
    for n in ours:
        assert torch.equal(ours[n], mk[n]), n


# ----------------------------------------------------------------------------- bad adapters


def _edit_weights(tmp_path, fn):
    f = tmp_path / "lora" / "adapter_model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def _edit_config(tmp_path, **changes):
    f = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _bad_shape(sd):
    sd[Q0 + ".lora_B.weight"] = torch.zeros(SHAPES.hidden + 1, 4)


def _bad_key(sd):
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = sd[Q0 + ".lora_A.weight"].clone()
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = sd[Q0 + ".lora_B.weight"].clone()


def _dora(sd):
    sd[Q0 + ".lora_magnitude_vector"] = torch.ones(SHAPES.hidden)


def _no_pair(sd):
    del sd[Q0 + ".lora_B.weight"]


def _rank(sd):
    sd[Q0 + ".lora_A.weight"] = sd[Q0 + ".lora_A.weight"][:3].contiguous()
    sd[Q0 + ".lora_B.weight"] = sd[Q0 + ".lora_B.weight"][:, :3].contiguous()


def _unprefixed(sd):
    sd["model.norm.weight"] = torch.ones(SHAPES.hidden)


def _replaced_shape(sd):
    sd["base_model.model.lm_head.weight"] = torch.zeros(SHAPES.vocab + 2, SHAPES.hidden)


BAD = {
    "shape": (
        lambda p: _edit_weights(p, _bad_shape),
        ["adapter_model.safetensors", "q_proj.lora_B.weight", "does not fit"],
    ),
    "unknown key": (
        lambda p: _edit_weights(p, _bad_key),
        ["layers.7.self_attn.q_proj.weight", "does not have"],
    ),
    "DoRA vector": (lambda p: _edit_weights(p, _dora), ["lora_magnitude_vector", "DoRA"]),
    "missing pair": (
        lambda p: _edit_weights(p, _no_pair),
        ["q_proj.lora_A.weight", "lora_B.weight is missing"],
    ),
    "rank": (lambda p: _edit_weights(p, _rank), ["rank 3", "rank 4", "q_proj.lora_A.weight"]),
    "no prefix": (lambda p: _edit_weights(p, _unprefixed), ["'model.norm.weight'", "base_model.model."]),
    "replacement shape": (lambda p: _edit_weights(p, _replaced_shape), ["lm_head.weight", "does not match"]),
    "use_dora": (lambda p: _edit_config(p, use_dora=True), ["adapter_config.json", "use_dora", "DoRA"]),
    "IA3": (lambda p: _edit_config(p, peft_type="IA3"), ["adapter_config.json", "peft_type 'IA3'"]),
    "variant": (lambda p: _edit_config(p, use_qalora=True), ["use_qalora", "not supported"]),
    "pissa": (lambda p: _edit_config(p, init_lora_weights="pissa"), ["init_lora_weights", "pissa"]),
    "not targeted": (lambda p: _edit_config(p, target_modules=["v_proj"]), ["q_proj", "target_modules"]),
    "layer not transformed": (
        lambda p: _edit_config(p, layers_to_transform=[1]),
        ["layers.0.self_attn", "layers_to_transform"],
    ),
    "no weights": (
        lambda p: (p / "lora" / "adapter_model.safetensors").unlink(),
        ["adapter_model.safetensors is missing"],
    ),
    "no config": (
        lambda p: (p / "lora" / "adapter_config.json").unlink(),
        ["adapter_config.json is missing"],
    ),
    "no folder": (lambda p: shutil.rmtree(p / "lora"), ["LoRA adapter", "does not exist"]),
    "corrupt weights": (
        lambda p: (p / "lora" / "adapter_model.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00{}"
        ),
        ["adapter_model.safetensors"],
    ),
}


def test_a_bin_adapter_needs_allow_bin_and_gives_the_same_merge(tmp_path, capsys):
    """adapter_model.bin (older PEFT): refused without --allow-bin (pickles can run code), and with
    it the same output as the safetensors adapter."""
    _family(tmp_path)
    shutil.copytree(tmp_path / "lora", tmp_path / "lora_bin")
    f = tmp_path / "lora_bin" / "adapter_model.safetensors"
    torch.save(load_file(str(f)), tmp_path / "lora_bin" / "adapter_model.bin")
    f.unlink()
    cfg = _config(
        tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora_bin'}", "task_arithmetic", name="b.yaml"
    )
    assert main(["merge", str(cfg), str(tmp_path / "out_bin"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin" in err and "--allow-bin" in err and not (tmp_path / "out_bin").exists()
    assert main(["merge", str(cfg), str(tmp_path / "out_bin"), "-q", "--allow-bin"]) == 0
    ref = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}", "task_arithmetic")
    assert main(["merge", str(ref), str(tmp_path / "out"), "-q"]) == 0
    a, b = _tensors(tmp_path / "out_bin"), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert "adapter_model.bin" in (tmp_path / "out_bin" / "m3kernels_merge.yaml").read_text()


def test_output_inside_the_adapter_folder_is_refused(tmp_path, capsys):
    _family(tmp_path)
    cfg = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}", "task_arithmetic")
    assert main(["merge", str(cfg), str(tmp_path / "lora" / "out"), "-q"]) == 2
    assert "inside the folder of the input model 1" in capsys.readouterr().err
    assert _files(tmp_path / "lora") == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_stop_with_one_line_and_write_nothing(tmp_path, capsys, case):
    make_family(tmp_path / "m", n_models=1, shapes=SHAPES, shards=1)
    write_lora_adapter(tmp_path / "lora", SHAPES.shapes(), targets=("q_proj", "v_proj"), r=4)
    edit, needles = BAD[case]
    edit(tmp_path)
    cfg = _config(tmp_path, f"{tmp_path / 'm/base'}+{tmp_path / 'lora'}", "task_arithmetic")
    before = _files(tmp_path)
    for dry in ([], ["--dry-run"]):
        assert main(["merge", str(cfg), str(tmp_path / "out"), "-q", *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("m3kernels: error:"), err
        for needle in needles:
            assert needle in err, (needle, err)
        assert _files(tmp_path) == before
        assert not (tmp_path / "out").exists()
