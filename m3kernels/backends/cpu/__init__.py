"""The fused CPU backend: stage A and stage B through the C++/OpenMP extension ``m3kernels._C``.

Tensors are handed to C++ as raw addresses (``data_ptr()``) with dtype codes, so tensors that
live in memory-mapped checkpoint files are read in place, never copied and never written.
The kernel variant (generic / AVX2 / AVX-512) is chosen at run time (``simd_level()``;
``M3KERNELS_SIMD=generic`` forces the portable one); every variant gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from m3kernels.backends.tensor_args import pointer_and_code
from m3kernels.merge.kernel_params import DTYPE_CODES, HIST_BINS, KernelParams

# The issue-8 and round-2 pieces of docs/KERNEL.md this backend implements (METHODS checks these names).
FEATURES: frozenset[str] = frozenset(
    {
        "gram",
        "trim_max",
        "group_coef",
        "nearswap",
        "ram",
        "ram_counts",
        "trim_ties_k",
        "keep_mask",
        "den_floor",
        "agree_w",
        "fma",
        "vote_count",
        "ties_div_count",
        "dare_div",
    }
)

try:
    from m3kernels import _C

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # extension not built, or M3KERNELS_SIMD invalid
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when the compiled extension could be imported."""
    return _C is not None


def unavailable_reason() -> str:
    """Why the backend is unavailable ('' when it is available)."""
    if _C is not None:
        return ""
    return (
        f"the C++ extension m3kernels._C is not importable ({_IMPORT_ERROR}); "
        "build it with `pip install --no-build-isolation -e .`"
    )


def supports(device) -> bool:
    """The CPU backend runs on CPU tensors only."""
    return torch.device(device).type == "cpu"


def simd_level() -> str:
    """The kernel variant in use: 'generic', 'avx2' or 'avx512'."""
    return _C.simd_level()


def simd_levels() -> list:
    """The kernel variants this CPU supports, most portable first."""
    return list(_C.simd_levels())


def _tensor(t: torch.Tensor, what: str, numel: int) -> tuple[int, int]:
    return pointer_and_code(t, what, numel, "cpu", "cpu")


def _inputs(p: KernelParams, base: torch.Tensor | None, models: Sequence[torch.Tensor]):
    models = list(models)
    if len(models) != p.n:
        raise ValueError(f"KernelParams is for {p.n} models, got {len(models)} tensors")
    numel = models[0].numel()
    ptrs, codes = [], []
    for i, m in enumerate(models):
        ptr, code = _tensor(m, f"models[{i}]", numel)
        ptrs.append(ptr)
        codes.append(code)
    if p.has_base:
        if base is None:
            raise ValueError("KernelParams.has_base is set but base is None")
        base_ptr, base_code = _tensor(base, "base", numel)
    else:
        base_ptr, base_code = 0, 0
    return base_ptr, base_code, ptrs, codes, numel


