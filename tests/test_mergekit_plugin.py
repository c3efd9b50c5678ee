"""The mergekit plugin (m3kernels/integrations/mergekit_plugin.py) inside mergekit 0.1.5.

Runs only when ``M3K_MERGEKIT_VENV`` names a virtual environment with mergekit 0.1.5 (its
``bin/python``); the plugin and this checkout reach it through PYTHONPATH. On a tiny float32 Llama
(base + 2 fine-tunes), one mergekit process runs: the plugin's ``m3k_ties``, ``m3k_linear``,
``m3k_dare_ties`` and ``m3k_task_arithmetic``, mergekit's own ``ties`` and ``linear``, ``ties``
with ``replace=True`` (ours in mergekit's place), and the command-line wrapper. Checked: the
plugin's outputs are the bytes of ``m3kernels merge`` of the same config (DARE included: same
seed, same tensor names), and mergekit's own ``ties`` / ``linear`` (``dtype: float32``) are within
one float32 ulp of ours, or within a few float32 roundings of the terms where a sum nearly cancels, with positive weights (mergekit's magnitude trim and ours agree when the
k-th magnitude is unique, which it is in these float32 tensors; the agreement test is on the sign
of w_i·δ_i in both, so negative weights agree too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

VENV = os.environ.get("M3K_MERGEKIT_VENV")
PY = Path(VENV) / "bin" / "python" if VENV else None
pytestmark = pytest.mark.skipif(
    not (PY and PY.exists()), reason="set M3K_MERGEKIT_VENV to a venv with mergekit 0.1.5 (bin/python)"
)
REPO = Path(__file__).resolve().parent.parent

DRIVER = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from m3kernels.integrations import mergekit_plugin as plugin

jobs = json.loads(sys.argv[1])
plugin.register(seed=7)
for cfg_path, out, replace in jobs:
    if replace:
        plugin.register(seed=7, replace=True)
    with open(cfg_path) as f:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    if replace:
        plugin.unregister()
        plugin.register(seed=7)
import mergekit.merge_methods.registry as r
registered = sorted(k for k in r._METHODS if k.startswith("m3k_"))

# every method through mergekit's own tensor API, against merge_tensors in this process
import torch
from mergekit.merge_methods.api import merge_tensors as mk_merge
from m3kernels.api import merge_tensors
from m3kernels.merge import registry as reg

VALUES = {"fraction": 0.5, "number": 0.5, "int": 2, "bool": False, "rescale": True}
g = torch.Generator().manual_seed(3)
b = torch.randn(23, 17, generator=g)
xs = [b + 0.1 * torch.randn(23, 17, generator=g) for _ in range(2)]
generic = {}
for m in reg.METHODS.values():
    if m.family == "data_aware":  # fisher, regmean: not registered (no statistics in mergekit)
        continue
    req = [p for p in m.params if p.config and p.default == reg.REQUIRED]
    mk_params = {p.name: VALUES.get(p.kind, 0.5) for p in req}
    kw = {p.api: VALUES.get(p.kind, 0.5) for p in req if p.api}
    # the plugin's defaults are a config's (mergekit's density 1, L1 rescale), not the tensor API's
    kw.update({p.api: p.config_default for p in m.params if p.config and p.api and p.config_default is not None and p.default != reg.REQUIRED and p.api not in kw})
    with_base = m.needs_base or m.program.uses_base  # required, or used when given
    try:
        ref = merge_tensors(b if with_base else None, xs, method=m.name, seed=7, name="t", **kw)
    except ValueError as exc:
        ref = exc
    try:
        if with_base:
            got = mk_merge([b, *xs], "m3k_" + m.name, base_index=0, name="t", parameters=mk_params)
        else:
            got = mk_merge(xs, "m3k_" + m.name, name="t", parameters=mk_params)
    except Exception as exc:
        got = exc
    if isinstance(ref, Exception):
        generic[m.name] = "both raise" if isinstance(got, Exception) else f"only ours raises: {ref}"
    elif isinstance(got, Exception):
        generic[m.name] = f"plugin raises {type(got).__name__}: {got}"
    else:
        generic[m.name] = "same" if torch.equal(got.view(torch.int32), ref.view(torch.int32)) else "differ"
print(json.dumps({"registered": registered, "generic": generic}))
"""


