"""Where pretrained weights live and how their tensors are read: the sources `model.pretrained` may
name (see `bcc.pretrained` for the list and the load policy), resolved from metadata alone
(`resolve_source`), and state dicts read from any of those files (`read_state_dict`).

Raises `PretrainedError` (one line naming the file) for a missing, unreadable, corrupt or
wrong-type source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bcc.errors import BccError
from bcc.model import VGG_NAME

HUB_SOURCES = ("hub", "true")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Wrapper prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) put on saved keys.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the model's state dict (timm, Lightning, plain scripts).
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_COUNTER = "num_batches_tracked"
_BACKBONE = "backbone."
# Files a Hugging Face / timm model folder keeps its weights in, in order of preference.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_CONFIG = "config.json"


class PretrainedError(BccError):
    """Pretrained weights that are missing, unreadable, of the wrong kind, or do not fit the backbone."""


@dataclass(frozen=True)
class SourcePreprocess:
    """The input the source's weights were trained on; None where the source does not say."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    image_size: int | None = None
    crop_pct: float | None = None
    origin: str = ""  # where the values come from, e.g. "bcc checkpoint config", "timm pretrained_cfg"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class PretrainedSource:
    """What `model.pretrained` points at, found from metadata only (no tensor is read)."""

    given: str  # the string the user wrote
    kind: str  # "hub", "run", "checkpoint", "export", "hf-export", "hf-folder" or "file"
    weights: Path | None  # the weights file (None for the hub)
    backbone: str | None = None  # the source's backbone name, when it says
    taxonomy: dict | None = None  # the source's taxonomy (`Taxonomy.to_dict()`), when it says
    preprocess: SourcePreprocess = field(default_factory=SourcePreprocess)


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _torch_load_reason(e: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, without PyTorch's advice to retry with
    weights_only=False (which would run the file's code: never right for a file one did not make)."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        what = detail.group(1).strip().rstrip(".") if detail else "an object that is not a tensor"
        return f"a damaged pickle, or one holding more than tensors: {what[:120]}"
    return _first_line(e).split(". ")[0]  # PyTorch's first sentence says what; the rest is advice


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- finding the source


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"pretrained source {path}: cannot read it ({_first_line(e)})") from None


def _preprocess_from_config(config: Any, origin: str) -> SourcePreprocess:
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        return SourcePreprocess()
    return _preprocess(
        data.get("mean"), data.get("std"), data.get("image_size"), data.get("crop_pct"), origin
    )


def _preprocess(mean, std, image_size, crop_pct, origin: str) -> SourcePreprocess:
    def triple(v):
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) and len(v) == 3 else None

    if isinstance(image_size, (list, tuple)):  # timm's input_size is (C, H, W)
        image_size = image_size[-1]
    return SourcePreprocess(
        mean=triple(mean),
        std=triple(std),
        image_size=int(image_size) if isinstance(image_size, (int, float)) else None,
        crop_pct=float(crop_pct) if isinstance(crop_pct, (int, float)) else None,
        origin=origin,
    )


def _from_checkpoint_meta(given: str, kind: str, weights: Path, meta: Any) -> PretrainedSource:
    if not isinstance(meta, Mapping):
        meta = {}
    model = meta.get("model") if isinstance(meta.get("model"), Mapping) else {}
    return PretrainedSource(
        given,
        kind,
        weights,
        backbone=model.get("backbone"),
        taxonomy=meta.get("taxonomy") if isinstance(meta.get("taxonomy"), Mapping) else None,
        preprocess=_preprocess_from_config(meta.get("config"), "bcc checkpoint config"),
    )


def _from_export(given: str, directory: Path) -> PretrainedSource:
    from bcc.export import EXPORT_FILE, EXPORT_FORMAT, WEIGHTS_FILE

    info = _read_json(directory / EXPORT_FILE)
    if not isinstance(info, Mapping) or info.get("format") != EXPORT_FORMAT:
        found = info.get("format") if isinstance(info, Mapping) else type(info).__name__
        raise PretrainedError(
            f"pretrained source {directory}: {EXPORT_FILE} is not a {EXPORT_FORMAT} export ({found!r})"
        )
    model = info.get("model") if isinstance(info.get("model"), Mapping) else {}
    p = info.get("preprocess") if isinstance(info.get("preprocess"), Mapping) else {}
    return PretrainedSource(
        given,
        "export",
        directory / WEIGHTS_FILE,
        backbone=model.get("backbone"),
        taxonomy=info.get("taxonomy") if isinstance(info.get("taxonomy"), Mapping) else None,
        preprocess=_preprocess(
            p.get("mean"), p.get("std"), p.get("image_size"), p.get("crop_pct"), "bcc export"
        ),
    )


