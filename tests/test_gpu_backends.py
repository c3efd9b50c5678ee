"""The GPU backends (cuda, triton) and the GPU streaming pipeline, against the CPU backend.

GPU tests (``pytest.mark.gpu``, skipped without ``torch.cuda.is_available()``): the full matrix
methods × dtypes (incl. mixed) × N ∈ {1, 2, 3} × sizes (1, 7, 1000003, 2-D odd) with the output
poisoned: bit-identical to the CPU backend on the same inputs, thresholds exact, DARE masks bit
for bit, values within rounding of the float64 reference; gpu_merge_stream equal to per-tensor
merges; a job too big for the GPU gives a RuntimeError naming it.

Tests that run anywhere: the clear errors without a GPU, and the pipeline's control flow
(slots, offsets, staging, job order, error order, OOM message) with the CUDA calls replaced by
synchronous stand-ins and the CPU backend doing the merging.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.backends import available_backends
from m3kernels.checkpoint import gpu_pipeline
from m3kernels.checkpoint.gpu_pipeline import gpu_merge_stream
from m3kernels.merge.job import MergeJob
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from cases import DTYPE_CASES, METHOD_CASES, kwargs_for
from helpers import assert_close_ulp, check_dare_mask_through_merge, have_backend, make_inputs, term_scale

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
HAS_GPU = torch.cuda.is_available()
GPU_BACKENDS = ["cuda", "triton"]


def gpu_test(fn):
    """Mark a test as needing a CUDA GPU (skipped cleanly without one)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")(fn))


def need_backend(name: str):
    if not have_backend(name):
        pytest.skip(f"backend {name} unavailable: {available_backends().get(name)}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, BF16: torch.int16, F16: torch.int16}[t.dtype])


SHAPES = [(1,), (7,), (1000003,), (37, 129)]


def _check_on_gpu(backend, case, dtype_case, n, shape, gen, name="model.layers.7.mlp.gate_proj.weight"):
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    kw = kwargs_for(case, n)
    what = f"{backend}/{case}/{dtype_case}/N={n}/{list(shape)}"
    base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
    gbase, gmodels = base.cuda(), [m.cuda() for m in models]
    out = torch.full(shape, float("nan"), dtype=out_dt, device="cuda")
    m3kernels.merge_tensors(gbase, gmodels, out=out, name=name, backend=backend, **kw)
    got = out.cpu()
    recipe = make_recipe(n, has_base=True, **kw)
    small = got.numel() < 100000
    if have_backend("cpu"):
        cpu = torch.full(shape, float("nan"), dtype=out_dt)
        m3kernels.merge_tensors(base, models, out=cpu, name=name, backend="cpu", **kw)
        assert torch.equal(_bits(got), _bits(cpu)), f"{what}: GPU and CPU backends differ"
    if small or not have_backend("cpu"):
        ref, info = reference_merge(base, models, recipe, name)
        assert_close_ulp(got, ref, term_scale(base, models, recipe), what)
    if recipe.trim_density is not None:
        gpu_thr = m3kernels.trim_thresholds(gbase, gmodels, name=name, backend=backend, **kw)
        if small or not have_backend("cpu"):
            assert gpu_thr == info["thresholds"], (what, gpu_thr, info["thresholds"])
        else:
            assert gpu_thr == m3kernels.trim_thresholds(base, models, name=name, backend="cpu", **kw), what


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matrix(backend, case, dtype_case, n, gen):
    need_backend(backend)
    for shape in SHAPES:
        _check_on_gpu(backend, case, dtype_case, n, shape, gen)


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [4, 5, 16])
def test_many_models(backend, n, gen):
    need_backend(backend)
    for case in ("ties_nonorm_w", "dare_linear", "linear_w"):
        _check_on_gpu(backend, case, "bf16" if n != 5 else "mixed", n, (40961,), gen)


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 7, 4097, 1000003])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_dare_mask_bit_for_bit(backend, numel, density):
    """base 0, model 1, no rescale: the merged tensor is the keep mask of the SPEC stream."""
    need_backend(backend)
    check_dare_mask_through_merge(backend, numel, density, device="cuda")


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_unaligned_views(backend, gen):
    """Inputs and output starting one element into their storage (no 16-byte vector loads)."""
    need_backend(backend)
    kw = dict(method="ties_dare", drop_rate=0.3, density=0.4, seed=7)
    numel = 100003
    base, models = make_inputs((numel + 1,), 3, (BF16, [F32, BF16]), gen)
    gbase, gmodels = base.cuda()[1:], [m.cuda()[1:] for m in models]
    out = torch.full((numel + 1,), float("nan"), dtype=BF16, device="cuda")
    m3kernels.merge_tensors(gbase, gmodels, out=out[1:], name="w", backend=backend, **kw)
    expect = m3kernels.merge_tensors(
        gbase.clone(), [m.clone() for m in gmodels], name="w", backend=backend, **kw
    )
    assert torch.equal(_bits(out[1:]).cpu(), _bits(expect).cpu())
    assert torch.isnan(out[0]).item(), "wrote outside the output view"


