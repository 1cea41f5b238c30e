"""Presets: shapes, dtypes, determinism of eval, reproducibility of train under a seed."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from bcc.config import DataConfig
from bcc.transforms import EvalPreset, TrainPreset, denormalize, presets_from_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise_image(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(
        "RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3))
    )


def test_output_shapes_and_dtypes():
    img = noise_image()
    train, evaluation = presets_from_config(DataConfig(image_size=24))
    for preset in (train, evaluation):
        out = preset(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_eval_preset_is_deterministic_and_crops_the_centre():
    img = noise_image(48, 48)
    preset = EvalPreset(size=32, crop_pct=0.5, mean=MEAN, std=STD)
    torch.manual_seed(0)
    a = preset(img)
    torch.manual_seed(1)
    assert torch.equal(a, preset(img))
    # crop_pct 0.5: the short side is resized to 64, then the central 32 px are kept
    expected = v2.Compose([v2.PILToTensor(), v2.Resize(64, antialias=True), v2.CenterCrop(32)])(img)
    restored = denormalize(a, MEAN, STD)
    assert torch.allclose(restored * 255, expected.float(), atol=1e-3)


def test_train_preset_is_random_but_reproducible_under_a_seed():
    img = noise_image()
    preset = TrainPreset(size=24, mean=MEAN, std=STD)
    torch.manual_seed(123)
    a, b = preset(img), preset(img)
    torch.manual_seed(123)
    assert torch.equal(a, preset(img))
    assert not torch.equal(a, b)


def test_train_preset_respects_switches():
    steps = TrainPreset(size=24, hflip=False, vflip=False, rotation=0, color_jitter=0).transforms.transforms
    names = [type(s).__name__ for s in steps]
    assert names == ["PILToTensor", "RandomResizedCrop", "ToDtype", "Normalize"]
    full = [type(s).__name__ for s in TrainPreset(size=24).transforms.transforms]
    assert {"RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation", "ColorJitter"} <= set(full)


def test_denormalize_inverts_normalize_on_batches():
    x = torch.rand(2, 3, 8, 8)
    normed = v2.Normalize(MEAN, STD)(x)
    assert torch.allclose(denormalize(normed, MEAN, STD), x, atol=1e-6)


def test_eval_preset_rejects_bad_crop_pct():
    with pytest.raises(ValueError, match="crop_pct"):
        EvalPreset(size=32, crop_pct=1.5)
