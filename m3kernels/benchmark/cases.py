"""The benchmark's cases: methods x backends x dtypes x N on one tensor shape.

Methods come from the registry (:mod:`m3kernels.merge.registry`) when the run starts, so a method
registered later is benchmarked too. The known methods run with the parameters bench/RESULTS.md's
figures were measured with (:data:`BENCH_PARAMS`: TIES density 0.2, DARE density 0.5, ...); any
other method (or a known one whose parameters no longer validate) gets its registry defaults, a required parameter filled from its kind (a fraction
0.5, a number 1, a flag false). A method that still cannot run (it needs another N, a parameter
the tensor API cannot take, a feature a backend lacks) becomes a skipped case with the reason,
never an error of the run.

Backends are those available here whose device is present (``cpu`` on the CPU; ``triton`` and
``cuda`` on a CUDA GPU: Triton's CPU interpreter is for tests, not timings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_SHAPE = (5120, 13824)  # the largest matrix of Llama-2-13B (its MLP projections)
DEFAULT_DTYPES = ("bfloat16",)
DEFAULT_NS = (2,)
BACKENDS = ("cpu", "triton", "cuda")
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
}
BENCH_PARAMS = {  # the parameters of bench/RESULTS.md's tensor figures
    "linear": {},
    "task_arithmetic": {"lambda_": 1.0},
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "ties_dare": {"drop_rate": 0.5, "density": 0.2},
    "nearswap": {"t": 0.001},  # about half the deltas (σ 0.002) clipped
    "slerp": {"t": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
}
FILL_BY_KIND = {"fraction": 0.5, "number": 1.0, "bool": False, "rescale": True}
MAX_N = 64


def parse_shape(text) -> tuple:
    """'5120x13824' (or '5120,13824', or a tuple) -> (5120, 13824); ValueError otherwise."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        s = str(text).strip().lower().replace("×", "x").replace(",", "x")
        parts = [p.strip() for p in s.split("x")] if s else []
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--shape {text!r} is not a shape like 5120x13824") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 4:
        raise ValueError(f"--shape {text!r}: 1 to 4 dimensions, each >= 1 (like 5120x13824)")
    numel = 1
    for d in dims:
        numel *= d
    if numel > 1 << 34:
        raise ValueError(f"--shape {text!r}: {numel} elements is more than 2**34")
    return dims


def split_list(text, what: str) -> list:
    """'a,b' / ['a', 'b'] -> ['a', 'b'] (no empty entries; at least one)."""
    items = [str(x).strip() for x in (text.split(",") if isinstance(text, str) else text)]
    items = [x for x in items if x]
    if not items:
        raise ValueError(f"--{what}: empty list")
    return list(dict.fromkeys(items))


def parse_ns(text) -> list:
    out = []
    for x in split_list(text if not isinstance(text, int) else str(text), "n"):
        try:
            n = int(x)
        except ValueError:
            raise ValueError(f"--n {x!r} is not an integer (models to merge, 1 to {MAX_N})") from None
        if not 1 <= n <= MAX_N:
            raise ValueError(f"--n {n}: the number of models must be in 1..{MAX_N}")
        out.append(n)
    return out


def parse_dtypes(text) -> list:
    out = []
    for x in split_list(text, "dtypes"):
        key = x.lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"--dtypes {x!r} is not one of bfloat16, float16, float32")
        out.append(DTYPES[key])
    return list(dict.fromkeys(out))


def registered_methods() -> list:
    """The registry's method names (aliases left out), in registration order."""
    from m3kernels.merge.registry import METHODS

    return list(METHODS)


def parse_methods(text) -> list:
    """Method names (aliases resolved); ValueError naming the registered ones."""
    from m3kernels.merge.registry import get_method

    if text is None:
        return registered_methods()
    out = []
    for x in split_list(text, "methods"):
        try:
            out.append(get_method(x, what="--methods").name)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    return list(dict.fromkeys(out))