@gpu_test
def test_cuda_stage_a_equals_host_emulation(gen):
    """Device histograms (shared-memory pass 1, global pass 2) and L1 partials == the host emulation."""
    need_backend("cuda")
    from m3kernels.backends import cuda as cb
    from m3kernels.merge.kernel_params import make_params

    numel = 3_000_017
    base, models = make_inputs((numel,), 2, (BF16, [BF16, F32]), gen)
    recipe = make_recipe(2, method="ties_dare", has_base=True, drop_rate=0.7, density=0.2, seed=1)
    p = make_params(recipe, "s", True)
    gbase, gmodels = base.cuda(), [m.cuda() for m in models]
    h1 = cb.histogram(p, gbase, gmodels, None)
    assert np.array_equal(h1, cb.emulate_histogram(p, base, models, None))
    prefix = np.array([np.argmax(h1[0][1:]) + 1, 0], dtype=np.uint32)  # a busy bin, and the zeros' bin
    assert np.array_equal(
        cb.histogram(p, gbase, gmodels, prefix), cb.emulate_histogram(p, base, models, prefix)
    )
    total, kept = cb.l1_sums(p, gbase, gmodels)
    etotal, ekept = cb.emulate_l1_sums(p, base, models)
    assert np.array_equal(total, etotal) and np.array_equal(kept, ekept)


# ----------------------------------------------------------------------------- pipeline


def _job_specs():
    """(name, shape, dtypes (base, models, out), merge kwargs, extra) for a varied job list."""
    return [
        ("model.embed_tokens.weight", (1000, 96), (BF16, [BF16], BF16), dict(method="ties", density=0.3), {}),
        ("model.norm.weight", (5120,), (F16, [F32], F32), dict(method="linear"), {}),
        ("empty.weight", (0, 8), (BF16, [BF16], BF16), dict(method="task_arithmetic"), {}),
        (
            "layers.0.mlp.up_proj.weight",
            (333, 77),
            (BF16, [F32, F16], F16),
            dict(method="dare_ties", density=0.5, rescale="l1", seed=4),
            {"transpose": True},
        ),
        (
            "layers.0.self_attn.q_proj.weight",
            (4097,),
            (BF16, [BF16], BF16),
            dict(method="task_arithmetic", lambda_=0.5),
            {"pin": True},
        ),
        (
            "layers.0.self_attn.k_proj.weight",
            (2049,),
            (F32, [F32], BF16),
            dict(method="ties", density=0.2),
            {"thresholds": [0.004, 0.008]},
        ),
        (
            "layers.1.mlp.down_proj.weight",
            (64, 1001),
            (BF16, [BF16], BF16),
            dict(method="ties_dare", drop_rate=0.5, density=0.4, mix_ratios=[0.3, 0.7], seed=8),
            {},
        ),
    ]


