"""`bcc compare --config FILE --modes frozen,staged,full [--out DIR] [--processes N] [key=value ...]`:
train each fine-tuning preset (`finetune.preset`: frozen, staged, full) on the same shards, seed and epoch budget (one run directory per mode under
--out; finished modes are skipped, interrupted ones resume), then write RESULTS.md, results.csv and
val_curves.png. `bcc compare --aggregate OUT` only builds the table from existing run directories
(after an sbatch array job, for example)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="frozen vs staged vs full fine-tuning, one table",
                              description=__doc__)
    p.add_argument("--config", "-c", help="training config (YAML); the modes differ only in finetune.preset")
    p.add_argument("--modes", default="frozen,staged,full", help="finetune presets to compare, comma-separated (default: frozen,staged,full)")
    p.add_argument("--out", default="runs/compare", help="one run directory per mode goes here (default: runs/compare)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes per run: 1 trains in this process, more use accelerate launch")
    p.add_argument("--aggregate", metavar="OUT", help="only aggregate the finished run directories under OUT")
    p.add_argument("--bench-steps", type=int, default=5,
                   help="timed bcc train steps per preset for the frozen/full step-time ratio (0: skip)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides for every mode")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from bcc.compare import aggregate, compare, load_bench
    from bcc.console import console, error
    from bcc.errors import BccError

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    command = "bcc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if args.aggregate:
            out = args.aggregate
            aggregate(out, modes, load_bench(out), command)
        else:
            out = args.out
            compare(args.config, modes, out, args.processes, args.overrides, command, args.bench_steps)
    except BccError as e:  # CompareError, ConfigError, FinetuneError, TrainError, ...
        error(str(e))
        return 2
    from pathlib import Path

    console.print(Path(out, "RESULTS.md").read_text())
    return 0
