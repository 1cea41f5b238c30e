"""EMA of the weights (`train.ema_decay`): timm's `ModelEmaV3`, kept beside the raw weights.

The EMA is updated after every optimizer step with the decay of that step (`ModelEmaV3.get_decay(step)`:
a copy of the weights at step 1, then `ema_decay`, or timm's warmup ramp with `train.ema_warmup`), so it
is a pure function of the weights and the step count: a checkpoint holds it (`model_ema.safetensors`,
listed in hashes.json) and a resumed run continues it bitwise.

Every rank keeps an identical EMA rather than rank 0 alone. After a step every rank holds the same
parameters (DDP all-reduces the gradients), so the same update needs no communication, and evaluation is
collective (each rank evaluates its share of the val split), so each rank needs the EMA weights anyway.
BatchNorm running statistics are the exception: between the broadcasts DDP makes at each forward, each
rank's statistics follow its own batches, and so do the EMA's. Before every evaluation, checkpoint and
summary the EMA's buffers are made rank 0's (`sync_buffers`, as the raw model's are), so what is
evaluated and saved is the same on every rank and equal in a resumed run.

Metrics of the EMA weights are the raw metrics' names prefixed `ema_` (`ema_bacc`), in the same
metrics.jsonl rows and results; `checkpoint.metric=ema_bacc` chooses the best checkpoint by them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.utils.model_ema import ModelEmaV3

from bcc.console import console
from bcc.metrics import format_table
from bcc.train.runlog import scalar_metrics
from bcc.train.setup import TrainError

PREFIX = "ema_"  # metric columns of the EMA weights


def build_ema(model: torch.nn.Module, decay: float | None, warmup: bool, device: torch.device) -> ModelEmaV3 | None:
    """An EMA copy of `model` on `device` (None when `decay` is None). Float32 like the model's master
    weights, so no stochastic rounding (which would add an RNG state to the checkpoint)."""
    if decay is None:
        return None
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, stochastic_rounding=False)
    ema.module.to(device)
    ema.module.requires_grad_(False)
    return ema


def ema_columns(metrics: Mapping) -> dict:
    """Metrics of the EMA weights as columns beside the raw ones: `bacc` -> `ema_bacc`."""
    return {f"{PREFIX}{k}": v for k, v in scalar_metrics(metrics).items()}


def is_ema_metric(name: str) -> bool:
    return name.startswith(PREFIX)


def ema_state(ema: ModelEmaV3 | None, world_size: int) -> dict[str, torch.Tensor] | None:
    """The EMA state dict to checkpoint (collective under DDP: buffers become rank 0's first)."""
    if ema is None:
        return None
    _sync(ema, world_size)
    return ema.module.state_dict()


def restore_ema(ema: ModelEmaV3 | None, saved: Mapping[str, torch.Tensor] | None, path) -> None:
    """Load a checkpoint's EMA. A run with an EMA cannot resume from a checkpoint without one."""
    if ema is None:
        return
    if saved is None:
        raise TrainError(f"checkpoint {path} holds no EMA weights (model_ema.safetensors) but train.ema_decay "
                         "is set; resume without it or start a new run.dir")
    ema.module.load_state_dict(saved)


def evaluate_ema(run, split: str, title: str, collect=None) -> dict:
    """`evaluate` with the EMA weights on `split` (collective), printed as its own table; returns the
    metrics under `ema_` names, or {} when the run keeps no EMA. `run` is `bcc.train.fit.Run`;
    `collect(batch, logits)` as in `evaluate`."""
    from bcc.train.epoch import evaluate

    ema = run.parts.ema
    if ema is None:
        return {}
    _sync(ema, run.info.world_size)
    with run.accelerator.autocast():  # as the raw model's forward, which Accelerate wraps
        result = evaluate(ema.module, run.loader(split), run.metrics, run.parts.loss_fn, run.accelerator,
                          run.parts.targets_of, collect)
    console.print(format_table(result, f"{split} {title}, EMA weights"))
    return ema_columns(result)


def _sync(ema: ModelEmaV3, world_size: int) -> None:
    from bcc.train.epoch import sync_buffers

    sync_buffers(ema.module, world_size)
