"""``torch.library`` custom ops: one merge as one graph node (``torch.ops.m3kernels.*``).

Two ops, registered for CPU and CUDA tensors with fake (meta) implementations:

* ``m3kernels::merge(Tensor? base, Tensor[] models, str spec) -> Tensor``
* ``m3kernels::merge_out(Tensor? base, Tensor[] models, str spec, Tensor(a!) out) -> ()``

``spec`` is a JSON object holding the keyword arguments of :func:`m3kernels.api.merge_tensors`
(``method`` required; ``out_dtype`` as a name such as ``"bfloat16"``; ``thresholds`` entries may be
``null`` or ``Infinity``). :func:`merge_tensors` here has the signature of the API function and
builds the spec for you. The whole merge, stage A (L1 sums, exact trim thresholds: Python and
NumPy on the host) and stage B (the fused kernel), runs *inside* the op, so ``torch.compile``
sees one opaque node: ``fullgraph=True`` works and a compiled function calling it is one graph.
The fake implementation checks the arguments the way the API does (``ValueError`` at trace
time) and returns an empty tensor of the output's shape, dtype and device, so FakeTensorMode
and meta tensors work.

Gradients: a merge is not differentiable (the trim and the sign vote are piecewise constant
selections, the kernels have no backward). :func:`merge_tensors` runs the op under
``torch.no_grad()``, so its result never requires grad, as :func:`m3kernels.api.merge_tensors`
always behaved; calling the raw op on tensors that require grad gives an output whose
backward raises PyTorch's "no autograd formula" error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from m3kernels.merge.kernel_params import DTYPE_CODES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_KEYS = (
    "method",
    "weights",
    "density",
    "drop_rate",
    "normalize",
    "rescale",
    "lambda_",
    "mix_ratios",
    "mixup_alpha",
    "seed",
    "name",
    "out_dtype",
    "backend",
    "thresholds",
)


def _plain(value, arg: str):
    """A JSON-ready copy of one argument: numbers, bools, strings, None and lists of them."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise ValueError(f"{arg}: dtype {value} is not supported; use float32, bfloat16 or float16")
        return _DTYPE_NAMES[value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "tolist"):  # a tensor or NumPy array of values (eager only)
        return _plain(value.tolist(), arg)
    if isinstance(value, Sequence):
        return [_plain(v, arg) for v in value]
    if hasattr(value, "__float__"):
        return float(value)
    raise ValueError(f"{arg}: cannot pass {type(value).__name__} to the m3kernels op")


@torch.compiler.assume_constant_result
def make_spec(**kwargs) -> str:
    """The ``spec`` string of the ops from ``merge_tensors`` keyword arguments (a constant to
    ``torch.compile``: the arguments are Python values, baked into the graph)."""
    unknown = sorted(set(kwargs) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown merge argument(s): {', '.join(unknown)}")
    if "method" not in kwargs:
        raise ValueError("method: required")
    return json.dumps({k: _plain(v, k) for k, v in kwargs.items()}, allow_nan=True)


def parse_spec(spec: str) -> dict:
    """``merge_tensors`` keyword arguments from a spec string."""
    try:
        kw = json.loads(spec)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"spec: not a JSON object ({exc})") from None
    if not isinstance(kw, dict):
        raise ValueError("spec: must be a JSON object of merge_tensors keyword arguments")
    unknown = sorted(set(kw) - set(_KEYS))
    if unknown:
        raise ValueError(f"spec: unknown merge argument(s): {', '.join(unknown)}")
    if "method" not in kw:
        raise ValueError("spec: method is required")
    if kw.get("out_dtype") is not None:
        name = kw["out_dtype"]
        if name not in _DTYPES:
            raise ValueError(f"out_dtype {name!r} is not supported; use float32, bfloat16 or float16")
        kw["out_dtype"] = _DTYPES[name]
    if kw.get("thresholds") is not None:
        kw["thresholds"] = [None if t is None else float(t) for t in kw["thresholds"]]
    return kw


