"""Set-up of the pytest-benchmark suite (``pytest bench --benchmark-only``; not part of ``pytest tests``).

The suite times the cases of ``m3kernels bench`` at small sizes. ``M3K_BENCH_SHAPE`` (default
512x1024), ``M3K_BENCH_N`` (default 2,3) and ``M3K_BENCH_DTYPES`` (default bfloat16,float16,float32)
change them; the report header says which machine and kernel variant ran.
"""

import os

import pytest

from m3kernels.benchmark.cases import parse_dtypes, parse_ns, parse_shape


def suite_sizes() -> tuple:
    """(shape, Ns, dtypes) of the suite, from the environment (see the module docstring)."""
    return (
        parse_shape(os.environ.get("M3K_BENCH_SHAPE", "512x1024")),
        parse_ns(os.environ.get("M3K_BENCH_N", "2,3")),
        parse_dtypes(os.environ.get("M3K_BENCH_DTYPES", "bfloat16,float16,float32")),
    )


def pytest_report_header(config):
    from m3kernels.benchmark.machine import header_lines, machine_info

    shape, ns, dtypes = suite_sizes()
    return header_lines(machine_info()) + [f"bench suite: shape {shape}, N {ns}, dtypes {dtypes}"]


@pytest.fixture(scope="session")
def bench_tensors():
    """(device, dtype) -> (base, models) of the largest N, made once per session."""
    from m3kernels.benchmark.runner import make_tensors

    cache = {}

    def get(device: str, dtype: str):
        import torch

        key = (device, dtype)
        if key not in cache:
            shape, ns, _ = suite_sizes()
            cache[key] = make_tensors(shape, max(ns), getattr(torch, dtype), device, seed=0)
        return cache[key]

    return get
