"""Merge search: find the best M³ mixing ratio, scale and method with an evaluator, in memory.

``m3kernels search CONFIG OUT --eval EVAL.yaml`` (:mod:`.cli`) or :func:`search` (:mod:`.runner`)
merges each candidate of a search space (:mod:`.space`) straight into one live ``transformers``
model (:mod:`.live`), scores it with the evaluators of EVAL.yaml (:mod:`.evalspec`,
:mod:`.evaluators`, :mod:`.objective`), appends it to a resumable results file (:mod:`.results`),
plots the scores against λ (:mod:`.plot`) and writes the best candidate as a merged checkpoint.
docs/SEARCH.md describes it. Importing this package imports nothing heavy (no torch).
"""

from __future__ import annotations


def search(config, out_dir, eval_file, **kwargs):
    """See :func:`m3kernels.search.runner.search` (imported on first use)."""
    from m3kernels.search.runner import search as _search

    return _search(config, out_dir, eval_file, **kwargs)


__all__ = ["search"]
