"""Evaluate a checkpoint on a packed split or a plain image folder, on one or many processes.

    bcc eval --checkpoint RUN --data shards/all-224 --split test
    accelerate launch -m bcc eval --checkpoint RUN --data shards/all-224     # same, N processes

Data: a packed dataset (`manifest.json`; its taxonomy must be the checkpoint's) is read with
`bcc.stream.eval_loader`, which gives every sample of the split to exactly one rank. A plain folder in
a taxonomy layout (`DATA/<class folder>/**/<image>`, folder names resolved by the checkpoint's taxonomy)
is listed by `bcc.imageio.scan_class_folders` (the packer's listing and link policy) in sorted order,
and rank r takes every world_size-th file from r. An image that cannot be decoded is counted and
reported by name in metrics.json; it does not stop the evaluation.

Every rank feeds its samples to `EvalMetrics` (which syncs on compute) and sends its per-sample logits to
the main process (`gather_object`), which writes, into OUT:

* `metrics.json`: per head and combined: loss, acc, bacc, macro F1, AUROC, ECE (and for two-class heads
  sensitivity/specificity of label 1, i.e. malignant), the confusion matrix, counts, failures,
  throughput; `metrics` repeats them under the flat names of the training log (`bacc`, `binary_sens`).
  With temperatures (`bcc calibrate`) every probability is temperature-scaled and `ece_raw` holds the
  ECE of the raw softmax;
* `predictions.csv`: one row per image, sorted by source: source, key, true class, predicted class
  (hierarchical decision), each head's probabilities (`head:label`), combined leaf probabilities
  (`combined:class`);
* `confusion.png` (combined classes, counts and row-normalised) and `reliability.png` (combined).

Losses are negative log-likelihoods of the reported probabilities: `H_loss` the mean over the samples
where head H applies, `loss` that of the combined leaf-class probability of the true class. Unlike the
training loss they carry no class weights or label smoothing, so runs and datasets compare directly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bcc.atomic import write_json
from bcc.errors import EXIT_USAGE, BccError
from bcc.imageio import IMAGE_SUFFIXES, decode_rgb, display_path, is_image_name
from bcc.imageio import scan_class_folders as scan_folders
from bcc.predict import (
    InferenceModel,
    TaxonomyMismatchError,
    check_taxonomy,
    decide,
    load_inference_model,
    write_probability_csv,
)
from bcc.taxonomy import Taxonomy, TaxonomyError

__all__ = [
    "EvalError",
    "evaluate_checkpoint",
    "fit_warning",
    "open_source",
    "scan_class_folders",
    "shown_split",
]

EVAL_FORMAT = "bcc-eval/1"


class EvalError(BccError):
    """Data that cannot be evaluated, with a message for the user."""


# --------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class FolderItem:
    index: int  # position in the sorted listing
    path: str
    source: str  # relative to the data root, like a packed sample's `source` (`display_path`)
    label: int  # leaf class index


_SHOW_SKIPPED = 20  # skipped entries named on the console; metrics.json lists them all


def scan_class_folders(root: str | Path, taxonomy: Taxonomy, model_label: str = "the checkpoint"):
    """Images under `root/<class folder>/` (`bcc.imageio.scan_class_folders`: recursively, sorted,
    hidden entries skipped, the packer's link policy).

    Returns (items, skipped): skipped lists files that are not images (by suffix), not in a class
    folder, or links not followed. A folder name the taxonomy does not know is a
    `TaxonomyMismatchError` naming the folder and the taxonomy.
    """
    root = Path(root)

    def resolve(name: str) -> int:
        try:
            return taxonomy.resolve_folder(name)
        except TaxonomyError as e:
            raise TaxonomyMismatchError(f"folder {root / name} is not a class of {model_label}: {e}") from None

    entries, listed_skips, _ = scan_folders(root, resolve)
    skipped = [{"source": s["path"], "reason": s["reason"]} for s in listed_skips]
    items: list[FolderItem] = []
    for entry in entries:
        if not is_image_name(entry.rel):
            suffix = Path(entry.rel).suffix
            skipped.append({"source": display_path(entry.rel), "reason": f"not an image file ({suffix or 'no suffix'})"})
            continue
        items.append(FolderItem(len(items), entry.path, display_path(entry.rel), entry.class_index))
    skipped.sort(key=lambda s: s["source"])
    return items, skipped


class _FolderDataset(Dataset):
    def __init__(self, items: Sequence[FolderItem], transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            image, error = self.transform(decode_rgb(item.path)), None
        except Exception as e:  # noqa: BLE001 - reported by name, the evaluation goes on
            image, error = None, display_path(str(e))
        return {"image": image, "label": item.label, "source": item.source, "key": f"{item.index:08d}", "error": error}


def _collate_folder(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if s["error"] is None]
    return {
        "image": torch.stack([s["image"] for s in good]) if good else None,
        "label": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "source": [s["source"] for s in good],
        "key": [s["key"] for s in good],
        "failed": [{"source": s["source"], "reason": s["error"]} for s in samples if s["error"] is not None],
    }


# --------------------------------------------------------------------------- data sources


@dataclass
class EvalSource:
    """What to evaluate: `loader(rank, world_size)` gives that rank's share, every sample once overall."""

    kind: str  # "packed" | "folder"
    path: Path
    name: str  # split name, or the folder's name
    expected: int  # samples over all ranks (before unreadable images)
    loader: Callable[[int, int], Iterable[dict[str, Any]]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    fold: int | None = None  # the run's `data.fold` whose view `name` is (its train or val split), else None

    @property
    def shown(self) -> str:
        """`val`, or `val (fold 1 of the pack's train+val: the run's data.fold)` for a fold view."""
        return shown_split(self.name, self.fold)


def shown_split(name: str, fold: int | None) -> str:
    """A split as eval, calibrate and the report name it: `val`, or for a fold run's view (`EvalSource.fold`,
    metrics.json's `fold`) `val (fold 1 of the pack's train+val: the run's data.fold)`."""
    return name if fold is None else f"{name} (fold {fold} of the pack's train+val: the run's data.fold)"


def open_source(data: str | Path, split: str, im: InferenceModel, *, batch_size: int | None = None,
                workers: int | None = None, key: str = "--data") -> EvalSource:
    """A packed dataset (directory with manifest.json) or an image folder, checked against `im`'s taxonomy.
    `key`: where the user wrote `data` (`--data`, or the run's `data.shards`), named by errors about it.

    A run trained with `data.fold=k` (`bcc cv`) is evaluated on its fold view of a pack with folds
    (`Manifest.with_fold`, as training read it): its train/val split is then the other folds / fold k,
    never the pack's own val split (most of which that run trained on). `EvalSource.fold` says so."""
    from bcc.checkpoint import check_trained_on
    from bcc.manifest import Manifest
    from bcc.remote import RemoteError, check_scheme
    from bcc.stream import eval_loader

    try:
        check_scheme(data, key)  # s3://..., htps://...: neither a folder nor a URL bcc reads
    except RemoteError as e:
        raise EvalError(str(e)) from None
    path = Path(data)
    d = im.config.data
    data_cfg = dataclasses.replace(
        d,
        eval_batch_size=batch_size or d.eval_batch_size,
        workers=d.workers if workers is None else workers,
    )
    model_label = f"checkpoint {im.checkpoint}"
    from bcc.remote import is_local

    if not is_local(str(data)) or (path / "manifest.json").is_file() or (path.name == "manifest.json"
                                                                         and path.is_file()):
        manifest = Manifest.load(path if is_local(str(data)) else str(data), key=key)  # a URL or pipe: pack too
        check_taxonomy(im.taxonomy, manifest.taxonomy, model_label, f"dataset {manifest.root}")
        fold = d.fold if manifest.folds is not None else None  # a pack without folds is not the run's pack
        if fold is not None:
            from bcc.manifest import FoldError

            try:
                manifest = manifest.with_fold(fold, train=d.train_split, val=d.val_split)
            except FoldError as e:
                raise EvalError(f"{key} {data}: {e} (checkpoint {im.checkpoint} was trained on data.fold={fold})") from None
        if key == "data.shards":  # the run's own data read again: the pack it trained on, or refused
            check_trained_on(im.checkpoint, manifest.fingerprint(), data)
        info = manifest.split(split)
        return EvalSource(
            "packed", manifest.root, split, info.count,
            lambda rank, world: eval_loader(manifest, split, data_cfg, rank=rank, world_size=world),
            fold=fold if split in (d.train_split, d.val_split) else None,
        )
    if not path.is_dir():
        raise EvalError(f"{key} {path} is neither a packed dataset (no manifest.json) nor a directory")
    items, skipped = scan_class_folders(path, im.taxonomy, f"{model_label} (taxonomy {im.taxonomy.name!r})")
    if not items:
        raise EvalError(
            f"no images in {path}: expected class folders ({', '.join(im.taxonomy.known_names())}) "
            f"holding {', '.join(IMAGE_SUFFIXES)} files"
        )

    def loader(rank: int, world: int):
        dataset = _FolderDataset(items[rank::world], im.crop)  # uint8: normalised on the device by im.inputs
        return DataLoader(dataset, batch_size=data_cfg.eval_batch_size, num_workers=data_cfg.workers,
                          collate_fn=_collate_folder)

    return EvalSource("folder", path.resolve(), path.resolve().name, len(items), loader, skipped)


def _same_location(a: str | Path, b: str | Path) -> bool:
    from bcc.remote import is_local

    if is_local(str(a)) and is_local(str(b)):
        return Path(a).resolve() == Path(b).resolve()
    return str(a) == str(b)


def fit_warning(im: InferenceModel, name: str, fold: int | None, data: str | Path, *,
                is_folder: bool = False) -> str | None:
    """The warning (text after `warning:`) for an evaluation of the samples that the temperatures and/or
    the operating point `im` uses were fitted on, else None: split `name` (its fold view `fold`, as
    `EvalSource.fold`) of `data`, or the image folder `name` at `data`. Where a fit was made is what
    temperature.json / operating_point.json record (`bcc.calibration.temperature_fit`,
    `bcc.operating_point.point_fit`); a file of an older bcc without `fold` was fitted on the run's own view
    (data.fold), one without `data` on the run's data.shards. `bcc eval` and `bcc report` print it."""
    from bcc.calibration import temperature_fit
    from bcc.operating_point import point_fit

    d = im.config.data

    def is_here(fit: dict | None) -> bool:
        if not fit or fit.get("split") != name:
            return False
        fitted_fold = fit.get("fold", d.fold) if name in (d.train_split, d.val_split) else None
        where = fit.get("data") or (None if d.sources else d.shards)
        return fitted_fold == fold and (where is None or _same_location(where, data))

    fitted = [what for what, used, fit in (
        ("temperatures", bool(im.temperatures), lambda: temperature_fit(im.checkpoint, im.weights)),
        ("operating point", im.operating_point is not None, lambda: point_fit(im.checkpoint, im.weights)),
    ) if used and is_here(fit())]
    if not fitted:
        return None
    what = " and the ".join(fitted)
    flattered = " and ".join({"temperatures": "the calibration (ECE, loss)",
                              "operating point": "the decisions at the operating point (op_sens/op_spec, acc, "
                                                 "bacc)"}[w] for w in fitted)
    subject = "--data (this image folder)" if is_folder else f"--split {shown_split(name, fold)}"  # no path: --hide-paths
    advice = ("refit on validation (bcc calibrate) and keep the test split held out" if name == d.test_split
              else "the held-out test split (--split test) gives unflattered figures")
    return (f"{subject} holds the samples the {what} ({im.weights} weights) "
            f"{'was' if fitted == ['operating point'] else 'were'} fitted on: {flattered} measured there "
            f"{'is' if fitted == ['temperatures'] else 'are'} flattered by that fit; {advice}")


# --------------------------------------------------------------------------- inference


def _infer(im: InferenceModel, batches: Iterable[dict[str, Any]], metrics=None) -> dict[str, Any]:
    """Raw logits (CPU float32, per head) with keys, sources and labels of every sample of `batches`."""
    keys, sources, labels, logits, failed = [], [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            failed += batch.get("failed", [])
            if batch["image"] is None or batch["label"].numel() == 0:
                continue
            out = im.model(im.inputs(batch["image"]))
            y = batch["label"].to(im.device)
            if metrics is not None:
                metrics.update(im.scale(out), y)
            logits.append([z.float().cpu() for z in out])
            labels.append(batch["label"].cpu())
            keys += list(batch["key"])
            sources += list(batch["source"])
    heads = len(im.taxonomy.head_names)
    return {
        "key": keys,
        "source": sources,
        "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "logits": [torch.cat([b[h] for b in logits]) if logits else torch.zeros(0, k)
                   for h, k in zip(range(heads), im.taxonomy.head_sizes.values(), strict=True)],
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }


def _merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One payload from every rank's, sorted by (source, key) so the result is independent of the ranks."""
    keys = [k for p in parts for k in p["key"]]
    sources = [s for p in parts for s in p["source"]]
    order = sorted(range(len(keys)), key=lambda i: (sources[i], keys[i]))
    index = torch.tensor(order, dtype=torch.long)
    heads = len(parts[0]["logits"])
    return {
        "key": [keys[i] for i in order],
        "source": [sources[i] for i in order],
        "label": torch.cat([p["label"] for p in parts])[index],
        "logits": [torch.cat([p["logits"][h] for p in parts])[index] for h in range(heads)],
        "failed": sorted((f for p in parts for f in p["failed"]), key=lambda f: f["source"]),
        "seconds": max(p["seconds"] for p in parts),
    }


# --------------------------------------------------------------------------- metrics on the main process


def _nll(log_probs: Tensor, target: Tensor) -> float:
    return float(F.nll_loss(log_probs.double(), target)) if target.numel() else float("nan")


def summarize(im: InferenceModel, flat: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
    """Structured per-head and combined metrics; adds losses, raw ECE and combined AUROC to `flat`."""
    from bcc.calibration import ece
    from bcc.metrics import combined_probs

    taxonomy = im.taxonomy
    labels, raw = merged["label"], merged["logits"]
    scaled = im.scale(raw)
    table = taxonomy.target_table()
    probs = combined_probs(taxonomy, scaled)
    flat["loss"] = _nll(probs.clamp_min(1e-12).log(), labels)
    if im.temperatures:
        flat["ece_raw"] = ece(combined_probs(taxonomy, raw), labels)
    heads = {}
    for h, head in enumerate(taxonomy.heads):
        target = table[labels, h]
        valid = target >= 0
        flat[f"{head.name}_loss"] = _nll(torch.log_softmax(scaled[h][valid].double(), dim=1), target[valid])
        if im.temperatures:
            flat[f"{head.name}_ece_raw"] = ece(torch.softmax(raw[h][valid].double(), dim=1), target[valid])
        entry = {k[len(head.name) + 1:]: v for k, v in flat.items() if k.startswith(head.name + "_")}
        entry["count"] = int(entry.get("count", int(valid.sum())))
        if len(head.labels) == 2:
            entry["positive_label"], entry["negative_label"] = head.labels[1], head.labels[0]
        heads[head.name] = entry
    head_keys = {f"{h}_" for h in taxonomy.head_names}
    combined = {k: v for k, v in flat.items() if not any(k.startswith(p) for p in head_keys)
                and k not in (f"acc{len(taxonomy.class_names)}", f"bacc{len(taxonomy.class_names)}")}
    return {"combined": combined, "heads": heads}


def _write_predictions(path: Path, im: InferenceModel, merged: dict[str, Any]) -> None:
    from bcc.metrics import combined_probs

    taxonomy = im.taxonomy
    scaled = im.scale(merged["logits"])
    head_probs = [torch.softmax(z.double(), dim=1) for z in scaled]
    probs = combined_probs(taxonomy, scaled)
    decided = decide(taxonomy, head_probs, im.threshold)
    names = taxonomy.class_names
    values = torch.cat([*head_probs, probs.double()], dim=1).tolist()
    rows = (([merged["source"][i], merged["key"][i], names[int(merged["label"][i])], names[int(decided[i])]],
             values[i], []) for i in range(len(merged["key"])))
    write_probability_csv(path, taxonomy, ["source", "key", "true_class", "pred_class"], rows)


def default_out_dir(im: InferenceModel, source: EvalSource) -> Path:
    """`RUN/eval-<split or folder name>` for a checkpoint of a run, else `./eval-<name>`."""
    return (im.run_dir or Path.cwd()) / f"eval-{source.name}"


# --------------------------------------------------------------------------- the evaluation


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    calibrated: bool = True,
    operating_point: bool = True,
    weights: str | None = None,
    key: str = "--data",
) -> dict[str, Any]:
    """Evaluate on every process of the current launch; returns the metrics.json content (on every rank).
    `key`: where `data` came from (`open_source`; "data.shards": the run's own, checked to be its pack).

    `weights` raw|ema|auto as `bcc.predict.load_inference_model` (`bcc eval --weights`, default auto);
    metrics.json records the kind used under "weights".

    Must be called on every rank (the metrics sync and the gather are collectives).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from bcc.console import console, set_main_process
    from bcc.metrics import EvalMetrics, format_table
    from bcc.plots import plot_confusion, plot_reliability

    acc = Accelerator()
    set_main_process(acc.is_main_process)
    im = load_inference_model(checkpoint, device=acc.device, calibrated=calibrated, operating_point=operating_point,
                              weights=weights)
    source = open_source(data, split, im, batch_size=batch_size, workers=workers, key=key)
    metrics = EvalMetrics(im.taxonomy, device=acc.device, threshold=im.threshold)
    part = _infer(im, source.loader(acc.process_index, acc.num_processes), metrics)
    flat = metrics.compute()  # collective: every rank
    merged = _merge(gather_object([part]))  # collective: every rank
    count = len(merged["key"])
    if count + len(merged["failed"]) != source.expected or count != flat["count"]:
        raise EvalError(
            f"sample count mismatch: {count} evaluated + {len(merged['failed'])} unreadable across "
            f"{acc.num_processes} process(es), metrics counted {flat['count']}, the data holds {source.expected}"
        )
    structured = summarize(im, flat, merged)
    report = {
        "format": EVAL_FORMAT,
        "checkpoint": str(im.checkpoint),
        "step": im.step,
        "data": str(source.path),
        "kind": source.kind,
        "split": split if source.kind == "packed" else None,
        "fold": source.fold,  # the run's data.fold whose view `split` is (null: the pack's own split)
        "taxonomy": im.taxonomy.name,
        "classes": list(im.taxonomy.class_names),
        "count": count,
        "failed": merged["failed"],
        "skipped": source.skipped,
        "processes": acc.num_processes,
        "seconds": round(merged["seconds"], 3),
        "images_per_second": round(count / merged["seconds"], 2) if merged["seconds"] > 0 else None,
        "weights": im.weights,  # raw or ema (model_ema.safetensors)
        "calibrated": bool(im.temperatures),
        "temperatures": im.temperatures or None,
        # the binary decision's threshold (on the reported probabilities); null: argmax
        "operating_point": None if im.operating_point is None else {
            "rule": im.operating_point.get("rule"), "head": im.operating_point["head"], "threshold": im.threshold},
        **structured,
        "metrics": flat,
    }
    out_dir = Path(out) if out is not None else default_out_dir(im, source)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "metrics.json", report)
        _write_predictions(out_dir / "predictions.csv", im, merged)
        title = f"{source.name} · {im.checkpoint.parent.parent.name}/{im.checkpoint.name}"
        plot_confusion(flat["confusion"], im.taxonomy.class_names, out_dir / "confusion.png", title=title)
        from bcc.metrics import combined_probs

        scaling = "temperature-scaled" if im.temperatures else "uncalibrated"
        plot_reliability(combined_probs(im.taxonomy, im.scale(merged["logits"])), merged["label"],
                         out_dir / "reliability.png", title=f"combined, {scaling}")
        console.print(format_table(flat, f"{source.kind} {source.shown}: {count} images ({im.weights} weights, {scaling})"))
        for f in merged["failed"]:
            console.print(f"[yellow]unreadable:[/] {f['source']}: {f['reason']}", soft_wrap=True)
        # never dropped silently (pack's policy): each named, up to a screenful, all in metrics.json
        for s in source.skipped[:_SHOW_SKIPPED]:
            console.print(f"[yellow]skipped:[/] {escape(s['source'])}: {escape(s['reason'])}", soft_wrap=True)
        if len(source.skipped) > _SHOW_SKIPPED:
            console.print(f"[yellow]skipped:[/] {len(source.skipped) - _SHOW_SKIPPED} more, listed in metrics.json")
        flattered = fit_warning(im, source.name, source.fold, source.path, is_folder=source.kind == "folder")
        if flattered:
            from bcc.console import warn

            warn(flattered)
        if im.temperatures:
            raw = ", ".join(f"{h} {flat[h + '_ece_raw']:.4f}" for h in im.taxonomy.head_names)
            console.print(f"ECE raw -> temperature-scaled: combined {flat['ece_raw']:.4f} -> {flat['ece']:.4f}; "
                          f"per head raw {raw}")
        console.print(
            f"{count} images in {merged['seconds']:.2f} s ({report['images_per_second']} img/s) on "
            f"{acc.num_processes} process(es); {len(merged['failed'])} unreadable, {len(source.skipped)} skipped "
            f"-> {out_dir}", soft_wrap=True
        )
    report["out"] = str(out_dir)
    acc.wait_for_everyone()
    return report


if __name__ == "__main__":  # the old entry point: say where it went instead of exiting 0 having done nothing
    import sys

    print("error: bcc.evaluate is a library module; run `bcc eval ...` "
          "(or `accelerate launch -m bcc eval ...` for several processes)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
