"""The per-family method tests' common pieces: the backends here, skipping a backend whose
``FEATURES`` lack a method's pieces, the (backend, case, dtype case) matrix, and one family case
run through ``merge_tensors`` on poisoned outputs against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import m3kernels
from m3kernels.backends import _load
from m3kernels.merge import registry
from m3kernels.merge.methods import missing_features
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from cases import DTYPE_CASES, FAMILY_CASES, family_kwargs
from helpers import assert_close_ulp, have_backend, make_inputs

BACKENDS = [b for b in ("cpu", "triton", "cuda") if have_backend(b)]
INTERPRETER_SHAPES = ((7,), (3, 5, 7))  # the Triton interpreter (no GPU) is slow: two shapes there


def skip_unless(backend: str, method: str) -> None:
    """Skip the test when ``backend``'s FEATURES lack a piece ``method`` needs."""
    missing = missing_features(_load(backend), registry.get_method(method))
    if missing:
        pytest.skip(f"backend {backend} has no {', '.join(missing)} yet (FEATURES)")


def matrix(cases) -> list[tuple[str, str, str]]:
    """(backend, case, dtype case) for every backend here; the Triton interpreter (no GPU) is
    slow: there, the mixed-dtype case only."""
    return [(b, c, d) for b in BACKENDS for c in cases for d in DTYPE_CASES if b != "triton" or d == "mixed"]


def check_against_reference(backend, case, dtype_case, gen, shapes, scale) -> None:
    """FAMILY_CASES[case] for each of its model counts and each of ``shapes`` (the largest count
    and two shapes on the Triton interpreter) against the reference, within the ulp bound of
    ``scale(base, models, recipe)``."""
    kw0, counts = FAMILY_CASES[case]
    skip_unless(backend, kw0["method"])
    base_dt, model_dts, out_dt = DTYPE_CASES[dtype_case]
    dev = "cuda" if backend == "cuda" else "cpu"
    interp = backend == "triton"
    for n in counts[-1:] if interp else counts:
        for shape in INTERPRETER_SHAPES if interp else shapes:
            base, models = make_inputs(shape, n, (base_dt, model_dts), gen)
            kw = family_kwargs(case, n)
            out = torch.full(shape, float("nan"), dtype=out_dt, device=dev)
            m3kernels.merge_tensors(base.to(dev), [m.to(dev) for m in models], out=out, backend=backend, **kw)
            recipe = make_recipe(n, has_base=True, **kw)
            ref, _ = reference_merge(base, models, recipe, "w")
            assert_close_ulp(out.cpu(), ref, scale(base, models, recipe), f"{backend}/{case}/N={n}/{shape}")
