"""fisher and regmean in configs: every parameter parsed (bad values named with their range), the
statistics keys checked with the config's other blockers, and ``m3kernels merge`` on a tiny Llama
with statistics computed from data: the same bytes as merge_checkpoints_data_aware, M³ ratios
recorded, a dry run that checks the fingerprints, statistics of another model refused (exit 2,
nothing written), --resume without an unfinished run starts over (tests/test_data_aware_resume.py:
kill and resume)."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import m3kernels  # noqa: E402
from m3kernels import cli  # noqa: E402
from m3kernels.checkpoint.config import MergeConfigError, load_config  # noqa: E402
from m3kernels.merge import registry  # noqa: E402

transformers = pytest.importorskip("transformers")

from m3kernels.datastats import compute_fisher, compute_regmean, merge_checkpoints_data_aware  # noqa: E402
from m3kernels.datastats.tiny import fine_tune, make_tiny_llama, sample_texts  # noqa: E402


def raw_config(method: str, stats=("s1", "s2"), models=("m1", "m2"), **top) -> dict:
    key = "fisher" if method == "fisher" else "gram"
    raw = {
        "merge_method": method,
        "models": [{"model": m, "parameters": {key: s}} for m, s in zip(models, stats)],
    }
    if top:
        raw["parameters"] = top
    return raw


# ------------------------------------------------------------------------ parsing (no files)
def test_registry_entries_and_docs():
    for name, key in (("fisher", "fisher"), ("regmean", "gram")):
        m = registry.get_method(name)
        assert not m.needs_base and m.family == "data_aware" and m.mixup == registry.MIX_WEIGHTS
        p = m.param(key)
        assert p.kind == registry.PATH and p.default is registry.REQUIRED and p.scope == registry.PER_MODEL
        assert name in registry.supported()
    assert "| `fisher` |" in registry.markdown_tables() and "| `regmean` |" in registry.markdown_tables()
    text = cli.methods_text(["fisher", "regmean"])
    for word in ("floor_mode", "fisher_normalize", "gram_normalize", "precision", "fallback", "ridge"):
        assert word in text


@pytest.mark.parametrize(
    "method,top,want",
    [
        ("fisher", {}, dict(floor=1e-6, floor_mode="max")),
        ("fisher", {"floor": 0.0, "floor_mode": "add"}, dict(floor=0.0, floor_mode="add")),
        ("fisher", {"floor": "1e-4", "fisher_normalize": "l2"}, dict(floor=1e-4)),
        ("regmean", {}, dict(alpha=0.1, ridge=0.0, precision="float64")),
        (
            "regmean",
            {
                "alpha": 1,
                "ridge": 0.5,
                "precision": "float32",
                "gram_normalize": "tokens",
                "fallback": "linear",
            },
            dict(alpha=1.0, ridge=0.5, precision="float32"),
        ),
    ],
)
def test_every_parameter_is_parsed(method, top, want):
    raw = raw_config(method, **top)
    raw["models"][0]["parameters"]["weight"] = 2.5
    cfg = load_config(raw)
    kw = cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    assert kw["weights"] == [2.5, 1.0]
    assert kw["fishers" if method == "fisher" else "grams"] == ["s1", "s2"]
    from m3kernels.checkpoint.data_aware_run import _options

    weights, opts = _options(cfg, "model.layers.0.mlp.up_proj.weight")
    assert weights == [2.5, 1.0]
    for k, v in want.items():
        assert opts[k] == (pytest.approx(v) if isinstance(v, float) else v), k
        if k in top:
            assert kw[k] == opts[k]
    if method == "fisher":
        assert opts["normalize"] == top.get("fisher_normalize", "none")
    else:
        assert opts["gram_normalize"] == top.get("gram_normalize", "none")
        assert opts["fallback"] == top.get("fallback", "average")


@pytest.mark.parametrize(
    "method,top,words",
    [
        ("fisher", {"floor": -1}, ["floor", ">= 0"]),
        ("fisher", {"floor": "abc"}, ["parameters.floor", "number"]),
        ("fisher", {"floor_mode": "min"}, ["floor_mode", "max, add"]),
        ("fisher", {"fisher_normalize": "l1"}, ["fisher_normalize", "none, l2"]),
        ("fisher", {"floor": [0.1, 0.2]}, ["parameters.floor", "gradient"]),
        ("regmean", {"alpha": 1.5}, ["parameters.alpha", "[0, 1]"]),
        ("regmean", {"ridge": -0.1}, ["ridge", ">= 0"]),
        ("regmean", {"fallback": "ties"}, ["fallback", "average, linear, multislerp"]),
        ("regmean", {"gram_normalize": "mean"}, ["gram_normalize", "none, tokens"]),
        ("regmean", {"precision": "float16"}, ["precision", "float64, float32"]),
        ("regmean", {"floor": 0.1}, ["parameters.floor", "methods that do: fisher"]),
        ("fisher", {"alpha": 0.1}, ["parameters.alpha", "methods that do"]),
        ("regmean", {"transposed": True}, ["parameters.transposed"]),
        ("fisher", {"weight": -1.0}, ["weight", "weights >= 0"]),
        ("regmean", {"weight": 0.0}, ["weight", "not all 0"]),
    ],
)
def test_bad_values_name_the_parameter_and_range(method, top, words):
    with pytest.raises(MergeConfigError) as ei:
        load_config(raw_config(method, **top))
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_statistics_keys_are_checked_with_the_other_blockers():
    raw = raw_config("fisher", stats=("s1", None))
    del raw["models"][1]["parameters"]["fisher"]
    raw["parameters"] = {"fisher": "s0", "floor": -3, "weight": [{"filter": "mlp", "value": 2}]}
    raw["tokenizer_source"] = "union"
    raw["models"].append({"model": "m3+lora", "parameters": {"fisher": 7}})
    with pytest.raises(MergeConfigError) as ei:
        load_config(raw)
    msg = str(ei.value)
    for w in (
        "models[1].parameters.fisher: required",
        "parameters.fisher: per model only",
        "parameters.weight: method 'fisher' takes one value",
        "tokenizer_source: not implemented for fisher",
        "models[2].model: a LoRA reference",
        "models[2].parameters.fisher: expected a statistics folder path",
    ):
        assert w in msg, (w, msg)
    # gram, not fisher, for regmean; fisher is not a regmean parameter
    raw = raw_config("regmean")
    raw["models"][0]["parameters"] = {"fisher": "s1"}
    with pytest.raises(MergeConfigError) as ei:
        load_config(raw)
    assert "models[0].parameters.gram: required" in str(ei.value)
    assert "methods that do: fisher" in str(ei.value)
    with pytest.raises(MergeConfigError, match="does not use a base model"):
        load_config(raw_config("fisher") | {"base_model": "b"})
    with pytest.raises(MergeConfigError, match="parameters.fisher: method 'ties' does not take it"):
        load_config(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "m", "parameters": {"fisher": "x"}}],
            }
        )


# ------------------------------------------------------------------------ merges of a tiny Llama
@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_aware_config")
    make_tiny_llama(root / "base", sample_texts(48), steps=4, vocab_size=120, hidden=16, intermediate=24)
    for i in (1, 2):
        fine_tune(root / "base", root / f"ft{i}", sample_texts(32, seed=10 + i), steps=2, seed=i)
        (root / f"d{i}.txt").write_text("\n".join(sample_texts(5, seed=20 + i)) + "\n")
        compute_fisher(root / f"ft{i}", root / f"d{i}.txt", root / f"fisher{i}", batch_size=3, progress=False)
        compute_regmean(root / f"ft{i}", root / f"d{i}.txt", root / f"gram{i}", batch_size=3, progress=False)
    return root


def write_config(fam, tmp_path, method, stats=None, **top):
    """A config in tmp_path with paths relative to it where possible (models: absolute; statistics:
    relative to the config's folder, which is not the working directory)."""
    key = "fisher" if method == "fisher" else "gram"
    stats = stats or [fam / f"{key}1", fam / f"{key}2"]
    links = []
    for i, s in enumerate(stats):
        copy = tmp_path / f"stats{i}"
        if not copy.exists():
            shutil.copytree(s, copy)
        links.append(f"stats{i}")
    raw = raw_config(method, stats=links, models=[str(fam / "ft1"), str(fam / "ft2")], **top)
    raw["models"][0]["parameters"]["weight"] = 2.0
    raw["seed"] = 5
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "method,top,direct",
    [
        (
            "fisher",
            {"floor": 1e-5, "floor_mode": "add", "fisher_normalize": "l2"},
            dict(floor=1e-5, floor_mode="add", normalize="l2"),
        ),
        (
            "regmean",
            {"alpha": 0.3, "ridge": 1e-3, "gram_normalize": "tokens"},
            dict(alpha=0.3, ridge=1e-3, gram_normalize="tokens"),
        ),
    ],
)
def test_config_merge_equals_merge_checkpoints_data_aware(fam, tmp_path, method, top, direct):
    mixup = {"alpha": 0.7, "seed": 11}
    cfg = write_config(fam, tmp_path, method, **top)
    raw = yaml.safe_load(cfg.read_text()) | {"mixup": mixup, "dtype": "bfloat16"}
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "-q"]) == 0
    ratios = m3kernels.draw_mix_ratios(0.7, 2, 11)
    key = "fisher" if method == "fisher" else "gram"
    import torch

    rec = merge_checkpoints_data_aware(
        method,
        [fam / "ft1", fam / "ft2"],
        [fam / f"{key}1", fam / f"{key}2"],
        tmp_path / "direct",
        weights=[2.0, 1.0],
        mix_ratios=ratios,
        seed=5,
        out_dtype=torch.bfloat16,
        progress=False,
        **direct,
    )
    got, want = tensors(out), tensors(tmp_path / "direct")
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    record = yaml.safe_load((out / "m3kernels_merge.yaml").read_text())  # the main merge's record
    assert record["mix_ratios"] == pytest.approx(list(ratios)) and record["seed"] == 5
    assert record["mix_ratios"] == rec["mix_ratios"] and record["weights"] == [2.0, 1.0]
    assert record["options"] == rec["options"]


