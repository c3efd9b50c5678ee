"""GPU streaming merge: tensor t+1 uploads and tensor t-1 downloads while tensor t is merged.

:func:`gpu_merge_stream` takes :class:`~m3kernels.merge.job.MergeJob` s whose inputs are CPU tensors
(possibly memory-mapped) and yields ``(job, result)`` in job order, ``result`` a CPU tensor
(in pinned memory) of the job's shape and ``out_dtype``. Per job:

1. a background thread copies the inputs into a pinned staging buffer of the job's slot
   (reused, grown as needed; inputs that are already pinned and contiguous are not staged);
2. the upload stream copies the staged bytes into the slot's device buffer (one copy);
3. the compute stream runs stage A and stage B (:func:`m3kernels.api.prepare` and the backend's
   ``merge``) into the slot's device output buffer;
4. the download stream copies the result into a fresh pinned host tensor.

CUDA events chain the three streams per slot. ``depth`` slots (default 2) bound the device memory
to about two tensor sets (inputs plus output) of the largest tensor, plus stage A's small
scratch. A CUDA out-of-memory for a tensor becomes a ``RuntimeError`` naming the tensor, its
shape and the bytes it needs, after one retry with the other slots' buffers released.

This module knows nothing about checkpoints: the orchestrator builds the jobs and writes the
results.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from m3kernels.api import merge_job
from m3kernels.backends import get_backend
from m3kernels.merge.job import MergeJob
from m3kernels.merge.kernel_params import DTYPE_CODES

ALIGN = 256  # byte alignment of every tensor inside a slot buffer (vector loads need 16)

# Every CUDA facility used below goes through these names, so the control flow can be tested
# on a machine without a GPU by substituting them (tests/test_gpu_backends.py does).
_cuda = torch.cuda


def _device_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


def _pinned_empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Plan:
    """One job's inputs and where they go inside the slot buffers."""

    job: MergeJob
    inputs: list  # CPU tensors: the base (when the recipe uses it), then the models
    offsets: list  # byte offset of each input in the slot's input buffer
    in_bytes: int  # size of the slot's input region
    out_bytes: int
    shape: tuple

    def describe(self) -> str:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self.inputs})
        return (
            f"tensor {self.job.name!r} (shape {list(self.shape)}, {len(self.inputs)} inputs of "
            f"{'/'.join(dtypes)}, output {str(self.job.out_dtype).replace('torch.', '')})"
        )


class _Slot:
    """Device and pinned host buffers for one tensor set in flight, and its stream events."""

    def __init__(self):
        self.dev_in: torch.Tensor | None = None  # uint8 device buffer for the inputs
        self.dev_out: torch.Tensor | None = None  # uint8 device buffer for the output
        self.host_in: torch.Tensor | None = None  # uint8 pinned staging buffer
        self.h2d_done = _cuda.Event()
        self.compute_done = _cuda.Event()
        self.d2h_done = _cuda.Event()
        self.used = False

    def wait_idle(self) -> None:
        """Block until every queued use of this slot's device buffers is finished."""
        if self.used:
            self.compute_done.synchronize()
            self.d2h_done.synchronize()

    def release_device(self) -> None:
        self.wait_idle()
        self.dev_in = None
        self.dev_out = None


def _plan(job: MergeJob) -> _Plan:
    if not isinstance(job, MergeJob):
        raise TypeError(f"gpu_merge_stream expects MergeJob items, got {type(job).__name__}")
    models = list(job.models)
    if not models:
        raise ValueError(f"tensor {job.name!r}: no model tensors")
    shape = tuple(models[0].shape)
    uses_base = job.base is not None and bool(getattr(job.recipe, "uses_base", True))
    inputs = ([job.base] if uses_base else []) + models
    for i, t in enumerate(inputs):
        what = "base" if (uses_base and i == 0) else f"models[{i - int(uses_base)}]"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {job.name!r}: {what} is not a torch.Tensor")
        if t.device.type != "cpu":
            raise ValueError(
                f"tensor {job.name!r}: {what} is on {t.device}; gpu_merge_stream takes CPU inputs"
            )
        if t.dtype not in DTYPE_CODES:
            raise ValueError(
                f"tensor {job.name!r}: {what} has dtype {t.dtype}; float32, bfloat16 and "
                "float16 are merged (copy other tensors unchanged)"
            )
        if tuple(t.shape) != shape:
            raise ValueError(
                f"tensor {job.name!r}: {what} has shape {list(t.shape)}, models[0] has {list(shape)}"
            )
    if job.out_dtype not in DTYPE_CODES:
        raise ValueError(
            f"tensor {job.name!r}: out_dtype {job.out_dtype} is not float32, bfloat16 or float16"
        )
    offsets, pos = [], 0
    for t in inputs:
        offsets.append(pos)
        pos += _aligned(_nbytes(t))
    numel = models[0].numel()
    out_bytes = _aligned(numel * torch.empty((), dtype=job.out_dtype).element_size())
    return _Plan(job, inputs, offsets, pos, out_bytes, shape)


