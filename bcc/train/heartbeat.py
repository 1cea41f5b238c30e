"""Work done on rank 0 alone while the other ranks wait: they wait as long as rank 0's work moves on.

A collective (`broadcast_object_list`) fails after the process group's time-out (`train.timeout_s`)
whatever rank 0 is doing, so a start-up check that fetches remote manifests and sample indexes, or
probes remote shards with `data.retries` x `data.read_timeout_s`, made the waiting ranks report
"lost contact" while rank 0 was still at work. Here the result travels through the process group's
key-value store instead: a small thread on rank 0 bumps a counter (a beat) whenever it sees the work
move on, then rank 0 stores the result; a waiting rank polls for the result (`store.check`, which logs
nothing, unlike a `store.wait` that times out) and gives up when the counter has not moved for
`timeout_s` (rank 0 stopped, its host vanished, or its work hangs).

The work moves on (looked at every `beat_interval`) when the working thread's stack changed (Python code
runs: another function, another line), `bcc.activity` ticked (a remote request answered, bytes received,
a local shard stat'ed), or a wait with a bound of its own is in flight (a remote read within its
`data.read_timeout_s`, a retry's back-off): a remote read that is slow, or silent within its time-out,
is work, not a hang. A hang is what has no bound: a name lookup that never answers, a file system that
stopped answering (`os.stat` waits in the kernel), a lock never released, a C call that never returns.
After `timeout_s` without progress (less two beat intervals, so that its word arrives before the waiting
ranks' own time-out) rank 0 stores an error naming where its work stood, which every rank raises
(`StuckError`, printed once, by rank 0), and ends its work: SIGALRM raises it in the working thread (the
main thread; the signal also interrupts a blocking call), and when that thread does not come back
within `STUCK_GRACE_S` (a call the kernel does not interrupt) rank 0 prints the error and exits.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from bcc import activity
from bcc.errors import BccError, Interrupted

_ROUNDS = itertools.count()  # every rank runs the same sequence of rank-0 tasks: the n-th shares keys
_OK, _FAILED, _STOPPED, _ERROR = b"ok", b"failed", b"stopped", b"error:"
STUCK_GRACE_S = 10.0  # how long a stuck rank 0 waits for its working thread to come back, then exits


class StuckError(BccError):
    """Rank 0's work made no progress for `train.timeout_s`: every rank raises it, rank 0 prints it."""

    shared = "job"


def default_store() -> dist.Store:
    """The default process group's store (a TCPStore that torchrun's agent or rank 0 hosts)."""
    # no public accessor exists; the private one has been stable since torch 1.x
    return dist.distributed_c10d._get_default_store()


def beat_interval(timeout_s: float) -> float:
    """Seconds between two looks at the work (and beats): several per `timeout_s`, at most one a second per
    waiting rank (a job of 1,000 ranks asks the store about 1,000 times a second)."""
    return max(0.05, min(1.0, timeout_s / 8))


def _lost(why: str) -> dist.DistBackendError:
    # a DistBackendError: the entry point prints it as the one lost-peer line (bcc.errors.lost_peer_message)
    return dist.DistBackendError(why)


def on_rank0(work: Callable[[], str | None], is_main: bool, timeout_s: float, what: str,
             store: dist.Store | None = None) -> str | None:
    """Run `work` on rank 0 and return its result (a message, or None) on every rank. A collective: every
    rank calls it, in the same order as every other rank's calls.

    `timeout_s` (s): how long the work may go without progress (see the module docstring), and how long a
    waiting rank waits after rank 0's last beat; `what` names the work in the errors. `store`: the
    process group's store (default: `default_store()`).
    Returns on every rank, when rank 0's work hung, the StuckError's message (rank 0's work was ended by
    it: when `work` lets it out rather than returning it, on rank 0 it raises). Raises on a waiting rank
    `torch.distributed.DistBackendError` (a lost peer) when rank 0 gave no beat for `timeout_s` (its text
    says "timed out") or raised something other than a result (that error is rank 0's to print). On rank
    0 an exception of `work` propagates.
    """
    store = default_store() if store is None else store
    key = f"bcc/rank0/{next(_ROUNDS)}"
    if is_main:
        return _work(work, store, key, timeout_s, what)
    return _wait(store, key, timeout_s, beat_interval(timeout_s), what)


def _stack(ident: int) -> tuple:
    """Where thread `ident` stands: (code, last instruction) of each frame of its stack."""
    frame, where = sys._current_frames().get(ident), []
    while frame is not None:
        where.append((id(frame.f_code), frame.f_lasti))
        frame = frame.f_back
    return tuple(where)


