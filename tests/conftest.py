"""Shared test set-up: Triton's interpreter on machines without a GPU, and common fixtures.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, so it is set here,
at import time of the test session, when no CUDA device is present.
"""

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
