"""The training loop: one plain train step, one evaluate function, and `fit` around them.

Accelerate owns device placement, DDP, mixed precision, accumulation and clipping; the loop owns
the stream (a WebDataset pipeline is not a DataLoader, so batches are moved here and Accelerate
never re-shards them), the unfreezing stages, checkpoints and preemption.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from bcc import __version__
from bcc.checkpoint import (
    Checkpoint,
    CheckpointManager,
    TrainState,
    find_latest,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_rng_state,
)
from bcc.config import Config, config_diff, config_from_dict, config_hash, config_to_dict, save_config
from bcc.console import console, set_main_process
from bcc.loss import MultitaskLoss, inverse_frequency_weights
from bcc.manifest import Manifest
from bcc.metrics import EvalMetrics, format_table
from bcc.model import build_model, count_parameters, group_of_module, parameter_groups
from bcc.schedule import (
    Stage,
    apply_trainable,
    build_param_groups,
    carry_optimizer_state,
    check_resume_stages,
    frozen_batchnorms,
    lr_factor,
    resolve_stages,
    set_train_mode,
    stage_at,
)
from bcc.stream import batches_per_epoch, eval_loader, train_loader
from bcc.taxonomy import Taxonomy

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGUSR1/SIGTERM; launchers requeue on this code
PREEMPTED_MARKER = "PREEMPTED"  # written into the run dir with the preemption checkpoint

# Config keys that may change when a run resumes; anything else is refused.
SAFE_RESUME_KEYS = (
    "train.epochs",
    "train.log_every",
    "data.workers",
    "data.eval_batch_size",
    "checkpoint.",
    "eval.",
    "run.",
)


class TrainError(RuntimeError):
    """A run that cannot start or continue, with a message for the user."""


# --------------------------------------------------------------------------- preemption


class PreemptionFlag:
    """SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next step boundary."""

    def __init__(self, install_handlers: bool = True) -> None:
        self.signum: int | None = None
        self.group = None
        for sig in (signal.SIGUSR1, signal.SIGTERM) if install_handlers else ():
            signal.signal(sig, self._handle)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            # the vote travels over a CPU (gloo) group: an NCCL all-reduce + .item() every step would
            # stall the GPU queue just to read one flag
            self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: all ranks must call it)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, group=self.group)
        return bool(flag.item() > 0)


# --------------------------------------------------------------------------- step and evaluation


def head_targets(table: torch.Tensor, labels: torch.Tensor, head_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Leaf class labels -> per-head targets (-1 where a head does not apply)."""
    rows = table[labels]
    return {name: rows[:, i] for i, name in enumerate(head_names)}


def train_step(model, batch, loss_fn, optimizer, accelerator: Accelerator, targets_of, clip_grad: float):
    """Forward, backward and (at accumulation boundaries) an optimizer step. Returns the loss."""
    with accelerator.accumulate(model):
        logits = model(batch["image"])
        loss, _ = loss_fn(logits, targets_of(batch["label"]))
        accelerator.backward(loss)
        if clip_grad > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model, loader, metrics: EvalMetrics, loss_fn, accelerator: Accelerator, targets_of, collect=None) -> dict:
    """Metrics over a loader that gives every sample to exactly one rank.

    `model` must be the unwrapped module: ranks may hold different numbers of batches, and a DDP
    forward could wait on a collective that the other rank never joins.
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


def move_batch(batch: Mapping, device: torch.device, channels_last: bool = False) -> dict:
    out = dict(batch)
    image = batch["image"].to(device, non_blocking=True)
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    out["label"] = batch["label"].to(device, non_blocking=True)
    return out


# --------------------------------------------------------------------------- set-up helpers


def class_weights_from_manifest(taxonomy: Taxonomy, class_counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Inverse-frequency weights per head from the train split's leaf-class counts."""
    table = taxonomy.target_table()
    out = {}
    for h, (name, size) in enumerate(taxonomy.head_sizes.items()):
        counts = [0] * size
        for c, cls in enumerate(taxonomy.class_names):
            t = int(table[c, h])
            if t >= 0:
                counts[t] += int(class_counts.get(cls, 0))
        out[name] = inverse_frequency_weights(counts)
    return out


