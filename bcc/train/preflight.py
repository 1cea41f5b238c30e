"""Preflight: everything a run will need, checked once before the first step.

A missing val shard, a `data.val_split` that names no split or an unknown backbone would otherwise
surface after an epoch, or after the whole run. `check_run` looks at the config and the manifest
(splits, their shards with the manifest's sizes and sample counts, the tracked metric, the backbone name);
`preflight` runs it on the main process only and hands the verdict to every rank (through the process
group's store, while the others wait as long as it works: `bcc.train.heartbeat`), so a job of 64
ranks stats the storage once, not 64 times. The cost is one `os.stat` per local shard and no
opening of any shard (about a second at 100,000 shards). A remote shard (`bcc.remote`: http(s) URL or
`pipe:` command) is checked by opening it: a HEAD request (its size against the manifest's count), or
the command started, its first tar block read and the command stopped; 16 at a time, each with
`data.retries` re-tries after a transient error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from accelerate import Accelerator

from bcc import activity, remote, sample_index
from bcc.config import RENAMED_METRICS, Config
from bcc.errors import BccError, Interrupted
from bcc.manifest import Manifest, ShardInfo, SplitInfo
from bcc.metrics import metric_names
from bcc.model import check_backbone_name
from bcc.pretrained_overlap import overlap_line, pretrained_overlap
from bcc.remote_secrets import quote_bytes
from bcc.shards import tar_header_ok
from bcc.sources import MixedManifest
from bcc.train import heartbeat
from bcc.train.setup import TrainError
from bcc.verify import repeated_shards

# A WebDataset sample is at least two tar members (image, json), each a 512-byte header plus at least
# one 512-byte block: a shard smaller than this per sample was truncated (or is not the packed file).
MIN_BYTES_PER_SAMPLE = 2 * 1024


def _named(paths: Sequence[str], limit: int = 3) -> str:
    more = f" (and {len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def splits_needed(cfg: Config) -> dict[str, str]:
    """Config key -> split name of every split the run reads (test only with `eval.test_at_end`)."""
    d = cfg.data
    keys = {"data.train_split": d.train_split, "data.val_split": d.val_split}
    if cfg.eval.test_at_end:
        keys["data.test_split"] = d.test_split
    return keys


def _size_problem(shard: ShardInfo, size: int) -> str | None:
    """Why a shard of `size` bytes is not the one packed, or None. A pack of format 5 records each shard's
    size: anything else was cut or replaced. Older packs: a lower bound per sample."""
    if shard.bytes is not None:
        return None if size == shard.bytes else f"{size} bytes, the manifest says {shard.bytes}"
    return None if size >= shard.count * MIN_BYTES_PER_SAMPLE else f"{size} bytes for {shard.count} samples"


def _foreign_start(location: str, timeout_s: float) -> str:
    """`; it begins '...'` when the bytes at a remote shard of the wrong size are no tar at all (a server's
    error page or AccessDenied body sent as 200 OK), else "". One GET, of a shard already refused."""
    try:
        stream = remote.open_location(location, timeout_s=timeout_s)
        try:
            block = stream.read(512)
        finally:
            stream.close()
    except (remote.RemoteError, OSError):
        return ""  # the size already says it is not the shard
    return f"; it begins {quote_bytes(block)}" if block and not (len(block) == 512 and tar_header_ok(block)) else ""


def check_shards(split: SplitInfo, retries: int = remote.DEFAULT_RETRIES, timeout_s: float = remote.HTTP_TIMEOUT_S,
                 probes: Mapping[str, object] | None = None) -> None:
    """Every local shard of `split` exists, is a file and has the size the manifest records (format 5; older
    packs: is large enough for its count); every remote one opens (`remote.probe`) and, when the server
    gives its size, passes the same test.

    `probes`: `remote.probe_all`'s answers for the remote shards, when the caller probed several splits at
    once (`check_run`: one pool for all, not one split after another); missing ones are probed here.
    Raises TrainError naming the split and (up to three of) the shards. One `os.stat` per local shard,
    one request (or command) per remote one.
    """
    if sum(s.count for s in split.shards) != split.count:
        raise TrainError(f"split '{split.name}': its shards hold {sum(s.count for s in split.shards)} samples "
                         f"but the manifest says {split.count}; repack it")
    missing, short, remote_shards = [], [], []
    for shard in split.shards:
        activity.tick()  # a sign of progress while the others wait (bcc.train.heartbeat): a slow file system
        path = str(shard.path)
        if not remote.is_local(shard.path):
            remote_shards.append(shard)
            continue
        try:
            st = os.stat(path)
        except OSError:
            missing.append(path)
            continue
        problem = _size_problem(shard, st.st_size) if st.st_mode & 0o170000 == 0o100000 else "not a file"
        if problem:
            short.append(f"{path} ({problem})")
    probes = dict(probes or {})
    unprobed = [s.path for s in remote_shards if str(s.path) not in probes]
    if unprobed:
        probes.update(remote.probe_all(unprobed, retries, timeout_s))
    unreachable = [str(v) for v in probes.values() if isinstance(v, remote.RemoteError)]
    if unreachable:
        raise TrainError(f"split '{split.name}': cannot open remote shard {_named(unreachable)}")
    for shard in remote_shards:
        size = probes[str(shard.path)]
        problem = _size_problem(shard, size) if size is not None else None
        if problem:
            start = _foreign_start(shard.path, timeout_s) if len(short) < 3 else ""  # the ones named
            short.append(f"{remote.display(shard.path)} ({problem}{start})")
    if missing:
        raise TrainError(f"split '{split.name}': missing shard {_named(missing)}")
    if short:
        raise TrainError(f"split '{split.name}': truncated or not a shard: {_named(short)}; copy (or upload) it "
                         "again from the packed output, or repack it")


def check_run(cfg: Config, manifest: Manifest) -> list[dict]:
    """Raise TrainError (or another BccError) for the first thing the run would fail on later. Returns
    what `bcc.pretrained_overlap.pretrained_overlap` found (printed here as warnings), for the run's record."""
    names = metric_names(manifest.taxonomy)
    if cfg.train.ema_decay is not None:  # the EMA weights' metrics (bcc.train.ema)
        names += [f"ema_{n}" for n in names]
    if cfg.checkpoint.metric not in names:
        renamed = RENAMED_METRICS.get(cfg.checkpoint.metric)
        raise TrainError(f"checkpoint.metric '{cfg.checkpoint.metric}' is not a metric of this task"
                         + (f" (it is now '{renamed}')" if renamed else "")
                         + (" (ema_* metrics need train.ema_decay)" if cfg.checkpoint.metric.startswith("ema_")
                            and cfg.train.ema_decay is None else "")
                         + f"; available: {', '.join(sorted(names))}")
    check_backbone_name(cfg.model.backbone)
    for key, name in splits_needed(cfg).items():
        if name not in manifest.splits:
            hint = "; or set eval.test_at_end=false" if key == "data.test_split" else ""
            lacking = [s.label for s in manifest.sources if name not in s.manifest.splits] \
                if isinstance(manifest, MixedManifest) else []
            raise TrainError(f"{key} '{name}' names no split of {manifest.shown}"
                             + (f" (source {', '.join(lacking)} has none)" if lacking else "")
                             + f"; available: {', '.join(manifest.splits) or 'none'}{hint}")
        split = manifest.split(name)
        fold = getattr(manifest, "fold", None)
        if split.count == 0 and key == "data.val_split" and fold is not None:
            raise TrainError(f"data.fold={fold}: fold {fold} of {manifest.shown} is empty (its train+val holds "
                             "fewer groups than folds); repack with fewer --folds")
        if split.count == 0 and key != "data.test_split":
            # an empty val split gives NaN metrics, and a "best" checkpoint chosen on NaN
            raise TrainError(f"{key} '{name}' of {manifest.shown} is empty; repack with a non-zero "
                             f"{'validation' if key == 'data.val_split' else 'training'} fraction")
        if key == "data.train_split":
            check_sources_train(manifest, name)
    needed = [manifest.split(n) for n in dict.fromkeys(splits_needed(cfg).values())]
    probes = remote.probe_all([s.path for split in needed for s in split.shards if not remote.is_local(s.path)],
                              cfg.data.retries, cfg.data.read_timeout_s)  # every split's remote shards in one pool
    for split in needed:
        check_shards(split, cfg.data.retries, cfg.data.read_timeout_s, probes)
    check_no_shared_shards(manifest, splits_needed(cfg))
    from bcc.console import console

    # images shared by different shards of two sources, or with the run behind model.pretrained: the test
    # split too when this run does not test at its end (a later bcc eval will)
    read = {**splits_needed(cfg), **({"data.test_split": cfg.data.test_split} if cfg.data.test_split in manifest.splits
                                     else {})}
    lines = [] if not isinstance(manifest, MixedManifest) else sample_index.check_sources(
        manifest.sources, read, cfg.data.source_overlap, retries=cfg.data.retries, timeout_s=cfg.data.read_timeout_s)
    overlap = pretrained_overlap(cfg, manifest, [n for k, n in read.items() if k != "data.train_split"])
    for line in lines + [overlap_line(e) for e in overlap]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return overlap


