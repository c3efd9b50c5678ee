"""Kernel benchmarking as a feature: ``m3kernels bench`` and :func:`run_benchmark`.

The cases (methods x backends x dtypes x N, :mod:`.cases`) are timed stage by stage
(:mod:`.timing`), set against the copy bandwidth measured in the same run (:mod:`.roofline`) and
against the same math in eager PyTorch (:mod:`.eager`), with a header saying what was measured
(:mod:`.machine`); :mod:`.report` prints, saves and plots the result, :mod:`.compare` sets two runs
side by side and :mod:`.checkpoint` times a whole merge phase by phase. docs/BENCH.md explains the
numbers.

Nothing heavy is imported here: the CLI builds its parser from :mod:`.cli` on every start.
"""

from __future__ import annotations


def run_benchmark(**kwargs) -> dict:
    """Run the kernel benchmark and return its report (the JSON ``m3kernels bench --json`` writes).

    Keyword arguments (all optional): ``shape`` (tuple or "RxC", default 5120x13824), ``methods``,
    ``backends``, ``dtypes``, ``ns`` (sequences; default: every registered method, every backend
    available here, bfloat16, N = 2), ``repeats`` (5), ``warmup`` (1), ``eager`` (True),
    ``eager_repeats`` (1), ``threads`` (None: as set), ``seed`` (0), ``progress`` (False).
    See :func:`m3kernels.benchmark.runner.run_benchmark`.
    """
    from m3kernels.benchmark.runner import run_benchmark as _run

    return _run(**kwargs)


__all__ = ["run_benchmark"]
