"""Temperature scaling per head and the expected calibration error (ECE).

Temperature scaling (Guo et al. 2017) divides a head's logits by one scalar T > 0 fitted on the
validation split to minimise the negative log-likelihood; it changes confidences, never the argmax,
so accuracy is untouched. `ece` is torchmetrics' `multiclass_calibration_error`, and `reliability_bins`
(for the reliability diagram) bins confidences exactly as it does, so the numbers in `metrics.json`
and on the diagram agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FIT_KEYS", "apply_temperature", "ece", "fit_facts", "fit_temperature", "fit_temperatures", "reliability_bins",
           "temperature_fit", "write_temperatures"]

TEMPERATURE_FILE = "temperature.json"  # stored in a checkpoint directory; read by bcc.predict
TEMPERATURE_FORMAT = "bcc-temperature/1"

# Search range for T. The NLL is convex in 1/T, so a bracketed golden-section search on log T is
# reliable; the bounds only matter for degenerate data (perfectly separable: NLL keeps falling as T -> 0).
T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: Tensor, targets: Tensor, log_t: float) -> float:
    return F.cross_entropy(logits / math.exp(log_t), targets).item()


def fit_temperature(logits: Tensor, targets: Tensor, *, tol: float = 1e-4) -> float:
    """Temperature T > 0 minimising the NLL of `softmax(logits / T)` against `targets`.

    `logits` is [N, K], `targets` [N] label indices; rows with target -1 (head not applicable) are
    ignored. With no valid rows the answer is 1.0 (no change). The result lies in [T_MIN, T_MAX].
    """
    logits = logits.detach().to(torch.float64)
    targets = targets.detach().to(torch.long)
    valid = targets >= 0
    logits, targets = logits[valid], targets[valid]
    if targets.numel() == 0:
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = _nll(logits, targets, a), _nll(logits, targets, b)
    while hi - lo > tol:
        if fa <= fb:  # minimum in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = _nll(logits, targets, a)
        else:  # minimum in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = _nll(logits, targets, b)
    return float(math.exp((lo + hi) / 2))


def fit_temperatures(taxonomy, logits: Sequence[Tensor], labels: Tensor) -> dict[str, float]:
    """One temperature per head (head order), fitted on leaf-class `labels` mapped to head targets."""
    table = taxonomy.target_table().to(labels.device)
    return {
        name: fit_temperature(z, table[labels, h])
        for h, (name, z) in enumerate(zip(taxonomy.head_names, logits, strict=True))
    }


def apply_temperature(
    logits: Sequence[Tensor],
    temperatures: Mapping[str, float],
    head_names: Sequence[str] | None = None,
) -> tuple[Tensor, ...]:
    """Divide each head's logits by its temperature.

    `logits` is in head order. `head_names` names those heads; without it the keys of `temperatures`
    (in order) are taken as the head names. A head missing from `temperatures` keeps T = 1.
    """
    names = list(temperatures) if head_names is None else list(head_names)
    if len(names) != len(logits):
        raise ValueError(f"got {len(logits)} logit tensors for heads {names}; pass head_names explicitly")
    out = []
    for name, z in zip(names, logits, strict=True):
        t = float(temperatures.get(name, 1.0))
        if not t > 0:
            raise ValueError(f"temperature of head {name!r} must be > 0, got {t}")
        out.append(z / t)
    return tuple(out)


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (accuracy, mean confidence, count) of the top-1 prediction, each [n_bins + 1].

    Bins are [k/n, (k+1)/n) for k < n, and the last slot holds confidences of exactly 1.0; this is
    torchmetrics' binning (`torch.bucketize(..., right=True)`), kept so that `ece` agrees with it.
    """
    probs = probs.detach().to(torch.float64)
    targets = targets.detach().to(probs.device)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).to(torch.float64)
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)
    index = torch.bucketize(conf, bounds, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=torch.float64, device=probs.device).scatter_add_(
        0, index, torch.ones_like(conf)
    )
    acc = torch.zeros_like(count).scatter_add_(0, index, correct) / count.clamp(min=1)
    mean_conf = torch.zeros_like(count).scatter_add_(0, index, conf) / count.clamp(min=1)
    return acc, mean_conf, count


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (L1, top-label) of `probs` [N, K]; NaN when N == 0.

    The one ECE of bcc: torchmetrics' `multiclass_calibration_error` (the binning of `reliability_bins`).
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    if targets.numel() == 0:
        return float("nan")
    probs = probs.detach().float()
    return float(multiclass_calibration_error(probs, targets.detach().long().to(probs.device), probs.shape[1],
                                              n_bins=n_bins))


def write_temperatures(checkpoint_dir: str | Path, temperatures: Mapping[str, float], info: Mapping[str, Any]) -> Path:
    """Store `temperatures` (head -> T) in `<checkpoint>/temperature.json` atomically.

    A `best`/`last` link is followed, so the file lands in the step directory it points at. Used by
    `bcc calibrate` and by training's `eval.calibrate`; `bcc.predict.read_temperatures` reads it.
    """
    from bcc.atomic import write_json

    path = Path(checkpoint_dir).resolve() / TEMPERATURE_FILE
    write_json(path, {
        "format": TEMPERATURE_FORMAT,
        "temperatures": {k: float(v) for k, v in temperatures.items()},
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
    })
    return path


# where a stored fit (temperature.json, operating_point.json) was made: the split, the run's data.fold whose
# view it was (null: none; absent in files of an older bcc), the data's location, its samples and the step
FIT_KEYS = ("split", "fold", "data", "count", "step")


def fit_facts(entry: Mapping[str, Any], file: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `FIT_KEYS` of a stored fit's entry, each taken from `file` (the file's top level) where the
    entry lacks it: an EMA entry written by an older bcc holds its values only, fitted on the samples the
    file's top level names."""
    base = file or {}
    return {k: entry[k] if k in entry else base[k] for k in FIT_KEYS if k in entry or k in base}


def temperature_fit(checkpoint_dir: str | Path, weights: str = "raw") -> dict[str, Any] | None:
    """Where the temperatures of `weights` ("raw" or "ema") stored with a checkpoint were fitted
    (`fit_facts` of `temperature.json`: the EMA's entry, then the file's top level), or None when there
    are none (no file, no EMA entry) or the file cannot be read (its loader says so)."""
    from bcc.atomic import read_json_object

    try:
        stored = read_json_object(Path(checkpoint_dir) / TEMPERATURE_FILE)
    except ValueError:
        return None
    if stored is None:
        return None
    if weights != "ema":
        return fit_facts(stored)
    entry = stored.get("ema")
    return fit_facts(entry, stored) if isinstance(entry, dict) else None
