"""Stage A for small tensors: the trim thresholds selected from the bit patterns themselves.

Up to ``m3kernels.api.SMALL_TENSOR_NUMEL`` elements, ``prepare`` does not run the two
65,536-bin histogram passes: it takes bits(|δ'|) of every element (δ' = the delta after the
DARE step) from the backend (the CPU extension's ``delta_keys``, the same kernel code its
histograms run) and selects the exact k-th largest with ``np.partition``; backends without
``delta_keys`` (Triton, CUDA) keep the histograms. These tests check, on adversarial and random
inputs, that the keys are exactly the values the histograms count (the CPU's own and Triton's)
and that both paths give the same threshold bits for every backend that runs here; and that the
many-tensor machinery (read-ahead window, batched page release, ``trim_scope: model``) keeps
its old results.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import m3kernels.api as api
from m3kernels.backends import get_backend
from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE, make_params, trim_k
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.select import select_from_keys, select_thresholds

sys.path.insert(0, str(Path(__file__).parent))
from helpers import have_backend  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _backends() -> list:
    out = []
    for name in ("cpu", "triton"):
        if not have_backend(name):
            continue
        try:
            get_backend(name, "cpu")
        except (RuntimeError, ValueError):  # triton without its interpreter: GPU tensors only
            continue
        out.append(name)
    return out


BACKENDS = _backends()
KEY_BACKENDS = [b for b in BACKENDS if hasattr(get_backend(b, "cpu"), "delta_keys")]  # the small path
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no backend runs on CPU tensors here")

# float32 / bf16 / fp16 bit patterns of NaNs: quiet, with payload, signalling, negative
NAN_BITS = {
    F32: [0x7FC00000, 0x7FC00001, 0x7F800001, 0xFFA00000, 0x7FFFFFFF],
    BF16: [0x7FC0, 0x7FC1, 0x7F81, 0xFF85, 0x7FFF],
    F16: [0x7E00, 0x7E01, 0x7C01, 0xFC03, 0x7FFF],
}
INT_VIEW = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}


def _bits(values, dtype) -> torch.Tensor:
    """A tensor of ``dtype`` with these bit patterns."""
    wide = torch.tensor(
        [
            v - (1 << 32)
            if dtype == F32 and v >= 1 << 31
            else (v - (1 << 16) if dtype != F32 and v >= 1 << 15 else v)
            for v in values
        ],
        dtype=torch.int64,
    )
    return wide.to(INT_VIEW[dtype]).view(dtype)


def _pattern(kind: str, numel: int, dtype, g: torch.Generator, which: int) -> torch.Tensor:
    """One input tensor (model ``which``; which = -1: the base) of an adversarial family."""
    r = lambda: torch.rand(numel, generator=g)  # noqa: E731
    sign = torch.where(r() < 0.5, -1.0, 1.0)
    if kind == "random":
        x = torch.randn(numel, generator=g) * 0.02
        return (x if which < 0 else x + 0.002 * torch.randn(numel, generator=g)).to(dtype)
    if which < 0:  # the base of the structured families: zeros (so δ = x) or +-0 mixed
        return (torch.where(r() < 0.5, -0.0, 0.0) if kind == "zeros" else torch.zeros(numel)).to(dtype)
    if kind == "equal":  # every |δ| the same, random signs
        return (sign * 0.375).to(dtype)
    if kind == "one_distinct":  # all equal but one element
        x = sign * 0.5
        x[int(torch.randint(numel, (1,), generator=g))] = 0.75 if which % 2 == 0 else 0.25
        return x.to(dtype)
    if kind == "ties":  # a few magnitudes, many ties
        levels = torch.tensor([0.0, 0.125, 0.25, 1.0, 3.0])
        return (sign * levels[torch.randint(5, (numel,), generator=g)]).to(dtype)
    if kind == "zeros":  # +-0 deltas, with a few non-zero ones
        x = torch.where(r() < 0.5, -0.0, 0.0)
        x[r() < 0.1] = 0.5
        return x.to(dtype)
    if kind == "denormal":  # subnormal magnitudes of the dtype (and of float32 through bf16)
        tiny = {F32: 1e-45, BF16: 9.2e-41, F16: 6e-8}[dtype]
        x = sign * tiny * torch.randint(1, 200, (numel,), generator=g).to(torch.float32)
        x[r() < 0.2] = 0.0
        return x.to(dtype)
    if kind in ("nan", "all_nan", "inf"):
        x = (sign * torch.randn(numel, generator=g).abs()).to(dtype)
        share = {"nan": 0.3, "all_nan": 1.1, "inf": 0.3}[kind]
        hit = r() < share
        if kind == "inf":
            special = torch.where(r() < 0.5, -math.inf, math.inf).to(dtype)
        else:
            bits = NAN_BITS[dtype]
            special = _bits([bits[int(i)] for i in torch.randint(len(bits), (numel,), generator=g)], dtype)
        return torch.where(hit, special, x)
    raise ValueError(kind)


KINDS = ["equal", "one_distinct", "ties", "zeros", "denormal", "nan", "all_nan", "inf", "random"]
DTYPE_SETS = {"bf16": (BF16, [BF16]), "f16": (F16, [F16]), "f32": (F32, [F32]), "mixed": (BF16, [F32, F16])}
RECIPES = {  # (method kwargs, uses DARE)
    "ties": dict(method="ties", density=0.3),
    "ties_k": dict(method="ties", density=[0.0, 1.0]),  # k = 0 and k = n
    "ties_dare": dict(method="ties_dare", drop_rate=0.4, density=0.5, seed=7),
    "ties_dare_sparse": dict(method="ties_dare", drop_rate=0.9, density=0.3),
    "dare_all_dropped": dict(method="ties_dare", drop_rate=1.0, density=0.5),
}


def _inputs(kind, numel, dtypes, g, n=2, base=True):
    bd, mds = dtypes
    b = _pattern(kind, numel, bd, g, -1) if base else None
    ms = [_pattern(kind, numel, mds[i % len(mds)], g, i) for i in range(n)]
    if kind in ("nan", "inf") and b is not None:  # specials in the base too
        b = torch.where(torch.rand(numel, generator=g) < 0.1, ms[0].to(bd), b)
    return b, ms


def _params(recipe_kw, n, has_base):
    recipe = make_recipe(
        n, has_base=has_base, **{k: (v if not isinstance(v, list) else v[:n]) for k, v in recipe_kw.items()}
    )
    return recipe, make_params(recipe, "model.layers.3.mlp.experts.17.up_proj.weight", has_base)


def _check_keys_are_counted(be, p, b, ms, keys):
    """The keys' histograms are the backend's (pass 1, and pass 2 for two prefixes)."""
    numel = ms[0].numel()
    assert keys.shape == (p.n, numel) and keys.dtype == np.uint32
    h1 = be.histogram(p, b, ms, None)
    for i in range(p.n):
        assert np.array_equal(np.bincount(keys[i] >> 16, minlength=65536), h1[i]), f"pass 1, model {i}"
    for pick in (np.max, np.median):
        pre = np.array([int(pick(keys[i] >> 16)) for i in range(p.n)], dtype=np.uint32)
        h2 = be.histogram(p, b, ms, pre)
        for i in range(p.n):
            sel = keys[i][(keys[i] >> 16) == pre[i]] & 0xFFFF
            assert np.array_equal(np.bincount(sel, minlength=65536), h2[i]), f"pass 2, model {i}"


def _memo(hist):
    """``hist`` answering each prefix once (the histograms do not change between selections)."""
    seen: dict = {}

    def call(prefix):
        key = None if prefix is None else bytes(np.asarray(prefix, dtype=np.uint32))
        if key not in seen:
            seen[key] = hist(prefix)
        return seen[key]

    return call


def _ks(numel: int, n: int) -> list:
    cand = sorted({0, 1, 2, numel // 3, numel // 2, numel - 1, numel, numel + 5})
    return [[cand[(j + i) % len(cand)] for i in range(n)] for j in range(len(cand))] + [
        [None] * n,
        [None, 1][:n],
    ]


@pytest.mark.parametrize("backend", KEY_BACKENDS)
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_thresholds_equal_the_histogram_path(backend, dtypes, kind, gen):
    be = get_backend(backend, "cpu")
    for numel in [1, 3, 17, 1029] + ([4100] if kind in ("random", "nan", "ties") else []):
        for name, kw in RECIPES.items():
            if name not in ("ties", "ties_k") and numel in (3, 1029):
                continue
            b, ms = _inputs(kind, numel, DTYPE_SETS[dtypes], gen)
            _, p = _params(kw, 2, True)
            keys = api.small_tensor_keys(p, b, ms, be)
            _check_keys_are_counted(be, p, b, ms, keys)
            hist = _memo(lambda prefix: be.histogram(p, b, ms, prefix))  # noqa: B023 (called at once)
            for ks in _ks(numel, 2):
                want = select_thresholds(hist, ks, numel)
                got = select_from_keys(keys, ks, numel)
                assert got.dtype == np.uint64 and np.array_equal(got, want), (numel, name, ks, got, want)


@pytest.mark.parametrize("backend", KEY_BACKENDS)
def test_no_base_and_three_models(backend, gen):
    be = get_backend(backend, "cpu")
    for kind in ("nan", "zeros", "random", "denormal"):
        b, ms = _inputs(kind, 257, (F32, [BF16, F16, F32]), gen, n=3, base=False)
        recipe, _ = _params(dict(method="ties_dare", drop_rate=0.3, density=[0.1, 0.5, 1.0]), 3, True)
        p = make_params(recipe, "x", False)  # the kernels' no-base path (b = 0)
        assert not p.has_base
        keys = api.small_tensor_keys(p, None, ms, be)
        _check_keys_are_counted(be, p, None, ms, keys)


@pytest.mark.parametrize("dtypes", ["bf16", "mixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_histograms_count_the_cpu_keys(dtypes, kind, gen):
    """Triton has no ``delta_keys`` (it keeps the histogram path): its histograms count the CPU
    kernels' bits(|δ'|), so the thresholds agree across backends. Known exception: Triton's
    interpreter converts bf16 subnormals to float32 wrongly (``_convert_float`` normalises them);
    compiled Triton on a GPU converts exactly."""
    if "triton" not in BACKENDS or not have_backend("cpu"):
        pytest.skip("needs the CPU extension and Triton on CPU tensors")
    if kind == "denormal" and DTYPE_SETS[dtypes][0] == BF16:
        pytest.xfail("Triton's interpreter: bf16 subnormal -> float32 conversion is not exact")
    tri, cpu = get_backend("triton", "cpu"), get_backend("cpu", "cpu")
    assert api.small_tensor_keys(None, None, None, tri) is None
    for kw in (RECIPES["ties"], RECIPES["ties_dare"]):
        b, ms = _inputs(kind, 300, DTYPE_SETS[dtypes], gen)
        _, p = _params(kw, 2, True)
        keys = cpu.delta_keys(p, b, ms)
        _check_keys_are_counted(tri, p, b, ms, keys)
        for ks in _ks(300, 2)[::3]:  # the CPU's small path = Triton's histogram path
            want = select_thresholds(_memo(lambda prefix: tri.histogram(p, b, ms, prefix)), ks, 300)  # noqa: B023 (called at once)
            assert np.array_equal(select_from_keys(keys, ks, 300), want), ks


def test_select_from_keys_edge_cases():
    keys = np.array([[5, 5, 5, 5], [0, 0x7FC00000, 3, 0x7F800000]], dtype=np.uint32)
    got = select_from_keys(keys, [0, 1], 4)
    assert got.tolist() == [TRIM_KEEP_NONE, 0x7FC00000]  # NaN orders above inf, as its bits do
    assert select_from_keys(keys, [4, 9], 4).tolist() == [5, 0]  # k >= n: the smallest
    assert select_from_keys(keys, [None, 2], 4).tolist() == [TRIM_KEEP_ALL, 0x7F800000]
    assert select_from_keys(keys, [-3, 3], 4).tolist() == [TRIM_KEEP_NONE, 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["ties", "ties_dare", "ties_m3", "dare_ties_l1", "ties_w"])
def test_prepare_and_merge_identical_with_and_without_the_small_path(backend, case, gen, monkeypatch):
    import m3kernels

    kw = {
        "ties": dict(method="ties", density=0.2),
        "ties_dare": dict(method="ties_dare", drop_rate=0.5, density=0.2, seed=3),
        "ties_m3": dict(method="ties", density=0.4, mixup_alpha=0.4, seed=11),
        "dare_ties_l1": dict(method="dare_ties", density=0.5, rescale="l1"),
        "ties_w": dict(method="ties", density=[0.2, 0.7], normalize=False, weights=[1.0, 0.6]),
    }[case]
    numels = [1, 16, 1000, api.SMALL_TENSOR_NUMEL] if backend == "cpu" else [700]
    for numel in numels:
        for kind in ("random", "ties", "nan") if backend == "cpu" else ("random", "nan"):
            b, ms = _inputs(kind, numel, (BF16, [BF16, F32]), gen)
            shape = (numel, 1) if numel % 2 else (2, numel // 2)
            b, ms = b.reshape(shape), [m.reshape(shape) for m in ms]
            outs, thr = [], []
            for limit in (api.SMALL_TENSOR_NUMEL, -1):  # the small path, then the histograms
                monkeypatch.setattr(api, "SMALL_TENSOR_NUMEL", limit)
                outs.append(m3kernels.merge_tensors(b, ms, name="t", backend=backend, **kw))
                thr.append(m3kernels.trim_thresholds(b, ms, name="t", backend=backend, **kw))
            monkeypatch.undo()
            assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), (numel, kind)
            assert [str(t) for t in thr[0]] == [str(t) for t in thr[1]], (numel, kind, thr)


def test_small_path_skips_the_histograms(gen, monkeypatch):
    if not have_backend("cpu"):
        pytest.skip("CPU extension not built")
    be = get_backend("cpu", "cpu")
    b, ms = _inputs("random", 4096, (BF16, [BF16]), gen)
    recipe, _ = _params(dict(method="ties", density=0.2), 2, True)
    monkeypatch.setattr(be, "histogram", lambda *a: pytest.fail("histogram called for a small tensor"))
    p, _ = api.prepare(b, ms, recipe, "x", be)
    assert p.trim_min.tolist() == [
        int(x) for x in select_from_keys(be.delta_keys(p, b, ms), [trim_k(0.2, 4096)] * 2, 4096)
    ]


# ---------------------------------------------------------------- the many-tensor machinery
class _FakeMeta:
    def __init__(self, nbytes):
        self.nbytes = nbytes


class _FakeSource:
    def __init__(self, nbytes):
        self.meta = _FakeMeta(nbytes)


class _FakeTensor:
    def __init__(self, i, sizes, log):
        self.i, self.sizes, self.log = i, sizes, log

    def sources(self):
        return [_FakeSource(s) for s in self.sizes]

    def prefetch(self):
        self.log.append(self.i)


def _old_window(sizes, current, budget):
    """The read-ahead window as the per-step loop defined it (tensors current+1 ..)."""
    out, ahead, i = [], 0, current + 1
    while i < len(sizes) and (i == current + 1 or ahead < budget):
        ahead += sum(sizes[i])
        out.append(i)
        i += 1
    return out


def test_prefetch_window_is_the_old_one(gen):
    from m3kernels.checkpoint.produce import Prefetcher

    for trial in range(30):
        count = int(torch.randint(1, 60, (1,), generator=gen))
        sizes = [[int(x) for x in torch.randint(0, 50, (3,), generator=gen)] for _ in range(count)]
        budget = int(torch.randint(1, 400, (1,), generator=gen))
        log: list = []
        pre = Prefetcher([_FakeTensor(i, s, log) for i, s in enumerate(sizes)], budget=budget)
        want: list = []
        try:
            for k in range(count):
                pre.advance(k)
                want = sorted(set(want) | set(_old_window(sizes, k, budget)))
                pre.pool.submit(lambda: None).result()  # the read-ahead jobs so far have run
                assert log == want, (trial, k)
        finally:
            pre.close()


def test_release_is_batched_and_pages_still_read_back(tmp_path):
    from safetensors.torch import save_file

    from m3kernels.checkpoint import safetensors_io as sio

    tensors = {f"t{i}": torch.full((8,), float(i)) for i in range(500)}
    tensors["big"] = torch.arange(sio.RELEASE_BATCH // 4 + 10, dtype=torch.float32)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    f = sio.SafetensorsFile(tmp_path / "m.safetensors")
    calls = []
    real = f._advise
    f._advise = lambda advice, lo, hi: (calls.append((advice, lo, hi)), real(advice, lo, hi))
    try:
        names = list(f.tensors)  # file order
        for name in names:
            f.prefetch(name)
            assert torch.equal(f.tensor(name), tensors[name])
            f.release(name)
            assert torch.equal(f.tensor(name), tensors[name])  # dropped pages come back from the file
        drops = [c for c in calls if c[0] == sio.mmap.MADV_DONTNEED]
        reads = [c for c in calls if c[0] == sio.mmap.MADV_WILLNEED]
        assert len(drops) <= 2 and len(reads) <= 3, (drops, reads)
        covered = sorted((lo, hi) for _, lo, hi in drops)
        assert covered[0][0] == 0 and covered[-1][1] <= f.tensors[names[-1]].end
    finally:
        f.close()


def test_model_trim_scope_exact_over_many_small_tensors(tmp_path):
    """trim_scope: model (histograms summed over tensors) = the k-th largest of all keys."""
    if not have_backend("cpu"):
        pytest.skip("CPU extension not built")
    from m3kernels.checkpoint.inputs import config_and_folder, open_inputs
    from m3kernels.checkpoint.model_stats import model_thresholds
    from m3kernels.checkpoint.plan import build_plan

    from checkpoint_factory import fine_tune, random_tensors, write_checkpoint

    shapes = {f"model.layers.{i // 40}.mlp.experts.{i % 40}.w.weight": (3, 5 + i % 7) for i in range(300)}
    base = random_tensors(shapes, 1)
    dirs = [write_checkpoint(tmp_path / "base", base, tokenizer=False)]
    dirs += [write_checkpoint(tmp_path / f"ft{k}", fine_tune(base, 10 + k), tokenizer=False) for k in (1, 2)]
    cfg = {
        "merge_method": "ties_dare",
        "base_model": str(dirs[0]),
        "trim_scope": "model",
        "seed": 4,
        "models": [{"model": str(d), "parameters": {"density": 0.3, "drop_rate": 0.2}} for d in dirs[1:]],
    }
    c, folder = config_and_folder(cfg, None)
    b, ms, opened = open_inputs(c, folder, False)
    try:
        plan = build_plan(c, b, ms, 1 << 30)
        got = model_thresholds(plan, torch.device("cpu"), "cpu", False)
        be = get_backend("cpu", "cpu")
        keys = []
        for pt in plan.tensors:
            bb, mm = pt.inputs()
            p = make_params(pt.recipe, pt.name, True)
            keys.append(be.delta_keys(p, bb, mm))
        allk = np.concatenate(keys, axis=1)
        total = allk.shape[1]
        ks = [trim_k(d, total) for d in plan.tensors[0].recipe.trim_density]
        want = select_from_keys(allk, ks, total)
        assert [float(np.array([w], np.uint32).view(np.float32)[0]) for w in want] == got
    finally:
        for ck in opened:
            ck.close()


# ---------------------------------------------------------------- batched small tensors (merge_batch)
@pytest.mark.parametrize("kind", ["random", "ties", "nan", "zeros", "denormal"])
def test_merge_batch_equals_merge_tensors_per_tensor(kind, gen):
    """_C.merge_batch: per tensor the thresholds select_from_keys picks and merge_tensors' bytes."""
    if not have_backend("cpu"):
        pytest.skip("CPU extension not built")
    import m3kernels
    from m3kernels.merge.philox import dare_key

    be = get_backend("cpu", "cpu")
    sizes = [1, 3, 16, 100, 1029, 4096]
    for kw, dtypes, has_base in [
        (dict(method="ties", density=[0.3, 1.0]), (BF16, [BF16, F32]), True),
        (dict(method="ties_dare", drop_rate=0.4, density=0.5, seed=5), (F16, [F16]), True),
        (dict(method="ties", density=[0.0, 0.5]), (F32, [F32]), True),
        (dict(method="linear", weights=[0.7, 0.3]), (BF16, [BF16, F32]), False),
    ]:
        recipe, _ = _params(kw, 2, True)
        ins = [_inputs(kind, s, dtypes, gen, base=has_base) for s in sizes]
        names = [f"model.layers.{i}.x.weight" for i in range(len(sizes))]
        p = make_params(recipe, names[0], has_base)
        outs = [torch.empty(s, dtype=BF16) for s in sizes]
        ks = [trim_k(d, s) for s in sizes for d in recipe.trim_density] if recipe.trim_density else None
        keys = (
            [k for nm in names for i in range(2) for k in [dare_key(recipe.seed, nm, i)]]
            if recipe.dare_density
            else None
        )
        used = be.merge_batch(
            p,
            [b.data_ptr() for b, _ in ins] if has_base else [],
            dtypes[0] if has_base else None,
            [m.data_ptr() for _, ms in ins for m in ms],
            [m.dtype for m in ins[0][1]],
            sizes,
            [o.data_ptr() for o in outs],
            BF16,
            ks,
            [k[0] for k in keys] if keys else None,
            [k[1] for k in keys] if keys else None,
        )
        for t, ((b, ms), out, nm) in enumerate(zip(ins, outs, names)):
            want = m3kernels.merge_tensors(b, ms, name=nm, backend="cpu", out_dtype=BF16, **kw)
            assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (kw, sizes[t])
            if ks is not None:
                pt = make_params(recipe, nm, has_base)
                exp = select_from_keys(
                    be.delta_keys(pt, b if has_base else None, ms), ks[2 * t : 2 * t + 2], sizes[t]
                )
                assert used[t].tolist() == exp.tolist()


