"""EVAL.yaml: the evaluation a search scores each candidate with, parsed strictly.

Read with the merge config's bounded YAML loader (size, depth and node limits, no aliases, no
key written twice); unknown keys and values of the wrong type or range are errors naming the key::

    tasks:                        # 1 to 64 tasks
      - name: code                # letters, digits, '_', '-', '.'; unique
        type: loss                # loss | exact_match | function
        data: code.jsonl          # loss, exact_match: a file, relative to this file's folder
        metric: loss              # loss: loss | perplexity; function: a key of its dict
        expert: 1                 # the fine-tuned model for this task: 1..N or its path
        max_examples: 200         # default: all (at most 1,000,000)
        max_length: 512           # tokens per example (loss) or prompt (exact_match)
        batch_size: 8             # loss
        max_new_tokens: 32        # exact_match
        stop: ["\\n"]             # exact_match: the answer ends at the first of these
        function: mymod:score     # function: module:function or file.py:function
        goal: max                 # function: max | min (for a named objective)
    objective: normalized         # default; or "<task>.<score>" or {score: ..., goal: min|max}
    tokenizer: path               # default: the base model's folder (else the first model's)

The ``normalized`` objective is the mean over tasks of (merged − base) / (expert − base) of
each task's metric (:mod:`m3kernels.search.objective`).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from m3kernels.search.errors import SearchError

MAX_EVAL_BYTES = 1 << 20
MAX_TASKS = 64
TASK_KEYS = (
    "name",
    "type",
    "data",
    "metric",
    "expert",
    "max_examples",
    "max_length",
    "batch_size",
    "max_new_tokens",
    "stop",
    "function",
    "goal",
)
TOP_KEYS = ("tasks", "objective", "tokenizer")
TYPES = ("loss", "exact_match", "function")
# keys each type takes besides name, type, expert
TYPE_KEYS = {
    "loss": ("data", "metric", "max_examples", "max_length", "batch_size"),
    "exact_match": ("data", "max_examples", "max_length", "max_new_tokens", "stop"),
    "function": ("function", "metric", "goal"),
}
LOSS_METRICS = ("loss", "perplexity")
NORMALIZED = "normalized"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FUNC_RE = re.compile(r"^[^:\x00]{1,1000}:[A-Za-z_][A-Za-z0-9_]{0,200}$")


@dataclass(frozen=True)
class TaskSpec:
    """One task of EVAL.yaml (see the module docstring)."""

    name: str
    type: str
    metric: str  # the score the task contributes (normalized objective, plots)
    goal: str  # "min" | "max": whether lower or higher ``metric`` is better
    expert: int | None  # 0-based index into the config's models
    data: Path | None = None
    function: str | None = None
    max_examples: int | None = None
    max_length: int = 512
    batch_size: int = 8
    max_new_tokens: int = 32
    stop: tuple = ("\n",)
    folder: Path | None = None  # EVAL.yaml's folder (for file.py:function)

    @property
    def score_name(self) -> str:
        return f"{self.name}.{self.metric}"


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple
    objective: str  # NORMALIZED or a score name "<task>.<key>"
    goal: str  # "max" | "min" (normalized: max)
    tokenizer: Path | None
    raw: dict = field(compare=False, default=None)
    path: str = ""


def _int(v, key, lo, hi) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SearchError(f"{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(v, key) -> str:
    if not isinstance(v, str) or not v.strip() or "\x00" in v:
        raise SearchError(f"{key}: expected a non-empty string, got {v!r}")
    return v


def _choice(v, key, allowed) -> str:
    if v not in allowed:
        raise SearchError(f"{key}: {v!r} is not one of {', '.join(allowed)}")
    return v


def _regular_file(p: Path, what: str) -> os.stat_result:
    """os.stat of ``p``, which must be a regular file; ``what`` names it in the error."""
    try:
        st = os.stat(p)
    except OSError as e:
        raise SearchError(f"{what} {str(p)!r} can not be read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SearchError(f"{what} {str(p)!r} is not a regular file")
    return st


def _file(v, key, folder: Path) -> Path:
    p = Path(_str(v, key)).expanduser()
    if not p.is_absolute():
        p = folder / p
    _regular_file(p, f"{key}:")
    return p


def _expert(v, key, models: list, cfg_dir: Path | None) -> int:
    n = len(models)
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= n:
            raise SearchError(f"{key}: model {v} does not exist; the config has models 1..{n}")
        return v - 1
    if isinstance(v, str):

        def norm(p):
            q = Path(p).expanduser()
            if not q.is_absolute() and cfg_dir is not None and not q.exists():
                q = cfg_dir / q
            return os.path.realpath(q)

        for i, m in enumerate(models):
            if norm(m) == norm(v):
                return i
        raise SearchError(f"{key}: {v!r} is none of the config's models ({', '.join(map(str, models))})")
    raise SearchError(f"{key}: expected a model number 1..{n} or a model path from the config, got {v!r}")


def _task(raw, i: int, folder: Path, models: list, cfg_dir) -> TaskSpec:
    key = f"tasks[{i}]"
    if not isinstance(raw, dict):
        raise SearchError(f"{key}: expected a mapping (name, type, data, ...), got {raw!r}")
    for k in raw:
        if k not in TASK_KEYS:
            raise SearchError(f"{key}.{k}: unknown key; a task has {', '.join(TASK_KEYS)}")
    name = _str(raw.get("name"), f"{key}.name")
    if not _NAME_RE.match(name):
        raise SearchError(f"{key}.name: {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    key = f"tasks[{i}] ({name})"
    typ = _choice(raw.get("type"), f"{key}.type", TYPES)
    for k in raw:
        if k not in ("name", "type", "expert") and k not in TYPE_KEYS[typ]:
            raise SearchError(
                f"{key}.{k}: a {typ} task does not take it; it takes {', '.join(TYPE_KEYS[typ])}"
            )
    expert = (
        _expert(raw["expert"], f"{key}.expert", models, cfg_dir) if raw.get("expert") is not None else None
    )
    kw: dict = {}
    if typ in ("loss", "exact_match"):
        if "data" not in raw:
            raise SearchError(f"{key}.data: required for a {typ} task (a .txt or .jsonl file)")
        kw["data"] = _file(raw["data"], f"{key}.data", folder)
        if raw.get("max_examples") is not None:
            kw["max_examples"] = _int(raw["max_examples"], f"{key}.max_examples", 1, 1_000_000)
        if "max_length" in raw:
            kw["max_length"] = _int(raw["max_length"], f"{key}.max_length", 2, 1 << 20)
    if typ == "loss":
        metric = _choice(raw.get("metric", "loss"), f"{key}.metric", LOSS_METRICS)
        goal = "min"
        if "batch_size" in raw:
            kw["batch_size"] = _int(raw["batch_size"], f"{key}.batch_size", 1, 4096)
    elif typ == "exact_match":
        metric, goal = "exact_match", "max"
        if "max_new_tokens" in raw:
            kw["max_new_tokens"] = _int(raw["max_new_tokens"], f"{key}.max_new_tokens", 1, 4096)
        if "stop" in raw:
            stop = raw["stop"]
            if isinstance(stop, str):
                stop = [stop]
            if (
                not isinstance(stop, list)
                or len(stop) > 16
                or not all(isinstance(s, str) and s for s in stop)
            ):
                raise SearchError(f"{key}.stop: expected up to 16 non-empty strings, got {raw['stop']!r}")
            kw["stop"] = tuple(stop)
    else:
        fn = _str(raw.get("function"), f"{key}.function")
        if not _FUNC_RE.match(fn):
            raise SearchError(f"{key}.function: {fn!r}: expected module:function or path/file.py:function")
        kw["function"] = fn
        if "metric" not in raw:
            raise SearchError(f"{key}.metric: required for a function task: the key of its dict to score")
        metric = _str(raw["metric"], f"{key}.metric")
        goal = _choice(raw.get("goal", "max"), f"{key}.goal", ("max", "min"))
    return TaskSpec(name, typ, metric, goal, expert, folder=folder, **kw)


def _objective(raw, tasks: tuple) -> tuple:
    if raw is None or raw == NORMALIZED:
        missing = [t.name for t in tasks if t.expert is None]
        if missing:
            raise SearchError(
                f"objective: 'normalized' needs an expert for every task; task(s) {', '.join(missing)} "
                f"have none (set expert: N, or objective: <task>.<score>)"
            )
        return NORMALIZED, "max"
    goal = None
    if isinstance(raw, dict):
        extra = set(raw) - {"score", "goal"}
        if extra:
            raise SearchError(f"objective.{sorted(extra)[0]}: unknown key; objective takes score and goal")
        if "goal" in raw:
            goal = _choice(raw["goal"], "objective.goal", ("max", "min"))
        raw = raw.get("score")
    score = _str(raw, "objective")
    task_name, _, metric = score.rpartition(".")
    task = next((t for t in tasks if t.name == task_name), None)
    if task is None or not metric:
        raise SearchError(
            f"objective: {score!r} is not 'normalized' nor '<task>.<score>' of a task "
            f"({', '.join(t.name for t in tasks)})"
        )
    known = {"loss": ("loss", "perplexity"), "exact_match": ("exact_match",), "function": None}[task.type]
    if known is not None and metric not in known:
        raise SearchError(
            f"objective: task {task.name} ({task.type}) scores {', '.join(known)}, not {metric!r}"
        )
    if goal is None:
        goal = task.goal if metric == task.metric else ("min" if metric in LOSS_METRICS else "max")
    return score, goal


def parse_eval(
    raw, *, folder: Path, models: list, cfg_dir: Path | None = None, path: str = "EVAL.yaml"
) -> EvalSpec:
    """A parsed EVAL.yaml mapping -> EvalSpec. ``models``: the config's fine-tuned model paths."""
    if not isinstance(raw, dict):
        raise SearchError(
            f"{path}: expected a mapping with tasks (and objective, tokenizer), got {type(raw).__name__}"
        )
    for k in raw:
        if k not in TOP_KEYS:
            raise SearchError(f"{path}: {k}: unknown key; EVAL.yaml has {', '.join(TOP_KEYS)}")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise SearchError(f"{path}: tasks: expected a non-empty list of tasks")
    if len(tasks_raw) > MAX_TASKS:
        raise SearchError(f"{path}: tasks: {len(tasks_raw)} tasks; at most {MAX_TASKS}")
    tasks = tuple(_task(t, i, folder, models, cfg_dir) for i, t in enumerate(tasks_raw))
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SearchError(f"{path}: tasks: the name {dup!r} is used twice")
    objective, goal = _objective(raw.get("objective"), tasks)
    tok = raw.get("tokenizer")
    if tok is not None:
        tok = Path(_str(tok, "tokenizer")).expanduser()
        if not tok.is_absolute():
            tok = folder / tok
        if not tok.is_dir():
            raise SearchError(f"tokenizer: {str(tok)!r} is not a folder")
    return EvalSpec(tasks, objective, goal, tok, raw, path)


def load_eval(path, *, models: list, cfg_dir: Path | None = None) -> EvalSpec:
    """Read and validate an EVAL.yaml file (bounded: at most MAX_EVAL_BYTES, UTF-8)."""
    from m3kernels.checkpoint.config import MergeConfigError, _parse_yaml

    p = Path(path)
    st = _regular_file(p, "evaluation file")
    if st.st_size > MAX_EVAL_BYTES:
        raise SearchError(f"evaluation file {str(p)!r} has {st.st_size:,} bytes; at most {MAX_EVAL_BYTES:,}")
    with open(p, "rb") as f:
        data = f.read(MAX_EVAL_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SearchError(f"evaluation file {str(p)!r} is not UTF-8 (offset {e.start})") from None
    try:
        raw = _parse_yaml(text, str(p))
    except MergeConfigError as exc:
        raise SearchError(str(exc)) from None
    return parse_eval(raw, folder=p.resolve().parent, models=models, cfg_dir=cfg_dir, path=str(p))


__all__ = ["EvalSpec", "TaskSpec", "load_eval", "parse_eval", "NORMALIZED"]
