"""Tokenizer merges (``tokenizer_source``, the ``tokenizer:`` block) and ``chat_template``.

Stand-ins with real tiny tokenizers (tests/tokenizer_models.py) whose vocabularies differ; every
output row is checked against a float64 reference written here from mergekit 0.1.5's rules (the
row each input contributes for each output token, then the merge), the output is loaded with
transformers (tokenizer and model), bad inputs exit 2 with nothing written, and, when the mergekit
venv is there, one merge is compared with mergekit itself token by token.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizer_models import ADDITIONS, make_tokenizer_family  # noqa: E402

from m3kernels.checkpoint.chat_template import BUILTIN  # noqa: E402
from m3kernels.checkpoint.config import MergeConfigError, parse_config  # noqa: E402
from m3kernels.checkpoint.run import merge_checkpoints  # noqa: E402
from m3kernels.cli import main as cli_main  # noqa: E402

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MK_VENV = Path(os.environ.get("M3K_MERGEKIT_VENV", "/work/bench_data/mk-venv"))
MK_TEMPLATES = next(
    iter(sorted(MK_VENV.glob("lib/python*/site-packages/mergekit/_data/chat_templates"))), None
)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_tokenizer_family(tmp_path_factory.mktemp("tokfam"), dtype=torch.float32)


def _cfg(fam, method="task_arithmetic", keys=("ft1", "ft2"), weights=(0.6, 0.4), base=True, **extra):
    cfg = {"merge_method": method, "dtype": "float32"}
    if base:
        cfg["base_model"] = str(fam.dirs["base"])
    cfg["models"] = [{"model": str(fam.dirs[k]), "parameters": {"weight": w}} for k, w in zip(keys, weights)]
    cfg.update(extra)
    return cfg


def _load(out):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    return load_file(str(Path(out) / "model.safetensors")), AutoTokenizer.from_pretrained(str(out))


# --------------------------------------------------------------------------- the reference
def reference_inputs(fam, order, base_key, vocab: dict, rows: int, name: str, tokens: dict | None = None):
    """{key: float64 tensor of ``rows`` rows}: each input laid out on ``vocab`` by mergekit
    0.1.5's rules (module docstring of m3kernels/checkpoint/tokenizer_rows.py), computed here
    per token without the package's code."""
    tokens = tokens or {}
    width = fam.tensors[order[0]][name].shape[1]

    def has(k, t):
        return t in fam.vocabs[k] and fam.vocabs[k][t] < fam.rows[k]

    def row(k, t):
        return fam.tensors[k][name][fam.vocabs[k][t]].double()

    out = {k: torch.zeros(rows, width, dtype=torch.float64) for k in order}
    for t, i in vocab.items():
        have = [k for k in order if has(k, t)]
        rule = tokens.get(t)
        force = bool(rule and rule.get("force"))
        shared = None
        if rule is not None and (force or len(have) < len(order)):
            src = rule["source"]
            if isinstance(src, dict) and src["kind"] == "zero":
                shared = torch.zeros(width, dtype=torch.float64)
            elif isinstance(src, dict):
                k = next(k for k in order if str(fam.dirs[k]) == src["model"])
                j = src["token_id"] if "token_id" in src else fam.vocabs[k][src["token"]]
                shared = fam.tensors[k][name][j].double()
            else:
                k = next(k for k in order if str(fam.dirs[k]) == src)
                shared = row(k, t)
        elif rule is None and len(have) < len(order):
            if len(have) == 1:
                shared = row(have[0], t)
            elif not have:
                shared = torch.zeros(width, dtype=torch.float64)
            elif base_key in have:
                shared = row(base_key, t)
            else:
                shared = sum(row(k, t).float() for k in have).double() / len(have)
        for k in order:
            out[k][i] = row(k, t) if has(k, t) and not force else shared
    for k in order:
        if rows > len(vocab):
            out[k][len(vocab) :] = out[k][: len(vocab)].mean(0)
    return out


def task_arithmetic(inputs, base_key, weights: dict):
    b = inputs[base_key]
    return b + sum(w * (inputs[k] - b) for k, w in weights.items())


