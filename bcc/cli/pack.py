"""`bcc pack SRC OUT`: image class folders -> WebDataset shards + manifest; `bcc pack --verify OUT`."""

from __future__ import annotations

import argparse

from bcc.cli._types import fold_count, positive_int
from bcc.pack import DEFAULT_MIN_SHARDS, default_workers


def _split_arg(value: str) -> tuple[float, float, float]:
    from bcc.split import SplitError, parse_split

    try:
        return parse_split(value)
    except SplitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quality(value: str) -> int:
    n = positive_int(value)
    if n > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100, got {value!r}")
    return n


def _group_regex(value: str) -> str:
    from bcc.split import SplitError, compile_group_regex

    try:
        compile_group_regex(value)
    except SplitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _near_threshold(value: str) -> int:
    from bcc.neardup import NearDupError, is_enabled

    try:
        n = int(value)
        is_enabled(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits, got {value!r}") from None
    except NearDupError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} bits: use --no-near-dup to switch near-duplicate grouping off")
    return n


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pack",
        help="pack image class folders into WebDataset shards with a manifest",
        description="Pack SRC (one folder per class) into seeded train/val/test WebDataset shards in OUT, "
        "with manifest.json and timm's _info.json. Bad files are skipped with a reason. Each source is "
        "read once; its stored bytes wait in OUT's temporary sibling until the shards are written, so "
        "the pack needs free room for about twice the output while it runs.",
    )
    p.add_argument("src", metavar="SRC", nargs="?", help="folder with one sub-folder per class")
    p.add_argument("out", metavar="OUT", nargs="?", help="output folder (must be empty or absent)")
    p.add_argument("--split", type=_split_arg, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                   help="split fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and shuffles (default 0)")
    p.add_argument("--resize", type=positive_int, metavar="PX",
                   help="resize the shorter side to PX and store JPEG (default: keep original bytes); PX x PX must "
                   "fit in --max-pixels, a resized image above it is skipped, and images made larger are counted "
                   "in a warning")
    p.add_argument("--quality", type=_quality, default=90, metavar="Q",
                   help="JPEG quality of --resize (default 90; converted images are stored as PNG)")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="samples per shard at most (default 1000)")
    p.add_argument("--min-shards", type=positive_int, default=DEFAULT_MIN_SHARDS, metavar="K",
                   help=f"at least K shards per split when it has K samples (default {DEFAULT_MIN_SHARDS}: "
                   "2 loader workers on each of 8 ranks)")
    p.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                   help="processes that read, hash and decode the sources and write the shards "
                   f"(default: the CPUs this process may use, here {default_workers()})")
    p.add_argument("--group-regex", type=_group_regex, metavar="RE",
                   help="files whose names share RE's first group (e.g. a patient id) stay in one split")
    p.add_argument("--group-scope", choices=("dataset", "class"), default="dataset",
                   help="dataset: one group id joins files in any class folder (a patient); class: ids are "
                   "per class folder (augmented copies numbered per class) (default dataset)")
    p.add_argument("--near-dup-threshold", type=_near_threshold, metavar="BITS",
                   help="images whose 64-bit perceptual hashes differ in at most BITS bits stay in one split "
                   "and fold, like exact copies (default 6)")
    p.add_argument("--no-near-dup", action="store_true",
                   help="do not hash images: only exact copies and --group-regex groups are kept together")
    p.add_argument("--folds", type=fold_count, metavar="K",
                   help="also deal train+val into K stratified, group-safe cross-validation folds "
                   "(train with data.fold=k, or run `bcc cv`)")
    p.add_argument("--taxonomy", metavar="NAME|FILE",
                   help="taxonomy YAML, or a shipped one by name (all_4class, kvasir, wbc_4class) (default: the built-in ALL taxonomy)")
    p.add_argument("--max-pixels", type=positive_int, metavar="N",
                   help="skip images above N pixels (default: Pillow's decompression-bomb limit)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (only once done)")
    p.add_argument("--strict", action="store_true", help="fail, writing nothing, if any file would be skipped")
    p.add_argument("--verify", metavar="OUT", help="re-hash the shards of a packed OUT (a folder, a dataset "
                   "URL or a pipe: template with {name}) against its manifest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.console import console
    from bcc.errors import UsageError, interrupts_raise

    if args.verify:
        if args.src or args.out:
            raise UsageError("--verify OUT takes no SRC/OUT arguments")
        with interrupts_raise("bcc pack --verify"):  # one line; a remote shard's temporary copy and command end
            return _verify(args.verify, console)
    if not args.src or not args.out:
        raise UsageError("bcc pack needs SRC and OUT (or --verify OUT)")
    # Ctrl-C or kill (SIGINT/SIGTERM): one line, exit 130/143; before the rename the temporary folder and
    # the workers are gone ("nothing written"), after it OUT is complete (the pack's imports are inside)
    written: list[bool] = []
    with interrupts_raise("bcc pack", lambda: f"{args.out} was written" if written else "nothing written"):
        result = _pack(args, console)
        written.append(True)
        _summary(result, console)
    return 0


def _pack(args: argparse.Namespace, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bcc.errors import UsageError
    from bcc.neardup import DEFAULT_THRESHOLD
    from bcc.pack import pack_folders
    from bcc.resources import load_taxonomy
    from bcc.taxonomy import Taxonomy

    if args.no_near_dup and args.near_dup_threshold is not None:
        raise UsageError(f"--no-near-dup and --near-dup-threshold {args.near_dup_threshold} contradict each "
                         "other: give one of them")
    near = None if args.no_near_dup else (DEFAULT_THRESHOLD if args.near_dup_threshold is None
                                          else args.near_dup_threshold)

    taxonomy = load_taxonomy(args.taxonomy) if args.taxonomy else Taxonomy.default()
    # a bar only on a terminal, started by the first progress report: rich's transient bar leaves an
    # empty line behind in a log file, and before an early `error:` line on a terminal
    bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True) if console.is_terminal else None
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if bar is None:
            return
        if not tasks:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        return pack_folders(
            args.src, args.out, split=args.split, seed=args.seed, resize=args.resize, quality=args.quality,
            shard_size=args.shard_size, min_shards=args.min_shards, workers=args.workers,
            group_regex=args.group_regex, group_scope=args.group_scope, taxonomy=taxonomy, overwrite=args.overwrite, strict=args.strict,
            max_image_pixels=args.max_pixels, near_dup_threshold=near,
            folds=args.folds, progress=progress,
        )
    finally:
        if tasks:
            bar.stop()


def _summary(result, console) -> None:
    from rich.table import Table

    from bcc.console import warn

    m = result.manifest
    table = Table(title=f"packed {result.out}", show_footer=True)
    table.add_column("split", footer="total")
    for c in m["classes"]:
        table.add_column(c, justify="right", footer=str(sum(s["class_counts"][c] for s in m["splits"].values())))
    table.add_column("samples", justify="right", footer=str(result.counts["packed"]))
    table.add_column("shards", justify="right", footer=str(result.counts["shards"]))
    for name, s in m["splits"].items():
        table.add_row(name, *(str(s["class_counts"][c]) for c in m["classes"]), str(s["count"]),
                      str(len(s["shards"])))
    console.print(table)

    if result.skipped_by_reason:
        skipped = Table(title=f"skipped files ({result.counts['skipped']})")
        skipped.add_column("reason")
        skipped.add_column("files", justify="right")
        for reason, n in result.skipped_by_reason.items():
            skipped.add_row(reason, str(n))
        console.print(skipped)
    extra = []
    counts = result.counts
    if counts["converted"]:
        extra.append(f"{counts['converted']} converted to 8-bit RGB")
    if counts["duplicates"]:
        extra.append(f"{counts['duplicates']} duplicate sets ({counts['duplicate_files']} files, "
                     f"{counts['duplicate_conflicts']} across classes)")
    if counts["near_duplicate_groups"]:
        extra.append(f"{counts['near_duplicate_groups']} near-duplicate groups (pHash within "
                     f"{m['options']['near_dup_threshold']} bits, {counts.get('near_duplicate_conflicts', 0)} "
                     "across classes) kept on one side")
    side = [f"{v['file']} ({v['count']})" for v in m.values() if isinstance(v, dict) and "file" in v]
    if side:
        extra.append("long lists in side files: " + ", ".join(side))
    if m.get("folds"):
        extra.append(f"{m['folds']['k']} cross-validation folds of train+val: "
                     + ", ".join(str(n) for n in m["folds"]["counts"]) + " samples")
    # one line each, never wrapped (soft_wrap): `grep warning:` in a job's log finds whole lines
    for line in extra:
        console.print(f"  {line}", markup=False, soft_wrap=True)
    for w in m["warnings"]:
        warn(w)
    console.print(f"{result.counts['packed']} images in {result.elapsed_s:.1f} s "
                  f"([bold]{result.images_per_s:.0f} img/s[/])", soft_wrap=True)


def _verify(out: str, console) -> int:
    from rich.markup import escape

    from bcc.manifest import FILE_LISTS, Manifest, ManifestError
    from bcc.remote import display
    from bcc.sample_index import FILE
    from bcc.verify import verify_shards

    result = verify_shards(out)  # a local folder, a URL or a pipe: template: each shard read as training reads it
    for check in result.shards:
        name = display(check.path) if isinstance(check.path, str) else check.path.name
        # one line a shard or side file, never wrapped (soft_wrap), whatever the names hold (escape)
        if check.status == "ok":
            console.print(f"[green]OK[/]        {escape(name)}", soft_wrap=True)
        else:
            console.print(f"[red]{check.status.upper():<9}[/] {escape(name)}: {escape(str(check.detail))}",
                          soft_wrap=True)
    bad = len(result.mismatches)
    manifest = Manifest.load(out, key="--verify")
    side_bad = 0
    for name in FILE_LISTS:  # the long per-file lists' side files, checked against their sha256
        ref = manifest.data.get(name)
        if isinstance(ref, dict):
            try:
                manifest.file_list(name)
                console.print(f"[green]OK[/]        {escape(str(ref.get('file')))}", soft_wrap=True)
            except ManifestError as e:
                console.print(f"[red]MISMATCH [/] {escape(str(ref.get('file')))}: {escape(str(e))}", soft_wrap=True)
                side_bad += 1
    index = result.index  # the sample index (the overlap checks): there, readable, this pack's
    if index.status == "mismatch":
        console.print(f"[red]MISMATCH [/] {FILE}: {escape(index.detail)}", soft_wrap=True)
        side_bad += 1
    else:
        console.print(f"[yellow]NONE[/]      {FILE}: {escape(index.detail)}" if index.status == "none"
                      else f"[green]OK[/]        {FILE}", soft_wrap=True)
    if bad or side_bad:
        console.print(f"[red]{bad} of {len(result.shards)} shard(s) failed verification[/]"
                      + (f"[red], and {side_bad} side file(s)[/]" if side_bad else ""), soft_wrap=True)
        return 1
    console.print(f"[green]all {len(result.shards)} shards match the manifest[/]")
    return 0
