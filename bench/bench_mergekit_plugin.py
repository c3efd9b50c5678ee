"""Checkpoint-level benchmark of the mergekit plugin (issue 12): ``mergekit-yaml`` with mergekit's
own method, ``mergekit-yaml`` with ours in its place, and ``m3kernels merge``, on the l13x2 models.

For each method (``--methods``, default ties, dare_ties, linear; the configs of ``bench/configs/``,
unchanged) one invocation times, with the inputs in the page cache first:

1. ``mergekit``: mergekit 0.1.5's ``mergekit-yaml`` from its venv, the config as written (bf16);
2. ``plugin``: ``<mergekit venv>/bin/python -m m3kernels mergekit-yaml CONFIG OUT --m3k-replace``
   with this checkout on ``PYTHONPATH`` (docs/INTEGRATIONS.md §3): mergekit's planner, loader and
   writer, our fused kernels in place of mergekit's method of the same name;
3. ``m3kernels``: ``m3kernels merge`` of the same config (reference).

Each under ``/usr/bin/time -v`` (wall, peak RSS; bench_mergekit's ``timed_run``, which also
records the CPU other processes took meanwhile). Then, unless ``--skip-f32``, mergekit once more
with ``dtype: float32`` (the same float32 arithmetic as ours, for the value check), and, unless
``--no-profile``, the plugin once more through a driver that times each call of the plugin's
``merge_group`` (what our kernels cost inside mergekit's run; it also proves our method served
every tensor, which the timed run cannot show for ``linear``, where mergekit's output is ours).

Value checks: the plugin's output against ``m3kernels merge``'s (bit-identical expected, every
method, DARE included: same seed, same tensor names), and against mergekit's with bench_mergekit's
``compare_outputs`` (``dtype: float32`` when run: within one ulp outside the trim ties; DARE:
distribution statistics, the masks differ by design).

Usage::

    python bench/bench_mergekit_plugin.py --repeat 1 --json bench/out/mergekit_plugin.json
    python bench/bench_mergekit_plugin.py --tiny                     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mergekit as bm  # noqa: E402

import gen_models  # noqa: E402

DEFAULT_METHODS = ("ties", "dare_ties", "linear")
TOOLS = ("mergekit", "plugin", "m3kernels")
SEED = 0

# Run in the mergekit venv: mergekit_plugin.main (what `python -m m3kernels mergekit-yaml` runs)
# with the plugin's merge_group timed per call; argv: JSON_OUT, then the command's arguments.
PROFILE_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from m3kernels.integrations import mergekit_plugin as plugin
import mergekit.scripts.run_yaml
acc = {"imports_s": time.perf_counter() - t0, "calls": 0, "merge_group_s": 0.0,
       "first_call_s": None, "last_return_s": None, "methods": []}
inner = plugin.merge_group
def timed(method_name, group, parameters):
    t = time.perf_counter()
    if acc["first_call_s"] is None:
        acc["first_call_s"] = t - t0
    if method_name not in acc["methods"]:
        acc["methods"].append(method_name)
    out = inner(method_name, group, parameters)
    e = time.perf_counter()
    acc["merge_group_s"] += e - t
    acc["calls"] += 1
    acc["last_return_s"] = e - t0
    return out
plugin.merge_group = timed
rc = plugin.main(sys.argv[2:])
acc["total_s"] = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump(acc, f)
sys.exit(rc)
"""


def venv_env() -> dict:
    """The environment of a command in the mergekit venv: this checkout on PYTHONPATH, offline."""
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        PYTHONPATH=str(bm.REPO) + (os.pathsep + path if path else ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )


def check_plugin_importable(py: Path) -> None:
    """The plugin and our compiled CPU extension must import in the mergekit venv's Python."""
    code = "import m3kernels._C, mergekit.merge_methods.registry, m3kernels.integrations.mergekit_plugin"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=venv_env())
    if r.returncode != 0:
        raise SystemExit(f"the plugin does not import in {py} (PYTHONPATH={bm.REPO}):\n{r.stderr[-2000:]}")


def plugin_args(cfg: Path, out: Path) -> list[str]:
    """``mergekit-yaml``'s arguments as bench_mergekit gives them, plus ours."""
    return [
        str(cfg),
        str(out),
        "--quiet",
        "--no-copy-tokenizer",
        "--random-seed",
        str(SEED),
        "--m3k-replace",
        "--m3k-seed",
        str(SEED),
    ]


def run_plugin(py: Path, cfg: Path, out: Path, time_exe: str, logs: Path, tag: str) -> dict:
    if out.exists():  # outside the timing, as bench_mergekit does for both tools
        shutil.rmtree(out)
    cmd = [str(py), "-m", "m3kernels", "mergekit-yaml", *plugin_args(cfg, out)]
    return bm.timed_run(cmd, time_exe, logs / f"{tag}.log", env=venv_env())


