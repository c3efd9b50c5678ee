"""Checkpoint merge with data statistics: ``fisher`` and ``regmean`` over whole models, streamed.

``merge_checkpoints_data_aware(method, models, stats, out_dir, ...)``: N model folders and their N
statistics folders (``m3kernels stats fisher|regmean``). Before anything is merged, each statistics
manifest's model fingerprint is compared with the model's (statistics of another model are
refused), and every model must hold the same tensors with the same shapes. Then tensor by tensor,
in model 0's order, the models and statistics are read as memory-mapped views
(:class:`~m3kernels.checkpoint.source.Checkpoint`) and the output written as it is produced
(safetensors shards of at most ``shard_size`` bytes), so the peak memory is about one tensor's N
inputs and N statistics (for regmean: the largest layer's N Gram matrices in float64).

* ``fisher``: every tensor by :func:`~m3kernels.merge.data_aware.fisher_merge` (each needs its
  Fisher in every statistics folder). ``normalize="l2"``: FusionBench's per-model normalisation
  (one more read of the statistics first, for ‖Fᵢ‖₂ over all parameters).
* ``regmean``: every linear weight with a Gram matrix in the manifests by
  :func:`~m3kernels.merge.data_aware.regmean_merge`; every other tensor (biases, norms,
  embeddings) by the ``fallback`` method of :func:`m3kernels.merge_tensors` (the fused kernel;
  default ``average`` = ``linear``, Σ cᵢθᵢ / Σ cᵢ), with ``base``, the same weights and M³ ratios
  and ``fallback_kwargs``. ``gram_normalize="tokens"`` divides each model's Grams by
  its token count (equal say per model whatever its data size); default: the sums, as the paper.

M³: ratios rᵢ (``mix_ratios``, or drawn from ``mixup_alpha`` and ``seed``) multiply each model's
coefficient, cᵢ = wᵢrᵢ. The output folder gets config.json and the tokenizer files of model 0 and
a ``m3kernels_merge`` record in each shard's metadata. This function has its own streamed writer
(no journal: a call that dies starts over). The per-tensor arithmetic is :class:`DataAwareMerger`,
which the config merge (``m3kernels merge`` with ``merge_method: fisher|regmean``,
:mod:`m3kernels.checkpoint.data_aware_run`) runs inside the main merge's writer, with its journal,
``--resume`` and ``--device`` (see docs/DATA_AWARE.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from m3kernels.datastats.output import StatsFolder, StreamWriter
from m3kernels.errors import M3KError, OutputExistsError, OutputIsInputError, TensorMismatchError

log = logging.getLogger("m3kernels")
METHODS = ("fisher", "regmean")
SHARD_SIZE = 5 << 30


def _plan_shards(items, shard_size):
    """[(name, dtype, shape, nbytes)] -> list of shards (lists of items), in order."""
    shards, cur, size = [], [], 0
    for it in items:
        if cur and size + it[3] > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it[3]
    if cur:
        shards.append(cur)
    return shards


def _shard_name(i, n):
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _fisher_norms(stats, names) -> list[float]:
    norms = []
    for s in stats:
        total = 0.0
        for n in names:
            f = s.tensor(n, what="Fisher tensor")
            total += float(f.to(torch.float64).square().sum())
            s.release(n)
        norms.append(total**0.5)
    return norms


def check_options(
    method: str,
    n: int,
    *,
    weights=None,
    mix_ratios=None,
    mixup_alpha=None,
    seed: int = 0,
    floor: float | None = None,
    floor_mode: str = "max",
    normalize: str = "none",
    alpha: float | None = None,
    ridge: float = 0.0,
    precision: str = "float64",
    gram_normalize: str = "none",
) -> dict:
    """The merge's options checked and resolved (M3KError naming the bad one): a dict with
    ``ratios`` (the M³ ratios used, ones without M³), ``ratios_record`` (those ratios, None
    without M³), ``weights`` (one per model), ``floor``, ``alpha`` and the other options as given."""
    from m3kernels.merge import data_aware as da
    from m3kernels.merge.mixup import as_per_model, resolve_mix_ratios

    if method not in METHODS:
        raise M3KError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if normalize not in ("none", "l2"):
        raise M3KError(f"normalize must be 'none' or 'l2', got {normalize!r}")
    if gram_normalize not in ("none", "tokens"):
        raise M3KError(f"gram_normalize must be 'none' or 'tokens', got {gram_normalize!r}")
    if method == "regmean" and precision not in ("float64", "float32"):
        raise M3KError(f"precision must be 'float64' or 'float32', got {precision!r}")
    floor = da.FISHER_FLOOR if floor is None else floor
    alpha = da.REGMEAN_ALPHA if alpha is None else alpha
    try:
        ratios = resolve_mix_ratios(n, mix_ratios, mixup_alpha, seed)
        da.coefficients(n, weights, ratios)  # validates: finite, >= 0, not all 0
        w = [1.0] * n if weights is None else list(as_per_model(weights, n, "weights"))
        if method == "fisher":
            da._check_floor(floor, floor_mode)
        else:
            da._check_alpha_ridge(alpha, ridge)
    except ValueError as exc:
        raise M3KError(str(exc)) from None
    return {
        "method": method,
        "ratios": ratios,
        "ratios_record": list(ratios) if (mix_ratios is not None or mixup_alpha is not None) else None,
        "weights": w,
        "seed": seed,
        "floor": floor,
        "floor_mode": floor_mode,
        "normalize": normalize,
        "alpha": alpha,
        "ridge": ridge,
        "precision": precision,
        "gram_normalize": gram_normalize,
    }


class DataAwareMerger:
    """The per-tensor arithmetic of one ``fisher`` / ``regmean`` checkpoint merge.

    ``stats``: the opened :class:`~m3kernels.datastats.output.StatsFolder` of each model (checked
    against its model by the caller), ``opts``: :func:`check_options`'s dict, ``names``: every
    tensor the merge writes (for ``normalize="l2"``'s pre-pass over the Fisher tensors).
    :meth:`merge` computes one output tensor from the models' tensors on ``device`` (the inputs
    are moved there; the RegMean solve follows ``precision``: float32 on the Grams' device with
    the residual check, float64 on the CPU) and returns it on the CPU. ``options`` is what the
    merge record says about the method's options."""

    def __init__(
        self,
        stats: list,
        opts: dict,
        names,
        *,
        fallback: str = "average",
        fallback_kwargs: dict | None = None,
        device="cpu",
    ):
        from m3kernels.merge import data_aware as da

        self.stats, self.opts, self.method = list(stats), opts, opts["method"]
        self.fallback, self.fallback_kwargs = fallback, dict(fallback_kwargs or {})
        self.device = torch.device(device)
        self.regmean_layers = 0
        self.scales = None
        if self.method == "fisher" and opts["normalize"] == "l2":
            floor = opts["floor"]
            self.scales = da.fisher_norm_scales(
                _fisher_norms(self.stats, list(names)), floor if floor > 0 else da.FISHER_FLOOR
            )
        self.gram_scale = [1.0] * len(self.stats)
        if self.method == "regmean" and opts["gram_normalize"] == "tokens":
            self.gram_scale = [1.0 / max(s.manifest["counts"]["tokens"], 1) for s in self.stats]
        o = opts
        if self.method == "fisher":
            self.options = {
                "floor": o["floor"],
                "floor_mode": o["floor_mode"],
                "normalize": o["normalize"],
                "model_scales": self.scales,
            }
        else:
            self.options = {
                "alpha": o["alpha"],
                "ridge": o["ridge"],
                "precision": o["precision"],
                "gram_normalize": o["gram_normalize"],
                "fallback": fallback,
            }

    def statistics_record(self) -> list:
        """Each statistics folder as the merge record names it."""
        return [
            {
                "path": str(s.path),
                "fingerprint": s.fingerprint,
                "data_sha256": s.manifest["data"]["sha256"],
                "counts": s.manifest["counts"],
            }
            for s in self.stats
        ]

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def merge(self, name: str, models: list, out_dtype: torch.dtype, base=None) -> torch.Tensor:
        """Output tensor ``name`` from the models' tensors ``models`` (same order as the statistics),
        in ``out_dtype``, on the CPU. A missing or misshapen statistics tensor is a
        TensorMismatchError naming the folder and the tensor; a ValueError of the method an
        M3KError naming the tensor."""
        from m3kernels.api import merge_tensors
        from m3kernels.merge import data_aware as da

        o, shape = self.opts, tuple(models[0].shape)
        try:
            if self.method == "fisher":
                fs = [self._to(s.tensor(name, shape, "Fisher tensor")) for s in self.stats]
                out = da.fisher_merge(
                    [self._to(m) for m in models],
                    fs,
                    weights=o["weights"],
                    mix_ratios=o["ratios"],
                    model_scales=self.scales,
                    floor=o["floor"],
                    floor_mode=o["floor_mode"],
                    out_dtype=out_dtype,
                )
                for s in self.stats:
                    s.release(name)
            elif name in self.stats[0].manifest["layers"]:
                gs, layers = [], []
                for i, s in enumerate(self.stats):
                    g = s.manifest["layers"].get(name)
                    if g is None:
                        raise TensorMismatchError(
                            f"statistics {i}: {s.path} has no Gram matrix for layer {name!r} (statistics 0 has one)",
                            path=str(s.path),
                            tensor=name,
                        )
                    layers.append(g)
                    gs.append(self._to(s.tensor(g, (shape[1], shape[1]), f"Gram matrix (layer {name})")))
                out = da.regmean_merge(
                    [self._to(m) for m in models],
                    gs,
                    weights=[a * b for a, b in zip(o["weights"], self.gram_scale)],
                    mix_ratios=o["ratios"],
                    alpha=o["alpha"],
                    ridge=o["ridge"],
                    precision=o["precision"],
                    name=name,
                    out_dtype=out_dtype,
                )
                for s, g in zip(self.stats, layers):
                    s.release(g)
                self.regmean_layers += 1
            else:
                out = merge_tensors(
                    self._to(base) if base is not None else None,
                    [self._to(m) for m in models],
                    method=self.fallback,
                    weights=o["weights"],
                    mix_ratios=o["ratios_record"],  # None without M³, as the main merge
                    seed=o["seed"],
                    name=name,
                    out_dtype=out_dtype,
                    **self.fallback_kwargs,
                )
        except ValueError as exc:
            raise M3KError(f"tensor {name!r}: {exc}", tensor=name) from None
        return out.cpu() if out.device.type != "cpu" else out


