"""The benchmark's eager baselines of nuslerp, multislerp, karcher, model_stock and ramplus_tl
agree with the package's fused merges (float32 inputs, fresh random tensors, odd sizes): the
speed-up column compares the same math."""

import pytest
import torch

import m3kernels
from m3kernels.benchmark.eager import eager_merge, eager_supported

CASES = [
    ("nuslerp", {"weights": [1.0, 3.0]}),
    ("nuslerp", {"weights": [2.0, 1.0], "nuslerp_flatten": False}),
    ("nuslerp", {"weights": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {"weights": [1.0, 2.0, 0.5]}),
    ("karcher", {}),
    ("karcher", {"max_iter": 3, "tol": 1e-6}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5, "epsilon": 1e-3}),
]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_eager_family_matches_fused(method, kw):
    g = torch.Generator().manual_seed(hash((method, len(kw))) % 2**31)
    shape = (37, 53)
    base = torch.randn(shape, generator=g) * 0.02
    n = 3 if method in ("multislerp", "karcher", "model_stock", "ramplus_tl") else 2
    models = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(n)]
    assert eager_supported(method, kw) == ""
    ours = m3kernels.merge_tensors(base, models, method=method, backend="cpu", **kw)
    eager = eager_merge(base, models, method=method, **kw)
    assert eager.dtype == ours.dtype and eager.shape == ours.shape
    scale = float(ours.abs().max())
    err = float((eager.double() - ours.double()).abs().max())
    assert err <= 2e-5 * scale, (method, kw, err, scale)
    # and it is not trivially the base or a plain average
    assert float((ours.double() - base.double()).abs().max()) > 10 * err


def test_eager_family_rejects_m3():
    base = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="M3"):
        eager_merge(base, [base + 1, base + 2], method="model_stock", mixup_alpha=0.5)


SPARSE_CASES = [
    ("sce", {}),
    ("sce", {"select_topk": 0.3}),
    ("arcee_fusion", {}),
    ("magnitude_prune", {"weights": [1.0, 0.5], "density": 0.3}),
]


@pytest.mark.parametrize("method,kw", SPARSE_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SPARSE_CASES)])
def test_eager_sparsify_matches_fused(method, kw):
    """sce, arcee_fusion, magnitude_prune: the same masks (no ties in float32 random data), the
    same combine up to float32 rounding."""
    g = torch.Generator().manual_seed(7 + len(kw))
    shape = (29, 41)
    base = torch.randn(shape, generator=g) * 0.02
    n = 1 if method == "arcee_fusion" else 2
    models = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(n)]
    if method == "arcee_fusion":  # a few strongly changed elements, so the mask is not all
        models[0].view(-1)[::17] += 0.05
    ours = m3kernels.merge_tensors(base, models, method=method, backend="cpu", **kw)
    eager = eager_merge(base, models, method=method, **kw)
    scale = float((ours.double() - base.double()).abs().max())
    err = float((eager.double() - ours.double()).abs().max())
    assert err <= 1e-5 * scale, (method, kw, err, scale)
    assert scale > 1e-4


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_eager_della_statistics(method):
    """DELLA's eager masks are torch.bernoulli's: the kept fraction and the output's moments
    agree with the fused merge (Philox masks) within sampling error."""
    g = torch.Generator().manual_seed(11)
    shape = (64, 257)
    base = torch.randn(shape, generator=g) * 0.02
    models = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(2)]
    kw = {"weights": [1.0, 0.7], "density": 0.4, "epsilon": 0.1}
    ours = (
        m3kernels.merge_tensors(base, models, method=method, backend="cpu", seed=3, **kw).double()
        - base.double()
    )
    eager = eager_merge(base, models, method=method, seed=3, **kw).double() - base.double()
    frac_o, frac_e = float((ours != 0).double().mean()), float((eager != 0).double().mean())
    assert abs(frac_o - frac_e) < 0.02, (frac_o, frac_e)
    assert abs(float(ours.abs().mean()) / float(eager.abs().mean()) - 1) < 0.05
    assert not torch.equal(ours, eager)  # different random streams: not the same bits
