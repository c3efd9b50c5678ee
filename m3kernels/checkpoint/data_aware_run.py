"""Config merges with ``merge_method: fisher`` or ``regmean`` (statistics from ``m3kernels stats``).

A config names each model's statistics folder as ``models[i].parameters.fisher: PATH`` (or
``gram: PATH``; relative paths: from the working directory, else the config's folder, as model
paths). :func:`check_statistics_keys` (one of the config parser's ``CONFIG_CHECKS``) reports
every missing or malformed statistics key with the config's other blockers. After the config is
parsed, the inputs opened and the plan built, :func:`merge_data_aware_config` (called by
:func:`m3kernels.checkpoint.run.merge_checkpoints`) opens every statistics folder, checks its
kind and its model fingerprint against the model's, and every statistics tensor the merge will
read (``--dry-run`` stops there: the plan, with one note per folder).

Then the merge runs through the main merge's writer, as every other method's: the plan's tensors,
in shard order, are merged by :class:`~m3kernels.datastats.merge.DataAwareMerger` (the arithmetic
of :func:`m3kernels.datastats.merge_checkpoints_data_aware`, bit for bit) in
:func:`data_aware_producer`, the ``producer`` that :func:`m3kernels.checkpoint.run.run_merge` (one
process, under OUT's lock) or :func:`m3kernels.checkpoint.distributed.run_distributed`
(``torchrun``) hands to the main :class:`~m3kernels.checkpoint.writer.ShardedWriter`: the journal,
``--resume``, ``--force``, the atomic publish and the merge record (``m3kernels_merge.yaml``, with
the ``weights``, ``options`` and ``statistics`` keys added) are the main merge's. The resume
fingerprint adds :func:`statistics_stamps` (each statistics folder's manifest hash and file
stamps) and the device kind. ``--device cuda`` (or ``auto`` with a GPU) moves each tensor's inputs
and statistics to the GPU: the Fisher combine, the RegMean solve (``precision`` unset: float32
there) and the fallback run on it.
"""

from __future__ import annotations

from pathlib import Path

METHODS = {"fisher": "fisher", "regmean": "gram"}  # method -> the per-model statistics key
# config-only parameters (no merge_tensors keyword) -> merge_checkpoints_data_aware's keyword
CONFIG_ONLY = {"fisher_normalize": "normalize", "fallback": "fallback", "gram_normalize": "gram_normalize"}
# merge_tensors keywords -> merge_checkpoints_data_aware's
API_KEYWORDS = {
    "floor": "floor",
    "floor_mode": "floor_mode",
    "alpha": "alpha",
    "ridge": "ridge",
    "precision": "precision",
}
UNSUPPORTED_TOP = ("tokenizer_source", "tokenizer", "chat_template")


def _method_of(raw: dict) -> str | None:
    m = raw.get("merge_method")
    return m.strip().lower() if isinstance(m, str) and m.strip().lower() in METHODS else None


def _is_filters(value) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def _config_only_choices(method: str, top: dict) -> list:
    """The config-only choices (fisher_normalize, fallback, gram_normalize: no merge_tensors
    keyword, so make_recipe does not see them) checked against their values."""
    from m3kernels.merge.registry import CHOICE, get_method

    out = []
    for p in get_method(method).params:
        if p.kind == CHOICE and not p.api and p.name in top and not _is_filters(top[p.name]):
            v = top[p.name]
            if not (isinstance(v, str) and v.strip().lower() in p.choices):
                out.append(f"parameters.{p.name}: must be one of {', '.join(p.choices)}, got {v!r}")
    return out


