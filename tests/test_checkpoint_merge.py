"""Whole-checkpoint merges through the CLI: bit-identical to ``merge_tensors`` tensor by tensor.

Tiny Llama-shaped checkpoints (odd sizes, several shards, bf16 and float32 inputs, an int
buffer, a scalar and an empty tensor) are merged with every method, read back with the
safetensors library, and compared bit for bit with ``merge_tensors`` on the same inputs. Also:
output layout (shards, index, config.json, tokenizer files, the merge record), whole-model
trim thresholds against the float64 reference, vocabulary-row and tied-head rules, resume after
a crash, ``.bin`` inputs, and zero-copy memory-mapped reads.
"""

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
from safetensors import safe_open
from safetensors.torch import load_file

import m3kernels
from m3kernels import cli
from m3kernels.api import merge_tensors
from m3kernels.checkpoint.config import load_config
from m3kernels.checkpoint.plan import count_layers
from m3kernels.checkpoint.safetensors_io import SafetensorsFile
from m3kernels.checkpoint.source import Checkpoint
from m3kernels.merge.recipe import PRESETS, make_recipe
from m3kernels.merge.reference import reference_thresholds
from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, random_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- helpers
def load_dir(folder) -> dict:
    """Every tensor of a checkpoint folder, read with the safetensors library (not our reader)."""
    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def expected_merge(cfg_dict, *, thresholds=None, num_layers=2) -> dict:
    """merge_tensors applied tensor by tensor, as issue 3 defines the merge (float tensors only)."""
    cfg = load_config(cfg_dict)
    base = load_dir(cfg.base_model) if cfg.base_model else None
    models = [load_dir(m) for m in cfg.models]
    src = base if base is not None else models[0]
    uses_base = PRESETS[cfg.method].uses_base
    out = {}
    for name, t in src.items():
        if not t.dtype.is_floating_point:
            out[name] = t
            continue
        out[name] = merge_tensors(
            base[name] if (base is not None and uses_base) else None,
            [m[name] for m in models],
            method=cfg.method,
            **cfg.tensor_kwargs(name, num_layers),
            mix_ratios=cfg.mix_ratios(),
            seed=cfg.seed,
            name=name,
            out_dtype=cfg.out_torch_dtype(t.dtype),
            thresholds=thresholds,
        )
    return out


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def assert_identical(out_dir, expected: dict):
    got = load_dir(out_dir)
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert same_bits(got[name], exp), name


# ------------------------------------------------------------------------------------- fixtures
EXTRA_SHAPES = {"model.logit_scale": (), "model.empty_proj.weight": (0, 24)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base (bf16, 3 shards) + ft1 (bf16, 2 shards), ft2 (float32, 1 file), ft3 (bf16, 4 shards)."""
    root = tmp_path_factory.mktemp("family")
    base = llama_tensors(seed=11)
    base.update(random_tensors(EXTRA_SHAPES, 12))
    base["model.buffers.position_ids"] = torch.arange(9, dtype=torch.int64).reshape(1, 9)
    cfg = llama_config()
    dirs = {"base": write_checkpoint(root / "base", base, shards=3, config=cfg)}
    for i, (dtype, shards) in enumerate([(None, 2), (torch.float32, 1), (None, 4)]):
        ft = fine_tune(base, seed=100 + i, dtype=dtype)
        ft["model.buffers.position_ids"] = base["model.buffers.position_ids"] + i + 1  # differs: still copied
        dirs[f"ft{i + 1}"] = write_checkpoint(root / f"ft{i + 1}", ft, shards=shards, config=cfg)
    return {k: str(v) for k, v in dirs.items()}


def method_configs(d):
    """One config per method (M³ on in most), written against the family's folders."""
    two = [d["ft1"], d["ft2"]]
    return {
        "linear": {
            "merge_method": "linear",
            "out_dtype": "float16",
            "models": [
                {"model": d["ft1"], "parameters": {"weight": 0.7}},
                {"model": d["ft2"], "parameters": {"weight": 0.3}},
            ],
            "mixup": {"alpha": 2.0, "seed": 5},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": d["base"],
            "models": [
                {"model": two[0], "parameters": {"weight": [1.0, 0.5]}},
                {"model": two[1], "parameters": {"weight": 0.8}},
            ],
            "parameters": {"lambda": 0.6},
            "mixup": {"lambda": 0.3},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": d["base"],
            "seed": 3,
            "models": [
                {"model": two[0], "parameters": {"density": 0.4}},
                {"model": two[1], "parameters": {"density": 0.25}},
            ],
            "mixup": {"alpha": 0.5},
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": d["base"],
            "seed": 9,
            "models": [{"model": m, "parameters": {"density": 0.7}} for m in two],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": d["base"],
            "seed": 2**40 + 1,
            "models": [{"model": m, "parameters": {"density": 0.6}} for m in two],
            "parameters": {"rescale": "l1"},
            "mixup": {"alpha": 1.0, "seed": 17},
        },
        "ties_dare": {
            "merge_method": "ties_dare",
            "base_model": d["base"],
            "seed": 21,
            "models": [
                {"model": m, "parameters": {"drop_rate": 0.3, "density": 0.5}}
                for m in (d["ft1"], d["ft2"], d["ft3"])
            ],
            "mixup": {"alpha": 0.8, "seed": 4},
        },
    }


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "ties_dare"]
)
def test_every_method_round_trips_bit_identical(family, tmp_path, method):
    cfg = method_configs(family)[method]
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert run_cli("merge", cfg_path, out, "--device", "cpu", "--out-shard-size", "3K", "--quiet") == 0
    assert_identical(out, expected_merge(cfg))


