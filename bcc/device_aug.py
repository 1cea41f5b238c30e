"""uint8 batches -> model inputs on the training device: float conversion, rotation, colour jitter, normalise.

Loader workers stop at uint8 crops (`bcc.transforms.TrainCrop`/`EvalCrop`); the float work runs here, in
the main process, on whole batches on the device the model lives on (timm's `PrefetchLoader` is the
anchor: uint8 over the host-to-device link, normalisation on the GPU). A worker so spends its core on
decoding and cropping only, and the batch it hands over is a quarter of the bytes of float32.

* `normalize(images, mean, std)`: uint8 [N, 3, H, W] -> float32, x / 255 then (x - mean) / std, with the
  same torchvision kernels as `bcc.transforms.EvalPreset`: evaluation, prediction and the per-image preset
  give bitwise the same tensor for an image.
* `DeviceAugment`: per-sample random rotation (bilinear, corners filled with the mean colour), colour
  jitter (brightness, contrast, saturation in a random order per sample) and normalisation, batched; the
  same maths as `bcc.transforms.TrainPreset` within float tolerance.
* Determinism: the parameters of a batch come from a CPU `torch.Generator` seeded by the batch's own
  `augment_seed` (the stream derives it from seed, epoch, rank and batch index), never from the global
  RNG or a device generator. The same batch so gets the same augmentation on any device, after a resume,
  and whatever ran before it.
* `on_device(batches, device, transform)`: moves each batch to the device (non-blocking; with a CUDA
  device the next batch's copy is issued on a side stream while the current one is in use, so a pinned
  batch's transfer overlaps the step) and applies the transform.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

__all__ = ["AugmentParams", "DeviceAugment", "DeviceNormalize", "device_transforms_from_config", "normalize",
           "on_device"]

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> normalised float32 on the same device (a float input is only normalised)."""
    x = TF.to_dtype(images, torch.float32, scale=True)
    return TF.normalize(x, mean=list(mean), std=list(std))


@dataclass(frozen=True)
class DeviceNormalize:
    """Evaluation and prediction: `normalize` as a batch transform (`seed` is accepted and unused)."""

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


@dataclass(frozen=True)
class AugmentParams:
    """One batch's random draws (CPU tensors): rotation angle in degrees [N]; brightness, contrast and
    saturation factors [N] each; the order the three are applied in, a permutation of 0, 1, 2 per row [N, 3]."""

    angle: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    order: torch.Tensor


