"""Export a checkpoint for inference outside bcc's training stack, and load it back.

`export_checkpoint(ckpt, out)` writes

    out/model.safetensors      the MultitaskNet state dict (backbone.*, heads.*)
    out/bcc_export.json        format, model (backbone, head sizes in order, head_hidden, head_dropout),
                               taxonomy (`Taxonomy.to_dict()`), preprocess (image_size, crop_pct, mean, std,
                               the EvalPreset recipe), temperatures (head -> T, or null), source checkpoint
    out/model.torchscript.pt   with `torchscript=True`, when `torch.jit.trace` works and reproduces the model
    out/model.onnx             with `onnx=True`, only when the `onnx` package is importable

and `load_exported(out)` gives the model back. It needs torch, torchvision, timm and safetensors only:
it imports `bcc.model`, `bcc.taxonomy` and `bcc.transforms`, never accelerate, webdataset, torchmetrics
or the training loop. Use it like this:

    from PIL import Image
    from bcc.export import load_exported

    model, taxonomy, preprocess = load_exported("export/")
    x = preprocess(Image.open("cell.jpg").convert("RGB"))[None]
    logits = model(x)                                   # one [1, K] tensor per head, in head order
    t = preprocess.temperatures                         # {head: T}, empty when uncalibrated
    probs = [(z / t.get(h, 1.0)).softmax(-1) for h, z in zip(taxonomy.head_names, logits)]
    answer = taxonomy.classes[int(taxonomy.decide(probs))].name
    # with an operating point (preprocess.threshold, else None) the root binary head says positive
    # when probs[0][:, 1] >= preprocess.threshold (bcc.metrics.decide(..., threshold=) does this)
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bcc.atomic import atomic_path, write_json
from bcc.errors import BccError

__all__ = ["EXPORT_FILE", "ExportError", "ExportResult", "Preprocess", "export_checkpoint", "load_exported"]

EXPORT_FORMAT = "bcc-export/1"
EXPORT_FILE = "bcc_export.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"


class ExportError(BccError):
    """An export that cannot be written, with a message for the user."""


class Preprocess:
    """PIL RGB image -> normalised float tensor [3, S, S], exactly bcc's evaluation transform.

    `temperatures` (head -> T) are the calibration stored with the export; divide a head's logits by
    its T before the softmax.
    """

    def __init__(self, image_size: int, crop_pct: float, mean, std, temperatures: dict[str, float] | None = None,
                 threshold: float | None = None):
        from bcc.transforms import EvalPreset

        self.image_size, self.crop_pct = int(image_size), float(crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)
        self.temperatures = dict(temperatures or {})
        self.threshold = threshold  # binary operating point on the temperature-scaled probabilities; None: argmax
        self._preset = EvalPreset(size=self.image_size, crop_pct=self.crop_pct, mean=self.mean, std=self.std)

    def __call__(self, image) -> torch.Tensor:
        return self._preset(image)

    def __repr__(self) -> str:
        return (f"Preprocess(image_size={self.image_size}, crop_pct={self.crop_pct}, mean={self.mean}, "
                f"std={self.std}, temperatures={self.temperatures})")


def load_exported(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, `Taxonomy`, `Preprocess`) of an export written by `export_checkpoint`."""
    from safetensors.torch import load_file

    from bcc.model import MultitaskNet, build_backbone
    from bcc.taxonomy import Taxonomy

    directory = Path(directory)
    info = json.loads((directory / EXPORT_FILE).read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory / EXPORT_FILE} is not a {EXPORT_FORMAT} export (format {info.get('format')!r})")
    m = info["model"]
    backbone, feature_dim = build_backbone(m["backbone"])
    heads = {h["name"]: int(h["num_classes"]) for h in m["heads"]}
    model = MultitaskNet(backbone, feature_dim, heads, hidden=m["head_hidden"], dropout=m["head_dropout"],
                         backbone_name=m["backbone"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device="cpu"))
    model.to(device).eval()
    p = info["preprocess"]
    point = info.get("operating_point") or {}
    preprocess = Preprocess(p["image_size"], p["crop_pct"], p["mean"], p["std"], info.get("temperatures"),
                            point.get("threshold"))
    return model, Taxonomy.from_dict(info["taxonomy"]), preprocess


# --------------------------------------------------------------------------- writing


@dataclass
class ExportResult:
    directory: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped and why


