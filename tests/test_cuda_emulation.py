"""The CUDA kernel bodies, run on the host through the extension's emulation entry points.

``m3kernels._cuda.emulate_*`` execute the very chunk code the GPU kernels execute (dispatch,
16-byte vector path, scalar tail path, Philox, trim, combine, RNE casts, the L1 blocks and their
reduction tree) on CPU tensors. So on a machine without a GPU these tests check the CUDA kernels'
arithmetic against the float64 reference and, bit for bit, against the float32 program of
docs/KERNEL.md (tests/kernel_program.py) and the CPU backend. What they cannot check (launch
shapes, shared-memory atomics, streams) is covered by test_gpu_backends.py on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.api import prepare, validate_inputs
from m3kernels.merge.kernel_params import make_params
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge, sparsified_deltas

from cases import DTYPE_CASES, METHOD_CASES, kwargs_for
from helpers import assert_close_ulp, have_backend, make_inputs, term_scale
from kernel_program import stage_b

pytest.importorskip("m3kernels._cuda", reason="CUDA extension not built (needs nvcc at install time)")

from m3kernels.backends import cuda as cuda_backend  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


class Emulated:
    """The cuda backend's kernels on the host, as a backend object for api.prepare."""

    l1_sums = staticmethod(cuda_backend.emulate_l1_sums)
    histogram = staticmethod(cuda_backend.emulate_histogram)
    merge = staticmethod(cuda_backend.emulate_merge)


def emulated_merge(base, models, *, out, name="", **kw):
    base, models, _ = validate_inputs(base, models, out)
    recipe = make_recipe(len(models), has_base=base is not None, **kw)
    p, b = prepare(base, models, recipe, name, Emulated)
    Emulated.merge(p, b, models, out)
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, BF16: torch.int16, F16: torch.int16}[t.dtype])


def _check(case, dtype_case, n, shape, gen, name="model.layers.0.mlp.down_proj.weight"):
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    kw = kwargs_for(case, n)
    base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
    out = torch.full(shape, float("nan"), dtype=out_dt)
    p = emulated_merge(base, models, out=out, name=name, **kw)
    what = f"{case}/{dtype_case}/N={n}/{shape}"
    recipe = make_recipe(n, has_base=True, **kw)
    ref, info = reference_merge(base, models, recipe, name)
    assert_close_ulp(out, ref, term_scale(base, models, recipe), what)
    want = stage_b(p, base, models, out_dt, recipe.seed, name)  # docs/KERNEL.md on the same parameters
    assert torch.equal(_bits(out), _bits(want)), (
        f"{what}: emulated CUDA kernel and the float32 program differ"
    )
    if recipe.trim_density is not None:
        got = [m3kernels.merge.select.bits_to_float(int(x)) for x in p.trim_min]
        assert got == info["thresholds"], (what, got, info["thresholds"])
    if have_backend("cpu"):
        cpu = torch.full(shape, float("nan"), dtype=out_dt)
        m3kernels.merge_tensors(base, models, out=cpu, name=name, backend="cpu", **kw)
        assert torch.equal(_bits(out), _bits(cpu)), f"{what}: emulated CUDA kernel and CPU backend differ"


@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matrix_small(case, dtype_case, n, gen):
    for shape in [(1,), (7,), (37, 129)]:
        _check(case, dtype_case, n, shape, gen)


@pytest.mark.parametrize("case", ["ties", "dare_ties_l1", "ties_dare", "task_arith", "dare_ties_m3"])
@pytest.mark.parametrize("dtype_case,n", [("bf16", 2), ("mixed", 3)])
def test_matrix_large(case, dtype_case, n, gen):
    _check(case, dtype_case, n, (1000003,), gen)


@pytest.mark.parametrize("n", [4, 5, 16])
@pytest.mark.parametrize("case", ["ties_nonorm_w", "dare_linear", "linear_w", "ties_dare"])
def test_many_models(n, case, gen):
    """N = 4 (last exact-N kernel) and N > 4 (the generic kernel), up to the limit of 16."""
    _check(case, "bf16" if n != 5 else "mixed", n, (4103,), gen)


def test_too_many_models_is_a_clear_error(gen):
    base, models = make_inputs((8,), 17, (F32, [F32]), gen)
    recipe = make_recipe(17, method="task_arithmetic", has_base=True)
    p = make_params(recipe, "x", True)
    with pytest.raises(ValueError, match="at most 16 models"):
        Emulated.merge(p, base, models, torch.empty(8))


