"""sce: stage A (the variance bits against torch, mergekit's float32 k, the exact-k select with its
tie rule, the mean-square weights and their uniform fallback) against the float64 reference; the
whole merge on every backend whose ``FEATURES`` have keep_mask and den_floor (dtypes, N, odd
sizes, poisoned outputs, select_topk at and beyond its edges); config parsing (scalars,
gradients, filters, the ignored per-model weight); bad parameters; and, opt-in, mergekit 0.1.5
itself on the same tensors (``M3K_MERGEKIT_VENV``, or /work/bench_data/mk-venv when present)."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge import registry
from m3kernels.merge.methods import BackendFeatureError, element_select, sce, stage
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_methods import sce_keep, sce_weights

from cases import DTYPE_CASES
from helpers import assert_close_ulp, make_inputs
from method_matrix import BACKENDS, INTERPRETER_SHAPES, skip_unless

BENCH = Path(__file__).resolve().parents[1] / "bench"
MK_VENV = Path(os.environ.get("M3K_MERGEKIT_VENV", "/work/bench_data/mk-venv"))
HAVE_MK = (MK_VENV / "bin" / "python").exists() and any(MK_VENV.glob("lib/python*/site-packages/mergekit"))

CASES = {  # name -> (merge_tensors keywords, model counts)
    "default": (dict(method="sce"), [1, 2, 3]),
    "select_half": (dict(method="sce", select_topk=0.5), [2, 3]),
    "select_small": (dict(method="sce", select_topk=0.07), [2, 3, 4]),
    "select_zero": (dict(method="sce", select_topk=0.0), [2, 3]),
    "select_negative": (dict(method="sce", select_topk=-1.0), [2]),
    "select_above_one": (dict(method="sce", select_topk=2.5), [2, 3]),
    "select_one_model": (dict(method="sce", select_topk=0.6), [1]),
}
SHAPES = [(1,), (7,), (37, 129), (3, 5, 7)]
MATRIX = [(b, c, d) for b in BACKENDS for c in CASES for d in DTYPE_CASES if b != "triton" or d == "mixed"]


def _scale(base, models):
    """The merged delta is a weighted mean of the task vectors: its terms are of order |x| + |b|."""
    b = base.to(torch.float64).abs()
    return 4 * (b + sum((m.to(torch.float64).abs() for m in models), torch.zeros_like(b)))


def _run(backend, base, models, out_dt, **kw):
    dev = "cuda" if backend == "cuda" else "cpu"
    out = torch.full(models[0].shape, float("nan"), dtype=out_dt, device=dev)  # poisoned
    m3kernels.merge_tensors(base.to(dev), [m.to(dev) for m in models], out=out, backend=backend, **kw)
    return out.cpu()


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    skip_unless(backend, "sce")
    kw, counts = CASES[case]
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    interp = backend == "triton"
    for n in counts[-1:] if interp else counts:
        for shape in INTERPRETER_SHAPES if interp else SHAPES:
            base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
            out = _run(backend, base, models, out_dt, **kw)
            ref, _ = reference_merge(base, models, make_recipe(n, has_base=True, **kw), "w")
            assert_close_ulp(out, ref, _scale(base, models), f"{backend}/{case}/N={n}/{shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensor_select(backend, gen):
    """Above the small-tensor size the k-th largest variance comes from the histogram passes."""
    skip_unless(backend, "sce")
    shape = (301, 517) if backend != "triton" else (67, 1031)
    base, models = make_inputs(shape, 3, (torch.bfloat16, [torch.bfloat16]), gen)
    for s in (0.3, 0.9):
        out = _run(backend, base, models, torch.bfloat16, method="sce", select_topk=s)
        ref, _ = reference_merge(base, models, make_recipe(3, method="sce", has_base=True, select_topk=s))
        assert_close_ulp(out, ref, _scale(base, models), f"{backend}/large/{s}")


def emulated_cuda():
    """The CUDA backend's stage-B kernel body run on the host (``m3kernels._cuda`` built without a
    GPU), as a backend object for the family hook; None when it is not built."""
    try:
        from m3kernels import _cuda  # noqa: F401
        from m3kernels.backends import cuda as cb
    except ImportError:
        return None
    return types.SimpleNamespace(__name__="cuda-emulated", FEATURES=cb.FEATURES, merge=cb.emulate_merge)


STAGE_B = [b for b in BACKENDS if b != "cuda"] + ["cuda-emulated"]


def _stage_b(backend: str, base, models, recipe, out_dt):
    """stage A (the hook) and stage B on ``backend`` (cpu, triton, cuda-emulated), poisoned output."""
    from m3kernels.backends import _load

    be = emulated_cuda() if backend == "cuda-emulated" else _load(backend)
    if be is None:
        pytest.skip("the CUDA extension is not built (no host emulation)")
    missing = [f for f in registry.get_method(recipe.method).features if f not in be.FEATURES]
    if missing:
        pytest.skip(f"backend {backend} has no {', '.join(missing)} yet (FEATURES)")
    st = stage(base, models, recipe, "w", be)
    out = torch.full(models[0].shape, float("nan"), dtype=out_dt)
    be.merge(st.params, st.base, st.models, out)
    return out


@pytest.mark.parametrize("backend", STAGE_B)
@pytest.mark.parametrize("dtype_case", ["bf16", "f16", "f32", "mixed"])
def test_every_stage_b_against_the_reference_and_bit_identical(backend, dtype_case, gen):
    """CPU, the Triton interpreter and the CUDA kernel body (host emulation): the reference, and
    the same bytes on every backend (the Triton interpreter is the yardstick when it runs)."""
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    for n, s, shape in [(2, 0.4, (37, 129)), (3, 1.0, (3, 5, 7)), (3, 0.05, (1001,))]:
        base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
        recipe = make_recipe(n, method="sce", has_base=True, select_topk=s)
        out = _stage_b(backend, base, models, recipe, out_dt)
        ref, _ = reference_merge(base, models, recipe, "w")
        assert_close_ulp(out, ref, _scale(base, models), f"{backend}/{dtype_case}/N={n}/{shape}")
        if backend != "triton" and "triton" in STAGE_B:
            other = _stage_b("triton", base, models, recipe, out_dt)
            assert torch.equal(out.view(torch.uint8), other.view(torch.uint8)), f"{backend} != triton"


# ----------------------------------------------------------------------------- stage A


@pytest.mark.parametrize("n", [2, 3, 5])
def test_variance_bits_are_torchs(n, gen):
    """σ² = the float64 two-pass variance of the float32 task vectors rounded to float32: torch's
    CPU ``var(unbiased=False)`` on the float32 stack, bit for bit (mergekit's statistic)."""
    for scale in (1.0, 1e-3, 1e-30):
        tv = [(torch.randn(20011, generator=gen) * scale + 3.0 * scale).numpy() for _ in range(n)]
        ours = sce.variance(tv)
        want = torch.var(torch.from_numpy(np.stack(tv)), dim=0, unbiased=False).numpy()
        assert np.array_equal(ours.view(np.uint32), want.view(np.uint32))


def test_k_is_mergekits_float32_product():
    assert sce.select_k(123_456_789, 0.15) == 18_518_520  # not ⌊nnz·s⌋ = 18 518 518
    assert sce.select_k(1000, 0.5) == 500 and sce.select_k(7, 0.1) == 0
    assert sce.select_k(1000, 0.0) == 0 and sce.select_k(1000, -3.0) == 0
    rng = np.random.default_rng(5)
    for _ in range(200):
        nnz, s = int(rng.integers(1, 2**31)), float(rng.random())
        assert sce.select_k(nnz, s) == int(torch.tensor(nnz) * s)  # torch: int64 tensor × float


@pytest.mark.parametrize("shape", [(7,), (37, 129), (301, 517)])
@pytest.mark.parametrize("s", [0.0, 0.05, 0.5, 0.999, 1.0])
def test_select_mask_is_the_references(shape, s, gen):
    base, models = make_inputs(shape, 3, (torch.bfloat16, [torch.bfloat16]), gen)
    mask = sce.select_mask(base, models, s)
    ref = sce_keep([m.float() - base.float() for m in models], s)
    if s >= 1:
        assert mask is None and ref is None
        return
    got = element_select.mask_bits(mask, 0, base.numel())
    assert np.array_equal(got, ref.reshape(-1).numpy())
    assert mask.size == (base.numel() + 7) // 8


@pytest.mark.parametrize("numel", [1000, 200_003])
def test_select_keeps_exactly_k_with_ties_by_lowest_index(numel, gen):
    """Quantized task vectors: few distinct variances, so the k-th largest is tied many times."""
    base = torch.zeros(numel)
    models = [torch.randint(-2, 3, (numel,), generator=gen).float() for _ in range(2)]
    var = sce.variance([m.numpy() for m in models])
    nnz = int(np.count_nonzero(var))
    for s in (0.3, 0.61):
        k = sce.select_k(nnz, s)
        keep = element_select.mask_bits(sce.select_mask(base, models, s), 0, numel)
        assert int(keep.sum()) == k
        order = np.lexsort((np.arange(numel), -var.astype(np.float64)))  # σ² descending, index ascending
        want = np.zeros(numel, dtype=bool)
        want[order[:k]] = True
        assert np.array_equal(keep, want)
        kth = np.sort(var)[::-1][k - 1]
        assert (var == kth).sum() > (var == kth)[keep].sum() > 0  # the cut really lies in a tie


def test_weights_and_their_uniform_fallback(gen):
    base, models = make_inputs((37, 129), 3, (torch.float32, [torch.float32]), gen)
    w = sce.weights(base, models, None)
    ref = sce_weights([m.float() - base for m in models])
    assert w.dtype == np.float32 and np.allclose(w, ref, rtol=2e-7, atol=0)
    # RMS 1e-4 task vectors: Σ mean squares ≈ 3e-8 < 1e-6, so uniform (mergekit's fallback)
    small = [base + 1e-4 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    assert np.array_equal(sce.weights(base, small, None), np.full(3, np.float32(1) / np.float32(3)))
    assert sce_weights([m - base for m in small]) == [1 / 3] * 3
    # a mask removes elements from the mean squares (the mean is still over all n)
    mask = element_select.pack(np.arange(base.numel()) % 2 == 0)
    half = sce.weights(base, models, mask)
    keep = torch.from_numpy(np.arange(base.numel()) % 2 == 0).reshape(base.shape)
    want = sce_weights([torch.where(keep, m - base, 0.0) for m in models])
    assert np.allclose(half, want, rtol=2e-7, atol=0)


def test_non_finite_task_vectors_do_not_reach_the_weights(gen, caplog):
    base, models = make_inputs((64,), 2, (torch.float32, [torch.float32]), gen)
    bad = models[1].clone()
    bad[3] = float("inf")
    with caplog.at_level(logging.WARNING, logger="m3kernels"):
        w = sce.weights(base, [models[0], bad], None, "t.w")
    assert np.all(np.isfinite(w)) and "non-finite" in caplog.text and "'t.w'" in caplog.text


@pytest.mark.parametrize("s", [1.0, 0.5])
def test_non_finite_inputs_stay_in_their_elements(s, gen):
    """A NaN task-vector element: the variance there is NaN (the largest key, so selected), the
    vote NaN; the output is NaN at that element only, the weights come from the finite elements."""
    skip_unless("cpu", "sce")
    base, models = make_inputs((33, 17), 3, (torch.float32, [torch.float32]), gen)
    models[1] = models[1].clone()
    models[1][4, 5] = float("nan")
    out = m3kernels.merge_tensors(base, models, method="sce", select_topk=s, backend="cpu")
    bad = torch.isnan(out)
    assert bad[4, 5] and int(bad.sum()) == 1
    clean = [m.clone() for m in models]
    clean[1][4, 5] = base[4, 5]  # a zero task-vector element instead
    ref = m3kernels.merge_tensors(base, clean, method="sce", select_topk=s, backend="cpu")
    far = torch.ones_like(bad)
    far[4, 5] = False
    if s >= 1:  # no select: the weights and every other element are the same
        assert torch.equal(out[far], ref[far])
    assert torch.isfinite(out[far]).all()


def test_uniform_weights_and_mask_zero_give_the_base(gen):
    """select_topk 0: every task vector masked; the weights are uniform, nothing agrees, y = b."""
    base, models = make_inputs((5, 9), 2, (torch.float32, [torch.float32]), gen)
    ref, _ = reference_merge(base, models, make_recipe(2, method="sce", has_base=True, select_topk=0.0))
    assert torch.equal(ref, base.double())


def test_stage_b_params():
    """The kernel program: TIES with unit votes, the weights as coefficients, normalize, the
    1e-6 floor and one shared mask; no select: no mask."""
    if not hasattr(m3kernels.merge.kernel_params.KernelParams, "__dataclass_fields__") or (
        "keep_mask" not in m3kernels.merge.kernel_params.KernelParams.__dataclass_fields__
    ):
        pytest.skip("KernelParams has no keep_mask yet")
    fake = types.SimpleNamespace(__name__="fake", FEATURES=frozenset({"keep_mask", "den_floor"}))
    g = torch.Generator().manual_seed(3)
    base, models = make_inputs((40, 11), 2, (torch.float32, [torch.float32]), g)
    st = stage(base, models, make_recipe(2, method="sce", has_base=True, select_topk=0.5), "w", fake)
    p = st.params
    assert p.combine == 2 and p.normalize and p.lam == 1.0 and p.den_floor == np.float32(1e-6)
    assert np.array_equal(p.vote_w, np.ones(2, np.float32)) and p.mask_stride == 0
    assert p.keep_mask.dtype == np.uint8 and p.keep_mask.size == (440 + 7) // 8
    assert np.array_equal(p.coef, sce.weights(base, models, p.keep_mask))
    st = stage(base, models, make_recipe(2, method="sce", has_base=True), "w", fake)
    assert st.params.keep_mask is None


def test_backend_without_the_features_is_refused(gen):
    base, models = make_inputs((7,), 2, (torch.float32, [torch.float32]), gen)
    fake = types.SimpleNamespace(__name__="fake", FEATURES=frozenset({"keep_mask"}))
    with pytest.raises(BackendFeatureError, match="'sce' is not implemented on backend 'fake'.*den_floor"):
        stage(base, models, make_recipe(2, method="sce", has_base=True), "w", fake)


# ----------------------------------------------------------------------------- parameters


def test_defaults_and_recipe():
    r = make_recipe(2, method="sce", has_base=True)
    assert r.get("select_topk") == 1.0 and r.family == "sce"
    r = make_recipe(2, method="sce", has_base=True, select_topk=-2)
    assert r.get("select_topk") == -2.0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(select_topk=float("nan")), "select_topk must be finite"),
        (dict(select_topk=float("inf")), "select_topk must be finite"),
        (dict(select_topk="half"), "select_topk"),
        (dict(weights=[0.5, 0.5]), "weight: method 'sce' does not take it"),
        (dict(density=0.5), "density"),
        (dict(normalize=True), "normalize: method 'sce' does not take it"),
        (dict(lambda_=0.5), "lambda: method 'sce' does not take it"),
        (dict(mixup_alpha=0.5), "mixup_alpha: method 'sce' does not take M³"),
        (dict(mix_ratios=[0.3, 0.7]), "mix_ratios: method 'sce' does not take M³"),
        (dict(t=0.3), "t: method 'sce' does not take it"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(2, method="sce", has_base=True, **kw)


def test_base_is_required():
    with pytest.raises(ValueError, match="base"):
        m3kernels.merge_tensors(None, [torch.ones(3), torch.zeros(3)], method="sce")


def _cfg(params=None, model_params=None, n=2):
    raw = {"merge_method": "sce", "base_model": "b", "models": [{"model": f"m{i}"} for i in range(n)]}
    if params is not None:
        raw["parameters"] = params
    for i, p in (model_params or {}).items():
        raw["models"][i]["parameters"] = p
    return raw


def test_config_scalar_gradient_and_filter():
    c = load_config(_cfg({"select_topk": 0.25, "int8_mask": True}))
    assert c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 3)["select_topk"] == pytest.approx(0.25)
    c = load_config(_cfg({"select_topk": [0.1, 0.9]}))
    assert c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)["select_topk"] == pytest.approx(0.1)
    assert c.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 3)["select_topk"] == pytest.approx(0.5)
    assert c.tensor_kwargs("model.layers.2.mlp.up_proj.weight", 3)["select_topk"] == pytest.approx(0.9)
    c = load_config(_cfg({"select_topk": [{"filter": "self_attn", "value": 0.2}, {"value": 1.0}]}))
    assert c.tensor_kwargs("model.layers.0.self_attn.q_proj.weight", 3)["select_topk"] == pytest.approx(0.2)
    assert c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)["select_topk"] == pytest.approx(1.0)
    kw = c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)
    make_recipe(2, has_base=True, method="sce", **kw)  # what the config gives, the API takes
    assert "select_topk" not in load_config(_cfg()).tensor_kwargs("model.norm.weight", 3)  # default


