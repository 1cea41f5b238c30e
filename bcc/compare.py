"""Frozen vs staged vs full fine-tuning on the same shards, seed and epoch budget.

`compare` trains one run directory per mode (`OUT/<mode>/`), each the same config with only
`finetune.preset` changed, then `aggregate` reads the run directories back (`metrics.jsonl`,
`summary.json`, `config.yaml`) and writes `OUT/RESULTS.md`, `OUT/results.csv` and
`OUT/val_curves.png`. Aggregation needs nothing but the run directories, so a cluster can train the
modes as an array job and aggregate afterwards.

`describe_finetune` (used by `bcc model groups`) lists the parameter groups of the configured model
and what each stage trains, without any data.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bcc.atomic import atomic_write, write_json
from bcc.config import Config, load_config, load_saved_config
from bcc.errors import BccError
from bcc.train.runlog import read_rows as read_metrics_rows

MODES = ("frozen", "staged", "full")  # finetune.preset of each mode


def table_metrics(metric: str) -> list[str]:
    """The metrics a comparison reports: the run's `checkpoint.metric` first, then `bacc` and `acc`."""
    return list(dict.fromkeys([metric, "bacc", "acc"]))


class CompareError(BccError):
    """A comparison that cannot run or cannot be aggregated, with a message for the user."""


# --------------------------------------------------------------------------- groups and stages


@dataclass(frozen=True)
class GroupInfo:
    name: str
    tensors: int
    params: int
    first: str
    last: str


@dataclass(frozen=True)
class StageInfo:
    index: int
    epochs: int
    train: tuple[str, ...]
    lr_mult: dict[str, float]
    warmup_steps: int
    trainable_params: int


@dataclass(frozen=True)
class FinetuneInfo:
    backbone: str
    heads: dict[str, int]
    heads_source: str  # where the heads came from: a manifest path or "default taxonomy"
    groups: list[GroupInfo]
    stages: list[StageInfo]
    total_params: int

    def trainable_final(self) -> int:
        return self.stages[-1].trainable_params

    def trainable_mean(self) -> float:
        """Trainable parameters averaged over the run's epochs."""
        epochs = sum(s.epochs for s in self.stages)
        return sum(s.trainable_params * s.epochs for s in self.stages) / max(epochs, 1)


def taxonomy_heads(cfg: Config) -> tuple[dict[str, int], str]:
    """Heads of `data.shards`' manifest when it exists, else of the default taxonomy."""
    from bcc.manifest import Manifest
    from bcc.taxonomy import Taxonomy

    if (Path(cfg.data.shards) / "manifest.json").is_file():
        return dict(Manifest.load(cfg.data.shards).taxonomy.head_sizes), f"manifest {cfg.data.shards}"
    return dict(Taxonomy.default().head_sizes), "default taxonomy (no manifest at data.shards)"


def describe_finetune(cfg: Config) -> FinetuneInfo:
    """Parameter groups of the configured model and the trainable set of every stage (no data needed)."""
    from bcc.finetune import resolve_stages
    from bcc.model import build_model, parameter_groups

    heads, source = taxonomy_heads(cfg)
    # weights are irrelevant here: never read a pretrained file just to count parameters
    model = build_model(_replace(cfg.model, pretrained=""), heads)
    groups = parameter_groups(model)
    stages = resolve_stages(cfg.finetune, cfg.train.epochs, list(groups), cfg.train.warmup_steps)
    sizes = {g: sum(p.numel() for _, p in members) for g, members in groups.items()}
    return FinetuneInfo(
        backbone=cfg.model.backbone,
        heads=heads,
        heads_source=source,
        groups=[GroupInfo(g, len(m), sizes[g], m[0][0], m[-1][0]) for g, m in groups.items()],
        stages=[
            StageInfo(i, s.epochs, s.train, {g: s.mult(g) for g in s.train}, s.warmup_steps,
                      sum(sizes[g] for g in s.train))
            for i, s in enumerate(stages)
        ],
        total_params=sum(sizes.values()),
    )


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# --------------------------------------------------------------------------- training the modes


def mode_overrides(mode: str, run_dir: Path) -> list[str]:
    if mode not in MODES:
        raise CompareError(f"unknown mode '{mode}'; modes: {', '.join(MODES)}")
    return [f"finetune.preset={mode}", f"run.dir={run_dir}"]


