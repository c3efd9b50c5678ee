"""``torch.library`` custom ops: one merge as one graph node (``torch.ops.m3kernels.*``).

Two ops, registered for CPU and CUDA tensors with fake (meta) implementations::

    m3kernels::merge(Tensor? base, Tensor[] models, str method, float[]? weights, float[]? density,
                     float[]? drop_rate, int normalize, str rescale, float lambda_,
                     float[]? mix_ratios, float? mixup_alpha, int seed, str name,
                     ScalarType? out_dtype, str backend, float[]? thresholds, int scalars,
                     str param_names, int[] param_kinds, int[] param_lengths,
                     float[] param_values) -> Tensor
    m3kernels::merge_out(<the same>, Tensor(a!) out) -> ()

The arguments are those of :func:`m3kernels.api.merge_tensors`, encoded for a schema:
``normalize`` -1 (the method's default), 0 or 1; ``rescale`` "" (default), "true", "false" or
"l1"; ``seed`` as a signed 64-bit integer (seeds of 2**63 and above wrap); a ``thresholds`` entry
NaN means None (keep all); ``scalars`` has bit 0, 1, 2, 3 set when ``weights``, ``density``,
``drop_rate``, ``mix_ratios`` were given as a scalar (passed as a one-element list). The
method-specific parameters (``t``, ``epsilon``, ``gamma``, ``max_iter``, …: whatever other keywords
the API takes) travel as ``param_names`` (comma-separated) with a kind each (0 float, 1 int, 2 bool, 3 list of
floats, 4 string: its UTF-8 bytes), the list lengths and the values flattened into ``param_values``.
:func:`merge_tensors` here has the signature of the API function and does the encoding.

The whole merge, stage A (L1 sums, exact trim thresholds: Python and NumPy on the host) and
stage B (the fused kernel), runs *inside* the op, so ``torch.compile`` sees one opaque node:
``fullgraph=True`` works and a compiled function calling it is one graph, with static or dynamic
shapes and scalar arguments. The fake implementation checks the arguments the way the API does
(``ValueError`` at trace time) and returns an empty tensor of the output's shape, dtype and
device, so FakeTensorMode and meta tensors work.

Gradients: a merge is not differentiable (the trim and the sign vote are piecewise constant
selections, the kernels have no backward). :func:`merge_tensors` runs the op under
``torch.no_grad()``, so its result never requires grad, as :func:`m3kernels.api.merge_tensors`
always behaved; calling the raw op on tensors that require grad gives an output whose
backward raises PyTorch's "no autograd formula" error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_SCALAR_BITS = {"weights": 1, "density": 2, "drop_rate": 4, "mix_ratios": 8}
_RESCALE = {"": None, "true": True, "false": False, "l1": "l1"}


def _floats(value, arg: str):
    """(list of floats or None, given as a scalar?) for a scalar-or-per-model argument."""
    if value is None:
        return None, False
    if isinstance(value, (bool, str)):
        raise ValueError(f"{arg} must be a number or one number per model, got {value!r}")
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        return [float(value)], True
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return [float(value)], True
    if hasattr(value, "tolist"):  # a tensor or NumPy array of values (eager only)
        value = value.tolist()
    if not isinstance(value, Sequence):
        raise ValueError(f"{arg} must be a number or one number per model, got {type(value).__name__}")
    try:
        return [float(v) for v in value], False
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a number or one number per model, got {value!r}") from None


def encode(
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
    thresholds=None,
    **params,
) -> tuple:
    """The ops' arguments after ``(base, models)`` from ``merge_tensors`` keyword arguments
    (``params``: the method-specific ones, ``t=0.3``, ``max_iter=5``, …; None values are dropped)."""
    if not isinstance(method, str):
        raise ValueError("method must be a string")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    if not isinstance(backend, str):
        raise ValueError("backend must be a string")
    scalars = 0
    lists = {}
    for arg, value in (
        ("weights", weights),
        ("density", density),
        ("drop_rate", drop_rate),
        ("mix_ratios", mix_ratios),
    ):
        lists[arg], is_scalar = _floats(value, arg)
        scalars |= _SCALAR_BITS[arg] if is_scalar else 0
    norm = -1 if normalize is None else int(bool(normalize))
    if rescale is None:
        resc = ""
    elif isinstance(rescale, bool):
        resc = "true" if rescale else "false"
    elif isinstance(rescale, str) and rescale.lower() in ("true", "false", "l1", "density", "none"):
        resc = {"density": "true", "none": "false"}.get(rescale.lower(), rescale.lower())
    else:
        raise ValueError(f"rescale must be True, False or 'l1', got {rescale!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if isinstance(seed, int):
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
        seed = seed - 2**64 if seed >= 2**63 else seed
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise ValueError(f"out_dtype must be a torch.dtype, got {out_dtype!r}")
    th = None
    if thresholds is not None:
        th = [math.nan if t is None else float(t) for t in thresholds]
        if any(t is not None and math.isnan(float(t)) for t in thresholds):  # NaN encodes None
            raise ValueError("thresholds must be >= 0 (or None, or inf to keep nothing), got nan")
    alpha = None if mixup_alpha is None else float(mixup_alpha)
    names, kinds, lengths, values = _encode_params(params)
    return (
        method,
        lists["weights"],
        lists["density"],
        lists["drop_rate"],
        norm,
        resc,
        float(lambda_),
        lists["mix_ratios"],
        alpha,
        seed,
        name,
        out_dtype,
        backend,
        th,
        scalars,
        names,
        kinds,
        lengths,
        values,
    )


_FLOAT, _INT, _BOOL, _LIST, _STR = 0, 1, 2, 3, 4  # _STR: the UTF-8 bytes as floats (trim_ties)


def _encode_params(params: dict) -> tuple:
    names, kinds, lengths, values = [], [], [], []
    for key in sorted(params):
        v = params[key]
        if v is None:
            continue
        if isinstance(v, str):
            kind, vals = _STR, [float(c) for c in v.encode("utf-8")]
        elif isinstance(v, bool):
            kind, vals = _BOOL, [float(v)]
        elif isinstance(v, (int, torch.SymInt)):
            kind, vals = _INT, [float(v)]
        elif isinstance(v, (float, torch.SymFloat)):
            kind, vals = _FLOAT, [float(v)]
        else:
            vals, is_scalar = _floats(v, key)
            kind = _FLOAT if is_scalar else _LIST
        names.append(key)
        kinds.append(kind)
        lengths.append(len(vals))
        values.extend(vals)
    return ",".join(names), kinds, lengths, values


def _decode_params(names, kinds, lengths, values) -> dict:
    names = [x for x in names.split(",") if x] if isinstance(names, str) else list(names)
    if not (len(names) == len(kinds) == len(lengths)) or sum(lengths) != len(values):
        raise ValueError("param_names, param_kinds, param_lengths and param_values disagree")
    out, pos = {}, 0
    for key, kind, n in zip(names, kinds, lengths):
        vals = list(values[pos : pos + n])
        pos += n
        if kind == _LIST:
            out[key] = vals
        elif kind == _STR:
            out[key] = bytes(int(c) for c in vals).decode("utf-8")
        elif n != 1 or kind not in (_FLOAT, _INT, _BOOL):
            raise ValueError(f"{key}: bad encoded parameter (kind {kind}, {n} values)")
        else:
            out[key] = {_FLOAT: float, _INT: int, _BOOL: bool}[kind](vals[0])
    return out


def decode(
    method,
    weights,
    density,
    drop_rate,
    normalize,
    rescale,
    lambda_,
    mix_ratios,
    mixup_alpha,
    seed,
    name,
    out_dtype,
    backend,
    thresholds,
    scalars,
    param_names="",
    param_kinds=(),
    param_lengths=(),
    param_values=(),
) -> dict:
    """``merge_tensors`` keyword arguments from the ops' arguments (the inverse of :func:`encode`)."""
    kw = {"method": method}
    for arg, value in (
        ("weights", weights),
        ("density", density),
        ("drop_rate", drop_rate),
        ("mix_ratios", mix_ratios),
    ):
        if value is not None:
            value = list(value)
            kw[arg] = value[0] if scalars & _SCALAR_BITS[arg] and len(value) == 1 else value
    if normalize not in (-1, 0, 1):
        raise ValueError(f"normalize: -1 (default), 0 or 1 expected, got {normalize}")
    if normalize != -1:
        kw["normalize"] = bool(normalize)
    if rescale not in _RESCALE:
        raise ValueError(f"rescale must be '', 'true', 'false' or 'l1', got {rescale!r}")
    if _RESCALE[rescale] is not None:
        kw["rescale"] = _RESCALE[rescale]
    kw["lambda_"] = lambda_
    if mixup_alpha is not None:
        kw["mixup_alpha"] = mixup_alpha
    kw["seed"] = int(seed) % 2**64
    kw["name"] = name
    if out_dtype is not None:
        kw["out_dtype"] = out_dtype
    kw["backend"] = backend
    if thresholds is not None:
        kw["thresholds"] = [None if math.isnan(t) else t for t in thresholds]
    extra = _decode_params(param_names, param_kinds, param_lengths, param_values)
    clash = sorted(set(extra) & set(kw))
    if clash:
        raise ValueError(f"param_names repeats core arguments: {', '.join(clash)}")
    kw.update(extra)
    return kw


