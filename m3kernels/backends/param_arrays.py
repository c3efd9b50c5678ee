"""The per-group and per-tie-block arrays of KernelParams that the GPU backends (CUDA, Triton) read,
checked on the host the same way for both, and the gram layout and fold they share."""

from __future__ import annotations

import numpy as np


def coef_groups(p) -> tuple[int, int]:
    """(coef_group, row_len) of ``p``, checked: 0, 1 (rows) or 2 (columns), row_len >= 1."""
    coef_group = getattr(p, "coef_group", 0)
    coef_group = 0 if coef_group is None else int(coef_group)
    row_len = getattr(p, "row_len", 1)
    row_len = 1 if row_len is None else int(row_len)
    if coef_group not in (0, 1, 2):
        raise ValueError(f"KernelParams.coef_group must be 0, 1 or 2, got {coef_group}")
    if row_len < 1:
        raise ValueError(f"KernelParams.row_len must be >= 1, got {row_len}")
    return coef_group, row_len


def num_groups(coef_group: int, row_len: int, numel: int) -> int:
    """Groups of the per-group coefficients: 1, the rows (ceil(numel / row_len)) or row_len columns."""
    if coef_group == 0:
        return 1
    return -(-numel // row_len) if coef_group == 1 else row_len


def group_coef_array(p, numel: int, coef_group: int, row_len: int) -> tuple[np.ndarray, int]:
    """(p.group_coef as contiguous float32, the values needed: groups x n), checked to cover every group."""
    if getattr(p, "group_coef", None) is None:
        raise ValueError("KernelParams.coef_group is set but group_coef is None")
    gc = np.ascontiguousarray(p.group_coef, dtype=np.float32).reshape(-1)
    g = num_groups(coef_group, row_len, numel)
    need = g * p.n
    if gc.size < need:
        raise ValueError(
            f"KernelParams.group_coef has {gc.size} values; {need} needed (groups x n = {g} x {p.n})"
        )
    return gc, need


def tie_prefix_arrays(p, nblocks: int) -> list[np.ndarray]:
    """[tie_prefix_min, tie_prefix_max] as fresh int64 arrays (zeros where unset), checked to hold
    n x ``nblocks`` values."""
    out = []
    for name in ("tie_prefix_min", "tie_prefix_max"):
        v = getattr(p, name, None)
        a = (
            np.zeros(p.n * nblocks, np.int64)
            if v is None
            else np.ascontiguousarray(v, dtype=np.int64).reshape(-1)
        )
        if a.size != p.n * nblocks:
            raise ValueError(
                f"KernelParams.{name} has {a.size} values; {p.n * nblocks} needed (n x tie blocks)"
            )
        out.append(a.copy())
    return out


def gram_layout(p, numel: int) -> tuple[int, int, int, int]:
    """(groups, positions per group, group stride, position stride) of the gram sums of
    ``p.coef_group``: the tensor, its rows or its columns; grouped tensors need row_len | numel."""
    coef_group, row_len = coef_groups(p)
    if coef_group == 0:
        return 1, numel, 0, 1
    if numel % row_len:
        raise ValueError(f"gram: numel {numel} is not a multiple of row_len {row_len}")
    rows = numel // row_len
    if coef_group == 1:
        return rows, row_len, row_len, 1
    return row_len, rows, 1, row_len


def gram_from_partials(partials: np.ndarray, groups: int, chunks: int, n: int) -> np.ndarray:
    """float64[groups, n, n]: each group's chunk values added in chunk order, mirrored."""
    if chunks == 0:
        return np.zeros((groups, n, n), np.float64)
    g = np.cumsum(partials.reshape(groups, chunks, n, n), axis=1)[:, -1]  # sequential: chunk order
    iu = np.triu_indices(n, 1)
    g[:, iu[1], iu[0]] = g[:, iu[0], iu[1]]
    return np.ascontiguousarray(g)