def test_dry_run_checks_the_statistics_and_prints_the_plan(fam, tmp_path, capsys):
    cfg = write_config(fam, tmp_path, "regmean")
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "regmean statistics of models[0]" in text and "fingerprint matches" in text
    assert "linear weights solved" in text and not out.exists()
    plan = m3kernels.merge_checkpoints(str(cfg), out, dry_run=True, progress=False)
    assert len(plan.notes) >= 3


def test_statistics_of_another_model_exit_2_nothing_written(fam, tmp_path, capsys):
    # fisher2 for ft1 and fisher1 for ft2: the fingerprints do not match
    cfg = write_config(fam, tmp_path, "fisher", stats=[fam / "fisher2", fam / "fisher1"])
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert cli.main(["merge", str(cfg), str(out), "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert "computed from another model" in err and "models[0].parameters.fisher" in err
        assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_wrong_kind_missing_folder_and_resume(fam, tmp_path, capsys):
    cfg = write_config(fam, tmp_path, "fisher", stats=[fam / "gram1", fam / "fisher2"])
    assert cli.main(["merge", str(cfg), str(tmp_path / "o1"), "-q"]) == 2
    assert "holds regmean statistics, fisher ones are needed" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "stats0")
    assert cli.main(["merge", str(cfg), str(tmp_path / "o2"), "-q"]) == 2
    assert "stats0" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    cfg = write_config(fam, tmp_path / "r", "fisher")
    assert cli.main(["merge", str(cfg), str(tmp_path / "o3"), "-q", "--resume"]) == 0
    assert "no unfinished run of this merge" in capsys.readouterr().err  # so it starts over
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2))
