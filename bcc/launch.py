"""Command lines for `accelerate launch` of `bcc.train` (used by `bcc demo`, `bcc compare` and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerate_command(processes: int, args: Sequence[str], module: str = "bcc.train") -> tuple[list[str], dict]:
    """`accelerate launch` for `processes` local processes: GPUs when present, else CPU DDP (gloo).

    On CPU, `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with
    ACCELERATE_USE_CPU=true runs real multi-process DDP over gloo.
    """
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
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