def check_statistics_keys(raw: dict) -> list:
    """The blockers of a fisher / regmean config the generic parser does not see: a model without
    its statistics folder, a folder given at the top level (one folder for every model), filters
    on a parameter (these methods take one value per model / merge), a config-only choice out of
    its values, a LoRA reference (the statistics fingerprint a checkpoint folder), and the keys
    the data-aware writer does not implement. One message each; [] for any other method."""
    method = _method_of(raw)
    if method is None:
        return []
    key = METHODS[method]
    out = []
    top = raw.get("parameters")
    if isinstance(top, dict):
        if top.get(key) is not None:
            out.append(
                f"parameters.{key}: per model only (each model has its own statistics folder): "
                f"set models[i].parameters.{key}"
            )
        for name, value in top.items():
            if _is_filters(value):
                out.append(
                    f"parameters.{name}: method {method!r} takes one value (no filters by tensor name)"
                )
        out += _config_only_choices(method, top)
    for name in UNSUPPORTED_TOP:
        if raw.get(name) is not None:
            out.append(
                f"{name}: not implemented for {method} yet (the output gets model 0's tokenizer files)"
            )
    entries = raw.get("models")
    if not isinstance(entries, list):
        return out
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue  # the parser reports it
        model = entry.get("model")
        if isinstance(model, str) and "+" in model:
            out.append(
                f"models[{i}].model: a LoRA reference (MODEL+ADAPTER) is not supported with merge_method "
                f"{method} (the statistics are of a checkpoint folder: merge the adapter first)"
            )
        params = entry.get("parameters")
        params = params if isinstance(params, dict) else {}
        value = params.get(key)
        if value is None:
            out.append(
                f"models[{i}].parameters.{key}: required for merge_method {method}: the folder of this "
                f"model's statistics (m3kernels stats {method} MODEL DATA OUT)"
            )
        elif not isinstance(value, str) or not value.strip():
            out.append(
                f"models[{i}].parameters.{key}: expected a statistics folder path (string), got {value!r}"
            )
        for name, v in params.items():
            if name != key and _is_filters(v):
                out.append(
                    f"models[{i}].parameters.{name}: method {method!r} takes one value per model "
                    f"(no filters by tensor name)"
                )
    return out


def _options(cfg, first_tensor: str) -> tuple[list, dict]:
    """(weights, merge_checkpoints_data_aware's method keywords) from a parsed config."""
    from m3kernels.merge.registry import get_method

    method = get_method(cfg.method)
    kw = cfg.kwargs_at(first_tensor, 0.0)  # one value per model / merge (no gradients, no filters)
    weights = list(kw.get("weights") or [1.0] * len(cfg.models))
    opts = {}
    for p in method.params:
        if p.api in API_KEYWORDS:  # unset: the registry's default
            opts[API_KEYWORDS[p.api]] = p.default if kw.get(p.api) is None else kw[p.api]
        elif p.name in CONFIG_ONLY and p.config:
            s = cfg.parameters.get(p.name)
            value = p.default if s is None else s.at(first_tensor, 0.0)
            opts[CONFIG_ONLY[p.name]] = value
    if "alpha" in opts:
        opts["alpha"] = float(opts["alpha"])
    return weights, opts


def statistics_paths(cfg, cfg_dir) -> list:
    """Each model's statistics folder, resolved as model paths are."""
    from m3kernels.checkpoint.inputs import _resolve_model_path

    key = METHODS[cfg.method]
    return [_resolve_model_path(params[key].value, cfg_dir) for params in cfg.model_parameters]


