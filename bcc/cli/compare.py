"""`bcc compare --config FILE [--modes frozen,staged,full,lpft] [--init pretrained,scratch] [--seeds N]
[--packs P0,P1,...] [--out DIR] [--processes N] KEY=VALUE...`: train each fine-tuning mode
(`finetune.preset`: frozen = linear probe of the heads, staged, full, lpft = linear probe then full
fine-tuning at 0.1x the rate) on the same shards and epoch budget, each with N training seeds, then write
RESULTS.md, results.csv (one row per run), summary.csv (one row per arm) and val_curves.png.

Pretrained vs scratch: the config's `model.pretrained` is the pretrained arm (`DIR/<mode>`); `--init
pretrained,scratch` adds the same mode from random weights (`DIR/<mode>-scratch`, `model.pretrained=''`).
Without --init, each mode runs as the config says. With `--seeds N` (N > 1) the runs are
`DIR/<arm>/seed-<s>` with train.seed = the config's seed + 0..N-1; `--packs` gives one pack per seed
(made with `bcc pack --seed s`), so that the split varies with the seed as well.

The table gives mean ± sd over seeds, 95% bootstrap intervals of the test metrics (resampling the test
samples), the mode chosen on validation (best mean val checkpoint.metric, never test) and paired
differences to it on the same test samples. Finished runs are skipped, interrupted ones resume, when
their run dir's config.yaml is this command's (up to keys that do not change the result: workers, logging,
checkpoint cadence...); a run dir holding a run of another config (another train.epochs, say) is refused
before anything trains, as is a run whose config or fine-tuning plan fails (lpft needs train.epochs >= 2).
`bcc compare --aggregate DIR` only builds the tables from existing run directories (after an sbatch
array job, for example; runs trained outside compare get their test predictions then); it refuses runs
trained under different configs (epochs, rates, ...: anything but the mode, init, seed and pack).
`bcc compare --plan ...` trains nothing: it prints the runs, one line each, tab-separated: index (from 0),
run directory, then the overrides that make that run (after the command line's): what
slurm/compare.sbatch trains one per array task. See docs/unfreezing.md."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="frozen vs staged vs full vs LP-FT, pretrained vs scratch, over seeds",
                              description=__doc__)
    p.add_argument("--config", "-c", help="training config (YAML); the runs differ only in finetune.preset, "
                   "model.pretrained (scratch), train.seed and data.shards (--packs)")
    p.add_argument("--modes", default=None,
                   help="finetune presets to compare, comma-separated, of frozen,staged,full,lpft "
                        "(default: frozen,staged,full; with --aggregate: every mode found)")
    p.add_argument("--init", default=None,
                   help="initialisations, comma-separated: pretrained (model.pretrained of the config), scratch "
                        "(random weights; DIR/<mode>-scratch when the config is pretrained). Default: as configured")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per arm: train.seed, seed+1, ... (default: 1)")
    p.add_argument("--packs", default="",
                   help="one pack per seed, comma-separated (e.g. packed with `bcc pack --seed 0`, `--seed 1`): "
                        "the train/val/test split varies with the seed; any data.shards form (a folder, an "
                        "http(s) URL, a pipe: template); default: data.shards for every seed")
    p.add_argument("--pack", action="append", default=[], metavar="P",
                   help="one pack per seed, the option repeated in seed order: as --packs, for a location "
                        "holding a comma (an rclone pipe: template)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="bootstrap resamples of the test samples for the intervals (default: 1000)")
    p.add_argument("--out", default="runs/compare", help="one run directory per arm (and seed) goes here "
                   "(default: runs/compare)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes per run: 1 trains in this process, more use accelerate launch")
    p.add_argument("--aggregate", metavar="OUT", help="only aggregate the finished run directories under OUT")
    p.add_argument("--plan", action="store_true",
                   help="train nothing; print the runs (index, run dir, overrides; tab-separated), one per line")
    p.add_argument("--bench-steps", type=int, default=5,
                   help="timed bcc train steps per preset for the frozen/full step-time ratio (0: skip)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides for every run")
    p.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _packs(args: argparse.Namespace) -> list[str]:
    if args.pack and args.packs:
        from bcc.compare import CompareError

        raise CompareError("--pack and --packs both give the packs: use one (--pack, repeated, for a location "
                           "holding a comma)")
    return list(args.pack) or _split(args.packs)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from bcc.compare import MODES, compare, load_bench
    from bcc.compare_table import aggregate
    from bcc.console import console

    modes = _split(args.modes) or (list(MODES) if args.aggregate else ["frozen", "staged", "full"])
    command = "bcc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # user errors (CompareError, ConfigError, FinetuneError, ...) reach `bcc.cli.call`, the one place
    if args.bootstrap < 1:
        from bcc.compare import CompareError

        raise CompareError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if args.aggregate:
        out = args.aggregate
        aggregate(out, modes, load_bench(out), command, n_boot=args.bootstrap)
    elif args.plan:
        from bcc.compare import plan_runs
        from bcc.config import load_config
        from bcc.pretrained import explicit_keys

        runs = plan_runs(load_config(args.config, list(args.overrides)), modes, args.out, args.seeds,
                         _split(args.init) or None, _packs(args), explicit_keys(args.config, args.overrides))
        from bcc.compare_check import check_runs

        check_runs(args.config, args.overrides, runs)  # an array job's tasks fail before any trains
        for k, r in enumerate(runs):
            print("\t".join([str(k), str(r.run_dir), *r.overrides]))
        return 0
    else:
        out = args.out
        compare(args.config, modes, out, args.processes, args.overrides, command, args.bench_steps,
                seeds=args.seeds, inits=_split(args.init) or None, packs=_packs(args),
                n_boot=args.bootstrap)
    from pathlib import Path

    console.print(Path(out, "RESULTS.md").read_text(), markup=False, highlight=False)  # [lo, hi] is no markup
    return 0
