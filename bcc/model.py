"""The multitask classifier: one shared backbone, one small MLP head per taxonomy head.

`vgg16_bn` is the backbone of the source study (torchvision `features` + `avgpool`, flattened to
512*7*7 = 25088 features); any other name is a timm model built with `num_classes=0`, so it returns
pooled features of width `num_features`. Pretrained weights come from a local file (the normal
case on offline clusters) or, with `pretrained="hub"`, from the internet.

Parameter groups (`parameter_groups`) split the backbone shallow to deep so the stage schedule can
freeze and unfreeze it block by block; `group_of_module` maps modules (BatchNorm in particular) to
the same groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

VGG_NAME = "vgg16_bn"
HEADS_GROUP = "heads"
_HUB_SOURCES = ("hub", "true")
# Wrapper prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) put on saved keys.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(x)
        return tuple(self.heads[name](features) for name in self.head_names)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised backbone and its feature width."""
    if name == VGG_NAME:
        import torchvision

        vgg = torchvision.models.vgg16_bn(weights=None)
        return VGGBackbone(vgg.features, vgg.avgpool), 512 * 7 * 7
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    return model, int(model.num_features)


def build_model(cfg, heads: Mapping[str, int]) -> MultitaskNet:
    """Build the model described by `cfg` (a `ModelConfig` or anything with its attributes)."""
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
        load_pretrained(model, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# Pretrained weights


@dataclass
class LoadReport:
    """What `load_pretrained` did. Key names are the model's for `missing`, the file's for `unexpected`."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def missing_backbone(self) -> list[str]:
        """Missing keys outside the heads: these mean the backbone is partly random."""
        return [k for k in self.missing if not k.startswith(HEADS_GROUP + ".")]

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors" + (f" from {self.source}" if self.source else "")]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (left as initialised): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {_preview(self.unexpected)}")
        return "; ".join(parts)


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(model: MultitaskNet, source: str | Path) -> LoadReport:
    """Load weights into `model` from a file or, with `"hub"`, from the internet.

    A file is `.safetensors` or a torch state dict (optionally under a `state_dict`/`model` key).
    It may hold a whole bcc model (`backbone.*`, `heads.*`) or a bare backbone (torchvision
    vgg16_bn or the timm model), whose keys are prefixed with `backbone.`; keys the model lacks
    (e.g. torchvision's `classifier.*`) are reported as unexpected and ignored.
    """
    if str(source).strip().lower() in _HUB_SOURCES:
        label = f"hub weights of {model.backbone_name}"
        state = _hub_state_dict(model.backbone_name)
    else:
        path = Path(source).expanduser()
        label = str(path)
        state = _read_state_dict(path)
    return _load_state_dict(model, state, label)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read pretrained weights from {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise ValueError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; is this a state dict?"
            )
    return dict(state)


def _hub_state_dict(name: str) -> dict[str, Tensor]:
    try:
        if name == VGG_NAME:
            import torchvision

            return torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        import timm

        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:
        if name == VGG_NAME:
            recipe = (
                'python -c "import torch, torchvision; torch.save(torchvision.models.vgg16_bn('
                "weights='IMAGENET1K_V1').state_dict(), 'vgg16_bn.pth')\""
            )
        else:
            recipe = (
                f'python -c "import timm, safetensors.torch as st; st.save_file(timm.create_model('
                f"'{name}', pretrained=True).state_dict(), '{name}.safetensors')\""
            )
        raise RuntimeError(
            f"could not download pretrained weights for {name} ({type(e).__name__}: {e}). "
            f"On a machine with internet access run\n  {recipe}\n"
            f"copy the file here and pass model.pretrained=/path/to/file"
        ) from e


def _strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_state_dict(model: MultitaskNet, state: Mapping[str, Tensor], label: str) -> LoadReport:
    state = _strip_wrapper_prefixes(state)
    is_full_model = any(k.startswith(("backbone.", HEADS_GROUP + ".")) for k in state)
    # file key -> model key
    key_map = {k: k if is_full_model else f"backbone.{k}" for k in state}
    own = model.state_dict()
    matched = {fk: mk for fk, mk in key_map.items() if mk in own}
    if not matched:
        raise ValueError(
            f"no parameter of {label} matches backbone {model.backbone_name}: "
            f"first keys of the file: {_preview(list(state), 5)}; "
            f"first keys expected: {_preview(list(own), 5)}"
        )
    mismatched = [
        f"{mk} (file {tuple(state[fk].shape)}, model {tuple(own[mk].shape)})"
        for fk, mk in matched.items()
        if state[fk].shape != own[mk].shape
    ]
    if mismatched:
        raise ValueError(f"{label}: shape mismatch for {len(mismatched)} tensors: {_preview(mismatched, 5)}")
    model.load_state_dict({mk: state[fk] for fk, mk in matched.items()}, strict=False)
    loaded_keys = set(matched.values())
    return LoadReport(
        loaded=len(matched),
        missing=[k for k in own if k not in loaded_keys],
        unexpected=[fk for fk in state if fk not in matched],
        source=label,
    )


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
