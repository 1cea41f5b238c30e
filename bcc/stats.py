"""Small pure statistics for comparisons over seeds: mean +- sd, classification metrics from label and
prediction arrays, and the percentile bootstrap (plain and paired) over test samples.

Everything here is a function of numpy arrays and a seed: no files, no torch, so `bcc compare` and its
tests share one definition.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["accuracy", "balanced_accuracy", "bootstrap_ci", "mean_sd", "recall_of", "sample_metrics"]

N_BOOT = 1000  # bootstrap replicates
LEVEL = 0.95


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; sd is NaN for fewer than two."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == p)) if len(y) else math.nan


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean recall over the classes present in `y` (sklearn's `balanced_accuracy_score`)."""
    classes = np.unique(y)
    return float(np.mean([np.mean(p[y == c] == c) for c in classes])) if len(classes) else math.nan


def recall_of(label: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """Recall of one class: sensitivity for label 1 of a binary task, specificity for label 0."""
    def recall(y: np.ndarray, p: np.ndarray) -> float:
        mask = y == label
        return float(np.mean(p[mask] == label)) if mask.any() else math.nan

    return recall


# metric name -> (function of (y, p), which columns: "class" (leaf classes) or "binary" (root binary head))
SAMPLE_METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "acc": (accuracy, "class"),
    "bacc": (balanced_accuracy, "class"),
    "binary_bacc": (balanced_accuracy, "binary"),
    "binary_sens": (recall_of(1), "binary"),
    "binary_spec": (recall_of(0), "binary"),
}


def sample_metrics(has_binary: bool) -> list[str]:
    """The metrics computable from per-sample predictions (binary ones only where the task has a root
    binary head)."""
    return [m for m, (_, kind) in SAMPLE_METRICS.items() if has_binary or kind == "class"]


def bootstrap_ci(statistic: Callable[[Sequence[np.ndarray]], float], sizes: Sequence[int], *,
                 n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resampled rows.

    Each of `n_boot` replicates draws, for each group `g` of `sizes`, `sizes[g]` row indices with
    replacement (uniform), and calls `statistic([idx_0, idx_1, ...])`. Groups are independent test sets;
    everything evaluated on one test set (the seeds of one pack, two modes being compared) must index it
    with the same array, which is what makes a comparison paired. Replicates where the statistic is NaN
    (a resample without some class) are left out. Returns (lo, hi), the (1 - level)/2 and (1 + level)/2
    quantiles (numpy's linear interpolation), or (nan, nan) when no replicate is finite. The draws depend
    only on `seed`, `sizes` and `n_boot`: the same call gives the same interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1 or not sizes or min(sizes) < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([statistic([rng.integers(0, n, size=n) for n in sizes]) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    q = (1 - level) / 2
    lo, hi = np.quantile(values, [q, 1 - q])
    return float(lo), float(hi)
