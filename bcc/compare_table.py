"""The tables of a `bcc compare`: its runs aggregated over seeds and written out.

`aggregate` reads the run directories back (`bcc.compare.read_mode`, `read_predictions`) and writes
`OUT/RESULTS.md`, `OUT/results.csv` (one row per run: the per-seed values), `OUT/summary.csv` (one row per
arm) and `OUT/val_curves.png`: mean +- sd over seeds, the 95% percentile bootstrap interval of the
seed-mean test metrics (`bcc.stats.bootstrap_ci`, 1000 resamples of the test samples, fixed rng), the arm
chosen on validation (best mean val `checkpoint.metric`; the test split never chooses) and every arm's
paired difference to it (per seed on the same test samples, and the paired bootstrap interval of the mean
difference). Aggregation needs nothing but the run directories, so a cluster can train the runs as an
array job and aggregate afterwards.

This module owns the statistics over seeds (`summarize_arms`, `seed_mean_ci`, `paired_difference`,
`choose_arm`, pure functions), finding an arm's runs under OUT and the CSV / Markdown / plot formats;
planning and training the runs is `bcc.compare`'s.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bcc.atomic import atomic_write
from bcc.compare import (
    MODES,
    SCRATCH_SUFFIX,
    CompareError,
    ModeResult,
    Predictions,
    chosen_weights,
    has_current_predictions,
    read_mode,
    read_predictions,
    write_test_predictions,
)
from bcc.compare_check import check_same_config, pretrained_text
from bcc.config import load_saved_config
from bcc.stats import LEVEL, N_BOOT, SAMPLE_METRICS, bootstrap_ci, mean_sd, sample_metrics

# --------------------------------------------------------------------------- aggregation: over seeds (pure)


@dataclass
class ArmResult:
    """One arm over its seeds: mean and sd of the runs' own metrics, the bootstrap interval of the mean
    test metrics, and the paired difference to the arm chosen on validation."""

    name: str
    runs: list[ModeResult]  # one per seed, by seed
    val: dict[str, tuple[float, float]]  # metric -> (mean, sd) over seeds of the best epoch's val value
    test: dict[str, tuple[float, float]]  # metric -> (mean, sd) over seeds of the test value
    ci: dict[str, tuple[float, float]]  # metric -> bootstrap interval of the seed-mean test metric
    chosen: bool = False
    paired: dict[str, dict] = field(default_factory=dict)  # metric -> paired_difference(...) vs the chosen arm

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def _test_sets(preds: Sequence[Predictions]) -> list[int]:
    """Group index of each run's test set: runs on the same samples share one (and one resample)."""
    ids: dict[tuple[str, ...], int] = {}
    return [ids.setdefault(p.keys, len(ids)) for p in preds]


def seed_mean_ci(preds: Sequence[Predictions], metric: str, *, n_boot: int = N_BOOT, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, float]:
    """Bootstrap interval of the mean over seeds of a test metric, resampling the test samples.

    Seeds evaluated on the same test samples (one pack) are resampled with the same indices, so the
    interval is the uncertainty of the test set, not of the seeds; seeds on other packs (`--packs`) are
    resampled independently.
    """
    cols = [p.columns(metric) for p in preds]
    if not cols or any(c is None for c in cols):
        return math.nan, math.nan
    groups = _test_sets(preds)
    sizes = [len(next(p.keys for p, g2 in zip(preds, groups, strict=True) if g2 == g)) for g in range(max(groups) + 1)]
    fn = SAMPLE_METRICS[metric][0]

    def statistic(idx: Sequence[np.ndarray]) -> float:
        return float(np.mean([fn(y[idx[g]], p[idx[g]]) for (y, p), g in zip(cols, groups, strict=True)]))

    return bootstrap_ci(statistic, sizes, n_boot=n_boot, seed=seed, level=level)


