"""The round-2 kernel pieces (V1..V7 of docs/KERNEL.md: keep mask, den_floor, agree_w, fma, count vote,
count divisor, dare_div) on the GPU backends' own code paths, without a GPU.

* the CUDA kernel bodies through the extension's host emulation (``emulate_merge``,
  ``emulate_histogram``, ``emulate_ram_counts``, ``emulate_tie_counts``): every instantiation the
  launcher picks (exact N = 1..4 with one input dtype, the generic kernel for N > 4 or mixed dtypes),
  the vector and the scalar tail / unaligned paths, the exact-k tie kernel;
* the Triton kernels in the interpreter on small odd sizes, and their sm_90 PTX (``fma.rn.f32`` only
  with V1; no fma otherwise) where this Triton can compile for NVIDIA;
* on a GPU (skipped here): the launched kernels against the emulation at multi-wave sizes.

Stage B is compared bit for bit with :func:`program`, a float32 transcription of KERNEL.md with
V1..V7 written here from the contract (torch operations, one rounding each, in the documented order;
the fused multiply-add from float64 with the one double-rounding case resolved exactly), with
tests/kernel_program.py once it has the piece, and with the CPU backend once its ``FEATURES`` lists
it (the backends read every new field with ``getattr``, so they also run KernelParams without it).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

from m3kernels.merge.kernel_params import KernelParams, make_params
from m3kernels.merge.philox import dare_uniform_u32
from m3kernels.merge.recipe import make_recipe

import kernel_program as kp
from helpers import have_backend

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}
SUM, MEAN, TIES, RAM = 0, 1, 2, 4
SEED, NAME = 5, "w"
V2_FEATURES = {"keep_mask", "den_floor", "agree_w", "fma", "vote_count", "ties_div_count", "dare_div"}

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# ------------------------------------------------------------------------ parameters


def params(n, method="task_arithmetic", has_base=True, recipe_kw=None, **fields):
    """make_params of ``method`` with ``fields`` replaced (with_fields casts the arrays)."""
    recipe = make_recipe(n, has_base=has_base, method=method, seed=SEED, **(recipe_kw or {}))
    p = make_params(recipe, NAME, has_base)
    return p.with_fields(**fields) if fields else p


def field(p, name, default=None):
    return getattr(p, name, default)


# ------------------------------------------------------------------------ the float32 program


def _s(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=F32)


def sgn(x: torch.Tensor) -> torch.Tensor:
    """1, -1 or 0 (NaN and +-0) as float32."""
    one = torch.ones((), dtype=F32)
    return torch.where(x > 0, one, torch.where(x < 0, -one, torch.zeros((), dtype=F32)))


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fmaf(a, b, c) elementwise: a * b is exact in float64, the float64 sum rounds once, and the
    rounding to float32 is then correct except where that sum is a float32 halfway point, which
    is recomputed exactly (Fraction)."""
    a, b, c = torch.broadcast_tensors(a, b, c)
    s = a.to(F64) * b.to(F64) + c.to(F64)
    r = s.to(F32)
    lo, hi = r.to(F64), torch.nextafter(r, torch.where(s > r.to(F64), _s(float("inf")), _s(-float("inf"))))
    mid = torch.isfinite(s) & (s != r.to(F64)) & ((lo + hi.to(F64)) / 2 == s)
    for j in mid.reshape(-1).nonzero().reshape(-1).tolist():
        x, y, z = (float(t.reshape(-1)[j]) for t in (a, b, c))
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        cand = [float(r.reshape(-1)[j]), float(hi.reshape(-1)[j])]
        err = [abs(Fraction(v) - exact) for v in cand]
        if err[0] != err[1]:
            best = cand[int(err[1] < err[0])]
        else:  # an exact tie in float32 too: the even one
            best = cand[int(np.float32(cand[1]).view(np.uint32) % 2 == 0)]
        r.reshape(-1)[j] = best
    return r


def round_to(d: torch.Tensor, dtype) -> torch.Tensor:
    return d.to(dtype).to(F32)


