"""Fine-tuning modes compared on the same shards and epoch budget: frozen, staged, full and LP-FT, each from
the pretrained backbone and from scratch, over several seeds.

`compare` trains one run directory per arm and seed: an arm is a mode (`finetune.preset`) from one
initialisation (`--init pretrained,scratch`: `OUT/<mode>` holds the config's own initialisation,
`OUT/<mode>-scratch` random weights where the config names `model.pretrained`); with `--seeds N` each arm
trains N times (`train.seed` = the config's seed + 0..N-1; `OUT/<arm>/seed-<s>/`), on one pack or, with
`--packs`, on one pack per seed (the split then varies with the seed too). After training, each run's
best checkpoint predicts the test split once (`test_predictions.csv`, raw argmax decisions), so that the
aggregation can resample the test samples.

`aggregate` reads the run directories back and writes `OUT/RESULTS.md`, `OUT/results.csv` (one row per
run: the per-seed values), `OUT/summary.csv` (one row per arm) and `OUT/val_curves.png`: mean +- sd over
seeds, the 95% percentile bootstrap interval of the seed-mean test metrics (`bcc.stats.bootstrap_ci`,
1000 resamples of the test samples, fixed rng), the arm chosen on validation (best mean val
`checkpoint.metric`; the test split never chooses) and every arm's paired difference to it (per seed on
the same test samples, and the paired bootstrap interval of the mean difference). Aggregation needs
nothing but the run directories, so a cluster can train the runs as an array job and aggregate afterwards.

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

import numpy as np

from bcc.atomic import atomic_write, write_json
from bcc.config import Config, load_config, load_saved_config
from bcc.errors import BccError
from bcc.stats import LEVEL, N_BOOT, SAMPLE_METRICS, bootstrap_ci, mean_sd, sample_metrics
from bcc.train.runlog import read_rows as read_metrics_rows

MODES = ("frozen", "staged", "full", "lpft")  # finetune.preset of each mode
INITS = ("pretrained", "scratch")  # model.pretrained as configured, or random weights
SCRATCH_SUFFIX = "-scratch"  # run dir of a mode from scratch when the config names pretrained weights
PREDICTIONS_FILE = "test_predictions.csv"  # RUN/: the best checkpoint's test decisions, one row per sample


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


# --------------------------------------------------------------------------- arms, seeds and run directories


@dataclass(frozen=True)
class Arm:
    """One compared configuration: a fine-tuning mode from one initialisation, trained once per seed."""

    mode: str  # finetune.preset
    init: str  # "pretrained" (model.pretrained as configured) or "scratch" (random initialisation)
    name: str  # run directory under --out: the mode, `-scratch` appended where the config is pretrained

    @property
    def forces_scratch(self) -> bool:
        return self.name.endswith(SCRATCH_SUFFIX)


def plan_arms(modes: Sequence[str], inits: Sequence[str] | None, pretrained: str) -> list[Arm]:
    """The arms of a comparison, mode by mode (each mode's inits side by side).

    `pretrained` is the config's `model.pretrained`. `inits` None means the config's own initialisation.
    A directory named after the mode alone always holds the config's own initialisation; `-scratch`
    marks random weights in a config that has pretrained ones (`model.pretrained=''` for that arm).
    """
    for mode in modes:
        if mode not in MODES:
            raise CompareError(f"unknown mode '{mode}'; modes: {', '.join(MODES)}")
    if not modes:
        raise CompareError(f"no mode to compare; modes: {', '.join(MODES)}")
    inits = list(inits) if inits else ["pretrained" if pretrained else "scratch"]
    for init in inits:
        if init not in INITS:
            raise CompareError(f"unknown init '{init}'; inits: {', '.join(INITS)}")
    if "pretrained" in inits and not pretrained:
        raise CompareError("--init pretrained needs model.pretrained in the config (a weights file, a bcc run, "
                           "checkpoint or export); without it every run starts from scratch")
    return [Arm(mode, init, mode + (SCRATCH_SUFFIX if init == "scratch" and pretrained else ""))
            for mode in modes for init in dict.fromkeys(inits)]


def seed_list(base: int, seeds: int) -> list[int]:
    """`train.seed` of each of `seeds` runs: the config's seed, then the next ones."""
    if seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {seeds}")
    return [base + k for k in range(seeds)]


def run_dir_of(out: Path, arm: str, seed: int | None) -> Path:
    """`OUT/<arm>` for a single-seed comparison (seed None), `OUT/<arm>/seed-<seed>` otherwise."""
    return Path(out) / arm if seed is None else Path(out) / arm / f"seed-{seed}"


def mode_overrides(mode: str, run_dir: Path) -> list[str]:
    if mode not in MODES:
        raise CompareError(f"unknown mode '{mode}'; modes: {', '.join(MODES)}")
    return [f"finetune.preset={mode}", f"run.dir={run_dir}"]


def run_overrides(arm: Arm, run_dir: Path, seed: int | None, pack: str | None) -> list[str]:
    """What one run of `arm` changes in the config: the preset and run dir, the init, the seed, the pack."""
    out = mode_overrides(arm.mode, run_dir)
    if arm.forces_scratch:
        out.append("model.pretrained=''")
    if seed is not None:
        out.append(f"train.seed={seed}")
    if pack is not None:
        out.append(f"data.shards={pack}")
    return out


def train_mode(config: str | Path | None, overrides: Sequence[str], run_overrides: Sequence[str], run_dir: Path,
               processes: int = 1) -> int:
    """Train one run into `run_dir` (resuming it when interrupted before), then predict its test split
    with the best checkpoint (`test_predictions.csv`, for the bootstrap). Returns the exit code.

    One process runs in this process (`bcc.train.fit`); more go through `accelerate launch`.
    """
    if not (run_dir / "summary.json").is_file():  # finished runs are skipped: compare is re-runnable
        from bcc.launch import train_run

        rc = train_run(config, [*overrides, *run_overrides, "checkpoint.resume=auto"], processes)
        if rc != 0:
            return rc
    if not (run_dir / PREDICTIONS_FILE).is_file():
        write_test_predictions(run_dir)
    return 0


# --------------------------------------------------------------------------- per-sample test predictions


@dataclass(frozen=True)
class Predictions:
    """One run's test split, sorted by (source, key): leaf class labels and decisions, and those of the
    root binary head (None for a task without one)."""

    keys: tuple[str, ...]
    y: np.ndarray
    p: np.ndarray
    y_binary: np.ndarray | None = None
    p_binary: np.ndarray | None = None

    def columns(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        kind = SAMPLE_METRICS[metric][1]
        if kind == "binary":
            return None if self.y_binary is None else (self.y_binary, self.p_binary)
        return self.y, self.p


def write_test_predictions(run_dir: Path) -> Path | None:
    """Predict the test split with the run's best checkpoint (raw probabilities, argmax decisions: what
    the run's own test metrics are) into `run_dir/test_predictions.csv`; None without a test split."""
    import torch

    from bcc.evaluate import _infer
    from bcc.operating_point import OperatingPointError, binary_head
    from bcc.predict import decide, load_inference_model
    from bcc.sources import load_data
    from bcc.stream import eval_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    im = load_inference_model(run_dir, device=device, calibrated=False, operating_point=False)
    data = im.config.data
    manifest = load_data(data)  # data.shards (its fold view) or the sources of data.sources
    if data.test_split not in manifest.splits or manifest.split(data.test_split).count == 0:
        return None
    raw = _infer(im, eval_loader(manifest, data.test_split, data, rank=0, world_size=1,
                                 pin_memory=device.type == "cuda"))
    order = sorted(range(len(raw["key"])), key=lambda i: (raw["source"][i], raw["key"][i]))
    decided = decide(im.taxonomy, [torch.softmax(z.double(), dim=1) for z in raw["logits"]])
    try:
        h, _ = binary_head(im.taxonomy)
    except OperatingPointError:
        h = None
    table = im.taxonomy.target_table()
    path = run_dir / PREDICTIONS_FILE
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "key", "label", "pred", "label_binary", "pred_binary"])
        for i in order:
            y = int(raw["label"][i])
            binary = ["", ""] if h is None else [int(table[y, h]), int(raw["logits"][h][i].argmax())]
            writer.writerow([raw["source"][i], raw["key"][i], y, int(decided[i]), *binary])
    return path


