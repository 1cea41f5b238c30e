"""Preemption: SIGUSR1/SIGTERM set a flag, all ranks agree on it at a step boundary, the run saves and
exits with `EXIT_PREEMPTED` after leaving a `PREEMPTED` marker in the run directory."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from bcc.atomic import write_json
from bcc.errors import EXIT_PREEMPTED

PREEMPTED_MARKER = "PREEMPTED"  # written into the run dir with the preemption checkpoint


class PreemptionFlag:
    """SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next step boundary."""

    def __init__(self, install_handlers: bool = True) -> None:
        self.signum: int | None = None
        self.group = None
        for sig in (signal.SIGUSR1, signal.SIGTERM) if install_handlers else ():
            signal.signal(sig, self._handle)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            # the vote travels over a CPU (gloo) group: an NCCL all-reduce + .item() every step would
            # stall the GPU queue just to read one flag
            self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: all ranks must call it)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, group=self.group)
        return bool(flag.item() > 0)


def write_marker(run_dir: Path, step: int, signum: int | None) -> None:
    """Launchers that lose the exit code (torchrun reports any child failure as 1) read this file."""
    write_json(Path(run_dir) / PREEMPTED_MARKER, {"step": step, "signal": signum, "exit_code": EXIT_PREEMPTED},
               indent=None)


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
