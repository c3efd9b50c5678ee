"""della and della_linear: the rank-based random drop (stage A: keep bitmasks and L1 factors) and
the fused stage B on every backend whose ``FEATURES`` have ``keep_mask``, against the float64
reference (its own full sort and the whole tensor's Philox words): dtypes, N, odd sizes (1-D,
[R, 1], 3-D), poisoned outputs; determinism across chunk sizes and thread counts; the keep
probabilities, ties, the L1 factor and its guard; parameters in the API and in configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge.methods import BackendFeatureError, della
from m3kernels.merge.philox import dare_uniform_u32
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.merge.reference_methods import della_keep

from cases import DTYPE_CASES
from helpers import assert_close_ulp, make_inputs, term_scale
from method_matrix import BACKENDS, skip_unless

CASES = {  # name -> (merge_tensors keyword arguments, model counts)
    "della": (dict(method="della", density=0.5, epsilon=0.1), [1, 2, 3]),
    "della_w": (
        dict(
            method="della",
            density=[0.3, 0.6, 0.8],
            epsilon=[0.1, 0.2, 0.05],
            weights=[1.0, -0.5, 0.7],
            lambda_=0.9,
        ),
        [2, 3],
    ),
    "della_plain": (dict(method="della", density=0.4, rescale=False, normalize=False), [2, 3]),
    "della_edges": (dict(method="della", density=[0.5, 1.0, 0.0], epsilon=0.2), [3]),
    "della_linear": (dict(method="della_linear", density=0.4, epsilon=0.15), [1, 2, 3]),
    "della_linear_norm": (
        dict(
            method="della_linear",
            density=[0.2, 1.0, 0.7],
            epsilon=0.1,
            normalize=True,
            weights=[0.3, 0.5, 0.9],
        ),
        [2, 3],
    ),
    "della_m3": (dict(method="della", density=0.6, mixup_alpha=0.5, seed=4), [2, 3]),
    "della_linear_m3": (dict(method="della_linear", density=0.5, mix_ratios=[0.3, 0.7]), [2]),
}
SHAPES = [(1,), (7,), (5, 1), (37, 129), (3, 5, 7)]


def kwargs_for(case: str, n: int) -> dict:
    kw = dict(CASES[case][0])
    for k in ("weights", "density", "epsilon", "mix_ratios"):
        if isinstance(kw.get(k), list):
            kw[k] = [kw[k][i % len(kw[k])] for i in range(n)]
    if "mix_ratios" in kw:
        kw["mix_ratios"] = [x / sum(kw["mix_ratios"]) for x in kw["mix_ratios"]]
    return kw


def unpack(mask: np.ndarray, stride: int, i: int, numel: int) -> np.ndarray:
    return np.unpackbits(mask[i * stride : (i + 1) * stride], bitorder="little")[:numel].astype(bool)


MATRIX = [(b, c, d) for b in BACKENDS for c in CASES for d in DTYPE_CASES if b != "triton" or d == "mixed"]


@pytest.mark.parametrize("backend,case,dtype_case", MATRIX)
def test_against_the_reference(backend, case, dtype_case, gen):
    skip_unless(backend, CASES[case][0]["method"])
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    dev = "cuda" if backend == "cuda" else "cpu"
    counts = CASES[case][1]
    few = backend == "triton" or dtype_case not in ("bf16", "mixed")  # every N on two dtype cases
    for n in counts[-1:] if few else counts:
        for shape in [(7,), (3, 5, 7)] if backend == "triton" else SHAPES:
            base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
            kw = kwargs_for(case, n)
            out = torch.full(shape, float("nan"), dtype=out_dt, device=dev)  # poisoned
            m3kernels.merge_tensors(
                base.to(dev), [m.to(dev) for m in models], out=out, backend=backend, name="w", **kw
            )
            recipe = make_recipe(n, has_base=True, **kw)
            ref, _ = reference_merge(base, models, recipe, "w")
            assert_close_ulp(
                out.cpu(), ref, term_scale(base, models, recipe), f"{backend}/{case}/N={n}/{shape}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_identical_across_threads_and_backends(backend, gen):
    """The same bytes for 1 and 2 CPU threads (stage A and stage B), and on every backend."""
    skip_unless(backend, "della")
    skip_unless("cpu", "della")
    base, models = make_inputs((67, 301), 3, (torch.bfloat16, [torch.bfloat16]), gen)
    kw = dict(method="della", density=[0.3, 0.5, 0.7], epsilon=0.2, seed=9, name="m.w")
    from m3kernels import _C

    threads, kernel_threads = torch.get_num_threads(), _C.get_num_threads()
    outs = []
    try:
        for t in (1, 2):  # stage A's torch ops and the kernel's OpenMP threads
            torch.set_num_threads(t)
            _C.set_num_threads(t)
            outs.append(m3kernels.merge_tensors(base, models, backend="cpu", **kw))
    finally:
        torch.set_num_threads(threads)
        _C.set_num_threads(kernel_threads)
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    dev = "cuda" if backend == "cuda" else "cpu"
    got = m3kernels.merge_tensors(base.to(dev), [m.to(dev) for m in models], backend=backend, **kw).cpu()
    assert torch.equal(got.view(torch.int16), outs[0].view(torch.int16)), backend


def test_stage_a_masks_equal_the_reference_for_any_chunking(gen, monkeypatch):
    """Stage A's bitmask (chunks of dim-0 slabs on 1 or 2 threads, packed with carries) is the reference's full-sort
    mask, bit for bit, for shapes with one element, one column, odd lengths and 3 dims."""
    for shape in [(1,), (13,), (5, 1), (9, 13), (4, 3, 5), (2, 1, 3)]:
        base, models = make_inputs(shape, 3, (torch.bfloat16, [torch.float32, torch.bfloat16]), gen)
        recipe = make_recipe(
            3, method="della", has_base=True, density=[0.5, 0.3, 0.8], epsilon=[0.1, 0.2, 0.15], seed=5
        )
        got = []
        for chunk, workers in ((1, 2), (7, 1), (7, 2), (64, 2), (1 << 20, 1)):
            monkeypatch.setattr(della, "CHUNK", chunk)
            monkeypatch.setattr(della, "WORKERS", workers)
            got.append(della.keep_masks(base, models, recipe, "x"))
        for mask, stride, scale in got[1:]:
            assert (
                np.array_equal(mask, got[0][0]) and np.array_equal(scale, got[0][2]) and stride == got[0][1]
            )
        mask, stride, _ = got[0]
        assert stride == (base.numel() + 7) // 8 and mask.size == 3 * stride
        for i in range(3):
            d32 = models[i].float() - base.float()
            ref = della_keep(d32, recipe.trim_density[i], recipe.get("epsilon")[i], 5, "x", i)
            assert np.array_equal(unpack(mask, stride, i, base.numel()), ref.reshape(-1).numpy()), (shape, i)


def test_philox_words_at_any_offset():
    """Stage A's in-place Philox gives the stream of docs/RANDOMNESS.md at any start and length."""
    from m3kernels.merge.philox import dare_key, philox4x32_10

    key = dare_key(123, "layers.0.w", 2)
    whole = dare_uniform_u32(123, "layers.0.w", 2, 5003)
    for start, count in ((0, 5003), (1, 7), (3, 1), (4, 4), (1001, 2002), (4999, 4)):
        assert np.array_equal(della.u32_range(key, start, count), whole[start : start + count])
    q = 2**33 + 5  # counters above 2**32 use the second counter word
    ctr = np.array([[q & 0xFFFFFFFF, q >> 32, 0, 0]], dtype=np.uint64)
    assert np.array_equal(della.u32_range(key, 4 * q, 4), philox4x32_10(ctr, key).reshape(-1))


