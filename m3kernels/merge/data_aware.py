"""Data-aware merges of one tensor: Fisher-weighted averaging and RegMean, with float64 references.

``fisher_merge``: θ = Σᵢ cᵢF̃ᵢθᵢ / Σᵢ cᵢF̃ᵢ per element (Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging"), cᵢ = wᵢ·rᵢ·sᵢ (weight, M³ ratio, per-model normalisation scale) and
F̃ᵢ = max(Fᵢ, floor) (the paper's floor, ``floor_mode="max"``) or Fᵢ + floor (FusionBench's
``minimal_fisher_weight``, ``floor_mode="add"``). Where Σ cᵢF̃ᵢ = 0 (floor 0 and every F 0) the
element is the c-weighted average. Computed in float32 by the fused Fisher stage-B kernel of the
chosen backend (``backend``: ``"auto"`` = the C++ kernel on the CPU, the CUDA kernel, else Triton,
on a GPU; ``"cpu"``, ``"triton"``, ``"cuda"``; ``"torch"`` = chunked torch code, ``chunk`` elements
at a time, also the fallback where no kernel is built): one pass over 2N + 1 streams, every float32
operation separately rounded in the order of docs/DATA_AWARE.md ("Fisher in the fused kernel"),
the same bits on every kernel backend and thread count.

``regmean_merge``: for a linear weight, W = argmin Σᵢ cᵢ‖XᵢWᵀ − XᵢWᵢᵀ‖² with the Gram matrices
Gᵢ = XᵢᵀXᵢ: Wᵀ = (Σ cᵢG̃ᵢ)⁻¹ Σ cᵢG̃ᵢWᵢᵀ, G̃ = α·G + (1 − α)·diag(G) (Jin et al., "Dataless
Knowledge Fusion by Merging Weights of Language Models": the off-diagonal scaling, default
α = :data:`REGMEAN_ALPHA`), cᵢ = wᵢ·rᵢ. Convention: ``W [out, in]``, y = x Wᵀ (``nn.Linear``);
``transposed=True`` for ``W [in, out]`` (GPT-2's Conv1D). Solved in float64 (Cholesky) on the
CPU, or in float32 on the Grams' device with a residual check (float64 on the CPU when the check
fails). A singular system raises :class:`SingularSystemError` naming the layer; ``ridge`` > 0
adds ridge·mean(diag)·I to the system.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from m3kernels.merge.mixup import as_per_model

log = logging.getLogger("m3kernels")

F32, F64 = torch.float32, torch.float64
FISHER_FLOOR = 1e-6  # both the Fisher-merging paper's code and FusionBench
REGMEAN_ALPHA = 0.1  # the RegMean authors' released T5 / DeBERTa configs (regmean_reduce_nondiag: 0.1)
FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
STAT_TYPES = FLOAT_TYPES + (torch.float64,)
RESIDUAL_TOL = 1e-4
CHUNK = 1 << 20


class SingularSystemError(ValueError):
    """The RegMean system Σ cᵢG̃ᵢ of a layer is singular (or not positive definite)."""


def _per_model(value, n: int, arg: str, default: float = 1.0) -> list[float]:
    vals = as_per_model(value, n, arg)
    vals = [default] * n if vals is None else list(vals)
    for v in vals:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{arg}: values must be finite and >= 0, got {vals}")
    return vals


def coefficients(n: int, weights=None, mix_ratios=None, model_scales=None) -> list[float]:
    """cᵢ = wᵢ·rᵢ·sᵢ (each default 1), validated: finite, >= 0, not all 0."""
    w = _per_model(weights, n, "weights")
    r = _per_model(mix_ratios, n, "mix_ratios")
    s = _per_model(model_scales, n, "model_scales")
    c = [a * b * d for a, b, d in zip(w, r, s)]
    if not any(x > 0 for x in c):
        raise ValueError(f"the per-model coefficients w·r·s are all 0 ({c}): nothing to merge")
    return c


def _check_floor(floor, floor_mode) -> float:
    if floor_mode not in ("max", "add"):
        raise ValueError(f"floor_mode must be 'max' (the paper) or 'add' (FusionBench), got {floor_mode!r}")
    if (
        isinstance(floor, bool)
        or not isinstance(floor, (int, float))
        or not math.isfinite(floor)
        or floor < 0
    ):
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
    return float(floor)


def _check_pairs(models, stats, what: str, stat_shape=None):
    if isinstance(models, torch.Tensor) or isinstance(stats, torch.Tensor):
        raise ValueError(f"models and {what} must be sequences of tensors (one per model)")
    try:
        models, stats = list(models), list(stats)
    except TypeError:
        raise ValueError(f"models and {what} must be sequences of tensors (one per model)") from None
    if not models:
        raise ValueError("models: at least one model is needed (N = 0)")
    if len(stats) != len(models):
        raise ValueError(f"{what}: {len(stats)} given for {len(models)} models")
    shape, device = models[0].shape, models[0].device
    for i, (m, f) in enumerate(zip(models, stats)):
        for t, arg, ok in ((m, f"models[{i}]", FLOAT_TYPES), (f, f"{what}[{i}]", STAT_TYPES)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in ok:
                raise ValueError(f"{arg} has dtype {t.dtype}; supported: {', '.join(str(d)[6:] for d in ok)}")
            if t.device != device:
                raise ValueError(f"{arg} is on {t.device}, models[0] on {device}")
        if m.shape != shape:
            raise ValueError(f"models[{i}] has shape {tuple(m.shape)}, models[0] has {tuple(shape)}")
        want = shape if stat_shape is None else stat_shape(m)
        if tuple(f.shape) != tuple(want):
            raise ValueError(f"{what}[{i}] has shape {tuple(f.shape)}, expected {tuple(want)}")
    return models, stats


def _out(out, out_dtype, models):
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else models[0].dtype
    if out_dtype not in FLOAT_TYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use float32, bfloat16 or float16")
    if out is None:
        return torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    if (
        out.shape != models[0].shape
        or out.dtype != out_dtype
        or out.device != models[0].device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {out_dtype} tensor of shape {tuple(models[0].shape)} on {models[0].device}"
        )
    return out


# ----------------------------------------------------------------------------- fisher
FISHER_BACKENDS = ("auto", "cpu", "triton", "cuda", "torch")
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CUDA_MAX_MODELS = 16  # the CUDA kernel's argument block (csrc/cuda/merge_args.h kMaxModels)


def _cpu_kernel():
    try:
        from m3kernels import _C
    except ImportError:
        return None
    return getattr(_C, "fisher_merge", None)


def _cuda_kernel():
    try:
        from m3kernels import _cuda
    except ImportError:  # not built, or no libcudart
        return None
    return getattr(_cuda, "fisher_merge", None)


def _triton_ok(device) -> bool:
    from m3kernels.backends import triton as triton_backend

    return triton_backend.supports(device)


def fisher_backend(backend: str, device, n: int) -> str:
    """The backend that merges n models on ``device``: ``backend`` itself once checked, or for
    ``"auto"`` the C++ kernel (CPU) / the CUDA kernel (n <= 16), else Triton (GPU), else torch."""
    if backend not in FISHER_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(FISHER_BACKENDS)}; got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if _cpu_kernel() is not None else "torch"
        if device.type == "cuda":
            if n <= CUDA_MAX_MODELS and _cuda_kernel() is not None:
                return "cuda"
            if _triton_ok(device):
                return "triton"
        return "torch"
    if backend == "cpu" and (device.type != "cpu" or _cpu_kernel() is None):
        raise ValueError(
            f"backend 'cpu': needs CPU tensors (got {device}) and m3kernels._C with fisher_merge (rebuild)"
        )
    if backend == "cuda" and (device.type != "cuda" or n > CUDA_MAX_MODELS or _cuda_kernel() is None):
        raise ValueError(
            f"backend 'cuda': needs CUDA tensors (got {device}), at most {CUDA_MAX_MODELS} models "
            f"(got {n}) and m3kernels._cuda with fisher_merge"
        )
    if backend == "triton" and not _triton_ok(device):
        raise ValueError(f"backend 'triton' does not run on {device} (CPU tensors need TRITON_INTERPRET=1)")
    return backend


def fisher_kernel_args(models, fishers, c, floor: float, floor_mode: str, out) -> dict:
    """The kernels' arguments: contiguous inputs (float64 statistics as float32, which is the
    kernel's first operation on them), coef = f32(cᵢ), coef_sum = f32(Σ cᵢ), floor = f32(floor)."""
    ms = [m.contiguous() for m in models]
    fs = [(f.to(F32) if f.dtype == F64 else f).contiguous() for f in fishers]
    return dict(
        models=ms,
        stats=fs,
        coef=np.asarray(c, dtype=np.float32),
        coef_sum=float(np.float32(math.fsum(c))),
        floor=float(np.float32(floor)),
        floor_mode=0 if floor_mode == "max" else 1,
        out=out,
    )