def mask_bits(p, i, numel) -> torch.Tensor:
    """Bit J of model i's keep mask (np.packbits(bitorder='little') layout), J = 0 .. numel - 1."""
    m = np.asarray(p.keep_mask, np.uint8).reshape(-1)
    start = i * int(field(p, "mask_stride", 0) or 0)
    bits = np.unpackbits(m[start : start + (numel + 7) // 8], bitorder="little")[:numel]
    return torch.from_numpy(bits.astype(bool))


def deltas(p, base, models):
    """(b, [d_i]) after the DARE step (V7 dare_div) and the keep mask (V6); no trim."""
    shape = models[0].shape
    zero = torch.zeros((), dtype=F32)
    b = base.to(F32) if p.has_base else torch.zeros(shape, dtype=F32)
    ds = []
    for i, x in enumerate(models):
        d = x.to(F32) - b
        if p.dare[i]:
            u = dare_uniform_u32(SEED, NAME, i, d.numel())
            keep = torch.from_numpy(u < np.uint64(p.dare_thr[i])).reshape(shape)
            if field(p, "dare_div", False):
                q = round_to(d / _s(p.dare_den[i]), x.dtype)
                d = torch.where(keep, q, zero)
            else:
                d = torch.where(keep, d * _s(p.dare_scale[i]), zero)
        if field(p, "keep_mask") is not None:
            scale = 1.0 if field(p, "mask_scale") is None else p.mask_scale[i]
            bit = mask_bits(p, i, d.numel()).reshape(shape)
            d = torch.where(bit, d * _s(scale), zero)
        ds.append(d)
    return b, ds


def _abs_bits(d):
    return d.abs().contiguous().view(torch.int32).to(torch.int64)


def program(p, base, models, out_dtype) -> torch.Tensor:
    """docs/KERNEL.md stage B with V1..V7 (no NEARSWAP, no exact-k ties), float32 torch operations."""
    shape = models[0].shape
    zero = torch.zeros((), dtype=F32)
    b, ds = deltas(p, base, models)
    for i, d in enumerate(ds):
        ab = _abs_bits(d)
        lo = 0 if p.trim_min is None else int(p.trim_min[i])
        hi = 0xFFFFFFFF if p.trim_max is None else int(p.trim_max[i])
        ds[i] = torch.where((ab >= lo) & (ab <= hi), d, zero)
    fma = bool(field(p, "fma", False))
    if p.combine == RAM:
        eps = _s(p.ram_eps)
        c = torch.zeros(shape, dtype=F32)
        for d in ds:
            c = c + (d.abs() > eps).to(F32)
        m = torch.zeros(shape, dtype=F32)
        for d, u in zip(ds, p.unique_scale):
            m = torch.where(d.abs() > eps, m + torch.where(c == 1, d * _s(u), d / c), m)
    elif p.combine == TIES:
        vote_kind = int(field(p, "vote_kind", 0) or 0)
        ties_div = int(field(p, "ties_div", 0) or 0)
        agree_w = field(p, "agree_w")
        agree_w = np.ones(p.n, np.float32) if agree_w is None else agree_w
        v = torch.zeros(shape, dtype=F32)
        for w, d in zip(p.vote_w, ds):
            v = v + (sgn(_s(w) * d) if vote_kind == 1 else _s(w) * d)
        pos = v >= 0
        num, den = torch.zeros(shape, dtype=F32), torch.zeros(shape, dtype=F32)
        for c, a, d in zip(p.coef, agree_w, ds):
            e = _s(a) * d
            if ties_div == 1:
                agree = sgn(e) == torch.where(pos, _s(1.0), _s(-1.0))
                num = num + (_s(c) * d) * agree.to(F32)
                den = den + agree.to(F32)
            else:
                agree = (e != 0) & ((e > 0) == pos)
                num = torch.where(agree, num + _s(c) * d, num)
                den = torch.where(agree, den + _s(c), den)
        floor = float(np.float32(field(p, "den_floor", 0.0) or 0.0))
        if ties_div == 1:
            m = num / torch.where(den < 1, _s(1.0), den)
        elif p.normalize and floor > 0:
            m = num / torch.where(den < floor, _s(floor), den)
        elif p.normalize:
            m = torch.where(den != 0, num / torch.where(den != 0, den, _s(1.0)), zero)
        else:
            m = num
    else:
        m = torch.zeros(shape, dtype=F32)
        for i, d in enumerate(ds):
            if p.coef_group:
                flat = torch.arange(d.numel()).reshape(shape)
                g = flat // p.row_len if p.coef_group == 1 else flat % p.row_len
                c = torch.from_numpy(np.asarray(p.group_coef, np.float32))[g * p.n + i]
            else:
                c = _s(p.coef[i])
            m = fma32(c, d, m) if fma else m + c * d
        if p.combine == MEAN:
            m = m / _s(p.mean_den)
    return (b + _s(p.lam) * m).to(out_dtype)


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.contiguous().view(BITS[got.dtype]), want.contiguous().view(BITS[want.dtype])
    ok = (g == w) | (torch.isnan(got) & torch.isnan(want))
    if not bool(ok.all()):
        j = int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} differ; first at {j}: got "
            f"{got.reshape(-1)[j].item()!r}, want {want.reshape(-1)[j].item()!r}"
        )


def kp_has(word: str) -> bool:
    """Whether tests/kernel_program.py's stage_b already has a piece (K-CPU adds them)."""
    return word in inspect.getsource(kp)


KP_WORD = {
    "keep_mask": "keep_mask",
    "den_floor": "den_floor",
    "agree_w": "agree_w",
    "fma": "fma",
    "vote_count": "vote_kind",
    "ties_div_count": "ties_div",
    "dare_div": "dare_div",
}


def cpu_has(feature: str) -> bool:
    if not have_backend("cpu"):
        return False
    from m3kernels.backends import cpu

    return feature in getattr(cpu, "FEATURES", frozenset())


def references(p, base, models, out_dtype, features) -> list:
    """[(name, result)]: this file's program, kernel_program's stage_b and the CPU backend where
    they have every piece in ``features``."""
    refs = [("program", program(p, base, models, out_dtype))]
    if all(kp_has(KP_WORD[f]) for f in features):
        refs.append(("kernel_program", kp.stage_b(p, base, models, out_dtype, SEED, NAME)))
    if all(cpu_has(f) for f in features):
        from m3kernels.backends import cpu

        out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)
        cpu.merge(p, base, models, out)
        refs.append(("cpu", out))
    return refs


