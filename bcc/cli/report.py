"""`bcc report RUN`: one self-contained HTML page (images inlined) about a run: training curves,
metrics per split, confusion matrix, reliability diagram and the worst mistakes of the test split with
their Grad-CAM overlays. Evaluates the best checkpoint first (into RUN/eval-<split>, as `bcc eval`
does) unless that evaluation is already there."""

from __future__ import annotations

import argparse

from bcc.cli._types import count


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="an HTML report of a run: curves, metrics, mistakes with Grad-CAM",
                              description=__doc__)
    p.add_argument("run", metavar="RUN", help="run directory (with metrics.jsonl, config.yaml, checkpoints/)")
    p.add_argument("--out", "-o", default=None, metavar="DIR", help="where report.html goes (default: RUN)")
    p.add_argument("--hide-paths", action="store_true",
                   help="show no file names or data/checkpoint paths (they may carry patient identifiers)")
    p.add_argument("--split", default=None, help="split to evaluate and show mistakes of (default: the run's test split)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="packed dataset (e.g. after moving it) or image folder of class folders to evaluate "
                        "(default: the run's data.shards)")
    p.add_argument("--worst", type=count, default=12, metavar="N", help="mistakes in the gallery (default 12)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.console import console
    from bcc.report import ReportError, write_report

    # BccErrors reach `bcc.cli.call`; an OS error writing the page is the user's too (e.g. --out not writable)
    try:
        path = write_report(args.run, out=args.out, split=args.split, data=args.data,
                            hide_paths=args.hide_paths, worst=args.worst)
    except OSError as e:
        raise ReportError(str(e)) from e
    console.print(f"report: [bold]{path}[/]", soft_wrap=True)
    return 0
