"""mergekit with m3kernels' kernels: the plugin's ``m3k_ties`` next to mergekit's own ``ties``.

Run it with the Python of an environment that has mergekit 0.1.5 and can import m3kernels::

    PYTHONPATH=/path/to/m3kernels /path/to/mk-venv/bin/python python/mergekit_plugin_example.py [WORKDIR]

It writes a tiny float32 Llama family (base + 2 fine-tunes) to WORKDIR (a temporary folder by
default), merges it with mergekit's planner and writer twice (``merge_method: ties`` and, after
``mergekit_plugin.register()``, ``merge_method: m3k_ties``) and prints how far apart they are. The
command-line equivalent of the second merge is::

    python -m m3kernels.integrations.mergekit_plugin CONFIG.yaml OUT [--m3k-seed N] [--m3k-replace]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from m3kernels.integrations import mergekit_plugin
from m3kernels.synthetic import make_family, tiny


def load(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def merge(cfg: dict, out: Path) -> float:
    t = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(copy_tokenizer=False))
    return time.perf_counter() - t


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="m3k_mergekit_"))
    fam = make_family(
        work / "models", n_models=2, dtype=torch.float32, shards=1, shapes=tiny(1), tokenizer=False
    )
    models = [
        {"model": str(d), "parameters": {"weight": w, "density": 0.5}}
        for d, w in zip(fam.model_dirs, (0.6, 0.4))
    ]
    cfg = {"merge_method": "ties", "base_model": str(fam.base_dir), "models": models, "dtype": "float32"}
    (work / "ties.yaml").write_text(yaml.safe_dump(cfg))

    t_mk = merge(cfg, work / "out_mergekit")
    mergekit_plugin.register(seed=0)
    t_ours = merge({**cfg, "merge_method": "m3k_ties"}, work / "out_m3k")
    a, b = load(work / "out_mergekit"), load(work / "out_m3k")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    print(f"{len(a)} tensors in {work}")
    print(f"mergekit ties {t_mk:.2f} s, m3k_ties {t_ours:.2f} s (tiny model: start-up dominates)")
    print(f"largest difference {worst:.3g}; {same:.1%} of the elements identical")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
