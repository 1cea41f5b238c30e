"""One base class for every error bcc raises for the user, and the one place that turns it into a line.

A `BccError` is a user's mistake or an environment problem (bad config key, missing shard, corrupt
image, full disk): the entry points (`bcc ...`, `python -m bcc.train`) catch it in one place, print one
`error: ...` line that names the file, key or shard, and exit with `EXIT_USAGE` (2). Anything else is a
bug and keeps its traceback. `BCC_DEBUG=1` shows the traceback of a `BccError` too.

One exception that is not a bug of this process: a collective (gloo/NCCL) that fails because another rank
died or stopped (`lost_peer_message`). The survivors print one line pointing at the failed rank's error
and exit with `EXIT_LOST_PEER` (1) instead of a page of traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from collections.abc import Callable, Iterator

EXIT_USAGE = 2  # bad config, data or arguments (argparse uses 2 as well)
EXIT_LOST_PEER = 1  # this rank's collective failed because another rank failed (its own error says why)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGUSR1/SIGTERM; launchers requeue on this code
# a command stopped by SIGINT/SIGTERM without saving (`Interrupted`) exits with 128 + the signal: 130, 143


class BccError(Exception):
    """Base of every exception bcc defines. The message is shown to the user as it is, on one line."""

    exit_code: int = EXIT_USAGE
    # Which ranks of a launch raise this same error (`quiet_on_this_rank`): None, only this one (it prints
    # it); "node", every rank reading the same files as rank 0 (a config or manifest error: rank 0's
    # machine prints it once, another machine's local rank 0 once); "job", every rank (a verdict rank 0
    # broadcast: rank 0 prints it for the job); "said", every rank but one that printed it already (the
    # first rank stopped by a signal in start-up: `bcc.train.preempt.say_once`), rank 0 included. A quiet
    # rank waits for the launcher to end it; one that is not ended prints a "node" error after all
    # (`bcc.cli.call`): it was its own.
    shared: str | None = None


@contextlib.contextmanager
def raised_alike(ranks: str = "node") -> Iterator[None]:
    """Mark a BccError raised inside, unless it says otherwise, as one every rank raises alike (`shared`):
    for code that reads only what every rank reads (the config, a manifest, a checkpoint). Should a rank
    raise it alone after all, it still prints it (`bcc.cli.call` waits for the launcher first)."""
    try:
        yield
    except BccError as e:
        if e.shared is None:
            e.shared = ranks
        raise


def quiet_on_this_rank(e: BccError) -> bool:
    """True when rank 0 of this launch (or of this machine) prints `e`, so this rank should not repeat it.

    Reads torchrun's RANK / LOCAL_RANK (unset outside a launch: rank 0, never quiet)."""
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return e.shared == "said" or rank != 0 and (e.shared == "job" or (e.shared == "node" and local != 0))


class UsageError(BccError):
    """A command line whose options contradict each other or are out of range, found after argparse."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BccError):
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM (kill, Slurm's scancel) once it has cleaned up:
    one line `COMMAND: interrupted (SIGTERM); DETAIL`, and exit code 128 + the signal's number (130,
    143), what a shell reports for a process the signal ended. Training does not use it: its signals
    save a checkpoint and exit with `EXIT_PREEMPTED` (`bcc.train.preempt`)."""

    def __init__(self, command: str, signum: int, detail: str = ""):
        self.command, self.signum, self.exit_code = command, signum, 128 + signum
        super().__init__(f"{command}: interrupted ({signal.Signals(signum).name})" + (f"; {detail}" if detail else ""))


@contextlib.contextmanager
def interrupts_raise(command: str, detail: str | Callable[[], str] = "") -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise `Interrupted(command, signum, detail)` in the main thread
    (`detail`: text, or a function giving it when the signal comes), so the command's own clean-up
    (`finally`, `except BaseException`) runs and `bcc.cli.call` prints one line instead of a
    KeyboardInterrupt traceback (SIGINT) or nothing at all (SIGTERM's default: the process ended where
    it stood, its temporary files left behind). A signal this process ignores (SIGINT in a shell
    script's background job) stays ignored. The old handlers are back after."""

    def handler(signum, frame):
        raise Interrupted(command, signum, detail() if callable(detail) else detail)

    saved = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def is_debug() -> bool:
    """True when `BCC_DEBUG=1`: user errors then keep their traceback."""
    return os.environ.get("BCC_DEBUG", "") not in ("", "0")


_DIST_BACKEND = re.compile(r"\b(gloo|nccl)\b", re.I)
_TIMED_OUT = re.compile(r"tim(ed|ing) out|\btimeout\b", re.I)
_LOST = re.compile(r"connection (closed|reset|refused)|tim(ed|ing) out|broken pipe|peer", re.I)
# gloo's own words when a pair's time-out ends it; the message names neither gloo nor a connection
_GLOO_PAIR = re.compile(r"timeout caused pair closure", re.I)


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report errno


def storage_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` when it is a full disk, a quota, a file-size limit or a read-only mount:
    `e` itself, one in its chain (torch.save re-raises ENOSPC as a RuntimeError as it closes), or an
    error whose text carries "(os error N)" (safetensors' SafetensorError); None for anything else."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return e
        found = _OS_ERROR_IN_TEXT.search(str(e))
        if found and int(found.group(1)) in _STORAGE_ERRNOS:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


_STORE_ERRORS = ("DistStoreError", "DistNetworkError")  # torch's: the store the ranks meet at (rendezvous)


def lost_peer_message(e: BaseException) -> str | None:
    """The one line for a distributed error raised because another rank failed (torch's DistBackendError,
    a RuntimeError naming gloo/NCCL and a closed connection or a time-out, or gloo's "Application timeout
    caused pair closure"), or because the store the ranks meet at could not be reached or did not answer
    (DistStoreError, DistNetworkError: also before the process group exists); None for anything else."""
    text = str(e).strip()
    store = any(c.__name__ in _STORE_ERRORS for c in type(e).__mro__)
    if not isinstance(e, RuntimeError) or not (store or type(e).__name__ == "DistBackendError"
                                               or _GLOO_PAIR.search(text)
                                               or _DIST_BACKEND.search(text) and _LOST.search(text)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")  # gloo's "[.../pair.cc:561] "
    first = first if len(first) <= 160 else first[:157] + "..."
    why = ("the store the ranks meet at (MASTER_ADDR:MASTER_PORT "
           f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}) could not be reached or did "
           "not answer: rank 0 or the launcher failed or stopped (see its error above), or the address is wrong"
           if store else "another rank failed or stopped: see its error above")
    return f"rank {os.environ.get('RANK', '?')}: lost contact with the other ranks ({why}; {type(e).__name__}: {first})"


def is_time_out(line: str) -> bool:
    """True when a lost-peer line tells of a time-out (this rank's own finding: a peer hangs), not of a
    connection a peer that exited closed."""
    return bool(_TIMED_OUT.search(line))
