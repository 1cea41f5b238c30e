"""Writing checkpoints: the atomic step directory, `last`/`best` links, top-k retention, and
`CheckpointManager`, the one writer the trainer calls. The layout and the readers are in
`bcc.checkpoint` (`find_latest`, `load_checkpoint`), which re-exports `CheckpointManager`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from bcc.atomic import atomic_path, atomic_write
from bcc.checkpoint import (
    _OLD_RE,
    _TMP_PREFIX,
    BEST_LINK,
    BEST_META,
    BEST_WEIGHTS,
    EMA_FILE,
    EXTRA_FILE,
    HASHED_KEY,
    HASHES_FILE,
    HASHES_FORMAT,
    LAST_LINK,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    TrainState,
    _sha256,
    _step_dirs,
    checkpoint_name,
    find_latest,
    is_complete,
    read_meta,
)
from bcc.errors import storage_error

# --------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. directories on Windows: nothing more we can do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cpu_tensors(tensors: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """CPU, contiguous, unshared tensors: safetensors refuses shared storage, so later sharers are cloned."""
    out, seen = {}, set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{what}[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


# file writes go through bcc.atomic (temp sibling, fsync, rename); the step directory around them is
# this module's own atomic unit (`CheckpointManager.save`)


def _write_safetensors(tensors: Mapping[str, Tensor], path: Path, what: str) -> None:
    cpu = _cpu_tensors(tensors, what)
    with atomic_path(path) as tmp:
        save_file(cpu, tmp, metadata={"format": "pt"})


def _write_error(e: BaseException) -> OSError | None:
    """The OSError that made a write fail (a full disk also inside torch's or safetensors' own error)."""
    return storage_error(e) or (e if isinstance(e, OSError) else None)


def _write_pt(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def _write_json(obj: Any, path: Path) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: content is not JSON-serialisable: {e}") from e
    with atomic_write(path) as f:
        f.write(text + "\n")


def _replace_link(link: Path, target: str) -> None:
    """Point `link` at the relative `target` atomically: a temp link renamed over the old one."""
    tmp = link.with_name(f"{_TMP_PREFIX}link-{link.name}-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _remove_dir(path: Path) -> None:
    """Rename aside, then delete: a half-deleted checkpoint never sits under a `step-*` name."""
    aside = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class CheckpointManager:
    """Writes checkpoints under `root` and keeps the last `keep_last`, the top `keep_top_k` by the
    tracked metric, and the best. Only the main process may call `save`; the manager's state lives in the
    checkpoints themselves (`TrainState.top_k`, `best_*`), so a new manager on the same root, given
    the restored `TrainState`, continues where the old one stopped.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last: int,
        keep_top_k: int,
        metric: str,
        mode: Literal[max, min],
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"keep_last must be >= 1 (the newest checkpoint is what resume needs), got {keep_last!r}"
            )
        if not isinstance(keep_top_k, int) or keep_top_k < 0:
            raise ValueError(f"keep_top_k must be >= 0, got {keep_top_k!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.root = Path(root)
        self.run_dir = self.root.parent
        self.keep_last = keep_last
        self.keep_top_k = keep_top_k
        self.metric = metric
        self.mode = mode
        # no cleanup here: the loop may build a manager on every rank, and only the saver may touch tmp dirs

    # -- metric bookkeeping (pure: only touches the given state)

    def is_better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def record(self, state: TrainState, value: float) -> bool:
        """Enter `value` for `state.step` into `state.top_k` and `state.best_*`; True if it is a new best.

        A NaN metric (a diverged run) is never best and never enters the top-k. Ties keep the earlier step.
        """
        value = float(value)
        if math.isnan(value):
            return False
        name = checkpoint_name(state.step)
        # re-saving a step (epoch end right after a periodic save) replaces its entry
        entries = [e for e in state.top_k if e["step"] != state.step]
        if self.keep_top_k:
            entries.append({"step": state.step, "metric": value, "name": name})
            sign = -1.0 if self.mode == "max" else 1.0
            entries.sort(key=lambda e: (sign * e["metric"], e["step"]))
            entries = entries[: self.keep_top_k]
        state.top_k = entries
        if (
            state.best_step == state.step
            or state.best_metric is None
            or self.is_better(value, state.best_metric)
        ):
            state.best_metric, state.best_step = value, state.step
            return True
        return False

    # -- saving

    def save(self, ckpt: Checkpoint, metric_value: float | None = None) -> Path:
        """Write `ckpt` atomically as `root/step-XXXXXXXX` and apply retention; returns that path.

        With `metric_value`, `ckpt.state.top_k` and `best_*` are updated before writing, so the
        written `trainer_state.json` carries them. Checkpoints with a step above `ckpt.state.step`
        belong to a timeline abandoned by resuming from an earlier checkpoint and are deleted, or
        `find_latest` would resume from them.
        """
        state = ckpt.state
        name = checkpoint_name(state.step)
        self.root.mkdir(parents=True, exist_ok=True)
        before = (list(state.top_k), state.best_metric, state.best_step)
        if metric_value is not None:
            self.record(state, metric_value)
        self._clean_tmp()
        tmp = self.root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        try:
            tmp.mkdir()
            self._write_files(ckpt, tmp)
            _fsync_path(tmp)
            final = self._install(tmp, self.root / name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # a checkpoint that was never written must not become the best or enter the top-k
            state.top_k, state.best_metric, state.best_step = before
            cause = _write_error(e)
            if cause is not None:  # a full disk, a quota, a read-only mount: the user's to fix
                raise CheckpointError(self._write_failure(name, cause)) from e
            raise
        try:
            self._sync_best(ckpt)
        except Exception as e:
            cause = _write_error(e)
            if cause is None:
                raise
            raise CheckpointError(f"checkpoint {final} is complete (resume takes it), but the best model's copy "
                                  f"{self.run_dir / BEST_WEIGHTS} could not be written: {cause.strerror or cause}") from e
        _replace_link(self.root / LAST_LINK, name)
        _fsync_path(self.root)
        self._retain(state)
        return final

    def _write_failure(self, name: str, e: OSError) -> str:
        """What a failed write means for the user: the cause, and which checkpoint resume will use."""
        previous = find_latest(self.root)
        kept = (f"the previous checkpoint {previous} is intact" if previous is not None
                else "no earlier checkpoint exists")
        cause = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            cause += f" ({shutil.disk_usage(self.root).free / 2**20:.0f} MiB free)"
        return f"cannot write checkpoint {name} in {self.root}: {cause}; {kept} (nothing was written)"

    def _write_files(self, ckpt: Checkpoint, d: Path) -> None:
        _write_safetensors(ckpt.model, d / MODEL_FILE, "model")
        if ckpt.ema is not None:
            _write_safetensors(ckpt.ema, d / EMA_FILE, "ema")
        if ckpt.extra:
            _write_safetensors(ckpt.extra, d / EXTRA_FILE, "extra")
        _write_pt(ckpt.optimizer, d / OPTIMIZER_FILE)
        if ckpt.scheduler is not None:
            _write_pt(ckpt.scheduler, d / SCHEDULER_FILE)
        if ckpt.scaler is not None:
            _write_pt(ckpt.scaler, d / SCALER_FILE)
        _write_pt(list(ckpt.rng), d / RNG_FILE)
        _write_json({**ckpt.meta, HASHED_KEY: HASHES_FILE}, d / META_FILE)
        _write_json(ckpt.state.to_dict(), d / STATE_FILE)  # its presence marks the dir complete
        # last: the hashes of what is now on disk, read back (from the page cache; ~1 GB/s per core, a
        # fraction of the write time), so damage after this point is found on load
        hashes = {f.name: _sha256(f.read_bytes()) for f in sorted(d.iterdir()) if f.is_file()}
        _write_json({"format": HASHES_FORMAT, "algorithm": "sha256", "files": hashes}, d / HASHES_FILE)

    def _install(self, tmp: Path, final: Path) -> Path:
        """Rename `tmp` to `final`. A dir of that name (same step saved again) is renamed aside first and
        deleted after; `find_latest` and `_clean_tmp` recover it if a crash falls between the renames."""
        old = None
        if final.exists():
            old = self.root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _clean_tmp(self) -> None:
        """Remove what an interrupted save left behind (only the main process saves, so none is live)."""
        for p in self.root.iterdir():
            if not p.name.startswith(_TMP_PREFIX):
                continue
            m = _OLD_RE.match(p.name)
            if m and not (self.root / m.group(1)).exists() and is_complete(p):
                os.replace(p, self.root / m.group(1))  # the re-save died between its two renames
            elif p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.run_dir.glob(f".{BEST_WEIGHTS[:-len('.safetensors')]}.*.tmp-*"):  # bcc.atomic's temp names
            p.unlink(missing_ok=True)

    def _sync_best(self, ckpt: Checkpoint) -> None:
        """Point `best` and `RUN/model_best.*` at `state.best_step` if they do not already (also repairs
        a crash between an earlier rename and this update)."""
        state = ckpt.state
        if state.best_step is None:
            return
        name = checkpoint_name(state.best_step)
        source = self.root / name
        if not is_complete(source):
            return  # best from an earlier run whose dir is gone: nothing to point at
        link = self.root / BEST_LINK
        if not (link.is_symlink() and os.readlink(link) == name):
            _replace_link(link, name)
        weights, info = self.run_dir / BEST_WEIGHTS, self.run_dir / BEST_META
        try:
            current = json.loads(info.read_text()).get("step")
        except (OSError, ValueError):
            current = None
        if current == state.best_step and weights.is_file():
            return
        # weights first: model_best.json naming a step is the promise that the weights are that step's
        if state.best_step == state.step:
            _write_safetensors(ckpt.model, weights, "model")
            meta = ckpt.meta
        else:
            with atomic_path(weights) as tmp:
                shutil.copyfile(source / MODEL_FILE, tmp)
            meta = read_meta(source)
        _write_json(
            {"step": state.best_step, "metric": self.metric, "value": state.best_metric, "checkpoint": name,
             "meta": meta},
            info,
        )
        _fsync_path(self.run_dir)

    def _retain(self, state: TrainState) -> None:
        dirs = _step_dirs(self.root)
        complete = sorted(s for s, p in dirs.items() if s <= state.step and is_complete(p))
        keep = set(complete[-self.keep_last :]) | {state.step}
        keep |= {int(e["step"]) for e in state.top_k}
        if state.best_step is not None:
            keep.add(state.best_step)
        for step, path in sorted(dirs.items()):
            if step not in keep:
                _remove_dir(path)
