"""Grad-CAM (Selvaraju et al. 2017) for every head of a `MultitaskNet`, and overlays on the original image.

The target layer is found, not configured: a probe forward pass records every backbone module whose
output is a 4-D feature map, and the last one that is not a pooling layer (nor a container whose output
is a pooling layer's) is taken: for vgg16_bn the
last ReLU of `features` (before the final max-pool), for timm CNNs the last stage (`layer4`,
`stages.3`, `bn2`, ...), i.e. what `forward_features` returns. If that map is 1x1 (a small input
through a deep network) the last map larger than 1x1 is taken instead, since a single cell cannot say
where the model looked. Backbones without any 4-D map (vision transformers) are refused.

For each head the map is ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c, where the
score is the logit of that head's predicted class; it is scaled to [0, 1] per image. Temperature scaling
divides a logit by a constant, so it does not change the normalised map.

`save_overlays` writes one PNG per head, `<stem>.<head>.png`, of the original image's size: the map
covers the centre crop the model saw (`EvalPreset`: short side resized to size / crop_pct, then centre
crop); outside that crop the image is shown dimmed. `input_stems_in` keeps them out of the images they
explain: never in an input folder, never over an input file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcc.atomic import atomic_path

__all__ = ["GradCAM", "crop_box", "find_target_layer", "input_stems_in", "overlay", "save_overlays"]


def _is_pooling(module: nn.Module) -> bool:
    # torch's MaxPool2d/AdaptiveAvgPool2d/..., timm's SelectAdaptivePool2d: all say so in their name
    return "pool" in type(module).__name__.lower()


def find_target_layer(model: nn.Module, image_size: int) -> str:
    """Name (in `model.named_modules()`) of the module whose output Grad-CAM uses; see the module docstring."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    fired: list[tuple[str, Tensor, bool]] = []  # (name, output, is pooling) in execution order
    hooks = []
    for name, module in backbone.named_modules():
        if not name:
            continue

        def record(mod, inputs, output, name=name):
            if isinstance(output, Tensor) and output.dim() == 4:
                fired.append((name, output, _is_pooling(mod)))

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # a container whose output is a pooling layer's output (vgg's `features` ends in a max-pool) is no
    # candidate either; the outputs are still referenced by `fired`, so ids cannot be reused here
    pooled = {id(out) for _, out, pooling in fired if pooling}
    seen = [(name, tuple(out.shape[-2:])) for name, out, pooling in fired if not pooling and id(out) not in pooled]
    if not seen:
        raise ValueError(
            f"Grad-CAM needs a convolutional feature map, but no module of backbone "
            f"{getattr(model, 'backbone_name', type(backbone).__name__)} outputs a 4-D tensor"
        )
    name, (h, w) = seen[-1]
    if h * w == 1:
        larger = [n for n, (hh, ww) in seen if hh * ww > 1]
        if larger:
            name = larger[-1]
    return prefix + name


