"""m3kernels: exact, fused kernels for merging fine-tuned LLMs (TIES, DARE, M³, ...)."""

__version__ = "0.1.0"

from .api import merge_tensors, trim_thresholds  # noqa: E402
from .backends import available_backends  # noqa: E402
from .mixup import draw_mix_ratios  # noqa: E402
from .orchestrator import merge_checkpoints  # noqa: E402
from .philox import dare_keep_mask  # noqa: E402
from .recipe import METHODS  # noqa: E402

__all__ = ["merge_tensors", "trim_thresholds", "draw_mix_ratios", "dare_keep_mask",
           "available_backends", "METHODS", "__version__", "merge_checkpoints"]