def _close(got, want, what):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= 4e-7 * scale + 1e-9, f"{what}: max |diff| {err:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- config
def test_config_forms(fam):
    c = parse_config(_cfg(fam, tokenizer_source="union"))
    assert c.tokenizer_source == "union" and c.tokenizer.source == "union" and not c.tokenizer.tokens
    c = parse_config(_cfg(fam, tokenizer_source=str(fam.dirs["base"])))
    assert c.tokenizer.source == "base"  # a path equal to the base model means 'base'
    c = parse_config(_cfg(fam, tokenizer={"pad_to_multiple_of": 16}))
    assert c.tokenizer.source == "union" and c.tokenizer.pad_to_multiple_of == 16  # the block's default
    c = parse_config(
        _cfg(
            fam,
            tokenizer={
                "source": "base",
                "tokens": {
                    "<a>": {"source": str(fam.dirs["ft1"]), "force": True},
                    "<b>": {"source": {"kind": "zero"}},
                    "<c>": {"source": {"kind": "model_token", "model": str(fam.dirs["ft2"]), "token": "the"}},
                    "<d>": {"source": {"kind": "model_token", "model": str(fam.dirs["base"]), "token_id": 5}},
                },
            },
            chat_template="chatml",
        )
    )
    assert [r.source.kind for r in c.tokenizer.tokens.values()] == [
        "model",
        "zero",
        "model_token",
        "model_token",
    ]
    assert c.tokenizer.tokens["<a>"].force and c.chat_template == "chatml"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "not both"),
        ({"tokenizer": {"source": "union", "vocab": 3}}, "tokenizer.vocab"),
        ({"tokenizer": {"tokens": {"<x>": {"source": "/elsewhere/model"}}}}, "not one of the merged models"),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "force: true needs a source"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "X"}}}}}, "not one of"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "copy"}}}}}, "kind"),
        ({"tokenizer": {"pad_to_multiple_of": -8}}, "pad_to_multiple_of"),
        ({"tokenizer": {"pad_to_multiple_of": 2.5}}, "pad_to_multiple_of"),
        ({"tokenizer_source": ["base"]}, "tokenizer_source"),
        ({"tokenizer_source": " "}, "tokenizer_source"),
        ({"chat_template": "chatml2"}, "built-in template"),
        ({"chat_template": "no braces here but quite long text"}, "Jinja"),
        ({"chat_template": 3}, "chat_template"),
    ],
)
def test_config_errors(fam, extra, needle):
    with pytest.raises(MergeConfigError, match="tokenizer|chat_template") as ei:
        parse_config(_cfg(fam, **extra))
    assert needle in str(ei.value)


# --------------------------------------------------------------------------- merges
def _expected_vocab(fam, keys):
    """The union's token set, and the ids the base's tokens keep."""
    toks = set()
    for k in keys:
        toks |= {t for t, i in fam.vocabs[k].items() if i < fam.rows[k]}
    return toks


def test_union_rows_and_transformers_load(fam, tmp_path):
    from transformers import AutoModelForCausalLM

    weights = {"ft1": 0.6, "ft2": 0.4}
    out = tmp_path / "union"
    plan = merge_checkpoints(_cfg(fam, tokenizer_source="union"), out, dry_run=True, device="cpu")
    assert {t.name for t in plan.tensors if t.action == "permute"} == {EMB, HEAD}
    assert "tokenizer: union" in plan.summary()
    merge_checkpoints(_cfg(fam, tokenizer_source="union"), out, progress=False, device="cpu")
    tensors, tok = _load(out)
    vocab = tok.get_vocab()
    assert set(vocab) == _expected_vocab(fam, ["base", "ft1", "ft2"])
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert all(vocab[t] == i for t, i in fam.vocabs["base"].items())  # the base's ids are kept
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)
    record = yaml.safe_load((out / "m3kernels_merge.yaml").read_text())["tokenizer"]
    assert record["source"] == "union" and record["tokens"] == record["rows"] == len(vocab)
    assert tok.convert_ids_to_tokens(tok("<|im_start|> the <tool>")["input_ids"])[-3:] == [
        "<|im_start|>",
        "the",
        "<tool>",
    ]
    for name in (EMB, HEAD):
        ref = reference_inputs(fam, ["ft1", "ft2", "base"], "base", vocab, len(vocab), name)
        _close(tensors[name], task_arithmetic(ref, "base", weights), name)
    # tokens only in ft2 take ft2's row in every input: the merge gives that row back
    the = vocab["the"]
    _close(tensors[EMB][the], fam.row("ft2", EMB, "the").double(), "'the' row")
    # <|im_start|> is in ft1 and ft2 (other ids) but not the base: the base input gets their
    # float32 mean, ft1 and ft2 their own rows
    r1, r2 = fam.row("ft1", EMB, "<|im_start|>"), fam.row("ft2", EMB, "<|im_start|>")
    mean = ((r1 + r2) / 2).double()
    want = mean + 0.6 * (r1.double() - mean) + 0.4 * (r2.double() - mean)
    _close(tensors[EMB][vocab["<|im_start|>"]], want, "<|im_start|> row")
    # the output loads as a model with the merged tokenizer, its rows where the tokenizer says
    model = AutoModelForCausalLM.from_pretrained(str(out))
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(vocab)
    for t in ("<|im_start|>", "<tool>", "the", "a", "<s>"):
        assert torch.equal(emb[tok.convert_tokens_to_ids(t)], tensors[EMB][vocab[t]])


