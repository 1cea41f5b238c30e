"""One epoch of training and one evaluation pass, as free functions (torchvision references style).

Accelerate owns device placement, DDP, mixed precision, accumulation and clipping; these functions own
moving the stream's batches (a WebDataset pipeline is not a DataLoader, so Accelerate never re-shards
them), the loop state's counters, the preemption vote and the loss check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator

from bcc.checkpoint import TrainState
from bcc.console import console
from bcc.device_aug import on_device
from bcc.finetune import set_train_mode, stage_at
from bcc.metrics import EvalMetrics, format_table
from bcc.train.preempt import PreemptionFlag, is_vote_step
from bcc.train.runlog import RunLog
from bcc.train.setup import Components, RunInfo, StageParts, TrainError, set_lr


def move_batch(batch: Mapping, device: torch.device, channels_last: bool = False) -> dict:
    out = dict(batch)
    image = batch["image"].to(device, non_blocking=True)
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    out["label"] = batch["label"].to(device, non_blocking=True)
    return out


def train_step(model, batch, loss_fn, optimizer, accelerator: Accelerator, targets_of, clip_grad: float):
    """Forward, backward and (at accumulation boundaries) an optimizer step. Returns the loss (detached).

    `optimizer` is Accelerate's wrapper (it owns the fp16 scaler). Inside a window there is nothing to
    step or clear, so neither is called there; the gradients are cleared on the torch optimizer itself,
    which is what the wrapper's `zero_grad` does at a boundary, minus its per-call signature inspection.
    """
    with accelerator.accumulate(model):
        logits = model(batch["image"])
        loss, _ = loss_fn(logits, targets_of(batch["label"]))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if clip_grad > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class LossWatch:
    """The per-micro-batch losses of the loop, kept on the device until a check point, so that a
    non-finite loss is named at the step it appeared without a host sync per step.

    `verify()` copies the pending losses to the host at once (a sync point: call it only where the loop
    syncs anyway -- log steps, checkpoints, preemption) and raises TrainError naming the first optimizer
    step whose loss was not finite. `mean()` verifies and returns the mean loss since the last `mean()`.
    Checks happen at accumulation boundaries, so the pending losses start a window: the i-th belongs to
    optimizer step `first_step + i // accum`.
    """

    _FOLD = 1024  # stack pending scalars into one tensor this often: a bounded number of Python objects

    def __init__(self, first_step: int, accum: int) -> None:
        self.first_step, self.accum = first_step, accum
        self.pending: list[torch.Tensor] = []
        self.folded: list[torch.Tensor] = []
        self.n_pending = 0
        self.total, self.count = 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        self.n_pending += 1
        if len(self.pending) == self._FOLD:
            self.folded.append(torch.stack(self.pending))
            self.pending = []

    def verify(self, epoch: int) -> None:
        if not self.n_pending:
            return
        values = torch.cat([*self.folded, torch.stack(self.pending)] if self.pending else self.folded)
        host = values.float().tolist()  # the one device-to-host copy since the last check
        for i, v in enumerate(host):
            if not math.isfinite(v):
                raise TrainError(f"loss is {v} at step {self.first_step + i // self.accum} (epoch {epoch + 1}); "
                                 "lower train.lr or enable train.clip_grad")
        self.total += math.fsum(host)
        self.count += len(host)
        self.first_step += len(host) // self.accum
        self.pending, self.folded, self.n_pending = [], [], 0

    def mean(self, epoch: int) -> float:
        self.verify(epoch)
        out = self.total / self.count if self.count else float("nan")
        self.total, self.count = 0.0, 0
        return out


def train_one_epoch(loader, parts: Components, stage: StageParts, state: TrainState, accelerator: Accelerator,
                    info: RunInfo, preempt: PreemptionFlag, log: RunLog, save: Callable[[], None]) -> bool:
    """Run the rest of the current epoch (resumes mid-epoch from `state.batches_in_epoch`).

    Everything that leaves the step -- the preemption vote (every `train.preempt_check_steps` optimizer
    steps), mid-epoch checkpoints, the loss check -- happens only at accumulation boundaries, so a saved
    state never holds half a window and resume is exact whatever `train.grad_accum` and wherever a signal
    lands. The epoch's last step votes in `fit`, after its checkpoint. Returns True when the ranks agreed
    to stop (the state is then at a window boundary, ready to save).
    """
    cfg = parts.cfg
    _, stage_start = stage_at(parts.stages, state.epoch)
    plan, accum = parts.stages[stage.index], cfg.train.grad_accum
    stage_steps = plan.epochs * info.steps_per_epoch
    step_in_stage = (state.epoch - stage_start) * info.steps_per_epoch + state.batches_in_epoch // accum
    t0, seen0 = time.perf_counter(), state.samples_seen
    losses = LossWatch(state.step + 1, accum)
    lr = None
    # uint8 batches become the model's input here, on the device (bcc.device_aug: rotation, jitter, normalise)
    for batch in on_device(loader, accelerator.device, channels_last=cfg.model.channels_last):
        if lr is None or state.batches_in_epoch % accum == 0:  # a window starts: the rate of its step
            lr = set_lr(stage.optimizer, cfg, plan, step_in_stage, stage_steps)
        losses.add(train_step(stage.wrapped, batch, parts.loss_fn, stage.optimizer, accelerator,
                              parts.targets_of, cfg.train.clip_grad))
        state.batches_in_epoch += 1
        state.samples_seen += batch["label"].numel() * info.world_size
        if not accelerator.sync_gradients:
            continue  # inside a window: nothing may stop or save here
        state.step += 1
        step_in_stage += 1
        if parts.ema is not None:  # bcc.train.ema: the decay is a function of the step, so resume is exact
            parts.ema.update(parts.model, step=state.step)
        epoch_end = state.batches_in_epoch == info.batches_per_epoch
        if state.step % cfg.train.log_every == 0 or epoch_end:
            loss = losses.mean(state.epoch)  # a sync point: only at log time
            _progress(log, state, info, cfg.data.batch_size, loss, lr, t0, seen0)
        if epoch_end:
            continue
        if is_vote_step(state.step, cfg.train.preempt_check_steps) and preempt.agreed():
            losses.verify(state.epoch)  # never save weights a non-finite loss has touched
            return True
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
            losses.verify(state.epoch)
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
    for batch in on_device(loader, accelerator.device):
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

