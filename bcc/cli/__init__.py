"""The `bcc` command: one module per subcommand in this package, discovered at start-up.

Each module defines `register(subparsers)`, which adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit code. Modules import torch inside `run`, so `bcc --help`
stays fast.

Errors: `main` is the one place that turns a `bcc.errors.BccError` into one `error: ...` line and its
exit code (2); commands do not catch them. Anything else is a bug and keeps its traceback, and
`BCC_DEBUG=1` keeps the traceback of a `BccError` too. A rank whose collective fails because another rank
failed prints one line naming that (`bcc.errors.lost_peer_message`) and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Sequence

from rich_argparse import RichHelpFormatter

# Order in `bcc --help`; modules not listed here follow alphabetically.
_ORDER = ("synth", "pack", "train", "demo", "eval", "predict", "calibrate", "export", "compare", "cv", "report", "model", "bench")


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bcc",
        description="Distributed trainer for medical image classification: pack, stream, train, evaluate.",
        formatter_class=RichHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bcc {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    # every subcommand gets the same rich help formatting
    for choice in sub.choices.values():
        choice.formatter_class = RichHelpFormatter
    return parser


def _version() -> str:
    from bcc import __version__

    return __version__


def call(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; the one place a `BccError` becomes one `error:` line and its exit code (2).

    Used by `bcc` and by `python -m bcc.train`. Anything else is a bug and keeps its traceback;
    `BCC_DEBUG=1` keeps the traceback of a `BccError` too.
    """
    from bcc.errors import EXIT_LOST_PEER, BccError, is_debug, lost_peer_message

    try:
        return int(func(args) or 0)
    except BccError as e:
        if is_debug():
            raise
        from bcc.console import error

        error(str(e))
        return e.exit_code
    except RuntimeError as e:  # a collective that failed because another rank did: one line, not its traceback
        line = lost_peer_message(e)
        if line is None or is_debug():
            raise
        from bcc.console import error

        error(line)
        return EXIT_LOST_PEER


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and argv[1:2] not in (["-h"], ["--help"]):
        # accelerate's own options follow in accelerate's order: argparse would take them for bcc's
        from bcc.launch import accelerate_main

        return accelerate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return call(args.func, args)
