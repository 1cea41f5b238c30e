"""`bcc bench data|step|vote|gpu|pack`: is the data path fast enough, and what does the trainer's step cost.

Run on the machine you train on; every figure is a median over alternating rounds in one process, so
background load hits all the compared variants alike. The ratios are the result; absolute img/s depend
on the machine. `bcc bench gpu` is the GPU check: one JSON report of everything a GPU node must show.
"""

from __future__ import annotations

import argparse

from bcc.cli._types import count, positive_int

MAX_GPU_STEPS = 100  # a step measurement does not check the time budget: bound its length instead


def gpu_steps(value: str) -> int:
    """`bcc bench gpu --steps`: 1 to MAX_GPU_STEPS."""
    n = positive_int(value)
    if n > MAX_GPU_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_GPU_STEPS} (each of the 16 step measurements runs N steps), got {n}")
    return n


def _sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v.replace("_", "")) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sample counts like 10000,100000, got {value!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive sample counts, got {value!r}")
    if list(sizes) != sorted(set(sizes)):
        # the goal is a ratio of the largest to the smallest: reversed or equal sizes would meet it trivially
        raise argparse.ArgumentTypeError(f"expected sample counts in increasing order, smallest first, got {value!r}")
    return sizes


def _counts(value: str, least: int = 1) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 2,4,8, got {value!r}") from None
    if not counts or min(counts) < least:
        raise argparse.ArgumentTypeError(f"expected counts >= {least}, got {value!r}")
    return counts


MAX_PLAN_SHARDS = 10_000_000  # 10 billion samples; the plan's arrays grow with the shards (10^11 filled 23 GB)


def _plan_shards(value: str) -> int:
    n = positive_int(value)
    if n > MAX_PLAN_SHARDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PLAN_SHARDS:,}, got {n:,}")
    return n


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
    d.add_argument("--shards", metavar="DIR", help="a packed dataset (holds manifest.json); not needed with --plan")
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
    d.add_argument("--plan", action="store_true",
                   help="instead: time the epoch plan (which samples each rank and lane reads) of a synthetic "
                        "dataset of --plan-shards shards for each --plan-parts (ranks x 8 lanes), both sampling modes")
    d.add_argument("--plan-shards", type=_plan_shards, default=100_000, metavar="N",
                   help=f"shards of 1,000 samples for --plan, at most {MAX_PLAN_SHARDS:,} (default 100000)")
    d.add_argument("--plan-parts", type=_counts, default=(64, 1024), metavar="P1,P2",
                   help="parts (ranks x 8 lanes) for --plan (default 64,1024)")
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

    g = sub.add_parser(
        "gpu",
        help="the GPU check: step rates, loader, JPEG decode, NCCL/gloo DDP, SyncBatchNorm, compile -> JSON",
        description="Measure on one GPU in about 5 minutes, writing one JSON report: bcc's train step per "
        "fine-tuning stage (frozen, deepest block, full) for fp32/bf16 x NCHW/NHWC at batch 32 and 128 "
        "(vgg16_bn, 224 px, tensors made on the device); the stream at 4/8/12/16 workers over synthetic "
        "pre-resized and original-size packs; JPEG decode per CPU core and on the GPU; a 1-rank NCCL and a "
        "2-rank gloo DDP step on a batch without malignant samples (run under a timeout); SyncBatchNorm; "
        "torch.compile. A part that fails is recorded as an error and the others still run. "
        "--device cpu runs the same checks at tiny shapes in well under a minute. See docs/benchmarks.md.",
    )
    g.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda when a GPU is visible, else an error asking for --device cpu")
    g.add_argument("--out", required=True, metavar="FILE.json", help="the report (written atomically)")
    g.add_argument("--steps", type=gpu_steps, metavar="N",
                   help=f"timed steps per step measurement, 1-{MAX_GPU_STEPS} (default 10 on cuda, 2 on cpu; "
                        "the 5-minute budget holds up to the default)")
    g.set_defaults(func=run_gpu)

    from bcc.cli import _bench_pack  # `bcc bench pack`: its own module, beside the other benches

    _bench_pack.register(sub)


