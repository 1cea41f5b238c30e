"""Preemption: SIGUSR1/SIGTERM set a flag, all ranks vote on it at agreed optimizer-step boundaries, the run
saves and exits with `EXIT_PREEMPTED` after leaving a `PREEMPTED` marker in the run directory.

Before training starts (`PreemptionFlag.training_begins`) there is nothing to save: a SIGTERM then ends
the rank at once (`StoppedInStartUp`: one line for the job, `EXIT_PREEMPTED`, no marker), wherever it waits (the
start-up check's remote reads, rank 0's verdict in `bcc.train.heartbeat`), instead of being kept for a
vote that is minutes away while the launcher's SIGKILL comes in 30 s. A SIGUSR1 (Slurm's early warning)
is still kept for the first vote: there is time to train and save."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

from bcc import remote
from bcc.atomic import write_json
from bcc.errors import EXIT_PREEMPTED, Interrupted

PREEMPTED_MARKER = "PREEMPTED"  # written into the run dir with the preemption checkpoint
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_EARLY: list[int] = []  # signals that reached this process before its PreemptionFlag existed


def _keep(signum, frame) -> None:
    _EARLY.append(signum)
    if signum == signal.SIGTERM:  # as PreemptionFlag._handle: a remote read in set-up must not outlast it
        remote.request_stop()


def keep_early_signals() -> None:
    """Keep a SIGUSR1/SIGTERM that arrives before training starts, for the first vote.

    `bcc train` calls this first thing, before torch is imported: importing torch and building the run
    take seconds, and until `PreemptionFlag` installs its handlers the default action of SIGUSR1 would
    end the rank with no checkpoint and no marker (a Slurm job requeued with little time left gets its
    warning signal at once). The `PreemptionFlag` made next takes over what was kept."""
    for sig in SIGNALS:
        signal.signal(sig, _keep)


class StoppedInStartUp(Interrupted):
    """A SIGTERM before training starts: `bcc train (rank R): interrupted (SIGTERM); ...`, exit code
    `EXIT_PREEMPTED` (launchers requeue on it, as after a preemption checkpoint). One rank of the job
    says it (`say_once`): the first one stopped so, whether the signal reached every rank (Slurm's) or one
    alone (`kill PID`: the launcher then ends the others, which stop the same way and stay quiet)."""

    def __init__(self, signum: int):
        rank = os.environ.get("RANK")
        super().__init__("bcc train" + (f" (rank {rank})" if rank else ""), signum,
                         f"during start-up, before the first training step: nothing to save; exit code "
                         f"{EXIT_PREEMPTED} (launchers requeue on it)")
        self.exit_code = EXIT_PREEMPTED
        self.shared = "job"  # rank 0 says it, unless `say_once` learns who was first


STOPPED_KEY = "bcc/stopped-in-start-up"  # in the process group's store: how many ranks stopped so
STORE_WAIT_S = 5.0  # the count's bound: the launcher's SIGKILL follows its SIGTERM within 30 s


def say_once(e: StoppedInStartUp) -> None:
    """Make the first rank of the job that stopped in start-up the one that prints it (`e.shared` None),
    and every other rank quiet ("said"), rank 0 too: it was the launcher's SIGTERM that stopped them,
    once the first had exited. Before, rank 0 always said it, so a SIGTERM sent to rank 1 alone showed as
    rank 0's and rank 1 ended without a word. Without a process group to count in (a signal before it
    exists, a store that no longer answers) rank 0 says it, as before."""
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported yet: no process group either
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    from bcc.train.heartbeat import default_store

    try:
        store = default_store()
        store.set_timeout(timedelta(seconds=STORE_WAIT_S))  # this process is on its way out
        first = store.add(STOPPED_KEY, 1) == 1
    except (RuntimeError, OSError):  # torch's DistStoreError is a RuntimeError
        return
    e.shared = None if first else "said"


class PreemptionFlag:
    """SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next vote (`agreed`). Until
    `training_begins()` a SIGTERM raises `StoppedInStartUp` instead (in the main thread, where it came)."""

    def __init__(self, install_handlers: bool = True) -> None:
        self.starting = True  # before the first training step: a SIGTERM ends the rank at once
        self.signum: int | None = None  # what reached this process
        self.agreed_signum: int | None = None  # what the ranks agreed on (the largest signal number raised)
        self.group = None
        if install_handlers:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
            if _EARLY:  # kept by keep_early_signals: the vote takes the largest, as across ranks
                early = max(_EARLY)
                _EARLY.clear()
                self._handle(early, None)  # a SIGTERM: the rank ends here
        self.attach()

    def attach(self, timeout_s: float | None = None) -> None:
        """Join the vote's process group once the default group exists (collective on a non-gloo backend).
        `timeout_s` bounds its collectives like the default group's (`train.timeout_s`).

        The handlers are installed at construction, which `fit` does before anything else, so a signal
        that arrives during set-up is kept (the default action of SIGUSR1 would kill the rank)."""
        import torch

        dist = torch.distributed
        if self.group is None and dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            # the vote travels over a CPU (gloo) group: an NCCL all-reduce + .item() would stall the GPU
            # queue just to read one flag
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def training_begins(self) -> None:
        """From now on a SIGTERM is kept for the vote: there is work to save."""
        self.starting = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGTERM:  # the end is near: a stalled remote read must not outlast it
            remote.request_stop()
            _forward_to_loader_workers(signum)
            if self.starting:  # once: a second SIGTERM (Slurm's and the launcher's) must not raise again while the
                self.starting = False  # first unwinds and is printed; it is only kept, like any after start-up
                raise StoppedInStartUp(signum)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: all ranks must call it at the same
        point). The signal numbers are all-reduced with MAX, so every rank, rank 0 included, also learns
        which signal it was (`agreed_signum`) even when it reached another rank only."""
        import torch

        vote = torch.tensor([self.signum or 0], dtype=torch.int32)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        signum = int(vote.item())
        if signum:
            self.agreed_signum = signum
        return signum > 0


def _forward_to_loader_workers(signum: int) -> None:
    """Pass a SIGTERM on to this rank's loader workers (its multiprocessing children), which read the
    shards. Slurm signals every process of a job step, but a SIGTERM sent to the rank alone (a launcher
    passing it on, `kill PID`, a container runtime) never reached them: a worker stalled on a silent
    `pipe:` read went on retrying for minutes. A worker's handler (`bcc.stream._defer_term`) stops its
    remote reads and gives itself a grace period, so the rank can still save at its next vote."""
    import multiprocessing
    import os

    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except (ProcessLookupError, TypeError):  # ended meanwhile; not started (pid None)
            pass


def is_vote_step(step: int, every: int) -> bool:
    """Whether the ranks vote after optimizer step `step`. A pure function of the step: every rank, and a
    resumed run, votes at the same steps, and only at accumulation boundaries (steps count windows)."""
    return step % every == 0


def write_marker(run_dir: Path, step: int, signum: int | None) -> None:
    """Launchers that lose the exit code (torchrun reports any child failure as 1) read this file."""
    write_json(Path(run_dir) / PREEMPTED_MARKER, {"step": step, "signal": signum, "exit_code": EXIT_PREEMPTED},
               indent=None)


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
