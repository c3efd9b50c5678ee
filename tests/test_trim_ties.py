"""``trim_ties: k`` (exactly k kept at a magnitude trim, ties by the lowest flat index) for ties,
ties_dare, breadcrumbs and breadcrumbs_ties: on every backend whose ``FEATURES`` have
``trim_ties_k`` against the float64 reference (a full sort on (bits(|δ'|) desc, flat index)), bf16
inputs with many ties, small tensors (keys) and large ones (histograms), odd shapes, poisoned
outputs; exactly k (T) kept per model; the same bytes for 1 and 2 CPU threads and on every such
backend; the parameter in the API, the custom op, configs and a checkpoint merge; bad values."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import m3kernels
import m3kernels.ops
from m3kernels import cli
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge.kernel_params import trim_k
from m3kernels.merge.methods.breadcrumbs import window
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_methods import exact_rank_keep

from cases import DTYPE_CASES
from helpers import assert_close_ulp, have_backend, term_scale
from method_matrix import BACKENDS, skip_unless

BF16 = torch.bfloat16
CASES = {
    "ties": dict(method="ties", density=[0.3, 0.55, 0.1], weights=[1.0, 0.7, 1.2]),
    "ties_nonorm": dict(method="ties", density=0.4, normalize=False, lambda_=0.8),
    "ties_dare": dict(method="ties_dare", density=[0.5, 0.3, 0.7], drop_rate=0.3, seed=5),
    "breadcrumbs": dict(method="breadcrumbs", density=[0.5, 0.7, 0.2], gamma=[0.05, 0.1, 0.0]),
    "breadcrumbs_ties": dict(method="breadcrumbs_ties", density=0.6, gamma=0.02),
}
SHAPES = [(1,), (7,), (5, 1), (37, 129)]
LARGE = (301, 263)  # above SMALL_TENSOR_NUMEL: thresholds from histograms (bf16 and mixed only)


def tied_inputs(shape, n, dtypes, gen):
    """base + n models whose deltas take few distinct values (steps of 1/64: exact in bf16 and
    fp16 near 1), so every threshold is shared by many elements."""
    base_dt, model_dts = dtypes
    b = torch.randn(shape, generator=gen, dtype=torch.float64).clamp(-1.5, 1.5)
    b = torch.round(b * 8) / 8
    ms = []
    for i in range(n):
        steps = torch.randint(-6, 7, shape, generator=gen).to(torch.float64) / 64
        ms.append((b + steps).to(model_dts[i % len(model_dts)]))
    return b.to(base_dt), ms


def cut(kw, n):
    kw = dict(kw)
    for k in ("density", "weights", "gamma", "drop_rate"):
        if isinstance(kw.get(k), list):
            kw[k] = [kw[k][i % len(kw[k])] for i in range(n)]
    return kw


MATRIX = [(b, c, d) for b in BACKENDS for c in CASES for d in DTYPE_CASES if b != "triton" or d == "mixed"]


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    skip_unless(backend, CASES[case]["method"])
    from m3kernels.backends import _load

    if "trim_ties_k" not in getattr(_load(backend), "FEATURES", ()):
        pytest.skip(f"backend {backend} has no trim_ties_k")
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    dev = "cuda" if backend == "cuda" else "cpu"
    for n in (3,) if backend == "triton" else (2, 3):
        shapes = SHAPES + ([LARGE] if dtype_case in ("bf16", "mixed") and n == 3 else [])
        for shape in [(7,), (3, 5, 7)] if backend == "triton" else shapes:
            base, models = tied_inputs(shape, n, (base_dt, model_dts), gen)
            kw = dict(cut(CASES[case], n), trim_ties="k")
            out = torch.full(shape, float("nan"), dtype=out_dt, device=dev)
            m3kernels.merge_tensors(
                base.to(dev), [m.to(dev) for m in models], out=out, backend=backend, name="w", **kw
            )
            recipe = make_recipe(n, has_base=True, **kw)
            ref, _ = reference_merge(base, models, recipe, "w")
            assert_close_ulp(
                out.cpu(), ref, term_scale(base, models, recipe), f"{backend}/{case}/N={n}/{shape}"
            )


def _one_model_kept(backend, method, numel, density, gamma=None, trim_ties="k"):
    """Merge one model onto a zero base: the output is the kept delta (normalize: d / 1)."""
    gen = torch.Generator().manual_seed(numel)
    steps = torch.randint(1, 9, (numel,), generator=gen).to(torch.float32) / 8  # 8 values, all tied
    steps = torch.where(torch.rand(numel, generator=gen) < 0.5, -steps, steps).to(BF16)
    kw = dict(method=method, density=density, trim_ties=trim_ties)
    if gamma is not None:
        kw["gamma"] = gamma
    if method == "breadcrumbs_ties":
        kw["normalize"] = True
    out = m3kernels.merge_tensors(torch.zeros(numel, dtype=BF16), [steps], backend=backend, **kw)
    return steps, out != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel", [1, 10, 1000, 70_001])
def test_exactly_k_kept_lowest_index_first(backend, numel):
    skip_unless(backend, "breadcrumbs")
    if backend == "triton" and numel > 1000:
        pytest.skip("the Triton interpreter is slow")
    for density in (0.01, 0.3, 0.77):
        d, kept = _one_model_kept(backend, "ties", numel, density)
        k = trim_k(density, numel)
        assert int(kept.sum()) == k, (numel, density)
        assert torch.equal(kept, exact_rank_keep(d.float(), 0, k)), (numel, density)
        if numel >= 1000:  # the 'all' rule keeps the whole tie group at the threshold: more
            assert int(_one_model_kept(backend, "ties", numel, density, trim_ties="all")[1].sum()) > k
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        for density, gamma in ((0.5, 0.1), (0.2, 0.0), (0.9, 0.3)):
            d, kept = _one_model_kept(backend, method, numel, density, gamma)
            lo, t = window(density, gamma, numel)
            assert int(kept.sum()) == t, (method, numel, density, gamma)
            assert torch.equal(kept, exact_rank_keep(d.float(), lo, t)), (method, numel, density)


def test_same_bytes_for_threads_and_backends(gen):
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    from m3kernels import _C

    base, models = tied_inputs((211, 397), 3, (BF16, [BF16, torch.float16]), gen)
    outs = {}
    threads = _C.get_num_threads()
    try:
        for case in ("ties_dare", "breadcrumbs_ties"):
            kw = dict(cut(CASES[case], 3), trim_ties="k", name="layer.w")
            for t in (1, 2):
                _C.set_num_threads(t)
                outs[case, t] = m3kernels.merge_tensors(base, models, backend="cpu", **kw)
            assert torch.equal(outs[case, 1].view(torch.int16), outs[case, 2].view(torch.int16)), case
            for be in BACKENDS:
                if be == "cpu" or "trim_ties_k" not in getattr(m3kernels.backends._load(be), "FEATURES", ()):
                    continue
                if be == "triton":
                    continue  # the interpreter at this size is too slow; the matrix above covers it
                got = m3kernels.merge_tensors(base.cuda(), [m.cuda() for m in models], backend=be, **kw)
                assert torch.equal(got.cpu().view(torch.int16), outs[case, 1].view(torch.int16)), (case, be)
    finally:
        _C.set_num_threads(threads)


def test_api_and_op_parameters(gen):
    base, models = tied_inputs((9, 31), 2, (BF16, [BF16]), gen)
    a = m3kernels.merge_tensors(base, models, method="ties", density=0.3, trim_ties="K ")
    b = m3kernels.ops.merge_tensors(base, models, method="ties", density=0.3, trim_ties="k")
    c = m3kernels.merge_tensors(base, models, method="ties", density=0.3)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(c, m3kernels.merge_tensors(base, models, method="ties", density=0.3, trim_ties="all"))
    assert make_recipe(2, method="breadcrumbs", has_base=True).get("trim_ties") == "all"
    with pytest.raises(ValueError, match="trim_ties must be one of all, k, got 'some'"):
        m3kernels.merge_tensors(base, models, method="ties", trim_ties="some")
    with pytest.raises(ValueError, match="trim_ties must be one of all, k"):
        m3kernels.merge_tensors(base, models, method="ties", trim_ties=1)
    for method in ("task_arithmetic", "dare_ties", "della", "slerp"):
        with pytest.raises(ValueError, match=f"trim_ties: method '{method}' does not take it"):
            make_recipe(1, method=method, has_base=True, trim_ties="k", t=0.5 if method == "slerp" else None)
    with pytest.raises(ValueError, match="trim_ties 'k'"):
        m3kernels.merge_tensors(base, models, method="ties", trim_ties="k", thresholds=[0.01, 0.02])


def _raw(params, **top):
    return {
        "merge_method": top.pop("method", "ties"),
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"density": 0.4}}, {"model": "y"}],
        "parameters": params,
        **top,
    }


def test_config_values_filters_and_errors():
    cfg = load_config(_raw({"trim_ties": "k"}))
    assert cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)["trim_ties"] == "k"
    cfg = load_config(_raw({"trim_ties": [{"filter": "mlp", "value": "k"}, {"value": "all"}]}))
    assert cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)["trim_ties"] == "k"
    assert cfg.tensor_kwargs("model.layers.0.self_attn.q_proj.weight", 2)["trim_ties"] == "all"
    assert "trim_ties" not in load_config(_raw({})).tensor_kwargs("lm_head.weight", 2)
    bad = [
        (_raw({"trim_ties": "most"}), "trim_ties must be one of all, k"),
        (_raw({"trim_ties": 3}), "parameters.trim_ties: expected one of the method's choices"),
        (_raw({"trim_ties": ["k", "all"]}), "parameters.trim_ties"),  # no gradients
        (_raw({"trim_ties": "k"}, method="task_arithmetic"), "parameters.trim_ties"),
        (_raw({"trim_ties": "k"}, trim_scope="model"), "trim_ties: 'k' with trim_scope 'model'"),
        (_raw({"trim_ties": [{"filter": "mlp", "value": "k"}]}, trim_scope="model"), "trim_scope 'model'"),
    ]
    for raw, match in bad:
        with pytest.raises(MergeConfigError, match=match):
            load_config(raw)
    raw = _raw({"trim_ties": "k"})
    raw["models"][1]["parameters"] = {"trim_ties": "k"}  # merge-wide: not per model
    with pytest.raises(MergeConfigError, match="merge-wide"):
        load_config(raw)
    load_config(_raw({"trim_ties": "all"}, trim_scope="model"))  # the default rule works there


def test_checkpoint_merge_matches_merge_tensors(tmp_path):
    """Small tensors are merged one by one (no batch: the tie prefixes are per tensor), large ones
    in parts; every tensor equals merge_tensors with trim_ties 'k'."""
    from m3kernels.synthetic import make_family

    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    fam = make_family(
        tmp_path / "f", n_models=2, shards=1, seed=3, vocab=37, hidden=16, intermediate=24, layers=2
    )
    raw = {
        "merge_method": "ties",
        "base_model": str(fam.base_dir),
        "models": [{"model": str(d), "parameters": {"density": 0.3}} for d in fam.model_dirs],
        "parameters": {"trim_ties": "k"},
        "out_dtype": "bfloat16",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    got = {}
    for p in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(p)))
    base = {}
    for p in sorted(fam.base_dir.glob("*.safetensors")):
        base.update(load_file(str(p)))
    models = [{} for _ in fam.model_dirs]
    for m, d in zip(models, fam.model_dirs):
        for p in sorted(d.glob("*.safetensors")):
            m.update(load_file(str(p)))
    for name, b in base.items():
        want = m3kernels.merge_tensors(
            b, [m[name] for m in models], method="ties", density=0.3, trim_ties="k", name=name, out_dtype=BF16
        )
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


def test_exactly_k_with_the_l1_rescale_after_the_trim():
    """ties with rescale true (mergekit's L1 rescale after the trim moves the thresholds): still
    exactly k kept, and the kept values carry one factor Σ|δ| / Σ|kept δ|."""
    if not have_backend("cpu"):
        pytest.skip("m3kernels._C is not built")
    for numel in (1000, 70_001):
        d, _ = _one_model_kept("cpu", "ties", numel, 0.3)
        out = m3kernels.merge_tensors(
            torch.zeros(numel, dtype=BF16), [d], method="ties", density=0.3, rescale=True, trim_ties="k"
        )
        k = trim_k(0.3, numel)
        kept = out != 0
        assert int(kept.sum()) == k
        ratio = out.float()[kept] / d.float()[kept]
        assert float(ratio.max() - ratio.min()) < 0.02 and float(ratio.mean()) > 1.0
