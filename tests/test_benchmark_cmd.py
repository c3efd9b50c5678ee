"""``m3kernels bench`` (issue 15): the table, the JSON report and its fields, the PNG plot,
``--compare``, ``--checkpoint``, one-line errors for bad options, and the byte / GB/s arithmetic.

Tiny shapes and one repeat: the numbers are checked against the timings the report itself holds
(never against constants), and the arithmetic against figures worked out by hand.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from m3kernels import cli
from m3kernels.backends import available_backends
from m3kernels.benchmark import run_benchmark
from m3kernels.benchmark.cases import method_kwargs, parse_shape, registered_methods
from m3kernels.benchmark.compare import compare_reports
from m3kernels.benchmark.report import case_row, load_json
from m3kernels.benchmark.roofline import bytes_moved, copy_bandwidth, gbps, pct_of
from m3kernels.benchmark.runner import CASE_FIELDS, FORMAT
from m3kernels.benchmark.timing import time_call
from m3kernels.merge import registry
from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, write_checkpoint

TINY = "48x67"  # odd sizes
CORE = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "ties_dare")
CPU_OK = available_backends()["cpu"] == "available"
pytestmark = pytest.mark.usefixtures("fresh_cli_logging")  # cli.main's log handler: per test
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="the CPU extension is not built")


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    """One run of the command on a tiny shape with every registered method, N = 2 and 3."""
    if not CPU_OK:
        pytest.skip("the CPU extension is not built")
    d = tmp_path_factory.mktemp("bench")
    js, png = d / "r.json", d / "r.png"
    argv = ["bench", "--shape", TINY, "--repeats", "1", "--n", "2,3", "--backends", "cpu", "-q"]
    argv += ["--json", str(js), "--markdown", str(d / "r.md")]
    if importlib.util.find_spec("matplotlib") is not None:  # in the test extra; skipped without it
        argv += ["--plot", str(png)]
    return argv, js, png


@pytest.fixture(scope="module")
def ran(report_files):
    import io
    from contextlib import redirect_stdout

    argv, js, png = report_files
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            rc = cli.main(argv)
    finally:  # the handler cli.main added writes to this fixture's stderr: not kept for later tests
        log = logging.getLogger("m3kernels")
        for h in [h for h in log.handlers if getattr(h, "_m3k_cli", False)]:
            log.removeHandler(h)
    return rc, buf.getvalue(), json.loads(js.read_text()), png


def _close(a, b, rel=1e-9):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel)


def test_command_table_and_json_with_every_field(ran, report_files):
    rc, out, rep, _ = ran
    assert rc == 0
    assert rep["format"] == FORMAT
    for key in ("cpu", "cpu_isa", "kernel_threads", "torch_threads", "gpu", "torch", "m3kernels", "date"):
        assert key in rep["machine"]
    assert rep["machine"]["cpu_isa"] in rep["machine"]["cpu_isa_available"]
    assert rep["settings"]["shape"] == [48, 67] and rep["settings"]["repeats"] == 1
    assert rep["load"]["wall_s"] > 0 and "other_cpu_s" in rep["load"]
    copy = rep["copy"]["cpu"]
    assert copy["reference_gbps"] == max(
        copy["memcpy_gbps"], copy["memcpy_64k_chunks_gbps"], copy["torch_copy_gbps"]
    )
    # every registered method, both N: a row each, none lost
    methods = registered_methods()
    assert {(r["method"], r["n"]) for r in rep["cases"]} == {(m, n) for m in methods for n in (2, 3)}
    for words in ("stage A ms", "B %copy", "speed-up", f"CPU kernel variant {rep['machine']['cpu_isa']}"):
        assert words in out
    for r in rep["cases"]:
        assert set(CASE_FIELDS) <= set(r), set(CASE_FIELDS) - set(r)
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] != "ok":
            assert r["reason"]
            continue
        numel = 48 * 67
        reads = r["n"] + (1 if r["reads_base"] else 0)
        assert r["bytes"] == numel * 2 * (reads + 1)  # bf16: reads + one write
        assert r["full_s"] == min(r["times"]["full"]) and len(r["times"]["full"]) == 1
        assert _close(r["full_gbps"], r["bytes"] / r["full_s"] / 1e9)
        assert _close(r["full_pct_copy"], 100 * r["full_gbps"] / copy["reference_gbps"])
        if r["stage_b_s"] is not None:
            assert r["stage_b_s"] == min(r["times"]["stage_b"]) and r["stage_a_s"] == min(
                r["times"]["stage_a"]
            )
            assert _close(r["stage_b_gbps"], r["bytes"] / r["stage_b_s"] / 1e9)
            assert _close(r["stage_b_pct_copy"], 100 * r["stage_b_gbps"] / copy["reference_gbps"])
        if r["eager_s"] is not None:
            assert _close(r["speedup_vs_eager"], r["eager_s"] / r["full_s"])
            assert 0.0 <= r["eager_equal_fraction"] <= 1.0
    by = {(r["method"], r["n"]): r for r in rep["cases"]}
    for m in CORE:  # the first six methods: all timed, split, and with an eager time
        for n in (2, 3):
            r = by[(m, n)]
            assert r["status"] == "ok", r["reason"]
            assert r["stage_a_s"] is not None and r["stage_b_s"] is not None, r["split_note"]
            assert r["eager_s"] is not None, r["eager_note"]
            assert " ".join(case_row(r)) in " ".join(out.split())  # the printed row is the record's
    for r in rep["cases"]:  # family methods too: their stage A hook, then the kernel pass
        if r["status"] == "ok":
            assert r["stage_a_s"] is not None and r["stage_b_s"] is not None, (r["method"], r["split_note"])
    md = (report_files[1].parent / "r.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "stage A ms" not in line]
    assert len(rows) == len(rep["cases"]) and all(line.count("|") == 14 for line in rows)
    assert by[("linear", 2)]["eager_equal_fraction"] > 0.99  # the same math, up to rounding
    assert by[("ties", 2)]["eager_equal_fraction"] > 0.9


def test_plot_is_a_png(ran):
    _, _, _, png = ran
    pytest.importorskip("matplotlib")
    import matplotlib
    import matplotlib.image

    assert matplotlib.get_backend().lower() == "agg"  # chosen by the plot, no display needed

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0  # something was drawn


def test_compare_two_reports(ran, tmp_path, capsys):
    _, _, rep, _ = ran
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(rep))
    rep2 = json.loads(json.dumps(rep))
    dropped = rep2["cases"].pop()  # only in A
    for r in rep2["cases"]:
        if r["status"] == "ok":
            r["full_s"] *= 2.0
            if r["stage_b_s"] is not None:
                r["stage_b_s"] *= 0.5
    b.write_text(json.dumps(rep2))
    cmp = compare_reports(load_json(a), load_json(b))
    ok = [r for r in cmp["rows"] if r["status"] == ("ok", "ok")]
    assert ok and all(_close(r["full_ratio"], 2.0) for r in ok)
    assert all(_close(r["stage_b_ratio"], 0.5) for r in ok if r["stage_b_s"][0] is not None)
    assert (
        cmp["only_a"] == [[dropped["method"], "cpu", "bfloat16", dropped["n"], TINY]] and cmp["only_b"] == []
    )
    assert cli.main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "2.00" in out and "0.50" in out and f"only in A: {dropped['method']}" in out


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"cases": []}')
    assert cli.main(["bench", "--compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an m3kernels bench report" in err


@pytest.mark.parametrize(
    "args,words",
    [
        (["--methods", "nosuch"], "nosuch"),
        (["--backends", "tpu"], "tpu"),
        (["--shape", "5120by13824"], "--shape"),
        (["--shape", "0x5"], "--shape"),
        (["--n", "0"], "--n"),
        (["--n", "two"], "--n"),
        (["--dtypes", "int8"], "--dtypes"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "x"], "--threads"),
    ],
)
def test_bad_options_give_one_line_and_status_2(args, words, capsys):
    assert cli.main(["bench", "--shape", "8x8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("m3kernels: error:") and words in err


def test_a_backend_not_available_here(capsys):
    missing = [
        b
        for b in ("cuda", "triton")
        if not torch.cuda.is_available() or available_backends()[b] != "available"
    ]
    if not missing:
        pytest.skip("every backend works here")
    assert cli.main(["bench", "--shape", "8x8", "--backends", missing[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{missing[0]}: not available here" in err


def test_malformed_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--compare", "only-one.json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compare" in err
    with pytest.raises(SystemExit) as exc:  # an unknown flag: the main parser's usage line + error
        cli.main(["bench", "--bogus"])
    assert exc.value.code == 2 and "--bogus" in capsys.readouterr().err


@needs_cpu
def test_a_method_the_bench_does_not_know_is_skipped_not_fatal(monkeypatch):
    lin = registry.METHODS["linear"]
    odd = registry.Param("gamma", "gamma", registry.MERGE_WIDE, "curvature", registry.REQUIRED, "test only")
    fake = registry.Method("bench_fake", "test", "-", False, lin.program, (odd,))
    monkeypatch.setitem(registry.METHODS, "bench_fake", fake)
    kw, why = method_kwargs("bench_fake", 2)
    assert "gamma" in why
    rep = run_benchmark(
        shape=(16, 24), methods=["bench_fake", "linear"], backends=["cpu"], repeats=1, eager=False
    )
    by = {r["method"]: r for r in rep["cases"]}
    assert by["bench_fake"]["status"] == "skipped" and "gamma" in by["bench_fake"]["reason"]
    assert by["linear"]["status"] == "ok" and by["linear"]["eager_s"] is None
    assert "skipped: " in " ".join(case_row(by["bench_fake"]))


def test_bytes_and_rates_on_known_numbers():
    numel = 5120 * 13824
    assert numel == 70_778_880
    assert bytes_moved(numel, 2, 2, 2, True) == 566_231_040  # bf16, N = 2: base + 2 models + output
    assert bytes_moved(numel, 2, 2, 2, False) == 424_673_280  # linear ignores the base
    assert bytes_moved(numel, 3, 4, 2, True) == numel * (3 * 4 + 4 + 2)  # float32 in, bf16 out
    assert bytes_moved(10, 2, 2, 4, True, base_size=1) == 10 * (4 + 1 + 4)
    assert math.isclose(gbps(566_231_040, 0.0247), 22.924333, rel_tol=1e-6)
    assert math.isclose(pct_of(22.9, 32.2), 71.118012, rel_tol=1e-6)
    assert gbps(1, 0) is None and pct_of(None, 3.0) is None and pct_of(1.0, 0) is None
    with pytest.raises(ValueError):
        bytes_moved(10, 0, 2, 2, True)


def test_parse_shape():
    assert parse_shape("5120x13824") == (5120, 13824) == parse_shape(" 5120 × 13824 ")
    assert parse_shape("7") == (7,) and parse_shape((3, 4)) == (3, 4)
    for bad in ("", "x", "3x-1", "axb", "1x2x3x4x5"):
        with pytest.raises(ValueError):
            parse_shape(bad)


@needs_cpu
def test_copy_bandwidth_and_timer():
    c = copy_bandwidth(1 << 20, "cpu", repeats=2)
    assert c["reference_gbps"] > 0 and c["read_only_gbps"] > 0 and c["bytes"] == 1 << 20
    calls = []
    t = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3 and t.best == min(t.times) and t.best <= t.median
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)


@needs_cpu
def test_checkpoint_phases_and_floor(tmp_path, capsys):
    sizes = dict(vocab=29, hidden=16, intermediate=40, layers=2, heads=2, kv_heads=1)
    base = llama_tensors(seed=1, **sizes)
    b = write_checkpoint(tmp_path / "base", base, shards=2, config=llama_config(**sizes))
    ms = [
        write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), config=llama_config(**sizes))
        for i in (1, 2)
    ]
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n    parameters: {{density: 0.3}}\n"
        f"  - model: {ms[1]}\n    parameters: {{density: 0.3}}\n"
    )
    js = tmp_path / "ck.json"
    assert cli.main(["bench", "--checkpoint", str(cfg), "--device", "cpu", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    rep = json.loads(js.read_text())
    best = rep["best"]
    assert rep["input_bytes"] > rep["output_bytes"] > 0
    assert best["read_pass"]["bytes"] >= rep["input_bytes"]  # whole files: headers too
    assert best["phase_calls"]["publish"] >= 1 and best["phase_calls"]["write"] >= 1
    assert best["phase_calls"]["stage_a"] + best["phase_calls"]["small_tensors"] >= 1
    for ph, s in best["phases_s"].items():
        assert s >= 0 and (best["phase_calls"][ph] > 0 or s == 0), ph
    assert math.isclose(rep["floor_s"], max(rep["floor_read_s"], rep["floor_write_s"]))
    assert math.isclose(rep["floor_serial_s"], rep["floor_read_s"] + rep["floor_write_s"])
    assert math.isclose(rep["floor_write_s"], rep["output_bytes"] / (rep["write"]["gbps"] * 1e9))
    assert "floor:" in out and ("stage A" in out or "small tensors" in out)
    assert not list(tmp_path.glob("m3k-bench-*"))  # the temporary output is gone


def test_cli_module_imports_nothing_heavy():
    code = "import sys, m3kernels.benchmark.cli; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_eager_later_methods_on_hand_examples():
    from m3kernels.benchmark.eager import eager_merge, trim_window

    f32 = torch.float32
    base = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=f32)
    x = torch.tensor([0.5, 1.0005, 1.0, -1.2], dtype=f32)
    y = eager_merge(base, [x], method="nearswap", t=0.1)  # = base + clamp(x - base, -t, t)
    assert torch.allclose(y, base + torch.clamp(x - base, -0.1, 0.1), atol=1e-6)
    m1 = base + torch.tensor([1e-6, 0.3, -0.2, 0.0])
    m2 = base + torch.tensor([0.0, 0.1, 0.4, 1e-6])
    y = eager_merge(base, [m1, m2], method="ram", epsilon=1e-5)  # counted members, each / count
    assert torch.allclose(y, base + torch.tensor([0.0, 0.2, 0.1, 0.0]), atol=1e-6)
    d = torch.tensor([5.0, -1.0, 3.0, 0.5, -9.0, 2.0, 4.0, -0.1, 7.0, 6.0])
    kept = trim_window(d, density=0.5, gamma=0.2)  # T = 5, G = 2, B = 3: ranks 3..7 ascending
    assert kept.tolist() == [5.0, 0.0, 3.0, 0.0, 0.0, 2.0, 4.0, 0.0, 0.0, 6.0]
    assert torch.equal(trim_window(d, 1.0, 0.2), d)
    v = torch.randn(257, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(eager_merge(v, [2 * v], method="slerp", t=0.25), 1.25 * v)  # parallel: linear


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help_texts_render(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "% of copy bandwidth" in out or "% of the copy bandwidth" in out


@needs_cpu
def test_checkpoint_phases_of_a_family_method(tmp_path):
    """A family method's stage A (its hook: Gram matrices) and its kernel pass are timed."""
    sizes = dict(vocab=29, hidden=16, intermediate=40, layers=2, heads=2, kv_heads=1)
    base = llama_tensors(seed=3, **sizes)
    b = write_checkpoint(tmp_path / "base", base, config=llama_config(**sizes))
    ms = [
        write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), config=llama_config(**sizes))
        for i in (1, 2)
    ]
    cfg = tmp_path / "ms.yaml"
    cfg.write_text(
        f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n  - model: {ms[1]}\n"
    )
    js = tmp_path / "ck.json"
    assert cli.main(["bench", "--checkpoint", str(cfg), "--device", "cpu", "--json", str(js)]) == 0
    best = json.loads(js.read_text())["best"]
    n_tensors = len(base)
    assert best["phase_calls"]["stage_a"] == n_tensors, best["phase_calls"]
    assert best["phase_calls"]["stage_b"] == n_tensors
    assert best["phases_s"]["stage_a"] > 0 and best["phases_s"]["stage_b"] > 0