def merge_checkpoints_data_aware(
    method: str,
    models,
    stats,
    out_dir,
    *,
    weights=None,
    mix_ratios=None,
    mixup_alpha=None,
    seed: int = 0,
    floor: float | None = None,
    floor_mode: str = "max",
    normalize: str = "none",
    alpha: float | None = None,
    ridge: float = 0.0,
    precision: str = "float64",
    gram_normalize: str = "none",
    fallback: str = "average",
    fallback_kwargs: dict | None = None,
    base=None,
    out_dtype=None,
    shard_size: int = SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Merge the checkpoint folders ``models`` by ``method`` ('fisher' or 'regmean') with the
    statistics folders ``stats`` (one per model, same order) into ``out_dir``; returns the merge
    record. User-fixable problems raise :class:`~m3kernels.errors.M3KError`."""
    from tqdm import tqdm

    import m3kernels
    from m3kernels.checkpoint.source import Checkpoint
    from m3kernels.datastats.fingerprint import model_fingerprint

    if method not in METHODS:
        raise M3KError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    models, stats = [Path(m) for m in models], [Path(s) for s in stats]
    if not models:
        raise M3KError("at least one model is needed")
    if len(stats) != len(models):
        raise M3KError(f"{len(stats)} statistics folders for {len(models)} models (one each, same order)")
    out_dir = Path(out_dir).expanduser().absolute()
    real_out = Path(os.path.realpath(out_dir))
    for what, p in (
        [("model", m) for m in models]
        + [("statistics", st) for st in stats]
        + [("base", base)] * (base is not None)
    ):
        real_in = Path(os.path.realpath(p))
        if real_out == real_in or real_out in real_in.parents or real_in in real_out.parents:
            raise OutputIsInputError(
                f"{out_dir} would be inside, equal to or a parent of the {what} folder {p}: choose another output folder",
                path=str(out_dir),
            )
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir} exists (force=True replaces it)", path=str(out_dir))
    t0 = time.perf_counter()
    n = len(models)
    opts = check_options(
        method,
        n,
        weights=weights,
        mix_ratios=mix_ratios,
        mixup_alpha=mixup_alpha,
        seed=seed,
        floor=floor,
        floor_mode=floor_mode,
        normalize=normalize,
        alpha=alpha,
        ridge=ridge,
        precision=precision,
        gram_normalize=gram_normalize,
    )
    cks, sts, base_ck = [], [], None
    tmp = out_dir.with_name(f".{out_dir.name}.m3k-tmp-{os.getpid()}")
    try:
        for i, (mp, sp) in enumerate(zip(models, stats)):
            cks.append(Checkpoint(mp, role=f"model {i}"))
            sts.append(StatsFolder(sp, kind=method, role=f"statistics {i}"))
            sts[-1].check_model(model_fingerprint(mp), mp)
        if base is not None:
            base_ck = Checkpoint(base, role="base")
        names = cks[0].names
        for i, ck in enumerate(cks[1:], 1):
            extra = set(ck.names) ^ set(names)
            if extra:
                t = sorted(extra)[0]
                where = "model 0" if t not in names else f"model {i}"
                raise TensorMismatchError(
                    f"tensor {t!r} is missing in {where} ({cks[0].path if where == 'model 0' else ck.path})",
                    tensor=t,
                )
            for t in names:
                if ck.meta(t).shape != cks[0].meta(t).shape:
                    raise TensorMismatchError(
                        f"tensor {t!r} has shape {ck.meta(t).shape} in {ck.path}, {cks[0].meta(t).shape} in {cks[0].path}",
                        tensor=t,
                    )
        merger = DataAwareMerger(sts, opts, names, fallback=fallback, fallback_kwargs=fallback_kwargs)
        items = []
        for t in names:
            meta = cks[0].meta(t)
            dt = out_dtype or meta.dtype
            numel = 1
            for d in meta.shape:
                numel *= d
            items.append((t, dt, meta.shape, numel * dt.itemsize))
        shards = _plan_shards(items, shard_size)
        record = {
            "m3kernels_version": m3kernels.__version__,
            "merge_method": method,
            "seed": seed,
            "mix_ratios": opts["ratios_record"],
            "weights": opts["weights"],
            "options": merger.options,
            "models": [str(m) for m in models],
            "statistics": merger.statistics_record(),
        }
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        bar = tqdm(
            total=len(items),
            desc=f"{method} merge",
            unit="tensor",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        try:
            for si, shard in enumerate(shards):
                wr = StreamWriter(
                    tmp / _shard_name(si, len(shards)),
                    [(a, b, c) for a, b, c, _ in shard],
                    {"format": "pt", "m3kernels_merge": json.dumps(record)},
                )
                try:
                    for t, dt, _shape, _ in shard:
                        ms = [ck.tensor(t) for ck in cks]
                        b = base_ck.tensor(t) if base_ck is not None else None
                        wr.write(t, merger.merge(t, ms, dt, base=b))
                        for ck in cks + ([base_ck] if base_ck is not None else []):
                            ck.release(t)
                        bar.update(1)
                    wr.finish()
                except BaseException:
                    wr.abort()
                    raise
        finally:
            bar.close()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(it[3] for it in items)},
                "weight_map": {
                    it[0]: _shard_name(si, len(shards)) for si, sh in enumerate(shards) for it in sh
                },
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if cks[0].config is not None:
            conf = dict(cks[0].config)
            if out_dtype is not None:
                from m3kernels.checkpoint.safetensors_io import torch_dtype_name

                name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[torch_dtype_name(out_dtype)]
                for k in ("torch_dtype", "dtype"):
                    if k in conf:
                        conf[k] = name
            (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        for fname, path in cks[0].side_files.items():
            shutil.copyfile(path, tmp / fname)
        (tmp / "m3kernels_merge.json").write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for c in cks + ([base_ck] if base_ck else []):
            c.close()
        for s in sts:
            s.close()
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["regmean_layers"] = merger.regmean_layers
    log.info("%s merge of %d models into %s in %.1f s", method, n, out_dir, record["seconds"])
    return record


__all__ = ["merge_checkpoints_data_aware", "DataAwareMerger", "check_options"]
