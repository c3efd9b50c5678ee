"""``m3kernels bench --compare A.json B.json``: the change between two runs, case by case.

Cases are matched by (method, backend, dtype, N, shape). For each common case: stage B and the
full merge's time in A and in B and their ratio B / A (below 1: B is faster), and the % of copy
bandwidth in each run (the same rate against each machine's own copy bandwidth, so two machines
compare fairly). Cases in only one file are listed apart, and the two headers (machine,
versions, load) are shown first: a change is only as meaningful as the conditions were alike.
"""

from __future__ import annotations

from m3kernels.benchmark.report import load_json

COLUMNS = (
    "method",
    "backend",
    "dtype",
    "N",
    "shape",
    "B ms A",
    "B ms B",
    "B: B/A",
    "full ms A",
    "full ms B",
    "full: B/A",
    "%copy A",
    "%copy B",
)


def _key(r: dict) -> tuple:
    return (r["method"], r["backend"], r["dtype"], r["n"], "x".join(map(str, r["shape"])))


def ratio(a, b) -> float | None:
    """b / a (None when either is missing or a is 0)."""
    if a is None or b is None or a == 0:
        return None
    return b / a


def compare_reports(a: dict, b: dict) -> dict:
    """{'rows': [per common case dict], 'only_a': [keys], 'only_b': [keys]}."""
    ka = {_key(r): r for r in a["cases"]}
    kb = {_key(r): r for r in b["cases"]}
    rows = []
    for k in ka:
        if k not in kb:
            continue
        ra, rb = ka[k], kb[k]
        rows.append(
            {
                "key": list(k),
                "status": (ra["status"], rb["status"]),
                "stage_b_s": (ra.get("stage_b_s"), rb.get("stage_b_s")),
                "stage_b_ratio": ratio(ra.get("stage_b_s"), rb.get("stage_b_s")),
                "full_s": (ra.get("full_s"), rb.get("full_s")),
                "full_ratio": ratio(ra.get("full_s"), rb.get("full_s")),
                "stage_b_pct_copy": (ra.get("stage_b_pct_copy"), rb.get("stage_b_pct_copy")),
            }
        )
    return {
        "rows": rows,
        "only_a": [list(k) for k in ka if k not in kb],
        "only_b": [list(k) for k in kb if k not in ka],
    }


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def _machine(tag: str, path, rep: dict) -> str:
    m, ld = rep.get("machine", {}), rep.get("load", {})
    other = ld.get("other_cpu_s")
    return (
        f"{tag}: {path}: {m.get('date')}, {m.get('cpu')} ({m.get('cpu_isa')}), GPU {m.get('gpu') or 'none'}, "
        f"m3kernels {m.get('m3kernels')}, torch {m.get('torch')}; other CPU during the run "
        f"{_f(other, '.1f')} s"
    )


def compare_text(path_a, path_b) -> str:
    """The comparison as text (ValueError for a file that is not a bench report)."""
    a, b = load_json(path_a), load_json(path_b)
    cmp = compare_reports(a, b)
    lines = [_machine("A", path_a, a), _machine("B", path_b, b), ""]
    rows = [list(COLUMNS)]
    for r in cmp["rows"]:
        (ba, bb), (fa, fb), (pa, pb) = r["stage_b_s"], r["full_s"], r["stage_b_pct_copy"]
        rows.append(
            [str(x) for x in r["key"]]
            + [
                _f(ba and ba * 1e3, ".1f"),
                _f(bb and bb * 1e3, ".1f"),
                _f(r["stage_b_ratio"], ".2f"),
                _f(fa and fa * 1e3, ".1f"),
                _f(fb and fb * 1e3, ".1f"),
                _f(r["full_ratio"], ".2f"),
                _f(pa, ".0f"),
                _f(pb, ".0f"),
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    for r in rows:
        lines.append(
            "  ".join(
                v.rjust(w) if c >= 3 else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))
            ).rstrip()
        )
    if not cmp["rows"]:
        lines.append("(no case in common)")
    for tag, keys in (("A", cmp["only_a"]), ("B", cmp["only_b"])):
        for k in keys:
            lines.append(f"only in {tag}: {' '.join(map(str, k))}")
    lines.append("B/A below 1: B is faster.")
    return "\n".join(lines)


__all__ = ["compare_reports", "compare_text", "ratio"]