def run_plugin_profiled(py: Path, cfg: Path, out: Path, time_exe: str, logs: Path, tag: str) -> dict:
    """The plugin once more with its ``merge_group`` timed per call (see PROFILE_DRIVER)."""
    if out.exists():
        shutil.rmtree(out)
    prof = logs / f"{tag}.profile.json"
    prof.unlink(missing_ok=True)
    cmd = [str(py), "-c", PROFILE_DRIVER, str(prof), *plugin_args(cfg, out)]
    run = bm.timed_run(cmd, time_exe, logs / f"{tag}.log", env=venv_env())
    run["profile"] = json.loads(prof.read_text())
    if not run["profile"]["calls"]:
        raise RuntimeError(f"{tag}: the plugin's merge_group was never called (mergekit's own method ran)")
    return run


def compare_identical(a_dir: Path, b_dir: Path) -> dict:
    """Elementwise ulp distances of two checkpoints, nothing excluded (bit-identity expected)."""
    a, b = bm.Checkpoint(a_dir), bm.Checkpoint(b_dir)
    if a.names() != b.names():
        only_a = sorted(set(a.names()) - set(b.names()))[:5]
        only_b = sorted(set(b.names()) - set(a.names()))[:5]
        raise ValueError(f"tensor names differ: only {a_dir.name} {only_a}, only {b_dir.name} {only_b}")
    stats, dtypes, bytes_equal = bm.ExactStats(), set(), True
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.dtype != y.dtype:
            bytes_equal = False
            x, y = x.float(), y.float()
        else:
            bytes_equal &= torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        stats.add(name, bm.ulp_distance(x, y), None)
    out = stats.summary()
    out["bit_identical"] = bytes_equal
    out["dtypes"] = sorted(dtypes)
    return out


