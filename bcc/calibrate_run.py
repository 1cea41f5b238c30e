"""`bcc calibrate`: refit a checkpoint's temperatures (and its operating point) on the run's validation view.

The samples are the run's own validation view: `data.shards`' val split, or for a run of `bcc cv` /
`data.fold=k` fold k of the pack's train+val (`bcc.evaluate.open_source` applies `Manifest.with_fold`
as training did), so nothing is fitted on samples the model trained on.

The weights are those the other tools use: `weights` "auto" fits the raw weights and, when the checkpoint
keeps an EMA (`train.ema_decay`), the EMA weights too, each on its own logits, stored as training stores
them (the EMA's under `ema` in `temperature.json` / `operating_point.json`), so `--weights auto` of
eval/predict/export/report keeps choosing what it chose before. "raw" or "ema" refit that one and keep
the other's stored entries as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bcc.atomic import read_json_object
from bcc.evaluate import EvalError, _infer, open_source
from bcc.taxonomy import Taxonomy

__all__ = ["calibrate_checkpoint"]


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


def _stored(path: Path) -> dict[str, Any] | None:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _kinds(weights: str, has_ema: bool, checkpoint: Path) -> list[str]:
    from bcc.checkpoint import EMA_FILE
    from bcc.export import WEIGHT_CHOICES

    if weights not in WEIGHT_CHOICES:
        raise EvalError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    if weights == "ema" and not has_ema:
        raise EvalError(f"--weights ema: checkpoint {checkpoint} holds no EMA weights ({EMA_FILE}; the run "
                        "trains them with train.ema_decay)")
    if weights == "auto":
        return ["raw", "ema"] if has_ema else ["raw"]
    return [weights]


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    operating_point: str | None = None,
    weights: str = "auto",
) -> dict[str, Any]:
    """Fit one temperature per head on `split` (default: the run's val split of the run's data, in its
    `data.fold` view) for the `weights` (see the module docstring) and store them with the checkpoint
    (`temperature.json`); returns temperatures, ECE before/after, the path, the split's `fold` and
    `weights` (the kinds fitted), with the EMA's fit under "ema".

    `operating_point` (a rule of `bcc.operating_point`) then fits the binary threshold on the
    temperature-scaled probabilities of the same samples and stores it (`operating_point.json`);
    `argmax` removes the stored point of the kinds fitted only (the other weights' point stays,
    `bcc.operating_point.update_operating_point`). Returned under "operating_point"."""
    from bcc.checkpoint import EMA_FILE
    from bcc.export import choose_weights, is_export_dir
    from bcc.export_hf import HUB_PREFIX
    from bcc.operating_point import binary_head, parse_operating_point
    from bcc.predict import load_inference_model

    rule = parse_operating_point(operating_point) if operating_point is not None else None
    if str(checkpoint).startswith(HUB_PREFIX) or is_export_dir(checkpoint):  # its files are the export's, fixed
        raise EvalError(f"{checkpoint} is an export: calibrate the run's checkpoint, then export it again")
    im = load_inference_model(checkpoint, device=device, calibrated=False, operating_point=False, weights="raw")
    kinds = _kinds(weights, (im.checkpoint / EMA_FILE).is_file(), im.checkpoint)
    if rule is not None and not rule.is_argmax:
        binary_head(im.taxonomy)  # a named error before any inference
    from bcc.calibration import TEMPERATURE_FILE
    from bcc.operating_point import stored_points

    old_temps = _stored(im.checkpoint / TEMPERATURE_FILE)
    stored_points(im.checkpoint, im.taxonomy)  # an unreadable point is named before any inference
    # the EMA's fit alone needs the raw weights' temperatures to keep beside it; a missing raw point is the
    # argmax decision (`bcc.operating_point.update_operating_point` stores the EMA's point beside it)
    if kinds == ["ema"] and old_temps is None:
        raise EvalError(f"--weights ema: checkpoint {im.checkpoint} has no fit of its raw weights to keep beside "
                        "the EMA's; use --weights auto (fits both)")
    if data is None and im.config.data.sources:
        raise EvalError(f"{checkpoint} was trained on data.sources ({', '.join(s.shards for s in im.config.data.sources)}); "
                        "pass --data with the pack to calibrate on")
    key = "--data" if data is not None else "data.shards"
    data = data if data is not None else im.config.data.shards
    split = split or im.config.data.val_split
    if split == im.config.data.test_split:  # allowed (a user's own calibration split may be named so), not quietly
        from bcc.console import warn

        warn(f"--split {split} is the run's test split (data.test_split): the temperatures"
             f"{' and the operating point' if rule is not None and not rule.is_argmax else ''} fitted on it flatter "
             "every test metric bcc eval, bcc report and bcc export show afterwards; fit on validation (the default) "
             "and keep the test split held out")
    from bcc.remote import is_local

    if is_local(str(data)) and not Path(data).exists():  # a URL or pipe: pack is checked as it is fetched
        raise EvalError(f"calibration data {data} (the run's data.shards) does not exist; pass --data")
    source = open_source(data, split, im, batch_size=batch_size, workers=workers, key=key)
    fits = {}
    for kind in kinds:
        if kind == "ema":  # the EMA weights into im.model (nothing stored is read: calibrated/operating_point off)
            choose_weights(im, "ema", calibrated=False, operating_point=False)
        fits[kind] = _fit(im, source, rule)
    info = {"data": str(source.path), "split": source.name, "fold": source.fold, "count": fits[kinds[0]]["count"],
            "step": im.step}
    path = _write(im, fits, old_temps, rule, info)
    main = fits.get("raw") or fits["ema"]
    out = {**info, "temperatures": main["temperatures"], "ece_before": main["ece_before"],
           "ece_after": main["ece_after"], "path": str(path), "failed": main["failed"], "weights": kinds,
           "shown": source.shown, "operating_point": main["point"]}
    if "raw" in fits and "ema" in fits:
        out["ema"] = fits["ema"]
    return out


def _fit(im, source, rule) -> dict[str, Any]:
    """Temperatures, ECE and (with a rule) the operating point of the weights `im.model` holds."""
    from bcc.calibration import apply_temperature, fit_temperatures
    from bcc.operating_point import _logit, fit_on_logits

    part = _infer(im, source.loader(0, 1))
    logits, labels = part["logits"], part["label"]
    if labels.numel() == 0:
        raise EvalError(f"no samples to calibrate on in {source.path} ({source.shown})")
    temps = fit_temperatures(im.taxonomy, logits, labels)
    scaled = apply_temperature(logits, temps, im.taxonomy.head_names)
    point = None
    if rule is not None and not rule.is_argmax:
        head, threshold, val = fit_on_logits(im.taxonomy, scaled, labels, rule)
        t = temps.get(head, 1.0)
        labels_ = next(h.labels for h in im.taxonomy.heads if h.name == head)
        point = {"rule": str(rule), "head": head, "positive_label": labels_[1], "threshold": threshold,
                 "temperature": t, "margin": t * _logit(threshold), "calibrated": True, "val": val}
    return {"temperatures": temps, "count": int(labels.numel()), "failed": part["failed"], "point": point,
            "ece_before": _ece_by_scope(im.taxonomy, logits, labels),
            "ece_after": _ece_by_scope(im.taxonomy, scaled, labels)}


def _write(im, fits, old_temps, rule, info) -> Path:
    """Store the fits, keeping the stored entries of the weights not refitted (the EMA's under `ema`)."""
    from bcc.atomic import write_json
    from bcc.calibration import TEMPERATURE_FILE, write_temperatures
    from bcc.operating_point import point_record, update_operating_point

    ema = fits.get("ema")
    if "raw" in fits:
        raw = fits["raw"]
        ema_temps = {"ema": {"temperatures": ema["temperatures"], **info}} if ema else (
            {"ema": old_temps["ema"]} if old_temps and "ema" in old_temps else {})
        path = write_temperatures(im.checkpoint, raw["temperatures"],
                                  {**info, "ece_before": raw["ece_before"], "ece_after": raw["ece_after"],
                                   **ema_temps})
    else:  # the EMA's alone: the raw weights' entries as they were
        path = im.checkpoint / TEMPERATURE_FILE
        write_json(path, {**old_temps, "ema": {"temperatures": ema["temperatures"], **info}})
    if rule is None:
        return path
    # each refitted weights' point replaced (None: argmax), the other weights' entry kept as stored
    new = {kind: None if rule.is_argmax else point_record(
        rule, fit["point"]["threshold"], im.taxonomy, fit["point"]["temperature"],
        {**info, "calibrated": True, "val": fit["point"]["val"]}) for kind, fit in fits.items()}
    update_operating_point(im.checkpoint, **new)
    return path
