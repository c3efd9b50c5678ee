"""Parity harness: ``m3kernels merge`` against mergekit 0.1.5 itself, config by config.

For each case (a merge method with explicit parameters, gradients and filters included; M³ off)
one mergekit YAML is written and merged three times on the same small Llama-shaped checkpoints
(``m3kernels.synthetic``: a base and three fine-tunes, in bfloat16 and in float32, three layers,
odd sizes, embeddings, ``lm_head`` and norms):

* ``mk32``: ``mergekit-yaml`` with ``dtype: float32`` (issue 8's parity target),
* ``mk64``: ``mergekit-yaml`` with ``dtype: float64`` (the accurate oracle: mergekit's CPU float32
  norms are inaccurate, docs/MERGEKIT_METHODS.md §1.4),
* ``ours``: ``m3kernels merge`` on the ``dtype: float32`` YAML, unchanged.

Every output tensor is compared: against ``mk32`` the distance in float32 ulps and the fraction of
bit-equal elements; against ``mk64`` the distance in ulps of its float32 rounding and the largest
difference relative to the tensor's largest magnitude (for ours and, as the yardstick, for
``mk32``). Magnitude trims (ties, breadcrumbs*) are also compared away from their trim ties
(elements whose |δ| equals a model's threshold: mergekit keeps exactly k of them in argsort's
order, we keep all of them; docs/MERGEKIT_METHODS.md §2). Random methods (dare_*, della*) are
compared by statistics of the output delta (fraction changed, mean, std) with z-scores.

Cases exist for all of mergekit 0.1.5's methods; those that ``m3kernels.merge.registry.METHODS``
does not know (read at run time) are listed as unsupported. A ``defaults`` section runs each
method with only mergekit's required parameters, and the parameter declarations of both
registries (mergekit's ``ParameterSpec`` defaults, read from the venv) are compared.

mergekit runs inside its own virtual environment (``--mergekit-venv``, created by
``bench_mergekit.ensure_mergekit`` if missing): by default one process of that venv's Python runs
every job through mergekit-yaml's own command object (``mergekit.scripts.run_yaml.main``, the same
code as the console script, without paying the ~4 s start-up per job); ``--mergekit-cli`` runs the
``mergekit-yaml`` executable per job instead. Ours runs in this process through
``m3kernels.cli.main`` (the console script's entry point). Both merges of a family run
concurrently (two cores).

Usage::

    python bench/mergekit_parity.py --json bench/out/parity.json
    python bench/mergekit_parity.py --only slerp,ties --families f32
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path("/work/bench_data/mk-venv")
DEFAULT_WORK = Path("/tmp/m3k-parity")
SEED = 1234
INPUT_VERSION = 1  # bump when the generated inputs change

# every merge method mergekit 0.1.5 registers
MERGEKIT_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "ram",
    "ramplus_tl",
    "passthrough",
    "sce",
    "arcee_fusion",
)
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
TRIM_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")
# methods whose coefficients come from whole-tensor / row norms (compared against mk64, §1.4)
NORM_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock")
# exact elementwise programs: bit-exact against mk32 expected (outside trim ties)
ELEMENTWISE_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "nearswap",
    "ram",
    "passthrough",
    "arcee_fusion",
)

# tolerances of the verdicts (docs/MERGEKIT_PARITY.md)
TOL_ULP = 1  # float32 ulps against mk32 for the non-elementwise deterministic methods
TOL_NORM_ULP = 2  # tensor-scale float32 ulps against mk64 for the norm-based methods
TOL_Z = 5.0  # |z| of the random methods' statistics
# ties with rescale: true: the L1 factor from float64 sums (ours) vs float32 sums (mergekit) may
# differ by one float32 rounding, the merged values by ~2 roundings (docs/MERGEKIT_PARITY.md)
TOL_L1_FACTOR_TS_ULP = 2
TRIM_RESCALE = ("ties", "breadcrumbs", "breadcrumbs_ties")  # rescale: true = the L1 after the trim

FAMILIES = {"bf16": "bfloat16", "f32": "float32"}


# =========================================================================== mergekit driver
# (runs inside the mergekit venv: only the standard library and mergekit are imported)


def driver_main(jobs_file: str, results_file: str, cli: bool = False) -> int:
    """Run every job of ``jobs_file`` with mergekit-yaml's command object (``cli``: the
    ``mergekit-yaml`` executable next to this Python, one process per job); write the results."""
    import logging

    jobs = json.loads(Path(jobs_file).read_text())
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.scripts.run_yaml import main as mk_main

    specs = {}
    for m in mk_registry.registered_methods():
        s = m.spec
        params = []
        for p in s.parameters:
            params.append(
                {
                    "name": p.name,
                    "scope": str(getattr(p.scope, "value", p.scope)),
                    "required": bool(p.required),
                    "default": None if p.required else _jsonable(p.default),
                    "type": getattr(p.value_type, "__name__", str(p.value_type)),
                }
            )
        c = s.contract
        specs[s.name] = {
            "params": params,
            "base": str(getattr(c.base, "value", c.base)),
            "min_inputs": c.min_inputs,
            "max_inputs": c.max_inputs,
            "min_non_base": c.min_non_base,
            "max_non_base": c.max_non_base,
        }
    results = []
    for job in jobs:
        out = Path(job["out"])
        if out.exists():
            shutil.rmtree(out)
        args = [job["config"], str(out), "--quiet", "--random-seed", str(job["seed"])]
        args += ["--lora-merge-cache", str(out) + ".lora-cache"]  # where mergekit merges LoRA inputs
        if not job.get("copy_tokenizer"):
            args.insert(2, "--no-copy-tokenizer")
        t0 = time.perf_counter()
        err = None
        buf = io.StringIO()
        try:
            if cli:
                exe = Path(sys.executable).parent / "mergekit-yaml"
                p = subprocess.run([str(exe), *args], capture_output=True, text=True)
                if p.returncode:
                    lines = [ln for ln in p.stderr.splitlines() if ln.strip()] or [f"exit {p.returncode}"]
                    err = lines[-1][:400]
            else:
                with contextlib.redirect_stderr(buf):
                    mk_main.main(args=args, standalone_mode=False)
        except BaseException as exc:  # noqa: BLE001 - report whatever mergekit raised
            err = (f"{type(exc).__name__}: {exc}".strip().splitlines() or ["?"])[0][:400]
        logging.getLogger().handlers.clear()
        results.append({"id": job["id"], "seconds": time.perf_counter() - t0, "error": err})
    Path(results_file).write_text(json.dumps({"specs": specs, "results": results}, indent=1))
    return 0


# mergekit 0.1.5's merge function objects, for merges of plain tensors (no checkpoints)
DIRECT_METHODS = {
    "sce": ("mergekit.merge_methods.sce", "sce_merge"),
    "arcee_fusion": ("mergekit.merge_methods.arcee_fusion", "arcee_fusion_merge_method"),
}
_DIRECT_SCRIPT = """
import importlib, sys, torch
from mergekit.merge_methods.base import TensorGroup
job = torch.load(sys.argv[1])
torch.set_num_threads(job["threads"])
fn = getattr(importlib.import_module(job["module"]), job["name"])
outs = []
for base, models, params in job["merges"]:
    group = TensorGroup.from_tensors(list(models) + [base], base_index=len(models))
    outs.append(fn.merge_group(group, **params))
