"""`accelerate launch` for bcc: the launcher behind `bcc launch` and launch/accelerate_launch.py
(`accelerate_main`), and the command lines `bcc demo`, `bcc compare`, `bcc cv` and tests launch with.

`accelerate_main(argv)` is `accelerate launch` with the same arguments, made fit for batch jobs that get
preempted and for users (accelerate 1.x, torch 2.x):

1. It exits with the training processes' exit code. `accelerate launch` turns every failure into 1,
   which hides the trainer's 75 ("preempted, checkpoint saved, requeue me") and 2 (a user's mistake),
   and prints torch elastic's ChildFailedError traceback under the rank's one `error:` line. Torch
   elastic's own log lines about such an end (`W... Sending process N closing signal SIGTERM`, `E...
   failed (exitcode: 75)`) are left out too (`ElasticNoise`); a rank that crashed keeps its traceback and
   its `failed (exitcode: 1)` line.
2. SIGUSR1 and SIGTERM are forwarded to the training processes and the launcher keeps waiting for
   them to save and exit. Otherwise USR1 kills the launcher (the default action) and leaves the
   processes orphaned, and torchrun's agent answers TERM by killing its workers after 30 s.
3. A launch that is not explicitly on the CPU needs a GPU. When torch sees none (a node without
   drivers, an empty CUDA_VISIBLE_DEVICES, a job that asked for no GPU) it prints one `error:` line and
   exits 2 before starting anything; accelerate would silently train on the CPU. The CPU is chosen
   with ACCELERATE_USE_CPU=true (or accelerate's own `--cpu` / `use_cpu: true` in the config file).

Slurm already delivers a step's signals to every process of the step, so under srun the training
processes get the signal twice; the trainer's handler only sets a flag, so that is harmless.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

from bcc.errors import EXIT_PREEMPTED, EXIT_USAGE, BccError


class LaunchError(BccError):
    """A launch refused before any process starts (a missing accelerate config, a GPU launch without a GPU)."""

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerate_command(processes: int, args: Sequence[str], module: str = "bcc.train") -> tuple[list[str], dict]:
    """`bcc launch` (`accelerate_main`) for `processes` local processes: GPUs when present, else CPU DDP
    (gloo). A failing rank's exit code comes back (2 for its `error:` line), without a traceback.

    On CPU, `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with
    ACCELERATE_USE_CPU=true runs real multi-process DDP over gloo.
    """
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "bcc", "launch", "--num_machines", "1",
           "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    if not has_gpu():
        env["ACCELERATE_USE_CPU"] = "true"
        if processes == 1:
            cmd.append("--cpu")
    return cmd + ["-m", module, *args], env


def run_launch(cmd: Sequence[str], env: dict) -> int:
    return subprocess.run(list(cmd), env=env).returncode


def train_run(config, args: Sequence[str], processes: int = 1) -> int:
    """Train one run (`bcc.train` with `--config config` and dotted `args`); returns the exit code.

    One process trains in this process (`bcc.train.fit`), more go through `accelerate launch`.
    Used by `bcc compare` (one run per mode) and `bcc cv` (one run per fold).
    """
    if processes == 1:
        from bcc.errors import EXIT_PREEMPTED
        from bcc.train.fit import train_from_config

        result = train_from_config(config, args)
        return EXIT_PREEMPTED if result.get("preempted") else 0
    cmd, env = accelerate_command(processes, [*(["--config", str(config)] if config else []), *args])
    return run_launch(cmd, env)


# --------------------------------------------------------------------------- the launcher


def forward_to_children(signum, frame) -> None:
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


def is_true(value: str) -> bool:
    """accelerate's reading of a boolean environment variable (str_to_bool)."""
    return value.strip().lower() in ("y", "yes", "t", "true", "on", "1")


def is_cpu_launch(args) -> bool:
    """True when the CPU was chosen explicitly: ACCELERATE_USE_CPU, --cpu or use_cpu in --config_file."""
    if is_true(os.environ.get("ACCELERATE_USE_CPU", "")) or args.cpu:
        return True
    if args.config_file:
        import yaml

        with open(args.config_file) as f:
            return bool((yaml.safe_load(f) or {}).get("use_cpu", False))
    return False


def missing_gpu_message() -> str | None:
    """Why this GPU launch cannot run, or None when torch sees a GPU."""
    import torch

    if torch.cuda.device_count() > 0:
        return None
    seen = ", ".join(
        f"{name}={os.environ[name]!r}"
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
        if name in os.environ
    )
    return (
        f"no GPU visible to this launch (torch.cuda.device_count() is 0{'; ' + seen if seen else ''}); "
        "a GPU launch does not fall back to the CPU: set ACCELERATE_USE_CPU=true to train on the CPU"
    )


BCC_EXIT_CODES = (EXIT_USAGE, EXIT_PREEMPTED)  # a rank exiting so has printed its own line


class ElasticNoise(logging.Filter):
    """Drops torch elastic's lines about ranks that said themselves why they stopped: `Sending process N
    closing signal SIGTERM` (the others ended once one exited) and `failed (exitcode: 2 or 75)` (a rank's
    `error:` line, a preemption). A rank killed by a signal or ended by a bug (exit 1, its traceback above)
    keeps its `failed (exitcode: N)` line."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging's hook
        text = str(record.msg)
        if text.startswith("Sending process"):
            return False
        return not (text.startswith("failed (exitcode") and record.args and record.args[0] in BCC_EXIT_CODES)


def accelerate_main(argv: Sequence[str] | None = None) -> int:
    """`accelerate launch ARGV` (accelerate's own options, then `-m MODULE` or a script and its
    arguments); returns the exit code of the first training process that failed, else 0. Raises
    LaunchError (the entry points print its one line, exit 2) before starting anything it refuses."""
    # torchrun's agent would handle TERM itself (kill the workers); leave TERM to forward_to_children.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward_to_children)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(ElasticNoise())
    args = launch_command_parser().parse_args(None if argv is None else list(argv))
    if args.config_file and not os.path.isfile(args.config_file):
        raise LaunchError(f"accelerate config file {args.config_file} not found")
    if not is_cpu_launch(args):
        message = missing_gpu_message()
        if message:
            raise LaunchError(message)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:  # one process (accelerate's simple launcher)
        return as_exit_code(error.returncode)
    except ChildFailedError as error:  # several processes (torchrun): the first rank that failed
        _, failure = error.get_first_failure()
        return as_exit_code(failure.exitcode)
    return 0
