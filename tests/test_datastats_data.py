"""Data files for ``m3kernels stats``: text, JSONL ``text`` and JSONL ``prompt``/``response`` (targets on the
response only), and every bad input giving one DataError naming the file and the line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from m3kernels.datastats.data import DataError, iter_examples, load_examples, pad_batch  # noqa: E402
from m3kernels.datastats.tiny import make_tokenizer, sample_texts  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(sample_texts(32), vocab_size=120)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_text_file_one_example_per_line(tmp_path, tok):
    p = write(tmp_path / "d.txt", ["the cat runs", "", "   ", "a dog sits near the tree"])
    ex, skipped = load_examples(p, tok, max_length=64)
    assert [e.line for e in ex] == [1, 4] and skipped == []
    for e, text in zip(ex, ["the cat runs", "a dog sits near the tree"]):
        assert list(e.ids) == tok(text)["input_ids"]
        assert list(map(bool, e.targets)) == [False] + [True] * (len(e.ids) - 1)


def test_jsonl_text_and_max_examples(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [json.dumps({"text": t}) for t in sample_texts(5, seed=3)])
    ex, _ = load_examples(p, tok, max_length=64, max_examples=3)
    assert [e.line for e in ex] == [1, 2, 3]


def test_prompt_response_targets_are_the_response_and_eos(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "the cat", "response": " runs over the road"})])
    (e,), _ = load_examples(p, tok, max_length=64)
    prompt = tok("the cat")["input_ids"]
    resp = tok(" runs over the road", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(e.ids) == prompt + resp
    assert list(map(bool, e.targets)) == [False] * len(prompt) + [True] * len(resp)


def test_cut_to_max_length_and_examples_without_target_skipped(tmp_path, tok):
    long_prompt = " ".join(["river"] * 40)
    p = write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": long_prompt, "response": "sun"}),
            json.dumps({"prompt": "a", "response": "b c"}),
        ],
    )
    ex, skipped = load_examples(p, tok, max_length=8)
    assert skipped == [1] and [e.line for e in ex] == [2]
    assert all(len(e.ids) <= 8 for e in ex)


@pytest.mark.parametrize(
    "lines, line, words",
    [
        (['{"text": "a"}', "{not json"], 2, "not valid JSON"),
        (['{"text": "a"}', "", '{"text": "b"}'], 2, "empty line"),
        (['{"text": "a"}', "[1, 2]"], 2, "not an object"),
        (['{"text": "a"}', '{"txt": "b"}'], 2, "no 'text' field"),
        (['{"text": 3}'], 1, "field 'text' must be a string"),
        (['{"prompt": "a"}'], 1, "field 'response' must be a string, it is missing"),
        (['{"text": "a"}', '{"prompt": "a", "response": "b"}'], 2, "mixes record kinds"),
    ],
)
def test_malformed_jsonl_line_one_error_naming_file_and_line(tmp_path, tok, lines, line, words):
    p = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_examples(p, tok, max_length=32)
    msg = str(e.value)
    assert f"{p}: line {line}:" in msg and words in msg and "\n" not in msg


def test_no_usable_example(tmp_path, tok):
    p = write(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(DataError, match="no usable example"):
        load_examples(p, tok, max_length=32)
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.txt", tok, max_length=32)
    p2 = tmp_path / "latin1.txt"
    p2.write_bytes(b"ok line\n\xff\xfe bad\n")
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        load_examples(p2, tok, max_length=32)


def test_bad_options(tmp_path, tok):
    p = write(tmp_path / "d.txt", ["the cat runs"])
    with pytest.raises(ValueError, match="max_length"):
        list(iter_examples(p, tok, max_length=1))
    with pytest.raises(ValueError, match="max_examples"):
        list(iter_examples(p, tok, max_length=8, max_examples=0))


def test_pad_batch_right_padding(tmp_path, tok):
    p = write(tmp_path / "d.txt", ["the cat", "a dog sits near the big tree"])
    ex, _ = load_examples(p, tok, max_length=64)
    ids, targets, real = pad_batch(ex, pad_id=3)
    assert ids.shape == (2, max(len(e.ids) for e in ex))
    n0 = len(ex[0].ids)
    assert real[0, :n0].all() and not real[0, n0:].any() and (ids[0, n0:] == 3).all()
    assert not targets[0, n0:].any() and targets[1].sum() == ex[1].n_targets


def test_the_stats_plugin_imports_no_torch():
    """m3kernels.cli builds every plugin's parser on each start: the module must stay light."""
    import subprocess
    import sys

    code = (
        "import sys, argparse, m3kernels.datastats, m3kernels.datastats.cli as c\n"
        "c.add_parser(argparse.ArgumentParser().add_subparsers())\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
