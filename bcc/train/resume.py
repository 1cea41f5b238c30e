"""Resume: which checkpoint a run continues from, whether its config may continue it, and restoring it."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.markup import escape

from bcc.checkpoint import (
    Checkpoint,
    TrainState,
    find_latest_intact,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from bcc.config import Config, config_diff, config_from_dict, config_hash
from bcc.console import console
from bcc.finetune import check_resume_stages, resolve_stages
from bcc.taxonomy import Taxonomy
from bcc.train.accel import device_caps, resolve_config
from bcc.train.ema import restore_ema
from bcc.train.setup import Components, RunInfo, StageParts, TrainError, enter_stage

# Config keys that may change when a run resumes; anything else is refused.
SAFE_RESUME_KEYS = (
    "train.epochs",
    "train.log_every",
    "train.preempt_check_steps",
    "data.workers",
    "data.eval_batch_size",
    "data.on_corrupt",  # a run stopped by a damaged sample continues with skip from its last checkpoint
    # how remote shards are read, not which samples: a retry resumes at the failed sample (a run that died
    # of a slow object store is resumed with a longer time-out or more retries)
    "data.read_timeout_s",
    "data.retries",
    # how the run is executed, not what it computes: a requeued job may need a longer collective timeout,
    # or to drop a compiler that fails on another node (compiled and eager runs share checkpoints)
    "train.timeout_s",
    "train.compile",
    "train.compile_backend",
    "train.compile_mode",
    "train.ddp_static_graph",
    "train.ddp_gradient_as_bucket_view",
    "checkpoint.",
    "eval.",
    "run.",
)


def is_safe_resume_key(key: str) -> bool:
    """Whether a resumed run may hold `key` at another value than the run it continues (SAFE_RESUME_KEYS)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_RESUME_KEYS)


def resume_path(cfg: Config, run_dir: Path, *, warn: bool = True) -> Path | None:
    """The checkpoint `checkpoint.resume` names: none, the run dir's latest intact one (auto), or a given
    path (checked when loaded: a damaged one is an error, never replaced by another).

    auto passes over damaged checkpoints (files that differ from their hashes) to the newest intact
    one, with one warning line per damaged checkpoint (`warn=False` for a look ahead of the resume
    itself, so a run says it once); raises TrainError when every one is damaged.
    """
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        path, damaged = find_latest_intact(run_dir / "checkpoints")
        for _damaged_path, reason in damaged if warn else ():
            then = f"resuming from the previous complete checkpoint {path.name}" if path else "no intact one is left"
            # one line whatever the width: a grep-able record in a Slurm log
            console.print(f"[yellow]warning:[/] {escape(reason)}; {then}", soft_wrap=True)
        if path is None and damaged:
            raise TrainError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged; the newest: {damaged[0][1]}")
        return path
    if not Path(choice).exists():
        raise TrainError(f"checkpoint.resume: {choice} does not exist")
    return resolve_checkpoint(choice, prefer="latest")


def follow_run_source(cfg: Config, explicit: Collection[str] = ()) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """`cfg` with data.mean/std/image_size/crop_pct following the run's pretrained source
    (`bcc.pretrained.follow_pretrained`), unless `explicit` names them. Call it before `fit` and before
    the config is saved.

    A run that resumes follows its checkpoint's config instead: it holds the values the weights were
    trained with, and the pretrained source may have moved or gone since.
    Returns (config, {"data.<field>": (old, new)} for the values that changed).
    """
    from bcc.pretrained import SourcePreprocess, follow_pretrained, follow_source

    if not cfg.model.pretrained:
        return cfg, {}
    path = resume_path(cfg, Path(cfg.run.dir), warn=False)
    if path is None:
        return follow_pretrained(cfg, explicit)
    saved = read_meta(path).get("config")
    if not isinstance(saved, Mapping):
        return cfg, {}
    d = config_from_dict(saved).data
    pre = SourcePreprocess(mean=d.mean, std=d.std, image_size=d.image_size, crop_pct=d.crop_pct,
                           origin=f"checkpoint {path}")
    data, changes = follow_source(cfg.data, pre, explicit)
    return dataclasses.replace(cfg, data=data), {f"data.{k}": v for k, v in changes.items()}


