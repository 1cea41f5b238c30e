"""Evaluation of a split of several sources (`data.sources`): per source and combined, in one pass.

Each source's share of the split is read by its own eval loader (every sample once over all ranks);
each batch goes through the model once and into two metric sets: its source's and the combined one.
So the combined row is exactly the metrics of the concatenated split, and no sample is read twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator

from bcc.console import console
from bcc.device_aug import on_device
from bcc.finetune import set_train_mode
from bcc.metrics import EvalMetrics, format_table
from bcc.train.epoch import sync_buffers
from bcc.train.setup import Components, RunInfo, StageParts


@torch.no_grad()
def evaluate_sources(model, loaders: Mapping[str, object], combined: EvalMetrics, per_source: Mapping[str, EvalMetrics],
                     loss_fn, accelerator: Accelerator, targets_of, collect=None) -> tuple[dict, dict[str, dict]]:
    """(combined metrics, {source: metrics}) over `loaders` (source name -> eval loader of its share).

    A collective like `bcc.train.epoch.evaluate`: every rank calls it, with the sources in the same order;
    `model` is the unwrapped module. `collect(batch, logits)` sees every batch of this rank.
    """
    was_training = model.training
    model.eval()
    combined.reset()
    for name, loader in loaders.items():
        metrics = per_source[name]
        metrics.reset()
        for batch in on_device(loader, accelerator.device):  # uint8 crops -> normalised, on the device
            logits = model(batch["image"])
            labels = batch["label"]
            loss, _ = loss_fn(logits, targets_of(labels))
            loss_sum = loss.detach().float() * labels.numel()
            metrics.update(logits, labels, loss_sum=loss_sum)
            combined.update(logits, labels, loss_sum=loss_sum)
            if collect is not None:
                collect(batch, logits)
    by_source = {name: per_source[name].compute() for name in loaders}  # each syncs: same order on every rank
    result = combined.compute()
    model.train(was_training)
    return result, by_source


def evaluate_split_by_source(split: str, loaders: Mapping[str, object], parts: Components, stage: StageParts,
                             metrics: EvalMetrics, per_source: Mapping[str, EvalMetrics], accelerator: Accelerator,
                             info: RunInfo, title: str, collect: Callable | None = None) -> tuple[dict, dict]:
    """`evaluate_sources` with the run's model; prints one table per source and the combined one."""
    sync_buffers(parts.model, info.world_size)
    result, by_source = evaluate_sources(parts.model, loaders, metrics, per_source, parts.loss_fn, accelerator,
                                         parts.targets_of, collect)
    set_train_mode(parts.model, stage.frozen_bn)
    for name, res in by_source.items():
        console.print(format_table(res, f"{split} [{name}] {title}"))
    console.print(format_table(result, f"{split} (all sources) {title}"))
    return result, by_source
