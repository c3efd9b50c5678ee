"""The CUDA backend: stage A and stage B through the nvcc-compiled extension ``m3kernels._cuda``.

Tensors go to the extension as raw device addresses (``data_ptr()``) with dtype codes, and the
kernels run on PyTorch's current stream of the tensors' device (passed as an integer handle), so
the extension does not link libtorch (docs/GPU.md). Stage B launches one kernel and returns
without synchronising; stage A reads its histograms / partial sums back to the host, which is
what the radix select and the L1 rescale need.

:data:`FEATURES` names the issue-8 pieces of docs/KERNEL.md implemented here (all of them: the trim
window, per-row / per-column coefficients, the NEARSWAP and RAM combines, :func:`gram`,
:func:`ram_counts`, and the exact-k tie rule with :func:`tie_counts`) and the round-2 pieces V1..V7
(keep mask, den_floor, agree_w, fma, count vote, count divisor, dare_div; their own EXT kernels).
:func:`gram` follows KERNEL.md's summation order exactly (chunks of 65,536 positions, 16 lanes, then
lanes and chunks added in order), so it is bit-identical to the CPU backend's whatever the grid. This backend merges whole tensors (``index_offset`` 0).

The ``emulate_*`` functions run the same kernel code on the host, on CPU tensors: they are how
the tests check the CUDA kernel bodies on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from m3kernels.backends.param_arrays import (
    coef_groups,
    gram_from_partials,
    gram_layout,
    group_coef_array,
    tie_prefix_arrays,
)
from m3kernels.backends.tensor_args import pointer_and_code
from m3kernels.backends.v2_arrays import (
    dare_div_on,
    fma_on,
    has_keep_mask,
    keep_mask_array,
    per_model_f32,
    ties_variant,
)
from m3kernels.merge.kernel_params import HIST_BINS, KernelParams

try:
    from m3kernels import _cuda

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (no nvcc at install time) or libcudart missing
    _cuda = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

MAX_MODELS = 16

# What this backend implements of docs/KERNEL.md beyond the first five methods (issue 8).
FEATURES = frozenset(
    {"trim_max", "group_coef", "nearswap", "ram", "gram", "ram_counts", "trim_ties_k"}
    # round 2 (docs/KERNEL.md V1..V7)
    | {"keep_mask", "den_floor", "agree_w", "fma", "vote_count", "ties_div_count", "dare_div"}
)

_TRIM_MAX_ALL = 0xFFFFFFFF
_GRAM_CHUNK = 1 << 16  # docs/KERNEL.md, gram: positions per chunk (csrc/cuda/gram_element.cuh)
TIE_BLOCK = 1024  # exact-k ties: flat indices per tie block (csrc/cuda/merge_args.h kTieBlock)


def extension_available() -> bool:
    """True when the compiled extension ``m3kernels._cuda`` could be imported."""
    return _cuda is not None


def _device_present() -> bool:
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # a broken driver install reports through exceptions
        return False


_runtime_problem: str | None = None  # cached answer of _runtime_check()


def _runtime_check() -> str:
    """'' when the extension's own CUDA runtime sees a device, else why not (e.g. old driver)."""
    global _runtime_problem
    if _runtime_problem is None:
        info = _cuda.runtime_info()
        if info["device_count"] > 0:
            _runtime_problem = ""
        else:
            rt, drv = info["runtime_version"], info["driver_version"]
            _runtime_problem = (
                f"the extension's CUDA runtime {rt // 1000}.{rt % 1000 // 10} sees no device "
                f"({info['error'] or 'device count 0'}; the driver supports CUDA {drv // 1000}.{drv % 1000 // 10}); "
                "rebuild m3kernels with a CUDA toolkit no newer than the driver"
            )
    return _runtime_problem


def available() -> bool:
    """True when the extension imports, PyTorch sees a CUDA device and so does the extension."""
    return _cuda is not None and _device_present() and _runtime_check() == ""


def unavailable_reason() -> str:
    """Why the backend is unavailable ('' when it is available)."""
    if _cuda is None:
        return (
            f"the CUDA extension m3kernels._cuda is not importable ({_IMPORT_ERROR}); build it on a "
            "machine with nvcc: `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`"
        )
    if not _device_present():
        return (
            f"no CUDA device (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()})"
        )
    return _runtime_check()


def supports(device) -> bool:
    """The CUDA backend runs on CUDA tensors only."""
    return torch.device(device).type == "cuda"


def _ext():
    if _cuda is None:
        raise RuntimeError(f"the cuda backend is not available: {unavailable_reason()}")
    return _cuda


