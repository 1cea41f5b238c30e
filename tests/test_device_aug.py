"""uint8 crops in the workers, float work batched on the device (issue 12.5).

The batched device path must give what the per-image float path (`TrainPreset`/`EvalPreset`) gives for
the same random draws (within float tolerance for rotation and jitter, bitwise where only the
conversion and normalisation run); its draws must depend on the batch's seed alone (exact resume); and
prediction must see bitwise the tensor evaluation sees for an image.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_stream import data_cfg, write_pack
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bcc.device_aug import DeviceAugment, DeviceNormalize, normalize, on_device, rotate
from bcc.stream import eval_loader, train_loader
from bcc.transforms import EvalCrop, EvalPreset, TrainCrop, TrainPreset, crops_from_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise(n: int, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def reference(image: torch.Tensor, aug: DeviceAugment, p, i: int) -> torch.Tensor:
    """Sample i through torchvision's per-image kernels with the batch's draws (TrainPreset's float steps)."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    x = TF.rotate(x, float(p.angle[i]), interpolation=v2.InterpolationMode.BILINEAR, fill=list(aug.mean))
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    factors = (p.brightness, p.contrast, p.saturation)
    for op in p.order[i].tolist():
        x = adjust[op](x, float(factors[op][i]))
    return TF.normalize(x, list(aug.mean), list(aug.std))


@pytest.mark.parametrize("shape", [(16, 16), (12, 20)])
def test_batched_rotation_matches_torchvision_per_image(shape):
    x = noise(6, seed=1)[..., : shape[0], : shape[1]].float() / 255
    angles = torch.tensor([-15.0, -7.3, 0.4, 3.0, 11.9, 90.0], dtype=torch.float64)
    out = rotate(x, angles, fill=MEAN)
    for i, a in enumerate(angles.tolist()):
        ref = TF.rotate(x[i], a, interpolation=v2.InterpolationMode.BILINEAR, fill=list(MEAN))
        assert torch.allclose(out[i], ref, atol=1e-5), a


@pytest.mark.parametrize(("rotation", "jitter"), [(15.0, 0.1), (0.0, 0.4), (30.0, 0.0), (10.0, 1.5)])
def test_device_augment_matches_the_per_image_float_path(rotation, jitter):
    aug = DeviceAugment(rotation=rotation, color_jitter=jitter, mean=MEAN, std=STD)
    images = noise(8)
    out = aug(images, seed=5)
    p = aug.params(8, 5)
    assert out.dtype == torch.float32 and out.shape == images.shape
    # 1e-4 after normalisation is ~2e-5 in [0, 1] pixel units: under 1/100 of a grey level (the grids
    # differ in float rounding: the batched one is built from float64 angles)
    for i in range(8):
        assert torch.allclose(out[i], reference(images[i], aug, p, i), rtol=0, atol=1e-4)


def test_draws_depend_on_the_seed_alone():
    aug = DeviceAugment()
    images = noise(4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = aug(images, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither read nor advanced
    torch.manual_seed(99)
    assert torch.equal(a, aug(images, seed=11))
    assert not torch.equal(a, aug(images, seed=12))
    p = aug.params(4000, 3)  # the ranges and the orders are those of TrainPreset's ColorJitter
    assert p.angle.abs().max() <= 15 and 0.9 <= p.brightness.min() and p.saturation.max() <= 1.1
    assert {tuple(o) for o in p.order.tolist()} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def _image(seed: int, w: int = 40, h: int = 30) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


def test_the_split_path_is_the_old_path_where_no_float_augmentation_runs():
    # crop + flips in the worker, conversion + normalisation on the device: bitwise the per-image preset
    for seed in range(4):
        img = _image(seed)
        torch.manual_seed(seed)
        old = TrainPreset(size=16, rotation=0, color_jitter=0, mean=MEAN, std=STD)(img)
        torch.manual_seed(seed)
        crop = TrainCrop(size=16)(img)
        assert crop.dtype == torch.uint8
        assert torch.equal(DeviceAugment(rotation=0, color_jitter=0, mean=MEAN, std=STD)(crop[None], 0)[0], old)
        crop = EvalCrop(size=16, crop_pct=0.875)(img)
        assert torch.equal(normalize(crop, MEAN, STD), EvalPreset(size=16, crop_pct=0.875, mean=MEAN, std=STD)(img))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return write_pack(tmp_path_factory.mktemp("pack"), {"train": [13, 11], "val": [5, 2]})


def test_augmented_batches_resume_exactly(pack):
    # the stream's batches carry their seed: a loader resumed at batch k, with other workers, makes
    # bitwise the model inputs the uninterrupted one made (rotation and jitter on)
    cfg = data_cfg(workers=2, image_size=16)

    def inputs(workers: int, skip: int = 0):
        loader = train_loader(pack, replace(cfg, workers=workers), seed=3, epoch=1, rank=0, world_size=1,
                              skip_batches=skip)
        assert isinstance(loader.device_transform, DeviceAugment)
        return [b["image"] for b in on_device(loader, "cpu", channels_last=True)]

    full = inputs(2)
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x in full)
    for skip, workers in [(2, 0), (3, 3)]:
        rest = inputs(workers, skip)
        assert len(rest) == len(full) - skip and all(torch.equal(a, b) for a, b in zip(full[skip:], rest, strict=True))


def test_prediction_sees_the_tensors_evaluation_sees(pack, tmp_path):
    """`bcc predict`'s path (file -> EvalCrop -> InferenceModel.inputs) and the eval loader's (shard ->
    EvalCrop in a worker -> DeviceNormalize via on_device) give bitwise the same model input per image."""
    from bcc.config import Config
    from bcc.predict import InferenceModel, predict_paths
    from bcc.shards import read_shard
    from bcc.taxonomy import Taxonomy

    cfg = data_cfg(workers=1, image_size=16, crop_pct=0.875)
    loader = eval_loader(pack, "val", cfg, rank=0, world_size=1)
    assert isinstance(loader.device_transform, DeviceNormalize)
    evaluated = {k: x for b in on_device(loader, "cpu") for k, x in zip(b["key"], b["image"], strict=True)}
    for shard in pack.split("val").shards:
        for sample in read_shard(shard):
            (tmp_path / f"{sample['__key__']}.png").write_bytes(sample["png"])

    taxonomy = Taxonomy.default()
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return [torch.zeros(len(x), k) for k in taxonomy.head_sizes.values()]

    im = InferenceModel(model=Recorder(), taxonomy=taxonomy, preprocess=None, config=Config(data=cfg),
                        checkpoint=tmp_path, step=0, device=torch.device("cpu"))
    result = predict_paths(im, [tmp_path], batch_size=3)
    assert not result.failures
    predicted = {Path(p.path).stem: x for p, x in zip(result.predictions, torch.cat(seen), strict=True)}
    assert predicted.keys() == evaluated.keys() and len(predicted) == 7
    assert all(torch.equal(predicted[k], evaluated[k]) for k in predicted)
    # and both equal the per-image float preset (what export's Preprocess and earlier bcc versions fed)
    preset = EvalPreset(size=16, crop_pct=0.875, mean=cfg.mean, std=cfg.std)
    from bcc.imageio import decode_rgb

    assert all(torch.equal(preset(decode_rgb(tmp_path / f"{k}.png")), x) for k, x in evaluated.items())
    assert crops_from_config(cfg)[1](decode_rgb(next(tmp_path.glob("*.png")))).dtype == torch.uint8
