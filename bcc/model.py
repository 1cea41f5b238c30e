"""The multitask classifier: one shared backbone, one small MLP head per taxonomy head.

`vgg16_bn` is the backbone of the source study (torchvision `features` + `avgpool`, flattened to
512*7*7 = 25088 features); any other name is a timm model built with `num_classes=0`, so it returns
pooled features of width `num_features`. Pretrained weights (a file, a bcc run, checkpoint or
export, or with `pretrained="hub"` the internet) are loaded by `bcc.pretrained`.

Parameter groups (`parameter_groups`) split the backbone shallow to deep so the stage schedule can
freeze and unfreeze it block by block; `group_of_module` maps modules (BatchNorm in particular) to
the same groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bcc.errors import BccError

VGG_NAME = "vgg16_bn"
HEADS_GROUP = "heads"


class VGGBackbone(nn.Module):
    """torchvision VGG's `features` and `avgpool`, flattened. Attribute names match torchvision's,
    so a torchvision state dict loads after prefixing `backbone.`."""

    def __init__(self, features: nn.Module, avgpool: nn.Module):
        super().__init__()
        self.features = features
        self.avgpool = avgpool

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


def make_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """`Linear -> ReLU -> Dropout -> Linear`, the head design of the source study."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class MultitaskNet(nn.Module):
    """A shared backbone feeding one classification head per entry of `heads` (ordered)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        heads: Mapping[str, int],
        hidden: int = 256,
        dropout: float = 0.5,
        backbone_name: str = "",
    ):
        super().__init__()
        if not heads:
            raise ValueError("MultitaskNet needs at least one head")
        for name, n in heads.items():
            if not name or "." in name:
                raise ValueError(f"head name {name!r} must be non-empty and contain no '.'")
            if int(n) < 2:
                raise ValueError(f"head {name!r} has {n} classes; a classification head needs at least 2")
        self.backbone = backbone
        self.backbone_name = backbone_name or type(backbone).__name__
        self.feature_dim = int(feature_dim)
        self.head_names = tuple(heads)
        self.heads = nn.ModuleDict(
            {name: make_head(self.feature_dim, int(n), hidden, dropout) for name, n in heads.items()}
        )
        # what `bcc.pretrained.load_pretrained` loaded into this model (a `PretrainedRecord`), if anything
        self.pretrained_record = None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(x)
        return tuple(self.heads[name](features) for name in self.head_names)


class BackboneError(BccError, ValueError):
    """`model.backbone` names no backbone bcc can build."""


def check_backbone_name(name: str) -> None:
    """Raise BackboneError, suggesting the closest names, unless `name` is vgg16_bn or a timm model
    (a timm pretrained tag such as `resnet18.a1_in1k` counts). Cheap: no model is built."""
    import timm

    if name == VGG_NAME or timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, [VGG_NAME, *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()` for the names"
    raise BackboneError(f"model.backbone '{name}' is neither {VGG_NAME} nor a timm model{hint}")


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised backbone and its feature width. Raises BackboneError for an unknown name."""
    if name == VGG_NAME:
        import torchvision

        vgg = torchvision.models.vgg16_bn(weights=None)
        return VGGBackbone(vgg.features, vgg.avgpool), 512 * 7 * 7
    import timm

    check_backbone_name(name)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return model, int(model.num_features)