def _is_hf_export(directory: Path) -> bool:
    """A `bcc export --format hf` folder (its config.json says so), whose weights use the Hub key layout."""
    from bcc.export_hf import HF_CONFIG_FILE, HF_FORMAT

    info = _read_json(directory / HF_CONFIG_FILE) if (directory / HF_CONFIG_FILE).is_file() else None
    return isinstance(info, Mapping) and info.get("format") == HF_FORMAT


def _from_hf_export(given: str, directory: Path) -> PretrainedSource:
    from bcc.export import WEIGHTS_FILE, ExportError
    from bcc.export_hf import read_hf_config

    try:
        info = read_hf_config(directory)
    except ExportError as e:
        raise PretrainedError(f"pretrained source {directory}: {e}") from None
    p = info.get("preprocess") if isinstance(info.get("preprocess"), Mapping) else {}
    return PretrainedSource(
        given,
        "hf-export",  # `load_pretrained` maps its Hub key layout back (`bcc.export_hf.from_hub_layout`)
        directory / WEIGHTS_FILE,
        backbone=info.get("backbone"),
        taxonomy=info.get("taxonomy") if isinstance(info.get("taxonomy"), Mapping) else None,
        preprocess=_preprocess(
            p.get("mean"), p.get("std"), p.get("image_size"), p.get("crop_pct"), "bcc hf export"
        ),
    )


def _from_hf_config(given: str, kind: str, weights: Path, config_file: Path) -> PretrainedSource:
    cfg = _read_json(config_file)
    cfg = cfg if isinstance(cfg, Mapping) else {}
    p = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), Mapping) else {}
    return PretrainedSource(
        given,
        kind,
        weights,
        backbone=cfg.get("architecture"),
        preprocess=_preprocess(
            p.get("mean"),
            p.get("std"),
            p.get("input_size"),
            p.get("crop_pct"),
            f"timm pretrained_cfg ({config_file.name})",
        ),
    )


def _best_meta(path: Path) -> Any:
    info = _read_json(path)  # model_best.json: {"step", "metric", "value", "checkpoint", "meta"}
    return info.get("meta") if isinstance(info, Mapping) else None


def checkpoint_weights(step: Path) -> Path:
    """The weights file of checkpoint `step` that a run, checkpoint or `best`/`last` source gives: the
    one `bcc export`/`bcc eval` take by default (`--weights auto`, `bcc.export.choose_weights`), i.e.
    `model_ema.safetensors` when the run kept an EMA and its stored calibration (if any) has the EMA's
    own fit, else `model.safetensors` (a raw-only fit: auto takes the raw weights there too)."""
    from bcc import checkpoint as ck
    from bcc.export import ExportError, ema_calibration

    if not (step / ck.EMA_FILE).is_file():
        if ck.EMA_FILE in (ck.read_hashes(step) or {}):  # as bcc eval/export say: not the raw weights instead
            raise PretrainedError(f"pretrained source {step}: checkpoint is damaged: {ck.EMA_FILE} is missing "
                                  "(its hashes.json lists it); copy the checkpoint again or name another")
        return step / ck.MODEL_FILE
    try:
        fitted = ema_calibration(step)
    except ExportError as e:
        raise PretrainedError(f"pretrained source {step}: {e}") from None
    return step / (ck.EMA_FILE if fitted is not None else ck.MODEL_FILE)


def resolve_source(source: str | Path, backbone: str | None = None) -> PretrainedSource:
    """Find the weights file `source` names and what its metadata says; see the module docstring.

    Reads JSON metadata only (for the hub, the published preprocessing of `backbone`, with no
    download). A run or checkpoints directory gives its best checkpoint, else its latest; name
    `RUN/checkpoints/last` for the latest. Raises `PretrainedError` when nothing usable is there.
    """
    from bcc import checkpoint as ck
    from bcc.export import EXPORT_FILE

    given = str(source)
    if given.strip().lower() in HUB_SOURCES:
        preprocess = _hub_preprocess(backbone) if backbone else SourcePreprocess()
        return PretrainedSource(given, "hub", None, backbone, preprocess=preprocess)
    path = Path(given).expanduser()
    if not path.exists():
        raise PretrainedError(f"pretrained source {path}: no such file or directory")
    if path.is_file():
        # a weights file inside a bcc checkpoint, export or model folder keeps that folder's metadata
        if (path.parent / EXPORT_FILE).is_file() and path.name == "model.safetensors":
            return dataclasses.replace(_from_export(given, path.parent), kind="file")
        if path.name == "model.safetensors" and _is_hf_export(path.parent):
            return _from_hf_export(given, path.parent)
        if (path.parent / ck.META_FILE).is_file() and path.name == ck.MODEL_FILE:
            return _from_checkpoint_meta(given, "file", path, _read_json(path.parent / ck.META_FILE))
        if path.name == ck.BEST_WEIGHTS and (path.parent / ck.BEST_META).is_file():
            return _from_checkpoint_meta(given, "file", path, _best_meta(path.parent / ck.BEST_META))
        if (path.parent / _HF_CONFIG).is_file() and path.name in _HF_WEIGHTS:
            return _from_hf_config(given, "file", path, path.parent / _HF_CONFIG)
        return PretrainedSource(given, "file", path)
    if not path.is_dir():
        raise PretrainedError(f"pretrained source {path}: neither a file nor a directory")
    if (path / EXPORT_FILE).is_file():
        return _from_export(given, path)
    if _is_hf_export(path):
        return _from_hf_export(given, path)
    try:
        step = ck.resolve_checkpoint(path, prefer="best").resolve()  # the step dir: `best` moves on
    except ck.CheckpointError as e:
        reason = str(e)
    else:
        kind = "run" if (path / "checkpoints").is_dir() else "checkpoint"
        return _from_checkpoint_meta(given, kind, checkpoint_weights(step), _read_json(step / ck.META_FILE))
    # a run whose checkpoints are gone still has the best weights beside their meta
    if (path / ck.BEST_WEIGHTS).is_file() and (path / ck.BEST_META).is_file():
        return _from_checkpoint_meta(given, "run", path / ck.BEST_WEIGHTS, _best_meta(path / ck.BEST_META))
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            if (path / _HF_CONFIG).is_file():
                return _from_hf_config(given, "hf-folder", path / name, path / _HF_CONFIG)
            return PretrainedSource(given, "hf-folder", path / name)
    raise PretrainedError(
        f"pretrained source {path}: a directory that is neither a bcc run, checkpoint or export nor a model "
        f"folder with {' or '.join(_HF_WEIGHTS)} ({reason})"
    )


