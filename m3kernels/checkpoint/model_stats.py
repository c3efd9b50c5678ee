"""``trim_scope: model``: exact whole-model trim thresholds from stage-A histograms summed
over every merged tensor (integer counts, so the result does not depend on the order).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from m3kernels.api import prepare
from m3kernels.backends import get_backend
from m3kernels.checkpoint.plan import COPY, MergePlan
from m3kernels.checkpoint.produce import Prefetcher
from m3kernels.merge.kernel_params import HIST_BINS, trim_k
from m3kernels.merge.select import bits_to_float, select_thresholds

log = logging.getLogger("m3kernels")


def model_thresholds(
    plan: MergePlan, device: torch.device, backend: str, progress: bool, *, tensors=None, reduce=None
) -> list:
    """``trim_scope: model``: exact whole-model trim thresholds from histograms summed over tensors.

    A distributed merge passes its rank's ``tensors`` (a part of the plan's) and ``reduce`` (the
    sum of an int64 histogram over every rank): the counts are integers, so each rank gets the
    thresholds one process would."""
    from tqdm import tqdm

    every = [pt for pt in plan.tensors if pt.action != COPY and pt.merged_numel > 0]
    if not every:
        return []
    recipe = every[0].recipe
    n = recipe.n
    if recipe.trim_density is None:
        return [None] * n
    total = sum(pt.merged_numel for pt in every)
    if tensors is not None:
        mine = {id(t) for t in tensors}
        pts = [pt for pt in every if id(pt) in mine]
    else:
        pts = every
    ks = [trim_k(d, total) for d in recipe.trim_density]
    be = get_backend(backend, device)
    bar = tqdm(
        total=2 * sum(pt.merged_numel for pt in pts),  # this rank's part
        desc="statistics",
        unit="el",
        unit_scale=True,
        disable=not progress,
        leave=False,
    )

    def hist(prefix):
        acc = np.zeros((n, HIST_BINS), dtype=np.int64)
        pre = Prefetcher(pts)
        try:
            for k, pt in enumerate(pts):
                pre.advance(k)
                b, ms = pt.inputs()
                if device.type != "cpu":
                    b = b.to(device) if b is not None else None
                    ms = [m.to(device) for m in ms]
                p, bb = prepare(b, ms, pt.recipe, pt.name, be, thresholds=[None] * n)
                h = be.histogram(p, bb, ms, prefix)
                acc += h.cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.int64)
                del b, ms, bb
                pt.release()
                bar.update(pt.merged_numel)
        finally:
            pre.close()
        return acc if reduce is None else reduce(acc)

    try:
        bits = select_thresholds(hist, ks, total)
    finally:
        bar.close()
    return [bits_to_float(int(x)) for x in bits]
