"""kill -9 anywhere, then ``--resume``: the output equals an uninterrupted run bit for bit (issue 14).

A CLI merge (``trim_scope: model``, so there is a statistics pass; several output shards) runs in
a subprocess that kills itself with SIGKILL at a seeded random point of one kind: during the
statistics pass, in the middle of a shard write (half of it written), right after a journal
write, at the final rename (the journal already removed), between the two renames of a
``--force`` publish, after the final rename, and before the first journal write. Then
``--resume`` (in this process) must finish with exit 0, the output must equal a clean run's
file for file, and nothing may be left beside OUT: no temporary folder, no publish record, no
moved-aside old output.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from m3kernels import cli
from m3kernels.checkpoint import model_stats, writer

from checkpoint_factory import fine_tune, llama_config, llama_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)

# M3K_KILL = "WHEN:WHAT:N": SIGKILL at the N-th call of WHAT (write: an output write, save: a journal
# write, rename: a rename in publish, histogram: a tensor of the statistics pass), WHEN before it,
# after it, or (write only) in the middle: half of the bytes written.
KILLER = r"""
import os, signal, sys
when, what, n = os.environ["M3K_KILL"].split(":")
n, counts = int(n), {}
def wrap(owner, attr, name):
    real = getattr(owner, attr)
    def f(*args, **kwargs):
        counts[name] = c = counts.get(name, 0) + 1
        hit = name == what and c == n
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit and when == "mid":
            fd, data = args
            view = memoryview(data).cast("B")
            os.write(fd, view[: len(view) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, attr, f)
from m3kernels.checkpoint import model_stats, writer
wrap(writer, "_write_bytes", "write")
wrap(writer.Journal, "save", "save")
wrap(writer.os, "rename", "rename")
wrap(model_stats, "prepare", "histogram")
from m3kernels import cli
sys.exit(cli.main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("fresh_cli_logging")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    base = llama_tensors(seed=1, **SIZES)
    cfg = llama_config(**SIZES)
    dirs = {"base": write_checkpoint(root / "base", base, shards=2, config=cfg)}
    for i in (1, 2):
        dirs[f"ft{i}"] = write_checkpoint(root / f"ft{i}", fine_tune(base, 10 + i), shards=i, config=cfg)
    merge_cfg = {
        "merge_method": "ties",
        "trim_scope": "model",
        "base_model": str(dirs["base"]),
        "models": [
            {"model": str(dirs["ft1"]), "parameters": {"density": 0.4}},
            {"model": str(dirs["ft2"]), "parameters": {"density": 0.6, "weight": 0.7}},
        ],
    }
    config = root / "merge.yaml"
    config.write_text(json.dumps(merge_cfg))
    counts = _count_calls(config, root / "clean")
    return config, root / "clean", counts


def _args(config, out, *extra):
    return ["merge", str(config), str(out), "--device", "cpu", "--quiet", "--out-shard-size", "1K", *extra]


def _count_calls(config, out) -> dict:
    """A clean merge into ``out`` in this process, counting the calls the kill points count."""
    counts = {}
    patches = [
        (writer, "_write_bytes", "write"),
        (writer.Journal, "save", "save"),
        (writer.os, "rename", "rename"),
        (model_stats, "prepare", "histogram"),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]

    def counting(real, name):
        def f(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        return f

    try:
        for owner, attr, name in patches:
            setattr(owner, attr, counting(getattr(owner, attr), name))
        assert cli.main(_args(config, out)) == 0
    finally:
        for owner, attr, real in saved:
            setattr(owner, attr, real)
    return counts


def _leftovers(parent: Path, name: str = "out") -> list:
    return sorted(
        n for n in os.listdir(parent) if n.startswith(f".{name}.m3k") and not n.endswith(".m3k.lock")
    )


def _same_files(out: Path, clean: Path) -> None:
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def _killed_run(config, out, spec, *extra):
    env = {k: v for k, v in os.environ.items() if k != "M3KERNELS_TEST_CRASH_AFTER_SHARDS"} | {
        "M3K_KILL": spec
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *_args(config, out, *extra)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, proc.stderr)


RNG = random.Random(20261214)
# (id, WHEN, WHAT, which call: "random" / "last" / a number, OUT exists beforehand (and --force))
POINTS = [
    ("statistics pass", "before", "histogram", "random", False),
    ("mid-shard", "mid", "write", "random", False),
    ("mid-shard, another", "mid", "write", "random", False),
    ("after a journal write", "after", "save", "random", False),
    ("before the first journal write", "before", "save", 1, False),
    ("at the final rename", "before", "rename", 1, False),
    ("between the renames of --force", "before", "rename", 2, True),
    ("after the final rename of --force", "after", "rename", 2, True),
]


@pytest.mark.parametrize("point", POINTS, ids=[p[0] for p in POINTS])
def test_kill_then_resume_is_bit_identical(setup, tmp_path, capsys, point):
    config, clean, counts = setup
    _, when, what, which, existing = point
    total = counts[what] if not existing else counts[what] * 2  # (a --force publish renames twice)
    n = RNG.randint(1, counts[what]) if which == "random" else which
    assert 1 <= n <= total, (what, n, counts)
    out = tmp_path / "out"
    extra = ()
    if existing:  # an older output, replaced with --force
        out.mkdir()
        (out / "old.txt").write_text("the previous output")
        extra = ("--force",)
    _killed_run(config, out, f"{when}:{what}:{n}", *extra)
    if existing and when == "before":
        assert not out.exists()  # moved aside, killed before the finished folder took its place
    finished = {
        p.name: p.stat().st_ino for t in tmp_path.glob(".out.m3k-tmp-*") for p in t.glob("*.safetensors")
    }
    status = cli.main(_args(config, out, "--resume", *extra))
    err = capsys.readouterr().err
    assert status == 0, err
    assert "Traceback" not in err
    _same_files(out, clean)
    assert _leftovers(tmp_path) == [], _leftovers(tmp_path)
    if what == "rename" and when == "before":  # the finished folder itself was published, not merged again
        assert finished and finished == {p.name: p.stat().st_ino for p in out.glob("*.safetensors")}


def test_a_finished_folder_left_at_the_rename_is_kept_for_resume_only(setup, tmp_path, capsys):
    """Without --resume the finished folder is left (and named); a damaged one is merged again."""
    config, clean, _ = setup
    out = tmp_path / "out"
    _killed_run(config, out, "before:rename:1")
    (tmp,) = [n for n in _leftovers(tmp_path) if ".m3k-tmp-" in n]
    assert not (tmp_path / tmp / writer.JOURNAL).exists() and (tmp_path / ".out.m3k-publish.json").exists()
    status = cli.main(
        _args(config, tmp_path / "other")
    )  # another OUT: this one's folders are not its business
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / tmp).is_dir()
    shard = sorted((tmp_path / tmp).glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # damaged: must be written again, not published
    status = cli.main(_args(config, out, "--resume"))
    assert status == 0, capsys.readouterr().err
    _same_files(out, clean)  # the damaged shard was written again
    assert _leftovers(tmp_path) == []


def test_an_orphan_temp_folder_is_removed_by_the_next_run(setup, tmp_path, capsys):
    config, clean, _ = setup
    out = tmp_path / "out"
    _killed_run(config, out, "before:save:1")
    (tmp,) = _leftovers(tmp_path)
    assert os.listdir(tmp_path / tmp) == []
    status = cli.main(_args(config, out))  # a plain run, no --resume
    assert status == 0, capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    _same_files(out, clean)