def _config(method, family, *, base=True, weights=(0.7, 0.4), **params):
    dens = [0.5, 0.6]
    models = []
    for i, d in enumerate(family.model_dirs):
        p = {"weight": weights[i]}
        if "ties" in method or "dare" in method:
            p["density"] = dens[i]
        models.append({"model": str(d), "parameters": p})
    cfg = {"merge_method": method, "models": models, "dtype": "float32", "parameters": params}
    if base:
        cfg["base_model"] = str(family.base_dir)
    return cfg


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from m3kernels.checkpoint.run import merge_checkpoints
    from m3kernels.synthetic import make_family, tiny

    root = tmp_path_factory.mktemp("mkplugin")
    family = make_family(
        root, n_models=2, dtype=torch.float32, shards=1, shapes=tiny(layers=1), tokenizer=False
    )
    cases = {
        "m3k_ties": _config("m3k_ties", family),
        "m3k_linear": _config("m3k_linear", family, base=False),
        "m3k_dare_ties": _config("m3k_dare_ties", family),
        "m3k_task_arithmetic": _config("m3k_task_arithmetic", family, weights=(0.7, -0.4), **{"lambda": 0.8}),
        "mk_ties": _config("ties", family),
        "mk_linear": _config("linear", family, base=False),
        "replaced_ties": _config("ties", family),
    }
    jobs = []
    for key, cfg in cases.items():
        path = root / f"{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        jobs.append([str(path), str(root / f"out_{key}"), key.startswith("replaced")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(PY), "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = {}
    for key in ("m3k_ties", "m3k_linear", "m3k_dare_ties", "m3k_task_arithmetic"):
        cfg = dict(cases[key], merge_method=key[len("m3k_") :], seed=7)
        path = root / f"ours_{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        merge_checkpoints(str(path), str(root / f"ours_{key}"), device="cpu", progress=False)
        ours[key] = _load(root / f"ours_{key}")
    outs = {key: _load(root / f"out_{key}") for key in cases}
    return outs, ours, report, family, root, env


def test_every_method_registered(runs):
    from m3kernels.merge.registry import METHODS

    _, _, report, *_ = runs
    assert report["registered"] == sorted(
        "m3k_" + m for m, spec in METHODS.items() if spec.family != "data_aware"
    )


def test_every_method_through_mergekits_api(runs):
    """Each m3k_<method> via mergekit's merge_tensors (required parameters set) gives the bytes
    of m3kernels.merge_tensors, or both refuse the arguments."""
    _, _, report, *_ = runs
    bad = {m: r for m, r in report["generic"].items() if r not in ("same", "both raise")}
    assert not bad, bad
    assert sum(r == "same" for r in report["generic"].values()) >= 6


@pytest.mark.parametrize("key", ["m3k_ties", "m3k_linear", "m3k_dare_ties", "m3k_task_arithmetic"])
def test_plugin_equals_m3kernels_merge(runs, key):
    outs, ours, *_ = runs
    got, ref = outs[key], ours[key]
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.int32), t.view(torch.int32)), (
            name
        )


def test_replace_puts_ours_in_mergekits_place(runs):
    outs, ours, *_ = runs
    for name, t in ours["m3k_ties"].items():
        assert torch.equal(outs["replaced_ties"][name], t), name


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_mergekits_own_agrees_to_float32_rounding(runs, method):
    """mergekit's own result within one ulp, or (where the sum nearly cancels) within a few float32
    roundings of the terms: mergekit's addcmul and its operation order round differently."""
    outs, _, _, family, *_ = runs
    mk, ours = outs[f"mk_{method}"], outs[f"m3k_{method}"]
    assert set(mk) == set(ours)
    w = (0.7, 0.4)
    same = total = 0
    for name, a in mk.items():
        b = family.base[name].double()
        xs = [m[name].double() for m in family.models]
        if method == "linear":
            scale = sum(wi * x.abs() for wi, x in zip(w, xs)) / sum(w)
        else:
            scale = b.abs() + sum(wi * (x - b).abs() for wi, x in zip(w, xs)) / min(w)
        o = ours[name]
        diff = (a.double() - o.double()).abs()
        one_ulp = (torch.nextafter(o.abs(), torch.tensor(float("inf"))) - o.abs()).double()
        ok = (diff <= one_ulp) | (diff <= 8 * 2.0**-24 * scale)
        assert bool(ok.all()), f"{name}: {int((~ok).sum())} elements off"
        same += int((a.view(torch.int32) == o.view(torch.int32)).sum())
        total += a.numel()
    assert same > 0.5 * total  # most elements are bit-identical


def test_command_line_wrapper(runs, tmp_path):
    _, ours, _, family, root, env = runs
    out = tmp_path / "cli_out"
    cmd = [
        str(PY),
        "-m",
        "m3kernels.integrations.mergekit_plugin",
        str(root / "m3k_dare_ties.yaml"),
        str(out),
    ]
    proc = subprocess.run([*cmd, "--m3k-seed", "7"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = _load(out)
    for name, t in ours["m3k_dare_ties"].items():
        assert torch.equal(got[name].view(torch.int32), t.view(torch.int32)), name
    bad = subprocess.run([*cmd, "--m3k-seed", "x"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--m3k-seed" in bad.stderr
    helped = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "--m3k-replace" in helped.stdout and "CONFIG_FILE" in helped.stdout


def test_example_runs(runs, tmp_path):
    *_, env = runs
    script = REPO / "python" / "mergekit_plugin_example.py"
    proc = subprocess.run(
        [str(PY), str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "elements identical" in proc.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