def train_mode(config: str | Path | None, overrides: Sequence[str], mode: str, out: Path, processes: int = 1) -> int:
    """Train one mode into `out/<mode>` (resuming it when interrupted before). Returns the exit code.

    One process runs in this process (`bcc.train.fit`); more go through `accelerate launch`.
    """
    run_dir = Path(out) / mode
    if (run_dir / "summary.json").is_file():
        return 0  # already trained: compare is re-runnable and only fills in what is missing
    from bcc.launch import train_run

    return train_run(config, [*overrides, *mode_overrides(mode, run_dir), "checkpoint.resume=auto"], processes)


# --------------------------------------------------------------------------- aggregation


@dataclass
class ModeResult:
    mode: str
    run_dir: Path
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    train_time: float
    steps: int
    epochs: int
    trainable_final: int
    trainable_mean: float
    total_params: int
    metrics: list[str] = field(default_factory=list)  # table_metrics(checkpoint.metric)
    stage_epoch_time: dict[int, float] = field(default_factory=dict)  # stage -> mean s/epoch (with eval)
    rows: list[dict] = field(default_factory=list)

    @property
    def sec_per_step(self) -> float:
        return self.train_time / self.steps if self.steps else math.nan


def read_rows(run_dir: Path) -> list[dict]:
    return read_metrics_rows(Path(run_dir) / "metrics.jsonl")