def export_info(im) -> dict[str, Any]:
    """The `bcc_export.json` content for an `InferenceModel`."""
    from bcc import __version__

    cfg = im.config
    d = cfg.data
    return {
        "format": EXPORT_FORMAT,
        "bcc_version": __version__,
        "source_checkpoint": str(im.checkpoint),
        "step": im.step,
        "model": {
            "backbone": cfg.model.backbone,
            "heads": [{"name": n, "num_classes": k} for n, k in im.taxonomy.head_sizes.items()],
            "head_hidden": cfg.model.head_hidden,
            "head_dropout": cfg.model.head_dropout,
            "output": "tuple of logits, one [N, num_classes] tensor per head, in head order",
        },
        "taxonomy": im.taxonomy.to_dict(),
        "preprocess": {
            "image_size": d.image_size,
            "crop_pct": d.crop_pct,
            "mean": list(d.mean),
            "std": list(d.std),
            "recipe": "RGB; resize the short side to int(image_size / crop_pct) (bilinear, antialias); centre "
                      "crop image_size; scale to [0, 1]; normalise with mean and std",
        },
        "temperatures": im.temperatures or None,
        # the root binary head says positive when its (temperature-scaled) probability >= threshold
        "operating_point": None if im.operating_point is None else {
            "rule": im.operating_point.get("rule"), "head": im.operating_point["head"],
            "positive_label": im.operating_point.get("positive_label"), "threshold": im.threshold},
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    torchscript: bool = False,
    onnx: bool = False,
    calibrated: bool = True,
) -> ExportResult:
    """Write the export of `checkpoint` (run dir, step dir, ...) into `out`; see the module docstring.
    Raises `ExportError` when `out` is not a directory and cannot be made one."""
    from safetensors.torch import save_file

    from bcc.predict import load_inference_model

    out = Path(out)
    if out.exists() and not out.is_dir():  # checked before the model is loaded: fail fast
        raise ExportError(f"--out {out} is a file, not a directory")
    im = load_inference_model(checkpoint, device="cpu", calibrated=calibrated)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the export directory {out}: {e.strerror or e}") from e
    result = ExportResult(out)
    state = {k: v.detach().cpu().contiguous() for k, v in im.model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:  # 0644: an export is meant to be shared
        save_file(state, str(tmp), metadata={"format": "pt"})
    result.files.append(out / WEIGHTS_FILE)
    info = export_info(im)
    write_json(out / EXPORT_FILE, info)
    result.files.append(out / EXPORT_FILE)

    example = torch.randn(2, 3, im.image_size, im.image_size)
    if torchscript:
        _export_torchscript(im.model, example, out / TORCHSCRIPT_FILE, result)
    if onnx:
        _export_onnx(im.model, example, out / ONNX_FILE, im.taxonomy.head_names, result)
    return result


def _export_torchscript(model, example, path: Path, result: ExportResult) -> None:
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what works offline
            traced = torch.jit.trace(model, example, check_trace=False)
            with atomic_path(path) as tmp:
                torch.jit.save(traced, str(tmp))
            # a traced model silently bakes in data-dependent control flow: check it on another input
            probe = torch.randn_like(example)
            reloaded = torch.jit.load(str(path))
            same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                       for a, b in zip(model(probe), reloaded(probe), strict=True))
    except Exception as e:  # noqa: BLE001 - tracing is optional; say why it was skipped
        path.unlink(missing_ok=True)
        result.notes.append(f"TorchScript skipped: torch.jit.trace failed ({type(e).__name__}: {e})")
        return
    if not same:
        path.unlink(missing_ok=True)
        result.notes.append("TorchScript skipped: the traced model's outputs differ from the model's")
        return
    result.files.append(path)


def _export_onnx(model, example, path: Path, head_names, result: ExportResult) -> None:
    if importlib.util.find_spec("onnx") is None:
        result.notes.append("ONNX skipped: the onnx package is not installed (pip install onnx)")
        return
    try:
        with atomic_path(path) as tmp:
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=list(head_names),
                              dynamic_axes={"image": {0: "batch"}, **{h: {0: "batch"} for h in head_names}})
    except Exception as e:  # noqa: BLE001 - optional format
        result.notes.append(f"ONNX skipped: export failed ({type(e).__name__}: {e})")
        return
    result.files.append(path)
