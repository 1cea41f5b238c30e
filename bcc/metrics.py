"""Evaluation metrics per head and for the combined hierarchical decision, synced across ranks.

`EvalMetrics` keeps, per scope (every head, and "combined"), the probabilities, predictions and
targets of the samples this rank saw, in torchmetrics states that `compute()` gathers from all ranks
(when torch.distributed is initialised). The numbers are then computed once, on the union, with
torchmetrics' functional metrics. Keeping the samples (N x K floats, tiny for an eval split) rather
than per-metric running sums is deliberate:

* exact AUROC (no threshold binning) and ECE need the samples anyway;
* torchmetrics syncs a rank that saw no samples only for *1-D float* list states (it substitutes
  `tensor([])` for the empty list; a 2-D or integer state would mismatch the other ranks' all_gather
  and crash or hang). All states here are flat float vectors, so an uneven eval split, including a
  rank with zero samples, syncs like any other;
* balanced accuracy is the mean recall over classes *present in the targets* (sklearn's definition).
  torchmetrics' `MulticlassAccuracy(average="macro")` scores a class that is absent from the targets
  but predicted as recall 0, which punishes a val split that happens to miss a class.

Metric names (stable: they go into metrics.jsonl and `checkpoint.metric` selects from them):

* combined (hierarchical decision, `Taxonomy.decide`): `acc`, `bacc`, `f1` (macro), `ece` (of the
  combined leaf-class probabilities, 15 bins), `confusion` (C x C counts, rows = true class); these
  names are the same for every taxonomy (older logs called `acc`/`bacc` `acc4`/`bacc4`);
* per head H, on the samples whose H target is valid (subtype: truly malignant samples only, whatever
  the binary head predicted): `H_acc`, `H_bacc`, `H_f1`, `H_auroc` (binary heads: AUROC of label 1;
  otherwise macro over the classes present), `H_ece`, `H_count`; two-class heads also `H_sens` and
  `H_spec` (recall of label 1 and of label 0);
* `count` (samples evaluated, all ranks) and `loss` (sum of `loss_sum` / samples, only when some
  rank passed `loss_sum`).

Undefined values are NaN, never missing and never an exception: every metric of a head with no valid
target in the whole set (then `H_count` is 0), AUROC when only one class is present, sensitivity
without positives, everything when nothing was evaluated. `json.dumps` writes NaN as `NaN`, which
Python's json reads back.

`compute()` runs collectives: every rank must call it, the same number of times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)
from torchmetrics.utilities import dim_zero_cat

from bcc.calibration import ece

__all__ = ["COMBINED", "EvalMetrics", "combined_probs", "decide", "format_table"]

COMBINED = "combined"
ECE_BINS = 15
NAN = float("nan")


def combined_probs(taxonomy, logits: Sequence[Tensor]) -> Tensor:
    """Hierarchical probabilities of the leaf classes, [N, C].

    P(class) is the product over the heads that apply to the class of that head's softmax probability
    of the class's label, e.g. P(Pro-B) = P(Malignant) * P(Pro-B | malignant). Computed in log space
    and renormalised over the classes, so the rows sum to 1 even if the taxonomy's classes do not
    cover every combination of labels.
    """
    if len(logits) != len(taxonomy.head_names):
        raise ValueError(f"expected {len(taxonomy.head_names)} logit tensors (one per head), got {len(logits)}")
    table = taxonomy.target_table().to(logits[0].device)  # [C, H]
    log_p = torch.zeros(logits[0].shape[0], table.shape[0], device=logits[0].device)
    for h, z in enumerate(logits):
        head_log_p = torch.log_softmax(z.detach().float(), dim=-1)  # [N, K]
        applies = table[:, h] >= 0
        log_p[:, applies] += head_log_p[:, table[applies, h]]
    return torch.softmax(log_p, dim=1)


def decide(taxonomy, logits: Sequence[Tensor], probs: Tensor | None = None,
           threshold: float | None = None) -> Tensor:
    """Leaf class index [N] of the hierarchical decision (`Taxonomy.decide`) for per-head `logits`.

    `threshold` is the operating point (`bcc.operating_point`): the root binary head says positive
    (label 1) when its softmax probability is >= threshold instead of > 0.5; None keeps the argmax.
    A label combination that is no leaf class (impossible for the default taxonomy) falls back to the
    most probable leaf class (`probs`, the `combined_probs` when already computed) rather than being
    dropped. Log-probabilities are valid logits here.
    """
    outputs = list(logits)
    if threshold is not None:
        from bcc.operating_point import binary_head

        h, _ = binary_head(taxonomy)
        positive = torch.softmax(outputs[h].detach().float(), dim=-1)[:, 1] >= threshold
        outputs[h] = torch.stack([~positive, positive], dim=1).float()  # argmax of this is the decision
    decided = taxonomy.decide(outputs).to(logits[0].device)
    if bool((decided < 0).any()):
        fallback = (probs if probs is not None else combined_probs(taxonomy, logits)).argmax(dim=1)
        decided = torch.where(decided >= 0, decided, fallback.to(decided.device))
    return decided


class _Samples(Metric):
    """Probabilities, predicted labels and targets of one scope; gathered from all ranks on compute."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        # flat float vectors: see the module docstring (zero-sample ranks)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, preds: Tensor, target: Tensor) -> None:
        self.probs.append(probs.to(self.dtype).flatten())
        self.preds.append(preds.to(self.dtype))
        self.target.append(target.to(self.dtype))

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        def cat(state):
            if isinstance(state, list) and not state:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            return dim_zero_cat(state)

        probs = cat(self.probs).reshape(-1, self.num_classes)
        return probs, cat(self.preds).long(), cat(self.target).long()


