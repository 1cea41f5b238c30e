"""bcc.model: head design, backbones, pretrained loading and parameter groups.

vgg16_bn is built once per module (about 2 s on CPU); everything else uses timm's `test_resnet`
(0.37 M parameters, 5 coarse groups, BatchNorm) at 32 px.
"""

import copy
from types import SimpleNamespace

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from bcc.model import build_model, count_parameters, group_of_module, parameter_groups
from bcc.pretrained import load_pretrained

TINY = "test_resnet"
ALL_HEADS = {"binary": 2, "subtype": 3}


def model_cfg(backbone=TINY, pretrained="", **kw):
    fields = dict(
        backbone=backbone, pretrained=str(pretrained), head_hidden=256, head_dropout=0.5, channels_last=False
    )
    return SimpleNamespace(**(fields | kw))


def save(state, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg_model():
    return build_model(model_cfg("vgg16_bn"), ALL_HEADS)


@pytest.fixture(scope="module")
def torchvision_vgg_state():
    state = torchvision.models.vgg16_bn(weights=None).state_dict()
    # The classifier's two big matrices (500 MB) only need to exist as names: the model must report
    # them as unexpected whatever their shape, so small stand-ins keep the test files small.
    return {k: (torch.zeros(1) if k.startswith("classifier") else v) for k, v in state.items()}


# --- architecture -----------------------------------------------------------------------------


def test_vgg_heads_have_the_designed_shapes(vgg_model):
    assert vgg_model.feature_dim == 512 * 7 * 7 == 25088
    assert vgg_model.head_names == ("binary", "subtype")
    assert list(vgg_model.heads) == ["binary", "subtype"]
    for name, n in ALL_HEADS.items():
        head = vgg_model.heads[name]
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert head[0].weight.shape == (256, 25088) and head[0].bias.shape == (256,)
        assert head[3].weight.shape == (n, 256) and head[3].bias.shape == (n,)
        assert head[1].inplace and head[2].p == 0.5
    assert set(dict(vgg_model.backbone.named_children())) == {"features", "avgpool"}


def test_vgg_forward_at_32px(vgg_model):
    vgg_model.eval()
    with torch.no_grad():
        out = vgg_model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 2), (2, 3)]
    assert vgg_model.backbone(torch.randn(1, 3, 32, 32)).shape == (1, 25088)


def test_single_head_taxonomy_builds_one_head():
    model = build_model(model_cfg(), {"kvasir": 8})
    assert model.head_names == ("kvasir",) and list(model.heads) == ["kvasir"]
    (out,) = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 8)


def test_timm_backbone_and_config_fields():
    model = build_model(model_cfg(head_hidden=16, head_dropout=0.1, channels_last=True), ALL_HEADS)
    assert model.feature_dim == timm.create_model(TINY, num_classes=0).num_features
    assert model.heads["subtype"][0].weight.shape == (16, model.feature_dim)
    assert model.heads["subtype"][2].p == 0.1
    assert model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    model.train()
    binary, subtype = model(torch.randn(4, 3, 32, 32))
    assert binary.shape == (4, 2) and subtype.shape == (4, 3)
    (binary.sum() + subtype.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("heads", [{}, {"a.b": 2}, {"one": 1}])
def test_bad_heads_are_rejected(heads):
    with pytest.raises(ValueError):
        build_model(model_cfg(), heads)


def test_count_parameters():
    model = build_model(model_cfg(), ALL_HEADS)
    d = model.feature_dim
    heads = (d * 256 + 256) * 2 + (256 * 2 + 2) + (256 * 3 + 3)
    backbone = sum(p.numel() for p in timm.create_model(TINY, num_classes=0).parameters())
    assert count_parameters(model) == backbone + heads
    model.backbone.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == heads


# --- pretrained weights -----------------------------------------------------------------------


# The other weight sources, the load line, refusal and bad files: tests/test_pretrained.py.


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_torchvision_vgg_state_dict(vgg_model, torchvision_vgg_state, tmp_path, suffix):
    path = save(torchvision_vgg_state, tmp_path / f"vgg16_bn{suffix}")
    model = copy.deepcopy(vgg_model)
    record = load_pretrained(model, path, echo=False)
    own = model.state_dict()
    features = [k for k in torchvision_vgg_state if not k.startswith("classifier")]
    for k in features:
        assert torch.equal(own[f"backbone.{k}"], torchvision_vgg_state[k]), k
    assert record.loaded == record.total == len([k for k in features if "num_batches" not in k])
    assert sorted(record.unexpected) == sorted(k for k in torchvision_vgg_state if k.startswith("classifier"))
    assert record.missing and all(k.startswith("heads.") for k in record.missing)
    assert record.missing_backbone == [] and record.heads_reinitialised == ("binary", "subtype")
    assert "classifier.0.weight" in record.line() and str(path) in record.line()


# --- parameter groups -------------------------------------------------------------------------


def test_vgg_parameter_groups(vgg_model):
    groups = parameter_groups(vgg_model)
    assert list(groups) == ["block1", "block2", "block3", "block4", "block5", "heads"]
    names = [n for members in groups.values() for n, _ in members]
    assert sorted(names) == sorted(n for n, _ in vgg_model.named_parameters())
    assert len(names) == len(set(names))
    block1 = [n for n, _ in groups["block1"]]
    assert block1 == [f"backbone.features.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    convs_per_block = [sum(p.ndim == 4 for _, p in groups[f"block{b}"]) for b in range(1, 6)]
    assert convs_per_block == [2, 2, 3, 3, 3]
    assert all(n.startswith("heads.") for n, _ in groups["heads"])

    modules = group_of_module(vgg_model)
    assert modules["backbone.features.1"] == "block1"  # first BatchNorm
    assert modules["backbone.features.6"] == "block1"  # its MaxPool
    assert modules["backbone.features.41"] == "block5"  # last BatchNorm
    assert modules["heads.subtype.0"] == "heads"
    bns = [n for n, m in vgg_model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13 and all(n in modules for n in bns)


def test_timm_parameter_groups():
    model = build_model(model_cfg(), ALL_HEADS)
    groups = parameter_groups(model)
    assert list(groups) == ["block0", "block1", "block2", "block3", "block4", "heads"]
    assert all(n.startswith("backbone.conv1") or n.startswith("backbone.bn1") for n, _ in groups["block0"])
    for i in range(1, 5):
        assert all(n.startswith(f"backbone.layer{i}.") for n, _ in groups[f"block{i}"])
    assert sum(len(m) for m in groups.values()) == len(list(model.parameters()))

    modules = group_of_module(model)
    assert modules["backbone.bn1"] == "block0"
    assert modules["backbone.layer3.0.bn1"] == "block3"

    # Works through a DDP-style wrapper too.
    wrapper = nn.Module()
    wrapper.module = model
    assert list(parameter_groups(wrapper)) == list(groups)
