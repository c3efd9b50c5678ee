"""The ``m3kernels search CONFIG OUT --eval EVAL.yaml`` command (a plugin of :mod:`m3kernels.cli`).

Imports nothing heavy at module level (the parser is built on every start of ``m3kernels``);
user errors are :class:`~m3kernels.errors.M3KError` subclasses, printed as one line (exit 2).
"""

from __future__ import annotations

import argparse
import re

PRELOAD = ("torch", "numpy", "m3kernels.checkpoint.run", "m3kernels.backends.cpu", "m3kernels.search.runner")
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'90' / '90s' / '30m' / '1.5h' -> seconds."""
    m = _TIME_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 600, 90s, 30m, 2h)")
    unit = (m.group(2) or "s").lower()
    value = float(m.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be > 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="find the best M³ ratio, scale and method with an evaluator, in memory",
        description="Merge each candidate of a search space into one live transformers model, score "
        "it with the evaluators of EVAL.yaml, and write the best one to OUT (results beside it, in "
        "OUT.search/ unless --results). The space is the config's 'search:' block and these options "
        "(the options win). See docs/SEARCH.md.",
    )
    p.add_argument(
        "config", metavar="CONFIG.yaml", help="merge config (as for m3kernels merge), optionally with search:"
    )
    p.add_argument("out_dir", metavar="OUT", help="where the best candidate is written (a merged checkpoint)")
    p.add_argument(
        "--eval",
        dest="eval_file",
        required=True,
        metavar="EVAL.yaml",
        help="the evaluation (tasks, objective)",
    )
    g = p.add_argument_group("search space (comma-separated lists)")
    g.add_argument("--methods", metavar="LIST", help="merge methods (default: the config's)")
    g.add_argument(
        "--alphas",
        metavar="LIST",
        help="M³ draws: λ ~ Beta(α, α) (Dirichlet for N > 2), e.g. 0.2,0.5,1,2,3,4,5",
    )
    g.add_argument("--draws", type=int, metavar="K", help="M³ draws per α (default 1)")
    g.add_argument(
        "--seed", type=int, metavar="S", help="first M³ seed (draw k of the a-th α: S + a·K + k; default 0)"
    )
    g.add_argument("--lambdas", metavar="LIST", help="fixed λ values (two models)")
    g.add_argument("--simplex", type=int, metavar="STEPS", help="every ratio vector with entries k/STEPS")
    g.add_argument(
        "--plain", action="store_true", default=None, help="also the merge without M³ (ratios all 1)"
    )
    g.add_argument("--scales", metavar="LIST", help="values of the scale parameters.lambda")
    g.add_argument("--densities", metavar="LIST", help="values of parameters.density")
    b = p.add_argument_group("budget")
    b.add_argument("--max-candidates", type=int, metavar="N", help="only the first N candidates of the space")
    b.add_argument(
        "--max-time", type=parse_duration, metavar="T", help="start no candidate after T (600, 30m, 2h)"
    )
    p.add_argument("--results", metavar="DIR", default=None, help="results folder (default: OUT.search)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in the results folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-plot", action="store_true", help="no PNG plot")
    p.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where the model and merges run"
    )
    p.add_argument(
        "--backend", choices=("auto", "cpu", "triton", "cuda"), default="auto", help="kernel backend"
    )
    p.add_argument("--allow-bin", action="store_true", help="accept PyTorch .bin weights")
    p.add_argument("--follow-symlinks", action="store_true", help="read links out of the model folders")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and more details")


def run(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from m3kernels.search.runner import search

    space = {
        "methods": args.methods,
        "alphas": args.alphas,
        "draws": args.draws,
        "seed": args.seed,
        "lambdas": args.lambdas,
        "simplex": args.simplex,
        "plain": args.plain,
        "scales": args.scales,
        "densities": args.densities,
    }
    result = search(
        args.config,
        args.out_dir,
        args.eval_file,
        space=space,
        results_dir=args.results,
        device=args.device,
        backend=args.backend,
        max_candidates=args.max_candidates,
        max_time=args.max_time,
        force=args.force,
        fresh=args.fresh,
        progress=not args.quiet,
        plot=not args.no_plot,
        allow_bin=args.allow_bin,
        follow_symlinks=args.follow_symlinks,
    )
    if not args.quiet:
        print(result.summary())
    return 0


__all__ = ["add_parser", "run", "PRELOAD", "parse_duration"]
