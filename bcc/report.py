"""A run report: one self-contained HTML page to look at what a run learned and where it goes wrong.

    bcc report runs/all-224                 # -> runs/all-224/report.html
    bcc report runs/all-224 --hide-paths    # no file names (they may carry patient identifiers)

`write_report(run)` puts on one page, every image inlined as a `data:` URI (the file can be mailed or
attached to a ticket as it is):

* training curves: the validation metrics of `RUN/metrics.jsonl` per epoch (and the training loss
  where the log has training rows), drawn with `bcc.plots.plot_curves`;
* per-split metrics: the last row of every split in `metrics.jsonl` and the evaluation of the report's
  split, combined and per head;
* the confusion matrix and reliability diagram of that evaluation;
* the worst mistakes of the split: wrongly decided images, ordered by the probability given to the
  true class (lowest first), each with its probabilities, its decision at the checkpoint's operating
  point (`bcc.operating_point`, stored by `bcc calibrate --operating-point` or `eval.operating_point`;
  the decision `bcc eval` and `bcc predict` make) beside the argmax decision, and a Grad-CAM overlay per
  head for the label that head predicted (`bcc.gradcam`; the binary head's label at the operating
  point). A two-class head also gets the map of its positive label (label 1: `Malignant` for the ALL
  task), so a missed malignant cell shows what malignant evidence there was.
  A head whose map is all zero (no positive evidence for that label at the target layer) says so
  instead of showing an empty overlay.

The evaluation is what `bcc eval` writes (`RUN/eval-<split>/`: metrics.json, predictions.csv,
confusion.png, reliability.png), with the weights `bcc eval` takes by default (`--weights auto`: the EMA
weights of a run trained with `train.ema_decay`, `bcc.compare.load_run_model`; the page says which, and
Grad-CAM explains those weights too). It is reused when it was made from the run's current best
checkpoint with those weights and the temperatures and operating point stored now; otherwise (none yet, an older checkpoint, other
temperatures or another operating point) it is run here through `bcc.evaluate.evaluate_checkpoint` and
written to the same place, as `bcc eval` would; with `out` (`bcc report --out DIR`) it is looked for in
DIR first and written to `DIR/eval-<split>`, so a report elsewhere never writes into the run dir. Images come from the evaluated data: the shards of
a packed split (found by sample key, read with `bcc.shards.read_shard`) or the files of an image folder.

File names are the samples' `source`, i.e. relative to the data root that was packed or evaluated.
With `hide_paths` the page shows no file name, data path or checkpoint path at all: mistakes are
numbered, the run is named by its directory name only.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bcc.errors import BccError
from bcc.report_html import CSS, decision_text, gallery, img_tag, metric_table, png
from bcc.train.runlog import canonical_metric, migrate_row, read_rows  # the one metrics.jsonl reader

__all__ = ["ReportError", "argmax_classes", "canonical_metric", "decision_text", "read_metrics_log", "worst_mistakes",
           "write_report"]

REPORT_FILE = "report.html"
WEIGHTS_TEXT = {"raw": "raw weights", "ema": "EMA weights (model_ema.safetensors, train.ema_decay)"}
# the curves drawn, in this order (the metric tables' order is bcc.report_html.LEADING)
CURVES = ("loss", "bacc", "acc", "binary_bacc", "binary_auroc", "ece")


class ReportError(BccError):
    """A run that cannot be reported on (no metrics log, data gone, ...), with a message for the user."""


# --------------------------------------------------------------------------- reading the run


def read_metrics_log(run: str | Path) -> list[dict[str, Any]]:
    """The rows of `RUN/metrics.jsonl` with canonical metric names (`bcc.train.runlog.read_rows`: a bad
    line is an error naming it); a missing log is a ReportError."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: is {run} a bcc run directory?")
    return read_rows(path)