def _run(base, models, args, out):
    from m3kernels.api import merge_tensors as api_merge

    return api_merge(base, list(models), out=out, **decode(*args))


@torch.library.custom_op("m3kernels::merge", mutates_args=(), device_types=("cpu", "cuda"))
def merge(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    method: str,
    weights: list[float] | None,
    density: list[float] | None,
    drop_rate: list[float] | None,
    normalize: int,
    rescale: str,
    lambda_: float,
    mix_ratios: list[float] | None,
    mixup_alpha: float | None,
    seed: int,
    name: str,
    out_dtype: torch.dtype | None,
    backend: str,
    thresholds: list[float] | None,
    scalars: int,
    param_names: str,
    param_kinds: list[int],
    param_lengths: list[int],
    param_values: list[float],
) -> torch.Tensor:
    """The merged tensor: ``merge_tensors(base, models, **decode(...))``."""
    return _run(
        base,
        models,
        (
            method,
            weights,
            density,
            drop_rate,
            normalize,
            rescale,
            lambda_,
            mix_ratios,
            mixup_alpha,
            seed,
            name,
            out_dtype,
            backend,
            thresholds,
            scalars,
            param_names,
            param_kinds,
            param_lengths,
            param_values,
        ),
        None,
    )


@torch.library.custom_op("m3kernels::merge_out", mutates_args=("out",), device_types=("cpu", "cuda"))
def merge_out(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    method: str,
    weights: list[float] | None,
    density: list[float] | None,
    drop_rate: list[float] | None,
    normalize: int,
    rescale: str,
    lambda_: float,
    mix_ratios: list[float] | None,
    mixup_alpha: float | None,
    seed: int,
    name: str,
    out_dtype: torch.dtype | None,
    backend: str,
    thresholds: list[float] | None,
    scalars: int,
    param_names: str,
    param_kinds: list[int],
    param_lengths: list[int],
    param_values: list[float],
    out: torch.Tensor,
) -> None:
    """The merged tensor written into ``out`` (contiguous, the models' shape and device)."""
    _run(
        base,
        models,
        (
            method,
            weights,
            density,
            drop_rate,
            normalize,
            rescale,
            lambda_,
            mix_ratios,
            mixup_alpha,
            seed,
            name,
            out_dtype,
            backend,
            thresholds,
            scalars,
            param_names,
            param_kinds,
            param_lengths,
            param_values,
        ),
        out,
    )