def check_resume_compatible(saved: Config, current: Config, saved_meta: Mapping, taxonomy: Taxonomy,
                            dataset: str | None = None) -> list[str]:
    """Refuse a checkpoint of another task or model; list config changes, accept only safe ones. A new
    `data.shards` is safe when it holds the same dataset: `dataset` (this run's `Manifest.fingerprint`)
    equal to the checkpoint's (a store moved, a mirror, pipe: instead of http)."""
    if saved_meta.get("taxonomy") != taxonomy.to_dict():
        try:
            saved_classes = list(Taxonomy.from_dict(saved_meta["taxonomy"]).class_names)
        except Exception:  # an unreadable taxonomy is just as much a mismatch
            saved_classes = "?"
        raise TrainError(
            f"checkpoint was trained with another taxonomy: classes {saved_classes} vs this dataset's "
            f"{list(taxonomy.class_names)}"
        )
    if saved.model != current.model:
        diff = {k: v for k, v in config_diff(saved, current).items() if k.startswith("model.")}
        raise TrainError(f"checkpoint was trained with another model: {diff}")
    changes = []
    unsafe = []
    for key, (old, new) in config_diff(saved, current).items():
        changes.append(f"{key}: {old!r} -> {new!r}")
        moved = key == "data.shards" and dataset is not None and saved_meta.get("dataset") == dataset
        if moved:
            changes[-1] += " (the same dataset: its shards' sha256s match the checkpoint's)"
        elif not is_safe_resume_key(key):
            unsafe.append(key)
    if unsafe:
        hint = ""
        if "train.lr" in unsafe:  # both sides hold the rate after train.lr_scale, which the user may not have touched
            hint = (f" (train.lr is compared after train.lr_scale: the checkpoint trained at {saved.train.lr:g}; "
                    "with train.lr_scale, another number of processes, data.batch_size or train.grad_accum gives "
                    f"another rate: set train.lr={saved.train.lr:g} train.lr_scale=none to continue at it)")
        raise TrainError(
            "config differs from the checkpoint's in keys that change the run: "
            + "; ".join(c for c in changes if c.split(":")[0] in unsafe) + hint
            + f". Safe to change on resume: {', '.join(SAFE_RESUME_KEYS)}. Start a new run.dir instead."
        )
    return changes


def restore(path: Path, parts: Components, accelerator: Accelerator, info: RunInfo, dataset: str | None = None
            ) -> tuple[TrainState, StageParts, dict | None]:
    """Load `path` into the run: checks, weights, the stage's optimizer and scaler.

    Returns the loop state, the stage parts, and this rank's saved RNG state (to restore once the
    epoch's loader exists; None for a rank the saved run did not have). A checkpoint written by an
    older bcc is read in today's config names (`config_from_dict` migrates them).
    """
    ckpt: Checkpoint = load_checkpoint(path)
    # resolved as the running config was (a no-op for a checkpoint of this bcc, which records resolved
    # values; an older one holds `auto` switches it never resolved)
    saved_cfg = resolve_config(config_from_dict(ckpt.meta["config"]), device_caps(accelerator.device),
                               info.world_size)
    changes = check_resume_compatible(saved_cfg, parts.cfg, ckpt.meta, parts.taxonomy, dataset)
    # a safe-looking change (more epochs) must not move stage boundaries the run has passed
    saved_stages = resolve_stages(saved_cfg.finetune, saved_cfg.train.epochs, list(parts.groups),
                                  saved_cfg.train.warmup_steps)
    check_resume_stages(saved_stages, parts.stages, ckpt.state.epoch)
    for change in changes:
        console.print(f"[yellow]resume:[/] config change accepted: {change}")
    saved_world = ckpt.meta.get("world_size")
    if saved_world != info.world_size:
        if ckpt.state.batches_in_epoch:
            raise TrainError(
                f"checkpoint {path} was written mid-epoch by {saved_world} processes; this run has "
                f"{info.world_size}. A mid-epoch resume replays each rank's stream, so it needs the "
                "same number of processes (an epoch-end checkpoint can resume on any number)."
            )
        console.print(f"[yellow]resume:[/] {saved_world} -> {info.world_size} processes at an epoch "
                      "boundary: the data order from here on differs from the original run")
    state = ckpt.state
    if state.batches_in_epoch % parts.cfg.train.grad_accum:
        console.print(f"[yellow]resume:[/] {path} was saved inside a gradient-accumulation window (batch "
                      f"{state.batches_in_epoch}, train.grad_accum={parts.cfg.train.grad_accum}) by an older bcc: "
                      "the partial window's gradients were not saved, so this resume is not exact")
    state.config_hash = config_hash(parts.cfg)
    parts.model.load_state_dict(ckpt.model)
    restore_ema(parts.ema, ckpt.ema, path)
    stage = enter_stage(parts, accelerator, state.stage)
    stage.optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt.scaler)
    console.print(
        f"resumed from [bold]{path}[/] at epoch {state.epoch} step {state.step} "
        f"(batch {state.batches_in_epoch} of the epoch), stage {state.stage}"
    )
    return state, stage, ckpt.rng[info.rank] if info.rank < len(ckpt.rng) else None
