"""`bcc launch ACCELERATE_OPTIONS... -m bcc.train --config FILE KEY=VALUE...`: `accelerate launch`
that exits with the training processes' own exit code (2 after a rank's `error:` line, 75 when preempted
and saved; accelerate turns both into 1 and prints torch elastic's traceback), forwards SIGUSR1/SIGTERM
to them and waits while they save, and refuses (exit 2) a GPU launch that sees no GPU instead of
silently training on the CPU (ACCELERATE_USE_CPU=true chooses the CPU). Two CPU processes of real DDP:
`ACCELERATE_USE_CPU=true bcc launch --multi_gpu --num_processes 2 -m bcc.train --config FILE`.
See bcc.launch."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("launch", help="accelerate launch that keeps the trainer's exit code and signals",
                              description=__doc__, add_help=False)
    p.add_argument("-h", "--help", action="help", help="show this help message and exit")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="accelerate launch's options, then -m MODULE ...")
    # `bcc launch ...` goes straight to bcc.launch.accelerate_main (bcc.cli.main): this parser gives the help