def _run(base, models, spec: str, out):
    from m3kernels.api import merge_tensors as api_merge

    return api_merge(base, list(models), out=out, **parse_spec(spec))


@torch.library.custom_op("m3kernels::merge", mutates_args=(), device_types=("cpu", "cuda"))
def merge(base: torch.Tensor | None, models: list[torch.Tensor], spec: str) -> torch.Tensor:
    """The merged tensor (``merge_tensors(base, models, **json.loads(spec))``)."""
    return _run(base, models, spec, None)


@torch.library.custom_op("m3kernels::merge_out", mutates_args=("out",), device_types=("cpu", "cuda"))
def merge_out(base: torch.Tensor | None, models: list[torch.Tensor], spec: str, out: torch.Tensor) -> None:
    """The merged tensor written into ``out`` (contiguous, the models' shape and device)."""
    _run(base, models, spec, out)


def _fake_check(base, models, spec: str, out=None) -> tuple:
    """What the op would raise for these arguments, without data; (shape, dtype, device)."""
    from m3kernels.api import validate_inputs
    from m3kernels.merge.recipe import make_recipe

    kw = parse_spec(spec)
    base, models, out_dtype = validate_inputs(base, models, out, kw.pop("out_dtype", None))
    recipe_kw = {k: kw[k] for k in kw if k not in ("name", "backend", "thresholds", "method")}
    recipe = make_recipe(len(models), method=kw["method"], has_base=base is not None, **recipe_kw)
    th = kw.get("thresholds")
    if th is not None:
        if recipe.trim_density is None:
            raise ValueError(f"thresholds: method {recipe.method!r} has no magnitude trim")
        if len(th) != recipe.n:
            raise ValueError(f"thresholds: expected {recipe.n} values, got {len(th)}")
        for t in th:
            if t is not None and (math.isnan(t) or t < 0):
                raise ValueError(f"thresholds must be >= 0 (or None, or inf to keep nothing), got {t}")
    if not isinstance(kw.get("name", ""), str):
        raise ValueError("name must be a string")
    return models[0].shape, out_dtype, models[0].device


@merge.register_fake
def _merge_fake(base, models, spec):
    shape, dtype, device = _fake_check(base, models, spec)
    return torch.empty(shape, dtype=dtype, device=device)


@merge_out.register_fake
def _merge_out_fake(base, models, spec, out):
    _fake_check(base, models, spec, out)


def merge_tensors(
    base,
    models,
    *,
    method,
    weights=None,
    density=None,
    drop_rate=None,
    normalize=None,
    rescale=None,
    lambda_=1.0,
    mix_ratios=None,
    mixup_alpha=None,
    seed=0,
    name="",
    out_dtype=None,
    backend="auto",
    out=None,
    thresholds=None,
) -> torch.Tensor:
    """:func:`m3kernels.api.merge_tensors` through the custom ops: the same arguments and bytes,
    and traceable (``torch.compile(fullgraph=True)``, FakeTensorMode, meta tensors).

    Scalar arguments must be Python values (under ``torch.compile`` they are constants of the
    graph; a change recompiles). The result never requires grad (module docstring).
    """
    if isinstance(models, torch.Tensor) or models is None:
        raise ValueError("models must be a sequence of tensors (one per fine-tuned model)")
    spec = make_spec(
        method=method,
        weights=weights,
        density=density,
        drop_rate=drop_rate,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        mix_ratios=mix_ratios,
        mixup_alpha=mixup_alpha,
        seed=seed,
        name=name,
        out_dtype=out_dtype,
        backend=backend,
        thresholds=thresholds,
    )
    models = list(models)
    with torch.no_grad():
        if out is None:
            return torch.ops.m3kernels.merge(base, models, spec)
        torch.ops.m3kernels.merge_out(base, models, spec, out)
        return out


SUPPORTED_DTYPES = tuple(DTYPE_CODES)

__all__ = ["merge", "merge_out", "merge_tensors", "make_spec", "parse_spec", "SUPPORTED_DTYPES"]
