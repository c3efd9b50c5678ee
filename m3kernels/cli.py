"""The ``m3kernels`` command: ``merge``, ``inspect``, ``methods``, ``demo``, ``backends`` (alias ``info``),
and the commands of :data:`PLUGIN_COMMANDS` (``stats``, ``search``, ``bench``), each in its own module.

A thin layer over :func:`m3kernels.merge_checkpoints` and friends. Problems the user can fix
(bad config, bad input, existing output, full disk) print one line and exit with status 2;
``--verbose`` adds the traceback and progress details.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback

from m3kernels.errors import EXIT_USER_ERROR, M3KError, one_line

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_INTERNAL = 1
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5G' / '500M' / '1.5GiB' (binary: 2**30) or '5GB' (decimal, as transformers) or bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5G, 500M, 2GB, 1048576)")
    num, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    value = int(num * base**power)
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    from m3kernels.checkpoint import DEFAULT_SHARD_SIZE

    p = argparse.ArgumentParser(
        prog="m3kernels",
        description="Merge fine-tuned LLM checkpoints with exact, "
        "fused kernels (TIES, DARE, task arithmetic, linear, M³ mixup).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser(
        "merge",
        help="merge the checkpoints a mergekit-style YAML config names",
        description="Merge the checkpoints CONFIG names into OUT_DIR (sharded safetensors, "
        "config.json, tokenizer files, m3kernels_merge.yaml).",
    )
    m.add_argument("config", metavar="CONFIG.yaml", help="merge config (mergekit format + mixup, trim_scope)")
    m.add_argument(
        "out_dir", metavar="OUT_DIR", help="output folder (created; must not exist without --force)"
    )
    m.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where the kernels run (default: auto = cuda if available)",
    )
    m.add_argument(
        "--backend",
        choices=("auto", "cpu", "triton", "cuda"),
        default="auto",
        help="kernel backend (default: auto)",
    )
    m.add_argument(
        "--out-shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="largest output shard, in bytes; K/M/G suffixes are binary (5G = 5 GiB), KB/MB/GB "
        "decimal (default: 5G)",
    )
    m.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same merge, reusing its finished shards",
    )
    m.add_argument("--seed", type=int, default=None, help="merge seed (overrides the config's 'seed')")
    m.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and every input, print the plan, write nothing",
    )
    m.add_argument(
        "--allow-bin",
        action="store_true",
        help="accept PyTorch .bin weights (loaded with torch.load(weights_only=True))",
    )
    m.add_argument(
        "--strict",
        action="store_true",
        help="refuse inputs holding NaN or inf (reads the inputs once more before merging)",
    )
    m.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files of the model folders that are symbolic links to places outside them "
        "(refused by default)",
    )
    m.add_argument(
        "--ranks",
        type=int,
        default=None,
        metavar="K",
        help="with --dry-run: show how K processes (torchrun --nproc-per-node K) would share the merge",
    )
    m.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="distributed merge (torchrun): how long a rank waits for the others (default 1800)",
    )
    m.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="a file of several YAML documents (mergekit-multi): where the named merges are written "
        "(default: OUT_DIR.work beside OUT_DIR)",
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    m.add_argument("-v", "--verbose", action="store_true", help="tracebacks and more details")

    i = sub.add_parser("inspect", help="list a checkpoint's tensors (name, dtype, shape, shard, bytes)")
    i.add_argument("path", metavar="PATH", help="checkpoint folder or .safetensors file")
    i.add_argument("--allow-bin", action="store_true", help="accept PyTorch .bin weights")
    i.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files of the folder that are symbolic links to places outside it",
    )
    i.add_argument("-v", "--verbose", action="store_true", help="tracebacks")

    t = sub.add_parser("methods", help="the merge methods and their parameters (names, scopes, defaults)")
    t.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    t.add_argument("-v", "--verbose", action="store_true", help="tracebacks")

    d = sub.add_parser("demo", help="merge a tiny generated base + two fine-tunes with TIES + M³")
    d.add_argument(
        "--keep",
        metavar="DIR",
        default=None,
        help="write the demo models and output here (default: a temporary folder, removed afterwards)",
    )
    d.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    d.add_argument("-v", "--verbose", action="store_true", help="tracebacks")

    for name in ("backends", "info"):
        b = sub.add_parser(name, help="which kernel backends work here, and why not")
        b.add_argument("-v", "--verbose", action="store_true", help="tracebacks")
    for name, module in _plugins().items():
        module.add_parser(sub)
        COMMANDS[name] = module.run
        PRELOAD[name] = tuple(getattr(module, "PRELOAD", ("torch", "numpy")))
    return p


# Commands that live in their own module (one idea per file): the module defines
# ``add_parser(subparsers)`` (adds its sub-command, with a ``-v/--verbose`` flag), ``run(args) -> int``
# and optionally ``PRELOAD`` (modules imported with signals deferred). It must import nothing heavy
# (torch, numpy) at module level: the parser is built on every start.
PLUGIN_COMMANDS = {
    "stats": "m3kernels.datastats.cli",
    "search": "m3kernels.search.cli",
    "bench": "m3kernels.benchmark.cli",
    "mergekit-yaml": "m3kernels.integrations.mergekit_yaml_cli",
}


def _plugins() -> dict:
    """The plugin command modules that exist in this installation (name -> module)."""
    import importlib
    import importlib.util

    found = {}
    for name, module in PLUGIN_COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # its package is not there
            continue
        found[name] = importlib.import_module(module)
    return found


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        msg = msg[len("m3kernels: ") :] if msg.startswith("m3kernels: ") else msg
        return f"m3kernels: {record.levelname.lower()}: {msg}"


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (not the stream of the
    first call: a caller that swaps stderr, as pytest's capture does, gets the messages)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("m3kernels")
    if not any(getattr(h, "_m3k_cli", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(_Formatter())
        h._m3k_cli = True
        log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def merge_options(args) -> dict:
    """The ``merge`` options every merge of the command takes (one config or each document of a
    multi-document file), as :func:`m3kernels.merge_checkpoints` keywords."""
    return dict(
        device=args.device,
        out_shard_size=args.out_shard_size,
        seed=args.seed,
        progress=not args.quiet,
        allow_bin=args.allow_bin,
        backend=args.backend,
        strict=args.strict,
        follow_symlinks=args.follow_symlinks,
        dist_timeout=args.dist_timeout,
    )


def cmd_merge(args) -> int:
    from m3kernels.checkpoint import multi
    from m3kernels.checkpoint.run import merge_checkpoints

    if multi.is_multi_document(args.config):  # several merges in one file (mergekit-multi)
        return multi.run_cli(args)
    result = merge_checkpoints(
        args.config,
        args.out_dir,
        force=args.force,
        resume=args.resume,
        dry_run=args.dry_run,
        ranks=args.ranks,
        **merge_options(args),
    )
    import os

    if os.environ.get("RANK", "0") != "0":
        return 0  # a distributed merge: rank 0 speaks for every rank
    if args.dry_run:
        print(result.summary())
        print()
        print(result.table())
        shares = getattr(result, "rank_shares", None)
        if shares is not None:
            from m3kernels.checkpoint.distributed import balance_hint, share_table

            print(f"\n{len(shares)} processes (torchrun ranks) would share it:")
            print(share_table(result, shares))
            hint = balance_hint(result, shares)
            if hint is not None:
                print(f"note: {hint}")
        print(f"\ndry run: nothing written; {args.out_dir} would get {len(result.shards)} shard(s)")
    elif not args.quiet:
        print(result.summary())
    return 0


def inspect_text(path, allow_bin: bool = False, follow_symlinks: bool = False) -> str:
    """The ``inspect`` table for a checkpoint folder or file."""
    from m3kernels.checkpoint.safetensors_io import torch_dtype_name
    from m3kernels.checkpoint.source import Checkpoint

    ck = Checkpoint(path, role="checkpoint", allow_bin=allow_bin, follow_symlinks=follow_symlinks)
    try:
        rows = [("tensor", "dtype", "shape", "shard", "bytes")]
        total_bytes = total_params = 0
        for name in ck.names:
            meta = ck.meta(name)
            n = 1
            for d in meta.shape:
                n *= d
            total_params += n
            total_bytes += meta.nbytes
            rows.append(
                (
                    name,
                    torch_dtype_name(meta.dtype),
                    "x".join(map(str, meta.shape)) or "scalar",
                    meta.file,
                    f"{meta.nbytes:,}",
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = [
            "  ".join(v.rjust(w) if c == 4 else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        files = ck.files()
        lines.append(
            f"total: {len(ck.names)} tensors, {total_params:,} parameters, {total_bytes:,} bytes "
            f"in {len(files)} file(s)"
        )
        merged = [m for m in ck.metadata().values() if "m3kernels_merge" in m]
        if merged:
            from m3kernels.checkpoint.safetensors_io import parse_json

            raw = merged[0]["m3kernels_merge"]
            rec, why = parse_json(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else b"")
            if isinstance(rec, dict):
                ratios = rec.get("mix_ratios")
                lines.append(
                    one_line(
                        f"merged by m3kernels {rec.get('m3kernels_version')}: method "
                        f"{rec.get('merge_method')}, seed {rec.get('seed')}"
                        + (f", M³ ratios {ratios}" if ratios else "")
                    )[:500]
                )
            else:
                lines.append("m3kernels_merge metadata: unreadable (" + (why or "not a JSON object") + ")")
        if ck.config is not None:
            c = ck.config
            lines.append(
                "config.json: "
                + ", ".join(
                    f"{k}={c[k]}"
                    for k in ("model_type", "torch_dtype", "num_hidden_layers", "vocab_size")
                    if k in c
                )
            )
        return "\n".join(lines)
    finally:
        ck.close()


def cmd_inspect(args) -> int:
    print(inspect_text(args.path, args.allow_bin, args.follow_symlinks))
    return 0


def backends_text() -> str:
    import torch

    from m3kernels.backends import available_backends

    lines = []
    for name, state in available_backends().items():
        extra = ""
        if name == "cpu" and state == "available":
            from m3kernels.backends import cpu

            try:
                extra = f" (kernel variant: {cpu.simd_level()})"
            except Exception:  # an older extension without the query
                extra = ""
        lines.append(
            f"{name:7s} {'available' + extra if state == 'available' else 'not available: ' + state}"
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"torch {torch.__version__}; CUDA GPU: {gpu}")
    return "\n".join(lines)


def cmd_backends(args) -> int:
    print(backends_text())
    return 0


def methods_text(names=()) -> str:
    """Every registered method (or the named ones) with its parameters, from the registry."""
    from m3kernels.merge.registry import MERGEKIT_ONLY_METHODS, METHODS, base_role, get_method

    chosen = [get_method(n) for n in names] if names else list(METHODS.values())
    lines = []
    for m in chosen:
        alias = f" (alias {', '.join(m.aliases)})" if m.aliases else ""
        lines.append(f"{m.name}{alias}: {m.summary}")
        lo, hi = m.models
        count = f"{lo}" if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}"
        m3 = m.mixup + (f" ({m.mixup_note})" if m.mixup_note else "")
        lines.append(
            f"  base model: {base_role(m)}; models: {count}; M³: {m3}; stage A: "
            f"{'; '.join(m.stage_a) or 'none'}; reference: {m.reference}"
        )
        for q in m.params:
            default = q.default if not isinstance(q.default, bool) else str(q.default).lower()
            default = "none (unset)" if default is None else default
            where = q.scope + ("" if q.config else ", tensor API only")
            lines.append(
                f"  {q.name:10s} {where}, {q.range}, default {default}"
                f"{', gradient allowed' if q.gradient else ''}: {q.doc}"
            )
    if not names:
        lines.append(f"not implemented yet (mergekit): {', '.join(MERGEKIT_ONLY_METHODS)}")
    return "\n".join(lines)


def cmd_methods(args) -> int:
    try:
        print(methods_text(args.names))
    except ValueError as exc:
        from m3kernels.errors import M3KError

        raise M3KError(str(exc)) from None
    return 0


def cmd_demo(args) -> int:
    from m3kernels.demo import run_demo

    report = run_demo(keep=args.keep, device=args.device)
    return 0 if report["ok"] else EXIT_INTERNAL


COMMANDS = {
    "merge": cmd_merge,
    "inspect": cmd_inspect,
    "demo": cmd_demo,
    "backends": cmd_backends,
    "info": cmd_backends,
    "methods": cmd_methods,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: a clean message, the unfinished merge kept for --resume."""