def test_config_per_model_weight_is_ignored_with_a_warning(caplog, fresh_cli_logging):
    from m3kernels.checkpoint import config as config_mod

    config_mod._warned.discard(("sce", "weight"))
    with caplog.at_level(logging.WARNING, logger="m3kernels"):
        c = load_config(_cfg({"select_topk": 0.5}, model_params={0: {"weight": 0.3}, 1: {"weight": 2.0}}))
    assert "weight" in caplog.text and "no effect" in caplog.text
    kw = c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)
    assert kw["weights"] is None
    c = load_config(_cfg({"weight": 0.7}))  # top level too
    assert c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)["weights"] is None


@pytest.mark.parametrize(
    "params,match",
    [
        ({"select_topk": "abc"}, "select_topk"),
        ({"select_topk": [0.2, "x"]}, "select_topk"),
        ({"density": 0.5}, "density"),
        ({"gamma": 0.1}, "gamma"),
    ],
)
def test_config_bad_values_name_the_parameter(params, match):
    with pytest.raises(MergeConfigError, match=match):
        c = load_config(_cfg(params))
        c.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 3)


def test_config_select_topk_is_merge_wide():
    with pytest.raises(MergeConfigError, match="select_topk: a merge-wide parameter"):
        load_config(_cfg(model_params={0: {"select_topk": 0.5}}))


