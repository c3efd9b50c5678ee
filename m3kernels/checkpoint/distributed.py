"""A checkpoint merge shared by several processes (GPUs, machines) on ``torch.distributed``.

Launched by ``torchrun --nproc-per-node K [--nnodes M ...] -m m3kernels merge CONFIG OUT`` (or
``merge_checkpoints(..., distributed=True)`` in each process of a group). Every rank reads the
config, opens the inputs and builds the same plan (checked: the plans' fingerprints are compared).
The output shards are split into K contiguous runs balanced by bytes (:func:`assign_shards`), so
each rank writes whole shards, in shard order, and reads only the input bytes its tensors need.
Each rank merges on its own device (``cuda:LOCAL_RANK``, or the CPU kernel) into the one shared
temporary folder that rank 0 creates (under OUT's lock, which rank 0 holds for the whole run; on
several machines OUT's parent must be a shared file system, at the same path everywhere).

* **Bit-identical to one process**: every tensor is merged by the same code from the same plan.
  ``trim_scope: model`` sums each rank's stage-A histograms with an all-reduce (integer counts:
  the thresholds are exact and the same on every rank); M³ ratios come from the seed, the same
  everywhere.
* **Journals**: each rank records its finished shards in its own journal file (ranks never write
  one file together); rank 0 folds them into the main journal before it publishes, and so does
  any later ``--resume``, distributed or not: shards any rank finished are not merged again.
* **Faults**: a rank that fails writes its error into the temporary folder; the others notice it
  after their next tensor and stop; then every rank reports, through one last collective, and
  every rank raises the same error naming the failed rank. A rank that dies without a word (killed)
  makes that collective fail (or time out: ``timeout``) on the others, which stop with an error
  naming what they could not reach; ``torchrun`` also stops the others (SIGTERM: they exit 143,
  the unfinished merge kept for ``--resume``). Nothing is published unless every rank finished.
* The control messages (paths, statuses, histograms) go over a gloo group of their own, so the
  same code runs with NCCL (GPUs) or gloo (CPUs) as the default backend.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from m3kernels.checkpoint.plan import MergePlan
from m3kernels.checkpoint.writer import RANK_FAILED, RANK_JOURNAL, Journal
from m3kernels.errors import M3KError, one_line

log = logging.getLogger("m3kernels")

DEFAULT_TIMEOUT_S = 1800.0  # collectives: how long a rank waits for the others
CRASH_RANK_ENV = "M3KERNELS_TEST_CRASH_RANK"  # test hook: only this rank obeys the crash hook
FAIL_RANK_ENV = "M3KERNELS_TEST_FAIL_RANK"  # test hook: this rank fails (M3KError) after its first tensor


def launched_distributed() -> bool:
    """True in a process started by ``torchrun`` (or with its variables) for more than one rank."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def assign_shards(shards, world: int) -> list:
    """Shard indices per rank: ``world`` contiguous runs of ``shards`` (in order), the largest
    run's bytes as small as possible (binary search on it, greedy fill). Ranks past the number of
    shards get nothing."""
    sizes = [sum(t.nbytes for t in s.tensors) for s in shards]
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")

    def fill(cap: int) -> list:
        runs, cur, load = [], [], 0
        for s, b in zip(shards, sizes):
            if cur and load + b > cap:
                runs.append(cur)
                cur, load = [], 0
            cur.append(s.index)
            load += b
        if cur:
            runs.append(cur)
        return runs

    lo, hi = max(sizes, default=0), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= world:
            hi = mid
        else:
            lo = mid + 1
    runs = fill(lo) if shards else []
    return runs + [[] for _ in range(world - len(runs))]