torch.save(outs, sys.argv[2])
"""


def direct_merges(venv: Path, method: str, merges: list, threads: int = 1) -> list:
    """mergekit 0.1.5's own ``method`` on tensors: ``merges`` is a list of (base, [models],
    {parameter: value}); the venv's Python runs the registered merge function's ``merge_group``
    on a TensorGroup (the models, then the base) per merge, with ``threads`` torch threads.
    Returns the output tensors (in the inputs' dtype, as mergekit computes)."""
    import tempfile

    import torch

    module, name = DIRECT_METHODS[method]
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.pt", Path(tmp) / "out.pt"
        torch.save({"module": module, "name": name, "threads": threads, "merges": merges}, job)
        subprocess.run(
            [str(mergekit_python(venv)), "-c", _DIRECT_SCRIPT, str(job), str(out)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        return torch.load(out)


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


# =========================================================================== inputs

SHAPES_KW = dict(vocab=131, hidden=36, intermediate=97, layers=3, heads=3, kv_heads=1)
# ft1's PEFT LoRA adapter (m3kernels.synthetic.write_lora_adapter): linear layers and the embedding
LORA_INPUT = dict(targets=["q_proj", "v_proj", "up_proj", "embed_tokens"], r=4, alpha=8, seed=SEED)
NOISE = 0.02  # fine-tune noise std (base std 0.05): cos(base, ft) ≈ 0.93, slerp's spherical branch
N_FT = 3


def make_inputs(work: Path, families=tuple(FAMILIES)) -> dict:
    """{family: {"base": dir, "ft1": dir, ...}}, generated once (reused when the stamp matches)."""
    import torch

    from m3kernels import synthetic

    out = {}
    for fam in families:
        root = work / "inputs" / fam
        stamp = root / "STAMP.json"
        want = {"version": INPUT_VERSION, "shapes": SHAPES_KW, "noise": NOISE, "n": N_FT, "seed": SEED}
        want["lora"] = LORA_INPUT  # the PEFT adapter of the LoRA cases
        dirs = {"base": root / "base", **{f"ft{i + 1}": root / f"ft{i + 1}" for i in range(N_FT)}}
        if not (stamp.exists() and json.loads(stamp.read_text()) == want):
            if root.exists():
                shutil.rmtree(root)
            synthetic.make_family(
                root,
                n_models=N_FT,
                dtype=getattr(torch, FAMILIES[fam]),
                shards=1,
                seed=SEED,
                shapes=synthetic.LlamaShapes(**SHAPES_KW),
                std=0.05,
                noise=NOISE,
                tokenizer=False,
            )
            shapes = synthetic.LlamaShapes(**SHAPES_KW).shapes()
            synthetic.write_lora_adapter(root / "lora1", shapes, **LORA_INPUT)
            stamp.write_text(json.dumps(want))
        out[fam] = {k: str(v) for k, v in dirs.items()}
        out[fam]["ft1+lora1"] = f"{dirs['ft1']}+{root / 'lora1'}"  # a LoRA reference (mergekit's MODEL+LORA)
    return out


# =========================================================================== cases


@dataclass
class Case:
    """One merge config, written for any input family (model keys: base, ft1, ft2, ft3)."""

    method: str
    label: str
    section: str  # explicit | defaults | edge
    models: list  # [(key, {params})]
    base: bool = True  # base_model: base
    parameters: dict = field(default_factory=dict)
    note: str = ""
    slices: bool = False  # mergekit's trivial slices form: one slice, every source over all layers
    # mergekit slices (section "slices"): [{"sources": [(key, [a, b], {params})], "base": key,
    # "parameters": {...}}]; module_parameters: written as modules: {default: {slices, parameters}}
    slice_spec: list | None = None
    module_parameters: dict | None = None

    @property
    def id(self) -> str:
        return f"{self.section}:{self.method}:{self.label}"

    @property
    def kind(self) -> str:
        if self.method in RANDOM_METHODS:
            return "random"
        if self.method in NORM_METHODS:
            return "norm"
        if self.method in ELEMENTWISE_METHODS:
            return "elementwise"
        return "ulp"

    def config(self, dirs: dict, dtype: str) -> dict:
        cfg = {"merge_method": self.method}
        if self.base:
            cfg["base_model"] = dirs["base"]
        entries = [{"model": dirs[k], **({"parameters": p} if p else {})} for k, p in self.models]
        if self.slice_spec is not None:
            out = []
            for sl in self.slice_spec:
                srcs = [
                    {"model": dirs[k], "layer_range": list(r), **({"parameters": p} if p else {})}
                    for k, r, p in sl["sources"]
                ]
                one = {"sources": srcs}
                if sl.get("base"):
                    one["base_model"] = dirs[sl["base"]]
                if sl.get("parameters"):
                    one["parameters"] = sl["parameters"]
                out.append(one)
            if self.module_parameters is not None:
                cfg["modules"] = {"default": {"slices": out, "parameters": self.module_parameters}}
            else:
                cfg["slices"] = out
        elif self.slices:
            rng = [0, SHAPES_KW["layers"]]
            if self.base and "base" not in {k for k, _ in self.models}:
                entries.append({"model": dirs["base"]})
            cfg["slices"] = [{"sources": [{**e, "layer_range": list(rng)} for e in entries]}]
        else:
            cfg["models"] = entries
        if self.parameters:
            cfg["parameters"] = self.parameters
        cfg["dtype"] = dtype
        return cfg


def _m(key, **params):
    return (key, params)


ATTN_MLP_T = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]


def explicit_cases() -> list:
    """Each method with every parameter given (so default differences cannot hide semantic ones)."""
    E = "explicit"
    cases = [
        Case(
            "linear",
            "weights",
            E,
            [_m("ft1", weight=0.5), _m("ft2", weight=0.3), _m("ft3", weight=0.2)],
            base=False,
            parameters={"normalize": True},
        ),
        Case(
            "linear",
            "gradient+filter",
            E,
            [
                _m("ft1", weight=[0.2, 0.8]),
                _m("ft2", weight=[{"filter": "mlp", "value": 0.5}, {"value": 0.25}]),
            ],
            base=False,
            parameters={"normalize": False},
        ),
        Case(
            "task_arithmetic",
            "weights+lambda",
            E,
            [_m("ft1", weight=0.7), _m("ft2", weight=0.5), _m("ft3", weight=0.3)],
            parameters={"lambda": 0.9, "normalize": False},
        ),
        Case(
            "task_arithmetic",
            "lora-input",
            E,
            [_m("ft1+lora1", weight=0.7), _m("ft2", weight=0.5)],
            parameters={"lambda": 0.9, "normalize": False},
            note="ft1 with a PEFT LoRA adapter (MODEL+LORA): mergekit merges it into a cached copy first",
        ),
        Case(
            "task_arithmetic",
            "gradient+filter",
            E,
            [
                _m("ft1", weight=[1.0, 0.2, 0.6]),
                _m("ft2", weight=[{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]),
            ],
            parameters={"lambda": 1.0, "normalize": True},
            note="gradient over the post weights (final norm, lm_head): mergekit 0.1.5 gives them t = 0",
        ),
        Case(
            "ties",
            "density+weights",
            E,
            [
                _m("ft1", weight=0.6, density=0.5),
                _m("ft2", weight=0.4, density=0.3),
                _m("ft3", weight=0.5, density=0.7),
            ],
            parameters={"normalize": True, "lambda": 1.0},
        ),
        Case(
            "ties",
            "gradient+filter",
            E,
            [
                _m("ft1", weight=1.0, density=[0.3, 0.8]),
                _m("ft2", weight=[{"filter": "mlp", "value": 0.5}, {"value": 1.0}], density=0.6),
            ],
            parameters={"normalize": False, "lambda": 0.8},
        ),
        Case(
            "dare_linear",
            "density+rescale",
            E,
            [_m("ft1", weight=0.5, density=0.6), _m("ft2", weight=0.5, density=0.8)],
            parameters={"rescale": True, "normalize": False, "lambda": 1.0},
        ),
        Case(
            "dare_linear",
            "no-rescale",
            E,
            [_m("ft1", weight=0.7, density=0.5), _m("ft2", weight=0.3, density=0.5)],
            parameters={"rescale": False, "normalize": False, "lambda": 1.0},
        ),
        Case(
            "dare_ties",
            "density+rescale",
            E,
            [
                _m("ft1", weight=0.6, density=0.5),
                _m("ft2", weight=0.4, density=0.7),
                _m("ft3", weight=0.5, density=0.6),
            ],
            parameters={"rescale": True, "normalize": False, "lambda": 1.0},
        ),
        Case(
            "breadcrumbs",
            "density+gamma",
            E,
            [_m("ft1", weight=0.6, density=0.6, gamma=0.05), _m("ft2", weight=0.4, density=0.5, gamma=0.1)],
            parameters={"normalize": False, "rescale": False, "lambda": 1.0},
        ),
        Case(
            "breadcrumbs_ties",
            "density+gamma",
            E,
            [_m("ft1", weight=0.6, density=0.6, gamma=0.05), _m("ft2", weight=0.4, density=0.5, gamma=0.1)],
            parameters={"normalize": True, "rescale": False, "lambda": 1.0},
        ),
        Case(
            "della",
            "density+epsilon",
            E,
            [
                _m("ft1", weight=0.6, density=0.5, epsilon=0.1),
                _m("ft2", weight=0.4, density=0.6, epsilon=0.2),
            ],
            parameters={"normalize": True, "rescale": True, "lambda": 1.0},
        ),
        Case(
            "della",
            "one-model",
            E,
            [_m("ft1", weight=0.8, density=0.4, epsilon=0.3)],
            parameters={"rescale": True},
            note="per-tensor L1 ratio and kept fraction per rank decile",
        ),
        Case(
            "della_linear",
            "density+epsilon",
            E,
            [
                _m("ft1", weight=0.6, density=0.5, epsilon=0.1),
                _m("ft2", weight=0.4, density=0.6, epsilon=0.2),
            ],
            parameters={"normalize": False, "rescale": True, "lambda": 1.0},
        ),
        Case("slerp", "t", E, [_m("base"), _m("ft1")], parameters={"t": 0.3}),
        Case(
            "slerp",
            "gradient+filter",
            E,
            [_m("base"), _m("ft1")],
            parameters={"t": ATTN_MLP_T},
            note="the classic published slerp config (#70)",
        ),
        Case(
            "nuslerp",
            "flatten",
            E,
            [_m("ft1", weight=0.4), _m("ft2", weight=0.6)],
            parameters={"nuslerp_flatten": True, "nuslerp_row_wise": False},
        ),
        Case(
            "nuslerp",
            "rows",
            E,
            [_m("ft1", weight=0.4), _m("ft2", weight=0.6)],
            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": False},
        ),
        Case(
            "nuslerp",
            "columns",
            E,
            [_m("ft1", weight=0.7), _m("ft2", weight=0.3)],
            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        ),
        Case(
            "nuslerp",
            "no-base",
            E,
            [_m("ft1", weight=0.4), _m("ft2", weight=0.6)],
            base=False,
            parameters={"nuslerp_flatten": True, "nuslerp_row_wise": False},
        ),
        Case(
            "multislerp",
            "weights",
            E,
            [_m("ft1", weight=0.5), _m("ft2", weight=0.3), _m("ft3", weight=0.2)],
            parameters={"normalize_weights": True, "eps": 1e-8},
        ),
        Case(
            "multislerp",
            "no-base-gradient",
            E,
            [_m("ft1", weight=[0.2, 0.8]), _m("ft2", weight=0.5)],
            base=False,
            parameters={"normalize_weights": True, "eps": 1e-8},
        ),
        Case(
            "karcher",
            "no-base",
            E,
            [_m("ft1"), _m("ft2"), _m("ft3")],
            base=False,
            parameters={"max_iter": 10, "tol": 1e-5},
        ),
        Case(
            "karcher",
            "with-base",
            E,
            [_m("ft1"), _m("ft2")],
            parameters={"max_iter": 5, "tol": 1e-6},
            note="mergekit adds the base as one more point of the mean",
        ),
        Case(
            "model_stock",
            "tensor",
            E,
            [_m("ft1"), _m("ft2"), _m("ft3")],
            parameters={"filter_wise": False},
        ),
        Case(
            "model_stock",
            "filter_wise",
            E,
            [_m("ft1"), _m("ft2")],
            parameters={"filter_wise": True},
        ),
        Case("nearswap", "t", E, [_m("ft1")], parameters={"t": 0.01}),
        Case(
            "nearswap",
            "gradient+filter",
            E,
            [_m("ft1")],
            parameters={"t": [{"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.02}]},
        ),
        Case("ram", "epsilon", E, [_m("ft1"), _m("ft2"), _m("ft3")], parameters={"epsilon": 0.01}),
        Case(
            "ramplus_tl",
            "r+alpha+epsilon",
            E,
            [_m("ft1"), _m("ft2"), _m("ft3")],
            parameters={"r": 0.3, "alpha": 0.5, "epsilon": 0.01},
        ),
        Case(
            "passthrough",
            "scale-filter",
            E,
            [
                _m(
                    "ft1",
                    scale=[
                        {"filter": "o_proj", "value": 0.5},
                        {"filter": "down_proj", "value": [0.25, 1.0]},
                        {"value": 1.0},
                    ],
                )
            ],
            base=False,
        ),
        Case("sce", "select_topk", E, [_m("ft1"), _m("ft2"), _m("ft3")], parameters={"select_topk": 0.5}),
        Case(
            "sce",
            "select_topk-gradient-filter",
            E,
            [_m("ft1"), _m("ft2")],
            parameters={
                "select_topk": [
                    {"filter": "self_attn", "value": [0.1, 0.9]},
                    {"filter": "mlp", "value": 0.3},
                    {"value": 1.0},
                ],
                "int8_mask": True,
            },
        ),
        Case("arcee_fusion", "plain", E, [_m("ft1")]),
    ]
    return cases


def edge_cases() -> list:
    """Known or suspected semantic differences, probed on purpose (docs/MERGEKIT_METHODS.md §2)."""
    G = "edge"
    return [
        Case(
            "ties",
            "negative-weight",
            G,
            [_m("ft1", weight=0.8, density=0.5), _m("ft2", weight=-0.5, density=0.5)],
            parameters={"normalize": False, "lambda": 1.0},
            note="mergekit votes on the sign of w_i·δ_i, docs/KERNEL.md on the sign of δ_i",
        ),
        Case(
            "ties",
            "tiny-density",
            G,
            [_m("ft1", weight=0.5, density=0.001), _m("ft2", weight=0.5, density=0.001)],
            parameters={"normalize": True, "lambda": 1.0},
            note="k = max(1, floor(d·n)) in mergekit, floor(d·n) in ours (norms: n = 36 → k = 0 vs 1)",
        ),
        Case(
            "ties",
            "rescale-true",
            G,
            [_m("ft1", weight=0.6, density=0.5), _m("ft2", weight=0.4, density=0.3)],
            parameters={"normalize": True, "lambda": 1.0, "rescale": True},
            note="mergekit applies its L1 rescale after the magnitude trim (its sums float32, ours "
            "float64: judged at 2 tensor-scale ulps)",
        ),
        Case(
            "breadcrumbs",
            "rescale-true",
            G,
            [_m("ft1", weight=0.6, density=0.6, gamma=0.05), _m("ft2", weight=0.4, density=0.5, gamma=0.1)],
            parameters={"normalize": False, "lambda": 1.0, "rescale": True},
            note="mergekit applies its L1 rescale after the window trim (its sums float32, ours "
            "float64: judged at 2 tensor-scale ulps)",
        ),
        Case(
            "task_arithmetic",
            "density-ignored",
            G,
            [_m("ft1", weight=0.7, density=0.5), _m("ft2", weight=0.3)],
            parameters={"lambda": 1.0, "normalize": False},
            note="mergekit declares density for task_arithmetic and ignores it (no sparsifier)",
        ),
        Case(
            "task_arithmetic",
            "trivial-slices",
            G,
            [_m("ft1", weight=[1.0, 0.2, 0.6]), _m("ft2", weight=0.5)],
            parameters={"lambda": 1.0, "normalize": False},
            slices=True,
            note="issue 9: one slice with every source over all layers is the same as models",
        ),
        Case(
            "sce",
            "select_topk-0",
            G,
            [_m("ft1"), _m("ft2")],
            parameters={"select_topk": 0.0},
            note="nothing selected: every task vector masked, the output is the base",
        ),
        Case(
            "sce",
            "select_topk-negative",
            G,
            [_m("ft1"), _m("ft2"), _m("ft3")],
            parameters={"select_topk": -0.5},
            note="select_topk <= 0 keeps nothing (mergekit: an all-zero mask)",
        ),
        Case(
            "sce",
            "select_topk-above-1",
            G,
            [_m("ft1"), _m("ft2")],
            parameters={"select_topk": 1.5},
            note="select_topk >= 1: no select",
        ),
        Case(
            "sce",
            "one-model-select",
            G,
            [_m("ft1")],
            parameters={"select_topk": 0.7},
            note="one model: every variance is 0, nnz = 0, k = 0: the base",
        ),
        Case(
            "sce",
            "weights-ignored",
            G,
            [_m("ft1", weight=0.3), _m("ft2", weight=2.0)],
            parameters={"select_topk": 0.4},
            note="mergekit's sce declares no weight: accepted with a warning, no effect",
        ),
        Case(
            "dare_linear",
            "rescale-l1-vs-1/d",
            G,
            [_m("ft1", weight=1.0, density=0.3)],
            parameters={"rescale": True, "normalize": False, "lambda": 1.0},
            note="one model at density 0.3: mergekit's L1 rescale vs the 1/density rescale",
        ),
    ]


# mergekit's required parameters, per method (everything else left to the defaults)
_REQUIRED_ONLY = {
    "linear": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)], base=False),
    "task_arithmetic": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "ties": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "dare_linear": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "dare_ties": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "breadcrumbs": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "breadcrumbs_ties": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "della": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "della_linear": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "slerp": dict(models=[_m("base"), _m("ft1")], parameters={"t": 0.5}),
    "nuslerp": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "multislerp": dict(models=[_m("ft1", weight=1.0), _m("ft2", weight=1.0)]),
    "karcher": dict(models=[_m("ft1"), _m("ft2")], base=False),
    "model_stock": dict(models=[_m("ft1"), _m("ft2")]),
    "nearswap": dict(models=[_m("ft1")], parameters={"t": 0.01}),
    "ram": dict(models=[_m("ft1"), _m("ft2")]),
    "ramplus_tl": dict(models=[_m("ft1"), _m("ft2")]),
    "passthrough": dict(models=[_m("ft1")], base=False),
    "sce": dict(models=[_m("ft1"), _m("ft2")]),
    "arcee_fusion": dict(models=[_m("ft1")]),
}


def default_cases() -> list:
    """Each method with mergekit's required parameters only (mergekit's defaults for the rest)."""
    return [Case(m, "required-only", "defaults", **_REQUIRED_ONLY[m]) for m in MERGEKIT_METHODS]


def slice_cases() -> list:
    """mergekit's slices (issue 9): frankenmerges, per-slice parameters and bases, gradients over a
    slice's layers, per-source filters on the source's own layer index, modules: default."""
    S = "slices"
    ft = [_m("ft1"), _m("ft2"), _m("ft3")]
    return [
        Case(
            "passthrough",
            "frankenmerge-repeat",
            S,
            ft,
            base=False,
            slice_spec=[
                {"sources": [("ft1", [0, 2], None)]},
                {"sources": [("ft2", [1, 3], None)]},
                {"sources": [("ft1", [1, 2], None)]},  # ft1's layer 1 a second time
                {
                    "sources": [("ft3", [0, 1], None)],
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]},
                },
            ],
            note="6 output layers from 3-layer models; embeddings from ft1, norm and lm_head from ft3",
        ),
        Case(
            "slerp",
            "two-slices",
            S,
            ft[:1],
            parameters={"t": 0.4},
            slice_spec=[
                {"sources": [("base", [0, 2], None), ("ft1", [0, 2], None)], "parameters": {"t": [0.1, 0.8]}},
                {
                    "sources": [("base", [2, 3], None), ("ft1", [1, 2], None)],
                    "parameters": {"t": [{"filter": "self_attn", "value": 0.9}]},
                },
            ],
            note="t per slice (a gradient over the slice's 2 layers; a filter falling back to the top)",
        ),
        Case(
            "task_arithmetic",
            "gradient-over-slices",
            S,
            ft[:2],
            parameters={"weight": 0.25, "lambda": 1.0},
            slice_spec=[
                {
                    "sources": [("base", [0, 2], None), ("ft1", [1, 3], None), ("ft2", [0, 2], None)],
                    "parameters": {"weight": [0.2, 1.0], "lambda": [{"filter": "mlp", "value": 0.5}]},
                },
                {
                    "sources": [
                        ("base", [1, 3], None),
                        ("ft1", [0, 2], {"weight": [{"filter": "layers.1.", "value": 0.9}, {"value": 0.1}]}),
                        ("ft2", [1, 3], {"weight": [1.0, 0.0, 0.5]}),
                    ]
                },
            ],
            note="t = k/(n-1) within each slice; ft1's filter sees its own layer index",
        ),
        Case(
            "linear",
            "two-slices-weights",
            S,
            ft,
            base=False,
            parameters={"normalize": True},
            slice_spec=[
                {"sources": [("ft1", [0, 2], {"weight": 0.3}), ("ft2", [0, 2], {"weight": 0.7})]},
                {"sources": [("ft2", [2, 3], None), ("ft3", [0, 1], None)], "parameters": {"weight": 0.6}},
            ],
        ),
        Case(
            "task_arithmetic",
            "slice-base",
            S,
            ft,
            parameters={"weight": 0.5},
            slice_spec=[
                {"sources": [("base", [0, 2], None), ("ft1", [0, 2], None)]},
                {"sources": [("ft3", [1, 3], None), ("ft2", [1, 3], None)], "base": "ft3"},
            ],
            note="the second slice merges against ft3; the post weights too (the last slice's base)",
        ),
        Case(
            "task_arithmetic",
            "post-weights-pairing",
            S,
            ft[:2],
            parameters={"weight": 0.6},
            slice_spec=[
                {"sources": [("base", [0, 1], None), ("ft1", [2, 3], None)]},
                {
                    "sources": [
                        ("base", [1, 3], None),
                        ("ft1", [0, 2], None),
                        ("ft2", [1, 3], {"weight": 0.2}),
                    ]
                },
            ],
            note="mergekit merges the post weights from the last slice's first 2 sources (the first slice's count)",
        ),
        Case(
            "task_arithmetic",
            "modules-default",
            S,
            ft[:2],
            parameters={"weight": 0.3, "lambda": 0.9},
            module_parameters={"weight": [{"filter": "self_attn", "value": [0.0, 1.0]}]},
            slice_spec=[
                {"sources": [("base", [0, 3], None), ("ft1", [0, 3], None), ("ft2", [0, 3], None)]},
            ],
        ),
        Case(
            "karcher",
            "base-not-a-source",
            S,
            ft,
            slice_spec=[
                {"sources": [("ft1", [0, 2], None), ("ft2", [1, 3], None)]},
                {"sources": [("ft3", [2, 3], None), ("ft1", [2, 3], None), ("ft2", [0, 1], None)]},
            ],
            note="base_model given but no source of a slice: karcher ignores it (under models it is a point)",
        ),
        Case(
            "nuslerp",
            "two-slices-no-base",
            S,
            ft,
            base=False,
            slice_spec=[
                {"sources": [("ft1", [0, 2], {"weight": 2.0}), ("ft2", [1, 3], {"weight": 1.0})]},
                {"sources": [("ft3", [0, 2], {"weight": 1.0}), ("ft1", [1, 3], {"weight": [1.0, 3.0]})]},
            ],
        ),
        Case(
            "model_stock",
            "slices",
            S,
            ft,
            slice_spec=[
                {
                    "sources": [
                        ("base", [0, 3], None),
                        ("ft1", [0, 3], None),
                        ("ft2", [0, 3], None),
                        ("ft3", [0, 3], None),
                    ]
                },
                {"sources": [("base", [2, 3], None), ("ft3", [1, 2], None), ("ft2", [2, 3], None)]},
            ],
        ),
        Case(
            "task_arithmetic",
            "whole-slice-fewer-layers",
            S,
            ft[:1],
            parameters={"weight": [0.0, 1.0]},
            slice_spec=[{"sources": [("base", [0, 2], None), ("ft1", [0, 2], None)]}],
            note="one slice over the first 2 of 3 layers: a 2-layer model",
        ),
    ]


def all_cases() -> list:
    return explicit_cases() + edge_cases() + default_cases() + slice_cases()


# =========================================================================== mergekit semantics
# (what the comparison needs to know about a config: mergekit 0.1.5's parameter resolution, §1.1)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_position(name: str, num_layers: int) -> float:
    """mergekit 0.1.5's t of a tensor: layer i of L → i/(L−1); everything else (pre and post) 0."""
    m = _LAYER_RE.search(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _gradient(values, t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    x = t * (len(values) - 1)
    j = min(int(math.floor(x)), len(values) - 1)
    f = x - j
    return (1 - f) * float(values[j]) + f * float(values[min(j + 1, len(values) - 1)])


def _leaf(value, name: str, t: float):
    """(found, value) of one parameter source for tensor ``name``."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            flt = entry.get("filter")
            if flt is None or flt == "*" or flt in name:
                return True, _leaf(entry["value"], name, t)[1]
        return False, None
    if isinstance(value, dict) and "value" in value:
        return _leaf([value], name, t)
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return True, _gradient(value, t)
        return True, value[min(int(t * len(value)), len(value) - 1)]
    return True, value


def resolve(case: Case, key: str, param: str, name: str, num_layers: int, default=None):
    """A parameter's value for model ``key`` on tensor ``name``, as mergekit resolves it."""
    t = tensor_position(name, num_layers)
    for k, p in case.models:
        if k == key and param in p:
            found, v = _leaf(p[param], name, t)
            if found:
                return v
    if param in case.parameters:
        found, v = _leaf(case.parameters[param], name, t)
        if found:
            return v
    return default


# =========================================================================== comparison


def _checkpoint(path):
    if "+" in str(path) and not Path(path).exists():  # MODEL+LORA: with the adapter applied (lora.py)
        return _LoraInput(str(path))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mergekit import Checkpoint

    return Checkpoint(Path(path))


class _LoraInput:
    """A ``MODEL+LORA`` input with the interface of bench_mergekit.Checkpoint (names, get, where)."""

    def __init__(self, ref: str):
        from m3kernels.checkpoint.lora import LoraCheckpoint, split_reference

        model, lora = split_reference(ref)
        self._ck = LoraCheckpoint.open(model, lora, role="model", allow_bin=False, follow_symlinks=False)
        self.where = dict.fromkeys(self._ck.names, "")

    def names(self) -> list:
        return sorted(self.where)

    def get(self, name: str):
        t = self._ck.tensor(name).clone()
        self._ck.release(name)
        return t


def ulps32(a, b):
    """|a − b| in float32 ulps (int64 tensor); NaN against NaN counts 0, NaN against a number 2³¹."""
    import torch

    def key(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    d = (key(a) - key(b)).abs()
    na, nb = torch.isnan(a), torch.isnan(b)
    d = torch.where(na & nb, torch.zeros_like(d), d)
    return torch.where(na ^ nb, torch.full_like(d, 1 << 31), d)


def trim_tie_mask(case: Case, name: str, base, fts: dict, num_layers: int):
    """Elements where some model's |δ| equals a boundary value of its magnitude trim (or None)."""
    import torch

    if case.method == "sce":
        return sce_tie_mask(case, name, base, fts, num_layers)
    if case.method not in TRIM_METHODS:
        return None
    b = base.float()
    mask = torch.zeros(b.shape, dtype=torch.bool)
    for key, _ in case.models:
        d = (fts[key].float() - b).abs().reshape(-1)
        n = d.numel()
        dens = float(resolve(case, key, "density", name, num_layers, 1.0))
        if dens >= 1 or dens <= 0:
            continue
        s = torch.sort(d).values
        bounds = []
        # a boundary is ambiguous only when equal values straddle it (sorted ascending: the
        # last kept and the first dropped position hold the same value)
        if case.method == "ties":
            k = max(1, int(math.floor(dens * n)))
            if k < n and s[n - k] == s[n - k - 1]:
                bounds.append(s[n - k])
        else:
            gamma = float(resolve(case, key, "gamma", name, num_layers, 0.01))
            T, G = int(math.floor(dens * n)), int(math.floor(gamma * n))
            B = max(0, n - T - G)
            if T > 0 and B > 0 and s[B] == s[B - 1]:
                bounds.append(s[B])
            if T > 0 and B + T < n and s[B + T - 1] == s[B + T]:
                bounds.append(s[B + T - 1])
        for v in bounds:
            mask |= (d == v).reshape(b.shape)
    return mask


def sce_tie_mask(case: Case, name: str, base, fts: dict, num_layers: int):
    """sce's select: the whole tensor when equal variances straddle the top-k cut (mergekit's topk
    keeps an unspecified k of them, ours the lowest indices; a different choice changes the mean
    squares, so the weights and every element of the tensor), else None."""
    import torch

    s = float(resolve(case, None, "select_topk", name, num_layers, 1.0))
    if s >= 1 or s <= 0:
        return None
    b = base.float()
    var = torch.var(torch.stack([fts[k].float() - b for k, _ in case.models]).double(), dim=0, unbiased=False)
    var = var.float().reshape(-1)
    nnz = int(torch.count_nonzero(var))
    k = int(torch.tensor(float(nnz), dtype=torch.float32) * torch.tensor(s, dtype=torch.float32))
    n = var.numel()
    if k <= 0 or k >= n:
        return None
    top = torch.sort(var, descending=True).values
    if top[k - 1] != top[k]:
        return None
    return torch.ones(b.shape, dtype=torch.bool)


def _tensor_ulp(ref) -> float:
    """One float32 ulp at the tensor's largest magnitude (1e-45 for an all-zero tensor)."""
    top = float(ref.abs().max()) if ref.numel() else 0.0
    if not math.isfinite(top) or top <= 0:
        return 1e-45
    return 2.0 ** (math.floor(math.log2(top)) - 23)


class Agg:
    """Aggregated comparison of many tensors (ours against mk32, and both against mk64).

    Two distances: **ulps**, per element (``ulps32``: exact, but any rounding difference in a
    value near zero after cancellation is many ulps), and **tensor-scale ulps**, |difference|
    in float32 ulps of the tensor's largest |reference| (what a rounding difference of the
    computation is bounded by).
    """

    def __init__(self):
        self.elements = self.equal = self.within_1ulp = self.excluded = self.equal_outside = 0
        self.max_ulps = self.max_ulps_outside = 0
        self.worst = None
        self.max_scaled = 0.0
        self.max_ulps_vs64 = self.mk32_max_ulps_vs64 = 0
        self.max_scaled_vs64 = self.mk32_max_scaled_vs64 = 0.0
        self.worst_vs64 = None
        self.max_rel_vs64 = self.mk32_max_rel_vs64 = 0.0
        self.nonfinite = 0
        self.have64 = False
        self.tensors = []  # (name, max ulps outside ties, bit-equal fraction, tensor-scale ulps)

    def add(self, name, o, m32, m64, excluded):
        import torch

        keep = ~excluded if excluded is not None else torch.ones(o.shape, dtype=torch.bool)
        u = ulps32(o, m32)
        n = u.numel()
        self.elements += n
        self.equal += int((u == 0).sum())
        self.within_1ulp += int((u <= 1).sum())
        mu = int(u.max()) if n else 0
        if mu > self.max_ulps:
            self.max_ulps, self.worst = mu, name
        ui = u[keep]
        self.excluded += n - ui.numel()
        self.equal_outside += int((ui == 0).sum())
        mo = int(ui.max()) if ui.numel() else 0
        self.max_ulps_outside = max(self.max_ulps_outside, mo)
        diff = (o.double() - m32.double()).abs()[keep]
        scaled = float(diff.max()) / _tensor_ulp(m32) if diff.numel() else 0.0
        self.max_scaled = max(self.max_scaled, scaled)
        if mo:
            self.tensors.append((name, mo, float((u == 0).double().mean()), round(scaled, 3)))
        self.nonfinite += int((~torch.isfinite(o)).sum())
        if m64 is None or not keep.any():
            return
        self.have64 = True
        r32 = m64.to(torch.float32)
        unit, top = _tensor_ulp(r32), float(m64.abs().max()) or 1.0
        for who, x in (("ours", o), ("mk32", m32)):
            uu = int(ulps32(x, r32)[keep].max())
            d = float((x.double() - m64).abs()[keep].max())
            if who == "ours":
                if uu > self.max_ulps_vs64:
                    self.max_ulps_vs64, self.worst_vs64 = uu, name
                self.max_scaled_vs64 = max(self.max_scaled_vs64, d / unit)
                self.max_rel_vs64 = max(self.max_rel_vs64, d / top)
            else:
                self.mk32_max_ulps_vs64 = max(self.mk32_max_ulps_vs64, uu)
                self.mk32_max_scaled_vs64 = max(self.mk32_max_scaled_vs64, d / unit)
                self.mk32_max_rel_vs64 = max(self.mk32_max_rel_vs64, d / top)

    def summary(self) -> dict:
        n = max(self.elements, 1)
        return {
            "elements": self.elements,
            "bit_equal_fraction": self.equal / n,
            "within_1ulp_fraction": self.within_1ulp / n,
            "max_ulps": self.max_ulps,
            "worst_tensor": self.worst,
            "trim_ties_excluded": self.excluded,
            "bit_equal_fraction_outside_ties": self.equal_outside / max(self.elements - self.excluded, 1),
            "max_ulps_outside_ties": self.max_ulps_outside,
            "max_diff_in_tensor_scale_ulps": self.max_scaled,
            "max_ulps_vs_f64": self.max_ulps_vs64,
            "worst_tensor_vs_f64": self.worst_vs64,
            "max_tensor_scale_ulps_vs_f64": self.max_scaled_vs64 if self.have64 else None,
            "max_rel_vs_f64": self.max_rel_vs64,
            "mk32_max_ulps_vs_f64": self.mk32_max_ulps_vs64,
            "mk32_max_tensor_scale_ulps_vs_f64": self.mk32_max_scaled_vs64,
            "mk32_max_rel_vs_f64": self.mk32_max_rel_vs64,
            "nonfinite_ours": self.nonfinite,
            "differing_tensors": len(self.tensors),
            "worst_tensors": sorted(self.tensors, key=lambda t: -t[1])[:8],
        }


class RandStats:
    """Moments of (output − base) over the whole model: ours, mk32 and mk64."""

    KEYS = ("ours", "mk32", "mk64")

    def __init__(self):
        self.n = 0
        self.s = {k: [0, 0.0, 0.0, 0.0] for k in self.KEYS}  # changed, Σx, Σx², Σx⁴
        self.l1_dev = {}  # key: max over tensors of |Σ|y − b| / Σ|w·δ| − 1| (single-model cases)

    def add(self, base, dense=None, **outs):
        """``dense``: w·δ of the one model of a single-model case (for the L1-ratio check)."""
        b = base.double()
        self.n += b.numel()
        for k, x in outs.items():
            if x is None:
                continue
            d = x.double() - b
            if dense is not None:
                den = float(dense.double().abs().sum())
                if den > 0:
                    dev = abs(float(d.abs().sum()) / den - 1.0)
                    self.l1_dev[k] = max(self.l1_dev.get(k, 0.0), dev)
            s = self.s[k]
            s[0] += int((d != 0).sum())
            s[1] += float(d.sum())
            s[2] += float((d * d).sum())
            s[3] += float((d**4).sum())

    def _moments(self, k):
        c, s1, s2, s4 = self.s[k]
        n = max(self.n, 1)
        mean = s1 / n
        var = max(s2 / n - mean * mean, 0.0)
        return c / n, mean, math.sqrt(var), s2 / n, s4 / n

    def summary(self) -> dict:
        out = {"elements": self.n}
        for k in self.KEYS:
            if self.s[k][2] == 0 and self.s[k][0] == 0 and k != "ours":
                continue
            p, mean, std, m2, m4 = self._moments(k)
            out[k] = {"changed_fraction": p, "mean": mean, "std": std, "_m2": m2, "_m4": m4}
        n = max(self.n, 1)
        if self.l1_dev:
            out["l1_ratio_max_dev"] = dict(self.l1_dev)
        if "ours" in out and "mk32" in out:
            a, b = out["ours"], out["mk32"]
            se_p = math.sqrt(max(a["changed_fraction"] * (1 - a["changed_fraction"]), 1e-12) * 2 / n)
            se_mean = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / n) or 1e-30
            # SE of the second moment: sqrt((m4 − m2²)/n) each
            se_m2 = (
                math.sqrt(max(a["_m4"] - a["_m2"] ** 2, 0) / n + max(b["_m4"] - b["_m2"] ** 2, 0) / n)
                or 1e-30
            )
            out["z_changed_fraction"] = (a["changed_fraction"] - b["changed_fraction"]) / se_p
            out["z_mean"] = (a["mean"] - b["mean"]) / se_mean
            out["z_second_moment"] = (a["_m2"] - b["_m2"]) / se_m2
            out["std_ratio"] = a["std"] / b["std"] if b["std"] else float("nan")
        return out


class RankDeciles:
    """della with one model: the kept fraction of the nonzero deltas per decile of their magnitude
    rank along dim 1 (a 1-D tensor is one row), ours and mk32, with a two-sample z per decile (the
    keep probability rises with the rank: d − ε at the smallest, d + ε at the largest)."""

    def __init__(self):
        self.n = [0] * 10
        self.kept = {"ours": [0] * 10, "mk32": [0] * 10}

    def add(self, base, model, **outs):
        b = base.float()
        d = model.float() - b
        x = d.reshape(1, -1) if d.dim() < 2 else d
        c = x.shape[1]
        if c < 10:
            return
        rank = x.abs().argsort(dim=1).argsort(dim=1)
        dec = (rank * 10 // c).clamp(max=9)
        nz = x != 0
        for k, y in outs.items():
            yk = (y.float() - b).reshape(x.shape) != 0
            for q in range(10):
                sel = (dec == q) & nz
                if k == "ours":
                    self.n[q] += int(sel.sum())
                self.kept[k][q] += int((yk & sel).sum())

    def summary(self) -> dict:
        fr = {k: [v / max(n, 1) for v, n in zip(vals, self.n)] for k, vals in self.kept.items()}
        zs = []
        for q, n in enumerate(self.n):
            a, b = fr["ours"][q], fr["mk32"][q]
            p = (a + b) / 2
            se = math.sqrt(max(p * (1 - p), 1e-12) * 2 / max(n, 1))
            zs.append((a - b) / se)
        return {"ours": fr["ours"], "mk32": fr["mk32"], "z": zs, "z_max": max(abs(z) for z in zs)}


def compare_case(case: Case, dirs: dict, ours_dir, mk32_dir, mk64_dir) -> dict:
    """Compare the three outputs of one case, tensor by tensor."""
    ours, m32 = _checkpoint(ours_dir), _checkpoint(mk32_dir)
    m64 = _checkpoint(mk64_dir) if mk64_dir else None
    names_o, names_m = set(ours.names()), set(m32.names())
    res = {}
    if names_o != names_m:
        res["tensor_names"] = {
            "only_ours": sorted(names_o - names_m)[:8],
            "only_mergekit": sorted(names_m - names_o)[:8],
        }
    names = sorted(names_o & names_m)
    layers = [
        json.loads((Path(d) / "config.json").read_text()).get("num_hidden_layers")
        for d in (ours_dir, mk32_dir)
    ]
    if layers[0] != layers[1]:  # slices rewrite it
        res["config_layers"] = {"ours": layers[0], "mergekit": layers[1]}
    num_layers = SHAPES_KW["layers"]
    base = _checkpoint(dirs["base"])
    fts = {k: _checkpoint(dirs[k]) for k, _ in case.models if k != "base"}
    dtypes = set()
    deciles = None
    if case.kind == "random":
        st = RandStats()
        agg = None
        if case.method.startswith("della") and len(case.models) == 1:
            deciles = RankDeciles()
    else:
        agg = Agg()
    for name in names:
        o, a = ours.get(name), m32.get(name)
        r = m64.get(name) if m64 is not None and name in m64.where else None
        dtypes.add((str(o.dtype).replace("torch.", ""), str(a.dtype).replace("torch.", "")))
        if o.shape != a.shape:
            res.setdefault("shape_mismatch", []).append(name)
            continue
        if case.kind == "random":
            dense = None
            if len(case.models) == 1:
                key = case.models[0][0]
                w = float(resolve(case, key, "weight", name, num_layers, 1.0))
                dense = (fts[key].get(name).double() - base.get(name).double()) * w
            st.add(base.get(name), dense, ours=o, mk32=a, mk64=r)
            if deciles is not None:
                deciles.add(base.get(name), fts[case.models[0][0]].get(name), ours=o, mk32=a)
            continue
        if o.dtype != a.dtype:
            res["dtype_mismatch"] = True
        o32, a32 = o.float(), a.float()
        excl = None  # (slices: the output names are not the inputs')
        if case.method in TRIM_METHODS or case.method == "sce":
            excl = trim_tie_mask(
                case, name, base.get(name), {k: v.get(name) for k, v in fts.items()}, num_layers
            )
        agg.add(name, o32, a32, r.double() if r is not None else None, excl)
    res["dtypes"] = sorted(dtypes)
    if deciles is not None:
        res["rank_deciles"] = deciles.summary()
    res["stats" if case.kind == "random" else "exact"] = (st if case.kind == "random" else agg).summary()
    return res


def verdict(case: Case, cmp: dict) -> tuple[str, str]:
    """(status, why) of a compared case against the documented tolerances."""
    if "config_layers" in cmp:
        return "MISMATCH", f"config.json num_hidden_layers differ: {cmp['config_layers']}"
    if "tensor_names" in cmp or "shape_mismatch" in cmp:
        return "MISMATCH", "tensor names/shapes differ"
    if case.kind == "random":
        s = cmp["stats"]
        zs = {k: s.get(k) for k in ("z_changed_fraction", "z_mean", "z_second_moment")}
        bad = {k: v for k, v in zs.items() if v is None or not abs(v) <= TOL_Z}
        if bad:
            return "MISMATCH", ", ".join(
                f"{k}={v:.1f}" for k, v in bad.items() if v is not None
            ) or "no stats"
        dec = cmp.get("rank_deciles")
        if dec is not None and not dec["z_max"] <= TOL_Z:
            return "MISMATCH", f"kept fraction per rank decile: |z| up to {dec['z_max']:.1f}"
        l1 = s.get("l1_ratio_max_dev", {})
        if "mk32" in l1 and "ours" in l1 and l1["mk32"] <= 1e-4 and l1["ours"] > 1e-3:
            return "MISMATCH", (
                f"mergekit keeps each tensor's L1 norm (max dev {l1['mk32']:.1e}), ours does not "
                f"(max dev {l1['ours']:.2g}): the rescale rules differ"
            )
        return "ok", f"|z| ≤ {TOL_Z:g}"
    e = cmp["exact"]
    if e["nonfinite_ours"]:
        return "MISMATCH", f"{e['nonfinite_ours']} non-finite values in ours"
    if case.kind == "elementwise" and case.parameters.get("rescale") is True and case.method in TRIM_RESCALE:
        got = e["max_diff_in_tensor_scale_ulps"]
        if e["max_ulps_outside_ties"] == 0:
            return "ok", "bit-exact" + (" outside trim ties" if e["trim_ties_excluded"] else "")
        if got <= TOL_L1_FACTOR_TS_ULP:
            return "ok", f"{got:.2g} ≤ {TOL_L1_FACTOR_TS_ULP} tensor-scale ulp (L1 factor: float64 sums)"
        return "MISMATCH", f"{got:.3g} tensor-scale ulps vs mk32 (want ≤ {TOL_L1_FACTOR_TS_ULP})"
    if case.kind == "elementwise":
        if e["max_ulps_outside_ties"] == 0:
            return "ok", "bit-exact" + (" outside trim ties" if e["trim_ties_excluded"] else "")
        return "MISMATCH", f"{e['max_ulps_outside_ties']} ulps (want bit-exact)"
    if case.method == "sce":  # weights: float64 mean squares (ours) vs float32 means (mergekit)
        got = e["max_diff_in_tensor_scale_ulps"]
        tied = f", {e['trim_ties_excluded']} elements in tensors with a tied cut excluded"
        if got <= TOL_ULP:
            return "ok", f"{got:.2g} ≤ {TOL_ULP} tensor-scale ulp" + (tied if e["trim_ties_excluded"] else "")
        return "MISMATCH", f"{got:.3g} tensor-scale ulps vs mk32 (want ≤ {TOL_ULP})"
    if case.kind == "ulp":
        if e["max_ulps_outside_ties"] <= TOL_ULP:
            return "ok", f"≤ {TOL_ULP} ulp"
        return "MISMATCH", f"{e['max_ulps_outside_ties']} ulps vs mk32 (want ≤ {TOL_ULP})"
    # norm-based: against mergekit float64, in tensor-scale ulps
    if e["max_tensor_scale_ulps_vs_f64"] is None:
        return "MISMATCH", "no mergekit float64 output"
    got = e["max_tensor_scale_ulps_vs_f64"]
    if got <= TOL_NORM_ULP:
        return "ok", f"{got:.2g} ≤ {TOL_NORM_ULP} tensor-scale ulps of mk64"
    return (
        "MISMATCH",
        f"{got:.3g} tensor-scale ulps vs mk64 (want ≤ {TOL_NORM_ULP}; mk32: {e['mk32_max_tensor_scale_ulps_vs_f64']:.3g})",
    )


# =========================================================================== running


def mergekit_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _dump(cfg: dict) -> str:
    """YAML without anchors/aliases (our config reader refuses them, as a hostile-input rule)."""
    import yaml

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return yaml.dump(cfg, Dumper=NoAliases, sort_keys=False)


def write_jobs(cases, inputs: dict, work: Path, mk64: bool = True, pairs=None) -> tuple[list, list]:
    """Write every config; ([mergekit jobs], [our jobs])."""

    mk_jobs, our_jobs = [], []
    for fam, dirs in inputs.items():
        for case in cases:
            if pairs is not None and (fam, case.id) not in pairs:
                continue
            slug = re.sub(r"[^A-Za-z0-9_.-]", "_", case.id.replace(":", "__"))  # '+': a LoRA path
            d = work / "runs" / fam / slug
            d.mkdir(parents=True, exist_ok=True)
            c32 = d / "config_f32.yaml"
            c32.write_text(_dump(case.config(dirs, "float32")))
            base_id = f"{fam}/{case.id}"
            mk_jobs.append(
                {"id": base_id + "/mk32", "config": str(c32), "out": str(d / "mk32"), "seed": SEED}
            )
            if mk64:
                c64 = d / "config_f64.yaml"
                c64.write_text(_dump(case.config(dirs, "float64")))
                mk_jobs.append(
                    {"id": base_id + "/mk64", "config": str(c64), "out": str(d / "mk64"), "seed": SEED}
                )
            our_jobs.append(
                {"id": base_id + "/ours", "config": str(c32), "out": str(d / "ours"), "seed": SEED}
            )
    return mk_jobs, our_jobs


def start_mergekit(venv: Path, jobs: list, work: Path, cli: bool = False):
    """Start mergekit on ``jobs`` in the background; returns a handle for :func:`finish_mergekit`."""
    jobs_file, res_file = work / "mk_jobs.json", work / "mk_results.json"
    jobs_file.write_text(json.dumps(jobs))
    if res_file.exists():
        res_file.unlink()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    cmd = [
        str(mergekit_python(venv)),
        str(Path(__file__).resolve()),
        "--mergekit-driver",
        str(jobs_file),
        str(res_file),
    ]
    if cli:
        cmd.append("--driver-cli")
    log = open(work / "mk_driver.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
    return proc, res_file, log


def finish_mergekit(handle) -> dict:
    proc, res_file, log = handle
    rc = proc.wait()
    log.close()
    if rc != 0 or not res_file.exists():
        tail = Path(log.name).read_text()[-2000:]
        raise RuntimeError(f"the mergekit driver failed (exit {rc}):\n{tail}")
    return json.loads(res_file.read_text())


def run_ours(job: dict) -> dict:
    """``m3kernels merge CONFIG OUT --force --quiet --device cpu --seed S`` in this process."""
    import logging

    from m3kernels import cli

    log = logging.getLogger("m3kernels")
    for h in [h for h in log.handlers if getattr(h, "_m3k_cli", False)]:
        log.removeHandler(h)  # a fresh handler bound to the redirected stderr
    buf = io.StringIO()
    t0 = time.perf_counter()
    argv = [
        "merge",
        job["config"],
        job["out"],
        "--force",
        "--quiet",
        "--device",
        "cpu",
        "--seed",
        str(job["seed"]),
    ]
    with contextlib.redirect_stderr(buf):
        rc = cli.main(argv)
    for h in [h for h in log.handlers if getattr(h, "_m3k_cli", False)]:
        log.removeHandler(h)
    text = buf.getvalue().strip()
    err = None
    if rc != 0:
        lines = [ln for ln in text.splitlines() if "error" in ln] or text.splitlines() or [f"exit {rc}"]
        err = lines[-1][:600]
    return {
        "id": job["id"],
        "seconds": time.perf_counter() - t0,
        "error": err,
        "rc": rc,
        "stderr": text[-1500:],
    }


def registry_methods() -> dict:
    """m3kernels' METHODS, read now (methods being added this session are picked up)."""
    from m3kernels.merge import registry

    return dict(registry.METHODS)


def compare_defaults(specs: dict, ours: dict) -> list:
    """Parameter declarations side by side: [{method, param, mergekit, ours, differs}]."""
    rows = []
    for method in MERGEKIT_METHODS:
        mk = specs.get(method)
        m = ours.get(method)
        if mk is None:
            continue
        mk_params = {p["name"]: p for p in mk["params"]}
        our_params = {}
        if m is not None:
            for p in getattr(m, "params", ()):
                if getattr(p, "config", True):
                    our_params[p.name] = p
        for name in sorted(set(mk_params) | set(our_params)):
            mp = mk_params.get(name)
            op = our_params.get(name)
            mk_txt = "—" if mp is None else ("required" if mp["required"] else repr(mp["default"]))
            if m is None:
                ours_txt = "(method unsupported)"
            elif op is None:
                ours_txt = "—"
            else:
                dflt = getattr(op, "default", None)
                ours_txt = "required" if dflt == "required" else repr(dflt)
            differs = m is not None and _default_differs(mp, op)
            rows.append(
                {"method": method, "param": name, "mergekit": mk_txt, "ours": ours_txt, "differs": differs}
            )
    return rows


def _default_differs(mp, op) -> bool:
    if mp is None or op is None:
        return (mp is None) != (op is None) and not (op is not None and op.name == "int8_mask")
    dflt = getattr(op, "default", None)
    if mp["required"] or dflt == "required":
        return mp["required"] != (dflt == "required")
    a = mp["default"]
    if isinstance(a, bool) or isinstance(dflt, bool):
        return a != dflt
    if isinstance(a, (int, float)) and isinstance(dflt, (int, float)):
        return not math.isclose(float(a), float(dflt), rel_tol=1e-12, abs_tol=0)
    return a != dflt


def run_cases(
    cases, inputs: dict, work: Path, venv: Path, mk64: bool = True, cli: bool = False, pairs=None
) -> dict:
    """Run every case on every input family (``pairs``: only these (family, case id)); the
    results as a dict (rows, defaults, unsupported, ...)."""
    methods = registry_methods()
    runnable = [c for c in cases if c.method in methods]
    mk_jobs, our_jobs = write_jobs(runnable, inputs, work, mk64=mk64, pairs=pairs)
    t0 = time.perf_counter()
    handle = start_mergekit(venv, mk_jobs, work, cli=cli)
    ours = {}
    try:
        for job in our_jobs:
            ours[job["id"]] = run_ours(job)
    finally:
        mk = finish_mergekit(handle)
    wall = time.perf_counter() - t0
    mk_res = {r["id"]: r for r in mk["results"]}
    rows = []
    for fam, dirs in inputs.items():
        for case in cases:
            if pairs is not None and (fam, case.id) not in pairs:
                continue
            row = {
                "family": fam,
                "id": case.id,
                "section": case.section,
                "method": case.method,
                "label": case.label,
                "kind": case.kind,
                "note": case.note,
                "config": case.config({k: f"<{k}>" for k in dirs}, "float32"),
            }
            rows.append(row)
            if case.method not in methods:
                row["status"], row["why"] = "unsupported", "not in m3kernels.merge.registry.METHODS"
                continue
            bid = f"{fam}/{case.id}"
            o, a = ours[bid + "/ours"], mk_res.get(bid + "/mk32")
            b = mk_res.get(bid + "/mk64")
            row["seconds"] = {"ours": o["seconds"], "mk32": a and a["seconds"], "mk64": b and b["seconds"]}
            if a is None or a["error"]:
                row["mergekit_error"] = a and a["error"]
            if o["error"]:
                row["ours_error"] = o["error"]
            if o["error"] or a is None or a["error"]:
                if o["error"] and (a is None or a["error"]):
                    row["status"], row["why"] = "both-fail", "both refuse the config"
                elif o["error"] and "is not implemented on backend" in o["error"]:
                    row["status"], row["why"] = "not-on-cpu", o["error"]
                elif o["error"]:
                    row["status"], row["why"] = "ours-error", o["error"]
                else:
                    row["status"], row["why"] = "mk-error", a["error"]
                continue
            slug = re.sub(r"[^A-Za-z0-9_.-]", "_", case.id.replace(":", "__"))  # '+': a LoRA path
            d = work / "runs" / fam / slug
            mk64_dir = d / "mk64" if (b is not None and not b["error"]) else None
            if b is not None and b["error"]:
                row["mk64_error"] = b["error"]
            try:
                row["compare"] = compare_case(case, dirs, d / "ours", d / "mk32", mk64_dir)
                row["status"], row["why"] = verdict(case, row["compare"])
            except Exception as exc:  # noqa: BLE001 - a comparison bug is reported, not fatal
                row["status"], row["why"] = "compare-error", f"{type(exc).__name__}: {exc}"
    defaults = compare_defaults(mk["specs"], methods)
    unsupported = [m for m in MERGEKIT_METHODS if m not in methods]
    ours_only = sorted(m for m in methods if m not in MERGEKIT_METHODS)
    return {
        "rows": rows,
        "defaults": defaults,
        "unsupported": unsupported,
        "ours_only": ours_only,
        "registry_methods": sorted(methods),
        "wall_seconds": wall,
        "mergekit_specs": mk["specs"],
    }


# =========================================================================== report


def _fmt_g(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{digits}e}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits + 1}g}"
    return str(x)


def table(result: dict) -> str:
    """The results as a Markdown table (one line per case and family)."""
    head = (
        "| case | in | status | max ulp vs mk32; in tensor-scale ulps | bit-equal / ≤ 1 ulp | ties excl. | "
        "tensor-scale ulps vs mk64: ours (mk32) | "
        "rel vs mk64: ours / mk32 | note |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in result["rows"]:
        if r["status"] == "unsupported" and r["family"] != "bf16":
            continue
        cid = f"{r['section']}:{r['method']}:{r['label']}"
        fam = r["family"] if r["status"] != "unsupported" else "—"
        cells = ["-"] * 5
        why = r.get("why", "")
        cmp = r.get("compare", {})
        if "exact" in cmp:
            e = cmp["exact"]
            eq = e["bit_equal_fraction"]
            cells = [
                str(e["max_ulps"])
                + (f" ({e['max_ulps_outside_ties']} outside)" if e["trim_ties_excluded"] else "")
                + f"; scale {e['max_diff_in_tensor_scale_ulps']:.3g}",
                f"{100 * eq:.2f}% / {100 * e['within_1ulp_fraction']:.2f}%",
                str(e["trim_ties_excluded"]) if e["trim_ties_excluded"] else "-",
                _fmt_g(e["max_tensor_scale_ulps_vs_f64"])
                + f" ({_fmt_g(e['mk32_max_tensor_scale_ulps_vs_f64'])})",
                f"{_fmt_g(e['max_rel_vs_f64'])} / {_fmt_g(e['mk32_max_rel_vs_f64'])}",
            ]
        elif "stats" in cmp:
            s = cmp["stats"]
            o, a = s.get("ours", {}), s.get("mk32", {})
            cells = [
                "(random)",
                f"changed {o.get('changed_fraction', 0):.3f} vs {a.get('changed_fraction', 0):.3f}",
                "-",
                f"std {_fmt_g(o.get('std'))} vs {_fmt_g(a.get('std'))}",
                "z "
                + "/".join(
                    f"{s.get(k, float('nan')):.1f}"
                    for k in ("z_changed_fraction", "z_mean", "z_second_moment")
                ),
            ]
        lines.append(f"| `{cid}` | {fam} | {r['status']} | " + " | ".join(cells) + f" | {why} |")
    return "\n".join(lines)


def _short(r: dict) -> str:
    """One cell: the status and the figure that decided it."""
    st = r["status"]
    cmp = r.get("compare", {})
    if "exact" in cmp:
        e = cmp["exact"]
        if r["kind"] == "norm":
            fig = (
                f"{_fmt_g(e['max_tensor_scale_ulps_vs_f64'])} ts-ulp vs mk64 "
                f"(mk32: {_fmt_g(e['mk32_max_tensor_scale_ulps_vs_f64'])}); "
                f"{100 * e['bit_equal_fraction']:.1f}% = mk32"
            )
        else:
            fig = f"{e['max_ulps_outside_ties']} ulp, {100 * e['bit_equal_fraction_outside_ties']:.1f}% ="
            if e["trim_ties_excluded"]:
                fig += f" ({e['trim_ties_excluded']} tie elts excl.)"
            if e["max_ulps_outside_ties"]:
                fig += f", {e['max_diff_in_tensor_scale_ulps']:.3g} ts-ulp"
        return f"{st}: {fig}"
    if "stats" in cmp:
        z = cmp["stats"]
        zz = max(abs(z.get(k, 0) or 0) for k in ("z_changed_fraction", "z_mean", "z_second_moment"))
        extra = ""
        if "l1_ratio_max_dev" in z:
            l1 = z["l1_ratio_max_dev"]
            extra = f", L1 dev {l1.get('ours', 0):.2g} vs {l1.get('mk32', 0):.1e}"
        return f"{st}: max abs z {zz:.1f}{extra}"
    if st in ("ours-error", "mk-error", "both-fail"):
        return f"{st}"
    return st


def doc_table(result: dict) -> str:
    """Compact Markdown: one line per case, both input families side by side."""
    fams = sorted({r["family"] for r in result["rows"]})
    by = {}
    for r in result["rows"]:
        by.setdefault(r["id"], {})[r["family"]] = r
    lines = [
        "| case | class | " + " | ".join(f"{f} inputs" for f in fams) + " |",
        "|---|---|" + "---|" * len(fams),
    ]
    for cid, rs in by.items():
        first = next(iter(rs.values()))
        if first["status"] == "unsupported":
            continue
        lines.append(
            f"| `{cid}` | {first['kind']} | " + " | ".join(_short(rs[f]) for f in fams if f in rs) + " |"
        )
    return "\n".join(lines)


def mismatch_details(result: dict) -> str:
    """Per mismatching case: the tensors that differ most (name, max ulps, bit-equal fraction)."""
    out = []
    for r in result["rows"]:
        if r["status"] not in ("MISMATCH", "ours-error", "mk-error", "compare-error", "not-on-cpu"):
            continue
        out.append(f"{r['family']} {r['id']}: {r['status']}: {r.get('why', '')}")
        e = r.get("compare", {}).get("exact")
        if e:
            for name, mu, eq, sc in e["worst_tensors"][:5]:
                out.append(f"    {name}: {mu} ulps, {100 * eq:.1f}% bit-equal, {sc:g} tensor-scale ulps")
            if e["differing_tensors"] > 5:
                out.append(f"    ... {e['differing_tensors']} tensors differ")
    return "\n".join(out)


def defaults_table(result: dict) -> str:
    lines = ["| method | parameter | mergekit 0.1.5 | m3kernels |", "|---|---|---|---|"]
    for d in result["defaults"]:
        if d["differs"]:
            lines.append(f"| {d['method']} | `{d['param']}` | {d['mergekit']} | {d['ours']} |")
    return "\n".join(lines)


def versions(venv: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mergekit import git_revision, machine_info

    info = machine_info()
    try:
        out = subprocess.run(
            [
                str(mergekit_python(venv)),
                "-c",
                "import mergekit, torch, importlib.metadata as m; "
                "print(m.version('mergekit'), torch.__version__)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()
        info["mergekit"], info["mergekit_torch"] = out[0], out[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        info["mergekit"] = "?"
    import m3kernels

    info["m3kernels_git"] = git_revision()
    info["m3kernels_path"] = str(Path(m3kernels.__file__).parent)
    info["date_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return info


# =========================================================================== tokenizer section
# Tokenizer merges (tokenizer_source, the tokenizer: block, chat_template) on stand-ins with real
# tiny tokenizers whose vocabularies differ (tests/tokenizer_models.py). Compared by token: mergekit
# 0.1.5 visits the non-base models in a Python set's order, so the ids it gives the tokens the base
# lacks change from run to run; each output token's rows are compared wherever each side put it.

TOKENIZER_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}],
    [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 "},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


def tokenizer_cases(dirs: dict) -> list:
    """[(label, config dict, copy_tokenizer)] for the stand-ins' folders ``dirs``."""

    def cfg(method, models, base=True, **extra):
        c = {"merge_method": method}
        if base:
            c["base_model"] = dirs["base"]
        c["models"] = [{"model": dirs[k], **({"parameters": p} if p else {})} for k, p in models]
        c.update(extra)
        return c

    two = [("ft1", {"weight": 0.6}), ("ft2", {"weight": 0.4})]
    tokens = {
        "<|im_end|>": {"source": dirs["ft1"], "force": True},
        "<new>": {"source": {"kind": "zero"}},
        "<alias>": {"source": {"kind": "model_token", "model": dirs["ft2"], "token": "the"}},
        "a": {"source": {"kind": "model_token", "model": dirs["base"], "token_id": 7}, "force": True},
    }
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    return [
        ("union:task_arithmetic", cfg("task_arithmetic", two, tokenizer_source="union"), False),
        (
            "union:ties",
            cfg(
                "ties",
                [
                    ("ft1", {"weight": 0.6, "density": 0.7}),
                    ("ft2", {"weight": 0.5, "density": 0.6}),
                    ("ft3", {"weight": 0.4, "density": 0.8}),
                ],
                tokenizer_source="union",
            ),
            False,
        ),
        (
            "union:linear-no-base",
            cfg(
                "linear",
                [("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": 0.2})],
                base=False,
                tokenizer_source="union",
            ),
            False,
        ),
        (
            "tokens:force+zero+model_token",
            cfg("task_arithmetic", two, tokenizer={"source": "union", "tokens": tokens}),
            False,
        ),
        (
            "pad_to_multiple_of:16",
            cfg("task_arithmetic", two, tokenizer={"source": "union", "pad_to_multiple_of": 16}),
            False,
        ),
        (
            "source:base-drops-rows",
            cfg("task_arithmetic", [("ft1", {"weight": 0.7})], tokenizer_source="base"),
            False,
        ),
        ("source:model-path", cfg("task_arithmetic", two, tokenizer_source=dirs["ft2"]), False),
        (
            "chat_template:chatml+union",
            cfg("task_arithmetic", two, tokenizer_source="union", chat_template="chatml"),
            False,
        ),
        (
            "chat_template:llama3+base",
            cfg("task_arithmetic", two, tokenizer_source="base", chat_template="llama3"),
            False,
        ),
        (
            "chat_template:literal",
            cfg("task_arithmetic", [("ft3", {"weight": 0.5})], chat_template=literal),
            True,
        ),
    ]


def make_tokenizer_inputs(work: Path, family: str = "f32") -> dict:
    """The stand-ins of an input family (bf16, f32: their dtype), made once per run under ``work``."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from tokenizer_models import make_tokenizer_family

    root = work / "inputs" / f"tokenizer-{family}"
    if root.exists():
        shutil.rmtree(root)
    fam = make_tokenizer_family(root, dtype=getattr(torch, FAMILIES[family]))
    return {k: str(v) for k, v in fam.dirs.items()}


def _render_all(template):
    from transformers.utils.chat_template_utils import render_jinja_template

    if template is None:
        return None
    out = []
    for conv in TOKENIZER_CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(
                    render_jinja_template(
                        conversations=[conv],
                        chat_template=template,
                        add_generation_prompt=gen,
                        bos_token="<s>",
                        eos_token="</s>",
                    )[0][0]
                )
            except Exception as exc:  # noqa: BLE001
                out.append(f"error: {type(exc).__name__}")
    return out


def tokenizer_tie_masks(config: Path) -> dict:
    """{tensor: elements at a TIES trim tie} of a ``ties`` config with one density per model, in
    our output's layout: |δ| equal to a model's trim threshold while equal values straddle it
    (mergekit keeps k of them in argsort's order, we keep all; see trim_tie_mask). The deltas are
    those of our plan's inputs (the vocabulary tensors laid out on the merged tokenizer)."""
    import torch

    from m3kernels.checkpoint.inputs import config_and_folder, open_inputs
    from m3kernels.checkpoint.plan import build_plan

    cfg, folder = config_and_folder(str(config), None)
    raw = cfg.raw
    if cfg.method != "ties":
        return {}
    dens = [float((e.get("parameters") or {}).get("density", 1.0)) for e in raw["models"]]
    base, models, opened = open_inputs(cfg, folder, False)
    masks = {}
    try:
        plan = build_plan(cfg, base, models, 1 << 40)
        for pt in plan.tensors:
            if pt.base is None:
                continue
            b, ms = pt.inputs()
            mask = torch.zeros(pt.shape, dtype=torch.bool)
            for m, d in zip(ms, dens):
                delta = (m.float() - b.float()).abs()
                flat = torch.sort(delta.reshape(-1)).values
                n = flat.numel()
                k = max(1, int(math.floor(d * n)))
                if 0 < d < 1 and k < n and flat[n - k] == flat[n - k - 1]:
                    mask |= delta == flat[n - k]
            masks[pt.name] = mask
    finally:
        for ck in opened:
            ck.close()
    return masks


def compare_tokenizer_outputs(ours: Path, mk: Path, ties: dict | None = None) -> dict:
    """Tokenizer, config vocab_size, chat template and every tensor (vocabulary tensors by token);
    ``ties``: {tensor: trim-tie elements of ours} left out of the comparison (counted)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(ours), tensors(mk)
    ta, tb = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(mk))
    va, vb = ta.get_vocab(), tb.get_vocab()
    res = {
        "tokens": [len(va), len(vb)],
        "vocab_equal": va.keys() == vb.keys(),
        "ids_equal": va == vb,
        # the special tokens (a plain token of one side may be an added, non-special one of the
        # other: without a base model mergekit starts the union from any one model's tokenizer)
        "special_equal": {i.content for i in ta.added_tokens_decoder.values() if i.special}
        == {i.content for i in tb.added_tokens_decoder.values() if i.special},
        "vocab_size": [
            json.loads((Path(d) / "config.json").read_text()).get("vocab_size") for d in (ours, mk)
        ],
        "tensor_names_equal": set(a) == set(b),
        "tensors": len(a),
        "bit_equal_tensors": 0,
        "max_ulps": 0,
        "pad_rows_max_rel": 0.0,
        "chat_template": "none",
        "vocab_ulps": 0,  # vocabulary tensors, by token
        "vocab_ts_ulps": 0.0,
        "other_ulps": 0,  # every other tensor (the method's own parity)
        "other_ts_ulps": 0.0,
        "tie_elements_excluded": 0,
    }
    ties = ties or {}
    toks = sorted(va.keys() & vb.keys())
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name].float(), b[name].float()
        if x.shape != y.shape:
            res["max_ulps"] = max(res["max_ulps"], 1 << 31)
            res.setdefault("shape_mismatch", []).append(name)
            continue
        if (
            x.dim() == 2
            and x.shape[0] >= len(va)
            and name.endswith(("embed_tokens.weight", "lm_head.weight"))
        ):
            ia = torch.tensor([va[t] for t in toks])
            ib = torch.tensor([vb[t] for t in toks])
            xa, yb = x[ia], y[ib]
            if name in ties:
                keep = ~ties[name][ia]
                res["tie_elements_excluded"] += int((~keep).sum())
                xa, yb = xa[keep], yb[keep]
            u = int(ulps32(xa, yb).max()) if xa.numel() else 0
            res["vocab_ulps"] = max(res["vocab_ulps"], u)
            res["vocab_ts_ulps"] = max(res["vocab_ts_ulps"], float((xa - yb).abs().max()) / _tensor_ulp(yb))
            if x.shape[0] > len(va):
                rel = float((x[len(va) :] - y[len(vb) :]).abs().max() / x.abs().max())
                res["pad_rows_max_rel"] = max(res["pad_rows_max_rel"], rel)
        else:
            if name in ties:
                keep = ~ties[name]
                res["tie_elements_excluded"] += int((~keep).sum())
                x, y = x[keep], y[keep]
            u = int(ulps32(x, y).max()) if x.numel() else 0
            res["other_ulps"] = max(res["other_ulps"], u)
            if x.numel():
                res["other_ts_ulps"] = max(res["other_ts_ulps"], float((x - y).abs().max()) / _tensor_ulp(y))
        res["max_ulps"] = max(res["max_ulps"], u)
        res["bit_equal_tensors"] += u == 0
    ca, cb = ta.chat_template, tb.chat_template
    if ca is not None or cb is not None:
        res["chat_template"] = (
            "same text"
            if ca == cb
            else ("same rendering" if _render_all(ca) == _render_all(cb) else "differs")
        )
    return res


def tokenizer_verdict(cmp: dict) -> tuple[str, str]:
    bad = []
    if not (cmp["vocab_equal"] and cmp["special_equal"]):
        bad.append("vocabularies differ")
    if cmp["vocab_size"][0] != cmp["vocab_size"][1]:
        bad.append(f"vocab_size {cmp['vocab_size']}")
    if not cmp["tensor_names_equal"] or cmp.get("shape_mismatch"):
        bad.append("tensor names/shapes differ")
    method_only = False
    if cmp["max_ulps"]:
        # the method's own float32 rounding (e.g. linear's D1) shows in every tensor alike: then the
        # vocabulary tensors are held to what the other tensors reach
        method_only = cmp["other_ulps"] > 0 and cmp["vocab_ts_ulps"] <= max(1.0, cmp["other_ts_ulps"])
        if not method_only:
            bad.append(
                f"{cmp['vocab_ulps']} ulps by token in the vocabulary tensors, {cmp['other_ulps']} elsewhere"
            )
    if cmp["pad_rows_max_rel"] > 1e-6:
        bad.append(f"padding rows {cmp['pad_rows_max_rel']:.2g}")
    if cmp["chat_template"] == "differs":
        bad.append("chat template renders differently")
    if bad:
        return "MISMATCH", "; ".join(bad)
    if method_only:
        return "method-diff", (
            f"the vocabulary tensors differ by token no more than the other tensors do "
            f"({cmp['vocab_ts_ulps']:.2g} vs {cmp['other_ts_ulps']:.2g} ts-ulp, {cmp['other_ulps']} ulps): the "
            f"method's own parity (e.g. TIES trim ties, docs/MERGEKIT_PARITY.md), not the tokenizer's"
        )
    why = "bit-exact by token" + ("" if cmp["ids_equal"] else " (other ids for the tokens the base lacks)")
    if cmp.get("tie_elements_excluded"):
        why += f", outside {cmp['tie_elements_excluded']} trim-tie elements"
    if cmp["pad_rows_max_rel"]:
        why += f"; padding rows within {cmp['pad_rows_max_rel']:.1g} (a mean summed in another id order)"
    if cmp["chat_template"] != "none":
        why += f"; chat template: {cmp['chat_template']}"
    return "ok", why


def run_tokenizer_section(work: Path, venv: Path, cli: bool = False, families=("f32", "bf16")) -> dict:
    """Every tokenizer case on every input family through mergekit (``dtype: float32``) and ours;
    rows with verdicts."""
    cases = []
    for fam in families:
        dirs = make_tokenizer_inputs(work, fam)
        cases += [(f"{fam}/{label}", cfg, copy_tok) for label, cfg, copy_tok in tokenizer_cases(dirs)]
    mk_jobs, our_jobs = [], []
    for label, cfg, copy_tok in cases:
        d = work / "runs" / "tokenizer" / re.sub(r"[^A-Za-z0-9_.+-]", "_", label.replace(":", "__"))
        d.mkdir(parents=True, exist_ok=True)
        path = d / "config.yaml"
        path.write_text(_dump({**cfg, "dtype": "float32"}))
        job = {"id": f"tokenizer/{label}", "config": str(path), "seed": SEED}
        mk_jobs.append({**job, "out": str(d / "mk32"), "copy_tokenizer": copy_tok})
        our_jobs.append({**job, "out": str(d / "ours")})
    t0 = time.perf_counter()
    handle = start_mergekit(venv, mk_jobs, work, cli=cli)
    ours = {}
    try:
        for job in our_jobs:
            ours[job["id"]] = run_ours(job)
    finally:
        mk = {r["id"]: r for r in finish_mergekit(handle)["results"]}
    rows = []
    for (label, cfg, _), oj, mj in zip(cases, our_jobs, mk_jobs):
        o, m = ours[oj["id"]], mk.get(mj["id"])
        row = {"id": label, "config": cfg, "seconds": {"ours": o["seconds"], "mk32": m and m["seconds"]}}
        if o["error"] or m is None or m["error"]:
            row["status"] = (
                "both-fail"
                if o["error"] and (m is None or m["error"])
                else ("ours-error" if o["error"] else "mk-error")
            )
            row["why"] = o["error"] or (m and m["error"])
        else:
            try:
                ties = tokenizer_tie_masks(Path(oj["config"]))
                row["compare"] = compare_tokenizer_outputs(Path(oj["out"]), Path(mj["out"]), ties)
                row["status"], row["why"] = tokenizer_verdict(row["compare"])
            except Exception as exc:  # noqa: BLE001
                row["status"], row["why"] = "compare-error", f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return {"rows": rows, "wall_seconds": time.perf_counter() - t0}


def tokenizer_table(result: dict) -> str:
    lines = [
        "| tokenizer case | tokens (ours, mk) | rows (vocab_size) | status | why |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r.get("compare") or {}
        lines.append(
            f"| {r['id']} | {c.get('tokens', '-')} | {c.get('vocab_size', '-')} | {r['status']} | {r['why']} |"
        )
    return "\n".join(lines)


def select_cases(only=None, sections=None) -> list:
    cases = all_cases()
    if only:
        cases = [c for c in cases if c.method in only]
    if sections:
        cases = [c for c in cases if c.section in sections]
    return cases


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mergekit-driver"]:
        return driver_main(argv[1], argv[2], cli="--driver-cli" in argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV, help=f"default {DEFAULT_VENV}")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="inputs and outputs (reused inputs)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--only", help="comma-separated methods")
    ap.add_argument("--sections", help="comma-separated: explicit, edge, defaults, slices, tokenizer")
    ap.add_argument("--families", default=",".join(FAMILIES), help="bf16,f32 (input dtypes)")
    ap.add_argument("--no-f64", action="store_true", help="skip the mergekit dtype: float64 runs")
    ap.add_argument("--markdown", type=Path, help="write the compact tables (for docs/MERGEKIT_PARITY.md)")
    ap.add_argument("--mergekit-cli", action="store_true", help="the mergekit-yaml executable per job")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mergekit import ensure_mergekit

    ensure_mergekit(args.mergekit_venv, quiet=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    fams = tuple(f for f in args.families.split(",") if f)
    t0 = time.perf_counter()
    if {args.sections, args.only} & {"tokenizer"}:  # the tokenizer section alone
        tok = run_tokenizer_section(work, args.mergekit_venv, cli=args.mergekit_cli, families=fams)
        print(tokenizer_table(tok))
        print(f"- {time.perf_counter() - t0:.0f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"tokenizer": tok}, indent=1, default=str))
        return 0
    inputs = make_inputs(work, fams)
    cases = select_cases(
        set(args.only.split(",")) if args.only else None,
        set(args.sections.split(",")) if args.sections else None,
    )
    result = run_cases(cases, inputs, work, args.mergekit_venv, mk64=not args.no_f64, cli=args.mergekit_cli)
    result["versions"] = versions(args.mergekit_venv)
    result["total_seconds"] = time.perf_counter() - t0
    result["tolerances"] = {"ulp": TOL_ULP, "norm_ulp_vs_f64": TOL_NORM_ULP, "z": TOL_Z}
    print(table(result))
    print()
    print("mismatches, tensor by tensor:")
    print(mismatch_details(result))
    print()
    print("parameter defaults that differ (mergekit's declarations vs our registry):")
    print(defaults_table(result))
    print()
    print("unsupported (mergekit methods not in our registry):", ", ".join(result["unsupported"]) or "none")
    print("ours only:", ", ".join(result["ours_only"]) or "none")
    counts = {}
    for r in result["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("status counts:", counts, f"- {result['total_seconds']:.0f} s")
    if args.markdown:
        v = result["versions"]
        head = (
            f"Run of {v['date_utc']}: {v.get('cpu', '?')}, {v.get('cores')} cores; m3kernels "
            f"{v['m3kernels_git']} ({v['m3kernels_path']}), torch {v['torch']}; mergekit "
            f"{v.get('mergekit')} with torch {v.get('mergekit_torch')}; {result['total_seconds']:.0f} s."
        )
        args.markdown.write_text(
            head
            + "\n\n"
            + doc_table(result)
            + "\n\nMismatching tensors:\n\n```\n"
            + mismatch_details(result)
            + "\n```\n\nParameter declarations that differ:\n\n"
            + defaults_table(result)
            + "\n\nUnsupported: "
            + (", ".join(result["unsupported"]) or "none")
            + "\n"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
