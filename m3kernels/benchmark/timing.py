"""Timing a call: warm-up calls first, then ``repeats`` timed calls, best and median kept.

On a CUDA device each call is timed with CUDA events recorded on the current stream around it,
after a ``torch.cuda.synchronize()`` (work queued before does not count) and read after a
synchronize (the call's kernels are finished); on the CPU with ``time.perf_counter``. The CPU time
other processes used during the timed calls comes with the result (:class:`LoadMeter`).

Stage A and stage B of a merge are timed separately (:func:`time_stages`): stage A is
``m3kernels.api.prepare`` (the statistics the method needs: L1 sums, trim thresholds), stage B is
the backend's fused ``merge`` with those parameters, and ``full`` is ``merge_tensors`` itself (both
stages and the argument checks, what a user calls). For a method with its own stage A hook (a registry ``family``: the SLERP family,
breadcrumbs, ram, ...) stage A is the hook (``m3kernels.merge.methods.stage``) and stage B the
kernel pass (or the copy) it returns. The split is kept only where the two stages give the full
merge's bytes; a method whose merge is not made of them gets its full time only, with a note.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from m3kernels.benchmark.machine import LoadMeter


@dataclass
class Timing:
    """Seconds of each timed call (``times``), and other processes' CPU seconds meanwhile."""

    times: list = field(default_factory=list)
    other_cpu_s: float | None = None

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["best"], d["median"] = self.best, self.median
        return d


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def time_call(fn, *, repeats: int, warmup: int = 1, device=None) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed (see the module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    cuda = _is_cuda(device)
    if cuda:
        import torch

        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    for _ in range(warmup):
        fn()
    if cuda:
        sync()
    t = Timing()
    with LoadMeter() as meter:
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync()
                start.record()
                fn()
                end.record()
                sync()
                t.times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                t.times.append(time.perf_counter() - t0)
    t.other_cpu_s = meter.other_cpu_s
    return t


@dataclass
class StageTimes:
    """The timings of one case: ``full`` always; ``stage_a``/``stage_b`` when the method's merge
    is ``prepare`` + ``backend.merge`` (checked: the two stages give the full merge's bytes)."""

    full: Timing
    stage_a: Timing | None
    stage_b: Timing | None
    split_note: str = ""


def time_stages(base, models, kwargs: dict, backend_name: str, *, repeats: int, warmup: int, name: str = ""):
    """(StageTimes, the merged output) of ``merge_tensors(base, models, backend=backend_name, **kwargs)``."""
    import torch

    import m3kernels
    from m3kernels.api import prepare
    from m3kernels.backends import get_backend
    from m3kernels.merge.recipe import make_recipe

    device = models[0].device
    out = torch.empty_like(base if base is not None else models[0])
    full = time_call(
        lambda: m3kernels.merge_tensors(base, models, backend=backend_name, out=out, name=name, **kwargs),
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    result = out.clone()
    stage_a = stage_b = None
    note = ""
    try:
        be = get_backend(backend_name, device)
        recipe = make_recipe(len(models), has_base=base is not None, **kwargs)
        prepared = {}
        if getattr(recipe, "family", None) is not None:  # its own stage A (m3kernels.merge.methods)
            from m3kernels.merge import methods

            def a():
                prepared["st"] = methods.stage(base, models, recipe, name, be)

            def b_call():
                st = prepared["st"]
                if st.direct is not None:
                    st.direct(out)
                else:
                    be.merge(st.params, st.base, st.models, out)

        else:

            def a():
                prepared["pb"] = prepare(base, models, recipe, name, be)

            def b_call():
                p, b = prepared["pb"]
                be.merge(p, b, models, out)

        stage_a = time_call(a, repeats=repeats, warmup=warmup, device=device)
        out.fill_(float("nan"))
        stage_b = time_call(b_call, repeats=repeats, warmup=warmup, device=device)
        if not torch.equal(out.view(torch.uint8), result.view(torch.uint8)):  # bit for bit, NaN included
            stage_a = stage_b = None
            note = "stage split not timed: prepare + backend.merge differ from merge_tensors for this method"
    except Exception as exc:  # a method whose merge is not prepare + merge: full time only
        stage_a = stage_b = None
        note = f"stage split not timed: {type(exc).__name__}: {exc}"
    return StageTimes(full, stage_a, stage_b, note), result


__all__ = ["Timing", "StageTimes", "time_call", "time_stages"]
