"""Triton kernels of the merge pipeline (docs/KERNEL.md): Philox DARE stream, stage A (histograms,
L1 sums, gram sums, RAM counts), stage B.

Importing this package defines the ``@triton.jit`` kernels, and Triton decides at that moment
whether they run compiled (GPU) or in its interpreter (``TRITON_INTERPRET=1``, CPU tensors):
set the variable before the first import. :data:`INTERPRETED` records which it was.
"""

from triton.runtime.interpreter import InterpretedFunction

from m3kernels.backends.triton.kernels.gram import gram_kernel
from m3kernels.backends.triton.kernels.params import param_table, tie_rule, trims
from m3kernels.backends.triton.kernels.philox import dare_u32_kernel, philox_kernel
from m3kernels.backends.triton.kernels.stage_a import (
    histogram_kernel,
    l1_partial_kernel,
    ram_counts_kernel,
    tie_counts_kernel,
)
from m3kernels.backends.triton.kernels.stage_b import merge_kernel

INTERPRETED = isinstance(merge_kernel, InterpretedFunction)

__all__ = [
    "INTERPRETED",
    "param_table",
    "trims",
    "tie_rule",
    "philox_kernel",
    "dare_u32_kernel",
    "histogram_kernel",
    "l1_partial_kernel",
    "merge_kernel",
    "gram_kernel",
    "ram_counts_kernel",
    "tie_counts_kernel",
]
