"""The distributed checkpoint merge (m3kernels/checkpoint/distributed.py) on gloo, CPU only.

2 and 3 processes started by ``torchrun --standalone``: the published folder equals a one-process
merge file for file (TIES with trim_scope: model and M³, DARE-TIES, linear); a rank that fails
stops every rank with its error and nothing is published; a rank killed mid-merge leaves a run
that ``--resume`` finishes (in one process) bit-identically.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from m3kernels import cli
from m3kernels.checkpoint.distributed import assign_shards
from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(layers=3, hidden=48, intermediate=80, vocab=70, heads=4, kv_heads=2)
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))

pytestmark = [
    pytest.mark.usefixtures("fresh_cli_logging"),
    pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed"),
]


def _shards(sizes):
    return [SimpleNamespace(index=i, tensors=[SimpleNamespace(nbytes=b)]) for i, b in enumerate(sizes)]


@pytest.mark.parametrize(
    "sizes, world",
    [([5, 1, 1, 1, 1, 1], 2), ([1] * 7, 3), ([3, 3, 3], 5), ([10, 1, 1, 10], 2), ([], 2), ([4], 1)],
)
def test_shards_are_split_into_contiguous_runs_with_the_smallest_largest_run(sizes, world):
    shares = assign_shards(_shards(sizes), world)
    assert len(shares) == world
    assert [i for run in shares for i in run] == list(range(len(sizes)))  # contiguous, in order
    best = min(  # brute force over every way to cut the list into `world` runs
        (
            max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
            for cuts in _cuts(len(sizes), world - 1)
        ),
        default=0,
    )
    assert max((sum(sizes[i] for i in run) for run in shares), default=0) == best


def _cuts(n, k):
    from itertools import combinations_with_replacement

    return combinations_with_replacement(range(n + 1), k) if n else [()]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = llama_tensors(seed=3, **SIZES)
    cfg = llama_config(**SIZES)
    dirs = {"base": write_checkpoint(root / "base", base, shards=2, config=cfg)}
    for i in (1, 2):
        dirs[f"ft{i}"] = write_checkpoint(root / f"ft{i}", fine_tune(base, 20 + i), shards=i, config=cfg)
    return root, dirs


def _config(root, dirs, name, merge):
    path = root / f"{name}.yaml"
    base = {} if merge["merge_method"] == "linear" else {"base_model": str(dirs["base"])}
    path.write_text(json.dumps({**base, **merge}))
    return path


CONFIGS = {
    "ties_model_scope_m3": {
        "merge_method": "ties",
        "trim_scope": "model",
        "mixup": {"alpha": 0.5, "seed": 11},
        "models": [
            {"model": "ft1", "parameters": {"density": 0.4}},
            {"model": "ft2", "parameters": {"density": 0.6}},
        ],
    },
    "ties_tensor_scope": {
        "merge_method": "ties",
        "models": [
            {"model": "ft1", "parameters": {"density": 0.3, "weight": 0.6}},
            {"model": "ft2", "parameters": {"density": 0.5}},
        ],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "seed": 5,
        "models": [
            {"model": "ft1", "parameters": {"density": 0.5}},
            {"model": "ft2", "parameters": {"density": 0.7}},
        ],
    },
    "linear": {
        "merge_method": "linear",
        "models": [{"model": "ft1"}, {"model": "ft2", "parameters": {"weight": 2}}],
    },
}


def _resolved(dirs, merge):
    merge = json.loads(json.dumps(merge))
    for m in merge["models"]:
        m["model"] = str(dirs[m["model"]])
    return merge


def _one_process(config, out):
    assert (
        cli.main(["merge", str(config), str(out), "--device", "cpu", "--quiet", "--out-shard-size", "2K"])
        == 0
    )


def _torchrun(k, config, out, *extra, env=None, timeout=240):
    cmd = [
        TORCHRUN,
        "--standalone",
        f"--nproc-per-node={k}",
        "-m",
        "m3kernels",
        "merge",
        str(config),
        str(out),
    ]
    cmd += ["--device", "cpu", "--quiet", "--out-shard-size", "2K", "--dist-timeout", "60", *extra]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("M3KERNELS_TEST_")}
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base_env, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _same_files(out: Path, clean: Path) -> None:
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def _leftovers(parent: Path, name: str) -> list:
    return sorted(
        n for n in os.listdir(parent) if n.startswith(f".{name}.m3k") and not n.endswith(".m3k.lock")
    )


@pytest.mark.parametrize(
    "name, k", [("ties_model_scope_m3", 2), ("ties_tensor_scope", 3), ("dare_ties", 3), ("linear", 2)]
)
def test_k_processes_publish_what_one_process_does(family, tmp_path, name, k):
    root, dirs = family
    config = _config(tmp_path, dirs, name, _resolved(dirs, CONFIGS[name]))
    _one_process(config, tmp_path / "one")
    assert len(list((tmp_path / "one").glob("*.safetensors"))) >= k  # every rank has shards to write
    res = _torchrun(k, config, tmp_path / "dist")
    assert res.returncode == 0, res.stderr[-3000:]
    _same_files(tmp_path / "dist", tmp_path / "one")
    assert _leftovers(tmp_path, "dist") == []


def test_dry_run_shows_each_ranks_share(family, tmp_path, capsys):
    root, dirs = family
    config = _config(tmp_path, dirs, "ties", _resolved(dirs, CONFIGS["ties_model_scope_m3"]))
    assert (
        cli.main(
            ["merge", str(config), str(tmp_path / "o"), "--dry-run", "--ranks", "3", "--out-shard-size", "2K"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 processes (torchrun ranks) would share it" in out
    rows = [line for line in out.splitlines() if line[:1].isdigit() and " of " in line]
    assert [r.split()[0] for r in rows] == ["0", "1", "2"]
    assert not (tmp_path / "o").exists()


def test_a_failing_rank_stops_every_rank_with_its_error(family, tmp_path):
    root, dirs = family
    config = _config(tmp_path, dirs, "ties", _resolved(dirs, CONFIGS["ties_model_scope_m3"]))
    res = _torchrun(2, config, tmp_path / "out", env={"M3KERNELS_TEST_FAIL_RANK": "1"})
    assert res.returncode != 0
    assert "a failure injected by the test" in res.stderr
    assert "rank 1 failed" in res.stderr  # rank 0's own message names rank 1
    ours = [
        line for line in res.stderr.splitlines() if line.startswith("m3kernels:")
    ]  # torchrun adds its own report
    assert len(ours) == 2 and all(line.startswith("m3kernels: error: ") for line in ours), ours
    assert not (tmp_path / "out").exists()
    _one_process(config, tmp_path / "clean")  # and --resume (one process) finishes it
    assert (
        cli.main(
            [
                "merge",
                str(config),
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--quiet",
                "--out-shard-size",
                "2K",
                "--resume",
            ]
        )
        == 0
    )
    _same_files(tmp_path / "out", tmp_path / "clean")
    assert _leftovers(tmp_path, "out") == []


def test_a_killed_rank_leaves_a_run_that_resume_finishes(family, tmp_path):
    root, dirs = family
    config = _config(tmp_path, dirs, "dare", _resolved(dirs, CONFIGS["dare_ties"]))
    _one_process(config, tmp_path / "clean")
    res = _torchrun(
        2,
        config,
        tmp_path / "out",
        env={"M3KERNELS_TEST_CRASH_AFTER_SHARDS": "1", "M3KERNELS_TEST_CRASH_RANK": "1"},
    )
    assert res.returncode != 0
    assert not (tmp_path / "out").exists()
    (tmp,) = [tmp_path / n for n in _leftovers(tmp_path, "out") if ".m3k-tmp-" in n]
    assert (tmp / ".m3k-journal.json").is_file()
    assert any(p.name.startswith(".m3k-journal.rank") for p in tmp.iterdir())
    res = _torchrun(2, config, tmp_path / "out", "--resume")  # distributed again
    assert res.returncode == 0, res.stderr[-3000:]
    _same_files(tmp_path / "out", tmp_path / "clean")
    assert _leftovers(tmp_path, "out") == []
