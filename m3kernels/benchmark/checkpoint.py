"""``m3kernels bench --checkpoint CONFIG``: a whole merge timed, with a phase breakdown and the
floor for this machine.

The merge code has no phase-timing hooks, so the phases are measured from outside, by wrapping
(for the duration of the run only) the functions each phase goes through:

* **read**: a separate pass before the merge that reads every input weight file once
  (``readinto`` a 64 MiB buffer); its rate is this machine's read rate for these files (from the
  page cache when they are cached, which the merge then also enjoys);
* **stage A**: ``m3kernels.api.prepare`` (as the CPU producer, the GPU pipeline and the
  model-wide statistics call it): L1 sums and trim thresholds; and the family hooks
  (``m3kernels.merge.methods.stage``: Gram matrices, window thresholds, counts);
* **stage B**: the backend's ``merge`` / ``merge_range``; ``merge_batch`` (runs of small tensors,
  stage A and B in one call) is counted apart as **small tensors**;
* **write**: ``ShardedWriter._write`` in the writer thread (overlaps the kernels; its shard
  fsyncs included), and **waiting for the writer**: the producer blocked in ``ShardedWriter.put``;
* **publish**: the side files (index, config, tokenizer, record) and the rename into place.

Page faults on memory-mapped inputs are paid inside stage A / B. On a GPU the kernel calls are
asynchronous: their phases are the host-side times of the calls (the pipeline overlaps them).

The **floor** is the longer of input bytes / read rate and output bytes / write rate (the merge
reads and writes at the same time; the sum, one after the other, is reported too), the write rate
measured before each run by writing and fsyncing a probe file next to the output as the writer
writes (64 MiB ``O_DIRECT`` writes where allowed), the size of the output up to 1 GiB.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from m3kernels.benchmark.machine import LoadMeter, machine_info
from m3kernels.benchmark.roofline import gbps

FORMAT = "m3kernels-bench-checkpoint/1"
PHASES = ("read", "stage_a", "stage_b", "small_tensors", "write", "writer_wait", "publish")
BLOCK = 64 << 20
PROBE_MIN, PROBE_MAX = 8 << 20, 1 << 30


class PhaseClock:
    """Seconds and calls per phase, added to from any thread."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self._lock = threading.Lock()
        self._local = threading.local()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds
            self.calls[phase] += 1

    def wrap(self, phase: str, fn):
        """``fn`` timed into ``phase``; a call nested in another of the same phase (a family
        hook that calls ``prepare``) is counted once, by the outer one."""
        local = self._local

        def timed(*a, **k):
            active = local.__dict__.setdefault("active", set())
            if phase in active:
                return fn(*a, **k)
            active.add(phase)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                active.discard(phase)
                self.add(phase, time.perf_counter() - t)

        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def patched(clock: PhaseClock):
    """The wrappers of the module docstring, removed on exit."""
    import m3kernels.api as api
    from m3kernels.backends import _load
    from m3kernels.checkpoint import model_stats, produce, run, writer
    from m3kernels.merge import methods

    undo = []

    def patch(obj, name, phase):
        if not hasattr(obj, name):
            return
        old = getattr(obj, name)
        setattr(obj, name, clock.wrap(phase, old))
        undo.append((obj, name, old))

    prepare = api.prepare
    timed_prepare = clock.wrap("stage_a", prepare)
    for mod in (api, produce, model_stats):
        if getattr(mod, "prepare", None) is prepare:
            undo.append((mod, "prepare", prepare))
            mod.prepare = timed_prepare
    patch(methods, "stage", "stage_a")  # the family hooks (SLERP family, breadcrumbs, ram, ...)
    for name in ("cpu", "triton", "cuda"):
        be = _load(name)
        if be is not None:
            patch(be, "merge", "stage_b")
            patch(be, "merge_range", "stage_b")
            patch(be, "merge_batch", "small_tensors")
    patch(writer.ShardedWriter, "_write", "write")
    patch(writer.ShardedWriter, "put", "writer_wait")
    patch(run, "publish", "publish")
    patch(run, "write_side_files", "publish")
    try:
        yield clock
    finally:
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)


