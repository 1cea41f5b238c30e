"""`bcc train` and `python -m bcc.train --config FILE [key=value ...]` (also under `accelerate launch`).

`bcc train` runs in one process (use `accelerate launch -m bcc.train` for more).
Exit codes: 0 done, 2 bad config or data (one `error:` line), 75 preempted after saving (launchers requeue on it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults in bcc/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=0.003")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model from a config (one process)", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; user errors (BccError) propagate to `bcc.cli.call`, which reports them."""
    import os

    from bcc.train.preempt import keep_early_signals

    keep_early_signals()  # before torch is imported: a SIGUSR1 during start-up must not end the rank
    from bcc.errors import EXIT_PREEMPTED
    from bcc.runtime import shutdown_distributed
    from bcc.train.fit import train_from_config
    from bcc.train.preempt import StoppedInStartUp, say_once

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a rank of torchrun / accelerate launch: it ends with that agent
        from bcc.worker_start import end_with_parent  # (which starts ranks in sessions of their own: a killed

        end_with_parent(os.getppid())  # launcher left them training, and writing its run dir, unwatched)
    try:
        result = train_from_config(args.config, args.overrides)
    except StoppedInStartUp as e:
        say_once(e)  # one rank of the job prints it: the first that stopped
        raise
    shutdown_distributed()  # every rank got here (done or preempted): tear the group down in order
    return EXIT_PREEMPTED if result.get("preempted") else 0


def main(argv: Sequence[str] | None = None) -> int:
    from bcc.cli import BccArgumentParser, call, parse_with_overrides

    parser = BccArgumentParser(prog="python -m bcc.train", description=__doc__)
    add_arguments(parser)

    return call(run, parse_with_overrides(parser, argv))
