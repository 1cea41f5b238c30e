"""Per-image presets: the geometric part that runs in loader workers, on uint8, and the float reference.

The data path splits an image's preprocessing where the pixels stop changing size:

* in the loader workers (`TrainCrop`, `EvalCrop`): PIL image -> uint8 tensor [3, S, S]. The resampling
  of the full-size image (random resized crop, or resize + centre crop) must happen there: it is what
  makes every sample the same size, so batching depends on it, and it turns a large image into a small
  one before anything crosses a process boundary. The flips stay there too: on uint8 they are a strided
  copy (nearly free), and drawn per sample together with the crop from the same per-batch seed. The batch
  that leaves a worker is uint8: a quarter of the bytes of float32 through the worker's shared memory and
  over the host-to-device link.
* on the training device, batched (`bcc.device_aug`): conversion to float, the float augmentations
  (rotation, colour jitter) and normalisation.

`TrainPreset` and `EvalPreset` are the whole per-image float path (PIL image in, normalised float tensor
out), with the same steps in the same order; `EvalPreset(img)` equals `bcc.device_aug.normalize` of
`EvalCrop(img)` bitwise (the same kernels), and `TrainPreset` is the reference the batched device
augmentation reproduces within float tolerance (tests/test_device_aug.py).

The random crop and flips draw from torch's global RNG. `bcc.stream` seeds that RNG per batch (from seed,
epoch, rank and batch index), which is what makes the augmented stream reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def _train_crop_steps(size: int, scale_min: float, hflip: bool, vflip: bool) -> list:
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    return steps


def _eval_crop_steps(size: int, crop_pct: float) -> list:
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return [v2.PILToTensor(), v2.Resize(int(size / crop_pct), antialias=True), v2.CenterCrop(size)]


class _Preset:
    transforms: v2.Compose

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class TrainCrop:
    """Worker half of training: random resized crop, flips; PIL image -> uint8 [3, size, size].

    The same draws from torch's global RNG and the same kernels as the first steps of `TrainPreset`
    (bitwise: tests/test_device_aug.py), called directly: `v2.Compose` spends ~70 us of Python per image
    on flattening and dispatch, as much as decoding a small JPEG."""

    def __init__(self, *, size: int, scale_min: float = 0.5, hflip: bool = True, vflip: bool = True):
        self.size, self.hflip, self.vflip = size, hflip, vflip
        self._crop = v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True)

    def __call__(self, img) -> torch.Tensor:
        x = F.pil_to_tensor(img)
        p = self._crop.make_params([x])  # torchvision's own draws (the RNG is consumed as in TrainPreset)
        x = F.resized_crop_image(x, p["top"], p["left"], p["height"], p["width"], [self.size, self.size],
                                 interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        if self.hflip and torch.rand(1) < 0.5:  # v2.RandomHorizontalFlip(p=0.5): one draw, flip when < p
            x = F.horizontal_flip_image(x)
        if self.vflip and torch.rand(1) < 0.5:
            x = F.vertical_flip_image(x)
        return x

    def __repr__(self) -> str:
        return f"TrainCrop(size={self.size}, scale={self._crop.scale}, hflip={self.hflip}, vflip={self.vflip})"


class EvalCrop(_Preset):
    """Worker half of evaluation and prediction: resize the short side to size / crop_pct, centre crop
    `size`; PIL image -> uint8 [3, size, size]."""

    def __init__(self, *, size: int, crop_pct: float = 1.0):
        self.transforms = v2.Compose(_eval_crop_steps(size, crop_pct))


class TrainPreset(_Preset):
    """Random resized crop, flips, small rotation, mild colour jitter, normalise, one image at a time
    (the reference for `bcc.device_aug.DeviceAugment`, which the trainer uses)."""

    def __init__(
        self,
        *,
        size: int,
        scale_min: float = 0.5,
        rotation: float = 15.0,
        hflip: bool = True,
        vflip: bool = True,
        color_jitter: float = 0.1,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        steps = _train_crop_steps(size, scale_min, hflip, vflip)
        # rotation and jitter work in float internally; converting once here saves a uint8 round trip
        # per step and the rounding that goes with it
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if rotation > 0:
            # fill the uncovered corners with the mean colour: after Normalize they are 0, not a black
            # wedge the model could learn to look for
            steps.append(
                v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=list(mean))
            )
        if color_jitter > 0:
            # no hue jitter: a hue shift turns the purple stain of nuclei into colours no smear has;
            # brightness/contrast/saturation cover the stain and scanner variation between labs
            steps.append(
                v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            )
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
        self.transforms = v2.Compose(steps)


class EvalPreset(_Preset):
    """Resize the short side to size / crop_pct, centre crop `size`, normalise: PIL image -> float
    [3, size, size], bitwise `bcc.device_aug.normalize(EvalCrop(img))`."""

    def __init__(
        self,
        *,
        size: int,
        crop_pct: float = 1.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        steps = _eval_crop_steps(size, crop_pct)
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        self.transforms = v2.Compose(steps)


def presets_from_config(data_cfg) -> tuple[TrainPreset, EvalPreset]:
    """(train, eval) per-image float presets for a `DataConfig`."""
    train = TrainPreset(
        size=data_cfg.image_size,
        scale_min=data_cfg.scale_min,
        rotation=data_cfg.rotation,
        hflip=data_cfg.hflip,
        vflip=data_cfg.vflip,
        color_jitter=data_cfg.color_jitter,
        mean=data_cfg.mean,
        std=data_cfg.std,
    )
    evaluation = EvalPreset(
        size=data_cfg.image_size, crop_pct=data_cfg.crop_pct, mean=data_cfg.mean, std=data_cfg.std
    )
    return train, evaluation


def crops_from_config(data_cfg) -> tuple[TrainCrop, EvalCrop]:
    """(train, eval) worker transforms for a `DataConfig`: PIL image -> uint8 [3, S, S]."""
    train = TrainCrop(size=data_cfg.image_size, scale_min=data_cfg.scale_min, hflip=data_cfg.hflip,
                      vflip=data_cfg.vflip)
    return train, EvalCrop(size=data_cfg.image_size, crop_pct=data_cfg.crop_pct)


def denormalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize for display: [..., 3, H, W] float in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return (tensor * std_t + mean_t).clamp(0, 1)
