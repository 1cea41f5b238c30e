"""`accelerate launch` with the same arguments, made fit for batch jobs that get preempted.

    python launch/accelerate_launch.py [accelerate launch options] -m bcc.train --config FILE [key=value ...]

Two differences from `accelerate launch` (accelerate 1.x, torch 2.x), both needed by slurm/*.sbatch:

1. It exits with the training processes' exit code. `accelerate launch` turns every failure into 1,
   which hides the trainer's 75 ("preempted, checkpoint saved, requeue me").
2. SIGUSR1 and SIGTERM are forwarded to the training processes and the launcher keeps waiting for
   them to save and exit. Otherwise USR1 kills the launcher (the default action) and leaves the
   processes orphaned, and torchrun's agent answers TERM by killing its workers after 30 s.

Slurm already delivers a step's signals to every process of the step, so under srun the training
processes get the signal twice; the trainer's handler only sets a flag, so that is harmless.
"""

import os
import signal
import subprocess
import sys

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def forward_to_children(signum, frame):
    """Send the signal to our direct children: the training processes (or the one process)."""
    import psutil

    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def as_exit_code(returncode: int) -> int:
    """A child's return code as a shell would report it (killed by signal N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def main(argv=None) -> int:
    # torchrun's agent would handle TERM itself (kill the workers); leave TERM to forward_to_children.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward_to_children)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:  # one process (accelerate's simple launcher)
        return as_exit_code(error.returncode)
    except ChildFailedError as error:  # several processes (torchrun): the first rank that failed
        _, failure = error.get_first_failure()
        return as_exit_code(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
