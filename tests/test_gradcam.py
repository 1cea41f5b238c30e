"""bcc.gradcam: the target layer is found generically (vgg16_bn: last ReLU of `features`; timm: last
stage), maps are per head and per image, overlays keep the original size and cover the centre crop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests

HEADS = {"binary": 2, "subtype": 3}


def tiny_cfg(backbone):
    return SimpleNamespace(backbone=backbone, pretrained="", head_hidden=16, head_dropout=0.0, channels_last=False)


def test_target_layer_of_vgg16_bn_is_the_last_relu_of_features():
    from bcc.gradcam import GradCAM, find_target_layer
    from bcc.model import build_model

    model = build_model(tiny_cfg("vgg16_bn"), HEADS).eval()
    name = find_target_layer(model, 64)
    assert name == "backbone.features.42"
    assert isinstance(model.get_submodule(name), nn.ReLU)
    assert isinstance(model.backbone.features[43], nn.MaxPool2d)  # the final pool is skipped
    maps = GradCAM(model, image_size=64, target=name)(torch.randn(2, 3, 64, 64))
    assert set(maps) == set(HEADS) and maps["binary"].shape == (2, 4, 4)


def test_target_layer_of_a_timm_backbone_is_its_last_stage():
    from bcc.gradcam import find_target_layer
    from bcc.model import build_model

    model = build_model(tiny_cfg("test_resnet"), HEADS).eval()
    assert find_target_layer(model, 64) == "backbone.layer4"  # 2x2 map
    assert find_target_layer(model, 32) == "backbone.layer3"  # layer4 is 1x1 at 32 px: no spatial information


def test_crop_box_follows_the_eval_preset():
    from bcc.gradcam import crop_box

    assert crop_box(48, 48, 32, 1.0) == (0, 0, 48, 48)
    assert crop_box(90, 60, 32, 1.0) == (15, 0, 75, 60)  # centre square of the short side
    left, top, right, bottom = crop_box(100, 100, 224, 0.875)  # resize to 256, crop 224
    assert right - left == pytest.approx(100 * 224 / 256) and left == pytest.approx(top)


def test_maps_differ_between_images_and_overlays_keep_the_image_size(trained_run, synth_data, tmp_path):  # noqa: F811
    from bcc.gradcam import GradCAM, save_overlays
    from bcc.predict import load_inference_model, read_image

    im = load_inference_model(trained_run, device="cpu")
    paths = [sorted((synth_data / c).iterdir())[0] for c in ("Benign", "Pro")]
    originals = [read_image(p) for p in paths]
    originals[1] = originals[1].resize((80, 56))
    x = torch.stack([im.preprocess(img) for img in originals])
    maps = GradCAM(im.model, image_size=im.image_size)(x)
    for head, m in maps.items():
        assert m.shape[0] == 2 and float(m.min()) >= 0 and float(m.max()) <= 1, head
    assert any(not torch.equal(m[0], m[1]) for m in maps.values())
    written = []
    for i, img in enumerate(originals):
        written.append(save_overlays(img, {h: m[i] for h, m in maps.items()}, tmp_path, f"img{i}",
                                     image_size=im.image_size, crop_pct=im.config.data.crop_pct,
                                     labels={"binary": "Benign"}))
    assert [p.name for p in written[0]] == ["img0.binary.png", "img0.subtype.png"]
    assert Image.open(written[0][0]).size == originals[0].size
    assert Image.open(written[1][0]).size == (80, 56)
    assert Image.open(written[0][0]).text["predicted"] == "Benign"
    # outside the centre crop the image is dimmed, not coloured
    a = np.asarray(Image.open(written[1][0]), dtype=np.float32)
    b = np.asarray(originals[1], dtype=np.float32)
    assert a.shape == (56, 80, 3) and np.allclose(a[:, :4], b[:, :4] * 0.5, atol=1)