def _progress(console):
    return lambda message: console.print(f"[dim]{message}[/]")


def _spread(timing) -> str:
    rates = timing.rates
    return f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-"


def run_data(args: argparse.Namespace) -> int:
    from bcc.bench import bench_data
    from bcc.console import console

    if args.plan:
        return _plan(args, console)
    if args.shards is None:
        from bcc.bench import BenchError

        raise BenchError("bcc bench data: --shards DIR is required (or --plan, which needs no data)")
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


def _plan(args: argparse.Namespace, console) -> int:
    """`bcc bench data --plan`: planning seconds per sampling mode and part count, and how one rank's cost
    grows from the fewest to the most parts (O(shards + parts x log shards): it should barely grow)."""
    from rich.table import Table

    from bcc.plan import LANES, time_plan

    table = Table(title=f"epoch planning, {args.plan_shards:,} shards x 1,000 samples (best of 3, seconds)")
    for column in ("sampling", "parts (ranks x lanes)", "plan", "+ one rank's lanes", "+ every part"):
        table.add_column(column, justify="right")
    growth = []
    for sampling in ("without_replacement", "resample"):
        rows = []
        for parts in sorted(set(args.plan_parts)):
            r = time_plan(args.plan_shards, max(parts, LANES), sampling=sampling)
            rows.append(r)
            table.add_row(sampling, f"{r['parts']:,}", f"{r['plan_s']:.3f}", f"{r['rank_s']:.3f}",
                          f"{r['all_parts_s']:.3f}")
        if len(rows) > 1:
            growth.append(f"{sampling}: one rank {rows[-1]['rank_s'] / rows[0]['rank_s']:.2f}x from "
                          f"{rows[0]['parts']:,} to {rows[-1]['parts']:,} parts")
    console.print(table)
    for line in growth:
        console.print(line, soft_wrap=True)
    return 0


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
    if result.cpu:
        us = {k: 1e6 * result.cpu_per_image(k) for k in result.cpu}
        console.print(
            f"CPU per image: (c) {us['(c)']:.0f} us; (a) workers {us['(a) workers']:.0f} + main process "
            f"{us['(a) main']:.0f} us; (b) workers {us['(b) workers']:.0f} + main {us['(b) main']:.0f} us   "
            f"(c)/(a) CPU = [bold]{result.stream_cpu_vs_limit:.2f}[/] (= (a)/(c*workers) with a free core per "
            f"worker and one for the main process)"
        )


def _data_summary(args: argparse.Namespace, results, console) -> None:
    from rich.table import Table

    table = Table(title=f"bcc bench data summary: {args.shards}, batch {args.batch_size}, medians of {args.rounds} rounds")
    for column in ("px", "workers", "(a) img/s", "(b) img/s", "(c) x workers", "(c) in W at once",
                   "(a)/(c*workers)", "(a)/(b)", "(a)/(c in W)", "(c)/(a) CPU"):
        table.add_column(column, justify="right")
    for r in results:
        together = r.parallel.rate if r.parallel.rates else None
        table.add_row(str(r.image_size), str(r.workers), f"{r.stream.rate:,.0f}", f"{r.folder.rate:,.0f}",
                      f"{r.limit:,.0f}", "-" if together is None else f"{together:,.0f}",
                      f"{r.stream_vs_limit:.2f}", f"{r.stream_vs_folder:.2f}",
                      "-" if together is None else f"{r.stream.rate / together:.2f}", f"{r.stream_cpu_vs_limit:.2f}")
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


def _status(part: dict) -> str:
    if "error" in part:
        return f"[red]error[/]: {part['error']}"
    if "skipped" in part:
        return f"[yellow]skipped[/]: {part['skipped']}"
    return ""


def _figure(entry: dict, key: str = "img_per_s") -> str:
    if key in entry:
        return f"{entry[key]:,.0f}"
    return "error" if "error" in entry else "skipped"


