"""What a merge leaves beside its tensors: the merge record, the resume fingerprint, shard
header metadata, and the side files (index, config.json, tokenizer and generation files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import yaml

from m3kernels import __version__
from m3kernels.checkpoint.plan import LAYER_COUNT_KEYS, MergePlan
from m3kernels.checkpoint.safetensors_io import read_input_bytes
from m3kernels.checkpoint.source import SIDE_FILES, Checkpoint
from m3kernels.checkpoint.tokenizer import write_tokenizer_files
from m3kernels.checkpoint.writer import fsync_dir, write_file_durably

log = logging.getLogger("m3kernels")


RECORD_FILE = "m3kernels_merge.yaml"
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = SIDE_FILES
MAX_SIDE_FILE_BYTES = 1 << 30


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_record(plan: MergePlan, out_shard_size: int) -> dict:
    """The merge as run: what ``m3kernels_merge.yaml`` and every shard header hold."""
    cfg = plan.config

    def inputs_of(ck: Checkpoint) -> dict:
        out = {
            "path": str(ck.path.resolve()),
            "files": [{"name": f["name"], "bytes": f["bytes"]} for f in ck.files()],
        }
        adapter = getattr(ck, "adapter", None)  # a LoRA input (m3kernels.checkpoint.lora)
        if adapter is not None:
            out["lora_adapter"] = adapter.describe()
        return out

    return {
        "m3kernels_version": __version__,
        "merge_method": cfg.method,
        "seed": plan.seed,
        "mix_ratios": None if plan.mix_ratios is None else [float(r) for r in plan.mix_ratios],
        "mixup": cfg.mixup,
        "trim_scope": cfg.trim_scope,
        "model_trim_thresholds": None,
        "out_dtype": _dtype_name(plan.out_dtype),
        "out_shard_size": out_shard_size,
        "config": cfg.raw,
        "inputs": {
            "base": inputs_of(plan.base) if plan.base is not None else None,
            "models": [inputs_of(m) for m in plan.models],
        },
        "notes": list(plan.notes),
        # the merged tokenizer (tokenizer.py): in the record, and so in the resume fingerprint
        "tokenizer": plan.tokenizer.describe() if getattr(plan, "tokenizer", None) is not None else None,
    }


def fingerprint(plan: MergePlan, record: dict) -> str:
    """Hash of everything the output bytes depend on (config, inputs, plan), for --resume."""
    inputs = [plan.base] if plan.base is not None else []
    inputs += plan.models
    obj = {
        "record": record,
        "stamps": [ck.file_stamps() for ck in inputs],
        "plan": [
            (t.name, t.action, list(t.shape), str(t.out_dtype), t.shard, t.common_rows) for t in plan.tensors
        ],
        "shards": [s.filename for s in plan.shards],
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def header_metadata(record: dict) -> dict:
    return {
        "format": "pt",
        "m3kernels_version": __version__,
        "m3kernels_merge": json.dumps(record, default=str, separators=(",", ":")),
    }


def write_side_files(tmp: Path, plan: MergePlan, record: dict) -> None:
    """Index, config.json, tokenizer/generation files and the merge record, each fsynced."""
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": {
                t.name: plan.shards[t.shard].filename for t in sorted(plan.tensors, key=lambda t: t.name)
            },
        }
        write_file_durably(tmp / INDEX_FILE, json.dumps(index, indent=2).encode())
    src = plan.config_source
    if src.config is not None:
        conf = dict(src.config)
        conf["torch_dtype"] = _dtype_name(plan.out_dtype)
        if "dtype" in conf:  # newer transformers write "dtype" instead of "torch_dtype"
            conf["dtype"] = _dtype_name(plan.out_dtype)
        if plan.untied_head:
            conf["tie_word_embeddings"] = False
        if plan.out_vocab_rows is not None and "vocab_size" in conf:
            conf["vocab_size"] = plan.out_vocab_rows
        if plan.out_num_layers is not None:  # a sliced merge (slices.py): the output's layers
            for key in LAYER_COUNT_KEYS:
                if key in conf:
                    conf[key] = plan.out_num_layers
        write_file_durably(tmp / "config.json", (json.dumps(conf, indent=2) + "\n").encode())
    replaced = write_tokenizer_files(tmp, plan)  # a merged tokenizer / chat template (tokenizer.py)
    if src.path.is_dir():
        for name, path in src.side_files.items():  # checked when the checkpoint was opened
            if name in replaced:
                continue
            f = src.open_file(path, name, lease=False)  # and again now: regular, inside the folder
            try:
                data = read_input_bytes(f, MAX_SIDE_FILE_BYTES, name)
            finally:
                f.close()
            write_file_durably(tmp / name, data)
    text = "# The merge as run by m3kernels (also in every shard header's __metadata__).\n"
    text += yaml.safe_dump(json.loads(json.dumps(record, default=str)), sort_keys=False, allow_unicode=True)
    write_file_durably(tmp / RECORD_FILE, text.encode("utf-8"))
    fsync_dir(tmp)