def test_tokens_force_zero_model_token_and_padding(fam, tmp_path):
    tokens = {
        "<|im_end|>": {"source": str(fam.dirs["ft1"]), "force": True},
        "<new>": {"source": {"kind": "zero"}},
        "<alias>": {"source": {"kind": "model_token", "model": str(fam.dirs["ft2"]), "token": "the"}},
        "a": {
            "source": {"kind": "model_token", "model": str(fam.dirs["base"]), "token_id": 7},
            "force": True,
        },
    }
    cfg = _cfg(fam, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 16})
    out = tmp_path / "tokens"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    tensors, tok = _load(out)
    vocab = tok.get_vocab()
    assert {"<new>", "<alias>"} <= set(vocab)
    rows = -(-len(vocab) // 16) * 16
    assert tensors[EMB].shape[0] == rows > len(vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    for name in (EMB, HEAD):
        ref = reference_inputs(fam, ["ft1", "ft2", "base"], "base", vocab, rows, name, tokens)
        _close(tensors[name], task_arithmetic(ref, "base", {"ft1": 0.6, "ft2": 0.4}), name)
    assert torch.count_nonzero(tensors[EMB][vocab["<new>"]]) == 0
    _close(tensors[EMB][vocab["a"]], fam.tensors["base"][EMB][7].double(), "forced 'a'")
    _close(tensors[EMB][vocab["<alias>"]], fam.row("ft2", EMB, "the").double(), "<alias>")


def test_base_source_with_new_tokens(fam, tmp_path):
    """tokenizer: {source: base, tokens: ...} with tokens the base lacks: added after the base's
    (mergekit 0.1.5 adds them to the base's own tokenizer and fails with a KeyError)."""
    tokens = {"<new>": {"source": {"kind": "zero"}}, "<|im_start|>": {"source": str(fam.dirs["ft1"])}}
    cfg = _cfg(fam, tokenizer={"source": "base", "tokens": tokens})
    out = tmp_path / "bt"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    tensors, tok = _load(out)
    vocab = tok.get_vocab()
    assert set(vocab) == set(fam.vocabs["base"]) | set(tokens)
    assert all(vocab[t] == i for t, i in fam.vocabs["base"].items())
    for name in (EMB, HEAD):
        ref = reference_inputs(fam, ["ft1", "ft2", "base"], "base", vocab, len(vocab), name, tokens)
        _close(tensors[name], task_arithmetic(ref, "base", {"ft1": 0.6, "ft2": 0.4}), name)


def test_linear_without_base_and_three_way_mean(fam, tmp_path):
    """No base model: the first model's tokenizer is the base of the union; a token two of three
    inputs have gets their mean (no base to prefer)."""
    cfg = _cfg(fam, method="linear", keys=("ft1", "ft2", "ft3"), weights=(0.5, 0.3, 0.2), base=False)
    cfg["tokenizer_source"] = "union"
    out = tmp_path / "linear"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    tensors, tok = _load(out)
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in fam.vocabs["ft1"].items() if i < fam.rows["ft1"])
    w = {"ft1": 0.5, "ft2": 0.3, "ft3": 0.2}
    for name in (EMB, HEAD):
        ref = reference_inputs(fam, ["ft1", "ft2", "ft3"], None, vocab, len(vocab), name)
        _close(tensors[name], sum(w[k] * ref[k] for k in w) / sum(w.values()), name)


def test_base_source_same_vocab_is_a_plain_merge(fam, tmp_path):
    """tokenizer_source: base (written as the base's path) over models with the base's vocabulary:
    no row moves, the tokenizer files are the base's, byte for byte."""
    cfg = _cfg(fam, keys=("ft3",), weights=(0.5,), tokenizer_source=str(fam.dirs["base"]))
    plan = merge_checkpoints(cfg, tmp_path / "dry", dry_run=True, device="cpu")
    assert {t.action for t in plan.tensors} == {"merge"}
    out = tmp_path / "base"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (fam.dirs["base"] / name).read_bytes()


def test_base_source_drops_rows_the_base_tokenizer_lacks(fam, tmp_path):
    """tokenizer_source: base onto ft1 (two added tokens, two padding rows): the output has the
    base's rows only, ft1's rows re-mapped by token (mergekit's behaviour)."""
    cfg = _cfg(fam, keys=("ft1",), weights=(0.7,), tokenizer_source="base")
    out = tmp_path / "b"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    tensors, tok = _load(out)
    assert tok.get_vocab() == fam.vocabs["base"] and tensors[EMB].shape[0] == fam.rows["base"]
    ref = reference_inputs(fam, ["ft1", "base"], "base", fam.vocabs["base"], fam.rows["base"], EMB)
    _close(tensors[EMB], task_arithmetic(ref, "base", {"ft1": 0.7}), EMB)


def test_tokenizer_source_other_model(fam, tmp_path):
    cfg = _cfg(fam, tokenizer_source=str(fam.dirs["ft2"]))
    out = tmp_path / "p"
    merge_checkpoints(cfg, out, progress=False, device="cpu")
    tensors, tok = _load(out)
    assert tok.get_vocab() == fam.vocabs["ft2"]
    ref = reference_inputs(
        fam, ["ft1", "ft2", "base"], "base", fam.vocabs["ft2"], len(fam.vocabs["ft2"]), EMB
    )
    _close(tensors[EMB], task_arithmetic(ref, "base", {"ft1": 0.6, "ft2": 0.4}), EMB)


def test_placeholder_tokenizer_keeps_the_plain_copy(tmp_path):
    """tokenizer_source: base over a base whose tokenizer files cannot be loaded (the synthetic
    placeholders): a note, the files copied, the rows merged as before."""
    from m3kernels import synthetic

    base_dir, dirs, _ = synthetic.make_family(tmp_path / "m", n_models=1, shards=1)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_dir),
        "models": [{"model": str(dirs[0])}],
    }
    cfg["tokenizer_source"] = "base"
    plan = merge_checkpoints(cfg, tmp_path / "o", dry_run=True, device="cpu")
    assert plan.tokenizer is None and any("tokenizer_source: base" in n for n in plan.notes)
    merge_checkpoints(cfg, tmp_path / "o", progress=False, device="cpu")
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()


