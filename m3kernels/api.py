"""The tensor-level API: ``merge_tensors`` and its helpers, for this package and other tools.

Validates the arguments, resolves the method preset (:mod:`m3kernels.merge.recipe`), runs stage A
(L1 sums and exact trim thresholds; a method with a registry ``family`` runs its own hook in
:mod:`m3kernels.merge.methods`) and stage B on the chosen backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from m3kernels.backends import get_backend
from m3kernels.merge import trim_ties
from m3kernels.merge.finite import finite_l1_sums, report_non_finite
from m3kernels.merge.job import MergeJob
from m3kernels.merge.kernel_params import (
    DTYPE_CODES,
    TRIM_KEEP_ALL,
    TRIM_KEEP_NONE,
    dare_as_keep_mask,
    f32,
    make_params,
    trim_k,
)
from m3kernels.merge.recipe import Recipe, make_recipe
from m3kernels.merge.select import (
    bits_to_float,
    sample_runs,
    select_from_keys,
    select_thresholds,
    select_thresholds_single_pass,
)
from m3kernels.merge.trim_rescale import rescale_after_trim

SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def _check_tensor(t, arg: str):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"{arg} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def validate_inputs(base, models, out=None, out_dtype=None):
    """Check tensors, shapes, devices; return (base, models, out_dtype) with contiguous inputs."""
    if isinstance(models, torch.Tensor) or models is None:
        raise ValueError("models must be a sequence of tensors (one per fine-tuned model)")
    models = list(models)
    if not models:
        raise ValueError("models: at least one model is needed (N = 0)")
    for i, m in enumerate(models):
        _check_tensor(m, f"models[{i}]")
    shape, device = models[0].shape, models[0].device
    for i, m in enumerate(models):
        if m.shape != shape:
            raise ValueError(f"models[{i}] has shape {tuple(m.shape)}, models[0] has {tuple(shape)}")
        if m.device != device:
            raise ValueError(f"models[{i}] is on {m.device}, models[0] on {device}")
    if base is not None:
        _check_tensor(base, "base")
        if base.shape != shape:
            raise ValueError(f"base has shape {tuple(base.shape)}, models have {tuple(shape)}")
        if base.device != device:
            raise ValueError(f"base is on {base.device}, models on {device}")
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else (base.dtype if base is not None else models[0].dtype)
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use float32, bfloat16 or float16")
    if out is not None:
        _check_tensor(out, "out")
        if out.shape != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, models have {tuple(shape)}")
        if out.dtype != out_dtype:
            raise ValueError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, models on {device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    models = [m.contiguous() for m in models]
    base = base.contiguous() if base is not None else None
    return base, models, out_dtype


def thresholds_to_bits(thresholds: Sequence[float | None]) -> np.ndarray:
    """Trim thresholds as values (None: keep all, inf: keep none) -> kernel bit patterns."""
    bits = []
    for t in thresholds:
        if t is None:
            bits.append(TRIM_KEEP_ALL)
            continue
        t = float(t)
        if math.isnan(t) or t < 0:
            raise ValueError(f"thresholds must be >= 0 (or None, or inf to keep nothing), got {t}")
        if math.isinf(t):
            bits.append(TRIM_KEEP_NONE)
        else:
            bits.append(int(np.array([t], dtype=np.float32).view(np.uint32)[0]))
    return np.asarray(bits, dtype=np.uint64)


KEEP_BITS_MAX_BYTES = 256 << 20  # DARE keep bits kept from stage A for stage B up to this size
# (N models x numel / 8 bytes: 41 MB for a 13B embedding and 2 models); above it, Philox again
SMALL_TENSOR_NUMEL = 1 << 16  # up to this many elements, stage A selects the trim thresholds directly


def small_tensor_keys(p, base, models, backend) -> np.ndarray | None:
    """bits(|δ'_i|) of every element (uint32[n, numel], δ' = the delta after the DARE step): the
    values ``backend.histogram`` counts, from the backend's ``delta_keys`` (the CPU extension runs
    the same kernel code as for its histograms). None for a backend without it (Triton, CUDA:
    their histograms are used)."""
    fn = getattr(backend, "delta_keys", None)
    return None if fn is None else fn(p, base, models)


def prepare(base, models, recipe: Recipe, name: str, backend, thresholds=None):
    """Stage A for one tensor: kernel params with the L1 scale and trim thresholds filled in.

    Trim thresholds are the exact k-th largest bits(|δ'|): for tensors of at most
    SMALL_TENSOR_NUMEL elements a selection among the bit patterns themselves (without the fixed
    cost of two 65,536-bin histograms), else :func:`large_tensor_thresholds` (one pass on the CPU,
    two histogram passes on the GPU backends); the same result every way.
    """
    trim_bits = thresholds_to_bits(thresholds) if thresholds is not None else None  # validates first
    from m3kernels.merge.ties_variants import features as ties_features

    if ties_features(recipe):  # vote / divide_by "count": the backend must have the pieces
        from m3kernels.merge.methods import require

        require(backend, recipe.method, *ties_features(recipe))
    p = make_params(recipe, name, base is not None)
    b = base if p.has_base else None
    keep_bits = None  # DARE's keep bits from the L1 pass, for stage B (CPU backend)
    if recipe.rescale == "l1" and recipe.dare_density is not None:  # DARE's L1 rescale
        with_keep = getattr(backend, "l1_sums_keep", None)
        bits_bytes = recipe.n * ((models[0].numel() + 7) // 8)
        if (
            with_keep is not None
            and bits_bytes <= KEEP_BITS_MAX_BYTES
            and p.keep_mask is None
            and not p.dare_div
            and not trim_ties.exact(recipe)
        ):
            total, kept, keep_bits = with_keep(p, b, models)
        else:
            total, kept = backend.l1_sums(p, b, models)
        if not (
            np.all(np.isfinite(total)) and np.all(np.isfinite(kept))
        ):  # a NaN/inf delta: finite ones only
            total, kept, bad = finite_l1_sums(recipe, name, b, models)
            report_non_finite(name, bad)
        p = p.with_dare_scale([f32(t / k) if k > 0 else 1.0 for t, k in zip(total, kept)])
        if keep_bits is not None:  # stage B (and the trim's counts) read the bits, no Philox again
            p = dare_as_keep_mask(p, keep_bits)
    if recipe.trim_density is not None:
        ks = None
        if trim_bits is not None:
            if trim_ties.exact(recipe):
                raise ValueError("thresholds: given thresholds (whole-model trim) do not take trim_ties 'k'")
            p = p.with_trim(trim_bits)
        elif trim_ties.exact(recipe):  # exactly k per model, ties by the lowest flat index
            from m3kernels.merge.methods import require

            require(backend, recipe.method, "trim_ties_k")
            numel = models[0].numel()
            ks = [trim_k(d, numel) for d in recipe.trim_density]
            p = trim_ties.top_k_params(p, b, models, backend, ks, numel)
        else:
            numel = models[0].numel()
            ks = [trim_k(d, numel) for d in recipe.trim_density]
            keys = small_tensor_keys(p, b, models, backend) if numel <= SMALL_TENSOR_NUMEL else None
            if keys is not None:
                p = p.with_trim(select_from_keys(keys, ks, numel))
            else:
                p = p.with_trim(large_tensor_thresholds(p, b, models, backend, ks, numel))
        if recipe.rescale == "l1" and recipe.dare_density is None:  # ties: mergekit's L1 after the trim
            p = rescale_after_trim(p, b, models, ks)
            if trim_ties.exact(recipe) and ks is not None:  # the moved thresholds: exactly k again
                p = trim_ties.top_k_params(p, b, models, backend, ks, models[0].numel())
    return p, b


def large_tensor_thresholds(p, base, models, backend, ks, numel) -> np.ndarray:
    """The exact k-th largest bits(|δ'_i|) of a large tensor: in one pass over the inputs
    (:func:`~m3kernels.merge.select.select_thresholds_single_pass`) where the backend counts
    brackets (the CPU one), else, and when a bracket misses, by two histogram passes."""

    def hist(prefix):
        return backend.histogram(p, base, models, prefix)

    count = getattr(backend, "bracket_count", None)
    runs = sample_runs(numel)
    if count is None or not hasattr(backend, "sample_keys") or runs == 0:
        return select_thresholds(hist, ks, numel)
    return select_thresholds_single_pass(
        lambda: backend.sample_keys(p, base, models, runs),
        lambda lo, span, fine: count(p, base, models, lo, span, fine),
        hist,
        ks,
        numel,
    )


def _traced(base, models, out) -> bool:
    """True under ``torch.compile`` or for meta / fake tensors, where the raw-pointer path below
    cannot run and the custom op :func:`m3kernels.ops.merge_tensors` can (it calls back here
    with real tensors)."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    ts = [base, out, *(models if isinstance(models, (list, tuple)) else ())]
    return any(isinstance(t, torch.Tensor) and (t.is_meta or is_fake(t)) for t in ts)


# merge_tensors keywords of fisher / regmean only (m3kernels.merge.methods.data_aware)
_DATA_AWARE = ("fisher", "regmean")
_NOT_DATA_AWARE_KWARGS = ("base", "models", "method", "out", "out_dtype", "name", "backend")  # torch code
_DATA_AWARE_KEYWORDS = ("fishers", "grams", "floor", "floor_mode", "ridge", "transposed", "precision")


def merge_tensors(
    base,
    models,
    *,
    method,
    weights=None,
    density=None,
    drop_rate=None,
    normalize=None,
    rescale=None,
    lambda_=1.0,
    mix_ratios=None,
    mixup_alpha=None,
    seed=0,
    name="",
    out_dtype=None,
    backend="auto",
    out=None,
    thresholds=None,
    t=None,
    scale=None,
    epsilon=None,
    r=None,
    alpha=None,
    gamma=None,
    max_iter=None,
    tol=None,
    eps=None,
    normalize_weights=None,
    nuslerp_flatten=None,
    nuslerp_row_wise=None,
    filter_wise=None,
    select_topk=None,
    trim_ties=None,
    fishers=None,
    grams=None,
    floor=None,
    floor_mode=None,
    ridge=None,
    transposed=None,
    precision=None,
    vote=None,
    divide_by=None,
    deltas=False,
) -> torch.Tensor:
    """Merge one tensor of N fine-tuned models (and an optional base) by ``method``.

    The result is the per-element program of docs/KERNEL.md (the contract: docs/SPEC.md §1),
    computed by one fused pass (stage B) after the statistics the method needs (stage A).
    ``m3kernels methods`` (or docs/CONFIG.md) lists each method's parameters and defaults.

    Args:
        base: the base model's tensor θ0 (float32, bfloat16 or float16), or None. Most methods
            need it; ``linear``, ``passthrough`` and ``karcher`` ignore it; ``nuslerp`` and
            ``multislerp`` use it when given (task vectors) and work on the raw tensors without.
        models: sequence of N ≥ 1 tensors, one per fine-tuned model, the base's shape, on the
            base's device; dtypes may differ. ``slerp``, ``nearswap``, ``passthrough`` take one,
            ``nuslerp`` two, ``model_stock`` at least two.
        method: a registered name (``m3kernels.METHODS``): ``linear`` / ``average``,
            ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``ties_dare``,
            ``passthrough``, ``nearswap``, ``ram``, ``ramplus_tl``, ``breadcrumbs``,
            ``breadcrumbs_ties``, ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``,
            ``model_stock``, ``della``, ``della_linear`` (docs/SPEC.md §7 for the last thirteen). A parameter the method does not
            take is a ValueError naming the methods that do.
        weights: w_i, a scalar or one per model (default 1). Finite float32 values. Not for
            ``passthrough``, ``nearswap``, ``ram*``, ``slerp``, ``karcher``, ``model_stock``.
        density: a scalar or one per model in [0, 1]. TIES methods: the fraction of the largest
            |δ_i| the trim keeps (k = max(1, ⌊density·numel⌋), 0 for density 0; default 0.2). DARE methods: the keep
            probability (required, unless ``drop_rate`` is given).
        drop_rate: DARE drop probability p, a scalar or one per model: ``dare_*`` take it as
            density = 1 − p (both may be given if they agree); ``ties_dare`` requires it (the
            DARE step) besides ``density`` (the trim).
        normalize: divide by the (agreeing) weights. Default per method: True for ``linear``,
            ``ties``, ``ties_dare``; False for the others (``task_arithmetic`` then sums).
        rescale: DARE methods: True (default; kept values × 1/density), False (unscaled),
            or ``"l1"`` (kept values × Σ|δ_i| / Σ|δ_i kept|, per model and tensor). ``della*``:
            True (default: that L1 rescale, as mergekit) or False. ``ties``: True for mergekit's
            L1 rescale after the trim (kept δ × Σ|δ| / Σ|kept δ|, per model and tensor;
            m3kernels/merge/trim_rescale.py), False (default).
        lambda_: the scale s of the merged delta: θ = θ0 + s·m (default 1).
        mix_ratios: M³ ratios r_i given directly: one per model (≥ 0), or a scalar λ for two
            models, meaning (λ, 1 − λ). The combine weights become r_i·w_i.
        mixup_alpha: M³ with drawn ratios: λ ~ Beta(α, α) for two models, Dirichlet(α·1)
            beyond, one draw from ``seed`` (see :func:`m3kernels.draw_mix_ratios`). Not with
            ``mix_ratios``.
        seed: integer in [0, 2**64) keying the DARE stream (below 2**32 with ``mixup_alpha``).
        name: the tensor's name; with ``seed`` and the model index it keys the DARE mask, so
            the same (seed, name) gives the same mask on every backend and machine.
        out_dtype: float32, bfloat16 or float16 (default: ``out``'s dtype, else the base's,
            else the first model's).
        backend: ``"auto"`` (CPU kernel on CPU tensors; CUDA, else Triton, on CUDA tensors),
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        out: an optional contiguous output tensor (shape of the models, dtype ``out_dtype``,
            their device); written in place and returned.
        thresholds: one trim threshold per model (a float ≥ 0, None to keep all, inf to keep
            none) instead of the per-tensor ones, e.g. whole-model thresholds. ``ties`` and
            ``ties_dare`` only.
        t: ``slerp``: the interpolation fraction (required unless M³ draws it: 0 the base, 1 the
            model). ``nearswap``: the distance limit (required): y = base + clamp(x − base, −t, t)
            in mergekit's float32 form.
        scale: ``passthrough``: multiply the copied tensor by this (one float32 product; None: an
            exact copy).
        epsilon: ``ram``, ``ramplus_tl``: a model counts at an element where |δ| > epsilon
            (default 1e-5). ``della*``: the keep-probability spread, a scalar or one per model
            (default 0.15): density − epsilon for a row's smallest |δ|, density + epsilon for its
            largest (both in (0, 1) when 0 < density < 1). ``della*``'s ``density`` is the mean
            keep probability (default 1.0: nothing dropped) and ``rescale`` (default True) the
            tensor-wide L1 rescale (docs/SPEC.md §7).
        r: ``ramplus_tl``: boost of unique contributions (default 0.1).
        alpha: ``ramplus_tl``: cap on shared/unique (default 0.2; not M³'s ``mixup_alpha``).
        gamma: ``breadcrumbs*``: fraction of the largest |δ| dropped, a scalar or one per model in
            [0, 1] (default 0.01; ignored where density is 1). ``density`` is their kept fraction
            (default 1.0: no trim).
        max_iter: ``karcher``: most iterations, an integer in [0, 100000] (default 10).
        tol: ``karcher``: norm, angle and convergence tolerance (default 1e-5).
        eps: ``multislerp``: added to the norms (default 1e-8).
        normalize_weights: ``multislerp``: divide the weights by their sum (default True).
        nuslerp_flatten: ``nuslerp``: one vector per tensor (default True), else per row / column.
        nuslerp_row_wise: ``nuslerp`` with ``nuslerp_flatten=False``: vectors along dim 0 (True)
            or along the last dim (False, default).
        filter_wise: ``model_stock``: one t per row (slice along the last dim; default False).
        select_topk: ``sce``: the fraction of the elements with nonzero variance over the models
            that is kept (default 1.0: no select; <= 0 keeps nothing; exactly k, ties by lowest
            flat index). ``sce`` and ``arcee_fusion`` take no weights.
        trim_ties: ``ties``, ``ties_dare``, ``breadcrumbs*``: ``"all"`` (default: every element
            tied with a trim threshold is kept) or ``"k"`` (exactly k kept per model, ties broken
            by the lowest flat index; the same on every backend whose FEATURES have trim_ties_k).
        vote: ``ties``, ``dare_ties``, ``ties_dare``, ``breadcrumbs_ties``, ``della``: the sign vote, ``"weighted"`` (default: the
            sign of Σ w_i·δ_i, agreement by sign(w_i·δ_i)), ``"unweighted"`` (of Σ δ_i, agreement
            by sign(δ_i); the weights, negative allowed, only scale the values: PEFT's "total")
            or ``"count"`` (of Σ sgn(δ_i): PEFT's "frequency"). m3kernels/merge/ties_variants.py.
        divide_by: the same methods: the disjoint merge's divisor, ``"weights"`` (the agreeing
            weights; = normalize True), ``"count"`` (the number of agreeing models, at least 1:
            PEFT's) or ``"none"`` (= normalize False); default: what ``normalize`` says.
        deltas: True: ``models`` are task vectors and ``base`` is None (θ0 = 0; the result is the
            merged delta s·m). For the task-vector methods (``task_arithmetic``, ``ties``,
            ``dare_*``, ``ties_dare``, ``magnitude_prune``).
        fishers: ``fisher``: one diagonal-Fisher tensor per model (the tensor's shape; float32,
            bfloat16, float16 or float64; ``m3kernels stats fisher``), required. θ = Σ cᵢF̃ᵢθᵢ /
            Σ cᵢF̃ᵢ per element, cᵢ = wᵢ·rᵢ (docs/DATA_AWARE.md): ``floor`` (>= 0, default 1e-6)
            and ``floor_mode`` (``"max"``: F̃ = max(F, floor), default; ``"add"``: F + floor).
        grams: ``regmean``: one Gram matrix XᵀX of the layer's inputs per model ([in, in];
            ``m3kernels stats regmean``), required; the tensor is a linear weight [out, in]
            (``transposed=True``: [in, out]). ``alpha`` (in [0, 1], default 0.1) scales the
            off-diagonal, ``ridge`` (>= 0, default 0) adds ridge·mean(diag)·I, ``precision``
            ``"float64"`` (CPU Cholesky, default) or ``"float32"`` (on the Grams' device, residual
            checked). ``fisher`` and ``regmean`` do not use ``base`` and run
            :mod:`m3kernels.merge.data_aware` (torch code, not the fused kernel).

    Returns:
        ``out`` (allocated when not given) holding the merged tensor.

    Raises:
        ValueError: naming the offending argument (unknown method, bad shape, dtype or device,
            value out of range, a parameter the method does not take, a missing base).
    """
    if isinstance(method, str) and method.strip().lower() in _DATA_AWARE:  # statistics: not the kernel
        kwargs = {k: v for k, v in locals().items() if k not in _NOT_DATA_AWARE_KWARGS}
        from m3kernels.merge.methods.data_aware import merge_data_aware

        return merge_data_aware(base, models, method, kwargs, out=out, out_dtype=out_dtype, name=name)
    if _traced(base, models, out):  # torch.compile, meta or fake tensors: the custom op (ops.py)
        kwargs = {
            k: v
            for k, v in locals().items()
            if k not in ("base", "models") and not (k in _DATA_AWARE_KEYWORDS and v is None)
        }
        from m3kernels.ops import merge_tensors as op_merge

        return op_merge(base, models, **kwargs)
    base, models, out_dtype = validate_inputs(base, models, out, out_dtype)
    recipe = make_recipe(
        len(models),
        method=method,
        has_base=base is not None,
        weights=weights,
        density=density,
        drop_rate=drop_rate,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        mix_ratios=mix_ratios,
        mixup_alpha=mixup_alpha,
        seed=seed,
        t=t,
        scale=scale,
        epsilon=epsilon,
        r=r,
        alpha=alpha,
        gamma=gamma,
        max_iter=max_iter,
        tol=tol,
        eps=eps,
        normalize_weights=normalize_weights,
        nuslerp_flatten=nuslerp_flatten,
        nuslerp_row_wise=nuslerp_row_wise,
        filter_wise=filter_wise,
        select_topk=select_topk,
        trim_ties=trim_ties,
        fishers=fishers,
        grams=grams,
        floor=floor,
        floor_mode=floor_mode,
        ridge=ridge,
        transposed=transposed,
        precision=precision,
        vote=vote,
        divide_by=divide_by,
        deltas=deltas,
    )
    if thresholds is not None:
        if recipe.trim_density is None or recipe.family is not None:
            raise ValueError(f"thresholds: method {recipe.method!r} has no top-k magnitude trim")
        if len(thresholds) != recipe.n:
            raise ValueError(f"thresholds: expected {recipe.n} values, got {len(thresholds)}")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    be = get_backend(backend, models[0].device)
    if out is None:
        out = torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    return merge_job(MergeJob(name, base, models, out_dtype, recipe, thresholds), be, out)


def merge_job(job: MergeJob, backend, out: torch.Tensor) -> torch.Tensor:
    """Merge one prepared tensor into ``out``: stage A (the statistics ``job.recipe`` needs), then
    stage B on ``backend`` (a backend module, :func:`m3kernels.backends.get_backend`).

    The one function every path calls: ``merge_tensors`` (after checking its arguments), the
    checkpoint merge on the CPU and the GPU pipeline. ``job``'s tensors must already be checked
    (contiguous, one device, the shape of ``out``).
    """
    if out.numel() == 0:
        return out
    if getattr(job.recipe, "family", None) is not None:  # the method's own stage A (merge/methods)
        from m3kernels.merge import methods

        if job.thresholds is not None:
            raise ValueError(f"thresholds: method {job.recipe.method!r} has no top-k magnitude trim")
        return methods.merge(job, backend, out)
    p, b = prepare(job.base, job.models, job.recipe, job.name, backend, job.thresholds)
    backend.merge(p, b, job.models, out)
    return out


def trim_thresholds(base, models, *, method, name="", backend="auto", **kwargs) -> list:
    """The per-tensor trim thresholds stage A computes (float per model; None: no trim)."""
    base, models, _ = validate_inputs(base, models)
    recipe = make_recipe(len(models), method=method, has_base=base is not None, **kwargs)
    if recipe.family is not None:  # the issue-8 methods: no top-k trim threshold
        if recipe.trim_density is not None:
            raise ValueError(f"trim_thresholds: method {recipe.method!r} trims a window, not the top k")
        return [None] * recipe.n
    be = get_backend(backend, models[0].device)
    if recipe.rescale == "l1" and recipe.dare_density is None:  # ties' L1 rescale: thresholds of |δ|
        recipe = dataclasses.replace(recipe, rescale="none")
    p, _ = prepare(base, models, recipe, name, be)
    if recipe.trim_density is None:
        return [None] * recipe.n
    return [bits_to_float(int(x)) for x in p.trim_min]


__all__ = [
    "merge_tensors",
    "merge_job",
    "trim_thresholds",
    "validate_inputs",
    "prepare",
    "thresholds_to_bits",
]
