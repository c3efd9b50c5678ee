"""``search``: try every candidate of a search space in memory, score it, keep the best.

1. the merge config (its ``search:`` block is the space, the arguments override it key by key)
   and EVAL.yaml are read and validated, and every candidate config is checked, before anything
   is loaded;
2. the inputs are opened once and one live model is loaded (:class:`~m3kernels.search.live.LiveModel`);
   the evaluation data is read and tokenized once;
3. the references (the base and each task's expert) are scored once;
4. each candidate not already in the results file is merged into the live model's parameters,
   evaluated and appended to ``results.jsonl`` (a rerun of the same search resumes after the
   last finished candidate), until the space or the budget (``max_candidates``, ``max_time``) is
   used up;
5. results.csv / results.json / report.md and the plot are written beside results.jsonl, and OUT
   becomes the best candidate, written by the checkpoint merge (:func:`m3kernels.merge_checkpoints`)
   from the candidate's config: a normal merged checkpoint, bit for bit what ``m3kernels merge``
   of that config gives, with its merge record (``m3kernels_merge.yaml``, the config's ``name``
   saying how it was chosen). Explicit ratios of more than two models have no config key, so
   such a winner is written from the live model with ``save_pretrained`` and a
   ``m3kernels_search.yaml`` record instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from m3kernels.search.errors import SearchError

log = logging.getLogger("m3kernels")


@dataclass
class SearchResult:
    """What a search did (rows: this space's finished candidates, in order)."""

    best: dict
    rows: list
    references: dict
    results_dir: Path
    out_dir: Path | None
    plot: Path | None
    evaluated: int  # candidates evaluated by this run
    resumed: int  # candidates found finished in the results file
    stopped: str | None  # why candidates were left: "max_time", or None
    seconds: float
    score_names: list = field(default_factory=list)

    def summary(self) -> str:
        b = self.best
        merge = sum(r["merge_s"] for r in self.rows if r.get("run_here"))
        ev = sum(r["eval_s"] for r in self.rows if r.get("run_here"))
        lines = [
            f"best: candidate #{b['candidate']['index']} {b['key']}: objective {b['objective']:.6g}",
            f"candidates: {len(self.rows)} done ({self.evaluated} evaluated now, {self.resumed} from the results file)"
            + (f"; stopped by {self.stopped}" if self.stopped else ""),
        ]
        if self.evaluated:
            per_min = 60.0 * self.evaluated / max(merge + ev, 1e-9)
            lines.append(
                f"time: {self.seconds:.1f} s in all; {per_min:.1f} candidates/min; merging "
                f"{100.0 * merge / max(merge + ev, 1e-9):.1f}% of the candidates' time"
            )
        lines.append(f"results: {self.results_dir}")
        if self.out_dir is not None:
            lines.append(f"best model: {self.out_dir}")
        return "\n".join(lines)


def _absolute_paths(raw: dict, cfg_dir: Path | None) -> dict:
    """The config with its model paths made absolute (relative ones: the working directory,
    else the config file's folder, as the merge resolves them)."""

    def fix(p):
        if not isinstance(p, str) or not p.strip():
            return p
        q = Path(p).expanduser()
        if not q.exists() and not q.is_absolute() and cfg_dir is not None and (cfg_dir / q).exists():
            q = cfg_dir / q
        return str(q.absolute())

    raw = copy.deepcopy(raw)
    if "base_model" in raw:
        raw["base_model"] = fix(raw["base_model"])
    for e in raw.get("models") or []:
        if isinstance(e, dict) and "model" in e:
            e["model"] = fix(e["model"])
    return raw


def _fingerprint(raw: dict, spec, live, device: str, backend: str) -> str:
    data = []
    for t in spec.tasks:
        for p in [t.data] if t.data is not None else []:
            st = os.stat(p)
            data.append([str(p), st.st_size, st.st_mtime_ns])
    obj = {
        "config": raw,
        "eval": spec.raw,
        "data": data,
        "inputs": [ck.file_stamps() for ck in live.opened],
        "device": device,
        "backend": backend,
        "dtype": str(live.out_dtype),
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _print_line(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def _clean(scores: dict) -> dict:
    return {k: (v if math.isfinite(v) else None) for k, v in scores.items()}


def _objective(spec, scores: dict, refs: dict):
    from m3kernels.search.objective import objective

    try:
        v = objective(spec, scores, refs)
    except TypeError:  # a score is None (not finite)
        return None
    return v if math.isfinite(v) else None


def _score_names(spec) -> list:
    names = [t.score_name for t in spec.tasks]
    if spec.objective != "normalized" and spec.objective not in names:
        names.append(spec.objective)
    return names


def _write_best(best_c, best_row, spec, n_done, results_dir, out_dir, live, tokenizer, opts) -> None:
    from m3kernels.checkpoint.output_guard import check_out_dir

    how = (
        f"m3kernels search: best of {n_done} candidates by {spec.objective} "
        f"({best_row['objective']:.6g}), candidate #{best_c.index} {best_c.key}; results in {results_dir}"
    )
    if best_c.mix != "ratios":
        from m3kernels.checkpoint.run import merge_checkpoints

        cfg = copy.deepcopy(best_c.config)
        cfg["name"] = how
        merge_checkpoints(
            cfg,
            out_dir,
            device=opts["device"],
            backend=opts["backend"],
            force=opts["force"],
            progress=opts["progress"],
            allow_bin=opts["allow_bin"],
            follow_symlinks=opts["follow_symlinks"],
        )
        return
    import yaml

    check_out_dir(out_dir, opts["force"], live.opened)
    live.merge(best_c)
    tmp = out_dir.parent / f".{out_dir.name}.m3k-search-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    live.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "how": how,
        "candidate": best_c.describe(),
        "scores": best_row["scores"],
        "objective": best_row["objective"],
        "config_without_ratios": best_c.config,
        "note": "explicit M³ ratios of more than two models have no merge-config key; this "
        "checkpoint was written from the live model (save_pretrained)",
    }
    (tmp / "m3kernels_search.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # check_out_dir allowed it: --force, and not an input
    os.replace(tmp, out_dir)


def search(
    config,
    out_dir,
    eval_file,
    *,
    space=None,
    results_dir=None,
    device: str = "cpu",
    backend: str = "auto",
    max_candidates: int | None = None,
    max_time: float | None = None,
    force: bool = False,
    fresh: bool = False,
    progress: bool = True,
    plot: bool = True,
    write_best: bool = True,
    allow_bin: bool = False,
    follow_symlinks: bool = False,
    table=None,
) -> SearchResult:
    """Search the merges of ``config`` (a YAML path, YAML text or dict; its ``search:`` block
    and ``space`` (a dict of :data:`~m3kernels.search.space.SPACE_KEYS`, None values ignored,
    or a whole :class:`~m3kernels.search.space.SearchSpace`) give the candidates) with the evaluation of ``eval_file`` (EVAL.yaml), in memory; write the
    results to ``results_dir`` (default: ``OUT.search`` beside OUT) and the best candidate to
    ``out_dir`` (unless ``write_best`` is False; ``out_dir`` may then be None).

    ``table``: a callable receiving each line of the live table (default: print to stdout when
    ``progress``). User errors raise :class:`~m3kernels.errors.M3KError` subclasses.
    """
    from m3kernels.checkpoint.config import parse_config, read_config_source
    from m3kernels.errors import OutputExistsError
    from m3kernels.search.evalspec import load_eval
    from m3kernels.search.space import SearchSpace, build_candidates, parse_space

    t_start = time.perf_counter()
    cfg_dir = None
    if isinstance(config, (str, os.PathLike)) and "\n" not in os.fspath(config) and Path(config).is_file():
        cfg_dir = Path(config).resolve().parent
    raw = read_config_source(config)
    sp = parse_space(raw.pop("search", None), "search")
    if isinstance(space, SearchSpace):  # a whole space: the config's search block is not used
        sp = space
    else:
        sp = parse_space(dict(space or {}), "search option", base=sp)
    sp = parse_space({"max_candidates": max_candidates, "max_time": max_time}, "search option", base=sp)
    raw = _absolute_paths(raw, cfg_dir)
    cfg = parse_config(copy.deepcopy(raw))
    spec = load_eval(eval_file, models=cfg.models, cfg_dir=cfg_dir)
    candidates = build_candidates(raw, len(cfg.models), sp, cfg.method, cfg.mixup)
    if write_best:
        if out_dir is None:
            raise SearchError("out_dir: needed to write the best model (or write_best=False)")
        out_dir = Path(out_dir).expanduser().absolute()
        if os.path.lexists(out_dir) and not force:
            raise OutputExistsError(
                f"{out_dir} exists; use --force to replace it with the best model", path=str(out_dir)
            )
    if results_dir is None:
        if out_dir is None:
            raise SearchError("results_dir: needed when there is no out_dir")
        results_dir = Path(str(out_dir) + ".search")
    results_dir = Path(results_dir).expanduser().absolute()
    if table is None:
        table = _print_line if progress else (lambda line: None)

    from tqdm import tqdm

    from m3kernels.search.evaluators import evaluate_all, make_evaluator
    from m3kernels.search.live import LiveModel, load_tokenizer
    from m3kernels.search.objective import normalized_improvement, references_needed
    from m3kernels.search.results import ResultsFile, markdown_table, table_line, write_exports

    live = LiveModel(
        cfg, device=device, backend=backend, allow_bin=allow_bin, follow_symlinks=follow_symlinks
    )
    try:
        results = ResultsFile(results_dir, _fingerprint(raw, spec, live, str(live.device), backend), fresh)
        tokenizer = load_tokenizer(spec.tokenizer or live.source.path)
        evaluators = [make_evaluator(t, tokenizer) for t in spec.tasks]
        score_names = _score_names(spec)
        for name in references_needed(spec, cfg.base_model is not None):
            if name in results.references:
                continue
            live.load_reference(name)
            t0 = time.perf_counter()
            scores = _clean(evaluate_all(evaluators, live.model, tokenizer))
            results.append(
                {"kind": "reference", "name": name, "scores": scores, "eval_s": time.perf_counter() - t0}
            )
            log.info("reference %s: %s", name, scores)
        refs = {k: v["scores"] for k, v in results.references.items()}
        if spec.objective == "normalized":
            for t in spec.tasks:  # an undefined normalisation is an error before any candidate
                b, e = refs["base"][t.score_name], refs[f"expert:{t.expert}"][t.score_name]
                if b is None or e is None:
                    raise SearchError(f"task {t.name}: the base or the expert scores {t.metric} non-finite")
                normalized_improvement(b, b, e, t.name)

        resumed = sum(c.key in results.candidates for c in candidates)
        if resumed:
            log.info("resuming: %d of %d candidates already in %s", resumed, len(candidates), results.path)
        evaluated, stopped = 0, None
        bar = tqdm(
            total=len(candidates),
            initial=resumed,
            desc="search",
            unit="cand",
            disable=not progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        t_loop = time.perf_counter()
        here = set()
        try:
            for c in candidates:
                if c.key in results.candidates:
                    continue
                if sp.max_time is not None and time.perf_counter() - t_loop >= sp.max_time:
                    stopped = "max_time"
                    break
                merge_s = live.merge(c)
                t0 = time.perf_counter()
                try:
                    scores = _clean(evaluate_all(evaluators, live.model, tokenizer))
                except SearchError as exc:
                    raise SearchError(
                        f"candidate #{c.index} {c.key}: {exc} (the {len(results.candidates)} finished "
                        f"candidate(s) are kept in {results.path}; fix it and rerun to resume)"
                    ) from None
                eval_s = time.perf_counter() - t0
                row = {
                    "kind": "candidate",
                    "key": c.key,
                    "candidate": c.describe(),
                    "scores": scores,
                    "objective": _objective(spec, scores, refs),
                    "merge_s": merge_s,
                    "eval_s": eval_s,
                }
                results.append(row)
                here.add(c.key)
                evaluated += 1
                bar.update(1)
                line = (
                    table_line(row, score_names)
                    if row["objective"] is not None
                    else f"#{c.index} {c.key}: non-finite scores"
                )
                table(line)
        finally:
            bar.close()

        rows = []
        for c in candidates:
            r = results.candidates.get(c.key)
            if r is not None:
                r = dict(r, candidate=c.describe(), run_here=c.key in here)
                rows.append(r)
        scored = [r for r in rows if r["objective"] is not None]
        if not scored:
            raise SearchError(
                "no candidate has a finite objective"
                + (" (none was evaluated within --max-time)" if not rows else "")
            )
        best = max(scored, key=lambda r: r["objective"])  # the first of equals
        best_c = next(c for c in candidates if c.key == best["key"])
        write_exports(results_dir, rows, results.references, score_names, best["key"])
        plot_path = None
        if plot:
            try:
                from m3kernels.search.plot import plot_results

                panels = [("objective", f"objective ({spec.objective})")] + [(s, s) for s in score_names]
                plot_path = plot_results(
                    rows,
                    results.references,
                    panels,
                    results_dir / "search.png",
                    title=str(config)
                    if isinstance(config, (str, os.PathLike)) and "\n" not in str(config)
                    else "",
                )
            except ImportError:
                log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        report = [
            "# m3kernels search",
            "",
            f"objective: {spec.objective}; best: #{best_c.index} `{best_c.key}`",
            "",
        ]
        if plot_path is not None:
            report += [f"![scores against λ]({plot_path.name})", ""]
        report.append(markdown_table(rows, results.references, score_names, best["key"]))
        (results_dir / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
        if write_best:
            opts = dict(
                device=str(live.device),
                backend=backend,
                force=force,
                progress=progress,
                allow_bin=allow_bin,
                follow_symlinks=follow_symlinks,
            )
            _write_best(best_c, best, spec, len(rows), results_dir, out_dir, live, tokenizer, opts)
        return SearchResult(
            best,
            rows,
            dict(results.references),
            results_dir,
            out_dir if write_best else None,
            plot_path,
            evaluated,
            resumed,
            stopped,
            time.perf_counter() - t_start,
            score_names,
        )
    finally:
        live.close()


__all__ = ["search", "SearchResult"]
