"""``m3kernels mergekit-yaml``: without mergekit one clear line and exit 2; with mergekit 0.1.5
(``M3K_MERGEKIT_VENV``, its own venv) mergekit's command runs with our methods registered."""

import os
import subprocess
from pathlib import Path

import pytest

from m3kernels import cli
from m3kernels.integrations.mergekit_yaml_cli import mergekit_missing

ROOT = Path(__file__).resolve().parents[1]


def test_without_mergekit_one_line_exit_2(capsys):
    if not mergekit_missing():
        pytest.skip("mergekit is installed in this Python")
    assert cli.main(["mergekit-yaml", "cfg.yaml", "out", "--m3k-seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mergekit 0.1.5" in err and "mergekit_plugin" in err


def _venv_python():
    venv = os.environ.get("M3K_MERGEKIT_VENV")
    py = Path(venv) / "bin" / "python" if venv else None
    if not (py and py.exists()):
        pytest.skip("set M3K_MERGEKIT_VENV to a venv with mergekit 0.1.5 (bin/python)")
    return py


def test_with_mergekit_the_command_is_mergekit_yaml(tmp_path):
    py = _venv_python()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [str(py), "-m", "m3kernels", "mergekit-yaml", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "--m3k-seed" in r.stdout and "CONFIG_FILE" in r.stdout and "OUT_PATH" in r.stdout
    bad = subprocess.run(
        [str(py), "-m", "m3kernels", "mergekit-yaml", "--m3k-seed", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "--m3k-seed" in bad.stderr


def test_parser_passes_every_argument_through():
    p = cli._build_parser()
    args = p.parse_args(["mergekit-yaml", "c.yaml", "o", "--cuda", "--m3k-replace", "--help"])
    assert args.args == ["c.yaml", "o", "--cuda", "--m3k-replace", "--help"]
