"""One tensor to merge, prepared: its name, inputs, output dtype and resolved recipe.

Every path that merges a tensor describes it as a :class:`MergeJob` and hands it to
:func:`m3kernels.api.merge_job` (stage A, then stage B on a backend): ``merge_tensors``
builds one from its arguments, the checkpoint merge from each planned tensor
(:meth:`m3kernels.checkpoint.plan.PlannedTensor.job`), on the CPU or through the GPU pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class MergeJob:
    name: str  # tensor name (keys the DARE stream)
    base: torch.Tensor | None  # base tensor (CPU, may be memory-mapped) or None
    models: Sequence[torch.Tensor]  # one tensor per fine-tuned model, same shape
    out_dtype: torch.dtype  # dtype of the merged tensor
    recipe: Any  # m3kernels.merge.recipe.Recipe for this tensor
    thresholds: Sequence[float | None] | None = None  # whole-model trim thresholds
    meta: dict = field(default_factory=dict)  # orchestrator bookkeeping (shard, offsets, ...)

    def with_inputs(self, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> MergeJob:
        """The same job on other copies of its inputs (e.g. on the GPU)."""
        return replace(self, base=base, models=list(models))
