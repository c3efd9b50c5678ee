"""One benchmark run: the cases of :mod:`.cases` timed by :mod:`.timing` on seeded tensors, set
against the copy bandwidth of :mod:`.roofline` and the eager merge of :mod:`.eager`, with the
header of :mod:`.machine`; returns the report (a JSON-ready dict, see docs/BENCH.md).

A case that cannot run (skipped in :mod:`.cases`, or raising when merged) is recorded with its
reason; it never stops the run.
"""

from __future__ import annotations

from m3kernels.benchmark.cases import (
    DEFAULT_DTYPES,
    DEFAULT_NS,
    DEFAULT_SHAPE,
    build_cases,
    parse_backends,
    parse_dtypes,
    parse_methods,
    parse_ns,
    parse_shape,
)
from m3kernels.benchmark.machine import LoadMeter, load_average, machine_info, set_threads
from m3kernels.benchmark.roofline import bytes_moved, copy_bandwidth, gbps, pct_of

FORMAT = "m3kernels-bench/1"
TENSOR_NAME = "model.layers.0.mlp.up_proj.weight"
CASE_FIELDS = (
    "method",
    "backend",
    "device",
    "dtype",
    "n",
    "shape",
    "params",
    "status",
    "reason",
    "bytes",
    "reads_base",
    "stage_a_s",
    "stage_a_median_s",
    "stage_b_s",
    "stage_b_median_s",
    "full_s",
    "full_median_s",
    "stage_b_gbps",
    "full_gbps",
    "stage_b_pct_copy",
    "full_pct_copy",
    "eager_s",
    "speedup_vs_eager",
    "eager_equal_fraction",
    "eager_note",
    "split_note",
    "other_cpu_s",
    "times",
)


