"""Pretrained weights from wherever a user keeps them, loaded into a `MultitaskNet` with a report.

`model.pretrained` names one of

    hub                          the backbone's published ImageNet weights (needs internet)
    RUN/                         a bcc run directory: its best checkpoint, else its latest
    RUN/checkpoints[/step-N]     a bcc checkpoints directory or one checkpoint (`best`, `last` links too)
    EXPORT/                      a folder written by `bcc export` (`bcc_export.json` + `model.safetensors`,
                                 or `--format hf`: `config.json` of format bcc-hf + `model.safetensors`)
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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from bcc.model import HEADS_GROUP, MultitaskNet
from bcc.shards import sha256_file
from bcc.weights import (  # re-exported: the sources and readers live in bcc.weights
    _BACKBONE,
    _COUNTER,
    PretrainedError,
    PretrainedSource,
    SourcePreprocess,
    _hub_weights,
    _preview,
    read_state_dict,
    resolve_source,
    sha256_tensors,
)

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
    missing: tuple[str, ...] = ()  # model keys left as initialised (backbone and heads), not under skipped
    unexpected: tuple[str, ...] = ()  # source keys the model has no place for (e.g. `fc.*`)
    skipped: tuple[str, ...] = ()  # model keys whose source tensor has another shape
    backbone: str | None = None
    preprocess: SourcePreprocess = field(default_factory=SourcePreprocess)
    unfinished: bool = False  # a run source without summary.json (killed, preempted, still training)

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
        if self.kind in ("run", "checkpoint"):  # which weights: those bcc export/eval take (`checkpoint_weights`)
            ema = Path(self.path).name == "model_ema.safetensors"
            parts.append(f"checkpoint {Path(self.path).parent.name}, {'EMA' if ema else 'raw'} weights")
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


# --------------------------------------------------------------------------- loading


def _arch(name: str) -> str:
    return name.split(".")[0]  # timm's `resnet10t.a1_in1k` is architecture `resnet10t`


def _taxonomy_dict(taxonomy: Any) -> dict | None:
    if taxonomy is None:
        return None
    return taxonomy.to_dict() if hasattr(taxonomy, "to_dict") else dict(taxonomy)


def _check_written_hash(weights: Path, digest: str) -> None:
    """Refuse weights inside a bcc checkpoint whose bytes differ from the sha256 its hashes.json recorded
    (a damaged checkpoint must not seed a run quietly). Files outside checkpoints pass unchecked."""
    from bcc import checkpoint as ck

    try:
        written = (ck.read_hashes(weights.parent) or {}).get(weights.name)
    except ck.CheckpointError as e:
        raise PretrainedError(f"pretrained source {weights.parent}: {e}") from None
    if written is not None and written != digest:
        raise PretrainedError(
            f"pretrained weights {weights} are damaged: sha256 {digest[:12]}…, written as {written[:12]}… "
            f"({ck.HASHES_FILE})"
        )


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
    all is refused even then. A source tensor holding NaN or Inf, or a BatchNorm `running_var` below
    zero, is refused naming the tensor. Raises `PretrainedError`; `model` is untouched when it does.
    """
    from bcc.console import console

    src = resolve_source(source, model.backbone_name)
    if src.kind == "hub":
        state = _hub_weights(model.backbone_name)
        label, digest, path = f"hub weights of {model.backbone_name}", sha256_tensors(state), ""
    else:
        assert src.weights is not None
        state = read_state_dict(src.weights)
        if src.kind == "hf-export":  # the Hub key layout: bare backbone keys beside `heads.*`
            from bcc.export_hf import from_hub_layout

            state = from_hub_layout(state)
        label, digest, path = str(source), sha256_file(src.weights), str(src.weights)
        _check_written_hash(src.weights, digest)
    import torch

    # a diverged source would seed a run whose first loss is NaN, blamed on the learning rate: name it here
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PretrainedError(f"pretrained source {label}: tensor {bad[0]} holds NaN or Inf values"
                              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                              + "; its training diverged or the file is damaged")
    # a BatchNorm variance below zero passes the check above, but sqrt(var + eps) is NaN in eval mode
    negative = [k for k, v in state.items() if k.endswith("running_var") and v.is_floating_point() and bool((v < 0).any())]
    if negative:
        k = negative[0]
        raise PretrainedError(f"pretrained source {label}: BatchNorm tensor {k} holds negative variances (min "
                              f"{float(state[k].min()):.4g})" + (f" (and {len(negative) - 1} more)" if len(negative) > 1
                                                                else "")
                              + "; they give NaN outputs in eval mode: the file is damaged or was edited")
    record = _load_state_dict(
        model, state, src, label, digest, path, allow_mismatch, _taxonomy_dict(taxonomy)
    )
    if src.kind == "run" and not (Path(source) / "summary.json").is_file():
        record = dataclasses.replace(record, unfinished=True)  # recorded in RUN/pretrained.json
    if echo:
        console.print(record.line(), markup=False, highlight=False, soft_wrap=True)
        if record.unfinished:
            console.print(f"[yellow]warning:[/] pretrained source {label} did not finish (no summary.json): "
                          f"these are its weights at {Path(path).parent.name}, not those of a finished run",
                          soft_wrap=True)
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
        named = [k for k in wrong_shape if k.startswith(_BACKBONE) and not k.endswith(_COUNTER)]
        if named:  # the names agree: another width or depth of the same family, say so
            raise PretrainedError(
                f"{where}: no tensor fits backbone {model.backbone_name}: {len(named)} of {len(backbone_keys)} "
                f"keys match by name but differ in shape, e.g. {shapes(named[0])}"
            )
        raise PretrainedError(
            f"{where}: no tensor matches backbone {model.backbone_name}: first keys of the source: "
            f"{_preview([k for k in state if not k.endswith(_COUNTER)], 5)}; first keys expected: "
            f"{_preview(backbone_keys, 5)}"
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
    elif taxonomy and not src.taxonomy:  # heads of the right shape may still mean other classes, in another order
        notes.append("the source does not say its taxonomy (a bare weights file): give its run, checkpoint or "
                     "export to load its heads")
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
        # a tensor of another shape is listed once, under skipped
        missing=tuple(k for k in own if k not in take and k not in wrong_shape and not k.endswith(_COUNTER)),
        unexpected=tuple(k for k in state if k not in used),
        skipped=tuple(k for k in wrong_shape if not k.endswith(_COUNTER)),
        backbone=src.backbone,
        preprocess=src.preprocess,
    )


