"""`bcc calibrate`: fit temperature scaling per head on the validation split and store the temperatures
with the checkpoint (`<checkpoint>/temperature.json`); `bcc eval`, `bcc predict` and `bcc export` use
them unless told not to. Prints the expected calibration error before and after.

With `--operating-point RULE` (youden, sensitivity>=X, specificity>=X) it then fits the threshold of the
binary decision on the temperature-scaled validation probabilities and stores it beside them
(`<checkpoint>/operating_point.json`); eval, predict and export decide with it.

The samples are the run's validation view: for a run of `bcc cv` (`data.fold=k`) fold k of the pack's
train+val, as training used it, not the pack's own val split. With an EMA (`train.ema_decay`) the default
`--weights auto` refits both the raw and the EMA weights (each on its own logits), so eval, predict,
export and report keep using the weights they chose before; `raw` or `ema` refit one and keep the
other's stored fit (`--operating-point argmax` drops only the point of the weights refitted)."""

from __future__ import annotations

import argparse

from bcc.cli import add_weights_option


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit temperature scaling on the val split", description=__doc__)
    p.add_argument("--checkpoint", "-c", required=True, metavar="RUN|CKPT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir or best/last link")
    p.add_argument("--data", "-d", default=None, metavar="SHARDS",
                   help="packed dataset or image folder (default: the run's data.shards)")
    p.add_argument("--split", default=None, help="split of a packed dataset (default: the run's val split, in its data.fold view)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--operating-point", default=None, metavar="RULE",
                   help="also fit the binary decision's threshold on the same samples, after the temperatures: "
                        "youden | sensitivity>=X | specificity>=X (argmax removes the stored point of the --weights "
                        "refitted: raw, ema, or both with auto; the other's stays)")
    add_weights_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.calibrate_run import calibrate_checkpoint
    from bcc.console import console

    result = calibrate_checkpoint(args.checkpoint, args.data, args.split,
                                  batch_size=args.batch_size, workers=args.workers,
                                  operating_point=args.operating_point, weights=args.weights)
    fits = {result["weights"][0]: result}
    if "ema" in result:
        fits["ema"] = result["ema"]
    for kind, fit in fits.items():
        _show(console, kind, fit, result)
    for f in result["failed"]:
        console.print(f"[yellow]unreadable:[/] {f['source']}: {f['reason']}", soft_wrap=True)
    console.print(f"{' and '.join(fits)} weights calibrated; temperatures written to {result['path']}"
                  + ("" if args.operating_point is None else " and the operating point beside them"),
                  soft_wrap=True)
    return 0


def _show(console, kind: str, fit: dict, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"temperature scaling of the {kind} weights on {result['shown']} ({fit['count']} images)",
                  title_justify="left")
    for col in ("", "T", "ECE before", "ECE after"):
        table.add_column(col, justify="left" if not col else "right")
    for scope, before in fit["ece_before"].items():
        t = fit["temperatures"].get(scope)
        table.add_row(scope, "" if t is None else f"{t:.3f}", f"{before:.4f}", f"{fit['ece_after'][scope]:.4f}")
    console.print(table)
    point = fit.get("operating_point", fit.get("point"))
    if point is not None:
        a, c = point["val"]["argmax"], point["val"]["chosen"]
        console.print(f"operating point {point['rule']} of the {kind} weights: {point['head']} positive when "
                      f"p >= {point['threshold']:.4f} (sens/spec {a['sens']:.3f}/{a['spec']:.3f} at argmax -> "
                      f"{c['sens']:.3f}/{c['spec']:.3f})", soft_wrap=True)
