"""`bcc bench pack`: bcc pack's images/s against the decode limit x workers, and its peak RSS, at two sizes."""

from __future__ import annotations

import argparse

from bcc.cli._types import positive_int


def register(sub) -> None:
    """Add `pack` to `bcc bench`'s subcommands (called by bcc.cli.bench.register)."""
    from bcc.cli.bench import _sizes

    p = sub.add_parser(
        "pack",
        help="bcc pack throughput vs the decode limit, and peak memory, at two sizes",
        description="Make synthetic JPEGs once (not timed), then pack SIZES of them with N workers: images/s "
        "against (the first-pass work per image in one process) x N, and the peak RSS of the packer's process "
        "tree. Goals: throughput >= 0.8 x limit x workers; peak RSS of the largest / the smallest <= 1.5.",
    )
    p.add_argument("--sizes", type=_sizes, default=(20_000, 200_000), metavar="N1,N2",
                   help="images per pack (default 20000,200000)")
    p.add_argument("--workers", type=positive_int, metavar="N", help="pack workers (default: the CPU affinity)")
    p.add_argument("--image-px", type=positive_int, default=64, metavar="PX",
                   help="side of the synthetic JPEGs (default 64; at least 16)")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="R",
                   help="packs per size; throughput is their median, peak RSS their highest (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from rich.table import Table

    from bcc.bench import BenchError
    from bcc.bench.pack import bench_pack
    from bcc.console import console

    if args.image_px < 16:
        raise BenchError(f"--image-px must be at least 16, got {args.image_px}")
    points = bench_pack(args.sizes, workers=args.workers, image_px=args.image_px, repeats=args.repeats,
                        progress=lambda message: console.print(f"[dim]{message}[/]"))
    table = Table(title=f"bcc bench pack: synthetic {args.image_px} px JPEGs, {points[0].workers} worker(s), "
                  "near-duplicate grouping on",
                  caption="img/s = the median of the packs (every pack's in brackets); limit = the first-pass work "
                  "per image (read, sha256, decode, pHash) in one process: the median of 4 measurements, 2 before and 2 "
                  "after the packs (their range in brackets); together = the same work in N processes at once, summed")
    for name in ("images", "seconds", "img/s", "limit img/s x workers", "/ limit", "limit together", "/ together",
                 "peak RSS MiB",
                 f"/ {points[0].images:,}", "processes", "shards", "near-dup groups", "side files", "load avg"):
        table.add_column(name, justify="left" if name == "side files" else "right")
    for p in points:
        table.add_row(f"{p.images:,}", f"{p.seconds:.1f}",
                      f"{p.images_per_s:,.0f} ({', '.join(f'{r:,.0f}' for r in p.runs)})",
                      f"{p.limit_per_process:,.0f} x {p.workers} ({p.limit_range[0]:,.0f}-{p.limit_range[1]:,.0f})",
                      f"{p.ratio:.2f}", f"{p.limit_together:,.0f}",
                      f"{p.ratio_together:.2f}", f"{p.peak_rss / 2**20:,.0f}",
                      f"{p.peak_rss / points[0].peak_rss:.2f}", str(p.processes), str(p.shards),
                      str(p.near_duplicate_groups), ", ".join(p.side_files) or "-",
                      " ".join(f"{x:.1f}" for x in p.load))
    console.print(table)
    for p in points:
        console.print(f"{p.images:,} images: throughput / (decode limit x workers) = [bold]{p.ratio:.2f}[/] "
                      f"(goal >= 0.8; the first pass alone {p.first_pass_ratio:.2f}), / (limit in {p.workers} "
                      f"processes at once) = {p.ratio_together:.2f}; "
                      "seconds per stage: "
                      + ", ".join(f"{name} {sec:.1f}" for name, sec in p.stages.items()))
    small, large = min(points, key=lambda p: p.images), max(points, key=lambda p: p.images)
    console.print(f"RSS {large.images:,}/{small.images:,} = [bold]{large.peak_rss / small.peak_rss:.2f}[/] "
                  "(goal <= 1.5)")
    console.print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0
