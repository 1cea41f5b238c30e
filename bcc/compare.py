"""Fine-tuning modes compared on the same shards and epoch budget: frozen, staged, full and LP-FT, each from
the pretrained backbone and from scratch, over several seeds.

`compare` trains one run directory per arm and seed: an arm is a mode (`finetune.preset`) from one
initialisation (`--init pretrained,scratch`: `OUT/<mode>` holds the config's own initialisation,
`OUT/<mode>-scratch` random weights where the config names `model.pretrained`); with `--seeds N` each arm
trains N times (`train.seed` = the config's seed + 0..N-1; `OUT/<arm>/seed-<s>/`), on one pack or, with
`--packs`, on one pack per seed (the split then varies with the seed too). After training, each run's
best checkpoint predicts the test split once (`test_predictions.csv`, argmax decisions of the weights
`bcc eval` uses by default: `--weights auto`, `bcc.export.choose_weights`), so that the aggregation can
resample the test samples; then `bcc.compare_table.aggregate` writes the tables. A run trained with
`train.ema_decay` is then tabulated with the same weights throughout: its val and test metrics are the
`ema_*` columns of its log when auto chose the EMA weights (`ModeResult.weights` says which).

This module owns planning and training the arms and reading one finished run back (`read_mode`: its best
epoch, test metrics and epoch times; `read_predictions`: its per-sample test decisions), which
`bcc.compare_table` (over seeds, the files) and `bcc cv` build on. `bcc.compare_check` refuses a comparison
before it trains (a run that would fail, a run dir holding another config's run) and tables over runs of
different configs.

`describe_finetune` (used by `bcc model groups`) lists the parameter groups of the configured model
and what each stage trains, without any data.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bcc.atomic import atomic_write, write_json
from bcc.config import Config, load_config, load_saved_config
from bcc.errors import BccError
from bcc.stats import N_BOOT, SAMPLE_METRICS
from bcc.train.runlog import read_rows as read_metrics_rows

if TYPE_CHECKING:
    from bcc.compare_table import ArmResult

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
            for mode in dict.fromkeys(modes) for init in dict.fromkeys(inits)]  # once each: one run dir, one task


def seed_list(base: int, seeds: int) -> list[int]:
    """`train.seed` of each of `seeds` runs: the config's seed, then the next ones; the last must be a
    valid train.seed too (checked here, before the first run trains)."""
    from bcc.config_parse import SEED_MAX

    if seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {seeds}")
    if base + seeds - 1 > SEED_MAX:
        raise CompareError(f"train.seed={base} with --seeds {seeds} runs seeds up to {base + seeds - 1}, past the "
                           f"largest train.seed {SEED_MAX}; lower train.seed to at most {SEED_MAX - seeds + 1}")
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


RESUME = "checkpoint.resume=auto"  # every run of a comparison continues its run dir when interrupted


def train_mode(config: str | Path | None, overrides: Sequence[str], run_overrides: Sequence[str], run_dir: Path,
               processes: int = 1) -> int:
    """Train one run into `run_dir` (resuming it when interrupted before), then predict its test split
    with the best checkpoint (`test_predictions.csv`, for the bootstrap). Returns the exit code.

    One process runs in this process (`bcc.train.fit`); more go through `accelerate launch`.
    """
    if not (run_dir / "summary.json").is_file():  # finished runs are skipped: compare is re-runnable
        from bcc.launch import train_run

        rc = train_run(config, [*overrides, *run_overrides, RESUME], processes)
        if rc != 0:
            return rc
    if not has_current_predictions(run_dir):
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
    weights: str | None = None  # "raw" or "ema": which weights decided (None: a file of an older bcc)

    def columns(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        kind = SAMPLE_METRICS[metric][1]
        if kind == "binary":
            return None if self.y_binary is None else (self.y_binary, self.p_binary)
        return self.y, self.p


def load_run_model(run_dir: Path, device=None):
    """The run's best checkpoint with the weights `bcc eval` takes by default (`--weights auto`, with the
    temperatures and operating point in use, as `bcc.export.choose_weights` decides): the one choice of
    every evaluation of a run (bcc compare, bcc cv, bcc report). `InferenceModel.weights` says which."""
    from bcc.predict import load_inference_model

    return load_inference_model(run_dir, device=device, weights="auto")


def chosen_weights(run_dir: Path) -> str:
    """"raw" or "ema": the weights `load_run_model` takes for this run."""
    return load_run_model(run_dir, device="cpu").weights


def has_current_predictions(run_dir: Path) -> bool:
    """Whether `run_dir/test_predictions.csv` exists and says which weights made it (older files do not)."""
    p = read_predictions(run_dir)
    return p is not None and p.weights is not None


def write_test_predictions(run_dir: Path) -> Path | None:
    """Predict the test split with the run's best checkpoint (`load_run_model`'s weights; unscaled
    probabilities, argmax decisions: what the run's test metrics of those weights are) into
    `run_dir/test_predictions.csv`; None without a test split."""
    import torch

    from bcc.evaluate import _infer
    from bcc.operating_point import OperatingPointError, binary_head
    from bcc.predict import decide
    from bcc.sources import load_data
    from bcc.stream import eval_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    im = load_run_model(run_dir, device=device)
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
        writer.writerow(["source", "key", "label", "pred", "label_binary", "pred_binary", "weights"])
        for i in order:
            y = int(raw["label"][i])
            binary = ["", ""] if h is None else [int(table[y, h]), int(raw["logits"][h][i].argmax())]
            writer.writerow([raw["source"][i], raw["key"][i], y, int(decided[i]), *binary, im.weights])
    return path


def read_predictions(run_dir: Path) -> Predictions | None:
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open(newline="")))
    has_binary = bool(rows) and rows[0]["label_binary"] != ""

    def ints(col: str) -> np.ndarray:
        return np.array([int(r[col]) for r in rows], dtype=np.int64)

    weights = {r.get("weights") or None for r in rows}
    return Predictions(tuple(f"{r['source']}/{r['key']}" for r in rows), ints("label"), ints("pred"),
                       ints("label_binary") if has_binary else None, ints("pred_binary") if has_binary else None,
                       weights.pop() if len(weights) == 1 else None)


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
    cpu_time: float = math.nan  # CPU seconds of all ranks' process trees (summary.json; nan for older runs)
    weights: str = "raw"  # the weights whose metrics val/test/test_all hold: "raw", or "ema" (the `ema_*` columns)

    @property
    def sec_per_step(self) -> float:
        return self.train_time / self.steps if self.steps else math.nan


def read_rows(run_dir: Path) -> list[dict]:
    return read_metrics_rows(Path(run_dir) / "metrics.jsonl")


def read_mode(mode: str, run_dir: Path, weights: str = "raw") -> ModeResult:
    """Collect one finished run directory; its best epoch is the best by its `checkpoint.metric`. With
    `weights` "ema" (what `chosen_weights` says for a run with an EMA) the val and test values are its EMA
    weights' (`ema_<name>`) under the plain names, so the table reads the weights `bcc eval` evaluates."""
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
    # the best checkpoint, as training chose it
    best_i = max(range(len(val)), key=lambda i: sign * val[i].get(metric, -sign * math.inf))
    if weights == "ema":  # that checkpoint's EMA weights: `ema_bacc` read as `bacc` (an `ema_` name as it is)
        val = [{**r, **{k[len("ema_"):]: v for k, v in r.items() if k.startswith("ema_")}} for r in val]
        test = [{k[len("ema_"):]: v for k, v in r.items() if k.startswith("ema_")} for r in test]
    best = val[best_i]
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
        cpu_time=sum(float(r.get("cpu_seconds", math.nan)) for r in summary.get("ranks", [{}])),
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
        weights=weights,
    )


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a comparison: its arm, train.seed (None: the config's, single-seed layout),
    run directory and the overrides that make it (applied after the user's)."""

    arm: Arm
    seed: int | None
    run_dir: Path
    overrides: tuple[str, ...]


def plan_runs(cfg: Config, modes: Sequence[str], out: str | Path, seeds: int = 1,
              inits: Sequence[str] | None = None, packs: Sequence[str] = (),
              explicit: Collection[str] | None = None) -> list[PlannedRun]:
    """Every run of a comparison, arm by arm (`plan_arms`), seed by seed: what `compare` trains in turn
    and what `slurm/compare.sbatch` trains one per array task (`bcc compare --plan`). A scratch arm
    takes the data settings (image_size, mean, std, crop_pct) the pretrained arms resolve to from their
    source (`bcc.pretrained.followed_overrides`; `explicit`: the keys the user set, which stay).
    Raises CompareError for an unknown mode or init, --seeds < 1, or --packs that do not match."""
    arms = plan_arms(modes, inits, cfg.model.pretrained)  # unknown modes fail before any training
    seed_values = seed_list(cfg.train.seed, seeds)
    if packs and len(packs) != seeds:
        raise CompareError(f"--packs gives {len(packs)} pack(s) for --seeds {seeds}: one pack per seed")
    from bcc.remote import is_local

    for pack in packs:  # a URL or pipe: pack is checked as it is fetched (`check_packs`)
        if is_local(pack) and not (Path(pack) / "manifest.json").is_file():
            raise CompareError(f"--packs: {pack} is not a packed dataset (no manifest.json)")
    if packs:
        from bcc.compare_check import check_packs  # here: compare_check imports this module

        check_packs(packs)  # one data set and taxonomy, split once per seed
    from bcc.pretrained import followed_overrides

    scratch = [a.forces_scratch for a in arms]  # with no pretrained arm there is nothing to match (or to read)
    same = followed_overrides(cfg, explicit or ()) if any(scratch) and not all(scratch) else []
    runs = []
    for arm in arms:
        for k, seed in enumerate(seed_values):
            seed_or_none = seed if seeds > 1 else None
            run_dir = run_dir_of(Path(out), arm.name, seed_or_none)
            runs.append(PlannedRun(arm, seed_or_none, run_dir, tuple(run_overrides(
                arm, run_dir, seed_or_none, packs[k] if packs else None)) + tuple(same if arm.forces_scratch else ())))
    return runs


def compare(config: str | Path | None, modes: Sequence[str], out: str | Path, processes: int = 1,
            overrides: Sequence[str] = (), command: str = "", bench_steps: int = 5, seeds: int = 1,
            inits: Sequence[str] | None = None, packs: Sequence[str] = (), n_boot: int = N_BOOT) -> list[ArmResult]:
    """Train every arm (mode x init) with every seed (skipping finished runs), time frozen vs full steps,
    then aggregate. `packs`, when given, holds one pack per seed (the split varies with the seed)."""
    out = Path(out)
    cfg = load_config(config, list(overrides))
    from bcc.pretrained import explicit_keys

    runs = plan_runs(cfg, modes, out, seeds, inits, packs, explicit_keys(config, overrides))
    from bcc.compare_check import check_runs

    check_runs(config, overrides, runs)  # every error a run would meet, before the first one trains
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for run in runs:
        rc = train_mode(config, overrides, run.overrides, run.run_dir, processes)
        if rc != 0:
            failed.append(f"{run.run_dir.relative_to(out)} (exit {rc})")
    bench = None
    if bench_steps > 0:
        from bcc.bench import step_seconds

        bench = step_seconds(cfg, ("frozen", "full"), steps=bench_steps)
        write_json(out / "step_times.json", bench)
    from bcc.compare_table import aggregate  # the tables build on this module

    results = aggregate(out, modes, bench, command, arms=list(dict.fromkeys(r.arm.name for r in runs)),
                        n_boot=n_boot, expected_seeds=seeds)
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
