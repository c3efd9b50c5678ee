"""A tiny random Llama checkpoint family (base + fine-tunes) that ``transformers`` can load.

``write_family`` writes ``base/``, ``ft1/``, ``ft2/``... under a folder: each a Hugging Face
checkpoint directory with the tensor names of ``LlamaForCausalLM``, bf16 safetensors split in
shards with ``model.safetensors.index.json``, a ``config.json`` that ``LlamaConfig`` reads and a
``generation_config.json``. Fine-tune i = base + N(0, noise²) on every tensor. Values come from
the caller's ``torch.Generator``, so each test run can use fresh random weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TinyLlama:
    vocab: int = 128
    hidden: int = 64
    intermediate: int = 172     # not a multiple of 8 or of the hidden size, on purpose
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2           # grouped-query attention: k/v projections are narrower

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of LlamaForCausalLM with untied embeddings."""
        h, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def config(self, dtype: str = "bfloat16") -> dict:
        """config.json contents (the keys LlamaConfig reads)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": dtype,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        }


def random_weights(arch: TinyLlama, gen: torch.Generator, dtype=torch.bfloat16) -> dict:
    """Base weights: N(0, 0.02²) matrices, RMSNorm weights 1 + N(0, 0.02²)."""
    out = {}
    for name, shape in arch.shapes().items():
        x = torch.randn(shape, generator=gen) * 0.02
        if name.endswith("norm.weight"):
            x += 1.0
        out[name] = x.to(dtype)
    return out


def add_noise(weights: dict, gen: torch.Generator, std: float) -> dict:
    """A fine-tune: every tensor + N(0, std²), computed in float32, rounded to its dtype."""
    return {n: (t.float() + torch.randn(t.shape, generator=gen) * std).to(t.dtype)
            for n, t in weights.items()}


def write_checkpoint(folder: Path, weights: dict, config: dict, shards: int = 2) -> Path:
    """``weights`` as ``shards`` safetensors files + index, config.json, generation_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    per = math.ceil(len(names) / shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: weights[n].contiguous() for n in group}, str(folder / fname),
                  metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += weights[n].numel() * weights[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return folder


def write_family(root: Path, gen: torch.Generator, arch: TinyLlama = TinyLlama(),
                 n_finetunes: int = 2, noise: float = 0.002) -> dict:
    """base/ and ft1/.. under ``root``; returns {dir name: (path, weights)}."""
    root = Path(root)
    base = random_weights(arch, gen)
    family = {"base": (write_checkpoint(root / "base", base, arch.config()), base)}
    for i in range(1, n_finetunes + 1):
        ft = add_noise(base, gen, noise)
        family[f"ft{i}"] = (write_checkpoint(root / f"ft{i}", ft, arch.config(), shards=1 + i), ft)
    return family


__all__ = ["TinyLlama", "random_weights", "add_noise", "write_checkpoint", "write_family"]
