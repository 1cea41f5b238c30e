"""`bcc eval`: metrics, predictions, confusion matrix and reliability diagram of a checkpoint on a packed
split or an image folder. One process here; for more, `accelerate launch -m bcc eval` with the same
arguments (each sample is counted once across the processes)."""

from __future__ import annotations

import argparse

from bcc.cli import add_weights_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", required=True, metavar="RUN|CKPT|EXPORT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir, best/last link, a `bcc export` "
                        "folder or hf-hub:OWNER/NAME (optionally @REVISION)")
    p.add_argument("--data", "-d", required=True, metavar="PATH",
                   help="packed dataset (dir with manifest.json) or image folder of class folders")
    p.add_argument("--split", default="test", help="split of a packed dataset (default: test)")
    p.add_argument("--out", "-o", default=None,
                   help="output dir (default: RUN/eval-<split|folder name>, or ./eval-<name> outside a run)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: the run's eval_batch_size)")
    p.add_argument("--workers", type=int, default=None, help="loader workers per process (default: the run's)")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore temperatures stored by `bcc calibrate` (report raw probabilities)")
    p.add_argument("--argmax", action="store_true",
                   help="ignore a stored operating point: the binary decision at probability 0.5")
    add_weights_option(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on a packed split or an image folder",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.errors import UsageError

    for name in ("batch_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "batch_size" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'batch_size' else '>= 0'}, "
                             f"got {value}")
    from bcc.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.data, split=args.split, out=args.out,
                        batch_size=args.batch_size, workers=args.workers,
                        calibrated=not args.no_calibration, operating_point=not args.argmax, weights=args.weights)
    return 0
