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


def test_paused_turns_the_collector_off_and_back_as_it_was():
    with gc_policy.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    with gc_policy.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # a caller's choice kept


def test_paused_restores_the_collector_after_an_error():
    with pytest.raises(RuntimeError):
        with gc_policy.paused():
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_scalar_config_kwargs_resolved_once_are_handed_out_as_copies():
    from m3kernels.checkpoint.config import parse_config

    cfg = parse_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [
                {"model": "m1", "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": "m2", "parameters": {"weight": 0.3, "density": 0.6}},
            ],
            "parameters": {"normalize": True},
        }
    )
    a = cfg.kwargs_at("model.layers.0.mlp.up_proj.weight", 0.0)
    a["weights"][0] = 99.0  # a caller's change must not reach the next tensor
    b = cfg.kwargs_at("lm_head.weight", 1.0)
    assert b["weights"] == [0.7, 0.3] and b["density"] == [0.4, 0.6] and b["normalize"] is True


def test_gradient_config_kwargs_still_follow_the_tensor():
    from m3kernels.checkpoint.config import parse_config

    cfg = parse_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [
                {"model": "m1", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
                {
                    "model": "m2",
                    "parameters": {
                        "weight": 1.0,
                        "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.9}],
                    },
                },
            ],
        }
    )
    lo = cfg.kwargs_at("model.layers.0.self_attn.q_proj.weight", 0.0)
    hi = cfg.kwargs_at("model.layers.9.mlp.up_proj.weight", 1.0)
    assert lo["weights"] == [0.0, 1.0] and hi["weights"] == [1.0, 1.0]
    assert lo["density"][1] == 0.9 and hi["density"][1] == 0.2


def _entry(code: str, *args: str) -> subprocess.CompletedProcess:
    prog = f"import sys; {code}; sys.argv = ['m3kernels', *{list(args)!r}]; from m3kernels.cli import entry; entry()"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)


def test_the_entry_point_ends_with_atexit_handlers_run_and_output_flushed():
    r = _entry("import atexit; atexit.register(lambda: print('atexit ran'))", "backends")
    assert r.returncode == 0, r.stderr
    assert "cpu" in r.stdout and r.stdout.rstrip().endswith("atexit ran")


def test_the_entry_point_waits_for_a_live_thread_as_a_normal_exit_does():
    code = (
        "import threading, time; "
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()"
    )
    r = _entry(code, "backends")
    assert r.returncode == 0, r.stderr
    assert "thread done" in r.stdout
