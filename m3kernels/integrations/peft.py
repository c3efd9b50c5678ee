"""PEFT drop-in: ``peft.utils.merge_utils``'s five merge functions computed with m3kernels.

``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear`` and ``dare_ties`` take PEFT's
arguments (a list of task tensors, a weight tensor, ``density``, ``majority_sign_method``) and
return PEFT 0.21's result: the same dtype (PEFT's type promotion: float32 for bf16/fp16/fp32 task
tensors and PEFT's float32 weights) and the same values. :func:`install` (or the :func:`patched`
context manager) puts them where ``LoraModel.add_weighted_adapter`` looks them up
(``peft.tuners.lora.model`` imports them by name) and in ``peft.utils.merge_utils``.

PEFT's semantics, which these functions keep: the deltas are the task tensors themselves (no
base); the trim keeps exactly k = int(density · numel) largest magnitudes (``density >= 1``: no
pruning, with PEFT's warning; ``density < 0``: ValueError); the sign vote is on the *unweighted*
trimmed deltas (``"total"``: the sign of their sum, ``"frequency"``: of the sum of their signs,
ties to +); the weights (negative allowed) scale the deltas after the vote; the disjoint merge
divides by the *number* of agreeing models (at least 1); DARE divides kept values by density.

What runs fused (our stage A, then one m3kernels stage-B pass with the tensor API's TIES variants
``vote`` / ``divide_by`` and the kernel's ``dare_div``, docs/INTEGRATIONS.md) and what runs as
PyTorch ops (``eager``):

* ``task_arithmetic``: fused.
* ``magnitude_prune``, ``ties`` (both votes): fused when the k-th largest magnitude of every
  tensor is unique (the usual case in float32); at a tie at the threshold (common in bf16)
  PEFT's pick among equal magnitudes is ``torch.topk``'s, which no kernel can reproduce, so that
  tensor's mask comes from ``torch.topk`` and the rest is eager.
* ``dare_linear``, ``dare_ties`` (both votes): fused for density > 0 and finite tensors (PEFT's
  dropped inf is inf · 0 = NaN, the kernel's is 0); density 0 (PEFT: 0 / 0) and non-finite
  inputs run eager with the kernel's DARE masks.
* Everything else eager: inputs that autograd tracks (PEFT's result is differentiable), float64
  tensors or weights, more models than the fused sum's order allows (below), ``"frequency"`` with
  NaN inputs off the CPU (the kernel's sgn(NaN) = 0 is ``torch.sign``'s on the CPU only).

The fused sum is bit-identical to PyTorch's ``sum(dim=0)`` for N ≤ 4 models on the CPU (which adds
in order) and N ≤ 2 on CUDA (order-free); beyond that the eager path runs. NaN results of a fused
pass are the canonical NaN (docs/KERNEL.md), PyTorch's may carry another sign or payload.

Randomness: PEFT draws DARE masks with ``torch.bernoulli`` from torch's global generator; ours
come from the Philox stream of docs/RANDOMNESS.md keyed by ``(seed, name, model index)``. A call
without ``name`` takes the next of ``"peft.0"``, ``"peft.1"``, … (the counter and the default
seed are reset by :func:`install` / :func:`reset_stream`), so a sequence of calls, e.g. one
``add_weighted_adapter``, is reproducible and each call draws fresh masks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import numpy as np
import torch

from m3kernels.merge.kernel_params import DTYPE_CODES, TRIM_KEEP_NONE, make_params
from m3kernels.merge.recipe import make_recipe

FUNCTIONS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
MAX_FUSED_MODELS = {"cpu": 4, "cuda": 2}  # sum(dim=0) adds in model order up to this many

_stream = {"seed": 0, "calls": itertools.count()}
_originals: dict = {}


def reset_stream(seed: int = 0) -> None:
    """Default DARE seed for calls without ``seed``, and the ``peft.<call>`` name counter from 0."""
    _stream["seed"] = int(seed)
    _stream["calls"] = itertools.count()


def _key(seed, name) -> tuple[int, str]:
    return (_stream["seed"] if seed is None else int(seed)), (
        f"peft.{next(_stream['calls'])}" if name is None else str(name)
    )


# ---------------------------------------------------------------- arguments, dtype, eligibility
def _arguments(task_tensors, weights):
    tensors = list(task_tensors)
    if not tensors:
        raise ValueError("task_tensors: at least one tensor is needed")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"task_tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != tensors[0].shape:
            raise ValueError(
                f"task_tensors[{i}] has shape {tuple(t.shape)}, task_tensors[0] {tuple(tensors[0].shape)}"
            )
        if t.device != tensors[0].device:
            raise ValueError(f"task_tensors[{i}] is on {t.device}, task_tensors[0] on {tensors[0].device}")
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor(weights)
    weights = weights.to(tensors[0].device)
    if weights.numel() != len(tensors):
        raise ValueError(
            f"weights: expected {len(tensors)} values (one per task tensor), got {weights.numel()}"
        )
    return tensors, weights


def _check_density(density) -> float:
    d = float(density)
    if math.isnan(d):
        raise ValueError("density must be a number in [0, 1], got nan")
    if d < 0:
        raise ValueError(f"density must be >= 0, got {d}")
    return d


def _no_pruning_warning(density: float, n: int) -> None:
    for _ in range(n):  # PEFT warns once per task tensor
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            stacklevel=3,
        )


def _fusable(tensors, weights) -> bool:
    """True when one stage-B pass gives PyTorch's bytes: kernel dtypes, float32 weights (so the
    result is float32), finite float32 weights, a device with a backend, N small enough, and no
    input that autograd is tracking."""
    dev = tensors[0].device.type
    if len(tensors) > MAX_FUSED_MODELS.get(dev, 0) or weights.dtype != torch.float32:
        return False
    if any(t.dtype not in DTYPE_CODES for t in tensors) or tensors[0].numel() == 0:
        return False
    if not bool(torch.isfinite(weights).all()):
        return False
    if torch.is_grad_enabled() and (weights.requires_grad or any(t.requires_grad for t in tensors)):
        return False  # PEFT's result is differentiable there; PyTorch ops keep the graph
    try:
        from m3kernels.backends import get_backend

        get_backend("auto", tensors[0].device)
    except (RuntimeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------- kernel calls
def _backend(device):
    from m3kernels.backends import get_backend

    return get_backend("auto", device)


def _sum_params(n: int, w, *, density=None, seed=0, name="", rescale=True):
    """KernelParams of Σ w_i · d_i over deltas given directly (no base), with DARE if ``density``."""
    if density is None:
        recipe = make_recipe(n, method="linear", has_base=False, weights=w, normalize=False)
    else:
        recipe = make_recipe(
            n, method="dare_linear", has_base=True, weights=w, density=density, seed=seed, rescale=rescale
        )
    # PEFT multiplies and sums in separate roundings: no fused multiply-add (linear's recipe has it)
    return make_params(recipe, name, has_base=False).with_fields(fma=False)


def _one_model(p, i: int):
    """The parameters of model ``i`` alone (every per-model array sliced)."""
    vals = {}
    for k in p.__dataclass_fields__:
        v = getattr(p, k)
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.shape[0] == p.n:
            v = v[i : i + 1].copy()
        vals[k] = v
    vals["n"] = 1
    return type(p)(**vals)


def _kernel_sum(p, tensors) -> torch.Tensor:
    out = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    _backend(tensors[0].device).merge(p, None, [t.contiguous() for t in tensors], out)
    return out


def _kth_largest_bits(tensors, k: int) -> list[int]:
    """bits(|x|) of the k-th largest magnitude of each tensor (k ≥ 1): our exact stage-A selection."""
    from m3kernels import api
    from m3kernels.merge.select import select_from_keys

    n, numel = len(tensors), tensors[0].numel()
    k = min(k, numel)
    models = [t.contiguous() for t in tensors]
    try:
        be = _backend(models[0].device)
    except (RuntimeError, ValueError):
        be = None
    if be is not None and all(t.dtype in DTYPE_CODES for t in models):
        p = _sum_params(n, [1.0] * n)
        keys = api.small_tensor_keys(p, None, models, be) if numel <= api.SMALL_TENSOR_NUMEL else None
        if keys is not None:
            return [int(x) for x in select_from_keys(keys, [k] * n, numel)]
        return [int(x) for x in api.large_tensor_thresholds(p, None, models, be, [k] * n, numel)]
    return [int(_keys(t).reshape(-1).topk(k).values.min()) for t in models]  # no backend here


def _keys(t: torch.Tensor) -> torch.Tensor:
    """bits(|x|) as int32 (order = magnitude order; NaNs above inf)."""
    return t.detach().abs().to(torch.float32).contiguous().view(torch.int32)


def _magnitude_cuts(tensors, density: float):
    """Per tensor: (threshold bits, keep mask or None, exact). ``exact``: bits(|x|) >= threshold
    keeps exactly PEFT's k = int(density · numel) elements (so the set is PEFT's); k = 0 gives
    (TRIM_KEEP_NONE, None, finite)."""
    numel = tensors[0].numel()
    k = int(density * numel)
    if k <= 0:  # PEFT's t * 0 is NaN at inf / NaN: only a finite tensor trims to plain zeros
        return [(TRIM_KEEP_NONE, None, bool(torch.isfinite(t).all())) for t in tensors]
    out = []
    for t, thr in zip(tensors, _kth_largest_bits(tensors, k)):
        keep = _keys(t) >= thr
        exact = thr <= 0x7F800000 and int(keep.sum()) == k  # (a threshold inside the NaNs: not exact)
        out.append((thr, keep, exact))
    return out


def _magnitude_prune_one(t: torch.Tensor, cut, k: int) -> torch.Tensor:
    """t with all but PEFT's k largest magnitudes set to (signed) zero, as PEFT's t * mask."""
    thr, keep, exact = cut
    if thr == TRIM_KEEP_NONE:
        return t * torch.zeros_like(t)
    if exact:
        return t * keep.to(t.dtype).reshape(t.shape)
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().reshape(-1).topk(k).indices] = 1  # equal magnitudes at the cut: topk's pick
    return t * mask.reshape(t.shape)


def _dare_masks(tensors, density: float, seed: int, name: str):
    """The kernel's DARE keep masks (0/1 in each tensor's dtype), model i keyed (seed, name, i)."""
    n, shape, device = len(tensors), tensors[0].shape, tensors[0].device
    try:
        be = _backend(device)
    except (RuntimeError, ValueError):
        be = None
    if be is None:  # no backend on this device: the same Philox stream in NumPy
        from m3kernels.merge.philox import dare_keep_mask

        return [
            dare_keep_mask(seed, name, i, shape, density).to(device, t.dtype) for i, t in enumerate(tensors)
        ]
    p = _sum_params(n, [1.0] * n, density=density, seed=seed, name=name, rescale=False)
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return [_kernel_sum(_one_model(p, i), [ones]).to(t.dtype) for i, t in enumerate(tensors)]


# ---------------------------------------------------------------- the eager program (PEFT's order)
def _combine(pruned, weights, majority_sign_method=None) -> torch.Tensor:
    """Weighted sum (no vote) or vote + disjoint mean by count, in PEFT's operation order."""
    stacked = torch.stack(pruned, dim=0)
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if majority_sign_method is None:
        return (stacked * w).sum(dim=0)
    signs = stacked.sign()
    if majority_sign_method == "total":
        score = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    agree = signs == torch.where(score >= 0, 1, -1)
    merged = (stacked * w * agree).sum(dim=0)
    return merged / torch.clamp(agree.sum(dim=0), min=1.0)


