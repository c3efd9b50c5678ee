"""Inputs are read-only, regular, inside their folder, and may not change under us (issue 14).

* Only regular files are opened: a FIFO (the merge used to block on it forever), a device or a
  folder where a weight, index, config or tokenizer file should be is refused at once.
* Files of a model folder must resolve inside it (or, for a Hugging Face cache snapshot, into
  its repository's ``blobs``) unless ``--follow-symlinks``: a link to a file outside is refused
  before a byte of it is read, so nothing of it reaches a message.
* An input truncated or rewritten while the merge reads it (a read lease holds the other
  process off while the merge notices; without one, size and mtime are compared before and
  after each tensor) stops the merge with exit 2 and a message naming the file and tensor,
  never SIGBUS; the unfinished run is kept for ``--resume``.
* A bad ``.bin`` file is one line naming it, not torch's multi-line text.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import m3kernels
from m3kernels import cli
from m3kernels.checkpoint import run as run_module
from m3kernels.checkpoint.safetensors_io import NO_LEASE_ENV
from m3kernels.checkpoint.source import Checkpoint
from m3kernels.errors import CheckpointError, OutputIsInputError

from checkpoint_factory import fine_tune, llama_config, llama_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)
SECRET = b"SECRET-m3k-" + b"x" * 200


pytestmark = pytest.mark.usefixtures("fresh_cli_logging")  # tests/conftest.py


@pytest.fixture
def models(tmp_path):
    """base (2 shards) + ft1 (1 file, no index) + ft2 (2 shards), config.json and tokenizer files."""
    base = llama_tensors(seed=1, **SIZES)
    cfg = llama_config(**SIZES)
    dirs = {
        "base": write_checkpoint(tmp_path / "base", base, shards=2, config=cfg),
        "ft1": write_checkpoint(tmp_path / "ft1", fine_tune(base, 11), shards=1, config=cfg),
        "ft2": write_checkpoint(tmp_path / "ft2", fine_tune(base, 12), shards=2, config=cfg),
    }
    write_config(tmp_path / "merge.yaml", dirs)
    dirs["config"] = tmp_path / "merge.yaml"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    return dirs


def write_config(path: Path, dirs: dict, **names) -> None:
    cfg = {
        "merge_method": "ties",
        "base_model": str(names.get("base", dirs["base"])),
        "models": [
            {"model": str(names.get("ft1", dirs["ft1"])), "parameters": {"density": 0.5}},
            {"model": str(names.get("ft2", dirs["ft2"])), "parameters": {"density": 0.5}},
        ],
    }
    path.write_text(json.dumps(cfg))


def merge(capsys, config, out, *extra):
    status = cli.main(
        [
            "merge",
            str(config),
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--out-shard-size",
            "1K",
            *map(str, extra),
        ]
    )
    return status, capsys.readouterr().err


def assert_user_error(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("m3kernels: error:") == 1 and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys() and all(
                torch.equal(
                    ta[k].view(torch.uint8) if ta[k].dim() else ta[k],
                    tb[k].view(torch.uint8) if tb[k].dim() else tb[k],
                )
                for k in ta
            ), name
        elif name != "m3kernels_merge.yaml":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def replace_with(path: Path, make) -> None:
    path.unlink()
    make(path)


# ------------------------------------------------------------------------------ regular files only
NOT_REGULAR = {  # (folder, file) -> replaced by a FIFO
    "the only weights file": ("ft1", "model.safetensors"),
    "a listed shard": ("ft2", "model-00002-of-00002.safetensors"),
    "the shard index": ("ft2", "model.safetensors.index.json"),
    "config.json": ("base", "config.json"),
    "a tokenizer file of the base": ("base", "tokenizer_config.json"),
}


@pytest.mark.parametrize("what", list(NOT_REGULAR))
def test_a_fifo_is_refused_at_once(models, tmp_path, capsys, what):
    folder, name = NOT_REGULAR[what]
    path = models[folder] / name
    replace_with(path, os.mkfifo)
    with time_limit(20):
        status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, path, "FIFO", "not a regular file")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.m3k-tmp-*"))


def test_a_fifo_among_shards_of_a_folder_without_index(models, tmp_path, capsys):
    (models["ft1"] / "model.safetensors").rename(models["ft1"] / "a.safetensors")
    os.mkfifo(models["ft1"] / "b.safetensors")
    with time_limit(20):
        status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, models["ft1"] / "b.safetensors", "FIFO")


def test_devices_folders_and_a_fifo_named_as_the_model(models, tmp_path, capsys):
    (models["ft1"] / "model.safetensors").unlink()
    (models["ft1"] / "model.safetensors").mkdir()
    status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, "model.safetensors", "a folder, not a regular file")
    shutil.rmtree(models["ft1"] / "model.safetensors")
    (models["ft1"] / "model.safetensors").symlink_to("/dev/null")
    status, err = merge(capsys, models["config"], tmp_path / "out", "--follow-symlinks")
    assert_user_error(status, err, "model.safetensors", "character device")
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with time_limit(20), pytest.raises(CheckpointError, match="FIFO"):
        Checkpoint(fifo)


# ------------------------------------------------------------------------------ symbolic links
LINKED = {  # (folder, file) -> a link to a file outside the folder
    "the only weights file": ("ft1", "model.safetensors"),
    "a listed shard": ("ft2", "model-00001-of-00002.safetensors"),
    "the shard index": ("base", "model.safetensors.index.json"),
    "config.json": ("ft2", "config.json"),
    "a tokenizer file of the base": ("base", "tokenizer.model"),
}


@pytest.mark.parametrize("what", list(LINKED))
def test_a_link_out_of_the_model_folder_is_refused_unread(models, tmp_path, capsys, what):
    folder, name = LINKED[what]
    path = models[folder] / name
    replace_with(path, lambda p: p.symlink_to(tmp_path / "outside" / "secret"))
    status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, path, "outside the model folder", "--follow-symlinks")
    first8 = struct.unpack("<Q", SECRET[:8])[0]
    assert "SECRET" not in err and str(first8) not in err
    assert not (tmp_path / "out").exists()
    status, err = merge(capsys, models["config"], tmp_path / "out", "--follow-symlinks", "--dry-run")
    assert "SECRET" not in err  # followed: read, found wrong (or unused), still never printed
    assert str(first8) not in err


def test_follow_symlinks_reads_a_shard_elsewhere_and_guards_its_folder(models, tmp_path, capsys):
    status, err = merge(capsys, models["config"], tmp_path / "clean")
    assert status == 0, err
    store = tmp_path / "store"
    store.mkdir()
    shard = models["ft2"] / "model-00002-of-00002.safetensors"
    shard.rename(store / shard.name)
    shard.symlink_to(store / shard.name)
    status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, "outside the model folder")
    status, err = merge(capsys, models["config"], tmp_path / "out", "--follow-symlinks")
    assert status == 0, err
    same_files(tmp_path / "out", tmp_path / "clean")
    for out in (store, store / "merged"):  # where a followed file lies is an input folder too
        with pytest.raises(OutputIsInputError):
            m3kernels.merge_checkpoints(
                models["config"], out, device="cpu", progress=False, force=True, follow_symlinks=True
            )
    assert (store / shard.name).is_file()
    assert cli.main(["inspect", str(models["ft2"])]) == 2
    assert "outside the model folder" in capsys.readouterr().err
    assert cli.main(["inspect", str(models["ft2"]), "--follow-symlinks"]) == 0
    assert "model.norm.weight" in capsys.readouterr().out


def test_links_inside_the_folder_and_a_hugging_face_cache_snapshot(models, tmp_path, capsys):
    status, err = merge(capsys, models["config"], tmp_path / "clean")
    assert status == 0, err
    # a link to another file of the same folder
    single = models["ft1"] / "model.safetensors"
    single.rename(models["ft1"] / "weights.bin.safetensors")
    single.symlink_to("weights.bin.safetensors")
    # the layout of ~/.cache/huggingface/hub: snapshots/REV/* -> ../../blobs/SHA
    repo = tmp_path / "hub" / "models--x--base"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(models["base"].iterdir())):
        (blobs / f"{i:040x}").write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(Path("..", "..", "blobs", f"{i:040x}"))
    write_config(tmp_path / "hub.yaml", models, base=snap)
    status, err = merge(capsys, tmp_path / "hub.yaml", tmp_path / "out")
    assert status == 0, err
    same_tensors(tmp_path / "out", tmp_path / "clean")  # (headers and the record name the input paths)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (
        models["base"] / "tokenizer.model"
    ).read_bytes()
    with pytest.raises(OutputIsInputError):  # the blobs folder is an input folder
        m3kernels.merge_checkpoints(tmp_path / "hub.yaml", blobs / "merged", device="cpu", progress=False)


# ------------------------------------------------------------------------------ .bin files
def _bad_pickle(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps({"w": Evil()}))


BAD_BIN = {
    "not a pickle": lambda p: p.write_bytes(b"garbage, not a pickle\n" * 3),
    "a pickle calling os.system": _bad_pickle,
    "a truncated zip": lambda p: (
        torch.save({"w": torch.zeros(3)}, p),
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    ),
    "an empty file": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("kind", list(BAD_BIN))
def test_a_bad_bin_file_is_one_clear_line(models, tmp_path, capsys, kind):
    folder = tmp_path / "binmodel"
    folder.mkdir()
    BAD_BIN[kind](folder / "pytorch_model.bin")
    write_config(tmp_path / "bin.yaml", models, ft1=folder)
    status, err = merge(capsys, tmp_path / "bin.yaml", tmp_path / "out", "--allow-bin")
    assert_user_error(status, err, folder / "pytorch_model.bin", "cannot load .bin weights")
    assert len(err) < 400 and "Please file an issue" not in err and "Check the documentation" not in err, err
    assert "pwned" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ inputs that change
def _truncate_in_another_process(path: Path, size: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, {size})"])


def _first_input_file(plan, shard: Path):
    for ck in [c for c in (plan.base, *plan.models) if c is not None]:
        for f in ck.input_files():
            if os.path.samefile(f.real, shard):
                return f
    raise AssertionError(f"{shard} is not an input")


def test_truncated_by_another_process_between_plan_and_merge(models, tmp_path, capsys, monkeypatch):
    """The read lease holds the truncating process off; the merge stops at its first tensor of that
    file with exit 2, naming it; then the truncation goes ahead; --resume finishes once it is put back."""
    status, err = merge(capsys, models["config"], tmp_path / "clean")
    assert status == 0, err
    shard = models["ft2"] / "model-00002-of-00002.safetensors"
    data, st = shard.read_bytes(), shard.stat()
    real_build, procs = run_module.build_plan, []

    def build_then_truncate(*args, **kwargs):
        plan = real_build(*args, **kwargs)
        f = _first_input_file(plan, shard)
        if not f.leased:
            pytest.skip("no read lease on this file system")
        procs.append(_truncate_in_another_process(shard, 100))
        t0 = time.monotonic()
        while f.changed() is None:  # the kernel tells the lease holder that a truncation waits
            assert time.monotonic() - t0 < 20, "the lease break never showed"
            time.sleep(0.01)
        assert shard.stat().st_size == st.st_size  # held off while we hold the lease
        return plan

    monkeypatch.setattr(run_module, "build_plan", build_then_truncate)
    status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, shard, "changed while the merge was reading it", "tensor '", "--resume")
    assert procs[0].wait(timeout=60) == 0 and shard.stat().st_size == 100  # released: it went ahead
    assert not (tmp_path / "out").exists()
    (tmp,) = tmp_path.glob(".out.m3k-tmp-*")
    assert (tmp / ".m3k-journal.json").is_file()
    monkeypatch.setattr(run_module, "build_plan", real_build)
    shard.write_bytes(data)  # put back as it was: the same run can be resumed
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, err = merge(capsys, models["config"], tmp_path / "out", "--resume")
    assert status == 0, err
    same_files(tmp_path / "out", tmp_path / "clean")
    assert not list(tmp_path.glob(".out.m3k-tmp-*"))


def test_without_a_lease_size_and_mtime_are_checked(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(NO_LEASE_ENV, "1")
    shard = models["base"] / "model-00001-of-00002.safetensors"
    real_build = run_module.build_plan

    def build_then_truncate(*args, **kwargs):
        plan = real_build(*args, **kwargs)
        assert not _first_input_file(plan, shard).leased
        os.truncate(shard, shard.stat().st_size - 7)
        return plan

    monkeypatch.setattr(run_module, "build_plan", build_then_truncate)
    status, err = merge(capsys, models["config"], tmp_path / "out")
    assert_user_error(status, err, shard, "changed size", "tensor '")
    # a rewrite of the same size, mid-merge (after the 3rd tensor: the later shard of ft2 is read after)
    monkeypatch.setattr(run_module, "build_plan", real_build)
    write_checkpoint(models["base"], llama_tensors(seed=1, **SIZES), shards=2, config=llama_config(**SIZES))
    later = models["ft2"] / "model-00002-of-00002.safetensors"
    real_release, calls = Checkpoint.release, [0]

    def rewrite_then_release(self, name):
        calls[0] += 1
        if calls[0] == 3:
            raw = bytearray(later.read_bytes())
            raw[-2:] = bytes([raw[-2] ^ 1, raw[-1] ^ 1])
            st = later.stat()
            with open(later, "r+b") as f:  # in place: same inode, same size
                f.write(raw)
            os.utime(later, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        real_release(self, name)

    monkeypatch.setattr(Checkpoint, "release", rewrite_then_release)
    status, err = merge(capsys, models["config"], tmp_path / "out2")
    assert_user_error(status, err, later, "rewritten", "tensor '")


WRAPPER = r"""
import os, sys, time
from m3kernels.checkpoint.safetensors_io import SafetensorsFile
real, started = SafetensorsFile.check, []
def check(self, *args, **kwargs):  # reads slowed down; a file tells when they start
    if not started:
        started.append(open(os.environ["M3K_STARTED"], "w").close())
    time.sleep(0.01)
    return real(self, *args, **kwargs)
