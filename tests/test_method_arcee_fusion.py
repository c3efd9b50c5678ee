"""arcee_fusion: stage A (torch's float32 row-softmax KL computed in row chunks, bit for bit the
whole-tensor value; the importance; the exact quartiles at ⌊q·(n − 1)⌋; τ; the mask) against the
float64 reference; the merge on every backend whose ``FEATURES`` have keep_mask (dtypes, odd
sizes, 1-D and 3-D tensors, poisoned outputs); the edge rules (τ = 0 takes every element, ``>=``);
exactly one model besides the base; parameters; and, opt-in, mergekit 0.1.5 itself."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge.methods import BackendFeatureError, arcee_fusion, element_select, stage
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_methods import fusion_keep

from cases import DTYPE_CASES
from helpers import assert_close_ulp, make_inputs
from method_matrix import BACKENDS, INTERPRETER_SHAPES, skip_unless

BENCH = Path(__file__).resolve().parents[1] / "bench"
MK_VENV = Path(os.environ.get("M3K_MERGEKIT_VENV", "/work/bench_data/mk-venv"))
HAVE_MK = (MK_VENV / "bin" / "python").exists() and any(MK_VENV.glob("lib/python*/site-packages/mergekit"))
SHAPES = [(1,), (7,), (37, 129), (3, 5, 7), (5, 300)]
MATRIX = [(b, d) for b in BACKENDS for d in DTYPE_CASES if b != "triton" or d == "mixed"]


def _scale(base, models):
    return 2 * (base.to(torch.float64).abs() + models[0].to(torch.float64).abs())


@pytest.mark.parametrize("backend,dtype_case", MATRIX)
def test_against_the_reference(backend, dtype_case, gen):
    skip_unless(backend, "arcee_fusion")
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    dev = "cuda" if backend == "cuda" else "cpu"
    for shape in INTERPRETER_SHAPES if backend == "triton" else SHAPES:
        base, models = make_inputs(shape, 1, (base_dt, model_dts), gen)
        out = torch.full(shape, float("nan"), dtype=out_dt, device=dev)
        m3kernels.merge_tensors(
            base.to(dev), [models[0].to(dev)], method="arcee_fusion", out=out, backend=backend
        )
        ref, _ = reference_merge(base, models, make_recipe(1, method="arcee_fusion", has_base=True))
        assert_close_ulp(out.cpu(), ref, _scale(base, models), f"{backend}/{dtype_case}/{shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensor(backend, gen):
    """Above the small-tensor size the quartiles come from the histogram passes; float32 in and
    out, so the output is the base or the model exactly (y = b + f32(x − b))."""
    skip_unless(backend, "arcee_fusion")
    shape = (301, 517) if backend != "triton" else (67, 1031)
    dev = "cuda" if backend == "cuda" else "cpu"
    base, models = make_inputs(shape, 1, (torch.float32, [torch.float32]), gen)
    out = m3kernels.merge_tensors(base.to(dev), [models[0].to(dev)], method="arcee_fusion", backend=backend)
    keep = fusion_keep(base, models[0])
    want = torch.where(keep, base + (models[0] - base), base)
    assert torch.equal(out.cpu(), want)
    assert 0.0 < float(keep.double().mean()) < 0.5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"] + ["cuda-emulated"])
@pytest.mark.parametrize("dtype_case", ["bf16", "f16", "f32", "mixed"])
def test_every_stage_b_against_the_reference_and_bit_identical(backend, dtype_case, gen):
    """CPU, the Triton interpreter and the CUDA kernel body (host emulation): the reference, and
    the same bytes on every backend."""
    from test_method_sce import _stage_b  # one helper for both methods' backends

    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    recipe = make_recipe(1, method="arcee_fusion", has_base=True)
    for shape in [(37, 129), (3, 5, 7), (1001,)]:
        base, models = make_inputs(shape, 1, (base_dt, model_dts), gen)
        out = _stage_b(backend, base, models, recipe, out_dt)
        ref, _ = reference_merge(base, models, recipe, "w")
        assert_close_ulp(out, ref, _scale(base, models), f"{backend}/{dtype_case}/{shape}")
        if backend != "triton" and "triton" in BACKENDS:
            other = _stage_b("triton", base, models, recipe, out_dt)
            assert torch.equal(out.view(torch.uint8), other.view(torch.uint8)), f"{backend} != triton"


# ----------------------------------------------------------------------------- stage A


@pytest.mark.parametrize("shape", [(7,), (37, 129), (3, 5, 7), (2100, 600), (3, 1 << 19)])
def test_importance_in_row_chunks_is_the_whole_tensors(shape, gen):
    """Rows are processed in chunks; torch's row softmax / log / sum give each row the same bits."""
    base, models = make_inputs(shape, 1, (torch.bfloat16, [torch.bfloat16]), gen)
    imp = arcee_fusion.importance(base, models[0])
    x, b = models[0].float(), base.float()
    rows = (lambda t: t.reshape(1, -1)) if x.dim() < 2 else (lambda t: t.reshape(-1, t.shape[-1]))
    p = torch.softmax(rows(x), dim=-1) + 1e-8
    q = torch.softmax(rows(b), dim=-1) + 1e-8
    want = ((rows(x) - rows(b)).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)).reshape(-1)
    assert np.array_equal(imp.view(np.uint32), want.numpy().view(np.uint32))


