"""`bcc bench data|step|vote`: is the data path fast enough, and what does the trainer's step cost.

Run on the machine you train on; every figure is a median over alternating rounds in one process, so
background load hits all the compared variants alike. The ratios are the result; absolute img/s depend
on the machine.
"""

from __future__ import annotations

import argparse

from bcc.cli._types import count, positive_int


def _sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v.replace("_", "")) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sample counts like 10000,100000, got {value!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive sample counts, got {value!r}")
    return sizes


def _counts(value: str, least: int = 1) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 2,4,8, got {value!r}") from None
    if not counts or min(counts) < least:
        raise argparse.ArgumentTypeError(f"expected counts >= {least}, got {value!r}")
    return counts


def _worker_counts(value: str) -> tuple[int, ...]:
    return _counts(value, least=0)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the data path and the train step", description=__doc__)
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)

    d = sub.add_parser(
        "data",
        help="bcc stream vs ImageFolder vs the per-core decode limit",
        description="Time (a) bcc's streaming loader over packed shards (batches arriving in the main process, "
        "before the on-device step), (b) torchvision ImageFolder + DataLoader over the same images, (c) decode + "
        "crop in one process x workers and in W processes at once; the loader workers' transform (decode, "
        "random resized crop, flips -> uint8) and the workers are the same for all; alternating rounds, medians "
        "reported. Lists of image sizes and worker counts run every combination and end with a summary.",
    )
    d.add_argument("--shards", required=True, metavar="DIR", help="a packed dataset (holds manifest.json)")
    d.add_argument("--split", default="train", help="split to read (default train)")
    d.add_argument("--workers", type=_worker_counts, default=(2,), metavar="N[,N2...]",
                   help="loader worker processes, or a list of counts to run each (default 2)")
    d.add_argument("--batches", type=positive_int, default=50, metavar="K",
                   help="timed batches per measurement (default 50; capped at one epoch)")
    d.add_argument("--warmup", type=count, default=5, metavar="W", help="untimed batches first (default 5)")
    d.add_argument("--batch-size", type=positive_int, default=32, metavar="B", help="default 32")
    d.add_argument("--image-size", type=_counts, default=(224,), metavar="S[,S2...]",
                   help="training crop size, or a list of sizes to run each (default 224)")
    d.add_argument("--rounds", type=positive_int, default=3, metavar="R", help="alternating rounds (default 3)")
    d.add_argument("--source", metavar="DIR",
                   help="class-folder tree for the ImageFolder baseline (default: unpack the split to a temp dir)")
    d.add_argument("--rss", action="store_true",
                   help="also: peak RSS of the loader process tree streaming synthetic data at two sizes")
    d.add_argument("--rss-samples", type=_sizes, default=(10_000, 100_000), metavar="N1,N2",
                   help="synthetic dataset sizes for --rss (default 10000,100000)")
    d.set_defaults(func=run_data)

    s = sub.add_parser(
        "step",
        help="bcc train step vs a plain PyTorch step; frozen vs full backbone",
        description="Time bcc's train step (Accelerate, multitask loss, the loop's per-step bookkeeping) "
        "against a plain PyTorch step on the same model and a fixed in-memory batch, and the frozen-backbone "
        "step against the full one. Uses model, data.image_size, data.batch_size, loss and train of the config.",
    )
    s.add_argument("--config", metavar="FILE", help="a training config (YAML); default: the built-in defaults")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    s.add_argument("--steps", type=positive_int, default=10, metavar="N", help="timed steps per round (default 10)")
    s.add_argument("--warmup", type=count, default=2, metavar="W", help="untimed steps per round (default 2)")
    s.add_argument("--rounds", type=positive_int, default=3, metavar="R", help="alternating rounds (default 3)")
    s.add_argument("--threads", type=positive_int, metavar="T", help="torch intra-op threads (default: torch's)")
    s.set_defaults(func=run_step)

    v = sub.add_parser(
        "vote",
        help="cost of the preemption vote with N gloo processes",
        description="Time the trainer's preemption vote (a gloo all-reduce) in N forked processes on this "
        "host, per vote and per optimizer step at train.preempt_check_steps intervals.",
    )
    v.add_argument("--processes", type=_counts, default=(2, 4, 8), metavar="N1,N2,...",
                   help="process counts (default 2,4,8)")
    v.add_argument("--votes", type=positive_int, default=500, metavar="K", help="timed votes (default 500)")
    v.add_argument("--every", type=_counts, default=(1, 10), metavar="S1,S2",
                   help="preempt_check_steps to show the per-step cost for (default 1,10)")
    v.set_defaults(func=run_vote)