# While the heavy modules (torch, numpy, the extension) are imported, a signal is only noted and
# acted on once the import is complete: an exception raised in the middle of a C extension's
# import leaves it half-initialised, and the next import of it fails ("cannot load module more
# than once per process"), which would turn a clean stop into an internal error.
_signals = {"defer": False, "pending": None}
PRELOAD = {
    "merge": ("torch", "numpy", "m3kernels.checkpoint.run", "m3kernels.backends.cpu"),
    "inspect": ("torch", "numpy", "m3kernels.checkpoint.source"),
    "demo": ("torch", "numpy", "m3kernels.checkpoint.run", "m3kernels.demo"),
    "backends": ("torch", "m3kernels.backends"),
    "info": ("torch", "m3kernels.backends"),
}


def _on_signal(signum, frame):
    import signal

    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if _signals["defer"]:
        _signals["pending"] = _signals["pending"] or exc
        return
    signal.signal(signum, signal.SIG_IGN)  # one is enough: a second must not interrupt the clean-up
    raise exc


def _install_handlers() -> dict:
    """SIGTERM and SIGINT -> Terminated / KeyboardInterrupt in the main thread; the previous
    handlers are returned (empty when main() runs outside the main thread: signals left alone)."""
    import signal

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return {}
    return previous


def _preload(command: str) -> None:
    """Import what ``command`` needs with signals deferred, then act on one that came meanwhile."""
    import importlib

    _signals["defer"], _signals["pending"] = True, None
    try:
        for name in PRELOAD.get(command, ()):
            importlib.import_module(name)
    finally:
        _signals["defer"] = False
    if _signals["pending"] is not None:
        raise _signals["pending"]


