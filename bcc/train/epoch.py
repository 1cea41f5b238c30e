"""One epoch of training and one evaluation pass, as free functions (torchvision references style).

Accelerate owns device placement, DDP, mixed precision, accumulation and clipping; these functions own
moving the stream's batches (a WebDataset pipeline is not a DataLoader, so Accelerate never re-shards
them), the loop state's counters and the per-step preemption vote.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator

from bcc.checkpoint import TrainState
from bcc.console import console
from bcc.finetune import set_train_mode, stage_at
from bcc.metrics import EvalMetrics, format_table
from bcc.train.preempt import PreemptionFlag
from bcc.train.runlog import RunLog
from bcc.train.setup import Components, RunInfo, StageParts, TrainError, set_lr


def move_batch(batch: Mapping, device: torch.device, channels_last: bool = False) -> dict:
    out = dict(batch)
    image = batch["image"].to(device, non_blocking=True)
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    out["label"] = batch["label"].to(device, non_blocking=True)
    return out


def train_step(model, batch, loss_fn, optimizer, accelerator: Accelerator, targets_of, clip_grad: float):
    """Forward, backward and (at accumulation boundaries) an optimizer step. Returns the loss (detached)."""
    with accelerator.accumulate(model):
        logits = model(batch["image"])
        loss, _ = loss_fn(logits, targets_of(batch["label"]))
        accelerator.backward(loss)
        if clip_grad > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_one_epoch(loader, parts: Components, stage: StageParts, state: TrainState, accelerator: Accelerator,
                    info: RunInfo, preempt: PreemptionFlag, log: RunLog, save: Callable[[], None]) -> bool:
    """Run the rest of the current epoch (resumes mid-epoch from `state.batches_in_epoch`).

    Returns True when preempted (the state is then consistent and can be saved).
    """
    cfg = parts.cfg
    _, stage_start = stage_at(parts.stages, state.epoch)
    plan, accum = parts.stages[stage.index], cfg.train.grad_accum
    step_in_stage = (state.epoch - stage_start) * info.steps_per_epoch + state.batches_in_epoch // accum
    t0, seen0 = time.perf_counter(), state.samples_seen
    loss_sum, loss_n = torch.zeros((), device=accelerator.device), 0
    for batch in loader:
        if preempt.agreed():
            return True
        lr = set_lr(stage.optimizer, cfg, plan, step_in_stage, plan.epochs * info.steps_per_epoch)
        batch = move_batch(batch, accelerator.device, cfg.model.channels_last)
        loss_sum += train_step(stage.wrapped, batch, parts.loss_fn, stage.optimizer, accelerator,
                               parts.targets_of, cfg.train.clip_grad)
        loss_n += 1
        state.batches_in_epoch += 1
        state.samples_seen += batch["label"].numel() * info.world_size
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        step_in_stage += 1
        if state.step % cfg.train.log_every == 0 or state.batches_in_epoch == info.batches_per_epoch:
            loss = (loss_sum / loss_n).item()  # a sync point: only at log time
            _progress(log, state, info, cfg.data.batch_size, loss, lr, t0, seen0)
            loss_sum.zero_()
            loss_n = 0
            if not math.isfinite(loss):
                raise TrainError(f"loss is {loss} at step {state.step}; lower train.lr or enable clipping")
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0 and (
                state.batches_in_epoch < info.batches_per_epoch):
            save()
    if state.batches_in_epoch != info.batches_per_epoch:
        raise TrainError(f"rank {info.rank} got {state.batches_in_epoch} batches in epoch {state.epoch}, "
                         f"expected {info.batches_per_epoch}")
    return False


def _progress(log: RunLog, state: TrainState, info: RunInfo, batch_size: int, loss: float, lr: float,
              t0: float, seen0: int) -> None:
    rate = (state.samples_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
    left = info.total_epochs * info.batches_per_epoch - (state.epoch * info.batches_per_epoch + state.batches_in_epoch)
    log.progress(epoch=state.epoch + 1, epochs=info.total_epochs, batch=state.batches_in_epoch,
                 batches=info.batches_per_epoch, step=state.step, loss=loss, lr=lr, rate=rate,
                 eta=left * batch_size * info.world_size / max(rate, 1e-9))


@torch.no_grad()
def evaluate(model, loader, metrics: EvalMetrics, loss_fn, accelerator: Accelerator, targets_of, collect=None) -> dict:
    """Metrics over a loader that gives every sample to exactly one rank (collective: all ranks call it).

    `model` must be the unwrapped module: ranks may hold different numbers of batches, and a DDP
    forward could wait on a collective that the other rank never joins. `collect(batch, logits)` sees
    every batch of this rank.
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    for batch in loader:
        batch = move_batch(batch, accelerator.device)
        logits = model(batch["image"])
        labels = batch["label"]
        loss, _ = loss_fn(logits, targets_of(labels))
        metrics.update(logits, labels, loss_sum=loss.detach().float() * labels.numel())
        if collect is not None:
            collect(batch, logits)
    result = metrics.compute()  # synced across ranks: every rank gets here
    model.train(was_training)
    return result


def sync_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Make BatchNorm running statistics rank 0's everywhere. DDP broadcasts buffers at the start of
    each forward, so after the last training step every rank holds its own statistics; without this,
    ranks would evaluate (and the last forward's statistics would be saved) inconsistently."""
    if world_size > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)


def evaluate_split(split: str, loader, parts: Components, stage: StageParts, metrics: EvalMetrics,
                   accelerator: Accelerator, info: RunInfo, title: str, collect=None) -> dict:
    """`evaluate` on one split with the run's model; prints the table; leaves the stage's train modes."""
    sync_buffers(parts.model, info.world_size)
    result = evaluate(parts.model, loader, metrics, parts.loss_fn, accelerator, parts.targets_of, collect)
    set_train_mode(parts.model, stage.frozen_bn)
    console.print(format_table(result, f"{split} {title}"))
    return result