# --------------------------------------------------------------------------- reading tensors


def sha256_tensors(state: Mapping[str, Tensor]) -> str:
    """A content hash of a state dict (for weights that never were a file of ours, i.e. the hub)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 27


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a `.safetensors` or torch file (loaded weights-only), wrappers removed.

    Raises `PretrainedError` for a missing, unreadable, corrupt or non-state-dict file.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise PretrainedError(f"pretrained weights {path}: cannot read it ({_first_line(e)})") from None
    is_safetensors = path.suffix == ".safetensors" or (
        path.suffix not in TORCH_SUFFIXES and _looks_like_safetensors(head)
    )
    if (
        not is_safetensors
        and path.suffix not in TORCH_SUFFIXES
        and not head.startswith((b"PK\x03\x04", b"\x80"))
    ):
        raise PretrainedError(
            f"pretrained weights {path}: not a weights file (expected .safetensors or a torch state dict "
            f"{'/'.join(TORCH_SUFFIXES)})"
        )
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, truncated header, a pickle weights_only refuses
        if is_safetensors:
            raise PretrainedError(f"pretrained weights {path}: cannot load it ({_first_line(e)})") from None
        raise PretrainedError(f"pretrained weights {path}: not a loadable weights file ({_torch_load_reason(e)}; "
                              "bcc loads torch files with weights_only=True, which runs no code from them)") from None
    for key in _NESTING_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise PretrainedError(f"pretrained weights {path}: holds a {type(state).__name__}, not a state dict")
    if not state:
        raise PretrainedError(f"pretrained weights {path}: the state dict is empty")
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise PretrainedError(
                f"pretrained weights {path}: entry {k!r} is a {type(v).__name__}, not a tensor (not a state dict?)"
            )
    return _strip_wrapper_prefixes(state)


def _strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _hub_preprocess(name: str) -> SourcePreprocess:
    """What the backbone's published weights expect, known without downloading them."""
    try:
        if name == VGG_NAME:
            import torchvision

            t = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.transforms()
            return _preprocess(
                t.mean,
                t.std,
                t.crop_size[0],
                t.crop_size[0] / t.resize_size[0],
                "torchvision IMAGENET1K_V1 transforms",
            )
        from timm.models import get_pretrained_cfg

        p = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name fails later, where the weights are fetched
        return SourcePreprocess()
    if p is None:
        return SourcePreprocess()
    return _preprocess(p.mean, p.std, p.input_size, p.crop_pct, "timm pretrained_cfg")


def _hub_weights(name: str) -> dict[str, Tensor]:
    try:
        if name == VGG_NAME:
            import torchvision

            return torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        import timm

        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no published weights
        if name == VGG_NAME:
            recipe = (
                'python -c "import torch, torchvision; torch.save(torchvision.models.vgg16_bn('
                "weights='IMAGENET1K_V1').state_dict(), 'vgg16_bn.pth')\""
            )
        else:
            recipe = (
                f'python -c "import timm, safetensors.torch as st; st.save_file(timm.create_model('
                f"'{name}', pretrained=True).state_dict(), '{name}.safetensors')\""
            )
        raise PretrainedError(
            f"could not download pretrained weights for {name} ({_first_line(e)}); on a machine with internet "
            f"access run {recipe}, copy the file here and pass model.pretrained=/path/to/file"
        ) from None


