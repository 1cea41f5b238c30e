"""The CPUs a process may run on and the threads it uses: what launchers and ranks log at start-up.

Under Slurm a task is bound to the CPUs it was given (`--cpus-per-task`, task/affinity or cgroup);
`os.cpu_count()` still reports the whole machine, so a process that sized its thread pools on it would
oversubscribe the cores it shares with the other ranks and their loader workers. `bcc runtime`
(bcc/cli/runtime.py) prints these figures for launchers.
"""

from __future__ import annotations

import os
import sys


def cpu_affinity_count() -> int:
    """Number of CPUs this process may run on (its scheduler affinity), not the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def cpus_given() -> int:
    """CPUs this task was given: Slurm's `SLURM_CPUS_PER_TASK` inside a job, else the affinity count."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else cpu_affinity_count()


def threads_per_process(processes: int, cpus: int | None = None) -> int:
    """Intra-op (torch/OpenMP) threads for each of `processes` ranks sharing `cpus` (default `cpus_given()`)."""
    cpus = cpus_given() if cpus is None else cpus
    return max(1, cpus // max(1, processes))


def cpu_report() -> str:
    """One line: `cpu_affinity=N` and, where set, the Slurm CPUs, OMP_NUM_THREADS and torch's thread count."""
    parts = [f"cpu_affinity={cpu_affinity_count()}"]
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        if name in os.environ:
            parts.append(f"{name}={os.environ[name]}")
    torch = sys.modules.get("torch")  # never import torch only to report on it
    if torch is not None:
        parts.append(f"torch_threads={torch.get_num_threads()}")
    return " ".join(parts)


def shutdown_distributed() -> None:
    """End the process group in order: every rank meets at a barrier, then each destroys its group.

    Without this each rank tears its gloo/NCCL group down at interpreter exit, in no agreed order: the
    TCP store lives in rank 0, and a rank still closing its connections after rank 0 has gone can die
    with SIGABRT (an exception thrown from a destructor), turning a finished or preempted run into a
    crash. Call it only where every rank arrives (after `fit` returned on all of them), never after an
    error that one rank alone raised.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
