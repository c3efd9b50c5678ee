"""Stage A for large tensors on the CPU: the exact trim threshold from one pass over the inputs.

``m3kernels.api.prepare`` takes, for tensors above ``SMALL_TENSOR_NUMEL`` elements on a backend
with ``sample_keys`` / ``bracket_count`` (the CPU one), a strided sample of bits(|δ'|) to place a
range of high-16 buckets, then one pass counts the keys above the range, the high-16 counts
inside it and the low-16 counts of a few of its buckets
(:func:`m3kernels.merge.select.select_thresholds_single_pass`). When the k-th largest falls in
a range bucket without low-16 counts, pass 2 of the two-pass method runs for it; when it lies
outside the range, both passes. The thresholds must be bit-identical to the two-pass ones
(``select_thresholds``) and to the exact k-th largest (a NumPy sort of the keys) for every input:
these tests check that on adversarial inputs (all magnitudes equal, one distinct value, ties
straddling the range, NaN, ±0, denormals, inf, k = 0, 1, n), with DARE on and off, for bf16,
fp16 and fp32, several models with different densities, random inputs, every SIMD variant, and
samples that are wrong on purpose (every fallback path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import m3kernels.api as api
from m3kernels.merge import select
from m3kernels.merge.kernel_params import TRIM_KEEP_ALL, TRIM_KEEP_NONE, make_params, trim_k
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_thresholds
from m3kernels.merge.select import select_thresholds, select_thresholds_single_pass

sys.path.insert(0, str(Path(__file__).parent))
from helpers import have_backend  # noqa: E402

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="CPU extension not built")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
NUMEL = 3 * 65536 + 1234 + 7  # above SMALL_TENSOR_NUMEL, not a multiple of 16: partial vectors too


def _cpu():
    from m3kernels.backends import cpu

    return cpu


class _Since:
    """SINGLE_PASS_STATS counts since the test began (read at any time)."""

    def __init__(self):
        self.before = dict(select.SINGLE_PASS_STATS)

    def __getitem__(self, key):
        return select.SINGLE_PASS_STATS[key] - self.before[key]


@pytest.fixture
def stats():
    return _Since()


def _exact(keys: np.ndarray, ks) -> np.ndarray:
    """The exact k-th largest of each row by a full sort (the definition)."""
    out = np.full(len(ks), TRIM_KEEP_ALL, dtype=np.uint64)
    for i, k in enumerate(ks):
        if k is None:
            continue
        if k <= 0:
            out[i] = TRIM_KEEP_NONE
            continue
        row = np.sort(keys[i])[::-1]
        out[i] = int(row[min(k, row.size) - 1])
    return out


def _check(base, models, method, **kw):
    """prepare (single pass) == two-pass select_thresholds == sorted keys; returns the bits."""
    cpu = _cpu()
    recipe = make_recipe(len(models), method=method, has_base=base is not None, **kw)
    numel = models[0].numel()
    p, b = api.prepare(base, models, recipe, "t.weight", cpu)
    p0 = make_params(recipe, "t.weight", base is not None)
    b0 = base if p0.has_base else None
    if recipe.rescale == "l1":
        p0 = p0.with_dare_scale(p.dare_scale)
    ks = [trim_k(d, numel) for d in recipe.trim_density]
    two = select_thresholds(lambda prefix: cpu.histogram(p0, b0, models, prefix), ks, numel)
    keys = cpu.delta_keys(p0, b0, models)
    want = _exact(keys, ks)
    assert np.array_equal(two, want), (two, want)
    assert np.array_equal(p.trim_min, want), (p.trim_min, want)
    return p.trim_min


def _tensors(deltas, base=None, dtype=BF16):
    """base (default zeros) and base + delta for each delta (rounded to ``dtype``)."""
    numel = deltas[0].numel()
    if base is None:
        base = torch.zeros(numel)
    b = base.to(dtype)
    return b, [(b.float() + d).to(dtype) for d in deltas]


def _gauss(seed, numel=NUMEL, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * scale


# ----------------------------------------------------------------------------- adversarial inputs


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_all_magnitudes_equal(dtype, stats):
    for sign_seed in (0, 1):
        s = torch.where(
            torch.rand(NUMEL, generator=torch.Generator().manual_seed(sign_seed)) < 0.5, -1.0, 1.0
        )
        b, ms = _tensors([0.25 * s, torch.full((NUMEL,), 0.25)], dtype=dtype)
        for d in (0.0, 1.0 / NUMEL, 0.2, 0.5, 1.0):
            _check(b, ms, "ties", density=d)
    assert stats["selections"] > 0


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_one_distinct_value(dtype):
    d = torch.zeros(NUMEL)
    d[NUMEL // 3] = 0.5
    b, ms = _tensors([d, -d], dtype=dtype)
    for dens in (0.0, 1.0 / NUMEL, 2.0 / NUMEL, 0.2, 1.0):
        _check(b, ms, "ties", density=dens)


def test_k_0_1_n(stats):
    b, ms = _tensors([_gauss(1), _gauss(2)], base=_gauss(0))
    bits = _check(b, ms, "ties", density=[0.0, 1.0 / NUMEL])
    assert bits[0] == TRIM_KEEP_NONE
    _check(b, ms, "ties", density=[1.0, 2.0 / NUMEL])
    _check(b, ms, "ties", density=[(NUMEL - 1) / NUMEL, 0.999999])


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_nan_zero_denormal_inf(dtype):
    base = _gauss(0)
    d = _gauss(3, scale=0.002)
    idx = torch.randperm(NUMEL, generator=torch.Generator().manual_seed(4))
    d[idx[:500]] = float("nan")
    d[idx[500:3000]] = 0.0
    d[idx[3000:4000]] = float("inf")
    d[idx[4000:5000]] = -float("inf")
    b, ms = _tensors([d, -d], base=base, dtype=dtype)
    for dens in (0.0, 1.0 / NUMEL, 100 / NUMEL, 600 / NUMEL, 0.01, 0.2, 0.9, 1.0):
        _check(b, ms, "ties", density=dens)
    # ±0 and denormal deltas (float32: base 0, model ±0 / ±denormals)
    z = torch.zeros(NUMEL)
    tiny = torch.full((NUMEL,), 1e-40)
    tiny[::3] = -1e-42
    tiny[::5] = -0.0
    tiny[::7] = 0.0
    bz, mz = _tensors([tiny, -tiny], base=z, dtype=F32)
    for dens in (0.0, 1.0 / NUMEL, 0.3, 0.6, 1.0):
        _check(bz, mz, "ties", density=dens)


def test_reference_thresholds_agree():
    """The float32 reference (full sort in torch) gives the same values."""
    b, ms = _tensors([_gauss(5, scale=0.002), _gauss(6, scale=0.003)], base=_gauss(0))
    recipe = make_recipe(2, method="ties", has_base=True, density=[0.2, 0.35])
    p, _ = api.prepare(b, ms, recipe, "r", _cpu())
    want = reference_thresholds(b, ms, recipe, "r")
    got = [select.bits_to_float(int(x)) for x in p.trim_min]
    assert got == want


def test_ties_straddling_the_range(stats):
    """Many equal keys on both sides of the range edges and at the k-th largest, and samples placing
    the range edges exactly on those tie groups."""
    cpu = _cpu()
    vals = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    reps = torch.tensor([NUMEL // 10, NUMEL // 5, NUMEL // 3, 0])
    reps[3] = NUMEL - int(reps[:3].sum())
    d = torch.repeat_interleave(vals, reps)
    d = d[torch.randperm(NUMEL, generator=torch.Generator().manual_seed(7))]
    b, ms = _tensors([d, d * 1.0078125], dtype=F32)
    for k in (1, NUMEL // 10, NUMEL // 10 + 1, NUMEL // 10 + NUMEL // 5, NUMEL // 2, NUMEL - 1, NUMEL):
        _check(b, ms, "ties", density=k / NUMEL)
    recipe = make_recipe(2, method="ties", has_base=True, density=0.3)
    p = make_params(recipe, "t", True)
    keys = cpu.delta_keys(p, b, ms)
    tie_keys = np.unique(keys[0])
    for k in (1, NUMEL // 10, NUMEL // 10 + 1, NUMEL // 2, NUMEL):
        want = _exact(keys, [k, k])
        for lo_key in tie_keys:  # samples that are the tie values themselves: ranges start/end on them
            sample = lambda lk=int(lo_key): np.full((2, 4096), lk, dtype=np.uint32)  # noqa: E731
            got = select_thresholds_single_pass(
                sample,
                lambda lo, span, fine: cpu.bracket_count(p, b, ms, lo, span, fine),
                lambda prefix: cpu.histogram(p, b, ms, prefix),
                [k, k],
                NUMEL,
            )
            assert np.array_equal(got, want), (k, hex(int(lo_key)), got, want)


# ----------------------------------------------------------------------------- DARE, dtypes, models


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_dare_on_off_and_densities(dtype, stats):
    base = _gauss(0)
    ds = [_gauss(10 + i, scale=0.002 * (i + 1)) for i in range(3)]
    b, ms = _tensors(ds, base=base, dtype=dtype)
    _check(b, ms, "ties", density=[0.1, 0.2, 0.7])
    _check(b, ms, "ties_dare", drop_rate=[0.5, 0.3, 0.9], density=[0.2, 0.05, 1.0])
    _check(b, ms, "ties_dare", drop_rate=[0.0, 1.0, 0.5], density=[0.3, 0.3, 0.0])
    _check(b, ms, "ties_dare", drop_rate=0.5, density=0.2, rescale="l1")
    assert stats["selections"] >= 9


def test_mixed_dtypes_and_one_model():
    base = _gauss(0).to(BF16)
    m1 = (base.float() + _gauss(1, scale=0.002)).to(F16)
    m2 = (base.float() + _gauss(2, scale=0.002)).to(F32)
    _check(base, [m1, m2], "ties", density=[0.2, 0.4])
    _check(base, [m2], "ties", density=0.01)


def test_random_inputs(stats):
    rng = np.random.default_rng(0)
    for trial in range(6):
        numel = int(rng.integers(65537, 400_000))
        dtype = [BF16, F16, F32][trial % 3]
        n = int(rng.integers(1, 5))
        scale = float(10.0 ** rng.uniform(-4, 0))
        base = torch.from_numpy(rng.standard_normal(numel).astype(np.float32)) * 0.02
        ds = [torch.from_numpy(rng.standard_t(3, numel).astype(np.float32)) * scale for _ in range(n)]
        if trial % 2:  # heavily quantised deltas (few distinct keys, like bf16 fine-tunes)
            ds = [torch.round(d * 64) / 64 for d in ds]
        b, ms = _tensors(ds, base=base, dtype=dtype)
        dens = [float(x) for x in rng.choice([0.0, 1e-5, 0.01, 0.2, 0.5, 0.97, 1.0], n)]
        _check(b, ms, "ties", density=dens)
        if trial < 3:
            _check(
                b,
                ms,
                "ties_dare",
                drop_rate=[float(x) for x in rng.uniform(0, 1, n)],
                density=dens,
                seed=trial,
            )


def test_every_simd_variant_gives_the_same_counts():
    from m3kernels import _C

    cpu = _cpu()
    b, ms = _tensors([_gauss(1, scale=0.002), _gauss(2, scale=0.004)], base=_gauss(0))
    recipe = make_recipe(2, method="ties_dare", has_base=True, drop_rate=0.4, density=0.2)
    p = make_params(recipe, "v", True)
    keys = cpu.delta_keys(p, b, ms)
    lo = (keys.min(axis=1) >> 16).astype(np.uint32)
    lo[1] = max(int(lo[1]), int(np.median(keys[1])) >> 16)
    span = (0x8000 - lo).astype(np.uint32)
    top = [int(np.median(keys[i])) >> 16 for i in range(2)]
    fine = [[top[0], top[0] + 1], [top[1]]]
    want_up = [(keys[i] >= ((int(lo[i]) + int(span[i])) << 16)).sum() for i in range(2)]
    results = []
    before = _C.simd_level()
    try:
        for level in cpu.simd_levels():
            _C.set_simd_level(level)
            above, rng, fn = cpu.bracket_count(p, b, ms, lo, span, fine)
            sample = cpu.sample_keys(p, b, ms, 1024)
            results.append((above.tolist(), [r.tolist() for r in rng], fn.tobytes(), sample.tobytes()))
    finally:
        _C.set_simd_level(before)
    assert all(r == results[0] for r in results)
    above, rng, fn = cpu.bracket_count(p, b, ms, lo, span, fine)
    assert list(above) == want_up
    for i in range(2):
        hi16 = keys[i] >> 16
        inside = (hi16 >= lo[i]) & (hi16 < lo[i] + span[i])
        assert np.array_equal(rng[i], np.bincount(hi16[inside] - lo[i], minlength=int(span[i])))
        for j, bk in enumerate(fine[i]):
            assert np.array_equal(fn[i, j], np.bincount(keys[i][hi16 == bk] & 0xFFFF, minlength=65536))
    # the sample: runs of 64 at a stride of numel // runs
    stride = NUMEL // 1024
    pos = (np.arange(1024)[:, None] * stride + np.arange(64)[None, :]).reshape(-1)
    assert np.array_equal(cpu.sample_keys(p, b, ms, 1024), keys[:, pos])


def test_bracket_count_rejects_bad_arguments():
    cpu = _cpu()
    b, ms = _tensors([_gauss(1)])
    p = make_params(make_recipe(1, method="ties", has_base=True, density=0.2), "x", True)
    with pytest.raises(ValueError):
        cpu.bracket_count(p, b, ms, [10], [65530], [[]])  # past the last bucket
    with pytest.raises(ValueError):
        cpu.bracket_count(p, b, ms, [10], [5], [[9]])  # fine bucket outside the range
    with pytest.raises(ValueError):
        cpu.bracket_count(p, b, ms, [10], [5], [[11, 11]])  # twice
    with pytest.raises(ValueError):
        cpu.bracket_count(p, b, ms, [10], [5], [[10, 11, 12, 13, 14]])  # more than 4
    with pytest.raises(ValueError):
        cpu.sample_keys(p, b, ms, NUMEL // 32)  # runs of 64 would overlap


# ----------------------------------------------------------------------------- the fallbacks


def _samples_that_mislead(keys, how):
    if how == "zeros":  # range at the very bottom: the k-th largest lies above it
        return np.zeros_like(keys[:, :4096])
    if how == "max":  # range at the top
        return np.full_like(keys[:, :4096], keys.max())
    if how == "shifted":  # a range one bucket off: the k-th largest in it, without fine counts
        return np.clip(keys[:, ::37][:, :4096].astype(np.int64) + (1 << 16), 0, 0x7FFFFFFF).astype(np.uint32)
    if how == "spread":  # far too spread out: no range at all
        return np.linspace(0, 0x7F800000, 4096, dtype=np.uint32)[None, :].repeat(keys.shape[0], 0)
    return keys[:, ::41][:, :4096]  # an honest sample


@pytest.mark.parametrize("how", ["zeros", "max", "shifted", "spread", "honest"])
@pytest.mark.parametrize(
    "method,kw",
    [("ties", {"density": [0.2, 0.01]}), ("ties_dare", {"drop_rate": 0.5, "density": [0.3, 1.0]})],
)
def test_misleading_samples_still_exact(how, method, kw, stats):
    cpu = _cpu()
    b, ms = _tensors([_gauss(21, scale=0.002), _gauss(22, scale=0.001)], base=_gauss(0))
    recipe = make_recipe(2, method=method, has_base=True, **kw)
    p = make_params(recipe, "f", True)
    keys = cpu.delta_keys(p, b, ms)
    ks = [trim_k(d, NUMEL) for d in recipe.trim_density]
    got = select_thresholds_single_pass(
        lambda: _samples_that_mislead(keys, how),
        lambda lo, span, fine: cpu.bracket_count(p, b, ms, lo, span, fine),
        lambda prefix: cpu.histogram(p, b, ms, prefix),
        ks,
        NUMEL,
    )
    assert np.array_equal(got, _exact(keys, ks))
    if how in ("zeros", "spread"):
        assert stats["two_passes"] >= 1
    if how == "honest":
        assert stats["two_passes"] == 0


def test_second_pass_fallback_is_taken():
    """A range whose fine buckets miss the one holding the k-th largest: pass 2 finds it."""
    cpu = _cpu()
    b, ms = _tensors([_gauss(31, scale=0.002)], base=_gauss(0))
    p = make_params(make_recipe(1, method="ties", has_base=True, density=0.2), "s", True)
    keys = cpu.delta_keys(p, b, ms)
    k = trim_k(0.2, NUMEL)
    want = _exact(keys, [k])
    bucket = int(want[0]) >> 16
    before = dict(select.SINGLE_PASS_STATS)

    def count(lo, span, fine):
        return cpu.bracket_count(p, b, ms, [bucket - 2], [5], [[bucket - 1]])  # the wrong fine bucket

    orig = select.bracket
    try:
        select.bracket = lambda sample, k_, total: (bucket - 2, 5, [bucket - 1])
        got = select_thresholds_single_pass(
            lambda: keys[:, :4096], count, lambda prefix: cpu.histogram(p, b, ms, prefix), [k], NUMEL
        )
    finally:
        select.bracket = orig
    assert np.array_equal(got, want)
    assert select.SINGLE_PASS_STATS["second_pass"] == before["second_pass"] + 1


def test_ordinary_data_takes_one_pass(stats):
    """bf16 fine-tune deltas (few distinct keys) and float32 ones, usual densities: one pass each."""
    for dtype in (BF16, F32):
        b, ms = _tensors([_gauss(51, scale=0.002), _gauss(52, scale=0.002)], base=_gauss(0), dtype=dtype)
        for dens in (0.01, 0.1, 0.2, 0.5, 0.9):
            _check(b, ms, "ties", density=dens)
        _check(b, ms, "ties_dare", drop_rate=0.5, density=0.2)
    assert stats["selections"] == 24
    assert stats["two_passes"] == 0 and stats["second_pass"] == 0


def test_bracket_edges():
    s = np.arange(1024, dtype=np.uint32) << 21  # one key every 32 buckets: the range would be too wide
    assert select.bracket(s, 1 << 19, 1 << 20) is None
    s = np.full(4096, 0x3C001234, dtype=np.uint32)
    lo, span, fine = select.bracket(s, 10, 1000)
    assert (lo, span, fine) == (0x3C00, 1, [0x3C00])
    assert select.bracket(s, 0, 1000) is None
    lo, span, fine = select.bracket(np.zeros(4096, np.uint32), 1000, 1000)  # k = n: down to bucket 0
    assert lo == 0 and fine == [0]


def test_large_tensor_path_used_and_small_path_kept(monkeypatch):
    """prepare: at most SMALL_TENSOR_NUMEL elements the keys are selected directly; above, the one
    pass (no histogram call at all when the range holds the k-th largest)."""
    cpu = _cpu()
    calls = []
    real_hist = cpu.histogram

    def spy(*a, **k):
        calls.append(1)
        return real_hist(*a, **k)

    monkeypatch.setattr(cpu, "histogram", spy)
    b, ms = _tensors([_gauss(41, scale=0.002)], base=_gauss(0))
    recipe = make_recipe(1, method="ties", has_base=True, density=0.2)
    api.prepare(b, ms, recipe, "x", cpu)
    assert calls == []
    small = _tensors([_gauss(42, numel=1000)], base=_gauss(0, numel=1000))
    api.prepare(small[0], small[1], recipe, "y", cpu)
    assert calls == []


# ----------------------------------------------------------------------------- the output side
# The same speed work (issue 7, "Faster CPU checkpoint merges"): large tensors are merged part by
# part (stage A on the whole tensor, stage B per part, ``produce.PART_BYTES``) into page-aligned
# buffers at the tensor's file page phase, whose whole pages the writer sends to the file without
# the staging copy (``writer.DIRECT_MIN``). Shrunk here so that tiny checkpoints take those paths;
# the files must be byte-identical to whole-tensor, buffered writes.


def _family(root):
    from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, write_checkpoint

    base = llama_tensors(seed=3, hidden=128, intermediate=1024, vocab=300, heads=4)  # tensors up to 256 KiB
    cfg = llama_config(hidden=128, intermediate=1024, vocab=300, heads=4)
    dirs = {"base": write_checkpoint(root / "base", base, shards=2, config=cfg)}
    for i, dtype in enumerate([None, torch.float32]):
        dirs[f"ft{i}"] = write_checkpoint(
            root / f"ft{i}", fine_tune(base, seed=7 + i, dtype=dtype), shards=1, config=cfg
        )
    return {k: str(v) for k, v in dirs.items()}


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"density": 0.3}),
        ("dare_ties", {"density": 0.6}),
        ("ties_dare", {"drop_rate": 0.4, "density": 0.3}),
        ("linear", {}),
    ],
)
def test_parts_and_direct_writes_give_the_same_files(tmp_path, monkeypatch, method, params):
    import m3kernels
    from m3kernels.checkpoint import produce, writer

    d = _family(tmp_path)
    cfg = {
        "merge_method": method,
        "models": [
            {"model": d["ft0"], "parameters": {"weight": 1.0, **params}},
            {"model": d["ft1"], "parameters": {"weight": 0.5, **params}},
        ],
        "seed": 3,
    }
    if method != "linear":
        cfg["base_model"] = d["base"]
    written = {"parts": 0, "direct": 0}
    real_put, real_direct = writer.ShardedWriter.put, writer.ShardFile._write_direct

    def put(self, planned, tensor, done=None):
        written["parts"] += isinstance(tensor, writer.TensorPart)
        return real_put(self, planned, tensor, done)

    def direct(self, data, lo, hi):
        written["direct"] += hi - lo
        return real_direct(self, data, lo, hi)

    monkeypatch.setattr(writer.ShardedWriter, "put", put)
    monkeypatch.setattr(writer.ShardFile, "_write_direct", direct)
    monkeypatch.setattr(produce, "BATCH_NUMEL", 0)  # no small-tensor batches: every tensor alone
    monkeypatch.setattr(produce, "PART_BYTES", 8192)
    monkeypatch.setattr(writer, "DIRECT_MIN", 4096)
    m3kernels.merge_checkpoints(cfg, tmp_path / "parts", device="cpu", out_shard_size=400_000, progress=False)
    assert written["parts"] > 0
    monkeypatch.setattr(produce, "PART_BYTES", 1 << 62)
    m3kernels.merge_checkpoints(cfg, tmp_path / "whole", device="cpu", out_shard_size=400_000, progress=False)
    monkeypatch.setenv("M3KERNELS_NO_DIRECT_IO", "1")
    m3kernels.merge_checkpoints(
        cfg, tmp_path / "buffered", device="cpu", out_shard_size=400_000, progress=False
    )
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for other in ("parts", "buffered"):
        assert names == sorted(p.name for p in (tmp_path / other).iterdir())
        for n in names:
            assert (tmp_path / other / n).read_bytes() == (tmp_path / "whole" / n).read_bytes(), (other, n)
    if writer.ShardFile(tmp_path / "probe").direct:  # O_DIRECT allowed here: the copy-free path ran
        assert written["direct"] > 0


def test_writer_rejects_parts_out_of_order(tmp_path):
    from m3kernels.checkpoint import writer

    class T:
        def __init__(self, name, n):
            self.name, self.shape, self.out_dtype, self.nbytes = name, (n,), torch.float32, 4 * n

    class S:
        index, filename = 0, "model.safetensors"

        def __init__(self, tensors):
            self.tensors = tensors

    a, b = T("a", 4096), T("b", 16)
    shard = S([a, b])
    j = writer.Journal(tmp_path, "fp")
    w = writer.ShardedWriter(tmp_path, [shard], {}, j)
    assert writer.output_offset(a) == len(writer.shard_header([a, b], {}))
    assert writer.output_offset(b) == writer.output_offset(a) + a.nbytes
    w.put(a, writer.TensorPart(torch.zeros(1024), 0, False))
    w.put(a, writer.TensorPart(torch.zeros(1024), 8192, False))  # skips bytes 4096..8191
    with pytest.raises(RuntimeError, match="out of order"):
        w.close()
    assert writer.output_offset(a) is None  # the writer is no longer running