def test_output_layout_index_config_tokenizer(family, tmp_path):
    cfg = method_configs(family)["ties"]
    out = tmp_path / "out"
    result = m3kernels.merge_checkpoints(cfg, out, device="cpu", out_shard_size=4000, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert result.files == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = load_dir(out)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), "pt") as f:
            assert name in f.keys()
    for fname in shards:  # each shard within the limit unless a single tensor is larger
        tensors = load_file(str(out / fname))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 4000 or len(tensors) == 1
    conf = json.loads((out / "config.json").read_text())
    base_conf = json.loads((Path(family["base"]) / "config.json").read_text())
    assert conf == {**base_conf, "torch_dtype": "bfloat16"}
    for fname in (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
    ):
        assert (out / fname).read_bytes() == (Path(family["base"]) / fname).read_bytes()
    assert not list(tmp_path.glob(".out.m3k-*")), "temporary folder left behind"
    assert not (out / ".m3k-journal.json").exists()
    # the int buffer comes from the base although the models differ
    assert torch.equal(got["model.buffers.position_ids"], torch.arange(9).reshape(1, 9))


def test_single_shard_is_model_safetensors_without_index(family, tmp_path):
    cfg = method_configs(family)["dare_linear"]
    out = tmp_path / "single"
    m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert_identical(out, expected_merge(cfg))


def test_record_file_and_header_metadata(family, tmp_path):
    cfg = method_configs(family)["ties"]
    out = tmp_path / "rec"
    assert (
        run_cli(
            "merge",
            json.dumps(cfg),
            out,
            "--device",
            "cpu",
            "--seed",
            "77",
            "--quiet",
            "--out-shard-size",
            "6K",
        )
        == 0
    )
    rec = yaml.safe_load((out / "m3kernels_merge.yaml").read_text())
    assert rec["m3kernels_version"] == m3kernels.__version__
    assert rec["merge_method"] == "ties" and rec["seed"] == 77
    assert rec["config"]["seed"] == 77 and rec["config"]["models"] == cfg["models"]
    # no mixup.seed in the config: λ is drawn with the (overridden) merge seed
    assert tuple(rec["mix_ratios"]) == m3kernels.draw_mix_ratios(0.5, 2, 77)
    for role, folder in (("base", family["base"]),):
        files = rec["inputs"][role]["files"]
        assert {f["name"]: f["bytes"] for f in files} == {
            p.name: p.stat().st_size for p in Path(folder).glob("*.safetensors")
        }
    assert [m["path"] for m in rec["inputs"]["models"]] == [
        str(Path(family["ft1"]).resolve()),
        str(Path(family["ft2"]).resolve()),
    ]
    for p in out.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["m3kernels_merge"]) == rec
    cfg77 = {**cfg, "seed": 77}
    assert_identical(out, expected_merge(cfg77))


