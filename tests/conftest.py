"""Shared test set-up: Triton's interpreter on machines without a GPU, and common fixtures.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, so it is set here,
at import time of the test session, when no CUDA device is present.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A fresh, seeded torch generator per test (fresh random inputs, reproducible failures)."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("M3K_RANDOM_SEEDS") else 1234
    print(f"random inputs from seed {seed}")  # shown with a failing test's captured output
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread (two spin-waiting threads on a busy 2-core machine are
    many times slower); the merge kernels keep their own threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_cli_logging():
    """The CLI's log handler writes to the stderr of the test that created it: a test using this
    gets a new one (the handler is dropped before and after it)."""

    log = logging.getLogger("m3kernels")

    def drop():
        for h in [h for h in log.handlers if getattr(h, "_m3k_cli", False)]:
            log.removeHandler(h)
        log.propagate = True  # as a library logger is: the CLI turns it off (caplog needs it)
        log.setLevel(logging.NOTSET)

    drop()
    yield
    drop()


@pytest.fixture
def restore_simd():
    """A test that picks the CPU kernels' SIMD variant (``_C.set_simd_level``) leaves the level
    it found."""
    from m3kernels.backends.cpu import _C

    level = _C.simd_level()
    yield
    _C.set_simd_level(level)
