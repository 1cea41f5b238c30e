"""`bcc calibrate`: fit temperature scaling per head on the validation split and store the temperatures
with the checkpoint (`<checkpoint>/temperature.json`); `bcc eval`, `bcc predict` and `bcc export` use
them unless told not to. Prints the expected calibration error before and after.

With `--operating-point RULE` (youden, sensitivity>=X, specificity>=X) it then fits the threshold of the
binary decision on the temperature-scaled validation probabilities and stores it beside them
(`<checkpoint>/operating_point.json`); eval, predict and export decide with it."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit temperature scaling on the val split", description=__doc__)
    p.add_argument("--checkpoint", "-c", required=True, metavar="RUN|CKPT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir or best/last link")
    p.add_argument("--data", "-d", default=None, metavar="SHARDS",
                   help="packed dataset or image folder (default: the run's data.shards)")
    p.add_argument("--split", default=None, help="split of a packed dataset (default: the run's val split)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--operating-point", default=None, metavar="RULE",
                   help="also fit the binary decision's threshold on the same samples, after the temperatures: "
                        "youden | sensitivity>=X | specificity>=X (argmax removes a stored one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.console import console
    from bcc.evaluate import calibrate_checkpoint

    result = calibrate_checkpoint(args.checkpoint, args.data, args.split,
                                  batch_size=args.batch_size, workers=args.workers,
                                  operating_point=args.operating_point)
    from rich.table import Table

    table = Table(title=f"temperature scaling on {result['split']} ({result['count']} images)",
                  title_justify="left")
    for col in ("", "T", "ECE before", "ECE after"):
        table.add_column(col, justify="left" if not col else "right")
    for scope, before in result["ece_before"].items():
        t = result["temperatures"].get(scope)
        table.add_row(scope, "" if t is None else f"{t:.3f}", f"{before:.4f}", f"{result['ece_after'][scope]:.4f}")
    console.print(table)
    for f in result["failed"]:
        console.print(f"[yellow]unreadable:[/] {f['source']}: {f['reason']}", soft_wrap=True)
    console.print(f"temperatures written to {result['path']}", soft_wrap=True)
    point = result.get("operating_point")
    if point is not None:
        a, c = point["val"]["argmax"], point["val"]["chosen"]
        console.print(f"operating point {point['rule']}: {point['head']} positive when p >= {point['threshold']:.4f} "
                      f"(sens/spec {a['sens']:.3f}/{a['spec']:.3f} at argmax -> {c['sens']:.3f}/{c['spec']:.3f}) "
                      f"written to {point['path']}", soft_wrap=True)
    return 0