def paired_difference(a: Sequence[Predictions], b: Sequence[Predictions], metric: str, *, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Arm `a` minus arm `b` on a test metric, seed by seed on the same test samples (a paired bootstrap).

    `a[i]` and `b[i]` are the runs of seed i; they must hold the same samples. Returns {"per_seed": [a - b
    per seed], "mean": their mean, "ci": (lo, hi) of the mean difference, each replicate resampling the
    test samples once for both arms}. NaN where the metric does not apply.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} seeds")
    for x, y in zip(a, b, strict=True):
        if x.keys != y.keys:
            raise CompareError("paired comparison over different test samples (the runs of one seed used "
                               "different packs or test splits)")
    cols_a, cols_b = [p.columns(metric) for p in a], [p.columns(metric) for p in b]
    if not a or any(c is None for c in cols_a + cols_b):
        return {"per_seed": [math.nan] * len(a), "mean": math.nan, "ci": (math.nan, math.nan)}
    fn = SAMPLE_METRICS[metric][0]
    per_seed = [fn(*ca) - fn(*cb) for ca, cb in zip(cols_a, cols_b, strict=True)]
    groups = _test_sets(a)
    sizes = [len(next(p.keys for p, g2 in zip(a, groups, strict=True) if g2 == g)) for g in range(max(groups) + 1)]

    def statistic(idx: Sequence[np.ndarray]) -> float:
        return float(np.mean([fn(ya[idx[g]], pa[idx[g]]) - fn(yb[idx[g]], pb[idx[g]])
                              for (ya, pa), (yb, pb), g in zip(cols_a, cols_b, groups, strict=True)]))

    return {"per_seed": per_seed, "mean": float(np.mean(per_seed)),
            "ci": bootstrap_ci(statistic, sizes, n_boot=n_boot, seed=seed, level=level)}


def choose_arm(val_means: Mapping[str, float], mode: str) -> str | None:
    """The arm with the best mean validation metric (`mode` max or min); ties keep the first; NaN never wins."""
    sign = 1 if mode == "max" else -1
    finite = {k: v for k, v in val_means.items() if not math.isnan(v)}
    return max(finite, key=lambda k: sign * finite[k]) if finite else None


def summarize_arms(runs: Mapping[str, Sequence[ModeResult]], preds: Mapping[str, Sequence[Predictions | None]],
                   val_metrics: Sequence[str], test_metrics: Sequence[str], select: str, select_mode: str, *,
                   n_boot: int = N_BOOT, seed: int = 0) -> list[ArmResult]:
    """Mean +- sd over seeds, bootstrap intervals, the arm chosen on validation (`select`, a val metric;
    never a test one) and every arm's paired difference to it. `runs[arm]` and `preds[arm]` are by seed."""
    arms = []
    for name, rs in runs.items():
        ps = preds[name]
        have = all(p is not None for p in ps)
        arms.append(ArmResult(
            name=name, runs=list(rs),
            val={m: mean_sd([r.val.get(m, math.nan) for r in rs]) for m in val_metrics},
            test={m: mean_sd([r.test_all.get(m, math.nan) for r in rs]) for m in test_metrics},
            ci={m: seed_mean_ci(ps, m, n_boot=n_boot, seed=seed) if have and m in SAMPLE_METRICS
                else (math.nan, math.nan) for m in test_metrics},
        ))
    chosen = choose_arm({a.name: a.val.get(select, (math.nan, math.nan))[0] for a in arms}, select_mode)
    base = next((a for a in arms if a.name == chosen), None)
    if base is None:
        return arms
    base.chosen = True
    base_seeds = {r.seed: p for r, p in zip(base.runs, preds[base.name], strict=True)}
    for arm in arms:
        pairs = [(p, base_seeds[r.seed]) for r, p in zip(arm.runs, preds[arm.name], strict=True)
                 if r.seed in base_seeds and p is not None and base_seeds[r.seed] is not None]
        if not pairs or arm is base:
            continue
        for m in test_metrics:
            if m in SAMPLE_METRICS:
                arm.paired[m] = paired_difference([p for p, _ in pairs], [q for _, q in pairs], m,
                                                  n_boot=n_boot, seed=seed)
    return arms


# --------------------------------------------------------------------------- aggregation: files


def csv_columns(metrics: Sequence[str], test_metrics: Sequence[str] | None = None) -> list[str]:
    tests = list(dict.fromkeys([*metrics, *(test_metrics or ())]))
    return (["mode", "finetune", "init", "seed", "weights", "epochs", "best_epoch"] + [f"val_{k}" for k in metrics]
            + [f"test_{k}" for k in tests]
            + ["train_time_s", "cpu_time_s", "sec_per_step", "step_time_s", "trainable_final", "trainable_mean", "total_params"])


