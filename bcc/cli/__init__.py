"""The `bcc` command: one module per subcommand in this package, discovered at start-up.

Each module defines `register(subparsers)`, which adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit code. Modules import torch inside `run`, so `bcc --help`
stays fast.

Usage errors (an unknown option, a bad value) are one line too, `error: bcc pack: argument --folds: ...
(bcc pack --help for usage)`, exit 2, from every subcommand's parser (`BccArgumentParser`); `--help` is
argparse's own.

Errors: `main` is the one place that turns a `bcc.errors.BccError` into one `error: ...` line and its
exit code (2); commands do not catch them. Anything else is a bug and keeps its traceback, and
`BCC_DEBUG=1` keeps the traceback of a `BccError` too. A rank whose collective fails because another rank
failed prints one line naming that (`bcc.errors.lost_peer_message`) and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
from collections.abc import Callable, Sequence

from rich_argparse import RichHelpFormatter

# Order in `bcc --help`; modules not listed here follow alphabetically.
_ORDER = ("synth", "pack", "train", "demo", "eval", "predict", "calibrate", "export", "compare", "cv", "report", "model", "bench", "launch", "runtime")


class BccArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one `error:` line naming the command (exit 2), like
    every other bad input, instead of the usage block; subparsers it creates are of this class too."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        import sys

        from bcc.errors import EXIT_USAGE

        sys.stderr.write(f"error: {self.prog}: {message} ({self.prog} --help for usage)\n")
        sys.exit(EXIT_USAGE)


WEIGHT_CHOICES = ("auto", "raw", "ema")  # bcc.export.WEIGHT_CHOICES, spelled here so `bcc --help` skips torch


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    """`--weights auto|raw|ema` of `bcc export`, `bcc eval` and `bcc predict`: one meaning and default,
    decided by `bcc.export.choose_weights`."""
    parser.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                        help="raw weights, or the EMA ones (model_ema.safetensors) with the temperatures and "
                             "operating point fitted on them; auto (default): EMA when the checkpoint has them")


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = BccArgumentParser(
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
    _tag_commands(parser)
    return parser


def _tag_commands(parser: argparse.ArgumentParser) -> None:
    """Record in every (sub)command's defaults its parser, so that `main` names the innermost command
    (`bcc bench data`, not `bcc`) in an error about arguments left over."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                _tag_commands(choice)


def _version() -> str:
    from bcc import __version__

    return __version__


QUIET_WAIT_S = 10.0  # how long a quiet rank waits for the launcher to end it (see `call`)


def _ended_by_launcher(timeout_s: float) -> bool:
    """Wait up to `timeout_s` seconds for a SIGTERM (a launcher ending this rank because another exited);
    True when one came, or had come before (the trainer keeps one that arrives during its set-up:
    `bcc.remote.is_stopping`). The handler is this function's only while it waits."""
    import time

    from bcc.remote import is_stopping

    if is_stopping():
        return True
    came: list[int] = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: came.append(signum))
    except ValueError:  # not the main thread: no handler, only the wait
        time.sleep(min(timeout_s, 2.0))
        return False
    try:
        deadline = time.monotonic() + timeout_s
        while not came and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return bool(came)


def _interrupted(command: str) -> int:
    """One line for a Ctrl-C (`COMMAND: interrupted (SIGINT)`, not a KeyboardInterrupt traceback) and
    130, the exit code a shell reports for it. Every output bcc writes is atomic: nothing is half written."""
    from bcc.console import error
    from bcc.errors import Interrupted

    stopped = Interrupted(command, signal.SIGINT)
    error(str(stopped))
    return stopped.exit_code


def call(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; the one place a `BccError` becomes one `error:` line and its exit code (2).

    Used by `bcc` and by `python -m bcc.train`. A full disk, quota or read-only mount anywhere is one
    line too (`bcc.errors.storage_error`), and so is a collective lost to another rank's failure.
    Anything else is a bug and keeps its traceback; `BCC_DEBUG=1` keeps the traceback of these too.
    """
    from bcc import errors
    from bcc.errors import EXIT_LOST_PEER, EXIT_USAGE, BccError, is_debug, lost_peer_message, storage_error

    try:
        return int(func(args) or 0)
    except BccError as e:
        if is_debug():
            raise
        from bcc.console import error
        from bcc.errors import quiet_on_this_rank

        # rank 0 prints an error every rank raises alike. A quiet rank waits for the launcher's SIGTERM (torch
        # elastic ends the others once a rank has exited): leaving at once could take rank 0 down before it
        # has printed. A "node" error no SIGTERM follows was this rank's alone after all: it prints it
        if quiet_on_this_rank(e) and (_ended_by_launcher(QUIET_WAIT_S) or e.shared in ("job", "said")):
            return e.exit_code
        error(str(e))
        return e.exit_code
    except Exception as e:
        full = storage_error(e)
        line = lost_peer_message(e) if full is None else None
        if full is None and line is None or is_debug():
            raise
        from bcc.console import error, note

        if full is not None:  # a full disk, quota or read-only mount: the user's to fix, not a bug
            where = f"cannot write {full.filename}: " if full.filename else "cannot write: "
            error(f"{where}{full.strerror or full}")
            return EXIT_USAGE
        # a collective that failed because another rank did: one line, not its traceback. A time-out is
        # this rank's own finding (a peer hangs); a closed connection follows a peer that exited, whose own
        # error line (or the launcher's exit code) says why: a note, so the job shows one error line
        (error if errors.is_time_out(line) else note)(line)
        return EXIT_LOST_PEER
    except KeyboardInterrupt:  # Ctrl-C where no command's own handler took it
        if is_debug():
            raise
        return _interrupted(f"bcc {getattr(args, 'command', None) or 'train'}")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that KEY=VALUE overrides may sit on both sides of an option
    (`bcc train a.b=1 --config F c.d=2`): argparse takes only the first run of positionals, so the
    later ones arrive as extras; they join the command's `overrides` in command-line order."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        later = [e for e in extra if "=" in e and not e.startswith("-")]
        args.overrides = [*args.overrides, *later]
        extra = [e for e in extra if e not in later]
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while the parser imports the commands, before `call`
        from bcc.errors import is_debug

        if is_debug():
            raise
        return _interrupted("bcc")


def _main(argv: Sequence[str] | None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and argv[1:2] not in (["-h"], ["--help"]):
        # accelerate's own options follow in accelerate's order: argparse would take them for bcc's
        from bcc.launch import accelerate_main

        return call(lambda _: accelerate_main(argv[1:]), argparse.Namespace(command="launch"))
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return call(args.func, args)