def _check_vote(majority_sign_method) -> None:
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")


def _magnitude_pruned(tensors, density: float, cuts=None):
    k = int(density * tensors[0].numel())
    cuts = _magnitude_cuts(tensors, density) if cuts is None else cuts
    return [_magnitude_prune_one(t, cut, k) for t, cut in zip(tensors, cuts)]


def _dare_pruned(tensors, density: float, seed: int, name: str):
    masks = _dare_masks(tensors, density, seed, name)
    return [(t * m) / density for t, m in zip(tensors, masks)]


# ---------------------------------------------------------------- TIES by count, one kernel pass
_VOTES = {"total": "unweighted", "frequency": "count"}  # PEFT's names -> merge_tensors' ``vote``


def _ties_params(n: int, w, majority_sign_method: str, *, density=None, seed=0, name=""):
    """KernelParams of PEFT's TIES combine over task vectors (no base): the vote on the unweighted
    deltas (``"total"``: Σ d_i, ``"frequency"``: Σ sgn(d_i)), agreement by sign(d_i), values w_i·d_i
    times 0 or 1, divided by the agreeing count (the ``vote`` / ``divide_by`` variants of the
    tensor API); with ``density``, PEFT's DARE step first (kept values divided by density and
    rounded to the input dtype: the kernel's ``dare_div``)."""
    kw = dict(vote=_VOTES[majority_sign_method], divide_by="count", weights=w, deltas=True)
    if density is None:
        recipe = make_recipe(n, method="ties", has_base=False, density=1.0, **kw)
    else:
        recipe = make_recipe(n, method="dare_ties", has_base=False, density=density, seed=seed, **kw)
    p = make_params(recipe, name, has_base=False)
    return _dare_by_division(p, density) if density is not None else p