def read_predictions(run_dir: Path) -> Predictions | None:
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open(newline="")))
    has_binary = bool(rows) and rows[0]["label_binary"] != ""

    def ints(col: str) -> np.ndarray:
        return np.array([int(r[col]) for r in rows], dtype=np.int64)

    return Predictions(tuple(f"{r['source']}/{r['key']}" for r in rows), ints("label"), ints("pred"),
                       ints("label_binary") if has_binary else None, ints("pred_binary") if has_binary else None)


# --------------------------------------------------------------------------- aggregation: one run


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
    finetune: str = ""  # finetune.preset
    init: str = ""  # "pretrained" or "scratch" (whether model.pretrained was set)
    seed: int = 0  # train.seed
    test_all: dict[str, float] = field(default_factory=dict)  # every scalar test metric of the run

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
        finetune=cfg.finetune.preset,
        init="pretrained" if cfg.model.pretrained else "scratch",
        seed=cfg.train.seed,
        test_all={k: float(v) for k, v in (test[-1] if test else {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)},
    )


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
    return (["mode", "finetune", "init", "seed", "epochs", "best_epoch"] + [f"val_{k}" for k in metrics]
            + [f"test_{k}" for k in tests]
            + ["train_time_s", "sec_per_step", "step_time_s", "trainable_final", "trainable_mean", "total_params"])


