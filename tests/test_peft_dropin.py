"""The PEFT drop-in (m3kernels/integrations/peft.py) against PEFT itself: every function, fp32,
bf16 and fp16, N = 2 and 3, unequal and negative weights, both sign votes, odd sizes, the density
edge cases, and ``LoraModel.add_weighted_adapter`` with every combination type it routes here.
DARE: PEFT's ``torch.bernoulli`` is replaced by the Philox mask (NumPy reference of the stream)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from m3kernels.integrations import peft as dropin
from m3kernels.merge.philox import dare_keep_mask

from helpers import have_backend

peft_merge = pytest.importorskip("peft.utils.merge_utils")
pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((37, 29), (301, 257))  # the second is above SMALL_TENSOR_NUMEL (the histogram path)
WEIGHTS = {2: [0.7, -1.3], 3: [1.25, -0.4, 0.9]}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes (NaNs compared as NaNs, their payload aside)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    ia = a.masked_fill(nan_a, 0).view(torch.int32 if a.dtype == torch.float32 else torch.int16)
    ib = b.masked_fill(nan_b, 0).view(torch.int32 if b.dtype == torch.float32 else torch.int16)
    assert torch.equal(ia, ib), f"{int((ia != ib).sum())} of {a.numel()} elements differ"


def task_tensors(gen, n, shape, dtype, spread=(0.02, 0.05, 0.01)):
    return [(torch.randn(shape, generator=gen) * spread[i % 3]).to(dtype) for i in range(n)]


class PhiloxBernoulli:
    """Stands in for torch.bernoulli inside PEFT: call j (one per task tensor) gets the Philox mask
    of model j % n of call j // n, named ``name`` or, like the drop-in's, ``peft.<call>``."""

    def __init__(self, n, density, seed=0, name=None):
        self.n, self.density, self.seed, self.name, self.j = n, density, seed, name, 0

    def __call__(self, probs, *args, **kwargs):
        call, i = divmod(self.j, self.n)
        self.j += 1
        name = self.name if self.name is not None else f"peft.{call}"
        return dare_keep_mask(self.seed, name, i, probs.shape, self.density).to(probs.dtype)


def peft_call(monkeypatch, fn, tensors, weights, *args, bern=None):
    with monkeypatch.context() as m:
        if bern is not None:
            m.setattr(torch, "bernoulli", bern)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(peft_merge, fn)(tensors, weights, *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (2, 3))
@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_and_magnitude_prune(gen, dtype, n, shape):
    ts = task_tensors(gen, n, shape, dtype)
    w = torch.tensor(WEIGHTS[n])
    same(dropin.task_arithmetic(ts, w), peft_merge.task_arithmetic(ts, w))
    for density in (0.3, 0.05):
        same(dropin.magnitude_prune(ts, w, density), peft_merge.magnitude_prune(ts, w, density))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (2, 3))
@pytest.mark.parametrize("vote", ("total", "frequency"))
def test_ties(gen, dtype, n, vote):
    for shape in SHAPES:
        ts = task_tensors(gen, n, shape, dtype)
        w = torch.tensor(WEIGHTS[n])
        same(dropin.ties(ts, w, 0.3, vote), peft_merge.ties(ts, w, 0.3, vote))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (2, 3))
@pytest.mark.parametrize("density", (0.5, 0.25, 0.3))  # powers of two fused, 0.3 eager
def test_dare(monkeypatch, gen, dtype, n, density):
    ts = task_tensors(gen, n, (53, 41), dtype)
    w = torch.tensor(WEIGHTS[n])
    ours = dropin.dare_linear(ts, w, density, seed=9, name="layer.a")
    same(ours, peft_call(monkeypatch, "dare_linear", ts, w, density, bern=_bern(n, density, 9, "layer.a")))
    for vote in ("total", "frequency"):
        ours = dropin.dare_ties(ts, w, density, vote, seed=9, name="layer.b")
        ref = peft_call(monkeypatch, "dare_ties", ts, w, density, vote, bern=_bern(n, density, 9, "layer.b"))
        same(ours, ref)


def _bern(n, density, seed, name):
    return PhiloxBernoulli(n, density, seed, name)


