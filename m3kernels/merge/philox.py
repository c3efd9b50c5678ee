"""Counter-based DARE randomness: Philox4x32-10 and the (seed, name, model) key derivation.

This module is the single definition of the DARE random stream (docs/SPEC.md §3). Every backend
receives the two 32-bit key words and the integer keep threshold computed here, so the key
derivation exists once, in Python; only the Philox rounds are re-implemented per backend.

Stream layout (docs/RANDOMNESS.md has the full text and test vectors):

* key   = splitmix64(splitmix64(splitmix64(seed) ^ fnv1a64(name)) ^ i), split into
  k0 = low 32 bits, k1 = high 32 bits.
* For flat element index j: block q = j >> 2, counter = (q & 0xffffffff, q >> 32, 0, 0);
  u32(seed, name, i, j) = word (j & 3) of Philox4x32-10(counter, key).
* keep iff u32 < floor(density * 2**32)  (compared as 64-bit integers, so density 1 keeps all).
"""

from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1
M32 = 0xFFFFFFFF

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a hash of ``data``."""
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def splitmix64(x: int) -> int:
    """One SplitMix64 output step applied to ``x`` (a bijective 64-bit mixer)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def dare_key(seed: int, name: str, model_index: int) -> tuple[int, int]:
    """Philox key (k0, k1) for model ``model_index`` of tensor ``name`` under ``seed``."""
    if model_index < 0:
        raise ValueError(f"model_index must be >= 0, got {model_index}")
    x = splitmix64(int(seed) & M64)
    x = splitmix64(x ^ fnv1a64(name.encode("utf-8")))
    x = splitmix64(x ^ (int(model_index) & M64))
    return x & M32, x >> 32


def keep_threshold(density: float) -> int:
    """Integer threshold floor(density * 2**32): keep iff u32 < threshold (0 .. 2**32)."""
    density = float(density)
    if not (0.0 <= density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(math.floor(density * 4294967296.0))


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on an array of counters.

    ``ctr`` is a uint64 array of shape (..., 4) holding 32-bit words; returns the same shape.
    """
    c = [ctr[..., w].astype(np.uint64) & np.uint64(M32) for w in range(4)]
    k0 = np.uint64(key[0] & M32)
    k1 = np.uint64(key[1] & M32)
    m0 = np.uint64(PHILOX_M0)
    m1 = np.uint64(PHILOX_M1)
    mask = np.uint64(M32)
    s32 = np.uint64(32)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = np.uint64((int(k0) + PHILOX_W0) & M32)
            k1 = np.uint64((int(k1) + PHILOX_W1) & M32)
        p0 = m0 * c[0]
        p1 = m1 * c[2]
        hi0, lo0 = p0 >> s32, p0 & mask
        hi1, lo1 = p1 >> s32, p1 & mask
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack(c, axis=-1)


def dare_uniform_u32(seed: int, name: str, model_index: int, numel: int) -> np.ndarray:
    """The u32 stream for elements 0..numel-1 (uint64 array holding 32-bit values)."""
    key = dare_key(seed, name, model_index)
    nblocks = (numel + 3) // 4
    q = np.arange(nblocks, dtype=np.uint64)
    ctr = np.zeros((nblocks, 4), dtype=np.uint64)
    ctr[:, 0] = q & np.uint64(M32)
    ctr[:, 1] = q >> np.uint64(32)
    out = philox4x32_10(ctr, key)
    return out.reshape(-1)[:numel]


def dare_keep_mask(seed: int, name: str, model_index: int, shape, density: float):
    """Boolean DARE keep-mask (a torch tensor of ``shape``) for one model of one tensor."""
    import torch

    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    thr = keep_threshold(density)
    u = dare_uniform_u32(seed, name, model_index, numel)
    keep = u < np.uint64(thr)
    return torch.from_numpy(keep).reshape(shape)
