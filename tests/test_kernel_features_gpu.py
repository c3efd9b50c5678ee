"""The issue-8 kernel pieces on the GPU backends' own code paths, without a GPU.

tests/test_kernel_features.py checks every backend whose ``FEATURES`` names a piece against
tests/kernel_program.py; on a machine without a GPU it cannot reach the CUDA kernels, and it runs the
Triton kernels in the interpreter on the shapes every backend shares. Here:

* the CUDA kernel bodies through the extension's host emulation (``emulate_merge``, ``emulate_gram``,
  ``emulate_ram_counts``: the device chunk code, run on the host): every instantiation the launcher
  picks (exact N = 1..4 with one input dtype, the generic kernel for N > 4 or mixed dtypes), the
  vector and the scalar tail / unaligned paths, rows that straddle chunks, gram chunk boundaries,
  argument checks;
* the Triton kernels in the interpreter on small inputs (the interpreter is slow), the gram chunk
  boundary with a small chunk, and the compiled PTX for sm_90 (no FMA, IEEE division, float64 gram
  additions) when this Triton can compile for NVIDIA;
* every method built on these pieces (slerp ... breadcrumbs) end to end through the emulated CUDA
  kernels and through Triton, against the CPU backend's bytes;
* on a GPU (skipped here): the launched kernels against the emulation at multi-wave sizes.

Stage B is compared bit for bit with a short float32 transcription of docs/KERNEL.md written here
(:func:`program`; torch operations, one rounding each, in the document's order), and with
tests/kernel_program.py where it has the piece; the gram sums with ``kernel_program.gram`` (same
float64 bits) and the counts with NumPy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.api import merge_job
from m3kernels.merge.job import MergeJob
from m3kernels.merge.kernel_params import KernelParams, make_params
from m3kernels.merge.recipe import make_recipe

import kernel_program as kp
from helpers import have_backend

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}
NONE, ROW, COL = 0, 1, 2
SUM, MEAN, TIES, NEARSWAP, RAM = 0, 1, 2, 3, 4
EPS6 = float(np.float32(1e-6))
HAVE_TIE_FIELDS = "tie_keep" in KernelParams.__dataclass_fields__  # exact-k ties (not on the GPU yet)

# NaN / inf inputs make NumPy (under Triton's interpreter) warn about the very IEEE results we check.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# ------------------------------------------------------------------------ the float32 program


def _s(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=F32)


def program(p, base, models, out_dtype, seed=0, name="t") -> torch.Tensor:
    """docs/KERNEL.md stage B with the issue-8 pieces (window trim, per-group coefficients, NEARSWAP,
    RAM), transcribed in float32 torch operations; DARE through kernel_program.dropped_deltas."""
    shape = models[0].shape
    zero = torch.zeros((), dtype=F32)
    b, ds = kp.dropped_deltas(p, base, models, seed, name)
    if p.combine == NEARSWAP:
        a, x = b, models[0].to(F32)
        dist = torch.clamp((a - x).abs(), min=EPS6)  # clamp: NaN stays NaN
        w = torch.clamp((_s(1.0) / dist) * _s(p.clip_t), 0.0, 1.0)  # torch's t / dist
        return (w * x + (_s(1.0) - w) * a).to(out_dtype)
    for i, d in enumerate(ds):
        ab = d.abs().contiguous().view(torch.int32).to(torch.int64)
        ds[i] = torch.where((ab >= int(p.trim_min[i])) & (ab <= int(p.trim_max[i])), d, zero)
    if p.combine == RAM:
        eps = _s(p.ram_eps)
        sel = [d.abs() > eps for d in ds]
        c = torch.stack(sel).sum(0)
        m = torch.zeros(shape, dtype=F32)
        for i, d in enumerate(ds):
            t = torch.where(c == 1, d * _s(p.unique_scale[i]), d / c.clamp(min=1).to(F32))
            m = torch.where(sel[i], m + t, m)
    elif p.combine == TIES:
        vote = torch.zeros(shape, dtype=F32)
        for w, d in zip(p.vote_w, ds):
            vote = vote + _s(w) * d
        num, den = torch.zeros(shape, dtype=F32), torch.zeros(shape, dtype=F32)
        for c, d in zip(p.coef, ds):
            agree = (d != 0) & ((d > 0) == (vote >= 0))
            num, den = torch.where(agree, num + _s(c) * d, num), torch.where(agree, den + _s(c), den)
        m = torch.where(den != 0, num / torch.where(den != 0, den, _s(1.0)), zero) if p.normalize else num
    else:
        flat = torch.arange(models[0].numel()).reshape(shape)
        m = torch.zeros(shape, dtype=F32)
        for i, d in enumerate(ds):
            if p.coef_group == NONE:
                c = _s(p.coef[i])
            else:
                g = flat // p.row_len if p.coef_group == ROW else flat % p.row_len
                c = torch.from_numpy(np.asarray(p.group_coef, np.float32))[g * p.n + i]
            m = m + c * d
        if p.combine == MEAN:
            m = m / _s(p.mean_den)
    return (b + _s(p.lam) * m).to(out_dtype)


def params(n, has_base=True, method="task_arithmetic", **fields):
    """make_params of ``method`` (linear without a base) with ``fields`` replaced."""
    method = method if has_base else "linear"
    p = make_params(make_recipe(n, has_base=has_base, method=method), "t", has_base)
    return p.with_fields(**fields) if fields else p


def inputs(shape, n, base_dtype, model_dtypes, gen, scale=1.0):
    b = torch.randn(shape, generator=gen, dtype=F64) * scale
    models = [
        (b + 0.05 * scale * torch.randn(shape, generator=gen, dtype=F64)).to(
            model_dtypes[i % len(model_dtypes)]
        )
        for i in range(n)
    ]
    return (None if base_dtype is None else b.to(base_dtype)), models


def group_coefs(groups, n, gen) -> np.ndarray:
    return (torch.rand(groups * n, generator=gen, dtype=F64) * 2 - 0.5).numpy().astype(np.float32)


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.contiguous().view(BITS[got.dtype]), want.contiguous().view(BITS[want.dtype])
    ok = (g == w) | (torch.isnan(got) & torch.isnan(want))
    if not bool(ok.all()):
        j = int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} differ; first at {j}: got "
            f"{got.reshape(-1)[j].item()!r}, want {want.reshape(-1)[j].item()!r}"
        )


def kp_has_stage_b_pieces() -> bool:
    """Whether tests/kernel_program.py's stage_b already has the issue-8 combines (K-CPU writes them)."""
    import inspect

    src = inspect.getsource(kp.stage_b)
    return "group_coef" in src and "unique_scale" in src and "clip_t" in src


