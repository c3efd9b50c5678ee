"""``m3kernels mergekit-yaml CONFIG OUT [mergekit-yaml options] [--m3k-seed N] [--m3k-replace]``:
mergekit's own planner and writer with our methods registered (``m3k_<name>``, and with
``--m3k-replace`` in place of mergekit's of the same names). mergekit 0.1.5 must be installed in
the Python that runs it; without it, one line naming the command to use instead and exit 2.
"""

from __future__ import annotations

import argparse
import sys

PRELOAD = ()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mergekit-yaml",
        help="run mergekit-yaml (mergekit 0.1.5 installed here) with m3kernels' fused methods registered",
        description=__doc__,
        prefix_chars="\x00",  # every argument, --help included, goes to mergekit-yaml
        add_help=False,
    )
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="mergekit-yaml's arguments, plus --m3k-seed/--m3k-replace"
    )
    p.set_defaults(verbose=False)


def mergekit_missing() -> str:
    """'' when mergekit's ``mergekit-yaml`` can be imported here, else why not."""
    try:
        import mergekit.scripts.run_yaml  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def run(args) -> int:
    why = mergekit_missing()
    if why:
        print(
            "m3kernels: error: mergekit-yaml needs mergekit 0.1.5 installed in this Python "
            f"({sys.executable}; {why}); install it (pip install mergekit==0.1.5) or run "
            "`PYTHONPATH=<m3kernels> <mergekit's python> -m m3kernels.integrations.mergekit_plugin CONFIG OUT`",
            file=sys.stderr,
        )
        return 2
    from m3kernels.integrations.mergekit_plugin import main

    return main(list(args.args))


__all__ = ["add_parser", "run", "mergekit_missing", "PRELOAD"]