def run_fisher_kernel(kind: str, a: dict) -> None:
    """One fused stage-B call on ``kind`` ("cpu", "triton", "cuda", or "cuda-emulated": the CUDA
    kernel's chunk code on the host, on CPU tensors) with :func:`fisher_kernel_args`' arguments."""
    ms, fs, out = a["models"], a["stats"], a["out"]
    ptrs = dict(
        model_dtypes=[DTYPE_CODE[m.dtype] for m in ms],
        stat_dtypes=[DTYPE_CODE[f.dtype] for f in fs],
        coef_sum=a["coef_sum"],
        floor=a["floor"],
        floor_mode=a["floor_mode"],
        numel=out.numel(),
        out_dtype=DTYPE_CODE[out.dtype],
    )
    if kind == "cpu":
        _cpu_kernel()(
            model_ptrs=[m.data_ptr() for m in ms],
            stat_ptrs=[f.data_ptr() for f in fs],
            coef=a["coef"],
            out_ptr=out.data_ptr(),
            **ptrs,
        )
    elif kind in ("cuda", "cuda-emulated"):
        emulated = kind == "cuda-emulated"
        dev = out.device
        _cuda_kernel()(
            models=[m.data_ptr() for m in ms],
            stats=[f.data_ptr() for f in fs],
            coef=[float(x) for x in a["coef"]],
            out=out.data_ptr(),
            device=-1 if emulated else dev.index,
            stream=0 if emulated else torch.cuda.current_stream(dev).cuda_stream,
            **ptrs,
        )
    elif kind == "triton":
        from m3kernels.backends.triton.fisher import fisher_merge as triton_fisher

        triton_fisher(ms, fs, a["coef"], a["coef_sum"], a["floor"], a["floor_mode"], out)
    else:
        raise ValueError(f"unknown Fisher kernel {kind!r}")


