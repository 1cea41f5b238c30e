"""k-fold cross-validation on a pack made with `bcc pack --folds K`.

`cross_validate` trains one run directory per fold (`OUT/fold-<k>/`), each the same config with only
`data.fold=k` added (fold k validates, the other K-1 folds of train+val train; the test split is the
pack's own and stays fixed), then predicts every fold's validation samples with that fold's best
checkpoint, so each train+val sample is predicted once, by the one model that did not train on it
(out-of-fold predictions). `aggregate` reads the run directories back and writes

- `OUT/oof_predictions.csv`: key, source, fold, true class, predicted class, then the per-head and
  combined probabilities (the columns of `bcc eval`'s predictions.csv), sorted by key;
- `OUT/cv_summary.json` and `OUT/CV.md`: per fold and mean +- sd (sample standard deviation over the
  folds) of the best epoch's val metrics and of the test metrics, and the pooled out-of-fold
  accuracy and balanced accuracy.

Every fold is evaluated with the weights `bcc eval` takes by default (`--weights auto`: the EMA weights
of a run trained with `train.ema_decay`, `bcc.compare.load_run_model`), its val and test metrics
included (the `ema_*` columns then), and CV.md says which. The out-of-fold probabilities are unscaled
and decided at argmax: the run's temperature and operating point were fitted on the very fold they
predict. Like `bcc compare`, finished folds are skipped on a re-run and
interrupted ones resume, and aggregation needs nothing but the run directories (an array job can
train the folds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcc.atomic import atomic_write, write_json
from bcc.config import load_config, load_saved_config
from bcc.errors import BccError

__all__ = ["CvError", "OOF_FILE", "aggregate", "cross_validate", "fold_dir", "predict_fold", "train_fold"]

OOF_FILE = "oof_predictions.csv"
SUMMARY_FILE = "cv_summary.json"


class CvError(BccError):
    """Cross-validation that cannot run or be aggregated (a pack without folds, K that disagrees, a
    fold that did not finish)."""


def fold_dir(out: str | Path, fold: int) -> Path:
    return Path(out) / f"fold-{fold}"


def check_folds(shards: str | Path, folds: int) -> None:
    """The pack at `shards` must have been made with `--folds folds`."""
    from bcc.manifest import Manifest

    k = Manifest.load(shards).folds
    if k is None:
        raise CvError(f"{shards} has no cross-validation folds; pack it with `bcc pack --folds {folds}`")
    if k != folds:
        raise CvError(f"--folds {folds} but {shards} was packed with {k} folds; use --folds {k} or repack")


@dataclass(frozen=True)
class FoldRun:
    """One fold's training run: its run dir and the overrides that make it (after the user's)."""

    fold: int
    run_dir: Path
    overrides: tuple[str, ...]


def plan_folds(out: str | Path, folds: int) -> list[FoldRun]:
    return [FoldRun(k, fold_dir(out, k), (f"data.fold={k}", f"run.dir={fold_dir(out, k)}")) for k in range(folds)]


def check_fold_runs(config: str | Path | None, overrides: Sequence[str], runs: Sequence[FoldRun]) -> None:
    """Before any fold trains: every fold's config loads, its fine-tuning plan resolves and its
    eval.operating_point can be fitted on its validation fold, and a fold
    dir that already holds a run (finished: it would be reused; interrupted: resumed) holds one of this
    config, compared as `bcc compare` compares its runs (`bcc.compare_check.check_runs`: the keys a
    resumed run may change are free, the budget and checkpoint metric are not). CvError naming the
    fold's run dir and the differing keys."""
    from bcc.compare import CompareError
    from bcc.compare_check import check_runs

    try:
        check_runs(config, overrides, runs, command="bcc cv")
    except CompareError as e:
        raise CvError(str(e)) from None


def train_fold(config: str | Path | None, overrides: Sequence[str], fold: int, out: str | Path,
               processes: int = 1) -> int:
    """Train fold `fold` into `out/fold-<fold>` (resuming it when interrupted). Returns the exit code.
    A finished fold is skipped: `cross_validate` checked first that it holds a run of this config."""
    from bcc.launch import train_run

    run_dir = fold_dir(out, fold)
    if (run_dir / "summary.json").is_file():
        return 0
    return train_run(config, [*overrides, f"data.fold={fold}", f"run.dir={run_dir}", "checkpoint.resume=auto"],
                     processes)


