"""The operating point of the binary decision: a threshold on the positive probability, chosen on validation.

The hierarchical decision takes the argmax of every head, so the root binary head calls a sample
positive (label 1, e.g. Malignant) when its probability exceeds 0.5. A screening task states its rule
instead (`eval.operating_point`, `bcc calibrate --operating-point`):

    argmax               no threshold (the default; the decision of an uncalibrated argmax)
    youden               maximise sensitivity + specificity - 1 on the validation split
    sensitivity>=X       the highest threshold whose validation sensitivity is at least X (0 < X < 1):
                         the best specificity that keeps the sensitivity
    specificity>=X       the lowest threshold whose validation specificity is at least X

A sample is positive when `p >= threshold`. Thresholds are midpoints between neighbouring distinct
validation scores, so no validation sample sits on one. The threshold is fitted on the probabilities
the model reports (temperature-scaled where temperatures exist) and stored beside the checkpoint as
`operating_point.json`, together with the binary head's temperature and the equivalent logit margin
`T * logit(threshold)`. The decision `z1 - z0 >= margin` does not depend on the temperature, so the
stored point stays the same decision when temperatures are refitted or switched off
(`threshold_for`). The one decision that uses it is `bcc.metrics.decide(..., threshold=)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bcc.atomic import read_json_object
from bcc.errors import BccError

__all__ = [
    "OPERATING_POINT_FILE",
    "OperatingPoint",
    "OperatingPointError",
    "binary_head",
    "check_fittable",
    "check_val_fittable",
    "fit_threshold",
    "parse_operating_point",
    "point_fit",
    "point_record",
    "rates",
    "read_operating_point",
    "stored_points",
    "threshold_for",
    "update_operating_point",
    "write_operating_point",
]

OPERATING_POINT_FILE = "operating_point.json"  # in a checkpoint directory, beside temperature.json
OPERATING_POINT_FORMAT = "bcc-operating-point/1"
RULES = ("argmax", "youden", "sensitivity>=X", "specificity>=X")
_BOUND = re.compile(r"^(sensitivity|specificity)\s*>=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


class OperatingPointError(BccError):
    """An operating-point rule that cannot be parsed, fitted, stored or applied to this taxonomy."""


@dataclass(frozen=True)
class OperatingPoint:
    """A parsed rule: `kind` is argmax, youden, sensitivity or specificity; `target` the bound X."""

    kind: str
    target: float | None = None

    @property
    def is_argmax(self) -> bool:
        return self.kind == "argmax"

    def __str__(self) -> str:
        return f"{self.kind}>={self.target:g}" if self.target is not None else self.kind


def parse_operating_point(text: str) -> OperatingPoint:
    """`argmax`, `youden`, `sensitivity>=X` or `specificity>=X` with 0 < X < 1; else OperatingPointError."""
    rule = str(text).strip().lower()
    if rule in ("argmax", "youden"):
        return OperatingPoint(rule)
    m = _BOUND.match(rule)
    if m:
        x = float(m.group(2))
        if 0 < x < 1:
            return OperatingPoint(m.group(1), x)
        raise OperatingPointError(f"operating point {text!r}: the bound must lie in (0, 1), got {x:g}")
    raise OperatingPointError(f"operating point {text!r} is not one of {', '.join(RULES)} (0 < X < 1)")


def binary_head(taxonomy) -> tuple[int, str]:
    """(index, name) of the root binary head: the first head that always applies and has two labels.

    Its label 1 is the positive one (what `H_sens` measures). A taxonomy without one (a single head
    with more than two classes) has no binary operating point: OperatingPointError.
    """
    for i, head in enumerate(taxonomy.heads):
        if head.when is None and len(head.labels) == 2:
            return i, head.name
    heads = ", ".join(f"{h.name} ({len(h.labels)} labels)" for h in taxonomy.heads)
    raise OperatingPointError(
        f"taxonomy {taxonomy.name!r} has no root head with two labels (heads: {heads}): an operating "
        "point other than argmax needs a binary decision; use argmax"
    )


def check_fittable(rule: OperatingPoint | str, taxonomy, class_counts: Mapping[str, int], where: str) -> None:
    """Refuse, before anything trains, a rule that cannot be fitted on a validation split of these
    per-class counts (`where` names the split): a threshold needs positive and negative samples of the
    binary head. OperatingPointError naming the rule, the split and its counts; argmax always fits."""
    rule = parse_operating_point(rule) if isinstance(rule, str) else rule
    if rule.is_argmax:
        return
    h, name = binary_head(taxonomy)
    labels = taxonomy.heads[h].labels
    table = taxonomy.target_table()
    n = [0, 0]
    for i, cls in enumerate(taxonomy.class_names):
        n[int(table[i, h])] += int(class_counts.get(cls, 0))
    if n[0] == 0 or n[1] == 0:
        raise OperatingPointError(
            f"eval.operating_point={rule}: {where} holds {n[1]} {labels[1]} and {n[0]} {labels[0]} samples; "
            f"fitting a threshold of head {name!r} needs both; use eval.operating_point=argmax or a validation "
            "split with both")


def check_val_fittable(cfg, manifest) -> None:
    """`check_fittable` for a run: `cfg.eval.operating_point` on the val split of `manifest` (the run's
    data: `bcc.sources.load_data`, its fold view with `data.fold`). Training calls it before it trains,
    `bcc compare` and `bcc cv` for every planned run before the first one trains."""
    if parse_operating_point(cfg.eval.operating_point).is_argmax:
        return
    data = cfg.data
    fold = "" if data.fold is None else f" (data.fold={data.fold})"
    check_fittable(cfg.eval.operating_point, manifest.taxonomy, manifest.split(data.val_split).class_counts,
                   f"the validation split {data.val_split!r}{fold} of {manifest.shown}")


def rates(scores: Tensor, targets: Tensor, threshold: float | None) -> dict[str, float]:
    """Sensitivity, specificity and balanced accuracy of `scores >= threshold` (argmax: `> 0.5`).

    `scores` [N] positive probabilities, `targets` [N] 0/1 (rows with -1 are ignored). NaN where a
    class is absent.
    """
    scores, targets = scores.detach().double().flatten(), targets.detach().long().flatten()
    valid = targets >= 0
    scores, targets = scores[valid], targets[valid]
    pred = scores > 0.5 if threshold is None else scores >= threshold
    pos, neg = targets == 1, targets == 0
    sens = int((pred & pos).sum()) / int(pos.sum()) if pos.any() else math.nan  # exact ratios of counts
    spec = int((~pred & neg).sum()) / int(neg.sum()) if neg.any() else math.nan
    return {"sens": sens, "spec": spec, "bacc": (sens + spec) / 2}


def _candidates(scores: Tensor) -> Tensor:
    """Thresholds between neighbouring distinct scores, plus one below all and one above all."""
    u = torch.unique(scores)  # sorted
    mids = (u[1:] + u[:-1]) / 2
    low = u[:1] / 2
    high = (u[-1:] + 1) / 2 if float(u[-1]) < 1 else torch.tensor([math.nextafter(1.0, 2.0)], dtype=u.dtype)
    return torch.cat([low, mids, high])


def fit_threshold(scores: Tensor, targets: Tensor, rule: OperatingPoint | str) -> float | None:
    """The threshold of `rule` on validation scores (see the module docstring); None for argmax.

    `scores` [N] positive-class probabilities, `targets` [N] 0/1 (-1 ignored). Needs positives and
    negatives: OperatingPointError otherwise.
    """
    rule = parse_operating_point(rule) if isinstance(rule, str) else rule
    if rule.is_argmax:
        return None
    scores, targets = scores.detach().double().flatten(), targets.detach().long().flatten()
    valid = targets >= 0
    scores, targets = scores[valid], targets[valid]
    n_pos, n_neg = int((targets == 1).sum()), int((targets == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise OperatingPointError(
            f"operating point {rule}: the validation split has {n_pos} positive and {n_neg} negative samples; "
            "a threshold needs both"
        )
    t = _candidates(scores)  # [T], ascending
    pred = scores[None, :] >= t[:, None]  # [T, N]
    sens = (pred & (targets == 1)).sum(dim=1).double() / n_pos  # non-increasing in t
    spec = (~pred & (targets == 0)).sum(dim=1).double() / n_neg  # non-decreasing in t
    if rule.kind == "youden":
        j = sens + spec - 1
        best = torch.nonzero(j >= j.max() - 1e-12).flatten()
        # ties: the threshold nearest 0.5 (the least departure from argmax)
        i = int(best[torch.argmin((t[best] - 0.5).abs())])
    elif rule.kind == "sensitivity":
        i = int(torch.nonzero(sens >= rule.target - 1e-12).flatten().max())  # t = low always qualifies
    else:
        i = int(torch.nonzero(spec >= rule.target - 1e-12).flatten().min())  # t = high always qualifies
    return float(t[i])


def fit_on_logits(taxonomy, logits, labels: Tensor, rule: OperatingPoint | str) -> tuple[str, float | None, dict]:
    """Fit `rule` on a split's per-head logits: the one fit of training's end and `bcc calibrate`.

    `logits` per head ([N, C_h] each, temperature-scaled where temperatures exist), `labels` [N] leaf
    labels. Returns (binary head name, threshold (None for argmax), {"argmax": rates, "chosen": rates} on
    these samples). Raises OperatingPointError when the taxonomy has no binary head or the samples lack
    a class.
    """
    rule = parse_operating_point(rule) if isinstance(rule, str) else rule
    h, head = binary_head(taxonomy)
    target = taxonomy.target_table()[labels, h]
    scores = torch.softmax(logits[h].double(), dim=1)[:, 1]
    threshold = fit_threshold(scores, target, rule)
    return head, threshold, {"argmax": rates(scores, target, None), "chosen": rates(scores, target, threshold)}


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def threshold_for(point: Mapping[str, Any], temperature: float = 1.0) -> float:
    """The stored point's threshold on probabilities scaled by `temperature` (1: raw softmax).

    Exact for a two-class head: `softmax(z / T)[1] >= t` iff `z1 - z0 >= T * logit(t)`.
    """
    return 1.0 / (1.0 + math.exp(-float(point["margin"]) / float(temperature)))


def point_record(rule: OperatingPoint | str, threshold: float, taxonomy, temperature: float = 1.0,
                 info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored form of a fitted point (what `operating_point.json` holds for one weights): format,
    rule, binary head and its positive label, threshold (on probabilities scaled by `temperature`),
    temperature, logit margin, fit time, then `info`: where it was fitted (`split`, `fold`: the run's
    data.fold whose view `split` was, null for none; absent in files of an older bcc, which fitted a fold run
    on its fold view too; `data`, `count`, `step`) and the val rates."""
    _, head = binary_head(taxonomy)
    labels = next(h.labels for h in taxonomy.heads if h.name == head)
    return {
        "format": OPERATING_POINT_FORMAT,
        "rule": str(rule),
        "head": head,
        "positive_label": labels[1],
        "threshold": float(threshold),
        "temperature": float(temperature),
        "margin": float(temperature) * _logit(float(threshold)),
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(info or {}),
    }