def _row(r: ModeResult, step_time: float | None, metrics: Sequence[str], test_metrics: Sequence[str] = ()) -> dict:
    row = {"mode": r.mode, "finetune": r.finetune, "init": r.init, "seed": r.seed, "weights": r.weights,
           "epochs": r.epochs, "best_epoch": r.best_epoch}
    row.update({f"val_{k}": r.val.get(k, math.nan) for k in metrics})
    row.update({f"test_{k}": r.test_all.get(k, r.test.get(k, math.nan)) for k in dict.fromkeys([*metrics, *test_metrics])})
    row.update({"train_time_s": r.train_time, "cpu_time_s": r.cpu_time, "sec_per_step": r.sec_per_step,
                "step_time_s": math.nan if step_time is None else step_time,
                "trainable_final": r.trainable_final, "trainable_mean": round(r.trainable_mean),
                "total_params": r.total_params})
    return row


def summary_columns(val_metrics: Sequence[str], test_metrics: Sequence[str]) -> list[str]:
    cols = ["arm", "finetune", "init", "seeds", "chosen"]
    cols += [f"val_{m}_{s}" for m in val_metrics for s in ("mean", "sd")]
    cols += [f"test_{m}_{s}" for m in test_metrics for s in ("mean", "sd", "ci_lo", "ci_hi")]
    cols += [f"delta_{m}_{s}" for m in test_metrics if m in SAMPLE_METRICS
             for s in ("per_seed", "mean", "ci_lo", "ci_hi")]
    return cols


def _summary_row(a: ArmResult, val_metrics: Sequence[str], test_metrics: Sequence[str]) -> dict:
    r0 = a.runs[0]
    row = {"arm": a.name, "finetune": r0.finetune, "init": r0.init, "seeds": " ".join(map(str, a.seeds)),
           "chosen": int(a.chosen)}
    for m in val_metrics:
        row[f"val_{m}_mean"], row[f"val_{m}_sd"] = a.val[m]
    for m in test_metrics:
        row[f"test_{m}_mean"], row[f"test_{m}_sd"] = a.test[m]
        row[f"test_{m}_ci_lo"], row[f"test_{m}_ci_hi"] = a.ci[m]
        if m in SAMPLE_METRICS:
            d = a.paired.get(m)
            row[f"delta_{m}_per_seed"] = " ".join(f"{v:.6g}" for v in d["per_seed"]) if d else ""
            row[f"delta_{m}_mean"] = d["mean"] if d else math.nan
            row[f"delta_{m}_ci_lo"], row[f"delta_{m}_ci_hi"] = d["ci"] if d else (math.nan, math.nan)
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def find_runs(out: Path, arm: str) -> list[Path]:
    """The finished run dirs of one arm: `OUT/<arm>` itself, or its `seed-*` dirs by seed."""
    d = Path(out) / arm
    if (d / "summary.json").is_file():
        return [d]
    seeds = [p for p in d.glob("seed-*") if (p / "summary.json").is_file() and p.name[5:].lstrip("-").isdigit()]
    return sorted(seeds, key=lambda p: int(p.name[5:]))


def _predictions(run_dir: Path) -> Predictions | None:
    """A finished run's test predictions, made now when the run was trained outside `bcc compare` (an
    sbatch array task, a plain `bcc train`); None, with a warning, when its test split cannot be read."""
    from bcc.errors import BccError

    if not has_current_predictions(run_dir):  # none yet, or of an older bcc that did not say which weights
        try:
            write_test_predictions(run_dir)
        except BccError as e:
            from bcc.console import warn

            warn(f"no test predictions for {run_dir} (its test metrics get no bootstrap interval): {e}")
            return None
    return read_predictions(run_dir)


def discover_arms(out: Path, modes: Sequence[str]) -> list[str]:
    """The arm directories under `out` for `modes`: each mode, then its `-scratch` arm."""
    names = [n for m in modes for n in (m, m + SCRATCH_SUFFIX)]
    return [n for n in names if find_runs(out, n)]


