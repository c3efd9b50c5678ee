"""Several merges in one file (mergekit-multi's format): YAML documents, each one merge config,
later (or earlier) ones naming another document's output as a model.

As ``mergekit-multi`` (mergekit 0.1.5, ``scripts/multimerge.py``):

* a document with ``name: X`` is an intermediate merge, written to ``WORK/X``; a model
  reference (``base_model``, ``model``, a slice source, ``tokenizer_source``, a tokenizer
  ``source``, or the model part of ``X+adapter``) written exactly ``X`` means that output;
* at most one document has no ``name``: the final merge, published as ``OUT``. When every
  document is named, the one no other document uses is the final one (mergekit writes every
  named document to its intermediate folder and needs no ``--out-path`` then; here ``OUT``
  gets it) — several such documents are an error;
* the merges run in dependency order (document order among independent ones); a name used
  twice, a cycle, or more than one unnamed document is an error naming the documents.

Unlike mergekit, ``tokenizer_source: base`` / ``union`` keep their meaning even when a
document is named ``base`` or ``union``. Each intermediate merge is an ordinary
``merge_checkpoints`` run into ``WORK/X`` (streamed, locked, crash-safe): after a kill it
resumes from its finished shards, and a finished one whose plan fingerprint (config, inputs'
sizes, times and header hashes) is unchanged is reused, not merged again (mergekit's
``--lazy``); a changed one is merged again, and so are the documents that use it. ``WORK``
(``--work-dir``; default ``OUT.work`` beside ``OUT``) is kept afterwards. Relative model paths
are read from the working directory, then from the config file's folder, as for one config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from m3kernels.checkpoint.config import (
    ConfigProblems,
    MergeConfigError,
    _read_config_file,
    _StrictLoader,
    count_documents,
    parse_config,
)
from m3kernels.errors import M3KError

log = logging.getLogger("m3kernels")

STAMP_SUFFIX = ".m3k-multi.json"  # WORK/.X.m3k-multi.json: the fingerprint of the finished WORK/X
REFERENCE_KEYS = frozenset({"base_model", "model", "tokenizer_source", "source"})
KEYWORDS = frozenset({"base", "union"})  # tokenizer_source / source values that are not models
KEYWORD_KEYS = frozenset({"tokenizer_source", "source"})


@dataclass
class Document:
    """One merge of the file: its name (None: the unnamed final merge), the config as written
    and with names replaced by output folders, and the documents it uses."""

    index: int  # 0-based position in the file
    name: str | None
    raw: dict
    uses: list = field(default_factory=list)  # names of the documents whose output it reads
    config: dict | None = None  # raw with references patched (set by plan_documents)

    @property
    def label(self) -> str:
        return f"document {self.index + 1}" + (f" ({self.name!r})" if self.name is not None else " (unnamed)")


@dataclass
class MultiResult:
    """What a multi-document merge did: per document, the folder and 'merged' / 'reused'."""

    out_dir: Path
    work_dir: Path
    steps: list  # (Document, folder, what, result or None)
    seconds: float

    def summary(self) -> str:
        lines = [f"{len(self.steps)} merges in {self.seconds:.1f} s (work folder {self.work_dir}):"]
        for doc, folder, what, _ in self.steps:
            lines.append(f"  {doc.label}: {what} -> {folder}")
        return "\n".join(lines)


def is_multi_document(source) -> bool:
    """Whether ``source`` (a config file path) holds several YAML documents."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    s = os.fspath(source)
    if "\n" in s or not os.path.isfile(s):
        return False
    return count_documents(_read_config_file(s)) > 1


