"""`fit(cfg)`: train (or resume) one run. Set-up, resume, the epoch loop, the final test and the summary.

The stages it strings together live beside it: `setup` (components built once), `epoch`
(`train_one_epoch`, `evaluate`), `resume`, `runlog` (metrics.jsonl, progress) and `preempt`.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from rich.markup import escape

from bcc import __version__
from bcc.atomic import write_json
from bcc.checkpoint import (
    Checkpoint,
    TrainState,
    find_latest,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_rng_state,
)
from bcc.checkpoint_store import CheckpointManager
from bcc.config import Config, config_hash, config_to_dict, save_config
from bcc.console import console, keeping_notes, set_main_process
from bcc.errors import EXIT_PREEMPTED, raised_alike
from bcc.finetune import stage_at
from bcc.manifest import Manifest
from bcc.metrics import EvalMetrics
from bcc.model import count_parameters
from bcc.operating_point import (
    check_val_fittable,
    parse_operating_point,
    threshold_for,
)
from bcc.runtime import cpu_report
from bcc.sources import load_data, source_counts, sources_of, weighted_class_counts
from bcc.stream import TrainLoader, eval_loader, train_batches, workers_note
from bcc.trackers import require_trackers, start_trackers
from bcc.train import preempt as preemption
from bcc.train.accel import CompileCounter, StageCompiles, describe, make_accelerator
from bcc.train.ema import ema_state, evaluate_ema
from bcc.train.epoch import evaluate_split, sync_buffers, train_one_epoch
from bcc.train.preflight import check_precision, preflight
from bcc.train.resume import restore, resume_path
from bcc.train.runlog import RunLog, scalar_metrics
from bcc.train.setup import Components, RunInfo, StageParts, TrainError, build_components, enter_stage
from bcc.train.source_eval import evaluate_split_by_source
from bcc.train.val_fit import calibrate_in_memory

PRETRAINED_FILE = "pretrained.json"  # RUN/pretrained.json: the `PretrainedRecord` of the run's start, + `overlap`


@dataclass
class Run:
    """The objects `fit` passes around: built once (`stage` is rebuilt at stage boundaries)."""

    cfg: Config
    accelerator: Accelerator
    info: RunInfo
    manifest: Manifest
    parts: Components
    metrics: EvalMetrics
    ckpt: CheckpointManager
    log: RunLog
    run_dir: Path
    name: str
    pin_memory: bool
    stage: StageParts | None = None
    state: TrainState | None = None
    compiles: CompileCounter = field(default_factory=CompileCounter)  # torch.compile compilations per stage
    pretrained: dict | None = None  # `PretrainedRecord.to_dict()` of the weights the run started from
    by_source: dict | None = None  # data.sources: the last `eval`'s metrics per source
    noted: set = field(default_factory=set)  # (split, source) said to have no samples there

    def loader(self, split: str, manifest: Manifest | None = None):
        return eval_loader(manifest or self.manifest, split, self.cfg.data, rank=self.info.rank,
                           world_size=self.info.world_size, pin_memory=self.pin_memory)

    def eval(self, split: str, title: str, collect=None) -> dict:
        """The split's metrics (of all sources together); with data.sources, `by_source` holds each
        source's, from the same pass."""
        every = sources_of(self.manifest)
        sources = {name: m for name, m in every.items() if m.split(split).count}
        for name in [n for n in every if n not in sources and (split, n) not in self.noted]:  # once, not each time
            console.print(f"note: source '{name}' is not evaluated on '{split}': its '{split}' split holds no samples")
            self.noted.add((split, name))
        if not sources:
            return evaluate_split(split, self.loader(split), self.parts, self.stage, self.metrics,
                                  self.accelerator, self.info, title, collect)
        loaders = {name: self.loader(split, m) for name, m in sources.items()}
        per_source = {name: EvalMetrics(self.parts.taxonomy, device=self.accelerator.device) for name in sources}
        result, self.by_source = evaluate_split_by_source(split, loaders, self.parts, self.stage, self.metrics,
                                                          per_source, self.accelerator, self.info, title, collect)
        return result

    def log_eval(self, row: dict, result: dict) -> None:
        """The metrics rows of an `eval`: one per source (`source`: its name) when there are several, then
        the combined row (no `source`), all at the current step."""
        if self.by_source:
            for name, res in self.by_source.items():
                self.log.log({**row, "source": name, **scalar_metrics(res)}, self.state.step)
            self.by_source = None
        self.log.log({**row, **scalar_metrics(result)}, self.state.step)