def _make_jobs(gen, n=2, repeat=2, device_for_pin=True):
    jobs, kwargs = [], []
    for r in range(repeat):
        for name, shape, (bdt, mdts, odt), kw, extra in _job_specs():
            base, models = make_inputs(shape, n, (bdt, mdts), gen)
            if extra.get("transpose") and len(shape) == 2:
                models[1] = models[1].t().contiguous().t()  # non-contiguous input
            if extra.get("pin") and device_for_pin:
                base, models = base.pin_memory(), [m.pin_memory() for m in models]
            recipe = make_recipe(n, has_base=True, **kw)
            jobs.append(
                MergeJob(
                    name=f"{name}#{r}",
                    base=base,
                    models=models,
                    out_dtype=odt,
                    recipe=recipe,
                    thresholds=extra.get("thresholds"),
                )
            )
            kwargs.append(kw)
    return jobs, kwargs


def _expected(job, kw, backend, device):
    base = job.base.to(device) if job.base is not None else None
    models = [m.to(device) for m in job.models]
    out = m3kernels.merge_tensors(
        base, models, name=job.name, out_dtype=job.out_dtype, backend=backend, thresholds=job.thresholds, **kw
    )
    return out.cpu()


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_stream_equals_per_tensor_merges(backend, depth, gen):
    need_backend(backend)
    jobs, kwargs = _make_jobs(gen)
    got = list(gpu_merge_stream(iter(jobs), device="cuda", backend=backend, depth=depth))
    assert [j.name for j, _ in got] == [j.name for j in jobs]
    for (job, result), kw in zip(got, kwargs):
        assert result.device.type == "cpu" and result.dtype == job.out_dtype
        assert tuple(result.shape) == tuple(job.models[0].shape)
        expect = _expected(job, kw, backend, "cuda")
        assert torch.equal(_bits(result), _bits(expect)), job.name
        if have_backend("cpu"):
            assert torch.equal(_bits(result), _bits(_expected(job, kw, "cpu", "cpu"))), job.name


@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_stream_out_of_memory_is_a_clear_error(backend, gen):
    need_backend(backend)
    free, total = torch.cuda.mem_get_info()
    numel = total // 2 + 1  # each bf16 input alone is larger than the whole GPU
    huge = torch.zeros(1, dtype=BF16).expand(numel)  # no host memory behind it
    ok_jobs, _ = _make_jobs(gen, repeat=1)
    bad = MergeJob(
        name="huge.weight",
        base=huge,
        models=[huge, huge],
        out_dtype=BF16,
        recipe=make_recipe(2, method="task_arithmetic", has_base=True),
    )
    stream = gpu_merge_stream(ok_jobs[:2] + [bad] + ok_jobs[2:], backend=backend)
    delivered = []
    with pytest.raises(RuntimeError) as err:
        for job, _ in stream:
            delivered.append(job.name)
    msg = str(err.value)
    assert "huge.weight" in msg and str(numel) in msg and "bytes" in msg, msg
    assert delivered == [j.name for j in ok_jobs[:2]], "jobs before the failing one are delivered first"
    # the device is still usable afterwards
    jobs, kwargs = _make_jobs(gen, repeat=1)
    for (job, result), kw in zip(gpu_merge_stream(jobs, backend=backend), kwargs):
        assert torch.equal(_bits(result), _bits(_expected(job, kw, backend, "cuda")))


# ----------------------------------------------------------------------------- anywhere


@pytest.mark.skipif(HAS_GPU, reason="checks the errors on a machine without a GPU")
def test_without_gpu_the_errors_are_clear():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gpu_merge_stream([])
    reason = available_backends()["cuda"]
    assert reason != "available" and ("CUDA" in reason or "cuda" in reason), reason
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        m3kernels.merge_tensors(x, [x], method="task_arithmetic", backend="cuda")
    from m3kernels.backends import cuda as cb

    assert not cb.available() and cb.unavailable_reason()
    assert not cb.supports("cpu") and cb.supports("cuda")


def test_stream_rejects_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA device"):
        gpu_merge_stream([], device="cpu")


