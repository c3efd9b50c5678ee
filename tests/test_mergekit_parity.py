"""Parity with mergekit 0.1.5 itself, through the harness of bench/mergekit_parity.py.

Opt-in: the parity tests run only when ``M3K_MERGEKIT_VENV`` names a virtual environment with
``bin/mergekit-yaml`` (mergekit 0.1.5); otherwise they skip (CI without mergekit is not slowed
down). The harness's own helpers (ulps, mergekit's parameter resolution) are checked always.

Tolerances (docs/MERGEKIT_PARITY.md): elementwise methods bit-exact against mergekit run with
``dtype: float32`` (magnitude trims outside their trim ties); other deterministic methods within
1 float32 ulp of it; norm-based methods within 2 ulps of mergekit's ``dtype: float64`` output
rounded to float32 (mergekit's CPU float32 norms are themselves inaccurate, §1.4 of
docs/MERGEKIT_METHODS.md); random methods by statistics (|z| ≤ 5).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import mergekit_parity as mp  # noqa: E402

VENV = os.environ.get("M3K_MERGEKIT_VENV")
HAVE_MK = bool(VENV) and (Path(VENV) / "bin" / "mergekit-yaml").exists()
needs_mk = pytest.mark.skipif(
    not HAVE_MK, reason="set M3K_MERGEKIT_VENV to a venv with mergekit 0.1.5 (bin/mergekit-yaml)"
)

# (family, case id): a small subset, one per tolerance class and the main methods
SUBSET = [
    ("f32", "explicit:linear:weights"),
    ("f32", "explicit:task_arithmetic:weights+lambda"),
    ("bf16", "explicit:ties:density+weights"),
    ("f32", "explicit:dare_ties:density+rescale"),
    ("f32", "explicit:slerp:t"),
    ("bf16", "explicit:model_stock:tensor"),
    ("f32", "explicit:nuslerp:flatten"),
    ("bf16", "explicit:nearswap:t"),
    ("bf16", "explicit:ram:epsilon"),
    ("f32", "explicit:breadcrumbs:density+gamma"),
    # mergekit's config semantics (docs/MERGEKIT_PARITY.md D4, D6-D8, D10)
    ("bf16", "edge:ties:negative-weight"),
    ("f32", "edge:ties:rescale-true"),
    ("f32", "defaults:ties:required-only"),
    ("f32", "defaults:dare_linear:required-only"),
]
# known differences (docs/MERGEKIT_PARITY.md): strict, so a fix turns them into a failure to update
KNOWN: dict = {}  # none at run 3 (linear's FMA, D1, is matched: Recipe.fma)


# ----------------------------------------------------------------------------- always


def test_ulps32_counts_float32_steps_across_zero():
    a = torch.tensor([1.0, -0.0, 0.0, float("nan"), 1.0, 2.0])
    b = torch.tensor([1.0, 0.0, torch.finfo(torch.float32).tiny, float("nan"), float("nan"), 2.0])
    b[5] = torch.nextafter(torch.nextafter(b[5], torch.tensor(3.0)), torch.tensor(3.0))
    u = mp.ulps32(a, b)
    assert u[0] == 0 and u[1] == 0 and u[3] == 0 and u[5] == 2
    assert u[2] == 0x00800000  # the smallest normal is 2^23 steps above zero
    assert u[4] == 1 << 31


def test_parameter_resolution_is_mergekits():
    L = 3
    assert mp.tensor_position("model.layers.0.mlp.up_proj.weight", L) == 0.0
    assert mp.tensor_position("model.layers.2.mlp.up_proj.weight", L) == 1.0
    assert mp.tensor_position("model.layers.1.self_attn.q_proj.weight", L) == 0.5
    for post in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert mp.tensor_position(post, L) == 0.0  # 0.1.5: pre and post weights both at t = 0
    case = mp.Case(
        "ties",
        "x",
        "explicit",
        [("ft1", {"density": [0.2, 0.6, 1.0]}), ("ft2", {})],
        parameters={"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]},
    )
    assert mp.resolve(case, "ft1", "density", "model.layers.1.self_attn.q_proj.weight", L) == pytest.approx(
        0.6
    )
    assert mp.resolve(case, "ft1", "density", "model.layers.2.mlp.up_proj.weight", L) == pytest.approx(1.0)
    assert mp.resolve(case, "ft2", "density", "model.layers.2.mlp.up_proj.weight", L) == 0.3
    assert mp.resolve(case, "ft2", "density", "lm_head.weight", L) == 0.7
    assert mp.resolve(case, "ft2", "gamma", "lm_head.weight", L, 0.01) == 0.01


def test_every_mergekit_method_has_cases():
    cases = mp.all_cases()
    for m in mp.MERGEKIT_METHODS:
        assert any(c.method == m and c.section == "explicit" for c in cases), m
        assert any(c.method == m and c.section == "defaults" for c in cases), m
    assert len({c.id for c in cases}) == len(cases)


# ----------------------------------------------------------------------------- with mergekit


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Run the subset once (one mergekit process); {(family, id): row}."""
    methods = mp.registry_methods()
    wanted = {cid for _, cid in SUBSET}
    cases = [c for c in mp.all_cases() if c.id in wanted and c.method in methods]
    work = tmp_path_factory.mktemp("parity")
    inputs = mp.make_inputs(work, tuple(sorted({f for f, _ in SUBSET})))
    result = mp.run_cases(cases, inputs, work, Path(VENV), pairs=set(SUBSET))
    return {(r["family"], r["id"]): r for r in result["rows"]}, work, inputs