def build_model(
    cfg, heads: Mapping[str, int], *, taxonomy: Any = None, allow_mismatch: bool | None = None
) -> MultitaskNet:
    """Build the model described by `cfg` (a `ModelConfig` or anything with its attributes).

    With `cfg.pretrained` set the weights are loaded (`bcc.pretrained.load_pretrained`, which prints
    its one load line) and the record is kept as `model.pretrained_record`. `taxonomy` is the model's
    (heads of a source with another taxonomy are not loaded); `allow_mismatch` defaults to
    `cfg.pretrained_allow_mismatch` where the config has that key, else False.
    """
    backbone, feature_dim = build_backbone(cfg.backbone)
    model = MultitaskNet(
        backbone,
        feature_dim,
        heads,
        hidden=cfg.head_hidden,
        dropout=cfg.head_dropout,
        backbone_name=cfg.backbone,
    )
    if cfg.pretrained:
        from bcc.pretrained import load_pretrained

        if allow_mismatch is None:
            allow_mismatch = bool(getattr(cfg, "pretrained_allow_mismatch", False))
        model.pretrained_record = load_pretrained(
            model, cfg.pretrained, allow_mismatch=allow_mismatch, taxonomy=taxonomy
        )
    if cfg.channels_last is True:  # "auto" is resolved by the trainer for its device (bcc/train/accel.py)
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# Parameter groups


def _unwrap(model: nn.Module) -> MultitaskNet:
    """The MultitaskNet under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, MultitaskNet):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a MultitaskNet (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def _backbone_grouper(backbone: nn.Module) -> tuple[list[str], Callable[[str], str]]:
    """Group names (shallow to deep) and a function mapping a backbone parameter name to its group."""
    if isinstance(backbone, VGGBackbone):
        # A block ends at each MaxPool: block k holds the conv+bn pairs before the k-th pool.
        block_of_index, block = {}, 1
        for i, layer in enumerate(backbone.features):
            block_of_index[str(i)] = block
            if isinstance(layer, nn.MaxPool2d):
                block += 1
        n_blocks = max(block_of_index.values())
        names = [f"block{b}" for b in range(1, n_blocks + 1)]

        def vgg_group(param_name: str) -> str:
            top, index, *_ = param_name.split(".")
            if top != "features":
                raise KeyError(f"unexpected vgg backbone parameter {param_name}")
            return f"block{block_of_index[index]}"

        return names, vgg_group

    group_matcher = getattr(backbone, "group_matcher", None)
    if group_matcher is None:
        return ["backbone"], lambda _: "backbone"
    from timm.models._manipulate import group_parameters

    layer_of = group_parameters(backbone, group_matcher(coarse=True), reverse=True)
    names = [f"block{i}" for i in sorted(set(layer_of.values()))]
    return names, lambda param_name: f"block{layer_of[param_name]}"


def _group_of_parameter(model: MultitaskNet) -> tuple[list[str], dict[str, str]]:
    names, grouper = _backbone_grouper(model.backbone)
    group_of = {}
    for name, _ in model.named_parameters():
        top, rest = name.split(".", 1)
        group_of[name] = HEADS_GROUP if top == HEADS_GROUP else grouper(rest)
    return names + [HEADS_GROUP], group_of


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters by group, shallow to deep, `heads` last.

    vgg16_bn: `block1`..`block5` (split at the MaxPools of `features`). timm backbones: `block0`,
    `block1`, ... from the model's coarse `group_matcher` (block0 is usually the stem). Other
    backbones: one `backbone` group. Names are relative to the unwrapped MultitaskNet.
    """
    model = _unwrap(model)
    order, group_of = _group_of_parameter(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in order}
    params = list(model.named_parameters())
    for name, p in params:
        groups[group_of[name]].append((name, p))
    grouped = [id(p) for members in groups.values() for _, p in members]
    assert len(grouped) == len(params) == len(set(grouped)), "every parameter must be in exactly one group"
    return {g: members for g, members in groups.items() if members}


def group_of_module(model: nn.Module) -> dict[str, str]:
    """Module name -> parameter group, for every module that owns parameters or has no children.

    A module without parameters of its own (ReLU, pooling, BatchNorm without affine) takes the group
    of the nearest parameterised module before it, which is the block it sits in.
    """
    model = _unwrap(model)
    order, group_of = _group_of_parameter(model)
    result: dict[str, str] = {}
    current = order[0]
    for name, module in model.named_modules():
        if not name:
            continue
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own:
            current = group_of[f"{name}.{own[0]}"]
            result[name] = current
        elif next(module.children(), None) is None:
            result[name] = current
    return result


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with `requires_grad` when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