def backend_device(name: str) -> str:
    return "cpu" if name == "cpu" else "cuda"


def usable_backends() -> dict:
    """{backend: '' if it can be benchmarked here, else why not}."""
    import torch

    from m3kernels.backends import available_backends

    out = {}
    for name, state in available_backends().items():
        if state != "available":
            out[name] = state
        elif backend_device(name) == "cuda" and not torch.cuda.is_available():
            out[name] = "no CUDA GPU here (torch.cuda.is_available() is False)"
        else:
            out[name] = ""
    return out


def parse_backends(text) -> list:
    """The requested backends (default: every usable one); ValueError for an unknown one or one
    that does not work here, with the reason."""
    usable = usable_backends()
    if text is None:
        chosen = [b for b in BACKENDS if not usable.get(b, "absent")]
        if not chosen:
            raise ValueError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in usable.items()))
        return chosen
    out = []
    for x in split_list(text, "backends"):
        b = x.lower()
        if b not in BACKENDS:
            raise ValueError(f"--backends {x!r} is not one of {', '.join(BACKENDS)}")
        why = usable.get(b, "absent")
        if why:
            raise ValueError(f"--backends {b}: not available here: {why}")
        out.append(b)
    return list(dict.fromkeys(out))


def method_kwargs(method_name: str, n: int) -> tuple:
    """(merge_tensors keyword arguments for ``method_name`` with ``n`` models, why it cannot run or '')."""
    from m3kernels.merge.recipe import make_recipe
    from m3kernels.merge.registry import REQUIRED, get_method

    m = get_method(method_name)
    if m.name in BENCH_PARAMS:
        kw = dict(BENCH_PARAMS[m.name])
        try:
            make_recipe(n, method=m.name, has_base=True, **kw)
            return kw, ""
        except (ValueError, TypeError):  # its parameters changed: the registry's defaults below
            pass
    kw = {}
    for p in m.params:
        if p.default is not REQUIRED:
            continue
        if not p.api:
            return kw, f"required parameter {p.name!r} has no tensor-API keyword"
        if p.kind not in FILL_BY_KIND:
            return kw, f"required parameter {p.name!r} of kind {p.kind!r}: no benchmark value"
        kw[p.api] = FILL_BY_KIND[p.kind]
    if m.param("density") is not None and "drop_rate" in kw and "density" in kw:
        kw.pop("density")  # DARE-style: density = 1 - drop_rate, one of them suffices
    try:
        make_recipe(n, method=m.name, has_base=True, **kw)
    except (ValueError, TypeError) as exc:
        return kw, f"{type(exc).__name__}: {exc}"
    return kw, ""


@dataclass
class Case:
    """One benchmark case; ``skip`` says why it does not run ('' when it does)."""

    method: str
    backend: str
    dtype: str
    n: int
    shape: tuple
    kwargs: dict = field(default_factory=dict)
    skip: str = ""

    @property
    def device(self) -> str:
        return backend_device(self.backend)

    @property
    def key(self) -> tuple:
        return (self.method, self.backend, self.dtype, self.n, "x".join(map(str, self.shape)))

    @property
    def numel(self) -> int:
        k = 1
        for d in self.shape:
            k *= d
        return k


def build_cases(methods, backends, dtypes, ns, shape) -> list:
    """Every (method, backend, dtype, N) case, in that nesting order, with its parameters."""
    cases = []
    for method in methods:
        for n in ns:
            kw, why = method_kwargs(method, n)
            for backend in backends:
                for dtype in dtypes:
                    cases.append(Case(method, backend, dtype, n, tuple(shape), dict(kw), why))
    return cases


__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_DTYPES",
    "DEFAULT_NS",
    "BACKENDS",
    "BENCH_PARAMS",
    "Case",
    "build_cases",
    "method_kwargs",
    "parse_shape",
    "parse_ns",
    "parse_dtypes",
    "parse_methods",
    "parse_backends",
    "usable_backends",
    "registered_methods",
]
