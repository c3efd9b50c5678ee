"""The Triton backend (m3kernels/backends/triton/kernels, m3kernels/backends/triton/__init__.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set
before they are defined), so sizes stay small. Checked here:

* the Philox stream in Triton against the Python definition, bit for bit (known answers, the
  DARE stream including indices past 2**34, and the keep masks recovered from merged outputs);
* stage B against the element-wise float32 transcription of docs/KERNEL.md in
  tests/kernel_program.py (with its own stage A: full sort, float64 sums), bit for bit, for
  every method x dtype mix of tests/cases.py x N in {1, 2, 3} x sizes, output poisoned with NaN
  first; against the CPU backend bit for bit when its extension is built; against the float64
  reference within one output ulp plus the float32 bound;
* stage A: exact trim thresholds against the reference, histograms against direct counts,
  L1 sums against float64 sums; the int64-index paths on small tensors;
* the compiled (GPU) code: no FMA contraction, IEEE division, 16-byte loads (PTX for sm_90,
  built without a GPU).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (see conftest)

import m3kernels  # noqa: E402
from m3kernels.backends import triton as triton_backend  # noqa: E402
from m3kernels.merge.kernel_params import make_params  # noqa: E402
from m3kernels.merge.philox import dare_keep_mask, dare_key, dare_uniform_u32, philox4x32_10  # noqa: E402
from m3kernels.merge.recipe import make_recipe  # noqa: E402
from m3kernels.merge.reference import reference_merge, reference_thresholds  # noqa: E402

from cases import DTYPE_CASES, METHOD_CASES, kwargs_for  # noqa: E402
from helpers import assert_close_ulp, have_backend, make_inputs, term_scale  # noqa: E402
from kernel_program import dropped_deltas, f32_program  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.supports(DEVICE):
    pytest.skip(
        f"the Triton backend does not run on {DEVICE} here (interpreter off?)", allow_module_level=True
    )

from m3kernels.backends.triton import kernels as triton_kernels  # noqa: E402  (after the TRITON_INTERPRET decision)

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
BITS_VIEW = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}

DTYPE_NAMES = list(DTYPE_CASES)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise: identical bit patterns, or both NaN (payloads are not part of the contract)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = a.cpu(), b.cpu()
    view = BITS_VIEW[a.dtype]
    return (a.view(view) == b.view(view)) | (torch.isnan(a) & torch.isnan(b))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    ok = same_bits(got, want)
    if not bool(ok.all()):
        idx = int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at {idx}: "
            f"got {got.reshape(-1)[idx].item()!r}, want {want.reshape(-1)[idx].item()!r}"
        )


# ---------------------------------------------------------------------------------------------
# Philox and the DARE stream
# ---------------------------------------------------------------------------------------------

KAT = [  # Random123 philox4x32_10 known answers (docs/RANDOMNESS.md)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_philox_known_answers_and_random_counters():
    rng = np.random.default_rng(7)
    for ctr, key, expect in KAT:
        extra = rng.integers(0, 2**32, size=(13, 4), dtype=np.uint64)  # more counters, same key
        ctrs = np.concatenate([np.array([ctr], dtype=np.uint64), extra])
        got = torch.empty((len(ctrs), 4), dtype=torch.int64, device=DEVICE)
        triton_kernels.philox_kernel[(1,)](
            torch.from_numpy(ctrs.astype(np.int64)).to(DEVICE),
            torch.tensor(key, dtype=torch.int64, device=DEVICE),
            got,
            len(ctrs),
            BLOCK=16,
        )
        got = got.cpu().numpy().astype(np.uint64)
        assert tuple(int(x) for x in got[0]) == expect
        np.testing.assert_array_equal(got, philox4x32_10(ctrs, key))


def _stream(seed, name, i, first, count):
    key = torch.tensor(dare_key(seed, name, i), dtype=torch.int64, device=DEVICE)
    out = torch.full((count,), -1, dtype=torch.int64, device=DEVICE)
    block = 256
    triton_kernels.dare_u32_kernel[(triton_backend.triton.cdiv(count, block),)](
        key, out, first, count, BLOCK=block
    )
    return out.cpu().numpy().astype(np.uint64)


@pytest.mark.parametrize(
    "seed,name,i,count",
    [(0, "", 0, 1), (77, "model.embed_tokens.weight", 2, 1001), (2**64 - 1, "lm_head.weight", 5, 517)],
)
def test_dare_stream_equals_python(seed, name, i, count):
    np.testing.assert_array_equal(_stream(seed, name, i, 0, count), dare_uniform_u32(seed, name, i, count))


def test_dare_stream_past_2_pow_34():
    """Indices whose counter needs both 32-bit words (j >> 2 >= 2**32)."""
    first, count = 2**34 - 64, 200
    key = dare_key(5, "w", 1)
    j = np.arange(first, first + count, dtype=np.uint64)
    q = j >> np.uint64(2)
    ctr = np.stack([q & np.uint64(0xFFFFFFFF), q >> np.uint64(32), 0 * q, 0 * q], axis=-1)
    want = philox4x32_10(ctr, key)[np.arange(count), (j & np.uint64(3)).astype(np.int64)]
    np.testing.assert_array_equal(_stream(5, "w", 1, first, count), want)


def _dare_masks_from_merge(shape, densities, seed, name):
    """base 0, model i = 2**i, no rescale, weights 1: output bit i is model i's keep bit."""
    base = torch.zeros(shape, dtype=F32, device=DEVICE)
    models = [torch.full(shape, float(2**i), dtype=F32, device=DEVICE) for i in range(len(densities))]
    out = torch.full(shape, float("nan"), dtype=F32, device=DEVICE)
    m3kernels.merge_tensors(
        base,
        models,
        method="dare_linear",
        density=densities,
        rescale=False,
        seed=seed,
        name=name,
        out=out,
        backend="triton",
    )
    code = out.cpu().to(torch.int64)
    return [((code >> i) & 1).bool() for i in range(len(densities))]