def test_model_trim_scope_matches_reference_over_concatenated_model(family, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": family["base"],
        "trim_scope": "model",
        "models": [
            {"model": family["ft1"], "parameters": {"density": 0.3}},
            {"model": family["ft2"], "parameters": {"density": 0.15}},
        ],
        "mixup": {"alpha": 0.5, "seed": 1},
    }
    out = tmp_path / "model_scope"
    result = m3kernels.merge_checkpoints(cfg, out, device="cpu", out_shard_size=5000, progress=False)
    base, m1, m2 = load_dir(family["base"]), load_dir(family["ft1"]), load_dir(family["ft2"])
    names = [n for n, t in base.items() if t.dtype.is_floating_point and t.numel() > 0]
    flat = lambda d: torch.cat([d[n].to(torch.float32).reshape(-1) for n in names])  # noqa: E731
    recipe = make_recipe(2, method="ties", has_base=True, density=[0.3, 0.15])
    ref = reference_thresholds(flat(base), [flat(m1), flat(m2)], recipe)
    assert result.thresholds == ref
    rec = yaml.safe_load((out / "m3kernels_merge.yaml").read_text())
    assert rec["model_trim_thresholds"] == ref
    assert_identical(out, expected_merge(cfg, thresholds=ref))
    # and whole-model trimming differs from per-tensor trimming
    per_tensor = expected_merge({**cfg, "trim_scope": "tensor"})
    got = load_dir(out)
    assert any(not same_bits(got[n], per_tensor[n]) for n in names)


def test_vocabulary_rows_32001_and_warning(tmp_path, caplog):
    sizes = dict(vocab=32000, hidden=8, intermediate=12, layers=1, heads=2, kv_heads=1)
    base = llama_tensors(seed=5, **sizes)
    cfg_json = llama_config(**sizes)
    ft1 = fine_tune(base, 6)
    ft2 = fine_tune(base, 7)
    g = torch.Generator().manual_seed(8)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # a pad token added to ft2
        ft2[name] = torch.cat([ft2[name], (torch.randn(1, 8, generator=g) * 0.05).to(torch.bfloat16)])
    bdir = write_checkpoint(tmp_path / "base", base, config=cfg_json)
    d1 = write_checkpoint(tmp_path / "ft1", ft1, config=cfg_json)
    d2 = write_checkpoint(tmp_path / "ft2", ft2, shards=2, config={**cfg_json, "vocab_size": 32001})
    cfg = {
        "merge_method": "ties",
        "base_model": str(bdir),
        "seed": 4,
        "models": [
            {"model": str(d1), "parameters": {"density": 0.5}},
            {"model": str(d2), "parameters": {"density": 0.5}},
        ],
        "mixup": {"alpha": 1.0},
    }
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="m3kernels"):
        result = m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False)
    got = load_dir(out)
    ratios = result.mix_ratios
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (32001, 8)
        exp = merge_tensors(
            base[name],
            [ft1[name], ft2[name][:32000]],
            method="ties",
            density=0.5,
            mix_ratios=ratios,
            seed=4,
            name=name,
        )
        assert same_bits(got[name][:32000], exp)
        assert same_bits(got[name][32000:], ft2[name][32000:])  # only ft2 has the extra row
        assert any(name in r.getMessage() and "row" in r.getMessage() for r in caplog.records)
    others = {n for n in base if n not in ("model.embed_tokens.weight", "lm_head.weight")}
    for name in others:
        exp = merge_tensors(
            base[name],
            [ft1[name], ft2[name]],
            method="ties",
            density=0.5,
            mix_ratios=ratios,
            seed=4,
            name=name,
        )
        assert same_bits(got[name], exp)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32001


