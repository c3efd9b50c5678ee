"""EVAL.yaml parsing (strict) and each evaluator on a hand-checked case.

The evaluators run on a stub causal LM whose next-token logits are c on token (t + 1) and 0
elsewhere, so every loss and every greedy continuation is known in closed form; the tokenizer is
the toy one (one token per character, consecutive ids for a, b, c, ...)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from m3kernels.search.errors import SearchError  # noqa: E402
from m3kernels.search.evalspec import load_eval  # noqa: E402
from m3kernels.search.evaluators import evaluate_all, make_evaluator  # noqa: E402
from m3kernels.search.objective import normalized_improvement, objective  # noqa: E402
from m3kernels.search.toy import make_tokenizer  # noqa: E402

C = 2.0


class NextPlusOne(torch.nn.Module):
    """logits[..., t, v] = C if v == (id_t + 1) mod V else 0."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
        self.calls += 1
        nxt = (input_ids + 1) % self.vocab
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, nxt[..., None], C)
        return SimpleNamespace(logits=logits)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_eval(tmp_path, body: str, name="eval.yaml"):
    p = tmp_path / name
    p.write_text(body)
    return p


def eval_spec(tmp_path, body: str):
    """The EVAL.yaml ``body`` written to tmp_path and loaded for one model."""
    return load_eval(write_eval(tmp_path, body), models=["/a"])


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_on_the_response_only(tmp_path, tok):
    jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "cd"}])
    jsonl(tmp_path / "tx.jsonl", [{"text": "abc"}])
    spec = load_eval(
        write_eval(
            tmp_path,
            "tasks:\n  - {name: pr, type: loss, data: pr.jsonl}\n  - {name: tx, type: loss, data: tx.jsonl}\n"
            "objective: pr.loss\n",
        ),
        models=["/a", "/b"],
    )
    model = NextPlusOne(len(tok))
    scores = evaluate_all([make_evaluator(t, tok) for t in spec.tasks], model, tok)
    z = math.exp(C) + len(tok) - 1
    hit, miss = -math.log(math.exp(C) / z), -math.log(1 / z)
    # targets c (after b: hit), d (after c: hit), </s> (after d: miss); the prompt is not scored
    assert scores["pr.loss"] == pytest.approx((2 * hit + miss) / 3, rel=1e-6)
    assert scores["pr.perplexity"] == pytest.approx(math.exp((2 * hit + miss) / 3), rel=1e-6)
    # text: <s> a b c, targets a (after <s>: miss), b, c (hits)
    assert scores["tx.loss"] == pytest.approx((miss + 2 * hit) / 3, rel=1e-6)
    assert spec.goal == "min" and objective(spec, scores, {}) == -scores["pr.loss"]


def test_loss_batches_with_padding_agree(tmp_path, tok):
    rows = [{"prompt": "a" * k, "response": "bcd"[: 1 + k % 3]} for k in range(1, 8)]
    jsonl(tmp_path / "d.jsonl", rows)
    out = []
    for bs in (1, 3):
        spec = eval_spec(
            tmp_path,
            f"tasks:\n  - {{name: d, type: loss, data: d.jsonl, batch_size: {bs}}}\nobjective: d.loss\n",
        )
        out.append(evaluate_all([make_evaluator(spec.tasks[0], tok)], NextPlusOne(len(tok)), tok)["d.loss"])
    assert out[0] == pytest.approx(out[1], rel=1e-9)


def test_exact_match_greedy(tmp_path, tok):
    jsonl(
        tmp_path / "qa.jsonl",
        [
            {"prompt": "ab", "answer": "cde"},  # generates c, d, e: a match
            {"prompt": "ab", "answer": "cd"},  # generates cde: no match
            {"prompt": "x", "answer": " yz "},  # y, z, then '+' ... cut by max_new_tokens=3: "yz+"
        ],
    )
    spec = eval_spec(
        tmp_path,
        "tasks:\n  - {name: qa, type: exact_match, data: qa.jsonl, max_new_tokens: 3}\nobjective: qa.exact_match\n",
    )
    ev = make_evaluator(spec.tasks[0], tok)
    model = NextPlusOne(len(tok))
    assert ev.generate(model, tok, tok("ab")["input_ids"]) == "cde"
    assert evaluate_all([ev], model, tok)["qa.exact_match"] == pytest.approx(1 / 3)
    # a stop string ends the answer
    spec2 = eval_spec(
        tmp_path,
        "tasks:\n  - {name: qa, type: exact_match, data: qa.jsonl, max_new_tokens: 3, stop: [e, '+']}\n"
        "objective: qa.exact_match\n",
    )
    assert evaluate_all([make_evaluator(spec2.tasks[0], tok)], model, tok)["qa.exact_match"] == pytest.approx(
        2 / 3
    )