def _source_of(manifest: Manifest, shard: ShardInfo) -> str:
    for source in manifest.sources if isinstance(manifest, MixedManifest) else ():
        if any(s is shard for split in source.manifest.splits for s in source.manifest.split(split).shards):
            return f"source {source.label} "
    return ""


def check_no_shared_shards(manifest: Manifest, splits: Mapping[str, str]) -> None:
    """Raise TrainError when one shard (by its sha256) is listed twice among the splits the run reads:
    in train and in val or test its samples would be trained on and scored (two `data.sources` packed
    from overlapping folders, a hand-edited manifest); twice in train it would be read twice per epoch
    unasked (a weight says that). Fold views (`data.fold`) share shards by design and are left out;
    shards that hold no samples too. Images shared by DIFFERENT shards (two packs of overlapping
    folders) are found by `bcc.sample_index.check_sources` from each pack's sample index."""
    train = splits.get("data.train_split")
    names = [n for n in dict.fromkeys(splits.values()) if n in manifest.splits]  # data.test_split=train: one split
    for name, shard, name0, first in repeated_shards((n, s) for n in names for s in manifest.split(n).shards):
        what = ("would be read twice per epoch; a data.sources weight repeats a source" if name0 == name
                else "would be trained on and scored" if train in (name0, name) else "would be scored in both")
        raise TrainError(
            f"the same shard (sha256 {shard.sha256[:12]}...) is listed twice: {_source_of(manifest, first)}"
            f"split '{name0}' {remote.display(first.path)} and {_source_of(manifest, shard)}split '{name}' "
            f"{remote.display(shard.path)}; its samples {what}. Remove one (are two data.sources packed "
            "from the same images? pack them together instead)")