def test_extra_rows_are_averaged_when_several_models_have_them(tmp_path):
    shapes = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,)}
    base = random_tensors(shapes, 1, torch.float32)
    fts = []
    for i, rows in enumerate((12, 12, 11)):
        ft = fine_tune(base, 10 + i)
        extra = random_tensors({"x": (rows - 10, 4)}, 20 + i, torch.float32)["x"]
        ft["model.embed_tokens.weight"] = torch.cat([ft["model.embed_tokens.weight"], extra])
        fts.append(ft)
    dirs = [write_checkpoint(tmp_path / f"m{i}", ft, tokenizer=False) for i, ft in enumerate(fts)]
    bdir = write_checkpoint(tmp_path / "base", base, tokenizer=False)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(bdir),
        "models": [{"model": str(d)} for d in dirs],
    }
    out = tmp_path / "out"
    m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False)
    emb = load_dir(out)["model.embed_tokens.weight"]
    e = [ft["model.embed_tokens.weight"] for ft in fts]
    assert emb.shape == (12, 4)
    exp = merge_tensors(
        base["model.embed_tokens.weight"],
        [x[:10] for x in e],
        method="task_arithmetic",
        name="model.embed_tokens.weight",
    )
    assert same_bits(emb[:10], exp)
    assert same_bits(emb[10:11], (e[0][10:11] + e[1][10:11] + e[2][10:11]) / 3)
    assert same_bits(emb[11:12], (e[0][11:12] + e[1][11:12]) / 2)


def test_tied_base_and_untied_model_gives_untied_head(tmp_path):
    sizes = dict(vocab=23, hidden=8, intermediate=12, layers=1, heads=2, kv_heads=1)
    base = llama_tensors(seed=1, tied=True, **sizes)
    ft1 = fine_tune(base, 2)
    ft1["lm_head.weight"] = fine_tune({"w": base["model.embed_tokens.weight"]}, 3)["w"]  # untied
    ft2 = fine_tune(base, 4)  # tied
    tied_cfg = llama_config(tied=True, **sizes)
    bdir = write_checkpoint(tmp_path / "base", base, config=tied_cfg)
    d1 = write_checkpoint(tmp_path / "ft1", ft1, config=llama_config(tied=False, **sizes))
    d2 = write_checkpoint(tmp_path / "ft2", ft2, config=tied_cfg)
    cfg = {
        "merge_method": "ties",
        "base_model": str(bdir),
        "models": [
            {"model": str(d1), "parameters": {"density": 0.5}},
            {"model": str(d2), "parameters": {"density": 0.5}},
        ],
    }
    out = tmp_path / "out"
    m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False)
    got = load_dir(out)
    exp = merge_tensors(
        base["model.embed_tokens.weight"],
        [ft1["lm_head.weight"], ft2["model.embed_tokens.weight"]],
        method="ties",
        density=0.5,
        name="lm_head.weight",
    )
    assert same_bits(got["lm_head.weight"], exp)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    # all tied: no head in the output, config still tied
    cfg2 = {**cfg, "models": [{"model": str(d2), "parameters": {"density": 0.5}}]}
    m3kernels.merge_checkpoints(cfg2, tmp_path / "out2", device="cpu", progress=False)
    assert "lm_head.weight" not in load_dir(tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["tie_word_embeddings"] is True


def test_untied_base_with_tied_model_uses_its_embedding(tmp_path):
    sizes = dict(vocab=19, hidden=8, intermediate=12, layers=1, heads=2, kv_heads=1)
    base = llama_tensors(seed=1, **sizes)
    ft1 = fine_tune(base, 2)
    ft2 = fine_tune(base, 3)
    del ft2["lm_head.weight"]
    bdir = write_checkpoint(tmp_path / "base", base)
    d1, d2 = write_checkpoint(tmp_path / "ft1", ft1), write_checkpoint(tmp_path / "ft2", ft2)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(bdir),
        "models": [{"model": str(d1)}, {"model": str(d2)}],
    }
    m3kernels.merge_checkpoints(cfg, tmp_path / "out", device="cpu", progress=False)
    got = load_dir(tmp_path / "out")["lm_head.weight"]
    exp = merge_tensors(
        base["lm_head.weight"],
        [ft1["lm_head.weight"], ft2["model.embed_tokens.weight"]],
        method="task_arithmetic",
        name="lm_head.weight",
    )
    assert same_bits(got, exp)


