"""Checkpoint storage: atomic saves, the one tested `find_latest`, retention, weights-only loading.

Layout (`ROOT` = `RUN/checkpoints`):

    ROOT/step-00000040/model.safetensors    unwrapped model state dict
                       model_ema.safetensors  EMA of the weights (only with train.ema_decay; bcc.train.ema)
                       optimizer.pt         optimizer.state_dict()
                       scheduler.pt         LR scheduler state (only when given)
                       scaler.pt            grad scaler state (only when given)
                       rng.pt               RNG states, one entry per rank
                       extra.safetensors    extra tensors, e.g. a temperature (only when given)
                       meta.json            taxonomy, model config, resolved config, version, world size
                       trainer_state.json   `TrainState`; its presence marks completeness
                       hashes.json          sha256 of every file above, written last; meta.json says
                                            it exists (`_hashes`), so a lost one is damage (older
                                            checkpoints have neither and load unchecked)
    ROOT/last -> step-...                   relative symlinks, replaced atomically
    ROOT/best -> step-...
    RUN/model_best.safetensors (+ .json)    the best model's weights alone, for users who want only those

A checkpoint is written into `ROOT/.tmp-step-XXXXXXXX-<pid>/`, every file fsynced, then renamed into
place, so a crash at any moment leaves either the old set of checkpoints or the new one. Old
checkpoints are deleted only after the new one is in place (accelerate's `total_limit` deletes first).
`find_latest` scans the directory instead of trusting `last`, so a crash between the rename and the
link update still resumes from the newest checkpoint.

Damage after writing (a flipped byte, a truncated file) is found on load: `load_checkpoint` hashes
each file from the same bytes it deserialises (one read) and raises `DamagedCheckpointError` naming the
file; `find_latest_intact` (resume: auto) walks back from the newest complete checkpoint to the first
intact one and reports the damaged ones it passed.

Everything loads with `weights_only=True` or from safetensors: no checkpoint can execute code. That is
why the RNG states are stored as tensors and plain lists rather than numpy arrays and tuples.

This module is plain torch (no Accelerator): the loop unwraps the model, gathers every rank's RNG state
and calls `CheckpointManager.save` on the main process only.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from bcc.errors import BccError
from bcc.state import TrainState, restore_rng_state, save_rng_state

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DamagedCheckpointError",
    "TrainState",
    "checkpoint_name",
    "find_latest",
    "find_latest_intact",
    "is_complete",
    "load_checkpoint",
    "load_ema_weights",
    "load_model_weights",
    "read_meta",
    "read_train_state",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_rng_state",
    "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"  # the name `bcc export` looks for
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
EXTRA_FILE = "extra.safetensors"
META_FILE = "meta.json"
STATE_FILE = "trainer_state.json"
HASHES_FILE = "hashes.json"
HASHES_FORMAT = "bcc-checkpoint-hashes/1"
# written into meta.json by the store (and taken out again on load): this checkpoint was saved with a
# hashes.json, so one that is missing is damage, not a checkpoint of a bcc from before hashes
HASHED_KEY = "_hashes"
LAST_LINK = "last"
BEST_LINK = "best"
BEST_WEIGHTS = "model_best.safetensors"
BEST_META = "model_best.json"

_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
# A step directory moved aside while the same step is re-saved; see `_install`.
_OLD_RE = re.compile(r"^\.tmp-old-(step-\d+)-\d+$")


class CheckpointError(BccError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be written."""


class DamagedCheckpointError(CheckpointError):
    """A file of a complete checkpoint differs from what was written (its sha256 in hashes.json)."""


@dataclass
class Checkpoint:
    """What one checkpoint holds (tensors on any device; they are written from CPU copies)."""

    model: dict[str, Tensor]  # unwrapped model state dict -> model.safetensors
    optimizer: dict  # optimizer.state_dict() -> optimizer.pt
    scaler: dict | None  # grad scaler state -> scaler.pt (absent when None)
    rng: list[dict]  # `save_rng_state()` of every rank, in rank order -> rng.pt
    state: TrainState  # -> trainer_state.json
    meta: dict  # JSON-serialisable -> meta.json
    extra: dict[str, Tensor] = field(default_factory=dict)  # -> extra.safetensors (absent when empty)
    scheduler: dict | None = None  # LR scheduler state -> scheduler.pt (absent when None)
    ema: dict[str, Tensor] | None = None  # EMA of the model state dict -> model_ema.safetensors (absent when None)