def aggregate(out: str | Path, modes: Sequence[str] = MODES, bench: Mapping[str, float] | None = None,
              command: str = "", arms: Sequence[str] | None = None, n_boot: int = N_BOOT,
              expected_seeds: int | None = None) -> list[ArmResult]:
    """Read every arm's runs under `out` and write RESULTS.md, results.csv (one row per run: per-seed
    values), summary.csv (one row per arm: mean, sd, bootstrap intervals, paired differences, the chosen
    arm) and val_curves.png. `arms` defaults to the arm directories found for `modes`."""
    out = Path(out)
    names = list(arms) if arms is not None else discover_arms(out, modes)
    present = [n for n in names if find_runs(out, n)]
    if not present:
        looked = ", ".join(f"{n}/summary.json" for n in (names or modes))
        raise CompareError(f"no finished run under {out} (looked for {looked} and {{arm}}/seed-*/summary.json)")
    check_same_config([d for n in present for d in find_runs(out, n)])  # one budget and recipe, or no table
    preds = {n: [_predictions(d) for d in find_runs(out, n)] for n in present}
    # each run's metrics of the weights its test predictions (and `bcc eval`) use
    runs = {n: [read_mode(n, d, p.weights if p is not None else chosen_weights(d))
                for d, p in zip(find_runs(out, n), preds[n], strict=True)] for n in present}
    first = runs[present[0]][0]
    metrics = first.metrics
    cfg = load_saved_config(first.run_dir / "config.yaml")
    has_binary = any(k.startswith("binary_") for k in first.test_all)
    test_metrics = list(dict.fromkeys([*metrics, *sample_metrics(has_binary)]))
    results = summarize_arms(runs, preds, metrics, test_metrics, metrics[0], cfg.checkpoint.mode, n_boot=n_boot)

    # the binary head at the operating point (`H_op_*`, eval.operating_point): per run in results.csv
    per_run = [*test_metrics, *(k for k in first.test_all if "_op_" in k and not k.startswith("ema_"))]
    _write_csv(out / "results.csv", csv_columns(metrics, per_run),
               [_row(r, (bench or {}).get(r.finetune), metrics, per_run) for rs in runs.values() for r in rs])
    _write_csv(out / "summary.csv", summary_columns(metrics, test_metrics),
               [_summary_row(a, metrics, test_metrics) for a in results])
    _plot([rs[0] for rs in runs.values()], out / "val_curves.png")
    missing = [n for n in names if n not in present]
    if expected_seeds is None:  # --aggregate: the seed dirs there, finished or not, say how many were meant
        expected_seeds = max((sum(1 for _ in (out / n).glob("seed-*")) for n in names), default=0) or None
    short = [f"{a.name} ({len(a.runs)} of {expected_seeds})" for a in results
             if expected_seeds is not None and len(a.runs) < expected_seeds]
    if short:  # means over other seed counts, and pairs over fewer seeds: said here and in RESULTS.md
        from bcc.console import warn

        warn(f"fewer seeds finished than asked: {', '.join(short)}; those arms' means and paired differences "
             "cover only the finished seeds")
    with atomic_write(out / "RESULTS.md") as f:
        f.write(_markdown(results, metrics, test_metrics, bench, command, missing, short, n_boot, cfg.checkpoint.mode,
                          "\n\n".join(filter(None, [pretrained_text([d for n in present for d in find_runs(out, n)], out),
                                                     _data_text(results)]))))
    return results


def _plot(results: Sequence[ModeResult], path: Path) -> None:
    from bcc.plots import plot_curves

    metric = results[0].metrics[0]
    plot_curves({r.mode: r.rows for r in results}, metric, path, split="val",
                title=f"validation {metric} by fine-tuning mode (first seed)")


def _data_text(results: Sequence[ArmResult]) -> str:
    """The resolution and normalisation every run trained at (scratch arms take the pretrained arms'),
    or each arm's when they differ (runs planned before scratch arms followed the source)."""
    seen: dict[tuple, list[str]] = {}
    for a in results:
        d = load_saved_config(a.runs[0].run_dir / "config.yaml").data
        seen.setdefault((d.image_size, tuple(d.mean), tuple(d.std), d.crop_pct), []).append(a.name)
    text = {k: f"{k[0]} px, mean {list(k[1])}, std {list(k[2])}, crop_pct {k[3]}" for k in seen}
    if len(seen) == 1:
        scratch = any(a.runs[0].init == "scratch" for a in results)
        return f"Every arm trains at {next(iter(text.values()))}" + (
            " (scratch arms take what the pretrained arms resolve from their source)." if scratch else ".")
    return "**Arms train at different data settings**: " + "; ".join(f"{', '.join(n)}: {text[k]}"
                                                                    for k, n in seen.items()) + "."


