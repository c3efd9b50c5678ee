"""The search end to end on a tiny Llama (m3kernels/search/toy.py: built from a transformers
config, trained a few steps here on two synthetic tasks, saved as safetensors checkpoints):

* the in-memory candidate equals ``m3kernels merge`` of the same config bit for bit;
* the search picks the candidate with the best objective, and each candidate's scores equal an
  evaluation of that candidate merged to disk and loaded separately; OUT is the best one;
* an interrupted search resumes and skips the finished candidates (a cut last line included);
  an evaluator that fails keeps the results already computed;
* the CLI (one-line errors, exit 2), the plot and the exports.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from m3kernels import cli  # noqa: E402
from m3kernels.checkpoint.config import parse_config  # noqa: E402
from m3kernels.search import search  # noqa: E402
from m3kernels.search.errors import SearchError  # noqa: E402
from m3kernels.search.evalspec import load_eval  # noqa: E402
from m3kernels.search.evaluators import evaluate_all, make_evaluator  # noqa: E402
from m3kernels.search.live import LiveModel, load_causal_lm  # noqa: E402
from m3kernels.search.objective import objective  # noqa: E402
from m3kernels.search.space import build_candidates, parse_space  # noqa: E402
from m3kernels.search.toy import ToySizes, make_toy_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy_family(root, ToySizes(base_steps=20, expert_steps=25, eval_examples=12), seed=1)


def write_config(path, fam, extra: str = "", method="ties", params="parameters:\n  density: 0.5\n"):
    path.write_text(
        f"merge_method: {method}\nbase_model: {fam.base}\nmodels:\n"
        f"  - model: {fam.experts['add']}\n  - model: {fam.experts['rev']}\n" + params + extra
    )
    return path


def write_eval(path, fam, extra: str = ""):
    path.write_text(
        "tasks:\n"
        f"  - {{name: add, type: loss, data: {fam.data['add']}, expert: 1}}\n"
        f"  - {{name: rev, type: loss, data: {fam.data['rev']}, expert: 2}}\n" + extra
    )
    return path


def merged_folder(cfg: dict, out) -> dict:
    """``m3kernels merge`` of a config dict; its tensors."""
    import yaml

    p = out.parent / (out.name + ".yaml")
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["merge", str(p), str(out), "--device", "cpu", "--quiet", "--force"]) == 0
    return load_file(str(out / "model.safetensors"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


IN_MEMORY = {
    "ties_m3_draw": ("ties", "parameters:\n  density: 0.4\n  lambda: 0.9\n", {"alphas": [0.7], "seed": 5}),
    "ties_dare_lambda": ("ties_dare", "parameters:\n  density: 0.5\n  drop_rate: 0.3\n", {"lambdas": [0.3]}),
    "dare_linear_bf16": (
        "dare_linear",
        "parameters:\n  density: 0.6\nout_dtype: bfloat16\n",
        {"plain": True},
    ),
    "ties_model_trim": ("ties", "parameters:\n  density: 0.3\ntrim_scope: model\n", {"alphas": [2.0]}),
}


@pytest.mark.parametrize("case", sorted(IN_MEMORY))
def test_in_memory_merge_equals_m3kernels_merge(case, fam, tmp_path):
    method, params, space = IN_MEMORY[case]
    cfg_path = write_config(tmp_path / "c.yaml", fam, method=method, params=params)
    raw = __import__("yaml").safe_load(cfg_path.read_text())
    cfg = parse_config(copy.deepcopy(raw))
    (cand,) = build_candidates(raw, 2, parse_space(space), cfg.method, cfg.mixup)
    live = LiveModel(cfg, device="cpu")
    try:
        # poison the live weights first: every merged tensor must be written
        for t in live.targets.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        live.merge(cand)
        disk = merged_folder(cand.config, tmp_path / "merged")
        assert set(disk) <= set(live.targets)
        for name, t in disk.items():
            assert same_bits(live.targets[name], t), name
    finally:
        live.close()


def evaluate_folder(folder, spec, refs) -> tuple:
    """Scores and objective of a checkpoint loaded from disk with transformers."""
    from m3kernels.search.live import load_tokenizer

    model = load_causal_lm(folder, torch.float32)
    tok = load_tokenizer(folder)
    scores = evaluate_all([make_evaluator(t, tok) for t in spec.tasks], model, tok)
    return scores, objective(spec, scores, refs)


def test_search_picks_the_best_and_matches_separate_evaluation(fam, tmp_path):
    cfg = write_config(tmp_path / "merge.yaml", fam, "search:\n  lambdas: [0.3, 0.7]\n")
    ev = write_eval(tmp_path / "eval.yaml", fam)
    lines = []
    res = search(
        cfg,
        tmp_path / "best",
        ev,
        space={"methods": "ties,task_arithmetic", "alphas": [1.0]},
        progress=False,
        table=lines.append,
    )
    rows = res.rows
    assert len(rows) == 6 and res.evaluated == 6 and len(lines) == 6
    assert [r["candidate"]["method"] for r in rows] == ["ties"] * 3 + ["task_arithmetic"] * 3
    spec = load_eval(ev, models=[str(fam.experts["add"]), str(fam.experts["rev"])])
    refs = {k: v["scores"] for k, v in res.references.items()}
    assert set(refs) == {"base", "expert:0", "expert:1"}
    # references: the checkpoints themselves, loaded from disk
    for name, folder in (
        ("base", fam.base),
        ("expert:0", fam.experts["add"]),
        ("expert:1", fam.experts["rev"]),
    ):
        assert evaluate_folder(folder, spec, refs)[0] == pytest.approx(refs[name], rel=1e-9, abs=1e-12)
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    raw.pop("search")
    space = parse_space({"methods": "ties,task_arithmetic", "alphas": [1.0], "lambdas": [0.3, 0.7]})
    by_key = {c.key: c for c in build_candidates(raw, 2, space, "ties", None)}
    separate = []
    for r in rows:
        cand_cfg = r["candidate"]
        c = by_key[r["key"]]
        assert c.describe() == cand_cfg
        merged_folder(c.config, tmp_path / f"m{c.index}")
        shutil.copy(fam.base / "tokenizer.json", tmp_path / f"m{c.index}" / "tokenizer.json")
        scores, obj = evaluate_folder(tmp_path / f"m{c.index}", spec, refs)
        assert scores == pytest.approx(r["scores"], rel=1e-9, abs=1e-12)
        assert obj == pytest.approx(r["objective"], rel=1e-9, abs=1e-12)
        separate.append(obj)
    best = max(range(len(rows)), key=lambda i: separate[i])
    assert res.best["key"] == rows[best]["key"]
    # OUT is the best candidate, bit for bit, with its merge record saying how it was chosen
    out = load_file(str(tmp_path / "best" / "model.safetensors"))
    again = load_file(str(tmp_path / f"m{best}" / "model.safetensors"))
    assert out.keys() == again.keys() and all(same_bits(out[k], again[k]) for k in out)
    record = (tmp_path / "best" / "m3kernels_merge.yaml").read_text()
    assert "m3kernels search: best of 6 candidates" in record
    # exports and the plot
    d = res.results_dir
    assert d == tmp_path / "best.search"
    assert (d / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((d / "results.csv").read_text().splitlines()) == 7
    assert json.loads((d / "results.json").read_text())["best"] == res.best["key"]
    assert "**" in (d / "report.md").read_text()


def test_resume_skips_finished_candidates(fam, tmp_path):
    cfg = write_config(tmp_path / "merge.yaml", fam)
    ev = write_eval(tmp_path / "eval.yaml", fam)
    space = {"lambdas": [0.2, 0.4, 0.6, 0.8]}
    kw = dict(space=space, progress=False, write_best=False, results_dir=tmp_path / "r", plot=False)
    first = search(cfg, None, ev, max_candidates=2, **kw)
    assert first.evaluated == 2 and len(first.rows) == 2
    results = tmp_path / "r" / "results.jsonl"
    before = results.read_text().splitlines()
    assert len(before) == 1 + 3 + 2  # header, base + 2 experts, 2 candidates
    with open(results, "a") as f:
        f.write('{"kind": "candidate", "key": "method=ties;rat')  # a kill mid-write
    second = search(cfg, None, ev, **kw)
    assert second.resumed == 2 and second.evaluated == 2 and len(second.rows) == 4
    after = results.read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 2  # references not scored again
    assert [r["candidate"]["ratios"][0] for r in second.rows] == [0.2, 0.4, 0.6, 0.8]
    assert all(json.loads(x) for x in after)
    third = search(cfg, None, ev, **kw)
    assert third.evaluated == 0 and third.resumed == 4 and third.best["key"] == second.best["key"]
    # another evaluation: the results are not reused silently
    ev2 = write_eval(tmp_path / "eval2.yaml", fam, "objective: add.loss\n")
    with pytest.raises(SearchError, match="another search.*--fresh"):
        search(cfg, None, ev2, **kw)
    fresh = search(cfg, None, ev2, fresh=True, max_candidates=1, **kw)
    assert fresh.evaluated == 1 and fresh.best["objective"] == -fresh.best["scores"]["add.loss"]


def test_failing_evaluator_keeps_the_results(fam, tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "import os\nCALLS = [0]\n"
        "def score(model, tokenizer):\n"
        "    CALLS[0] += 1\n"
        "    if str(CALLS[0]) == os.environ.get('M3K_FLAKY_AT'):\n"
        "        raise RuntimeError('grader crashed')\n"
        "    return {'norm': float(sum(p.double().abs().sum() for p in model.parameters()))}\n"
    )
    cfg = write_config(tmp_path / "merge.yaml", fam)
    ev = tmp_path / "eval.yaml"
    ev.write_text(
        f"tasks:\n  - {{name: add, type: loss, data: {fam.data['add']}}}\n"
        "  - {name: u, type: function, function: 'flaky.py:score', metric: norm}\nobjective: add.loss\n"
    )
    kw = dict(space={"lambdas": [0.25, 0.5, 0.75]}, progress=False, results_dir=tmp_path / "r", plot=False)
    monkeypatch.setenv("M3K_FLAKY_AT", "3")  # 1: the base, 2: candidate 0, 3: candidate 1
    with pytest.raises(
        SearchError, match=r"candidate #1 .*grader crashed.*1 finished candidate\(s\) are kept"
    ):
        search(cfg, tmp_path / "out", ev, **kw)
    assert not (tmp_path / "out").exists()
    rows = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["search", "reference", "candidate"]
    monkeypatch.delenv("M3K_FLAKY_AT")
    res = search(cfg, tmp_path / "out", ev, **kw)
    assert res.resumed == 1 and res.evaluated == 2 and (tmp_path / "out" / "model.safetensors").exists()


def test_three_models_simplex_written_from_the_live_model(fam, tmp_path):
    third = tmp_path / "expert_copy"
    shutil.copytree(fam.experts["add"], third)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels:\n  - model: {fam.experts['add']}\n"
        f"  - model: {fam.experts['rev']}\n  - model: {third}\n"
    )
    ev = write_eval(tmp_path / "eval.yaml", fam)
    res = search(cfg, tmp_path / "out", ev, space={"simplex": 2}, progress=False, plot=False)
    assert len(res.rows) == 6 and res.best["candidate"]["mix"] == "ratios"
    record = __import__("yaml").safe_load((tmp_path / "out" / "m3kernels_search.yaml").read_text())
    assert record["candidate"]["key"] == res.best["key"]
    import m3kernels

    ratios = res.best["candidate"]["ratios"]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    ins = [
        load_file(str(p / "model.safetensors"))[name] for p in (fam.experts["add"], fam.experts["rev"], third)
    ]
    want = m3kernels.merge_tensors(
        load_file(str(fam.base / "model.safetensors"))[name],
        ins,
        method="task_arithmetic",
        mix_ratios=ratios,
        name=name,
    )
    assert same_bits(got[name], want)


def test_cli(fam, tmp_path, capsys):
    cfg = write_config(tmp_path / "merge.yaml", fam)
    ev = write_eval(tmp_path / "eval.yaml", fam)
    out = tmp_path / "out"
    base = ["search", str(cfg), str(out), "--eval", str(ev), "-q"]
    assert cli.main(base + ["--lambdas", "0.5", "--plain"]) == 0
    assert (out / "model.safetensors").exists() and (tmp_path / "out.search" / "search.png").exists()
    capsys.readouterr()
    assert cli.main(base + ["--lambdas", "0.5"]) == 2  # OUT exists
    assert "exists; use --force" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: t, type: loss, data: nowhere.jsonl, expert: 1}\n")
    assert cli.main(["search", str(cfg), str(tmp_path / "o2"), "--eval", str(bad), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.jsonl" in err[0]
    assert (
        cli.main(
            [
                "search",
                str(cfg),
                str(tmp_path / "o3"),
                "--eval",
                str(ev),
                "-q",
                "--alphas",
                "1",
                "--draws",
                "0",
            ]
        )
        == 2
    )
    assert "no candidate" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "search",
                str(cfg),
                str(tmp_path / "o4"),
                "--eval",
                str(ev),
                "-q",
                "--max-time",
                "1s",
                "--max-candidates",
                "0",
            ]
        )
        == 2
    )
    assert "max_candidates" in capsys.readouterr().err


def test_max_time_spent_before_any_candidate(fam, tmp_path):
    cfg = write_config(tmp_path / "merge.yaml", fam)
    ev = write_eval(tmp_path / "eval.yaml", fam)
    kw = dict(space={"lambdas": [0.5]}, progress=False, results_dir=tmp_path / "r", plot=False)
    with pytest.raises(SearchError, match="none was evaluated within --max-time"):
        search(cfg, tmp_path / "out", ev, max_time=1e-9, **kw)
    assert not (tmp_path / "out").exists()
    res = search(cfg, tmp_path / "out", ev, max_time=3600, **kw)  # the references were kept
    assert res.evaluated == 1 and res.stopped is None
    assert len((tmp_path / "r" / "results.jsonl").read_text().splitlines()) == 1 + 3 + 1
