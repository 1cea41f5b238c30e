"""Figures for evaluation and run comparison: confusion matrix, reliability diagram, validation curves.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, so no global state and
no display is ever needed) and written atomically (`bcc.atomic.atomic_path`), so a reader never sees
half a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bcc.atomic import atomic_path

__all__ = ["plot_confusion", "plot_curves", "plot_reliability"]

DPI = 120


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _annotate(ax, values: np.ndarray, texts: list[list[str]], dark: np.ndarray) -> None:
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=10,
                    color="white" if dark[i, j] else "black")


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Confusion matrix (rows = true class) as two panels: counts, and fractions of each true class."""
    counts = np.asarray(confusion, dtype=np.int64)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(f"confusion has shape {counts.shape}, expected ({c}, {c}) for classes {list(class_names)}")
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(support > 0, counts / np.maximum(support, 1), np.nan)

    side = 1.0 + 0.9 * c
    fig = Figure(figsize=(2 * side + 2.5, side + 1.2))
    axes = fig.subplots(1, 2)
    panels = [
        (axes[0], counts.astype(float), "counts", "Blues", max(int(counts.max()), 1)),
        (axes[1], np.nan_to_num(fractions), "row-normalised (recall on diagonal)", "Greens", 1.0),
    ]
    for ax, values, name, cmap, vmax in panels:
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name, fontsize=11)
        ax.set_xticks(range(c), labels=class_names, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), labels=[f"{n} ({s})" for n, s in zip(class_names, support[:, 0], strict=True)])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (support)")
    _annotate(axes[0], counts, [[str(v) for v in row] for row in counts], counts > 0.6 * counts.max())
    frac_text = [["–" if math.isnan(v) else f"{v:.2f}" for v in row] for row in fractions]
    _annotate(axes[1], fractions, frac_text, np.nan_to_num(fractions) > 0.6)
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    fig.suptitle(f"{title or 'confusion matrix'} — {total} samples, accuracy {accuracy:.3f}", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(
    probs,
    targets,
    path: str | os.PathLike,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Reliability diagram (accuracy per confidence bin against the diagonal, gap shaded, ECE in the
    title) above a histogram of the top-1 confidences."""
    import torch

    from bcc.calibration import ece, reliability_bins

    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    acc, conf, count = (t.cpu().numpy() for t in reliability_bins(probs, targets, n_bins))
    # the extra last slot (confidence exactly 1.0) is drawn as part of the top bin
    merged = count[-2] + count[-1]
    if merged:
        acc[-2] = (acc[-2] * count[-2] + acc[-1] * count[-1]) / merged
        conf[-2] = (conf[-2] * count[-2] + conf[-1] * count[-1]) / merged
    acc, conf, count = acc[:-1], conf[:-1], np.append(count[:-2], merged)
    error = ece(probs, targets, n_bins)
    n = int(count.sum())
    overall_acc = float((probs.argmax(1) == targets).float().mean()) if n else float("nan")
    overall_conf = float(probs.max(1).values.float().mean()) if n else float("nan")

    edges = np.linspace(0, 1, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    filled = count > 0
    fig = Figure(figsize=(6, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], acc[filled], width=width, color="#4C72B0", edgecolor="black",
            linewidth=0.6, label="accuracy")
    gap_low = np.minimum(acc, conf)[filled]
    top.bar(centres[filled], np.abs(conf - acc)[filled], bottom=gap_low, width=width, color="#DD8452",
            alpha=0.45, edgecolor="#C44E52", hatch="//", linewidth=0.6, label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)
    top.set_title(f"{title + ' — ' if title else ''}ECE {error:.3f} ({n_bins} bins, {n} samples)", fontsize=11)

    bottom.bar(centres, count, width=width, color="#8C8C8C", edgecolor="black", linewidth=0.6)
    bottom.axvline(overall_acc, color="#4C72B0", linestyle="-", linewidth=1.5, label=f"accuracy {overall_acc:.3f}")
    bottom.axvline(overall_conf, color="#C44E52", linestyle="--", linewidth=1.5,
                   label=f"mean confidence {overall_conf:.3f}")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("samples")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


LOWER_IS_BETTER = ("loss", "ece")


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    path: str | os.PathLike,
    split: str = "val",
    title: str | None = None,
) -> Path:
    """`metric` against epoch for several runs on one axis, from their metrics.jsonl rows.

    Rows of other splits (a row without `split` counts as `split`) and rows without a numeric value
    are skipped; x is `epoch`, or `step` for rows without one. The best point of each run is starred.
    A metric that no run reports is a ValueError naming the metrics that are there.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lower_better = metric == "loss" or metric.endswith(LOWER_IS_BETTER)
    x_name = "epoch"
    plotted = 0
    for name, rows in runs.items():
        points = [
            (row["epoch"] if "epoch" in row else row.get("step"), row[metric])
            for row in rows
            if row.get("split", split) == split and _is_number(row.get(metric))
        ]
        points = sorted(p for p in points if p[0] is not None)
        if not points:
            continue
        if any("epoch" not in row for row in rows):
            x_name = "epoch (step where no epoch)"
        xs, ys = zip(*points, strict=True)
        best = int(np.argmin(ys) if lower_better else np.argmax(ys))
        # the best value goes in the legend: annotations next to the stars overlap when runs agree
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.8,
                          label=f"{name} (best {ys[best]:.3f} at {xs[best]:g})")
        ax.plot(xs[best], ys[best], marker="*", markersize=14, color=line.get_color(),
                markeredgecolor="black", linestyle="none")
        plotted += 1
    if not plotted:
        seen = sorted({k for rows in runs.values() for row in rows for k, v in row.items() if _is_number(v)})
        raise ValueError(f"no run has {split!r} values of {metric!r}; numeric keys present: {seen}")
    ax.set_xlabel(x_name)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(title="run", fontsize=9)
    ax.set_title(title or f"{split} {metric} ({'lower' if lower_better else 'higher'} is better; ★ best)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