def input_files(config, allow_bin: bool = False, follow_symlinks: bool = False) -> tuple:
    """(plan, [paths of the input weight files]) from a dry run of the merge."""
    from m3kernels.checkpoint.run import merge_checkpoints

    scratch = Path(tempfile.mkdtemp(prefix="m3k-bench-plan-"))
    try:
        plan = merge_checkpoints(
            config,
            scratch / "out",
            dry_run=True,
            progress=False,
            allow_bin=allow_bin,
            follow_symlinks=follow_symlinks,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = []
    for ck in [plan.base, *plan.models]:
        if ck is None:
            continue
        for f in ck.input_files():
            if f.real not in files:
                files.append(f.real)
    return plan, files


def read_rate(paths) -> dict:
    """Read every file once; {'bytes', 'seconds', 'gbps'}."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
    dt = time.perf_counter() - t
    return {"bytes": total, "seconds": dt, "gbps": gbps(total, dt)}


def write_rate(folder: Path, nbytes: int) -> dict:
    """Write and fsync a probe file of ``nbytes`` (8 MiB to 1 GiB) in ``folder``, as the merge's
    writer does: in 64 MiB ``O_DIRECT`` writes from a page-aligned buffer where the file system
    allows it, else buffered; the file is removed after. {'bytes', 'seconds', 'gbps', 'direct'}."""
    import mmap

    mib = 1 << 20
    nbytes = max(PROBE_MIN, min(int(nbytes), PROBE_MAX))
    block = min(BLOCK, -(-nbytes // mib) * mib)
    nbytes = -(-nbytes // block) * block  # whole blocks
    buf = mmap.mmap(-1, block)  # page-aligned
    buf.write(os.urandom(mib) * (block // mib))
    fd, path = tempfile.mkstemp(prefix=".m3k-bench-write-", dir=folder)
    os.close(fd)
    direct = hasattr(os, "O_DIRECT")
    try:
        try:
            fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        except OSError:  # O_DIRECT refused (tmpfs, some network file systems)
            direct, fd = False, os.open(path, os.O_WRONLY)
        try:
            t = time.perf_counter()
            done = 0
            while done < nbytes:
                try:
                    done += os.write(fd, buf)
                except OSError:
                    if not direct:
                        raise
                    os.close(fd)  # refused at write time: go on buffered, as the writer does
                    direct, fd = False, os.open(path, os.O_WRONLY)
                    os.lseek(fd, done, os.SEEK_SET)
            os.fsync(fd)
            dt = time.perf_counter() - t
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
        buf.close()
    return {"bytes": done, "seconds": dt, "gbps": gbps(done, dt), "direct": direct}


def bench_checkpoint(
    config,
    *,
    out_dir=None,
    device: str = "auto",
    backend: str = "auto",
    repeats: int = 1,
    keep: bool = False,
    allow_bin: bool = False,
    follow_symlinks: bool = False,
) -> dict:
    """Time ``merge_checkpoints(config, out_dir)`` ``repeats`` times (see the module docstring)."""
    from m3kernels.checkpoint.run import merge_checkpoints

    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    plan, files = input_files(config, allow_bin, follow_symlinks)
    in_bytes, out_bytes = plan.input_bytes, plan.total_bytes
    own_tmp = out_dir is None
    out = Path(tempfile.mkdtemp(prefix="m3k-bench-merge-")) / "out" if own_tmp else Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    runs = []
    probes = []
    try:
        for _ in range(repeats):
            if out.exists():
                shutil.rmtree(out)  # outside the timing, as bench/bench_mergekit.py does
            clock = PhaseClock()
            probes.append(write_rate(out.parent, out_bytes))
            read = read_rate(files)
            clock.add("read", read["seconds"])
            with patched(clock), LoadMeter() as meter:
                result = merge_checkpoints(
                    config,
                    out,
                    device=device,
                    backend=backend,
                    force=True,
                    progress=False,
                    allow_bin=allow_bin,
                    follow_symlinks=follow_symlinks,
                )
            runs.append(
                {
                    "merge_s": meter.wall_s,
                    "read_pass": read,
                    "phases_s": dict(clock.seconds),
                    "phase_calls": dict(clock.calls),
                    "other_cpu_s": meter.other_cpu_s,
                    "device": result.device,
                }
            )
    finally:
        if own_tmp:
            shutil.rmtree(out.parent, ignore_errors=True)
        elif not keep and out.exists():
            shutil.rmtree(out, ignore_errors=True)
    best = min(runs, key=lambda r: r["merge_s"])
    write = max(probes, key=lambda w: w["gbps"] or 0.0)
    rd = max((r["read_pass"]["gbps"] or 0.0) for r in runs)
    floor_read = in_bytes / (rd * 1e9) if rd else None
    floor_write = out_bytes / (write["gbps"] * 1e9) if write["gbps"] else None
    have = floor_read is not None and floor_write is not None
    floor = max(floor_read, floor_write) if have else None  # reads and writes overlap in the merge
    return {
        "format": FORMAT,
        "machine": info,
        "config": str(config),
        "tensors": len(plan.tensors),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "read_gbps": rd,
        "write": write,
        "floor_s": floor,
        "floor_serial_s": floor_read + floor_write if have else None,
        "floor_read_s": floor_read,
        "floor_write_s": floor_write,
        "best": best,
        "merge_s": best["merge_s"],
        "pct_of_floor": (100.0 * floor / best["merge_s"]) if floor and best["merge_s"] > 0 else None,
        "runs": runs,
        "write_probes": probes,
    }


PHASE_LABELS = {
    "read": "read (separate pass over the inputs)",
    "stage_a": "stage A (statistics)",
    "stage_b": "stage B (fused merge)",
    "small_tensors": "small tensors (A + B batched)",
    "write": "write (writer thread, overlaps)",
    "writer_wait": "waiting for the writer",
    "publish": "publish (side files, rename)",
}


def checkpoint_text(rep: dict) -> str:
    from m3kernels.benchmark.machine import header_lines

    b = rep["best"]
    lines = header_lines(rep["machine"])
    lines.append(
        f"{rep['config']}: {rep['tensors']} tensors, {rep['input_bytes'] / 1e9:.2f} GB read, "
        f"{rep['output_bytes'] / 1e9:.2f} GB written, on {b['device']}; best of {len(rep['runs'])} run(s)"
    )
    lines.append(
        f"merge: {b['merge_s']:.2f} s ({gbps(rep['input_bytes'] + rep['output_bytes'], b['merge_s']):.2f} GB/s moved)"
    )
    for ph in PHASES:
        calls = b["phase_calls"][ph]
        if calls:
            lines.append(f"  {PHASE_LABELS[ph]:40s} {b['phases_s'][ph]:8.3f} s  ({calls} calls)")
    w = rep["write"]
    if rep["floor_s"] is not None:
        lines.append(
            f"floor: {rep['floor_s']:.2f} s = the longer of {rep['input_bytes'] / 1e9:.2f} GB / "
            f"{rep['read_gbps']:.2f} GB/s read ({rep['floor_read_s']:.2f} s) and {rep['output_bytes'] / 1e9:.2f} GB / "
            f"{w['gbps']:.2f} GB/s write ({rep['floor_write_s']:.2f} s; fsync'd {'O_DIRECT ' if w['direct'] else ''}"
            f"probe of {w['bytes'] / 1e6:.0f} MB); one after the other: {rep['floor_serial_s']:.2f} s"
        )
        lines.append(
            f"the merge takes {b['merge_s'] / rep['floor_s']:.2f}x the floor ({rep['pct_of_floor']:.0f}% of its speed)"
        )
    oc = b["other_cpu_s"]
    lines.append("other processes' CPU time during the merge: " + ("n/a" if oc is None else f"{oc:.1f} s"))
    return "\n".join(lines)


__all__ = [
    "bench_checkpoint",
    "checkpoint_text",
    "PhaseClock",
    "patched",
    "read_rate",
    "write_rate",
    "FORMAT",
]