def l1_sums(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """float64[n] Σ|δ_i| and Σ|δ_i| over DARE-kept elements (fixed chunk order)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    total, kept = _C.l1_sums(p, base_ptr, base_code, ptrs, codes, numel)
    return np.asarray(total, dtype=np.float64), np.asarray(kept, dtype=np.float64)


def l1_sums_keep(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`l1_sums` and, from the same pass, uint8[n, (numel + 7) // 8] the DARE keep bits of
    every element (LSB first; all ones for a model without DARE): stage B can read them as its
    keep mask instead of drawing the Philox words again (``kernel_params.dare_as_keep_mask``)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    total, kept, mask = _C.l1_sums(p, base_ptr, base_code, ptrs, codes, numel, 0, True)
    return np.asarray(total, dtype=np.float64), np.asarray(kept, dtype=np.float64), np.asarray(mask)


def gram(p: KernelParams, base, models) -> np.ndarray:
    """float64[groups, n, n] Gram matrices of v_i = f32(x_i) - b (b = 0 without a base): per tensor
    (``p.coef_group`` 0, groups = 1), per row (1, numel // row_len) or per column (2, row_len), in
    the fixed summation order of docs/KERNEL.md (the same bits for any thread count)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    return np.asarray(_C.gram(p, base_ptr, base_code, ptrs, codes, numel), dtype=np.float64)


def ram_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """(shared, unique) int64[n]: per model the elements with |δ_i| > p.ram_eps that another model
    also has (c > 1) / that no other model has (c == 1); δ after DARE and trim, as combine 4 sees it."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    shared, unique = _C.ram_counts(p, base_ptr, base_code, ptrs, codes, numel)
    return np.asarray(shared, dtype=np.int64), np.asarray(unique, dtype=np.int64)


def tie_counts(p: KernelParams, base, models) -> tuple[np.ndarray, np.ndarray]:
    """Exact-k ties, stage A: int64[n, ceil(numel / 1024)] per model and tie block, how many keys
    bits(|δ'_i|) equal ``p.trim_min[i]`` and ``p.trim_max[i]`` (turned into the ``tie_prefix_*``
    fields by ``kernel_params.tie_prefixes``)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    cmin, cmax = _C.tie_counts(p, base_ptr, base_code, ptrs, codes, numel)
    return np.asarray(cmin, dtype=np.int64), np.asarray(cmax, dtype=np.int64)


def histogram(p: KernelParams, base, models, prefix) -> np.ndarray:
    """int64[n, 65536]: high-16 (prefix None) or matching low-16 counts of bits(|δ'_i|)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    pre = None if prefix is None else np.ascontiguousarray(prefix, dtype=np.uint32)
    hist = _C.histogram(p, base_ptr, base_code, ptrs, codes, numel, pre)
    assert hist.shape == (p.n, HIST_BINS)
    return hist


def delta_keys(p: KernelParams, base, models) -> np.ndarray:
    """uint32[n, numel]: bits(|δ'_i|) of every element, the values ``histogram`` counts (small tensors)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    return _C.delta_keys(p, base_ptr, base_code, ptrs, codes, numel)


def sample_keys(p: KernelParams, base, models, runs: int) -> np.ndarray:
    """uint32[n, 64 * runs]: bits(|δ'_i|) of runs of 64 elements at a stride of numel // runs
    (the single-pass threshold's sample; numel >= 64 * runs)."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    return _C.sample_keys(p, base_ptr, base_code, ptrs, codes, numel, int(runs))


def bracket_count(p: KernelParams, base, models, lo, span, fine) -> tuple:
    """One pass over the inputs: ``(above, range, fine)`` for each model with span[i] > 0: how many
    bits(|δ'_i|) are >= (lo[i] + span[i]) << 16 (int64[n]), the counts of the high-16 buckets
    lo[i] .. lo[i] + span[i] - 1 (a list of int64[span[i]]), and the low-16 counts of the buckets
    ``fine[i]`` (up to 4, inside the range; int64[n, 4, 65536], row j for fine[i][j])."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    return _C.bracket_count(
        p,
        base_ptr,
        base_code,
        ptrs,
        codes,
        numel,
        [int(x) for x in lo],
        [int(x) for x in span],
        [[int(b) for b in f] for f in fine],
    )


def merge_batch(
    p: KernelParams,
    base_ptrs,
    base_dtype,
    model_ptrs,
    model_dtypes,
    numels,
    out_ptrs,
    out_dtype,
    ks=None,
    key0=None,
    key1=None,
) -> np.ndarray:
    """Stage A and B of many small tensors in one call, from raw addresses (see ``_C.merge_batch``):
    tensor t reads ``base_ptrs[t]`` and ``model_ptrs[t * n + i]``, writes ``out_ptrs[t]``; ``ks``
    (k per tensor and model, -1: no trim) selects exact per-tensor trim thresholds, else
    ``p.trim_min`` holds for all. Returns the thresholds used, uint64[T, n]."""
    codes = [DTYPE_CODES[d] for d in model_dtypes]
    base_code = DTYPE_CODES[base_dtype] if base_dtype is not None else 0
    return _C.merge_batch(
        p, base_ptrs, base_code, model_ptrs, codes, numels, out_ptrs, DTYPE_CODES[out_dtype], ks, key0, key1
    )


def merge(p: KernelParams, base, models, out: torch.Tensor) -> None:
    """Stage B: the fused single pass of docs/KERNEL.md, written into ``out``."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    out_ptr, out_code = _tensor(out, "out", numel)
    _C.merge(p, base_ptr, base_code, ptrs, codes, numel, out_ptr, out_code)


def merge_range(p: KernelParams, base, models, out: torch.Tensor, start: int) -> None:
    """Stage B of elements ``start .. start + out.numel()`` of a tensor: ``base``/``models`` hold
    those elements (flat slices), the DARE stream is taken at their flat indices, so merging a
    tensor range by range gives the bytes of one :func:`merge` call."""
    base_ptr, base_code, ptrs, codes, numel = _inputs(p, base, models)
    out_ptr, out_code = _tensor(out, "out", numel)
    _C.merge(p, base_ptr, base_code, ptrs, codes, numel, out_ptr, out_code, int(start))


def has_della_stage_a() -> bool:
    """Whether the extension is importable and has della's C++ stage A."""
    return _C is not None and hasattr(_C, "della_stage_a")


def della_stage_a(delta: np.ndarray, slabs: int, c: int, inner: int, first: int, key, thr, mask: np.ndarray):
    """della's stage A on a chunk of whole dim-0 slabs (csrc/cpu/della_stage_a.cpp): ORs the keep
    bits of the float32 ``delta`` ([slabs, c, inner], flat elements first ..) into ``mask`` and
    returns (per-slab Σ|δ|, per-slab Σ|δ|·keep, non-finite count)."""
    thr = np.ascontiguousarray(thr, dtype=np.uint64)
    return _C.della_stage_a(
        delta, int(slabs), int(c), int(inner), int(first), int(key[0]), int(key[1]), thr, mask
    )


__all__ = [
    "available",
    "unavailable_reason",
    "supports",
    "FEATURES",
    "l1_sums",
    "l1_sums_keep",
    "gram",
    "ram_counts",
    "tie_counts",
    "histogram",
    "delta_keys",
    "sample_keys",
    "bracket_count",
    "merge",
    "merge_range",
    "merge_batch",
    "simd_level",
    "simd_levels",
    "has_della_stage_a",
    "della_stage_a",
]