def crash_after_first_shard(family, tmp_path, method):
    """Run the CLI merge of ``method`` in a subprocess killed (SIGKILL) after its first shard."""
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(method_configs(family)[method]))
    out = tmp_path / "out"
    env = {**os.environ, "M3KERNELS_TEST_CRASH_AFTER_SHARDS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "m3kernels",
        "merge",
        str(cfg_path),
        str(out),
        "--device",
        "cpu",
        "--out-shard-size",
        "3000",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return cfg_path, out


def test_resume_after_crash_reuses_finished_shards(family, tmp_path):
    cfg_path, out = crash_after_first_shard(family, tmp_path, "dare_ties")
    assert not out.exists()
    (tmp,) = tmp_path.glob(".out.m3k-tmp-*")
    (first_shard,) = [p for p in tmp.glob("model-00001-of-*.safetensors")]
    st = first_shard.stat()
    # a plain rerun does not touch the unfinished one; --resume continues it
    assert (
        run_cli("merge", cfg_path, out, "--device", "cpu", "--out-shard-size", "3000", "--quiet", "--resume")
        == 0
    )
    assert not tmp.exists()
    reused = out / first_shard.name
    assert (reused.stat().st_ino, reused.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    clean = tmp_path / "clean"
    assert run_cli("merge", cfg_path, clean, "--device", "cpu", "--out-shard-size", "3000", "--quiet") == 0
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_resume_rewrites_a_finished_shard_changed_after_the_crash(family, tmp_path):
    cfg_path, out = crash_after_first_shard(family, tmp_path, "ties")
    (tmp,) = tmp_path.glob(".out.m3k-tmp-*")
    (first_shard,) = tmp.glob("model-00001-of-*.safetensors")
    good = first_shard.read_bytes()
    first_shard.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, new mtime: must not be trusted
    assert (
        run_cli("merge", cfg_path, out, "--device", "cpu", "--out-shard-size", "3000", "--quiet", "--resume")
        == 0
    )
    clean = tmp_path / "clean"
    assert run_cli("merge", cfg_path, clean, "--device", "cpu", "--out-shard-size", "3000", "--quiet") == 0
    for p in clean.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_resume_ignores_a_partial_run_of_another_config(family, tmp_path, caplog):
    cfg = method_configs(family)["dare_linear"]
    out = tmp_path / "out"
    fake = tmp_path / ".out.m3k-tmp-stale"
    fake.mkdir()
    (fake / ".m3k-journal.json").write_text(json.dumps({"format": 1, "fingerprint": "0" * 64, "shards": {}}))
    with caplog.at_level("WARNING", logger="m3kernels"):
        m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False, resume=True)
    assert any("starting from the beginning" in r.getMessage() for r in caplog.records)
    assert fake.exists()  # not ours to delete
    assert_identical(out, expected_merge(cfg))


def test_bin_inputs_need_allow_bin_and_match_safetensors(family, tmp_path):
    bin_dir = tmp_path / "ft1_bin"
    bin_dir.mkdir()
    torch.save(load_dir(family["ft1"]), bin_dir / "pytorch_model.bin")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": family["base"],
        "models": [{"model": str(bin_dir)}, {"model": family["ft2"]}],
    }
    with pytest.raises(m3kernels.errors.CheckpointError, match="allow-bin"):
        m3kernels.merge_checkpoints(cfg, tmp_path / "out", device="cpu", progress=False)
    m3kernels.merge_checkpoints(cfg, tmp_path / "out", device="cpu", progress=False, allow_bin=True)
    ref_cfg = {**cfg, "models": [{"model": family["ft1"]}, {"model": family["ft2"]}]}
    assert_identical(tmp_path / "out", expected_merge(ref_cfg))


