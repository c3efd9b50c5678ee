"""A tiny Llama with its own small tokenizer, trained a few steps on local text: what the tests and
the benchmark run the statistics on (no download; seconds on a CPU).

``make_tiny_llama(folder, texts)`` trains a byte-level BPE tokenizer on ``texts``, builds a
random ``LlamaForCausalLM`` from a config, takes ``steps`` AdamW steps on the texts and saves
model + tokenizer with ``save_pretrained`` (safetensors). ``fine_tune(src, dst, texts)`` continues
training a saved one on other texts: a fine-tune of the same base.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a one two red blue green cat dog bird runs sits jumps over under near quick slow lazy "
    "happy small big river tree house sun moon star water fire stone road city song"
).split()


def sample_texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    """``n`` sentences of random words (a fixed vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, words + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def make_tokenizer(texts, vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def train(model, tok, texts, steps: int, lr: float = 3e-3, seed: int = 0, batch: int = 8) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(texts), (batch,), generator=g).tolist()
        enc = tok([texts[i] for i in pick], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_tiny_llama(
    folder,
    texts,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 48,
    steps: int = 20,
    seed: int = 0,
    vocab_size: int = 200,
):
    """Train tokenizer + model on ``texts``; save to ``folder``; return (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts, vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    train(model, tok, texts, steps, seed=seed)
    save(model, tok, folder)
    return model, tok


def save(model, tok, folder) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def fine_tune(src, dst, texts, *, steps: int = 10, seed: int = 1, lr: float = 3e-3):
    """Load the model at ``src``, train it ``steps`` more steps on ``texts``, save at ``dst``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32)
    train(model, tok, texts, steps, lr=lr, seed=seed)
    save(model, tok, dst)
    return model, tok


__all__ = ["make_tiny_llama", "fine_tune", "sample_texts", "make_tokenizer"]