def _stuck_at(ident: int) -> str:
    """The innermost frame of bcc's own code in thread `ident` (else the innermost): `function (file:line)`."""
    frame = inner = sys._current_frames().get(ident)
    package = Path(__file__).resolve().parents[1]  # bcc/
    while frame is not None and package not in Path(frame.f_code.co_filename).resolve().parents:
        frame = frame.f_back
    frame = frame or inner
    if frame is None:
        return "an unknown place"
    path = Path(frame.f_code.co_filename).resolve()
    shown = path.relative_to(package.parent) if package in path.parents else path.name
    return f"{frame.f_code.co_name} ({shown}:{frame.f_lineno})"


def _work(work: Callable[[], str | None], store: dist.Store, key: str, timeout_s: float, what: str) -> str | None:
    interval, ident = beat_interval(timeout_s), threading.get_ident()
    done, running, stuck = threading.Event(), [True], []
    in_main = threading.current_thread() is threading.main_thread()

    def end_work(signum, frame) -> None:  # SIGALRM from `watch`, in the working (main) thread
        if running[0] and stuck:
            raise StuckError(stuck[0])

    def watch() -> None:
        seen, since = None, time.monotonic()
        while not done.wait(interval):
            ticks, waiting, overdue = activity.snapshot()
            now, state = time.monotonic(), (ticks, _stack(ident))
            if state != seen or waiting:
                seen, since = state, now
                try:
                    store.add(f"{key}/beat", 1)
                except (RuntimeError, OSError):  # the store is gone: the waiting ranks learn it their way
                    return
            elif now - since >= timeout_s - 2 * interval:
                where = f"a read of {overdue[0]} outlived its time-out" if overdue else f"stuck in {_stuck_at(ident)}"
                stuck.append(f"rank 0 made no progress for {timeout_s:g} s (train.timeout_s) while it did {what}: "
                             f"{where} (a server, name lookup or file system that stopped answering?)")
                try:
                    store.set(f"{key}/verdict", _ERROR + stuck[0].encode())
                except (RuntimeError, OSError):
                    pass
                if in_main:
                    signal.pthread_kill(ident, signal.SIGALRM)
                    if not done.wait(STUCK_GRACE_S):  # a call the signal does not interrupt
                        _exit_stuck(stuck[0])
                return

    previous = signal.signal(signal.SIGALRM, end_work) if in_main else None
    thread = threading.Thread(target=watch, name="bcc-rank0-heartbeat", daemon=True)
    thread.start()
    verdict = _FAILED  # an exception of `work` (a bug) ends the wait at once, not after timeout_s
    try:
        result = work()
        result = stuck[0] if stuck else result  # what the waiting ranks were told
        verdict = _OK if result is None else _ERROR + result.encode()
        return result
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C, a SIGTERM during start-up
        verdict = _STOPPED
        raise
    finally:
        running[0] = False
        done.set()
        thread.join()
        if in_main and previous is not None:  # None: a handler set outside Python, left as it was
            signal.signal(signal.SIGALRM, previous)  # a SIGALRM still pending runs `end_work` first: a no-op
        if not stuck or verdict != _FAILED:  # a StuckError let out: its verdict is stored
            store.set(f"{key}/verdict", verdict)


def _exit_stuck(message: str) -> None:
    from bcc.console import error

    error(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(StuckError.exit_code)


def _wait(store: dist.Store, key: str, timeout_s: float, interval: float, what: str) -> str | None:
    last, since = -1, time.monotonic()
    while True:
        try:
            if store.check([f"{key}/verdict"]):
                verdict = store.get(f"{key}/verdict")
                break
            beats = store.add(f"{key}/beat", 0)
        except (RuntimeError, OSError) as e:  # a closed connection, or a store that no longer answers
            raise _lost(f"the store rank 0 reports to failed while rank 0 did {what}: "
                        f"{type(e).__name__}: {str(e).strip()[:120]}") from e
        now = time.monotonic()
        if beats != last:
            last, since = beats, now
        elif now - since >= timeout_s:
            raise _lost(f"rank 0 gave no sign of life for {timeout_s:g} s (train.timeout_s) while it did {what}; "
                        "timed out")
        time.sleep(interval)  # a SIGTERM during start-up raises here (bcc.train.preempt)
    if verdict in (_FAILED, _STOPPED):
        raise _lost(f"rank 0 {'failed' if verdict == _FAILED else 'was stopped by a signal'} while it did {what}")
    return None if verdict == _OK else verdict[len(_ERROR):].decode()
