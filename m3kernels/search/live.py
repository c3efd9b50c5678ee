"""The in-memory merge: candidates merged straight into the parameters of one live model.

:class:`LiveModel` opens the config's checkpoints once (the same validated, memory-mapped inputs
as ``m3kernels merge``), loads one ``transformers`` causal LM from the base folder (or the first
model's, without a base) in the merge's output dtype, and keeps every input tensor it reads (on
the CPU a view of the mapped file, on a GPU a copy made once). :meth:`LiveModel.merge` then
builds the candidate's merge plan (:func:`m3kernels.checkpoint.plan.build_plan`) and computes
each tensor with ``merge_tensors(base, models, ..., out=param)`` into the parameter itself, with
exactly the arguments the checkpoint merge uses (docs/SPEC.md §4, the ``run`` module), so the
live weights are bit for bit those ``m3kernels merge`` writes for the same config. Nothing is
written to disk.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from m3kernels.api import merge_tensors
from m3kernels.checkpoint.config import MergeConfig, MergeConfigError, parse_config
from m3kernels.checkpoint.inputs import open_inputs
from m3kernels.checkpoint.model_stats import model_thresholds
from m3kernels.checkpoint.plan import COPY, VOCAB, MergePlan, build_plan
from m3kernels.checkpoint.produce import fill_extra_rows
from m3kernels.checkpoint.run import resolve_device
from m3kernels.search.errors import SearchError
from m3kernels.search.space import Candidate

log = logging.getLogger("m3kernels")

ONE_SHARD = 1 << 62  # the plan's shard size: the search writes no shards


def load_causal_lm(path, dtype: torch.dtype):
    """``AutoModelForCausalLM.from_pretrained(path)`` from local files, in ``dtype``."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SearchError("the search needs transformers (pip install transformers)") from None
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except TypeError:  # older transformers: torch_dtype
            model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SearchError(f"{path}: transformers can not load it as a causal LM: {exc}") from None
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SearchError(f"{path}: no tokenizer can be loaded from it: {exc}") from None