def test_quartile_positions_are_mergekits():
    for n in (1, 2, 3, 4, 5, 10, 999_999, 1_000_000):
        q = torch.tensor([0.25, 0.5, 0.75]) * (n - 1)  # mergekit's float32 product, then .long()
        assert arcee_fusion.quartile_positions(n) == tuple(int(v) for v in q.long())
    assert arcee_fusion.quartile_positions(10_000_001) == (2_500_000, 5_000_000, 7_500_000)


@pytest.mark.parametrize("n", [9, 1000, 70_001])
def test_threshold_from_exact_quartiles(n, gen):
    imp = (torch.randn(n, generator=gen).abs() * 1e-3).numpy()
    imp[:5] = [0.0, -0.0, -1e-9, 1e-30, 2.0]  # zeros of both signs, a negative (tiny negative KL)
    s = np.sort(imp)
    p = arcee_fusion.quartile_positions(n)
    q1, med, q3 = (np.float32(s[i]) for i in p)
    want = np.float32(med + np.float32(np.float32(1.5) * np.float32(q3 - q1)))
    assert arcee_fusion.threshold(imp) == want


def test_threshold_with_nan_sorts_nan_last():
    imp = np.array([0.1, np.nan, 0.2, 0.3, np.nan, 0.05, 0.4], dtype=np.float32)
    srt = torch.sort(torch.from_numpy(imp)).values.numpy()  # NaN last, as mergekit's sort
    p = arcee_fusion.quartile_positions(imp.size)
    want = np.float32(srt[p[1]] + np.float32(1.5) * np.float32(srt[p[2]] - srt[p[0]]))
    got = arcee_fusion.threshold(imp)
    assert (np.isnan(want) and np.isnan(got)) or got == want


def test_zero_upper_quartile_takes_every_element(gen):
    """Most rows with KL 0 (model = base there): τ = 0 and importance >= 0 holds everywhere."""
    base = torch.randn(40, 9, generator=gen)
    x = base.clone()
    x[:5] += 0.1 * torch.randn(5, 9, generator=gen)  # 5 of 40 rows differ
    mask = arcee_fusion.fusion_mask(base, x)
    keep = element_select.mask_bits(mask, 0, base.numel())
    imp = arcee_fusion.importance(base, x)
    assert arcee_fusion.threshold(imp) == 0.0
    assert np.array_equal(keep, imp >= 0) and keep.sum() >= 40 * 9 - 5 * 9
    ref, _ = reference_merge(base, [x], make_recipe(1, method="arcee_fusion", has_base=True))
    assert torch.equal(ref, x.double())


def test_a_nan_makes_its_row_the_base(gen):
    """A NaN in the model makes its row's softmax, KL and importance NaN: never >= τ, so the row
    stays the base (mergekit: the same, except NaN·0 = NaN at the NaN element itself)."""
    skip_unless("cpu", "arcee_fusion")
    base, models = make_inputs((20, 31), 1, (torch.float32, [torch.float32]), gen)
    x = models[0].clone()
    x[3, 7] = float("nan")
    out = m3kernels.merge_tensors(base, [x], method="arcee_fusion", backend="cpu")
    assert torch.equal(out[3], base[3])
    assert torch.isfinite(out).all()