def check_statistics(cfg, cfg_dir, models, plan) -> list:
    """Open every statistics folder: finished, of the method's kind, computed from its model
    (fingerprint), holding a statistics tensor of the right shape for every tensor the merge
    reads from it (Fisher: every tensor; RegMean: its manifest's layers, in every folder alike).
    Returns one note per folder; M3KError (a user error, naming the folder / tensor) otherwise."""
    from m3kernels.datastats.fingerprint import model_fingerprint
    from m3kernels.datastats.output import StatsFolder
    from m3kernels.errors import TensorMismatchError

    notes = []
    names = [t.name for t in plan.tensors]
    layers0 = None
    for i, (ck, sp) in enumerate(zip(models, statistics_paths(cfg, cfg_dir))):
        role = f"models[{i}].parameters.{METHODS[cfg.method]}"
        st = StatsFolder(sp, kind=cfg.method, role=role)
        try:
            st.check_model(model_fingerprint(ck.path), ck.path)
            if cfg.method == "fisher":
                for n in names:
                    if n not in st.ck:
                        raise TensorMismatchError(
                            f"{role}: {sp} has no Fisher tensor {n!r}", path=str(sp), tensor=n
                        )
                    shape, want = tuple(st.ck.meta(n).shape), tuple(ck.meta(n).shape)
                    if shape != want:
                        raise TensorMismatchError(
                            f"{role}: {sp}: Fisher tensor {n!r} has shape {shape}, expected {want}",
                            path=str(sp),
                            tensor=n,
                        )
            else:
                layers = st.manifest.get("layers") or {}
                if layers0 is None:
                    layers0 = layers
                for n in names:
                    if n in layers0 and n not in layers:
                        raise TensorMismatchError(
                            f"{role}: {sp} has no Gram matrix for layer {n!r} (models[0]'s statistics have one)",
                            path=str(sp),
                            tensor=n,
                        )
                    if n in layers:
                        g = layers[n]
                        shape = tuple(ck.meta(n).shape)
                        want = (shape[1], shape[1]) if len(shape) == 2 else None
                        if g not in st.ck or want is None or tuple(st.ck.meta(g).shape) != want:
                            raise TensorMismatchError(
                                f"{role}: {sp}: no Gram matrix {g!r} of shape {want} for layer {n!r}",
                                path=str(sp),
                                tensor=n,
                            )
            c = st.manifest.get("counts", {})
            notes.append(
                f"{cfg.method} statistics of models[{i}]: {sp} ({c.get('examples', '?')} examples, "
                f"{c.get('tokens', '?')} tokens; fingerprint matches {ck.path})"
            )
        finally:
            st.close()
    if cfg.method == "regmean":
        n_layers = sum(1 for n in names if n in (layers0 or {}))
        notes.append(
            f"regmean: {n_layers} linear weights solved, {len(names) - n_layers} tensors by the fallback"
        )
    return notes


def statistics_stamps(stats) -> list:
    """What the resume fingerprint knows of each opened statistics folder: its manifest's hash
    and every tensor file's (name, size, mtime, header hash): a folder recomputed, replaced or
    touched since a killed merge makes ``--resume`` start over."""
    import hashlib

    from m3kernels.datastats.output import MANIFEST

    out = []
    for s in stats:
        manifest = hashlib.sha256((s.path / MANIFEST).read_bytes()).hexdigest()
        out.append({"path": str(s.path.resolve()), "manifest": manifest, "files": s.ck.file_stamps()})
    return out


def data_aware_producer(plan, merger):
    """A ``producer`` for :func:`~m3kernels.checkpoint.run.write_shards`: the plan's tensors in
    write order, each merged by ``merger`` (:class:`~m3kernels.datastats.merge.DataAwareMerger`)
    from the planned models' tensors (memory-mapped views, released once merged); COPY tensors
    (integer buffers) as the main merge copies them."""
    import torch

    from m3kernels.checkpoint.plan import COPY, MERGE
    from m3kernels.checkpoint.produce import Prefetcher
    from m3kernels.errors import M3KError

    def produce(todo, device):
        merger.device = torch.device(device)  # a distributed rank: its own cuda:LOCAL_RANK
        pre = Prefetcher(todo)  # the OS reads the next tensors' model bytes ahead, as produce_cpu
        try:
            for k, pt in enumerate(todo):
                pre.advance(k)
                if pt.action == COPY:
                    yield pt, pt.models[0].tensor(), pt.release
                    continue
                if pt.action != MERGE:
                    raise M3KError(
                        f"tensor {pt.name!r}: merge_method {plan.config.method} needs the same shape in "
                        f"every model (planned as {pt.action})",
                        tensor=pt.name,
                    )
                out = merger.merge(pt.name, [s.tensor() for s in pt.models], pt.out_dtype)
                pt.release()
                yield pt, out, None
        finally:
            pre.close()

    return produce