def inputs(shape, n, base_dtype, model_dtypes, gen, scale=1.0):
    b = torch.randn(shape, generator=gen, dtype=F64) * scale
    models = [
        (b + 0.05 * scale * torch.randn(shape, generator=gen, dtype=F64)).to(
            model_dtypes[i % len(model_dtypes)]
        )
        for i in range(n)
    ]
    return (None if base_dtype is None else b.to(base_dtype)), models


def random_mask(n, numel, gen, shared=False, pad=3) -> tuple[np.ndarray, int]:
    """(packed uint8 masks, mask_stride): per model ``ceil(numel / 8) + pad`` bytes (stride), or one
    shared mask (stride 0); about 60 % of the bits set."""
    nbytes = (numel + 7) // 8
    rows = 1 if shared else n
    stride = 0 if shared else nbytes + pad
    bits = (torch.rand(rows, stride or nbytes, 8, generator=gen) < 0.6).numpy()
    packed = np.packbits(bits.reshape(rows, -1), axis=1, bitorder="little")
    return np.ascontiguousarray(packed.reshape(-1)), stride


# ------------------------------------------------------------------------ the backends

try:
    from m3kernels.backends import cuda as cuda_backend

    HAVE_CUDA_EXT = cuda_backend.extension_available()
except Exception:  # pragma: no cover
    HAVE_CUDA_EXT = False

try:
    import triton  # noqa: F401

    from m3kernels.backends import triton as triton_backend

    HAVE_TRITON = triton_backend.supports("cuda" if torch.cuda.is_available() else "cpu")
except Exception:  # pragma: no cover
    HAVE_TRITON = False
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _to(x, dev=DEV):
    return None if x is None else x.to(dev)


def triton_merge(p, base, models, out):
    o = torch.full(out.shape, float("nan"), dtype=out.dtype, device=DEV)
    triton_backend.merge(p, _to(base), [_to(m) for m in models], o)
    out.copy_(o.cpu())


def cuda_merge(p, base, models, out):
    cuda_backend.emulate_merge(p, base, models, out)


BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_CUDA_EXT, reason="CUDA extension not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="Triton not usable here")),
]
MERGE = {"cuda": cuda_merge, "triton": triton_merge}
MODULE = {"cuda": lambda: cuda_backend, "triton": lambda: triton_backend}

# (base dtype, model dtypes, out dtype): the first three pick CUDA's exact-N kernels, the others the
# generic one (mixed dtypes)
DTYPES = [
    (BF16, [BF16], BF16),
    (F32, [F32], F32),
    (F16, [F16], F16),
    (BF16, [F32, BF16, F16], F32),
    (F16, [BF16, F32], BF16),
]
IDS = lambda d: f"{d[0]}-{'-'.join(str(x) for x in d[1])}-{d[2]}".replace("torch.", "")  # noqa: E731


def check(be, p, base, models, out_dtype, features, what):
    """The backend's merge (output poisoned first) equals every reference bit for bit."""
    assert features <= MODULE[be]().FEATURES, (be, features)
    out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)
    MERGE[be](p, base, models, out)
    for name, want in references(p, base, models, out_dtype, features):
        same_bits(out, want, f"{be} {what} vs {name}")
    return out


def sizes(be):
    return (1, 7, 1029) if be == "triton" and DEV == "cpu" else (1, 7, 1029, 4099)


# ------------------------------------------------------------------------ V6 keep mask


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_keep_mask(be, dtypes, gen):
    for numel in sizes(be):
        for n, method, shared, scaled in (
            (1, "task_arithmetic", False, True),
            (3, "dare_ties", False, True),
            (2, "ties", True, False),
            (5, "dare_linear", True, True),
        ):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            kw = {"density": 0.7} if method.startswith("dare") else {}
            mask, stride = random_mask(n, numel, gen, shared=shared)
            scale = (torch.rand(n, generator=gen) * 2 + 0.5).numpy().astype(np.float32) if scaled else None
            p = params(n, method, recipe_kw=kw, keep_mask=mask, mask_stride=stride, mask_scale=scale)
            out = check(be, p, base, models, dtypes[2], {"keep_mask"}, f"n={n} {method} numel={numel}")
            if numel > 1000:  # the mask matters
                plain = program(p.with_fields(keep_mask=None), base, models, dtypes[2])
                assert not torch.equal(plain.view(BITS[plain.dtype]), out.view(BITS[out.dtype]))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES[:2] + DTYPES[3:4], ids=IDS)
def test_ram_and_group_coef_with_mask_and_dare_div(be, dtypes, gen):
    """The combines without an EXT kernel of their own on CUDA (RAM: the generic kernel) and the group
    coefficients, with the keep mask and dare_div."""
    shape, n = (7, 147), 3
    base, models = inputs(shape, n, dtypes[0], dtypes[1], gen)
    for m in models[:2]:  # equal to the base in places: RAM's count c varies
        same = torch.rand(shape, generator=gen) < 0.3
        m[same] = base[same].to(m.dtype)
    mask, stride = random_mask(n, base.numel(), gen)
    for combine, extra in ((RAM, {"ram_eps": 1e-3, "unique_scale": [1.5, 1.0, 0.5]}), (SUM, {})):
        if combine == SUM:
            gc = (torch.rand(7 * n, generator=gen) * 2 - 0.5).numpy().astype(np.float32)
            extra = {"coef_group": 1, "row_len": 147, "group_coef": gc}
        p = params(
            n,
            "dare_linear",
            recipe_kw={"density": 0.7},
            combine=combine,
            keep_mask=mask,
            mask_stride=stride,
            mask_scale=[1.25, 0.5, 2.0],
            dare_div=True,
            dare_den=[0.7] * n,
            **extra,
        )
        check(be, p, base, models, dtypes[2], {"keep_mask", "dare_div"}, f"combine {combine}")


