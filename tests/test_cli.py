"""The ``m3kernels`` command line: sizes, ``inspect``, ``backends``, ``demo``, output modes, the
console script and ``python -m m3kernels``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3kernels import cli
from m3kernels.backends import available_backends
from m3kernels.synthetic import fine_tune, llama_config, llama_shapes, llama_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)


@pytest.fixture
def config(tmp_path):
    base = llama_tensors(seed=1, **SIZES)
    b = write_checkpoint(tmp_path / "base", base, shards=2, config=llama_config(**SIZES))
    m = [
        write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), config=llama_config(**SIZES))
        for i in (1, 2)
    ]
    cfg = tmp_path / "ta.yaml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {m[0]}\n"
        f"  - model: {m[1]}\nparameters:\n  lambda: 0.5\nmixup:\n  alpha: 1.5\n"
    )
    return cfg


@pytest.mark.parametrize(
    "text,value",
    [
        ("123", 123),
        ("5G", 5 * 2**30),
        ("500M", 500 * 2**20),
        ("2K", 2048),
        ("1.5GiB", int(1.5 * 2**30)),
        ("5GB", 5 * 10**9),
        ("10kb", 10_000),
        ("1T", 2**40),
    ],
)
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "5X", "-1", "0", "1.5.2G"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_merge_prints_summary_and_quiet_prints_nothing(config, tmp_path, capsys):
    assert cli.main(["merge", str(config), str(tmp_path / "a"), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "merged 21 tensors" in cap.out and "M³ ratios" in cap.out
    assert cli.main(["merge", str(config), str(tmp_path / "b"), "--device", "cpu", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_seed_flag_overrides_the_config(config, tmp_path, capsys):
    import yaml

    import m3kernels

    assert (
        cli.main(["merge", str(config), str(tmp_path / "s"), "--device", "cpu", "-q", "--seed", "123"]) == 0
    )
    rec = yaml.safe_load((tmp_path / "s" / "m3kernels_merge.yaml").read_text())
    assert rec["seed"] == 123 and tuple(rec["mix_ratios"]) == m3kernels.draw_mix_ratios(1.5, 2, 123)


def test_relative_model_paths_resolve_against_the_config_folder(config, tmp_path, monkeypatch, capsys):
    text = config.read_text().replace(str(tmp_path) + "/", "")
    config.write_text(text)
    monkeypatch.chdir(ROOT)  # not where the models are
    assert cli.main(["merge", str(config), str(tmp_path / "rel"), "--device", "cpu", "-q"]) == 0


def test_inspect_lists_tensors_and_totals(config, tmp_path, capsys):
    out = tmp_path / "merged"
    assert (
        cli.main(["merge", str(config), str(out), "--device", "cpu", "-q", "--out-shard-size", "1500"]) == 0
    )
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["tensor", "dtype", "shape", "shard", "bytes"]
    shapes = llama_shapes(**SIZES)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, shape in shapes.items():
        (row,) = [ln for ln in lines if ln.split()[0] == name]
        nbytes = 2 * int(torch.tensor(shape).prod())
        assert row.split() == [
            name,
            "BF16",
            "x".join(map(str, shape)),
            index["weight_map"][name],
            f"{nbytes:,}",
        ]
    total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    params = total // 2
    n_files = len(set(index["weight_map"].values()))
    assert (
        f"total: {len(shapes)} tensors, {params:,} parameters, {total:,} bytes in {n_files} file(s)" in text
    )
    assert "merged by m3kernels" in text and "task_arithmetic" in text
    # a single file works too
    assert cli.main(["inspect", str(next(out.glob("*.safetensors")))]) == 0


def test_inspect_bad_path_is_a_user_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    text = capsys.readouterr().out
    for name, state in available_backends().items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        assert ("not available" in line) == (state != "available")
    assert cli.main(["info"]) == 0


def test_demo_runs_and_checks_itself(capsys):
    assert cli.main(["demo", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "λ = " in text and "demo OK" in text and "bit-identical" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_user_error(config, tmp_path, capsys):
    assert cli.main(["merge", str(config), str(tmp_path / "g"), "--device", "cuda", "-q"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.m3k-*"))


def test_python_dash_m_and_usage_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "m3kernels", "merge", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "--out-shard-size" in proc.stdout and "--resume" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "m3kernels", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize(
    "value",
    [
        "[" * 100000 + "]" * 100000,
        "[1, 2]",
        '"x"',
        '{"seed": ' + "9" * 5000 + "}",
        "not json",
        '{"merge_method": "ties\\u001b[2J"}',
    ],
)
def test_inspect_with_hostile_merge_metadata(tmp_path, capsys, value):
    from safetensors.torch import save_file

    from m3kernels import cli

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(f), metadata={"m3kernels_merge": value})
    assert cli.main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "internal error" not in out and "\x1b" not in out