def checkpoint_name(step: int) -> str:
    """`40` -> `"step-00000040"` (zero-padded so names sort by step; steps are parsed, not sorted)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return f"step-{step:08d}"


# --------------------------------------------------------------------------- finding checkpoints


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint dir is complete when it has its model and `trainer_state.json` (a step dir appears
    by one rename of a fully written temp dir; this also accepts checkpoints of bcc before hashes.json)."""
    return (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file()


def _step_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.iterdir() if root.is_dir() else ():
        step = _step_of(p)
        if step is not None and p.is_dir():
            out[step] = p
    return out


def _complete(root: Path) -> dict[int, Path]:
    candidates = {s: p for s, p in _step_dirs(root).items() if is_complete(p)}
    for p in root.iterdir() if root.is_dir() else ():
        m = _OLD_RE.match(p.name)
        if m and not (root / m.group(1)).exists() and is_complete(p):
            candidates.setdefault(int(m.group(1)[len("step-") :]), p)
    return candidates


def find_latest(root: str | Path) -> Path | None:
    """The complete `root/step-*` directory with the highest step, or None.

    Does not trust `root/last`: a crash between renaming a checkpoint into place and updating the
    link leaves the link one checkpoint behind. Temp dirs and incomplete dirs are ignored, except
    that a complete step dir moved aside by an interrupted re-save of the same step counts for that
    step (the crash came between its two renames).
    """
    candidates = _complete(Path(root))
    return candidates[max(candidates)] if candidates else None


def find_latest_intact(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files match their hashes (`verify_checkpoint`), and the
    newer complete ones passed over as damaged, newest first, each with the reason.

    Reads every file of each checkpoint it checks (the first intact one included). Checkpoints
    without `hashes.json` (older bcc) count as intact.
    """
    candidates = _complete(Path(root))
    damaged: list[tuple[Path, str]] = []
    for step in sorted(candidates, reverse=True):
        try:
            verify_checkpoint(candidates[step])
        except CheckpointError as e:
            damaged.append((candidates[step], str(e)))
            continue
        return candidates[step], damaged
    return None, damaged


def resolve_checkpoint(path: str | Path, prefer: Literal["best", "latest"] = "best") -> Path:
    """Turn what a user passes into one complete checkpoint directory.

    Accepts a step dir, a `best`/`last` link, a checkpoints dir, or a run dir (its `checkpoints/`).
    For the last two `prefer` decides: `best` (evaluation, prediction: the default) falls back to the
    latest when no best exists; `latest` (resume) ignores `best`. A `last` link resolves through
    `find_latest` rather than its possibly stale target.
    """
    path = Path(path)
    if path.name == LAST_LINK and path.is_symlink():  # even a dangling one: the dir is what counts
        latest = find_latest(path.parent)
        if latest is None:
            raise CheckpointError(f"{path}: no complete checkpoint in {path.parent}")
        return latest
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if is_complete(path):
        return path
    if _step_of(path) is not None or (path.is_symlink() and path.name == BEST_LINK):
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {STATE_FILE} or {MODEL_FILE})")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if prefer == "best" and is_complete(root / BEST_LINK):
        return root / BEST_LINK
    latest = find_latest(root)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint in {root}")
    return latest


# --------------------------------------------------------------------------- hashes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_hashes(path: str | Path) -> dict[str, str] | None:
    """`file name -> sha256` written with the checkpoint dir `path`; None for one without hashes.json."""
    file = Path(path) / HASHES_FILE
    if not file.exists():
        meta = Path(path) / META_FILE
        try:
            hashed = meta.is_file() and HASHED_KEY in json.loads(meta.read_text())
        except (OSError, ValueError):
            hashed = False  # an unreadable meta.json is reported by whoever reads it
        if hashed:
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: its {HASHES_FILE} is missing ({META_FILE} "
                                         "says it was saved with one), so its files cannot be verified")
        return None
    data = _load_json(file)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != HASHES_FORMAT:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {HASHES_FILE} is not a {HASHES_FORMAT} file")
    return {str(k): str(v) for k, v in files.items()}


def _read_checked(path: Path, hashes: dict[str, str] | None) -> bytes:
    """The bytes of one checkpoint file, checked against its hash when the checkpoint has hashes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if hashes is not None and path.name in hashes:
            raise DamagedCheckpointError(f"checkpoint {path.parent} is damaged: {path.name} is missing") from None
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    if hashes is not None and path.name in hashes:
        digest = _sha256(data)
        if digest != hashes[path.name]:
            raise DamagedCheckpointError(
                f"checkpoint {path.parent} is damaged: {path.name} ({len(data):,} bytes) has sha256 "
                f"{digest[:12]}…, written as {hashes[path.name][:12]}… ({HASHES_FILE})"
            )
    return data


def verify_checkpoint(path: str | Path) -> None:
    """Raise DamagedCheckpointError unless every file listed in `path/hashes.json` has its hash.

    A checkpoint without hashes.json (written by an older bcc) passes unchecked.
    """
    path = Path(path)
    hashes = read_hashes(path)
    for name in hashes or ():
        _read_checked(path / name, hashes)


# --------------------------------------------------------------------------- loading


def _load_pt(path: Path, map_location: Any, hashes: dict[str, str] | None = None) -> Any:
    data = _read_checked(path, hashes)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, or a pickle weights_only refuses
        raise CheckpointError(f"cannot load checkpoint file {path} (weights_only=True): {e}") from e


def _load_safetensors(path: Path, map_location: Any, hashes: dict[str, str] | None = None) -> dict[str, Tensor]:
    data = _read_checked(path, hashes)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load checkpoint file {path}: {e}") from e
    device = torch.device(map_location) if not isinstance(map_location, torch.device) else map_location
    return tensors if device.type == "cpu" else {k: v.to(device) for k, v in tensors.items()}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e


def read_train_state(path: str | Path) -> TrainState:
    """Only the `TrainState` of a checkpoint dir (cheap: no tensors are read)."""
    file = Path(path) / STATE_FILE
    try:
        return TrainState.from_dict(_load_json(file))
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def read_meta(path: str | Path) -> dict:
    """Only the `meta.json` of a checkpoint dir, so a mismatch is found before tensors are read."""
    meta = _load_json(Path(path) / META_FILE)
    if isinstance(meta, dict):
        meta.pop(HASHED_KEY, None)
    return meta


def check_trained_on(path: str | Path, fingerprint: str | None, location: str | Path) -> None:
    """Raise CheckpointError when the run's own data.shards `location`, read again by `bcc report` or `bcc
    calibrate` (`fingerprint`: its `Manifest.fingerprint`, in the run's fold view as training took it),
    is not the dataset the checkpoint at `path` trained on, as its meta.json records it: a pack re-made
    since, or another pack of the same relative name where the later command runs. Nothing is said
    where either side records no fingerprint (an older bcc, shards without sha256)."""
    import os

    from bcc.remote import is_local

    try:
        recorded = read_meta(path).get("dataset")
    except (CheckpointError, AttributeError):
        return
    if not recorded or fingerprint in (None, recorded):
        return
    relative = (f"; a relative path, read against this directory ({os.getcwd()})"
                if is_local(str(location)) and not os.path.isabs(location) else "")
    raise CheckpointError(f"data.shards {location} is not the dataset checkpoint {path} trained on: its shards' "
                          f"sha256s differ from the checkpoint's record (a pack re-made since, or another pack of "
                          f"that name{relative}); pass --data with the pack it trained on")


def load_model_weights(path: str | Path, map_location: Any = "cpu") -> dict[str, Tensor]:
    """Only the model state dict of a checkpoint dir (inference), checked against its hashes.json."""
    path = Path(path)
    return _load_safetensors(path / MODEL_FILE, map_location, read_hashes(path))


def load_ema_weights(path: str | Path, map_location: Any = "cpu") -> dict[str, Tensor] | None:
    """The EMA state dict of a checkpoint dir (`model_ema.safetensors`), checked against its hashes.json;
    None when the run kept no EMA (`train.ema_decay` unset)."""
    path = Path(path)
    hashes = read_hashes(path)
    if not (path / EMA_FILE).exists() and (hashes is None or EMA_FILE not in hashes):
        return None
    return _load_safetensors(path / EMA_FILE, map_location, hashes)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Checkpoint:
    """Load a checkpoint dir (or a link to one); every file weights-only. RNG states stay on CPU.

    Each file is hashed from the bytes it is loaded from and checked against `hashes.json` (when the
    checkpoint has one): raises DamagedCheckpointError naming the first file that differs.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not is_complete(path):
        missing = [f for f in (MODEL_FILE, STATE_FILE) if not (path / f).is_file()]
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (missing {', '.join(missing)}; {STATE_FILE} is written "
            "last, so its save was interrupted); use find_latest() to pick a complete one"
        )
    hashes = read_hashes(path)
    try:
        state = TrainState.from_dict(json.loads(_read_checked(path / STATE_FILE, hashes)))
        meta = json.loads(_read_checked(path / META_FILE, hashes))
        meta.pop(HASHED_KEY, None)
    except ValueError as e:  # JSON or TrainState
        raise CheckpointError(f"cannot read {path / STATE_FILE} or {META_FILE}: {e}") from e
    rng = _load_pt(path / RNG_FILE, "cpu", hashes)
    if not isinstance(rng, list):
        raise CheckpointError(
            f"{path / RNG_FILE}: expected a list of per-rank RNG states, got {type(rng).__name__}"
        )
    def optional(name: str) -> bool:  # present, or listed as written (then a missing file is damage)
        return (path / name).exists() or (hashes is not None and name in hashes)

    return Checkpoint(
        model=_load_safetensors(path / MODEL_FILE, map_location, hashes),
        optimizer=_load_pt(path / OPTIMIZER_FILE, map_location, hashes),
        scaler=_load_pt(path / SCALER_FILE, "cpu", hashes) if optional(SCALER_FILE) else None,
        rng=rng,
        state=state,
        meta=meta,
        extra=_load_safetensors(path / EXTRA_FILE, map_location, hashes) if optional(EXTRA_FILE) else {},
        scheduler=_load_pt(path / SCHEDULER_FILE, "cpu", hashes) if optional(SCHEDULER_FILE) else None,
        ema=_load_safetensors(path / EMA_FILE, map_location, hashes) if optional(EMA_FILE) else None,
    )


def __getattr__(name: str) -> Any:
    # `CheckpointManager` (the writer) lives in bcc.checkpoint_store, which imports this module's layout
    if name == "CheckpointManager":
        from bcc.checkpoint_store import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'bcc.checkpoint' has no attribute {name!r}")