@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (33, 65)])
def test_dare_masks_bit_for_bit(shape):
    densities = [0.3, 0.5, 0.93]
    for seed, name in ((0, ""), (12345, "model.layers.0.self_attn.q_proj.weight")):
        got = _dare_masks_from_merge(shape, densities, seed, name)
        for i, dens in enumerate(densities):
            assert torch.equal(got[i], dare_keep_mask(seed, name, i, shape, dens)), (shape, seed, i)


def test_dare_density_edges():
    got = _dare_masks_from_merge((301,), [0.0, 1.0], 9, "x")
    assert not got[0].any() and got[1].all()


def test_dare_keep_is_strictly_below_threshold():
    """density = u_j / 2**32 makes the threshold equal u_j exactly: element j is dropped."""
    u = dare_uniform_u32(3, "w", 0, 64)
    j = int(np.argsort(u)[32])
    density = int(u[j]) / 2**32
    got = _dare_masks_from_merge((64,), [density], 3, "w")[0]
    assert not bool(got[j]) and torch.equal(got, dare_keep_mask(3, "w", 0, (64,), density))


# ---------------------------------------------------------------------------------------------
# Stage B (and the stage A it needs) against the float32 program, the CPU backend, the reference
# ---------------------------------------------------------------------------------------------

LARGER = [(3001,), (37, 129)]


def _check_merge(case, n, dtype_name, shape, gen, name="model.layers.1.mlp.up_proj.weight"):
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_name]
    kw = kwargs_for(case, n)
    base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
    recipe = make_recipe(n, has_base=True, **kw)
    what = f"{case}/N={n}/{dtype_name}/{shape}"

    out = torch.full(shape, float("nan"), dtype=out_dt, device=DEVICE)
    m3kernels.merge_tensors(
        base.to(DEVICE), [m.to(DEVICE) for m in models], out=out, name=name, backend="triton", **kw
    )
    out = out.cpu()
    assert_same_bits(out, f32_program(base, models, recipe, name, out_dt), f"{what} vs float32 program")
    if have_backend("cpu"):
        cpu = torch.full(shape, float("nan"), dtype=out_dt)
        m3kernels.merge_tensors(base, models, out=cpu, name=name, backend="cpu", **kw)
        assert_same_bits(out, cpu, f"{what} vs CPU backend")
    ref, info = reference_merge(base, models, recipe, name)
    assert_close_ulp(out, ref, term_scale(base, models, recipe), f"{what} vs reference")
    if recipe.trim_density is not None and recipe.rescale != "l1" and out.numel() > 7:
        got = m3kernels.trim_thresholds(
            base.to(DEVICE), [m.to(DEVICE) for m in models], name=name, backend="triton", **kw
        )
        assert got == info["thresholds"] == reference_thresholds(base, models, recipe, name), what


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_merge_matrix(case, n, gen):
    """Every dtype mix at 7 elements; 1 element, 3001 and an odd 2-D shape in rotating mixes."""
    k = list(METHOD_CASES).index(case) + n
    for dtype_name in DTYPE_NAMES:
        _check_merge(case, n, dtype_name, (7,), gen)
    for t, shape in enumerate([(1,)] + LARGER):
        _check_merge(case, n, DTYPE_NAMES[(k + 2 * t) % len(DTYPE_NAMES)], shape, gen)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_no_base_and_special_values(gen):
    """Without a base (linear), and with zero / equal / huge / -0.0 / inf / NaN deltas."""
    shape = (523,)
    base = torch.randn(shape, generator=gen).to(F32)
    models = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(3)]
    models[0][:40] = base[:40]  # zero deltas: nobody / fewer agree
    models[1][40:60] = -models[2][40:60]  # opposite signs
    models[2][60:70] = 3e38  # huge: float32 overflow, fp16 inf
    models[0][70:80] = -0.0
    base[70:80] = 0.0
    models[1][80:85] = float("inf")
    models[2][85:90] = float("nan")
    for kw in (
        dict(method="linear"),
        dict(method="task_arithmetic", lambda_=0.5),
        dict(method="dare_ties", density=0.8, seed=4),
        dict(method="ties", density=0.5, normalize=False),
    ):
        recipe = make_recipe(3, has_base=True, **kw)
        b = None if kw["method"] == "linear" else base
        for out_dt in (F32, BF16, F16):
            if kw["method"] == "ties":  # radix select vs sort would differ on NaN magnitudes
                ms = [torch.nan_to_num(m, nan=1.0) for m in models]
            else:
                ms = models
            out = torch.full(shape, float("nan"), dtype=out_dt, device=DEVICE)
            m3kernels.merge_tensors(
                None if b is None else b.to(DEVICE),
                [m.to(DEVICE) for m in ms],
                out=out,
                backend="triton",
                name="s",
                **kw,
            )
            want = f32_program(b, ms, recipe, "s", out_dt)
            assert_same_bits(out.cpu(), want, f"{kw['method']}/{out_dt}")