class _FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def host_pipeline(monkeypatch):
    """gpu_pipeline with synchronous stand-ins for CUDA: 'device' buffers are CPU tensors.

    Returns run(jobs, depth, device_limit=None): the stream's output, merging with the CPU
    backend; device allocations above device_limit bytes raise CUDA's OutOfMemoryError.
    """
    need_backend("cpu")
    fake = types.SimpleNamespace(
        Event=_FakeEvent,
        Stream=_FakeStream,
        stream=lambda s: contextlib.nullcontext(),
        device=lambda d: contextlib.nullcontext(),
        OutOfMemoryError=torch.cuda.OutOfMemoryError,
        mem_get_info=lambda d: (1000, 2000),
        empty_cache=lambda: None,
    )
    monkeypatch.setattr(gpu_pipeline, "_cuda", fake)
    monkeypatch.setattr(gpu_pipeline, "_pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    limit = {"bytes": None, "allocated": []}

    def device_bytes(nbytes, device):
        if limit["bytes"] is not None and nbytes > limit["bytes"]:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
        limit["allocated"].append(nbytes)
        return torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)  # poisoned 'device' memory

    monkeypatch.setattr(gpu_pipeline, "_device_bytes", device_bytes)
    cpu = m3kernels.backends.get_backend("cpu", "cpu")

    def run(jobs, depth=2, device_limit=None):
        limit["bytes"] = device_limit
        pipe = gpu_pipeline._Pipeline(torch.device("cpu"), cpu, depth)
        return gpu_pipeline._run(iter(jobs), pipe, depth)

    run.allocated = limit["allocated"]
    return run


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipeline_control_flow_on_host(host_pipeline, depth, gen):
    jobs, kwargs = _make_jobs(gen, device_for_pin=False)
    got = list(host_pipeline(jobs, depth))
    assert [j for j, _ in got] == jobs
    for (job, result), kw in zip(got, kwargs):
        assert result.dtype == job.out_dtype and tuple(result.shape) == tuple(job.models[0].shape)
        assert torch.equal(_bits(result), _bits(_expected(job, kw, "cpu", "cpu"))), job.name
    # slot buffers are reused (grown only when a bigger tensor comes), not allocated per job
    nonempty = sum(1 for j in jobs if j.models[0].numel())
    assert 2 <= len(host_pipeline.allocated) < 2 * nonempty


def test_pipeline_oom_names_the_tensor_and_keeps_order(host_pipeline, gen):
    jobs, _ = _make_jobs(gen, repeat=1, device_for_pin=False)
    big = MergeJob(
        name="big.weight",
        base=torch.zeros(300, 400),
        models=[torch.zeros(300, 400)] * 2,
        out_dtype=F32,
        recipe=make_recipe(2, method="task_arithmetic", has_base=True),
    )
    delivered = []
    with pytest.raises(RuntimeError) as err:
        for job, _ in host_pipeline(jobs[:3] + [big] + jobs[3:], depth=2, device_limit=600_000):
            delivered.append(job.name)
    msg = str(err.value)
    assert "big.weight" in msg and "[300, 400]" in msg and "bytes" in msg, msg
    assert str(3 * 300 * 400 * 4 + 300 * 400 * 4) in msg, msg  # inputs + output, exactly
    assert delivered == [j.name for j in jobs[:3]]


def test_pipeline_bad_job_reported_in_order(host_pipeline, gen):
    jobs, _ = _make_jobs(gen, repeat=1, device_for_pin=False)
    bad = MergeJob(
        name="bad.shape",
        base=torch.zeros(3),
        models=[torch.zeros(3), torch.zeros(4)],
        out_dtype=F32,
        recipe=make_recipe(2, method="task_arithmetic", has_base=True),
    )
    delivered = []
    with pytest.raises(ValueError, match="bad.shape"):
        for job, _ in host_pipeline(jobs[:2] + [bad], depth=2):
            delivered.append(job.name)
    assert delivered == [j.name for j in jobs[:2]]
