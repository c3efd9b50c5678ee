"""``merge_checkpoints``: stream a whole-checkpoint merge tensor by tensor, with bounded memory.

The flow (SPEC §5, issue 3):

1. load the config, open and validate every input (headers checked, nothing read yet);
2. build the plan (:mod:`m3kernels.checkpoint.plan`): tensors, shapes, dtypes, shards; ``dry_run``
   stops here and returns it;
3. ``trim_scope: model``: a statistics pass sums the per-tensor magnitude histograms of every
   tensor into whole-model trim thresholds (one float per model);
4. the merge pass: the kernels merge tensor t (GIL released) while a helper thread asks the OS
   to read ahead tensors t+1.. (``MADV_WILLNEED``) and the writer thread writes tensor t−1;
   each input tensor is a zero-copy view of a memory-mapped file, and its pages are dropped
   (``MADV_DONTNEED``) once it is merged, so resident memory is a few tensors, whatever the
   model size. ``device="cuda"`` feeds the same tensors to :func:`gpu_merge_stream`;
5. the finished folder (shards, index, config.json, tokenizer files, ``m3kernels_merge.yaml``)
   is fsynced and renamed into place (:mod:`m3kernels.checkpoint.writer`).

Every tensor is computed exactly as ``merge_tensors(base, models, method=..., **tensor_kwargs,
mix_ratios=<one draw per merge>, seed=seed, name=name, out_dtype=...)`` would compute it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import yaml

from m3kernels import __version__
from m3kernels.api import merge_tensors, prepare
from m3kernels.backends import get_backend
from m3kernels.checkpoint.source import Checkpoint
from m3kernels.checkpoint.config import MergeConfig, load_config, parse_config, read_config_source
from m3kernels.errors import M3KError, OutputExistsError
from m3kernels.checkpoint.job import MergeJob
from m3kernels.merge.kernel_params import HIST_BINS, trim_k
from m3kernels.checkpoint.plan import COPY, VOCAB, MergePlan, PlannedTensor, build_plan, shard_filenames
from m3kernels.merge.select import bits_to_float, select_thresholds
from m3kernels.checkpoint.writer import (Journal, ShardedWriter, copy_file_durably, fsync_dir, make_temp_dir, partial_runs,
                     publish, write_file_durably)

log = logging.getLogger("m3kernels")

DEFAULT_SHARD_SIZE = 5 * 2**30
PREFETCH_BYTES = 1 << 30      # how far ahead (input bytes) the read-ahead hints reach
RECORD_FILE = "m3kernels_merge.yaml"
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
CRASH_ENV = "M3KERNELS_TEST_CRASH_AFTER_SHARDS"   # test hook: SIGKILL ourselves after N shards


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


@dataclass
class MergeResult:
    """What a finished merge did."""

    out_dir: Path
    files: list                       # shard file names
    num_tensors: int
    total_bytes: int
    seconds: float
    device: str
    mix_ratios: Optional[tuple]
    seed: int
    thresholds: Optional[list]        # whole-model trim thresholds (trim_scope: model)
    resumed_shards: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        rate = self.total_bytes / self.seconds if self.seconds > 0 else 0.0
        lines = [f"merged {self.num_tensors} tensors ({human_bytes(self.total_bytes)}) into {self.out_dir} "
                 f"[{len(self.files)} shard(s)] on {self.device} in {self.seconds:.1f} s "
                 f"({human_bytes(rate)}/s)"]
        if self.mix_ratios is not None:
            lines.append("M³ ratios: " + ", ".join(f"{r:.6f}" for r in self.mix_ratios) + f" (seed {self.seed})")
        if self.thresholds is not None:
            lines.append("model-wide trim thresholds: " + ", ".join(f"{t:.6g}" for t in self.thresholds))
        if self.resumed_shards:
            lines.append(f"resumed: reused {len(self.resumed_shards)} finished shard(s)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- inputs
def _load_config(config, seed: Optional[int]) -> tuple[MergeConfig, Optional[Path]]:
    """The config (with ``seed`` overriding its seed) and the folder relative paths may refer to."""
    cfg_dir = None
    if isinstance(config, (str, os.PathLike)) and "\n" not in os.fspath(config) and Path(config).is_file():
        cfg_dir = Path(config).resolve().parent
    if isinstance(config, MergeConfig):
        cfg = config
        if seed is not None:
            cfg = parse_config({**cfg.raw, "seed": seed})
    elif seed is not None:
        cfg = parse_config({**read_config_source(config), "seed": seed})
    else:
        cfg = load_config(config)
    return cfg, cfg_dir


def _resolve_model_path(path: str, cfg_dir: Optional[Path]) -> Path:
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and cfg_dir is not None and (cfg_dir / p).exists():
        return cfg_dir / p  # relative to the config file when not relative to the working directory
    return p


def open_inputs(cfg: MergeConfig, cfg_dir: Optional[Path], allow_bin: bool):
    """(base checkpoint or None, [model checkpoints]); a path listed twice is opened once."""
    opened: dict = {}

    def get(path: str, role: str) -> Checkpoint:
        p = _resolve_model_path(path, cfg_dir)
        key = str(p.resolve())
        if key not in opened:
            opened[key] = Checkpoint(p, role=role, allow_bin=allow_bin)
        return opened[key]

    base = get(cfg.base_model, "base") if cfg.base_model is not None else None
    models = [get(m, f"model {i + 1}") for i, m in enumerate(cfg.models)]
    return base, models, list(opened.values())


def _check_out_dir(out_dir: Path, force: bool, inputs: list) -> None:
    real = out_dir.resolve()
    for ck in inputs:
        root = ck.root.resolve()
        if real == root or real in root.parents:
            raise OutputExistsError(f"{out_dir}: the output folder would replace the input {ck.label}",
                                    path=str(out_dir))
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise OutputExistsError(f"{out_dir} already exists; choose another folder or pass --force "
                                f"(force=True) to replace it", path=str(out_dir))


def resolve_device(device: str, backend: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU and a GPU backend are there, else cpu; checks a backend exists."""
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            try:
                get_backend(backend, torch.device("cuda"))
                device = "cuda"
            except (RuntimeError, ValueError) as exc:
                log.warning("a GPU is present but no GPU backend works (%s); merging on the CPU", exc)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise M3KError(f"device {device!r} is not one of cpu, cuda, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise M3KError("device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise M3KError(f"device {device!r} is not one of cpu, cuda, auto")
    try:
        get_backend(backend, dev)
    except (RuntimeError, ValueError) as exc:
        raise M3KError(f"no m3kernels backend for {dev}: {exc}") from None
    return dev


# ---------------------------------------------------------------------------------------- record
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_record(plan: MergePlan, out_shard_size: int) -> dict:
    """The merge as run: what ``m3kernels_merge.yaml`` and every shard header hold."""
    cfg = plan.config

    def inputs_of(ck: Checkpoint) -> dict:
        return {"path": str(ck.path.resolve()), "files": [{"name": f["name"], "bytes": f["bytes"]}
                                                          for f in ck.files()]}

    return {
        "m3kernels_version": __version__,
        "merge_method": cfg.method,
        "seed": plan.seed,
        "mix_ratios": None if plan.mix_ratios is None else [float(r) for r in plan.mix_ratios],
        "mixup": cfg.mixup,
        "trim_scope": cfg.trim_scope,
        "model_trim_thresholds": None,
        "out_dtype": _dtype_name(plan.out_dtype),
        "out_shard_size": out_shard_size,
        "config": cfg.raw,
        "inputs": {"base": inputs_of(plan.base) if plan.base is not None else None,
                   "models": [inputs_of(m) for m in plan.models]},
        "notes": list(plan.notes),
    }


def fingerprint(plan: MergePlan, record: dict) -> str:
    """Hash of everything the output bytes depend on (config, inputs, plan), for --resume."""
    inputs = [plan.base] if plan.base is not None else []
    inputs += plan.models
    obj = {
        "record": record,
        "stamps": [ck.file_stamps() for ck in inputs],
        "plan": [(t.name, t.action, list(t.shape), str(t.out_dtype), t.shard, t.common_rows)
                 for t in plan.tensors],
        "shards": [s.filename for s in plan.shards],
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def header_metadata(record: dict) -> dict:
    return {"format": "pt", "m3kernels_version": __version__,
            "m3kernels_merge": json.dumps(record, default=str, separators=(",", ":"))}


# ---------------------------------------------------------------------------------------- compute
class Prefetcher:
    """Asks the OS to read ahead the inputs of the next tensors, up to PREFETCH_BYTES, in a thread."""

    def __init__(self, tensors: list, budget: int = PREFETCH_BYTES):
        self.tensors = tensors
        self.budget = budget
        self.next = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3k-prefetch")

    def advance(self, current: int) -> None:
        ahead = 0
        i = current + 1
        while i < len(self.tensors) and (i == current + 1 or ahead < self.budget):
            t = self.tensors[i]
            ahead += sum(s.meta.nbytes for s in t.sources())
            if i >= self.next:
                self.pool.submit(t.prefetch)
                self.next = i + 1
            i += 1

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class BufferPool:
    """Reusable output buffers: the merge writes into one, the writer hands it back when written.

    Fresh large allocations are fresh pages, and filling fresh pages costs a page fault each;
    reusing a few buffers (the writer is usually idle, so two: one merged, one written) avoids
    that without holding more memory than the pipeline needs anyway.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.free: list = []
        self.lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype):
        """(tensor of ``shape``/``dtype`` on a pooled buffer, callback returning the buffer)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fits:
                buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
            else:  # none is large enough: free the small ones before allocating a larger one
                buf = None
                self.free.clear()
        if buf is None:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(dtype).reshape(shape), lambda: self._give_back(buf)

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


def merge_one(pt: PlannedTensor, plan: MergePlan, backend: str, thresholds,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One output tensor on the CPU, exactly as merge_tensors computes it (into ``out`` if given)."""
    b, ms = pt.inputs()
    if out is None:
        out = torch.empty(pt.shape, dtype=pt.out_dtype)
    kw = dict(method=plan.config.method, **pt.kwargs, mix_ratios=plan.mix_ratios, seed=plan.seed,
              name=pt.name, out_dtype=pt.out_dtype, backend=backend, thresholds=thresholds)
    if pt.action != VOCAB:
        return merge_tensors(b, ms, out=out, **kw)
    merge_tensors(b, ms, out=out[:pt.common_rows], **kw)
    fill_extra_rows(pt, out)
    return out


def produce_cpu(plan: MergePlan, todo: list, backend: str, thresholds) -> Iterator:
    """(planned tensor, output tensor, callback after writing) in write order, merged on the CPU."""
    pre = Prefetcher(todo)
    pool = BufferPool()
    try:
        for k, pt in enumerate(todo):
            pre.advance(k)
            if pt.action == COPY:
                yield pt, pt.models[0].tensor(), pt.release
                continue
            out, give_back = pool.take(pt.shape, pt.out_dtype)
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
            b, ms = pt.inputs()
            yield MergeJob(pt.name, b, ms, pt.out_dtype, pt.recipe,
                           thresholds=thresholds, meta={"planned": pt})

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
                full[:pt.common_rows] = out
                fill_extra_rows(pt, full)
                out = full
            pt.release()
            yield pt, out, give_back  # a fresh pinned tensor we own (or a pooled one)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        pre.close()


def model_thresholds(plan: MergePlan, device: torch.device, backend: str, progress: bool) -> list:
    """``trim_scope: model``: exact whole-model trim thresholds from histograms summed over tensors."""
    from tqdm import tqdm

    pts = [pt for pt in plan.tensors if pt.action != COPY and pt.merged_numel > 0]
    if not pts:
        return []
    recipe = pts[0].recipe
    n = recipe.n
    if recipe.trim_density is None:
        return [None] * n
    total = sum(pt.merged_numel for pt in pts)
    ks = [trim_k(d, total) for d in recipe.trim_density]
    be = get_backend(backend, device)
    bar = tqdm(total=2 * sum(pt.merged_numel for pt in pts), desc="statistics", unit="el", unit_scale=True,
               disable=not progress, leave=False)

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
        return acc

    try:
        bits = select_thresholds(hist, ks, total)
    finally:
        bar.close()
    return [bits_to_float(int(x)) for x in bits]


# ---------------------------------------------------------------------------------------- output
def write_side_files(tmp: Path, plan: MergePlan, record: dict) -> None:
    """Index, config.json, tokenizer/generation files and the merge record, each fsynced."""
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {t.name: plan.shards[t.shard].filename for t in sorted(plan.tensors,
                                                                                      key=lambda t: t.name)}}
        write_file_durably(tmp / INDEX_FILE, json.dumps(index, indent=2).encode())
    src = plan.config_source
    if src.config is not None:
        conf = dict(src.config)
        conf["torch_dtype"] = _dtype_name(plan.out_dtype)
        if "dtype" in conf:  # newer transformers write "dtype" instead of "torch_dtype"
            conf["dtype"] = _dtype_name(plan.out_dtype)
        if plan.untied_head:
            conf["tie_word_embeddings"] = False
        if plan.out_vocab_rows is not None and "vocab_size" in conf:
            conf["vocab_size"] = plan.out_vocab_rows
        write_file_durably(tmp / "config.json", (json.dumps(conf, indent=2) + "\n").encode())
    if src.path.is_dir():
        for name in COPIED_FILES:
            if (src.root / name).is_file():
                copy_file_durably(src.root / name, tmp / name)
    text = "# The merge as run by m3kernels (also in every shard header's __metadata__).\n"
    text += yaml.safe_dump(json.loads(json.dumps(record, default=str)), sort_keys=False, allow_unicode=True)
    write_file_durably(tmp / RECORD_FILE, text.encode("utf-8"))
    fsync_dir(tmp)


def _crash_hook():
    """Test hook: with M3KERNELS_TEST_CRASH_AFTER_SHARDS=N, die by SIGKILL after N finished shards."""
    limit = int(os.environ.get(CRASH_ENV, "0") or 0)
    count = [0]

    def after(shard):
        count[0] += 1
        if limit and count[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return after if limit else None


def _with_hint(exc: M3KError, hint: str) -> M3KError:
    return type(exc)(str(exc) + hint, path=exc.path, tensor=exc.tensor)


def run_merge(plan: MergePlan, out_dir: Path, *, device: torch.device, backend: str, out_shard_size: int,
              force: bool, resume: bool, progress: bool) -> MergeResult:
    """Steps 3-5 of the module docstring for a built plan."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    for note in plan.notes:
        log.warning(note)
    record = make_record(plan, out_shard_size)
    fp = fingerprint(plan, record)
    partial = partial_runs(out_dir)
    tmp, journal, done = None, None, set()
    if resume:
        for folder, j in partial:
            if j.fingerprint == fp:
                tmp, journal = folder, j
                break
        if tmp is None:
            log.warning("--resume: no unfinished run of this merge (same config and inputs) next to %s; "
                        "starting from the beginning", out_dir)
        else:
            good, bad = journal.verified_shards()
            for msg in bad:
                log.warning(msg)
            done = {s.index for s in plan.shards if s.filename in good}
            journal.save()
            log.info("resuming %s: %d of %d shards already written", tmp, len(done), len(plan.shards))
    else:
        for folder, j in partial:
            if j.fingerprint == fp:
                log.warning("an unfinished run of this same merge is in %s; --resume would continue it", folder)
    if tmp is None:
        tmp = make_temp_dir(out_dir)
        journal = Journal(tmp, fp)
        journal.save()
    hint = f"; the unfinished merge is kept in {tmp}: fix the cause and rerun with --resume"

    try:
        thresholds = None
        if plan.config.trim_scope == "model":
            thresholds = journal.data["extra"].get("thresholds")
            if thresholds is None:
                thresholds = model_thresholds(plan, device, backend, progress)
                journal.data["extra"]["thresholds"] = thresholds
                journal.save()
        record["model_trim_thresholds"] = thresholds
        todo = [t for s in plan.shards if s.index not in done for t in s.tensors]
        bar = tqdm(total=plan.total_bytes, initial=plan.total_bytes - sum(t.nbytes for t in todo),
                   desc="merging", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        count = [len(plan.tensors) - len(todo)]

        def written(pt):
            count[0] += 1
            bar.update(pt.nbytes)
            bar.set_postfix_str(f"{count[0]}/{len(plan.tensors)} tensors", refresh=False)

        writer = ShardedWriter(tmp, plan.shards, header_metadata(record), journal, skip=done,
                               on_written=written, after_shard=_crash_hook())
        stream = None
        try:
            if device.type == "cpu":
                stream = produce_cpu(plan, todo, backend, thresholds)
            else:
                stream = produce_gpu(plan, todo, device, backend, thresholds)
            for pt, out, after in stream:
                writer.put(pt, out, after)
            writer.close()
        except BaseException:
            if stream is not None:
                stream.close()  # runs the producer's cleanup: its read-ahead thread stops now
            writer.abort()
            raise
        finally:
            bar.close()
        write_side_files(tmp, plan, record)
        publish(tmp, out_dir, force)
    except OutputExistsError:
        raise
    except M3KError as exc:
        raise _with_hint(exc, hint) from None
    return MergeResult(out_dir, [s.filename for s in plan.shards], len(plan.tensors), plan.total_bytes,
                       time.perf_counter() - t0, str(device), plan.mix_ratios, plan.seed, thresholds,
                       [plan.shards[i].filename for i in sorted(done)], list(plan.notes))


def merge_checkpoints(config, out_dir, *, device: str = "auto", out_shard_size: int = DEFAULT_SHARD_SIZE,
                      force: bool = False, resume: bool = False, seed: Optional[int] = None,
                      progress: bool = True, dry_run: bool = False, allow_bin: bool = False,
                      backend: str = "auto"):
    """Merge the checkpoints a config names into ``out_dir`` (HF layout, sharded safetensors).

    ``config``: a YAML path, YAML text, dict or MergeConfig. ``seed`` overrides the config's.
    ``dry_run``: validate the config and every input, return the :class:`MergePlan`, write
    nothing. Otherwise returns a :class:`MergeResult`. User-fixable problems raise
    :class:`~m3kernels.errors.M3KError` (or the config's ``MergeConfigError``).
    """
    if isinstance(out_shard_size, bool) or not isinstance(out_shard_size, int) or out_shard_size < 1:
        raise M3KError(f"out_shard_size must be a positive number of bytes, got {out_shard_size!r}")
    cfg, cfg_dir = _load_config(config, seed)
    out_dir = Path(out_dir).expanduser().absolute()
    base, models, opened = open_inputs(cfg, cfg_dir, allow_bin)
    try:
        _check_out_dir(out_dir, force, opened)
        plan = build_plan(cfg, base, models, out_shard_size)
        if dry_run:
            return plan
        dev = resolve_device(device, backend)
        return run_merge(plan, out_dir, device=dev, backend=backend, out_shard_size=out_shard_size,
                         force=force, resume=resume, progress=progress)
    finally:
        for ck in opened:
            ck.close()


__all__ = ["merge_checkpoints", "MergeResult", "DEFAULT_SHARD_SIZE", "RECORD_FILE", "make_record",
           "resolve_device", "fill_extra_rows", "merge_one", "model_thresholds", "shard_filenames"]
