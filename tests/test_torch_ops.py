"""The torch.library ops (m3kernels/ops.py): the bytes of merge_tensors, opcheck, torch.compile
with fullgraph (one graph), FakeTensorMode and meta tensors, non-contiguous inputs, gradients."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from m3kernels import ops
from m3kernels.api import merge_tensors as api_merge

from helpers import have_backend, make_inputs

pytestmark = pytest.mark.skipif(not have_backend("cpu"), reason="the CPU extension is not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CASES = [
    dict(method="linear", weights=[0.7, 0.3, 1.1]),
    dict(method="task_arithmetic", weights=[1.0, -0.5, 2.0], lambda_=0.8),
    dict(method="ties", density=0.3, weights=[1.0, -0.5, 2.0]),
    dict(method="dare_linear", density=0.6, seed=7, name="layer.w"),
    dict(method="dare_ties", drop_rate=[0.3, 0.5, 0.2], rescale="l1", seed=2**63 + 5, name="x"),
    dict(method="ties_dare", density=0.4, drop_rate=0.25, mix_ratios=[0.2, 0.5, 0.3]),
    dict(method="ties", density=0.5, thresholds=[None, 0.004, float("inf")]),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def assert_same_bytes(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


# method-specific parameters (the generic channel of the schema): (number of models, arguments)
METHOD_CASES = [
    (1, dict(method="slerp", t=0.3)),
    (1, dict(method="nearswap", t=0.001)),
    (3, dict(method="breadcrumbs", density=0.8, gamma=[0.01, 0.02, 0.05])),
    (3, dict(method="karcher", max_iter=5, tol=1e-6)),
    (3, dict(method="multislerp", normalize_weights=False, weights=[0.2, 0.3, 0.5])),
    (3, dict(method="model_stock", filter_wise=True)),
    (3, dict(method="ram", epsilon=1e-4)),
    (2, dict(method="nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True, weights=[0.4, 0.6])),
    (1, dict(method="passthrough", scale=0.5)),
]


@pytest.mark.parametrize("case", range(len(METHOD_CASES)), ids=[c["method"] for _, c in METHOD_CASES])
def test_method_parameters_pass_through(gen, case):
    from m3kernels.merge.registry import METHODS

    n, kw = METHOD_CASES[case]
    if kw["method"] not in METHODS:
        pytest.skip(f"{kw['method']} is not registered in this checkout")
    base, models = make_inputs((37, 29), n, (torch.bfloat16, [torch.float32]), gen)
    assert_same_bytes(ops.merge_tensors(base, models, **kw), api_merge(base, models, **kw))
    meta = torch.empty(37, 29, device="meta", dtype=torch.bfloat16)
    assert ops.merge_tensors(meta, [meta] * n, **kw).shape == (37, 29)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_op_equals_merge_tensors(gen, dtype, case):
    kw = CASES[case]
    base, models = make_inputs((37, 29), 3, (dtype, [dtype, torch.float32]), gen)
    ref = api_merge(base, models, **kw)
    got = ops.merge_tensors(base, models, **kw)
    assert_same_bytes(got, ref)
    out = torch.full_like(ref, float("nan"))  # poisoned
    assert ops.merge_tensors(base, models, out=out, **kw) is out
    assert_same_bytes(out, ref)


def test_linear_against_float64(gen):
    base, models = make_inputs((11, 13), 2, (torch.float32, [torch.float32]), gen)
    got = ops.merge_tensors(None, models, method="linear", weights=[0.25, 0.75])
    ref = 0.25 * models[0].double() + 0.75 * models[1].double()
    assert torch.allclose(got.double(), ref, rtol=3e-7, atol=0)


def test_non_contiguous_inputs(gen):
    base, models = make_inputs((23, 31), 2, (torch.float32, [torch.bfloat16]), gen)
    bt, mt = base.t(), [m.t() for m in models]
    assert not bt.is_contiguous()
    ref = api_merge(bt.contiguous(), [m.contiguous() for m in mt], method="ties", density=0.4)
    assert_same_bytes(ops.merge_tensors(bt, mt, method="ties", density=0.4), ref)


@pytest.mark.parametrize("op", ["merge", "merge_out"])
def test_opcheck(gen, op):
    base, models = make_inputs((17, 9), 3, (torch.bfloat16, [torch.float32, torch.float16]), gen)
    args = ops.encode(method="dare_ties", density=0.5, weights=[1.0, 2.0, -1.0], seed=4, name="t")
    if op == "merge":
        torch.library.opcheck(torch.ops.m3kernels.merge.default, (base, models, *args))
        lin = ops.encode(method="linear", weights=0.5, out_dtype=torch.float16)
        torch.library.opcheck(torch.ops.m3kernels.merge.default, (None, models, *lin))
        from m3kernels.merge.registry import METHODS

        if "breadcrumbs" in METHODS:  # a method-specific parameter through the generic channel
            bc = ops.encode(method="breadcrumbs", density=0.8, gamma=[0.01, 0.02, 0.05])
            torch.library.opcheck(torch.ops.m3kernels.merge.default, (base, models, *bc))
    else:
        out = torch.empty(17, 9, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.m3kernels.merge_out.default, (base, models, *args, out))


def _merge_then_scale(b, x, y, z):
    m = ops.merge_tensors(b, [x, y, z], method="ties", density=0.3, weights=[1.0, -0.5, 2.0], name="w")
    return m * 2 + 1


def test_compile_fullgraph_one_graph(gen):
    base, models = make_inputs((37, 29), 3, (torch.float32, [torch.float32]), gen)
    cnt = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(_merge_then_scale, fullgraph=True, backend=cnt)
    got = compiled(base, *models)
    assert cnt.frame_count == 1
    ref = api_merge(base, models, method="ties", density=0.3, weights=[1.0, -0.5, 2.0], name="w")
    assert_same_bytes(got, ref * 2 + 1)


def test_compile_inductor_and_out(gen):
    base, models = make_inputs((19, 21), 2, (torch.bfloat16, [torch.bfloat16]), gen)

    def f(b, x, y, out):
        ops.merge_tensors(b, [x, y], method="dare_linear", density=0.5, seed=3, name="w", out=out)
        return out.float() * 3

    out = torch.full((19, 21), float("nan"), dtype=torch.bfloat16)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(base, *models, out)
    ref = api_merge(base, models, method="dare_linear", density=0.5, seed=3, name="w")
    assert_same_bytes(out, ref)
    assert torch.equal(got, ref.float() * 3)


def test_meta_tensors_shape_and_dtype():
    b = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    y = ops.merge_tensors(b, [b, b.float()], method="ties")
    assert (y.shape, y.dtype, y.device.type) == ((5, 7), torch.bfloat16, "meta")
    y = ops.merge_tensors(None, [b.float(), b], method="linear")
    assert y.dtype == torch.float32
    y = ops.merge_tensors(b, [b, b], method="task_arithmetic", out_dtype=torch.float16)
    assert y.dtype == torch.float16


def test_fake_tensor_mode():
    with FakeTensorMode():
        b = torch.empty(6, 4, dtype=torch.float16)
        y = ops.merge_tensors(b, [b, b, b], method="dare_ties", density=0.5, out_dtype=torch.float32)
        assert isinstance(y, FakeTensor)
        assert (y.shape, y.dtype) == ((6, 4), torch.float32)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(method="ties", density=2.0), "density"),
        (dict(method="nope"), "method"),
        (dict(method="ties", weights=[1.0, 2.0, 3.0]), "weights"),
        (dict(method="linear", density=0.5), "density"),
    ],
)
def test_bad_arguments_raise_valueerror_at_trace_time(kw, msg):
    b = torch.empty(3, 3, device="meta")
    with pytest.raises(ValueError, match=msg):
        ops.merge_tensors(b, [b, b], **kw)


def test_bad_shapes_on_meta():
    b = torch.empty(3, 3, device="meta")
    with pytest.raises(ValueError, match="shape"):
        ops.merge_tensors(b, [b, torch.empty(3, 4, device="meta")], method="ties")
    with pytest.raises(ValueError, match="base"):
        ops.merge_tensors(None, [b, b], method="ties")


def test_result_never_requires_grad(gen):
    base, models = make_inputs((8, 8), 2, (torch.float32, [torch.float32]), gen)
    models = [m.requires_grad_() for m in models]
    y = ops.merge_tensors(base, models, method="ties", density=0.5)
    assert not y.requires_grad
    ref = api_merge(base, [m.detach() for m in models], method="ties", density=0.5)
    assert_same_bytes(y, ref)


def test_encode_decode_round_trip():
    kw = dict(
        method="ties",
        weights=0.5,
        density=[0.1, 0.2],
        normalize=False,
        rescale="L1",
        thresholds=[None, float("inf")],
        out_dtype=torch.bfloat16,
        seed=2**64 - 1,
        mix_ratios=0.3,
    )
    got = ops.decode(*ops.encode(**kw))
    assert got["weights"] == 0.5 and got["density"] == [0.1, 0.2] and got["mix_ratios"] == 0.3
    assert got["normalize"] is False and got["rescale"] == "l1" and got["thresholds"] == [None, float("inf")]
    assert got["out_dtype"] is torch.bfloat16 and got["seed"] == 2**64 - 1
    assert "normalize" not in ops.decode(*ops.encode(method="ties"))
    extra = ops.decode(
        *ops.encode(method="karcher", max_iter=7, tol=1e-6, filter_wise=True, gamma=[0.1, 0.2])
    )
    assert extra["max_iter"] == 7 and isinstance(extra["max_iter"], int) and extra["tol"] == 1e-6
    assert extra["filter_wise"] is True and extra["gamma"] == [0.1, 0.2]
    with pytest.raises(ValueError, match="seed"):
        ops.encode(method="ties", seed=-1)
    with pytest.raises(ValueError, match="rescale"):
        ops.encode(method="dare_ties", rescale="sqrt")
    assert ops.decode(*ops.encode(method="dare_ties", rescale="none"))["rescale"] is False
    with pytest.raises(ValueError, match="weights"):
        ops.encode(method="ties", weights="heavy")
    with pytest.raises(ValueError, match="thresholds"):
        ops.encode(method="ties", thresholds=[float("nan"), 0.1])


def test_compile_dynamic_shapes_and_scalars(gen):
    """dynamic=True: symbolic shapes and scalar arguments that change; fullgraph holds (a float
    argument is specialized by dynamo, so a new density recompiles: one graph per compile)."""

    def f(b, x, y, density, seed):
        return ops.merge_tensors(b, [x, y], method="dare_ties", density=density, seed=seed, name="w") + 1

    cnt = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=cnt)
    for shape, density, seed in (((7, 5), 0.5, 1), ((9, 11), 0.3, 2), ((13, 3), 0.7, 2**40)):
        base, models = make_inputs(shape, 2, (torch.float32, [torch.bfloat16]), gen)
        ref = api_merge(base, models, method="dare_ties", density=density, seed=seed, name="w") + 1
        assert_same_bytes(compiled(base, *models, density, seed), ref)
    assert 1 <= cnt.frame_count <= 3


def test_torch_export(gen):
    class Merge(torch.nn.Module):
        def forward(self, b, x, y):
            return ops.merge_tensors(b, [x, y], method="ties", density=0.3, weights=[1.0, 0.5], name="e") * 2

    base, models = make_inputs((9, 7), 2, (torch.float32, [torch.float32]), gen)
    ep = torch.export.export(Merge(), (base, *models))
    text = str(ep.graph_module.code) + "".join(str(m.code) for m in ep.graph_module.modules())
    assert "m3kernels.merge" in text
    ref = api_merge(base, models, method="ties", density=0.3, weights=[1.0, 0.5], name="e") * 2
    assert_same_bytes(ep.module()(base, *models), ref)


# ---------------------------------------------------------------- m3kernels.merge_tensors itself
# (m3kernels/api.py routes calls under torch.compile and on meta / fake tensors to the op)


@pytest.mark.parametrize("fullgraph", (True, False))
def test_api_merge_tensors_compiles_to_one_graph(gen, fullgraph):
    import m3kernels

    base, models = make_inputs((37, 29), 2, (torch.bfloat16, [torch.float32]), gen)

    def f(b, x, y):
        return (
            m3kernels.merge_tensors(b, [x, y], method="ties", density=0.3, weights=[1.0, -0.5], name="w") * 2
        )

    cnt = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=fullgraph, backend=cnt)(base, *models)
    assert cnt.frame_count == 1  # one graph (it was 11 before the op)
    ref = api_merge(base, models, method="ties", density=0.3, weights=[1.0, -0.5], name="w")
    assert_same_bytes(got, ref * 2)


def test_api_merge_tensors_on_meta_and_fake_tensors():
    b = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    y = api_merge(b, [b, b.float()], method="ties")
    assert (y.shape, y.dtype, y.device.type) == ((5, 7), torch.bfloat16, "meta")
    with pytest.raises(ValueError, match="density"):
        api_merge(b, [b], method="ties", density=3.0)
    with FakeTensorMode():
        f = torch.empty(6, 4, dtype=torch.float16)
        y = api_merge(f, [f, f], method="dare_linear", density=0.5, out_dtype=torch.float32)
        assert isinstance(y, FakeTensor) and (y.shape, y.dtype) == ((6, 4), torch.float32)
