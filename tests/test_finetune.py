"""Unit tests of bcc/finetune.py: presets, custom-stage validation, the LR curve, and the stage
transition of the set-up `fit` uses (`bcc.train.setup`) (momentum carried over, frozen BatchNorm kept in eval mode)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bcc.config import FinetuneConfig, ModelConfig, StageConfig, load_config
from bcc.finetune import (
    FinetuneError,
    apply_trainable,
    build_param_groups,
    carry_optimizer_state,
    lr_factor,
    resolve_stages,
)
from bcc.model import build_model, parameter_groups

from conftest import TINY_BACKBONE, write_config

HEADS = {"binary": 2, "subtype": 3}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _heads_numel(feature_dim: int, hidden: int = 256) -> int:
    # Linear(feature_dim, hidden) + Linear(hidden, n) per head, from the design's head definition
    return sum(feature_dim * hidden + hidden + hidden * n + n for n in HEADS.values())


def _trainable_counts(backbone: str, preset: str, epochs: int = 5) -> tuple[nn.Module, list[int]]:
    model = build_model(ModelConfig(backbone=backbone), HEADS)
    groups = parameter_groups(model)
    stages = resolve_stages(FinetuneConfig(preset=preset), epochs, list(groups), 0)
    counts = []
    for stage in stages:
        reported = apply_trainable(groups, stage.train)
        assert reported == sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts.append(reported)
    return model, counts


# --------------------------------------------------------------------------- presets


@pytest.fixture(scope="module")
def vgg_expected():
    """Per-block parameter counts of vgg16_bn computed from torchvision's module list: a block is
    everything up to and including a MaxPool."""
    import torchvision

    features = torchvision.models.vgg16_bn(weights=None).features
    blocks, current = [], 0
    for layer in features:
        current += _numel(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(current)
            current = 0
    assert len(blocks) == 5
    return blocks, _heads_numel(512 * 7 * 7)


@pytest.mark.parametrize("preset", ["frozen", "staged", "full"])
def test_vgg16_bn_presets_train_the_expected_parameters(preset, vgg_expected):
    blocks, heads = vgg_expected
    model, counts = _trainable_counts("vgg16_bn", preset)
    assert _numel(model) == sum(blocks) + heads == 27_569_989
    expected = {
        "frozen": [heads],
        "staged": [heads, heads + blocks[4], heads + sum(blocks)],  # heads, + block5, everything
        "full": [heads + sum(blocks)],
    }[preset]
    assert counts == expected


@pytest.mark.parametrize("preset", ["frozen", "staged", "full"])
def test_timm_presets_train_the_expected_parameters(preset):
    model, counts = _trainable_counts(TINY_BACKBONE, preset)
    backbone = model.backbone
    heads = _heads_numel(backbone.num_features)
    # timm's coarse groups for a ResNet: stem (conv1 + bn1), layer1..layer4
    deepest = _numel(backbone.layer4)
    stem = _numel(backbone.conv1) + _numel(backbone.bn1)
    assert stem + sum(_numel(getattr(backbone, f"layer{i}")) for i in range(1, 5)) == _numel(backbone)
    expected = {
        "frozen": [heads],
        "staged": [heads, heads + deepest, heads + _numel(backbone)],
        "full": [heads + _numel(backbone)],
    }[preset]
    assert counts == expected


def test_staged_splits_epochs_and_ramps_lr_multipliers():
    groups = ["block1", "block2", "block3", "block4", "block5", "heads"]
    stages = resolve_stages(FinetuneConfig(preset="staged"), 10, groups, 7)
    assert [s.epochs for s in stages] == [2, 3, 5]
    assert [s.train for s in stages] == [("heads",), ("block5", "heads"), tuple(groups)]
    assert stages[1].mult("block5") == pytest.approx(0.1) and stages[1].mult("heads") == 1.0
    assert stages[2].mult("block1") == pytest.approx(0.01) and stages[2].mult("block5") == pytest.approx(0.1)
    mults = [stages[2].mult(g) for g in groups[:-1]]
    assert mults == sorted(mults)  # deeper blocks learn faster
    assert all(s.warmup_steps == 7 for s in stages)
    with pytest.raises(FinetuneError, match="needs train.epochs >= 3"):
        resolve_stages(FinetuneConfig(preset="staged"), 2, groups, 0)


@pytest.mark.parametrize(("epochs", "probe"), [(2, 1), (3, 1), (4, 2), (9, 4)])
def test_lpft_probes_the_heads_then_fine_tunes_everything_slower(epochs, probe):
    groups = ["block1", "block2", "heads"]
    stages = resolve_stages(FinetuneConfig(preset="lpft"), epochs, groups, 3)
    assert [s.epochs for s in stages] == [probe, epochs - probe]
    assert [s.train for s in stages] == [("heads",), tuple(groups)]
    assert stages[0].mult("heads") == 1.0
    assert all(stages[1].mult(g) == pytest.approx(0.1) for g in groups)
    with pytest.raises(FinetuneError, match="needs train.epochs >= 2"):
        resolve_stages(FinetuneConfig(preset="lpft"), 1, groups, 0)


# --------------------------------------------------------------------------- custom stages

GROUPS = ["block0", "block1", "block2", "heads"]


def _custom(*stages: StageConfig) -> FinetuneConfig:
    return FinetuneConfig(preset="custom", stages=stages)


def test_custom_stages_resolve_in_model_order_with_own_warmup():
    sched = _custom(StageConfig(epochs=1, train=("heads",)),
                    StageConfig(epochs=2, train=("heads", "block2"), lr_mult={"block2": 0.5}, warmup_steps=3),
                    StageConfig(epochs=1, train=("all",)))
    stages = resolve_stages(sched, 4, GROUPS, 11)
    assert [s.train for s in stages] == [("heads",), ("block2", "heads"), tuple(GROUPS)]
    assert [s.warmup_steps for s in stages] == [11, 3, 11]
    assert stages[1].mult("block2") == 0.5 and stages[1].mult("heads") == 1.0


@pytest.mark.parametrize(
    "stages, epochs, message",
    [
        ((StageConfig(epochs=2, train=("heads", "block9")),), 2, r"unknown parameter group\(s\) block9; groups: block0"),
        ((StageConfig(epochs=2, train=("heads",), lr_mult={"blokc1": 0.1}),), 2, "unknown parameter group.*blokc1"),
        ((StageConfig(epochs=1, train=("heads",)), StageConfig(epochs=1, train=("all",))), 3,
         "add up to 2 epochs but train.epochs is 3"),
        ((StageConfig(epochs=2, train=()),), 2, r"stages\[0\].train is empty"),
        ((StageConfig(epochs=0, train=("heads",)),), 0, "train.epochs must be >= 1"),
        ((StageConfig(epochs=1, train=("heads",)), StageConfig(epochs=0, train=("heads",))), 1,
         r"stages\[1\].epochs must be >= 1"),
    ],
)
def test_custom_stage_errors_name_the_problem(stages, epochs, message):
    with pytest.raises(FinetuneError, match=message):
        resolve_stages(_custom(*stages), epochs, GROUPS, 0)


def test_custom_stages_from_yaml_and_empty_custom(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 2}\nfinetune:\n  stages:\n    - {epochs: 1, train: heads}\n"
                    "    - {epochs: 1, train: [heads, block1], lr_mult: {block1: 0.5}}\n")
    cfg = load_config(path)
    assert cfg.finetune.preset == "custom"  # giving stages makes the plan custom
    stages = resolve_stages(cfg.finetune, cfg.train.epochs, GROUPS, 0)
    assert [s.train for s in stages] == [("heads",), ("block1", "heads")]
    with pytest.raises(FinetuneError, match="stages is empty"):
        resolve_stages(FinetuneConfig(preset="custom"), 2, GROUPS, 0)


# --------------------------------------------------------------------------- learning rate


def test_lr_factor_warmup_then_cosine():
    assert [lr_factor(s, 100, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, 0.0) == 1.0  # cosine starts at its peak right after warmup
    assert lr_factor(52, 100, 4, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 4, 0.0) == pytest.approx(0.0)
    assert lr_factor(100, 100, 4, 0.1) == pytest.approx(0.1)  # floor
    assert lr_factor(500, 100, 4, 0.1) == pytest.approx(0.1)  # past the end stays at the floor
    assert lr_factor(25, 100, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    values = [lr_factor(s, 50, 5, 0.0) for s in range(5, 51)]
    assert values == sorted(values, reverse=True)


# --------------------------------------------------------------------------- stage transitions


class _Run:
    """The components `fit` builds (`bcc.train.setup`) and the stage it enters, for stepping by hand."""

    def __init__(self, cfg):
        from accelerate import Accelerator

        from bcc.manifest import Manifest
        from bcc.train.setup import build_components

        manifest = Manifest.load(cfg.data.shards)
        self.accelerator = Accelerator()
        self.parts = build_components(cfg, manifest.taxonomy, manifest.split("train").class_counts,
                                      self.accelerator.device)
        self.groups, self.model, self.module_groups = self.parts.groups, self.parts.model, self.parts.module_groups
        self.stage = None

    def enter_stage(self, index, carry):
        from bcc.train.setup import enter_stage

        self.stage = enter_stage(self.parts, self.accelerator, index, self.stage, carry)

    @property
    def optimizer(self):
        return self.stage.optimizer

    @property
    def frozen_bn(self):
        return self.stage.frozen_bn

    def set_lr(self, step, total):
        from bcc.train.setup import set_lr

        return set_lr(self.stage.optimizer, self.parts.cfg, self.parts.stages[self.stage.index], step, total)


def _trainer(synth_shards, tmp_path, **finetune):
    stages = [{"epochs": 1, "train": ["heads"]},
              {"epochs": 1, "train": ["heads", "block4"], "lr_mult": {"block4": 0.5}}]
    cfg_path = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run",
                            finetune={"stages": stages, **finetune}, train={"epochs": 2, "lr": 0.05})
    return _Run(load_config(cfg_path, ["checkpoint.resume=none"]))


def _step(trainer):
    from bcc.train.epoch import train_step

    torch.manual_seed(1)
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8) % 4}
    train_step(trainer.stage.wrapped, batch, trainer.parts.loss_fn, trainer.optimizer, trainer.accelerator,
               trainer.parts.targets_of, 0.0)


def test_enter_stage_carries_momentum_of_parameters_that_stay_trainable(synth_shards, tmp_path):
    t = _trainer(synth_shards, tmp_path)
    t.enter_stage(0, carry=False)
    head_name, head_param = t.groups["heads"][0]
    block4_param = t.groups["block4"][0][1]
    assert head_param.requires_grad and not block4_param.requires_grad
    _step(t)
    _step(t)
    momentum = t.optimizer.optimizer.state[head_param]["momentum_buffer"].clone()
    assert momentum.abs().sum() > 0
    old_opt = t.optimizer.optimizer

    t.enter_stage(1, carry=True)
    opt = t.optimizer.optimizer
    assert opt is not old_opt and t.stage.index == 1 and t.parts.stages[1].train == ("block4", "heads")
    assert block4_param.requires_grad
    assert torch.equal(opt.state[head_param]["momentum_buffer"], momentum), f"{head_name} lost its momentum"
    assert block4_param not in opt.state  # newly unfrozen: starts from zero momentum
    mults = {g["group"]: g["lr_mult"] for g in opt.param_groups}
    assert mults == {"block4": 0.5, "heads": 1.0}
    t.set_lr(0, 10)
    for g in t.optimizer.param_groups:
        assert g["lr"] == pytest.approx(0.05 * g["lr_mult"] * lr_factor(0, 10, 2, 0.0))
    # the next step continues the carried buffer: buf = momentum * old + grad, not grad alone
    grads_before = head_param.detach().clone()
    _step(t)
    assert not torch.equal(head_param.detach(), grads_before)
    new_buf = opt.state[head_param]["momentum_buffer"]
    assert not torch.allclose(new_buf, momentum)
    assert block4_param in opt.state


def test_carry_optimizer_state_as_the_loop_uses_it():
    model = build_model(ModelConfig(backbone=TINY_BACKBONE), HEADS)
    groups = parameter_groups(model)
    sched = _custom(StageConfig(epochs=1, train=("heads", "block3")),
                    StageConfig(epochs=1, train=("heads", "block4"), lr_mult={"block4": 0.1}))
    stages = resolve_stages(sched, 2, list(groups), 0)
    apply_trainable(groups, stages[0].train)
    old = torch.optim.SGD(build_param_groups(groups, stages[0], 1e-4), lr=0.1, momentum=0.9)
    sum(out.sum() for out in model(torch.randn(4, 3, 32, 32))).backward()
    old.step()
    apply_trainable(groups, stages[1].train)
    new = torch.optim.SGD(build_param_groups(groups, stages[1], 1e-4), lr=0.1, momentum=0.9)
    kept = carry_optimizer_state(old, new)
    assert kept == len(groups["heads"])  # block3 dropped out, block4 is new
    for _, p in groups["heads"]:
        assert new.state[p]["momentum_buffer"] is old.state[p]["momentum_buffer"]
    assert not any(p in new.state for _, p in groups["block3"] + groups["block4"])
    decay = {g["group"]: g["weight_decay"] for g in new.param_groups if g["weight_decay"] > 0}
    assert set(decay) == {"heads", "block4"}


@pytest.mark.parametrize("policy", ["eval", "train"])
def test_frozen_batchnorm_policy(policy, synth_shards, tmp_path):
    t = _trainer(synth_shards, tmp_path, frozen_bn=policy)
    t.enter_stage(0, carry=False)
    frozen_bn = [m for name, m in t.model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) and t.module_groups[name] != "heads"]
    assert frozen_bn
    before = [m.running_mean.clone() for m in frozen_bn]
    _step(t)
    after = [m.running_mean for m in frozen_bn]
    if policy == "eval":
        assert all(not m.training for m in frozen_bn)
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    else:
        assert all(m.training for m in frozen_bn)
        assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # block4 unfreezes in stage 1: its BatchNorms train whatever the policy, the others follow it
    t.enter_stage(1, carry=True)
    for name, m in t.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (t.module_groups[name] == "block4" or policy == "train"), name
    # evaluation switches everything to eval and back to the stage's modes
    t.model.eval()
    from bcc.finetune import set_train_mode

    set_train_mode(t.model, t.frozen_bn)
    assert any(m.training for m in t.model.modules()) and t.model.training


def test_resume_refuses_an_epoch_budget_that_moves_the_stage():
    from bcc.finetune import check_resume_stages

    groups = ["block1", "block2", "heads"]
    ten = resolve_stages(FinetuneConfig(preset="staged"), 10, groups, 0)  # stages of 2, 3, 5 epochs
    twenty = resolve_stages(FinetuneConfig(preset="staged"), 20, groups, 0)  # 4, 6, 10
    check_resume_stages(ten, ten, 3)
    check_resume_stages(ten, twenty, 1)  # still in stage 0 under both budgets
    with pytest.raises(FinetuneError, match="from stage 1 to stage 0"):
        check_resume_stages(ten, twenty, 3)  # would re-freeze block2
    frozen = resolve_stages(FinetuneConfig(preset="frozen"), 10, groups, 0)
    check_resume_stages(frozen, resolve_stages(FinetuneConfig(preset="frozen"), 20, groups, 0), 9)


def test_head_lr_mult_scales_only_the_heads_on_top_of_the_stage_multipliers():
    from bcc.errors import BccError

    model = build_model(ModelConfig(backbone=TINY_BACKBONE), HEADS)
    groups = parameter_groups(model)
    sched = _custom(StageConfig(epochs=1, train=("heads", "block4"), lr_mult={"block4": 0.1, "heads": 0.5}))
    (stage,) = resolve_stages(sched, 1, list(groups), 0)
    mults = {g["group"]: g["lr_mult"] for g in build_param_groups(groups, stage, 1e-4, head_lr_mult=0.01)}
    assert mults == {"heads": pytest.approx(0.005), "block4": pytest.approx(0.1)}
    assert {g["group"]: g["lr_mult"] for g in build_param_groups(groups, stage, 1e-4)}["heads"] == 0.5
    with pytest.raises(BccError, match="train.head_lr_mult: must be > 0"):
        load_config(None, ["train.head_lr_mult=0"])