def read_documents(path) -> list:
    """The documents of a config file, each a mapping (empty documents skipped), read with the
    config reader's bounds (docs/CONFIG.md, "Bounded parsing")."""
    path = os.fspath(path)
    text = _read_config_file(path)
    loader = _StrictLoader(text)
    loader.origin = path
    docs = []
    try:
        while loader.check_data():
            doc = loader.get_data()
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise MergeConfigError(
                    f"{path}: document {len(docs) + 1} is a {type(doc).__name__}, not a merge config mapping"
                )
            docs.append(doc)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(e.problem or e.context or "syntax error").split())
        raise MergeConfigError(f"{path}{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise MergeConfigError(f"{path}: nested too deeply") from None
    finally:
        loader.dispose()
    if not docs:
        raise MergeConfigError(f"{path}: no merge config in the file")
    return docs


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise MergeConfigError(f"{where}.name: expected a non-empty string, got {name!r}")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        raise MergeConfigError(
            f"{where}.name: {name!r} must be a plain folder name (its output is WORK/{name}): no "
            f"'/', no leading '.'"
        )
    return name


def _split_ref(value: str) -> tuple[str, str | None]:
    model, plus, adapter = value.partition("+")
    return model, (adapter if plus else None)


def _walk_refs(value, fn, key=None):
    """``value`` with ``fn(string)`` applied to every model reference in it (values of
    REFERENCE_KEYS anywhere, except the tokenizer keywords)."""
    if isinstance(value, dict):
        return {k: _walk_refs(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_refs(v, fn, key) for v in value]
    if isinstance(value, str) and key in REFERENCE_KEYS and not (key in KEYWORD_KEYS and value in KEYWORDS):
        return fn(value)
    return value


def _uses(raw: dict, names: set) -> list:
    found: list = []

    def note(ref: str) -> str:
        model, _ = _split_ref(ref)
        if model in names and model not in found:
            found.append(model)
        return ref

    _walk_refs(raw, note)
    return found


def _order(docs: list, final: Document) -> list:
    """The documents in dependency order (file order among independent ones); cycles named."""
    by_name = {d.name: d for d in docs if d.name is not None}
    done: list = []
    state: dict = {}

    def visit(d: Document, trail: list):
        if state.get(d.index) == "done":
            return
        if state.get(d.index) == "active":
            cycle = trail[trail.index(d.index) :] + [d.index]
            raise MergeConfigError(
                "mergekit-multi: the documents use each other in a cycle: "
                + " -> ".join(docs[i].label for i in cycle)
            )
        state[d.index] = "active"
        for n in d.uses:
            visit(by_name[n], trail + [d.index])
        state[d.index] = "done"
        done.append(d)

    for d in docs:
        if d is not final:
            visit(d, [])
    visit(final, [])
    return done


def plan_documents(docs_raw: list, work_dir: Path, cfg_dir: Path | None = None) -> list:
    """Documents in the order they run (the final one last), each with ``config``: names
    replaced by ``work_dir/NAME``, relative paths by where they are found (the working
    directory, else ``cfg_dir``). Checks names, the final document and cycles."""
    docs, names = [], {}
    for i, raw in enumerate(docs_raw):
        where = f"document {i + 1}"
        name = raw.get("name")
        if name is not None:
            name = _check_name(name, where)
            if name in names:
                raise MergeConfigError(
                    f"mergekit-multi: the name {name!r} is used by document {names[name] + 1} and {where}"
                )
            names[name] = i
        docs.append(Document(i, name, raw))
    unnamed = [d for d in docs if d.name is None]
    if len(unnamed) > 1:
        raise MergeConfigError(
            "mergekit-multi: more than one document has no 'name' ("
            + ", ".join(d.label for d in unnamed)
            + "); the one unnamed document is the final merge, written to OUT"
        )
    for d in docs:
        d.uses = _uses(d.raw, set(names))
    if unnamed:
        final = unnamed[0]
    else:
        used = {n for d in docs for n in d.uses}
        sinks = [d for d in docs if d.name not in used]
        if len(sinks) != 1:
            raise MergeConfigError(
                "mergekit-multi: every document is named and "
                + (
                    "each is used by another (a cycle)"
                    if not sinks
                    else f"{len(sinks)} of them are used by none ({', '.join(d.label for d in sinks)})"
                )
                + "; leave the name out of the final merge (it is written to OUT)"
            )
        final = sinks[0]
    order = _order(docs, final)
    work_dir = Path(work_dir)

    def resolve(ref: str) -> str:
        model, adapter = _split_ref(ref)
        parts = []
        for p in (model, adapter):
            if p is None:
                continue
            if p in names and p is model:
                parts.append(str(work_dir / p))
            elif (
                not os.path.isabs(p)
                and not os.path.exists(p)
                and cfg_dir is not None
                and (cfg_dir / p).exists()
            ):
                parts.append(str(cfg_dir / p))
            else:
                parts.append(p)
        return "+".join(parts)

    for d in docs:
        d.config = _walk_refs({k: v for k, v in d.raw.items() if k != "name"}, resolve)
        if d.name is not None:
            d.config["name"] = d.name  # mergekit-mega's document name: accepted, no effect
    return order


def _prefixed(exc: M3KError, where: str) -> M3KError:
    if isinstance(exc, ConfigProblems):
        return ConfigProblems([f"{where}: {m}" for m in exc.problems])
    if isinstance(exc, MergeConfigError):
        return MergeConfigError(f"{where}: {exc}")
    try:
        return type(exc)(f"{where}: {exc}", path=exc.path, tensor=exc.tensor)
    except TypeError:
        return M3KError(f"{where}: {exc}", path=exc.path, tensor=exc.tensor)


def _fingerprint(config: dict, folder: Path, kwargs: dict) -> str:
    from m3kernels.checkpoint.record import fingerprint, make_record
    from m3kernels.checkpoint.run import merge_checkpoints

    keep = ("out_shard_size", "seed", "allow_bin", "follow_symlinks")
    plan = merge_checkpoints(
        config, folder, dry_run=True, force=True, **{k: kwargs[k] for k in keep if k in kwargs}
    )
    return fingerprint(plan, make_record(plan, kwargs.get("out_shard_size", _default_shard())))


def _default_shard() -> int:
    from m3kernels.checkpoint import DEFAULT_SHARD_SIZE

    return DEFAULT_SHARD_SIZE


def _stamp_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{STAMP_SUFFIX}"


def _write_stamp(folder: Path, fp: str) -> None:
    from m3kernels.checkpoint.writer import write_file_durably

    write_file_durably(_stamp_path(folder), json.dumps({"fingerprint": fp}).encode())


def _read_stamp(folder: Path) -> str | None:
    try:
        return json.loads(_stamp_path(folder).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def default_work_dir(out_dir) -> Path:
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f"{out.name}.work"


def merge_documents(
    path,
    out_dir,
    *,
    work_dir=None,
    dry_run: bool = False,
    force: bool = False,
    resume: bool = False,
    **kwargs,
) -> MultiResult | list:
    """Run every merge of a multi-document config file (see the module docstring); ``kwargs``
    go to each :func:`~m3kernels.checkpoint.run.merge_checkpoints` (device, out_shard_size, seed,
    backend, progress, strict, allow_bin, follow_symlinks). ``force`` / ``resume`` apply to
    ``OUT``; the intermediate merges resume and are replaced as needed by themselves.
    ``dry_run``: check every document, plan those whose inputs exist, write nothing; returns
    [(Document, folder, plan or None)]."""
    from m3kernels.checkpoint.run import merge_checkpoints
    from m3kernels.checkpoint.writer import partial_runs

    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser().absolute()
    work = Path(work_dir).expanduser().absolute() if work_dir is not None else default_work_dir(out_dir)
    cfg_dir = Path(path).resolve().parent
    order = plan_documents(read_documents(path), work, cfg_dir)
    final = order[-1]
    for d in order:  # every config checked before the first merge
        try:
            parse_config(d.config)
        except MergeConfigError as exc:
            raise _prefixed(exc, d.label) from None
    if any(_relation_inside(out_dir, work / d.name) for d in order if d.name is not None):
        raise MergeConfigError(f"{out_dir}: OUT must not be one of the work folders in {work}")
    if dry_run:
        planned = []
        for d in order:
            folder = out_dir if d is final else work / d.name
            plan = None
            if all((work / n).is_dir() for n in d.uses):
                try:
                    plan = merge_checkpoints(
                        d.config, folder, dry_run=True, force=True, **_plan_kwargs(kwargs)
                    )
                except M3KError as exc:
                    raise _prefixed(exc, d.label) from None
            planned.append((d, folder, plan))
        return planned
    steps, rebuilt = [], set()
    for d in order:
        if d is final:
            break
        folder = work / d.name
        try:
            fp = None
            if folder.exists() and not (d.uses and rebuilt & set(d.uses)):
                fp = _fingerprint(d.config, folder, kwargs)
                if _read_stamp(folder) == fp:
                    log.info("%s: %s is up to date; reused", d.label, folder)
                    steps.append((d, folder, "reused", None))
                    continue
            if folder.exists() and not (folder / "m3kernels_merge.yaml").is_file():
                raise M3KError(
                    f"{folder} exists and is not an m3kernels merge output; remove it or choose "
                    f"another --work-dir",
                    path=str(folder),
                )
            work.mkdir(parents=True, exist_ok=True)
            _stamp_path(folder).unlink(missing_ok=True)
            res = merge_checkpoints(
                d.config, folder, force=folder.exists(), resume=bool(partial_runs(folder)), **kwargs
            )
            _write_stamp(folder, fp or _fingerprint(d.config, folder, kwargs))
        except M3KError as exc:
            raise _prefixed(exc, d.label) from None
        rebuilt.add(d.name)
        steps.append((d, folder, "merged", res))
    try:
        res = merge_checkpoints(final.config, out_dir, force=force, resume=resume, **kwargs)
    except M3KError as exc:
        raise _prefixed(exc, final.label) from None
    steps.append((final, out_dir, "merged", res))
    return MultiResult(out_dir, work, steps, time.perf_counter() - t0)


def _plan_kwargs(kwargs: dict) -> dict:
    keep = ("out_shard_size", "seed", "allow_bin", "follow_symlinks", "strict", "ranks")
    return {k: kwargs[k] for k in keep if k in kwargs}


def _relation_inside(a: Path, b: Path) -> bool:
    a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    return a == b or b in a.parents or a in b.parents


def run_cli(args) -> int:
    """``m3kernels merge FILE OUT`` for a multi-document FILE (m3kernels.cli calls this)."""
    from m3kernels.cli import merge_options

    kwargs = merge_options(args)
    if args.dry_run:
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k in ("out_shard_size", "seed", "allow_bin", "follow_symlinks", "strict")
        }
        planned = merge_documents(args.config, args.out_dir, work_dir=args.work_dir, dry_run=True, **kwargs)
        print(f"{len(planned)} merges (mergekit-multi), in this order:")
        for d, folder, plan in planned:
            print(f"\n== {d.label} -> {folder}")
            if plan is None:
                print("   (its inputs are made by the documents above: planned when they exist)")
            else:
                print(plan.summary())
        print(f"\ndry run: nothing written; {args.out_dir} would get the last one")
        return 0
    result = merge_documents(
        args.config, args.out_dir, work_dir=args.work_dir, force=args.force, resume=args.resume, **kwargs
    )
    if not args.quiet:
        print(result.summary())
    return 0


__all__ = [
    "Document",
    "MultiResult",
    "is_multi_document",
    "read_documents",
    "plan_documents",
    "merge_documents",
    "default_work_dir",
    "run_cli",
]
