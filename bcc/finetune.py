"""The fine-tuning plan: what trains when, and at which learning rate (Lightning: `BackboneFinetuning`).

A plan (`finetune:` in the config) is a list of stages. Each stage names the parameter groups that train (the rest are
frozen: `requires_grad=False`, so no gradient is computed through them), a learning-rate
multiplier per group, and its own warmup; the learning rate restarts its warmup + cosine at every
stage boundary. Presets: `frozen` (heads only), `full` (everything from the start), `staged`
(heads, then the deepest block at 0.1x, then everything with deeper blocks faster than shallow ones) and
`lpft` (linear probe, then fine-tuning: the heads alone for the first half of the epochs, then every group
at 0.1x the rate; Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution": fitting the heads first means fine-tuning starts from heads that already fit the
features, so the early large gradients through random heads do not distort the pretrained features).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bcc.errors import BccError

HEADS = "heads"
LPFT_FT_MULT = 0.1  # lpft: the fine-tuning stage's rate, a fraction of train.lr (the probe's rate)


class FinetuneError(BccError, ValueError):
    """A fine-tuning plan that does not fit the model or the epoch budget."""


@dataclass(frozen=True)
class Stage:
    epochs: int
    train: tuple[str, ...]  # trainable group names, in model order
    lr_mult: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 0

    def mult(self, group: str) -> float:
        return self.lr_mult.get(group, 1.0)


def resolve_stages(plan, total_epochs: int, group_names: Sequence[str], warmup_steps: int) -> list[Stage]:
    """Turn `cfg.finetune` (a `FinetuneConfig`) into concrete stages over the model's parameter groups.

    `group_names` are ordered shallow to deep and end with `heads`.
    """
    groups = list(group_names)
    backbone = [g for g in groups if g != HEADS]
    if HEADS not in groups:
        raise FinetuneError(f"the model has no '{HEADS}' parameter group (groups: {', '.join(groups)})")
    if total_epochs < 1:
        raise FinetuneError(f"train.epochs must be >= 1, got {total_epochs}")

    if plan.preset == "frozen":
        return [Stage(total_epochs, (HEADS,), {}, warmup_steps)]
    if plan.preset == "full":
        return [Stage(total_epochs, tuple(groups), {}, warmup_steps)]
    if plan.preset == "lpft":
        if total_epochs < 2:
            raise FinetuneError(f"finetune preset 'lpft' has 2 stages and needs train.epochs >= 2, got {total_epochs}")
        probe = max(1, total_epochs // 2)
        return [
            Stage(probe, (HEADS,), {}, warmup_steps),
            Stage(total_epochs - probe, tuple(groups), {g: LPFT_FT_MULT for g in groups}, warmup_steps),
        ]
    if plan.preset == "staged":
        if total_epochs < 3:
            raise FinetuneError(f"finetune preset 'staged' has 3 stages and needs train.epochs >= 3, got {total_epochs}")
        first = max(1, round(total_epochs * 0.2))
        second = max(1, round(total_epochs * 0.3))
        third = total_epochs - first - second
        deepest = backbone[-1:]
        # discriminative rates: 0.01x for the shallowest block up to 0.1x for the deepest
        n = len(backbone)
        ramp = {g: 0.01 * 10 ** (i / (n - 1)) if n > 1 else 0.1 for i, g in enumerate(backbone)}
        return [
            Stage(first, (HEADS,), {}, warmup_steps),
            Stage(second, tuple(deepest) + (HEADS,), {g: 0.1 for g in deepest}, warmup_steps),
            Stage(third, tuple(groups), ramp, warmup_steps),
        ]
    if plan.preset != "custom":
        raise FinetuneError(f"finetune.preset: unknown preset '{plan.preset}'")
    if not plan.stages:
        raise FinetuneError("finetune.preset is 'custom' but finetune.stages is empty")
    stages = []
    for i, st in enumerate(plan.stages):
        where = f"finetune.stages[{i}]"
        if st.epochs < 1:
            raise FinetuneError(f"{where}.epochs must be >= 1, got {st.epochs}")
        wanted = set(groups) if "all" in st.train else set(st.train)
        unknown = sorted(wanted - set(groups)) + sorted(set(st.lr_mult) - set(groups))
        if unknown:
            raise FinetuneError(f"{where}: unknown parameter group(s) {', '.join(unknown)}; groups: {', '.join(groups)}")
        if not wanted:
            raise FinetuneError(f"{where}.train is empty: a stage must train at least one group")
        warm = warmup_steps if st.warmup_steps is None else st.warmup_steps
        stages.append(Stage(st.epochs, tuple(g for g in groups if g in wanted), dict(st.lr_mult), warm))
    total = sum(s.epochs for s in stages)
    if total != total_epochs:
        raise FinetuneError(f"finetune.stages add up to {total} epochs but train.epochs is {total_epochs}")
    return stages


def stage_at(stages: Sequence[Stage], epoch: int) -> tuple[int, int]:
    """(stage index, first epoch of that stage) for a 0-based epoch."""
    start = 0
    for i, stage in enumerate(stages):
        if epoch < start + stage.epochs:
            return i, start
        start += stage.epochs
    return len(stages) - 1, start - stages[-1].epochs


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1, then cosine down to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- applying a stage


def apply_trainable(groups: Mapping[str, Sequence[tuple[str, nn.Parameter]]], trainable: Sequence[str]) -> int:
    """Set `requires_grad` per group; returns the number of trainable parameters."""
    count = 0
    for name, params in groups.items():
        on = name in trainable
        for _, p in params:
            p.requires_grad_(on)
            count += p.numel() if on else 0
    return count


def set_train_mode(model: nn.Module, frozen_bn_modules: Sequence[nn.Module]) -> None:
    """`model.train()`, but BatchNorm layers of frozen groups keep their running statistics fixed."""
    model.train()
    for m in frozen_bn_modules:
        m.eval()


def frozen_batchnorms(model: nn.Module, module_groups: Mapping[str, str], trainable: Sequence[str]) -> list[nn.Module]:
    """BatchNorm modules whose parameter group is frozen in this stage."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module_groups.get(name) not in trainable:
            out.append(module)
    return out