def test_keep_probability_rises_with_the_rank():
    """Per rank decile, the kept fraction is the mean of p_r = (d − ε) + 2ε·r/(C − 1) within 5
    binomial standard deviations; the whole keep fraction is d."""
    rows, c, d, eps = 200, 1000, 0.5, 0.3
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(rows, c)
    model = torch.randn(rows, c, generator=g)
    recipe = make_recipe(1, method="della", has_base=True, density=d, epsilon=eps, seed=3)
    mask, stride, scale = della.keep_masks(base, [model], recipe, "w")
    keep = unpack(mask, stride, 0, rows * c).reshape(rows, c)
    rank = model.abs().argsort(dim=1).argsort(dim=1).numpy()  # no ties in random floats
    for dec in range(10):
        sel = (rank >= dec * c // 10) & (rank < (dec + 1) * c // 10)
        r = rank[sel]
        p = (d - eps) + 2 * eps * r / (c - 1)
        mean, sd = p.mean(), math.sqrt((p * (1 - p)).sum()) / sel.sum()
        assert abs(keep[sel].mean() - mean) < 5 * sd + 1e-9, dec
    assert abs(keep.mean() - d) < 5 * math.sqrt(d * (1 - d) / keep.size)
    # L1 factor: Σ|δ| / Σ|δ kept| in float64, rounded to float32
    a = model.abs().double().numpy()
    assert scale[0] == np.float32(a.sum() / a[keep].sum())


def test_equal_magnitudes_rank_in_index_order():
    """Ties: (bits(|δ|), flat index) ascending, so in a row of equal |δ| (signs mixed) the later
    elements have the higher keep probability; the decisions are the Philox words against the
    thresholds of the index ranks."""
    c, d, eps = 4000, 0.5, 0.4
    sign = torch.where(torch.arange(c) % 3 == 0, -1.0, 1.0)
    model = (0.25 * sign).reshape(1, c)
    recipe = make_recipe(1, method="della", has_base=True, density=d, epsilon=eps, seed=8)
    mask, stride, _ = della.keep_masks(torch.zeros(1, c), [model], recipe, "t")
    keep = unpack(mask, stride, 0, c)
    u = dare_uniform_u32(8, "t", 0, c)
    assert np.array_equal(keep, u < della.keep_thresholds(d, eps, c))
    assert keep[: c // 10].mean() < 0.25 and keep[-c // 10 :].mean() > 0.75


def test_thresholds_and_one_column():
    thr = della.keep_thresholds(0.5, 0.25, 5)  # p = 0.25, 0.375, 0.5, 0.625, 0.75: exact in binary
    assert thr.tolist() == [int(p * 2**32) for p in (0.25, 0.375, 0.5, 0.625, 0.75)]
    assert della.keep_thresholds(0.3, 0.1, 1).tolist() == [math.floor(0.3 * 2**32)]  # C = 1: p = d
    assert della.rank_layout((4, 1)) == (4, 1, 1) and della.rank_layout((6,)) == (1, 6, 1)
    assert della.rank_layout((2, 3, 4, 5)) == (2, 3, 20) and della.rank_layout(()) == (1, 1, 1)
    # [R, 1]: every element is alone in its line, kept with probability d (mergekit crashes here)
    model = torch.ones(20000, 1)
    recipe = make_recipe(1, method="della_linear", has_base=True, density=0.3, epsilon=0.1)
    mask, stride, scale = della.keep_masks(torch.zeros(20000, 1), [model], recipe, "col")
    keep = unpack(mask, stride, 0, 20000)
    assert np.array_equal(keep, dare_uniform_u32(0, "col", 0, 20000) < math.floor(0.3 * 2**32))
    assert scale[0] == np.float32(20000 / keep.sum())


def test_rescale_guard_density_edges_and_non_finite():
    z = torch.zeros(3, 50)
    tiny = torch.full((3, 50), 1e-10)  # Σ|δ| = 1.5e-8 < 1e-7: mergekit's guard, no rescale
    r = make_recipe(2, method="della", has_base=True, density=0.5, epsilon=0.1)
    _, _, scale = della.keep_masks(z, [tiny, -tiny], r, "g")
    assert scale.tolist() == [1.0, 1.0]
    big = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    _, _, scale = della.keep_masks(
        z, [big, big], make_recipe(2, method="della", has_base=True, density=0.5, rescale=False), "g"
    )
    assert scale.tolist() == [1.0, 1.0]
    # density 1: no mask at all (the plain program); 1 and 0 beside a dropping model: all / none kept
    assert della.keep_masks(z, [big], make_recipe(1, method="della", has_base=True), "g") is None
    r = make_recipe(3, method="della", has_base=True, density=[1.0, 0.0, 0.5])
    mask, stride, scale = della.keep_masks(z, [big, big, big], r, "g")
    assert unpack(mask, stride, 0, 150).all() and not unpack(mask, stride, 1, 150).any()
    assert scale[0] == 1.0 and scale[1] == 1.0 and scale[2] > 1.0
    # a NaN / inf delta ranks highest and stays out of the L1 sums
    bad = big.clone()
    bad[0, 3], bad[1, 7] = float("nan"), float("inf")
    r = make_recipe(1, method="della", has_base=True, density=0.5, seed=1)
    mask, stride, scale = della.keep_masks(z, [bad], r, "g")
    keep = unpack(mask, stride, 0, 150)
    a = bad.abs().double().reshape(-1).numpy()
    fin = np.isfinite(a)
    assert scale[0] == np.float32(a[fin].sum() / a[fin & keep].sum())


def test_missing_feature_names_the_backend():
    class Bare:
        __name__ = "m3kernels.backends.bare"
        FEATURES = frozenset()

    r = make_recipe(1, method="della", has_base=True, density=0.5)
    x = torch.zeros(4, 4)
    with pytest.raises(BackendFeatureError, match="not implemented on backend 'bare'.*keep_mask"):
        della.prepare(x, [x + 1], r, "w", Bare())
    # density 1 (the default) needs no mask: the plain TIES program, on any backend
    st = della.prepare(x, [x + 1], make_recipe(1, method="della", has_base=True), "w", Bare())
    assert getattr(st.params, "keep_mask", None) is None


def test_default_density_merges_like_the_reference(gen):
    """With mergekit's default density 1 nothing is dropped: TIES (della) or sum (della_linear)."""
    base, models = make_inputs((9, 11), 3, (torch.float32, [torch.bfloat16]), gen)
    for method in ("della", "della_linear"):
        out = torch.full((9, 11), float("nan"))
        m3kernels.merge_tensors(base, models, method=method, weights=[0.5, 1.0, 0.7], out=out, backend="cpu")
        recipe = make_recipe(3, method=method, has_base=True, weights=[0.5, 1.0, 0.7])
        ref, _ = reference_merge(base, models, recipe, "")
        assert_close_ulp(out, ref, term_scale(base, models, recipe), method)


def test_defaults_are_mergekits():
    r = make_recipe(2, method="della", has_base=True)
    assert r.trim_density == (1.0, 1.0) and r.get("epsilon") == (0.15, 0.15)
    assert r.combine == "ties" and r.normalize and r.rescale == "l1" and r.lambda_ == 1.0
    r = make_recipe(2, method="della_linear", has_base=True)
    assert r.combine == "sum" and not r.normalize and r.rescale == "l1"
    assert make_recipe(1, method="della_linear", has_base=True, normalize=True).combine == "mean"
    assert make_recipe(1, method="della", has_base=True, rescale=False).rescale == "none"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(density=0.1), r"epsilon: density - epsilon and density \+ epsilon must lie in \(0, 1\)"),
        (dict(density=0.9), "got density 0.9 and epsilon 0.15 for model 0"),
        (dict(density=[0.5, 0.5], epsilon=[0.1, 0.5]), "epsilon 0.5 for model 1"),
        (dict(density=0.5, epsilon=-0.5), "epsilon"),
        (dict(density=1.5), r"density must be in \[0, 1\]"),
        (dict(epsilon=[0.1, 0.2, 0.3]), "epsilon: expected a scalar or 2 values"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(rescale="l1"), "rescale must be True or False"),
        (dict(gamma=0.1), "gamma: method 'della' does not take it"),
        (dict(drop_rate=0.3), "drop_rate"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_recipe(2, method="della", has_base=True, **kw)


def test_density_edges_skip_the_range_check():
    for d in (0.0, 1.0):
        make_recipe(1, method="della", has_base=True, density=d, epsilon=0.9)  # mergekit: no check
    with pytest.raises(ValueError, match="base"):
        m3kernels.merge_tensors(None, [torch.ones(3)], method="della")


def _config(params: dict, models=None, **top) -> dict:
    raw = {
        "merge_method": top.pop("method", "della"),
        "base_model": "b",
        "models": models or [{"model": "x"}, {"model": "y"}],
        "parameters": params,
    }
    return {**raw, **top}


def test_config_scalars_gradients_and_filters():
    cfg = load_config(
        _config(
            {
                "weight": [0.2, 1.0],  # gradient over the layers
                "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                "epsilon": 0.1,
                "normalize": False,
                "rescale": False,
                "lambda": 0.9,
                "int8_mask": True,
            },
            models=[{"model": "x", "parameters": {"epsilon": [0.05, 0.25]}}, {"model": "y"}],
        )
    )
    kw = cfg.tensor_kwargs("model.layers.1.mlp.up_proj.weight", 2)  # t = 1
    assert kw["weights"] == [1.0, 1.0] and kw["density"] == [0.3, 0.3]
    assert kw["epsilon"] == [0.25, 0.1] and kw["normalize"] is False and kw["rescale"] is False
    assert kw["lambda_"] == 0.9
    kw = cfg.tensor_kwargs("model.layers.0.self_attn.q_proj.weight", 2)  # t = 0
    assert kw["weights"] == [0.2, 0.2] and kw["density"] == [0.6, 0.6] and kw["epsilon"] == [0.05, 0.1]
    r = make_recipe(2, method="della", has_base=True, **kw)
    assert r.rescale == "none" and not r.normalize and r.get("epsilon") == (0.05, 0.1)
    kw = load_config(_config({"density": 0.5}, method="della_linear")).tensor_kwargs("lm_head.weight", 2)
    assert (
        kw["rescale"] is None and make_recipe(2, method="della_linear", has_base=True, **kw).rescale == "l1"
    )


@pytest.mark.parametrize(
    "params,match",
    [
        ({"density": 0.1}, "epsilon: density - epsilon"),  # the default epsilon 0.15
        ({"density": 0.5, "epsilon": [0.1, 0.6]}, "epsilon"),  # a gradient leaving the range
        ({"rescale": "l1"}, "parameters.rescale: expected true or false"),
        ({"epsilon": "wide"}, "parameters.epsilon: expected a number"),
        ({"density": 1.2}, r"parameters.density: must be in \[0, 1\]"),
        ({"normalize": [True, False]}, "parameters.normalize"),
        ({"gamma": 0.1}, "parameters.gamma"),
    ],
)
def test_config_errors_name_the_parameter(params, match):
    with pytest.raises(MergeConfigError, match=match):
        load_config(_config(params))


def test_trim_scope_model_is_refused():
    with pytest.raises(MergeConfigError, match="trim_scope"):
        load_config(_config({"density": 0.5}, trim_scope="model"))


def test_parts_and_checkpoint_merge_give_the_same_bytes(gen, tmp_path):
    """Stage B in parts (merge_range at flat offsets: the mask is read at bit J of the whole
    tensor) and the checkpoint merge (``m3kernels merge``) give merge_tensors' bytes."""
    import yaml
    from safetensors.torch import load_file

    from m3kernels import cli
    from m3kernels.backends import cpu
    from m3kernels.merge.methods import stage
    from m3kernels.synthetic import make_family

    skip_unless("cpu", "della")
    base, models = make_inputs((41, 97), 2, (torch.bfloat16, [torch.bfloat16]), gen)
    kw = dict(method="della", density=[0.4, 0.6], epsilon=0.2, seed=2)
    want = m3kernels.merge_tensors(base, models, backend="cpu", name="w", **kw)
    st = stage(base, models, make_recipe(2, has_base=True, **kw), "w", cpu)
    parts = torch.full((41 * 97,), float("nan"), dtype=torch.bfloat16)
    fb, fm = base.reshape(-1), [m.reshape(-1) for m in models]
    for lo in range(0, 41 * 97, 1001):
        hi = min(41 * 97, lo + 1001)
        cpu.merge_range(st.params, fb[lo:hi], [m[lo:hi] for m in fm], parts[lo:hi], lo)
    assert torch.equal(parts.view(torch.int16), want.reshape(-1).view(torch.int16))

    fam = make_family(
        tmp_path / "f", n_models=2, shards=1, seed=4, vocab=37, hidden=16, intermediate=24, layers=2
    )
    raw = {
        "merge_method": "della_linear",
        "base_model": str(fam.base_dir),
        "models": [{"model": str(d), "parameters": {"density": 0.5, "weight": 0.7}} for d in fam.model_dirs],
        "parameters": {"epsilon": 0.1},
        "seed": 7,
        "out_dtype": "bfloat16",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0

    def load(folder):
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(p)))
        return out

    got, b = load(tmp_path / "out"), load(fam.base_dir)
    ms = [load(d) for d in fam.model_dirs]
    for name, x in b.items():
        mine = m3kernels.merge_tensors(
            x,
            [m[name] for m in ms],
            method="della_linear",
            density=0.5,
            weights=0.7,
            epsilon=0.1,
            seed=7,
            name=name,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(got[name].view(torch.int16), mine.view(torch.int16)), name
