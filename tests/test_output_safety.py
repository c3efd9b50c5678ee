"""The output never touches an input, and only one merge at a time writes an OUT (issue 14).

* OUT inside, equal to, or a parent of an input folder (a shard file, ``config.json``, a
  sub-folder, a symlink to the folder), with or without ``--force``/``--resume``: exit 2 and
  nothing created, deleted or changed anywhere.
* The output lock: while another process (this test, or a merge paused in a subprocess) holds
  it, a merge on the same OUT fails at once naming that process, with and without
  ``--force``/``--resume``, and leaves a published OUT alone; publish refuses to run without
  the lock; a merge killed -9 while holding it leaves a run that ``--resume`` finishes.
* Three merges started on one OUT at staggered times: each exits 0 or 2, and the published
  folder equals an uninterrupted run bit for bit.
* An OUT whose name holds glob characters (``out[1]``) finds its partial run on ``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import m3kernels
from m3kernels import cli
from m3kernels.checkpoint import writer
from m3kernels.checkpoint.output_guard import LOCK_SUFFIX, OutputLock, lock_path, read_holder
from m3kernels.errors import OutputIsInputError, OutputLockedError, OutputWriteError

from checkpoint_factory import fine_tune, llama_config, llama_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)
SHARD = "1K"  # several output shards from a tiny model

# A merge in a subprocess whose output writes can be slowed (M3K_TEST_DELAY seconds each) or
# paused for good at the N-th write (M3K_TEST_PAUSE_AT=N; it touches M3K_TEST_PAUSED first).
WRAPPER = r"""
import os, sys, time
from m3kernels.checkpoint import writer
real, calls = writer._write_bytes, [0]
delay = float(os.environ.get("M3K_TEST_DELAY", "0"))
pause_at = int(os.environ.get("M3K_TEST_PAUSE_AT", "0"))
def write(fd, data):
    calls[0] += 1
    if calls[0] == pause_at:
        open(os.environ["M3K_TEST_PAUSED"], "w").close()
        while True:
            time.sleep(1)
    if delay:
        time.sleep(delay)
    real(fd, data)
writer._write_bytes = write
from m3kernels import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def models(tmp_path):
    """base (2 shards) + two fine-tunes (2 shards), each with config.json, and a ties config."""
    base = llama_tensors(seed=1, **SIZES)
    cfg = llama_config(**SIZES)
    dirs = {"base": write_checkpoint(tmp_path / "base", base, shards=2, config=cfg)}
    for i in (1, 2):
        dirs[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, 10 + i), shards=2, config=cfg)
    merge_cfg = {
        "merge_method": "ties",
        "base_model": str(dirs["base"]),
        "models": [
            {"model": str(dirs["ft1"]), "parameters": {"density": 0.5}},
            {"model": str(dirs["ft2"]), "parameters": {"density": 0.5}},
        ],
    }
    (tmp_path / "merge.yaml").write_text(json.dumps(merge_cfg))
    dirs["config"] = tmp_path / "merge.yaml"
    return dirs