class LiveModel:
    """One live model and the merge inputs, for a whole search (close it when done)."""

    def __init__(
        self,
        cfg: MergeConfig,
        *,
        device: str = "cpu",
        backend: str = "auto",
        allow_bin: bool = False,
        follow_symlinks: bool = False,
    ):
        self.cfg = cfg
        self.backend = backend
        self.device = resolve_device(device, backend)
        self.base, self.models, self.opened = open_inputs(cfg, None, allow_bin, follow_symlinks)
        self._cache: dict = {}
        try:
            self.plan0 = build_plan(cfg, self.base, self.models, ONE_SHARD)
            self.out_dtype = self.plan0.out_dtype
            self.source = self.plan0.config_source
            self.model = load_causal_lm(self.source.path, self.out_dtype).to(self.device)
            self.model.eval()
            self.model.requires_grad_(False)
            self.targets = {k: v.data for k, v in self.model.state_dict(keep_vars=True).items()}
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ inputs
    def tensor(self, ckpt, name: str) -> torch.Tensor:
        """An input tensor, read once (on the CPU a view of the mapped file when the OS grants a
        read lease, else a copy; on a GPU a copy on it)."""
        key = (id(ckpt), name)
        t = self._cache.get(key)
        if t is None:
            t = ckpt.tensor(name)
            if self.device.type != "cpu":
                t = t.to(self.device)
            t = t.contiguous()
            self._cache[key] = t
        return t

    def _target(self, name: str, shape) -> torch.Tensor:
        t = self.targets.get(name)
        if t is None:
            raise SearchError(
                f"tensor {name!r} of the merge has no parameter or buffer in the live model "
                f"({type(self.model).__name__} from {self.source.path})"
            )
        if tuple(t.shape) != tuple(shape):
            raise SearchError(
                f"tensor {name!r}: the merge gives shape {list(shape)} but the live model's is "
                f"{list(t.shape)} (vocabulary rows that grow are not supported in memory)"
            )
        return t

    def _check_targets(self, plan: MergePlan) -> None:
        seen: dict = {}
        for pt in plan.tensors:
            t = self._target(pt.name, pt.shape)
            other = seen.setdefault(t.data_ptr(), pt.name)
            if other != pt.name and t.numel() > 0:
                raise SearchError(
                    f"tensors {other!r} and {pt.name!r} are one parameter in the live model (tied) "
                    f"but the merge gives each its own values"
                )

    # ------------------------------------------------------------------ merge
    def plan(self, candidate: Candidate) -> tuple:
        """(parsed config, merge plan, M³ ratios) of a candidate."""
        try:
            cfg = parse_config(copy.deepcopy(candidate.config))
        except MergeConfigError as exc:
            raise SearchError(f"candidate {candidate.key}: {exc}") from None
        base = self.base if cfg.base_model is not None else None
        plan = build_plan(cfg, base, self.models, ONE_SHARD)
        ratios = tuple(candidate.ratios) if candidate.mix == "ratios" else plan.mix_ratios
        return cfg, plan, ratios

    def merge(self, candidate: Candidate) -> float:
        """Merge ``candidate`` into the live model's parameters; returns the seconds it took."""
        t0 = time.perf_counter()
        cfg, plan, ratios = self.plan(candidate)
        self._check_targets(plan)
        thresholds = None
        if cfg.trim_scope == "model":
            thresholds = model_thresholds(plan, self.device, self.backend, False)
        with torch.no_grad():
            for pt in plan.tensors:
                target = self._target(pt.name, pt.shape)
                if pt.action == COPY:
                    target.copy_(self.tensor(pt.models[0].ckpt, pt.models[0].name))
                    continue
                b = self.tensor(pt.base.ckpt, pt.base.name) if pt.base is not None else None
                ms = [self.tensor(s.ckpt, s.name) for s in pt.models]
                direct = target.dtype == pt.out_dtype and target.is_contiguous()
                full = target if direct else torch.empty(pt.shape, dtype=pt.out_dtype, device=target.device)
                out = full
                if pt.action == VOCAB:
                    c = pt.common_rows
                    b = b[:c] if b is not None else None
                    ms = [m[:c] for m in ms]
                    out = full[:c]
                merge_tensors(
                    b,
                    ms,
                    method=cfg.method,
                    **pt.kwargs,
                    mix_ratios=ratios,
                    seed=plan.seed,
                    name=pt.name,
                    out_dtype=pt.out_dtype,
                    backend=self.backend,
                    thresholds=thresholds,
                    out=out,
                )
                if pt.action == VOCAB:
                    fill_extra_rows(pt, full)
                if not direct:
                    target.copy_(full)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def load_reference(self, which: str) -> float:
        """Load the base ("base") or fine-tuned model i ("expert:<i>", 0-based) into the live
        model, cast to its dtype; returns the seconds it took."""
        t0 = time.perf_counter()
        if which == "base":
            ckpt = self.base
        else:
            ckpt = self.models[int(which.split(":", 1)[1])]
        if ckpt is None:
            raise SearchError("the config has no base_model to score as the reference")
        with torch.no_grad():
            for pt in self.plan0.tensors:
                target = self._target(pt.name, pt.shape)
                if pt.name not in ckpt:
                    raise SearchError(f"{ckpt.label} has no tensor {pt.name!r} to load as a reference")
                src = self.tensor(ckpt, pt.name)
                if tuple(src.shape) != tuple(target.shape):
                    raise SearchError(
                        f"{ckpt.label}: tensor {pt.name!r} has shape {list(src.shape)}, the live model "
                        f"{list(target.shape)}"
                    )
                target.copy_(src)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._cache.clear()
        for ck in getattr(self, "opened", []):
            ck.close()


__all__ = ["LiveModel", "load_causal_lm", "load_tokenizer"]
