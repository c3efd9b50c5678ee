"""Several merges in one file (mergekit-multi, m3kernels/checkpoint/multi.py): named documents go
to the work folder and are used by name, the unnamed one is OUT, each merge gives the bytes of the
same merge run alone, finished ones are reused and changed ones merged again, a killed run
resumes, and bad files stop with one line naming the documents before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3kernels import cli
from m3kernels.checkpoint.multi import plan_documents
from m3kernels.synthetic import make_family

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(vocab=23, hidden=16, intermediate=20, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("multi")
    f = make_family(root, n_models=2, shards=1, seed=7, **SIZES)
    return {"base": str(f.base_dir), "ft1": str(f.model_dirs[0]), "ft2": str(f.model_dirs[1])}


def load_dir(d) -> dict:
    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def write_docs(path: Path, docs: list) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def merge(*args) -> int:
    return cli.main(["merge", *map(str, args), "--device", "cpu", "-q"])


def two_step(d, weight=0.7):
    step1 = {
        "name": "step1",
        "merge_method": "task_arithmetic",
        "base_model": d["base"],
        "models": [{"model": d["ft1"], "parameters": {"weight": weight}}],
        "dtype": "float32",
    }
    final = {
        "merge_method": "slerp",
        "base_model": d["ft2"],
        "models": [{"model": "step1"}],
        "parameters": {"t": [0.2, 0.8]},
        "dtype": "float32",
    }
    return step1, final


def test_two_merges_give_the_bytes_of_each_run_alone(fam, tmp_path):
    step1, final = two_step(fam)
    cfg = write_docs(tmp_path / "multi.yaml", [final, step1])  # the final one first: order by use
    assert merge(cfg, tmp_path / "out") == 0
    work = tmp_path / "out.work"
    assert (work / "step1" / "config.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({k: v for k, v in step1.items() if k != "name"}))
    assert merge(one, tmp_path / "alone1") == 0
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**final, "models": [{"model": str(tmp_path / "alone1")}]}))
    assert merge(two, tmp_path / "alone2") == 0
    assert same(load_dir(work / "step1"), load_dir(tmp_path / "alone1"))
    assert same(load_dir(tmp_path / "out"), load_dir(tmp_path / "alone2"))

    # again: step1 is reused (not rewritten); OUT needs --force as for one merge
    (shard,) = (work / "step1").glob("*.safetensors")
    stamp = shard.stat().st_mtime_ns
    assert merge(cfg, tmp_path / "out") == 2
    assert merge(cfg, tmp_path / "out", "--force") == 0
    assert shard.stat().st_mtime_ns == stamp
    # a changed first merge is merged again, and the final one follows it
    write_docs(cfg, [final, two_step(fam, weight=0.3)[0]])
    assert merge(cfg, tmp_path / "out", "--force") == 0
    assert not same(load_dir(work / "step1"), load_dir(tmp_path / "alone1"))
    assert not same(load_dir(tmp_path / "out"), load_dir(tmp_path / "alone2"))


def test_every_document_named_and_work_dir(fam, tmp_path):
    step1, final = two_step(fam)
    final = {**final, "name": "last"}
    cfg = write_docs(tmp_path / "m.yaml", [step1, final])
    assert merge(cfg, tmp_path / "out", "--work-dir", tmp_path / "w") == 0
    assert (tmp_path / "w" / "step1").is_dir() and not (tmp_path / "w" / "last").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_relative_paths_and_dry_run(fam, tmp_path, capsys):
    step1, final = two_step(fam)
    sub = tmp_path / "cfgs"
    sub.mkdir()
    os.symlink(fam["ft1"], sub / "ft1")
    step1["models"][0]["model"] = "ft1"  # next to the config file
    cfg = write_docs(sub / "m.yaml", [step1, final])
    assert merge(cfg, tmp_path / "out", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "2 merges (mergekit-multi)" in text and "planned when they exist" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
    order = plan_documents([step1, final], tmp_path / "w", sub)
    assert [d.name for d in order] == ["step1", None]
    assert order[0].config["models"][0]["model"] == str(sub / "ft1")
    assert order[1].config["models"][0]["model"] == str(tmp_path / "w" / "step1")


def test_references_everywhere_but_keywords(tmp_path):
    docs = [
        {"name": "base", "merge_method": "linear", "models": [{"model": "x"}]},
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "tokenizer_source": "base",
            "slices": [
                {
                    "sources": [
                        {"model": "base+lora", "layer_range": [0, 2]},
                        {"model": "y", "layer_range": [0, 2]},
                    ]
                }
            ],
        },
    ]
    order = plan_documents(docs, tmp_path)
    c = order[-1].config
    assert c["base_model"] == str(tmp_path / "base") and c["tokenizer_source"] == "base"
    assert c["slices"][0]["sources"][0]["model"] == f"{tmp_path / 'base'}+lora"
    assert order[-1].uses == ["base"]


def _bad(d):
    s1, fin = two_step(d)
    return [
        ([s1, s1, fin], r"the name 'step1' is used by document 1 and document 2"),
        ([s1, fin, {**fin}], r"more than one document has no 'name'"),
        (
            [
                {**s1, "models": [{"model": "step2"}]},
                {**s1, "name": "step2", "models": [{"model": "step1"}]},
                fin,
            ],
            r"cycle: document 1 \('step1'\) -> document 2 \('step2'\) -> document 1",
        ),
        ([s1, {**s1, "name": "other"}], r"every document is named and 2 of them are used by none"),
        ([{**s1, "name": "a/b"}, fin], r"document 1\.name: 'a/b' must be a plain folder name"),
        ([s1, {**fin, "parameters": {"t": 0.5, "weight": 1}}], r"document 2 \(unnamed\): parameters\.weight"),
        ([s1, "just text"], r"document 2 is a str"),
    ]


def test_bad_files_stop_before_anything_is_written(fam, tmp_path, capsys):
    for k, (docs, match) in enumerate(_bad(fam)):
        cfg = write_docs(tmp_path / f"bad{k}.yaml", docs)
        assert merge(cfg, tmp_path / f"out{k}") == 2, match
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(match, err), (match, err)
        assert not (tmp_path / f"out{k}").exists() and not (tmp_path / f"out{k}.work").exists()


def test_a_killed_intermediate_merge_resumes(fam, tmp_path):
    step1, final = two_step(fam)
    cfg = write_docs(tmp_path / "m.yaml", [step1, final])
    cmd = [sys.executable, "-m", "m3kernels", "merge", str(cfg), str(tmp_path / "out")]
    cmd += ["--device", "cpu", "--out-shard-size", "2000", "--quiet"]
    env = {**os.environ, "M3KERNELS_TEST_CRASH_AFTER_SHARDS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    work = tmp_path / "out.work"
    assert not (work / "step1").exists()
    (tmp,) = work.glob(".step1.m3k-tmp-*")
    (first,) = tmp.glob("model-00001-of-*.safetensors")
    stamp = first.stat().st_mtime_ns
    assert merge(cfg, tmp_path / "out", "--out-shard-size", "2000") == 0
    assert (work / "step1" / first.name).stat().st_mtime_ns == stamp  # resumed, not rewritten
    fresh = write_docs(tmp_path / "f.yaml", [step1, final])
    assert merge(fresh, tmp_path / "fresh", "--out-shard-size", "2000") == 0
    assert same(load_dir(tmp_path / "out"), load_dir(tmp_path / "fresh"))
