"""The search's results file: JSON lines appended as the search goes, so an interrupted search
resumes where it stopped; and its exports (CSV, JSON, a Markdown table).

The first line is the header ``{"kind": "search", "fingerprint": ...}``: a hash of the merge
config, EVAL.yaml, the evaluation data and the input files, so results are only reused for the
same models and evaluation. Each further line is a reference score (``"kind": "reference"``, the
base or an expert) or a finished candidate (``"kind": "candidate"``), written whole, flushed and
fsynced. A last line cut short (a kill during the write) is dropped on reading and cut off the
file before the next append.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from m3kernels.search.errors import SearchError

RESULTS_FILE = "results.jsonl"


class ResultsFile:
    """results.jsonl in ``folder``: what is there (:attr:`references`, :attr:`candidates`) and
    :meth:`append`."""

    def __init__(self, folder, fingerprint: str, fresh: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS_FILE
        self.fingerprint = fingerprint
        self.references: dict = {}  # "base" / "expert:<i>" -> row
        self.candidates: dict = {}  # key -> row
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SearchError(
                f"results folder {str(self.folder)!r} can not be created: {e.strerror or e}"
            ) from None
        if fresh or not self.path.exists():
            self._write_header()
        else:
            self._read()

    def _write_header(self) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "search", "fingerprint": self.fingerprint}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _read(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # bytes after the last newline: a line cut short
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        lines = data[:good].decode("utf-8", "replace").splitlines()
        if not lines:
            self._write_header()
            return
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("kind") != "search":
            raise SearchError(
                f"{self.path}: not a results file of m3kernels search (use --fresh to replace it)"
            )
        if head.get("fingerprint") != self.fingerprint:
            raise SearchError(
                f"{self.path}: these results come from another search (the config, EVAL.yaml, the "
                f"evaluation data or the models differ); use --fresh to start over or --results elsewhere"
            )
        for no, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SearchError(
                    f"{self.path}:{no}: not JSON; fix or remove the line, or use --fresh"
                ) from None
            if row.get("kind") == "reference":
                self.references[row["name"]] = row
            elif row.get("kind") == "candidate":
                self.candidates[row["key"]] = row

    def append(self, row: dict) -> None:
        line = json.dumps(row, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if row["kind"] == "reference":
            self.references[row["name"]] = row
        else:
            self.candidates[row["key"]] = row


COLUMNS = ("index", "method", "mix", "lambda", "ratios", "alpha", "seed", "scale", "density")


def flat_row(row: dict, score_names: list) -> dict:
    c = row["candidate"]
    out = {
        "index": c["index"],
        "method": c["method"],
        "mix": c["mix"],
        "lambda": None if c["ratios"] is None else c["ratios"][0],
        "ratios": None if c["ratios"] is None else " ".join(f"{r:.6g}" for r in c["ratios"]),
        "alpha": c["alpha"],
        "seed": c["seed"],
        "scale": c["scale"],
        "density": c["density"],
    }
    for s in score_names:
        out[s] = row["scores"].get(s)
    out["objective"] = row["objective"]
    out["merge_s"] = row["merge_s"]
    out["eval_s"] = row["eval_s"]
    return out


def write_exports(folder: Path, rows: list, references: dict, score_names: list, best_key) -> dict:
    """results.csv and results.json (every candidate of this search, in order) in ``folder``."""
    flat = [flat_row(r, score_names) for r in rows]
    cols = list(COLUMNS) + list(score_names) + ["objective", "merge_s", "eval_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in flat:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    (folder / "results.csv").write_text(buf.getvalue(), encoding="utf-8")
    doc = {
        "references": {k: v["scores"] for k, v in references.items()},
        "best": best_key,
        "candidates": [{**r["candidate"], "scores": r["scores"], "objective": r["objective"]} for r in rows],
    }
    (folder / "results.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return {"csv": folder / "results.csv", "json": folder / "results.json"}


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _how(c: dict, draw: str, plain: str, grid: str) -> str:
    return {"draw": draw, "plain": plain, "config": "config"}.get(c["mix"], grid)


def table_line(row: dict, score_names: list) -> str:
    """One candidate as a line of the live table."""
    c = row["candidate"]
    ratios = "-" if c["ratios"] is None else ",".join(f"{r:.3f}" for r in c["ratios"])
    how = _how(c, f"M³ α={c['alpha']:g} s={c['seed']}" if c["mix"] == "draw" else "", "no M³", "grid")
    parts = [f"#{c['index']:<3d}", f"{c['method']:<15s}", f"{how:<20s}", f"r={ratios:<13s}"]
    if c["scale"] is not None:
        parts.append(f"s={c['scale']:g}")
    if c["density"] is not None:
        parts.append(f"d={c['density']:g}")
    parts += [f"{s}={fmt(row['scores'].get(s))}" for s in score_names]
    parts.append(f"objective={row['objective']:.4f}")
    return "  ".join(parts)


def markdown_table(rows: list, references: dict, score_names: list, best_key=None) -> str:
    """References and candidates as a Markdown table (the best in bold)."""
    head = ["model", "method", "M³", "ratios", *score_names, "objective"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ref in references.items():
        lines.append(
            "| "
            + " | ".join([name, "-", "-", "-", *[fmt(ref["scores"].get(s)) for s in score_names], "-"])
            + " |"
        )
    for r in rows:
        c = r["candidate"]
        how = _how(c, f"α={c['alpha']:g}, seed {c['seed']}" if c["mix"] == "draw" else "", "none", "fixed")
        ratios = "-" if c["ratios"] is None else ", ".join(f"{x:.3f}" for x in c["ratios"])
        cells = [f"#{c['index']}", c["method"], how, ratios, *[fmt(r["scores"].get(s)) for s in score_names]]
        cells.append(fmt(r["objective"]))
        if r["key"] == best_key:
            cells = [f"**{x}**" for x in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ResultsFile", "write_exports", "table_line", "markdown_table", "RESULTS_FILE"]
