"""Loader workers that hang while they are forked: found and started again (`start_workers`).

CPython before 3.12 can deadlock a child in `os.fork()` itself: `PyOS_AfterFork_Child` takes the
runtime's thread-state lock (HEAD_LOCK) before re-initialising it, so when another thread of the parent
held that lock at the moment of the fork, the child waits forever (python/cpython#112275, fixed in 3.12).
A training rank has such threads: gloo's background threads create and drop Python thread states while
collectives complete. The DataLoader forks its workers from that rank; about one fork in a few thousand
hung here (2-core VM, Python 3.11.7), and a hung worker is alive, so the DataLoader waits for its batch
forever: a whole DDP job stalls with no error (seen in CI: the demo and an uneven-shards test).

Every worker marks itself started in its `worker_init_fn` (`mark_started`), the first thing a worker
runs after the fork returns. `start_workers` starts an iteration of the loader and, when it forked new
workers, waits until all of them are marked (normally milliseconds); a worker that is still unmarked
after `WORKER_START_S` seconds is killed, the others are shut down, and the iteration starts again (no
batch has been taken yet, so the batches are the same). After `START_ATTEMPTS` failed starts it raises.
"""

from __future__ import annotations

import time
from multiprocessing.sharedctypes import RawArray
from typing import TYPE_CHECKING

from bcc.console import err_console
from bcc.errors import BccError

if TYPE_CHECKING:  # torch is imported where it is used: `bcc pack`'s pool workers call end_with_parent
    from torch.utils.data import DataLoader  # and must not pay torch's import (~1 s CPU, ~650 MiB RSS each)

WORKER_START_S = 60.0  # a forked worker that has not run its worker_init_fn by then is stuck in the fork
START_ATTEMPTS = 3
POLL_S = 0.005


class WorkerStartError(BccError):
    """Loader workers that did not start in START_ATTEMPTS tries."""


def start_flags(workers: int):
    """Shared flags, one per worker, set by `mark_started` in the (forked) worker."""
    return RawArray("b", workers) if workers else None


def end_with_parent(parent: int | None = None) -> None:
    """In a forked worker: be killed when the process that forked it dies (Linux `prctl(PR_SET_PDEATHSIG,
    SIGKILL)`; a no-op elsewhere). Without it a killed `bcc pack` or training rank left its workers
    waiting (a pack's pool) or retrying a shard (a loader) for minutes. `parent`: its pid at the fork,
    checked after the call (a parent already gone means exit now)."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def mark_started(worker_id: int) -> None:
    """Call first in the loader's worker_init_fn: this worker got out of the fork (and ends with its rank)."""
    from torch.utils.data import get_worker_info

    end_with_parent()
    info = get_worker_info()  # None outside a loader worker: nothing to mark
    flags = getattr(info.dataset, "started", None) if info is not None else None
    if flags is not None:
        flags[worker_id] = 1


def start_workers(loader: DataLoader, flags, what: str = "", shutdown=None):
    """`iter(loader)`, checked: when this starts new worker processes, every one of them must reach its
    worker_init_fn within WORKER_START_S; stuck ones are killed and the start repeated. `shutdown(it)`
    ends a failed iterator's other workers. Raises WorkerStartError after START_ATTEMPTS tries."""
    for attempt in range(1, START_ATTEMPTS + 1):
        fresh = flags is not None and (not loader.persistent_workers or loader._iterator is None)
        if fresh:
            flags[:] = bytes(len(flags))
        batches = iter(loader)
        if not fresh:
            return batches
        deadline = time.monotonic() + WORKER_START_S
        while not all(flags) and time.monotonic() < deadline:
            if any(not w.is_alive() for w in batches._workers):
                return batches  # a worker that died: the DataLoader itself reports that
            time.sleep(POLL_S)
        if all(flags):
            return batches
        stuck = [i for i in range(len(flags)) if not flags[i]]
        _kill(batches, stuck)
        if shutdown is not None:
            shutdown(batches)
        err_console.print(f"[yellow]warning:[/] loader worker(s) {stuck} of {what or 'a loader'} did not start "
                          f"within {WORKER_START_S:.0f} s (a child stuck in fork: python/cpython#112275); "
                          f"started again (attempt {attempt + 1} of {START_ATTEMPTS})", soft_wrap=True)
    raise WorkerStartError(f"loader workers of {what or 'a loader'} did not start in {START_ATTEMPTS} tries "
                           f"of {WORKER_START_S:.0f} s each; set data.workers=0 or use Python >= 3.12")


def _kill(batches, stuck: list[int]) -> None:
    """SIGKILL the stuck workers, first telling torch's SIGCHLD handler they are no longer its business
    (it would raise "DataLoader worker ... killed" in the main thread)."""
    from torch.utils.data._utils import signal_handling

    if getattr(batches, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for i in stuck:
        batches._workers[i].kill()
        batches._workers[i].join(timeout=10)