def test_mask_is_greater_or_equal(gen):
    base, models = make_inputs((37, 129), 1, (torch.float32, [torch.float32]), gen)
    imp = arcee_fusion.importance(base, models[0])
    tau = arcee_fusion.threshold(imp)
    keep = element_select.mask_bits(arcee_fusion.fusion_mask(base, models[0]), 0, imp.size)
    assert np.array_equal(keep, imp >= tau)
    assert np.array_equal(keep, fusion_keep(base, models[0]).reshape(-1).numpy())


def test_stage_b_params_and_missing_feature(gen):
    base, models = make_inputs((13, 7), 1, (torch.float32, [torch.float32]), gen)
    recipe = make_recipe(1, method="arcee_fusion", has_base=True)
    with pytest.raises(BackendFeatureError, match="'arcee_fusion' is not implemented on backend 'fake'"):
        stage(base, models, recipe, "w", types.SimpleNamespace(__name__="fake", FEATURES=frozenset()))
    from m3kernels.merge.kernel_params import KernelParams

    if "keep_mask" not in KernelParams.__dataclass_fields__:
        pytest.skip("KernelParams has no keep_mask yet")
    fake = types.SimpleNamespace(__name__="fake", FEATURES=frozenset({"keep_mask"}))
    p = stage(base, models, recipe, "w", fake).params
    assert p.combine == 0 and p.lam == 1.0 and p.coef.tolist() == [1.0] and p.mask_stride == 0
    assert np.array_equal(p.keep_mask, arcee_fusion.fusion_mask(base, models[0]))


# ----------------------------------------------------------------------------- parameters


def test_exactly_one_model_besides_the_base():
    x = torch.randn(6)
    with pytest.raises(ValueError, match="takes exactly 1 model"):
        m3kernels.merge_tensors(x, [x + 1, x - 1], method="arcee_fusion")
    with pytest.raises(ValueError, match="base"):
        m3kernels.merge_tensors(None, [x], method="arcee_fusion")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(weights=0.5), "weight: method 'arcee_fusion' does not take it"),
        (dict(select_topk=0.5), "select_topk: method 'arcee_fusion' does not take it"),
        (dict(t=0.5), "t: method 'arcee_fusion' does not take it"),
        (dict(mixup_alpha=0.5), "does not take M³"),
        (dict(lambda_=2.0), "lambda"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(1, method="arcee_fusion", has_base=True, **kw)


def _cfg(params=None, n=1):
    raw = {
        "merge_method": "arcee_fusion",
        "base_model": "b",
        "models": [{"model": f"m{i}"} for i in range(n)],
    }
    if params is not None:
        raw["parameters"] = params
    return raw


def test_config():
    c = load_config(_cfg())
    kw = c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    make_recipe(1, method="arcee_fusion", has_base=True, **kw)
    with pytest.raises(MergeConfigError, match="select_topk"):
        load_config(_cfg({"select_topk": 0.5}))
    with pytest.raises(MergeConfigError, match="exactly 1"):
        load_config(_cfg(n=2))


# ----------------------------------------------------------------------------- mergekit itself


@pytest.mark.skipif(not HAVE_MK, reason="no mergekit 0.1.5 venv (set M3K_MERGEKIT_VENV)")
def test_against_mergekit_itself(gen):
    """mergekit's arcee_fusion on the same float32 tensors (n <= 10⁶: its quartiles are exact
    too): bit-equal."""
    skip_unless("cpu", "arcee_fusion")
    sys.path.insert(0, str(BENCH))
    import mergekit_parity as mp

    merges = []
    for shape in [(37, 129), (301, 517), (2000,), (3, 5, 7)]:
        base, models = make_inputs(shape, 1, (torch.float32, [torch.float32]), gen)
        merges.append((base, models, {}))
    outs = mp.direct_merges(MK_VENV, "arcee_fusion", merges, threads=torch.get_num_threads())
    for (base, models, _), want in zip(merges, outs):
        got = m3kernels.merge_tensors(base, models, method="arcee_fusion", backend="cpu")
        assert torch.equal(got, want), base.shape