@pytest.mark.parametrize("be", BACKENDS)
def test_keep_mask_with_trim_window(be, gen):
    numel, n = 1029, 3
    base, models = inputs((numel,), n, BF16, [BF16], gen)
    mask, stride = random_mask(n, numel, gen)
    p = params(n, "ties", keep_mask=mask, mask_stride=stride, mask_scale=[1.5, 0.25, 1.0])
    _, ds = deltas(p, base, models)
    lo = [int(_abs_bits(d).double().quantile(0.5)) for d in ds]
    hi = [int(_abs_bits(d).double().quantile(0.95)) for d in ds]
    check(be, p.with_trim(lo, hi), base, models, BF16, {"keep_mask"}, "mask + trim window")


@pytest.mark.parametrize("be", BACKENDS)
def test_keep_mask_checks(be, gen):
    base, models = inputs((100,), 2, F32, [F32], gen)
    out = torch.zeros(100)
    mask, stride = random_mask(2, 100, gen, pad=0)
    with pytest.raises(ValueError, match="keep_mask"):
        MERGE[be](params(2, keep_mask=mask[:-1], mask_stride=stride), base, models, out)
    with pytest.raises(ValueError, match="keep_mask"):
        p = params(2, keep_mask=mask, mask_stride=stride)
        p = dataclasses.replace(p, keep_mask=mask.astype(np.int32))  # with_fields would cast it
        MERGE[be](p, base, models, out)
    with pytest.raises(ValueError, match="mask_stride"):
        MERGE[be](params(2, keep_mask=mask, mask_stride=-1), base, models, out)
    with pytest.raises(ValueError, match="mask_stride"):  # shorter than one model's mask
        MERGE[be](params(2, keep_mask=mask, mask_stride=stride - 1), base, models, out)
    with pytest.raises(ValueError, match="den_floor"):
        MERGE[be](params(2, "ties", den_floor=-1.0), base, models, out)
    with pytest.raises(ValueError, match="vote_kind"):
        MERGE[be](params(2, "ties", vote_kind=2), base, models, out)
    with pytest.raises(ValueError, match="ties_div"):
        MERGE[be](params(2, "ties", ties_div=3), base, models, out)
    with pytest.raises(ValueError, match="mask_scale"):
        MERGE[be](params(2, keep_mask=mask, mask_stride=stride, mask_scale=[1.0]), base, models, out)


# ------------------------------------------------------------------------ V5 den_floor, V2 agree_w


def signed_weights(n, gen):
    w = (torch.rand(n, generator=gen) * 2 - 0.7).numpy().astype(np.float32)
    w[0] = -abs(w[0]) - 0.1  # at least one negative weight
    return w


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_den_floor(be, dtypes, gen):
    for numel in sizes(be):
        for n in (1, 2, 4, 6):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            coef = np.full(n, 3e-7, np.float32)  # den = Σ agreeing coef < 1e-6: the floor acts
            coef[-1] = 0.5 if n > 2 else coef[-1]
            p = params(n, "ties", coef=coef, den_floor=float(np.float32(1e-6)))
            assert p.normalize
            check(be, p, base, models, dtypes[2], {"den_floor"}, f"n={n} numel={numel}")
            if numel > 1000:
                off = program(p.with_fields(den_floor=0.0), base, models, dtypes[2])
                assert not torch.equal(
                    off.view(BITS[off.dtype]), program(p, base, models, dtypes[2]).view(BITS[off.dtype])
                )


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_agree_w(be, dtypes, gen):
    for numel in sizes(be):
        for n in (1, 3, 4, 5):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            w = signed_weights(n, gen)
            for normalize in (True, False):
                p = params(n, "ties", vote_w=w, coef=w * np.float32(0.75), agree_w=w, normalize=normalize)
                check(be, p, base, models, dtypes[2], {"agree_w"}, f"n={n} numel={numel} norm={normalize}")
            # agree_w of ones is today's rule, bit for bit
            ones = params(n, "ties", vote_w=w, coef=w, agree_w=np.ones(n, np.float32))
            check(be, ones, base, models, dtypes[2], {"agree_w"}, "agree_w = 1")


# ------------------------------------------------------------------------ V1 fma


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_fma(be, dtypes, gen):
    for numel in sizes(be):
        for n, combine in ((1, SUM), (3, MEAN), (4, SUM), (6, MEAN)):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            coef = (torch.rand(n, generator=gen) * 1.3 - 0.2).numpy().astype(np.float32)
            p = params(n, combine=combine, coef=coef, mean_den=float(np.float32(coef.sum())), fma=True)
            out = check(be, p, base, models, dtypes[2], {"fma"}, f"n={n} combine={combine} numel={numel}")
            if numel > 1000 and dtypes[2] == F32 and n > 1:  # fused differs from unfused somewhere
                plain = program(p.with_fields(fma=False), base, models, F32)
                assert not torch.equal(plain.view(torch.int32), out.view(torch.int32))
    # with group coefficients (rows and columns), and with DARE + trim; fma on a TIES tensor is ignored
    shape = (9, 37)
    base, models = inputs(shape, 3, dtypes[0], dtypes[1], gen)
    for group, groups in ((1, 9), (2, 37)):
        gc = (torch.rand(groups * 3, generator=gen) * 2 - 0.5).numpy().astype(np.float32)
        p = params(
            3,
            "dare_linear",
            recipe_kw={"density": 0.6},
            coef_group=group,
            row_len=37,
            group_coef=gc,
            fma=True,
        )
        check(be, p, base, models, dtypes[2], {"fma"}, f"fma group {group}")
    p = params(3, "ties", fma=True)
    check(be, p, base, models, dtypes[2], {"fma"}, "fma ignored by ties")


