"""One unit of streaming work: a tensor name, its inputs and where the result goes.

The checkpoint orchestrator (CPU) and the GPU pipeline both consume ``MergeJob``s, so the
two share one description of "merge this tensor".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass
class MergeJob:
    name: str                                 # tensor name (keys the DARE stream)
    base: Optional[torch.Tensor]              # base tensor (CPU, may be memory-mapped) or None
    models: Sequence[torch.Tensor]            # one tensor per fine-tuned model, same shape
    out_dtype: torch.dtype                    # dtype of the merged tensor
    recipe: Any                               # m3kernels.merge.recipe.Recipe for this tensor
    thresholds: Optional[Sequence[Optional[float]]] = None  # whole-model trim thresholds
    meta: dict = field(default_factory=dict)  # orchestrator bookkeeping (shard, offsets, ...)