def test_user_function(tmp_path, tok):
    (tmp_path / "userev.py").write_text(
        "def score(model, tokenizer):\n    return {'acc': 0.75, 'n': 4}\n"
        "def boom(model, tokenizer):\n    raise RuntimeError('the grader is down')\n"
        "def notdict(model, tokenizer):\n    return 3\n"
        "def nan(model, tokenizer):\n    return {'acc': float('nan')}\n"
    )
    spec = eval_spec(
        tmp_path,
        "tasks:\n  - {name: u, type: function, function: 'userev.py:score', metric: acc, expert: 1}\n",
    )
    assert evaluate_all([make_evaluator(spec.tasks[0], tok)], NextPlusOne(5), tok) == {
        "u.acc": 0.75,
        "u.n": 4.0,
    }
    spec = eval_spec(
        tmp_path,
        "tasks:\n  - {name: u, type: function, function: 'userev:score', metric: acc, expert: 1}\n",
    )  # a module in the EVAL.yaml folder
    assert evaluate_all([make_evaluator(spec.tasks[0], tok)], NextPlusOne(5), tok)["u.acc"] == 0.75
    for fn, needle in (
        ("boom", "raised RuntimeError: the grader is down"),
        ("notdict", "returned int"),
        ("nan", "finite"),
    ):
        spec = eval_spec(
            tmp_path,
            f"tasks:\n  - {{name: u, type: function, function: 'userev.py:{fn}', metric: acc}}\nobjective: u.acc\n",
        )
        with pytest.raises(SearchError, match=needle):
            evaluate_all([make_evaluator(spec.tasks[0], tok)], NextPlusOne(5), tok)
    spec = eval_spec(
        tmp_path,
        "tasks:\n  - {name: u, type: function, function: 'userev.py:score', metric: f1}\nobjective: u.f1\n",
    )
    with pytest.raises(SearchError, match="returned no 'f1'"):
        evaluate_all([make_evaluator(spec.tasks[0], tok)], NextPlusOne(5), tok)


def test_normalized_improvement_by_hand():
    assert normalized_improvement(1.5, 2.0, 1.0, "t") == 0.5  # a loss halfway from base to expert
    assert normalized_improvement(0.9, 0.5, 0.7, "t") == pytest.approx(2.0)  # accuracy beyond the expert
    with pytest.raises(SearchError, match="undefined"):
        normalized_improvement(1.0, 2.0, 2.0, "t")


def test_bad_data_lines(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ab", "response": "c"}\n{"prompt": "ab"}\n')
    (tmp_path / "notjson.jsonl").write_text('{"text": "a"}\n{oops\n')
    (tmp_path / "em.jsonl").write_text('{"prompt": "ab", "answer": 3}\n')
    cases = [
        ("type: loss, data: bad.jsonl", "bad.jsonl:2: no 'response' field"),
        ("type: loss, data: notjson.jsonl", "notjson.jsonl:2: not a JSON object"),
        ("type: exact_match, data: em.jsonl", "field 'answer' is int"),
        ("type: exact_match, data: bad.jsonl", "no 'answer' field"),
    ]
    for body, needle in cases:
        spec = eval_spec(
            tmp_path,
            f"tasks:\n  - {{name: t, {body}}}\nobjective: t.{'loss' if 'loss' in body else 'exact_match'}\n",
        )
        with pytest.raises(SearchError, match=needle):
            make_evaluator(spec.tasks[0], tok)


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            "tasks:\n  - {name: t, type: loss, data: missing.jsonl, expert: 1}\n",
            "missing.jsonl' can not be read",
        ),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 1}\nobjectiv: normalized\n",
            "objectiv: unknown key",
        ),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 1, lr: 3}\n", "tasks[0].lr: unknown key"),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 1, max_new_tokens: 3}\n",
            "does not take it",
        ),
        (
            "tasks:\n  - {name: t, type: bleu, data: d.jsonl}\n",
            "'bleu' is not one of loss, exact_match, function",
        ),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 3}\n", "model 3 does not exist"),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: /elsewhere}\n",
            "none of the config's models",
        ),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl}\n", "needs an expert for every task"),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl}\nobjective: u.loss\n", "not 'normalized' nor"),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl}\nobjective: t.exact_match\n",
            "scores loss, perplexity",
        ),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl, batch_size: 0, expert: 1}\n", "batch_size"),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 1}\n  - {name: t, type: loss, data: d.jsonl, expert: 1}\n",
            "used twice",
        ),
        ("tasks:\n  - {name: 'a b', type: loss, data: d.jsonl}\n", "tasks[0].name"),
        ("tasks:\n  - {name: t, type: function, function: 'x:y'}\nobjective: t.acc\n", "metric: required"),
        (
            "tasks:\n  - {name: t, type: function, function: nocolon, metric: a}\nobjective: t.a\n",
            "module:function",
        ),
        ("tasks: []\n", "non-empty list"),
        ("tasks:\n  - &a {name: t, type: loss, data: d.jsonl, expert: 1}\n  - *a\n", "aliases"),
        ("tasks:\n  - {name: t, type: loss, data: d.jsonl, expert: 1}\ntasks: []\n", "written twice"),
        ("tasks: [\n", "not valid YAML"),
        (
            "tasks:\n  - {name: t, type: loss, data: d.jsonl}\nobjective: {score: t.loss, goal: up}\n",
            "objective.goal",
        ),
    ],
)
def test_strict_eval_yaml(tmp_path, body, needle):
    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises(SearchError) as e:
        load_eval(write_eval(tmp_path, body), models=["/a", "/b"])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_eval_file_itself(tmp_path):
    with pytest.raises(SearchError, match="can not be read"):
        load_eval(tmp_path / "nope.yaml", models=["/a"])
    with pytest.raises(SearchError, match="not a regular file"):
        load_eval(tmp_path, models=["/a"])


def test_expert_by_path_and_named_objective_goal(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n')
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    spec = load_eval(
        write_eval(
            tmp_path, f"tasks:\n  - {{name: t, type: loss, data: d.jsonl, expert: {tmp_path / 'm2'}}}\n"
        ),
        models=[str(tmp_path / "m1"), str(tmp_path / "m2")],
    )
    assert spec.tasks[0].expert == 1 and spec.objective == "normalized" and spec.goal == "max"
    spec = eval_spec(
        tmp_path,
        "tasks:\n  - {name: t, type: loss, data: d.jsonl, metric: perplexity}\nobjective: t.perplexity\n",
    )
    assert spec.goal == "min" and spec.tasks[0].score_name == "t.perplexity"