@dataclass(frozen=True)
class Mistake:
    rank: int  # 1 = worst
    source: str  # relative to the data root
    key: str
    true_class: str
    pred_class: str
    p_true: float  # combined probability of the true class
    p_pred: float
    head_probs: dict[str, dict[str, float]]  # head -> label -> probability (as evaluated)
    argmax_class: str = ""  # the decision at argmax (pred_class is at the operating point, when there is one)


def _read_predictions(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e}") from e


def argmax_classes(rows: Sequence[Mapping[str, str]], taxonomy) -> list[str]:
    """The hierarchical decision at argmax (no operating point) of `predictions.csv` rows, from their
    head probabilities."""
    import torch

    from bcc.predict import decide

    if not rows:
        return []
    probs = [torch.tensor([[float(r[f"{h.name}:{lab}"]) for lab in h.labels] for r in rows], dtype=torch.float64)
             for h in taxonomy.heads]
    return [taxonomy.class_names[int(c)] for c in decide(taxonomy, probs, None)]


def worst_mistakes(rows: Sequence[Mapping[str, str]], taxonomy, limit: int) -> list[Mistake]:
    """The wrongly decided rows of a `predictions.csv` (its `pred_class`: the decision `bcc eval` made,
    at the operating point when the checkpoint has one), lowest probability of the true class first
    (ties: most probable wrong answer first, then by source); at most `limit`."""
    wrong = [row for row in rows if row["true_class"] != row["pred_class"]]
    found = []
    for row, argmax in zip(wrong, argmax_classes(wrong, taxonomy), strict=True):
        head_probs = {h.name: {lab: float(row[f"{h.name}:{lab}"]) for lab in h.labels} for h in taxonomy.heads}
        found.append(Mistake(0, row["source"], row["key"], row["true_class"], row["pred_class"],
                             float(row[f"combined:{row['true_class']}"]), float(row[f"combined:{row['pred_class']}"]),
                             head_probs, argmax))
    found.sort(key=lambda m: (m.p_true, -m.p_pred, m.source, m.key))
    return [replace(m, rank=i + 1) for i, m in enumerate(found[:limit])]


# --------------------------------------------------------------------------- the evaluation


def _load_eval(eval_dir: Path) -> dict[str, Any] | None:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a broken evaluation is redone, not reported on


def _same_point(recorded: Mapping[str, Any] | None, im) -> bool:
    """Whether an evaluation's `operating_point` is the decision `im` makes now (None: argmax both)."""
    if recorded is None or im.threshold is None:
        return recorded is None and im.threshold is None
    return (recorded.get("rule") == im.operating_point.get("rule")
            and math.isclose(float(recorded.get("threshold", math.nan)), im.threshold, rel_tol=1e-9, abs_tol=1e-12))