def write_operating_point(checkpoint_dir: str | Path, rule: OperatingPoint | str, threshold: float, taxonomy,
                          temperature: float = 1.0, info: Mapping[str, Any] | None = None) -> Path:
    """Store a fitted point in `<checkpoint>/operating_point.json` (a best/last link is followed); an
    `ema` key of `info` is the EMA weights' own entry (see `stored_points`)."""
    from bcc.atomic import write_json

    path = Path(checkpoint_dir).resolve() / OPERATING_POINT_FILE
    write_json(path, point_record(rule, threshold, taxonomy, temperature, info))
    return path


def _checked(point: Any, path: Path, taxonomy, where: str) -> dict[str, Any] | None:
    """A stored point (`where` names it in errors), or None for an argmax decision (a null entry, or a
    top-level `rule: argmax` that only carries the EMA's point beside it)."""
    from bcc.checkpoint import CheckpointError

    if point is None or (isinstance(point, dict) and point.get("rule") == "argmax" and "margin" not in point):
        return None
    try:
        margin, head = float(point["margin"]), str(point["head"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the operating point {path}{where}: {type(e).__name__}: {e}") from e
    if not math.isfinite(margin):
        raise CheckpointError(f"{path}{where}: margin must be finite, got {margin}")
    if taxonomy is not None and binary_head(taxonomy)[1] != head:
        raise CheckpointError(f"{path}{where}: the point is for head {head!r}, the model's binary head is "
                              f"{binary_head(taxonomy)[1]!r}")
    return {k: v for k, v in point.items() if k != "ema"}


def stored_points(checkpoint_dir: str | Path, taxonomy=None) -> dict[str, dict[str, Any] | None] | None:
    """Both points stored with a checkpoint: None without `operating_point.json`, else {"raw": point or
    None (argmax)} plus "ema": point or None (argmax) when the file holds the EMA weights' own entry
    (training and `bcc calibrate` of a checkpoint with `model_ema.safetensors` write it; no entry: the
    point was fitted on the raw weights only). The raw point is the file's top level (older files hold
    nothing else); a file whose raw decision is argmax but whose EMA has a point says `rule: argmax` at
    the top. CheckpointError for an unreadable file or a point of another head than `taxonomy`'s."""
    from bcc.checkpoint import CheckpointError

    path = Path(checkpoint_dir) / OPERATING_POINT_FILE
    try:
        stored = read_json_object(path)
    except ValueError as e:
        raise CheckpointError(f"the operating point: {e}") from None
    if stored is None:
        return None
    out = {"raw": _checked(stored, path, taxonomy, "")}
    if "ema" in stored:
        out["ema"] = _checked(stored["ema"], path, taxonomy, " (its `ema` entry)")
    return out


def read_operating_point(checkpoint_dir: str | Path, taxonomy=None) -> dict[str, Any] | None:
    """The raw weights' point stored with a checkpoint, or None (argmax). With `taxonomy`, its head must
    be the binary root head. The EMA's: `stored_points(...)["ema"]`."""
    points = stored_points(checkpoint_dir, taxonomy)
    return None if points is None else points["raw"]


def point_fit(checkpoint_dir: str | Path, weights: str = "raw") -> dict[str, Any] | None:
    """Where the point of `weights` ("raw" or "ema") stored with a checkpoint was fitted
    (`bcc.calibration.fit_facts`: split, fold, data, count, step; an EMA entry's missing facts from the
    file's top level), or None when that weights decide by argmax (no file, no entry) or the file cannot
    be read (its loader says so)."""
    from bcc.calibration import fit_facts
    from bcc.checkpoint import CheckpointError

    try:
        points = stored_points(checkpoint_dir)
    except CheckpointError:
        return None
    point = None if points is None else points.get("ema" if weights == "ema" else "raw")
    if point is None:
        return None
    return fit_facts(point, points["raw"] if weights == "ema" else None)


_KEEP: Any = object()


def update_operating_point(checkpoint_dir: str | Path, *, raw: Any = _KEEP, ema: Any = _KEEP) -> Path | None:
    """Replace the raw weights' point and/or the EMA's in `<checkpoint>/operating_point.json`, keeping
    the other one as stored: each is a point record (the fields `write_operating_point` stores, plus
    whatever describes its fit) or None for the argmax decision. `bcc calibrate --weights raw|ema|auto`
    uses it, so refitting or dropping one weights' point never touches the other's.

    When neither weights keep a point the file is removed (no file: argmax for both) and None is
    returned; else the file's path. A best/last link is followed."""
    from bcc.atomic import write_json

    path = Path(checkpoint_dir).resolve() / OPERATING_POINT_FILE
    old = stored_points(path.parent) or {"raw": None}
    new_raw = old["raw"] if raw is _KEEP else raw
    points = {"raw": new_raw}
    if ema is not _KEEP:
        points["ema"] = ema
    elif "ema" in old:
        points["ema"] = old["ema"]
    if new_raw is None and points.get("ema") is None:
        path.unlink(missing_ok=True)
        return None
    top = ({k: v for k, v in new_raw.items() if k != "ema"} if new_raw is not None
           else {"format": OPERATING_POINT_FORMAT, "rule": "argmax"})
    write_json(path, {**top, **({"ema": points["ema"]} if "ema" in points else {})})
    return path