@pytest.mark.parametrize("dtype_case", ["bf16", "f32", "mixed"])
def test_unaligned_pointers_use_the_scalar_path(dtype_case, gen):
    """Views starting one element into their storage are not 16-byte aligned: same bytes out."""
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    kw = dict(method="ties_dare", drop_rate=0.3, density=0.4, seed=7)
    numel = 1031
    base, models = make_inputs((numel + 1,), 3, (base_dt, model_dts), gen)
    shifted_base, shifted_models = base[1:], [m[1:] for m in models]
    assert shifted_base.data_ptr() % 16 != 0
    out_storage = torch.full((numel + 1,), float("nan"), dtype=out_dt)
    emulated_merge(shifted_base, shifted_models, out=out_storage[1:], name="w", **kw)
    aligned = torch.full((numel,), float("nan"), dtype=out_dt)
    emulated_merge(shifted_base.clone(), [m.clone() for m in shifted_models], out=aligned, name="w", **kw)
    assert torch.equal(_bits(out_storage[1:]), _bits(aligned))
    assert torch.isnan(out_storage[0]), "wrote outside the output view"


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 7, 8, 9, 4097])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_dare_mask_bit_for_bit(numel, density):
    """base 0, model 1, no rescale: the merged tensor is the keep mask of the SPEC stream."""
    base = torch.zeros(numel, dtype=F32)
    ones = torch.ones(numel, dtype=F32)
    for i, name in enumerate(["", "model.embed_tokens.weight"]):
        models = [ones * 3.0, ones] if i else [ones]
        out = torch.full((numel,), float("nan"), dtype=F32)
        emulated_merge(
            base,
            models,
            out=out,
            method="dare_linear",
            density=density,
            rescale=False,
            weights=[0.0, 1.0] if i else None,
            seed=77 + i,
            name=name,
        )
        expect = m3kernels.dare_keep_mask(77 + i, name, i, (numel,), density)
        assert torch.equal(out != 0, expect), f"mask differs for model index {i}"


@pytest.mark.parametrize("dtype_case", ["bf16", "mixed_f32out"])
def test_histograms_count_the_reference_deltas(dtype_case, gen):
    """Pass 1 and pass 2 equal np.bincount over the reference's DARE-dropped float32 deltas."""
    base_dt, model_dts, _ = DTYPE_CASES[dtype_case]
    n, numel = 2, 20011
    base, models = make_inputs((numel,), n, (base_dt, model_dts), gen)
    recipe = make_recipe(n, method="ties_dare", has_base=True, drop_rate=0.6, density=0.3, seed=5)
    p = make_params(recipe, "h", True)
    d32, _, _ = sparsified_deltas(base, models, recipe, "h")
    bits = [d.abs().view(torch.int32).numpy().astype(np.int64) for d in d32]
    h1 = Emulated.histogram(p, base, models, None)
    prefix = np.array([int(np.argmax(np.bincount(b >> 16))) for b in bits], dtype=np.uint32)
    prefix[1] = int(np.median(bits[1] >> 16))
    h2 = Emulated.histogram(p, base, models, prefix)
    for i in range(n):
        assert np.array_equal(h1[i], np.bincount(bits[i] >> 16, minlength=65536))
        sel = bits[i][(bits[i] >> 16) == int(prefix[i])]
        assert sel.size > 0
        assert np.array_equal(h2[i], np.bincount(sel & 0xFFFF, minlength=65536))
    if have_backend("cpu"):
        from m3kernels.backends import cpu

        assert np.array_equal(h1, cpu.histogram(p, base, models, None))
        assert np.array_equal(h2, cpu.histogram(p, base, models, prefix))


def test_l1_sums_match_float64(gen):
    n, numel = 2, 50021  # several L1 blocks plus a ragged last one
    base, models = make_inputs((numel,), n, (BF16, [F32, BF16]), gen)
    recipe = make_recipe(n, method="dare_ties", has_base=True, density=0.35, rescale="l1", seed=9)
    p = make_params(recipe, "l1", True)
    total, kept = Emulated.l1_sums(p, base, models)
    for i, m in enumerate(models):
        d = (m.float() - base.float()).abs().double()  # the float32 delta, summed in float64
        keep = m3kernels.dare_keep_mask(9, "l1", i, (numel,), 0.35)
        assert total[i] == pytest.approx(float(d.sum()), rel=1e-12)
        assert kept[i] == pytest.approx(float(d[keep].sum()), rel=1e-12)