def tree(folder: Path, skip_locks: bool = False) -> dict:
    """Every entry under ``folder``: files by (SHA-256, inode, mtime), links by target, folders."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            if skip_locks and name.endswith(LOCK_SUFFIX):
                continue
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                st = p.stat()
                out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
            else:
                out[rel] = "dir"
    return out


def merge(capsys, models, out, *extra):
    """cli.main merge -> (status, stderr)."""
    status = cli.main(
        [
            "merge",
            str(models["config"]),
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--out-shard-size",
            SHARD,
            *map(str, extra),
        ]
    )
    return status, capsys.readouterr().err


def assert_user_error(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err and err.count("m3kernels: error:") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


def interrupted_by_a_full_disk(capsys, models, out, monkeypatch):
    """A merge whose disk fills at the 4th write (after shard 1): (status, stderr); the unfinished
    run is left for --resume, and writes work again afterwards."""
    real, calls = writer._write_bytes, [0]

    def full_disk(fd, data):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(writer, "_write_bytes", full_disk)
    try:
        return merge(capsys, models, out)
    finally:
        monkeypatch.setattr(writer, "_write_bytes", real)


def temp_folders(parent: Path, name: str = "out") -> list:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}{writer.TMP_MARK}"))


def assert_same_files(out: Path, clean: Path):
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def start(models, out, *extra, **env):
    cmd = [
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
        SHARD,
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "M3KERNELS_TEST_CRASH_AFTER_SHARDS"} | env
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, what, timeout=60.0, proc=None):
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the merge ended first: {proc.returncode} {proc.communicate()}")
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.02)


# ------------------------------------------------------------------------------ OUT vs the inputs
OUTS = {  # where OUT is -> (OUT, the input the message names)
    "folder inside an input": lambda d: (d["base"] / "merged", "base ("),
    "an input shard": lambda d: (d["base"] / "model-00001-of-00002.safetensors", "base ("),
    "an input's config.json": lambda d: (d["ft2"] / "config.json", "model 2 ("),
    "an input folder": lambda d: (d["ft1"], "model 1 ("),
    "a parent of the inputs": lambda d: (d["base"].parent, "base ("),
    "deep inside an input": lambda d: (d["ft1"] / "a" / "b", "model 1 ("),
}
FLAGS = [(), ("--force",), ("--force", "--resume"), ("--resume",), ("--dry-run",)]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f) or "no flags")
@pytest.mark.parametrize("where", list(OUTS))
def test_out_touching_an_input_is_refused_whatever_the_flags(models, tmp_path, capsys, where, flags):
    out, label = OUTS[where](models)
    before = tree(tmp_path)
    status, err = merge(capsys, models, out, *flags)
    assert_user_error(status, err, out, "input", label, "whatever the flags")
    assert tree(tmp_path) == before  # nothing created, deleted or changed: no lock, no temp folder


@pytest.mark.parametrize("flags", [(), ("--force",)], ids=["no flags", "--force"])
def test_out_through_a_symlink_to_an_input_is_refused(models, tmp_path, capsys, flags):
    (tmp_path / "link").symlink_to(models["base"], target_is_directory=True)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(models["ft2"], target_is_directory=True)
    before = tree(tmp_path)
    for out in (tmp_path / "link", tmp_path / "link" / "merged", tmp_path / "sub" / "up" / "merged"):
        status, err = merge(capsys, models, out, *flags)
        assert_user_error(status, err, out, "input")
    assert tree(tmp_path) == before


def test_single_file_input_protects_its_folder(models, tmp_path):
    single = write_checkpoint(
        tmp_path / "single", llama_tensors(seed=1, **SIZES), config=llama_config(**SIZES)
    )
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(single / "model.safetensors")}, {"model": str(models["ft1"])}],
    }
    before = tree(tmp_path)
    for out in (single / "merged", single / "model.safetensors", single):
        with pytest.raises(OutputIsInputError, match="model 1"):
            m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False, force=True)
    assert tree(tmp_path) == before


def test_out_beside_the_inputs_is_fine(models, tmp_path, capsys):
    status, err = merge(capsys, models, tmp_path / "merged")
    assert status == 0, err
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert lock_path(tmp_path / "merged").is_file()  # left behind, unlocked: harmless
    assert not temp_folders(tmp_path, "merged")


# ------------------------------------------------------------------------------ the output lock
def test_a_held_lock_refuses_a_second_merge_at_once(models, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = merge(capsys, models, out)
    assert status == 0, err
    before = tree(tmp_path, skip_locks=True)
    with OutputLock(out) as lock:
        assert lock.exclusive
        assert read_holder(out)["pid"] == os.getpid()
        for flags in [(), ("--force",), ("--resume",), ("--force", "--resume")]:
            t0 = time.monotonic()
            status, err = merge(capsys, models, out, *flags)
            assert time.monotonic() - t0 < 5
            assert_user_error(status, err, out, "in use by", f"pid {os.getpid()}")
        with pytest.raises(OutputLockedError) as info:
            m3kernels.merge_checkpoints(models["config"], out, device="cpu", progress=False, force=True)
        assert info.value.holder == os.getpid()
        status, err = merge(capsys, models, out, "--dry-run", "--force")  # reads only: no lock needed
        assert status == 0, err
        with pytest.raises(OutputLockedError):
            OutputLock(out).acquire()
    assert tree(tmp_path, skip_locks=True) == before  # the published OUT untouched, no temp folder
    status, err = merge(capsys, models, out, "--force")  # released: works again
    assert status == 0, err


def test_publish_needs_the_lock_and_a_temp_folder_of_out(tmp_path):
    out = tmp_path / "out"
    tmp = writer.make_temp_dir(out)
    (tmp / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputLockedError, match="does not hold"):
        writer.publish(tmp, out, force=True)
    with OutputLock(out):
        other = tmp_path / "elsewhere"
        other.mkdir()
        with pytest.raises(OutputWriteError, match="not a temporary folder"):
            writer.publish(other, out, force=True)
        assert other.is_dir()
    lock = OutputLock(out)
    lock.acquire()
    try:
        lock.path.unlink()  # someone removed the lock file: another run locks a new one
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputLockedError, match="does not hold"):
            writer.publish(tmp, out, force=True)
        with pytest.raises(OutputLockedError, match="no longer holds"):
            lock.check()
        os.close(fd)
    finally:
        lock.release()
    assert tmp.is_dir() and not out.exists()


def test_merge_paused_in_another_process_then_killed(models, tmp_path, capsys):
    """A merge paused mid-run holds OUT: others fail at once naming it; after kill -9, --resume finishes."""
    out = tmp_path / "out"
    paused = tmp_path / "paused"
    # write 1: the journal; 2, 3: shard 1 and the journal again; pause at 4 (shard 2)
    proc = start(models, out, M3K_TEST_PAUSE_AT="4", M3K_TEST_PAUSED=str(paused))
    try:
        wait_for(paused.exists, "the merge pauses", proc=proc)
        assert read_holder(out)["pid"] == proc.pid
        for flags in [(), ("--force",), ("--resume",), ("--force", "--resume")]:
            status, err = merge(capsys, models, out, *flags)
            assert_user_error(status, err, out, f"pid {proc.pid}")
        assert not out.exists()
        (tmp,) = temp_folders(tmp_path)
        (first,) = (tmp_path / tmp).glob("model-00001-of-*.safetensors")
        st = first.stat()
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    status, err = merge(capsys, models, out, "--resume")
    assert status == 0, err
    assert not temp_folders(tmp_path)
    assert (out / first.name).stat().st_ino == st.st_ino  # its finished shard was reused
    status, err = merge(capsys, models, tmp_path / "clean")
    assert status == 0, err
    assert_same_files(out, tmp_path / "clean")


def test_three_merges_on_one_out_started_at_staggered_times(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    status, err = merge(capsys, models, tmp_path / "clean")
    assert status == 0, err
    status, err = interrupted_by_a_full_disk(capsys, models, out, monkeypatch)
    assert_user_error(status, err, "no space left")
    assert len(temp_folders(tmp_path)) == 1
    procs = []
    for flags in [("--resume",), ("--resume",), ("--resume", "--force")]:
        procs.append(start(models, out, *flags, M3K_TEST_DELAY="0.02"))
        time.sleep(0.15)
    results = [(p.pid, p.wait(timeout=120), p.communicate()[1]) for p in procs]
    for _pid, rc, err in results:
        assert rc in (0, 2), (rc, err)
        assert "Traceback" not in err and "internal error" not in err, err
        if rc == 2:
            assert "in use by another m3kernels merge (pid" in err or "already exists" in err, err
    assert any(rc == 0 for _, rc, _ in results), results
    assert_same_files(out, tmp_path / "clean")
    assert not temp_folders(tmp_path)


# ------------------------------------------------------------------------------ glob characters
def test_resume_finds_the_partial_run_of_an_out_named_like_a_glob(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out[1]"
    status, err = interrupted_by_a_full_disk(capsys, models, out, monkeypatch)
    assert_user_error(status, err, "no space left", "--resume")
    (tmp,) = temp_folders(tmp_path, "out[1]")
    (first,) = (tmp_path / tmp).glob("model-00001-of-*.safetensors")
    ino = first.stat().st_ino
    assert [p.name for p, _ in writer.partial_runs(out)] == [tmp]
    status, err = merge(capsys, models, out, "--resume")
    assert status == 0, err
    assert not temp_folders(tmp_path, "out[1]")
    assert (out / first.name).stat().st_ino == ino
    status, err = merge(capsys, models, tmp_path / "clean")
    assert status == 0, err
    assert_same_files(out, tmp_path / "clean")


def test_partial_runs_are_only_this_outs(tmp_path):
    journal = json.dumps({"format": 1, "fingerprint": "f" * 64, "shards": {}})
    for name in (".out.m3k-tmp-0a1b2c3d", ".out.m3k-tmp-ab.m3k-tmp-11223344", ".out2.m3k-tmp-55667788"):
        (tmp_path / name).mkdir()
        (tmp_path / name / writer.JOURNAL).write_text(journal)
    assert [p.name for p, _ in writer.partial_runs(tmp_path / "out")] == [".out.m3k-tmp-0a1b2c3d"]
    assert [p.name for p, _ in writer.partial_runs(tmp_path / "out.m3k-tmp-ab")] == [
        ".out.m3k-tmp-ab.m3k-tmp-11223344"
    ]
    assert writer.partial_runs(tmp_path / "missing" / "out") == []


# ------------------------------------------------------------------------------ signals
@pytest.mark.parametrize(
    "sig,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_mid_merge_is_a_clean_stop_that_resume_finishes(models, tmp_path, capsys, sig, status, word):
    """SIGTERM is handled like Ctrl-C: one line, no traceback, the unfinished run kept and resumable."""
    out = tmp_path / "out"
    proc = start(models, out, M3K_TEST_DELAY="0.15")

    def first_shard_written():
        tmps = temp_folders(tmp_path)
        return bool(tmps) and any((tmp_path / tmps[0]).glob("model-00001-of-*.safetensors"))

    try:
        wait_for(first_shard_written, "the first shard is written", proc=proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err and err.strip() == f"m3kernels: {word} (rerun with --resume to continue)", (
        err
    )
    assert not out.exists() and len(temp_folders(tmp_path)) == 1
    st, err = merge(capsys, models, out, "--resume")
    assert st == 0, err
    st, err = merge(capsys, models, tmp_path / "clean")
    assert st == 0, err
    assert_same_files(out, tmp_path / "clean")


def test_a_signal_during_start_up_prints_no_traceback(tmp_path):
    """SIGTERM right after start (imports, config) ends with one line, never a traceback."""
    for delay in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0):  # before main, in the imports, in the merge
        proc = subprocess.Popen(
            [sys.executable, "-m", "m3kernels", "merge", str(tmp_path / "none.yaml"), str(tmp_path / "out")],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert proc.returncode in (2, 143, -signal.SIGTERM), (proc.returncode, err)


# ------------------------------------------------------------------------------ full disk, read-only parent
@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    """A small tmpfs mounted at ``where`` (root only; the test is skipped where mounting is refused)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _big_family(tmp_path: Path) -> Path:
    from m3kernels.synthetic import make_family

    sizes = dict(vocab=2003, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2)
    base, (ft1, ft2), _ = make_family(tmp_path / "in", shards=1, **sizes)
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
        f"parameters: {{density: 0.3}}\n"
    )
    return cfg


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a tmpfs: Linux, root")
@pytest.mark.parametrize(
    "options,needle", [("size=64k", "no space left"), ("ro,size=1m", "Read-only file system")]
)
def test_full_disk_and_read_only_parent(tmp_path, capsys, options, needle):
    """A real full file system (a 64 KiB tmpfs) and a read-only one as OUT's parent: exit 2 with a
    clear message, the inputs untouched, nothing that looks like a finished OUT."""
    cfg = _big_family(tmp_path)
    before = tree(tmp_path / "in")
    with _tmpfs(tmp_path / "small", options) as parent:
        out = parent / "merged"
        status = cli.main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert_user_error(status, err, needle)
        assert not out.exists()
        assert not any(n.endswith(".safetensors") for n in os.listdir(parent) if not n.startswith("."))
    assert tree(tmp_path / "in") == before


def test_kill_9_of_one_of_two_merges_on_one_out(models, tmp_path, capsys):
    """Two merges started on one OUT; the one holding the lock is killed -9: the other failed at
    once (exit 2); a third run with --resume then publishes exactly an uninterrupted run."""
    out = tmp_path / "out"
    paused = tmp_path / "paused"
    # the first merge pauses at its 4th write (shard 2), so it still holds the lock however long
    # the second takes to start on a loaded machine
    first = start(models, out, M3K_TEST_PAUSE_AT="4", M3K_TEST_PAUSED=str(paused))
    try:
        wait_for(paused.exists, "the first merge pauses", proc=first)
        assert (read_holder(out) or {}).get("pid") == first.pid
        second = start(models, out)
        _, err2 = second.communicate(timeout=60)
        first.kill()
        first.communicate()
    finally:
        first.kill()
    assert second.returncode == 2 and f"pid {first.pid}" in err2, err2
    assert first.returncode == -signal.SIGKILL and not out.exists()
    status, err = merge(capsys, models, out, "--resume")
    assert status == 0, err
    status, err = merge(capsys, models, tmp_path / "clean")
    assert status == 0, err
    assert_same_files(out, tmp_path / "clean")