def check_resume_compatible(saved: Config, current: Config, saved_meta: Mapping, taxonomy: Taxonomy) -> list[str]:
    """Refuse a checkpoint of another task or model; list config changes, accept only safe ones."""
    if saved_meta.get("taxonomy") != taxonomy.to_dict():
        try:
            saved_classes = list(Taxonomy.from_dict(saved_meta["taxonomy"]).class_names)
        except Exception:  # an unreadable taxonomy is just as much a mismatch
            saved_classes = "?"
        raise TrainError(
            f"checkpoint was trained with another taxonomy: classes {saved_classes} vs this dataset's "
            f"{list(taxonomy.class_names)}"
        )
    if saved.model != current.model:
        diff = {k: v for k, v in config_diff(saved, current).items() if k.startswith("model.")}
        raise TrainError(f"checkpoint was trained with another model: {diff}")
    changes = []
    unsafe = []
    for key, (old, new) in config_diff(saved, current).items():
        changes.append(f"{key}: {old!r} -> {new!r}")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_RESUME_KEYS):
            unsafe.append(key)
    if unsafe:
        raise TrainError(
            "config differs from the checkpoint's in keys that change the run: "
            + "; ".join(c for c in changes if c.split(":")[0] in unsafe)
            + f". Safe to change on resume: {', '.join(SAFE_RESUME_KEYS)}. Start a new run.dir instead."
        )
    return changes


@dataclass(frozen=True)
class RunInfo:
    """Values derived once at start-up and never mutated."""

    world_size: int
    rank: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_epochs: int


