"""Set-up: the run's components, built once and used alike by `fit`, `bcc bench step` and `bcc compare`.

`build_components` makes the model, its parameter groups, the fine-tuning stages and the loss;
`enter_stage` applies a stage (trainable groups, frozen BatchNorms) and builds the optimizer and the
DDP wrapper for it; `set_lr` sets the learning rate of a step. Nothing here reads the data stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from bcc.config import Config, FinetuneConfig
from bcc.errors import BccError
from bcc.finetune import (
    Stage,
    apply_trainable,
    build_param_groups,
    carry_optimizer_state,
    frozen_batchnorms,
    lr_factor,
    resolve_stages,
    set_train_mode,
)
from bcc.loss import MultitaskLoss, inverse_frequency_weights
from bcc.model import build_model, group_of_module, parameter_groups
from bcc.taxonomy import Taxonomy
from bcc.train.accel import check_sync_bn, convert_sync_bn, device_caps


class TrainError(BccError):
    """A run that cannot start or continue, with a message for the user."""


@dataclass(frozen=True)
class RunInfo:
    """Values derived once at start-up and never mutated."""

    world_size: int
    rank: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_epochs: int


def head_targets(table: torch.Tensor, labels: torch.Tensor, head_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Leaf class labels [N] -> per-head targets [N] (-1 where a head does not apply)."""
    rows = table[labels]
    return {name: rows[:, i] for i, name in enumerate(head_names)}


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


