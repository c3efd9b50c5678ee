"""m3kernels: exact, fused kernels for merging fine-tuned LLMs (TIES, DARE, M³, ...)."""

__version__ = "0.1.0"

from m3kernels.api import merge_tensors, trim_thresholds  # noqa: E402
from m3kernels.backends import available_backends  # noqa: E402
from m3kernels.merge.mixup import draw_mix_ratios  # noqa: E402
from m3kernels.checkpoint.run import merge_checkpoints  # noqa: E402
from m3kernels.merge.philox import dare_keep_mask  # noqa: E402
from m3kernels.merge.recipe import METHODS  # noqa: E402

__all__ = ["merge_tensors", "trim_thresholds", "draw_mix_ratios", "dare_keep_mask",
           "available_backends", "METHODS", "__version__", "merge_checkpoints"]