# --------------------------------------------------------------------------- chat templates
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}],
    [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 "},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    [
        {"role": "user", "content": "x"},
        {"role": "user_context", "content": " ctx "},
        {"role": "assistant", "content": "y"},
    ],
    [
        {"role": "system", "content": "s1"},
        {"role": "system", "content": "s2\n"},
        {"role": "user", "content": "\tq"},
    ],
    [{"role": "assistant", "content": "first"}],
]


def _render(template: str) -> list:
    from transformers.utils.chat_template_utils import render_jinja_template

    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                r = render_jinja_template(
                    conversations=[conv],
                    chat_template=template,
                    add_generation_prompt=gen,
                    bos_token="<s>",
                    eos_token="</s>",
                )[0][0]
            except Exception as exc:  # noqa: BLE001 - the templates raise on bad role orders
                r = f"error: {type(exc).__name__}"
            out.append(r)
    return out


@pytest.mark.skipif(MK_TEMPLATES is None, reason="mergekit venv (its chat template files) not found")
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_as_mergekit(name):
    theirs = (MK_TEMPLATES / f"{name}.jinja").read_text()
    assert _render(BUILTIN[name]) == _render(theirs)


def test_builtin_template_formats():
    """The formats the names stand for (independent of mergekit's files)."""
    conv = CONVERSATIONS[1]
    r = {n: _render(t)[3] for n, t in BUILTIN.items()}  # conversation 1 with the generation prompt
    assert (
        r["chatml"]
        == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
        + "<|im_start|>assistant\n"
    )
    assert r["llama3"].startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n")
    assert r["mistral"] == "<s> [INST]  Be brief. \n\n2+2? [/INST]  4 </s>"
    assert r["alpaca"] == "Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n4"