def test_fma32_is_correctly_rounded(gen):
    """The reference fused multiply-add: exact (Fraction) on random and on constructed halfway cases."""
    a = torch.randn(2000, generator=gen).to(F32)
    b = torch.randn(2000, generator=gen).to(F32)
    c = torch.randn(2000, generator=gen).to(F32)
    # c = -round(a * b) makes the result the exact rounding error; 1 + 2^-24 + 2^-60-ish ties
    c[:500] = -(a[:500] * b[:500])
    x = torch.tensor([1.0 + 2.0**-23], dtype=F32)
    y = torch.tensor([1.0 + 2.0**-23], dtype=F32)
    z = torch.tensor([-(2.0**-46)], dtype=F32)  # x*y = 1 + 2^-22 + 2^-46: +z makes it exact
    a, b, c = torch.cat([a, x]), torch.cat([b, y]), torch.cat([c, z])
    got = fma32(a, b, c)
    for j in range(0, a.numel(), 7):
        exact = Fraction(float(a[j])) * Fraction(float(b[j])) + Fraction(float(c[j]))
        f = np.float32(float(exact))  # Fraction -> float64 (RN) -> float32: check against neighbours
        best = min(
            (np.float32(f), np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))),
            key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1),
        )
        assert float(got[j]) == float(best), j


# ------------------------------------------------------------------------ V3 count vote, V4 count divisor


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_count_vote_and_count_divisor(be, dtypes, gen):
    for numel in sizes(be):
        for n in (1, 3, 5):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            w = signed_weights(n, gen)
            for vote_kind, ties_div, feats in (
                (1, 0, {"vote_count"}),
                (0, 1, {"ties_div_count"}),
                (1, 1, {"vote_count", "ties_div_count"}),
            ):
                for agree in (None, w) if n == 3 else (w,):
                    p = params(
                        n,
                        "ties",
                        vote_w=w,
                        coef=w * np.float32(1.25),
                        vote_kind=vote_kind,
                        ties_div=ties_div,
                        agree_w=agree,
                    )
                    f = feats | ({"agree_w"} if agree is not None else set())
                    check(
                        be,
                        p,
                        base,
                        models,
                        dtypes[2],
                        f,
                        f"n={n} vote {vote_kind} div {ties_div} numel={numel}",
                    )


# ------------------------------------------------------------------------ V7 dare_div


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_dare_div(be, dtypes, gen):
    for numel in sizes(be):
        for n, method in ((1, "dare_linear"), (3, "dare_ties"), (4, "dare_linear"), (5, "dare_ties")):
            base, models = inputs((numel,), n, dtypes[0], dtypes[1], gen)
            dens = [0.3, 0.9, 0.55, 0.7, 0.45][:n]
            p = params(
                n, method, recipe_kw={"density": dens}, dare_div=True, dare_den=np.asarray(dens, np.float32)
            )
            check(be, p, base, models, dtypes[2], {"dare_div"}, f"n={n} {method} numel={numel}")
    # a model without DARE is not rounded; dare_den None is refused
    base, models = inputs((1029,), 2, BF16, [F16, BF16], gen)
    p = params(2, "dare_linear", recipe_kw={"density": 0.5}, dare_div=True, dare_den=[0.5, 0.5])
    p = p.with_fields(dare=np.asarray([1, 0], np.uint8))
    check(be, p, base, models, F32, {"dare_div"}, "one model without DARE")
    with pytest.raises(ValueError, match="dare_den"):
        MERGE[be](p.with_fields(dare_den=None), base, models, torch.zeros(1029))


# ------------------------------------------------------------------------ special values, unaligned