def _append_jsonl(path: Path, row: Mapping) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _prune_rows(path: Path, last_step: int) -> None:
    """Drop metrics rows of work that a resume will redo (after `last_step`; all when -1)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if last_step >= 0 and json.loads(line).get("step", 0) <= last_step
            and json.loads(line).get("split") != "test"]
    if len(keep) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def _scalar_metrics(metrics: Mapping) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- fit


class Trainer:
    """Holds the objects of one run; `fit()` runs it. Split out of one function only so that stage
    transitions and checkpointing can rebuild the model wrapper and optimizer in one place."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
        )
        acc = self.accelerator
        set_main_process(acc.is_main_process)
        self.preempt = PreemptionFlag()
        self.pin_memory = acc.device.type == "cuda"  # lets move_batch's non_blocking copies overlap
        print(
            f"bcc: rank {acc.process_index}/{acc.num_processes} local {acc.local_process_index} "
            f"on {socket.gethostname()} device {acc.device}",
            flush=True,
        )
        self.run_dir = Path(cfg.run.dir)
        self.manifest = Manifest.load(cfg.data.shards)
        self.taxonomy = self.manifest.taxonomy
        train_split = self.manifest.split(cfg.data.train_split)
        bpe = batches_per_epoch(train_split.count, cfg.data.batch_size, acc.num_processes)
        if bpe % cfg.train.grad_accum:
            raise TrainError(
                f"{bpe} batches per epoch per rank is not a multiple of train.grad_accum={cfg.train.grad_accum}"
            )
        self.info = RunInfo(
            world_size=acc.num_processes,
            rank=acc.process_index,
            batches_per_epoch=bpe,
            steps_per_epoch=bpe // cfg.train.grad_accum,
            total_epochs=cfg.train.epochs,
        )

        set_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, self.taxonomy.head_sizes)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.groups = parameter_groups(self.model)
        self.module_groups = group_of_module(self.model)
        self.stages = resolve_stages(cfg.schedule, cfg.train.epochs, list(self.groups), cfg.train.warmup_steps)

        weights = (
            class_weights_from_manifest(self.taxonomy, train_split.class_counts)
            if cfg.loss.class_weights == "auto"
            else None
        )
        unknown = set(cfg.loss.head_weights) - set(self.taxonomy.head_names)
        if unknown:
            raise TrainError(f"loss.head_weights: unknown head(s) {sorted(unknown)}; heads: {list(self.taxonomy.head_names)}")
        self.loss_fn = MultitaskLoss(
            self.taxonomy.head_names, cfg.loss.head_weights, weights, cfg.loss.label_smoothing
        ).to(acc.device)
        self.table = self.taxonomy.target_table().to(acc.device)
        self.metrics = EvalMetrics(self.taxonomy, device=acc.device)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.checkpoint.keep_last,
            keep_top_k=cfg.checkpoint.keep_top_k,
            metric=cfg.checkpoint.metric,
            mode=cfg.checkpoint.mode,
        )
        self.state = TrainState(config_hash=config_hash(cfg))
        self.optimizer = None
        self.wrapped = None
        self.frozen_bn: list[nn.Module] = []
        # per-rank seed for dropout: ranks see different data anyway, but should not share masks
        torch.manual_seed(cfg.train.seed * 1000 + acc.process_index)

    # ------------------------------------------------------------------ stages

    def targets_of(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return head_targets(self.table, labels, self.taxonomy.head_names)

    def enter_stage(self, index: int, carry: bool) -> None:
        """Set the trainable groups, then rebuild the DDP wrapper and the optimizer.

        DDP registers its gradient hooks only for parameters that require grad when it is built,
        so a stage that unfreezes layers needs a new wrapper (else those layers stop syncing).
        """
        stage: Stage = self.stages[index]
        acc = self.accelerator
        old_opt = self.optimizer.optimizer if self.optimizer is not None else None
        if self.wrapped is not None:
            acc.free_memory()  # drops Accelerate's references to the old wrapper and optimizer
            self.wrapped = None
        apply_trainable(self.groups, stage.train)
        self.frozen_bn = frozen_batchnorms(self.model, self.module_groups, stage.train) if (
            self.cfg.schedule.frozen_bn == "eval") else []
        opt = self._make_optimizer(build_param_groups(self.groups, stage, self.cfg.train.weight_decay))
        if carry and old_opt is not None:
            carry_optimizer_state(old_opt, opt)
        self.wrapped, self.optimizer = acc.prepare(self.model, opt)
        self.state.stage = index
        self.state.trainable = list(stage.train)
        set_train_mode(self.model, self.frozen_bn)

    def _make_optimizer(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
        return torch.optim.AdamW(param_groups, lr=t.lr)

    def set_lr(self, step_in_stage: int, stage_steps: int) -> float:
        """The learning rate is a pure function of the step, set here on every step (no scheduler
        object: Accelerate's prepared scheduler steps once per process, which would skew it)."""
        stage = self.stages[self.state.stage]
        factor = lr_factor(step_in_stage, stage_steps, stage.warmup_steps, self.cfg.train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * group["lr_mult"] * factor
        return self.cfg.train.lr * factor

    # ------------------------------------------------------------------ checkpoints

    def save(self, metric_value: float | None = None) -> None:
        acc = self.accelerator
        self.sync_buffers()
        rng = gather_object([save_rng_state()])  # every rank's RNG, in rank order
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            ckpt = Checkpoint(
                model=acc.unwrap_model(self.wrapped).state_dict(),
                optimizer=self.optimizer.state_dict(),
                scaler=scaler,
                rng=rng,
                state=self.state,
                meta={
                    "taxonomy": self.taxonomy.to_dict(),
                    "model": config_to_dict(self.cfg.model),
                    "config": config_to_dict(self.cfg),
                    "bcc_version": __version__,
                    "world_size": self.info.world_size,
                },
            )
            self.ckpt.save(ckpt, metric_value)
        acc.wait_for_everyone()

    def resume_from(self) -> Path | None:
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        if choice == "auto":
            return find_latest(self.run_dir / "checkpoints")
        if not Path(choice).exists():
            raise TrainError(f"checkpoint.resume: {choice} does not exist")
        return resolve_checkpoint(choice, prefer="latest")

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        saved_cfg = config_from_dict(ckpt.meta["config"])
        changes = check_resume_compatible(saved_cfg, self.cfg, ckpt.meta, self.taxonomy)
        # a safe-looking change (more epochs) must not move stage boundaries the run has passed
        saved_stages = resolve_stages(saved_cfg.schedule, saved_cfg.train.epochs, list(self.groups),
                                      saved_cfg.train.warmup_steps)
        check_resume_stages(saved_stages, self.stages, ckpt.state.epoch)
        for change in changes:
            console.print(f"[yellow]resume:[/] config change accepted: {change}")
        saved_world = ckpt.meta.get("world_size")
        if saved_world != self.info.world_size:
            if ckpt.state.batches_in_epoch:
                raise TrainError(
                    f"checkpoint {path} was written mid-epoch by {saved_world} processes; this run has "
                    f"{self.info.world_size}. A mid-epoch resume replays each rank's stream, so it needs the "
                    "same number of processes (an epoch-end checkpoint can resume on any number)."
                )
            console.print(f"[yellow]resume:[/] {saved_world} -> {self.info.world_size} processes at an epoch "
                          "boundary: the data order from here on differs from the original run")
        self.state = ckpt.state
        self.state.config_hash = config_hash(self.cfg)
        self.model.load_state_dict(ckpt.model)
        self.enter_stage(self.state.stage, carry=False)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt.scaler)
        # a rank that did not exist in the saved run keeps its freshly seeded RNG
        self._pending_rng = ckpt.rng[self.info.rank] if self.info.rank < len(ckpt.rng) else None
        console.print(
            f"resumed from [bold]{path}[/] at epoch {self.state.epoch} step {self.state.step} "
            f"(batch {self.state.batches_in_epoch} of the epoch), stage {self.state.stage}"
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, acc, info = self.cfg, self.accelerator, self.info
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        acc.wait_for_everyone()
        self._pending_rng = None
        path = self.resume_from()
        metrics_path = self.run_dir / "metrics.jsonl"
        if path is not None:
            self.restore(path)
        else:
            if find_latest(self.run_dir / "checkpoints") is not None:
                raise TrainError(
                    f"{self.run_dir} already holds checkpoints of another run; continue it with "
                    "checkpoint.resume=auto or choose another run.dir"
                )
            self.enter_stage(stage_at(self.stages, 0)[0], carry=False)
        if acc.is_main_process:
            _prune_rows(metrics_path, self.state.step if path is not None else -1)
        acc.wait_for_everyone()
        console.print(
            f"[bold]bcc train[/] {info.world_size} process(es), {info.batches_per_epoch} batches/epoch/rank, "
            f"{len(self.stages)} stage(s), {count_parameters(self.model, trainable_only=True):,} trainable "
            f"of {count_parameters(self.model):,} parameters -> {self.run_dir}"
        )
        val_split = cfg.data.val_split
        last_val: dict = {}
        t_start = time.perf_counter()

        while self.state.epoch < info.total_epochs:
            epoch = self.state.epoch
            stage_index, stage_start = stage_at(self.stages, epoch)
            if stage_index != self.state.stage:
                self.enter_stage(stage_index, carry=True)
                console.print(f"stage {stage_index}: training {', '.join(self.stages[stage_index].train)}")
            stage_steps = self.stages[stage_index].epochs * info.steps_per_epoch
            loader = train_loader(
                self.manifest, cfg.data, seed=cfg.train.seed, epoch=epoch, rank=info.rank,
                world_size=info.world_size, skip_batches=self.state.batches_in_epoch, pin_memory=self.pin_memory,
            )
            if self._pending_rng is not None:
                # restored after the loader exists, so nothing the loader draws can shift it
                restore_rng_state(self._pending_rng)
                self._pending_rng = None
            set_train_mode(self.model, self.frozen_bn)
            t_epoch = time.perf_counter()
            preempted = self._run_epoch(loader, stage_start, stage_steps)
            epoch_train_seconds = time.perf_counter() - t_epoch
            if preempted:
                self.save()
                if acc.is_main_process:
                    # launchers that lose the exit code (torchrun reports any child failure as 1) read this
                    marker = {"step": self.state.step, "signal": self.preempt.signum, "exit_code": EXIT_PREEMPTED}
                    (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n")
                console.print(f"[yellow]preempted[/]: saved at step {self.state.step}; exiting with {EXIT_PREEMPTED}")
                return {"preempted": True, "step": self.state.step}
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
            metric_value = None
            if (epoch + 1) % cfg.eval.every_epochs == 0 or self.state.epoch == info.total_epochs:
                last_val = self.run_eval(val_split)
                row = {"epoch": epoch + 1, "step": self.state.step, "split": val_split, "stage": self.state.stage,
                       "time": round(time.perf_counter() - t_start, 2),
                       "train_seconds": round(epoch_train_seconds, 2), **_scalar_metrics(last_val)}
                if acc.is_main_process:
                    _append_jsonl(metrics_path, row)
                if cfg.checkpoint.metric not in last_val:
                    raise TrainError(
                        f"checkpoint.metric '{cfg.checkpoint.metric}' is not a metric of this task; "
                        f"available: {', '.join(sorted(_scalar_metrics(last_val)))}"
                    )
                metric_value = float(last_val[cfg.checkpoint.metric])
            self.save(metric_value)

        result = {"val": last_val, "train_time": time.perf_counter() - t_start}
        if cfg.eval.test_at_end and cfg.data.test_split in self.manifest.splits:
            result["test"] = self.final_test(metrics_path)
        if cfg.eval.calibrate:
            result["calibration"] = self.calibrate()
        self._write_summary(result)
        return result

    def final_test(self, metrics_path: Path) -> dict:
        """Test split, evaluated once with the best checkpoint's weights (the last ones if none)."""
        best = self.run_dir / "checkpoints" / "best"
        model = self.accelerator.unwrap_model(self.wrapped)
        current = {k: v.clone() for k, v in model.state_dict().items()}
        if best.exists():
            model.load_state_dict(load_checkpoint(best).model)
        split = self.cfg.data.test_split
        result = self.run_eval(split)
        model.load_state_dict(current)
        if self.accelerator.is_main_process:
            row = {"epoch": self.state.epoch, "step": self.state.step, "split": split,
                   "checkpoint": "best" if best.exists() else "last", **_scalar_metrics(result)}
            _append_jsonl(metrics_path, row)
        return result

    def _run_epoch(self, loader, stage_start: int, stage_steps: int) -> bool:
        """Runs the rest of the current epoch. Returns True when preempted (state is consistent)."""
        cfg, acc, info = self.cfg, self.accelerator, self.info
        every = cfg.checkpoint.every_steps
        t0, seen0 = time.perf_counter(), self.state.samples_seen
        step_in_stage = (self.state.epoch - stage_start) * info.steps_per_epoch + (
            self.state.batches_in_epoch // cfg.train.grad_accum)
        loss_sum, loss_n = torch.zeros((), device=acc.device), 0
        for batch in loader:
            if self.preempt.agreed():
                return True
            lr = self.set_lr(step_in_stage, stage_steps)
            batch = move_batch(batch, acc.device, cfg.model.channels_last)
            loss = train_step(self.wrapped, batch, self.loss_fn, self.optimizer, acc, self.targets_of,
                              cfg.train.clip_grad)
            self.state.batches_in_epoch += 1
            self.state.samples_seen += batch["label"].numel() * info.world_size
            loss_sum += loss
            loss_n += 1
            if not acc.sync_gradients:
                continue
            self.state.step += 1
            step_in_stage += 1
            if self.state.step % cfg.train.log_every == 0 or self.state.batches_in_epoch == info.batches_per_epoch:
                # .item() is a sync point: only at log time
                elapsed = time.perf_counter() - t0
                rate = (self.state.samples_seen - seen0) / max(elapsed, 1e-9)
                left = (info.total_epochs * info.batches_per_epoch
                        - (self.state.epoch * info.batches_per_epoch + self.state.batches_in_epoch))
                eta = left * cfg.data.batch_size * info.world_size / max(rate, 1e-9)
                console.print(
                    f"epoch {self.state.epoch + 1}/{info.total_epochs} "
                    f"batch {self.state.batches_in_epoch}/{info.batches_per_epoch} step {self.state.step} "
                    f"loss {(loss_sum / max(loss_n, 1)).item():.4f} lr {lr:.2e} {rate:.1f} img/s "
                    f"eta {_fmt_seconds(eta)}"
                )
                loss_sum.zero_()
                loss_n = 0
                if not math.isfinite(float(loss)):
                    raise TrainError(f"loss is {float(loss)} at step {self.state.step}; lower train.lr or enable clipping")
            if every and self.state.step % every == 0 and self.state.batches_in_epoch < info.batches_per_epoch:
                self.save()
        if self.state.batches_in_epoch != info.batches_per_epoch:
            raise TrainError(
                f"rank {info.rank} got {self.state.batches_in_epoch} batches in epoch {self.state.epoch}, "
                f"expected {info.batches_per_epoch}"
            )
        return False

    def sync_buffers(self) -> None:
        """Make BatchNorm running statistics rank 0's everywhere. DDP broadcasts buffers at the start
        of each forward, so after the last training step every rank holds its own statistics; without
        this, ranks would evaluate (and the last forward's statistics would be saved) inconsistently."""
        if self.info.world_size > 1:
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)

    def run_eval(self, split: str, collect=None) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.sync_buffers()
        loader = eval_loader(self.manifest, split, cfg.data, rank=self.info.rank, world_size=self.info.world_size,
                             pin_memory=self.pin_memory)
        model = acc.unwrap_model(self.wrapped)
        result = evaluate(model, loader, self.metrics, self.loss_fn, acc, self.targets_of, collect)
        set_train_mode(self.model, self.frozen_bn)
        console.print(format_table(result, f"{split} after epoch {self.state.epoch}"))
        return result

    def calibrate(self) -> dict | None:
        """Temperature scaling of the best checkpoint on the val split (main process; small and fast)."""
        best = self.run_dir / "checkpoints" / "best"
        out = None
        if self.accelerator.is_main_process and best.exists():
            from bcc.evaluate import calibrate_checkpoint

            out = calibrate_checkpoint(best, self.cfg.data.shards, self.cfg.data.val_split, workers=0)
            console.print(f"calibrated {best}: temperatures {out.get('temperatures')}")
        self.accelerator.wait_for_everyone()
        return out

    def _write_summary(self, result: Mapping) -> None:
        """Cross-rank integrity: each rank's step count and a checksum of its weights."""
        acc = self.accelerator
        self.sync_buffers()
        model = acc.unwrap_model(self.wrapped)
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        checksum = digest.hexdigest()
        per_rank = gather_object([{"rank": self.info.rank, "steps": self.state.step,
                                   "batches": self.state.epoch * self.info.batches_per_epoch,
                                   "weights_sha256": checksum}])
        if acc.is_main_process:
            if len({r["weights_sha256"] for r in per_rank}) > 1:
                console.print("[bold red]warning:[/] ranks hold different weights at the end of training")
            summary = {"ranks": per_rank, "state": self.state.to_dict(), "train_time": result["train_time"],
                       **{k: _scalar_metrics(result[k]) for k in ("val", "test") if k in result}}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fit(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`. Returns the final validation metrics."""
    trainer = Trainer(cfg)
    return trainer.fit()
