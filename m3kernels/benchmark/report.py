"""Showing a benchmark report: the terminal table (with a progress bar while it runs), the JSON
file and the PNG plot.

The plot (matplotlib, imported only when a plot is asked for) has two panels: the % of the copy
bandwidth each method reaches per backend / dtype / N (stage B, and the full merge as the hatched
bar), and, beside it, the time of our full merge and of the eager PyTorch merge on a log scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from m3kernels.benchmark.machine import header_lines


def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr (a no-op one when disabled or when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="case", disable=(None if enabled else True), leave=False)


def _ms(x) -> str:
    if x is None:
        return "—"
    v = x * 1e3
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _num(x, fmt: str, suffix: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt) + suffix


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e7 else f"{nbytes / 1e6:.2f} MB"


COLUMNS = (
    "method",
    "backend",
    "dtype",
    "N",
    "stage A ms",
    "stage B ms",
    "full ms",
    "B GB/s",
    "B %copy",
    "full %copy",
    "eager ms",
    "speed-up",
    "other CPU s",
)
RIGHT = set(COLUMNS[3:])


def case_row(r: dict) -> list:
    """One table row of a case record."""
    head = [r["method"], r["backend"], r["dtype"], str(r["n"])]
    if r["status"] != "ok":
        return head + [f"{r['status']}: {r['reason']}"]
    return head + [
        _ms(r["stage_a_s"]),
        _ms(r["stage_b_s"]),
        _ms(r["full_s"]),
        _num(r["stage_b_gbps"], ".1f"),
        _num(r["stage_b_pct_copy"], ".0f", "%"),
        _num(r["full_pct_copy"], ".0f", "%"),
        _ms(r["eager_s"]),
        _num(r["speedup_vs_eager"], ".1f" if (r["speedup_vs_eager"] or 0) < 10 else ".0f", "x"),
        _num(r["other_cpu_s"], ".1f"),
    ]


def table(records: list) -> str:
    """The cases as an aligned text table (a skipped / failed case spans the number columns)."""
    rows = [list(COLUMNS)] + [case_row(r) for r in records]
    full = [r for r in rows if len(r) == len(COLUMNS)]
    widths = [max(len(r[c]) for r in (rows if c < 4 else full)) for c in range(len(COLUMNS))]
    lines = []
    for r in rows:
        k = len(COLUMNS) if len(r) == len(COLUMNS) else 4  # else: 4 key columns and a message
        cells = [(r[c].rjust(widths[c]) if COLUMNS[c] in RIGHT else r[c].ljust(widths[c])) for c in range(k)]
        lines.append("  ".join(cells + r[k:]).rstrip())
    return "\n".join(lines)


def notes(records: list) -> list:
    """One line per method with notes (stage split not timed, no eager version), naming the cases."""
    by: dict = {}
    for r in records:
        for key in ("split_note", "eager_note"):
            if r.get(key):
                by.setdefault(r["method"], {}).setdefault(r[key], []).append(
                    f"{r['backend']} {r['dtype']} N={r['n']}"
                )
    ran = {}
    for r in records:
        if r["status"] == "ok":
            ran[r["method"]] = ran.get(r["method"], 0) + 1
    out = []
    for method, msgs in by.items():  # the cases named only when the note is not for all that ran
        parts = [
            msg if len(cases) == ran.get(method) else f"{msg} ({', '.join(cases)})"
            for msg, cases in msgs.items()
        ]
        out.append(f"{method}: " + "; ".join(parts))
    return out


def copy_lines(report: dict) -> list:
    out = []
    for dev, c in report["copy"].items():
        parts = [f"torch copy_ {c['torch_copy_gbps']:.1f}"]
        if c.get("memcpy_gbps") is not None:
            parts = [
                f"memcpy {c['memcpy_gbps']:.1f}",
                f"memcpy in 64 KiB calls {c['memcpy_64k_chunks_gbps']:.1f}",
            ] + parts
        ro = f"; read-only {c['read_only_gbps']:.1f} GB/s" if c.get("read_only_gbps") is not None else ""
        out.append(
            f"copy bandwidth on {dev} ({_mb(c['bytes'])} buffer, read + write): "
            f"{', '.join(parts)} GB/s; reference {c['reference_gbps']:.1f} GB/s{ro}"
        )
    return out


def header(report: dict) -> str:
    s = report["settings"]
    lines = header_lines(report["machine"])
    lines.append(
        f"tensor {'x'.join(map(str, s['shape']))}, repeats {s['repeats']} (best shown), warm-up {s['warmup']}, "
        f"eager {'repeats ' + str(s['eager_repeats']) if s['eager'] else 'off'}, seed {s['seed']}"
    )
    return "\n".join(lines + copy_lines(report))


def footer(report: dict) -> str:
    ld = report["load"]
    other = "n/a" if ld["other_cpu_s"] is None else f"{ld['other_cpu_s']:.1f} s"
    la = ld.get("load_avg_1m_before")
    lines = [
        f"run: {ld['wall_s']:.1f} s wall, {ld['own_cpu_s']:.1f} s CPU ours; other processes' CPU time "
        f"during the run: {other}" + (f" (load average before: {la:.2f})" if la is not None else "")
    ]
    return "\n".join(lines + notes(report["cases"]))


def render(report: dict) -> str:
    """Header, table and footer: what the command prints."""
    return "\n".join([header(report), "", table(report["cases"]), "", footer(report)])


def markdown(report: dict) -> str:
    """The header (as a bullet list) and the table in Markdown, for bench/RESULTS.md."""
    lines = [f"* {line}" for line in header(report).splitlines()]
    lines += [f"* {line}" for line in footer(report).splitlines()]
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in RIGHT else "---" for c in COLUMNS) + "|",
    ]
    for r in report["cases"]:
        row = case_row(r)
        if len(row) < len(COLUMNS):
            row = row[:4] + [row[4]] + [""] * (len(COLUMNS) - 5)
        lines.append("| " + " | ".join(v.replace("|", "/") for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_json(report: dict, path) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def load_json(path) -> dict:
    """A report written by :func:`write_json`; ValueError if it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("m3kernels-bench/"):
        raise ValueError(f"{path}: not an m3kernels bench report (no 'format': 'm3kernels-bench/1')")
    if not isinstance(data.get("cases"), list):
        raise ValueError(f"{path}: no 'cases' list")
    return data