def _direct(t: torch.Tensor) -> bool:
    """Inputs the upload can read in place: already pinned and contiguous."""
    return t.is_contiguous() and t.is_pinned()


def _oom_error(plan: _Plan, device: torch.device, exc: BaseException) -> RuntimeError:
    need = plan.in_bytes + plan.out_bytes
    try:
        free, total = _cuda.mem_get_info(device)
        where = f"{free} bytes are free of {total} on {device}"
    except Exception:  # the context itself may be unusable after some failures
        where = f"device {device}"
    return RuntimeError(
        f"gpu_merge_stream: not enough GPU memory for {plan.describe()}: it needs {need} bytes "
        f"({plan.in_bytes} for the inputs + {plan.out_bytes} for the output) plus stage A scratch; "
        f"{where}. Merge this tensor with the cpu backend or free GPU memory. ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''})"
    )


def _pinned(nbytes: int, what: str) -> torch.Tensor:
    try:
        return _pinned_empty((max(nbytes, 1),), torch.uint8)
    except RuntimeError as exc:
        raise RuntimeError(
            f"gpu_merge_stream: could not allocate {nbytes} bytes of pinned host memory for {what}: {exc}"
        ) from exc


def _stage(slot: _Slot, plan: _Plan) -> None:
    """Background thread: copy the job's inputs into the slot's pinned staging buffer."""
    if all(_direct(t) for t in plan.inputs):
        return
    if slot.used:
        slot.h2d_done.synchronize()  # the previous upload from this buffer has finished
    if slot.host_in is None or slot.host_in.numel() < plan.in_bytes:
        slot.host_in = None
        slot.host_in = _pinned(plan.in_bytes, plan.describe())
    for t, off in zip(plan.inputs, plan.offsets):
        if not _direct(t):
            view = slot.host_in[off : off + _nbytes(t)].view(t.dtype).view(t.shape)
            view.copy_(t)


class _Pipeline:
    def __init__(self, device: torch.device, backend, depth: int):
        self.device = device
        self.backend = backend
        self.slots = [_Slot() for _ in range(depth)]
        self.h2d = _cuda.Stream(device)
        self.compute = _cuda.Stream(device)
        self.d2h = _cuda.Stream(device)

    def reserve(self, slot: _Slot, plan: _Plan) -> None:
        """Grow the slot's device buffers to fit the plan (one retry after releasing the others)."""
        if (
            slot.dev_in is not None
            and slot.dev_in.numel() >= plan.in_bytes
            and slot.dev_out is not None
            and slot.dev_out.numel() >= plan.out_bytes
        ):
            return
        slot.release_device()
        for attempt in (0, 1):
            try:
                slot.dev_in = _device_bytes(plan.in_bytes, self.device)
                slot.dev_out = _device_bytes(plan.out_bytes, self.device)
                return
            except _cuda.OutOfMemoryError as exc:
                slot.dev_in = slot.dev_out = None
                if attempt:
                    raise _oom_error(plan, self.device, exc) from None
                for other in self.slots:
                    other.release_device()
                _cuda.empty_cache()

    def launch(self, slot: _Slot, plan: _Plan):
        """Queue upload, merge and download of one staged job; returns (pinned result, done event)."""
        job = plan.job
        views = []
        with _cuda.stream(self.h2d):
            if slot.used:
                self.h2d.wait_event(slot.compute_done)  # the previous merge no longer reads dev_in
            staged = [not _direct(t) for t in plan.inputs]
            if any(staged):
                end = max(off + _nbytes(t) for t, off, s in zip(plan.inputs, plan.offsets, staged) if s)
                slot.dev_in[:end].copy_(slot.host_in[:end], non_blocking=True)
            for t, off, s in zip(plan.inputs, plan.offsets, staged):
                view = slot.dev_in[off : off + _nbytes(t)].view(t.dtype).view(t.shape)
                if not s:
                    view.copy_(t, non_blocking=True)
                views.append(view)
            slot.h2d_done.record(self.h2d)
        uses_base = len(views) == len(job.models) + 1
        base = views[0] if uses_base else None
        models = views[1:] if uses_base else views
        out = slot.dev_out[: plan.out_bytes].view(job.out_dtype)[: models[0].numel()].view(plan.shape)
        with _cuda.stream(self.compute):
            self.compute.wait_event(slot.h2d_done)
            if slot.used:
                self.compute.wait_event(slot.d2h_done)  # the previous result has left dev_out
            try:
                merge_job(job.with_inputs(base, models), self.backend, out)
            except _cuda.OutOfMemoryError as exc:
                raise _oom_error(plan, self.device, exc) from None
            slot.compute_done.record(self.compute)
        try:
            result = _pinned_empty(plan.shape, job.out_dtype)
        except RuntimeError as exc:
            raise RuntimeError(
                f"gpu_merge_stream: could not allocate pinned host memory for the result "
                f"of {plan.describe()}: {exc}"
            ) from exc
        with _cuda.stream(self.d2h):
            self.d2h.wait_event(slot.compute_done)
            result.copy_(out, non_blocking=True)
            slot.d2h_done.record(self.d2h)
            done = _cuda.Event()
            done.record(self.d2h)
        slot.used = True
        return result, done

    def synchronize(self) -> None:
        for s in (self.h2d, self.compute, self.d2h):
            s.synchronize()


