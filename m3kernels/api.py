"""The tensor-level API: ``merge_tensors`` and its helpers, for this package and other tools.

Validates the arguments, resolves the method preset (:mod:`m3kernels.merge.recipe`), runs stage A
(L1 sums and exact trim thresholds) and stage B on the chosen backend.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from m3kernels.backends import get_backend
from m3kernels.merge.kernel_params import DTYPE_CODES, TRIM_KEEP_ALL, TRIM_KEEP_NONE, f32, make_params, trim_k
from m3kernels.merge.recipe import Recipe, make_recipe
from m3kernels.merge.select import bits_to_float, select_thresholds

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


def thresholds_to_bits(thresholds: Sequence[Optional[float]]) -> np.ndarray:
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


def prepare(base, models, recipe: Recipe, name: str, backend, thresholds=None):
    """Stage A for one tensor: kernel params with the L1 scale and trim thresholds filled in."""
    trim_bits = thresholds_to_bits(thresholds) if thresholds is not None else None  # validates first
    p = make_params(recipe, name, base is not None)
    b = base if p.has_base else None
    if recipe.rescale == "l1":
        total, kept = backend.l1_sums(p, b, models)
        p = p.with_dare_scale([f32(t / k) if k > 0 else 1.0 for t, k in zip(total, kept)])
    if recipe.trim_density is not None:
        if trim_bits is not None:
            p = p.with_trim(trim_bits)
        else:
            numel = models[0].numel()
            ks = [trim_k(d, numel) for d in recipe.trim_density]
            p = p.with_trim(select_thresholds(lambda prefix: backend.histogram(p, b, models, prefix),
                                              ks, numel))
    return p, b


def merge_tensors(base, models, *, method, weights=None, density=None, drop_rate=None,
                  normalize=None, rescale=None, lambda_=1.0, mix_ratios=None, mixup_alpha=None,
                  seed=0, name="", out_dtype=None, backend="auto", out=None,
                  thresholds=None) -> torch.Tensor:
    """Merge one tensor of N fine-tuned models (and an optional base) by ``method``.

    See SPEC §1 for the methods and their defaults. ``mix_ratios`` (or ``mixup_alpha`` with
    ``seed``) turn on M³; ``name`` keys the DARE random stream; ``thresholds`` (one float
    per model) overrides the per-tensor trim thresholds, e.g. with whole-model ones.
    Returns ``out`` (allocated when not given) holding the merged tensor.
    """
    base, models, out_dtype = validate_inputs(base, models, out, out_dtype)
    recipe = make_recipe(len(models), method=method, has_base=base is not None, weights=weights,
                         density=density, drop_rate=drop_rate, normalize=normalize,
                         rescale=rescale, lambda_=lambda_, mix_ratios=mix_ratios,
                         mixup_alpha=mixup_alpha, seed=seed)
    if thresholds is not None:
        if recipe.trim_density is None:
            raise ValueError(f"thresholds: method {recipe.method!r} has no magnitude trim")
        if len(thresholds) != recipe.n:
            raise ValueError(f"thresholds: expected {recipe.n} values, got {len(thresholds)}")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    be = get_backend(backend, models[0].device)
    if out is None:
        out = torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    if out.numel() == 0:
        return out
    p, b = prepare(base, models, recipe, name, be, thresholds)
    be.merge(p, b, models, out)
    return out


def trim_thresholds(base, models, *, method, name="", backend="auto", **kwargs) -> list:
    """The per-tensor trim thresholds stage A computes (float per model; None: no trim)."""
    base, models, _ = validate_inputs(base, models)
    recipe = make_recipe(len(models), method=method, has_base=base is not None, **kwargs)
    be = get_backend(backend, models[0].device)
    p, _ = prepare(base, models, recipe, name, be)
    if recipe.trim_density is None:
        return [None] * recipe.n
    return [bits_to_float(int(x)) for x in p.trim_min]


__all__ = ["merge_tensors", "trim_thresholds", "validate_inputs", "prepare", "thresholds_to_bits"]
