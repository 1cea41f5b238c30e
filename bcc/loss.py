"""Multitask cross-entropy: one term per head, masked where a head does not apply.

A target of -1 means "not applicable" (the subtype of a benign cell): that sample is left out of that
head's mean. Each head's term is the (class-weighted) mean over its valid samples; a head with no
valid sample in the batch contributes exactly 0, still connected to the logits so DDP sees a
gradient (of zeros) for every head parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -1


def inverse_frequency_weights(counts: Sequence[int]) -> Tensor:
    """Class weights `w_c = N / (C * n_c)` (N samples, C classes, n_c samples of class c).

    Rare classes weigh more, and the weights average to 1 over the data:
    `sum_c n_c * w_c / N = 1`, so the loss keeps its scale compared with unweighted training.
    """
    counts = [int(n) for n in counts]
    if not counts:
        raise ValueError("inverse_frequency_weights needs at least one class count")
    for i, n in enumerate(counts):
        if n <= 0:
            raise ValueError(
                f"class index {i} has {n} samples; inverse-frequency weights need every class present "
                f"(counts: {counts})"
            )
    n = torch.tensor(counts, dtype=torch.float64)
    return (n.sum() / (len(counts) * n)).float()


class MultitaskLoss(nn.Module):
    """Weighted sum over heads of masked, optionally class-weighted and label-smoothed cross-entropy."""

    def __init__(
        self,
        head_names: Sequence[str],
        head_weights: Mapping[str, float] | None = None,
        class_weights: Mapping[str, Tensor | None] | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.head_names = tuple(head_names)
        if not self.head_names:
            raise ValueError("MultitaskLoss needs at least one head")
        head_weights = dict(head_weights or {})
        class_weights = dict(class_weights or {})
        for what, given in (("head_weights", head_weights), ("class_weights", class_weights)):
            unknown = sorted(set(given) - set(self.head_names))
            if unknown:
                raise ValueError(f"{what} names unknown heads {unknown}; heads are {list(self.head_names)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.head_weights = {name: float(head_weights.get(name, 1.0)) for name in self.head_names}
        self.label_smoothing = float(label_smoothing)
        # Buffers follow the module across devices; indexed by head position (names may not be valid
        # attribute names).
        for i, name in enumerate(self.head_names):
            w = class_weights.get(name)
            if w is not None:
                w = torch.as_tensor(w, dtype=torch.float32).detach().clone()
                if w.ndim != 1:
                    raise ValueError(
                        f"class weights of head {name!r} must be 1-D, got shape {tuple(w.shape)}"
                    )
            self.register_buffer(f"class_weight_{i}", w)

    def class_weight(self, head: str) -> Tensor | None:
        return getattr(self, f"class_weight_{self.head_names.index(head)}")

    def head_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        """Mean cross-entropy over samples whose target is not -1; exactly 0 when there are none."""
        target = target.long()
        valid = target != IGNORE
        if weight is not None:
            weight = weight.to(dtype=logits.dtype)
        total = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=IGNORE,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        # Same normaliser as F.cross_entropy's mean: the summed weight of each valid sample's class.
        if weight is None:
            denom = valid.sum().to(total.dtype)
        else:
            denom = (weight[target.clamp(min=0)] * valid).sum().to(total.dtype)
        # No branch on the batch content (that would sync with the GPU): an empty head gives 0 / 1.
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))

    def forward(
        self, logits: Sequence[Tensor], targets: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the weighted total and the per-head losses (detached, for logging)."""
        if len(logits) != len(self.head_names):
            raise ValueError(f"got {len(logits)} logits tensors for heads {list(self.head_names)}")
        missing = [name for name in self.head_names if name not in targets]
        if missing:
            raise KeyError(f"targets lack heads {missing}; given {sorted(targets)}")
        per_head: dict[str, Tensor] = {}
        total = None
        for i, (name, head_logits) in enumerate(zip(self.head_names, logits, strict=True)):
            loss = self.head_loss(head_logits, targets[name], getattr(self, f"class_weight_{i}"))
            per_head[name] = loss.detach()
            term = self.head_weights[name] * loss
            total = term if total is None else total + term
        return total, per_head
