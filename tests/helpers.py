"""Test helpers: random merge inputs, the ulp tolerance, and the backends available here."""

from __future__ import annotations

import torch

from m3kernels.backends import available_backends

F32_EPS = 2.0**-23
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def have_backend(name: str) -> bool:
    return available_backends().get(name) == "available"


def make_inputs(shape, n, dtypes, gen, *, related=True, base=True):
    """base + n models; fine-tunes = base + small noise when ``related`` (like real fine-tunes).

    ``dtypes`` = (base dtype, [model dtypes]) .
    """
    base_dtype, model_dtypes = dtypes
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    models = []
    for i in range(n):
        if related:
            x = b + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        models.append(x.to(model_dtypes[i % len(model_dtypes)]))
    return (b.to(base_dtype) if base else None), models


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64 tensor), down to the subnormal spacing."""
    m = MANTISSA_BITS[dtype]
    emin = MIN_NORMAL_EXP[dtype]
    ax = x.abs().to(torch.float64)
    _, e = torch.frexp(ax)  # ax = f * 2**e with f in [0.5, 1)
    e = torch.clamp(e - 1, min=emin)
    return torch.ldexp(torch.ones_like(ax), (e - m).to(torch.int32))


def assert_close_ulp(out: torch.Tensor, ref64: torch.Tensor, scale: torch.Tensor, what: str = ""):
    """|out - ref| <= 1 ulp of out's dtype at ref, plus the float32-arithmetic error bound.

    The SPEC's kernels compute in float32, so besides the final rounding (one output ulp)
    an element can differ from the float64 result by a few float32 roundings of the terms
    that were summed: ``8 * eps32 * scale`` with ``scale`` the sum of those terms' magnitudes.
    """
    assert not torch.isnan(out).any(), f"{what}: output has NaN (not fully written?)"
    diff = (out.to(torch.float64) - ref64).abs()
    tol = ulp(ref64, out.dtype) + 8 * F32_EPS * scale
    bad = diff > tol
    if bad.any():
        idx = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements off; first at {idx}: "
            f"out={out.reshape(-1)[idx].item()!r} ref={ref64.reshape(-1)[idx].item()!r} "
            f"tol={tol.reshape(-1)[idx].item()!r}"
        )


def term_scale(base, models, recipe) -> torch.Tensor:
    """Magnitude of the terms in the merged value (for the float32 error bound)."""
    s = torch.zeros(models[0].shape, dtype=torch.float64)
    b = base.to(torch.float64) if (base is not None and recipe.uses_base) else torch.zeros_like(s)
    inv = 1.0
    if recipe.dare_density is not None:
        inv = max((1.0 / d if d > 0 else 1.0) for d in recipe.dare_density)
    if recipe.rescale == "l1":
        inv = max(inv, 10.0)
    coefs = [abs(c) for c in recipe.coefs]
    den = abs(sum(recipe.coefs)) if recipe.combine == "mean" else 1.0
    if recipe.combine == "ties" and recipe.normalize:
        nz = [c for c in coefs if c > 0]
        den = min(nz) if nz else 1.0
    for c, m in zip(coefs, models):
        s = s + (c / den) * inv * ((m.to(torch.float64) - b).abs() + b.abs())
    return b.abs() + abs(recipe.lambda_) * s


def check_dare_mask_through_merge(backend: str, numel: int, density: float, device: str = "cpu") -> None:
    """base 0, models of ones, no rescale: the merged tensor *is* the DARE keep mask, which must
    equal the documented stream (docs/RANDOMNESS.md) for model index 0 and, with a zero-weight
    first model, index 1."""
    import m3kernels

    base = torch.zeros(numel, dtype=torch.float32, device=device)
    ones = torch.ones(numel, dtype=torch.float32, device=device)
    for i, name in enumerate(["", "model.embed_tokens.weight"]):
        models = [ones * 3.0, ones] if i else [ones]
        out = torch.full((numel,), float("nan"), dtype=torch.float32, device=device)
        m3kernels.merge_tensors(
            base,
            models,
            method="dare_linear",
            density=density,
            rescale=False,
            weights=[0.0, 1.0] if i else None,
            seed=77 + i,
            name=name,
            out=out,
            backend=backend,
        )
        expect = m3kernels.dare_keep_mask(77 + i, name, i, (numel,), density)
        assert torch.equal((out != 0).cpu(), expect), f"mask differs for model index {i}"