def _progress(console):
    return lambda message: console.print(f"[dim]{message}[/]")


def _spread(timing) -> str:
    rates = timing.rates
    return f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-"


def run_data(args: argparse.Namespace) -> int:
    from bcc.bench import bench_data
    from bcc.console import console

    # user errors are BccErrors: bcc.cli.call prints them (exit 2; BCC_DEBUG=1 keeps the traceback)
    results = []
    for size in args.image_size:
        for workers in args.workers:
            result = bench_data(
                args.shards, split=args.split, workers=workers, batches=args.batches, warmup=args.warmup,
                batch_size=args.batch_size, image_size=size, source=args.source, rounds=args.rounds,
                progress=_progress(console),
            )
            _data_table(args, result, console)
            results.append(result)
    if len(results) > 1:
        _data_summary(args, results, console)
    return _rss(args, console) if args.rss else 0


def _data_table(args: argparse.Namespace, result, console) -> None:
    from rich.table import Table

    w = max(result.workers, 1)
    baseline = args.source or f"split '{args.split}' unpacked to a temp dir"
    table = Table(
        title=f"bcc bench data: {args.shards} ({args.split}, {result.split_images} images), {result.workers} "
        f"worker(s), {result.image_size} px, batch {result.batch_size}; median of {result.rounds} rounds x "
        f"{result.batches} batches after {result.warmup} warm-up",
        caption=f"(b) reads {baseline} ({result.folder_images} images); (c) = one process, one thread, "
        f"decode + the same crop (uint8), x {w} worker(s)",
    )
    table.add_column("loader")
    table.add_column("img/s", justify="right")
    table.add_column("img/s per worker", justify="right")
    table.add_column("rounds img/s", justify="right")
    table.add_column("/ (c)", justify="right")
    table.add_column("/ (b)", justify="right")
    limit = result.limit
    rows = [
        ("(a) bcc stream", result.stream.rate, result.stream),
        ("(b) ImageFolder + DataLoader", result.folder.rate, result.folder),
        (f"(c) per-core limit x {w}", limit, result.decode),
    ]
    if result.parallel.rates:
        rows.append((f"(c) in {w} processes at once", result.parallel.rate, result.parallel))
    for label, rate, timing in rows:
        spread = _spread(timing) if timing is not result.decode else f"{_spread(timing)} (1 core)"
        table.add_row(label, f"{rate:,.0f}", f"{rate / w:,.0f}", spread, f"{rate / limit:.2f}",
                      f"{rate / result.folder.rate:.2f}")
    console.print(table)
    console.print(
        f"{result.image_size} px, {result.workers} worker(s): "
        f"(a)/(c*workers) = [bold]{result.stream_vs_limit:.2f}[/] (goal >= 0.9)   "
        f"(a)/(b) = [bold]{result.stream_vs_folder:.2f}[/] (goal >= 1)"
    )
    if result.parallel.rates:
        console.print(
            f"(a)/(c in {w} processes) = [bold]{result.stream.rate / result.parallel.rate:.2f}[/]   "
            f"cores free for decoding ~ {result.parallel.rate / result.decode.rate:.1f} of {w}"
        )


