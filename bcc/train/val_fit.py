"""Fits on the val split at the end of training: temperatures (`eval.calibrate`) and the binary operating
point (`eval.operating_point`), of the raw weights and of the EMA's, stored with the best checkpoint.

Fitted on every rank from the training eval path's val logits (gathered: each val sample once), never
by reloading the checkpoint through the inference stack (bcc.predict/evaluate), so every rank holds the
same values for the final test pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from bcc.calibration import apply_temperature, fit_temperatures, write_temperatures
from bcc.checkpoint import read_train_state
from bcc.config import Config
from bcc.console import console
from bcc.operating_point import (
    OperatingPointError,
    _logit,
    fit_on_logits,
    parse_operating_point,
    write_operating_point,
)
from bcc.train.ema import evaluate_ema

if TYPE_CHECKING:
    from bcc.train.fit import Run


def _val_logits(run: Run, ema: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The val logits of the raw (or EMA) weights, per head, and the labels: every sample once, on every rank."""
    logits: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []

    def keep(batch, out):
        logits.append([z.detach().float().cpu() for z in out])
        labels.append(batch["label"].cpu())

    if ema:
        evaluate_ema(run, run.cfg.data.val_split, "for calibration", collect=keep)
    else:
        run.eval(run.cfg.data.val_split, "for calibration", collect=keep)
    sizes = list(run.parts.taxonomy.head_sizes.values())
    mine = ([torch.cat([b[h] for b in logits]) if logits else torch.zeros(0, k) for h, k in enumerate(sizes)],
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    shares = gather_object([mine])  # every rank's share, in rank order: each val sample once
    return ([torch.cat([share[0][h] for share in shares]) for h in range(len(sizes))],
            torch.cat([share[1] for share in shares]).long())


def _fit_val(cfg: Config, taxonomy, logits, labels) -> tuple[dict[str, float], dict | None, str | None]:
    """(temperatures, operating point, why no point) fitted on one set of weights' val logits."""
    temps = fit_temperatures(taxonomy, logits, labels) if cfg.eval.calibrate else {}
    rule = parse_operating_point(cfg.eval.operating_point)
    if rule.is_argmax:
        return temps, None, None
    scaled = apply_temperature(logits, temps, taxonomy.head_names) if temps else logits
    try:
        head, threshold, val = fit_on_logits(taxonomy, scaled, labels, rule)
    except OperatingPointError as e:  # a val split without both classes: the run itself is fine
        return temps, None, str(e)
    t = temps.get(head, 1.0)
    labels_ = next(x.labels for x in taxonomy.heads if x.name == head)
    return temps, {"rule": str(rule), "head": head, "positive_label": labels_[1], "threshold": threshold,
                   "temperature": t, "margin": t * _logit(threshold), "calibrated": bool(temps), "val": val}, None


def calibrate_in_memory(run: Run, best: Path) -> dict:
    """Temperature scaling (`eval.calibrate`), then the operating point (`eval.operating_point`, on the
    temperature-scaled probabilities), fitted on every rank from the val logits of the training eval path.

    Each rank keeps its share of the val logits, all ranks gather them (every sample exactly once) and
    fit the same values; the main process stores them with the best checkpoint. With an EMA, the EMA
    weights get their own fit, stored under `ema` in the same files (`bcc export` of the EMA weights
    ships those). Returns {"calibration": ..., "operating_point": ...} for what was fitted (None where
    nothing could be), each with an `ema` entry when the run keeps an EMA.
    """
    all_logits, all_labels = _val_logits(run, ema=False)
    ema_logits = _val_logits(run, ema=True)[0] if run.parts.ema is not None else None
    cfg, taxonomy, out = run.cfg, run.parts.taxonomy, {}
    if all_labels.numel() == 0 or not best.exists():
        return {"calibration": None} if cfg.eval.calibrate else {"operating_point": None}
    # where the fit was made, as `bcc calibrate` records it: the val split, and for a fold run (data.fold) the
    # fold it is (`bcc eval`/`report` name it when they evaluate those samples: figures flattered by the fit)
    info = {"split": cfg.data.val_split, "fold": cfg.data.fold, "count": int(all_labels.numel()),
            "step": read_train_state(best).step}
    if not cfg.data.sources:  # a pack's location (several sources have no one location)
        info["data"] = str(run.manifest.root)
    temps, point, why = _fit_val(cfg, taxonomy, all_logits, all_labels)
    fits = {"": (temps, point, why)}
    if ema_logits is not None:
        fits["ema"] = _fit_val(cfg, taxonomy, ema_logits, all_labels)
    main = run.accelerator.is_main_process
    if cfg.eval.calibrate:
        # the EMA's entries carry the fit's facts too, so each stays described when the other is refitted
        ema_temps = {"ema": {"temperatures": fits["ema"][0], **info}} if "ema" in fits else {}
        if main:
            write_temperatures(best, temps, {**info, **ema_temps})
            for key, (t, _, _) in fits.items():
                console.print(f"calibrated {best}{' (EMA weights)' if key else ''}: temperatures {t}")
        out["calibration"] = {"temperatures": temps, **info, **ema_temps}
    if parse_operating_point(cfg.eval.operating_point).is_argmax:
        run.accelerator.wait_for_everyone()
        return out
    for key, (_, p, reason) in fits.items():
        if p is None and main:  # refused up front (check_fittable) where the split's counts tell; this is the rest
            console.print(f"[yellow]warning:[/] operating point{' of the EMA weights' if key else ''}: argmax "
                          f"(fallback: {reason})")
        elif main:
            val = p["val"]
            console.print(f"operating point {p['rule']} of {best}{' (EMA weights)' if key else ''}: {p['head']} "
                          f"positive when p >= {p['threshold']:.4f} (val sens/spec {val['argmax']['sens']:.3f}/"
                          f"{val['argmax']['spec']:.3f} at argmax, {val['chosen']['sens']:.3f}/"
                          f"{val['chosen']['spec']:.3f} there)")
    ema_point = ({"ema": {**fits["ema"][1], **info} if fits["ema"][1] else None}  # None: the EMA decides by argmax
                 if "ema" in fits else {})
    if point is not None:
        if main:
            write_operating_point(best, point["rule"], point["threshold"], taxonomy, point["temperature"],
                                  {**info, "calibrated": point["calibrated"], "val": point["val"], **ema_point})
        out["operating_point"] = {**point, **info, **ema_point}
    else:  # a fit fails only for want of a class in the val labels, which the EMA's fit shares: it failed too
        out["operating_point"], out["operating_point_fallback"] = None, f"argmax (fallback: {why})"
    run.accelerator.wait_for_everyone()
    return out
