"""Checkpoint-level benchmark: ``m3kernels merge`` against mergekit 0.1.5 on the l13x2 models.

One run does everything:

1. creates (or reuses) a virtual environment with ``mergekit==0.1.5`` outside the repository
   (torch pinned to 2.13.0 by a constraints file, so pip never pulls a CUDA torch);
2. generates the seeded l13x2 checkpoints (``bench/gen_models.py``) when they are missing;
3. for each config in ``bench/configs/`` (the same YAML for both tools) times
   ``m3kernels merge`` and ``mergekit-yaml`` under ``/usr/bin/time -v`` (wall time, peak RSS),
   with the inputs read into the page cache first; the wall time ends when the output is on
   disk (a ``sync`` after each command, timed with it: ours fsyncs its output itself, mergekit
   leaves it to the page cache; ``command_wall_s`` in the JSON is the command alone). mergekit runs twice: the config as a user
   writes it (``user``: mergekit computes in the models' bf16) and with ``dtype: float32`` +
   ``out_dtype: bfloat16`` (``f32``: the same float32 arithmetic as ours, for the value
   comparison). Ours computes in float32 either way, so it runs the user config only;
4. compares the merged tensors of both outputs (see ``compare_outputs``) and prints a table,
   optionally writing everything to ``--json``.

mergekit options: ``--lazy-unpickle`` only changes how pickled ``.bin`` checkpoints are read;
these inputs are safetensors (memory-mapped by both tools), so it is left off. mergekit uses
torch's default thread count (all cores), CPU only. ``--no-copy-tokenizer``: the synthetic
models have no tokenizer.

Usage::

    python bench/bench_mergekit.py --json bench/out/mergekit.json
    python bench/bench_mergekit.py --tiny --data /tmp/l13tiny          # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_PREFIX = "/work/bench_data/l13x2"  # the model prefix written in bench/configs/*.yaml
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
METHODS = (
    "ties",
    "dare_ties",
    "linear",
    "slerp",
    "model_stock",
    "breadcrumbs",
    "della",
)  # bench/configs/<name>.yaml
TARGET_SPEEDUP = {  # issue 7 (the first three), issue 8 (the others)
    "ties": 50.0,
    "dare_ties": 20.0,
    "linear": 5.0,
    "slerp": 10.0,
    "model_stock": 10.0,
    "breadcrumbs": 10.0,
    "della": 10.0,
}
TARGET_RSS_GB = 2.5
GB = 1e9


# --------------------------------------------------------------------------- environment


def ensure_mergekit(venv: Path, quiet: bool = False) -> Path:
    """``venv/bin/mergekit-yaml``, installing mergekit 0.1.5 (torch pinned) when missing."""
    exe = venv / "bin" / "mergekit-yaml"
    pip = venv / "bin" / "pip"
    if exe.exists():
        out = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True)
        if f"Version: {MERGEKIT_VERSION}" in out.stdout:
            return exe
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"{TORCH_PIN}\n")
    cmd = [str(pip), "install", "-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN]
    print("installing mergekit:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return exe


def ensure_gnu_time() -> str:
    """Path of GNU time (``-v`` gives peak RSS), installing Debian's ``time`` if missing."""
    if Path("/usr/bin/time").exists():
        return "/usr/bin/time"
    print("installing GNU time (apt-get install time)", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True)
    return "/usr/bin/time"


def m3kernels_command() -> list[str]:
    exe = Path(sys.executable).parent / "m3kernels"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("m3kernels")
    if found:
        return [found]
    return [sys.executable, "-m", "m3kernels.cli"]


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        info["cpu"] = m.group(1).strip() if m else "?"
    except OSError:
        info["cpu"] = "?"
    try:
        mem = Path("/proc/meminfo").read_text()
        info["ram_gb"] = round(int(re.search(r"MemTotal:\s*(\d+)", mem).group(1)) * 1024 / GB, 1)
    except (OSError, AttributeError):
        pass
    return info


# --------------------------------------------------------------------------- configs