def _tensor(t: torch.Tensor, what: str, numel: int, device_type: str) -> tuple[int, int]:
    return pointer_and_code(t, what, numel, device_type, "cuda")


def kernel_args(
    p: KernelParams,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    device_type: str = "cuda",
) -> dict:
    """The argument dict the extension reads: KernelParams plus pointers and dtype codes."""
    models = list(models)
    if len(models) != p.n:
        raise ValueError(f"KernelParams is for {p.n} models, got {len(models)} tensors")
    if p.n > MAX_MODELS:
        raise ValueError(
            f"the cuda backend merges at most {MAX_MODELS} models per tensor, got {p.n}; "
            "use the cpu or triton backend"
        )
    numel = models[0].numel()
    ptrs, codes = [], []
    for i, m in enumerate(models):
        ptr, code = _tensor(m, f"models[{i}]", numel, device_type)
        ptrs.append(ptr)
        codes.append(code)
    device = models[0].device
    for i, m in enumerate(models):
        if m.device != device:
            raise ValueError(f"models[{i}] is on {m.device}, models[0] on {device}")
    base_ptr, base_code = 0, 0
    if p.has_base:
        if base is None:
            raise ValueError("KernelParams.has_base is set but base is None")
        base_ptr, base_code = _tensor(base, "base", numel, device_type)
        if base.device != device:
            raise ValueError(f"base is on {base.device}, models on {device}")
    out_ptr, out_code = 0, 0
    if out is not None:
        out_ptr, out_code = _tensor(out, "out", numel, device_type)
        if out.device != device:
            raise ValueError(f"out is on {out.device}, models on {device}")
    trim_min = p.trim_min if p.trim_min is not None else np.zeros(p.n, np.uint64)
    trim_max = getattr(p, "trim_max", None)
    trim_max = np.full(p.n, _TRIM_MAX_ALL, np.uint64) if trim_max is None else trim_max
    unique_scale = getattr(p, "unique_scale", None)
    unique_scale = np.ones(p.n, np.float32) if unique_scale is None else unique_scale
    coef_group, row_len = coef_groups(p)
    group_coef_ptr, group_coef_keep = 0, None
    if coef_group and int(p.combine) in (0, 1) and out is not None:  # stage B only
        group_coef_keep = _group_coef_tensor(p, numel, coef_group, row_len, device)
        group_coef_ptr = group_coef_keep.data_ptr()
    tie_args, tie_keep_alive = _tie_args(p, numel, device, with_prefixes=out is not None)
    v2_args, mask_keep_alive = _v2_args(p, numel, device)
    optional = tie_args | v2_args
    return optional | {
        "n": p.n,
        "numel": numel,
        "models": ptrs,
        "model_dtypes": codes,
        "base": base_ptr,
        "base_dtype": base_code,
        "has_base": bool(p.has_base),
        "out": out_ptr,
        "out_dtype": out_code,
        "combine": int(p.combine),
        "normalize": bool(p.normalize),
        "lam": float(p.lam),
        "mean_den": float(p.mean_den),
        "vote_w": [float(x) for x in p.vote_w],
        "coef": [float(x) for x in p.coef],
        "dare_scale": [float(x) for x in p.dare_scale],
        "dare": [int(x) for x in p.dare],
        "key0": [int(x) for x in p.key0],
        "key1": [int(x) for x in p.key1],
        "dare_thr": [int(x) for x in p.dare_thr],
        "trim_min": [int(x) for x in trim_min],
        "trim_max": [int(x) for x in trim_max],
        "unique_scale": [float(x) for x in unique_scale],
        "clip_t": float(getattr(p, "clip_t", 0.0)),
        "ram_eps": float(getattr(p, "ram_eps", 0.0)),
        "coef_group": coef_group,
        "row_len": row_len,
        "index_offset": 0,
        "group_coef": group_coef_ptr,
        "_keep_alive": (
            group_coef_keep,
            tie_keep_alive,
            mask_keep_alive,
        ),  # buffers behind pointers (not read by the extension)
    }


def _v2_args(p, numel: int, device) -> tuple[dict, torch.Tensor | None]:
    """The round-2 fields (docs/KERNEL.md V1..V7) for the extension ({} when all are at their
    defaults) and the keep-mask buffer behind its pointer."""
    args: dict = {}
    if fma_on(p):
        args["fma"] = True
    if int(p.combine) == 2:
        vote_kind, ties_div, den_floor = ties_variant(p)
        args |= {"vote_kind": vote_kind, "ties_div": ties_div, "den_floor": den_floor}
        args["agree_w"] = [float(x) for x in per_model_f32(p, "agree_w")]
    if dare_div_on(p):
        args |= {"dare_div": True, "dare_den": [float(x) for x in per_model_f32(p, "dare_den")]}
    mask = None
    if has_keep_mask(p):
        m, stride = keep_mask_array(p, numel)
        mask = torch.from_numpy(m.copy())
        mask = mask if device.type == "cpu" else mask.to(device)
        args |= {
            "keep_mask": mask.data_ptr(),
            "mask_stride": stride,
            "mask_scale": [float(x) for x in per_model_f32(p, "mask_scale")],
        }
    return args, mask