def predict_fold(run_dir: str | Path) -> dict[str, Any]:
    """Out-of-fold predictions of one finished fold run: its best checkpoint on its validation fold.

    Returns {"fold", "key", "source", "label" (LongTensor[N]), "head_probs" (per head [N, C_h]),
    "probs" (combined [N, classes]), "decided" (LongTensor[N]), "taxonomy", "weights" ("raw"/"ema")},
    sorted by (source, key); probabilities unscaled, decisions at argmax.
    """
    import torch

    from bcc.compare import load_run_model
    from bcc.evaluate import _infer, _merge
    from bcc.manifest import Manifest
    from bcc.metrics import combined_probs
    from bcc.predict import decide
    from bcc.stream import eval_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    im = load_run_model(run_dir, device=device)  # the weights bcc eval takes; their scaling is not used here
    data = im.config.data
    if data.fold is None:
        raise CvError(f"{run_dir} was not trained on a fold (its data.fold is unset)")
    view = Manifest.load(data.shards).with_fold(data.fold, train=data.train_split, val=data.val_split)
    loader = eval_loader(view, data.val_split, data, rank=0, world_size=1)
    merged = _merge([_infer(im, loader)])
    if merged["failed"] or len(merged["key"]) != view.split(data.val_split).count:
        raise CvError(f"fold {data.fold}: {len(merged['key'])} of {view.split(data.val_split).count} "
                      f"validation samples predicted ({len(merged['failed'])} unreadable)")
    head_probs = [torch.softmax(z.double(), dim=1) for z in merged["logits"]]
    return {"fold": data.fold, "key": merged["key"], "source": merged["source"], "label": merged["label"],
            "head_probs": head_probs, "probs": combined_probs(im.taxonomy, merged["logits"]).double(),
            "decided": decide(im.taxonomy, head_probs), "taxonomy": im.taxonomy, "weights": im.weights}


def _mean_sd(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(finite) if finite else math.nan,
            "sd": statistics.stdev(finite) if len(finite) > 1 else math.nan,
            "per_fold": list(values)}


def _oof_scores(labels: Sequence[int], decided: Sequence[int]) -> dict[str, float]:
    """Pooled accuracy and balanced accuracy (mean recall over the classes present) of the OOF rows."""
    n = len(labels)
    per_class: dict[int, list[int]] = {}
    for y, p in zip(labels, decided, strict=True):
        per_class.setdefault(y, []).append(int(y == p))
    return {"count": n, "acc": sum(int(y == p) for y, p in zip(labels, decided, strict=True)) / n if n else math.nan,
            "bacc": statistics.fmean(statistics.fmean(v) for v in per_class.values()) if n else math.nan}


def aggregate(out: str | Path, folds: int, command: str = "") -> dict[str, Any]:
    """Read `out/fold-<k>` for every fold; write the OOF CSV, cv_summary.json and CV.md. Returns the summary."""
    import torch

    from bcc.compare import read_mode
    from bcc.compare_check import pretrained_text
    from bcc.predict import write_probability_csv

    out = Path(out)
    missing = [k for k in range(folds) if not (fold_dir(out, k) / "summary.json").is_file()]
    if missing:
        raise CvError(f"fold(s) {', '.join(map(str, missing))} under {out} did not finish (no summary.json)")
    check_same_folds([fold_dir(out, k) for k in range(folds)])
    # the pack's own K, as training checks it: --folds 2 over 2 of a 3-fold pack's runs is no 2-fold CV
    check_folds(load_saved_config(fold_dir(out, 0) / "config.yaml").data.shards, folds)
    preds = [predict_fold(fold_dir(out, k)) for k in range(folds)]
    results = [read_mode(f"fold-{k}", fold_dir(out, k), p["weights"]) for k, p in enumerate(preds)]

    taxonomy = preds[0]["taxonomy"]
    names = taxonomy.class_names
    rows = []
    for p in preds:
        values = torch.cat([*p["head_probs"], p["probs"]], dim=1).tolist()
        for i, key in enumerate(p["key"]):
            rows.append(((key, p["source"][i], str(p["fold"]), names[int(p["label"][i])],
                          names[int(p["decided"][i])]), values[i], ()))
    keys = [r[0][0] for r in rows]
    if len(set(keys)) != len(keys):
        raise CvError("a sample was predicted by more than one fold: the pack's folds overlap")
    rows.sort(key=lambda r: r[0][0])
    write_probability_csv(out / OOF_FILE, taxonomy, ["key", "source", "fold", "true_class", "pred_class"], rows)

    metrics = results[0].metrics
    cfg = load_saved_config(fold_dir(out, 0) / "config.yaml")
    summary = {
        "folds": folds,
        "command": command,
        "shards": cfg.data.shards,
        "checkpoint_metric": cfg.checkpoint.metric,
        "weights": [p["weights"] for p in preds],  # per fold: what bcc eval --weights auto takes
        "val": {m: _mean_sd([r.val.get(m, math.nan) for r in results]) for m in metrics},
        "test": {m: _mean_sd([r.test.get(m, math.nan) for r in results]) for m in metrics},
        "best_epoch": [r.best_epoch for r in results],
        "train_time_s": [r.train_time for r in results],
        "out": str(out),
        "pretrained": pretrained_text([fold_dir(out, k) for k in range(folds)], out),
        "oof": {**_oof_scores([int(y) for p in preds for y in p["label"]],
                              [int(d) for p in preds for d in p["decided"]]), "file": OOF_FILE},
    }
    write_json(out / SUMMARY_FILE, summary)
    with atomic_write(out / "CV.md") as f:
        f.write(_markdown(summary, metrics))
    return summary


