"""pytest-benchmark suite: the cases of ``m3kernels bench`` at small sizes, one benchmark each for
stage A, stage B, the full merge and the eager PyTorch merge.

    pytest bench --benchmark-only                                  # run (a few minutes on 2 cores)
    pytest bench --benchmark-only --benchmark-autosave             # keep the run in .benchmarks/
    pytest bench --benchmark-only --benchmark-compare              # against the last saved run
    pytest bench --benchmark-only -k "ties and bfloat16 and stage_b"

Methods come from the registry at collection, backends from what works here (a CUDA GPU adds
triton and cuda); a case the benchmark cannot run is skipped with its reason. Each result carries
``bytes`` and (but stage A) ``gbps`` of its fastest round in ``extra_info``.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

import m3kernels
from m3kernels.api import prepare
from m3kernels.backends import get_backend
from m3kernels.benchmark.cases import (
    build_cases,
    parse_backends,
    parse_dtypes,
    parse_ns,
    parse_shape,
    registered_methods,
)
from m3kernels.benchmark.eager import eager_merge, eager_supported
from m3kernels.benchmark.roofline import bytes_moved, gbps
from m3kernels.merge.recipe import make_recipe

NAME = "model.layers.0.mlp.up_proj.weight"
SHAPE = parse_shape(os.environ.get("M3K_BENCH_SHAPE", "512x1024"))  # as bench/conftest.py's suite_sizes
NS = parse_ns(os.environ.get("M3K_BENCH_N", "2,3"))
DTYPES = parse_dtypes(os.environ.get("M3K_BENCH_DTYPES", "bfloat16,float16,float32"))
try:
    BACKENDS = parse_backends(None)
except ValueError as exc:  # no backend works here (the CPU extension not built, no GPU)
    pytest.skip(str(exc), allow_module_level=True)
CASES = build_cases(registered_methods(), BACKENDS, DTYPES, NS, SHAPE)


def _id(case):
    return f"{case.method}-{case.backend}-{case.dtype}-N{case.n}"


def _synced(fn, device):
    if device == "cpu":
        return fn
    import torch

    def call():
        fn()
        torch.cuda.synchronize()

    return call


def _setup(case, bench_tensors):
    if case.skip:
        pytest.skip(case.skip)
    base, models = bench_tensors(case.device, case.dtype)
    models = models[: case.n]
    kw = dict(case.kwargs, seed=0)
    recipe = make_recipe(case.n, method=case.method, has_base=True, **kw)
    size = base.element_size()
    nbytes = bytes_moved(base.numel(), case.n, size, size, recipe.uses_base)
    return base, models, kw, recipe, nbytes


def _split_only(recipe):
    if getattr(recipe, "family", None) is not None:
        pytest.skip("the method has its own stage A hook: timed by test_full only")


def _record(benchmark, nbytes, rate=True):
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if rate and stats is not None:
        benchmark.extra_info["gbps"] = gbps(nbytes, stats.stats.min)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_full(benchmark, case, bench_tensors):
    base, models, kw, _, nbytes = _setup(case, bench_tensors)
    out = base.new_empty(base.shape)
    fn = lambda: m3kernels.merge_tensors(
        base, models, method=case.method, backend=case.backend, out=out, name=NAME, **kw
    )
    benchmark(_synced(fn, case.device))
    _record(benchmark, nbytes)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_stage_a(benchmark, case, bench_tensors):
    base, models, _, recipe, nbytes = _setup(case, bench_tensors)
    _split_only(recipe)
    be = get_backend(case.backend, base.device)
    benchmark(_synced(lambda: prepare(base, models, recipe, NAME, be), case.device))
    _record(benchmark, nbytes, rate=False)  # stage A's passes vary by method: no one-pass rate


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_stage_b(benchmark, case, bench_tensors):
    base, models, _, recipe, nbytes = _setup(case, bench_tensors)
    _split_only(recipe)
    be = get_backend(case.backend, base.device)
    p, b = prepare(base, models, recipe, NAME, be)
    out = base.new_empty(base.shape)
    benchmark(_synced(lambda: be.merge(p, b, models, out), case.device))
    _record(benchmark, nbytes)


@pytest.mark.parametrize("case", [c for c in CASES if c.backend == BACKENDS[0]], ids=_id)
def test_eager(benchmark, case, bench_tensors):
    base, models, kw, _, nbytes = _setup(case, bench_tensors)
    why = eager_supported(case.method, case.kwargs)
    if why:
        pytest.skip(why)
    benchmark(_synced(lambda: eager_merge(base, models, method=case.method, **kw), case.device))
    _record(benchmark, nbytes)
