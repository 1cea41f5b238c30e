"""`bcc synth OUT`: a synthetic blood-smear image folder in the default taxonomy's layout
(Benign/ Early/ Pre/ Pro/), deterministic for a seed: the demo's and the tests' data."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic blood-smear image folder", description=__doc__)
    p.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from bcc.console import console
    from bcc.synth import synthesize

    t0 = time.perf_counter()
    counts = synthesize(args.out, args.per_class, size=args.size, seed=args.seed, fmt=args.format,
                        workers=args.workers)
    total = sum(counts.values())
    elapsed = time.perf_counter() - t0
    console.print(f"wrote {total} images ({', '.join(f'{k} {v}' for k, v in counts.items())}) at "
                  f"{args.size} px to [bold]{args.out}[/] in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} img/s)")
    return 0
