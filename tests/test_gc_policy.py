"""m3kernels.gc_policy: the collector off the command line's start-up and exit, and library
callers' collector settings left as they were."""

import gc
import subprocess
import sys

import pytest

from m3kernels import gc_policy


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable() if was else gc.disable()


def test_library_caller_frozen_heap_unfreezes_after():
    assert gc.get_freeze_count() == 0
    with gc_policy.frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_library_caller_with_own_frozen_objects_is_left_alone():
    gc.freeze()
    mine = gc.get_freeze_count()
    junk = [[i] for i in range(1000)]  # tracked objects made after the caller's freeze
    with gc_policy.frozen_heap():
        assert gc.get_freeze_count() == mine  # not frozen by us
    assert gc.get_freeze_count() == mine  # and the caller's freeze kept
    del junk


def test_library_caller_with_collector_off_is_left_alone():
    gc.disable()
    with gc_policy.frozen_heap():
        assert gc.get_freeze_count() == 0
    with gc_policy.imports():
        assert not gc.isenabled()
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_imports_outside_a_process_run_change_nothing():
    with gc_policy.imports():
        assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_process_run_imports_off_then_frozen_and_frozen_at_the_end():
    with gc_policy.process_run():
        with gc_policy.imports():
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        before = gc.get_freeze_count()
        junk = [[i] for i in range(1000)]
        with gc_policy.frozen_heap():
            assert gc.get_freeze_count() >= before + 1000
        assert gc.get_freeze_count() >= before + 1000  # stays frozen: the process ends soon
        del junk
    assert gc.get_freeze_count() > 0


def test_the_command_line_entry_point_runs_main_and_keeps_its_exit_status(tmp_path):
    bad = tmp_path / "missing.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "m3kernels", "merge", str(bad), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "missing.yaml" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv=['m3kernels','--help']; from m3kernels.cli import entry; entry()",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "merge" in r.stdout
