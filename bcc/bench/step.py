"""`bench_step`: bcc's train step, with the loop's per-step bookkeeping and the trainer's own set-up
(`bcc.train.setup`), against a plain PyTorch step on the same model and a fixed in-memory batch, and the
frozen-backbone step against the full one. `time_steps` is the one step timer; `step_seconds` (used by
`bcc compare`) times bcc's step per fine-tuning preset with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bcc.bench import Progress, Timing, quiet


@dataclass(frozen=True)
class StepBench:
    plain: Timing  # plain PyTorch loop, everything trainable
    full: Timing  # bcc train_step, finetune preset 'full'
    frozen: Timing  # bcc train_step, finetune preset 'frozen' (heads only)
    backbone: str
    batch_size: int
    image_size: int
    steps: int
    warmup: int
    rounds: int
    device: str
    mixed_precision: str
    trainable: dict[str, int]  # variant -> trainable parameters

    @property
    def overhead(self) -> float:
        """bcc step time over plain step time, minus 1 (0.02 = 2% slower)."""
        return self.plain.rate / self.full.rate - 1.0

    @property
    def frozen_speedup(self) -> float:
        return self.frozen.rate / self.full.rate


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds of `steps` calls of `step` after `warmup` untimed ones (buffers, cudnn autotune).

    On CUDA the device is synchronised before and after: kernels are queued asynchronously.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _taxonomy_and_counts(cfg):
    """The dataset's taxonomy and train class counts when its manifest exists, else the default's."""
    from bcc.manifest import ManifestError
    from bcc.sources import load_data, weighted_class_counts
    from bcc.taxonomy import Taxonomy

    try:
        manifest = load_data(cfg.data)  # data.shards, or data.sources as the trainer mixes them
        return manifest.taxonomy, weighted_class_counts(manifest, cfg.data.train_split)
    except ManifestError:
        taxonomy = Taxonomy.default()
        return taxonomy, {c: 1 for c in taxonomy.class_names}


class _BccLoop:
    """The trainer's own set-up (`build_components`, `enter_stage`) for one preset, and the per-micro-batch
    work of `train_one_epoch` around `train_step`: the LR at each window's start, the loss kept on the
    device (`LossWatch`), the preemption vote every `train.preempt_check_steps` steps and the log-time
    sync every `train.log_every` steps. `stage` picks the stage of the preset's plan (`staged`: 0 heads,
    1 the deepest block and heads, 2 everything)."""

    def __init__(self, cfg, accelerator, taxonomy, class_counts, preset: str, stage: int = 0):
        from bcc.config import FinetuneConfig
        from bcc.model import count_parameters
        from bcc.train.epoch import LossWatch
        from bcc.train.preempt import PreemptionFlag
        from bcc.train.setup import build_components, enter_stage

        self.cfg, self.acc = cfg, accelerator
        plan = FinetuneConfig(preset=preset, frozen_bn=cfg.finetune.frozen_bn)
        self.parts = build_components(cfg, taxonomy, class_counts, accelerator.device, finetune=plan)
        self.stage = enter_stage(self.parts, accelerator, stage)
        self.trainable = count_parameters(self.parts.model, trainable_only=True)
        self.step_index = 0
        self.micro = 0
        self.losses = LossWatch(1, cfg.train.grad_accum)
        self.preempt = PreemptionFlag(install_handlers=False)

    def step(self, batch: dict) -> None:
        from bcc.train.epoch import move_batch, train_step
        from bcc.train.preempt import is_vote_step
        from bcc.train.setup import set_lr

        acc, cfg = self.acc, self.cfg
        if self.micro % cfg.train.grad_accum == 0:
            set_lr(self.stage.optimizer, cfg, self.parts.stages[self.stage.index], self.step_index, 1000)
        batch = move_batch(batch, acc.device, cfg.model.channels_last)
        self.losses.add(train_step(self.stage.wrapped, batch, self.parts.loss_fn, self.stage.optimizer, acc,
                                   self.parts.targets_of, cfg.train.clip_grad))
        self.micro += 1
        if acc.sync_gradients:
            self.step_index += 1
            if self.step_index % cfg.train.log_every == 0:
                self.losses.mean(0)  # the loop's log-time sync point
            if is_vote_step(self.step_index, cfg.train.preempt_check_steps):
                self.preempt.agreed()


class _PlainLoop:
    """What a plain PyTorch script does with the same work: the same model and memory format, SGD with
    weight decay on weights only, class-weighted label-smoothed cross-entropy per head, clipping,
    autocast (and a scaler for fp16)."""

    def __init__(self, cfg, device, taxonomy, class_counts):
        from bcc.model import build_model, count_parameters
        from bcc.train.setup import class_weights_from_manifest

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, taxonomy.head_sizes).to(device)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        t = cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
                                          {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                                         lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
        self.table = taxonomy.target_table().to(device)
        weights = (class_weights_from_manifest(taxonomy, class_counts) if cfg.loss.class_weights == "auto"
                   else dict.fromkeys(taxonomy.head_names))
        self.weights = [None if w is None else w.to(device) for w in weights.values()]
        self.trainable = count_parameters(self.model, trainable_only=True)
        precision = cfg.train.mixed_precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, batch: dict) -> None:
        import torch.nn.functional as F

        x = batch["image"].to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = self.table[batch["label"].to(self.device, non_blocking=True)]
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)
        # on fp32 logits, as Accelerate's prepared model returns them under mixed precision
        loss = sum(F.cross_entropy(out.float(), targets[:, i], weight=w, ignore_index=-1,
                                   label_smoothing=self.cfg.loss.label_smoothing)
                   for i, (out, w) in enumerate(zip(logits, self.weights, strict=True)))
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.train.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()


def _setup(cfg):
    """Accelerator, the config resolved for its device (`make_accelerator`), taxonomy, class counts and one
    fixed random batch of `data.batch_size` x `data.image_size`."""
    from bcc.train.accel import make_accelerator

    accelerator, cfg = make_accelerator(cfg)
    taxonomy, counts = _taxonomy_and_counts(cfg)
    n, size = cfg.data.batch_size, cfg.data.image_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batch = {"image": torch.randn(n, 3, size, size, generator=gen),
             "label": torch.randint(len(taxonomy.class_names), (n,), generator=gen)}
    return accelerator, cfg, taxonomy, counts, batch


def _run_rounds(loops: dict, batch: dict, steps: int, warmup: int, rounds: int, device, progress: Progress
                ) -> dict[str, Timing]:
    """Rounds alternate the loops, so background load hits each alike; `time_steps` times each."""
    timings = {name: Timing(name) for name in loops}
    for r in range(rounds):
        for name, loop in loops.items():
            progress(f"round {r + 1}/{rounds}: {name}")
            timings[name].seconds.append(time_steps(lambda loop=loop: loop.step(batch), steps, warmup, device))
            timings[name].images.append(steps * batch["label"].numel())
    return timings


def bench_step(cfg, *, steps: int = 10, warmup: int = 2, rounds: int = 3, progress: Progress = quiet) -> StepBench:
    """Plain PyTorch step vs bcc's train step (full and frozen backbone) on one fixed in-memory batch.

    Only `model`, `data.image_size`, `data.batch_size`, `loss`, `finetune.frozen_bn` and `train` of `cfg`
    are used. Rounds alternate plain, full, frozen; each runs `warmup` untimed steps, then `steps` timed ones.
    """
    accelerator, cfg, taxonomy, counts, batch = _setup(cfg)
    device = accelerator.device
    progress(f"building 3 x {cfg.model.backbone} on {device}")
    loops = {
        "plain": _PlainLoop(cfg, device, taxonomy, counts),
        "full": _BccLoop(cfg, accelerator, taxonomy, counts, "full"),
        "frozen": _BccLoop(cfg, accelerator, taxonomy, counts, "frozen"),
    }
    timings = _run_rounds(loops, batch, steps, warmup, rounds, device, progress)
    return StepBench(
        plain=timings["plain"], full=timings["full"], frozen=timings["frozen"], backbone=cfg.model.backbone,
        batch_size=batch["label"].numel(), image_size=cfg.data.image_size, steps=steps, warmup=warmup,
        rounds=rounds, device=str(device), mixed_precision=cfg.train.mixed_precision,
        trainable={name: loop.trainable for name, loop in loops.items()},
    )


def step_seconds(cfg, presets: Sequence[str] = ("frozen", "full"), *, steps: int = 5, warmup: int = 1,
                 rounds: int = 1, progress: Progress = quiet) -> dict[str, float]:
    """Median seconds of one bcc train step per fine-tuning preset, on the same fixed batch (no data
    loading, no evaluation: this isolates what freezing saves)."""
    accelerator, cfg, taxonomy, counts, batch = _setup(cfg)
    loops = {p: _BccLoop(cfg, accelerator, taxonomy, counts, p) for p in presets}
    timings = _run_rounds(loops, batch, steps, warmup, rounds, accelerator.device, progress)
    return {p: statistics.median(t.seconds) / steps for p, t in timings.items()}
