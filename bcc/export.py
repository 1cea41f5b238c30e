"""Export a checkpoint for inference outside bcc's training stack, and load it back.

Two formats; `export_checkpoint(ckpt, out, format=...)` writes either, `load_export_model` loads either
(or `hf-hub:org/name[@revision]`) as an `InferenceModel`. `format="hf"` (`bcc export --format hf`), a
folder for the Hugging Face Hub with its key layout, download and push, is owned by `bcc.export_hf`.
This module owns the bcc format, TorchScript/ONNX and the dispatch between the two.

`format="bcc"` (the default), `export_checkpoint(ckpt, out)` writes

    out/model.safetensors      the MultitaskNet state dict (backbone.*, heads.*)
    out/bcc_export.json        format, model (backbone, head sizes in order, head_hidden, head_dropout),
                               taxonomy (`Taxonomy.to_dict()`), preprocess (image_size, crop_pct, mean, std,
                               the EvalPreset recipe), temperatures (head -> T, or null), the operating
                               point, source checkpoint, weights (raw|ema), trained_on (the run's data
                               config and dataset fingerprint: `training_data`). The temperatures and the point
                               are those fitted on the exported weights: training fits the EMA weights'
                               own (stored under `ema` beside the raw ones); an EMA export of a checkpoint
                               calibrated on its raw weights only is refused (`auto` then takes the raw)
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

__all__ = [
    "EXPORT_FILE",
    "FORMATS",
    "WEIGHT_CHOICES",
    "ExportError",
    "ExportResult",
    "Preprocess",
    "export_checkpoint",
    "is_export_dir",
    "load_export_model",
    "load_exported",
]

EXPORT_FORMAT = "bcc-export/1"
EXPORT_FILE = "bcc_export.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
FORMATS = ("bcc", "hf")
WEIGHT_CHOICES = ("auto", "raw", "ema")  # auto: the EMA weights when the checkpoint has them


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
        "trained_on": training_data(im),
        # the root binary head says positive when its (temperature-scaled) probability >= threshold
        "operating_point": None if im.operating_point is None else {
            "rule": im.operating_point.get("rule"), "head": im.operating_point["head"],
            "positive_label": im.operating_point.get("positive_label"), "threshold": im.threshold},
    }


def training_data(im) -> dict[str, Any]:
    """What a bcc export records of the data its weights were trained on (`trained_on` in
    bcc_export.json): {"config": {"data": the run's data section}, "dataset": the manifest fingerprint
    its checkpoint's meta holds (None when it holds none)}, so `model.pretrained` pointing at the export
    can be checked against the images a later run evaluates (`bcc.pretrained_overlap.check_pretrained`)."""
    from bcc.checkpoint import read_meta
    from bcc.config import config_to_dict

    try:
        dataset = read_meta(im.checkpoint).get("dataset")
    except BccError:
        dataset = None
    return {"config": {"data": config_to_dict(im.config)["data"]}, "dataset": dataset}


def read_training_data(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training-data record of the bcc export at `directory` in the form of a checkpoint's meta
    ({"config": {"data": ...}, "dataset": ...}): its own `trained_on`, else (an export of an older bcc)
    the meta of its `source_checkpoint` while that checkpoint is still there; None when neither is."""
    from bcc.checkpoint import META_FILE

    try:
        info = json.loads((Path(directory) / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if isinstance(info.get("trained_on"), dict) and isinstance(info["trained_on"].get("config"), dict):
        return info["trained_on"]
    meta = Path(str(info.get("source_checkpoint") or "")) / META_FILE
    try:
        found = json.loads(meta.read_text(encoding="utf-8")) if info.get("source_checkpoint") else None
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "config" in found else None


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "bcc",  # noqa: A002 - the CLI's --format
    weights: str = "auto",
    license: str | None = None,  # noqa: A002 - the card's license field
    torchscript: bool = False,
    onnx: bool = False,
    calibrated: bool = True,
) -> ExportResult:
    """Write the export of `checkpoint` (run dir, step dir, ...) into `out`; see the module docstring.

    `format` "bcc" or "hf"; `weights` "raw", "ema" or "auto" (EMA when the checkpoint has
    `model_ema.safetensors`); `license` a Hub license id for the card (hf only; default "other").
    Raises `ExportError` for a bad option, EMA asked of a checkpoint without it, or an `out` that is not
    a directory and cannot be made one."""
    from safetensors.torch import save_file

    from bcc.export_hf import check_license, write_hf
    from bcc.predict import load_inference_model

    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    if format == "hf":
        if torchscript or onnx:
            raise ExportError("--torchscript and --onnx belong to --format bcc; a Hub export holds safetensors only")
        license = check_license(license or "other")
    elif license is not None:
        raise ExportError("--license is for the model card of --format hf")
    out = Path(out)
    if out.exists() and not out.is_dir():  # checked before the model is loaded: fail fast
        raise ExportError(f"--out {out} is a file, not a directory")
    if out.is_dir():  # an earlier export is replaced; anything else there would be shared or pushed with it
        from bcc.export_hf import HF_FILES

        ours = {EXPORT_FILE, WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILE, *HF_FILES}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise ExportError(f"--out {out} holds files that are not an export ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new directory")
    im = load_inference_model(checkpoint, device="cpu", calibrated=calibrated, weights=weights)
    kind = im.weights
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the export directory {out}: {e.strerror or e}") from e
    result = ExportResult(out)
    state = {k: v.detach().cpu().contiguous() for k, v in im.model.state_dict().items()}
    if format == "hf":
        write_hf(im, state, kind, license, out, result)
        return result
    with atomic_path(out / WEIGHTS_FILE) as tmp:  # 0644: an export is meant to be shared
        save_file(state, str(tmp), metadata={"format": "pt"})
    result.files.append(out / WEIGHTS_FILE)
    info = {**export_info(im), "weights": kind}
    write_json(out / EXPORT_FILE, info)
    result.files.append(out / EXPORT_FILE)

    example = torch.randn(2, 3, im.image_size, im.image_size)
    if torchscript:
        _export_torchscript(im.model, example, out / TORCHSCRIPT_FILE, result)
    if onnx:
        _export_onnx(im.model, example, out / ONNX_FILE, im.taxonomy.head_names, result)
    return result


def choose_weights(im, weights: str, *, calibrated: bool = True, operating_point: bool = True) -> str:
    """The one decision of `--weights raw|ema|auto` (`bcc export`, `bcc eval`, `bcc predict`, all through
    `bcc.predict.load_inference_model`): load the EMA weights into `im.model` when chosen, with the
    temperatures and operating point training fitted on them; returns "raw" or "ema".

    auto: EMA when the checkpoint has `model_ema.safetensors` and its calibration (if any) has the EMA's
    own fit, else raw (said in a note); a raw-only fit does not matter when neither the temperatures
    (`calibrated`) nor the operating point are used. Raises `ExportError` naming the checkpoint when
    `ema` cannot be honoured."""
    from bcc.checkpoint import EMA_FILE, load_ema_weights

    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    if weights == "raw":
        return "raw"
    path = im.checkpoint / EMA_FILE
    ema = load_ema_weights(im.checkpoint)  # checked against hashes.json like the raw weights
    if ema is None:
        if weights == "auto":
            return "raw"
        raise ExportError(f"--weights ema: checkpoint {im.checkpoint} holds no EMA weights ({EMA_FILE}; the run "
                          "trains them with train.ema_decay)")
    fitted = ema_calibration(im.checkpoint) if (calibrated or operating_point) else (None, None)
    if fitted is None:  # temperatures / operating point fitted on the raw weights only (e.g. by bcc calibrate)
        why = (f"the temperatures and operating point of checkpoint {im.checkpoint} were fitted on its raw "
               "weights, not on the EMA weights")
        if weights == "ema":
            raise ExportError(f"--weights ema: {why}; use --weights raw, or the EMA weights uncalibrated at argmax "
                              "(eval/predict --no-calibration --argmax; export: drop temperature.json and "
                              "operating_point.json)")
        from bcc.console import console

        console.print(f"[yellow]note:[/] using the raw weights: {why}")
        return "raw"
    own = im.model.state_dict()
    # a BatchNorm step counter is not a weight: take the raw model's where the EMA has none
    ema = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **ema}
    missing = [k for k in own if k not in ema]
    bad = [k for k in own if k in ema and ema[k].shape != own[k].shape]
    if missing or bad or set(ema) - set(own):
        raise ExportError(f"{path} does not fit the model of the checkpoint: {len(missing)} missing {missing[:3]}, "
                          f"{len(bad)} of another shape {bad[:3]}, {len(set(ema) - set(own))} unexpected")
    im.model.load_state_dict(ema)
    temps, point = fitted  # what training fitted on the EMA weights: the export ships those
    im.stored_temperatures = temps
    im.temperatures = dict(temps) if (im.temperatures and temps) else {}
    im.operating_point = point if operating_point else None
    return "ema"


def ema_calibration(checkpoint: Path) -> tuple[dict[str, float] | None, dict | None] | None:
    """The EMA weights' own (temperatures, operating point) stored by training under `ema` in the
    checkpoint's temperature.json / operating_point.json ((None, None) when neither file exists), or
    None when a file holds a fit of the raw weights only."""
    from bcc.calibration import TEMPERATURE_FILE
    from bcc.operating_point import stored_points

    path = Path(checkpoint) / TEMPERATURE_FILE
    temps = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot read {path}: {e}") from e
        if not isinstance(stored, dict) or "ema" not in stored:
            return None
        temps = (stored["ema"] or {}).get("temperatures") or None
    points = stored_points(checkpoint)  # the one reader of operating_point.json
    if points is not None and "ema" not in points:
        return None
    return ({k: float(v) for k, v in temps.items()} if temps else None), (points or {}).get("ema")


# --------------------------------------------------------------------------- loading either format


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `bcc export` (either format), as opposed to a run or checkpoint."""
    from bcc.export_hf import HF_CONFIG_FILE

    path = Path(path)
    return path.is_dir() and ((path / EXPORT_FILE).is_file() or (
        (path / HF_CONFIG_FILE).is_file() and not (path / "meta.json").is_file()
        and not (path / "checkpoints").is_dir()))


def load_export_model(path: str | os.PathLike, *, device=None, calibrated: bool = True,
                      operating_point: bool = True):
    """An `InferenceModel` from an export folder (either format) or `hf-hub:org/name[@revision]`.

    Gives the same probabilities as the checkpoint it was exported from. The config holds only what the
    export records (model and preprocessing); `checkpoint` is the export folder."""
    from safetensors.torch import load_file

    from bcc.config import config_from_dict
    from bcc.export_hf import HUB_PREFIX, download_export, from_hub_layout, read_hf_config
    from bcc.model import MultitaskNet, build_backbone
    from bcc.predict import InferenceModel
    from bcc.taxonomy import Taxonomy
    from bcc.transforms import EvalPreset

    if str(path).startswith(HUB_PREFIX):
        path = download_export(str(path))
    directory = Path(path)
    if (directory / EXPORT_FILE).is_file():
        info = json.loads((directory / EXPORT_FILE).read_text())
        if info.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{directory / EXPORT_FILE} is not a {EXPORT_FORMAT} export "
                              f"(format {info.get('format')!r})")
        m = info["model"]
        backbone, hidden, dropout = m["backbone"], m["head_hidden"], m["head_dropout"]
        to_model = dict  # the bcc format keeps the model's own keys
    else:
        info = read_hf_config(directory)
        backbone, hidden, dropout = info["backbone"], info["head_hidden"], info["head_dropout"]
        to_model = from_hub_layout
    taxonomy = Taxonomy.from_dict(info["taxonomy"])
    net, feature_dim = build_backbone(backbone)
    model = MultitaskNet(net, feature_dim, taxonomy.head_sizes, hidden=hidden, dropout=dropout, backbone_name=backbone)
    weights = directory / WEIGHTS_FILE
    try:
        state = to_model(load_file(str(weights), device="cpu"))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
        raise ExportError(f"cannot load {weights}: {type(e).__name__}: {e}") from None
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ExportError(f"{weights} does not fit backbone {backbone} with heads {dict(taxonomy.head_sizes)}: "
                          f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                          f"{len(shapes)} of another shape {shapes[:3]}")
    model.load_state_dict(state)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    p = info["preprocess"]
    cfg = config_from_dict({"model": {"backbone": backbone, "head_hidden": hidden, "head_dropout": dropout},
                            "data": {"image_size": p["image_size"], "crop_pct": p["crop_pct"],
                                     "mean": list(p["mean"]), "std": list(p["std"])}})
    stored = info.get("temperatures") or None
    point = info.get("operating_point") if operating_point else None
    if point is not None and "margin" not in point:  # a bcc-format export keeps the threshold of its temperatures
        from bcc.operating_point import _logit

        t = (stored or {}).get(point["head"], 1.0)
        point = {**point, "margin": t * _logit(float(point["threshold"]))}
    return InferenceModel(
        model=model, taxonomy=taxonomy,
        preprocess=EvalPreset(size=p["image_size"], crop_pct=p["crop_pct"], mean=p["mean"], std=p["std"]),
        config=cfg, checkpoint=directory.resolve(), step=int(info.get("step") or 0), device=device,
        temperatures=dict(stored) if (calibrated and stored) else {}, stored_temperatures=stored,
        operating_point=point, weights=info.get("weights") or "raw",
    )


# --------------------------------------------------------------------------- TorchScript and ONNX (--format bcc)


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