@pytest.mark.parametrize("lease", [True, False], ids=["lease", "no-lease"])
def test_inputs_are_zero_copy_views_of_the_mapped_file(family, monkeypatch, lease):
    """With a read lease tensors are views of one mapping; without one they are copies read with
    pread (safetensors_io: a mapped file cut short by someone else would kill us with SIGBUS)."""
    from m3kernels.checkpoint.safetensors_io import NO_LEASE_ENV

    monkeypatch.setenv(NO_LEASE_ENV, "0" if lease else "1")
    ck = Checkpoint(family["ft1"])
    try:
        by_file = {}
        for name in ck.names:
            by_file.setdefault(ck.weight_map[name], []).append(name)
        fname, names = next((f, n) for f, n in by_file.items() if len(n) >= 2)
        f = SafetensorsFile(Path(family["ft1"]) / fname)
        a, b = f.tensor(names[0]), f.tensor(names[1])
        ia, ib = f.tensors[names[0]], f.tensors[names[1]]
        if not f.input_file.leased:
            assert not lease and f.address(names[0]) is None
            assert a.data_ptr() != b.data_ptr() and a.untyped_storage().nbytes() == ia.nbytes
        else:
            assert b.data_ptr() - a.data_ptr() == ib.begin - ia.begin  # both point into one mapping
        ref = load_file(str(Path(family["ft1"]) / fname))
        assert same_bits(a, ref[names[0]]) and same_bits(b, ref[names[1]])
        f.release(names[0])  # dropping the pages keeps the data readable (refaulted from the file)
        assert same_bits(a, ref[names[0]])
        f.close()
    finally:
        ck.close()


def test_layer_count_from_config_and_names(family):
    ck = Checkpoint(family["base"])
    try:
        assert count_layers(ck) == 2
    finally:
        ck.close()


# ------------------------------------------------------------------------------------- writer
@pytest.mark.parametrize("no_direct", ["0", "1"])
def test_shard_file_writes_exact_bytes_across_staging_blocks(tmp_path, monkeypatch, no_direct):
    import hashlib

    from m3kernels.checkpoint.writer import ShardFile

    monkeypatch.setenv("M3KERNELS_NO_DIRECT_IO", no_direct)
    g = torch.Generator().manual_seed(0)
    chunks = [
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        for n in (0, 1, 4095, 4096, 8193, 20000, 7, 12288)
    ]
    data = b"".join(c.numpy().tobytes() for c in chunks)
    for full in (False, True):
        f = ShardFile(tmp_path / "x.bin", staging=8192, full_hash=full)
        if no_direct == "1":
            assert not f.direct
        for c in chunks:
            f.write(c)
        size, digest = f.finish()
        assert (tmp_path / "x.bin").read_bytes() == data
        hashed = data if full else chunks[1].numpy().tobytes()  # default: the first non-empty write
        assert size == len(data) and digest == hashlib.sha256(hashed).hexdigest()


def test_buffered_and_direct_output_are_identical(family, tmp_path, monkeypatch):
    cfg = method_configs(family)["ties_dare"]
    m3kernels.merge_checkpoints(cfg, tmp_path / "direct", device="cpu", out_shard_size=5000, progress=False)
    monkeypatch.setenv("M3KERNELS_NO_DIRECT_IO", "1")
    m3kernels.merge_checkpoints(cfg, tmp_path / "buffered", device="cpu", out_shard_size=5000, progress=False)
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    for n in names:
        assert (tmp_path / "direct" / n).read_bytes() == (tmp_path / "buffered" / n).read_bytes(), n


# ------------------------------------------------------------------------------------- GPU path
def _cpu_stream(jobs, device="cuda", backend="auto", depth=2):
    """Stands in for gpu_merge_stream on a machine without a GPU: same contract, CPU kernels."""
    from m3kernels.api import prepare
    from m3kernels.backends import get_backend

    be = get_backend("cpu", "cpu")
    pending = []
    for job in jobs:  # runs ahead by one job, like the real pipeline
        out = torch.full(tuple(job.models[0].shape), float("nan"), dtype=job.out_dtype)
        if out.numel():
            p, b = prepare(job.base, list(job.models), job.recipe, job.name, be, job.thresholds)
            be.merge(p, b, list(job.models), out)
        pending.append((job, out))
        if len(pending) == depth:
            yield pending.pop(0)
    yield from pending


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_gpu_path_feeds_jobs_in_order_between_copies(family, tmp_path, monkeypatch, method):
    from m3kernels.checkpoint import gpu_pipeline
    from m3kernels.checkpoint import run as orchestrator

    cfg = method_configs(family)[method]
    monkeypatch.setattr(gpu_pipeline, "gpu_merge_stream", _cpu_stream)
    monkeypatch.setattr(orchestrator, "resolve_device", lambda device, backend="auto": torch.device("cuda"))
    result = m3kernels.merge_checkpoints(
        cfg, tmp_path / "gpu", device="cuda", out_shard_size=4000, progress=False
    )
    assert result.device == "cuda"
    assert_identical(tmp_path / "gpu", expected_merge(cfg))