SafetensorsFile.check = check
from m3kernels import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("lease", [True, False], ids=["lease", "no-lease"])
def test_truncated_mid_merge_by_another_process_never_kills_it(models, tmp_path, capsys, lease):
    """A slowed CLI merge, its inputs truncated at random moments from another process: exit 2
    with a message (or 0 with a correct output when the truncation came after the reads), never a
    signal. Without a read lease the tensors are read with pread, not mapped (a mapped file cut
    short kills the reader with SIGBUS: 3 of 12 trials did before)."""
    status, err = merge(capsys, models["config"], tmp_path / "clean")
    assert status == 0, err
    rng = random.Random(14 if lease else 15)
    env = {**os.environ, NO_LEASE_ENV: "0" if lease else "1"}
    shards = [
        models["ft1"] / "model.safetensors",
        models["ft2"] / "model-00002-of-00002.safetensors",
        models["base"] / "model-00001-of-00002.safetensors",
    ]
    originals = {p: p.read_bytes() for p in shards}
    outcomes = []
    for trial in range(3 if lease else 6):
        for p, data in originals.items():
            p.write_bytes(data)
        out, started = tmp_path / f"out{trial}", tmp_path / f"started{trial}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRAPPER,
                "merge",
                str(models["config"]),
                str(out),
                "--device",
                "cpu",
                "--quiet",
                "--out-shard-size",
                "1K",
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "M3K_STARTED": str(started)},
        )
        t0 = time.monotonic()
        while not started.exists() and proc.poll() is None:
            assert time.monotonic() - t0 < 60
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the reads (about a second of them)
        victim = rng.choice(shards)
        cut = _truncate_in_another_process(victim, rng.randrange(8, victim.stat().st_size))
        _, err = proc.communicate(timeout=120)
        assert cut.wait(timeout=120) == 0
        assert proc.returncode in (0, 2), (proc.returncode, err)
        assert "Traceback" not in err and "internal error" not in err, err
        if proc.returncode == 2:
            assert str(victim) in err and "changed while the merge was reading it" in err, err
            assert not out.exists()
        else:
            same_files(out, tmp_path / "clean")
        outcomes.append(proc.returncode)
    print("exit statuses:", outcomes)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_folder_turned_into_a_link_while_opening_is_caught(tmp_path, monkeypatch):
    """The race between resolving a path and opening it: a folder on the way that becomes a link
    out of the model folder (simulated: resolution that does not see the link) is caught on the
    opened descriptor itself."""
    from m3kernels.checkpoint import safetensors_io
    from m3kernels.errors import CheckpointError

    root, outside = tmp_path / "model", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "w.safetensors").write_bytes(b"secret")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    roots = safetensors_io.model_roots(root)
    monkeypatch.setattr(safetensors_io.os.path, "realpath", lambda p: str(p))  # the swap came after this
    with pytest.raises(CheckpointError, match="moved outside the model folder"):
        safetensors_io.open_input(root / "sub" / "w.safetensors", roots=roots, lease=False)