def source_sha256(source: str | Path, backbone: str | None = None) -> str | None:
    """The sha256 `load_pretrained` would record for `source` now (of the weights file it reads), without
    loading it; None for the hub (its hash needs the download). Raises `PretrainedError` as
    `resolve_source` does. `bcc compare`/`bcc cv` compare it with a finished run's `pretrained.json`."""
    src = resolve_source(source, backbone)
    return None if src.kind == "hub" or src.weights is None else sha256_file(src.weights)


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


def followed_overrides(cfg: Any, explicit: Collection[str] = ()) -> list[str]:
    """`data.<field>=<value>` overrides that give a run of `cfg` without its pretrained source the data
    settings a run with it resolves to (`follow_pretrained`): `bcc compare`'s scratch arms train at the
    pretrained arms' resolution and normalisation. [] without a source or when nothing follows it."""
    import json

    _, changes = follow_pretrained(cfg, explicit)
    return [f"{key}={json.dumps(list(new) if isinstance(new, tuple) else new, separators=(',', ':'))}"
            for key, (_, new) in changes.items()]


def explicit_keys(config_file: str | Path | None, overrides: Collection[str] = ()) -> set[str]:
    """Dotted keys the user set in a YAML config file or a `key=value` override (leaves only)."""
    from bcc.config_parse import parse_override, read_yaml

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
