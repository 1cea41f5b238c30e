"""Inference from a checkpoint: load the model once, predict images, explain the hierarchical answer.

`load_inference_model(path)` turns a run dir, checkpoints dir, step dir, `best`/`last` link, export folder
(`bcc export`, either format) or `hf-hub:OWNER/NAME` into an
`InferenceModel`: the `MultitaskNet` in eval mode with the checkpoint's weights, its taxonomy, the eval
preprocessing of its config and, unless disabled, the temperatures stored next to it by
`bcc calibrate` (`<checkpoint>/temperature.json`). Only `meta.json` and `model.safetensors` are read:
the optimizer state (as large as the model again) is never loaded.

`predict_paths` answers for image files (directories are searched recursively): per image the
hierarchical decision (`Taxonomy.decide`: `Benign`, or `Malignant: Pro-B`, the subtype named only when
the binary head says malignant), the probabilities of every head, and optionally Grad-CAM overlays.
An unreadable file is reported by name and the others continue.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bcc.atomic import atomic_write, write_json
from bcc.calibration import TEMPERATURE_FILE, TEMPERATURE_FORMAT, write_temperatures  # noqa: F401 (re-exported)
from bcc.checkpoint import (
    CheckpointError,
    load_model_weights,
    read_meta,
    read_train_state,
    resolve_checkpoint,
)
from bcc.imageio import collect_images, decode_rgb, display_path
from bcc.taxonomy import Taxonomy, TaxonomyError

__all__ = [
    "TEMPERATURE_FILE",
    "InferenceModel",
    "Prediction",
    "TaxonomyMismatchError",
    "answer_text",
    "check_taxonomy",
    "decide",
    "load_inference_model",
    "predict_paths",
    "read_image",
    "read_temperatures",
    "prob_columns",
    "write_predictions_csv",
    "write_predictions_json",
    "write_probability_csv",
    "write_temperatures",
]



class TaxonomyMismatchError(TaxonomyError):
    """A checkpoint used with data labelled by another taxonomy."""


# --------------------------------------------------------------------------- taxonomy checks


def _label_structure(t: Taxonomy) -> tuple:
    """What fixes the meaning of every output and label index: heads and classes, not aliases or name."""
    heads = tuple((h.name, h.labels, h.when) for h in t.heads)
    return heads, tuple((c.name, c.targets) for c in t.classes)


def describe_taxonomy(t: Taxonomy) -> str:
    heads = "; ".join(f"{h.name} [{', '.join(h.labels)}]" for h in t.heads)
    return f"{t.name!r} (heads {heads}; classes {', '.join(t.class_names)})"


def check_taxonomy(model_taxonomy: Taxonomy, data_taxonomy: Taxonomy, model_label: str, data_label: str) -> None:
    """Raise `TaxonomyMismatchError` naming both when the data's labels mean something else than the
    model's outputs (heads, their labels and the leaf classes must agree; aliases may differ)."""
    if _label_structure(model_taxonomy) != _label_structure(data_taxonomy):
        raise TaxonomyMismatchError(
            f"taxonomy mismatch: {model_label} was trained for taxonomy {describe_taxonomy(model_taxonomy)}, "
            f"but {data_label} uses taxonomy {describe_taxonomy(data_taxonomy)}"
        )


# --------------------------------------------------------------------------- temperatures