def main(argv: list | None = None) -> int:
    """Entry point of the ``m3kernels`` console script (returns the exit status).

    Every path ends in one line on stderr and an exit status: 0 done, 2 a problem the user can
    fix (M3KError, config errors included), 130 Ctrl-C, 143 SIGTERM, 1 a bug (with --verbose,
    its traceback). Ctrl-C and SIGTERM are caught from the first moment, start-up included.
    """
    import signal

    previous, command, verbose = {}, None, False
    try:
        previous = _install_handlers()
        args = _build_parser().parse_args(argv)
        command, verbose = args.command, getattr(args, "verbose", False)
        _setup_logging(verbose)
        if previous:
            from m3kernels import gc_policy

            with gc_policy.imports():
                _preload(command)
        return COMMANDS[args.command](args)
    except M3KError as exc:
        if verbose:
            traceback.print_exc()
        if not getattr(exc, "reported", False):  # a distributed merge's ranks report before they stop
            print(f"m3kernels: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        hint = " (rerun with --resume to continue)" if command == "merge" else ""
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"m3kernels: {what}{hint}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep the details one flag away
        if verbose:
            traceback.print_exc()
        print(
            f"m3kernels: internal error: {type(exc).__name__}: {one_line(exc)}"
            + ("" if verbose else " (rerun with --verbose for the traceback)"),
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def entry() -> None:
    """The process entry point (the ``m3kernels`` console script, ``python -m m3kernels``):
    :func:`main` with the garbage collector kept off the start-up and the exit
    (:mod:`m3kernels.gc_policy`; 0.2-0.4 s per run on the 2-core machine of bench/RESULTS.md).
    In-process callers of :func:`main` (tests, other tools) keep their own collector settings."""
    import os

    from m3kernels import gc_policy

    # NumPy's OpenBLAS starts a thread per core that spins after its first call, on cores our
    # kernels' OpenMP threads need; nothing here uses NumPy's BLAS (torch's is MKL), so one thread
    # unless the user chose otherwise (set before NumPy is first imported)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # OpenMP threads that wait at a barrier sleep instead of spinning: beside the writer and
    # read-ahead threads a spinning waiter takes the core the late thread needs (l13x2 TIES on
    # 2 cores: 3.5 -> 3.1 CPU-s, 3.06 -> 2.98 s; bench/RESULTS.md issue 7). Set before torch
    # loads libgomp; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with gc_policy.process_run():
        status = main()
    _exit(status)


def _exit(status: int) -> None:
    """End the process with ``status`` without the interpreter's teardown where that is safe.

    The command's work is done and on disk (every output file fsync'd and closed by then); what
    a normal exit still does is run the atexit handlers and then free every module's objects one
    by one, which costs 50-100 ms with torch loaded and does nothing for a process that ends
    (l13x2 TIES on 2 cores: 2.72 -> 2.67 s, bench/RESULTS.md issue 7). So: the atexit handlers
    (logging, torch, tqdm) run as at a normal exit, the streams are flushed, then ``os._exit``.
    A normal exit instead while another non-daemon thread is alive (Python would wait for it)
    or a torch.distributed process group is still up."""
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    dist = sys.modules.get("torch.distributed")
    if (
        run_exitfuncs is None
        or others
        or (dist is not None and dist.is_available() and dist.is_initialized())
    ):
        sys.exit(status)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing more to write
            pass
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    entry()