def check_against_program(merge, p, base, models, out_dtype, what):
    out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)
    merge(p, base, models, out)
    same_bits(out, program(p, base, models, out_dtype), what)
    if kp_has_stage_b_pieces():
        same_bits(out, kp.stage_b(p, base, models, out_dtype, 0, "t"), what + " (kernel_program)")
    return out


def ram_counts_reference(p, base, models):
    b = base.to(F32) if p.has_base else torch.zeros(models[0].shape)
    ds = [(m.to(F32) - b) for m in models]
    for i, d in enumerate(ds):
        ab = d.abs().view(torch.int32).to(torch.int64)
        ds[i] = torch.where((ab >= int(p.trim_min[i])) & (ab <= int(p.trim_max[i])), d, 0.0)
    sel = torch.stack([d.abs() > _s(p.ram_eps) for d in ds])
    c = sel.sum(0)
    shared = (sel & (c > 1)).reshape(p.n, -1).sum(1).numpy()
    unique = (sel & (c == 1)).reshape(p.n, -1).sum(1).numpy()
    return shared.astype(np.int64), unique.astype(np.int64)


# ----------------------------------------------------------------------------- CUDA emulation

try:
    from m3kernels.backends import cuda as cuda_backend

    HAVE_CUDA_EXT = cuda_backend.extension_available()
except Exception:  # pragma: no cover
    HAVE_CUDA_EXT = False
need_cuda_ext = pytest.mark.skipif(not HAVE_CUDA_EXT, reason="CUDA extension not built (needs nvcc)")

# (base dtype, model dtypes): the first three pick the exact-N kernels, the others the generic one
CUDA_DTYPES = [(BF16, [BF16]), (F32, [F32]), (F16, [F16]), (BF16, [F32, BF16, F16]), (F32, [BF16])]


@need_cuda_ext
@pytest.mark.parametrize("dtypes", CUDA_DTYPES, ids=lambda d: f"{d[0]}-{len(d[1])}")
@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("group", [ROW, COL])
def test_cuda_group_coef(group, n, dtypes, gen):
    """Rows of odd length (chunks of 8 / 4 elements straddle rows), sum and mean, with a trim."""
    for shape in [(5, 13), (3, 1), (1, 17), (11, 37)]:
        base, models = inputs(shape, n, dtypes[0], dtypes[1], gen)
        groups = shape[0] if group == ROW else shape[1]
        for combine in (SUM, MEAN):
            p = params(
                n,
                combine=combine,
                mean_den=1.75,
                coef_group=group,
                row_len=shape[1],
                group_coef=group_coefs(groups, n, gen),
                trim_min=[0x3A000000 * (i % 2) for i in range(n)],
            )
            for out_dtype in (BF16, F32):
                check_against_program(
                    cuda_backend.emulate_merge, p, base, models, out_dtype, f"{shape} n={n} c={combine}"
                )


@need_cuda_ext
@pytest.mark.parametrize("dtypes", CUDA_DTYPES, ids=lambda d: f"{d[0]}-{len(d[1])}")
@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_cuda_trim_window_ties_and_sum(n, dtypes, gen):
    shape = (4099,)
    base, models = inputs(shape, n, dtypes[0], dtypes[1], gen)
    d_bits = [((m.to(F32) - base.to(F32)).abs().view(torch.int32)) for m in models]
    lo = [int(torch.quantile(b.double(), 0.2)) for b in d_bits]
    hi = [int(torch.quantile(b.double(), 0.9)) for b in d_bits]
    for method in ("task_arithmetic", "ties"):
        p = params(n, method=method, trim_min=[0 if i == 1 else x for i, x in enumerate(lo)], trim_max=hi)
        out = check_against_program(cuda_backend.emulate_merge, p, base, models, F32, f"{method} n={n}")
        no_max = torch.empty_like(out)
        cuda_backend.emulate_merge(p.with_fields(trim_max=[0xFFFFFFFF] * n), base, models, no_max)
        assert (out != no_max).double().mean() > 0.05, "trim_max changed nothing"


@need_cuda_ext
@pytest.mark.parametrize("dtypes", CUDA_DTYPES[:4], ids=lambda d: f"{d[0]}-{len(d[1])}")
def test_cuda_nearswap(dtypes, gen):
    base_dt, model_dts = dtypes
    base, models = inputs((1031,), 1, base_dt, model_dts[-1:], gen)
    x = models[0]
    # special values: equal, within 1e-6, NaN in either input, inf
    x[:4] = base[:4]
    x[4] = base[4] + 1e-7 if x.dtype == F32 else x[4]
    x[5], base[6] = float("nan"), float("nan")
    x[7], base[8] = float("inf"), float("-inf")
    for t in (0.0, 0.001, 0.05, 1e30, -0.5):
        p = params(1, combine=NEARSWAP, clip_t=float(np.float32(t)))
        for out_dtype in (F32, BF16, F16):
            out = check_against_program(cuda_backend.emulate_merge, p, base, [x], out_dtype, f"t={t}")
            assert torch.isnan(out[5]) and torch.isnan(out[6])