def setup_run(cfg: Config) -> Run:
    """Accelerator, data sizes, components; validates what can fail before the first step.

    The run's config is `cfg` resolved for the device (`bcc.train.accel.resolve_config`: precision, memory
    format, cuDNN/TF32 switches and the scaled lr made concrete), logged once; checkpoints record it."""
    trackers = require_trackers(cfg.run.report_to)  # before the Accelerator, which drops missing ones silently
    raw = cfg
    acc, cfg = make_accelerator(raw, log_with=trackers or None, project_dir=raw.run.dir)
    set_main_process(acc.is_main_process)
    check_precision(cfg.train.mixed_precision, acc.device)
    print(f"bcc: rank {acc.process_index}/{acc.num_processes} local {acc.local_process_index} "
          f"on {socket.gethostname()} device {acc.device} {cpu_report()}", flush=True)
    console.print(f"device settings: {describe(raw, cfg, acc.num_processes)}", markup=False, highlight=False,
                  soft_wrap=True)
    manifest = load_data(cfg.data)  # data.shards (its fold view), or the sources of data.sources
    if not manifest.has_checksums:
        console.print(f"note: {manifest.shown} is pack format {manifest.format_version}: its samples carry no "
                      "checksum, so a damaged image is not detected as it is read; repack it with this bcc to "
                      "check every sample", soft_wrap=True)
    if note := workers_note(cfg.data.workers):
        console.print(f"note: {note}", soft_wrap=True)
    taxonomy = manifest.taxonomy
    overlap = preflight(cfg, manifest, acc)  # splits, shards, metric, backbone: once, before anything is built
    check_val_fittable(cfg, manifest)  # refused before training: no binary head, or a val split lacking a class
    train_split = manifest.split(cfg.data.train_split)
    bpe = train_batches(manifest, cfg.data, acc.num_processes)
    if bpe % cfg.train.grad_accum:
        error = TrainError(f"{bpe} batches per epoch per rank is not a multiple of train.grad_accum={cfg.train.grad_accum}")
        error.shared = "job"  # computed from what the preflight checked
        raise error
    info = RunInfo(world_size=acc.num_processes, rank=acc.process_index, batches_per_epoch=bpe,
                   steps_per_epoch=bpe // cfg.train.grad_accum, total_epochs=cfg.train.epochs)
    run_dir = Path(cfg.run.dir)
    # a resumed run takes its weights from the checkpoint: the pretrained source is not read again
    resuming = resume_path(cfg, run_dir, warn=False) is not None
    # loss.class_weights=auto: the class counts an epoch trains on (each source's counted weight times)
    parts = build_components(cfg, taxonomy, weighted_class_counts(manifest, train_split.name), acc.device,
                             pretrained=not resuming)
    if cfg.train.compile:  # every stage adds a compiled variant; past dynamo's limit it would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(parts.stages) + 2)
    record = getattr(parts.model, "pretrained_record", None)
    # per-rank seed for dropout: ranks see different data anyway, but should not share masks
    torch.manual_seed(cfg.train.seed * 1000 + acc.process_index)
    c = cfg.checkpoint
    return Run(cfg=cfg, accelerator=acc, info=info, manifest=manifest, parts=parts,
               metrics=EvalMetrics(taxonomy, device=acc.device),
               ckpt=CheckpointManager(run_dir / "checkpoints", keep_last=c.keep_last, keep_top_k=c.keep_top_k,
                                      metric=c.metric, mode=c.mode),
               log=RunLog(run_dir, acc.is_main_process, accelerator=acc), run_dir=run_dir,
               name=cfg.run.name or run_dir.resolve().name, pin_memory=acc.device.type == "cuda",
               # with the images this run evaluates that the source trained on (preflight's warning), where
               # RESULTS.md / CV.md read it: RUN/pretrained.json and the checkpoints' meta
               pretrained={**record.to_dict(), "overlap": overlap} if record is not None else None)


def train_from_config(config_file, overrides) -> dict:
    """What `python -m bcc.train --config FILE KEY=VALUE...` does, for the entry point and for `bcc compare`
    / `bcc cv` runs in this process: load the config, let the data follow the pretrained source where the
    user did not set them (before `fit` saves the config), train. Returns `fit`'s result."""
    from bcc.config import load_config
    from bcc.pretrained import explicit_keys
    from bcc.train.resume import follow_run_source

    with raised_alike():  # every rank reads the same config and pretrained source
        cfg = load_config(config_file, list(overrides))
        cfg, changed = follow_run_source(cfg, explicit_keys(config_file, list(overrides)))
    for key, (old, new) in changed.items():
        console.print(f"{key}: {old} -> {new}, as the pretrained source was trained (set {key} to keep yours)",
                      markup=False, highlight=False, soft_wrap=True)
    return fit(cfg)


def fit(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`. Returns {"val", "test", "calibration", "train_time"}
    or {"preempted": True, "step"}. Raises TrainError (and other BccErrors) for the user. The `note:` and
    `warning:` lines printed at start-up are saved in the run directory too (`notes.json`)."""
    with keeping_notes() as notes:
        return _fit(cfg, notes)


def _fit(cfg: Config, notes: list[str]) -> dict:
    flag = preemption.PreemptionFlag()  # first: a SIGUSR1 in set-up is kept for the first vote; a SIGTERM ends it
    with raised_alike():  # set-up reads the same config, manifests and weights on every rank
        run = setup_run(cfg)
    flag.attach(timeout_s=run.cfg.train.timeout_s)
    acc, info = run.accelerator, run.info
    if acc.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        preemption.clear_marker(run.run_dir)
    acc.wait_for_everyone()
    with raised_alike():  # a refused resume: every rank compares the same checkpoint with the same config
        path, pending_rng = resume_path(cfg, run.run_dir), None
        if path is not None:
            run.state, run.stage, pending_rng = restore(path, run.parts, acc, info, run.manifest.fingerprint())
            run.compiles.enter(run.state.stage)
            run.pretrained = read_meta(path).get("pretrained")  # what the run started from, carried on
        elif find_latest(run.run_dir / "checkpoints") is not None:
            raise TrainError(f"{run.run_dir} already holds checkpoints of another run; continue it with "
                             "checkpoint.resume=auto or choose another run.dir")
        else:
            run.state = TrainState(config_hash=config_hash(run.cfg))
            _enter(run, 0, carry=False)
    # only now that a resume was accepted (or this is a fresh start): a refused one leaves the files alone
    if acc.is_main_process:
        save_config(cfg, run.run_dir / "config.yaml")
        if path is None and run.pretrained is not None:  # a fresh start from pretrained weights
            write_json(run.run_dir / PRETRAINED_FILE, run.pretrained)
    run.log.prune(run.state.step if path is not None else -1)
    log_sources(run, fresh=path is None)
    start_trackers(acc, cfg.run.report_to, run.run_dir, run.name, config_to_dict(cfg),
                   resumed_step=run.state.step)
    acc.wait_for_everyone()
    console.print(f"[bold]bcc train[/] {run.name}: {info.world_size} process(es), {info.batches_per_epoch} "
                  f"batches/epoch/rank, {len(run.parts.stages)} stage(s), "
                  f"{count_parameters(run.parts.model, trainable_only=True):,} trainable of "
                  f"{count_parameters(run.parts.model):,} parameters -> {run.run_dir}")
    last_val: dict = {}
    run.log.start_clock()  # `time` in metrics.jsonl: seconds of this process's training, set-up excluded
    # loader workers start once and serve every epoch; an epoch that stops early (preemption, an error)
    # ends them itself, and close() ends them after the last epoch
    batches = TrainLoader(run.manifest, cfg.data, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                          pin_memory=run.pin_memory)
    # after the loader's own start-up warnings (/dev/shm): a Slurm job's stdout may be lost
    run.log.save_notes(notes, run.state.step, fresh=path is None)
    flag.training_begins()  # from here a SIGTERM is kept for the vote: there is work to save
    while run.state.epoch < info.total_epochs:
        epoch = run.state.epoch
        stage_index, _ = stage_at(run.parts.stages, epoch)
        if stage_index != run.state.stage:
            _enter(run, stage_index, carry=True)
            console.print(f"stage {stage_index}: training {', '.join(run.parts.stages[stage_index].train)}")
        loader = batches.epoch(epoch, skip_batches=run.state.batches_in_epoch)
        if pending_rng is not None:  # restored after the loader exists, so nothing the loader draws can shift it
            restore_rng_state(pending_rng)
            pending_rng = None
        t_epoch = run.log.elapsed()
        run.log.begin_epoch(epoch=epoch + 1, epochs=info.total_epochs, batches=info.batches_per_epoch,
                            done=run.state.batches_in_epoch, stage=run.state.stage)
        preempted = train_one_epoch(loader, run.parts, run.stage, run.state, acc, info, flag, run.log, lambda: save(run))
        run.log.end_epoch()
        if preempted:
            save(run)
            return finish_preempted(run, flag, batches)
        if cfg.data.on_corrupt == "skip":  # damaged samples left out this epoch, all ranks (a resumed
            # epoch counts its resumed part)
            skipped = sum(gather_object([len(loader.skipped)]))
            run.log.log({"epoch": epoch + 1, "split": cfg.data.train_split, "skipped_corrupt": skipped},
                        run.state.step)
        run.state.epoch += 1
        run.state.batches_in_epoch = 0
        metric_value = None
        if (epoch + 1) % cfg.eval.every_epochs == 0 or run.state.epoch == info.total_epochs:
            last_val = run.eval(cfg.data.val_split, f"after epoch {run.state.epoch}")
            last_val.update(evaluate_ema(run, cfg.data.val_split, f"after epoch {run.state.epoch}"))  # ema_* (if any)
            run.log_eval({"epoch": epoch + 1, "split": cfg.data.val_split, "stage": run.state.stage,
                          "time": round(run.log.elapsed(), 2), "train_seconds": round(run.log.elapsed() - t_epoch, 2)},
                         last_val)
            metric_value = float(last_val[cfg.checkpoint.metric])
        save(run, metric_value)
        if run.state.epoch < info.total_epochs and flag.agreed():  # the epoch's last vote, after its checkpoint
            return finish_preempted(run, flag, batches)
    batches.close()
    log_compiles(run, run.compiles.finish())
    result = {"val": last_val, "train_time": run.log.elapsed(), **best_checkpoint_passes(run)}
    write_summary(run, result)
    acc.wait_for_everyone()
    acc.end_training()  # finishes the trackers and ends the process group
    return result


def log_sources(run: Run, fresh: bool) -> None:
    """The sources of `data.sources` with their weights and sample counts: printed at every start, and
    logged as metrics rows (`split: sources`, one per source) at a fresh start."""
    if not sources_of(run.manifest):
        return
    d = run.cfg.data
    rows = source_counts(run.manifest, [d.train_split, d.val_split, d.test_split])
    for row in rows:
        console.print(f"source {row['source']}: weight {row['weight']:g}, "
                      + ", ".join(f"{k.removesuffix('_samples')} {v}" for k, v in row.items() if k.endswith("_samples"))
                      + f" samples ({row['shards']}); data.sampling={d.sampling}", markup=False, highlight=False,
                      soft_wrap=True)
        if fresh:
            run.log.log({"epoch": 0, "split": "sources", **row}, 0)


def finish_preempted(run: Run, flag: preemption.PreemptionFlag, batches: TrainLoader) -> dict:
    """After the preemption checkpoint: the marker with the signal the ranks agreed on, the loader
    workers and trackers ended (a requeued run continues the trackers), and the result."""
    batches.close()
    log_compiles(run, run.compiles.finish())
    if run.accelerator.is_main_process:
        preemption.write_marker(run.run_dir, run.state.step, flag.agreed_signum)
    console.print(f"[yellow]preempted[/]: saved at step {run.state.step}; exiting with {EXIT_PREEMPTED}")
    run.accelerator.wait_for_everyone()  # the group ends in order (see bcc.runtime.shutdown_distributed)
    run.accelerator.end_training()
    return {"preempted": True, "step": run.state.step}


def _enter(run: Run, index: int, carry: bool) -> None:
    run.stage = enter_stage(run.parts, run.accelerator, index, run.stage, carry)
    run.state.stage = index
    run.state.trainable = list(run.parts.stages[index].train)
    log_compiles(run, run.compiles.enter(index))


def log_compiles(run: Run, done: StageCompiles | None) -> None:
    """With `train.compile`: a finished stage's compilations, on the console and in metrics.jsonl
    (`{"split": "compile", "stage", "frames", "recompiles"}`); a warning with dynamo's reason when the stage
    recompiled more than once (one is the stage change)."""
    if done is None or not run.cfg.train.compile:
        return
    run.log.log({"epoch": run.state.epoch, "split": "compile", "stage": done.stage, "frames": done.frames,
                 "recompiles": done.recompiles}, run.state.step)
    line = f"stage {done.stage}: {done.frames} frame(s) compiled, {done.recompiles} recompilation(s)"
    if done.recompiles > 1:
        console.print(f"[yellow]warning:[/] compile: {line}, more than the stage change's one; the first: "
                      f"{escape(done.reasons[0])} (TORCH_LOGS=recompiles shows all)", soft_wrap=True)
    else:
        console.print(f"compile: {line}", markup=False, highlight=False)


def save(run: Run, metric_value: float | None = None) -> None:
    """Checkpoint the run (collective: every rank's RNG is gathered; the main process writes)."""
    acc = run.accelerator
    sync_buffers(run.parts.model, run.info.world_size)
    rng = gather_object([save_rng_state()])  # every rank's RNG, in rank order
    ema = ema_state(run.parts.ema, run.info.world_size)  # collective: the EMA's buffers become rank 0's
    if acc.is_main_process:
        meta = {"taxonomy": run.parts.taxonomy.to_dict(), "model": config_to_dict(run.cfg.model),
                "config": config_to_dict(run.cfg), "bcc_version": __version__, "world_size": run.info.world_size,
                "pretrained": run.pretrained, "dataset": run.manifest.fingerprint()}
        ckpt = Checkpoint(model=run.parts.model.state_dict(), optimizer=run.stage.optimizer.state_dict(),
                          scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                          rng=rng, state=run.state, meta=meta, ema=ema)
        run.ckpt.save(ckpt, metric_value)
    acc.wait_for_everyone()


def best_checkpoint_passes(run: Run) -> dict:
    """With the best checkpoint's weights (the last ones if none), on every rank: fit the temperatures
    (`eval.calibrate`) and then the operating point (`eval.operating_point`) on the val split, for the
    raw and (with `train.ema_decay`) the EMA weights, and evaluate the test split once
    (`eval.test_at_end`): the decisions at argmax, the binary head also at the fitted point (`H_op_*`)."""
    cfg, out = run.cfg, {}
    # preflight made sure the test split exists; an empty one (packed with a test fraction of 0) is skipped
    want_test = cfg.eval.test_at_end and run.manifest.split(cfg.data.test_split).count > 0
    want_point = not parse_operating_point(cfg.eval.operating_point).is_argmax
    if not (want_test or cfg.eval.calibrate or want_point):
        return out
    best = run.run_dir / "checkpoints" / "best"
    current = {k: v.clone() for k, v in run.parts.model.state_dict().items()}
    ema = run.parts.ema
    current_ema = {k: v.clone() for k, v in ema.module.state_dict().items()} if ema is not None else None
    if best.exists():
        saved = load_checkpoint(best)
        run.parts.model.load_state_dict(saved.model)
        if ema is not None and saved.ema is not None:
            ema.module.load_state_dict(saved.ema)
    if cfg.eval.calibrate or want_point:
        out.update(calibrate_in_memory(run, best))
    if want_test:
        split, where = cfg.data.test_split, f"with the {'best' if best.exists() else 'last'} checkpoint"
        point = out.get("operating_point")
        for weights, fitted in (("raw", point), ("ema", (point or {}).get("ema"))):
            # the eval path's probabilities are unscaled: the same decision's threshold there, shown on the
            # calibrated scale operating_point.json, eval and predict use
            run.metrics.report_threshold = _raw_threshold(fitted)
            run.metrics.shown_threshold = fitted.get("threshold") if fitted else None
            out["test"] = run.eval(split, where) if weights == "raw" else {**out["test"], **evaluate_ema(run, split, where)}
        run.metrics.report_threshold = run.metrics.shown_threshold = None
        row = {"epoch": run.state.epoch, "split": split, "checkpoint": "best" if best.exists() else "last"}
        chosen = point["rule"] if point else out.get("operating_point_fallback")  # None: argmax was asked
        run.log_eval({**row, **({"operating_point": chosen} if chosen else {})}, out["test"])
    run.parts.model.load_state_dict(current)
    if current_ema is not None:
        ema.module.load_state_dict(current_ema)
    return out


def _raw_threshold(point: Mapping | None) -> float | None:
    """A fitted point's threshold on the unscaled softmax (the same decision: `threshold_for`)."""
    return None if not point else threshold_for(point, 1.0)


def write_summary(run: Run, result: Mapping) -> None:
    """summary.json with cross-rank integrity: each rank's step count and a checksum of its weights."""
    acc = run.accelerator
    sync_buffers(run.parts.model, run.info.world_size)
    mine = {"rank": run.info.rank, "steps": run.state.step, "batches": run.state.epoch * run.info.batches_per_epoch,
            "weights_sha256": _weights_sha256(run.parts.model.state_dict()), "cpu_seconds": round(run.log.cpu_elapsed(), 1)}
    ema = ema_state(run.parts.ema, run.info.world_size)  # collective
    if ema is not None:
        mine["ema_sha256"] = _weights_sha256(ema)
    per_rank = gather_object([mine])
    if acc.is_main_process:
        if len({(r["weights_sha256"], r.get("ema_sha256")) for r in per_rank}) > 1:
            console.print("[bold red]warning:[/] ranks hold different weights at the end of training")
        summary = {"name": run.name, "ranks": per_rank, "state": run.state.to_dict(), "train_time": result["train_time"],
                   **{k: scalar_metrics(result[k]) for k in ("val", "test") if k in result}}
        write_json(run.run_dir / "summary.json", summary)


def _weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
