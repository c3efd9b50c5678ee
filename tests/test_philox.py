"""The DARE stream: Philox4x32-10 known answers, key derivation and mask properties."""

import numpy as np
import pytest
import torch

from m3kernels import dare_keep_mask
from m3kernels.merge.philox import (
    dare_key,
    dare_uniform_u32,
    fnv1a64,
    keep_threshold,
    philox4x32_10,
    splitmix64,
)

KAT = [  # Random123 philox4x32_10 known-answer tests
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_philox_known_answers(ctr, key, expect):
    got = philox4x32_10(np.array([ctr], dtype=np.uint64), key)[0]
    assert tuple(int(x) for x in got) == expect


def test_fnv_and_splitmix_reference_values():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C  # published FNV-1a 64 test vector
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded with 0


def test_stream_layout_four_words_per_counter():
    key = dare_key(5, "x", 1)
    u = dare_uniform_u32(5, "x", 1, 10)
    for j in range(10):
        ctr = np.array([[j >> 2, 0, 0, 0]], dtype=np.uint64)
        assert int(u[j]) == int(philox4x32_10(ctr, key)[0, j & 3])


def test_keys_differ_by_seed_name_and_model():
    keys = {dare_key(s, n, i) for s in (0, 1) for n in ("a", "b") for i in (0, 1, 2)}
    assert len(keys) == 12


def test_threshold_edges():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(1.0) == 2**32
    assert keep_threshold(0.5) == 2**31
    with pytest.raises(ValueError, match="density"):
        keep_threshold(1.5)


def test_mask_is_prefix_stable_and_has_the_right_density():
    m_big = dare_keep_mask(3, "w", 0, (100_003,), 0.3)
    m_small = dare_keep_mask(3, "w", 0, (1001,), 0.3)
    assert torch.equal(m_big[:1001], m_small)  # pure function of j: no dependence on the size
    frac = m_big.float().mean().item()
    assert abs(frac - 0.3) < 0.01
    assert torch.equal(dare_keep_mask(3, "w", 0, (10, 10_000), 0.3).reshape(-1), m_big[:100_000])
    assert dare_keep_mask(3, "w", 0, (50,), 1.0).all() and not dare_keep_mask(3, "w", 0, (50,), 0.0).any()
