"""The method registry drives everything: every registered method (and alias) runs through
``merge_tensors`` (against the float64 reference), the config parser, the dry-run plan and the
CLI; every declared parameter is accepted where declared and rejected elsewhere, naming it; the
generated tables in docs/CONFIG.md are exactly the registry's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import m3kernels
from m3kernels import cli
from m3kernels.backends import cpu as cpu_backend
from m3kernels.checkpoint import config
from m3kernels.checkpoint.config import MergeConfigError, load_config
from m3kernels.merge import registry
from m3kernels.merge.methods import missing_features
from m3kernels.merge.recipe import make_recipe
from m3kernels.merge.reference import reference_merge

from checkpoint_factory import make_family
from helpers import assert_close_ulp, term_scale

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)
NAMES = registry.method_names()  # methods and aliases
# fisher, regmean: they need statistics from data (tests/test_data_aware_config.py, _api.py)
DATA_AWARE = {m.name for m in registry.METHODS.values() if m.family == "data_aware"}
GENERIC = tuple(n for n in NAMES if registry.get_method(n).name not in DATA_AWARE)


def required_kwargs(method: registry.Method, *, config: bool) -> dict:
    """A value for every required parameter (API keywords, or config names)."""
    out = {}
    for p in method.params:
        if p.default is registry.REQUIRED and p.kind == registry.FRACTION:
            out[p.name if config else p.api] = 0.6
        elif p.default is registry.REQUIRED:  # slerp's fraction t, nearswap's distance t
            out[p.name if config else p.api] = 0.4 if method.name == "slerp" else 0.01
    return out


def model_count(method: registry.Method) -> int:
    """How many (non-base) models the generic tests give ``method``: 3 where it takes them."""
    lo, hi = method.models
    return hi if hi is not None and hi < 3 else max(lo, 3)


def skip_unless_cpu_has(method: registry.Method) -> None:
    missing = missing_features(cpu_backend, method)
    if missing:
        pytest.skip(f"the cpu backend has no {', '.join(missing)} yet (FEATURES)")


def non_default(p: registry.Param):
    """A valid value different from the parameter's default."""
    if p.kind == registry.BOOL:
        return not bool(p.default)
    if p.kind == registry.RESCALE:
        return "l1"
    if p.kind == registry.FRACTION:
        return 0.45
    if p.kind == registry.INT:
        return 3
    if p.kind == registry.CHOICE:
        return next(c for c in p.choices if c != p.default)
    return 0.8


def test_registry_entries_are_complete():
    assert set(m3kernels.METHODS) == set(NAMES)
    for m in registry.METHODS.values():
        assert m.reference.startswith("https://") and m.summary
        names = [p.name for p in m.params]
        assert len(names) == len(set(names)), m.name
        for p in m.params:
            assert p.scope in (registry.PER_MODEL, registry.MERGE_WIDE) and p.doc
        assert m.program.combine in (
            registry.SUM,
            registry.MEAN,
            registry.TIES,
            registry.NEARSWAP,
            registry.RAM,
        )
        if m.family is None:
            assert (registry.TRIM_HISTOGRAM in m.stage_a) == m.program.trim
        assert m.mixup in (registry.MIX_WEIGHTS, registry.MIX_INTERPOLATION, registry.MIX_NONE)
        if m.mixup == registry.MIX_NONE:
            assert m.mixup_note  # the error says why
        if m.program.trim or m.program.dare:
            assert m.takes("density")
        if m.needs_base:
            assert m.program.uses_base
        assert m.models[0] >= 1 and (m.models[1] is None or m.models[1] >= m.models[0])
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.METHODS["ties"])


def test_config_doc_tables_match_the_registry():
    text = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert registry.markdown_tables() in text, (
        'docs/CONFIG.md is stale: run python -c "from m3kernels.merge.registry import refresh_doc; '
        "refresh_doc('docs/CONFIG.md')\""
    )


@pytest.mark.parametrize("name", GENERIC)
def test_every_method_runs_through_merge_tensors(name):
    method = registry.get_method(name)
    skip_unless_cpu_has(method)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    n = model_count(method)
    base = torch.randn(7, 13, generator=gen).to(torch.bfloat16)
    models = [(base.float() + 0.05 * torch.randn(7, 13, generator=gen)).to(torch.bfloat16) for _ in range(n)]
    kw = dict(method=name, **required_kwargs(method, config=False))
    b = base if method.needs_base or name == "linear" else None
    out = torch.full((7, 13), float("nan"), dtype=torch.float32)  # poisoned
    m3kernels.merge_tensors(b, models, out=out, name="w", seed=3, **kw)
    recipe = make_recipe(n, has_base=b is not None, seed=3, **kw)
    ref, _ = reference_merge(b, models, recipe, "w")
    if method.family is None or method.family == "breadcrumbs":
        scale = term_scale(b, models, recipe)
    else:  # coefficients of order 1 on the inputs
        scale = 4 * sum((m.to(torch.float64).abs() for m in models), base.to(torch.float64).abs())
    assert_close_ulp(out, ref, scale, name)


