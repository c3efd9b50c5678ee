"""Tiny Hugging Face style checkpoints for tests: Llama-shaped tensors, shards, config, tokenizer.

``llama_tensors`` makes a seeded random base model with the tensor names and (consistent)
shapes of ``LlamaForCausalLM``; ``fine_tune`` adds seeded noise to every float tensor;
``write_checkpoint`` writes a dict of tensors as ``model.safetensors`` or as several shards with
``model.safetensors.index.json``, plus ``config.json``, tokenizer and generation files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = {
    "tokenizer_config.json": {"model_max_length": 64, "tokenizer_class": "LlamaTokenizer"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
    "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 8},
}


def llama_shapes(vocab: int = 101, hidden: int = 24, intermediate: int = 37, layers: int = 2,
                 heads: int = 3, kv_heads: int = 1, tied: bool = False) -> dict:
    """{name: shape} of a LlamaForCausalLM with these sizes (no lm_head when ``tied``)."""
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(vocab: int = 101, hidden: int = 24, intermediate: int = 37, layers: int = 2, heads: int = 3,
                 kv_heads: int = 1, tied: bool = False, dtype: str = "bfloat16") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def random_tensors(shapes: dict, seed: int, dtype=torch.bfloat16) -> dict:
    """Seeded N(0, 0.05²) tensors (norm weights around 1), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float32) * 0.05
        if name.endswith("norm.weight"):
            t = t + 1.0
        out[name] = t.to(dtype)
    return out


def llama_tensors(seed: int = 0, dtype=torch.bfloat16, **sizes) -> dict:
    return random_tensors(llama_shapes(**sizes), seed, dtype)


def fine_tune(base: dict, seed: int, scale: float = 0.02, dtype=None, skip=()) -> dict:
    """``base`` plus seeded N(0, scale²) noise on every float tensor (others copied)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if not t.dtype.is_floating_point or name in skip:
            out[name] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
        out[name] = (t.to(torch.float32) + noise).to(dtype or t.dtype)
    return out


def write_checkpoint(folder, tensors: dict, *, shards: int = 1, config: Optional[dict] = None,
                     tokenizer: bool = True, metadata: Optional[dict] = None) -> Path:
    """Write ``tensors`` as an HF checkpoint folder with ``shards`` safetensors files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in g}, str(folder / fname), metadata=meta)
            for n in g:
                weight_map[n] = fname
                total += tensors[n].numel() * tensors[n].element_size()
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        for fname, content in TOKENIZER_FILES.items():
            (folder / fname).write_text(json.dumps(content))
        (folder / "tokenizer.model").write_bytes(b"\x00fake sentencepiece model\x01")
    return folder


def make_family(root, *, n_models: int = 2, dtype=torch.bfloat16, shards: int = 2, seed: int = 0,
                model_dtypes=None, **sizes) -> tuple:
    """A base and ``n_models`` fine-tunes under ``root`` -> (base_dir, [model_dirs], base tensors)."""
    root = Path(root)
    base = llama_tensors(seed, dtype, **sizes)
    cfg = llama_config(dtype=str(dtype).replace("torch.", ""), **sizes)
    base_dir = write_checkpoint(root / "base", base, shards=shards, config=cfg)
    dirs = []
    for i in range(n_models):
        mdtype = (model_dtypes or [None] * n_models)[i]
        ft = fine_tune(base, seed + 101 * (i + 1), dtype=mdtype)
        dirs.append(write_checkpoint(root / f"ft{i + 1}", ft, shards=shards + i, config=cfg))
    return base_dir, dirs, base


__all__ = ["llama_shapes", "llama_config", "llama_tensors", "random_tensors", "fine_tune", "write_checkpoint",
           "make_family", "TOKENIZER_FILES"]