def balance_hint(plan: MergePlan, shares: list) -> str | None:
    """A warning when the shares are uneven (each rank writes whole shards: with few, large
    shards some ranks get more, or nothing): the largest over the mean and a shard size that
    would balance them. None when the largest is within 25% of the mean."""
    from m3kernels.checkpoint.run import human_bytes

    loads = [sum(t.nbytes for i in run for t in plan.shards[i].tensors) for run in shares]
    mean = sum(loads) / max(1, len(loads))
    if mean == 0 or max(loads) <= 1.25 * mean:
        return None
    target = max(1, int(mean // 4))
    return (
        f"the {len(shares)} ranks' shares are uneven (the largest is {max(loads) / mean:.2f}x the mean; "
        f"{sum(1 for x in loads if x == 0)} rank(s) get nothing): each rank writes whole output shards, and "
        f"there are {len(plan.shards)}; --out-shard-size {human_bytes(target).replace(' ', '')} or smaller "
        "would balance them"
    )


def share_table(plan: MergePlan, shares: list) -> str:
    """The dry run's view: which rank writes which shards, how many tensors and bytes it merges
    and reads."""
    from m3kernels.checkpoint.run import human_bytes

    lines = ["rank  shards                 tensors  output       input read"]
    for r, idx in enumerate(shares):
        tensors = [t for i in idx for t in plan.shards[i].tensors]
        out_b = sum(t.nbytes for t in tensors)
        in_b = sum(_input_bytes(t) for t in tensors)
        span = f"{idx[0] + 1}-{idx[-1] + 1} of {len(plan.shards)}" if idx else "none"
        lines.append(f"{r:<5} {span:<22} {len(tensors):<8} {human_bytes(out_b):<12} {human_bytes(in_b)}")
    return "\n".join(lines)


def _input_bytes(pt) -> int:
    srcs = list(pt.models) + ([pt.base] if pt.base is not None else [])
    return sum(math.prod(s.meta.shape) * s.meta.dtype.itemsize for s in srcs)


@dataclass
class Ranks:
    """This process's place in the group and the gloo group the control messages go over."""

    rank: int
    world: int
    local_rank: int
    group: object
    owned: bool  # we initialised the default group (and destroy it at the end)
    timeout_s: float

    @classmethod
    def join(cls, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
        import torch.distributed as dist

        if not dist.is_available():
            raise M3KError("distributed merge: this torch build has no torch.distributed")
        owned = False
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
                raise M3KError(
                    "distributed merge: no process group and no torchrun environment "
                    "(start it with torchrun --nproc-per-node K -m m3kernels merge ...)"
                )
            backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend, timeout=timeout)
            except Exception as exc:
                raise M3KError(f"distributed merge: cannot join the process group: {exc}") from None
            owned = True
        group = dist.new_group(backend="gloo", timeout=timeout)
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local, group, owned, timeout_s)

    # -- collectives (small objects over gloo); a lost peer becomes an M3KError
    def _fail(self, what: str, exc: BaseException) -> M3KError:
        return M3KError(
            f"distributed merge, rank {self.rank}: lost the other ranks while {what} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "a rank failed or was killed"
        )

    def broadcast(self, obj, what: str):
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as exc:
            raise self._fail(what, exc) from None
        return box[0]

    def gather(self, obj, what: str) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            raise self._fail(what, exc) from None
        return out

    def sum_int64(self, arr: np.ndarray, what: str) -> np.ndarray:
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).clone()
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        except Exception as exc:
            raise self._fail(what, exc) from None
        return t.numpy()

    def barrier(self, what: str) -> None:
        """Wait for every rank (a lost one is ignored: this is the end of a failed run anyway)."""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=min(self.timeout_s, 30.0)))
        except Exception as exc:
            log.info("distributed merge, rank %d: %s: %s", self.rank, what, exc)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _failure_note(tmp: Path, rank: int) -> Path:
    return tmp / RANK_FAILED.format(rank=rank)


def _poll_failures(tmp: Path, me: int):
    """A poll() for write_shards: raises once another rank has written its failure note."""
    import time

    last = [0.0]
    inject = os.environ.get(FAIL_RANK_ENV) == str(me)

    def poll():
        if inject:
            raise M3KError(f"rank {me}: a failure injected by the test ({FAIL_RANK_ENV})")
        now = time.monotonic()
        if now - last[0] < 0.2:
            return
        last[0] = now
        for entry in os.scandir(tmp):
            if entry.name.startswith(".m3k-failed.rank") and entry.name != _failure_note(tmp, me).name:
                raise _OtherRankFailed(entry.name)

    return poll


class _OtherRankFailed(Exception):
    """Another rank failed: this one stops (the error itself is reported by the final exchange)."""


def _status(exc: BaseException | None) -> dict | None:
    if exc is None:
        return None
    if isinstance(exc, _OtherRankFailed):
        return {"stopped": True}
    return {
        "error": f"{type(exc).__name__}: {one_line(exc)}" if not isinstance(exc, M3KError) else one_line(exc)
    }


