"""`bcc cv --config FILE --folds K [--out DIR] [--processes N] [key=value ...]`: k-fold
cross-validation on a pack made with `bcc pack --folds K`. Fold k trains on the other folds of
train+val and validates on fold k (`data.fold=k`, one run directory per fold, OUT/fold-<k>; finished
folds are skipped, interrupted ones resume); then every train+val sample is predicted by the fold
model that did not train on it (OUT/oof_predictions.csv), and OUT/CV.md and OUT/cv_summary.json give
mean +- sd of the val and test metrics over the folds. `bcc cv --aggregate OUT --folds K` only
aggregates existing fold runs (after an sbatch array job, for example)."""

from __future__ import annotations

import argparse

from bcc.cli._types import fold_count, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("cv", help="k-fold cross-validation: one run per fold, mean +- sd, out-of-fold predictions",
                              description=__doc__)
    p.add_argument("--config", "-c", help="training config (YAML); its data.shards must be packed with --folds K")
    p.add_argument("--folds", type=fold_count, required=True, metavar="K", help="number of folds of the pack")
    p.add_argument("--out", help="one run directory per fold goes here (default: the config's run.dir)")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="processes per fold run: 1 trains in this process, more use accelerate launch")
    p.add_argument("--aggregate", metavar="OUT", help="only aggregate the finished fold runs under OUT")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides for every fold")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from pathlib import Path

    from bcc.console import console
    from bcc.cv import aggregate, cross_validate

    command = "bcc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.aggregate:
        out = Path(args.aggregate)
        aggregate(out, args.folds, command)
    else:
        summary = cross_validate(args.config, args.folds, args.out, args.processes, args.overrides, command)
        out = Path(summary["out"])
    console.print((out / "CV.md").read_text())
    return 0