def test_gpu_path_assembles_vocabulary_rows(tmp_path, monkeypatch):
    from m3kernels.checkpoint import gpu_pipeline
    from m3kernels.checkpoint import run as orchestrator

    shapes = {"model.embed_tokens.weight": (10, 6), "model.norm.weight": (6,)}
    base = random_tensors(shapes, 1)
    ft1, ft2 = fine_tune(base, 2), fine_tune(base, 3)
    ft2["model.embed_tokens.weight"] = torch.cat(
        [ft2["model.embed_tokens.weight"], random_tensors({"x": (3, 6)}, 4)["x"]]
    )
    dirs = [
        write_checkpoint(tmp_path / n, t, tokenizer=False) for n, t in (("b", base), ("m1", ft1), ("m2", ft2))
    ]
    cfg = {
        "merge_method": "ties",
        "base_model": str(dirs[0]),
        "seed": 5,
        "models": [{"model": str(d), "parameters": {"density": 0.5}} for d in dirs[1:]],
    }
    m3kernels.merge_checkpoints(cfg, tmp_path / "cpu", device="cpu", progress=False)
    monkeypatch.setattr(gpu_pipeline, "gpu_merge_stream", _cpu_stream)
    monkeypatch.setattr(orchestrator, "resolve_device", lambda device, backend="auto": torch.device("cuda"))
    m3kernels.merge_checkpoints(cfg, tmp_path / "gpu", device="cuda", progress=False)
    got, ref = load_dir(tmp_path / "gpu"), load_dir(tmp_path / "cpu")
    assert got["model.embed_tokens.weight"].shape == (13, 6)
    assert all(same_bits(got[n], ref[n]) for n in ref)
    assert same_bits(got["model.embed_tokens.weight"][10:], ft2["model.embed_tokens.weight"][10:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_cuda_merge_equals_cpu_merge(family, tmp_path, method):
    cfg = method_configs(family)[method]
    m3kernels.merge_checkpoints(cfg, tmp_path / "cpu", device="cpu", out_shard_size=4000, progress=False)
    m3kernels.merge_checkpoints(cfg, tmp_path / "cuda", device="cuda", out_shard_size=4000, progress=False)
    for p in (tmp_path / "cpu").iterdir():
        assert p.read_bytes() == (tmp_path / "cuda" / p.name).read_bytes(), p.name


def test_resume_reuses_model_thresholds_from_the_journal(family, tmp_path, monkeypatch):
    from m3kernels.checkpoint import run as orchestrator

    cfg = {
        "merge_method": "ties",
        "base_model": family["base"],
        "trim_scope": "model",
        "seed": 8,
        "models": [
            {"model": family["ft1"], "parameters": {"density": 0.4}},
            {"model": family["ft3"], "parameters": {"density": 0.2}},
        ],
    }
    clean = m3kernels.merge_checkpoints(
        cfg, tmp_path / "clean", device="cpu", out_shard_size=3000, progress=False
    )

    def crash_after_first_shard():
        def after(shard):
            raise RuntimeError("simulated crash")

        return after

    monkeypatch.setattr(orchestrator, "_crash_hook", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        m3kernels.merge_checkpoints(cfg, tmp_path / "out", device="cpu", out_shard_size=3000, progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    def no_stats(*args, **kwargs):
        raise AssertionError("the statistics pass ran again")

    monkeypatch.setattr(orchestrator, "model_thresholds", no_stats)
    result = m3kernels.merge_checkpoints(
        cfg, tmp_path / "out", device="cpu", out_shard_size=3000, progress=False, resume=True
    )
    assert result.resumed_shards == [clean.files[0]] and result.thresholds == clean.thresholds
    for p in (tmp_path / "clean").iterdir():
        assert p.read_bytes() == (tmp_path / "out" / p.name).read_bytes(), p.name