@dataclass(frozen=True)
class DeviceAugment:
    """Training: uint8 [N, 3, H, W] -> rotated, colour-jittered, normalised float32 [N, 3, H, W].

    `rotation`: angles uniform in [-rotation, rotation] degrees (0: off); `color_jitter` j: brightness,
    contrast and saturation factors uniform in [max(0, 1 - j), 1 + j] (0: off); as `TrainPreset`.
    """

    rotation: float = 15.0
    color_jitter: float = 0.1
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def params(self, n: int, seed: int) -> AugmentParams:
        """The draws for a batch of `n` from a generator seeded by `seed` alone (a pure function)."""
        g = torch.Generator().manual_seed(seed)
        j = self.color_jitter
        lo, hi = max(0.0, 1.0 - j), 1.0 + j
        angle = torch.empty(n, dtype=torch.float64).uniform_(-self.rotation, self.rotation, generator=g)
        factors = torch.empty(3, n, dtype=torch.float64).uniform_(lo, hi, generator=g)
        order = torch.rand(n, 3, generator=g).argsort(dim=1)  # a uniform random permutation per sample
        return AugmentParams(angle, factors[0], factors[1], factors[2], order)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        x = TF.to_dtype(images, torch.float32, scale=True)
        p = self.params(x.shape[0], seed)
        if self.rotation > 0:
            x = rotate(x, p.angle, fill=self.mean)
        if self.color_jitter > 0:
            x = jitter(x, p)
        return TF.normalize(x, mean=list(self.mean), std=list(self.std))


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Rotate each image of float [N, C, H, W] by its own angle (degrees [N], counter-clockwise) about its
    centre, bilinear, the uncovered area filled with `fill`: torchvision's `rotate` per image, batched."""
    n, c, h, w = x.shape
    rad = degrees.to(torch.float64) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    # the inverse map (output pixel -> input pixel) in pixel units about the centre, scaled to [-1, 1]
    # grid units as torchvision's _affine_grid does (align_corners=False)
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # [N, 2(out), 2(in)]
    theta = (theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float64)).to(x.device, x.dtype)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device, dtype=x.dtype)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device, dtype=x.dtype)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).view(1, h * w, 2)
    grid = base.matmul(theta).view(n, h, w, 2)
    # a ones channel tells how much of each output pixel came from inside the image
    sampled = F.grid_sample(torch.cat([x, x.new_ones(n, 1, h, w)], 1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    out, mask = sampled[:, :c], sampled[:, c:]
    fill_t = torch.tensor(list(fill), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return out.sub_(fill_t).mul_(mask).add_(fill_t)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (x * r + other * (1.0 - r)).clamp_(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GREY[0]).add_(g, alpha=_GREY[1]).add_(b, alpha=_GREY[2]).unsqueeze(-3)


def jitter(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Brightness, contrast and saturation of float [N, 3, H, W] in [0, 1], each image with its own
    factors and order (torchvision's `ColorJitter` kernels). At each of the three positions every
    adjustment runs on the whole batch, with factor 1 (the identity, exactly) for the images whose
    order puts another adjustment there: batched without a per-image loop."""
    device = x.device
    factors = [f.to(device, x.dtype) for f in (p.brightness, p.contrast, p.saturation)]
    order = p.order.to(device)
    for k in range(3):
        for op in range(3):
            chosen = order[:, k] == op
            f = torch.where(chosen, factors[op], torch.ones_like(factors[op]))
            if op == 0:
                x = _blend(x, torch.zeros_like(x[:, :1]), f)
            elif op == 1:
                x = _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f)
            else:
                x = _blend(x, _grey(x), f)
    return x


def device_transforms_from_config(data_cfg) -> tuple[DeviceAugment, DeviceNormalize]:
    """(train, eval) batch transforms for a `DataConfig`."""
    mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)
    return (DeviceAugment(rotation=data_cfg.rotation, color_jitter=data_cfg.color_jitter, mean=mean, std=std),
            DeviceNormalize(mean=mean, std=std))


# --------------------------------------------------------------------------- batches onto the device


def _send(batch: Mapping, device: torch.device, stream) -> dict:
    out = dict(batch)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out["image"] = batch["image"].to(device, non_blocking=True)
        out["label"] = batch["label"].to(device, non_blocking=True)
    return out


def on_device(batches: Iterable[Mapping[str, Any]], device: torch.device | str, transform=None,
              channels_last: bool = False) -> Iterator[dict]:
    """Each batch dict with `image` and `label` on `device`, `image` passed through
    `transform(image, batch["augment_seed"])` when given (uint8 in, float out), in channels_last when asked.

    `transform` defaults to the loader's own `device_transform` (`bcc.stream` loaders carry theirs).
    With a CUDA device the copy of batch i + 1 is issued on a side stream before batch i is handed out,
    so it overlaps batch i's step when the loader pins its memory."""
    device = torch.device(device)
    if transform is None:
        transform = getattr(batches, "device_transform", None)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    it = iter(batches)
    try:
        ahead = next(it, None)
        ahead = None if ahead is None else _send(ahead, device, stream)
        while ahead is not None:
            batch = ahead
            following = next(it, None)
            if stream is not None:
                current = torch.cuda.current_stream(device)
                current.wait_stream(stream)  # the copy must be complete before the step reads it
                for t in (batch["image"], batch["label"]):
                    t.record_stream(current)  # its memory is the step's until the step is done with it
            ahead = None if following is None else _send(following, device, stream)
            image = batch["image"]
            if transform is not None:
                image = transform(image, batch.get("augment_seed"))
            batch["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
            yield batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # ends the loader's workers now when the caller stops early