def materialize_configs(methods, data: Path, work: Path) -> dict:
    """Write each method's user and f32 variants under ``work/configs``; {(method, variant): path}."""
    out = {}
    (work / "configs").mkdir(parents=True, exist_ok=True)
    for m in methods:
        text = (CONFIG_DIR / f"{m}.yaml").read_text().replace(CONFIG_PREFIX, str(data))
        user = work / "configs" / f"{m}.user.yaml"
        user.write_text(text)
        cfg = yaml.safe_load(text)
        cfg["dtype"] = "float32"
        cfg["out_dtype"] = "bfloat16"
        f32 = work / "configs" / f"{m}.f32.yaml"
        f32.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[(m, "user")], out[(m, "f32")] = user, f32
    return out


def config_models(cfg_path: Path) -> tuple[str | None, list[str], list[dict]]:
    cfg = yaml.safe_load(cfg_path.read_text())
    models = [e["model"] for e in cfg["models"]]
    params = [e.get("parameters") or {} for e in cfg["models"]]
    return cfg.get("base_model"), models, params


# --------------------------------------------------------------------------- timing


def precompile_package() -> None:
    """Byte-compile the m3kernels package, as ``pip install`` of a wheel does. An editable checkout
    run with PYTHONDONTWRITEBYTECODE=1 (this workplace's shell) would otherwise compile every
    imported module again on every timed run (about 60 ms here), which mergekit's installed
    package, byte-compiled by pip, never pays."""
    import compileall

    compileall.compile_dir(str(REPO / "m3kernels"), quiet=1)


def warm_page_cache(dirs) -> float:
    """Read every file of the input checkpoints once (so runs start from the page cache)."""
    t0, buf = time.perf_counter(), bytearray(1 << 24)
    for d in dirs:
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    return time.perf_counter() - t0