def special(numel, dtype, gen):
    x = torch.randn(numel, generator=gen, dtype=F64)
    sp = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e-39, 6e-8, 6e4], dtype=F64
    )
    idx = torch.randint(0, numel, (max(1, numel // 12),), generator=gen)
    x[idx] = sp[torch.randint(0, len(sp), (len(idx),), generator=gen)]
    return x.to(dtype)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=IDS)
def test_special_values_every_piece(be, dtypes, gen):
    numel, n = 1029, 3
    base = special(numel, dtypes[0], gen)
    models = [special(numel, dtypes[1][i % len(dtypes[1])], gen) for i in range(n)]
    w = signed_weights(n, gen)
    mask, stride = random_mask(n, numel, gen)
    cases = [
        (
            {"keep_mask"},
            params(
                n,
                "dare_ties",
                recipe_kw={"density": 0.7},
                keep_mask=mask,
                mask_stride=stride,
                mask_scale=[2.0, 0.5, 1.0],
            ),
        ),
        ({"den_floor", "agree_w"}, params(n, "ties", vote_w=w, coef=w, agree_w=w, den_floor=1e-6)),
        (
            {"fma"},
            params(
                n, combine=MEAN, coef=np.abs(w), mean_den=float(np.abs(w).sum(dtype=np.float32)), fma=True
            ),
        ),
        (
            {"vote_count", "ties_div_count", "agree_w"},
            params(n, "ties", vote_w=w, coef=w, agree_w=w, vote_kind=1, ties_div=1),
        ),
        ({"dare_div"}, params(n, "dare_ties", recipe_kw={"density": 0.4}, dare_div=True, dare_den=[0.4] * n)),
    ]
    for feats, p in cases:
        check(be, p, base, models, dtypes[2], feats, f"special values {sorted(feats)}")


@pytest.mark.skipif(not HAVE_CUDA_EXT, reason="CUDA extension not built")
def test_cuda_unaligned_views_and_tails(gen):
    """Views one element into their storage take the scalar path; sizes around the 8-element chunk."""
    n = 3
    for numel in (8, 9, 15, 17, 1001):
        base, models = inputs((numel + 1,), n, BF16, [BF16], gen)
        base, models = base[1:], [m[1:] for m in models]
        w = signed_weights(n, gen)
        mask, stride = random_mask(n, numel, gen)
        p = params(
            n,
            "dare_ties",
            recipe_kw={"density": 0.6},
            vote_w=w,
            coef=w,
            agree_w=w,
            den_floor=1e-6,
            keep_mask=mask,
            mask_stride=stride,
            dare_div=True,
            dare_den=[0.6] * n,
        )
        out = torch.full((numel + 1,), float("nan"), dtype=BF16)[1:]
        cuda_backend.emulate_merge(p, base, models, out)
        same_bits(out, program(p, base, models, BF16), f"unaligned numel={numel}")


# ------------------------------------------------------------------------ stage A sees the same deltas


@pytest.mark.parametrize("be", BACKENDS)
def test_stage_a_histograms_see_dare_div_and_mask(be, gen):
    """The histograms count bits(|d|) of the delta the trim sees: after DARE (dare_div) and the keep mask."""
    numel, n = 1029, 3
    base, models = inputs((numel,), n, BF16, [BF16, F16], gen)
    mask, stride = random_mask(n, numel, gen)
    p = params(
        n,
        "dare_ties",
        recipe_kw={"density": 0.6},
        dare_div=True,
        dare_den=[0.6] * n,
        keep_mask=mask,
        mask_stride=stride,
        mask_scale=[1.0, 2.0, 0.5],
    )
    _, ds = deltas(p, base, models)
    keys = [_abs_bits(d).numpy().astype(np.uint32) for d in ds]
    mod = MODULE[be]()
    hist = (
        cuda_backend.emulate_histogram
        if be == "cuda"
        else lambda p, b, m, pre: mod.histogram(p, _to(b), [_to(x) for x in m], pre)
    )
    h = np.asarray(hist(p, base, models, None))
    for i in range(n):
        np.testing.assert_array_equal(h[i], np.bincount(keys[i] >> 16, minlength=65536), err_msg=f"model {i}")


# ------------------------------------------------------------------------ exact-k ties


def exact_k_fields(p, base, models, windows) -> dict:
    """The exact-k tie fields of ``windows[i] = (D, T)`` (keep ranks D .. D + T - 1 of model i, key
    descending then flat index ascending) from this file's deltas (after DARE and the keep mask),
    by a full sort; the prefixes from NumPy counts per 1024-index tie block."""
    from m3kernels.merge.kernel_params import TRIM_MAX_ALL, tie_prefixes

    _, ds = deltas(p, base, models)
    numel = models[0].numel()
    blocks = np.arange(numel) // 1024
    f = {k: [] for k in ("trim_min", "trim_max", "tie_keep", "tie_skip")}
    cmin, cmax = [], []
    for i, (d, t) in enumerate(windows):
        key = _abs_bits(ds[i]).reshape(-1).numpy()
        order = np.lexsort((np.arange(numel), -key))
        lo = int(key[order[d + t - 1]])
        f["trim_min"].append(lo)
        f["tie_keep"].append(int((key[order[: d + t]] == lo).sum()))
        hi = int(key[order[d]]) if d > 0 else TRIM_MAX_ALL
        f["trim_max"].append(hi)
        f["tie_skip"].append(int((key[order[: d + 1]] == hi).sum()) - 1 if d > 0 else 0)
        nb = -(-numel // 1024)
        cmin.append(np.bincount(blocks[key == lo], minlength=nb))
        cmax.append(np.bincount(blocks[key == hi], minlength=nb))
    f["tie_prefix_min"] = tie_prefixes(np.stack(cmin))
    f["tie_prefix_max"] = tie_prefixes(np.stack(cmax))
    return f, (np.stack(cmin), np.stack(cmax))


@pytest.mark.parametrize("be", BACKENDS)
def test_exact_k_ties_with_round2_pieces(be, gen):
    """trim_ties: k (CUDA: its own tie-block kernel) with the keep mask, negative agree weights,
    den_floor and the count variants: kernel_program's bytes, and tie_counts see the masked deltas."""
    if "tie_keep" not in KernelParams.__dataclass_fields__ or not kp_has("keep_mask"):
        pytest.skip("KernelParams' tie fields and kernel_program's keep mask are needed")
    numel, n = 3001, 3
    base, models = inputs((numel,), n, BF16, [BF16, F16], gen)
    w = signed_weights(n, gen)
    mask, stride = random_mask(n, numel, gen)
    windows = [(0, 900), (300, 1200), (1400, 1)]
    cases = [
        dict(keep_mask=mask, mask_stride=stride, mask_scale=[1.5, 1.0, 0.5], vote_w=w, coef=w, agree_w=w),
        dict(vote_w=w, coef=w, agree_w=w, den_floor=1e-6),
        dict(vote_w=w, coef=w, agree_w=w, vote_kind=1, ties_div=1, keep_mask=mask, mask_stride=0),
    ]
    for k, fields in enumerate(cases):
        p = params(n, "dare_ties", recipe_kw={"density": 0.8}, **fields)
        tf, counts = exact_k_fields(p, base, models, windows)
        q = p.with_fields(**tf)
        if be == "cuda":
            got_counts = cuda_backend.emulate_tie_counts(q, base, models)
        else:
            got_counts = triton_backend.tie_counts(q, _to(base), [_to(m) for m in models])
        for g, want in zip(got_counts, counts):
            np.testing.assert_array_equal(np.asarray(g), want, err_msg=f"{be} case {k} tie counts")
        out = torch.full((numel,), float("nan"), dtype=F32)
        MERGE[be](q, base, models, out)
        same_bits(out, kp.stage_b(q, base, models, F32, SEED, NAME), f"{be} exact-k case {k}")


# ------------------------------------------------------------------------ whole methods

# the methods whose kernels use a round-2 piece (registry features, linear's fma) and TIES with a
# negative weight (agree_w = vote_w by default), with parameters that exercise them
V2_METHODS = {
    "linear": dict(weights=[0.3, 0.61, 1.7]),
    "ties": dict(density=0.6, weights=[1.0, -0.5, 0.7]),
    "dare_ties": dict(density=0.7, weights=[1.0, -0.5, 0.7]),
    "della": dict(density=0.6, epsilon=0.1),
    "della_linear": dict(density=0.6, epsilon=0.1),
    "sce": dict(select_topk=0.5),
    "arcee_fusion": dict(),
}


class EmulatedCuda:
    """The cuda backend's kernels run on the host, as a backend object for merge_job."""

    FEATURES = cuda_backend.FEATURES if HAVE_CUDA_EXT else frozenset()
    l1_sums = staticmethod(cuda_backend.emulate_l1_sums) if HAVE_CUDA_EXT else None
    histogram = staticmethod(cuda_backend.emulate_histogram) if HAVE_CUDA_EXT else None
    merge = staticmethod(cuda_backend.emulate_merge) if HAVE_CUDA_EXT else None
    gram = staticmethod(cuda_backend.emulate_gram) if HAVE_CUDA_EXT else None
    ram_counts = staticmethod(cuda_backend.emulate_ram_counts) if HAVE_CUDA_EXT else None
    tie_counts = staticmethod(cuda_backend.emulate_tie_counts) if HAVE_CUDA_EXT else None


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("method", list(V2_METHODS))
def test_methods_on_the_gpu_kernels_equal_cpu(method, be, gen):
    """merge_tensors on Triton (interpreter) and merge_job with the emulated CUDA kernels give the CPU
    backend's bytes for the methods built on the round-2 pieces."""
    import m3kernels
    from m3kernels.api import merge_job
    from m3kernels.merge.job import MergeJob
    from m3kernels.merge.registry import METHODS

    if not have_backend("cpu"):
        pytest.skip("the CPU backend (m3kernels._C) is the reference here")
    if method not in METHODS:
        pytest.skip(f"{method} is not registered")
    n = 1 if METHODS[method].models[1] == 1 else 3
    shape = (33, 65)
    base, models = inputs(shape, n, F32, [F32, BF16], gen, scale=0.1)  # float32 out: fma shows
    kw = V2_METHODS[method]
    if "weights" in kw:
        kw = dict(kw, weights=kw["weights"][:n])
    want = torch.full(shape, float("nan"), dtype=F32)
    m3kernels.merge_tensors(base, models, out=want, name="w", backend="cpu", method=method, **kw)
    assert not torch.isnan(want).any()
    got = torch.full(shape, float("nan"), dtype=F32)
    if be == "triton":
        o = got.to(DEV)
        m3kernels.merge_tensors(
            _to(base), [_to(m) for m in models], out=o, name="w", backend="triton", method=method, **kw
        )
        got.copy_(o.cpu())
    else:
        recipe = make_recipe(n, method=method, has_base=True, **kw)
        merge_job(MergeJob("w", base, models, F32, recipe, None), EmulatedCuda, got)
    same_bits(got, want, f"{method} on {be} vs cpu")


# ------------------------------------------------------------------------ FEATURES and PTX


@pytest.mark.parametrize("be", BACKENDS)
def test_features_listed(be):
    assert V2_FEATURES <= MODULE[be]().FEATURES


def test_triton_v2_ptx_for_sm90():
    """Compile stage B's new variants for sm_90: fma.rn.f32 exactly with V1; never on the default path."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from m3kernels.backends.triton.kernels import INTERPRETED, merge_kernel
        assert not INTERPRETED
        sig = {"base_ptr": "*bf16", "models": ("*bf16", "*fp16"), "out_ptr": "*bf16", "table": "*i64",
               "group_coef": "*fp32", "numel": "i32", "lam": "fp32", "mean_den": "fp32", "row_len": "i32",
               "index_offset": "i32", "clip_t": "fp32", "ram_eps": "fp32", "tie_prefix_min": "*i64",
               "tie_prefix_max": "*i64", "tie_blocks": "i32", "keep_masks": ("*u8", "*u8"), "den_floor": "fp32"}
        base = dict(N=2, HAS_BASE=True, DARE=True, TRIM=True, NORMALIZE=True, OUT_KIND=1, BIG=False, BLOCK=1024,
                    TIES_K=False, COEF_GROUP=0, KEEP_MASK=False, DARE_DIV=False, AGREE=False, DEN_FLOOR=False,
                    VOTE_KIND=0, TIES_DIV=0, FMA=False)
        cases = {"sum": dict(COMBINE=0), "fma": dict(COMBINE=1, FMA=True), "fma_group": dict(COMBINE=0, FMA=True, COEF_GROUP=2),
                 "ties_v2": dict(COMBINE=2, AGREE=True, DEN_FLOOR=True, KEEP_MASK=True, DARE_DIV=True),
                 "ties_count": dict(COMBINE=2, AGREE=True, VOTE_KIND=1, TIES_DIV=1)}
        for name, extra in cases.items():
            const = dict(base, **extra)
            s = dict(sig, **{k: "constexpr" for k in const})
            try:
                k = triton.compile(ASTSource(merge_kernel, s, constexprs=const), target=GPUTarget("cuda", 90, 32),
                                   options={"enable_fp_fusion": False, "num_warps": 4})
            except Exception as exc:
                if "ptxas" in str(exc) or "NVIDIA" in str(exc) or "cuda" in type(exc).__name__.lower():
                    print("SKIP", type(exc).__name__, str(exc)[:200]); raise SystemExit(0)
                raise
            print(name, " ".join(sorted(set(re.findall(r"\\b((?:fma|div|mul|add|cvt)\\.[a-z0-9.]+)", k.asm["ptx"])))))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"no NVIDIA compiler toolchain in this Triton install: {res.stdout}")
    found = {line.split()[0]: set(line.split()[1:]) for line in res.stdout.splitlines()}
    assert set(found) == {"sum", "fma", "fma_group", "ties_v2", "ties_count"}, res.stdout
    for name, o in found.items():
        has_fma = any(x.startswith("fma") for x in o)
        assert has_fma == name.startswith("fma"), (name, o)
        assert {"mul.rn.f32", "add.rn.f32"} <= o, (name, o)
        assert not any("approx" in x or "full" in x for x in o), (name, o)
    assert "fma.rn.f32" in found["fma"] and "fma.rn.f32" in found["fma_group"]
    assert (
        "div.rn.f32" in found["ties_v2"] and "cvt.rn.f16.f32" in found["ties_v2"]
    )  # dare_div on the fp16 model


# ------------------------------------------------------------------------ on a real GPU

HAS_GPU = torch.cuda.is_available()
SANITIZE_SMALL = os.environ.get("M3K_SANITIZE_SMALL") == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_v2_pieces_match_emulation(gen):
    """Every V1..V7 piece, launched on the device (CUDA and Triton), equals the CUDA host emulation."""
    if not HAVE_CUDA_EXT:
        pytest.skip("the CUDA extension is needed for the emulated reference")
    numel = 9001 if SANITIZE_SMALL else 4_200_011  # several waves
    for n, dtypes in [(1, (BF16, [BF16])), (3, (BF16, [BF16])), (5, (F32, [BF16, F16]))]:
        base, models = inputs((numel,), n, *dtypes, gen)
        w = signed_weights(n, gen)
        mask, stride = random_mask(n, numel, gen)
        smask, _ = random_mask(n, numel, gen, shared=True)
        cases = [
            params(
                n,
                "dare_ties",
                recipe_kw={"density": 0.7},
                keep_mask=mask,
                mask_stride=stride,
                mask_scale=[1.5] * n,
            ),
            params(n, "ties", keep_mask=smask, mask_stride=0, vote_w=w, coef=w, agree_w=w, den_floor=1e-6),
            params(
                n, combine=MEAN, coef=np.abs(w), mean_den=float(np.abs(w).sum(dtype=np.float32)), fma=True
            ),
            params(n, "ties", vote_w=w, coef=w, agree_w=w, vote_kind=1, ties_div=1),
            params(n, "dare_ties", recipe_kw={"density": 0.4}, dare_div=True, dare_den=[0.4] * n),
        ]
        gb, gm = base.cuda(), [m.cuda() for m in models]
        backends = [("triton", triton_backend)] if HAVE_TRITON else []
        if cuda_backend.available():
            backends.append(("cuda", cuda_backend))
        for k, p in enumerate(cases):
            want = torch.full((numel,), float("nan"), dtype=BF16)
            cuda_backend.emulate_merge(p, base, models, want)
            for name, be in backends:
                out = torch.full((numel,), float("nan"), dtype=BF16, device="cuda")
                be.merge(p, gb, gm, out)
                torch.cuda.synchronize()
                same_bits(out.cpu(), want, f"{name} n={n} case {k}")