def test_config_rejects_mixup():
    with pytest.raises(MergeConfigError, match="mixup: method 'sce' does not take M³"):
        load_config(_cfg({"select_topk": 0.5}) | {"mixup": {"alpha": 0.5}})


def test_checkpoint_merge_is_merge_tensors_per_tensor(tmp_path, fresh_cli_logging):
    """``m3kernels merge`` on an sce config (a select_topk gradient, per-model weights that have no
    effect): every tensor is merge_tensors with that tensor's select_topk."""
    from safetensors.torch import load_file

    from m3kernels.synthetic import make_family

    fam = make_family(tmp_path / "in", n_models=2, shards=1, vocab=29, hidden=8, intermediate=12, layers=3)
    raw = {
        "merge_method": "sce",
        "base_model": str(fam.base_dir),
        "models": [
            {"model": str(fam.model_dirs[0]), "parameters": {"weight": 0.2}},
            {"model": str(fam.model_dirs[1]), "parameters": {"weight": 3.0}},
        ],
        "parameters": {"select_topk": [0.2, 0.9]},
        "dtype": "float32",
    }
    skip_unless("cpu", "sce")
    m3kernels.merge_checkpoints(raw, tmp_path / "out", progress=False)
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(f))
    cfg = load_config(raw)
    for name in (
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
    ):
        kw = cfg.tensor_kwargs(name, 3)
        want = m3kernels.merge_tensors(
            fam.base[name].float(),
            [m[name].float() for m in fam.models],
            method="sce",
            select_topk=kw["select_topk"],
            backend="cpu",
        )
        assert torch.equal(out[name], want), name