def _fake_check(base, models, args, out=None) -> tuple:
    """What the op would raise for these arguments, without data; (shape, dtype, device)."""
    from m3kernels.api import validate_inputs
    from m3kernels.merge.recipe import make_recipe

    kw = decode(*args)
    base, models, out_dtype = validate_inputs(base, models, out, kw.pop("out_dtype", None))
    recipe_kw = {k: kw[k] for k in kw if k not in ("name", "backend", "thresholds", "method")}
    recipe = make_recipe(len(models), method=kw["method"], has_base=base is not None, **recipe_kw)
    th = kw.get("thresholds")
    if th is not None:
        if recipe.trim_density is None or getattr(recipe, "family", None) is not None:
            raise ValueError(f"thresholds: method {recipe.method!r} has no top-k magnitude trim")
        if len(th) != recipe.n:
            raise ValueError(f"thresholds: expected {recipe.n} values, got {len(th)}")
        for t in th:
            if t is not None and t < 0:
                raise ValueError(f"thresholds must be >= 0 (or None, or inf to keep nothing), got {t}")
    return models[0].shape, out_dtype, models[0].device


@merge.register_fake
def _merge_fake(base, models, *args):
    shape, dtype, device = _fake_check(base, models, args)
    return torch.empty(shape, dtype=dtype, device=device)


@merge_out.register_fake
def _merge_out_fake(base, models, *args):
    _fake_check(base, models, args[:-1], args[-1])


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
    **params,
) -> torch.Tensor:
    """:func:`m3kernels.api.merge_tensors` through the custom ops: the same arguments and bytes,
    and traceable (``torch.compile(fullgraph=True)``, FakeTensorMode, meta tensors).

    ``params`` are the method-specific keywords of the API (``t``, ``epsilon``, ``gamma``,
    ``max_iter``, …), passed through. Under ``torch.compile`` per-model arguments should be Python
    numbers or lists of them (a tensor of weights is read with ``tolist()``, which only works
    eagerly). The result never requires grad (module docstring).
    """
    if isinstance(models, torch.Tensor) or models is None:
        raise ValueError("models must be a sequence of tensors (one per fine-tuned model)")
    args = encode(
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
        **params,
    )
    models = list(models)
    with torch.no_grad():
        if out is None:
            return torch.ops.m3kernels.merge(base, models, *args)
        torch.ops.m3kernels.merge_out(base, models, *args, out)
        return out


__all__ = ["merge", "merge_out", "merge_tensors", "encode", "decode"]