def check_same_folds(run_dirs: Sequence[Path]) -> None:
    """The fold runs differ only in data.fold, their run dir and how they executed (`bcc compare`'s rule,
    `bcc.compare_check.run_differences`): mean +- sd over folds of different configs is no result."""
    from bcc.compare_check import run_differences

    ref = load_saved_config(run_dirs[0] / "config.yaml")
    for d in run_dirs[1:]:
        diff = run_differences(ref, load_saved_config(d / "config.yaml"), ("data.fold", "run.dir"))
        if diff:
            raise CvError(f"{d} was trained under another config than {run_dirs[0]} ({'; '.join(diff)}): the "
                          "folds' mean +- sd would mix recipes; retrain it (delete the fold dir and re-run bcc cv)")


def _fmt(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def _markdown(summary: dict[str, Any], metrics: Sequence[str]) -> str:
    k = summary["folds"]
    lines = [f"# {k}-fold cross-validation", ""]
    if summary["command"]:
        lines += [f"Command: `{summary['command']}`", ""]
    kinds = set(summary["weights"])
    weights = ("EMA weights (model_ema.safetensors)" if kinds == {"ema"} else "raw weights" if kinds == {"raw"}
               else "per fold " + "/".join(summary["weights"]) + " weights")
    lines += [f"Weights: {weights}, as `bcc eval --weights auto` takes them, for every metric and prediction below.",
              "", f"Shards: `{summary['shards']}`. Fold k validates and the other {k - 1} folds of train+val train; "
              "val metrics are each fold's best epoch (by its checkpoint.metric "
              f"`{summary['checkpoint_metric']}`), test metrics the fixed test split evaluated with that "
              "fold's best checkpoint; sd is the sample standard deviation over the folds.", ""]
    if summary.get("pretrained"):
        lines += [summary["pretrained"], ""]
    head = ["metric", "mean ± sd", *(f"fold {i}" for i in range(k))]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in ("val", "test"):
        for m in metrics:
            s = summary[split][m]
            lines.append(f"| {split} {m} | {_fmt(s['mean'])} ± {_fmt(s['sd'])} | "
                         + " | ".join(_fmt(v) for v in s["per_fold"]) + " |")
    oof = summary["oof"]
    lines += ["", f"Out-of-fold ({oof['count']} train+val samples, each predicted once by the model that did not "
              f"train on it, uncalibrated): acc {_fmt(oof['acc'])}, bacc {_fmt(oof['bacc'])} -> `{oof['file']}`", ""]
    return "\n".join(lines)


def cross_validate(config: str | Path | None, folds: int, out: str | Path | None = None, processes: int = 1,
                   overrides: Sequence[str] = (), command: str = "") -> dict[str, Any]:
    """Train every fold (skipping finished ones), then aggregate. `out` defaults to the config's run.dir."""
    cfg = load_config(config, list(overrides))
    if cfg.data.fold is not None:
        raise CvError(f"the config sets data.fold={cfg.data.fold}; bcc cv sets it per fold")
    check_folds(cfg.data.shards, folds)
    out = Path(out) if out is not None else Path(cfg.run.dir)
    check_fold_runs(config, overrides, plan_folds(out, folds))  # a finished fold of another config is no result
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for k in range(folds):
        rc = train_fold(config, overrides, k, out, processes)
        if rc != 0:
            failed.append(f"fold {k} (exit {rc})")
    if failed:
        raise CvError(f"training failed for {', '.join(failed)}; re-run to resume them")
    return aggregate(out, folds, command)