def merge_data_aware_config(
    cfg,
    cfg_dir,
    models,
    opened,
    plan,
    out_dir: Path,
    *,
    dry_run: bool,
    force: bool,
    resume: bool,
    progress: bool,
    device: str,
    distributed: bool,
    backend: str = "auto",
    out_shard_size: int | None = None,
    dist_timeout: float | None = None,
):
    """merge_checkpoints' path for fisher / regmean (module docstring): the plan (``dry_run``),
    else a :class:`~m3kernels.checkpoint.run.MergeResult`."""
    from m3kernels.checkpoint import DEFAULT_SHARD_SIZE
    from m3kernels.checkpoint.output_guard import OutputLock, check_out_dir
    from m3kernels.checkpoint.run import resolve_device, run_merge
    from m3kernels.checkpoint.writer import tidy_temp_folders
    from m3kernels.datastats.merge import DataAwareMerger, check_options
    from m3kernels.datastats.output import StatsFolder

    notes = check_statistics(cfg, cfg_dir, models, plan)
    sts = []
    try:
        for i, sp in enumerate(statistics_paths(cfg, cfg_dir)):
            sts.append(StatsFolder(sp, kind=cfg.method, role=f"models[{i}].parameters.{METHODS[cfg.method]}"))
        inputs = list(opened) + [s.ck for s in sts]  # OUT in, at or above a statistics folder: refused
        check_out_dir(out_dir, force, inputs)
        if dry_run:
            plan.notes.extend(notes)
            return plan
        dev = resolve_device(device, backend)
        weights, opts = _options(cfg, plan.tensors[0].name)
        if cfg.method == "regmean" and cfg.kwargs_at(plan.tensors[0].name, 0.0).get("precision") is None:
            opts["precision"] = (
                "float32" if dev.type == "cuda" else "float64"
            )  # unset: the GPU solves in float32
        fallback = opts.pop("fallback", "average")
        checked = check_options(
            cfg.method, len(models), weights=weights, mix_ratios=plan.mix_ratios, seed=plan.seed, **opts
        )
        names = [t.name for t in plan.tensors if t.action != "copy"]
        merger = DataAwareMerger(sts, checked, names, fallback=fallback, device=dev)
        record_extra = {
            "weights": checked["weights"],
            "options": merger.options,
            "statistics": merger.statistics_record(),
        }
        stamps = {"device": dev.type, "statistics": statistics_stamps(sts)}
        shard_size = DEFAULT_SHARD_SIZE if out_shard_size is None else out_shard_size
        if distributed:  # rank 0 takes OUT's lock (distributed.run_distributed)
            from m3kernels.checkpoint.distributed import DEFAULT_TIMEOUT_S, run_distributed

            result = run_distributed(
                plan,
                out_dir,
                opened=inputs,
                device=dev.type,
                backend=backend,
                out_shard_size=shard_size,
                force=force,
                resume=resume,
                progress=progress,
                timeout_s=DEFAULT_TIMEOUT_S if dist_timeout is None else float(dist_timeout),
                producer=data_aware_producer(plan, merger),
                record_extra=record_extra,
                fingerprint_extra=stamps,
            )
            result.notes.extend(notes)
            return result
        with OutputLock(out_dir) as lock:  # as the main merge (run.merge_checkpoints)
            if lock.exclusive:
                tidy_temp_folders(out_dir)
            check_out_dir(out_dir, force, inputs, under_lock=True)
            result = run_merge(
                plan,
                out_dir,
                device=dev,
                backend=backend,
                out_shard_size=shard_size,
                force=force,
                resume=resume,
                progress=progress,
                producer=data_aware_producer(plan, merger),
                record_extra=record_extra,
                fingerprint_extra=stamps,
            )
    finally:
        for s in sts:
            s.close()
    result.notes.extend(notes)
    return result


__all__ = [
    "check_statistics_keys",
    "check_statistics",
    "data_aware_producer",
    "merge_data_aware_config",
    "statistics_paths",
    "statistics_stamps",
]
