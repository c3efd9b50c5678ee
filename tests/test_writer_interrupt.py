"""The shard writer's thread is really done when close() or abort() returns, even when a signal
interrupted the wait (m3kernels.checkpoint.writer.ShardedWriter._wait_finished).

On CPython 3.11 a ``Thread.join`` interrupted by a signal handler's exception marks the thread as
stopped while it still runs; abort() then freed the staging buffer the thread was copying into
(a SIGSEGV after "interrupted" in test_output_safety's signal test, a few runs in a hundred).
Here the interrupt is a SIGALRM handler raising KeyboardInterrupt while close() waits for a write
that takes 0.6 s; the write must have finished before abort() returns.
"""

import signal
import sys
import threading
import time

import pytest
import torch

from m3kernels.checkpoint import writer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGALRM and setitimer: Linux")


class _Tensor:
    def __init__(self, name, n):
        self.name, self.shape, self.out_dtype, self.nbytes = name, (n,), torch.float32, 4 * n


class _Shard:
    index, filename = 0, "model.safetensors"

    def __init__(self, tensors):
        self.tensors = tensors


@pytest.fixture
def slow_writes(monkeypatch):
    """Every block write takes 0.6 s; records when each one ended."""
    real, ended = writer._write_bytes, []

    def slow(fd, data):
        time.sleep(0.6)
        real(fd, data)
        ended.append(time.monotonic())

    monkeypatch.setattr(writer, "_write_bytes", slow)
    return ended


@pytest.fixture
def alarm_interrupt():
    """A SIGALRM after ``delay`` s raises KeyboardInterrupt in the main thread."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)

    def arm(delay):
        signal.setitimer(signal.ITIMER_REAL, delay)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("then", ["abort", "abort_twice"])
def test_an_interrupted_close_then_abort_returns_only_after_the_write_in_hand(
    tmp_path, slow_writes, alarm_interrupt, then
):
    a, b = _Tensor("a", 1 << 20), _Tensor("b", 1 << 20)
    w = writer.ShardedWriter(tmp_path, [_Shard([a, b])], {}, writer.Journal(tmp_path, "fp"))
    w.put(a, torch.ones(1 << 20))
    w.put(b, torch.ones(1 << 20))
    alarm_interrupt(0.2)  # while close() waits for the first write
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert slow_writes, "close() returned before the write in hand ended"
    writes = len(slow_writes)
    w.abort()
    if then == "abort_twice":
        w.abort()
    assert not any(t.is_alive() for t in threading.enumerate() if t.name == "m3k-writer")
    time.sleep(0.8)
    assert len(slow_writes) == writes, "the thread went on writing after abort() returned"


def test_an_interrupt_during_abort_is_raised_after_the_thread_is_done(tmp_path, slow_writes, alarm_interrupt):
    a = _Tensor("a", 1 << 20)
    w = writer.ShardedWriter(tmp_path, [_Shard([a])], {}, writer.Journal(tmp_path, "fp"))
    w.put(a, torch.ones(1 << 20))
    time.sleep(0.1)  # the thread has taken the tensor and is writing
    alarm_interrupt(0.2)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        w.abort()
    assert slow_writes and slow_writes[-1] <= time.monotonic()
    assert time.monotonic() - t0 >= 0.3  # it waited for the write in hand (0.6 s from its start)