def _weights_text(results: Sequence[ArmResult]) -> str:
    """Which weights the table's metrics are of: what `bcc eval` takes by default (`--weights auto`)."""
    kinds = {r.weights for a in results for r in a.runs}
    if kinds == {"raw"}:
        return "raw weights (`bcc eval --weights auto`: no EMA)"
    if kinds == {"ema"}:
        return "EMA weights (model_ema.safetensors, `train.ema_decay`; what `bcc eval --weights auto` takes)"
    mixed = "; ".join(f"{a.name}: {'/'.join(r.weights for r in a.runs)}" for a in results)
    return f"weights as `bcc eval --weights auto` takes them, per run ({mixed})"


def _pm(mean_sd_: tuple[float, float]) -> str:
    mean, sd = mean_sd_
    return _fmt(mean) if math.isnan(sd) else f"{_fmt(mean)} ± {_fmt(sd)}"


def _interval(ci: tuple[float, float]) -> str:
    return "" if math.isnan(ci[0]) else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _markdown(results: Sequence[ArmResult], metrics, test_metrics, bench, command, missing, short, n_boot,
              select_mode: str = "max", pretrained: str = "") -> str:
    select = metrics[0]
    chosen = next((a for a in results if a.chosen), None)
    r0 = results[0].runs[0]
    n_seeds = max(len(a.runs) for a in results)
    lines = ["# Fine-tuning comparison", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"{r0.epochs} epochs per run; {r0.total_params:,} parameters in all; {n_seeds} seed(s) per arm "
              "(train.seed). Val metrics are each run's best epoch (by val "
              f"{select}, the runs' checkpoint.metric); test metrics are the test split evaluated once with the "
              f"best checkpoint, both of its {_weights_text(results)}. Cells are mean ± sd over seeds; [lo, hi] "
              f"is the 95% percentile bootstrap interval of the seed mean ({n_boot} resamples of the test samples, fixed rng). "
              "`s/step (wall)` is train time / optimizer steps, evaluation and checkpoints included; `CPU min` is the "
              "CPU time of all ranks' processes and loader workers (the cost on shared cores, where wall time "
              "follows the load).", ""]
    if pretrained:
        lines += [pretrained, ""]
    if chosen is not None:
        best = "highest" if select_mode == "max" else "lowest"
        lines += [f"**Chosen on validation: {chosen.name}** (✓), the {best} mean val {select} over seeds; "
                  "the test split played no part in the choice.", ""]
    head = ["arm", "chosen", "init", "seeds", "best ep", *(f"val {k}" for k in metrics), *(f"test {k}" for k in test_metrics),
            "train s", "CPU min", "s/step (wall)", "trainable final", "trainable mean"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in results:
        rs = a.runs
        cells = [a.name, "✓" if a.chosen else "", rs[0].init, str(len(rs)),
                 " ".join(str(r.best_epoch) for r in rs)]
        cells += [_pm(a.val[m]) for m in metrics]
        cells += [_pm(a.test[m]) + _interval(a.ci[m]) for m in test_metrics]
        cells += [_fmt(statistics.fmean(r.train_time for r in rs)), _fmt(statistics.fmean(r.cpu_time for r in rs) / 60),
                  _fmt(statistics.fmean(r.sec_per_step for r in rs)),
                  _fmt(rs[0].trainable_final), _fmt(float(round(rs[0].trainable_mean)))]
        lines.append("| " + " | ".join(cells) + " |")
    paired = [m for m in test_metrics if any(m in a.paired for a in results)]
    if chosen is not None and paired:
        lines += ["", f"Paired differences to {chosen.name} on the same test samples (arm − {chosen.name}; per seed, "
                  "then mean [95% paired bootstrap interval]):", ""]
        head = ["arm", *(f"Δ test {m}" for m in paired)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in results:
            if a.chosen or not a.paired:
                continue
            cells = [a.name]
            for m in paired:
                d = a.paired.get(m)
                cells.append("–" if d is None else
                             f"{' '.join(f'{v:+.3f}' for v in d['per_seed'])} → {d['mean']:+.3f}{_interval(d['ci'])}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wall seconds per epoch by stage (training + evaluation + checkpoint; first seed):", ""]
    for a in results:
        per = ", ".join(f"stage {s}: {t:.1f}" for s, t in a.runs[0].stage_epoch_time.items())
        lines.append(f"- {a.name}: {per}")
    staged = next((a.runs[0] for a in results if a.runs[0].finetune == "staged"), None)
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
    if short:
        lines += ["", f"Fewer seeds finished than asked: {', '.join(short)}"]
    lines += ["", "![validation curves](val_curves.png)", ""]
    return "\n".join(lines)
