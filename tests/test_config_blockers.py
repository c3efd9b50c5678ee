"""Every blocker of a config in one error (issue 9): the method's first, each naming what is
supported; ``m3kernels merge --dry-run`` prints the same line and exits 2; a multi-document file
names mergekit-multi; odd and hostile inputs still give one clean line."""

from __future__ import annotations

import pytest

from m3kernels import cli
from m3kernels.checkpoint import config as config_mod
from m3kernels.checkpoint.config import (
    ConfigProblems,
    MergeConfigError,
    MultiDocumentConfig,
    load_config,
)

FOUR_PROBLEMS = """\
merge_method: frankenmerge
base_model: m/base
models:
  - model: m/a
  - model: org/model@main
parameters:
  weight: 0.5
dtype: int8
trim_scope: layer
"""
# what each of the four must name (and the alternatives it lists)
EXPECT = [
    ("merge_method", "supported: "),  # the method first
    ("trim_scope", "use 'tensor' or 'model'"),
    ("models[1].model", "only local checkpoint directories"),
    ("dtype", "float32, bfloat16 or float16"),
]


def _problems(source) -> list:
    with pytest.raises(MergeConfigError) as ei:
        load_config(source)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 2100
    return ei.value.problems if isinstance(ei.value, ConfigProblems) else [msg]


def test_four_problems_in_one_error_method_first():
    problems = _problems(FOUR_PROBLEMS)
    assert len(problems) == 4, problems
    for (what, alternatives), msg in zip(EXPECT[:1], problems[:1]):
        assert msg.startswith(what) and alternatives in msg
    for what, alternatives in EXPECT[1:]:
        (msg,) = [m for m in problems if m.startswith(what)]
        assert alternatives in msg, msg


def test_the_message_lists_them_all_on_one_line():
    with pytest.raises(ConfigProblems) as ei:
        load_config(FOUR_PROBLEMS)
    msg = str(ei.value)
    assert msg.startswith("4 problems in this config")
    positions = [msg.index(f"[{i}] ") for i in range(1, 5)]
    assert positions == sorted(positions)
    assert msg.index("[1] merge_method") == positions[0]
    assert isinstance(ei.value, ValueError)


def test_problems_of_a_supported_method_each_reported():
    raw = {
        "merge_method": "ties",
        "base_model": "m/base",
        "models": [
            {"model": "m/a", "parameters": {"weight": 0.5, "t": 0.3, "density": 1.5}},
            {"model": "m/b", "parameters": {"bogus": 1}, "layer_range": [0, 4]},
        ],
        "parameters": {"normalize": "maybe"},
        "trim_scope": "layer",
        "seed": -1,
    }
    problems = _problems(raw)
    wanted = [
        "models[0].parameters.t",  # not taken by ties: names the methods that take it
        "models[0].parameters.density",  # out of range
        "models[1].layer_range",  # unknown key of a model entry
        "models[1].parameters.bogus",  # unknown parameter
        "parameters.normalize",
        "trim_scope",
        "seed",
    ]
    for key in wanted:
        assert sum(m.startswith(key) for m in problems) == 1, (key, problems)
    assert len(problems) == len(wanted)
    assert "methods that do: " in next(m for m in problems if m.startswith("models[0].parameters.t"))


def test_one_problem_is_a_plain_message():
    with pytest.raises(MergeConfigError) as ei:
        load_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "dtype": "int4"})
    assert not isinstance(ei.value, ConfigProblems)
    assert str(ei.value).startswith("dtype: unsupported dtype")


def test_many_problems_stay_one_bounded_line():
    raw = {
        "merge_method": "nope",
        "models": [{"model": f"org/m{i:03d}_" + "x" * 150 + "@main"} for i in range(100)],
    }
    with pytest.raises(ConfigProblems) as ei:
        load_config(raw)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 2100
    assert msg.startswith("101 problems") and msg.endswith("and 86 more")
    assert "[1] merge_method" in msg and "[15] " in msg and "[16] " not in msg
    assert len(ei.value.problems) == 101


def test_config_checks_are_a_list_a_feature_can_extend():
    def no_colour(raw):
        return ["colour: not a merge key"] if "colour" in raw else []

    config_mod.CONFIG_CHECKS.append(no_colour)
    try:
        problems = _problems(FOUR_PROBLEMS + "colour: blue\n")
    finally:
        config_mod.CONFIG_CHECKS.remove(no_colour)
    assert "colour: not a merge key" in problems and len(problems) == 5


def test_dry_run_prints_the_same_list_and_exits_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(FOUR_PROBLEMS)
    with pytest.raises(ConfigProblems) as ei:
        load_config(str(cfg))
    for argv in (["--dry-run"], []):
        rc = cli.main(["merge", str(cfg), str(tmp_path / "out"), "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert rc == 2
        assert err == f"m3kernels: error: {ei.value}\n"
    assert not (tmp_path / "out").exists()


MULTI = """\
name: first
merge_method: linear
models: [{model: a}, {model: b}]
---
name: second
merge_method: linear
models: [{model: first}, {model: c}]
"""


def test_multi_document_file_names_mergekit_multi(tmp_path):
    with pytest.raises(MultiDocumentConfig) as ei:
        load_config(MULTI)
    assert ei.value.documents == 2 and "mergekit-multi" in str(ei.value)
    assert "invalid" not in str(ei.value).lower() and "not valid YAML" not in str(ei.value)
    f = tmp_path / "multi.yaml"
    f.write_text(MULTI + "---\nname: third\n")
    with pytest.raises(MultiDocumentConfig) as ei:
        load_config(f)
    assert ei.value.documents == 3 and str(f) in str(ei.value)
    # (``m3kernels merge`` runs such a file itself: m3kernels/checkpoint/multi.py, tests/test_multi*)


@pytest.mark.parametrize(
    "text,what",
    [
        ("merge_method: ties\n---\nmodels: [\n", "mergekit-multi"),  # a second document that does not parse
        ("a: &x 1\nb: *x\n", "aliases"),
        ("merge_method: ties\n\tmodels: []\n", "not valid YAML"),
        ("merge_method: ties\nmerge_method: linear\n", "written twice"),
        ("[1, 2]\n", "expected a mapping"),
        (
            "merge_method: ties\nmodels: 3\nparameters: 4\ndtype: [x]\n",
            "4 problems",
        ),  # base_model missing too
        ("merge_method: {a: 1}\nbase_model: [b]\nmodels: [x, {model: 3}]\n", "4 problems"),
    ],
)
def test_odd_yaml_is_one_clean_line(text, what):
    with pytest.raises(MergeConfigError) as ei:
        load_config(text)
    msg = str(ei.value)
    assert "\n" not in msg and what in msg, msg