def _row(r: ModeResult, step_time: float | None, metrics: Sequence[str], test_metrics: Sequence[str] = ()) -> dict:
    row = {"mode": r.mode, "finetune": r.finetune, "init": r.init, "seed": r.seed, "epochs": r.epochs,
           "best_epoch": r.best_epoch}
    row.update({f"val_{k}": r.val.get(k, math.nan) for k in metrics})
    row.update({f"test_{k}": r.test_all.get(k, r.test.get(k, math.nan)) for k in dict.fromkeys([*metrics, *test_metrics])})
    row.update({"train_time_s": r.train_time, "sec_per_step": r.sec_per_step,
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
    runs = {n: [read_mode(n, d) for d in find_runs(out, n)] for n in present}
    preds = {n: [read_predictions(d) for d in find_runs(out, n)] for n in present}
    first = runs[present[0]][0]
    metrics = first.metrics
    cfg = load_saved_config(first.run_dir / "config.yaml")
    has_binary = any(k.startswith("binary_") for k in first.test_all)
    test_metrics = list(dict.fromkeys([*metrics, *sample_metrics(has_binary)]))
    results = summarize_arms(runs, preds, metrics, test_metrics, metrics[0], cfg.checkpoint.mode, n_boot=n_boot)

    _write_csv(out / "results.csv", csv_columns(metrics, test_metrics),
               [_row(r, (bench or {}).get(r.finetune), metrics, test_metrics) for rs in runs.values() for r in rs])
    _write_csv(out / "summary.csv", summary_columns(metrics, test_metrics),
               [_summary_row(a, metrics, test_metrics) for a in results])
    _plot([rs[0] for rs in runs.values()], out / "val_curves.png")
    missing = [n for n in names if n not in present]
    short = [f"{a.name} ({len(a.runs)} of {expected_seeds})" for a in results
             if expected_seeds is not None and len(a.runs) < expected_seeds]
    with atomic_write(out / "RESULTS.md") as f:
        f.write(_markdown(results, metrics, test_metrics, bench, command, missing, short, n_boot, cfg.checkpoint.mode))
    return results


def _plot(results: Sequence[ModeResult], path: Path) -> None:
    from bcc.plots import plot_curves

    metric = results[0].metrics[0]
    plot_curves({r.mode: r.rows for r in results}, metric, path, split="val",
                title=f"validation {metric} by fine-tuning mode (first seed)")


def _pm(mean_sd_: tuple[float, float]) -> str:
    mean, sd = mean_sd_
    return _fmt(mean) if math.isnan(sd) else f"{_fmt(mean)} ± {_fmt(sd)}"


def _interval(ci: tuple[float, float]) -> str:
    return "" if math.isnan(ci[0]) else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _markdown(results: Sequence[ArmResult], metrics, test_metrics, bench, command, missing, short, n_boot,
              select_mode: str = "max") -> str:
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
              "best checkpoint. Cells are mean ± sd over seeds; [lo, hi] is the 95% percentile bootstrap "
              f"interval of the seed mean ({n_boot} resamples of the test samples, fixed rng). "
              "`s/step (wall)` is train time / optimizer steps, evaluation and checkpoints included.", ""]
    if chosen is not None:
        best = "highest" if select_mode == "max" else "lowest"
        lines += [f"**Chosen on validation: {chosen.name}** (✓), the {best} mean val {select} over seeds; "
                  "the test split played no part in the choice.", ""]
    head = ["arm", "chosen", "init", "seeds", "best ep", *(f"val {k}" for k in metrics), *(f"test {k}" for k in test_metrics),
            "train s", "s/step (wall)", "trainable final", "trainable mean"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in results:
        rs = a.runs
        cells = [a.name, "✓" if a.chosen else "", rs[0].init, str(len(rs)),
                 " ".join(str(r.best_epoch) for r in rs)]
        cells += [_pm(a.val[m]) for m in metrics]
        cells += [_pm(a.test[m]) + _interval(a.ci[m]) for m in test_metrics]
        cells += [_fmt(statistics.fmean(r.train_time for r in rs)),
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


def compare(config: str | Path | None, modes: Sequence[str], out: str | Path, processes: int = 1,
            overrides: Sequence[str] = (), command: str = "", bench_steps: int = 5, seeds: int = 1,
            inits: Sequence[str] | None = None, packs: Sequence[str] = (), n_boot: int = N_BOOT) -> list[ArmResult]:
    """Train every arm (mode x init) with every seed (skipping finished runs), time frozen vs full steps,
    then aggregate. `packs`, when given, holds one pack per seed (the split varies with the seed)."""
    out = Path(out)
    cfg = load_config(config, list(overrides))
    arms = plan_arms(modes, inits, cfg.model.pretrained)  # unknown modes fail before any training
    seed_values = seed_list(cfg.train.seed, seeds)
    if packs and len(packs) != seeds:
        raise CompareError(f"--packs gives {len(packs)} pack(s) for --seeds {seeds}: one pack per seed")
    for pack in packs:
        if not (Path(pack) / "manifest.json").is_file():
            raise CompareError(f"--packs: {pack} is not a packed dataset (no manifest.json)")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for arm in arms:
        for k, seed in enumerate(seed_values):
            run_dir = run_dir_of(out, arm.name, seed if seeds > 1 else None)
            rc = train_mode(config, overrides, run_overrides(arm, run_dir, seed if seeds > 1 else None,
                                                             packs[k] if packs else None), run_dir, processes)
            if rc != 0:
                failed.append(f"{run_dir.relative_to(out)} (exit {rc})")
    bench = None
    if bench_steps > 0:
        from bcc.bench import step_seconds

        bench = step_seconds(cfg, ("frozen", "full"), steps=bench_steps)
        write_json(out / "step_times.json", bench)
    results = aggregate(out, modes, bench, command, arms=[a.name for a in arms], n_boot=n_boot,
                        expected_seeds=seeds)
    if failed:
        raise CompareError(f"training failed for {', '.join(failed)}; the table holds the other runs")
    return results


def load_bench(out: str | Path) -> dict[str, float] | None:
    """step_times.json of an earlier `compare` (older files named the presets `heads`/`all`)."""
    path = Path(out) / "step_times.json"
    if not path.is_file():
        return None
    old = {"heads": "frozen", "all": "full"}
    return {old.get(k, k): v for k, v in json.loads(path.read_text()).items()}
