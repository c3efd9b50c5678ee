"""The TIES variants of the tensor API (``vote``, ``divide_by``), deltas-only input (``deltas=True``)
and the ``magnitude_prune`` method: the float64 reference's decisions, and the same bytes on the CPU
kernel, the Triton interpreter and the CUDA kernels' host emulation; bad values are ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m3kernels
from m3kernels.merge.reference import reference_merge_tensors
from m3kernels.merge.registry import METHODS

from helpers import have_backend

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}
TIES_FAMILY = ("ties", "dare_ties", "ties_dare", "breadcrumbs_ties", "della")
SPARSITY = {
    "breadcrumbs_ties": dict(density=0.6, gamma=0.05),
    "della": dict(density=0.6, epsilon=0.1),
    "ties": dict(density=0.4),
    "dare_ties": dict(density=0.6),
    "ties_dare": dict(density=0.5, drop_rate=0.3),
}
VARIANTS = [
    dict(vote="unweighted"),
    dict(vote="count"),
    dict(divide_by="count"),
    dict(vote="unweighted", divide_by="count"),
    dict(vote="count", divide_by="count"),
    dict(vote="count", divide_by="none"),
    dict(vote="weighted", divide_by="weights"),
]

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

pytestmark = pytest.mark.skipif(
    not have_backend("cpu"), reason="the CPU extension (m3kernels._C) is not built"
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def _inputs(gen, shape, n, dtype, base=True):
    b = torch.randn(shape, generator=gen, dtype=F64)
    models = [(b + 0.1 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype) for _ in range(n)]
    return (b.to(dtype) if base else None), models


def _weights(n):
    return [1.0, -0.75, 0.5, 2.0, -1.25][:n]


def _check_reference(got: torch.Tensor, ref: torch.Tensor, what: str):
    """The kernel's decisions are the reference's: every element within a few float32 roundings
    of the float64 value (a different vote or agreement would be off by a whole delta)."""
    assert not torch.isnan(got).any(), what
    g = got.to(F64)
    tol = 4 * 2.0**-23 * ref.abs() + (2.0**-8 if got.dtype != F32 else 1e-30) * ref.abs() + 1e-30
    bad = (g - ref).abs() > tol + 1e-6
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off the reference"


def _merge(base, models, out_dtype, backend, **kw):
    out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)  # poisoned
    if backend == "triton":
        o = out.to(DEV)
        m3kernels.merge_tensors(
            None if base is None else base.to(DEV), [m.to(DEV) for m in models], out=o, backend="triton", **kw
        )
        return o.cpu()
    if backend == "cuda":
        from m3kernels.api import merge_job
        from m3kernels.merge.job import MergeJob
        from m3kernels.merge.recipe import make_recipe

        class Emulated:
            FEATURES = cuda_backend.FEATURES
            l1_sums = staticmethod(cuda_backend.emulate_l1_sums)
            histogram = staticmethod(cuda_backend.emulate_histogram)
            merge = staticmethod(cuda_backend.emulate_merge)
            tie_counts = staticmethod(cuda_backend.emulate_tie_counts)

        kw = dict(kw)
        name = kw.pop("name", "")
        recipe = make_recipe(len(models), has_base=base is not None, **kw)
        return merge_job(MergeJob(name, base, models, out_dtype, recipe, None), Emulated, out)
    return m3kernels.merge_tensors(base, models, out=out, backend="cpu", **kw)


@pytest.mark.parametrize("method", TIES_FAMILY)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_variants_match_the_reference(method, dtype, gen):
    """Every vote x divisor on the CPU kernel against the float64 reference, with a base and as
    deltas only, N = 2, 3, 5 with negative weights, odd sizes, a poisoned output."""
    for n, shape, deltas in [(2, (37, 29), False), (3, (301, 7), True), (5, (13,), False)]:
        deltas = deltas and METHODS[method].family is None  # breadcrumbs_ties: a base
        base, models = _inputs(gen, shape, n, dtype, base=not deltas)
        for var in VARIANTS:
            kw = dict(
                method=method, weights=_weights(n), seed=3, name="w", deltas=deltas, **SPARSITY[method], **var
            )
            got = _merge(base, models, F32, "cpu", **kw)
            ref = reference_merge_tensors(base, models, **kw)
            _check_reference(got, ref, f"{method} {dtype} n={n} {var}")


def test_variants_decide_what_they_say(gen):
    """The variants on a hand-made case: unweighted vs weighted vote, count vs weights divisor."""
    d = [torch.tensor([1.0, 2.0, -3.0]), torch.tensor([-2.0, 1.0, 1.0])]
    w = [1.0, -1.0]

    def m(**kw):
        return m3kernels.merge_tensors(None, d, method="ties", density=1.0, weights=w, deltas=True, **kw)

    # weighted vote: w·d = (1, 2, -3) and (2, -1, -1): sums (3, 1, -4) -> +, +, -
    assert m(normalize=False).tolist() == [1.0 + 2.0, 2.0, -3.0 - 1.0]
    # unweighted: d sums (-1, 3, -2) -> -, +, -; model agrees by sign(d); values w·d
    assert m(vote="unweighted", divide_by="none").tolist() == [2.0, 2.0 - 1.0, -3.0]
    assert m(vote="unweighted", divide_by="count").tolist() == [2.0, (2.0 - 1.0) / 2, -3.0]
    # count: signs (+,-), (+,+), (-,+): sums 0, 2, 0 -> +, +, + (ties to +)
    assert m(vote="count", divide_by="count").tolist() == [1.0, 0.5, -1.0]


@pytest.mark.parametrize("be", ["triton", "cuda"])
@pytest.mark.parametrize("method", TIES_FAMILY + ("magnitude_prune", "task_arithmetic"))
def test_backends_give_the_cpu_bytes(method, be, gen):
    if be == "triton" and not HAVE_TRITON:
        pytest.skip("Triton not usable here")
    if be == "cuda" and not HAVE_CUDA_EXT:
        pytest.skip("CUDA extension not built")
    variants = VARIANTS if method in TIES_FAMILY else [{}]
    for n, shape, dtype, out_dtype, deltas in [(3, (33, 65), BF16, F32, False), (2, (1031,), F16, F16, True)]:
        deltas = deltas and METHODS[method].family is None  # breadcrumbs_ties: a base
        base, models = _inputs(gen, shape, n, dtype, base=not deltas)
        for var in variants:
            kw = dict(method=method, weights=_weights(n), seed=7, name="t", deltas=deltas, **var)
            kw.update(SPARSITY.get(method, dict(density=0.3) if method == "magnitude_prune" else {}))
            want = _merge(base, models, out_dtype, "cpu", **kw)
            got = _merge(base, models, out_dtype, be, **kw)
            assert torch.equal(_bits(got), _bits(want)), f"{method} {var} on {be} vs cpu"


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_magnitude_prune_is_trim_and_sum(dtype, gen):
    """magnitude_prune = ties' trim then a weighted sum (no vote), with a base and as deltas; the
    reference; and the same as task_arithmetic at density 1."""
    base, models = _inputs(gen, (41, 23), 3, dtype)
    w = _weights(3)
    for b, ms, deltas in [(base, models, False), (None, [m - base for m in models], True)]:
        kw = dict(method="magnitude_prune", weights=w, density=0.3, deltas=deltas)
        got = _merge(b, ms, F32, "cpu", **kw)
        _check_reference(got, reference_merge_tensors(b, ms, **kw), f"magnitude_prune {dtype}")
        thr = m3kernels.trim_thresholds(b, ms, method="magnitude_prune", density=0.3, deltas=deltas)
        d = [(m.to(F32) - (0 if b is None else b.to(F32))) for m in ms]
        by_hand = sum(
            float(np.float32(wi)) * torch.where(x.abs() >= t, x, 0.0).to(F64) for wi, x, t in zip(w, d, thr)
        )
        by_hand = by_hand + (0.0 if b is None else b.to(F64))
        _check_reference(got, by_hand, "magnitude_prune by hand")
        full = _merge(b, ms, F32, "cpu", method="magnitude_prune", weights=w, density=1.0, deltas=deltas)
        ta = _merge(b, ms, F32, "cpu", method="task_arithmetic", weights=w, deltas=deltas)
        assert torch.equal(full, ta)
    assert "magnitude_prune" in METHODS and not METHODS["magnitude_prune"].takes("vote")


def test_deltas_equal_explicit_base(gen):
    """deltas=True on δ_i = the merge with base 0 minus nothing: the result is the merged delta."""
    _, models = _inputs(gen, (19, 11), 3, F32)
    zero = torch.zeros_like(models[0])
    for method, kw in [
        ("ties", dict(density=0.5)),
        ("dare_linear", dict(density=0.5)),
        ("task_arithmetic", {}),
    ]:
        a = m3kernels.merge_tensors(None, models, method=method, deltas=True, weights=_weights(3), **kw)
        b = m3kernels.merge_tensors(zero, models, method=method, weights=_weights(3), **kw)
        assert torch.equal(_bits(a), _bits(b)), method


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="ties", vote="majority"), "vote must be one of weighted, unweighted, count"),
        (dict(method="ties", divide_by="mean"), "divide_by must be one of weights, count, none"),
        (dict(method="ties", vote=1), "vote must be one of"),
        (dict(method="ties", divide_by="none", normalize=True), "normalize.*contradicts divide_by"),
        (dict(method="dare_ties", density=0.5, divide_by="count", normalize=False), "contradicts"),
        (dict(method="linear", vote="count"), "vote: method 'linear' does not take it"),
        (dict(method="magnitude_prune", divide_by="count"), "divide_by: method 'magnitude_prune'"),
        (dict(method="slerp", t=0.5, deltas=True), "deltas: method 'slerp' does not take task vectors"),
        (dict(method="ties", deltas="yes"), "deltas must be True or False"),
    ],
)
def test_bad_values(kw, match, gen):
    base, models = _inputs(gen, (5, 3), 2 if kw["method"] != "slerp" else 1, F32)
    with pytest.raises(ValueError, match=match):
        m3kernels.merge_tensors(None if "deltas" in kw else base, models, **kw)


def test_deltas_with_a_base_is_an_error(gen):
    base, models = _inputs(gen, (5, 3), 2, F32)
    with pytest.raises(
        ValueError, match="deltas: with deltas=True the models are task vectors; give base=None"
    ):
        m3kernels.merge_tensors(base, models, method="ties", deltas=True)
    with pytest.raises(ValueError, match="base: method 'ties' needs a base model"):
        m3kernels.merge_tensors(None, models, method="ties")


def test_variants_are_api_only():
    """The registry says mergekit has no such keys: API only (config=False)."""
    for name in TIES_FAMILY:
        m = METHODS[name]
        for key in ("vote", "divide_by"):
            p = m.param(key)
            assert p is not None and not p.config and "mergekit has no such key" in p.doc


def test_through_the_custom_op(gen):
    """vote / divide_by / deltas pass through torch.ops.m3kernels.merge (its generic parameters)
    with the API's bytes, and meta inputs give the output's shape and dtype."""
    from m3kernels import ops

    _, models = _inputs(gen, (41, 23), 3, BF16, base=False)
    kw = dict(
        method="dare_ties", density=0.5, vote="count", divide_by="count", deltas=True, weights=_weights(3)
    )
    want = m3kernels.merge_tensors(None, models, name="w", **kw)
    got = ops.merge_tensors(None, models, name="w", **kw)
    assert torch.equal(_bits(got), _bits(want))
    meta = m3kernels.merge_tensors(None, [m.to("meta") for m in models], name="w", **kw)
    assert meta.is_meta and meta.shape == want.shape and meta.dtype == want.dtype


@pytest.mark.parametrize("be", ["cpu", "triton", "cuda"])
def test_magnitude_prune_exact_k(be, gen):
    """magnitude_prune with trim_ties="k" keeps exactly k = ⌊density·n⌋ of a tensor full of ties."""
    if be == "triton" and not HAVE_TRITON:
        pytest.skip("Triton not usable here")
    if be == "cuda" and not HAVE_CUDA_EXT:
        pytest.skip("CUDA extension not built")
    shape = (53, 37)
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    d = (torch.randint(1, 5, shape, generator=gen).float() * 0.25 * signs).to(BF16)
    for density in (0.3, 0.71):
        kw = dict(method="magnitude_prune", density=density, trim_ties="k", deltas=True, weights=[1.5])
        out = _merge(None, [d], F32, be, **kw)
        assert int((out != 0).sum()) == int(density * d.numel())
        kept = out != 0
        assert torch.equal(out[kept], 1.5 * d.to(F32)[kept])
        assert float(d[~kept].abs().max()) <= float(d[kept].abs().min())