class _LossTotal(Metric):
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, count: int) -> None:
        self.total += loss_sum.to(self.total)
        self.count += count

    def compute(self) -> tuple[float, int]:
        return float(self.total), int(self.count)


def _scope_metrics(probs: Tensor, preds: Tensor, target: Tensor, num_classes: int) -> dict[str, Any]:
    """acc, bacc, f1, auroc, ece, confusion (+ sens/spec for two classes) of one scope's samples."""
    k, n = num_classes, target.numel()
    confusion = (
        multiclass_confusion_matrix(preds, target, k)
        if n
        else torch.zeros(k, k, dtype=torch.long, device=target.device)
    )
    counts = confusion.double()  # exact ratios of integers, not float32 artefacts
    support = counts.sum(dim=1)
    recall = counts.diag() / support.clamp(min=1)
    present = support > 0
    out: dict[str, Any] = {
        "acc": float(counts.diag().sum() / n) if n else NAN,
        "bacc": float(recall[present].mean()) if present.any() else NAN,
        # macro over classes seen in targets or predictions (torchmetrics skips tp + fp + fn == 0)
        "f1": float(multiclass_f1_score(preds, target, k, average="macro")) if n else NAN,
        "auroc": NAN,
        "ece": ece(probs, target, ECE_BINS),
        "confusion": confusion.tolist(),
    }
    # AUROC needs positives and negatives: only classes with 0 < support < n count
    scorable = present & (support < n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about the absent classes we mask out
        if k == 2 and scorable.all():
            out["auroc"] = float(binary_auroc(probs[:, 1], target))
        elif k > 2 and scorable.any():
            per_class = multiclass_auroc(probs, target, k, average="none")
            out["auroc"] = float(per_class[scorable].mean())
    if k == 2:
        out["sens"] = float(recall[1]) if present[1] else NAN
        out["spec"] = float(recall[0]) if present[0] else NAN
    return out


class EvalMetrics:
    """Per-head and combined metrics of one evaluation pass; see the module docstring for names.

    Call `update` per batch (on every rank, with that rank's samples), then `compute()` on every
    rank (it syncs), then `reset()` before the next pass.
    """

    def __init__(
        self,
        taxonomy,
        device: torch.device | str | None = None,
        process_group: Any = None,
        threshold: float | None = None,
    ) -> None:
        """`threshold`: the operating point of the combined decision (`decide`); with it, the binary
        head also reports `H_op_sens`, `H_op_spec`, `H_op_bacc` and `H_op_threshold` beside its argmax
        `H_sens`, `H_spec`, `H_bacc`. May be set between passes (`metrics.threshold = t`).
        `report_threshold` (set between passes) reports `H_op_*` at a point while the decisions stay at
        argmax: training's final test, whose combined metrics are the argmax ones. `shown_threshold`: the
        value `H_op_threshold` reports instead of the one applied (the same decision on the calibrated
        scale that operating_point.json, eval and predict show, where the probabilities here are unscaled)."""
        self.taxonomy = taxonomy
        self.threshold = threshold
        self.report_threshold: float | None = None
        self.shown_threshold: float | None = None
        self.device = torch.device(device or "cpu")
        self.head_names = tuple(taxonomy.head_names)
        self.head_sizes = dict(taxonomy.head_sizes)
        self.num_classes = len(taxonomy.class_names)
        small = [name for name, k in self.head_sizes.items() if k < 2]
        if small:
            raise ValueError(f"heads {small} have fewer than two labels: nothing to evaluate")
        self._table = taxonomy.target_table().to(self.device)
        kwargs = {"process_group": process_group}
        sizes = {**self.head_sizes, COMBINED: self.num_classes}
        self._samples = {scope: _Samples(k, **kwargs).to(self.device) for scope, k in sizes.items()}
        self._loss = _LossTotal(**kwargs).to(self.device)

    @torch.no_grad()
    def update(
        self,
        logits: Sequence[Tensor],
        labels: Tensor,
        loss_sum: float | Tensor | None = None,
    ) -> None:
        """Add a batch: `logits` one [N, K_h] tensor per head (head order), `labels` [N] leaf classes,
        `loss_sum` the summed (not mean) loss over the batch, if it should be reported."""
        if len(logits) != len(self.head_names):
            raise ValueError(f"expected {len(self.head_names)} logit tensors (heads {self.head_names}), got {len(logits)}")
        logits = [z.detach().to(self.device, torch.float32) for z in logits]
        labels = labels.detach().to(self.device, torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be leaf class indices in [0, {self.num_classes}), got {labels.tolist()}")

        for h, name in enumerate(self.head_names):
            target = self._table[labels, h]
            valid = target >= 0
            probs = torch.softmax(logits[h][valid], dim=-1)
            self._samples[name].update(probs, probs.argmax(dim=-1), target[valid])

        probs = combined_probs(self.taxonomy, logits)
        self._samples[COMBINED].update(probs, decide(self.taxonomy, logits, probs, self.threshold), labels)

        if loss_sum is not None:
            self._loss.update(torch.as_tensor(loss_sum, dtype=torch.float64).detach(), labels.numel())

    def compute(self) -> dict[str, float | list]:
        """All metrics on the union of every rank's samples (collective: call on every rank)."""
        out: dict[str, float | list] = {}
        with warnings.catch_warnings():
            # a rank that saw no samples still has to join the sync; that is not a mistake
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            # fixed order: every rank must run the same sequence of collectives
            gathered = {scope: metric.compute() for scope, metric in self._samples.items()}
            loss_total, loss_count = self._loss.compute()

        probs, preds, target = gathered[COMBINED]
        combined = _scope_metrics(probs, preds, target, self.num_classes)
        for key in ("acc", "bacc", "f1", "auroc", "ece", "confusion"):
            out[key] = combined[key]

        for name, k in self.head_sizes.items():
            probs, preds, target = gathered[name]
            head = _scope_metrics(probs, preds, target, k)
            for key in ("acc", "bacc", "f1", "auroc", "ece", "sens", "spec"):
                if key in head:
                    out[f"{name}_{key}"] = head[key]
            out[f"{name}_count"] = target.numel()
        point = self.threshold if self.threshold is not None else self.report_threshold
        if point is not None:
            from bcc.operating_point import binary_head, rates

            name = binary_head(self.taxonomy)[1]
            probs, _, target = gathered[name]
            for key, value in rates(probs[:, 1], target, point).items():
                out[f"{name}_op_{key}"] = value
            out[f"{name}_op_threshold"] = float(point if self.shown_threshold is None else self.shown_threshold)

        if loss_count:
            out["loss"] = loss_total / loss_count
        out["count"] = gathered[COMBINED][2].numel()
        return out

    def reset(self) -> None:
        for metric in (*self._samples.values(), self._loss):
            metric.reset()


def metric_names(taxonomy) -> list[str]:
    """The scalar metric names `EvalMetrics.compute()` gives for `taxonomy` (what `checkpoint.metric`
    may name), known before any evaluation runs."""
    names = ["acc", "bacc", "f1", "auroc", "ece"]
    for name, k in taxonomy.head_sizes.items():
        names += [f"{name}_{m}" for m in ("acc", "bacc", "f1", "auroc", "ece", *(("sens", "spec") if k == 2 else ()))]
        names.append(f"{name}_count")
    return [*names, "loss", "count"]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(metrics: Mapping[str, Any], title: str | None = None):
    """A rich Table of one evaluation: a row for the combined decision and one per head."""
    from rich.table import Table

    columns = ("acc", "bacc", "f1", "auroc", "ece", "sens", "spec")
    heads = [key[: -len("_acc")] for key in metrics if key.endswith("_acc")]
    caption = [f"{metrics['count']} samples"] if "count" in metrics else []
    if "loss" in metrics:
        caption.insert(0, f"loss {_fmt(metrics['loss'])}")
    from rich.text import Text

    # plain text: a title holds source and file names (`val [big]`, `[Malignant] Pre-B`), not rich markup
    table = Table(title=Text(title) if title is not None else None, caption=" · ".join(caption) or None, title_justify="left")
    table.add_column("", style="bold")
    for col in columns:
        table.add_column(col, justify="right")
    table.add_column("n", justify="right", style="dim")
    if "acc" in metrics:
        row = [_fmt(metrics.get(col, "")) for col in columns]
        table.add_row(COMBINED, *row, _fmt(metrics.get("count", "")))
    for head in heads:
        row = [_fmt(metrics.get(f"{head}_{col}", "")) for col in columns]
        table.add_row(head, *row, _fmt(metrics.get(f"{head}_count", "")))
        if f"{head}_op_threshold" in metrics:  # the same head at the operating point (the decision's)
            row = [_fmt(metrics.get(f"{head}_op_{col}", "")) if col in ("bacc", "sens", "spec") else ""
                   for col in columns]
            table.add_row(f"{head} @ p>={metrics[f'{head}_op_threshold']:.3f}", *row, "")
    return table