def test_int64_index_path_and_int64_histograms(gen, monkeypatch):
    """Force the >2**31-element code paths (int64 offsets, int64 counts) on a small tensor."""
    shape = (2053,)
    base, models = make_inputs(shape, 2, (BF16, [BF16, F32]), gen)
    kw = dict(method="ties_dare", drop_rate=0.3, density=0.4, seed=21)
    args = (base.to(DEVICE), [m.to(DEVICE) for m in models])
    want = m3kernels.merge_tensors(*args, backend="triton", name="big", **kw).cpu()
    want_thr = m3kernels.trim_thresholds(*args, backend="triton", name="big", **kw)
    monkeypatch.setattr(triton_backend, "INT32_LIMIT", 0)
    got = m3kernels.merge_tensors(*args, backend="triton", name="big", **kw).cpu()
    assert_same_bits(got, want, "int64 offsets")
    assert m3kernels.trim_thresholds(*args, backend="triton", name="big", **kw) == want_thr


# ---------------------------------------------------------------------------------------------
# Stage A directly
# ---------------------------------------------------------------------------------------------


def gen_index(gen, n: int) -> int:
    return int(torch.randint(n, (1,), generator=gen))


def _dropped_deltas(base, models, recipe, name):
    p = make_params(recipe, name, True)
    _, ds = dropped_deltas(p, base, models, recipe.seed, name)
    return p, [d.reshape(-1) for d in ds]


@pytest.mark.parametrize("method", ["ties", "ties_dare"])
def test_histograms_equal_direct_counts(method, gen):
    shape = (61, 67)
    base, models = make_inputs(shape, 3, (BF16, [F16, BF16, F32]), gen, related=False)
    kw = dict(method=method, density=0.3, seed=8) | ({"drop_rate": 0.5} if method == "ties_dare" else {})
    recipe = make_recipe(3, has_base=True, **kw)
    p, ds = _dropped_deltas(base, models, recipe, "h")
    bits = [d.abs().view(torch.int32).to(torch.int64) for d in ds]
    args = (p, base.to(DEVICE), [m.to(DEVICE) for m in models])
    h1 = triton_backend.histogram(*args, None)
    assert h1.shape == (3, 65536) and h1.dtype == np.int64
    prefix = np.zeros(3, dtype=np.uint32)
    for i in range(3):
        np.testing.assert_array_equal(h1[i], torch.bincount(bits[i] >> 16, minlength=65536).numpy())
        prefix[i] = int(bits[i][gen_index(gen, bits[i].numel())]) >> 16  # a populated bin
    h2 = triton_backend.histogram(*args, prefix)
    for i in range(3):
        sel = bits[i][(bits[i] >> 16) == int(prefix[i])]
        np.testing.assert_array_equal(h2[i], torch.bincount(sel & 0xFFFF, minlength=65536).numpy())


def test_l1_sums(gen):
    shape = (4099,)
    base, models = make_inputs(shape, 2, (F16, [BF16, F32]), gen)
    recipe = make_recipe(2, has_base=True, method="dare_ties", density=[0.3, 0.7], rescale="l1", seed=2)
    p = make_params(recipe, "l1", True)
    total, kept = triton_backend.l1_sums(p, base.to(DEVICE), [m.to(DEVICE) for m in models])
    for i, x in enumerate(models):
        mag = (x.to(F32) - base.to(F32)).abs().to(F64)
        keep = dare_keep_mask(2, "l1", i, shape, recipe.dare_density[i])
        assert math.isclose(total[i], float(mag.sum()), rel_tol=1e-13)
        assert math.isclose(kept[i], float(mag[keep].sum()), rel_tol=1e-13)