def _fisher_torch(models, fishers, c, floor, floor_mode, out, chunk):
    """The chunked torch code (no kernel built): the same formula, addcmul may fuse."""
    flat_out = out.view(-1)
    flat_m = [m.reshape(-1) for m in models]
    flat_f = [f.reshape(-1) for f in fishers]
    csum = float(sum(c))
    for s in range(0, flat_out.numel(), chunk):
        e = min(s + chunk, flat_out.numel())
        num = torch.zeros(e - s, dtype=F32, device=out.device)
        den = torch.zeros(e - s, dtype=F32, device=out.device)
        for ci, m, f in zip(c, flat_m, flat_f):
            cf = f[s:e].to(F32, copy=True)
            cf.clamp_min_(floor) if floor_mode == "max" else cf.add_(floor)
            cf.mul_(ci)  # cᵢ·F̃ᵢ
            den.add_(cf)
            num.addcmul_(cf, m[s:e].to(F32))
        num.div_(den)
        zero = den == 0
        if bool(zero.any()):  # no Fisher anywhere here: the c-weighted average
            idx = zero.nonzero()[:, 0]
            avg = sum(ci * m[s:e][idx].to(F32) for ci, m in zip(c, flat_m))
            num[idx] = avg / csum
        flat_out[s:e] = num
    return out


