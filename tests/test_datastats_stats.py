"""``m3kernels stats``: on a tiny Llama trained and fine-tuned here (seconds, no download), the stored
Fisher equals a plain per-example autograd loop, the Gram matrices equal XᵀX from forward hooks,
a run stopped midway and resumed gives the same bytes, and the CLI reports problems in one line."""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from m3kernels import cli  # noqa: E402
from m3kernels.datastats import compute_fisher, compute_regmean, model_fingerprint  # noqa: E402
from m3kernels.datastats.data import load_examples  # noqa: E402
from m3kernels.datastats.run import StopRequested  # noqa: E402
from m3kernels.datastats.tiny import fine_tune, make_tiny_llama, sample_texts  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("datastats")
    make_tiny_llama(root / "base", sample_texts(48), steps=6, vocab_size=120)
    fine_tune(root / "base", root / "ft", sample_texts(48, seed=1), steps=3)
    texts = sample_texts(7, seed=5, words=14)
    (root / "data.txt").write_text("\n".join(texts) + "\n")
    with open(root / "pr.jsonl", "w") as f:
        for t in sample_texts(5, seed=6):
            w = t.split()
            f.write(json.dumps({"prompt": " ".join(w[:2]), "response": " " + " ".join(w[2:])}) + "\n")
    return root


def load(model_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return m.eval(), tok


def stats_tensors(out):
    m = json.loads((out / "manifest.json").read_text())
    t = {}
    for f in m["files"]:
        t.update(load_file(str(out / f)))
    return m, t


def loop_fisher(model_dir, data):
    """Σₙ gₙ² / N with gₙ from one backward per example of transformers' own loss × target count."""
    model, tok = load(model_dir)
    examples, _ = load_examples(data, tok, max_length=512)
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for e in examples:
        ids = torch.tensor([list(e.ids)])
        labels = ids.masked_fill(~torch.tensor([list(map(bool, e.targets))]), -100)
        out = model(input_ids=ids, labels=labels)
        model.zero_grad()
        (out.loss * e.n_targets).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.double() ** 2
    return {n: s / len(examples) for n, s in sums.items()}, len(examples)


def close(got, want, rtol=2e-4):
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= rtol * scale + 1e-12, (err, scale)


@pytest.mark.parametrize(
    "per_example, batch, data, max_memory",
    [("vmap", 3, "data.txt", None), ("loop", 2, "pr.jsonl", None), ("vmap", 2, "pr.jsonl", 60_000)],
)
def test_fisher_equals_per_example_autograd_loop(fam, tmp_path, per_example, batch, data, max_memory):
    want, n = loop_fisher(fam / "ft", fam / data)
    m = compute_fisher(
        fam / "ft",
        fam / data,
        tmp_path / "f",
        batch_size=batch,
        per_example=per_example,
        max_memory=max_memory,
        progress=False,
    )
    assert (len(m["files"]) > 3) == (max_memory is not None)  # passes: a file each
    manifest, got = stats_tensors(tmp_path / "f")
    assert set(got) == set(want) and m["counts"]["examples"] == n
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape
        close(got[name], want[name])
    assert any(float(w.abs().max()) > 0 for w in want.values())


def test_gram_matrices_equal_xtx_from_forward_hooks(fam, tmp_path):
    model, tok = load(fam / "ft")
    examples, _ = load_examples(fam / "data.txt", tok, max_length=512)
    want, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                want[name] = want.get(name, 0) + x.T @ x

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([list(e.ids)]))
    for h in handles:
        h.remove()
    m = compute_regmean(
        fam / "ft",
        fam / "data.txt",
        tmp_path / "g",
        batch_size=3,
        accumulate="float64",
        dtype="float64",
        progress=False,
    )
    manifest, got = stats_tensors(tmp_path / "g")
    assert m["counts"] == {"examples": len(examples), "tokens": sum(len(e.ids) for e in examples)}
    assert set(manifest["layers"]) == {f"{n}.weight" for n in want}
    for layer, gram in manifest["layers"].items():
        close(
            got[gram], want[layer[: -len(".weight")]], rtol=1e-6
        )  # float32 activations, batched vs one by one
    lay = manifest["layers"]
    assert (
        lay["model.layers.0.self_attn.k_proj.weight"]
        == lay["model.layers.0.self_attn.v_proj.weight"]
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert lay["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert len(got) == len(manifest["grams"]) == 4 * 2 + 1  # qkv, o, gate/up, down per layer + lm_head
    # split into passes under a memory bound: more files, the same matrices
    m2 = compute_regmean(
        fam / "ft",
        fam / "data.txt",
        tmp_path / "g2",
        batch_size=3,
        accumulate="float64",
        dtype="float64",
        max_memory=40_000,
        progress=False,
    )
    _, got2 = stats_tensors(tmp_path / "g2")
    assert len(m2["files"]) > 1 and m2["counts"] == m["counts"]
    for k in got:
        assert torch.equal(got[k], got2[k])


def digest(out):
    m = json.loads((out / "manifest.json").read_text())
    return [hashlib.sha256((out / f).read_bytes()).hexdigest() for f in m["files"]], m["counts"]


@pytest.mark.parametrize(
    "kind, stop, every",
    [("fisher", 4, 2), ("fisher", 9, 2), ("regmean", 4, 2), ("regmean", 7, 100), ("regmean", 9, 2)],
)
def test_resume_after_a_crash_gives_the_same_bytes(fam, tmp_path, kind, stop, every):
    """Stopped after a save: in the first pass, or (several passes over the 7 examples under a
    memory bound) between the passes or in the second."""
    compute = compute_fisher if kind == "fisher" else compute_regmean
    opts = dict(batch_size=2, progress=False)
    if kind == "fisher":
        opts.update(sampled=True, seed=5, max_memory=None if stop < 7 else 150_000)
    else:
        opts.update(max_memory=40_000)
    compute(fam / "ft", fam / "data.txt", tmp_path / "full", **opts)
    out = tmp_path / "cut"
    with pytest.raises(StopRequested):
        compute(fam / "ft", fam / "data.txt", out, save_every_examples=every, stop_after=stop, **opts)
    assert json.loads((out / ".partial" / "state.json").read_text())["pass"] == stop // 7
    assert not (out / "manifest.json").exists() and (out / ".partial" / "state.json").exists()
    with pytest.raises(Exception, match="unfinished statistics run .*--resume continues"):
        compute(fam / "ft", fam / "data.txt", out, **opts)
    with pytest.raises(Exception, match="another model, data file or options"):
        compute(fam / "ft", fam / "data.txt", out, resume=True, **dict(opts, batch_size=3))
    compute(fam / "ft", fam / "data.txt", out, resume=True, **opts)
    assert digest(out) == digest(tmp_path / "full")
    assert not (out / ".partial").exists()


def test_sampled_fisher_is_seeded_and_differs_from_empirical(fam, tmp_path):
    runs = {}
    for tag, kw in {
        "a": dict(sampled=True, seed=1),
        "b": dict(sampled=True, seed=1),
        "c": dict(sampled=True, seed=2),
        "e": {},
    }.items():
        compute_fisher(
            fam / "ft", fam / "pr.jsonl", tmp_path / tag, batch_size=3, max_examples=3, progress=False, **kw
        )
        runs[tag] = stats_tensors(tmp_path / tag)[1]
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key]) and not torch.equal(runs["a"][key], runs["e"][key])