def check_sources_train(manifest: Manifest, split: str) -> None:
    """Raise TrainError naming the first source of `data.sources` whose `split` (the train split) holds no
    samples: its weight would weigh nothing, and the run would train on the other sources in silence."""
    for i, source in enumerate(manifest.sources if isinstance(manifest, MixedManifest) else ()):
        if source.manifest.split(split).count == 0:
            raise TrainError(f"data.sources[{i}] ('{source.name}', shards {remote.display(source.manifest.root)}): "
                             f"its train split '{split}' holds no samples, so its weight {source.weight:g} would do "
                             "nothing; remove it from data.sources, or repack it with a non-zero training fraction")


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Raise TrainError for a `train.mixed_precision` the device would silently ignore (fp16 on a CPU
    trains in fp32 under Accelerate; bf16 on a GPU without bf16 support)."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise TrainError(f"train.mixed_precision=fp16 needs a CUDA GPU, but this run is on {device.type}, where it "
                         "would silently train in fp32; set train.mixed_precision=no (or bf16)")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"train.mixed_precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                         "set train.mixed_precision=fp16 or no")


def preflight(cfg: Config, manifest: Manifest, accelerator: Accelerator) -> list[dict]:
    """`check_run` on the main process; every rank raises the same TrainError if it failed. Returns
    `check_run`'s pretrained-overlap findings on the main process ([] on the others).

    A collective: every rank must call it. The other ranks wait while the main process checks, however
    long that takes (remote manifests, sample indexes and shards: up to `data.retries` x
    `data.read_timeout_s` each), as long as it shows signs of life (`bcc.train.heartbeat`); they fail
    with the lost-peer line only when it gave none for `train.timeout_s`. The message crosses ranks as a
    string (exception objects need not pickle), so only the one line travels.
    """

    found: list[dict] = []

    def check() -> str | None:
        try:
            found.extend(check_run(cfg, manifest))
        except Interrupted:
            raise  # a signal this rank got (bcc.train.preempt): its own line, not a verdict on the data
        except BccError as e:
            return str(e)
        return None

    if accelerator.num_processes > 1:
        verdict = heartbeat.on_rank0(check, accelerator.is_main_process, cfg.train.timeout_s,
                                     "its start-up check of the data and config (preflight)")
    else:
        verdict = check()
    if verdict is not None:
        error = TrainError(verdict)
        error.shared = "job"  # one line for the job, from rank 0
        raise error
    return found