def fisher_merge(
    models,
    fishers,
    *,
    weights=None,
    mix_ratios=None,
    model_scales=None,
    floor: float = FISHER_FLOOR,
    floor_mode: str = "max",
    out_dtype=None,
    out=None,
    chunk: int = CHUNK,
    backend: str = "auto",
) -> torch.Tensor:
    """Fisher-weighted average of one tensor (module docstring): the fused stage-B kernel of
    ``backend`` (default: the best one for the tensors' device), or chunked torch code."""
    models, fishers = _check_pairs(models, fishers, "fishers")
    floor = _check_floor(floor, floor_mode)
    c = coefficients(len(models), weights, mix_ratios, model_scales)
    out = _out(out, out_dtype, models)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    kind = fisher_backend(backend, out.device, len(models))
    if kind == "torch":
        return _fisher_torch(models, fishers, c, floor, floor_mode, out, chunk)
    if out.numel():
        run_fisher_kernel(kind, fisher_kernel_args(models, fishers, c, floor, floor_mode, out))
    return out


def fisher_merge_reference(
    models,
    fishers,
    *,
    weights=None,
    mix_ratios=None,
    model_scales=None,
    floor: float = FISHER_FLOOR,
    floor_mode: str = "max",
) -> torch.Tensor:
    """The float64 oracle of :func:`fisher_merge` (whole tensors; returns float64)."""
    models, fishers = _check_pairs(models, fishers, "fishers")
    floor = _check_floor(floor, floor_mode)
    c = coefficients(len(models), weights, mix_ratios, model_scales)
    m = torch.stack([x.to(F64) for x in models])
    f = torch.stack([x.to(F64) for x in fishers])
    f = torch.maximum(f, torch.tensor(floor, dtype=F64)) if floor_mode == "max" else f + floor
    cc = torch.tensor(c, dtype=F64).reshape(-1, *([1] * (m.dim() - 1)))
    num, den = (cc * f * m).sum(0), (cc * f).sum(0)
    return torch.where(den == 0, (cc * m).sum(0) / cc.sum(), num / den)


def fisher_norm_scales(norms, eps: float = FISHER_FLOOR) -> list[float]:
    """Per-model scales sᵢ of FusionBench's ``normalize_fisher_weight``: sᵢ ∝ 1/(‖Fᵢ‖₂ + eps),
    normalised to sum to 1, with ‖Fᵢ‖₂ the L2 norm of model i's Fisher over all parameters."""
    inv = [1.0 / (float(n) + eps) for n in norms]
    total = sum(inv)
    return [x / total for x in inv]