def _run(jobs: Iterable[MergeJob], pipe: _Pipeline, depth: int) -> Iterator[tuple[MergeJob, torch.Tensor]]:
    pending: collections.deque = collections.deque()  # (job, result, done event or None), job order
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3k-stage")
    it = iter(jobs)
    count = 0

    def submit():
        """Plan the next job and start staging it: (plan, slot, future, error), or None at the end."""
        nonlocal count
        try:
            job = next(it)
        except StopIteration:
            return None
        try:
            plan = _plan(job)
            slot = pipe.slots[count % depth]
            count += 1
            if plan.inputs[0].numel() == 0:
                return plan, slot, None, None
            pipe.reserve(slot, plan)  # device memory first: an OOM stages nothing
            return plan, slot, executor.submit(_stage, slot, plan), None
        except Exception as exc:  # reported in job order, after the jobs before it
            return None, None, None, exc

    def drain(keep: int):
        while len(pending) > keep:
            job, result, done = pending.popleft()
            if done is not None:
                done.synchronize()
            yield job, result

    try:
        with _cuda.device(pipe.device):
            staged = submit()
            while staged is not None:
                plan, slot, future, error = staged
                try:
                    if error is not None:
                        raise error
                    if future is None:  # zero elements: nothing to move
                        pending.append((plan.job, torch.empty(plan.shape, dtype=plan.job.out_dtype), None))
                    else:
                        future.result()
                        result, done = pipe.launch(slot, plan)
                        pending.append((plan.job, result, done))
                except Exception:
                    yield from drain(0)  # deliver the jobs before the failing one, then fail
                    raise
                staged = submit()  # the next job stages while this one is merged
                yield from drain(depth - 1 if staged is not None else 0)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        try:
            pipe.synchronize()
        except Exception:  # keep the original error
            pass


def gpu_merge_stream(
    jobs: Iterable[MergeJob], device="cuda", backend: str = "auto", depth: int = 2
) -> Iterator[tuple[MergeJob, torch.Tensor]]:
    """Merge ``jobs`` on a CUDA device, overlapping transfers with kernels; yields in job order.

    ``device``: a CUDA device ("cuda", "cuda:1", torch.device); ``backend``: "auto" (cuda, else
    triton), "cuda" or "triton"; ``depth``: tensor sets in flight on the device (>= 1; 2 gives
    upload/compute/download overlap). Yields ``(job, result)`` with ``result`` a pinned CPU tensor
    the caller owns. Raises ``RuntimeError`` here if no CUDA device is usable.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"gpu_merge_stream runs on a CUDA device, got device={device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"gpu_merge_stream needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "merge on the CPU instead"
        )
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"gpu_merge_stream: {dev} does not exist ({torch.cuda.device_count()} CUDA devices)"
        )
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    be = get_backend(backend, dev)
    return _run(jobs, _Pipeline(dev, be, depth), depth)


__all__ = ["gpu_merge_stream"]