def test_dare_masks_are_the_kernels_and_the_reference_stream(gen):
    ts = task_tensors(gen, 3, (301, 257), torch.float32)
    masks = dropin._dare_masks(ts, 0.37, 5, "m")
    for i, m in enumerate(masks):
        assert torch.equal(m.bool(), dare_keep_mask(5, "m", i, ts[0].shape, 0.37))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_paths_are_taken(gen, monkeypatch, dtype):
    """The fused cases really run the kernel (a broken eager path would not hide in them), and
    give PEFT's bytes: both votes, DARE at any density > 0 (division rounded to the dtype)."""
    ts = task_tensors(gen, 3, (37, 29), dtype)
    w = torch.tensor(WEIGHTS[3])
    cuts = dropin._magnitude_cuts(ts, 0.3)
    unique = all(exact for _, _, exact in cuts)  # bf16 / fp16: a tie at the cut is likely
    want = {}
    for vote in ("total", "frequency"):
        want["ties", vote] = peft_merge.ties(ts, w, 0.3, vote) if unique else None
        for d in (0.25, 0.3, 0.77):
            want["dare_ties", vote, d] = peft_call(
                monkeypatch, "dare_ties", ts, w, d, vote, bern=_bern(3, d, 1, f"y{d}")
            )
    for d in (0.5, 0.3, 0.77):
        want["dare_linear", d] = peft_call(monkeypatch, "dare_linear", ts, w, d, bern=_bern(3, d, 1, f"x{d}"))
    with monkeypatch.context() as m:
        m.setattr(dropin, "_combine", lambda *a, **k: pytest.fail("eager path taken"))
        got = {}
        same(dropin.task_arithmetic(ts, w), peft_merge.task_arithmetic(ts, w))
        for vote in ("total", "frequency"):
            if unique:
                got["ties", vote] = dropin.ties(ts, w, 0.3, vote)
            for d in (0.25, 0.3, 0.77):
                got["dare_ties", vote, d] = dropin.dare_ties(ts, w, d, vote, seed=1, name=f"y{d}")
        for d in (0.5, 0.3, 0.77):
            got["dare_linear", d] = dropin.dare_linear(ts, w, d, seed=1, name=f"x{d}")
        with pytest.warns(UserWarning, match="no pruning"):
            for vote in ("total", "frequency"):
                same(dropin.ties(ts, w, 1.0, vote), peft_call(monkeypatch, "ties", ts, w, 1.0, vote))
    for key, value in got.items():
        same(value, want[key])


def test_against_float64(gen):
    ts = task_tensors(gen, 3, (37, 29), torch.float32)
    w = torch.tensor(WEIGHTS[3])
    ref = sum(float(wi) * t.double() for wi, t in zip(w, ts))
    scale = sum(abs(float(wi)) * t.double().abs() for wi, t in zip(w, ts))
    err = (dropin.task_arithmetic(ts, w).double() - ref).abs()
    assert bool((err <= 4 * 2.0**-24 * scale).all())  # float32 products and sums: a few roundings