# ----------------------------------------------------------------------------- regmean
def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G) (a new tensor in G's dtype)."""
    g = gram * alpha
    g.diagonal().add_(gram.diagonal() * (1.0 - alpha))
    return g


def _check_alpha_ridge(alpha, ridge):
    for name, v, lo, hi in (("alpha", alpha, 0.0, 1.0), ("ridge", ridge, 0.0, math.inf)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not lo <= v <= hi
        ):
            raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")


def _system(weights_list, grams, c, alpha, ridge, transposed, dtype, device):
    """(A = Σ cᵢG̃ᵢ + ridge, B = Σ cᵢG̃ᵢWᵢᵀ) in ``dtype`` on ``device``."""
    a = b = None
    for ci, w, g in zip(c, weights_list, grams):
        g = reduce_off_diagonal(g.to(device=device, dtype=dtype), alpha) * ci
        wt = w.to(device=device, dtype=dtype)
        wt = wt if transposed else wt.T  # [in, out]
        a = g if a is None else a + g
        b = g @ wt if b is None else b + g @ wt
    if ridge:
        a.diagonal().add_(ridge * float(a.diagonal().mean()))
    return a, b


def _singular(name: str, why: str) -> SingularSystemError:
    return SingularSystemError(
        f"regmean: layer {name or '(unnamed)'}: the system Σ c·G̃ is singular ({why}); an input feature "
        f"no model's data ever activated, or too few tokens for alpha = 1: lower alpha (the RegMean "
        f"paper's off-diagonal scaling, default {REGMEAN_ALPHA}) or set ridge > 0 (adds ridge·mean(diag)·I)"
    )


def _cholesky_solve(a, b, name):
    L, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise _singular(name, f"not positive definite at pivot {int(info)} of {a.shape[0]}")
    d = L.diagonal()
    eps = torch.finfo(a.dtype).eps
    if float(d.min()) ** 2 <= a.shape[0] * eps * float(a.diagonal().abs().max()):
        raise _singular(name, f"condition beyond {a.dtype} precision")
    return torch.cholesky_solve(b, L)


def regmean_merge(
    weights_list,
    grams,
    *,
    weights=None,
    mix_ratios=None,
    alpha: float = REGMEAN_ALPHA,
    ridge: float = 0.0,
    transposed: bool = False,
    precision: str = "float64",
    name: str = "",
    out_dtype=None,
) -> torch.Tensor:
    """RegMean merge of one linear weight (module docstring). ``precision="float64"``: Cholesky
    on the CPU in float64; ``"float32"``: on the Grams' device in float32, checked by the
    residual ‖AX − B‖/‖B‖ <= RESIDUAL_TOL (else float64 on the CPU). Returns ``out_dtype``
    (default: models[0]'s) on models[0]'s device."""
    weights_list, grams = _check_pairs(
        weights_list, grams, "grams", lambda w: (w.shape[0 if transposed else 1],) * 2
    )
    if weights_list[0].dim() != 2:
        raise ValueError(
            f"regmean: {name or 'the tensor'} is not a matrix (shape {tuple(weights_list[0].shape)})"
        )
    _check_alpha_ridge(alpha, ridge)
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    out_dtype = out_dtype or weights_list[0].dtype
    if out_dtype not in FLOAT_TYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use float32, bfloat16 or float16")
    c = coefficients(len(weights_list), weights, mix_ratios)
    x = None
    if precision == "float32":
        dev = grams[0].device
        a, b = _system(weights_list, grams, c, alpha, ridge, transposed, F32, dev)
        try:
            x = _cholesky_solve(a, b, name)
            res = float(torch.linalg.matrix_norm(a @ x - b)) / max(float(torch.linalg.matrix_norm(b)), 1e-300)
            if not res <= RESIDUAL_TOL:
                log.info(
                    "regmean: %s: float32 residual %.2e > %.0e; solving in float64 on the CPU",
                    name,
                    res,
                    RESIDUAL_TOL,
                )
                x = None
        except SingularSystemError:
            x = None  # float32 may fail where float64 succeeds: try that before giving up
        del a, b
    if x is None:
        a, b = _system(weights_list, grams, c, alpha, ridge, transposed, F64, torch.device("cpu"))
        x = _cholesky_solve(a, b, name)
    w = x if transposed else x.T
    return w.to(device=weights_list[0].device, dtype=out_dtype).contiguous()


def regmean_merge_reference(
    weights_list,
    grams,
    *,
    weights=None,
    mix_ratios=None,
    alpha: float = REGMEAN_ALPHA,
    ridge: float = 0.0,
    transposed: bool = False,
) -> torch.Tensor:
    """The float64 oracle of :func:`regmean_merge`: the normal equations solved by LU (float64)."""
    weights_list, grams = _check_pairs(
        weights_list, grams, "grams", lambda w: (w.shape[0 if transposed else 1],) * 2
    )
    _check_alpha_ridge(alpha, ridge)
    c = coefficients(len(weights_list), weights, mix_ratios)
    a = sum(
        ci * (alpha * g.to(F64) + (1 - alpha) * torch.diag(torch.diagonal(g.to(F64))))
        for ci, g in zip(c, grams)
    )
    if ridge:
        a = a + ridge * torch.diagonal(a).mean() * torch.eye(a.shape[0], dtype=F64)
    gt = [alpha * g.to(F64) + (1 - alpha) * torch.diag(torch.diagonal(g.to(F64))) for g in grams]
    b = sum(ci * (g @ (w.to(F64) if transposed else w.to(F64).T)) for ci, g, w in zip(c, gt, weights_list))
    x = torch.linalg.solve(a, b)
    return x if transposed else x.T


__all__ = [
    "fisher_merge",
    "fisher_merge_reference",
    "fisher_backend",
    "FISHER_BACKENDS",
    "fisher_norm_scales",
    "regmean_merge",
    "regmean_merge_reference",
    "reduce_off_diagonal",
    "coefficients",
    "SingularSystemError",
    "FISHER_FLOOR",
    "REGMEAN_ALPHA",
]