def summarize(runs: list[dict]) -> dict:
    mid = sorted(runs, key=lambda x: x["wall_s"])[(len(runs) - 1) // 2]
    return {
        "runs": runs,
        "wall_s": statistics.median(x["wall_s"] for x in runs),
        "cpu_s": bm.cpu_seconds(mid),
        "other_cpu_s": mid["other_cpu_s"],
        "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_table(results: dict) -> str:
    head = (
        f"{'method':<10} {'tool':<26} {'wall s':>8} {'cpu s':>7} {'other cpu s':>11} "
        f"{'peak RSS GB':>11} {'mergekit/this':>13} {'this/m3kernels':>14}"
    )
    lines = [head, "-" * len(head)]
    for m, res in results["runs"].items():
        mk, ours = res["mergekit"]["wall_s"], res["m3kernels"]["wall_s"]
        for key, label in (
            ("mergekit", "mergekit-yaml (own method)"),
            ("mergekit_f32", "mergekit-yaml, dtype f32"),
            ("plugin", "mergekit-yaml + plugin"),
            ("m3kernels", "m3kernels merge"),
        ):
            if key not in res:
                continue
            r = res[key]
            lines.append(
                f"{m:<10} {label:<26} {r['wall_s']:>8.2f} {r['cpu_s']:>7.1f} {r['other_cpu_s']:>11.1f} "
                f"{r['peak_rss_gb']:>11.2f} {mk / r['wall_s']:>12.2f}x {r['wall_s'] / ours:>13.2f}x"
            )
    return "\n".join(lines)


def describe_profile(m: str, run: dict) -> str:
    p = run["profile"]
    return (
        f"{m} plugin profile: wall {run['wall_s']:.2f} s; imports {p['imports_s']:.2f} s, "
        f"first merge call at {p['first_call_s']:.2f} s, {p['calls']} merge_group calls "
        f"({', '.join(p['methods'])}) {p['merge_group_s']:.2f} s, last return at "
        f"{p['last_return_s']:.2f} s, main returned at {p['total_s']:.2f} s"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=Path(bm.CONFIG_PREFIX), help="base/, ft1/, ft2/ (generated if missing)"
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/work/bench_data/runs_plugin"), help="outputs, logs, configs"
    )
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/work/bench_data/mk-venv"))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each tool per method (median)")
    ap.add_argument("--tiny", action="store_true", help="tiny generated models (smoke run of the script)")
    ap.add_argument(
        "--skip-f32", action="store_true", help="no mergekit dtype: float32 run (value check vs as written)"
    )
    ap.add_argument("--no-profile", action="store_true", help="no profiled plugin run")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in bm.METHODS:
            ap.error(f"--methods: unknown {m!r}; choose from {', '.join(bm.METHODS)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    data = args.data.resolve()
    if args.tiny and args.data == Path(bm.CONFIG_PREFIX):
        data = Path(tempfile.gettempdir()) / "m3k_bench_plugin_tiny"
    work = args.work.resolve()
    if args.tiny and args.work == Path("/work/bench_data/runs_plugin"):
        work = Path(tempfile.gettempdir()) / "m3k_bench_plugin_tiny_runs"
    if str(work).startswith(str(bm.REPO) + os.sep) and "bench/out" not in str(work):
        ap.error("--work must be outside the repository (or under bench/out/)")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    time_exe = bm.ensure_gnu_time()
    mk_exe = bm.ensure_mergekit(args.mergekit_venv)
    py = args.mergekit_venv / "bin" / "python"
    check_plugin_importable(py)
    shapes = gen_models.tiny() if args.tiny else gen_models.llama2_13b(2)
    inputs = gen_models.ensure_checkpoints(data, shapes, seed=SEED)
    configs = bm.materialize_configs(methods, data, work)

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": bm.machine_info(),
        "m3kernels_revision": bm.git_revision(),
        "models": str(data),
        "params_per_model": shapes.n_params,
        "mergekit": bm.MERGEKIT_VERSION,
        "uptime_before": uptime(),
        "runs": {},
        "comparisons": {},
    }
    print("before:", results["uptime_before"], file=sys.stderr)
    bm.precompile_package()
    for m in methods:
        cfg = configs[(m, "user")]
        outs = {t: work / f"{m}.{t}" for t in TOOLS}
        timed = {t: [] for t in TOOLS}
        for r in range(args.repeat):  # the three tools in turn, so the load falls on all of them alike
            for t in TOOLS:
                bm.warm_page_cache(inputs)
                tag = f"{m}.{t}.{r}"
                if t == "mergekit":
                    run = bm.run_mergekit(mk_exe, cfg, outs[t], time_exe, logs, tag, SEED)
                elif t == "plugin":
                    run = run_plugin(py, cfg, outs[t], time_exe, logs, tag)
                else:
                    run = bm.run_ours(cfg, outs[t], time_exe, logs, tag, [])
                timed[t].append(run)
                print(
                    f"  {m} {t} run {r + 1}: {run['wall_s']:.2f} s, {run['peak_rss_gb']:.2f} GB",
                    file=sys.stderr,
                )
        res = results["runs"].setdefault(m, {t: summarize(timed[t]) for t in TOOLS})
        if not args.no_profile:
            bm.warm_page_cache(inputs)
            prof_out = work / f"{m}.plugin_profiled"
            res["plugin_profiled"] = run_plugin_profiled(
                py, cfg, prof_out, time_exe, logs, f"{m}.plugin_profiled"
            )
            print("  " + describe_profile(m, res["plugin_profiled"]), file=sys.stderr)
            shutil.rmtree(prof_out, ignore_errors=True)
        mk_f32 = None
        if not args.skip_f32:
            bm.warm_page_cache(inputs)
            mk_f32 = work / f"{m}.mergekit_f32"
            run = bm.run_mergekit(
                mk_exe, configs[(m, "f32")], mk_f32, time_exe, logs, f"{m}.mergekit_f32", SEED
            )
            res["mergekit_f32"] = summarize([run])
            print(
                f"  {m} mergekit (dtype f32): {run['wall_s']:.2f} s, {run['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
            )
        if not args.skip_compare:
            t1 = time.perf_counter()
            cmp = compare_identical(outs["plugin"], outs["m3kernels"])
            cmp["seconds"] = time.perf_counter() - t1
            results["comparisons"][f"{m}: plugin vs m3kernels merge"] = cmp
            vs = (mk_f32, configs[(m, "f32")], "f32") if mk_f32 else (outs["mergekit"], cfg, "as written")
            t1 = time.perf_counter()
            cmp = bm.compare_outputs(m, vs[1], outs["plugin"], vs[0])
            cmp["seconds"] = time.perf_counter() - t1
            results["comparisons"][f"{m}: plugin vs mergekit ({vs[2]})"] = cmp
        if not args.keep_outputs:
            for d in [*outs.values(), mk_f32]:
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
    results["uptime_after"] = uptime()
    print("after:", results["uptime_after"], file=sys.stderr)

    print()
    print(fmt_table(results))
    for m, res in results["runs"].items():
        if "plugin_profiled" in res:
            print(describe_profile(m, res["plugin_profiled"]))
    for key, cmp in results["comparisons"].items():
        line = bm.describe_comparison(key, cmp)
        if "bit_identical" in cmp:
            line += f"; bit-identical: {cmp['bit_identical']}"
        print(line)
    print(f"uptime before: {results['uptime_before']}\nuptime after:  {results['uptime_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