@dataclass
class Components:
    """The objects of one run that do not change across stages (the model is the unwrapped module)."""

    cfg: Config
    taxonomy: Taxonomy
    model: nn.Module
    groups: dict  # group name -> [(param name, param)], shallow to deep, then heads
    module_groups: dict  # module name -> group name
    stages: list[Stage]
    loss_fn: MultitaskLoss
    table: torch.Tensor  # leaf class -> head targets, on the device
    ema: nn.Module | None = None  # timm ModelEmaV3 of `model` (train.ema_decay; bcc.train.ema), on the device

    def targets_of(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return head_targets(self.table, labels, self.taxonomy.head_names)


@dataclass
class StageParts:
    """What `enter_stage` builds: the DDP-wrapped model and optimizer of the current stage."""

    index: int
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper; `.optimizer` is the torch one
    frozen_bn: list[nn.Module] = field(default_factory=list)


def build_components(cfg: Config, taxonomy: Taxonomy, class_counts: Mapping[str, int], device: torch.device,
                     finetune: FinetuneConfig | None = None, pretrained: bool = True) -> Components:
    """Model (seeded by `train.seed`: identical on every rank), groups, stages and loss of a run.

    `finetune` replaces `cfg.finetune` (bench and compare time one preset of the same config).
    `pretrained=False` skips `model.pretrained` (a resumed run: the checkpoint holds the weights, and
    the source may have moved). Raises TrainError/FinetuneError for a loss or plan that does not fit
    the taxonomy or model, PretrainedError for weights that cannot be loaded.
    """
    set_seed(cfg.train.seed)
    model_cfg = cfg.model if pretrained else dataclasses.replace(cfg.model, pretrained="")
    model = build_model(model_cfg, taxonomy.head_sizes, taxonomy=taxonomy)
    if cfg.model.channels_last is True:  # resolved for the device by bcc.train.accel.resolve_config
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn:
        check_sync_bn(device_caps(device), torch.distributed.get_backend() if torch.distributed.is_initialized()
                      else None)
        model = convert_sync_bn(model)  # before the groups: they hold the same Parameters either way
    groups = parameter_groups(model)
    stages = resolve_stages(finetune or cfg.finetune, cfg.train.epochs, list(groups), cfg.train.warmup_steps)
    unknown = set(cfg.loss.head_weights) - set(taxonomy.head_names)
    if unknown:
        raise TrainError(f"loss.head_weights: unknown head(s) {sorted(unknown)}; heads: {list(taxonomy.head_names)}")
    weights = class_weights_from_manifest(taxonomy, class_counts) if cfg.loss.class_weights == "auto" else None
    loss_fn = MultitaskLoss(taxonomy.head_names, cfg.loss.head_weights, weights, cfg.loss.label_smoothing)
    from bcc.train.ema import build_ema  # imports this module's TrainError

    return Components(cfg=cfg, taxonomy=taxonomy, model=model, groups=groups, module_groups=group_of_module(model),
                      stages=stages, loss_fn=loss_fn.to(device), table=taxonomy.target_table().to(device),
                      ema=build_ema(model, cfg.train.ema_decay, cfg.train.ema_warmup, device))


def make_optimizer(cfg: Config, param_groups: list[dict]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
    return torch.optim.AdamW(param_groups, lr=t.lr)


def cache_accelerate_probes() -> None:
    """Accelerate's optimizer wrapper asks importlib twice per `step()` whether the `lomo_optim` package is
    installed (accelerate 1.x `AcceleratedOptimizer.step`): file-system probes of every `sys.path` entry,
    ~0.1 ms each, a few percent of a GPU step. The answer cannot change while the process runs, so the
    probe is cached in place (idempotent; a no-op where accelerate no longer has it)."""
    import functools

    import accelerate.optimizer as accelerated

    probe = getattr(accelerated, "is_lomo_available", None)
    if probe is not None and not hasattr(probe, "cache_info"):
        accelerated.is_lomo_available = functools.cache(probe)


def compile_again(accelerator: Accelerator, wrapped: nn.Module) -> nn.Module:
    """With `train.compile` in one process, the model of a stage after the first comes back uncompiled:
    Accelerate marks the first stage's compiled module `_is_accelerate_prepared`, the mark passes through
    to the bare model (no DDP wrapper in between) and `prepare` returns such a model as it is. Compile it
    here as Accelerate would have (with DDP each stage gets a new wrapper, which Accelerate compiles)."""
    from accelerate.utils import DynamoBackend, is_compiled_module

    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO or is_compiled_module(wrapped):
        return wrapped
    return torch.compile(wrapped, **plugin.to_kwargs())


def enter_stage(parts: Components, accelerator: Accelerator, index: int, previous: StageParts | None = None,
                carry: bool = False) -> StageParts:
    """Set the trainable groups of stage `index`, then build a new DDP wrapper and optimizer.

    DDP registers its gradient hooks only for parameters that require grad when it is built, so a stage
    that unfreezes layers needs a new wrapper (else those layers stop syncing). With `carry`, momentum
    and Adam moments of parameters that stay trainable move over from `previous`.
    """
    stage = parts.stages[index]
    old_opt = previous.optimizer.optimizer if previous is not None else None
    if previous is not None:
        accelerator.free_memory()  # drops Accelerate's references to the old wrapper and optimizer
    apply_trainable(parts.groups, stage.train)
    frozen_bn = (frozen_batchnorms(parts.model, parts.module_groups, stage.train)
                 if parts.cfg.finetune.frozen_bn == "eval" else [])
    opt = make_optimizer(parts.cfg, build_param_groups(parts.groups, stage, parts.cfg.train.weight_decay,
                                                          parts.cfg.train.head_lr_mult))
    if carry and old_opt is not None:
        carry_optimizer_state(old_opt, opt)
    wrapped, optimizer = accelerator.prepare(parts.model, opt)
    wrapped = compile_again(accelerator, wrapped)
    cache_accelerate_probes()
    set_train_mode(parts.model, frozen_bn)
    return StageParts(index, wrapped, optimizer, frozen_bn)


def set_lr(optimizer: torch.optim.Optimizer, cfg: Config, stage: Stage, step_in_stage: int, stage_steps: int) -> float:
    """Set every group's learning rate for this step; returns the base rate.

    The rate is a pure function of the step, set on every step (no scheduler object: Accelerate's
    prepared scheduler steps once per process, which would skew it).
    """
    factor = lr_factor(step_in_stage, stage_steps, stage.warmup_steps, cfg.train.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.lr * group["lr_mult"] * factor
    return cfg.train.lr * factor
