"""The CPU kernels' block grid follows the inputs' cache-line phase (csrc/cpu/variant_impl.h,
``line_grid``): stage B and stage A's counts start their blocks where the first input is on a
64-byte line. Safetensors data is only 8-byte aligned, so real inputs start anywhere; the bytes
merged must not depend on it. Every case runs on inputs placed 0..62 bytes past a line (all at
one phase, as one checkpoint family is, and at different phases) and must give the bits of the
same merge on aligned copies, with a poisoned output, for sizes past the grid's 4-block minimum.
"""

import pytest
import torch

import m3kernels

from cases import DTYPE_CASES, FAMILY_CASES, METHOD_CASES, family_kwargs, kwargs_for
from helpers import have_backend, make_inputs

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

ROWS, COLS = 881, 7  # 6167 elements: > 4 blocks of 1024, so the grid moves; odd: a partial vector


def placed(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` whose data starts ``offset`` bytes past a 64-byte line."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 128, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 64 + offset
    out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == offset
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    ia, ib = a.view(ints[a.dtype])[~nan_a], b.view(ints[b.dtype])[~nan_b]
    bad = int((ia != ib).sum())
    assert bad == 0, f"{what}: {bad} of {a.numel()} elements differ"


def offsets_for(base, models, spread: bool) -> list[int]:
    """Byte offsets of [base, *models]: one shared phase, or a different one per tensor."""
    tensors = ([base] if base is not None else []) + list(models)
    size = max(t.element_size() for t in tensors)
    if not spread:
        return [16] * len(tensors)  # every l13x2 file's phase
    return [(8 + 22 * i) // size * size % 64 for i in range(len(tensors))]


def run(base, models, kw, out_dtype, offsets=None) -> torch.Tensor:
    if offsets is not None:
        tensors = ([base] if base is not None else []) + list(models)
        moved = [placed(t, o - o % t.element_size()) for t, o in zip(tensors, offsets)]
        base, models = (moved[0], moved[1:]) if base is not None else (None, moved)
    out = torch.full(models[0].shape, float("nan"), dtype=out_dtype)
    kw = {"seed": 7, **kw}
    m3kernels.merge_tensors(base, models, backend="cpu", out=out, name="layers.0.w", **kw)
    return out


@pytest.mark.parametrize("spread", [False, True], ids=["one_phase", "spread"])
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_task_vector_methods_ignore_the_phase(case, dtype_case, spread):
    gen = torch.Generator().manual_seed(hash((case, dtype_case, spread)) % 2**31)
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    n = 3
    base, models = make_inputs((ROWS, COLS), n, (base_dt, model_dts), gen)
    kw = kwargs_for(case, n)
    want = run(base, models, kw, out_dt)
    got = run(base, models, kw, out_dt, offsets_for(base, models, spread))
    same_bits(got, want, f"{case} {dtype_case}")


FAMILY = [(c, n) for c, (_, ns) in FAMILY_CASES.items() for n in ns if c != "passthrough"]


@pytest.mark.parametrize("spread", [False, True], ids=["one_phase", "spread"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("case,n", FAMILY)
def test_family_methods_ignore_the_phase(case, n, dtype, spread):
    gen = torch.Generator().manual_seed(hash((case, n, dtype, spread)) % 2**31)
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype]
    base, models = make_inputs((ROWS, COLS), n, (base_dt, model_dts), gen)
    kw = family_kwargs(case, n)
    want = run(base, models, kw, out_dt)
    got = run(base, models, kw, out_dt, offsets_for(base, models, spread))
    same_bits(got, want, f"{case} n={n} {dtype}")


@pytest.mark.parametrize("offset", [2, 8, 16, 40, 62])
@pytest.mark.parametrize(
    "kw",
    [
        dict(method="ties", density=0.3, trim_ties="k"),  # the fixed tie blocks
        dict(method="della", density=0.5, epsilon=0.1),
        dict(method="sce", select_topk=0.3),
        dict(method="arcee_fusion"),
        dict(method="linear"),  # no base: model 0 sets the phase
    ],
    ids=["ties_k", "della", "sce_select", "arcee_fusion", "linear_no_base"],
)
def test_more_methods_at_every_phase(kw, offset):
    gen = torch.Generator().manual_seed(offset)
    n = 1 if kw["method"] == "arcee_fusion" else 2
    base, models = make_inputs((ROWS, COLS), n, (torch.bfloat16, [torch.bfloat16]), gen)
    if kw["method"] == "linear":
        base = None
    want = run(base, models, kw, torch.bfloat16)
    count = len(models) + (base is not None)
    got = run(base, models, kw, torch.bfloat16, [offset] * count)
    same_bits(got, want, f"{kw} at +{offset} B")