def test_manifest_records_model_data_counts_options(fam, tmp_path):
    import m3kernels

    m = compute_fisher(
        fam / "ft", fam / "data.txt", tmp_path / "f", dtype="bfloat16", max_examples=3, progress=False
    )
    disk, t = stats_tensors(tmp_path / "f")
    assert disk["model"]["fingerprint"] == model_fingerprint(fam / "ft") != model_fingerprint(fam / "base")
    assert disk["data"]["sha256"] == hashlib.sha256((fam / "data.txt").read_bytes()).hexdigest()
    assert disk["counts"]["examples"] == 3 and disk["options"]["dtype"] == "bfloat16"
    assert disk["m3kernels_version"] == m3kernels.__version__ and disk["kind"] == "fisher" == m["kind"]
    assert all(v.dtype == torch.bfloat16 for v in t.values())


def test_cli_stats_one_line_errors(fam, tmp_path, capsys, fresh_cli_logging):
    out = tmp_path / "s"
    assert cli.main(["stats", "regmean", str(fam / "ft"), str(fam / "data.txt"), str(out), "-q"]) == 0
    assert (out / "manifest.json").exists()
    assert cli.main(["stats", "regmean", str(fam / "ft"), str(fam / "data.txt"), str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds finished statistics" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": \n')
    assert cli.main(["stats", "fisher", str(fam / "ft"), str(bad), str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: line 2: not valid JSON" in err[0]
    assert (
        cli.main(
            [
                "stats",
                "fisher",
                str(fam / "ft"),
                str(fam / "data.txt"),
                str(tmp_path / "y"),
                "--batch-size",
                "0",
            ]
        )
        == 2
    )
    assert "batch_size must be an integer >= 1" in capsys.readouterr().err
    assert (
        cli.main(["stats", "fisher", str(tmp_path / "nomodel"), str(fam / "data.txt"), str(tmp_path / "z")])
        == 2
    )
    # never into (or over) a folder holding anything else, --force or not: the model's weights stay
    for out, words in (
        (fam / "ft", "is the model folder"),
        (tmp_path, "holds files that are not statistics"),
    ):
        assert (
            cli.main(["stats", "fisher", str(fam / "ft"), str(fam / "data.txt"), str(out), "--force", "-q"])
            == 2
        )
        assert words in capsys.readouterr().err
    assert (fam / "ft" / "model.safetensors").exists() and (tmp_path / "bad.jsonl").exists()
