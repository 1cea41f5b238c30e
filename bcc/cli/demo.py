"""`bcc demo`: synthetic data -> shards -> 2-process DDP training through `accelerate launch` ->
test-split results. What `make demo` runs; everything lands under --out."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demo on built-in synthetic data", description=__doc__)
    p.add_argument("--out", default="demo", help="directory for data, shards and the run (default: demo)")
    p.add_argument("--config", default=None,
                   help="training config (default: the demo config shipped with bcc, a copy of configs/demo.yaml)")
    p.add_argument("--per-class", type=int, default=240, help="synthetic images per class")
    p.add_argument("--size", type=int, default=64, help="synthetic image size in pixels")
    p.add_argument("--processes", type=int, default=2, help="DDP processes (CPU unless GPUs are present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import time

    from rich.table import Table

    from bcc.console import console, error
    from bcc.launch import accelerate_command, run_launch
    from bcc.pack import DEFAULT_MIN_SHARDS, pack_folders
    from bcc.resources import demo_config
    from bcc.synth import synthesize

    out = Path(args.out)
    data, shards, run_dir = out / "data", out / "shards", out / "run"
    t0 = time.perf_counter()
    if not (data / ".complete").exists():
        if data.exists():
            shutil.rmtree(data)  # an interrupted earlier demo: its own output, never user data
        counts = synthesize(data, per_class=args.per_class, size=args.size, seed=args.seed)
        (data / ".complete").write_text(json.dumps(counts))
    console.print(f"[bold]1/3 synth[/]: {args.per_class} images per class at {args.size} px in {data}")
    # default shard count (enough for 2 loader workers on 8 ranks), more when more processes are asked for
    result = pack_folders(data, shards, split=(0.7, 0.15, 0.15), seed=args.seed, overwrite=True,
                          min_shards=max(DEFAULT_MIN_SHARDS, 2 * args.processes))
    console.print(f"[bold]2/3 pack[/]: {result.manifest['splits']['train']['count']} train / "
                  f"{result.manifest['splits']['val']['count']} val / {result.manifest['splits']['test']['count']} "
                  f"test samples -> {shards}")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own previous run: every demo trains from scratch
    # the shipped config is read through importlib.resources: it lies inside the installed package
    with (contextlib.nullcontext(Path(args.config)) if args.config else demo_config()) as config:
        cmd, env = accelerate_command(
            processes=args.processes,
            args=["--config", str(config), f"data.shards={shards}", f"run.dir={run_dir}", "checkpoint.resume=none",
                  *args.overrides],
        )
        console.print(f"[bold]3/3 train[/]: {' '.join(cmd)}")
        rc = run_launch(cmd, env)
    if rc != 0:
        error(f"training failed with exit code {rc}; see the output above and {run_dir}")
        return rc
    from bcc.train.runlog import read_rows

    rows = read_rows(run_dir / "metrics.jsonl")
    test = [r for r in rows if r["split"] == "test"][-1]
    chance = 1 / len(json.loads((shards / "manifest.json").read_text())["classes"])
    table = Table(title=f"bcc demo: test split ({int(test['count'])} images), {args.processes} processes")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in (("acc", "4-class accuracy"), ("bacc", "4-class balanced accuracy"),
                       ("binary_bacc", "benign/malignant balanced accuracy"), ("binary_auroc", "malignant AUROC"),
                       ("binary_sens", "malignant sensitivity"), ("binary_spec", "malignant specificity"),
                       ("subtype_f1", "subtype macro F1 (malignant)")):
        if key in test:
            table.add_row(label, f"{test[key]:.3f}")
    table.add_row("chance (4-class)", f"{chance:.3f}")
    console.print(table)
    console.print(f"run directory: [bold]{run_dir}[/] (config.yaml, metrics.jsonl, checkpoints/best); "
                  f"{time.perf_counter() - t0:.0f} s in all")
    return 0
