"""Producers of merged tensors for the writer, in write order: on the CPU (kernels in this
process, read-ahead hints in a helper thread) or through the GPU pipeline.

Each yields ``(planned tensor, output tensor, callback once written)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from m3kernels.api import merge_job, merge_tensors, prepare, thresholds_to_bits
from m3kernels.backends import get_backend
from m3kernels.checkpoint.plan import COPY, MERGE, VOCAB, MergePlan, PlannedTensor
from m3kernels.checkpoint.writer import DIRECT_ALIGN, QUEUE_BYTES, TensorPart, output_offset
from m3kernels.gc_policy import frozen_heap
from m3kernels.merge import methods
from m3kernels.merge.job import MergeJob
from m3kernels.merge.kernel_params import make_params, trim_k
from m3kernels.merge.philox import dare_key

log = logging.getLogger("m3kernels")


PREFETCH_BYTES = 1 << 30  # how far ahead (input bytes) the read-ahead hints reach
BATCH_NUMEL = 1 << 14  # consecutive tensors of at most this many elements are merged ...
BATCH_BYTES = 4 << 20  # ... in batches of at most this many output bytes, one kernel call each
PART_BYTES = 32 << 20  # stage B of larger tensors runs in parts of this many output bytes (a
# multiple of DIRECT_ALIGN and of 1024 elements), each written as it is done


class Prefetcher:
    """Asks the OS to read ahead the inputs of the next tensors, up to PREFETCH_BYTES, in a thread.

    The window is read off prefix sums of the tensors' input bytes (computed once), and only the
    tensors that enter it are looked at, handed to the thread as one job: O(1) amortised per
    tensor, whatever the tensor count.
    """

    def __init__(self, tensors: list, budget: int = PREFETCH_BYTES):
        self.tensors = tensors
        self.budget = budget
        self.next = 0
        ends = [0]  # ends[i]: input bytes of tensors[:i]
        for t in tensors:
            ends.append(ends[-1] + sum(s.meta.nbytes for s in t.sources()))
        self.ends = ends
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3k-prefetch")

    def advance(self, current: int) -> None:
        """Read ahead tensor current + 1 and those after it while the ones before hold < budget bytes."""
        first = current + 1
        count = len(self.tensors)
        if first >= count:
            return
        limit = self.ends[first] + self.budget
        end = max(self.next, first + 1)  # the window only grows: what was in it stays in it
        while end < count and self.ends[end] < limit:
            end += 1
        start = max(self.next, first)
        if start < end:
            self.pool.submit(_prefetch_all, self.tensors[start:end])
            self.next = end

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _prefetch_all(tensors: list) -> None:
    for t in tensors:
        t.prefetch()


def _page_aligned(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of ``nbytes`` on fresh page-aligned memory (an anonymous map;
    transparent huge pages asked for, which makes filling it cheaper)."""
    m = mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the map alive