def _rank_line(part: dict) -> str:
    return (_status(part) or f"loss {part['loss']:.3f}, masked head(s) {', '.join(part['masked_heads'])} "
            f"at 0: {part['are_masked_losses_zero']}, weights in sync: {part['are_weights_in_sync']}, "
            f"{1000 * part['seconds_per_step']:,.0f} ms/step")


def run_gpu(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from rich.table import Table

    from bcc.atomic import write_json
    from bcc.bench import BenchError
    from bcc.bench.gpu import bench_gpu
    from bcc.console import console

    out = Path(args.out)
    if not out.parent.is_dir():  # before minutes of measuring, not after
        raise BenchError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise BenchError(f"--out {out}: is a directory; name the report file, e.g. {out / 'bench-gpu.json'}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BenchError(f"--out {out}: directory {out.parent} is not writable")
    report = bench_gpu(args.device, steps=args.steps, progress=_progress(console))
    try:
        write_json(out, report)
    except OSError as e:  # a read-only filesystem (root passes os.access), a full disk
        raise BenchError(f"--out {out}: cannot write the report: {e.strerror or e}") from e

    env = report["environment"]
    console.print(f"bcc bench gpu: {env.get('gpu', 'cpu')}, torch {env['torch']}, {report['seconds']:.0f} s")
    steps = report["steps"]
    if not _status(steps):
        table = Table(title=f"train step img/s: {steps['backbone']}, {steps['image_size']} px (tensors on the device)")
        for column in ("stage", "precision", "layout", *(f"batch {n}" for n in report["plan"]["batch_sizes"])):
            table.add_column(column, justify="right" if column.startswith("batch") else "left")
        rows: dict[tuple, list[str]] = {}
        for e in steps["results"]:
            rows.setdefault((e["stage"], e["precision"], e["layout"]), []).append(_figure(e))
        for key, figures in rows.items():
            table.add_row(*key, *figures)
        console.print(table)
    loader = report["loader"]
    if not _status(loader):
        table = Table(title=f"loader img/s: bcc stream, {loader['image_size']} px crops, batch {loader['batch_size']}")
        table.add_column("pack (stored px)")
        workers = report["plan"]["loader_workers"]
        for w in workers:
            table.add_column(f"{w} workers", justify="right")
        for kind, px in loader["stored_px"].items():
            table.add_row(f"{kind} ({px})", *(_figure(e) for e in loader["results"] if e["pack"] == kind))
        console.print(table)
    decode = report["decode"]
    if not _status(decode):
        for kind, e in decode["results"].items():
            cuda = e["torchvision_cuda"]
            console.print(f"decode {kind} ({e['mean_kib']:.0f} KiB JPEGs): PIL {_figure(e, 'pil_per_core')} img/s "
                          f"per core, torchvision {_figure(e, 'torchvision_cpu_per_core')} img/s per core, on the "
                          f"device: {_status(cuda) or _figure(cuda)}")
    for name in ("nccl", "gloo"):
        console.print(f"{name}: {_rank_line(report[name])}")
    sync_bn = report["sync_bn"]
    for name in ("nccl_1rank", "gloo_2rank") if not _status(sync_bn) else ():
        console.print(f"sync_bn {name}: {_rank_line(sync_bn[name])}")
    if _status(sync_bn):
        console.print(f"sync_bn: {_status(sync_bn)}")
    c = report["compile"]
    console.print(f"compile: {_status(c) or _compile_line(c)}")
    for name in ("steps", "loader", "decode"):
        if _status(report[name]):
            console.print(f"{name}: {_status(report[name])}")
    console.print(f"wrote {out}")
    return 0


def _compile_line(c: dict) -> str:
    return (f"backend {c['backend']}: first step {c['first_step_s']:.1f} s, eager {c['eager_img_per_s']:,.0f} img/s, "
            f"compiled {c['compiled_img_per_s']:,.0f} img/s ({c['speedup']:.2f}x)")
