"""torchvision v2 presets: PIL image in, normalised float tensor [3, H, W] out.

Images become uint8 tensors first (`PILToTensor`), so the resampling of the full-size image (crop and
resize) runs on uint8; the conversion to float happens once, after it.

The train preset draws its randomness from torch's global RNG. `bcc.stream` seeds that RNG per batch
(from seed, epoch, rank and batch index), which is what makes the augmented stream reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


class TrainPreset:
    """Random resized crop, flips, small rotation, mild colour jitter, normalise."""

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
        steps = [
            v2.PILToTensor(),
            v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if vflip:
            steps.append(v2.RandomVerticalFlip())
        # rotation and jitter work in float internally; converting once here saves a uint8 round trip
        # per step (~10% faster at 64 px) and the rounding that goes with it
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

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class EvalPreset:
    """Resize the short side to size / crop_pct, centre crop `size`, normalise."""

    def __init__(
        self,
        *,
        size: int,
        crop_pct: float = 1.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        steps = [
            v2.PILToTensor(),
            v2.Resize(int(size / crop_pct), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
        self.transforms = v2.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


def presets_from_config(data_cfg) -> tuple[TrainPreset, EvalPreset]:
    """(train, eval) presets for a `DataConfig`."""
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


def denormalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize for display: [..., 3, H, W] float in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return (tensor * std_t + mean_t).clamp(0, 1)