def _evaluation(im, split: str, data: str | Path | None, out: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """The evaluation `bcc eval` writes for this run: `eval-<split>` (a packed split) or `eval-<folder
    name>` (`data` an image folder), looked for under `out` and then the run dir. Reused when its
    metrics.json says it was made from the current best checkpoint with the weights, temperatures and
    operating point in use now (and from `data`, when given); else evaluated now and written under `out`
    (`bcc report --out`: nothing is written into the run dir), or the run dir when `out` is None. Returns
    (its folder, its metrics.json, whether it was reused)."""
    from bcc.evaluate import evaluate_checkpoint

    if data is None and im.config.data.sources:
        raise ReportError(f"{im.run_dir} was trained on data.sources "
                          f"({', '.join(s.shards for s in im.config.data.sources)}); pass --data with the pack to "
                          "report on")
    from bcc import remote

    location = str(data) if data is not None else im.config.data.shards
    is_remote = not remote.is_local(location)  # a URL or pipe: dataset: evaluated from there (not a Path: `http:/`)
    source = None if is_remote else Path(location)
    is_folder = source is not None and data is not None and source.is_dir() and not (source / "manifest.json").is_file()
    name = f"eval-{source.resolve().name if is_folder else split}"
    files = ("metrics.json", "predictions.csv", "confusion.png", "reliability.png")

    def is_current(done: Mapping[str, Any] | None, eval_dir: Path) -> bool:
        # `fold` in it: made by a bcc that evaluates a fold run's train/val split in its fold view (an older
        # evaluation of `val` may hold the pack's own val split, most of which such a run trained on)
        if not (done is not None and "fold" in done and done.get("checkpoint") == str(im.checkpoint)
                and done.get("weights", "raw") == im.weights and done.get("temperatures") == (im.temperatures or None)
                and _same_point(done.get("operating_point"), im) and all((eval_dir / f).is_file() for f in files)):
            return False
        if is_remote:
            return done.get("split") == split and done.get("data") == location
        # and of this data: without --data the run's own (an evaluation `bcc eval -d OTHER` left in the run dir
        # is another pack's, not the run's test split)
        return ((done.get("kind") == "folder" if is_folder else done.get("split") == split)
                and Path(done.get("data", "")) == source.resolve())

    for base in dict.fromkeys([*([out] if out is not None else []), im.run_dir]):
        done = _load_eval(base / name)
        if is_current(done, base / name):
            return base / name, done, True
    if source is not None and not source.exists():
        raise ReportError(f"the run's data {source} does not exist (moved?): pass --data with the packed dataset")
    eval_dir = (out if out is not None else im.run_dir) / name
    return eval_dir, evaluate_checkpoint(im.checkpoint, location if is_remote else source, split=split, out=eval_dir,
                                         workers=0, weights=im.weights,
                                         key="--data" if data is not None else "data.shards"), False


def _folder_file(root: Path, source: str) -> Path:
    """The file of a folder evaluation's `source`, which is its name's printable form
    (`bcc.imageio.display_path`): for a name that is not UTF-8, the file whose printable name it is."""
    from bcc.imageio import display_path

    path = root / source
    if path.exists():
        return path
    return next((p for p in root.rglob("*") if display_path(p.relative_to(root).as_posix()) == source), path)


def _read_images(evaluation: Mapping[str, Any], mistakes: Sequence[Mistake], data_cfg):
    """The evaluated images of `mistakes`, decoded (RGB PIL), in their order. A fold run's train/val split
    (`fold` in the evaluation) is read in the fold view `bcc eval` evaluated (`Manifest.with_fold` with the
    run's split names `data_cfg`): fold k's samples lie in the pack's train and val shards."""
    from bcc import remote
    from bcc.predict import read_image

    root = Path(evaluation["data"]) if remote.is_local(evaluation["data"]) else evaluation["data"]
    if evaluation.get("kind") == "folder":
        return [read_image(_folder_file(root, m.source)) for m in mistakes]
    from bcc.manifest import Manifest, ManifestError
    from bcc.shards import IMAGE_KEYS, read_shard

    wanted = {m.key for m in mistakes}
    found: dict[str, bytes] = {}
    try:
        manifest = Manifest.load(root).with_fold(evaluation.get("fold"), train=data_cfg.train_split,
                                                 val=data_cfg.val_split)
    except ManifestError as e:
        raise ReportError(f"the evaluated images are gone ({e}); pass --data with the packed dataset") from e
    for shard in manifest.split(evaluation["split"]).shards:
        if len(found) == len(wanted):
            break
        # the one reader of the shard format (a ShardError names the shard); stop once all are found
        for sample in read_shard(shard):
            if sample["__key__"] in wanted:
                image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if image is not None:
                    found[sample["__key__"]] = image
                    if len(found) == len(wanted):
                        break
    missing = sorted(wanted - found.keys())
    if missing:
        from bcc.evaluate import shown_split

        raise ReportError(f"samples {', '.join(missing[:5])} are not in the shards of split "
                          f"{shown_split(evaluation['split'], evaluation.get('fold'))} of {root}")
    return [read_image(io.BytesIO(found[m.key])) for m in mistakes]


def _gradcam_panels(im, images, mistakes: Sequence[Mistake]) -> list[list[dict[str, Any]]]:
    """Per mistake, the panels to show: {title, png (bytes) or None, note}."""
    import torch

    from bcc.gradcam import GradCAM, overlay

    taxonomy = im.taxonomy
    cam = GradCAM(im.model, image_size=im.image_size)

    def explain(classes: Mapping[str, torch.Tensor], chunk: int = 16) -> dict[str, torch.Tensor]:
        parts = []
        for lo in range(0, len(images), chunk):
            x = torch.stack([im.preprocess(img) for img in images[lo:lo + chunk]]).to(im.device)
            parts.append(cam(x, {h: c[lo:lo + chunk] for h, c in classes.items()}))
        return {h: torch.cat([p[h] for p in parts]) for h in parts[0]}

    # each head's map explains the label it predicted as evaluated: the argmax of its probabilities, the
    # binary head's label at the operating point when the checkpoint has one
    predicted = {h.name: torch.tensor([h.labels.index(max(m.head_probs[h.name], key=m.head_probs[h.name].get))
                                       for m in mistakes]) for h in taxonomy.heads}
    if im.threshold is not None:
        from bcc.operating_point import binary_head

        head = taxonomy.heads[binary_head(taxonomy)[0]]
        predicted[head.name] = torch.tensor([int(m.head_probs[head.name][head.labels[1]] >= im.threshold)
                                             for m in mistakes])
    maps = explain(predicted)
    # a two-class head also explains its positive label (label 1: malignant), whatever it predicted
    positive = {h.name: explain({**predicted, h.name: torch.ones(len(mistakes), dtype=torch.long)})[h.name]
                for h in taxonomy.heads if len(h.labels) == 2}
    crop = im.config.data.crop_pct
    panels: list[list[dict[str, Any]]] = []
    for i, (m, img) in enumerate(zip(mistakes, images, strict=True)):
        row = [{"title": "image", "png": png(img), "note": f"{img.size[0]}×{img.size[1]} px"}]
        shown = [(h, int(predicted[h.name][i]), "predicted", maps[h.name][i]) for h in taxonomy.heads]
        shown += [(h, 1, "positive label", positive[h.name][i]) for h in taxonomy.heads
                  if h.name in positive and int(predicted[h.name][i]) != 1]  # else it is the map above
        decided = dict(taxonomy.classes[taxonomy.class_names.index(m.pred_class)].targets)
        for head, index, what, heat in shown:
            label = head.labels[index]
            title = f"{head.name}: {label} ({what}, p {m.head_probs[head.name][label]:.3f})"
            if head.name not in decided:
                title += f"; this head does not apply to the decision {m.pred_class}"
            if float(heat.max()) <= 0:
                row.append({"title": title, "png": None,
                            "note": f"Grad-CAM map is all zero: no positive evidence for {label!r} at layer "
                                    f"{cam.target_name}"})
            else:
                row.append({"title": title, "png": png(overlay(img, heat, image_size=im.image_size, crop_pct=crop)),
                            "note": ""})
        panels.append(row)
    return panels


# --------------------------------------------------------------------------- figures (HTML: bcc.report_html)


def _curves(rows: Sequence[Mapping[str, Any]], run_name: str, val_split: str, tmp: Path) -> list[bytes]:
    from bcc.plots import plot_curves

    figures = []
    plans = [(metric, val_split) for metric in CURVES]
    if any(r.get("split", "train") == "train" and "loss" in r for r in rows):
        plans.insert(0, ("loss", "train"))
    for metric, split in plans:
        path = tmp / f"{split}-{metric}.png"
        try:
            plot_curves({run_name: rows}, metric, path, split=split)
        except ValueError:  # no values of this metric in the log
            continue
        figures.append(path.read_bytes())
    return figures


# --------------------------------------------------------------------------- the report


def _pretrained_text(run_dir: Path, given: str, hide_paths: bool) -> str:
    """Where the run's starting weights came from, for the header: RUN/pretrained.json (the record
    `bcc.train.fit` writes, `PRETRAINED_FILE`), else the config's `model.pretrained`."""
    if not given:
        return "trained from random weights; "
    try:
        record = json.loads((run_dir / "pretrained.json").read_text())
    except (OSError, ValueError):
        record = {"source": given}
    source = "a source" if hide_paths else f"<code>{html.escape(str(record.get('source')))}</code>"
    digest = str(record.get("sha256") or "")[:12]
    return f"pretrained from {source}" + (f" (sha256 {html.escape(digest)})" if digest else "") + "; "


def _log_column(split: str, row: Mapping[str, Any], data_cfg=None) -> str:
    """A log row's column heading, saying what it measured (issue-14 breaker: a last-epoch val row and
    a best-checkpoint test row both read "epoch 3, log" beside the evaluation of the EMA weights): the
    checkpoint of the final test, or the epoch (step) the row was logged at, and whose weights; for a
    fold run (`data.fold`) its val rows are of fold k, and say so."""
    when = (f"the {row['checkpoint']} checkpoint" if "checkpoint" in row
            else f"epoch {row['epoch']}" if "epoch" in row else f"step {row.get('step')}")
    ema = any(str(k).startswith("ema_") for k in row)
    fold = (f"fold {data_cfg.fold}, " if data_cfg is not None and data_cfg.fold is not None
            and split == data_cfg.val_split else "")
    return f"{split} (log: {fold}{when}, raw weights{'; ema_*: EMA weights' if ema else ''})"


def write_report(
    run: str | Path,
    *,
    out: str | Path | None = None,
    split: str | None = None,
    data: str | Path | None = None,
    hide_paths: bool = False,
    worst: int = 12,
    device: str | None = None,
) -> Path:
    """Write `OUT/report.html` (default OUT: the run directory) for the run `run`; returns its path.

    `split` defaults to the run's test split; `data` overrides the run's packed data (when it moved) or
    names an image folder to evaluate. Raises `ReportError` (and the checkpoint/evaluation errors of
    `bcc.evaluate`) with a message naming what is missing.
    """
    from bcc.atomic import atomic_write
    from bcc.compare import load_run_model

    if worst < 0:
        raise ReportError(f"the number of mistakes to show must be >= 0, got {worst}")
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run directory {run} does not exist")
    rows = read_metrics_log(run)
    im = load_run_model(run, device=device)  # the weights (and their fit) bcc eval takes by default
    if im.run_dir is None:
        raise ReportError(f"{run} is not a run directory (no config.yaml beside checkpoints/)")
    cfg = im.config
    split = split or cfg.data.test_split
    eval_dir, evaluation, reused = _evaluation(im, split, data, Path(out) if out is not None else None)
    from bcc.evaluate import fit_warning

    is_folder = evaluation.get("kind") == "folder"
    # the samples the temperatures / operating point were fitted on: on the page, and said here unless the
    # evaluation just made (`bcc.evaluate.evaluate_checkpoint`) said it
    flattered = fit_warning(im, Path(str(evaluation["data"])).name if is_folder else split, evaluation.get("fold"),
                            evaluation["data"], is_folder=is_folder)
    if flattered and reused:
        from bcc.console import warn

        warn(flattered)
    mistakes = worst_mistakes(_read_predictions(eval_dir / "predictions.csv"), im.taxonomy, worst)
    panels = _gradcam_panels(im, _read_images(evaluation, mistakes, cfg.data), mistakes) if mistakes else []

    run_name = im.run_dir.name
    with tempfile.TemporaryDirectory(prefix="bcc-report-") as tmp:
        curves = _curves(rows, run_name, cfg.data.val_split, Path(tmp))

    # per-split tables: the last row of each split in the log, then the evaluation
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        last[row.get("split", "train")] = row
    columns = {_log_column(s, r, cfg.data): r for s, r in last.items()}
    from bcc.evaluate import shown_split

    # a fold run's train/val split is its fold view (`bcc eval` evaluated that): `val (fold k of ...)`
    shown = html.escape(shown_split(split, evaluation.get("fold")))
    columns[f"{shown_split(split, evaluation.get('fold'))} (evaluation: step {evaluation.get('step')}, "
            f"{im.weights} weights)"] = migrate_row(
        evaluation.get("metrics", {}))
    skip = ("epoch", "step", "stage", "time", "train_seconds")
    heads = {h: dict(v) for h, v in evaluation.get("heads", {}).items()}

    count = evaluation.get("count", 0)
    predictions = _read_predictions(eval_dir / "predictions.csv")
    wrong = sum(1 for r in predictions if r["true_class"] != r["pred_class"])
    point = None
    if im.threshold is not None:
        point = {**im.operating_point, "threshold": im.threshold}
        wrong_argmax = sum(1 for r, c in zip(predictions, argmax_classes(predictions, im.taxonomy), strict=True)
                           if r["true_class"] != c)
        wrong_text = f"{wrong} wrong at the operating point, {wrong_argmax} at argmax"
    else:
        wrong_text = f"{wrong} wrong"
    where = "" if hide_paths else (f"<br>checkpoint <code>{html.escape(str(im.checkpoint))}</code>; data "
                                   f"<code>{html.escape(str(evaluation.get('data')))}</code> (file names below are "
                                   "relative to it)")
    calibrated = "temperature-scaled" if evaluation.get("calibrated") else "uncalibrated (raw softmax)"
    failed = evaluation.get("failed") or []
    failed_html = ""
    if failed:
        listed = "" if hide_paths else ": " + ", ".join(html.escape(f["source"]) for f in failed[:20])
        failed_html = f'<p class="warn">{len(failed)} image(s) could not be read and are not counted{listed}</p>'
    sections = [
        f"<h1>bcc run report: {html.escape(run_name)}</h1>",
        f'<p class="meta">backbone {html.escape(cfg.model.backbone)}, taxonomy {html.escape(im.taxonomy.name)} '
        f"({', '.join(html.escape(c) for c in im.taxonomy.class_names)}), best checkpoint at step {im.step}, "
        f"{WEIGHTS_TEXT[im.weights]}; {_pretrained_text(im.run_dir, cfg.model.pretrained, hide_paths)}"
        f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC{where}</p>",
        '<p class="warn">Research software: not for clinical use.</p>',
        f'<p class="meta decision">{decision_text(point)}</p>',
        f'<p class="warn">warning: {html.escape(flattered)}</p>' if flattered else "",
        "<h2>Training curves</h2>",
        '<div class="figs">' + "".join(img_tag(f, "training curve", "curve") for f in curves) + "</div>"
        if curves else "<p>metrics.jsonl has no per-epoch values to plot.</p>",
        "<h2>Metrics per split</h2>",
        metric_table(columns, skip),
        f"<h3>Per head ({shown}, {calibrated})</h3>",
        metric_table(heads),
        f"<h2>Confusion matrix ({shown}, {count} images)</h2>",
        '<div class="figs">' + img_tag((eval_dir / "confusion.png").read_bytes(), "confusion matrix") + "</div>",
        f"<h2>Reliability ({shown}, {calibrated})</h2>",
        '<div class="figs">' + img_tag((eval_dir / "reliability.png").read_bytes(), "reliability diagram") + "</div>",
        failed_html,
        f"<h2>Worst mistakes ({shown}: {len(mistakes)} shown of {wrong_text})</h2>",
        "<p>Ordered by the probability given to the true class, lowest first. Overlays: Grad-CAM of each head "
        "for the label it predicted; a two-class head also for its positive label. Dimmed borders lie outside "
        "the centre crop the model saw.</p>",
        gallery(mistakes, panels, hide_paths, point) if mistakes else f"<p>No mistakes on the {shown} split.</p>",
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>bcc report: {html.escape(run_name)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    out_dir = Path(out) if out is not None else im.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    with atomic_write(path, encoding="utf-8") as f:
        f.write(page)
    return path
