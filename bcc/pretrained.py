"""Pretrained weights from wherever a user keeps them, loaded into a `MultitaskNet` with a report.

`model.pretrained` names one of

    hub                          the backbone's published ImageNet weights (needs internet)
    RUN/                         a bcc run directory: its best checkpoint, else its latest
    RUN/checkpoints[/step-N]     a bcc checkpoints directory or one checkpoint (`best`, `last` links too)
    EXPORT/                      a folder written by `bcc export` (`bcc_export.json` + `model.safetensors`)
    DIR/                         a timm/Hugging Face model folder (`config.json` + `model.safetensors`
                                 or `pytorch_model.bin`)
    FILE.safetensors|.pt|.pth|.bin|.ckpt
                                 a state dict: a whole bcc model (`backbone.*`, `heads.*`) or a bare
                                 backbone as timm or torchvision save it (keys without `backbone.`),
                                 optionally under a `state_dict`/`model` key, optionally DDP-prefixed

The backbone is what transfers. Every backbone tensor must be found with its shape, or the load is
refused with a `PretrainedError` (a different architecture, or a backbone of another width, would
otherwise train from a half-random start without anyone noticing) unless `allow_mismatch=True`
says to take what fits. Heads load only when the source has a head of the same name and shape and
the taxonomies agree (where both are known); other heads keep their fresh initialisation, with a note.
BatchNorm's `num_batches_tracked` counters are not weights: they are loaded when present and neither
counted nor required.

One line goes to the console (main process only):

    pretrained: 52 of 52 backbone tensors loaded from runs/wbc (sha256 3f2a9c0d1b7e); heads re-initialised ...

and `load_pretrained` returns a `PretrainedRecord` (source, the weights file and its sha256, counts,
keys, the source's normalisation and input size where known) for the run directory and the model card.
`resolve_source` reads only metadata, so the trainer can follow the source's normalisation
(`follow_source`) before it builds the data pipeline.

The trainer's part: (1) at start-up, before the data pipeline and before the resolved config is
written, `cfg, changed = follow_pretrained(cfg, explicit_keys(config_file, overrides))`, so the run,
its checkpoints and exports hold the mean/std/size the model was trained with; (2)
`build_model(cfg.model, taxonomy.head_sizes, taxonomy=taxonomy)` loads and keeps the record as
`model.pretrained_record`; (3) write `record.to_dict()` into the run directory and the checkpoint
meta; (4) on resume build with `pretrained=""`: the checkpoint holds the weights, and the source may
be gone by then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bcc.errors import BccError
from bcc.model import HEADS_GROUP, VGG_NAME, MultitaskNet
from bcc.shards import sha256_file

__all__ = [
    "PretrainedError",
    "PretrainedRecord",
    "PretrainedSource",
    "SourcePreprocess",
    "explicit_keys",
    "follow_pretrained",
    "follow_source",
    "load_pretrained",
    "read_state_dict",
    "resolve_source",
]

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
    kind: str  # "hub", "run", "checkpoint", "export", "hf-folder" or "file"
    weights: Path | None  # the weights file (None for the hub)
    backbone: str | None = None  # the source's backbone name, when it says
    taxonomy: dict | None = None  # the source's taxonomy (`Taxonomy.to_dict()`), when it says
    preprocess: SourcePreprocess = field(default_factory=SourcePreprocess)


@dataclass(frozen=True)
class PretrainedRecord:
    """What `load_pretrained` did; `to_dict()` is JSON for the run directory and the model card.

    Counts are over backbone tensors (parameters and buffers, BatchNorm counters excepted). Key
    names are the model's for `missing` and `skipped`, the source's for `unexpected`.
    """

    source: str
    kind: str
    path: str  # the weights file read ("" for the hub)
    sha256: str  # of that file; for the hub, of the tensors (keys, dtypes, shapes, bytes)
    loaded: int  # backbone tensors loaded
    total: int  # backbone tensors in the model
    heads_loaded: tuple[str, ...] = ()
    heads_reinitialised: tuple[str, ...] = ()
    heads_note: str = ""  # why heads were re-initialised
    missing: tuple[str, ...] = ()  # model keys left as initialised (backbone and heads)
    unexpected: tuple[str, ...] = ()  # source keys the model has no place for (e.g. `fc.*`)
    skipped: tuple[str, ...] = ()  # model keys whose source tensor has another shape
    backbone: str | None = None
    preprocess: SourcePreprocess = field(default_factory=SourcePreprocess)

    @property
    def missing_backbone(self) -> list[str]:
        return [k for k in self.missing if k.startswith(_BACKBONE)]

    @property
    def skipped_backbone(self) -> list[str]:
        return [k for k in self.skipped if k.startswith(_BACKBONE)]

    def line(self) -> str:
        """The one load line: `pretrained: N of M backbone tensors loaded from SOURCE (sha256 ...)` + notes."""
        parts = [
            f"pretrained: {self.loaded} of {self.total} backbone tensors loaded from {self.source} "
            f"(sha256 {self.sha256[:12]})"
        ]
        if self.kind in ("run", "checkpoint"):
            parts.append(f"checkpoint {Path(self.path).parent.name}")
        if self.heads_loaded:
            parts.append(f"heads loaded: {', '.join(self.heads_loaded)}")
        if self.heads_reinitialised:
            why = f" ({self.heads_note})" if self.heads_note else ""
            parts.append(f"heads re-initialised: {', '.join(self.heads_reinitialised)}{why}")
        if self.missing_backbone:
            parts.append(f"missing (left random): {_preview(self.missing_backbone)}")
        if self.skipped_backbone:
            parts.append(f"skipped (other shape): {_preview(self.skipped_backbone)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {_preview(list(self.unexpected))}")
        return "; ".join(parts)

    __str__ = line

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


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
    try:
        step = ck.resolve_checkpoint(path, prefer="best").resolve()  # the step dir: `best` moves on
    except ck.CheckpointError as e:
        reason = str(e)
    else:
        kind = "run" if (path / "checkpoints").is_dir() else "checkpoint"
        return _from_checkpoint_meta(given, kind, step / ck.MODEL_FILE, _read_json(step / ck.META_FILE))
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
        raise PretrainedError(f"pretrained weights {path}: cannot load it ({_first_line(e)})") from None
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


# --------------------------------------------------------------------------- loading


def _arch(name: str) -> str:
    return name.split(".")[0]  # timm's `resnet10t.a1_in1k` is architecture `resnet10t`


def _taxonomy_dict(taxonomy: Any) -> dict | None:
    if taxonomy is None:
        return None
    return taxonomy.to_dict() if hasattr(taxonomy, "to_dict") else dict(taxonomy)


def load_pretrained(
    model: MultitaskNet,
    source: str | Path,
    *,
    allow_mismatch: bool = False,
    taxonomy: Any = None,
    echo: bool = True,
) -> PretrainedRecord:
    """Load the backbone (and the heads that fit) of `source` into `model`; print and return the record.

    `taxonomy` (a `Taxonomy` or its dict) is the model's: when the source has a different one, no head
    is loaded. `allow_mismatch=True` loads whatever fits instead of refusing a backbone with missing
    tensors, tensors of another shape or another name; a source with no matching backbone tensor at
    all is refused even then. Raises `PretrainedError`; `model` is untouched when it does.
    """
    from bcc.console import console

    src = resolve_source(source, model.backbone_name)
    if src.kind == "hub":
        state = _hub_weights(model.backbone_name)
        label, digest, path = f"hub weights of {model.backbone_name}", sha256_tensors(state), ""
    else:
        assert src.weights is not None
        state = read_state_dict(src.weights)
        label, digest, path = str(source), sha256_file(src.weights), str(src.weights)
    record = _load_state_dict(
        model, state, src, label, digest, path, allow_mismatch, _taxonomy_dict(taxonomy)
    )
    if echo:
        console.print(record.line(), markup=False, highlight=False, soft_wrap=True)
    return record


def _load_state_dict(
    model: MultitaskNet,
    state: Mapping[str, Tensor],
    src: PretrainedSource,
    label: str,
    digest: str,
    path: str,
    allow_mismatch: bool,
    taxonomy: dict | None,
) -> PretrainedRecord:
    is_full_model = any(k.startswith((_BACKBONE, HEADS_GROUP + ".")) for k in state)
    # model key -> source key (a bare backbone's keys gain the `backbone.` prefix)
    to_source = {(k if is_full_model else _BACKBONE + k): k for k in state}
    own = model.state_dict()
    backbone_keys = [k for k in own if k.startswith(_BACKBONE) and not k.endswith(_COUNTER)]
    fits = {k: to_source[k] for k in own if k in to_source and state[to_source[k]].shape == own[k].shape}
    loaded = [k for k in backbone_keys if k in fits]
    wrong_shape = [k for k in own if k in to_source and k not in fits]
    missing_backbone = [k for k in backbone_keys if k not in to_source]

    def shapes(k: str) -> str:
        return f"{k} (source {tuple(state[to_source[k]].shape)}, model {tuple(own[k].shape)})"

    where = f"pretrained {label}"
    if not loaded:
        raise PretrainedError(
            f"{where}: no tensor matches backbone {model.backbone_name}: first keys of the source: "
            f"{_preview(list(state), 5)}; first keys expected: {_preview(backbone_keys, 5)}"
        )
    if not allow_mismatch:
        problems = []
        if src.backbone and _arch(src.backbone) != _arch(model.backbone_name):
            problems.append(f"it was trained as backbone {src.backbone}, the model is {model.backbone_name}")
        bad_backbone = [k for k in wrong_shape if k.startswith(_BACKBONE)]
        if bad_backbone:
            problems.append(
                f"{len(bad_backbone)} tensors of another shape: {_preview([shapes(k) for k in bad_backbone], 3)}"
            )
        if missing_backbone:
            problems.append(
                f"{len(missing_backbone)} of {len(backbone_keys)} tensors missing: {_preview(missing_backbone, 3)}"
            )
        if problems:
            raise PretrainedError(
                f"{where} does not match backbone {model.backbone_name} ({len(loaded)} of {len(backbone_keys)} "
                f"tensors fit): {'; '.join(problems)}; set model.pretrained_allow_mismatch=true to load what fits"
            )

    # heads: all of a head's tensors or none of them
    heads_loaded, heads_reinit, notes = [], [], []
    if not any(k.startswith(HEADS_GROUP + ".") for k in state):
        notes.append("the source has no heads")
    elif src.taxonomy and taxonomy and src.taxonomy != taxonomy:
        notes.append("the taxonomy differs")
    for head in model.head_names:
        keys = [k for k in own if k.startswith(f"{HEADS_GROUP}.{head}.")]
        if not notes and all(k in fits for k in keys):
            heads_loaded.append(head)
        else:
            heads_reinit.append(head)
    for head in heads_reinit if not notes else ():
        keys = [k for k in own if k.startswith(f"{HEADS_GROUP}.{head}.")]
        other = any(k in to_source for k in keys)
        notes.append(f"{head}: {'another shape' if other else 'not'} in the source")
    take = [k for k in fits if k.startswith(_BACKBONE) or k.split(".")[1] in heads_loaded]
    model.load_state_dict({k: state[fits[k]] for k in take}, strict=False)

    used = {to_source[k] for k in own if k in to_source}
    return PretrainedRecord(
        source=label,
        kind=src.kind,
        path=path,
        sha256=digest,
        loaded=len(loaded),
        total=len(backbone_keys),
        heads_loaded=tuple(heads_loaded),
        heads_reinitialised=tuple(heads_reinit),
        heads_note=", ".join(notes) if heads_reinit else "",
        missing=tuple(k for k in own if k not in take and not k.endswith(_COUNTER)),
        unexpected=tuple(k for k in state if k not in used),
        skipped=tuple(wrong_shape),
        backbone=src.backbone,
        preprocess=src.preprocess,
    )


# --------------------------------------------------------------------------- following the source


_FOLLOWED = ("mean", "std", "image_size", "crop_pct")


def follow_source(
    data_cfg: Any, preprocess: SourcePreprocess, explicit: Collection[str] = ()
) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """`data_cfg` (a frozen `DataConfig`) with mean, std, image_size and crop_pct taken from the source.

    A field keeps the config's value when the source does not know it or when `explicit` names it
    (`data.mean` or `mean`: what the user wrote, see `explicit_keys`). A field that is None in
    `data_cfg` (a config whose default means "follow the source") takes the source's value.
    Returns (new config, {field: (old, new)} for the fields that changed).
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for name in _FOLLOWED:
        value = getattr(preprocess, name)
        if value is None or name in explicit or f"data.{name}" in explicit:
            continue
        old = getattr(data_cfg, name)
        if old != value:
            changes[name] = (old, value)
    return dataclasses.replace(data_cfg, **{k: new for k, (_, new) in changes.items()}), changes


