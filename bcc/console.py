"""One rich Console for the whole program, silent on every rank but the main one.

Side effects (progress, tables, messages) go through `console`; call `set_main_process(False)`
on the other ranks once at start-up and they print nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console, RenderHook
from rich.markup import escape
from rich.text import Text

console = Console(stderr=False, highlight=False, soft_wrap=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # one grep-able line per error


def _env_rank() -> int:
    # torchrun/accelerate set RANK before the Accelerator exists; the trainer confirms it later
    return int(os.environ.get("RANK", "0"))


def set_main_process(is_main: bool) -> None:
    console.quiet = not is_main


def is_main_process() -> bool:
    return not console.quiet


def error(message: str) -> None:
    """A one-line error for the user (every rank prints it: errors must not be hidden)."""
    # the message is text, not markup: `pip install 'bcc[trackers]'` must print its brackets
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def note(message: str) -> None:
    """A one-line note on stderr from any rank (not an error: another line says what failed)."""
    err_console.print(f"note: {message}", markup=False, highlight=False)


def warn(message: str) -> None:
    """A one-line warning on stdout (main rank): never wrapped, so `grep warning:` in a job's log finds
    the whole line; the message is text, not markup."""
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


class _KeptNotes(RenderHook):
    """Keeps the text of every line `console` prints that starts `note:` or `warning:` (markup removed)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def process_renderables(self, renderables):
        self.lines += [r.plain for r in renderables if isinstance(r, Text) and r.plain.startswith(("note:", "warning:"))]
        return renderables


@contextlib.contextmanager
def keeping_notes() -> Iterator[list[str]]:
    """While inside, every `note:`/`warning:` line printed through `console` (`warn`, and
    `console.print("note: ...")` anywhere) or `err_console` (a rank's own warnings: /dev/shm, loader
    workers) is also appended, as plain text, in the order printed, to the list this yields: the training
    run saves its start-up notes in the run directory (`bcc.train.runlog.save_notes`). On a quiet console
    (another rank) the lines are kept too; they are printed on the main process only."""
    hook = _KeptNotes()
    console.push_render_hook(hook)
    err_console.push_render_hook(hook)
    try:
        yield hook.lines
    finally:
        err_console.pop_render_hook()
        console.pop_render_hook()


set_main_process(_env_rank() == 0)
if not sys.stdout.isatty():
    # logs in files and CI: no cursor tricks, but keep a sane width for tables
    console.width = max(console.width, 120)