def read_temperatures(checkpoint_dir: str | Path, head_names: Sequence[str] | None = None) -> dict[str, float] | None:
    """Per-head temperatures stored with a checkpoint by `bcc calibrate`, or None when there are none."""
    path = Path(checkpoint_dir) / TEMPERATURE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        temps = {str(k): float(v) for k, v in data["temperatures"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read temperatures from {path}: {type(e).__name__}: {e}") from e
    bad = {k: v for k, v in temps.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise CheckpointError(f"{path}: temperatures must be finite and > 0, got {bad}")
    if head_names is not None and set(temps) != set(head_names):
        raise CheckpointError(f"{path}: temperatures are for heads {sorted(temps)}, the model has {list(head_names)}")
    return temps


# --------------------------------------------------------------------------- the loaded model


@dataclass
class InferenceModel:
    """A checkpoint ready for inference. `temperatures` is empty when uncalibrated (or disabled)."""

    model: torch.nn.Module
    taxonomy: Taxonomy
    preprocess: Any  # bcc.transforms.EvalPreset: PIL image -> normalised [3, S, S] tensor
    config: Any  # the run's resolved bcc.config.Config
    checkpoint: Path  # the resolved checkpoint directory
    step: int
    device: torch.device
    temperatures: dict[str, float] = field(default_factory=dict)
    stored_temperatures: dict[str, float] | None = None  # what the checkpoint has, used or not
    # `operating_point.json` of the checkpoint (`bcc.operating_point`), None for the argmax decision
    operating_point: dict[str, Any] | None = None
    weights: str = "raw"  # "raw" or "ema" (`model_ema.safetensors`): which weights `model` holds

    @property
    def threshold(self) -> float | None:
        """The operating point on the probabilities this model reports (after the temperatures in use),
        or None for argmax. The same decision whatever the temperatures (`threshold_for`)."""
        if self.operating_point is None:
            return None
        from bcc.operating_point import threshold_for

        return threshold_for(self.operating_point, self.temperatures.get(self.operating_point["head"], 1.0))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def crop(self):
        """`bcc.transforms.EvalCrop` of the run: PIL image -> uint8 [3, S, S], what eval loaders make."""
        from bcc.transforms import EvalCrop

        return EvalCrop(size=self.image_size, crop_pct=self.config.data.crop_pct)

    def inputs(self, images: Tensor) -> Tensor:
        """The model's input for a batch on its device: uint8 crops [N, 3, S, S] are normalised there
        (`bcc.device_aug.normalize`, as training and evaluation do); float batches are taken as normalised."""
        from bcc.device_aug import normalize

        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize(x, self.config.data.mean, self.config.data.std)
        return x

    @property
    def run_dir(self) -> Path | None:
        """`RUN` when the checkpoint is `RUN/checkpoints/<step>` of a run with a config.yaml."""
        parent = self.checkpoint.parent
        if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
            return parent.parent
        return None

    def scale(self, logits: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Logits divided by the temperatures in use (unchanged when uncalibrated)."""
        if not self.temperatures:
            return tuple(logits)
        from bcc.calibration import apply_temperature

        return apply_temperature(logits, self.temperatures, self.taxonomy.head_names)

    @torch.no_grad()
    def head_probs(self, images: Tensor, tta: bool = False) -> list[Tensor]:
        """Softmax of every head (after temperature scaling), [N, K_h] each, for a batch of uint8 crops
        or normalised images (`inputs`).

        With `tta` the probabilities are averaged over the identity, horizontal, vertical and both flips
        (blood smears have no canonical orientation, which is why training flips them too).
        """
        x = self.inputs(images)
        views = [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)] if tta else [x]
        logits = self.model(torch.cat(views))
        n = x.shape[0]
        out = []
        for z in self.scale(logits):
            p = torch.softmax(z.float(), dim=-1)
            out.append(p.reshape(len(views), n, -1).mean(dim=0))
        return out


def load_inference_model(
    path: str | Path, *, device: str | torch.device | None = None, calibrated: bool = True,
    operating_point: bool = True, weights: str | None = None,
) -> InferenceModel:
    """Load a checkpoint for inference (see the module docstring for what `path` may be).

    `path` may also be a folder written by `bcc export` (either format) or `hf-hub:OWNER/NAME[@REVISION]`
    (downloaded first): `bcc.export.load_export_model` loads those.
    `calibrated=False` ignores stored temperatures, `operating_point=False` a stored operating point
    (the binary decision is then the argmax). `weights` "raw", "ema" or "auto" (the `--weights` of
    `bcc export`, `bcc eval` and `bcc predict`, decided by `bcc.export.choose_weights`: the EMA weights
    come with the temperatures and operating point fitted on them); None (the default): a checkpoint's
    raw weights, or whatever an export holds. `InferenceModel.weights` says which. An export holds one
    kind: asking it for the other is an `ExportError`."""
    from bcc.config import ConfigError, config_from_dict
    from bcc.export import ExportError, choose_weights, is_export_dir, load_export_model
    from bcc.export_hf import HUB_PREFIX
    from bcc.model import build_model
    from bcc.transforms import EvalPreset

    if str(path).startswith(HUB_PREFIX) or is_export_dir(path):
        im = load_export_model(path, device=device, calibrated=calibrated, operating_point=operating_point)
        if weights not in (None, "auto", im.weights):
            raise ExportError(f"--weights {weights}: the export {path} holds the {im.weights} weights only")
        return im
    ckpt = resolve_checkpoint(path, prefer="best")
    meta = read_meta(ckpt)
    if not isinstance(meta, dict) or "taxonomy" not in meta or "config" not in meta:
        raise CheckpointError(f"{ckpt / 'meta.json'} lacks the taxonomy or config of the run")
    try:
        taxonomy = Taxonomy.from_dict(meta["taxonomy"])
        cfg = config_from_dict(meta["config"])
    except (TaxonomyError, ConfigError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: {e}") from e
    # the weights come from the checkpoint: never read (or download) the pretrained file again
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), taxonomy.head_sizes)
    state = load_model_weights(ckpt)  # checked against the checkpoint's hashes.json (when it has one)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"weights in {ckpt} do not fit the model of its meta.json (backbone {cfg.model.backbone}, heads "
            f"{dict(taxonomy.head_sizes)}): {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]}"
        )
    model.load_state_dict(state)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    stored = read_temperatures(ckpt, taxonomy.head_names)
    from bcc.operating_point import read_operating_point

    point = read_operating_point(ckpt, taxonomy) if operating_point else None
    d = cfg.data
    im = InferenceModel(
        model=model,
        taxonomy=taxonomy,
        preprocess=EvalPreset(size=d.image_size, crop_pct=d.crop_pct, mean=d.mean, std=d.std),
        config=cfg,
        checkpoint=ckpt.resolve(),
        step=read_train_state(ckpt).step,
        device=device,
        temperatures=dict(stored) if (calibrated and stored) else {},
        stored_temperatures=stored,
        operating_point=point,
    )
    im.weights = choose_weights(im, weights or "raw", calibrated=calibrated, operating_point=operating_point)
    return im


# --------------------------------------------------------------------------- decisions


def decide(taxonomy: Taxonomy, probs: Sequence[Tensor], threshold: float | None = None) -> Tensor:
    """Leaf class index [N] of the hierarchical decision for per-head probabilities (`bcc.metrics.decide`,
    with its fallback to the most probable leaf, and the binary operating point `threshold`)."""
    from bcc.metrics import decide as decide_logits

    # log-probabilities are valid logits: combined_probs takes log_softmax, which leaves them as they are
    return decide_logits(taxonomy, [p.clamp_min(1e-12).log() for p in probs], threshold=threshold)


def answer_text(taxonomy: Taxonomy, class_index: int) -> str:
    """The hierarchical answer for a leaf class: the labels of the heads that apply, root first.

    Default taxonomy: `Benign`, `Malignant: Pro-B` (the subtype head only applies to malignant cells).
    """
    return ": ".join(label for _, label in taxonomy.classes[class_index].targets)


# --------------------------------------------------------------------------- images


def read_image(path: str | Path):
    """A fully decoded RGB PIL image (`bcc.imageio.decode_rgb`: the reader of every command); any
    failure is an `ImageError` (an OSError) with a one-line reason naming the file."""
    return decode_rgb(path)


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    path: str
    answer: str  # e.g. "Malignant: Pro-B"
    class_name: str  # leaf class of the decision
    # label of every head (also of heads that do not apply): the argmax, the binary head's at the operating point
    head_labels: dict[str, str]
    head_probs: dict[str, dict[str, float]]  # head -> label -> probability
    class_probs: dict[str, float]  # leaf class -> combined hierarchical probability
    gradcam: list[str] = field(default_factory=list)
    # the decision at argmax (every head's most probable label): `answer`/`class_name` unless an operating
    # point moved the binary head's threshold
    answer_argmax: str = ""
    class_argmax: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PredictResult:
    predictions: list[Prediction]
    failures: list[tuple[str, str]]  # (path, reason)
    calibrated: bool
    tta: bool
    threshold: float | None = None  # the binary operating point used (None: argmax)


def predict_paths(
    im: InferenceModel,
    paths: Iterable[str | Path],
    *,
    tta: bool = False,
    batch_size: int = 16,
    gradcam_dir: str | Path | None = None,
    on_prediction=None,
) -> PredictResult:
    """Predict every image under `paths`; see the module docstring. `on_prediction(pred)` is called as
    each answer is ready. Grad-CAM (when `gradcam_dir` is given) is computed on the un-flipped image, for
    the class each head predicts (after test-time augmentation, when on); a `gradcam_dir` in an input
    folder is a `UsageError`, and an overlay that would replace an input file is named `<stem>-2...`."""
    from bcc.metrics import combined_probs

    paths = list(paths)
    files, problems = collect_images(paths)
    # every name this returns is printable (`display_path`): a name that is not UTF-8 is no text to print
    failures = [(display_path(f), display_path(reason)) for f, reason in problems]
    cam, taxonomy = None, im.taxonomy
    used_names: set[str] = set()  # overlay stems in use: an input file's among them, so it is never replaced
    if gradcam_dir is not None:
        from bcc.gradcam import GradCAM, input_stems_in

        used_names |= input_stems_in(gradcam_dir, paths, files, taxonomy.head_names)  # or UsageError
        cam = GradCAM(im.model, image_size=im.image_size)
        gradcam_dir = Path(gradcam_dir)
        gradcam_dir.mkdir(parents=True, exist_ok=True)
    predictions: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        batch_paths, originals, tensors = [], [], []
        for path in files[start:start + batch_size]:
            try:
                img = read_image(path)
                tensors.append(im.crop(img))  # uint8; normalised on the device as in bcc eval
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                failures.append((display_path(path), display_path(str(e) if isinstance(e, OSError)
                                                                  else f"{type(e).__name__}: {e}")))
                continue
            batch_paths.append(path)
            originals.append(img)
        if not tensors:
            continue
        x = torch.stack(tensors)
        probs = [p.cpu() for p in im.head_probs(x, tta=tta)]
        decided = decide(taxonomy, probs, im.threshold)
        argmax = decide(taxonomy, probs, None) if im.threshold is not None else decided
        combined = combined_probs(taxonomy, [p.clamp_min(1e-12).log() for p in probs])
        classes = {h: p.argmax(dim=1) for h, p in zip(taxonomy.head_names, probs, strict=True)}
        if im.threshold is not None:  # the binary head's label is the one the decision used
            from bcc.operating_point import binary_head

            name = binary_head(taxonomy)[1]
            classes[name] = (probs[taxonomy.head_names.index(name)][:, 1] >= im.threshold).long()
        maps = cam(im.inputs(x), classes) if cam is not None else None
        for i, path in enumerate(batch_paths):
            c = int(decided[i])
            pred = Prediction(
                path=display_path(path),
                answer=answer_text(taxonomy, c),
                class_name=taxonomy.class_names[c],
                head_labels={h.name: h.labels[int(classes[h.name][i])] for h in taxonomy.heads},
                head_probs={h.name: {lab: float(probs[k][i, j]) for j, lab in enumerate(h.labels)}
                            for k, h in enumerate(taxonomy.heads)},
                class_probs={name: float(combined[i, j]) for j, name in enumerate(taxonomy.class_names)},
                answer_argmax=answer_text(taxonomy, int(argmax[i])),
                class_argmax=taxonomy.class_names[int(argmax[i])],
            )
            if maps is not None:
                from bcc.gradcam import save_overlays

                stem = _unique_stem(display_path(Path(path).stem), used_names)  # the overlays' names as printed
                pred.gradcam = [display_path(p) for p in save_overlays(
                    originals[i], {h: m[i] for h, m in maps.items()}, gradcam_dir, stem,
                    image_size=im.image_size, crop_pct=im.config.data.crop_pct,
                    labels=pred.head_labels)]
            predictions.append(pred)
            if on_prediction is not None:
                on_prediction(pred)
    return PredictResult(predictions, failures, calibrated=bool(im.temperatures), tta=tta, threshold=im.threshold)


def _unique_stem(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def prob_columns(taxonomy: Taxonomy) -> list[str]:
    """Probability columns of a predictions CSV: `head:label` for every head, then `combined:class`."""
    cols = [f"{h.name}:{lab}" for h in taxonomy.heads for lab in h.labels]
    return cols + [f"combined:{c}" for c in taxonomy.class_names]


def _cell(value: Any) -> Any:
    return display_path(value) if isinstance(value, str) else value


def write_probability_csv(
    path: str | Path,
    taxonomy: Taxonomy,
    lead: Sequence[str],
    rows: Iterable[tuple[Sequence[str], Sequence[float] | None, Sequence[str]]],
    tail: Sequence[str] = (),
) -> Path:
    """The one predictions CSV writer (`bcc predict --csv`, `bcc eval`'s predictions.csv), atomic.

    Columns: `lead`, then `prob_columns(taxonomy)`, then `tail`. A row is (lead values, probabilities
    in column order or None for a row without any, tail values); probabilities are written with
    `repr`, so they read back as the same floats. Text values are written in their printable form
    (`bcc.imageio.display_path`): a source name from an older pack may hold bytes that are not UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = prob_columns(taxonomy)
    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow([*lead, *cols, *tail])
        for first, probs, last in rows:
            values = [""] * len(cols) if probs is None else [repr(float(v)) for v in probs]
            w.writerow([*map(_cell, first), *values, *map(_cell, last)])
    return path


def write_predictions_csv(result: PredictResult, taxonomy: Taxonomy, path: str | Path) -> Path:
    """One row per file: path, answer, class (the decision made: at the operating point when one is in
    use), every head's probabilities (`head:label`), the combined leaf probabilities (`combined:class`),
    `gradcam`, `error` (set, with the rest empty, for failed files), then `answer_argmax`, `class_argmax`
    (the decision at argmax) and `threshold`: the binary head's positive-label probability at or above
    which it decided positive (the operating point; 0.5 at argmax, where it decides positive above 0.5;
    empty for a taxonomy without a binary root head)."""
    from bcc.operating_point import OperatingPointError, binary_head

    cols = prob_columns(taxonomy)
    try:
        binary_head(taxonomy)
        threshold = repr(float(result.threshold if result.threshold is not None else 0.5))
    except OperatingPointError:
        threshold = ""

    def rows():
        for p in result.predictions:
            values = {f"{h}:{lab}": v for h, d in p.head_probs.items() for lab, v in d.items()}
            values.update({f"combined:{c}": v for c, v in p.class_probs.items()})
            yield ([p.path, p.answer, p.class_name], [values[c] for c in cols],
                   [" ".join(p.gradcam), "", p.answer_argmax, p.class_argmax, threshold])
        for file, reason in result.failures:
            yield [file, "", ""], None, ["", reason, "", "", ""]

    # columns after `error` were added later (`answer_argmax`, `class_argmax`, `threshold`): appended, so
    # readers of the older columns by position keep working
    return write_probability_csv(path, taxonomy, ["path", "answer", "class"], rows(),
                                 ["gradcam", "error", "answer_argmax", "class_argmax", "threshold"])


def write_predictions_json(result: PredictResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {
        "calibrated": result.calibrated,
        "tta": result.tta,
        "threshold": result.threshold,
        "predictions": [p.to_dict() for p in result.predictions],
        "failures": [{"path": f, "error": r} for f, r in result.failures],
    })
    return path