def _tie_args(p, numel: int, device, with_prefixes: bool) -> tuple[dict, tuple]:
    """The exact-k tie fields for the extension ({} when the rule is off) and the prefix buffers."""
    keep, skip = getattr(p, "tie_keep", None), getattr(p, "tie_skip", None)
    keep = np.full(p.n, -1, np.int64) if keep is None else np.asarray(keep, dtype=np.int64)
    skip = np.zeros(p.n, np.int64) if skip is None else np.asarray(skip, dtype=np.int64)
    if not (np.any(keep >= 0) or np.any(skip > 0)):
        return {}, ()
    args = {"tie_rule": True, "tie_keep": [int(x) for x in keep], "tie_skip": [int(x) for x in skip]}
    if not with_prefixes:  # stage A (tie_counts) reads the thresholds only
        return args, ()
    bufs = []
    names = ("tie_prefix_min", "tie_prefix_max")
    for name, a in zip(names, tie_prefix_arrays(p, -(-numel // TIE_BLOCK)), strict=True):
        t = torch.from_numpy(a)
        t = t if device.type == "cpu" else t.to(device)
        args[name] = t.data_ptr()
        bufs.append(t)
    return args, tuple(bufs)


def _group_coef_tensor(p, numel, coef_group, row_len, device) -> torch.Tensor:
    """p.group_coef as a float32 tensor on ``device``, checked to cover every group."""
    gc, need = group_coef_array(p, numel, coef_group, row_len)
    t = torch.from_numpy(gc[: max(need, 1)].copy())
    return t if device.type == "cpu" else t.to(device)


def _gram_layout(p: KernelParams, numel: int) -> tuple[int, int]:
    """(groups, chunks per group) of the gram sums; grouped tensors need row_len | numel."""
    groups, length, _, _ = gram_layout(p, numel)
    return groups, -(-length // _GRAM_CHUNK)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ordered_sums(partials: np.ndarray) -> np.ndarray:
    """Row sums of float64 partials, added left to right (block order)."""
    if partials.shape[-1] == 0:
        return np.zeros(partials.shape[:-1], np.float64)
    return np.cumsum(partials, axis=-1)[..., -1]


def l1_sums(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """float64[n] Σ|δ_i| and Σ|δ_i| over DARE-kept elements, in fixed block order."""
    ext = _ext()
    args = kernel_args(p, base, models)
    device = models[0].device
    blocks = ext.l1_num_blocks(args["numel"])
    partials = torch.zeros((p.n, 2, blocks), dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        for i in range(p.n):
            ext.l1_partials(args, i, partials[i].data_ptr(), device.index, _stream(device))
    sums = _ordered_sums(partials.cpu().numpy())
    return sums[:, 0].copy(), sums[:, 1].copy()


def histogram(p: KernelParams, base, models, prefix) -> np.ndarray:
    """int64[n, 65536]: high-16 (prefix None) or matching low-16 counts of bits(|δ'_i|)."""
    ext = _ext()
    args = kernel_args(p, base, models)
    device = models[0].device
    hist = torch.zeros((p.n, HIST_BINS), dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        for i in range(p.n):
            pre = -1 if prefix is None else int(prefix[i])
            ext.histogram(args, i, pre, hist[i].data_ptr(), device.index, _stream(device))
    return hist.cpu().numpy()


def merge(p: KernelParams, base, models, out: torch.Tensor) -> None:
    """Stage B: the fused single pass of docs/KERNEL.md into ``out``, on the current stream."""
    ext = _ext()
    args = kernel_args(p, base, models, out)
    with torch.cuda.device(out.device):
        ext.merge(args, out.device.index, _stream(out.device))


def gram(p: KernelParams, base, models) -> np.ndarray:
    """float64[groups, n, n]: Σ v_i v_k per group (tensor, rows or columns of ``p.coef_group``),
    v_i = f32(x_i) - b, in the summation order of docs/KERNEL.md (independent of the grid)."""
    ext = _ext()
    args = kernel_args(p, base, models)
    groups, chunks = _gram_layout(p, args["numel"])
    device = models[0].device
    partials = torch.zeros((groups * chunks * p.n * p.n,), dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        ext.gram_partials(args, partials.data_ptr(), device.index, _stream(device))
    return gram_from_partials(partials.cpu().numpy(), groups, chunks, p.n)


def ram_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """(shared, unique) int64[n]: elements where |d_i| > ram_eps and more than one / only model i
    has such a delta (docs/KERNEL.md, combine 4)."""
    ext = _ext()
    args = kernel_args(p, base, models)
    device = models[0].device
    counts = torch.zeros((2 * p.n,), dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        ext.ram_counts(args, counts.data_ptr(), device.index, _stream(device))
    c = counts.cpu().numpy()
    return c[: p.n].copy(), c[p.n :].copy()


def tie_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """Exact-k ties, stage A: int64[n, ceil(numel / 1024)], per model and tie block, the keys
    bits(|δ'_i|) equal to ``p.trim_min[i]`` and to ``p.trim_max[i]``."""
    ext = _ext()
    args = kernel_args(p, base, models)
    device = models[0].device
    nblocks = -(-args["numel"] // TIE_BLOCK)
    cmin = torch.zeros((p.n, nblocks), dtype=torch.int64, device=device)
    cmax = torch.zeros((p.n, nblocks), dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        ext.tie_counts(args, cmin.data_ptr(), cmax.data_ptr(), device.index, _stream(device))
    return cmin.cpu().numpy(), cmax.cpu().numpy()


# Host emulation of the kernels above, on CPU tensors (tests without a GPU).


def emulate_merge(p: KernelParams, base, models, out: torch.Tensor) -> None:
    """Run the stage-B kernel body on the host (CPU tensors)."""
    _ext().emulate_merge(kernel_args(p, base, models, out, device_type="cpu"))


def emulate_histogram(p: KernelParams, base, models, prefix) -> np.ndarray:
    """The stage-A histogram kernel body on the host (CPU tensors)."""
    ext = _ext()
    args = kernel_args(p, base, models, device_type="cpu")
    hist = np.zeros((p.n, HIST_BINS), dtype=np.uint64)
    for i in range(p.n):
        pre = -1 if prefix is None else int(prefix[i])
        ext.emulate_histogram(args, i, pre, hist[i].ctypes.data)
    return hist.astype(np.int64)


def emulate_l1_sums(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """The stage-A L1 kernel body (same blocks, same reduction tree) on the host."""
    ext = _ext()
    args = kernel_args(p, base, models, device_type="cpu")
    blocks = ext.l1_num_blocks(args["numel"])
    partials = np.zeros((p.n, 2, blocks), dtype=np.float64)
    for i in range(p.n):
        ext.emulate_l1_partials(args, i, partials[i].ctypes.data)
    sums = _ordered_sums(partials)
    return sums[:, 0].copy(), sums[:, 1].copy()


def emulate_gram(p: KernelParams, base, models) -> np.ndarray:
    """The stage-A gram kernel body (same work units, lanes and additions) on the host."""
    ext = _ext()
    args = kernel_args(p, base, models, device_type="cpu")
    groups, chunks = _gram_layout(p, args["numel"])
    assert ext.gram_num_units(args) == groups * chunks
    partials = np.zeros(groups * chunks * p.n * p.n, dtype=np.float64)
    ext.emulate_gram_partials(args, partials.ctypes.data)
    return gram_from_partials(partials, groups, chunks, p.n)


def emulate_ram_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """The stage-A RAM count kernel body on the host."""
    ext = _ext()
    args = kernel_args(p, base, models, device_type="cpu")
    counts = np.zeros(2 * p.n, dtype=np.uint64)
    ext.emulate_ram_counts(args, counts.ctypes.data)
    c = counts.astype(np.int64)
    return c[: p.n].copy(), c[p.n :].copy()


def emulate_tie_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """The stage-A tie count kernel body on the host."""
    ext = _ext()
    args = kernel_args(p, base, models, device_type="cpu")
    nblocks = -(-args["numel"] // TIE_BLOCK)
    cmin = np.zeros((p.n, nblocks), np.int64)
    cmax = np.zeros((p.n, nblocks), np.int64)
    ext.emulate_tie_counts(args, cmin.ctypes.data, cmax.ctypes.data)
    return cmin, cmax


__all__ = [
    "FEATURES",
    "tie_counts",
    "emulate_tie_counts",
    "gram",
    "ram_counts",
    "emulate_gram",
    "emulate_ram_counts",
    "available",
    "unavailable_reason",
    "supports",
    "l1_sums",
    "histogram",
    "merge",
    "extension_available",
    "kernel_args",
    "emulate_merge",
    "emulate_histogram",
    "emulate_l1_sums",
    "MAX_MODELS",
]
