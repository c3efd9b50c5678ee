"""The ``m3kernels bench`` command (a plugin of :mod:`m3kernels.cli`): kernel timings per method,
backend, dtype and N; ``--compare A.json B.json``; ``--checkpoint CONFIG`` for a whole merge.

Nothing heavy is imported here (the parser is built on every start of the ``m3kernels`` command).
Option values are checked in :func:`run`, so a bad one gives one line and exit status 2
(``m3kernels: error: ...``), as every other user error of the command.
"""

from __future__ import annotations

import sys

PRELOAD = ("torch", "numpy", "m3kernels.backends.cpu")
DEFAULT_REPEATS = 5


def _one_line_error(parser):
    """argparse errors of this sub-command as one line (status 2), not usage + message."""

    def error(message):
        print(f"m3kernels: error: bench: {message} (see m3kernels bench --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def add_parser(subparsers) -> None:
    b = subparsers.add_parser(
        "bench",
        help="time the kernels (stage A, stage B, GB/s, %% of copy bandwidth, speed-up over eager PyTorch)",
        description="Time every merge method's kernels on one tensor per backend, dtype and N: stage A "
        "and stage B apart, the bytes moved, GB/s, the % of the copy bandwidth measured in the same run "
        "on the same device, and the speed-up over the same merge in eager PyTorch (mergekit style). "
        "docs/BENCH.md explains the numbers.",
    )
    b.add_argument(
        "--shape",
        default="5120x13824",
        help="tensor shape, e.g. 5120x13824 (default: the largest Llama-2-13B matrix)",
    )
    b.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    b.add_argument(
        "--backends",
        default=None,
        help="comma-separated: cpu, triton, cuda (default: every one available here)",
    )
    b.add_argument(
        "--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16, float32 (default: bfloat16)"
    )
    b.add_argument("--n", default="2", metavar="N[,N...]", help="number(s) of fine-tuned models (default: 2)")
    b.add_argument(
        "--repeats",
        default=None,
        metavar="R",
        help=f"timed calls per measurement, best kept (default: {DEFAULT_REPEATS}; --checkpoint: 1)",
    )
    b.add_argument("--warmup", default="1", metavar="W", help="untimed calls first (default: 1)")
    b.add_argument(
        "--eager-repeats", default="1", metavar="R", help="timed calls of the eager merge (default: 1)"
    )
    b.add_argument(
        "--no-eager", action="store_true", help="skip the eager PyTorch merge (no speed-up column)"
    )
    b.add_argument(
        "--threads",
        default=None,
        metavar="T",
        help="threads of the CPU kernel and of torch (default: as set)",
    )
    b.add_argument("--seed", default="0", help="seed of the generated tensors and of DARE (default: 0)")
    b.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    b.add_argument(
        "--markdown", default=None, metavar="FILE", help="write the header and the table as Markdown"
    )
    b.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="bars of %% of copy bandwidth per method and backend, eager time beside (needs matplotlib)",
    )
    b.add_argument(
        "--compare",
        nargs=2,
        default=None,
        metavar=("A.json", "B.json"),
        help="print the change between two reports, per case (nothing is timed)",
    )
    b.add_argument(
        "--checkpoint",
        default=None,
        metavar="CONFIG",
        help="time a whole merge of CONFIG with a phase breakdown and the floor of this machine",
    )
    b.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="--checkpoint: the output folder (default: a temporary one, removed)",
    )
    b.add_argument("--device", default="auto", help="--checkpoint: cpu, cuda or auto (default: auto)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.add_argument("-v", "--verbose", action="store_true", help="tracebacks and more details")
    _one_line_error(b)


def _fail(message: str):
    from m3kernels.errors import M3KError

    raise M3KError(message)


def _compare(args) -> int:
    from m3kernels.benchmark.compare import compare_text

    try:
        print(compare_text(*args.compare))
    except ValueError as exc:
        _fail(str(exc))
    return 0


def _checkpoint(args) -> int:
    from m3kernels.benchmark.checkpoint import bench_checkpoint, checkpoint_text
    from m3kernels.benchmark.report import write_json

    if args.device not in ("cpu", "cuda", "auto"):
        _fail(f"--device {args.device!r} is not one of cpu, cuda, auto")
    backend = "auto"
    if args.backends:
        names = [x.strip() for x in args.backends.split(",") if x.strip()]
        if len(names) != 1 or names[0] not in ("cpu", "triton", "cuda"):
            _fail("--checkpoint takes one backend in --backends: cpu, triton or cuda")
        backend = names[0]
    try:
        repeats = int(args.repeats) if args.repeats is not None else 1
    except ValueError:
        _fail(f"--repeats {args.repeats!r} is not an integer")
    try:
        rep = bench_checkpoint(
            args.checkpoint,
            out_dir=args.out,
            device=args.device,
            backend=backend,
            repeats=repeats,
            keep=args.out is not None,
        )
    except ValueError as exc:
        _fail(str(exc))
    print(checkpoint_text(rep))
    if args.json:
        write_json(rep, args.json)
    return 0


def run(args) -> int:
    if args.compare:
        return _compare(args)
    if args.checkpoint:
        return _checkpoint(args)
    from m3kernels.benchmark.report import markdown, plot, render, write_json
    from m3kernels.benchmark.runner import run_benchmark

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before anything is timed)
        except ImportError:
            _fail("--plot needs matplotlib (pip install 'm3kernels[plot]')")
    try:
        report = run_benchmark(
            shape=args.shape,
            methods=args.methods,
            backends=args.backends,
            dtypes=args.dtypes,
            ns=args.n,
            repeats=args.repeats if args.repeats is not None else DEFAULT_REPEATS,
            warmup=args.warmup,
            eager=not args.no_eager,
            eager_repeats=args.eager_repeats,
            threads=args.threads,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ValueError as exc:
        _fail(str(exc))
    print(render(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(markdown(report), encoding="utf-8")
        print(f"Markdown written to {args.markdown}")
    if args.plot:
        try:
            plot(report, args.plot)
        except ValueError as exc:
            _fail(str(exc))
        print(f"plot written to {args.plot}")
    return 0


__all__ = ["add_parser", "run", "PRELOAD"]
