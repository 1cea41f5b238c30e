"""`python -m bcc.train --config FILE [key=value ...]`, also under `accelerate launch`.

Exit codes: 0 done, 2 bad config or data, 75 preempted after saving (launchers requeue on it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults in bcc/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=0.003")


def run(args: argparse.Namespace) -> int:
    from bcc.config import ConfigError, load_config
    from bcc.console import error

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        error(str(e))
        return 2
    from bcc.checkpoint import CheckpointError
    from bcc.loop import EXIT_PREEMPTED, TrainError, fit
    from bcc.manifest import ManifestError
    from bcc.schedule import ScheduleError
    from bcc.taxonomy import TaxonomyError

    try:
        result = fit(cfg)
    except (ConfigError, TrainError, ScheduleError, ManifestError, TaxonomyError, CheckpointError) as e:
        error(str(e))
        return 2
    return EXIT_PREEMPTED if result.get("preempted") else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bcc.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
