"""A merged checkpoint loads in ``transformers`` and holds exactly the merged weights.

A tiny random Llama (``m3kernels.synthetic``) and two noisy fine-tunes are merged by
``m3kernels merge`` (TIES, TIES + M³, with one or several output shards); the output folder is
loaded with ``AutoModelForCausalLM.from_pretrained`` from local files only. The test checks that
every parameter was found (no missing, unexpected or mis-shaped key), that the loaded weights
equal the safetensors contents bit for bit, that those equal ``m3kernels.merge_tensors`` on the
same inputs, and that a forward pass gives finite logits of the right shape.
Skipped when transformers is not installed
(``pip install -c constraints-cpu.txt transformers``).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import m3kernels  # noqa: E402
from m3kernels import cli  # noqa: E402
from m3kernels.synthetic import make_family, tiny  # noqa: E402

transformers = pytest.importorskip("transformers")

ARCH = tiny(kv_heads=2)  # grouped-query attention: k/v projections are narrower

CASES = {
    # name: (config body after the model list, merge_tensors kwargs, output shard size)
    "ties": ("parameters:\n  normalize: true\n", dict(method="ties", density=0.3), None),
    "ties_m3_sharded": (
        "parameters:\n  normalize: true\n  lambda: 0.9\nmixup:\n  alpha: 2.0\n  seed: 7\n",
        dict(method="ties", density=0.3, lambda_=0.9, mix_ratios=m3kernels.draw_mix_ratios(2.0, 2, 7)),
        "40KB",
    ),
}


def write_config(path, family, body: str):
    base, (ft1, ft2) = family.base_dir, family.model_dirs
    path.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {ft1}\n    parameters:\n      weight: 1.0\n      density: 0.3\n"
        f"  - model: {ft2}\n    parameters:\n      weight: 1.0\n      density: 0.3\n" + body
    )
    return path


def read_output(out_dir) -> dict:
    """All tensors of the merged folder, through its index when it has one."""
    index = out_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        tensors.update(load_file(str(out_dir / f)))
    return tensors


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_checkpoint_loads_in_transformers(case, tmp_path, gen):
    body, kwargs, shard_size = CASES[case]
    # base N(0, 0.02²), fine-tunes + N(0, 0.002²), all drawn from ``gen``; 2 and 3 shards
    family = make_family(
        tmp_path / "models", shapes=ARCH, seed=gen, std=0.02, noise=0.002, tokenizer=False, generation=True
    )
    cfg = write_config(tmp_path / "merge.yaml", family, body)
    out = tmp_path / "merged"
    args = ["merge", str(cfg), str(out), "--device", "cpu", "--quiet"]
    if shard_size:
        args += ["--out-shard-size", shard_size]
    assert cli.main(args) == 0

    on_disk = read_output(out)
    assert set(on_disk) == set(ARCH.shapes())
    if shard_size:
        assert (out / "model.safetensors.index.json").exists(), "expected a sharded output"
        assert (
            len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
            > 1
        )

    # the files hold the merge (same kernels as the tensor API, same λ, same thresholds)
    base, (ft1, ft2) = family.base, family.models
    for name, t in on_disk.items():
        assert t.dtype == torch.bfloat16, name
        want = m3kernels.merge_tensors(base[name], [ft1[name], ft2[name]], name=name, **kwargs)
        assert torch.equal(t, want), f"{name}: the merged file differs from merge_tensors"

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, dtype=torch.bfloat16, output_loading_info=True
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    state = model.state_dict()
    for name, t in on_disk.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), (
            f"{name}: loaded weights differ from the safetensors contents"
        )

    model.eval()
    ids = torch.randint(0, ARCH.vocab, (2, 9), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 9, ARCH.vocab)
    assert torch.isfinite(logits.float()).all()
