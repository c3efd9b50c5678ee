"""How m3kernels uses Python's cyclic garbage collector: off the start-up, the merge and the exit.

A merge allocates little cyclic garbage, but the objects alive during it are many: the imported
modules (torch's above all: some 300,000 objects) and a plan of 20,000 tensors (another 300,000).
Every full collection scans them all (60-300 ms each on the 2-core machine of bench/RESULTS.md),
and so does the interpreter's last collection at exit. ``gc.freeze`` moves the objects alive
now into a permanent generation that collections skip.

* :func:`process_run`: the command line's entry point (``m3kernels.cli.entry``) runs the whole
  command in it: the collector is off while the command's modules are imported (:func:`imports`),
  their objects are frozen, and at the end everything alive is frozen so the collection at exit
  has nothing to scan. This process owns the collector then.
* :func:`paused`: opening the inputs and building the plan run with the collector off (they make
  many long-lived objects and no cycles).
* :func:`frozen_heap`: around a checkpoint merge, the plan and headers are frozen. In a process
  run they simply stay frozen (the process ends soon). In a library caller's process they are
  unfrozen at the end, and nothing is done when the caller has frozen objects of its own
  (``gc.unfreeze`` would release those too) or has turned the collector off.
"""

from __future__ import annotations

import contextlib
import gc

_state = {"process": False}  # True while process_run() runs: this package owns the collector


@contextlib.contextmanager
def process_run():
    """Run the body as the whole process's work (the command line), then freeze what is alive."""
    _state["process"] = True
    try:
        yield
    finally:
        _state["process"] = False
        gc.freeze()  # the collection at interpreter exit then scans nothing


@contextlib.contextmanager
def paused():
    """No collections while the body runs (then the collector as it was): for the phases that
    allocate many long-lived objects and no cyclic garbage, opening the inputs' headers and
    building the plan. With the collector on, each of their many generation-2 passes scans the
    growing heap again, so their cost grew with the square of the tensor count (20,000 tensors:
    1.2 s of 2.2 s)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def imports():
    """Imports with the collector off (:func:`paused`), their objects frozen after (only in a
    process run)."""
    if not _state["process"]:
        yield
        return
    try:
        with paused():
            yield
    finally:
        gc.freeze()


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects alive now (the plan, the headers, the imported modules) out of the full
    collections while the body runs: those then scan only what the merge itself allocates."""
    if not gc.isenabled() or (gc.get_freeze_count() and not _state["process"]):
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        if not _state["process"]:
            gc.unfreeze()