@needs_mk
@pytest.mark.parametrize("family,case_id", SUBSET, ids=[f"{f}-{c}" for f, c in SUBSET])
def test_parity_with_mergekit(parity, family, case_id, request):
    rows, _, _ = parity
    method = case_id.split(":")[1]
    if method not in mp.registry_methods():
        pytest.skip(f"{method} is not in m3kernels' registry yet")
    if (family, case_id) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN[(family, case_id)]))
    row = rows[(family, case_id)]
    if row["status"] == "not-on-cpu":
        pytest.skip(row["why"])
    assert row["status"] == "ok", f"{row['status']}: {row.get('why')}\n{row.get('compare')}"


@needs_mk
def test_linear_is_bit_exact_with_its_fma(parity):
    """mergekit's linear accumulates with torch's fused addcmul_; ours with one FMA per model (D1)."""
    rows, _, _ = parity
    e = rows[("f32", "explicit:linear:weights")]["compare"]["exact"]
    assert e["max_ulps"] == 0 and e["bit_equal_fraction"] == 1.0, e


@needs_mk
def test_the_comparison_sees_one_ulp(parity, tmp_path):
    """The harness is not blind: mergekit's own output with one float32 ulp changed in one
    element is a 1-ulp mismatch of that tensor (and unchanged, it is bit-exact)."""
    from safetensors.torch import load_file, save_file

    rows, work, inputs = parity
    case = next(c for c in mp.all_cases() if c.id == "explicit:linear:weights")
    d = work / "runs" / "f32" / "explicit__linear__weights"
    if not (d / "mk32").exists():
        pytest.skip("the linear case did not run")
    same = mp.compare_case(case, inputs["f32"], d / "mk32", d / "mk32", d / "mk64")
    assert mp.verdict(case, same)[0] == "ok" and same["exact"]["bit_equal_fraction"] == 1.0
    fake = tmp_path / "ours"
    shutil.copytree(d / "mk32", fake)
    f = fake / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.weight"
    t = tensors[name].clone()
    t.view(-1)[7] = torch.nextafter(t.view(-1)[7], torch.tensor(10.0))
    tensors[name] = t
    save_file(tensors, str(f), metadata={"format": "pt"})
    cmp = mp.compare_case(case, inputs["f32"], fake, d / "mk32", d / "mk64")
    status, why = mp.verdict(case, cmp)
    assert status == "MISMATCH" and cmp["exact"]["max_ulps"] == 1, (status, why)
    assert cmp["exact"]["worst_tensor"] == name and cmp["exact"]["differing_tensors"] == 1