def build_param_groups(
    groups: Mapping[str, Sequence[tuple[str, nn.Parameter]]], stage: Stage, weight_decay: float,
    head_lr_mult: float = 1.0,
) -> list[dict]:
    """Optimizer param groups for the trainable groups of `stage`: per group, decayed weights and
    undecayed biases/norm parameters, each carrying its group name and lr multiplier (the stage's;
    for the heads times `head_lr_mult`, `train.head_lr_mult`)."""
    out = []
    for name in stage.train:
        params = [p for _, p in groups[name] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for plist, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "weight_decay": wd, "group": name,
                            "lr_mult": stage.mult(name) * (head_lr_mult if name == HEADS else 1.0)})
    return out


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Copy per-parameter state (momentum buffers, Adam moments) of parameters that stay trainable."""
    kept = 0
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
                kept += 1
    return kept


def check_resume_stages(saved: Sequence[Stage], current: Sequence[Stage], epoch: int) -> None:
    """Refuse a resume whose config puts `epoch` (0-based, the epoch about to run) in another stage,
    or changes what a stage up to it trains, than the run that wrote the checkpoint.

    `train.epochs` may change on resume, but the `staged` preset derives its stage lengths from it:
    without this check a run saved in stage 1 could resume into stage 0 and re-freeze layers.
    """
    before, now = stage_at(saved, epoch)[0], stage_at(current, epoch)[0]
    if before != now:
        raise FinetuneError(
            f"resuming at epoch {epoch + 1} would move the run from stage {before} to stage {now} "
            f"(stage epochs were {[s.epochs for s in saved]}, now {[s.epochs for s in current]}); "
            "keep train.epochs, or give finetune.stages explicitly"
        )
    for i in range(now + 1):
        if (saved[i].train, saved[i].lr_mult) != (current[i].train, current[i].lr_mult):
            raise FinetuneError(f"resuming would change what stage {i} trains: {saved[i]} -> {current[i]}")
