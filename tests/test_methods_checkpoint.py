"""Every issue-8 method through ``m3kernels merge`` on a tiny synthetic checkpoint: the output
holds, tensor by tensor, the bytes ``merge_tensors`` gives for the parameters the config resolves
(gradients, filters, M³), and those are within tolerance of the float64 reference. Methods whose
kernel pieces the CPU backend lacks are skipped with the missing FEATURES named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3kernels import cli
from m3kernels.api import merge_tensors
from m3kernels.backends import cpu as cpu_backend
from m3kernels.checkpoint.config import load_config
from m3kernels.merge.methods import missing_features
from m3kernels.merge.recipe import PRESETS, make_recipe
from m3kernels.merge.reference import reference_merge
from m3kernels.synthetic import make_family

from helpers import assert_close_ulp

SIZES = dict(vocab=37, hidden=16, intermediate=24, layers=3, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    f = make_family(root, n_models=3, shards=2, model_dtypes=[None, torch.float32, None], seed=5, **SIZES)
    return str(f.base_dir), [str(d) for d in f.model_dirs]


def configs(base, ms):
    attn = [
        {"filter": "self_attn", "value": [0.0, 0.6, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.2]},
        {"value": 0.4},
    ]
    return {
        "passthrough": dict(models=[ms[0]], parameters={"scale": [{"filter": "o_proj", "value": 0.5}]}),
        "nearswap": dict(base_model=base, models=[ms[0]], parameters={"t": 0.01}),
        "ram": dict(base_model=base, models=ms, parameters={"epsilon": 0.01}),
        "ramplus_tl": dict(base_model=base, models=ms, parameters={"epsilon": 0.01, "r": 0.3, "alpha": 2.0}),
        "breadcrumbs": dict(
            base_model=base, models=ms, parameters={"density": 0.7, "gamma": 0.05, "weight": [0.5, 1.0]}
        ),
        "breadcrumbs_ties": dict(
            base_model=base,
            models=ms,
            parameters={"density": [0.3, 0.9], "gamma": 0.02},
            mixup={"alpha": 0.5},
        ),
        "slerp": dict(base_model=base, models=[ms[0]], parameters={"t": attn}),
        "slerp_m3": dict(base_model=base, models=[ms[1]], mixup={"alpha": 0.8, "seed": 3}),
        "nuslerp": dict(
            base_model=base, models=ms[:2], parameters={"weight": [1.0, 2.0], "nuslerp_flatten": False}
        ),
        "nuslerp_nobase": dict(
            models=ms[1:], parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}, method="nuslerp"
        ),
        "multislerp": dict(base_model=base, models=ms, parameters={"weight": [0.2, 0.5, 0.3]}),
        "karcher": dict(base_model=base, models=ms[:2], parameters={"max_iter": [4, 12], "tol": 1e-7}),
        "model_stock": dict(
            base_model=base, models=ms, parameters={"filter_wise": [{"filter": "mlp", "value": True}]}
        ),
    }


def raw_config(case, base, ms) -> dict:
    c = dict(configs(base, ms)[case])
    method = c.pop("method", case.split("_m3")[0])
    models = c.pop("models")
    return {"merge_method": method, "models": [{"model": m} for m in models], "out_dtype": "bfloat16", **c}


def load_dir(folder) -> dict:
    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


CASES = list(configs("b", ["x", "y", "z"]))


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_merge(case, fam, tmp_path):
    base_dir, ms = fam
    raw = raw_config(case, base_dir, ms)
    method = PRESETS[raw["merge_method"]]
    missing = missing_features(cpu_backend, method)
    if missing:
        pytest.skip(f"the cpu backend has no {', '.join(missing)} yet (FEATURES)")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    got = load_dir(tmp_path / "out")
    cfg = load_config(raw)
    base = load_dir(cfg.base_model) if cfg.base_model else None
    models = [load_dir(m) for m in cfg.models]
    src = base if base is not None else models[0]
    assert set(got) == set(src)
    layers = SIZES["layers"]
    for name in src:
        b = base[name] if (base is not None and method.program.uses_base) else None
        xs = [m[name] for m in models]
        kw = cfg.tensor_kwargs(name, layers)
        want = merge_tensors(
            b,
            xs,
            method=cfg.method,
            **kw,
            mix_ratios=cfg.mix_ratios(),
            seed=cfg.seed,
            name=name,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name
        recipe = make_recipe(
            len(xs), method=cfg.method, has_base=b is not None, mix_ratios=cfg.mix_ratios(), **kw
        )
        ref, _ = reference_merge(b, xs, recipe, name)
        scale = 4 * sum((x.double().abs() for x in xs), b.double().abs() if b is not None else 0.0)
        if method.family == "breadcrumbs":
            scale = scale * 4
        assert_close_ulp(got[name], ref, scale, f"{case}/{name}")


def test_slices_form_gives_the_same_bytes(fam, tmp_path):
    base_dir, ms = fam
    flat = raw_config("model_stock", base_dir, ms)
    flat["merge_method"] = "task_arithmetic"  # a kernel every CPU build has
    flat["parameters"] = {"weight": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.6}]}
    sliced = {k: v for k, v in flat.items() if k != "models"}
    L = SIZES["layers"]
    sliced["slices"] = [{"sources": [{"model": m["model"], "layer_range": [0, L]} for m in flat["models"]]}]
    for raw, out in ((flat, "a"), (sliced, "b")):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert cli.main(["merge", str(path), str(tmp_path / out), "--device", "cpu", "-q"]) == 0
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for src in sliced["slices"][0]["sources"]:
        src["layer_range"] = [0, L + 1]  # one layer more than the models have
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sliced))
    assert cli.main(["merge", str(path), str(tmp_path / "c"), "--device", "cpu", "-q"]) != 0


@pytest.mark.parametrize(
    "case", ["slerp", "model_stock", "karcher", "nuslerp", "breadcrumbs_ties", "ramplus_tl"]
)
def test_parts_give_the_bytes_of_whole_tensors(case, fam, tmp_path, monkeypatch):
    """Stage A on the whole tensor, stage B in parts (``produce.PART_BYTES``, the flat index
    offset keying row / column groups): the same bytes as one merge per tensor."""
    import m3kernels
    from m3kernels.checkpoint import produce

    base_dir, ms = fam
    raw = raw_config(case, base_dir, ms)
    missing = missing_features(cpu_backend, PRESETS[raw["merge_method"]])
    if missing:
        pytest.skip(f"the cpu backend has no {', '.join(missing)} yet (FEATURES)")
    monkeypatch.setattr(produce, "BATCH_NUMEL", 0)
    monkeypatch.setattr(produce, "PART_BYTES", 96)  # 48 bf16 elements: rows split across parts
    calls = {"parts": 0}
    real = produce._merge_parts

    def counted(*a, **k):
        calls["parts"] += 1
        return real(*a, **k)

    monkeypatch.setattr(produce, "_merge_parts", counted)
    m3kernels.merge_checkpoints(raw, tmp_path / "parts", device="cpu", progress=False)
    assert calls["parts"] > 0
    monkeypatch.setattr(produce, "PART_BYTES", 1 << 62)
    m3kernels.merge_checkpoints(raw, tmp_path / "whole", device="cpu", progress=False)
    a, b = load_dir(tmp_path / "parts"), load_dir(tmp_path / "whole")
    assert set(a) == set(b) and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
