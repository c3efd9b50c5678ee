"""End-to-end merge search on real text every install has (docs/SEARCH.md shows its results).

1. a byte-level BPE tokenizer is trained here on a sample of the three corpora;
2. a small Llama (about 1.5 M parameters; transformers, built from a config) is pretrained on
   Python's standard-library sources;
3. two experts are fine-tuned from it, lightly, on domains the base is weak at: C headers
   (/usr/include, else CPython's own headers) and arithmetic problems ("Q: 37+58= A: 95");
4. ``m3kernels search`` runs over five methods, each with no M³ (ratios 1), the fixed ratio
   λ = 0.5, a λ grid 0, 0.1, .., 1 and the paper's M³ protocol (one seeded draw for each of the
   seven α = 0.2, 0.5, 1, 2, 3, 4, 5), scored by the mean normalised improvement of the held-out
   losses (C headers; arithmetic answers, the loss on the answer only).

Every step is seeded. Run ``python python/search_example.py [--out DIR] [--quick]``; ``--quick``
shrinks everything to a smoke test of a minute. Not run in CI. Prints the time of each part.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<pad>", "<s>", "</s>"]


def _concat(files: list, limit: int) -> str:
    """The texts of ``files`` in order, joined by newlines, stopping once ``limit`` characters are read."""
    out, size = [], 0
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        out.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n".join(out)


def python_corpus(limit: int) -> str:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return _concat(files, limit)


def c_corpus(limit: int) -> str:
    files = sorted(glob.glob("/usr/include/*.h")) or sorted(
        glob.glob(os.path.join(sysconfig.get_paths()["include"], "*.h"))
    )
    if not files:
        sys.exit("no C headers found (/usr/include or the Python include folder)")
    return _concat(files, limit)


def arithmetic(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(0, 100), rng.randrange(0, 100)
        op = rng.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((f"Q: {a}{op}{b}= A:", f" {val}\n"))
    return out


def train_tokenizer(texts: list, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def chunks(ids: list, length: int) -> list:
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)]


def train(model, batches, steps: int, lr: float, seed: int) -> float:
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    loss = None
    for _ in range(steps):
        ids, labels = batches(rng)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def text_batches(seqs: list, batch: int):
    import torch

    def get(rng):
        x = torch.tensor([rng.choice(seqs) for _ in range(batch)])
        return x, x

    return get


def pair_batches(pairs: list, tok, batch: int):
    import torch

    def get(rng):
        rows = [rng.choice(pairs) for _ in range(batch)]
        seqs = [
            tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p, r in rows
        ]
        w = max(map(len, seqs))
        ids = torch.full((batch, w), tok.pad_token_id)
        lab = torch.full((batch, w), -100)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(s)] = torch.tensor(s)
        return ids, lab

    return get


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="search_example_out", help="working folder (models, data, results)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes, a few candidates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 is fastest)")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from m3kernels.search import search

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q = args.quick
    root = Path(args.out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    times = {}

    t0 = time.perf_counter()
    py_text = python_corpus(300_000 if q else 3_000_000)
    c_text = c_corpus(100_000 if q else 1_000_000)
    arith_train, arith_test = arithmetic(20_000, 1), arithmetic(48 if q else 128, 2)
    c_cut = int(len(c_text) * 0.9)
    c_train, c_test = c_text[:c_cut], c_text[c_cut:]
    tok = train_tokenizer(
        [py_text, c_train, "".join(p + r for p, r in arith_train[:3000])], 512 if q else 2048
    )
    times["data + tokenizer"] = time.perf_counter() - t0

    L = 64 if q else 128
    py_seqs = chunks(tok(py_text, add_special_tokens=False)["input_ids"], L)
    c_seqs = chunks(tok(c_train, add_special_tokens=False)["input_ids"], L)
    c_eval = chunks(tok(c_test, add_special_tokens=False)["input_ids"], L)[: 32 if q else 96]
    data = root / "data"
    data.mkdir(exist_ok=True)
    with open(data / "c_headers.jsonl", "w") as f:
        for ids in c_eval:
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    with open(data / "arith.jsonl", "w") as f:
        for p, r in arith_test:
            f.write(json.dumps({"prompt": p, "response": r, "answer": r.strip()}) + "\n")

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64 if q else 128,
        intermediate_size=128 if q else 352,
        num_hidden_layers=2 if q else 4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    loss = train(base, text_batches(py_seqs, 16), 60 if q else 600, 3e-3, 0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    times["pretrain base"] = time.perf_counter() - t0
    print(f"base: {n_params:,} parameters, final train loss {loss:.3f}")

    import copy

    experts = {}
    for name, batches in (
        ("c_headers", text_batches(c_seqs, 16)),
        ("arith", pair_batches(arith_train, tok, 16)),
    ):
        t0 = time.perf_counter()
        m = copy.deepcopy(base)
        loss = train(m, batches, 30 if q else 150, 1e-3, 1 + len(experts))
        path = root / f"expert_{name}"
        m.save_pretrained(path)
        tok.save_pretrained(path)
        experts[name] = path
        times[f"fine-tune {name}"] = time.perf_counter() - t0
        print(f"expert {name}: final train loss {loss:.3f}")

    (root / "merge.yaml").write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n"
        f"  - model: {experts['c_headers']}\n  - model: {experts['arith']}\n"
        "parameters:\n  density: 0.5\n"
    )
    (root / "eval.yaml").write_text(
        "tasks:\n"
        f"  - {{name: c, type: loss, data: {data / 'c_headers.jsonl'}, expert: 1, max_length: {L + 8}}}\n"
        f"  - {{name: arith, type: loss, data: {data / 'arith.jsonl'}, expert: 2}}\n"
        "objective: normalized\n"
    )
    methods = "task_arithmetic,ties" if q else "linear,task_arithmetic,ties,dare_linear,dare_ties"
    lambdas = [0.5] if q else [round(0.1 * k, 1) for k in range(11)]
    t0 = time.perf_counter()
    res = search(
        root / "merge.yaml",
        root / "best",
        root / "eval.yaml",
        space={
            "methods": methods,
            "plain": True,
            "lambdas": lambdas,
            "alphas": [0.5, 2] if q else [0.2, 0.5, 1, 2, 3, 4, 5],
            "draws": 1,
            "seed": 0,
        },
        force=True,
        fresh=True,
        progress=True,
    )
    times["search"] = time.perf_counter() - t0
    print(res.summary())
    print()
    report(res, times)
    return 0


def report(res, times: dict) -> None:
    """The tables docs/SEARCH.md shows: references, each method at λ = 0.5, without M³, the best
    grid λ, the M³ draws (best and mean), and the best found."""
    refs = res.references
    print("| model | C-header loss | arithmetic-answer loss |\n|---|---|---|")
    for k, v in refs.items():
        print(f"| {k} | {v['scores']['c.loss']:.4f} | {v['scores']['arith.loss']:.4f} |")
    print()
    print("| method | no M³ (ratios 1) | λ = 0.5 | best grid λ | M³ draws: best (α, λ) | M³ draws: mean |")
    print("|---|---|---|---|---|---|")
    for m in dict.fromkeys(r["candidate"]["method"] for r in res.rows):
        mine = [r for r in res.rows if r["candidate"]["method"] == m and r["objective"] is not None]
        plain = [r["objective"] for r in mine if r["candidate"]["mix"] == "plain"]
        half = [
            r["objective"]
            for r in mine
            if r["candidate"]["mix"] == "lambda" and r["candidate"]["ratios"][0] == 0.5
        ]
        grid = [r for r in mine if r["candidate"]["mix"] == "lambda"]
        draws = [r for r in mine if r["candidate"]["mix"] == "draw"]
        g = max(grid, key=lambda r: r["objective"]) if grid else None
        d = max(draws, key=lambda r: r["objective"]) if draws else None
        cells = [
            m,
            f"{plain[0]:.4f}" if plain else "-",
            f"{half[0]:.4f}" if half else "-",
            f"{g['objective']:.4f} (λ = {g['candidate']['ratios'][0]:.1f})" if g else "-",
            f"{d['objective']:.4f} (α = {d['candidate']['alpha']:g}, λ = {d['candidate']['ratios'][0]:.3f})"
            if d
            else "-",
            f"{sum(r['objective'] for r in draws) / len(draws):.4f}" if draws else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print("time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    merge = sum(r["merge_s"] for r in res.rows)
    ev = sum(r["eval_s"] for r in res.rows)
    print(
        f"candidates: {len(res.rows)}, {60 * len(res.rows) / max(merge + ev, 1e-9):.1f} per minute; "
        f"merging {100 * merge / max(merge + ev, 1e-9):.1f}% of a candidate's time "
        f"(mean merge {1000 * merge / len(res.rows):.0f} ms, evaluation {1000 * ev / len(res.rows):.0f} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