@need_cuda_ext
@pytest.mark.parametrize("dtypes", CUDA_DTYPES, ids=lambda d: f"{d[0]}-{len(d[1])}")
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_cuda_ram(n, dtypes, gen):
    base, models = inputs((2053,), n, dtypes[0], dtypes[1], gen)
    for i, m in enumerate(models):  # sparse task vectors: each model changes its own third
        keep = (torch.arange(m.numel()) % 3 == i % 3) | (torch.arange(m.numel()) % 7 == 0)
        m.copy_(torch.where(keep, m, base.to(m.dtype)))
    models[0][11] = float("nan")
    us = [float(np.float32(1.0 + 0.25 * i)) for i in range(n)]
    for eps in (1e-5, 0.0, 0.04):
        p = params(n, combine=RAM, ram_eps=float(np.float32(eps)), unique_scale=us)
        check_against_program(cuda_backend.emulate_merge, p, base, models, BF16, f"eps={eps}")
        got = cuda_backend.emulate_ram_counts(p, base, models)
        want = ram_counts_reference(p, base, models)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert got[0].dtype == np.int64 and got[0].sum() + got[1].sum() > 0


def special(numel, dtype, gen) -> torch.Tensor:
    """Random values with NaN, +-inf, +-0 and subnormals (of float32 and of the dtype) sprinkled in."""
    x = torch.randn(numel, generator=gen, dtype=F64) * 0.1
    sp = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e-39, -6e-8, 1e-40], dtype=F64
    )
    idx = torch.randint(0, numel, (numel // 9,), generator=gen)
    x[idx] = sp[torch.randint(0, len(sp), (len(idx),), generator=gen)]
    return x.to(dtype)


@need_cuda_ext
@pytest.mark.parametrize("dtypes", CUDA_DTYPES, ids=lambda d: f"{d[0]}-{len(d[1])}")
def test_cuda_special_values_every_piece(dtypes, gen):
    numel, C, n = 1037, 17, 3
    base = special(numel, dtypes[0], gen)
    models = [special(numel, dtypes[1][i % len(dtypes[1])], gen) for i in range(n)]
    rows = -(-numel // C)
    cases = [
        params(n, coef_group=ROW, row_len=C, group_coef=group_coefs(rows, n, gen)),
        params(n, combine=MEAN, mean_den=3.0, coef_group=COL, row_len=C, group_coef=group_coefs(C, n, gen)),
        params(n, trim_min=[0x00400000] * n, trim_max=[0x3E000000] * n),
        params(n, combine=RAM, ram_eps=0.0, unique_scale=[0.5, 2.0, 3.0]),
        params(1, combine=NEARSWAP, clip_t=0.25),
    ]
    for p in cases:
        for out_dtype in (F32, BF16, F16):
            check_against_program(
                cuda_backend.emulate_merge,
                p,
                base,
                models[: p.n],
                out_dtype,
                f"combine {p.combine} {out_dtype}",
            )
    pr = cases[3]
    for g, w in zip(
        cuda_backend.emulate_ram_counts(pr, base, models), ram_counts_reference(pr, base, models)
    ):
        np.testing.assert_array_equal(g, w)
    p = params(n, coef_group=ROW, row_len=C)
    b, ms = base[: rows * C - C], [m[: rows * C - C] for m in models]  # a multiple of C
    np.testing.assert_array_equal(cuda_backend.emulate_gram(p, b, ms), kp.gram(p, b, ms))  # NaN == NaN here


@need_cuda_ext
def test_cuda_unaligned_views_take_the_scalar_path(gen):
    n, numel, C = 3, 1031, 7
    base, models = inputs((numel + 1,), n, BF16, [BF16], gen)
    gc = group_coefs(-(-numel // C), n, gen)
    for p in (
        params(n, coef_group=ROW, row_len=C, group_coef=gc),
        params(n, combine=RAM, ram_eps=1e-5),
        params(1, combine=NEARSWAP, clip_t=0.01),
    ):
        ms = models[: p.n]
        want = torch.full((numel,), float("nan"), dtype=BF16)
        cuda_backend.emulate_merge(p, base[1:].clone(), [m[1:].clone() for m in ms], want)
        storage = torch.full((numel + 1,), float("nan"), dtype=BF16)
        cuda_backend.emulate_merge(p, base[1:], [m[1:] for m in ms], storage[1:])
        same_bits(storage[1:], want, f"combine {p.combine}")
        assert torch.isnan(storage[0])


GRAM_CASES = [
    (NONE, (1,)),
    (NONE, (131_075,)),  # three chunks, the last one short
    (ROW, (3, 65_537)),  # rows one position longer than a chunk
    (ROW, (7, 13)),
    (COL, (65_541, 2)),
    (COL, (9, 37)),
    (COL, (1, 5)),
]


@need_cuda_ext
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("group,shape", GRAM_CASES, ids=str)
def test_cuda_gram_bits(group, shape, n, gen):
    for base_dt, model_dts in [(BF16, [BF16, F16, F32]), (None, [F32])]:
        base, models = inputs(shape, n, base_dt, model_dts, gen)
        p = params(n, has_base=base is not None, coef_group=group, row_len=shape[-1] if group else 1)
        got = cuda_backend.emulate_gram(p, base, models)
        want = kp.gram(p, base, models)
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@need_cuda_ext
def test_cuda_gram_non_finite_and_unaligned(gen):
    base, models = inputs((4, 101), 2, F32, [F32], gen)
    models[0].view(-1)[17] = float("nan")
    models[1].view(-1)[3 * 101 + 5] = float("inf")
    for group in (NONE, ROW, COL):
        p = params(2, coef_group=group, row_len=101)
        got, want = cuda_backend.emulate_gram(p, base, models), kp.gram(p, base, models)
        np.testing.assert_array_equal(got, want)
        assert not np.isfinite(got).all()
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    pad_b = torch.cat([torch.zeros(1), flat_b])[1:]
    pad_m = [torch.cat([torch.zeros(1), m])[1:] for m in flat_m]
    assert pad_b.data_ptr() % 16 != 0
    p = params(2, coef_group=ROW, row_len=101)
    np.testing.assert_array_equal(cuda_backend.emulate_gram(p, pad_b, pad_m), kp.gram(p, flat_b, flat_m))


@need_cuda_ext
def test_cuda_unset_fields_mean_the_defaults(gen):
    """trim_max / unique_scale None (a KernelParams built without them) keep all / scale by 1."""
    base, models = inputs((999,), 3, BF16, [BF16], gen)
    for combine in (SUM, RAM):
        p = params(3, combine=combine, ram_eps=1e-5)
        a, b = torch.empty(999, dtype=F32), torch.empty(999, dtype=F32)
        cuda_backend.emulate_merge(p, base, models, a)
        cuda_backend.emulate_merge(p.with_fields(trim_max=None, unique_scale=None), base, models, b)
        same_bits(a, b, f"combine {combine}")
        if HAVE_TRITON:
            t = torch.empty(999, dtype=F32)
            triton_merge(p.with_fields(trim_max=None, unique_scale=None), base, models, t)
            same_bits(t, a, f"triton combine {combine}")


@need_cuda_ext
def test_cuda_argument_checks(gen):
    base, models = inputs((6, 5), 2, F32, [F32], gen)
    out = torch.empty(6, 5)
    with pytest.raises(ValueError, match="row_len"):
        cuda_backend.emulate_gram(params(2, coef_group=ROW, row_len=4), base, models)
    with pytest.raises(ValueError, match="row_len"):
        cuda_backend.emulate_gram(params(2, coef_group=COL, row_len=0), base, models)
    with pytest.raises(ValueError, match="coef_group"):
        cuda_backend.emulate_merge(params(2, coef_group=3, row_len=5), base, models, out)
    with pytest.raises(ValueError, match="group_coef"):
        cuda_backend.emulate_merge(params(2, coef_group=ROW, row_len=5), base, models, out)
    with pytest.raises(ValueError, match="group_coef has 10 values; 12 needed"):
        p = params(2, coef_group=ROW, row_len=5, group_coef=np.ones(10, np.float32))
        cuda_backend.emulate_merge(p, base, models, out)
    with pytest.raises(ValueError, match="exactly one model"):
        cuda_backend.emulate_merge(params(2, combine=NEARSWAP, clip_t=0.1), base, models, out)
    with pytest.raises(ValueError, match="need a base"):
        cuda_backend.emulate_merge(params(1, has_base=False, combine=RAM), None, models[:1], out)
    if HAVE_TIE_FIELDS:
        tie = params(2, combine=RAM, trim_min=[0x3F000000] * 2).with_fields(tie_keep=[3, -1])
        with pytest.raises(ValueError, match="exact-k ties go with the sum, mean and ties combines only"):
            cuda_backend.emulate_merge(tie, base, models, out)
        with pytest.raises(ValueError, match="tie_prefix_max has 3 values; 2 needed"):
            p = params(2).with_fields(tie_skip=[1, 0], tie_prefix_max=np.zeros(3, np.int64))
            cuda_backend.emulate_merge(p, base, models, out)
    args = cuda_backend.kernel_args(params(2), base, models, out, device_type="cpu")
    with pytest.raises(ValueError, match="need tie_prefix_min and tie_prefix_max"):  # the extension checks
        cuda_backend._ext().emulate_merge(dict(args, tie_rule=True, tie_keep=[3, -1]))
    empty = cuda_backend.emulate_gram(params(2), torch.zeros(0), [torch.zeros(0), torch.zeros(0)])
    np.testing.assert_array_equal(empty, np.zeros((1, 2, 2)))
    assert cuda_backend.FEATURES >= {
        "trim_max",
        "group_coef",
        "nearswap",
        "ram",
        "gram",
        "ram_counts",
        "trim_ties_k",
    }


# ----------------------------------------------------------------------------- Triton interpreter

try:
    import triton  # noqa: F401

    from m3kernels.backends import triton as triton_backend

    HAVE_TRITON = triton_backend.supports("cuda" if torch.cuda.is_available() else "cpu")
except Exception:  # pragma: no cover
    HAVE_TRITON = False
need_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton not installed or its interpreter is off")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _to(x, dev=DEV):
    return None if x is None else x.to(dev)


def triton_merge(p, base, models, out):
    o = torch.empty_like(out, device=DEV).fill_(float("nan"))
    triton_backend.merge(p, _to(base), [_to(m) for m in models], o)
    out.copy_(o.cpu())


@need_triton
@pytest.mark.parametrize("n", [1, 3])
def test_triton_stage_b_pieces(n, gen):
    shape = (9, 131)  # odd rows and columns, one interpreter block
    base, models = inputs(shape, n, BF16, [BF16, F32, F16], gen)
    rows, cols = shape
    d_bits = [((m.to(F32) - base.to(F32)).abs().view(torch.int32)) for m in models]
    hi = [int(torch.quantile(b.double(), 0.8)) for b in d_bits]
    cases = [
        params(n, coef_group=ROW, row_len=cols, group_coef=group_coefs(rows, n, gen)),
        params(
            n, combine=MEAN, mean_den=0.75, coef_group=COL, row_len=cols, group_coef=group_coefs(cols, n, gen)
        ),
        params(n, trim_min=[0x3B000000] * n, trim_max=hi),
        params(n, method="ties", trim_max=hi),
        params(n, combine=RAM, ram_eps=1e-5, unique_scale=[1.5] * n),
    ]
    if n == 1:
        cases.append(params(1, combine=NEARSWAP, clip_t=float(np.float32(0.01))))
    for p in cases:
        check_against_program(triton_merge, p, base, models, BF16, f"triton combine {p.combine}")
    if HAVE_CUDA_EXT:  # the two GPU backends agree byte for byte
        for p in cases:
            a = torch.empty(shape, dtype=F16)
            b = torch.empty(shape, dtype=F16)
            triton_merge(p, base, models, a)
            cuda_backend.emulate_merge(p, base, models, b)
            same_bits(a, b, f"triton vs cuda combine {p.combine}")


@need_triton
def test_triton_nearswap_special_values(gen):
    base, x = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    x[:3] = base[:3]
    x[3], base[4], x[5] = float("nan"), float("inf"), float("-inf")
    x[6] = base[6] + 1e-7
    for t in (0.0, 0.3, -1.0, float("inf")):
        p = params(1, combine=NEARSWAP, clip_t=t)
        check_against_program(triton_merge, p, base, [x], F32, f"t={t}")


@need_triton
def test_triton_ram_counts(gen):
    n = 3
    base, models = inputs((1001,), n, F32, [BF16, F32], gen)
    for i, m in enumerate(models):
        m.copy_(torch.where(torch.arange(1001) % (i + 2) == 0, m, base.to(m.dtype)))
    p = params(n, combine=RAM, ram_eps=1e-5, trim_max=[0x3F000000] * n)
    got = triton_backend.ram_counts(p, _to(base), [_to(m) for m in models])
    for g, w in zip(got, ram_counts_reference(p, base, models)):
        np.testing.assert_array_equal(g, w)


@need_triton
@pytest.mark.parametrize("group,shape", [(NONE, (301,)), (ROW, (5, 67)), (COL, (70, 3))], ids=str)
def test_triton_gram_bits(group, shape, gen):
    for n, dtypes in [(1, (None, [F32])), (3, (BF16, [BF16, F16, F32]))]:
        base, models = inputs(shape, n, *dtypes, gen)
        p = params(n, has_base=base is not None, coef_group=group, row_len=shape[-1] if group else 1)
        got = triton_backend.gram(p, _to(base), [_to(m) for m in models])
        np.testing.assert_array_equal(got, kp.gram(p, base, models))
        if HAVE_CUDA_EXT:
            np.testing.assert_array_equal(got, cuda_backend.emulate_gram(p, base, models))


@need_triton
def test_triton_gram_non_finite_and_dtypes(gen):
    for dtypes in [(F16, [BF16]), (F32, [F16, F32])]:
        base, models = inputs((3, 41), 2, *dtypes, gen)
        models[0][1, 7] = float("nan")
        models[1][2, 40] = float("inf")
        for group in (NONE, ROW, COL):
            p = params(2, coef_group=group, row_len=41)
            got = triton_backend.gram(p, _to(base), [_to(m) for m in models])
            np.testing.assert_array_equal(got, kp.gram(p, base, models))
            assert np.isnan(got).any() and np.isinf(got).any() or group != NONE


def exact_k_params(p, hist, tie_counts, numel, windows):
    """Stage A of trim_ties: k from a backend's ``hist(prefix)`` and ``tie_counts(q)``: windows[i] =
    (D, T) keeps ranks D .. D + T - 1 of model i (key descending, flat index ascending)."""
    from m3kernels.merge.kernel_params import TRIM_MAX_ALL, tie_prefixes
    from m3kernels.merge.select import select_thresholds_ties

    ks = [((d + 1, d + t) if d > 0 else (d + t,)) for d, t in windows]
    sel = select_thresholds_ties(hist, ks, numel)
    tmin, tmax, keep, skip = [], [], [], []
    for (d, _), row in zip(windows, sel):
        tmin.append(row[-1][0])
        keep.append(row[-1][1])
        tmax.append(row[0][0] if d > 0 else TRIM_MAX_ALL)
        skip.append(row[0][1] - 1 if d > 0 else 0)
    q = p.with_trim(tmin, tmax).with_fields(tie_keep=keep, tie_skip=skip)
    cmin, cmax = tie_counts(q)
    assert cmin.shape == (p.n, -(-numel // 1024)) and cmin.dtype == np.int64
    return q.with_fields(tie_prefix_min=tie_prefixes(cmin), tie_prefix_max=tie_prefixes(cmax)), (cmin, cmax)


def check_exact_k_window(q, base, models, seed, windows, expect_ties=True):
    """Exactly the window's ranks are kept (among the non-zero keys), and ties were broken."""
    numel = models[0].numel()
    _, ds = kp.dropped_deltas(q, base, models, seed, "t")
    broke = 0
    for i, (d, t) in enumerate(windows):
        key = ds[i].reshape(-1).abs().view(torch.int32).to(torch.int64).numpy()
        kept = (kp._exact_ties(q, i, ds[i].reshape(-1), int(q.trim_min[i]), int(q.trim_max[i])) != 0).numpy()
        order = np.lexsort((np.arange(numel), -key))
        want = np.zeros(numel, bool)
        want[order[d : d + t]] = True
        np.testing.assert_array_equal(kept, want & (key != 0), err_msg=f"model {i}")
        broke += int(((key == int(q.trim_min[i])) & ~want).sum() > 0)
    assert broke > 0 or not expect_ties


@need_triton
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_triton_exact_k_ties_across_programs(method, gen):
    """trim_ties: k on Triton: 9001 elements = two interpreter programs, nine tie blocks (the
    prefixes and the in-block counts meet), windows with many ties; bytes of kernel_program and
    exactly the window's ranks kept."""
    if not HAVE_TIE_FIELDS:
        pytest.skip("KernelParams has no exact-k tie fields")
    numel, n = 9001, 3
    base, models = inputs((numel,), n, BF16, [BF16], gen)
    recipe = make_recipe(
        n, method=method, has_base=True, **({"density": 0.8} if method == "dare_ties" else {})
    )
    p = make_params(recipe, "t", True)
    b, ms = _to(base), [_to(m) for m in models]
    windows = [(0, 1800), (900, 3000), (4499, 1)]
    q, counts = exact_k_params(
        p,
        lambda pre: triton_backend.histogram(p, b, ms, pre),
        lambda q: triton_backend.tie_counts(q, b, ms),
        numel,
        windows,
    )
    out = torch.full((numel,), float("nan"), dtype=F32, device=DEV)
    triton_backend.merge(q, b, ms, out)
    same_bits(out.cpu(), kp.stage_b(q, base, models, F32, recipe.seed, "t"), f"{method} exact-k")
    check_exact_k_window(q, base, models, recipe.seed, windows)
    if HAVE_CUDA_EXT:
        for g, w in zip(cuda_backend.emulate_tie_counts(q, base, models), counts):
            np.testing.assert_array_equal(g, w)


@need_cuda_ext
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
@pytest.mark.parametrize("n,dtypes", [(3, (BF16, [BF16])), (5, (F32, [BF16, F16]))])
def test_cuda_exact_k_ties(method, n, dtypes, gen):
    """trim_ties: k in the CUDA kernels (host emulation): one thread per tie block, a running count
    from the block's prefix; 9001 elements (a partial last tie block), bytes of kernel_program."""
    if not HAVE_TIE_FIELDS:
        pytest.skip("KernelParams has no exact-k tie fields")
    numel = 9001
    base, models = inputs((numel,), n, *dtypes, gen)
    recipe = make_recipe(
        n, method=method, has_base=True, **({"density": 0.8} if method == "dare_ties" else {})
    )
    p = make_params(recipe, "t", True)
    windows = [(0, 1800), (900, 3000), (4499, 1), (0, 9001), (10, 20)][:n]
    q, _ = exact_k_params(
        p,
        lambda pre: cuda_backend.emulate_histogram(p, base, models, pre),
        lambda q: cuda_backend.emulate_tie_counts(q, base, models),
        numel,
        windows,
    )
    for out_dtype in (F32, BF16):
        out = torch.full((numel,), float("nan"), dtype=out_dtype)
        cuda_backend.emulate_merge(q, base, models, out)
        same_bits(out, kp.stage_b(q, base, models, out_dtype, recipe.seed, "t"), f"{method} exact-k")
    check_exact_k_window(q, base, models, recipe.seed, windows[:3], expect_ties=dtypes[0] == BF16)
    if have_backend("cpu"):
        from m3kernels.backends import cpu

        for g, w in zip(cuda_backend.emulate_tie_counts(q, base, models), cpu.tie_counts(q, base, models)):
            np.testing.assert_array_equal(g, w)


def _ordered_gram(vs, chunk, lanes=16):
    """float64 Gram matrix of the rows of vs (one group) in KERNEL.md's order with ``chunk``."""
    n, length = vs.shape
    out = np.zeros((n, n))
    for i in range(n):
        for k in range(i, n):
            prod = vs[i] * vs[k]
            total = 0.0
            for c0 in range(0, length, chunk):
                lane = [0.0] * lanes
                for q in range(c0, min(c0 + chunk, length)):
                    lane[q % lanes] += prod[q]
                cv = 0.0
                for x in lane:
                    cv += x
                total += cv
            out[i, k] = out[k, i] = total
    return out


@need_triton
def test_triton_gram_chunk_boundaries(gen, monkeypatch):
    """GRAM_CHUNK = 64 (the layout code is the same for any chunk): partial chunks, many units per
    program, the host's chunk-order additions, unrolled steps past a chunk's end, against a plain
    Python transcription."""
    monkeypatch.setattr(triton_backend, "GRAM_CHUNK", 64)
    for steps, (group, shape) in zip([1, 4, 3], [(NONE, (300,)), (ROW, (3, 150)), (COL, (130, 2))]):
        monkeypatch.setattr(triton_backend, "GRAM_STEPS_INTERPRETED", steps)  # the unrolled loop too
        n = 2
        base, models = inputs(shape, n, BF16, [F32, BF16], gen, scale=1e3)
        p = params(n, coef_group=group, row_len=shape[-1] if group else 1)
        got = triton_backend.gram(p, _to(base), [_to(m) for m in models])
        v = np.stack([(m.to(F32) - base.to(F32)).to(F64).numpy() for m in models])
        if group == NONE:
            seqs = [v.reshape(n, -1)]
        elif group == ROW:
            seqs = [v[:, r, :] for r in range(shape[0])]
        else:
            seqs = [v[:, :, c] for c in range(shape[1])]
        want = np.stack([_ordered_gram(s, 64) for s in seqs])
        np.testing.assert_array_equal(got, want)


@need_triton
def test_triton_argument_checks(gen):
    base, models = inputs((6, 5), 2, F32, [F32], gen)
    out = torch.empty(6, 5, device=DEV)
    b, ms = _to(base), [_to(m) for m in models]
    with pytest.raises(ValueError, match="row_len"):
        triton_backend.gram(params(2, coef_group=ROW, row_len=4), b, ms)
    with pytest.raises(ValueError, match="group_coef has 10 values; 12 needed"):
        p = params(2, coef_group=ROW, row_len=5, group_coef=np.ones(10, np.float32))
        triton_backend.merge(p, b, ms, out)
    with pytest.raises(ValueError, match="exactly one model"):
        triton_backend.merge(params(2, combine=NEARSWAP), b, ms, out)
    if HAVE_TIE_FIELDS:
        with pytest.raises(ValueError, match="exact-k ties .* sum, mean and ties combines only"):
            triton_backend.merge(params(2, combine=RAM).with_fields(tie_skip=[0, 2]), b, ms, out)
        with pytest.raises(ValueError, match="tie_prefix_min has 3 values; 2 needed"):
            p = params(2).with_fields(tie_keep=[1, 1], tie_prefix_min=np.zeros(3, np.int64))
            triton_backend.merge(p, b, ms, out)
    assert triton_backend.FEATURES >= {
        "trim_max",
        "group_coef",
        "nearswap",
        "ram",
        "gram",
        "ram_counts",
        "trim_ties_k",
    }


def test_triton_new_kernels_compile_unfused_for_sm90():
    """Compile stage B (group coefficients, RAM, NEARSWAP) and the gram kernel for sm_90 without a GPU:
    no fma, IEEE division, float64 gram additions. Skipped where Triton has no NVIDIA toolchain."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from m3kernels.backends.triton.kernels import INTERPRETED, gram_kernel, merge_kernel
        assert not INTERPRETED
        def ops(kernel, sig, const, warps=4):
            sig = dict(sig, **{k: "constexpr" for k in const})
            try:
                k = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                                   options={"enable_fp_fusion": False, "num_warps": warps})
            except Exception as exc:
                if "ptxas" in str(exc) or "NVIDIA" in str(exc) or "cuda" in type(exc).__name__.lower():
                    print("SKIP", type(exc).__name__, str(exc)[:200]); raise SystemExit(0)
                raise
            return set(re.findall(r"\\b((?:fma|div|mul|add)\\.[a-z0-9.]+)", k.asm["ptx"]))
        sig = {"base_ptr": "*bf16", "models": ("*bf16", "*fp32"), "out_ptr": "*bf16", "table": "*i64",
               "group_coef": "*fp32", "numel": "i32", "lam": "fp32", "mean_den": "fp32", "row_len": "i32",
               "index_offset": "i32", "clip_t": "fp32", "ram_eps": "fp32", "tie_prefix_min": "*i64",
               "tie_prefix_max": "*i64", "tie_blocks": "i32", "keep_masks": ("*u8", "*u8"), "den_floor": "fp32"}
        base = dict(N=2, HAS_BASE=True, DARE=False, TRIM=True, NORMALIZE=False, OUT_KIND=1, BIG=False,
                    BLOCK=1024, TIES_K=False, KEEP_MASK=False, DARE_DIV=False, AGREE=False, DEN_FLOOR=False,
                    VOTE_KIND=0, TIES_DIV=0, FMA=False)
        found = {}
        for name, extra in [("group", dict(COMBINE=0, COEF_GROUP=1)), ("ram", dict(COMBINE=4, COEF_GROUP=0)),
                            ("ties_k", dict(COMBINE=2, COEF_GROUP=0, TIES_K=True))]:
            found[name] = ops(merge_kernel, sig, dict(base, **extra))
        sig1 = dict(sig, models=("*bf16",))
        found["nearswap"] = ops(merge_kernel, sig1, dict(base, N=1, COMBINE=3, COEF_GROUP=0))
        gsig = {"base_ptr": "*bf16", "models": ("*bf16", "*fp32"), "partial_ptr": "*fp64", "units": "i64",
                "length": "i64", "g_stride": "i64", "q_stride": "i64", "chunks": "i64"}
        found["gram"] = ops(gram_kernel, gsig, dict(N=2, HAS_BASE=True, BU=16, LANES=16, CHUNK=65536, STEPS=4))
        found["gram1"] = ops(gram_kernel, dict(gsig, models=("*fp16",)),
                             dict(N=1, HAS_BASE=False, BU=1, LANES=16, CHUNK=65536, STEPS=4), warps=1)
        for name, o in found.items():
            print(name, " ".join(sorted(o)))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"no NVIDIA compiler toolchain in this Triton install: {res.stdout}")
    found = {line.split()[0]: set(line.split()[1:]) for line in res.stdout.splitlines()}
    assert set(found) == {"group", "ram", "nearswap", "ties_k", "gram", "gram1"}, res.stdout
    for name, o in found.items():
        assert not any(x.startswith("fma") for x in o), (name, o)
    for name in ("group", "ram", "nearswap", "ties_k"):
        assert {"mul.rn.f32", "add.rn.f32"} <= found[name], (name, found[name])
    for name in ("ram", "nearswap"):
        assert "div.rn.f32" in found[name] and not any("approx" in x or "full" in x for x in found[name])
    for name in ("gram", "gram1"):
        assert {"mul.rn.f64", "add.rn.f64"} <= found[name], (name, found[name])


# ----------------------------------------------------------------------------- on a real GPU

HAS_GPU = torch.cuda.is_available()
# bench/gpu_session.sh runs the GPU tests again under compute-sanitizer, on small sizes
SANITIZE_SMALL = os.environ.get("M3K_SANITIZE_SMALL") == "1"


def gpu_test(fn):
    """Needs a CUDA GPU (skipped cleanly without one): the launched kernels, at launch shapes the
    emulation does not have (grid-stride loops over more than one wave, many gram units)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")(fn))


def _gpu_backends():
    out = []
    if HAVE_CUDA_EXT and cuda_backend.available():
        out.append(("cuda", cuda_backend))
    if HAVE_TRITON and HAS_GPU:
        out.append(("triton", triton_backend))
    return out


@gpu_test
def test_gpu_stage_b_pieces_match_emulation(gen):
    """Every issue-8 combine on the device equals the CUDA host emulation and the float32 program."""
    if not HAVE_CUDA_EXT:
        pytest.skip("the CUDA extension is needed for the emulated reference")
    rows, cols = (37, 1029) if SANITIZE_SMALL else (1031, 4099)  # 4.2M elements: several waves
    for n, dtypes in [(1, (BF16, [BF16])), (3, (BF16, [BF16])), (5, (F32, [BF16, F16]))]:
        base, models = inputs((rows, cols), n, *dtypes, gen)
        hi = [
            int(((m.to(F32) - base.to(F32)).abs().view(torch.int32)).double().quantile(0.9))
            for m in models[:1]
        ]
        cases = [
            params(n, coef_group=ROW, row_len=cols, group_coef=group_coefs(rows, n, gen)),
            params(
                n,
                combine=MEAN,
                mean_den=2.5,
                coef_group=COL,
                row_len=cols,
                group_coef=group_coefs(cols, n, gen),
            ),
            params(n, method="ties", trim_min=[0x3A800000] * n, trim_max=hi * n),
            params(n, combine=RAM, ram_eps=0.02, unique_scale=[1.25] * n),
        ]
        if n == 1:
            cases.append(params(1, combine=NEARSWAP, clip_t=0.03))
        gb, gm = base.cuda(), [m.cuda() for m in models]
        for p in cases:
            want = torch.full((rows, cols), float("nan"), dtype=BF16)
            cuda_backend.emulate_merge(p, base, models, want)
            if p.combine != TIES:
                same_bits(want, program(p, base, models, BF16), f"emulation n={n} combine {p.combine}")
            for name, be in _gpu_backends():
                out = torch.full((rows, cols), float("nan"), dtype=BF16, device="cuda")
                be.merge(p, gb, gm, out)
                torch.cuda.synchronize()
                same_bits(out.cpu(), want, f"{name} n={n} combine {p.combine}")


@gpu_test
def test_gpu_exact_k_ties_match_emulation(gen):
    if not (HAVE_CUDA_EXT and HAVE_TIE_FIELDS):
        pytest.skip("the CUDA extension's emulation and KernelParams' tie fields are needed")
    numel, n = (9001 if SANITIZE_SMALL else 3_000_017), 3
    base, models = inputs((numel,), n, BF16, [BF16], gen)
    p = make_params(make_recipe(n, method="ties", has_base=True), "t", True)
    windows = [(0, numel // 5), (numel // 10, numel // 3), (numel // 2, 1)]
    q, counts = exact_k_params(
        p,
        lambda pre: cuda_backend.emulate_histogram(p, base, models, pre),
        lambda q: cuda_backend.emulate_tie_counts(q, base, models),
        numel,
        windows,
    )
    want = torch.full((numel,), float("nan"), dtype=BF16)
    cuda_backend.emulate_merge(q, base, models, want)
    gb, gm = base.cuda(), [m.cuda() for m in models]
    for name, be in _gpu_backends():
        for g, w in zip(be.tie_counts(q, gb, gm), counts):
            np.testing.assert_array_equal(g, w, err_msg=name)
        out = torch.full((numel,), float("nan"), dtype=BF16, device="cuda")
        be.merge(q, gb, gm, out)
        torch.cuda.synchronize()
        same_bits(out.cpu(), want, f"{name} exact-k ties")


@gpu_test
def test_gpu_gram_and_ram_counts_match(gen):
    cases = [(NONE, (10_000_019,)), (ROW, (8193, 129)), (COL, (70_001, 33)), (ROW, (2, 200_003))]
    if SANITIZE_SMALL:
        cases = [(NONE, (70_001,)), (ROW, (301, 7)), (COL, (65_537, 3))]
    for group, shape in cases:
        for n in (2, 5):
            base, models = inputs(shape, n, BF16, [BF16, F16], gen)
            p = params(n, coef_group=group, row_len=shape[-1] if group else 1)
            groups = {NONE: 1, ROW: shape[0], COL: shape[-1]}[group]
            want = kp.gram(p, base, models) if groups <= 64 else None  # kp pads every group to a chunk
            if HAVE_CUDA_EXT:
                emu = cuda_backend.emulate_gram(p, base, models)
                if want is not None:
                    np.testing.assert_array_equal(emu, want)
                want = emu
            if want is None:
                pytest.skip("needs the CUDA extension's emulation as the reference")
            gb, gm = base.cuda(), [m.cuda() for m in models]
            for name, be in _gpu_backends():
                np.testing.assert_array_equal(
                    be.gram(p, gb, gm), want, err_msg=f"{name} {group} {shape} n={n}"
                )
            pr = params(n, combine=RAM, ram_eps=0.05)
            counts = ram_counts_reference(pr, base, models)
            for name, be in _gpu_backends():
                for g, w in zip(be.ram_counts(pr, gb, gm), counts):
                    np.testing.assert_array_equal(g, w, err_msg=f"{name} ram counts {shape}")


# ----------------------------------------------------------------------------- whole methods

METHOD_KW = {
    "slerp": dict(t=0.3),
    "nuslerp": dict(nuslerp_flatten=False),
    "multislerp": dict(),
    "karcher": dict(),
    "model_stock": dict(filter_wise=True),
    "nearswap": dict(t=0.01),
    "ram": dict(),
    "ramplus_tl": dict(),
    "breadcrumbs": dict(density=0.6, gamma=0.05),
    "breadcrumbs_ties": dict(density=0.6, gamma=0.05),
}
ONE_MODEL, TWO_MODELS = ("slerp", "nearswap"), ("nuslerp",)


class EmulatedCuda:
    """The cuda backend's kernels run on the host, as a backend object for merge_job."""

    FEATURES = cuda_backend.FEATURES if HAVE_CUDA_EXT else frozenset()
    l1_sums = staticmethod(cuda_backend.emulate_l1_sums) if HAVE_CUDA_EXT else None
    histogram = staticmethod(cuda_backend.emulate_histogram) if HAVE_CUDA_EXT else None
    merge = staticmethod(cuda_backend.emulate_merge) if HAVE_CUDA_EXT else None
    gram = staticmethod(cuda_backend.emulate_gram) if HAVE_CUDA_EXT else None
    ram_counts = staticmethod(cuda_backend.emulate_ram_counts) if HAVE_CUDA_EXT else None


@pytest.mark.parametrize("method", list(METHOD_KW))
def test_methods_through_the_gpu_kernels_equal_cpu(method, gen):
    """merge_job with the emulated CUDA kernels, and merge_tensors on Triton (interpreter), give the
    CPU backend's bytes for every method built on the issue-8 pieces."""
    if not have_backend("cpu"):
        pytest.skip("the CPU backend (m3kernels._C) is the reference here")
    if not (HAVE_CUDA_EXT or HAVE_TRITON):
        pytest.skip("neither the CUDA extension nor Triton is available")
    n = 1 if method in ONE_MODEL else 2 if method in TWO_MODELS else 3
    shape = (33, 65)
    base, models = inputs(shape, n, BF16, [BF16, F32], gen, scale=0.1)
    kw = METHOD_KW[method]
    want = torch.full(shape, float("nan"), dtype=BF16)
    m3kernels.merge_tensors(base, models, out=want, name="w", backend="cpu", method=method, **kw)
    assert not torch.isnan(want).any()
    if HAVE_CUDA_EXT:
        recipe = make_recipe(n, method=method, has_base=True, **kw)
        got = torch.full(shape, float("nan"), dtype=BF16)
        merge_job(MergeJob("w", base, models, BF16, recipe, None), EmulatedCuda, got)
        same_bits(got, want, f"{method}: emulated CUDA vs CPU")
    if HAVE_TRITON:
        got = torch.full(shape, float("nan"), dtype=BF16, device=DEV)
        m3kernels.merge_tensors(
            _to(base), [_to(m) for m in models], out=got, name="w", backend="triton", method=method, **kw
        )
        same_bits(got.cpu(), want, f"{method}: Triton vs CPU")
