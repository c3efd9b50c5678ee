"""The float64 oracle of the round-2 pieces (m3kernels/merge/reference_pieces.py) against the
float32 program (tests/kernel_program.py): the same decisions, values within float32 rounding.

Also: ``reference_merge``'s TIES agrees by the sign of w_i·δ_i (mergekit's rule), which with a
negative weight differs from the sign of δ_i, and the kernels follow it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3kernels.merge.kernel_params import make_params, pack_mask
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_pieces import apply_keep_mask, dare_div_deltas, ties_merge64

import kernel_program as kp
from helpers import have_backend

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
SEED, NAME = 5, "w"


def _deltas(gen, n, numel, dtype=F32):
    base = torch.randn(numel, generator=gen, dtype=F64)
    models = [(base + 0.05 * torch.randn(numel, generator=gen, dtype=F64)).to(dtype) for _ in range(n)]
    base = base.to(dtype)
    d32 = [m.to(F32) - base.to(F32) for m in models]
    d64 = [m.to(F64) - base.to(F64) for m in models]
    return base, models, d32, d64


def _close(ref64: torch.Tensor, prog32: torch.Tensor, what: str, scale=None):
    """Within a few float32 ulps of the value, or of ``scale`` (the terms' size where they cancel):
    the decisions agree, only the roundings differ."""
    size = ref64.abs() if scale is None else ref64.abs() + scale.abs().to(F64)
    tol = 8 * np.finfo(np.float32).eps * (size + 1e-30) + 1e-37
    bad = ((ref64 - prog32.to(F64)).abs() > tol) & ~(torch.isnan(ref64) & torch.isnan(prog32))
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements differ"


VARIANTS = [
    {"agree_w": [0.7, -0.4, 1.3]},
    {"vote_kind": 1},
    {"ties_div": 1},
    {"den_floor": 1e-6},
    {"vote_kind": 1, "ties_div": 1, "agree_w": [1.0, -1.0, 2.0]},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_ties_merge64_decides_as_the_program(variant, gen):
    numel, n = 3001, 3
    base, models, d32, d64 = _deltas(gen, n, numel)
    w = [0.7, -0.4, 1.3] if "den_floor" not in variant else [1e-7, 3e-7, 2e-7]
    recipe = make_recipe(n, method="ties", has_base=True, weights=w, density=1.0, seed=SEED)
    p = make_params(recipe, NAME, True).with_fields(**variant)
    want = kp.stage_b(p, base, models, F32, SEED, NAME)  # y = b + m
    m, _ = ties_merge64(
        d32,
        d64,
        list(p.coef),
        list(p.vote_w),
        agree_w=None if p.agree_w is None else list(p.agree_w),
        normalize=p.normalize,
        vote_kind=p.vote_kind,
        ties_div=p.ties_div,
        den_floor=p.den_floor,
    )
    # compare m itself: the program's m = y - b is not exact, so compare on the merged deltas
    prog_m = kp._ties(p, d32, (numel,))
    _close(m, prog_m, str(variant))
    assert torch.isfinite(want).all()


def test_reference_ties_agrees_on_weighted_sign(gen):
    """reference_merge: a negatively weighted model agrees where -δ has the elected sign, as the
    CPU kernel (make_params' agree_w = vote_w); the old rule (sign of δ) gives another result."""
    numel, n = 2001, 2
    base, models, d32, d64 = _deltas(gen, n, numel)
    recipe = make_recipe(n, method="ties", has_base=True, weights=[1.0, -0.6], density=1.0, seed=SEED)
    ref, _ = reference_merge(base, models, recipe, NAME)
    p = make_params(recipe, NAME, True)
    prog = kp.stage_b(p, base, models, F32, SEED, NAME)
    _close(ref, prog, "weighted sign", scale=base.to(F64))
    old = kp.stage_b(p.with_fields(agree_w=None), base, models, F32, SEED, NAME)
    assert not torch.equal(old, prog)
    if have_backend("cpu"):
        from m3kernels.backends import cpu

        out = torch.full((numel,), float("nan"), dtype=F32)
        cpu.merge(p, base, models, out)
        assert torch.equal(out, prog)


def test_keep_mask_and_dare_div_helpers_match_the_program(gen):
    numel, n = 1003, 2
    base, models, d32, d64 = _deltas(gen, n, numel, BF16)
    keep = torch.rand((n, numel), generator=gen) < 0.5
    recipe = make_recipe(n, method="task_arithmetic", has_base=True, seed=SEED)
    p = make_params(recipe, NAME, True).with_fields(
        keep_mask=pack_mask(keep.numpy()).reshape(-1), mask_stride=(numel + 7) // 8, mask_scale=[2.0, 0.5]
    )
    _, ds = kp.dropped_deltas(p, base, models, SEED, NAME)
    for i in range(n):
        a32, a64 = apply_keep_mask(d32[i], d64[i], keep[i], [2.0, 0.5][i])
        assert torch.equal(a32, ds[i])
        _close(a64, a32, "mask")
    # dare_div on bf16 inputs: the division rounded to bf16, as the program's DARE step
    dens = 0.3
    q = make_recipe(n, method="dare_linear", has_base=True, density=dens, seed=SEED)
    pd = make_params(q, NAME, True).with_fields(dare_div=True, dare_den=[np.float32(dens)] * n)
    _, dd = kp.dropped_deltas(pd, base, models, SEED, NAME)
    from m3kernels.merge.philox import dare_keep_mask

    for i in range(n):
        k = dare_keep_mask(SEED, NAME, i, (numel,), dens)
        got32, got64 = dare_div_deltas(d32[i], k, dens, BF16)
        assert torch.equal(got32, dd[i])
        assert torch.equal(got64, dd[i].to(F64))
