"""Hostile configs (docs/CONFIG.md, "Bounded parsing"): alias bombs, deep nesting, huge integers,
non-UTF-8 bytes, FIFOs, oversized files, odd keys and tags, and a seeded mutation fuzzer over a
valid config. Every case ends in a clear MergeConfigError (exit 2 from the CLI) or a valid
config, quickly; never another exception."""

from __future__ import annotations

import os
import random
import time

import pytest
import yaml

from m3kernels import cli
from m3kernels.checkpoint.config import MAX_CONFIG_BYTES, MergeConfigError, load_config

BOMB = (
    "\n".join(
        ["a: &a [x, x, x, x, x, x, x, x, x]"]
        + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
        + ["merge_method: *i"]
    )
    + "\n"
)

VALID = """merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.6, density: [0.2, 0.5]}
  - model: ft2
    parameters:
      weight: 0.4
      density: [{filter: mlp, value: 0.3}, {value: 0.2}]
parameters: {normalize: true, lambda: 1.0}
dtype: bfloat16
seed: 7
mixup: {alpha: 0.5, seed: 3}
"""


def _raises_cleanly(source, *, match=None, limit_s=2.0):
    t0 = time.perf_counter()
    with pytest.raises(MergeConfigError) as ei:
        load_config(source)
    assert time.perf_counter() - t0 < limit_s
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 2100
    if match:
        assert match in msg, msg
    return msg


def test_alias_bomb_is_refused_at_once():
    assert len(BOMB) < 600
    _raises_cleanly(BOMB, match="aliases")


def test_any_alias_is_refused_naming_the_line():
    msg = _raises_cleanly("merge_method: &m ties\nname: *m\nmodels: [{model: a}]\n", match="line 2")
    assert "*m" in msg


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n",
        "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n",
    ],
)
def test_deep_nesting(text):
    _raises_cleanly(text)


def test_long_integers():
    _raises_cleanly("merge_method: ties\nseed: " + "9" * 5000 + "\n", match="digits")


def test_oversized_text_and_file(tmp_path):
    _raises_cleanly("merge_method: ties\n#" + "x" * (MAX_CONFIG_BYTES + 10) + "\n", match="at most")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"merge_method: ties\n#" + b"x" * (MAX_CONFIG_BYTES + 10))
    _raises_cleanly(big, match="at most")


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("merge_method: ties\nname: caf\xe9\n".encode("latin-1"))
    _raises_cleanly(f, match="not UTF-8")


def test_fifo_config_does_not_block(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    _raises_cleanly(str(fifo), match="not a regular file")


@pytest.mark.parametrize(
    "text,match",
    [
        ("? [a, b]\n: 1\n", "plain value"),
        ("merge_method: !!python/object:os.system ties\n", "YAML"),
        ("merge_method: ties\nmerge_method: linear\n", "twice"),
        ("merge_method: ties\n---\nmerge_method: linear\n", "YAML"),
        ("merge_method: [ties\n", "YAML"),
        ("merge_method: \x1b[31mties\n", ""),
        ("\ufeffmerge_method: frankenmerge\n", "merge_method"),
    ],
)
def test_odd_yaml(text, match):
    _raises_cleanly(text, match=match)


def test_control_characters_are_escaped_in_messages():
    msg = _raises_cleanly({"merge_method": "ti\x1b[2Jes\nx", "models": [{"model": "a"}]})
    assert "\x1b" not in msg and "\\x1b" in msg


def test_cli_exit_status_and_one_line(tmp_path, capsys):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    assert cli.main(["merge", str(f), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aliases" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _mutate(text: str, rng: random.Random) -> str:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(i, len(data) - 1)]
        elif op == 1:
            data[i:i] = bytes([rng.randrange(256)])
        elif op == 2:
            data[i:i] = rng.choice(
                [
                    b"&a ",
                    b"*a",
                    b"[",
                    b"]",
                    b"{",
                    b"}",
                    b": ",
                    b"- ",
                    b"!!",
                    b"\n  ",
                    b"999999999999999999999999999999999999999999999",
                    b"1e999",
                    b".nan",
                    b"\t",
                    b"#",
                    b"'",
                    b'"',
                    b"\x00",
                    b"\xff",
                    b"? ",
                ]
            )
        elif op == 3 and len(data) > 2:
            j = rng.randrange(len(data))
            data[i:i] = data[j : j + rng.randint(1, 40)]
        elif op == 4:
            data = data.replace(b"0.", b"-0.", 1)
        else:
            data = data.replace(b"ties", rng.choice([b"dare_ties", b"slerp", b"linear", b"TIES", b""]), 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


FUZZ_CASES = int(os.environ.get("M3K_FUZZ_CONFIGS", "600"))


def test_mutation_fuzzer_never_crashes(tmp_path):
    """Seeded mutations of a valid config: a clean error or a valid config, each case fast.
    (M3K_FUZZ_CONFIGS=10000 for the longer run.)"""
    rng = random.Random(20261201)
    outcomes = {"valid": 0, "error": 0}
    f = tmp_path / "c.yaml"
    for k in range(FUZZ_CASES):
        text = _mutate(VALID, rng)
        source = text if k % 2 else f
        if not k % 2:
            f.write_bytes(
                text.encode("utf-8", "surrogateescape") if k % 4 else text.encode("latin-1", "replace")
            )
        t0 = time.perf_counter()
        try:
            load_config(source)
            outcomes["valid"] += 1
        except MergeConfigError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
        assert time.perf_counter() - t0 < 1.0, text
    assert outcomes["error"] > FUZZ_CASES // 2
    yaml.safe_load(VALID)  # the seed config itself is valid YAML


# every parameter of every method, given hostile values: a MergeConfigError naming it, or a valid
# config whose tensors all resolve (never another exception)
HOSTILE_VALUES = [
    None,
    [],
    {},
    [[0.5]],
    [{"filter": 3, "value": 1}],
    [{"value": [{"value": 1}]}],
    "nan",
    "1e400",
    1e400,
    -1,
    10**30,
    True,
    "x",
    [True, 0.5],
    [0.0, 2.5],
]


def _hostile_cases():
    from m3kernels.merge.registry import METHODS

    for m in METHODS.values():
        for p in m.params:
            if p.config:
                yield m, p


@pytest.mark.parametrize("method,param", list(_hostile_cases()), ids=lambda x: getattr(x, "name", str(x)))
def test_hostile_parameter_values(method, param):
    lo, hi = method.models
    n = lo if hi == lo else max(lo, 2)
    for value in HOSTILE_VALUES:
        raw = {"merge_method": method.name, "models": [{"model": f"m{i}"} for i in range(n)]}
        if method.program.uses_base or method.needs_base:
            raw["base_model"] = "b"
        params = (
            {"t": 0.5} if method.param("t") is not None and method.param("t").default == "required" else {}
        )
        params[param.name] = value
        raw["parameters"] = params
        try:
            cfg = load_config(raw)
        except MergeConfigError as exc:
            assert "\n" not in str(exc)
            continue
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
            try:
                cfg.tensor_kwargs(name, 4)
            except MergeConfigError:
                pass