def _check_count(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise ValueError(f"--{what} {value!r} is not an integer") from None
    if value < low:
        raise ValueError(f"--{what} must be >= {low}, got {value}")
    return value


def make_tensors(shape, n: int, dtype, device: str, seed: int):
    """A base ~ N(0, 0.02²) and n fine-tunes bf16/f16/f32(base + N(0, 0.002²)), seeded."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    base32 = torch.randn(shape, generator=gen, device=device) * 0.02
    base = base32.to(dtype)
    del base32
    models = []
    for _ in range(n):
        noise = torch.randn(shape, generator=gen, device=device)
        models.append((base.to(torch.float32) + noise * 0.002).to(dtype))
        del noise
    return base, models


def _empty_record(case) -> dict:
    rec = dict.fromkeys(CASE_FIELDS)
    rec.update(
        method=case.method,
        backend=case.backend,
        device=case.device,
        dtype=case.dtype,
        n=case.n,
        shape=list(case.shape),
        params=dict(case.kwargs),
        status="skipped" if case.skip else "ok",
        reason=case.skip,
        eager_note="",
        split_note="",
        times={},
    )
    return rec


def run_case(case, tensors, copy_ref: float, *, repeats, warmup, eager, eager_repeats, seed) -> dict:
    """The record of one case (see CASE_FIELDS); exceptions become status 'error'."""
    rec = _empty_record(case)
    if case.skip:
        return rec
    import torch

    from m3kernels.benchmark.eager import eager_merge, eager_supported
    from m3kernels.benchmark.timing import time_call, time_stages
    from m3kernels.merge.recipe import make_recipe

    base, all_models = tensors
    models = all_models[: case.n]
    kw = dict(case.kwargs, seed=seed)
    try:
        recipe = make_recipe(case.n, method=case.method, has_base=True, **kw)
        st, ours = time_stages(
            base,
            models,
            dict(kw, method=case.method),
            case.backend,
            repeats=repeats,
            warmup=warmup,
            name=TENSOR_NAME,
        )
    except Exception as exc:  # a method this backend / size cannot run: recorded, the run goes on
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        return rec
    size = base.element_size()
    reads_base = bool(getattr(recipe, "uses_base", True))
    nbytes = bytes_moved(case.numel, case.n, size, size, reads_base)
    rec.update(bytes=nbytes, reads_base=reads_base, split_note=st.split_note)
    rec["full_s"], rec["full_median_s"] = st.full.best, st.full.median
    rec["times"]["full"] = st.full.times
    other = st.full.other_cpu_s or 0.0
    if st.stage_b is not None:
        rec["stage_a_s"], rec["stage_a_median_s"] = st.stage_a.best, st.stage_a.median
        rec["stage_b_s"], rec["stage_b_median_s"] = st.stage_b.best, st.stage_b.median
        rec["times"]["stage_a"], rec["times"]["stage_b"] = st.stage_a.times, st.stage_b.times
        rec["stage_b_gbps"] = gbps(nbytes, st.stage_b.best)
        rec["stage_b_pct_copy"] = pct_of(rec["stage_b_gbps"], copy_ref)
        other += (st.stage_a.other_cpu_s or 0.0) + (st.stage_b.other_cpu_s or 0.0)
    rec["full_gbps"] = gbps(nbytes, st.full.best)
    rec["full_pct_copy"] = pct_of(rec["full_gbps"], copy_ref)
    if eager:
        why = eager_supported(case.method, case.kwargs)
        if why:
            rec["eager_note"] = why
        else:
            holder = {}
            try:
                te = time_call(
                    lambda: holder.__setitem__("out", eager_merge(base, models, method=case.method, **kw)),
                    repeats=eager_repeats,
                    warmup=0,
                    device=case.device,
                )
                rec["eager_s"] = te.best
                rec["times"]["eager"] = te.times
                rec["speedup_vs_eager"] = te.best / st.full.best if st.full.best > 0 else None
                rec["eager_equal_fraction"] = float((holder["out"] == ours).to(torch.float64).mean())
                other += te.other_cpu_s or 0.0
            except Exception as exc:  # e.g. out of memory for the float32 temporaries
                rec["eager_note"] = f"eager failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            holder.clear()
    rec["other_cpu_s"] = other
    return rec


def run_benchmark(
    *,
    shape=DEFAULT_SHAPE,
    methods=None,
    backends=None,
    dtypes=DEFAULT_DTYPES,
    ns=DEFAULT_NS,
    repeats: int = 5,
    warmup: int = 1,
    eager: bool = True,
    eager_repeats: int = 1,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = False,
    on_record=None,
) -> dict:
    """The benchmark report (see the module docstring); ValueError for a bad argument, naming it.
    ``on_record(record)`` is called after each case (the CLI prints rows as they come)."""
    import torch

    from m3kernels.benchmark.report import progress_bar

    shape = parse_shape(shape)
    methods = parse_methods(methods)
    dtypes = parse_dtypes(dtypes)
    ns = parse_ns(ns if not isinstance(ns, int) else [ns])
    repeats = _check_count(repeats, "repeats", 1)
    warmup = _check_count(warmup, "warmup", 0)
    eager_repeats = _check_count(eager_repeats, "eager-repeats", 1)
    seed = _check_count(seed, "seed", 0)
    if threads is not None:
        threads = _check_count(threads, "threads", 1)
    backends = parse_backends(backends)  # last: the values above are checked even where none works
    if threads is not None:
        set_threads(threads)
    info = machine_info()
    cases = build_cases(methods, backends, dtypes, ns, shape)
    runnable = [c for c in cases if not c.skip]
    dt = {d: getattr(torch, d) for d in dtypes}
    copies = {}
    tensors = {}
    records = []
    load_before = load_average()
    with LoadMeter() as meter:
        for device in dict.fromkeys(c.device for c in runnable):
            mine = [c for c in runnable if c.device == device]
            inputs = max(c.numel * (c.n + 1) * dt[c.dtype].itemsize for c in mine)
            copies[device] = copy_bandwidth(inputs, device, repeats=max(repeats, 3), warmup=1)
        bar = progress_bar(len(cases), progress)
        try:
            for case in cases:
                bar.set_postfix_str(f"{case.method} {case.backend} {case.dtype} N={case.n}", refresh=False)
                t = None
                if not case.skip:
                    key = (case.device, case.dtype)
                    if key not in tensors:
                        n_max = max(c.n for c in runnable if (c.device, c.dtype) == key)
                        tensors[key] = make_tensors(shape, n_max, dt[case.dtype], case.device, seed)
                    t = tensors[key]
                ref = copies.get(case.device, {}).get("reference_gbps")
                rec = run_case(
                    case,
                    t,
                    ref,
                    repeats=repeats,
                    warmup=warmup,
                    eager=eager,
                    eager_repeats=eager_repeats,
                    seed=seed,
                )
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
                bar.update(1)
        finally:
            bar.close()
            tensors.clear()
    return {
        "format": FORMAT,
        "machine": info,
        "settings": {
            "shape": list(shape),
            "methods": methods,
            "backends": backends,
            "dtypes": dtypes,
            "n": ns,
            "repeats": repeats,
            "warmup": warmup,
            "eager": bool(eager),
            "eager_repeats": eager_repeats,
            "threads": threads,
            "seed": seed,
            "tensor_name": TENSOR_NAME,
        },
        "copy": copies,
        "load": {
            "wall_s": meter.wall_s,
            "own_cpu_s": meter.own_cpu_s,
            "other_cpu_s": meter.other_cpu_s,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": load_average(),
        },
        "cases": records,
    }


__all__ = ["run_benchmark", "run_case", "make_tensors", "FORMAT", "CASE_FIELDS", "TENSOR_NAME"]
