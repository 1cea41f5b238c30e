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
from bcc.operating_point import binary_head
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
    "calibrate_checkpoint",
    "evaluate_checkpoint",
    "open_source",
    "scan_class_folders",
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


def open_source(data: str | Path, split: str, im: InferenceModel, *, batch_size: int | None = None,
                workers: int | None = None, key: str = "--data") -> EvalSource:
    """A packed dataset (directory with manifest.json) or an image folder, checked against `im`'s taxonomy.
    `key`: where the user wrote `data` (`--data`, or the run's `data.shards`), named by errors about it."""
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
        info = manifest.split(split)
        return EvalSource(
            "packed", manifest.root, split, info.count,
            lambda rank, world: eval_loader(manifest, split, data_cfg, rank=rank, world_size=world),
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
) -> dict[str, Any]:
    """Evaluate on every process of the current launch; returns the metrics.json content (on every rank).

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
    source = open_source(data, split, im, batch_size=batch_size, workers=workers)
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
        console.print(format_table(flat, f"{source.kind} {source.name}: {count} images ({im.weights} weights, {scaling})"))
        for f in merged["failed"]:
            console.print(f"[yellow]unreadable:[/] {f['source']}: {f['reason']}", soft_wrap=True)
        # never dropped silently (pack's policy): each named, up to a screenful, all in metrics.json
        for s in source.skipped[:_SHOW_SKIPPED]:
            console.print(f"[yellow]skipped:[/] {escape(s['source'])}: {escape(s['reason'])}", soft_wrap=True)
        if len(source.skipped) > _SHOW_SKIPPED:
            console.print(f"[yellow]skipped:[/] {len(source.skipped) - _SHOW_SKIPPED} more, listed in metrics.json")
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


# --------------------------------------------------------------------------- calibration


def _ece_by_scope(taxonomy: Taxonomy, logits: Sequence[Tensor], labels: Tensor) -> dict[str, float]:
    from bcc.calibration import ece
    from bcc.metrics import combined_probs

    table = taxonomy.target_table()
    out = {}
    for h, name in enumerate(taxonomy.head_names):
        target = table[labels, h]
        valid = target >= 0
        out[name] = ece(torch.softmax(logits[h][valid].double(), dim=1), target[valid])
    out["combined"] = ece(combined_probs(taxonomy, logits), labels)
    return out


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    operating_point: str | None = None,
) -> dict[str, Any]:
    """Fit one temperature per head on `split` (default: the run's val split of the run's data) and store
    them with the checkpoint (`temperature.json`); returns temperatures, ECE before/after and the path.

    `operating_point` (a rule of `bcc.operating_point`) then fits the binary threshold on the
    temperature-scaled probabilities of the same samples and stores it (`operating_point.json`);
    `argmax` removes a stored one. Returned under "operating_point"."""
    from bcc.operating_point import parse_operating_point

    rule = parse_operating_point(operating_point) if operating_point is not None else None
    from bcc.calibration import apply_temperature, fit_temperatures
    from bcc.export import is_export_dir
    from bcc.export_hf import HUB_PREFIX
    from bcc.predict import write_temperatures

    if str(checkpoint).startswith(HUB_PREFIX) or is_export_dir(checkpoint):  # its files are the export's, fixed
        raise EvalError(f"{checkpoint} is an export: calibrate the run's checkpoint, then export it again")
    im = load_inference_model(checkpoint, device=device, calibrated=False)
    if rule is not None and not rule.is_argmax:
        binary_head(im.taxonomy)  # a named error before any inference
    if data is None and im.config.data.sources:
        raise EvalError(f"{checkpoint} was trained on data.sources ({', '.join(s.shards for s in im.config.data.sources)}); "
                        "pass --data with the pack to calibrate on")
    key = "--data" if data is not None else "data.shards"
    data = data if data is not None else im.config.data.shards
    split = split or im.config.data.val_split
    from bcc.remote import is_local

    if is_local(str(data)) and not Path(data).exists():  # a URL or pipe: pack is checked as it is fetched
        raise EvalError(f"calibration data {data} (the run's data.shards) does not exist; pass --data")
    source = open_source(data, split, im, batch_size=batch_size, workers=workers, key=key)
    part = _infer(im, source.loader(0, 1))
    logits, labels = part["logits"], part["label"]
    if labels.numel() == 0:
        raise EvalError(f"no samples to calibrate on in {source.path} ({source.name})")
    temps = fit_temperatures(im.taxonomy, logits, labels)
    before = _ece_by_scope(im.taxonomy, logits, labels)
    after = _ece_by_scope(im.taxonomy, apply_temperature(logits, temps, im.taxonomy.head_names), labels)
    info = {"data": str(source.path), "split": source.name, "count": int(labels.numel()), "step": im.step,
            "ece_before": before, "ece_after": after}
    path = write_temperatures(im.checkpoint, temps, info)
    point = None
    if rule is not None:
        point = _fit_operating_point(im, rule, apply_temperature(logits, temps, im.taxonomy.head_names), labels,
                                     temps, {k: info[k] for k in ("data", "split", "count", "step")})
    return {"temperatures": temps, **info, "path": str(path), "failed": part["failed"], "operating_point": point}


def _fit_operating_point(im: InferenceModel, rule, scaled: Sequence[Tensor], labels: Tensor,
                         temps: dict[str, float], info: dict[str, Any]) -> dict[str, Any] | None:
    """Fit and store (or, for argmax, remove) the checkpoint's operating point; see `calibrate_checkpoint`."""
    from bcc.operating_point import OPERATING_POINT_FILE, fit_on_logits, write_operating_point

    if rule.is_argmax:
        (im.checkpoint / OPERATING_POINT_FILE).unlink(missing_ok=True)
        return None
    head, threshold, val = fit_on_logits(im.taxonomy, scaled, labels, rule)
    path = write_operating_point(im.checkpoint, rule, threshold, im.taxonomy, temps.get(head, 1.0),
                                 {**info, "calibrated": True, "val": val})
    return {"rule": str(rule), "head": head, "threshold": threshold, "val": val, "path": str(path)}


if __name__ == "__main__":  # the old entry point: say where it went instead of exiting 0 having done nothing
    import sys

    print("error: bcc.evaluate is a library module; run `bcc eval ...` "
          "(or `accelerate launch -m bcc eval ...` for several processes)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