class GradCAM:
    """`GradCAM(model, image_size=S)(x)` -> {head: FloatTensor[N, h, w] in [0, 1]} for a normalised batch.

    Each head's map explains its predicted class, or the class given in `classes` (head -> LongTensor[N]),
    e.g. the decision after test-time augmentation.
    """

    def __init__(self, model: nn.Module, *, image_size: int, target: str | None = None):
        self.model = model
        self.target_name = target or find_target_layer(model, image_size)
        self.target = model.get_submodule(self.target_name)

    def __call__(self, x: Tensor, classes: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        captured: list[Tensor] = []
        handle = self.target.register_forward_hook(lambda m, i, o: captured.append(o))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                # the input requires grad so the graph exists even if every parameter is frozen
                logits = self.model(x.detach().requires_grad_(True))
                acts = captured[-1]
                names = list(getattr(self.model, "head_names", range(len(logits))))
                maps = {}
                for k, (name, z) in enumerate(zip(names, logits, strict=True)):
                    # samples are independent in eval mode, so the gradient of the summed scores is
                    # every sample's own gradient
                    target = classes[str(name)] if classes is not None else z.argmax(dim=1)
                    score = z.gather(1, target.to(z.device).view(-1, 1)).sum()
                    (grad,) = torch.autograd.grad(score, acts, retain_graph=k < len(logits) - 1)
                    weights = grad.mean(dim=(2, 3), keepdim=True)
                    cam = F.relu((weights * acts).sum(dim=1)).detach().float()
                    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
                    maps[str(name)] = (cam / peak[:, None, None]).cpu()
        finally:
            handle.remove()
            self.model.train(was_training)
        return maps


def crop_box(width: int, height: int, image_size: int, crop_pct: float = 1.0) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the original image that `EvalPreset` turns into the model input."""
    short = min(width, height)
    resized_short = int(image_size / crop_pct)  # torchvision Resize(int) sets the short side to this
    side = image_size * short / resized_short  # the centre crop, in original pixels
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def overlay(image, cam: Tensor, *, image_size: int, crop_pct: float = 1.0, alpha: float = 0.45):
    """The RGB PIL `image` with the [h, w] map `cam` (values in [0, 1]) drawn over the region the model
    saw, as a 'jet' heat map; the result has the image's size."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    width, height = image.size
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    left, top, right, bottom = crop_box(width, height, image_size, crop_pct)
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(right)), min(height, round(bottom))
    heat = F.interpolate(cam[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
    heat = heat[0, 0].clamp(0, 1).numpy()
    out = rgb * 0.5  # outside the crop: dimmed, the model never saw it
    colour = colormaps["jet"](heat)[..., :3].astype(np.float32)
    out[y0:y1, x0:x1] = (1 - alpha) * rgb[y0:y1, x0:x1] + alpha * colour
    return Image.fromarray((out.clip(0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def save_overlays(
    image,
    maps: Mapping[str, Tensor],
    out_dir: str | Path,
    stem: str,
    *,
    image_size: int,
    crop_pct: float = 1.0,
    labels: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write `<out_dir>/<stem>.<head>.png` for every head's map (written to a temp name, then renamed).

    `labels` (head -> predicted label) goes into the PNG's text metadata, so a file says what it explains.
    """
    from PIL.PngImagePlugin import PngInfo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for head, cam in maps.items():
        path = out_dir / f"{stem}.{head}.png"
        info = PngInfo()
        info.add_text("head", head)
        if labels and head in labels:
            info.add_text("predicted", labels[head])
        with atomic_path(path) as tmp:
            overlay(image, cam, image_size=image_size, crop_pct=crop_pct).save(tmp, format="PNG", pnginfo=info)
        written.append(path)
    return written


def input_stems_in(out_dir: str | Path, inputs: Iterable[str | Path], files: Iterable[str | Path],
                   heads: Iterable[str]) -> set[str]:
    """The stems whose overlays `<out_dir>/<stem>.<head>.png` would replace one of the input `files`
    (given there, or a link to one there): the caller names its overlays otherwise.

    Raises `UsageError` when `out_dir` is one of the `inputs` that are folders or lies inside one (paths
    resolved): the overlays would sit among the images, and be read as images by the next `bcc predict`
    or `bcc pack` of that folder."""
    from bcc.errors import UsageError

    out = Path(out_dir).resolve()
    for folder in map(Path, inputs):
        root = folder.resolve() if folder.is_dir() else None
        if root is not None and (out == root or root in out.parents):
            raise UsageError(f"--gradcam {out_dir}: {'is' if out == root else 'lies inside'} the input folder "
                             f"{folder}; the overlays would be mixed with its images (and read as images next "
                             "time): give a folder outside the inputs")
    suffixes = [f".{head}.png" for head in heads]
    taken = set()
    for file in map(Path, files):
        for real in (file.parent.resolve() / file.name, file.resolve()):
            taken.update(real.name[:-len(end)] for end in suffixes if real.parent == out and real.name.endswith(end))
    return taken