def _proc_tree_rss(root_pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes summed over ``root_pid``'s descendants (not GNU time itself)."""
    anon = filed = 0
    try:
        import psutil

        procs = psutil.Process(root_pid).children(recursive=True)
    except Exception:
        return 0, 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                anon += int(line.split()[1]) * 1024
            elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                filed += int(line.split()[1]) * 1024
    return anon, filed


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def parse_gnu_time(text: str) -> dict:
    def grab(pattern, conv=float):
        m = re.search(pattern, text)
        return conv(m.group(1)) if m else None

    wall = None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*(\S+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        wall = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s_gnu_time": wall,
        "user_s": grab(r"User time \(seconds\):\s*([\d.]+)"),
        "sys_s": grab(r"System time \(seconds\):\s*([\d.]+)"),
        "peak_rss_gb": (grab(r"Maximum resident set size \(kbytes\):\s*(\d+)", int) or 0) * 1024 / GB,
        "major_faults": grab(r"Major \(requiring I/O\) page faults:\s*(\d+)", int),
        "exit_status": grab(r"Exit status:\s*(\d+)", int),
    }


def timed_run(cmd: list[str], time_exe: str, log: Path, env=None) -> dict:
    """Run ``cmd`` under GNU time; wall time, peak RSS (max RSS of the process, as the kernel
    counts it: anonymous + touched file pages), sampled anon/file RSS and other processes' CPU.

    ``wall_s`` ends when the output is on disk: the command, then ``sync`` (``sync_s``; the
    command alone: ``command_wall_s``). m3kernels fsyncs its output itself, so its sync finds
    little to do; mergekit leaves its output in the page cache, to be written back later (during
    the next timed run, before this). Pending writes are flushed before the timing starts."""
    tfile = log.with_suffix(".time")
    os.sync()  # no earlier run's write-back during this one
    busy0, load0 = _busy_cpu_seconds(), os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [time_exe, "-v", "-o", str(tfile), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
        peak = {"anon": 0, "file": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                anon, filed = _proc_tree_rss(proc.pid)
                peak["anon"] = max(peak["anon"], anon)
                peak["file"] = max(peak["file"], filed)
                stop.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    command_wall = time.perf_counter() - t0
    os.sync()  # the output on disk, as m3kernels' fsync puts it
    wall = time.perf_counter() - t0
    res = parse_gnu_time(tfile.read_text() if tfile.exists() else "")
    cpu_ours = (res["user_s"] or 0.0) + (res["sys_s"] or 0.0)
    res.update(
        {
            "cmd": cmd,
            "rc": rc,
            "wall_s": wall,
            "command_wall_s": command_wall,
            "sync_s": wall - command_wall,
            "log": str(log),
            "peak_rss_anon_gb_sampled": peak["anon"] / GB,
            "peak_rss_file_gb_sampled": peak["file"] / GB,
            "loadavg_1m_before": load0,
            "other_cpu_s": max(0.0, _busy_cpu_seconds() - busy0 - cpu_ours),
        }
    )
    if rc != 0:
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(cmd)}\n{tail}")
    return res


# --------------------------------------------------------------------------- reading outputs


class Checkpoint:
    """Tensor access to a safetensors checkpoint directory (sharded with an index, or single)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self.where = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self.where[k] = f
        if weight_map is not None and set(weight_map) != set(self.where):
            raise ValueError(f"{self.path}: the index and the shards disagree on the tensor names")

    def names(self) -> list[str]:
        return sorted(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def bf16_order_key(x: torch.Tensor) -> torch.Tensor:
    """Monotonic int32 key of bf16 values: adjacent bf16 numbers differ by 1 (±0 share 0)."""
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of their dtype (bf16 here; float32/fp16 via their key)."""
    if a.dtype != b.dtype:
        raise ValueError(f"dtypes differ: {a.dtype} vs {b.dtype}")
    if a.dtype == torch.bfloat16:
        return (bf16_order_key(a) - bf16_order_key(b)).abs()
    bits = {torch.float16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}
    itype, mask = bits[a.dtype]

    def key(x):
        i = x.contiguous().view(itype).to(torch.int64)
        return torch.where(i < 0, -(i & mask), i)

    return (key(a) - key(b)).abs()


def kth_largest(x: torch.Tensor, k: int) -> float | None:
    """The k-th largest value of ``x`` (exact), None when k = 0."""
    if k <= 0:
        return None
    flat = x.reshape(-1)
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


class ExactStats:
    """Elementwise agreement of two outputs: ulp distances, with excluded elements apart."""

    def __init__(self):
        self.elements = self.excluded = self.over_1ulp = self.nonzero = 0
        self.max_ulps = self.max_ulps_excluded = 0
        self.worst = None

    def add(self, name, ulps: torch.Tensor, excluded: torch.Tensor | None):
        self.elements += ulps.numel()
        if excluded is not None:
            n_ex = int(excluded.sum())
            self.excluded += n_ex
            if n_ex:
                self.max_ulps_excluded = max(self.max_ulps_excluded, int(ulps[excluded].max()))
            ulps = ulps[~excluded]
        if ulps.numel():
            m = int(ulps.max())
            if m > self.max_ulps:
                self.max_ulps, self.worst = m, name
            self.over_1ulp += int((ulps > 1).sum())
            self.nonzero += int((ulps > 0).sum())

    def summary(self) -> dict:
        return {
            "kind": "exact",
            "elements": self.elements,
            "excluded_trim_ties": self.excluded,
            "max_ulps": self.max_ulps,
            "worst_tensor": self.worst,
            "elements_over_1ulp": self.over_1ulp,
            "elements_differing": self.nonzero,
            "max_ulps_on_excluded": self.max_ulps_excluded,
        }


class DistStats:
    """Distribution statistics for randomized merges (DARE): masks differ by construction."""

    def __init__(self):
        self.n = 0
        self.sums = {k: [0, 0.0, 0.0] for k in ("ours", "mergekit", "diff")}  # changed, Σ, Σ²

    def add(self, base: torch.Tensor, ours: torch.Tensor, mk: torch.Tensor):
        b = base.double()
        for key, x in (
            ("ours", ours.double() - b),
            ("mergekit", mk.double() - b),
            ("diff", ours.double() - mk.double()),
        ):
            s = self.sums[key]
            s[0] += int((x != 0).sum())
            s[1] += float(x.sum())
            s[2] += float((x * x).sum())
        self.n += base.numel()

    def summary(self) -> dict:
        out = {"kind": "distribution", "elements": self.n}
        for key, (changed, s1, s2) in self.sums.items():
            mean = s1 / self.n
            out[key] = {
                "fraction_nonzero": changed / self.n,
                "mean": mean,
                "std": math.sqrt(max(s2 / self.n - mean * mean, 0.0)),
            }
        out["note"] = (
            "mergekit draws its DARE masks with torch.bernoulli, ours come from the "
            "Philox stream of docs/RANDOMNESS.md, so values cannot match elementwise; "
            "'ours'/'mergekit' are statistics of (merged - base), 'fraction_nonzero' "
            "is the fraction of elements the merge changed; 'diff' is ours - mergekit. "
            "mergekit's rescale is L1 (kept values x Σ|δ|/Σ|kept δ|), ours the DARE "
            "paper's 1/density unless the config says 'rescale: l1'."
        )
        return out


def compare_outputs(method: str, cfg_path: Path, ours_dir: Path, mk_dir: Path) -> dict:
    """Compare two merged checkpoints tensor by tensor (bounded memory).

    * ``ties``: exact, in bf16 ulps, excluding the trim ties: elements where some model's
      |δ| equals its trim threshold (mergekit's argsort keeps exactly k of those, we keep all
      of them, docs/SPEC.md §1).
    * ``linear``, ``slerp``, ``model_stock``, ``breadcrumbs``: exact, in ulps, nothing excluded
      (slerp / model_stock: mergekit's float32 norms vs our float64 Gram, docs/MERGEKIT_METHODS.md
      C0); breadcrumbs excluding the ties at both ends of its window (mergekit keeps exactly the
      window's count of them, we keep all, as for ties).
    * ``dare_ties``, ``della``: distribution statistics only (see :class:`DistStats`).
    """
    base_path, model_paths, params = config_models(cfg_path)
    ours, mk = Checkpoint(ours_dir), Checkpoint(mk_dir)
    if ours.names() != mk.names():
        only_o = sorted(set(ours.names()) - set(mk.names()))
        only_m = sorted(set(mk.names()) - set(ours.names()))
        raise ValueError(f"tensor names differ: only ours {only_o[:5]}, only mergekit {only_m[:5]}")
    base = Checkpoint(Path(base_path)) if base_path else None
    fts = [Checkpoint(Path(p)) for p in model_paths]
    by_stats = method in ("dare_ties", "della")  # random masks: distribution statistics only
    stats = DistStats() if by_stats else ExactStats()
    dtypes = set()
    for name in ours.names():
        o, m = ours.get(name), mk.get(name)
        if o.shape != m.shape:
            raise ValueError(f"{name}: shapes differ, ours {tuple(o.shape)}, mergekit {tuple(m.shape)}")
        dtypes.add((str(o.dtype), str(m.dtype)))
        if by_stats:
            stats.add(base.get(name), o, m)
            continue
        excluded = None
        if method in ("ties", "breadcrumbs"):
            b = base.get(name).float()
            excluded = torch.zeros(o.shape, dtype=torch.bool)
            for ft, p in zip(fts, params):
                d = (ft.get(name).float() - b).abs_()
                n = d.numel()
                density = float(p.get("density", 1.0))
                if method == "ties":
                    k = trim_k(density, n)
                    if 0 < k < n:
                        excluded |= d == kth_largest(d, k)
                elif 0 < density < 1:  # the window's two ends (docs/MERGEKIT_METHODS.md B2)
                    keep, top = int(density * n), int(float(p.get("gamma", 0.01)) * n)
                    first = n - max(0, n - keep - top) - keep  # descending rank of the largest kept
                    for k in (first + 1, first + keep):
                        if 0 < k <= n:
                            excluded |= d == kth_largest(d, k)
                del d
        if o.dtype != m.dtype:
            o, m = o.float(), m.float()
        stats.add(name, ulp_distance(o, m), excluded)
    out = stats.summary()
    out["dtypes (ours, mergekit)"] = sorted(dtypes)
    return out


def trim_k(density: float, numel: int) -> int:
    """k = floor(density · n) of the magnitude trim (docs/SPEC.md §1)."""
    return int(math.floor(density * numel))


# --------------------------------------------------------------------------- main


def run_ours(cfg: Path, out: Path, time_exe: str, logs: Path, tag: str, extra_args) -> dict:
    # the previous output goes before the timing, as for mergekit (--force would otherwise spend
    # the timed run deleting 1.9 GB)
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        *m3kernels_command(),
        "merge",
        str(cfg),
        str(out),
        "--force",
        "--quiet",
        "--device",
        "cpu",
        *extra_args,
    ]
    return timed_run(cmd, time_exe, logs / f"{tag}.log")


def run_mergekit(exe: Path, cfg: Path, out: Path, time_exe: str, logs: Path, tag: str, seed: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(exe), str(cfg), str(out), "--quiet", "--no-copy-tokenizer", "--random-seed", str(seed)]
    return timed_run(cmd, time_exe, logs / f"{tag}.log", env=env)


def fmt_table(rows: list[dict]) -> str:
    """wall s (median for ours), CPU s of the tool, CPU s other processes took meanwhile."""
    head = (
        f"{'method':<10} {'tool':<28} {'wall s':>8} {'cpu s':>7} {'other cpu s':>11} "
        f"{'peak RSS GB':>11} {'speed-up':>9} {'target':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r['speedup']:.1f}x" if r.get("speedup") else ""
        lines.append(
            f"{r['method']:<10} {r['tool']:<28} {r['wall_s']:>8.2f} {r['cpu_s']:>7.1f} "
            f"{r['other_cpu_s']:>11.1f} {r['peak_rss_gb']:>11.2f} {sp:>9} {r.get('target', ''):>9}"
        )
    return "\n".join(lines)


def describe_comparison(key: str, cmp: dict) -> str:
    """One readable line per comparison (the JSON has everything)."""
    if cmp["kind"] == "exact":
        return (
            f"{key}: {cmp['elements']:,} elements, {cmp['excluded_trim_ties']:,} trim ties excluded; "
            f"max {cmp['max_ulps']} bf16 ulps, {cmp['elements_over_1ulp']:,} over 1 ulp, "
            f"{cmp['elements_differing']:,} differ (worst: {cmp['worst_tensor']})"
        )
    o, m, d = cmp["ours"], cmp["mergekit"], cmp["diff"]
    return (
        f"{key}: changed fraction ours {o['fraction_nonzero']:.4f} / mergekit {m['fraction_nonzero']:.4f}; "
        f"merged-base mean/std ours {o['mean']:.2e}/{o['std']:.4e}, mergekit {m['mean']:.2e}/{m['std']:.4e}; "
        f"ours-mergekit mean/std {d['mean']:.2e}/{d['std']:.4e} (masks differ by design)"
    )


def cpu_seconds(run: dict) -> float:
    return (run.get("user_s") or 0.0) + (run.get("sys_s") or 0.0)


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(CONFIG_PREFIX),
        help="directory with base/, ft1/, ft2/ (generated if missing; default %(default)s)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/work/bench_data/runs"),
        help="outputs, logs and materialized configs (default %(default)s)",
    )
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/work/bench_data/mk-venv"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of the script)")
    ap.add_argument("--seed", type=int, default=0, help="model generator seed")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of ours per method (median)")
    ap.add_argument("--skip-mergekit", action="store_true", help="time ours only (no comparison)")
    ap.add_argument("--skip-f32", action="store_true", help="skip mergekit's dtype: float32 runs")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--ours-args", default="", help="extra arguments for m3kernels merge")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r}; choose from {', '.join(METHODS)}")
    data = args.data.resolve()
    if args.tiny and args.data == Path(CONFIG_PREFIX):
        data = Path(tempfile.gettempdir()) / "m3k_bench_tiny"
    work = args.work.resolve()
    if str(work).startswith(str(REPO) + os.sep) and "bench/out" not in str(work):
        ap.error("--work must be outside the repository (or under bench/out/)")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    time_exe = ensure_gnu_time()
    mk_exe = None if args.skip_mergekit else ensure_mergekit(args.mergekit_venv)
    shapes = gen_models.tiny() if args.tiny else gen_models.llama2_13b(2)
    t0 = time.perf_counter()
    inputs = gen_models.ensure_checkpoints(data, shapes, seed=args.seed)
    gen_s = time.perf_counter() - t0
    configs = materialize_configs(methods, data, work)

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "m3kernels_revision": git_revision(),
        "models": str(data),
        "params_per_model": shapes.n_params,
        "generation_s": gen_s,
        "mergekit": MERGEKIT_VERSION,
        "runs": {},
        "comparisons": {},
        "targets": {"speedup": TARGET_SPEEDUP, "peak_rss_gb": TARGET_RSS_GB},
    }
    rows = []
    extra = args.ours_args.split()
    precompile_package()
    for m in methods:
        res = results["runs"].setdefault(m, {})
        ours_out = work / f"{m}.ours"
        ours_runs = []
        for r in range(args.repeat):
            warm_page_cache(inputs)
            ours_runs.append(run_ours(configs[(m, "user")], ours_out, time_exe, logs, f"{m}.ours.{r}", extra))
            print(
                f"  {m} ours run {r + 1}: {ours_runs[-1]['wall_s']:.2f} s (sync {ours_runs[-1]['sync_s']:.2f} s), "
                f"{ours_runs[-1]['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
            )
        mid = sorted(ours_runs, key=lambda x: x["wall_s"])[(len(ours_runs) - 1) // 2]
        ours = {
            "runs": ours_runs,
            "wall_s": statistics.median(x["wall_s"] for x in ours_runs),
            "cpu_s": cpu_seconds(mid),
            "other_cpu_s": mid["other_cpu_s"],
            "peak_rss_gb": max(x["peak_rss_gb"] for x in ours_runs),
        }
        res["ours"] = ours
        rows.append(
            {
                "method": m,
                "tool": "m3kernels",
                "wall_s": ours["wall_s"],
                "cpu_s": ours["cpu_s"],
                "other_cpu_s": ours["other_cpu_s"],
                "peak_rss_gb": ours["peak_rss_gb"],
                "target": f"<={TARGET_RSS_GB} GB",
            }
        )
        variants = [] if mk_exe is None else ["user"] if args.skip_f32 else ["user", "f32"]
        for v in variants:
            warm_page_cache(inputs)
            mk_out = work / f"{m}.mergekit.{v}"
            mk = run_mergekit(mk_exe, configs[(m, v)], mk_out, time_exe, logs, f"{m}.mergekit.{v}", args.seed)
            mk["speedup_ours"] = mk["wall_s"] / ours["wall_s"]
            res[f"mergekit_{v}"] = mk
            print(
                f"  {m} mergekit ({v}): {mk['wall_s']:.2f} s (sync {mk['sync_s']:.2f} s), {mk['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
            )
            rows.append(
                {
                    "method": m,
                    "tool": f"mergekit ({'bf16 as written' if v == 'user' else 'dtype f32'})",
                    "wall_s": mk["wall_s"],
                    "cpu_s": cpu_seconds(mk),
                    "other_cpu_s": mk["other_cpu_s"],
                    "peak_rss_gb": mk["peak_rss_gb"],
                    "speedup": mk["speedup_ours"],
                    "target": f">={TARGET_SPEEDUP[m]}x" if v == "user" else "",
                }
            )
            if not args.skip_compare:
                t1 = time.perf_counter()
                cmp = compare_outputs(m, configs[(m, v)], ours_out, mk_out)
                cmp["seconds"] = time.perf_counter() - t1
                results["comparisons"][f"{m}.{v}"] = cmp
            if not args.keep_outputs:
                shutil.rmtree(mk_out, ignore_errors=True)
        if not args.keep_outputs:
            shutil.rmtree(ours_out, ignore_errors=True)

    print()
    print(fmt_table(rows))
    for key, cmp in results["comparisons"].items():
        print(describe_comparison(key, cmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