@pytest.mark.parametrize("fn", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", (0.0, 1.0, 1.5))
def test_density_edges(monkeypatch, gen, fn, density):
    ts = task_tensors(gen, 2, (19, 7), torch.bfloat16)
    w = torch.tensor(WEIGHTS[2])
    bern = _bern(2, density, 0, "e") if fn.startswith("dare") else None
    ref = peft_call(monkeypatch, fn, ts, w, density, bern=bern)
    kw = dict(seed=0, name="e") if fn.startswith("dare") else {}
    if density >= 1:
        with pytest.warns(UserWarning, match="no pruning"):
            ours = getattr(dropin, fn)(ts, w, density, **kw)
    else:
        ours = getattr(dropin, fn)(ts, w, density, **kw)
    same(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs(monkeypatch, gen, dtype):
    """NaN and inf where PEFT gives them (a trimmed or dropped inf is inf · 0 = NaN in PEFT)."""
    ts = task_tensors(gen, 3, (40, 30), dtype)
    ts[0][0, 0], ts[1][3, 4], ts[2][5, 6], ts[2][7, 7] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        float("nan"),
    )
    w = torch.tensor(WEIGHTS[3])
    same(dropin.task_arithmetic(ts, w), peft_merge.task_arithmetic(ts, w))
    for density in (0.3, 0.0005):  # 0.0005: k = 0, everything trimmed
        same(dropin.magnitude_prune(ts, w, density), peft_merge.magnitude_prune(ts, w, density))
        for vote in ("total", "frequency"):
            same(dropin.ties(ts, w, density, vote), peft_merge.ties(ts, w, density, vote))
    ours = dropin.dare_linear(ts, w, 0.5, seed=2, name="nf")
    same(ours, peft_call(monkeypatch, "dare_linear", ts, w, 0.5, bern=_bern(3, 0.5, 2, "nf")))


def test_float64_tensors_and_weights_run_eager_and_agree(gen):
    ts = task_tensors(gen, 3, (37, 29), torch.float64)
    for w in (torch.tensor(WEIGHTS[3]), torch.tensor(WEIGHTS[3], dtype=torch.float64)):
        same64(dropin.task_arithmetic(ts, w), peft_merge.task_arithmetic(ts, w))
        same64(dropin.magnitude_prune(ts, w, 0.3), peft_merge.magnitude_prune(ts, w, 0.3))
        same64(dropin.ties(ts, w, 0.3, "frequency"), peft_merge.ties(ts, w, 0.3, "frequency"))
    ts32 = task_tensors(gen, 2, (37, 29), torch.bfloat16)
    w64 = torch.tensor(WEIGHTS[2], dtype=torch.float64)
    same64(dropin.magnitude_prune(ts32, w64, 0.3), peft_merge.magnitude_prune(ts32, w64, 0.3))


def same64(a, b):
    assert a.dtype == b.dtype == torch.float64 and torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_ties_at_the_threshold_take_topks_pick(gen, monkeypatch):
    """Quantized values: many equal magnitudes at the k-th, so the mask must be torch.topk's."""
    ts = [torch.randint(-4, 5, (61, 43), generator=gen).float() * 0.125 for _ in range(3)]
    w = torch.tensor(WEIGHTS[3])
    calls = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor, "topk", lambda self, *a, **k: calls.append(1) or real_topk(self, *a, **k)
    )
    ours = dropin.magnitude_prune(ts, w, 0.3)
    assert len(calls) == 3  # every tensor tied at its cut
    monkeypatch.undo()
    same(ours, peft_merge.magnitude_prune(ts, w, 0.3))
    same(dropin.ties(ts, w, 0.3), peft_merge.ties(ts, w, 0.3))


def test_inputs_requiring_grad_keep_peft_autograd(gen):
    ts = [t.requires_grad_() for t in task_tensors(gen, 2, (19, 7), torch.float32)]
    w = torch.tensor(WEIGHTS[2])
    ours, ref = dropin.magnitude_prune(ts, w, 0.5), peft_merge.magnitude_prune(ts, w, 0.5)
    assert ours.requires_grad and ref.requires_grad
    same(ours.detach(), ref.detach())
    (g_ours,) = torch.autograd.grad(ours.sum(), ts[0])
    (g_ref,) = torch.autograd.grad(ref.sum(), ts[0])
    assert torch.equal(g_ours, g_ref)
    with torch.no_grad():
        assert not dropin.ties(ts, w, 0.5).requires_grad


def test_bad_arguments():
    ts = [torch.zeros(3, 3), torch.zeros(3, 3)]
    with pytest.raises(ValueError, match="density"):
        dropin.ties(ts, torch.tensor([1.0, 1.0]), -0.1)
    with pytest.raises(ValueError, match="majority_sign_method"):
        dropin.ties(ts, torch.tensor([1.0, 1.0]), 0.5, "median")
    with pytest.raises(ValueError, match="weights"):
        dropin.task_arithmetic(ts, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        dropin.task_arithmetic([torch.zeros(3), torch.zeros(4)], torch.tensor([1.0, 1.0]))


def test_more_models_than_fused_use_eager_and_agree(gen):
    ts = task_tensors(gen, 5, (37, 29), torch.float32)
    w = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5])
    same(dropin.task_arithmetic(ts, w), peft_merge.task_arithmetic(ts, w))
    same(dropin.magnitude_prune(ts, w, 0.4), peft_merge.magnitude_prune(ts, w, 0.4))


