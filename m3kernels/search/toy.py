"""A toy model family for the search's tests and example: a tiny character-level Llama, a base
trained on a mix of two synthetic tasks and one expert fine-tuned per task, saved as ordinary
Hugging Face checkpoints (safetensors, config.json, tokenizer), plus the tasks' JSONL files.

The two tasks are ``add`` (``"17+5="`` → ``"22"``) and ``rev`` (``"abc>"`` → ``"cba"``). Nothing is
downloaded: the model comes from a ``transformers.LlamaConfig`` and the tokenizer (one token per
character) from the ``tokenizers`` library. Every step is seeded, so a family is the same on every
run of the same torch version.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+=> \n"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
TASKS = ("add", "rev")


def make_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (BOS added in front, pad/eos/unk defined)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) pair of ``task``."""
    if task == "add":
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        return f"{a}+{b}=", str(a + b)
    if task == "rev":
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(2, 6)))
        return f"{word}>", word[::-1]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


@dataclass
class ToySizes:
    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    base_steps: int = 30
    expert_steps: int = 40
    batch: int = 16
    lr: float = 3e-3
    eval_examples: int = 24


@dataclass
class ToyFamily:
    root: Path
    base: Path
    experts: dict  # task -> checkpoint folder
    data: dict = field(default_factory=dict)  # task -> JSONL of prompt/response/answer


def _batch(tok, task_mix, rng, n, eos_id):
    import torch

    seqs = []
    for _ in range(n):
        prompt, resp = example(rng.choice(task_mix), rng)
        ids = tok(prompt + resp)["input_ids"] + [eos_id]
        seqs.append(ids)
    width = max(map(len, seqs))
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels, (ids != tok.pad_token_id).long()


def _train(model, tok, task_mix, steps, sizes: ToySizes, seed: int):
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, labels, mask = _batch(tok, task_mix, rng, sizes.batch, tok.eos_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def write_task_data(path: Path, task: str, n: int, seed: int) -> Path:
    """``n`` held-out examples of ``task`` as JSONL with prompt, response and answer."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt, resp = example(task, rng)
            f.write(json.dumps({"prompt": prompt, "response": resp, "answer": resp}) + "\n")
    return path


def make_toy_family(root, sizes: ToySizes | None = None, seed: int = 0) -> ToyFamily:
    """Base (trained on both tasks for ``base_steps``) and one expert per task (``expert_steps``
    more on that task alone), each saved under ``root``; held-out JSONL data per task."""
    import torch

    sizes = sizes or ToySizes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, much faster on a busy machine
    try:
        return _make_family(Path(root), sizes, seed)
    finally:
        torch.set_num_threads(threads)


def _make_family(root: Path, sizes: ToySizes, seed: int) -> ToyFamily:
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base = _train(LlamaForCausalLM(cfg), tok, TASKS, sizes.base_steps, sizes, seed)
    fam = ToyFamily(root, root / "base", {})
    base.save_pretrained(fam.base, safe_serialization=True)
    tok.save_pretrained(fam.base)
    for k, task in enumerate(TASKS):
        expert = _train(copy.deepcopy(base), tok, (task,), sizes.expert_steps, sizes, seed + 1 + k)
        path = root / f"expert_{task}"
        expert.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        fam.experts[task] = path
        fam.data[task] = write_task_data(root / f"{task}.jsonl", task, sizes.eval_examples, 10_000 + k)
    return fam


__all__ = ["make_tokenizer", "make_toy_family", "ToyFamily", "ToySizes", "example", "TASKS"]