def _dare_by_division(p, density: float):
    """PEFT's DARE rescale: kept d / density, rounded to the input dtype (``dare_div``)."""
    return p.with_fields(dare_div=True, dare_den=np.full(p.n, np.float32(density)))


def _vote_sign_safe(tensors, majority_sign_method: str) -> bool:
    """The kernel's sgn(NaN) = 0 is torch.sign's on the CPU; elsewhere only finite inputs."""
    return tensors[0].device.type == "cpu" or all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------- PEFT's five functions
def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · t_i (PEFT's ``task_arithmetic``); fused."""
    tensors, weights = _arguments(task_tensors, weights)
    if _fusable(tensors, weights):
        return _kernel_sum(_sum_params(len(tensors), weights.tolist()), tensors)
    return _combine(tensors, weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ_i w_i · trim_k(t_i) (PEFT's ``magnitude_prune``); fused unless a tensor has a tie at
    its k-th largest magnitude (then that tensor's mask is ``torch.topk``'s, module docstring)."""
    tensors, weights = _arguments(task_tensors, weights)
    density = _check_density(density)
    if density >= 1:
        _no_pruning_warning(density, len(tensors))
        return task_arithmetic(tensors, weights)
    cuts = _magnitude_cuts(tensors, density)
    if _fusable(tensors, weights) and all(exact for _, _, exact in cuts):
        p = _sum_params(len(tensors), weights.tolist()).with_trim([thr for thr, _, _ in cuts])
        return _kernel_sum(p, tensors)
    return _combine(_magnitude_pruned(tensors, density, cuts), weights)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """PEFT's ``ties``: exact-k magnitude trim, sign vote on the unweighted trimmed tensors,
    weighted disjoint merge divided by the agreeing count. Both votes fused (one kernel pass)
    when every tensor's cut is unique; at a tie at the cut, PyTorch ops with ``torch.topk``'s
    mask (module docstring)."""
    _check_vote(majority_sign_method)
    tensors, weights = _arguments(task_tensors, weights)
    density = _check_density(density)
    fused = _fusable(tensors, weights) and _vote_sign_safe(tensors, majority_sign_method)
    if density >= 1:
        _no_pruning_warning(density, len(tensors))
        if fused:
            return _kernel_sum(_ties_params(len(tensors), weights.tolist(), majority_sign_method), tensors)
        return _combine(tensors, weights, majority_sign_method)
    cuts = _magnitude_cuts(tensors, density)
    if fused and all(exact for _, _, exact in cuts):
        p = _ties_params(len(tensors), weights.tolist(), majority_sign_method)
        return _kernel_sum(p.with_trim([thr for thr, _, _ in cuts]), tensors)
    return _combine(_magnitude_pruned(tensors, density, cuts), weights, majority_sign_method)


def dare_linear(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    *,
    seed: int | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """PEFT's ``dare_linear`` with our DARE mask (keyed ``(seed, name, i)``): Σ_i w_i · (t_i ·
    mask_i / density). Fused for density > 0 and finite tensors (module docstring)."""
    tensors, weights = _arguments(task_tensors, weights)
    density = _check_density(density)
    if density >= 1:
        _no_pruning_warning(density, len(tensors))
        return task_arithmetic(tensors, weights)
    seed, name = _key(seed, name)
    if (
        density > 0
        and _fusable(tensors, weights)
        and all(bool(torch.isfinite(t).all()) for t in tensors)  # a dropped inf is NaN in PEFT
    ):
        p = _sum_params(len(tensors), weights.tolist(), density=density, seed=seed, name=name)
        return _kernel_sum(_dare_by_division(p, density), tensors)
    return _combine(_dare_pruned(tensors, density, seed, name), weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
    *,
    seed: int | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """PEFT's ``dare_ties`` with our DARE mask: DARE drop and rescale (division rounded to the
    input dtype), then the vote and the disjoint merge by count of :func:`ties`; fused for
    density > 0 and finite tensors (module docstring)."""
    _check_vote(majority_sign_method)
    tensors, weights = _arguments(task_tensors, weights)
    density = _check_density(density)
    fused = _fusable(tensors, weights) and _vote_sign_safe(tensors, majority_sign_method)
    if density >= 1:
        _no_pruning_warning(density, len(tensors))
        if fused:
            return _kernel_sum(_ties_params(len(tensors), weights.tolist(), majority_sign_method), tensors)
        return _combine(tensors, weights, majority_sign_method)
    seed, name = _key(seed, name)
    if density > 0 and fused and all(bool(torch.isfinite(t).all()) for t in tensors):
        p = _ties_params(
            len(tensors), weights.tolist(), majority_sign_method, density=density, seed=seed, name=name
        )
        return _kernel_sum(p, tensors)
    return _combine(_dare_pruned(tensors, density, seed, name), weights, majority_sign_method)


# ---------------------------------------------------------------- patching PEFT
def _targets():
    import peft.tuners.lora.model as lora_model
    import peft.utils.merge_utils as merge_utils

    return (lora_model, merge_utils)


def install(seed: int = 0) -> None:
    """Make PEFT (``LoraModel.add_weighted_adapter`` and ``peft.utils.merge_utils``) use these
    functions; ``seed`` keys the DARE masks (the name counter restarts). Undo with :func:`uninstall`."""
    reset_stream(seed)
    mine = globals()
    for mod in _targets():
        for fn in FUNCTIONS:
            _originals.setdefault((mod.__name__, fn), getattr(mod, fn))
            setattr(mod, fn, mine[fn])


def uninstall() -> None:
    """Put PEFT's own functions back (no effect if :func:`install` was not called)."""
    for mod in _targets():
        for fn in FUNCTIONS:
            orig = _originals.pop((mod.__name__, fn), None)
            if orig is not None:
                setattr(mod, fn, orig)


@contextlib.contextmanager
def patched(seed: int = 0):
    """``with patched(seed): model.add_weighted_adapter(...)``: PEFT on m3kernels inside the block."""
    install(seed)
    try:
        yield
    finally:
        uninstall()


def installed() -> bool:
    """True while :func:`install` is in effect."""
    return bool(_originals)


__all__ = [*FUNCTIONS, "install", "uninstall", "patched", "installed", "reset_stream", "MAX_FUSED_MODELS"]
