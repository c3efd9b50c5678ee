"""The ``m3kernels stats`` command: ``stats fisher MODEL DATA OUT`` and ``stats regmean MODEL DATA OUT``.

A plugin of :mod:`m3kernels.cli` (``add_parser``, ``run``, ``PRELOAD``); imports nothing heavy at
module level. Problems the user can fix raise :class:`~m3kernels.errors.M3KError` (one line, exit 2).
"""

from __future__ import annotations

PRELOAD = ("torch", "numpy", "m3kernels.datastats.run")


def _size(text):
    from m3kernels.cli import parse_size

    return parse_size(text)


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "stats",
        help="compute data statistics for data-aware merging (fisher, regmean)",
        description="Run a fine-tuned causal LM over a data file and store the statistics the "
        "fisher and regmean merge methods use (docs/DATA_AWARE.md).",
    )
    sub = s.add_subparsers(dest="stats_kind", metavar="KIND")
    sub.required = True
    for kind, text in (
        ("fisher", "diagonal Fisher of every parameter (mean squared per-example gradient)"),
        ("regmean", "Gram matrix XᵀX of every linear layer's inputs"),
    ):
        p = sub.add_parser(kind, help=text, description=text)
        p.add_argument("model", metavar="MODEL", help="Hugging Face causal-LM checkpoint folder")
        p.add_argument(
            "data", metavar="DATA", help="text file (one example a line) or JSONL (text, or prompt/response)"
        )
        p.add_argument("out", metavar="OUT", help="output folder (safetensors + manifest.json)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument(
            "--max-examples", type=int, default=None, metavar="N", help="use the first N usable examples"
        )
        p.add_argument(
            "--max-length",
            type=int,
            default=512,
            metavar="TOKENS",
            help="cut examples to this many tokens (default 512)",
        )
        p.add_argument(
            "--batch-size",
            type=int,
            default=1 if kind == "fisher" else 8,
            metavar="B",
            help=f"examples per step (default {1 if kind == 'fisher' else 8})",
        )
        p.add_argument("--seed", type=int, default=0, help="seed (fisher --sampled: the label draws)")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "float64", "bfloat16", "float16"),
            help="dtype of the stored statistics",
        )
        p.add_argument(
            "--accumulate",
            default="float32",
            choices=("float32", "float64"),
            help="dtype of the sums while running",
        )
        p.add_argument(
            "--model-dtype",
            default="float32",
            choices=("float32", "bfloat16", "auto"),
            help="dtype the model runs in (default float32)",
        )
        p.add_argument(
            "--format",
            dest="fmt",
            default="auto",
            choices=("auto", "text", "jsonl"),
            help="data format (default: by the file name)",
        )
        p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: MODEL)")
        if kind == "fisher":
            p.add_argument(
                "--sampled",
                action="store_true",
                help="draw the labels from the model (the Fisher-merging paper's Fisher)",
            )
            p.add_argument(
                "--per-example",
                default="vmap",
                choices=("vmap", "loop"),
                help="how per-example gradients are computed",
            )
        p.add_argument(
            "--max-memory",
            type=_size,
            default=None,
            metavar="SIZE",
            help=("Fisher sums + per-example gradients" if kind == "fisher" else "Gram matrices")
            + " held at once (more passes over the data when smaller; default: all at once)",
        )
        p.add_argument(
            "--save-every",
            type=float,
            default=300.0,
            metavar="SECONDS",
            help="save the running sums this often (for --resume)",
        )
        p.add_argument("--resume", action="store_true", help="continue an unfinished run in OUT")
        p.add_argument("--force", action="store_true", help="replace the statistics in OUT")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and more details")
    s.add_argument("-v", "--verbose", action="store_true", help="tracebacks and more details")


def run(args) -> int:
    from m3kernels.errors import M3KError

    opts = dict(
        device=args.device,
        max_examples=args.max_examples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        accumulate=args.accumulate,
        model_dtype=args.model_dtype,
        fmt=args.fmt,
        tokenizer=args.tokenizer,
        save_every=args.save_every,
    )
    if args.stats_kind == "fisher":
        from m3kernels.datastats.fisher import compute_fisher as compute

        opts.update(sampled=args.sampled, per_example=args.per_example, max_memory=args.max_memory)
    else:
        from m3kernels.datastats.regmean import compute_regmean as compute

        opts.update(max_memory=args.max_memory)
    try:
        m = compute(
            args.model,
            args.data,
            args.out,
            resume=args.resume,
            force=args.force,
            progress=not args.quiet,
            **opts,
        )
    except ValueError as exc:  # a bad option value: the user's to fix
        raise M3KError(str(exc)) from None
    if not args.quiet:
        c = m["counts"]
        print(
            f"{m['kind']} statistics of {c['examples']} examples ({c['tokens']} tokens) in {m['seconds']:.1f} s -> {args.out} ({len(m['files'])} file(s) + manifest.json)"
        )
    return 0


__all__ = ["add_parser", "run", "PRELOAD"]
