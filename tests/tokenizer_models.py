"""Stand-in checkpoints with real (tiny) tokenizers, for the tokenizer-merge tests and the parity
harness: offline, seeded, a few kilobytes each.

Every model has a small BPE tokenizer (the ``tokenizers`` library, saved with transformers'
``PreTrainedTokenizerFast``): the same base vocabulary (four specials, letters, a few merges),
then what each model adds on its own, so the vocabularies differ the way real fine-tunes do:

* ``base``: the base vocabulary only (``vocab_size`` = its length);
* ``ft1``: two added special tokens ``<|im_start|>``, ``<|im_end|>`` and two padding rows
  (``vocab_size`` larger than the tokenizer);
* ``ft2``: two more BPE merges in its vocabulary (``th``, ``the``) and ``<|im_start|>`` added
  after them (so the same token has another id than in ft1) plus ``<tool>``;
* ``ft3``: the base vocabulary again (the same tokenizer as the base).

The weights are Llama tensors (``m3kernels.synthetic``): the base N(0, std²), fine-tune i the base
plus N(0, noise²) on the rows the base has, and fresh rows for the tokens it adds. ``TokenizerFamily``
tells which token has which id in which model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from m3kernels import synthetic

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BASE_MERGES = (("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"))
# what each fine-tune adds: (extra BPE merges, added tokens as (content, special), padding rows)
ADDITIONS = {
    "ft1": ((), (("<|im_start|>", True), ("<|im_end|>", True)), 2),
    "ft2": ((("t", "h"), ("th", "e")), (("<|im_start|>", True), ("<tool>", False)), 0),
    "ft3": ((), (), 0),
}
SHAPES = dict(hidden=20, intermediate=29, layers=2, heads=2, kv_heads=1)


def make_tokenizer(merges=BASE_MERGES, added=(), chat_template: str | None = None):
    """A tiny ``PreTrainedTokenizerFast``: BPE over the letters with ``merges``, then ``added``
    tokens ((content, special) pairs, appended in order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    for content, special in added:
        fast.add_tokens(
            [AddedToken(content, special=special, normalized=not special)], special_tokens=special
        )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@dataclass
class TokenizerFamily:
    """Folders and tensors of the stand-ins (keys 'base', 'ft1', ...)."""

    dirs: dict  # key -> Path
    tensors: dict  # key -> {name: tensor}
    vocabs: dict  # key -> {token: id} (the tokenizer's get_vocab())
    rows: dict  # key -> embedding rows (config vocab_size)

    def row(self, key: str, name: str, token: str) -> torch.Tensor:
        """Model ``key``'s row of tensor ``name`` for ``token``."""
        return self.tensors[key][name][self.vocabs[key][token]]


def make_tokenizer_family(
    root,
    *,
    keys=("base", "ft1", "ft2", "ft3"),
    dtype=torch.float32,
    seed: int = 7,
    std: float = 0.05,
    noise: float = 0.02,
    tied: bool = False,
    chat_templates: dict | None = None,
) -> TokenizerFamily:
    """Write the stand-ins ``keys`` (a subset of base, ft1, ft2, ft3) under ``root``."""
    root = Path(root)
    base_tok = make_tokenizer()
    n_base = len(base_tok.get_vocab())
    shapes = synthetic.LlamaShapes(vocab=n_base, tied=tied, **SHAPES)
    base = synthetic.random_tensors(shapes, seed, dtype, std)
    g = torch.Generator().manual_seed(seed + 1)
    dirs, tensors, vocabs, rows = {}, {}, {}, {}
    for i, key in enumerate(keys):
        if key == "base":
            tok, extra, pad = base_tok, 0, 0
            ts = base
        else:
            merges, added, pad = ADDITIONS[key]
            tok = make_tokenizer(BASE_MERGES + merges, added)
            extra = len(tok.get_vocab()) - n_base
            ts = synthetic.fine_tune(base, seed + 101 * (i + 1), noise)
        if chat_templates and key in chat_templates:
            tok.chat_template = chat_templates[key]
        n_rows = n_base + extra + pad
        if n_rows != n_base:
            ts = dict(ts)
            for name in list(ts):
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    fresh = torch.randn((n_rows - n_base, shapes.hidden), generator=g) * std
                    ts[name] = torch.cat([ts[name], fresh.to(dtype)])
        cfg = synthetic.LlamaShapes(vocab=n_rows, tied=tied, **SHAPES).config(
            dtype=str(dtype).replace("torch.", "")
        )
        folder = synthetic.write_checkpoint(root / key, ts, config=cfg, tokenizer=False, generation=True)
        tok.save_pretrained(folder)
        dirs[key], tensors[key], vocabs[key], rows[key] = folder, ts, tok.get_vocab(), n_rows
    return TokenizerFamily(dirs, tensors, vocabs, rows)


def tokenizer_files(folder) -> dict:
    """{file name: parsed JSON or text} of the tokenizer files in ``folder``."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            text = p.read_text()
            out[p.name] = json.loads(text) if p.suffix == ".json" else text
    return out


__all__ = ["make_tokenizer", "make_tokenizer_family", "TokenizerFamily", "tokenizer_files", "ADDITIONS"]