# ----------------------------------------------------------------------------- mergekit itself


@pytest.mark.skipif(not HAVE_MK, reason="no mergekit 0.1.5 venv (set M3K_MERGEKIT_VENV)")
def test_against_mergekit_itself(gen):
    """mergekit's sce_merge on the same float32 tensors. Our weights are float64 mean squares,
    mergekit's float32 means (≤ 1 float32 ulp apart), so the outputs agree within a fraction of a
    float32 ulp at tensor scale, most elements bit for bit; with mergekit's own weights put into
    our kernel parameters, bit for bit everywhere (variance, select, election, combine, floor)."""
    skip_unless("cpu", "sce")
    sys.path.insert(0, str(BENCH))
    import mergekit_parity as mp

    from m3kernels.backends import cpu

    merges = []
    for shape, n, s in [((37, 129), 2, 0.5), ((301, 517), 3, 0.1), ((64,), 3, 1.0), ((200, 300), 2, 0.0)]:
        base, models = make_inputs(shape, n, (torch.float32, [torch.float32]), gen)
        merges.append((base, models, {"select_topk": s}))
    outs = mp.direct_merges(MK_VENV, "sce", merges, threads=torch.get_num_threads())
    for (base, models, prm), want in zip(merges, outs):
        n = len(models)
        got = m3kernels.merge_tensors(base, models, method="sce", backend="cpu", **prm)
        u = mp.ulps32(got, want)
        top = float(want.abs().max()) * 2.0**-23
        assert float((got.double() - want.double()).abs().max()) <= top, (base.shape, prm)
        assert float((u == 0).double().mean()) > 0.98, (base.shape, prm)
        st = stage(base, models, make_recipe(n, method="sce", has_base=True, **prm), "w", cpu)
        tv = torch.stack([m - base for m in models])
        if st.params.keep_mask is not None:
            keep = element_select.mask_bits(st.params.keep_mask, 0, base.numel())
            tv = tv * torch.from_numpy(keep).reshape(base.shape).float()
        w = tv.square().reshape(n, -1).mean(dim=1)  # mergekit's float32 weights
        total = torch.sum(w).item()
        w = (w / total).numpy() if abs(total) >= 1e-6 else np.full(n, np.float32(1) / np.float32(n))
        out = torch.full_like(base, float("nan"))
        cpu.merge(st.params.with_fields(coef=w), st.base, st.models, out)
        assert torch.equal(out, want), (base.shape, prm)