def test_thresholds_edge_densities():
    """density 0 keeps nothing (inf), a tiny density still keeps the largest (k = max(1, ⌊d·n⌋)),
    k = n keeps everything, ties at the threshold are all kept."""
    base = torch.zeros(100, dtype=F32)
    d = torch.tensor([1.0] * 10 + [0.5] * 30 + [0.25] * 60, dtype=F32)
    got = m3kernels.trim_thresholds(
        base.to(DEVICE), [d.to(DEVICE)] * 4, method="ties", density=[0.2, 0.001, 1.0, 0.0], backend="triton"
    )
    assert got[:2] == [0.5, 1.0] and got[3] == math.inf
    assert got[2] <= 0.25  # keeps all (stage A reports 0.0 for k >= n; the reference the minimum)
    out = m3kernels.merge_tensors(
        base.to(DEVICE), [d.to(DEVICE)], method="ties", density=0.2, backend="triton"
    ).cpu()
    assert int((out != 0).sum()) == 40


# ---------------------------------------------------------------------------------------------
# The module's protocol, and the compiled code
# ---------------------------------------------------------------------------------------------


def test_protocol():
    assert triton_backend.available() and triton_backend.unavailable_reason() == ""
    assert triton_backend.supports("cpu") == triton_kernels.INTERPRETED
    assert not triton_backend.supports("meta")
    assert m3kernels.available_backends()["triton"] == "available"
    with pytest.raises(ValueError, match="expected 2 model tensors"):
        p = make_params(make_recipe(2, method="linear", has_base=False), "", False)
        x = torch.ones(3, device=DEVICE)
        triton_backend.merge(p, None, [x], torch.empty_like(x))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_import_without_triton():
    """Importing m3kernels never fails because of Triton; the backend says why it is missing."""
    res = _run_python("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import m3kernels
        from m3kernels.backends import triton as tb
        assert not tb.available() and "triton" in tb.unavailable_reason()
        assert not tb.supports("cuda") and not tb.supports("cpu")
        assert "triton" in m3kernels.available_backends()["triton"]
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_compiled_ptx_is_unfused_ieee_and_vectorised():
    """Build stage B for sm_90 (no GPU needed): mul/add stay separate (no fma), divisions are
    div.rn, and bf16/fp32 inputs are read (and bf16 written) with 16-byte accesses."""
    res = _run_python("""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from m3kernels.backends.triton.kernels import INTERPRETED, merge_kernel
        assert not INTERPRETED
        aligned = [["tt.divisibility", 16]]
        sig = {"base_ptr": "*bf16", "models": ("*bf16", "*fp32"), "out_ptr": "*bf16", "table": "*i64",
               "group_coef": "*fp32", "numel": "i32", "lam": "fp32", "mean_den": "fp32", "row_len": "i32",
               "index_offset": "i32", "clip_t": "fp32", "ram_eps": "fp32", "tie_prefix_min": "*i64",
               "tie_prefix_max": "*i64", "tie_blocks": "i32"}
        const = dict(N=2, HAS_BASE=True, DARE=True, TRIM=True, COMBINE=2, NORMALIZE=True, COEF_GROUP=0,
                     TIES_K=False, OUT_KIND=1, BIG=False, BLOCK=1024)
        sig.update({k: "constexpr" for k in const})
        # pointers 16-byte aligned and numel a multiple of 16: what Triton specialises on at launch
        attrs = {(0,): aligned, (1, 0): aligned, (1, 1): aligned, (2,): aligned, (3,): aligned, (5,): aligned}
        try:
            k = triton.compile(ASTSource(merge_kernel, sig, constexprs=const, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"enable_fp_fusion": False, "num_warps": 4})
        except Exception as exc:
            print("SKIP", type(exc).__name__, str(exc)[:300])
            raise SystemExit(0)
        ptx = k.asm["ptx"]
        ops = set(re.findall(r"\\b((?:fma|div|mul|add|ld|st)\\.[a-z0-9.]+)", ptx))
        print(" ".join(sorted(ops)))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"no NVIDIA compiler toolchain in this Triton install: {res.stdout}")
    ops = set(res.stdout.split())
    assert not any(op.startswith("fma") for op in ops), ops
    assert "div.rn.f32" in ops and not any(op.startswith(("div.full", "div.approx")) for op in ops), ops
    assert "mul.rn.f32" in ops and "add.rn.f32" in ops, ops
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