def plot(report: dict, path) -> None:
    """The PNG of the module docstring; ValueError when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'm3kernels[plot]')") from None
    ok = [r for r in report["cases"] if r["status"] == "ok"]
    if not ok:
        raise ValueError("--plot: no case ran, nothing to plot")
    methods = list(dict.fromkeys(r["method"] for r in ok))
    series = list(dict.fromkeys((r["backend"], r["dtype"], r["n"]) for r in ok))
    by = {(r["method"], r["backend"], r["dtype"], r["n"]): r for r in ok}
    width = 0.8 / len(series)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10.0, min(28.0, 2.4 * len(methods))), 5))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(methods))]
        rows = [by.get((m, *s)) for m in methods]
        b = [(r["stage_b_pct_copy"] or 0.0) if r else 0.0 for r in rows]
        f = [(r["full_pct_copy"] or 0.0) if r else 0.0 for r in rows]
        label = f"{s[0]} {s[1]} N={s[2]}"
        ax1.bar(xs, b, width, label=f"{label}: stage B")
        ax1.bar(
            xs,
            f,
            width * 0.5,
            color="none",
            edgecolor="black",
            hatch="//",
            zorder=3,
            label="full merge" if j == 0 else None,
        )
        ours = [r["full_s"] * 1e3 if r else math.nan for r in rows]
        eager = [r["eager_s"] * 1e3 if r and r["eager_s"] else math.nan for r in rows]
        ax2.bar([x - width / 4 for x in xs], ours, width / 2, label=f"{label}: ours (full)")
        ax2.bar([x + width / 4 for x in xs], eager, width / 2, label=f"{label}: eager", alpha=0.5)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.legend(fontsize=7)
    ax1.axhline(100, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("% of the copy bandwidth (hatched: full merge)")
    ax1.set_title("stage B vs copy bandwidth")
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (log scale)")
    ax2.set_title("full merge vs eager PyTorch")
    m = report["machine"]
    shape = "x".join(map(str, report["settings"]["shape"]))
    fig.suptitle(
        f"m3kernels bench {shape}: {m['cpu']} ({m.get('cpu_isa')}), GPU {m.get('gpu') or 'none'}", fontsize=9
    )
    fig.tight_layout()
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)


__all__ = [
    "progress_bar",
    "table",
    "render",
    "header",
    "footer",
    "write_json",
    "load_json",
    "plot",
    "case_row",
]
