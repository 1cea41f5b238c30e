"""`bcc runtime [--threads-per-process N]`: the CPUs this process may run on and the threads each rank
gets from them (`bcc.runtime`). Launchers call it: launch/train.sh exports `OMP_NUM_THREADS` from
`--threads-per-process` and logs the report in its `launch:` line."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("runtime", help="print the CPUs this process may use (a launcher helper)",
                              description=__doc__)
    p.add_argument("--threads-per-process", type=int, metavar="N", default=None,
                   help="print the intra-op threads for each of N ranks sharing this task's CPUs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.errors import UsageError
    from bcc.runtime import cpu_report, threads_per_process

    if args.threads_per_process is None:
        print(cpu_report())
    elif args.threads_per_process < 1:
        raise UsageError(f"bcc runtime: --threads-per-process must be >= 1, got {args.threads_per_process}")
    else:
        print(threads_per_process(args.threads_per_process))
    return 0
