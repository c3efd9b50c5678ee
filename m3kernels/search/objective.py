"""The search objective: one number per candidate, higher is better.

* ``normalized`` (the default): the mean over tasks of the normalised improvement
  (merged − base) / (expert − base) of each task's metric, the base and the task's expert scored
  once for reference. 0 is the base, 1 the expert on its own task, whatever the metric's
  direction (for a loss both differences are negative when the merge helps). A task where the
  expert scores exactly like the base can not be normalised: an error naming it.
* a named score ``<task>.<score>``, maximised or minimised as its goal says; returned as is for
  ``max`` and negated for ``min``, so that the best candidate always has the largest objective
  (the results keep the score itself too).
"""

from __future__ import annotations

import math

from m3kernels.search.errors import SearchError
from m3kernels.search.evalspec import NORMALIZED, EvalSpec


def normalized_improvement(merged: float, base: float, expert: float, task: str) -> float:
    gap = expert - base
    if gap == 0 or not math.isfinite(gap):
        raise SearchError(
            f"task {task}: the expert scores {expert!r} and the base {base!r}; the normalised "
            f"improvement (merged − base) / (expert − base) is undefined (use a named objective)"
        )
    return (merged - base) / gap


def objective(spec: EvalSpec, scores: dict, references: dict) -> float:
    """The objective of one candidate's ``scores``; ``references``: {"base": scores,
    "expert:<i>": scores} (needed for ``normalized``)."""
    if spec.objective == NORMALIZED:
        vals = []
        for t in spec.tasks:
            key = t.score_name
            vals.append(
                normalized_improvement(
                    scores[key], references["base"][key], references[f"expert:{t.expert}"][key], t.name
                )
            )
        return sum(vals) / len(vals)
    value = scores[spec.objective]
    return value if spec.goal == "max" else -value


def references_needed(spec: EvalSpec, has_base: bool) -> list:
    """The reference models scored once: "base" (when the config has one) and "expert:<i>" of
    each task that names its expert (the normalized objective needs them; the plot shows them)."""
    if spec.objective == NORMALIZED and not has_base:
        raise SearchError("objective: 'normalized' needs a base_model in the config (the reference for 0)")
    experts = sorted({t.expert for t in spec.tasks if t.expert is not None})
    return (["base"] if has_base else []) + [f"expert:{i}" for i in experts]


__all__ = ["objective", "normalized_improvement", "references_needed"]