class BufferPool:
    """Reusable output buffers: the merge writes into one, the writer hands it back when written.

    Fresh large allocations are fresh pages, and filling fresh pages costs a page fault each;
    reusing a few buffers (the writer is usually idle, so two: one merged, one written) avoids
    that without holding more memory than the pipeline needs anyway. Buffers are page-aligned,
    and ``take(..., phase=p)`` puts the tensor p bytes past a page boundary: with p = its file
    offset modulo DIRECT_ALIGN (:func:`~m3kernels.checkpoint.writer.output_offset`) the writer
    sends its whole pages from this memory to the file (``O_DIRECT``), with no staging copy.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.free: list = []
        self.lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype, phase: int = 0):
        """(tensor of ``shape``/``dtype`` on a pooled buffer, starting ``phase`` bytes past a page
        boundary, and a callback returning the buffer)."""
        nbytes = math.prod(shape) * dtype.itemsize
        phase = int(phase) % DIRECT_ALIGN if nbytes else 0
        phase -= phase % dtype.itemsize  # keep the elements aligned (the kernels need no more)
        need = nbytes + phase
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= need]
            if fits:
                buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
            else:  # none is large enough: free the small ones before allocating a larger one
                buf = None
                self.free.clear()
        if buf is None:
            buf = _page_aligned(need + DIRECT_ALIGN)  # room for any phase when it is reused
        return buf[phase : phase + nbytes].view(dtype).reshape(shape), lambda: self._give_back(buf)

    def _give_back(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buf)
            if len(self.free) > self.keep:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


def fill_extra_rows(pt: PlannedTensor, out: torch.Tensor) -> None:
    """VOCAB rows past the common ones: float32 mean of the models that have them (else the base's)."""
    bounds = sorted({pt.common_rows, pt.shape[0]} | {s.meta.shape[0] for s in pt.sources()})
    for lo, hi in zip(bounds, bounds[1:]):
        if lo < pt.common_rows:
            continue
        donors = [s for s in pt.models if s.meta.shape[0] >= hi] or [pt.fallback]
        acc = donors[0].tensor()[lo:hi].to(torch.float32)
        for s in donors[1:]:
            acc = acc + s.tensor()[lo:hi].to(torch.float32)
        if len(donors) > 1:
            acc = acc / len(donors)
        out[lo:hi] = acc


def _merge_tensors(pt: PlannedTensor, b, ms, out: torch.Tensor, kw: dict) -> torch.Tensor:
    """``merge_tensors(b, ms, out=out, **kw)``. The plan made ``pt.recipe`` by ``make_recipe`` from
    these same arguments, so it is used as it is (resolving it again, and checking tensors the plan
    already checked, would cost more than the merge of a small tensor); anything unusual takes
    ``merge_tensors`` itself."""
    r, th = pt.recipe, kw["thresholds"]
    if (
        r is None
        or out.numel() == 0
        or (th is not None and (r.trim_density is None or len(th) != r.n))
        or not all(m.is_contiguous() for m in ms)
        or (b is not None and not b.is_contiguous())
    ):
        return merge_tensors(b, ms, out=out, **kw)
    return merge_job(
        MergeJob(pt.name, b, ms, pt.out_dtype, r, thresholds=th), get_backend(kw["backend"], out.device), out
    )


def _in_parts(pt: PlannedTensor, be, thresholds) -> bool:
    """Whether ``pt`` is merged part by part (:func:`_merge_parts`): a plain MERGE tensor of at least
    two parts, on a backend with ``merge_range``, on the fast path of :func:`_merge_tensors`."""
    r = pt.recipe
    if (
        pt.action != MERGE
        or r is None
        or pt.nbytes < 2 * PART_BYTES
        or not hasattr(be, "merge_range")
        or (thresholds is not None and (r.trim_density is None or len(thresholds) != r.n))
        or (getattr(r, "family", None) is not None and thresholds is not None)
        or getattr(r, "family", None) == "passthrough"  # a copy: no kernel pass to split
    ):
        return False
    return all(s.meta.dtype in (torch.float32, torch.bfloat16, torch.float16) for s in pt.sources())


def _merge_parts(pt: PlannedTensor, be, thresholds, pool: BufferPool) -> Iterator:
    """Stage A on the whole tensor, then stage B in parts of PART_BYTES output bytes, each into a
    pooled buffer at the tensor's page phase: yields ``(TensorPart, give_back)``. The bytes are
    those of one merge (the DARE stream is taken at each element's flat index)."""
    b, ms = pt.inputs()
    if not all(m.is_contiguous() for m in ms) or (b is not None and not b.is_contiguous()):
        b = b.contiguous() if b is not None else None
        ms = [m.contiguous() for m in ms]
    if getattr(pt.recipe, "family", None) is not None:  # the method's own stage A (merge/methods)
        st = methods.stage(b, ms, pt.recipe, pt.name, be)
        p, bb, ms = st.params, st.base, list(st.models)
    else:
        p, bb = prepare(b, ms, pt.recipe, pt.name, be, thresholds)
    flat_b = bb.reshape(-1) if bb is not None else None
    flat_ms = [m.reshape(-1) for m in ms]
    numel, size = pt.numel, pt.out_dtype.itemsize
    step = PART_BYTES // size
    phase = output_offset(pt) or 0
    for lo in range(0, numel, step):
        hi = min(numel, lo + step)
        out, give_back = pool.take((hi - lo,), pt.out_dtype, phase=phase)
        be.merge_range(p, flat_b[lo:hi] if flat_b is not None else None, [m[lo:hi] for m in flat_ms], out, lo)
        if hi == numel:
            pt.release()
        yield TensorPart(out, lo * size, hi == numel), give_back


def merge_one(
    pt: PlannedTensor, plan: MergePlan, backend: str, thresholds, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One output tensor on the CPU, exactly as merge_tensors computes it (into ``out`` if given)."""
    b, ms = pt.inputs()
    if out is None:
        out = torch.empty(pt.shape, dtype=pt.out_dtype)
    kw = dict(
        method=plan.config.method,
        **pt.kwargs,
        mix_ratios=plan.mix_ratios,
        seed=plan.seed,
        name=pt.name,
        out_dtype=pt.out_dtype,
        backend=backend,
        thresholds=thresholds,
    )
    if pt.action != VOCAB:
        return _merge_tensors(pt, b, ms, out, kw)
    _merge_tensors(pt, b, ms, out[: pt.common_rows], kw)
    fill_extra_rows(pt, out)
    return out


def _batch_key(pt: PlannedTensor):
    """What tensors merged in one batch share (None: merged alone): small MERGE tensors with equal
    recipes (no L1 rescale: its scale is a per-tensor stage-A sum) and dtypes."""
    r = pt.recipe
    if pt.action != MERGE or r is None or r.rescale == "l1" or not 0 < pt.numel <= BATCH_NUMEL:
        return None
    if getattr(r, "family", None) is not None:  # its own stage A (m3kernels.merge.methods): alone
        return None
    if r.get("trim_ties", "all") == "k":  # per-tensor tie prefixes: merge_batch refuses them
        return None
    return (
        r,
        pt.out_dtype,
        pt.base.meta.dtype if pt.base is not None else None,
        tuple(s.meta.dtype for s in pt.models),
    )


def _merge_batch(batch: list, be, thresholds) -> list | None:
    """Merge small tensors with one ``be.merge_batch`` call, each exactly as ``merge_tensors`` would
    (stage A: the exact per-tensor k-th largest bits(|δ'|), or the given whole-model thresholds;
    DARE keys per tensor name). Returns the outputs, views of one new buffer; None when an input
    has no plain address (a .bin file, misaligned data): then merge them one by one."""
    pt0 = batch[0]
    r = pt0.recipe
    has_base = pt0.base is not None and r.uses_base
    p = make_params(r, pt0.name, has_base)
    base_ptrs, model_ptrs, numels, ks, key0, key1 = [], [], [], [], [], []
    trim = r.trim_density is not None and thresholds is None
    if r.trim_density is not None and thresholds is not None:
        p = p.with_trim(thresholds_to_bits(thresholds))
    for pt in batch:
        if has_base:
            base_ptrs.append(pt.base.ckpt.address(pt.base.name))
        model_ptrs.extend(s.ckpt.address(s.name) for s in pt.models)
        numel = pt.numel
        numels.append(numel)
        if trim:
            ks.extend(trim_k(d, numel) for d in r.trim_density)
        if r.dare_density is not None:
            for i in range(r.n):
                k0, k1 = dare_key(r.seed, pt.name, i)
                key0.append(k0)
                key1.append(k1)
    if None in model_ptrs or None in base_ptrs:
        return None
    buf = torch.empty(sum(numels), dtype=pt0.out_dtype)
    outs, out_ptrs, off = [], [], 0
    for pt, numel in zip(batch, numels):
        out = buf[off : off + numel].view(pt.shape)
        outs.append(out)
        out_ptrs.append(out.data_ptr())
        off += numel
    be.merge_batch(
        p,
        base_ptrs,
        pt0.base.meta.dtype if has_base else None,
        model_ptrs,
        [s.meta.dtype for s in pt0.models],
        numels,
        out_ptrs,
        pt0.out_dtype,
        ks if trim else None,
        key0 or None,
        key1 or None,
    )
    return outs


def produce_cpu(plan: MergePlan, todo: list, backend: str, thresholds) -> Iterator:
    """(planned tensor, output tensor, callback after writing) in write order, merged on the CPU.

    Runs of small tensors with the same recipe go to the kernels in batches (``merge_batch``, one
    call per BATCH_BYTES of output) when the backend has it: a checkpoint of tens of thousands of
    small tensors then costs a few microseconds of Python per tensor, not a kernel call each."""
    pre = Prefetcher(todo)
    pool = BufferPool()
    # parts: one being merged, one being written, QUEUE_BYTES of them queued, one spare
    parts = BufferPool(keep=QUEUE_BYTES // PART_BYTES + 3)
    be = get_backend(backend, torch.device("cpu"))
    batching = hasattr(be, "merge_batch")
    try:
        with frozen_heap():
            k, alone = 0, 0  # todo[k:alone] are merged one by one (their batch could not be)
            while k < len(todo):
                pt = todo[k]
                key = _batch_key(pt) if batching and k >= alone else None
                if key is not None:
                    end, size = k + 1, pt.nbytes
                    while end < len(todo) and size < BATCH_BYTES and _batch_key(todo[end]) == key:
                        size += todo[end].nbytes
                        end += 1
                    pre.advance(end - 1)
                    outs = _merge_batch(todo[k:end], be, thresholds)
                    if outs is not None:
                        for bt, out in zip(todo[k:end], outs):
                            bt.release()
                            yield bt, out, None
                        k = end
                        continue
                    alone = end
                pre.advance(k)
                k += 1
                if pt.action == COPY:
                    yield pt, pt.models[0].tensor(), pt.release
                    continue
                if _in_parts(pt, be, thresholds):
                    for part, give_back in _merge_parts(pt, be, thresholds, parts):
                        yield pt, part, give_back
                    continue
                out, give_back = pool.take(pt.shape, pt.out_dtype, phase=output_offset(pt) or 0)
                merge_one(pt, plan, backend, thresholds, out)
                pt.release()
                yield pt, out, give_back
    finally:
        pre.close()


def produce_gpu(plan: MergePlan, todo: list, device: torch.device, backend: str, thresholds) -> Iterator:
    """As :func:`produce_cpu`, with the merges run by :func:`gpu_merge_stream` on ``device``."""
    from m3kernels.checkpoint.gpu_pipeline import gpu_merge_stream  # lazily: needs a GPU stack

    merged = [pt for pt in todo if pt.action != COPY]
    pre = Prefetcher(merged)

    def jobs():
        for k, pt in enumerate(merged):
            pre.advance(k)
            yield pt.job(thresholds)

    stream = gpu_merge_stream(jobs(), device=str(device), backend=backend, depth=2)
    pool = BufferPool()
    try:
        for pt in todo:
            if pt.action == COPY:
                yield pt, pt.models[0].tensor(), pt.release
                continue
            job, out = next(stream)
            if job.meta.get("planned") is not pt:
                raise RuntimeError(f"GPU pipeline returned {job.name!r}, expected {pt.name!r}")
            give_back = None
            if pt.action == VOCAB:  # the common rows came from the GPU; add the others
                full, give_back = pool.take(pt.shape, pt.out_dtype)
                full[: pt.common_rows] = out
                fill_extra_rows(pt, full)
                out = full
            pt.release()
            yield pt, out, give_back  # a fresh pinned tensor we own (or a pooled one)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        pre.close()
