"""`bcc model groups --config FILE [key=value ...]`: the parameter groups of the configured model and
what each stage of the configured fine-tuning plan (finetune:) trains. Needs no dataset: the heads come from the
manifest at `data.shards` when there is one, else from the default taxonomy."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="inspect the configured model", description=__doc__)
    sub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    g = sub.add_parser("groups", help="parameter groups and the trainable set of every stage", description=__doc__)
    g.add_argument("--config", "-c", help="YAML config file (defaults in bcc/config.py)")
    g.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.backbone=resnet18")
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bcc.compare import describe_finetune
    from bcc.config import load_config
    from bcc.console import console

    # ConfigError and FinetuneError are BccErrors: `bcc.cli.main` reports them
    cfg = load_config(args.config, args.overrides)
    info = describe_finetune(cfg)

    heads = ", ".join(f"{k} ({n})" for k, n in info.heads.items())
    table = Table(title=f"parameter groups of {info.backbone} with heads {heads}, from the {info.heads_source}")
    for col, justify in (("group", "left"), ("tensors", "right"), ("parameters", "right"),
                         ("first parameter", "left"), ("last parameter", "left")):
        table.add_column(col, justify=justify)
    for grp in info.groups:
        table.add_row(grp.name, str(grp.tensors), f"{grp.params:,}", grp.first, grp.last)
    table.add_row("total", str(sum(g.tensors for g in info.groups)), f"{info.total_params:,}", "", "", style="bold")
    console.print(table)

    preset = cfg.finetune.preset
    stages = Table(title=f"finetune preset '{preset}' over {cfg.train.epochs} epochs (frozen_bn: {cfg.finetune.frozen_bn})")
    for col, justify in (("stage", "right"), ("epochs", "right"), ("trains", "left"), ("lr multipliers", "left"),
                         ("warmup", "right"), ("trainable parameters", "right")):
        stages.add_column(col, justify=justify)
    for st in info.stages:
        mults = ", ".join(f"{g} {m:.3g}x" for g, m in st.lr_mult.items())
        share = st.trainable_params / info.total_params
        stages.add_row(str(st.index), str(st.epochs), ", ".join(st.train), mults, str(st.warmup_steps),
                       f"{st.trainable_params:,} ({share:.1%})")
    console.print(stages)
    console.print(f"mean trainable parameters over the run: {info.trainable_mean():,.0f}")
    return 0