def test_chat_template_written(fam, tmp_path):
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    # chat template alone: the base's tokenizer files with the template
    out = tmp_path / "c1"
    merge_checkpoints(
        _cfg(fam, keys=("ft3",), weights=(1.0,), chat_template=literal), out, progress=False, device="cpu"
    )
    _, tok = _load(out)
    assert (out / "chat_template.jinja").read_text() == literal
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    # with a union and a built-in name
    out = tmp_path / "c2"
    merge_checkpoints(
        _cfg(fam, tokenizer_source="union", chat_template="chatml"), out, progress=False, device="cpu"
    )
    _, tok = _load(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[0] == "<|im_start|>"


def test_chat_template_auto(tmp_path):
    tpl_a = "{% for m in messages %}A{{ m['content'] }}{% endfor %}"
    tpl_b = "{% for m in messages %}B{{ m['content'] }}{% endfor %}"
    fam = make_tokenizer_family(
        tmp_path / "f",
        keys=("base", "ft1", "ft2", "ft3"),
        chat_templates={"base": tpl_a, "ft1": tpl_b, "ft2": tpl_b},
    )
    cfg = _cfg(fam, keys=("ft1", "ft2", "ft3"), weights=(1, 1, 1), chat_template="auto")
    merge_checkpoints(cfg, tmp_path / "o", progress=False, device="cpu")
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == tpl_b  # two of four inputs


# --------------------------------------------------------------------------- bad inputs
def _cli_fails(cfg: dict, tmp_path, needle: str, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "never"
    rc = cli_main(["merge", str(path), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    return err


def test_token_source_without_the_token(fam, tmp_path, capsys):
    cfg = _cfg(fam, tokenizer={"tokens": {"<tool>": {"source": str(fam.dirs["ft1"]), "force": True}}})
    err = _cli_fails(cfg, tmp_path, "does not have the token '<tool>'", capsys)
    assert str(fam.dirs["ft1"]) in err
    cfg = _cfg(
        fam,
        tokenizer={
            "tokens": {
                "<x>": {"source": {"kind": "model_token", "model": str(fam.dirs["ft1"]), "token": "zz"}}
            }
        },
    )
    _cli_fails(cfg, tmp_path, "'zz' is not in the tokenizer", capsys)


def test_tokenizer_source_not_a_model(fam, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _cli_fails(_cfg(fam, tokenizer_source=str(tmp_path / "empty")), tmp_path, "holds no tokenizer", capsys)
    _cli_fails(_cfg(fam, tokenizer_source=str(tmp_path / "missing")), tmp_path, "not a model folder", capsys)


def test_rows_short_of_the_tokenizer(tmp_path, capsys):
    """A model whose embedding has fewer rows than its config's vocab_size says (mergekit fails
    with an index error): one error naming the tensor and the model."""
    fam = make_tokenizer_family(tmp_path / "f", keys=("base", "ft2"))
    from safetensors.torch import load_file, save_file

    f = fam.dirs["ft2"] / "model.safetensors"
    ts = load_file(str(f))
    ts[EMB] = ts[EMB][:-2].contiguous()
    save_file(ts, str(f), metadata={"format": "pt"})
    cfg = _cfg(fam, keys=("ft2",), weights=(1.0,), tokenizer_source="union")
    err = _cli_fails(cfg, tmp_path, EMB, capsys)
    assert "rows" in err and "ft2" in err


# --------------------------------------------------------------------------- against mergekit
@pytest.mark.skipif(not (MK_VENV / "bin" / "mergekit-yaml").exists(), reason="mergekit 0.1.5 venv not found")
def test_union_tokens_pad_against_mergekit(fam, tmp_path):
    tokens = {
        "<|im_end|>": {"source": str(fam.dirs["ft1"]), "force": True},
        "<new>": {"source": {"kind": "zero"}},
    }
    cfg = _cfg(
        fam, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 16}, chat_template="chatml"
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    mk = tmp_path / "mk"
    p = subprocess.run(
        [str(MK_VENV / "bin" / "mergekit-yaml"), str(path), str(mk), "--no-copy-tokenizer", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ours = tmp_path / "ours"
    merge_checkpoints(path, ours, progress=False, device="cpu")
    (a, ta), (b, tb) = _load(ours), _load(mk)
    va, vb = ta.get_vocab(), tb.get_vocab()
    assert va.keys() == vb.keys()
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if name in (EMB, HEAD):
            for t in va:  # by token: mergekit orders the non-base models as a Python set
                assert torch.equal(a[name][va[t]], b[name][vb[t]]), (name, t)
            # padding rows: each input's mean over its rows, summed in id order: bit-equal when
            # the ids are, else within the rounding of a float32 sum of len(vocab) rows
            pa, pb = a[name][len(va) :], b[name][len(vb) :]
            if va == vb:
                assert torch.equal(pa, pb), name
            else:
                assert (pa - pb).abs().max() <= 1e-6 * a[name].abs().max(), name
        else:
            assert torch.equal(a[name], b[name]), name
    assert _render(ta.chat_template) == _render(tb.chat_template)
    assert (
        json.loads((ours / "config.json").read_text())["vocab_size"]
        == json.loads((mk / "config.json").read_text())["vocab_size"]
    )


def test_stand_ins_differ_as_documented(fam):
    assert fam.rows["ft1"] == len(fam.vocabs["ft1"]) + ADDITIONS["ft1"][2]
    assert fam.vocabs["ft1"]["<|im_start|>"] != fam.vocabs["ft2"]["<|im_start|>"]
    assert fam.vocabs["ft3"] == fam.vocabs["base"]


def test_relative_paths_next_to_the_config(tmp_path, monkeypatch):
    """Model paths relative to the config file's folder (not the working directory), in models,
    tokenizer_source and a token's source alike."""
    fam = make_tokenizer_family(tmp_path / "models", keys=("base", "ft1", "ft2"))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "models/base",
        "models": [{"model": "models/ft1"}, {"model": "models/ft2"}],
        "tokenizer": {
            "source": "models/ft2",
            "tokens": {"<|im_end|>": {"source": "models/ft1"}},
        },
        "dtype": "float32",
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli_main(["merge", str(tmp_path / "cfg.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    tensors, tok = _load(tmp_path / "out")
    vocab = tok.get_vocab()
    assert set(vocab) == set(fam.vocabs["ft2"]) | {"<|im_end|>"}
    # ft1's <|im_end|> row in every input (only ft1 has it): the merge gives it back
    _close(tensors[EMB][vocab["<|im_end|>"]], fam.row("ft1", EMB, "<|im_end|>").double(), "<|im_end|>")


def test_union_ids_follow_each_inputs_id_order():
    """The ids the union gives new tokens follow the inputs' own id order, not the order of a
    hash map (tokenizers' get_vocab() changes its order from run to run), so a union merge
    writes the same tokenizer every time."""
    from tokenizer_models import BASE_MERGES, make_tokenizer

    from m3kernels.checkpoint.tokenizer import _Loaded, _union

    letters = "bcdfghjklmpqstvwxyz"
    merges = [(a, b) for a in letters[:6] for b in "aeiou"]  # 30 new plain tokens
    base = make_tokenizer()
    other = make_tokenizer(BASE_MERGES + tuple(merges), added=(("<tool>", False),))
    size = len(other.get_vocab())
    out = _union(
        base, [_Loaded(None, base, None, len(base.get_vocab())), _Loaded(None, other, size, size)], []
    )
    got, theirs = out.get_vocab(), other.get_vocab()
    new = [t for t in theirs if t not in base.get_vocab()]
    assert len(new) == 31
    by_theirs = sorted(new, key=theirs.__getitem__)
    assert sorted(new, key=got.__getitem__) == by_theirs
    assert [got[t] for t in by_theirs] == list(range(len(base.get_vocab()), len(got)))