def _start_on_rank0(plan, out_dir, opened, force, resume, fp, lock) -> dict:
    """Under OUT's lock: tidy, check OUT, find the unfinished run (``resume``) or make the
    temporary folder; returns what the other ranks need (folder, finished shards, thresholds)."""
    from m3kernels.checkpoint.output_guard import check_out_dir
    from m3kernels.checkpoint.writer import make_temp_dir, partial_runs, tidy_temp_folders

    if lock.exclusive:
        tidy_temp_folders(out_dir)
    check_out_dir(out_dir, force, opened, under_lock=True)
    tmp, journal = None, None
    if resume:
        for folder, j in partial_runs(out_dir):
            if j.fingerprint == fp:
                tmp, journal = folder, j
                break
        if tmp is None:
            log.warning("--resume: no unfinished run of this merge next to %s; starting anew", out_dir)
    if tmp is None:
        tmp = make_temp_dir(out_dir)
        journal = Journal(tmp, fp)
    good, bad = journal.verified_shards()
    for msg in bad:
        log.warning(msg)
    journal.save()  # folds in (and removes) what the ranks of an earlier run recorded
    done = sorted(s.index for s in plan.shards if s.filename in good)
    return {"tmp": str(tmp), "done": done, "thresholds": journal.data["extra"].get("thresholds")}


def _merge_share(plan, ranks, tmp, fp, setup, mine, record, device, backend, progress, producer=None):
    """This rank's part: the statistics pass (``trim_scope: model``, histograms all-reduced),
    then its shards; then the exchange of statuses. Returns the model-wide thresholds."""
    from m3kernels.checkpoint.model_stats import model_thresholds
    from m3kernels.checkpoint.run import write_shards

    done = set(setup["done"])
    hint = f"; the unfinished merge is kept in {tmp}: fix the cause and rerun with --resume"
    error, thresholds = None, setup["thresholds"]
    try:
        if plan.config.trim_scope == "model" and thresholds is None:
            thresholds = model_thresholds(
                plan,
                device,
                backend,
                progress and ranks.rank == 0,
                tensors=[t for i in sorted(mine) for t in plan.shards[i].tensors],
                reduce=lambda h: ranks.sum_int64(h, "summing the statistics"),
            )
            if ranks.rank == 0:
                main = Journal.load(tmp)
                main.data["extra"]["thresholds"] = thresholds
                main.save()
        record["model_trim_thresholds"] = thresholds
        skip = done | {s.index for s in plan.shards if s.index not in mine}
        todo = [t for s in plan.shards if s.index not in skip for t in s.tensors]
        journal = Journal(tmp, fp, name=RANK_JOURNAL.format(rank=ranks.rank))
        if os.environ.get(CRASH_RANK_ENV, str(ranks.rank)) != str(ranks.rank):
            os.environ.pop("M3KERNELS_TEST_CRASH_AFTER_SHARDS", None)
        write_shards(
            plan,
            tmp,
            journal,
            skip,
            todo,
            record,
            device,
            backend,
            thresholds,
            progress and ranks.rank == 0,
            total_bytes=sum(t.nbytes for i in mine for t in plan.shards[i].tensors),
            poll=_poll_failures(tmp, ranks.rank),
            producer=producer,
        )
    except BaseException as exc:  # every failure is reported to the other ranks
        error = exc
        if not isinstance(exc, _OtherRankFailed):
            try:
                _failure_note(tmp, ranks.rank).write_text(str(_status(exc)), encoding="utf-8")
            except OSError:
                pass
    statuses = ranks.gather(_status(error), "waiting for the other ranks to finish")
    failed = [(r, s["error"]) for r, s in enumerate(statuses) if s and "error" in s]
    if isinstance(error, KeyboardInterrupt):
        raise error
    if failed:
        r, msg = failed[0]
        if r == ranks.rank and isinstance(error, M3KError):
            exc = type(error)(str(error) + hint, path=error.path, tensor=error.tensor)
        elif r == ranks.rank and error is not None:
            raise error  # a bug in this rank: its traceback, not a message
        else:
            exc = M3KError(f"distributed merge: rank {r} failed: {msg}{hint}")
        # Said here, before the last barrier, not by the caller: the first rank to exit makes
        # torchrun stop the others, which would then never get to say it.
        log.error("%s", one_line(exc))
        exc.reported = True
        ranks.barrier("reporting the failure")
        raise exc from None
    if error is not None:
        raise error
    return thresholds