def follow_pretrained(cfg: Any, explicit: Collection[str] = ()) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """`cfg` (a `Config`) with its data section following `cfg.model.pretrained` (see `follow_source`).

    Call it once at start-up, before the data pipeline and before the resolved config is written, so
    the run directory, checkpoints and exports hold the values the model was trained with. Returns
    (config, {"data.<field>": (old, new)}); a config without pretrained weights comes back unchanged.
    """
    if not cfg.model.pretrained:
        return cfg, {}
    src = resolve_source(cfg.model.pretrained, cfg.model.backbone)
    data, changes = follow_source(cfg.data, src.preprocess, explicit)
    return dataclasses.replace(cfg, data=data), {f"data.{k}": v for k, v in changes.items()}


def explicit_keys(config_file: str | Path | None, overrides: Collection[str] = ()) -> set[str]:
    """Dotted keys the user set in a YAML config file or a `key=value` override (leaves only)."""
    from bcc.config import parse_override, read_yaml

    def leaves(d: Mapping, prefix: str) -> set[str]:
        out = set()
        for k, v in d.items():
            key = f"{prefix}{k}"
            out |= leaves(v, key + ".") if isinstance(v, Mapping) and v else {key}
        return out

    keys = leaves(read_yaml(config_file), "") if config_file is not None else set()
    for text in overrides:
        path, value = parse_override(text)
        keys |= leaves({path[-1]: value}, ".".join(path[:-1]) + "." if len(path) > 1 else "")
    return keys