def read_mode(mode: str, run_dir: Path) -> ModeResult:
    """Collect one finished run directory; its best epoch is the best by its `checkpoint.metric`."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CompareError(f"{run_dir} has no summary.json: the '{mode}' run did not finish")
    summary = json.loads(summary_path.read_text())
    cfg = load_saved_config(run_dir / "config.yaml")
    info = describe_finetune(cfg)
    metric = cfg.checkpoint.metric
    sign = 1 if cfg.checkpoint.mode == "max" else -1
    names = table_metrics(metric)
    rows = read_rows(run_dir)
    # rows with a `source` are one source's of data.sources; the combined rows have none
    val = [r for r in rows if r.get("split") == cfg.data.val_split and "source" not in r]
    test = [r for r in rows if r.get("split") == cfg.data.test_split and "source" not in r]
    if not val:
        raise CompareError(f"{run_dir}/metrics.jsonl has no '{cfg.data.val_split}' rows")
    best = max(val, key=lambda r: sign * r.get(metric, -sign * math.inf))
    # wall time of each epoch (train + eval + checkpoint), from the cumulative `time` of val rows;
    # only rows of one uninterrupted process are comparable, so a resumed run's first row is skipped
    per_stage: dict[int, list[float]] = {}
    for prev, row in zip(val, val[1:], strict=False):
        if row["epoch"] == prev["epoch"] + 1 and row["time"] > prev["time"]:
            per_stage.setdefault(row["stage"], []).append(row["time"] - prev["time"])
    if val and val[0]["epoch"] == 1:
        per_stage.setdefault(val[0]["stage"], []).insert(0, val[0]["time"])
    return ModeResult(
        mode=mode,
        run_dir=run_dir,
        best_epoch=int(best["epoch"]),
        val={k: float(best[k]) for k in names if k in best},
        test={k: float(test[-1][k]) for k in names if test and k in test[-1]},
        train_time=float(summary["train_time"]),
        steps=int(summary["state"]["step"]),
        epochs=cfg.train.epochs,
        trainable_final=info.trainable_final(),
        trainable_mean=info.trainable_mean(),
        total_params=info.total_params,
        metrics=names,
        stage_epoch_time={s: statistics.mean(t) for s, t in sorted(per_stage.items())},
        rows=rows,
    )


def csv_columns(metrics: Sequence[str]) -> list[str]:
    return (["mode", "epochs", "best_epoch"] + [f"val_{k}" for k in metrics] + [f"test_{k}" for k in metrics]
            + ["train_time_s", "sec_per_step", "step_time_s", "trainable_final", "trainable_mean", "total_params"])


def _row(r: ModeResult, step_time: float | None, metrics: Sequence[str]) -> dict:
    row = {"mode": r.mode, "epochs": r.epochs, "best_epoch": r.best_epoch}
    row.update({f"val_{k}": r.val.get(k, math.nan) for k in metrics})
    row.update({f"test_{k}": r.test.get(k, math.nan) for k in metrics})
    row.update({"train_time_s": r.train_time, "sec_per_step": r.sec_per_step,
                "step_time_s": math.nan if step_time is None else step_time,
                "trainable_final": r.trainable_final, "trainable_mean": round(r.trainable_mean),
                "total_params": r.total_params})
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def aggregate(out: str | Path, modes: Sequence[str] = MODES, bench: Mapping[str, float] | None = None,
              command: str = "") -> list[ModeResult]:
    """Read `out/<mode>` for each mode present and write RESULTS.md, results.csv and val_curves.png."""
    out = Path(out)
    present = [m for m in modes if (out / m / "summary.json").is_file()]
    if not present:
        raise CompareError(f"no finished run under {out} (looked for {', '.join(f'{m}/summary.json' for m in modes)})")
    results = [read_mode(m, out / m) for m in present]
    metrics = results[0].metrics
    rows = [_row(r, (bench or {}).get(r.mode), metrics) for r in results]

    with atomic_write(out / "results.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(metrics))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    plot_path = out / "val_curves.png"
    _plot(results, plot_path)
    with atomic_write(out / "RESULTS.md") as f:
        f.write(_markdown(results, rows, bench, command, missing=[m for m in modes if m not in present]))
    return results


def _plot(results: Sequence[ModeResult], path: Path) -> None:
    from bcc.plots import plot_curves

    metric = results[0].metrics[0]
    plot_curves({r.mode: r.rows for r in results}, metric, path, split="val",
                title=f"validation {metric} by unfreezing mode")


def _markdown(results, rows, bench, command, missing) -> str:
    metrics = results[0].metrics
    head = ["mode", "best ep", *(f"val {k}" for k in metrics), *(f"test {k}" for k in metrics),
            "train s", "s/step (wall)", "trainable final", "trainable mean"]
    keys = ["mode", "best_epoch", *(f"val_{k}" for k in metrics), *(f"test_{k}" for k in metrics),
            "train_time_s", "sec_per_step", "trainable_final", "trainable_mean"]
    lines = ["# Unfreezing comparison", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    r0 = results[0]
    lines += [f"{r0.epochs} epochs per mode; {r0.total_params:,} parameters in all. Val metrics are the best "
              f"epoch's (by val {metrics[0]}, the runs' checkpoint.metric); test metrics are the test split "
              "evaluated once with the best checkpoint. "
              "`s/step (wall)` is train time / optimizer steps, evaluation and checkpoints included.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    lines.append("")
    lines.append("Wall seconds per epoch by stage (training + evaluation + checkpoint):")
    lines.append("")
    for r in results:
        per = ", ".join(f"stage {s}: {t:.1f}" for s, t in r.stage_epoch_time.items())
        lines.append(f"- {r.mode}: {per}")
    staged = next((r for r in results if r.mode == "staged"), None)
    if staged and len(staged.stage_epoch_time) >= 2:
        times = list(staged.stage_epoch_time.values())
        lines.append(f"- staged run, first (heads only) vs last (all) stage epoch time: "
                     f"{times[0]:.1f} / {times[-1]:.1f} s = {times[0] / times[-1]:.2f}")
    if bench:
        lines += ["", "Step time (bcc train step, median over rounds on one fixed batch, same model; no evaluation):", ""]
        lines += [f"- {name}: {t * 1000:.1f} ms" for name, t in bench.items()]
        if "frozen" in bench and "full" in bench:
            lines.append(f"- frozen / full step time ratio: {bench['frozen'] / bench['full']:.2f}")
    if missing:
        lines += ["", f"Not finished (no summary.json): {', '.join(missing)}"]
    lines += ["", "![validation curves](val_curves.png)", ""]
    return "\n".join(lines)


def compare(config: str | Path | None, modes: Sequence[str], out: str | Path, processes: int = 1,
            overrides: Sequence[str] = (), command: str = "", bench_steps: int = 5) -> list[ModeResult]:
    """Train every mode (skipping finished ones), time frozen vs full steps, then aggregate."""
    out = Path(out)
    for mode in modes:
        mode_overrides(mode, out / mode)  # unknown modes fail before any training
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for mode in modes:
        rc = train_mode(config, overrides, mode, out, processes)
        if rc != 0:
            failed.append(f"{mode} (exit {rc})")
    bench = None
    if bench_steps > 0:
        cfg = load_config(config, list(overrides))
        from bcc.bench import step_seconds

        bench = step_seconds(cfg, ("frozen", "full"), steps=bench_steps)
        write_json(out / "step_times.json", bench)
    results = aggregate(out, modes, bench, command)
    if failed:
        raise CompareError(f"training failed for {', '.join(failed)}; the table holds the other modes")
    return results


def load_bench(out: str | Path) -> dict[str, float] | None:
    """step_times.json of an earlier `compare` (older files named the presets `heads`/`all`)."""
    path = Path(out) / "step_times.json"
    if not path.is_file():
        return None
    old = {"heads": "frozen", "all": "full"}
    return {old.get(k, k): v for k, v in json.loads(path.read_text()).items()}
