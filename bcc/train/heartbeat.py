"""Work done on rank 0 alone while the other ranks wait: they wait as long as rank 0 shows signs of life.

A collective (`broadcast_object_list`) fails after the process group's time-out (`train.timeout_s`)
whatever rank 0 is doing, so a start-up check that fetches remote manifests and sample indexes, or
probes remote shards with `data.retries` x `data.read_timeout_s`, made the waiting ranks report
"lost contact" while rank 0 was still at work. Here the result travels through the process group's
key-value store instead: rank 0 bumps a counter every few seconds from a small thread while it works,
then stores the result; a waiting rank blocks on the result's key and gives up only when the counter
has not moved for `timeout_s` (rank 0 stopped, hangs, or its host vanished).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

_ROUNDS = itertools.count()  # every rank runs the same sequence of rank-0 tasks: the n-th shares keys
_OK, _FAILED, _ERROR = b"ok", b"failed", b"error:"


def default_store() -> dist.Store:
    """The default process group's store (a TCPStore that torchrun's agent or rank 0 hosts)."""
    # no public accessor exists; the private one has been stable since torch 1.x
    return dist.distributed_c10d._get_default_store()


def beat_interval(timeout_s: float) -> float:
    """Seconds between two signs of life: several per `timeout_s`, at most one a second per waiting rank
    (a job of 1,000 ranks asks the store about 1,000 times a second)."""
    return max(0.05, min(1.0, timeout_s / 8))


def _lost(why: str) -> dist.DistBackendError:
    # a DistBackendError: the entry point prints it as the one lost-peer line (bcc.errors.lost_peer_message)
    return dist.DistBackendError(why)


def on_rank0(work: Callable[[], str | None], is_main: bool, timeout_s: float, what: str,
             store: dist.Store | None = None) -> str | None:
    """Run `work` on rank 0 and return its result (a message, or None) on every rank. A collective: every
    rank calls it, in the same order as every other rank's calls.

    `timeout_s` (s): how long a waiting rank waits after rank 0's last sign of life; `what` names the work
    in that rank's error. `store`: the process group's store (default: `default_store()`).
    Raises on a waiting rank `torch.distributed.DistBackendError` (a lost peer) when rank 0 gave no sign
    of life for `timeout_s` (its text says "timed out") or raised something other than a result
    (that error is rank 0's to print). On rank 0 an exception of `work` propagates.
    """
    store = default_store() if store is None else store
    key = f"bcc/rank0/{next(_ROUNDS)}"
    interval = beat_interval(timeout_s)
    if is_main:
        return _work(work, store, key, interval)
    return _wait(store, key, timeout_s, interval, what)


def _work(work: Callable[[], str | None], store: dist.Store, key: str, interval: float) -> str | None:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            try:
                store.add(f"{key}/beat", 1)
            except (RuntimeError, OSError):  # the store is gone: the waiting ranks learn it their way
                return

    thread = threading.Thread(target=beat, name="bcc-rank0-heartbeat", daemon=True)
    thread.start()
    verdict = _FAILED  # an exception of `work` (a bug, Ctrl-C) ends the wait at once, not after timeout_s
    try:
        result = work()
        verdict = _OK if result is None else _ERROR + result.encode()
        return result
    finally:
        done.set()
        thread.join()
        store.set(f"{key}/verdict", verdict)


def _wait(store: dist.Store, key: str, timeout_s: float, interval: float, what: str) -> str | None:
    last, since = -1, time.monotonic()
    while True:
        try:
            try:
                store.wait([f"{key}/verdict"], timedelta(seconds=interval))
                break
            except dist.DistStoreError:  # not yet: is rank 0 still alive?
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
    verdict = store.get(f"{key}/verdict")
    if verdict == _FAILED:
        raise _lost(f"rank 0 failed while it did {what}")
    return None if verdict == _OK else verdict[len(_ERROR):].decode()