# ---------------------------------------------------------------- add_weighted_adapter
COMBINATIONS = [
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
]


def _lora_model(dtype):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(33, 47), torch.nn.ReLU(), torch.nn.Linear(47, 21)).to(dtype)
    cfg = dict(r=8, lora_alpha=16, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**cfg), adapter_name="x1")
    for name in ("x2", "x3"):
        model.add_adapter(name, LoraConfig(**cfg))
    return model


def _merged_factors(model, name):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(
    "combination, vote",  # the sign vote method only matters for the TIES combinations
    [(c, v) for c in COMBINATIONS for v in (("total", "frequency") if "ties" in c else ("total",))],
)
@pytest.mark.parametrize("n", (2, 3))
def test_add_weighted_adapter(monkeypatch, dtype, combination, vote, n):
    adapters, weights = ["x1", "x2", "x3"][:n], [0.8, -0.6, 1.3][:n]
    density = 0.5 if n == 3 else 0.3  # DARE: fused (a power of two) and eager
    kw = dict(density=density, majority_sign_method=vote) if combination != "linear" else {}
    model = _lora_model(dtype)
    with monkeypatch.context() as m:
        m.setattr(torch, "bernoulli", PhiloxBernoulli(n, density, seed=11))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(adapters, weights, "peft_ref", combination_type=combination, **kw)
    ref = _merged_factors(model, "peft_ref")
    with dropin.patched(seed=11):
        model.add_weighted_adapter(adapters, weights, "ours", combination_type=combination, **kw)
    assert not dropin.installed()
    ours = _merged_factors(model, "ours")
    assert len(ref) == len(ours) == 4
    for k, v in ref.items():
        same(ours[k.replace("peft_ref", "ours")], v)


def test_install_and_uninstall_restore_peft():
    import peft.tuners.lora.model as lora_model

    orig = lora_model.ties
    dropin.install()
    try:
        assert lora_model.ties is dropin.ties and peft_merge.dare_ties is dropin.dare_ties
    finally:
        dropin.uninstall()
    assert lora_model.ties is orig and peft_merge.ties is not dropin.ties


def test_example_runs(capsys):
    import runpy

    mod = runpy.run_path(str(Path(__file__).resolve().parent.parent / "python" / "peft_dropin_example.py"))
    assert mod["main"](["--rows", "64", "--cols", "96"]) == 0
    out = capsys.readouterr().out
    assert "identical to PEFT's: True" in out and "identical: False" not in out


def test_dare_fp16_overflow_is_pefts(monkeypatch, gen):
    """PEFT's x / density rounded to fp16 overflows to inf for |x| > 65504·density: the fused
    path (dare_div) gives the same infs, and the vote / count divisor treats them as PEFT does."""
    ts = task_tensors(gen, 2, (23, 17), torch.float16)
    ts[0][0, :5] = torch.tensor([60000.0, -50000.0, 30000.0, 1.0, -20000.0], dtype=torch.float16)
    ts[1][0, :5] = torch.tensor([-40000.0, 50000.0, 0.5, -65000.0, 20000.0], dtype=torch.float16)
    w = torch.tensor(WEIGHTS[2])
    with monkeypatch.context() as m:
        m.setattr(dropin, "_combine", lambda *a, **k: pytest.fail("eager path taken"))
        ours = dropin.dare_linear(ts, w, 0.3, seed=4, name="o")
        ours_ties = {v: dropin.dare_ties(ts, w, 0.3, v, seed=4, name="p") for v in ("total", "frequency")}
    assert torch.isinf(ours).any() or torch.isnan(ours).any()
    same(ours, peft_call(monkeypatch, "dare_linear", ts, w, 0.3, bern=_bern(2, 0.3, 4, "o")))
    for v, got in ours_ties.items():
        same(got, peft_call(monkeypatch, "dare_ties", ts, w, 0.3, v, bern=_bern(2, 0.3, 4, "p")))