def _data_summary(args: argparse.Namespace, results, console) -> None:
    from rich.table import Table

    table = Table(title=f"bcc bench data summary: {args.shards}, batch {args.batch_size}, medians of {args.rounds} rounds")
    for column in ("px", "workers", "(a) img/s", "(b) img/s", "(c) x workers", "(c) in W at once",
                   "(a)/(c*workers)", "(a)/(b)", "(a)/(c in W)"):
        table.add_column(column, justify="right")
    for r in results:
        together = r.parallel.rate if r.parallel.rates else None
        table.add_row(str(r.image_size), str(r.workers), f"{r.stream.rate:,.0f}", f"{r.folder.rate:,.0f}",
                      f"{r.limit:,.0f}", "-" if together is None else f"{together:,.0f}",
                      f"{r.stream_vs_limit:.2f}", f"{r.stream_vs_folder:.2f}",
                      "-" if together is None else f"{r.stream.rate / together:.2f}")
    console.print(table)


def _rss(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from bcc.bench import bench_rss

    workers = max(args.workers)
    points = bench_rss(args.rss_samples, workers=workers, batch_size=args.batch_size,
                       progress=_progress(console))
    rss = Table(title=f"loader peak RSS (main + {workers} worker(s), summed), one epoch of synthetic "
                f"16 px JPEGs, batch {args.batch_size}")
    rss.add_column("samples", justify="right")
    rss.add_column("batches", justify="right")
    rss.add_column("processes", justify="right")
    rss.add_column("seconds", justify="right")
    rss.add_column("peak RSS MiB", justify="right")
    rss.add_column(f"/ {points[0].samples:,}", justify="right")
    for p in points:
        rss.add_row(f"{p.samples:,}", str(p.batches), str(p.processes), f"{p.seconds:.1f}",
                    f"{p.peak_rss / 2**20:,.0f}", f"{p.peak_rss / points[0].peak_rss:.3f}")
    console.print(rss)
    growth = points[-1].peak_rss / points[0].peak_rss
    console.print(f"peak RSS {points[-1].samples:,} / {points[0].samples:,} samples = [bold]{growth:.3f}[/] "
                  f"(goal <= 1.10)")
    return 0


def run_step(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from bcc.bench import bench_step
    from bcc.config import load_config
    from bcc.console import console

    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_step(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                        progress=_progress(console))
    table = Table(
        title=f"bcc bench step: {result.backbone}, {result.image_size} px, batch {result.batch_size}, "
        f"{result.device}, mixed precision {result.mixed_precision}, {torch.get_num_threads()} thread(s); "
        f"median of {result.rounds} rounds x {result.steps} steps after {result.warmup} warm-up",
        caption="fixed in-memory batch (no data loading); rounds alternate plain, full, frozen",
    )
    table.add_column("step")
    table.add_column("trainable params", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("img/s", justify="right")
    table.add_column("rounds img/s", justify="right")
    table.add_column("/ plain", justify="right")
    table.add_column("/ bcc full", justify="right")
    for label, key, timing in (
        ("plain PyTorch (all trainable)", "plain", result.plain),
        ("bcc train_step, finetune full", "full", result.full),
        ("bcc train_step, finetune frozen (heads)", "frozen", result.frozen),
    ):
        ms = 1000 * result.batch_size / timing.rate
        table.add_row(label, f"{result.trainable[key]:,}", f"{ms:,.1f}", f"{timing.rate:,.1f}", _spread(timing),
                      f"{timing.rate / result.plain.rate:.3f}", f"{timing.rate / result.full.rate:.3f}")
    console.print(table)
    console.print(
        f"bcc overhead vs plain = [bold]{100 * result.overhead:+.1f}%[/] (goal <= +3%)   "
        f"frozen / full speed = [bold]{result.frozen_speedup:.2f}x[/]"
    )
    return 0


def run_vote(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bcc.bench import bench_vote
    from bcc.console import console

    points = bench_vote(args.processes, votes=args.votes, progress=_progress(console))
    table = Table(title=f"bcc bench vote: preemption vote (gloo all-reduce of one int32), {args.votes} votes, "
                  "processes forked on this host")
    table.add_column("processes", justify="right")
    table.add_column("us/vote median", justify="right")
    table.add_column("us/vote p90", justify="right")
    for every in args.every:
        table.add_column(f"us/step, vote every {every}", justify="right")
    for p in points:
        table.add_row(str(p.processes), f"{p.median_us:,.0f}", f"{p.p90_us:,.0f}",
                      *(f"{p.median_us / every:,.1f}" for every in args.every))
    console.print(table)
    return 0