@pytest.mark.parametrize("name", GENERIC)
def test_method_without_a_needed_base_is_refused(name):
    method = registry.get_method(name)
    models = [torch.ones(4), torch.zeros(4), torch.full((4,), 0.5)][: model_count(method)]
    if method.needs_base:
        with pytest.raises(ValueError, match="base"):
            m3kernels.merge_tensors(None, models, method=name, **required_kwargs(method, config=False))
    else:
        skip_unless_cpu_has(method)
        m3kernels.merge_tensors(None, models, method=name, **required_kwargs(method, config=False))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, models, _ = make_family(root, shards=1, **SIZES)
    return root, base, models


def config_for(name: str, family, **params) -> dict:
    root, base, models = family
    method = registry.get_method(name)
    top = {**required_kwargs(method, config=True), **params}
    models = models[: min(len(models), model_count(method))]
    raw = {"merge_method": name, "models": [{"model": str(m)} for m in models], "dtype": "float32"}
    if method.needs_base:
        raw["base_model"] = str(base)
    if top:
        raw["parameters"] = top
    return raw


@pytest.mark.parametrize("name", GENERIC)
def test_every_method_runs_through_config_dry_run_and_cli(name, family, tmp_path):
    raw = config_for(name, family)
    cfg = load_config(copy.deepcopy(raw))
    assert cfg.method == registry.get_method(name).name
    plan = m3kernels.merge_checkpoints(copy.deepcopy(raw), tmp_path / "dry", dry_run=True, progress=False)
    assert plan.tensors and not (tmp_path / "dry").exists()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["merge", str(path), str(tmp_path / "out-dry"), "--dry-run", "-q"]) == 0
    skip_unless_cpu_has(registry.get_method(name))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    assert (tmp_path / "out" / "m3kernels_merge.yaml").is_file()


PARAM_CASES = [
    (m.name, p) for m in registry.METHODS.values() for p in m.params if p.config and m.name not in DATA_AWARE
]


@pytest.mark.parametrize("name,param", PARAM_CASES, ids=[f"{n}-{p.name}" for n, p in PARAM_CASES])
def test_declared_parameters_are_accepted(name, param, family):
    value = non_default(param)
    raw = config_for(name, family, **{param.name: value})
    if param.name == "drop_rate" and "density" in raw["parameters"] and name != "ties_dare":
        raw["parameters"]["density"] = 1.0 - value  # the two must agree
    if param.name == "weight" and name == "linear":
        raw["parameters"]["weight"] = 0.8
    cfg = load_config(raw)
    kw = cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight", 2)
    if param.name == "drop_rate" and not registry.get_method(name).trim:
        assert kw["density"] == pytest.approx([1.0 - value] * 2)  # folded into the keep density
    elif param.api:
        assert kw[param.api] is not None


UNTAKEN = [
    (m.name, q)
    for m in registry.METHODS.values()
    for q in registry.all_config_params()
    if not m.takes(q, in_config=True)
    and q not in {"rescale"}
    and q not in config.IGNORED_LIKE_MERGEKIT.get(m.name, ())
]  # rescale: false is mergekit's no-op default (accepted); mergekit ignores density under task_arithmetic


@pytest.mark.parametrize("name,param", UNTAKEN, ids=[f"{n}-{p}" for n, p in UNTAKEN])
def test_untaken_parameters_are_rejected_naming_them(name, param, family):
    raw = config_for(name, family, **{param: 0.5})
    with pytest.raises(MergeConfigError) as ei:
        load_config(raw)
    assert f"parameters.{param}" in str(ei.value) and "methods that do" in str(ei.value)


def test_unknown_method_names_the_supported_ones(family):
    with pytest.raises(MergeConfigError) as ei:
        load_config(config_for("ties", family) | {"merge_method": "frankenmerge"})
    assert all(n in str(ei.value) for n in NAMES)
    with pytest.raises(ValueError) as ei:
        m3kernels.merge_tensors(None, [torch.ones(2)], method="frankenmerge")
    assert all(n in str(ei.value) for n in NAMES)


def test_cli_methods_lists_every_method_and_parameter(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in registry.METHODS.values():
        assert f"{m.name}" in out
        for p in m.params:
            assert p.name in out
    assert cli.main(["methods", "frankenmerge"]) == 2  # not a method (every mergekit 0.1.5 method is one now)


def test_every_available_backend_satisfies_the_protocol():
    from m3kernels.backends import _load, available_backends
    from m3kernels.backends.protocol import Backend

    for name in ("cpu", "triton", "cuda"):
        mod = __import__(f"m3kernels.backends.{name}", fromlist=["x"])
        assert isinstance(mod, Backend), name  # every declared function exists, available or not
    for name, state in available_backends().items():
        if state == "available":
            assert isinstance(_load(name), Backend)