@pytest.mark.parametrize("case", ["ties", "ties_dare", "linear", "ties_model_scope", "dare_ties_l1"])
def test_checkpoint_merge_identical_with_and_without_batches(case, tmp_path, monkeypatch):
    """A checkpoint of many small tensors (NaNs, ties, per-layer weights, mixed dtypes) merges to the
    same bytes through the batched path and one tensor at a time."""
    if not have_backend("cpu"):
        pytest.skip("CPU extension not built")
    import m3kernels
    from m3kernels.checkpoint import produce

    from checkpoint_factory import fine_tune, random_tensors, write_checkpoint

    shapes = {f"model.layers.{i // 30}.mlp.experts.{i % 30}.w.weight": (4, 3 + i % 5) for i in range(120)}
    shapes["model.norm.weight"] = (7,)
    base = random_tensors(shapes, 3)
    ft1 = fine_tune(base, 4)
    ft2 = fine_tune(base, 5, dtype=torch.float32)
    for k, t in enumerate(ft1.values()):  # NaNs and exact ties in a few tensors
        if k % 7 == 0:
            t.view(-1)[0] = float("nan")
        if k % 5 == 0:
            t.view(-1)[:] = base[list(base)[k]].view(-1) + 0.25
    dirs = [
        write_checkpoint(tmp_path / "base", base, tokenizer=False),
        write_checkpoint(tmp_path / "ft1", ft1, shards=2, tokenizer=False),
        write_checkpoint(tmp_path / "ft2", ft2, tokenizer=False),
    ]
    per = {"weight": [1.0, 0.5], "density": 0.3}
    cfg = {
        "ties": {"merge_method": "ties"},
        "ties_dare": {"merge_method": "ties_dare", "seed": 9, "mixup": {"alpha": 0.5}},
        "linear": {"merge_method": "linear"},
        "ties_model_scope": {"merge_method": "ties", "trim_scope": "model"},
        "dare_ties_l1": {"merge_method": "dare_ties", "parameters": {"rescale": "l1"}},
    }[case]
    params = dict(per) if case != "linear" else {"weight": [1.0, 0.5]}
    if case == "ties_dare":
        params["drop_rate"] = 0.3
    cfg = {**cfg, "models": [{"model": str(d), "parameters": params} for d in dirs[1:]]}
    if case != "linear":
        cfg["base_model"] = str(dirs[0])
    m3kernels.merge_checkpoints(cfg, tmp_path / "batched", device="cpu", progress=False)
    monkeypatch.setattr(produce, "BATCH_NUMEL", 0)
    m3kernels.merge_checkpoints(cfg, tmp_path / "single", device="cpu", progress=False)
    files = sorted(p.name for p in (tmp_path / "single").iterdir() if p.suffix == ".safetensors")
    assert files == sorted(p.name for p in (tmp_path / "batched").iterdir() if p.suffix == ".safetensors")
    for f in files:
        assert (tmp_path / "batched" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
