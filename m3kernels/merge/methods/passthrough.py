"""passthrough: the one input model's tensor, optionally times ``scale``; no kernel pass.

With a scale the product is one float32 multiplication, then one rounding to the output dtype
(mergekit with ``dtype: float32``); without, a copy (converted to the output dtype).
"""

from __future__ import annotations

import torch

from m3kernels.merge.kernel_params import f32
from m3kernels.merge.methods import Staged


def prepare(base, models, recipe, name: str, backend) -> Staged:
    x = models[0]
    scale = recipe.get("scale", (None,))[0]

    def direct(out: torch.Tensor) -> None:
        if scale is None:
            out.copy_(x)
        elif out.dtype == x.dtype:  # torch multiplies in float32 (a float32 scalar), rounds once
            torch.mul(x, f32(scale), out=out)
        else:
            out.copy_(x.to(torch.float32) * f32(scale))

    return Staged(None, None, [x], direct)