def _publish_on_rank0(plan, tmp, out_dir, record, force) -> None:
    """Every rank's shards recorded: fold their journals, write the side files, publish."""
    from m3kernels.checkpoint.record import write_side_files
    from m3kernels.checkpoint.writer import publish

    main = Journal.load(tmp)
    main.save()
    missing = [s.filename for s in plan.shards if s.filename not in main.shards]
    if missing:
        raise M3KError(f"distributed merge: shards never recorded as written: {', '.join(missing[:3])}")
    write_side_files(tmp, plan, record)
    publish(tmp, out_dir, force)


def run_distributed(
    plan: MergePlan,
    out_dir: Path,
    *,
    opened,
    device: str,
    backend: str,
    out_shard_size: int,
    force: bool,
    resume: bool,
    progress: bool,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    producer=None,
    record_extra: dict | None = None,
    fingerprint_extra=None,
):
    """The distributed merge of a built plan (see the module docstring); returns MergeResult.
    ``producer``, ``record_extra``, ``fingerprint_extra``: as for run.run_merge (fisher / regmean)."""
    import time

    from m3kernels.checkpoint.output_guard import OutputLock
    from m3kernels.checkpoint.run import MergeResult, record_and_fingerprint, resolve_device

    t0 = time.perf_counter()
    dev_kind = "cpu" if device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    ranks = Ranks.join(dev_kind, timeout_s)
    try:
        local_device = resolve_device(device if dev_kind == "cpu" else "cuda", backend)
        if local_device.type == "cuda":
            local_device = torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(local_device)
        record, fp = record_and_fingerprint(plan, out_shard_size, record_extra, fingerprint_extra)
        fps = ranks.gather(fp, "comparing plans")
        if len(set(fps)) != 1:
            bad = [r for r, f in enumerate(fps) if f != fps[0]]
            raise M3KError(
                f"distributed merge: ranks {bad} see a different merge than rank 0 (config, inputs or "
                "options differ between the processes)"
            )
        shares = assign_shards(plan.shards, ranks.world)
        mine = set(shares[ranks.rank])
        hint = balance_hint(plan, shares)
        if hint is not None and ranks.rank == 0:
            log.warning(hint)

        lock = None
        try:
            setup = None
            if ranks.rank == 0:
                try:
                    lock = OutputLock(out_dir).__enter__()
                    setup = _start_on_rank0(plan, out_dir, opened, force, resume, fp, lock)
                except BaseException as exc:
                    ranks.broadcast({"error": (_status(exc) or {}).get("error", "interrupted")}, "starting")
                    raise
            setup = ranks.broadcast(setup, "starting")
            if "error" in setup:
                raise M3KError(f"distributed merge: rank 0 could not start: {setup['error']}")
            tmp = Path(setup["tmp"])
            done = set(setup["done"])
            thresholds = _merge_share(
                plan, ranks, tmp, fp, setup, mine, record, local_device, backend, progress, producer
            )
            published = None
            if ranks.rank == 0:
                try:
                    _publish_on_rank0(plan, tmp, out_dir, record, force)
                except BaseException as exc:
                    published = _status(exc) or {"error": "interrupted"}
                    ranks.broadcast(published, "publishing")
                    raise
            published = ranks.broadcast(published, "publishing")
            if published is not None:
                raise M3KError(f"distributed merge: rank 0 could not publish: {published.get('error')}")
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)
        return MergeResult(
            out_dir,
            [s.filename for s in plan.shards],
            len(plan.tensors),
            plan.total_bytes,
            time.perf_counter() - t0,
            f"{local_device} (rank {ranks.rank} of {ranks.world})",
            plan.mix_ratios,
            plan.seed,
            thresholds,
            [plan.shards[i].filename for i in sorted(done)],
            list(plan.notes),
        )
    finally:
        ranks.close()


__all__ = ["assign_shards", "balance_hint", "share_table", "run_distributed", "launched_distributed", "Ranks"]
