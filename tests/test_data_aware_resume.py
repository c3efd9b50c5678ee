"""A killed ``fisher`` / ``regmean`` config merge, then ``--resume``: the same bytes as an
uninterrupted run (the main merge's journal: finished shards reused, the half-written one written
again, nothing that looks like a finished output before the end). A resume after the statistics
changed (another data file, or a statistics file rewritten in place) does not reuse the unfinished
run: the statistics are part of the resume fingerprint. ``--device cuda`` without a GPU: exit 2,
one line. The output lock and ``--force`` as for the other methods; a bad statistics tensor: exit
2 naming the folder and the tensor, nothing written. ``torchrun`` with 2 ranks (gloo): the
one-process bytes, and a run with a killed rank finished by ``--resume``. On a GPU: the merge on
``cuda`` against the CPU merge.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import m3kernels  # noqa: E402
from m3kernels import cli  # noqa: E402
from m3kernels.checkpoint import run as run_mod  # noqa: E402

transformers = pytest.importorskip("transformers")

from m3kernels.datastats import compute_fisher, compute_regmean  # noqa: E402
from m3kernels.datastats.tiny import fine_tune, make_tiny_llama, sample_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = "3000"  # bytes: the tiny Llama's output in many shards
KEY = {"fisher": "fisher", "regmean": "gram"}

pytestmark = pytest.mark.usefixtures("fresh_cli_logging")  # tests/conftest.py


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_aware_resume")
    make_tiny_llama(root / "base", sample_texts(48), steps=4, vocab_size=120, hidden=16, intermediate=24)
    for i in (1, 2):
        fine_tune(root / "base", root / f"ft{i}", sample_texts(32, seed=10 + i), steps=2, seed=i)
        (root / f"d{i}.txt").write_text("\n".join(sample_texts(5, seed=20 + i)) + "\n")
    for i in (1, 2):
        for method, fn in (("fisher", compute_fisher), ("regmean", compute_regmean)):
            fn(root / f"ft{i}", root / f"d{i}.txt", root / f"{KEY[method]}{i}", batch_size=3, progress=False)
    # statistics of ft1 over ft2's data: the same model, other numbers
    compute_fisher(root / "ft1", root / "d2.txt", root / "fisher1-other", batch_size=3, progress=False)
    compute_regmean(root / "ft1", root / "d2.txt", root / "gram1-other", batch_size=3, progress=False)
    return root


def write_config(fam, folder: Path, method: str, **top) -> Path:
    """A config in ``folder`` naming copies of the statistics (stats0, stats1, relative to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = KEY[method]
    for i in (1, 2):
        copy = folder / f"stats{i - 1}"
        if not copy.exists():
            shutil.copytree(fam / f"{key}{i}", copy)
    raw = {
        "merge_method": method,
        "models": [
            {"model": str(fam / f"ft{i}"), "parameters": {key: f"stats{i - 1}", "weight": float(3 - i)}}
            for i in (1, 2)
        ],
        "mixup": {"alpha": 0.7, "seed": 11},
        "seed": 5,
        "dtype": "bfloat16",
    }
    if top:
        raw["parameters"] = top
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def merge(cfg, out, *flags) -> int:
    return cli.main(["merge", str(cfg), str(out), "--device", "cpu", "--out-shard-size", SHARD, "-q", *flags])


# the CLI, killed (SIGKILL) in the middle of its 4th output write: 1 the journal, 2 shard 1, 3 the
# journal again, 4 shard 2 (half of its bytes written): as tests/test_kill_resume.py does
MID_WRITE_KILLER = r"""
import os, signal, sys
from m3kernels.checkpoint import writer
real, count = writer._write_bytes, [0]
def write(fd, data):
    count[0] += 1
    if count[0] == 4:
        view = memoryview(data).cast("B")
        os.write(fd, view[: len(view) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd, data)
writer._write_bytes = write
from m3kernels import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def killed_merge(cfg, out, kill: str = "after-shard"):
    """The CLI merge in a subprocess that SIGKILLs itself right after its first finished shard
    (the crash hook of run.py), or in the middle of writing its second shard (``mid-write``)."""
    env = {k: v for k, v in os.environ.items() if k != run_mod.CRASH_ENV}
    if kill == "after-shard":
        env[run_mod.CRASH_ENV] = "1"
        cmd = [sys.executable, "-m", "m3kernels"]
    else:
        cmd = [sys.executable, "-c", MID_WRITE_KILLER]
    cmd += ["merge", str(cfg), str(out), "--device", "cpu", "--out-shard-size", SHARD, "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # a killed merge never leaves a folder that looks finished
    (tmp,) = out.parent.glob(f".{out.name}.m3k-tmp-*")
    return tmp


class Stop(Exception):
    pass


def interrupted_merge(cfg, out, monkeypatch):
    """The merge in this process, stopped by an exception right after its first finished shard
    (what a kill leaves, without the cost of a subprocess)."""

    def hook():
        def after(shard):
            raise Stop(shard.filename)

        return after

    monkeypatch.setattr(run_mod, "_crash_hook", hook)
    with pytest.raises(Stop):
        m3kernels.merge_checkpoints(str(cfg), out, device="cpu", out_shard_size=int(SHARD), progress=False)
    monkeypatch.undo()
    assert not out.exists()
    (tmp,) = out.parent.glob(f".{out.name}.m3k-tmp-*")
    return tmp


def assert_same_folders(got: Path, want: Path):
    names = sorted(p.name for p in want.iterdir())
    assert names == sorted(p.name for p in got.iterdir())
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def nothing_beside(out: Path):
    left = [
        p.name
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}.") and not p.name.endswith(".m3k.lock")  # the lock file stays
    ]
    assert not left, left


@pytest.mark.parametrize(
    "method,top,kill",
    [
        ("fisher", {"floor": 1e-5, "fisher_normalize": "l2"}, "after-shard"),
        ("regmean", {"alpha": 0.3, "ridge": 1e-3}, "mid-write"),
    ],
)
def test_kill_then_resume_gives_the_same_bytes(fam, tmp_path, method, top, kill):
    cfg = write_config(fam, tmp_path / "c", method, **top)
    out = tmp_path / "out"
    tmp = killed_merge(cfg, out, kill)
    (first,) = tmp.glob("model-00001-of-*.safetensors")  # the shard the journal records
    journal = yaml.safe_load((tmp / ".m3k-journal.json").read_text())
    assert list(journal["shards"]) == [first.name]
    if kill == "mid-write":  # the second shard is there, half written, and not in the journal
        (second,) = tmp.glob("model-00002-of-*.safetensors")
        half = second.stat().st_size
    st = first.stat()
    assert merge(cfg, out, "--resume") == 0
    reused = out / first.name
    assert (reused.stat().st_ino, reused.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # not rewritten
    if kill == "mid-write":
        assert (out / second.name).stat().st_size > half  # written again, whole
    nothing_beside(out)
    clean = tmp_path / "clean"
    assert merge(cfg, clean) == 0
    assert_same_folders(out, clean)
    assert len(list(out.glob("*.safetensors"))) > 3
    record = yaml.safe_load((out / "m3kernels_merge.yaml").read_text())
    assert record["merge_method"] == method and len(record["statistics"]) == 2
    assert record["weights"] == [2.0, 1.0] and len(record["mix_ratios"]) == 2


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_resume_after_the_statistics_changed_starts_over(fam, tmp_path, method, monkeypatch, capsys):
    cfg = write_config(fam, tmp_path / "c", method)
    out = tmp_path / "out"
    tmp = interrupted_merge(cfg, out, monkeypatch)
    (old_first,) = tmp.glob("model-00001-of-*.safetensors")
    old_bytes = old_first.read_bytes()
    capsys.readouterr()
    # stats0 replaced by statistics of the same model over other data: the fingerprints match the
    # model (the merge is allowed), but the unfinished run was made from other numbers
    shutil.rmtree(tmp_path / "c" / "stats0")
    shutil.copytree(fam / f"{KEY[method]}1-other", tmp_path / "c" / "stats0")
    assert merge(cfg, out, "--resume") == 0
    assert "no unfinished run of this merge" in capsys.readouterr().err
    assert tmp.exists()  # the other run's folder is not this merge's to delete
    assert (out / old_first.name).read_bytes() != old_bytes  # not reused
    clean = tmp_path / "clean"
    assert merge(cfg, clean) == 0
    assert_same_folders(out, clean)


def test_a_statistics_file_rewritten_in_place_is_not_reused(fam, tmp_path, monkeypatch, capsys):
    """Same manifest, same tensor names and shapes, other values (a file rewritten after the kill):
    the file's stamp is in the fingerprint, so --resume starts over with the new values."""
    cfg = write_config(fam, tmp_path / "c", "fisher")
    out = tmp_path / "out"
    tmp = interrupted_merge(cfg, out, monkeypatch)
    (old_first,) = tmp.glob("model-00001-of-*.safetensors")
    old_bytes = old_first.read_bytes()
    (f,) = (tmp_path / "c" / "stats1").glob("*.safetensors")
    t = load_file(str(f))
    save_file({k: v * 3.0 + 1.0 for k, v in t.items()}, str(f), metadata={"format": "pt"})
    capsys.readouterr()
    assert merge(cfg, out, "--resume") == 0
    assert "no unfinished run of this merge" in capsys.readouterr().err
    assert (out / old_first.name).read_bytes() != old_bytes
    clean = tmp_path / "clean"
    assert merge(cfg, clean) == 0
    assert_same_folders(out, clean)


def test_a_rerun_without_resume_leaves_the_unfinished_run(fam, tmp_path, monkeypatch, capsys):
    """As the main merge: a plain rerun merges from the start, says --resume would continue the
    unfinished run, and leaves it alone; --resume --force then finishes that one over OUT."""
    cfg = write_config(fam, tmp_path / "c", "regmean", gram_normalize="tokens")
    out = tmp_path / "out"
    tmp = interrupted_merge(cfg, out, monkeypatch)
    journal = (tmp / ".m3k-journal.json").read_bytes()
    capsys.readouterr()
    assert merge(cfg, out) == 0
    assert "--resume would continue it" in capsys.readouterr().err
    assert (tmp / ".m3k-journal.json").read_bytes() == journal
    first = out.parent / "first"
    out.rename(first)
    assert merge(cfg, out, "--resume") == 0 and not tmp.exists()
    assert_same_folders(out, first)
    nothing_beside(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_device_cuda_without_a_gpu_is_exit_2(fam, tmp_path, method, capsys):
    cfg = write_config(fam, tmp_path / "c", method)
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU is available" in err, err
    assert not out.exists()
    nothing_beside(out)


def test_force_and_existing_output(fam, tmp_path, capsys):
    cfg = write_config(fam, tmp_path / "c", "fisher")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert merge(cfg, out) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert merge(cfg, out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "m3kernels_merge.yaml").exists()
    nothing_beside(out)


def test_a_bad_statistics_tensor_is_exit_2_naming_folder_and_tensor(fam, tmp_path, capsys):
    cfg = write_config(fam, tmp_path / "c", "fisher")
    (f,) = (tmp_path / "c" / "stats1").glob("*.safetensors")
    t = load_file(str(f))
    name = "model.layers.1.mlp.up_proj.weight"
    t[name] = torch.zeros(3, 3)
    save_file(t, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    for flags in ([], ["--resume"], ["--force"]):
        assert merge(cfg, out, *flags) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "stats1" in err and name in err and "(3, 3)" in err, err
    assert not out.exists()
    nothing_beside(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_on_the_gpu_against_the_cpu_merge(fam, tmp_path, method):
    """--device cuda: the combine / the float32 RegMean solve on the GPU, the same tensors as the
    CPU merge within float32 rounding (RegMean: float32 solve against float64)."""
    cfg = write_config(fam, tmp_path / "c", method)
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert merge(cfg, cpu) == 0
    assert cli.main(["merge", str(cfg), str(gpu), "--device", "cuda", "--out-shard-size", SHARD, "-q"]) == 0
    a, b = {}, {}
    for f in cpu.glob("*.safetensors"):
        a.update(load_file(str(f)))
    for f in gpu.glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].float(), b[k].float()
        tol = 2e-2 * float(x.abs().max()) + 1e-6  # a bf16 output: a few units in the last place
        assert float((x - y).abs().max()) <= tol, k
    record = yaml.safe_load((gpu / "m3kernels_merge.yaml").read_text())
    if method == "regmean":
        assert record["options"]["precision"] == "float32"  # unset: the GPU solves in float32


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_publish_what_one_process_does_and_a_killed_rank_resumes(fam, tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU): each rank merges its shards with the statistics;
    the output equals the one-process merge file for file. A run whose rank 1 is killed after
    its first shard is finished by --resume in one process (the same resume fingerprint)."""
    cfg = write_config(fam, tmp_path / "c", "regmean", alpha=0.5)
    one = tmp_path / "one"
    assert merge(cfg, one) == 0
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("M3KERNELS_TEST_")}

    def torchrun(out, **env):
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "m3kernels", "merge", str(cfg), str(out)]
        cmd += ["--device", "cpu", "--quiet", "--out-shard-size", SHARD, "--dist-timeout", "60"]
        return subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            env={**base_env, "OMP_NUM_THREADS": "1", **env},
        )

    res = torchrun(tmp_path / "dist")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_folders(tmp_path / "dist", one)
    nothing_beside(tmp_path / "dist")
    res = torchrun(tmp_path / "killed", M3KERNELS_TEST_CRASH_AFTER_SHARDS="1", M3KERNELS_TEST_CRASH_RANK="1")
    assert res.returncode != 0 and not (tmp_path / "killed").exists()
    result = m3kernels.merge_checkpoints(
        str(cfg), tmp_path / "killed", device="cpu", out_shard_size=int(SHARD), resume=True, progress=False
    )
    assert result.resumed_shards  # what the ranks had finished is not merged again
    assert_same_folders(tmp_path / "killed", one)


def test_an_output_at_in_or_above_a_statistics_folder_is_refused(fam, tmp_path, capsys):
    """The statistics folders are inputs: OUT equal to, inside or above one is exit 2 (with
    --force and --dry-run too), and the folder is left as it was."""
    cfg = write_config(fam, tmp_path / "c", "regmean")
    stats = tmp_path / "c" / "stats1"
    before = sorted((p.name, p.stat().st_size) for p in stats.iterdir())
    cases = [
        (stats, ["--force"]),
        (stats / "sub", []),
        (stats / "sub", ["--dry-run"]),
        (tmp_path / "c", ["--force"]),
    ]
    for out, flags in cases:
        assert merge(cfg, out, *flags) == 2, (out, flags)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "inputs are never written" in err, err
    assert sorted((p.name, p.stat().st_size) for p in stats.iterdir()) == before
