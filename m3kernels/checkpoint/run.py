"""``merge_checkpoints``: stream a whole-checkpoint merge tensor by tensor, with bounded memory.

The flow (docs/SPEC.md §5, issue 3):

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

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3kernels import gc_policy
from m3kernels.backends import get_backend
from m3kernels.checkpoint import DEFAULT_SHARD_SIZE  # re-exported
from m3kernels.checkpoint.distributed import (
    DEFAULT_TIMEOUT_S,
    assign_shards,
    launched_distributed,
    run_distributed,
)
from m3kernels.checkpoint.finite_check import check_finite_inputs
from m3kernels.checkpoint.inputs import config_and_folder, open_inputs
from m3kernels.checkpoint.model_stats import model_thresholds
from m3kernels.checkpoint.output_guard import OutputLock, check_out_dir
from m3kernels.checkpoint.plan import MergePlan, build_plan, shard_filenames
from m3kernels.checkpoint.produce import fill_extra_rows, merge_one, produce_cpu, produce_gpu
from m3kernels.checkpoint.record import (
    RECORD_FILE,
    fingerprint,
    header_metadata,
    make_record,
    write_side_files,
)
from m3kernels.checkpoint.writer import (
    Journal,
    ShardedWriter,
    make_temp_dir,
    partial_runs,
    publish,
    tidy_temp_folders,
)
from m3kernels.errors import M3KError, OutputExistsError

log = logging.getLogger("m3kernels")

CRASH_ENV = "M3KERNELS_TEST_CRASH_AFTER_SHARDS"  # test hook: SIGKILL ourselves after N shards


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
    files: list  # shard file names
    num_tensors: int
    total_bytes: int
    seconds: float
    device: str
    mix_ratios: tuple | None
    seed: int
    thresholds: list | None  # whole-model trim thresholds (trim_scope: model)
    resumed_shards: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        rate = self.total_bytes / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"merged {self.num_tensors} tensors ({human_bytes(self.total_bytes)}) into {self.out_dir} "
            f"[{len(self.files)} shard(s)] on {self.device} in {self.seconds:.1f} s "
            f"({human_bytes(rate)}/s)"
        ]
        if self.mix_ratios is not None:
            lines.append(
                "M³ ratios: " + ", ".join(f"{r:.6f}" for r in self.mix_ratios) + f" (seed {self.seed})"
            )
        if self.thresholds is not None:
            lines.append("model-wide trim thresholds: " + ", ".join(f"{t:.6g}" for t in self.thresholds))
        if self.resumed_shards:
            lines.append(f"resumed: reused {len(self.resumed_shards)} finished shard(s)")
        return "\n".join(lines)


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


def write_shards(
    plan: MergePlan,
    tmp: Path,
    journal: Journal,
    skip,
    todo: list,
    record: dict,
    device: torch.device,
    backend: str,
    thresholds,
    progress: bool,
    *,
    total_bytes: int | None = None,
    poll=None,
    producer=None,
) -> None:
    """Step 4: merge the tensors ``todo`` and write every shard not in ``skip`` into ``tmp``, each
    finished shard recorded in ``journal``. ``total_bytes``: what the progress bar counts to (the
    plan's bytes; a rank's share in a distributed merge). ``poll()`` (optional) is called after
    every tensor and may raise to stop the merge (the distributed merge: another rank failed).
    ``producer(todo, device)`` (optional) yields what produce_cpu would, in the same order (the
    fisher / regmean merge: m3kernels.checkpoint.data_aware_run)."""
    from tqdm import tqdm

    total = plan.total_bytes if total_bytes is None else total_bytes
    bar = tqdm(
        total=total,
        initial=total - sum(t.nbytes for t in todo),
        desc="merging",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    count = [len(plan.tensors) - len(todo)]

    def written(pt):
        count[0] += 1
        bar.update(pt.nbytes)
        bar.set_postfix_str(f"{count[0]}/{len(plan.tensors)} tensors", refresh=False)

    writer = ShardedWriter(
        tmp,
        plan.shards,
        header_metadata(record),
        journal,
        skip=skip,
        on_written=written,
        after_shard=_crash_hook(),
    )
    stream = None
    try:
        if producer is not None:
            stream = producer(todo, device)
        elif device.type == "cpu":
            stream = produce_cpu(plan, todo, backend, thresholds)
        else:
            stream = produce_gpu(plan, todo, device, backend, thresholds)
        for pt, out, after in stream:
            writer.put(pt, out, after)
            if poll is not None:
                poll()
        writer.close()
    except BaseException:
        if stream is not None:
            stream.close()  # runs the producer's cleanup: its read-ahead thread stops now
        writer.abort()
        raise
    finally:
        bar.close()


def record_and_fingerprint(plan: MergePlan, out_shard_size: int, record_extra=None, fingerprint_extra=None):
    """(the merge record, the resume fingerprint); ``record_extra``: more keys of the record,
    ``fingerprint_extra``: JSON-able, what else the output bytes depend on (see run_merge)."""
    record = make_record(plan, out_shard_size)
    record.update(record_extra or {})
    fp = fingerprint(plan, record)
    if fingerprint_extra is not None:
        import hashlib
        import json

        extra = json.dumps(fingerprint_extra, sort_keys=True, default=str)
        fp = hashlib.sha256(f"{fp}:{extra}".encode()).hexdigest()
    return record, fp


def run_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    device: torch.device,
    backend: str,
    out_shard_size: int,
    force: bool,
    resume: bool,
    progress: bool,
    producer=None,
    record_extra: dict | None = None,
    fingerprint_extra=None,
) -> MergeResult:
    """Steps 3-5 of the module docstring for a built plan. A merge that makes its tensors
    otherwise (fisher / regmean: m3kernels.checkpoint.data_aware_run) passes ``producer`` (see
    :func:`write_shards`), ``record_extra`` (more keys of the merge record) and
    ``fingerprint_extra`` (JSON-able: what else the output bytes depend on, e.g. its statistics
    files' stamps), both in the resume fingerprint."""
    t0 = time.perf_counter()
    for note in plan.notes:
        log.warning(note)
    with gc_policy.paused():
        record, fp = record_and_fingerprint(plan, out_shard_size, record_extra, fingerprint_extra)
    partial = partial_runs(out_dir)
    tmp, journal, done = None, None, set()
    if resume:
        for folder, j in partial:
            if j.fingerprint == fp:
                tmp, journal = folder, j
                break
        if tmp is None:
            log.warning(
                "--resume: no unfinished run of this merge (same config and inputs) next to %s; "
                "starting from the beginning",
                out_dir,
            )
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
                log.warning(
                    "an unfinished run of this same merge is in %s; --resume would continue it", folder
                )
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
        write_shards(
            plan, tmp, journal, done, todo, record, device, backend, thresholds, progress, producer=producer
        )
        write_side_files(tmp, plan, record)
        publish(tmp, out_dir, force)
    except OutputExistsError:
        raise
    except M3KError as exc:
        raise _with_hint(exc, hint) from None
    return MergeResult(
        out_dir,
        [s.filename for s in plan.shards],
        len(plan.tensors),
        plan.total_bytes,
        time.perf_counter() - t0,
        str(device),
        plan.mix_ratios,
        plan.seed,
        thresholds,
        [plan.shards[i].filename for i in sorted(done)],
        list(plan.notes),
    )


def merge_checkpoints(
    config,
    out_dir,
    *,
    device: str = "auto",
    out_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    resume: bool = False,
    seed: int | None = None,
    progress: bool = True,
    dry_run: bool = False,
    allow_bin: bool = False,
    backend: str = "auto",
    strict: bool = False,
    follow_symlinks: bool = False,
    distributed: bool | None = None,
    ranks: int | None = None,
    dist_timeout: float | None = None,
):
    """Merge the checkpoints a config names into ``out_dir`` (HF layout, sharded safetensors).

    ``distributed``: share the merge between the processes of a ``torch.distributed`` group
    (:mod:`m3kernels.checkpoint.distributed`; every process calls this with the same arguments);
    None (default): when started by ``torchrun`` with more than one process. ``dist_timeout``:
    seconds a rank waits for the others in a collective. ``ranks``: with ``dry_run``, plan the
    split for that many processes (the plan's ``rank_shares``; a distributed dry run uses its own).

    ``config``: a YAML path, YAML text, dict or MergeConfig. ``seed`` overrides the config's.
    ``dry_run``: validate the config and every input, return the :class:`MergePlan`, write
    nothing. Otherwise returns a :class:`MergeResult`. User-fixable problems raise
    :class:`~m3kernels.errors.M3KError` (or the config's ``MergeConfigError``). ``strict``: refuse
    inputs holding NaN or inf (one more read of the inputs first; :mod:`.finite_check`).
    ``follow_symlinks``: read files of the model folders that are symbolic links to places
    outside them (refused by default; every input file must be a regular file either way).
    """
    if isinstance(out_shard_size, bool) or not isinstance(out_shard_size, int) or out_shard_size < 1:
        raise M3KError(f"out_shard_size must be a positive number of bytes, got {out_shard_size!r}")
    cfg, cfg_dir = config_and_folder(config, seed)
    out_dir = Path(out_dir).expanduser().absolute()
    with gc_policy.paused():
        base, models, opened = open_inputs(cfg, cfg_dir, allow_bin, follow_symlinks)
    try:
        check_out_dir(out_dir, force, opened)  # before anything is created or deleted
        with gc_policy.paused():
            plan = build_plan(cfg, base, models, out_shard_size)
        _ = plan.config_source.side_files  # the tokenizer files to copy: checked now, copied at the end
        if distributed is None:
            distributed = launched_distributed()
        world = (
            ranks if ranks is not None else (int(os.environ.get("WORLD_SIZE", "1")) if distributed else None)
        )
        if world is not None:
            if isinstance(world, bool) or not isinstance(world, int) or world < 1:
                raise M3KError(f"ranks must be a positive number of processes, got {world!r}")
            plan.rank_shares = assign_shards(plan.shards, world)
        if strict:
            check_finite_inputs(plan, progress)
        if cfg.method in ("fisher", "regmean"):  # statistics from data: m3kernels.checkpoint.data_aware_run
            from m3kernels.checkpoint.data_aware_run import merge_data_aware_config

            return merge_data_aware_config(
                cfg,
                cfg_dir,
                models,
                opened,
                plan,
                out_dir,
                dry_run=dry_run,
                force=force,
                resume=resume,
                progress=progress,
                device=device,
                distributed=bool(distributed),
                backend=backend,
                out_shard_size=out_shard_size,
                dist_timeout=DEFAULT_TIMEOUT_S if dist_timeout is None else float(dist_timeout),
            )
        if dry_run:
            return plan
        if distributed:
            return run_distributed(
                plan,
                out_dir,
                opened=opened,
                device=device,
                backend=backend,
                out_shard_size=out_shard_size,
                force=force,
                resume=resume,
                progress=progress,
                timeout_s=DEFAULT_TIMEOUT_S if dist_timeout is None else float(dist_timeout),
            )
        dev = resolve_device(device, backend)
        with OutputLock(out_dir) as lock:  # OUT and its temporary folders are ours until publish is done
            if lock.exclusive:  # what a killed run left: a publish cut short, folders without a journal
                tidy_temp_folders(out_dir)
            check_out_dir(out_dir, force, opened, under_lock=True)  # again: another run may have published it
            return run_merge(
                plan,
                out_dir,
                device=dev,
                backend=backend,
                out_shard_size=out_shard_size,
                force=force,
                resume=resume,
                progress=progress,
            )
    finally:
        for ck in opened:
            ck.close()


__all__ = [
    "merge_checkpoints",
    "MergeResult",
    "DEFAULT_SHARD_SIZE",
    "RECORD_FILE",
    "make_record",
    "resolve_device",
    "fill_extra_rows",
    "merge_one",
    "model_thresholds",
    "shard_filenames",
]
