"""Shards -> batches: the WebDataset stream for training and evaluation.

Training (`TrainLoader`, or `train_loader` for one epoch): an epoch is ONE pass over the split.
- Plan (`EpochPlan`, computed from the manifest's per-shard counts alone, the same in every process, no
  file is opened or stat'ed to make it): the split's shards are shuffled by (seed, epoch) and their
  samples concatenated; `dropped_per_epoch(...) = total mod (world_size x batch_size)` samples, chosen
  uniformly at random by (seed, epoch), are left out, so the number dropped is ALWAYS below
  `world_size x batch_size` and which samples are dropped changes every epoch. The rest is cut into
  world_size equal contiguous runs of `batches_per_epoch(...) x batch_size` samples, one per rank:
  every rank runs the same number of batches and no sample is read twice. Planning costs
  O(shards + parts x log shards) (`time_plan` measures it); a cut can fall inside a shard, so any
  number of shards feeds any number of ranks and workers.
- Sources and sampling (`bcc.plan.make_plan`): a shard of a `data.sources` source of weight r enters the
  one-pass concatenation r times (each sample at most r times per epoch); with `data.sampling=resample`
  each lane instead draws shards with replacement by (seed, epoch, rank, lane) for `data.epoch_samples`
  samples per epoch (`ResamplePlan`; nothing dropped, any number of shards feeds any number of parts).
  Everything below holds for both plans.
- Lanes: a rank's run is cut into `LANES` (8) contiguous lanes. Lane l owns the rank's batches
  l, l + 8, l + 16, ...; its samples pass through its own shuffle buffer (`data.shuffle_buffer`
  samples, seeded by (seed, epoch, rank, lane)) and are cut into batches in order. The buffer only ever
  holds the lane's samples of this epoch (nothing is cycled or read twice). So the batch sequence of a
  rank depends on (seed, epoch, rank, world_size, batch_size, shuffle_buffer) and NOT on the number of
  loader workers: a mid-epoch resume with another `data.workers` is exact.
- Workers: batch i is made by loader worker i mod W (the DataLoader's strict in-order round robin;
  after `skip_batches=k`, physical worker p makes batches k + p, k + p + W, ...). When W divides 8
  (0, 1, 2, 4, 8 workers) a worker reads exactly its own lanes, every sample once. Other counts are
  exact too, but a lane whose batches are shared by several workers is read (not decoded) by each of
  them: W / gcd(W, 8) times the raw bytes. A worker holds the shuffle buffers of the lanes it reads
  (8 / W of them when W divides 8, up to 8 otherwise), raw bytes only. A lane that starts inside a
  local shard seeks to its first sample by scanning the tar headers instead of reading the data before.
- Determinism: torch's global RNG, which the worker's random crop and flips draw from, is re-seeded
  before every batch from (seed, epoch, rank, batch index) inside `torch.random.fork_rng`, so workers=0
  (batches made in the trainer's process) cannot disturb the trainer's RNG, and skipped batches are read
  and shuffled as raw bytes, never decoded. Each batch also carries `augment_seed`, derived from the same
  four numbers, from which `bcc.device_aug` draws the batch's rotation and colour jitter on the device.
- What a worker makes (`bcc.transforms.TrainCrop`/`EvalCrop`): uint8 crops [N, 3, S, S], handed over in
  shared memory allocated once (`bcc.stream_ring`). Conversion to float, rotation, colour jitter and
  normalisation run batched on the device (`bcc.device_aug`; each loader carries its `device_transform`).
- `TrainLoader` keeps its loader workers across epochs (persistent workers; the epoch and the number
  of batches to skip reach them through a small shared array); `close()` ends them.

Integrity (packs of format 2 on, `Manifest.has_checksums`): every sample is checked as it is decoded,
in the loader worker: the CRC-32 of its stored image bytes against the json's `stored_crc32` and its
`cls` against the json's label (`bcc.shards.check_sample`, ~1.8 GB/s: far below the decode cost). A
damaged sample (or one that does not decode) stops the run with a ShardError naming shard and key
(`data.on_corrupt: error`, the default), or with `data.on_corrupt: skip` is left out of its batch,
listed in the batch's `corrupt` entry, and reported (one warning line per rank and pass, and the
trainer's per-epoch `skipped_corrupt` row). Skipping shrinks that one batch and never moves a sample
into another batch, so every rank still runs the same number of batches (DDP stays in step), the
stream stays a pure function of its arguments (a mid-epoch resume stays exact), and the epoch trains
on that many fewer samples. A batch left with fewer than half its samples is an error even with skip:
that much damage is a broken shard, not a stray bit. A shard that cannot be read as a tar (truncated,
bad header) or whose sample count disagrees with the manifest is always an error (what is left of it is
unknown). Packs of format 1 carry no checksums: they are read unchecked (the trainer says so once).

Evaluation (`eval_loader`): samples are numbered in manifest order (shards in order, samples in tar
order); rank r takes the r-th contiguous slice of that numbering, so every sample is seen exactly once
even with fewer shards than ranks. Within a rank each worker takes a contiguous run of whole batches, so
workers read disjoint parts of the shards.
"""

from __future__ import annotations

import itertools
import math
import random
import signal
from collections.abc import Iterable, Iterator
from multiprocessing.sharedctypes import RawArray
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bcc.console import err_console
from bcc.device_aug import device_transforms_from_config
from bcc.errors import BccError
from bcc.plan import (
    LANES,
    EpochPlan,
    ResamplePlan,
    Segment,
    StreamError,
    batches_per_epoch,
    dropped_per_epoch,
    epoch_length,
    make_plan,
    mix_seed,
    time_plan,
)
from bcc.remote import DEFAULT_RETRIES, HTTP_TIMEOUT_S, request_stop
from bcc.shards import IMAGE_KEYS, ShardError, read_range
from bcc.sources import shard_weights
from bcc.stream_ring import BatchRing, as_is, make_ring, worker_slots
from bcc.stream_samples import CorruptSampleError, batched, shuffled
from bcc.stream_samples import collate as _collate  # the seam tests replace to skip decoding
from bcc.transforms import crops_from_config
from bcc.worker_start import mark_started, start_flags, start_workers

# re-exported: the stream's public names live where they are owned (plan: bcc.plan; tar reading: bcc.shards)
__all__ = ["IMAGE_KEYS", "LANES", "CorruptSampleError", "EpochPlan", "ResamplePlan", "Segment", "ShardError",
           "StreamError", "TrainLoader", "batches_per_epoch", "dropped_per_epoch", "eval_loader", "iter_keys",
           "time_plan", "train_batches", "train_loader", "workers_note"]


# --------------------------------------------------------------------------- workers (batches: stream_samples.collate)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


class _TrainStream(IterableDataset):
    """One rank's training stream; see the module docstring for the contract.

    `epoch_state` holds (epoch, skip_batches): a shared array, so that persistent workers read each
    epoch's values when the next epoch's iteration starts."""

    def __init__(self, shards, *, seed, rank, world_size, batch_size, shuffle_buffer, transform, epoch_state,
                 checked=False, on_corrupt="error", weights=None, sampling="without_replacement", epoch_samples=0,
                 retries=DEFAULT_RETRIES, timeout_s=HTTP_TIMEOUT_S):
        self.shards = list(shards)
        self.retries, self.timeout_s = retries, timeout_s
        self.checked, self.on_corrupt = checked, on_corrupt
        self.counts = [s.count for s in self.shards]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.shards)
        self.sampling, self.epoch_samples = sampling, epoch_samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.epoch_state = epoch_state
        self.ring: BatchRing | None = None  # set by BatchLoader before its workers start

    def plan(self, epoch: int) -> EpochPlan | ResamplePlan:
        return make_plan(self.counts, self.weights, sampling=self.sampling, epoch_samples=self.epoch_samples,
                         seed=self.seed, epoch=epoch, world_size=self.world_size, batch_size=self.batch_size)

    def _lane(self, plan: EpochPlan | ResamplePlan, epoch: int, lane: int) -> Iterator[list[dict]]:
        """Raw batches of one lane: its segments read in order, shuffled, cut into batches."""
        samples: Iterable[dict] = itertools.chain.from_iterable(
            read_range(self.shards[s.shard], s.lo, s.hi, s.drop, retries=self.retries, timeout_s=self.timeout_s)
            for s in plan.iter_segments(self.rank, lane)
        )
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed("buffer", self.seed, epoch, self.rank, lane))
            samples = shuffled(samples, self.shuffle_buffer, rng)
        return batched(samples, self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, skip = int(self.epoch_state[0]), int(self.epoch_state[1])
        plan = self.plan(epoch)
        physical, num_workers = _worker()
        open_lanes: dict[int, list] = {}  # lane -> [raw batch iterator, index of its next batch]
        slots = worker_slots(self.ring, physical)
        # the DataLoader asks worker 0 first, so after a resume at batch `skip` worker p makes skip + p, ...
        for index in range(skip + physical, plan.batches, num_workers):
            lane, nth = index % plan.lanes, index // plan.lanes
            state = open_lanes.get(lane)
            if state is None:
                state = open_lanes[lane] = [self._lane(plan, epoch, lane), 0]
            while state[1] < nth:  # another worker's batch, or one consumed before the resume
                next(state[0])  # read and shuffled like the full stream, never decoded
                state[1] += 1
            raw = next(state[0])
            state[1] += 1
            if state[1] == plan.lane_batches(lane):
                next(state[0], None)  # run the lane's reader to its end, which checks the last shard's count
                del open_lanes[lane]
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also seeds CUDA/XPU/MTIA, lazily, formatting a stack
                # trace each (~1.8 ms a batch), and with workers=0 it reseeded the trainer's CUDA generator
                torch.default_generator.manual_seed(mix_seed("augment", self.seed, epoch, self.rank, index))
                batch = _collate(raw, self.transform, self.checked, self.on_corrupt, next(slots))
            batch["augment_seed"] = mix_seed("device-augment", self.seed, epoch, self.rank, index)
            yield batch


class _EvalStream(IterableDataset):
    """Samples [start, stop) of a split in manifest order, in batches; workers take contiguous runs."""

    def __init__(self, shards, *, start, stop, batch_size, transform, checked=False, on_corrupt="error",
                 retries=DEFAULT_RETRIES, timeout_s=HTTP_TIMEOUT_S):
        self.shards = shards
        self.retries, self.timeout_s = retries, timeout_s
        self.checked, self.on_corrupt = checked, on_corrupt
        self.start, self.stop = start, stop
        self.batch_size = batch_size
        self.transform = transform
        self.ring: BatchRing | None = None  # set by BatchLoader before its workers start

    def worker_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Global sample range of a worker: whole batches w, w+W, ... counted in sample space."""
        total = self.stop - self.start
        n = math.ceil(total / self.batch_size)
        sizes = [len(range(w, n, num_workers)) * self.batch_size for w in range(num_workers)]
        if n:
            sizes[(n - 1) % num_workers] -= n * self.batch_size - total  # the one short batch
        lo = self.start + sum(sizes[:worker])
        return lo, lo + sizes[worker]

    def _samples(self, lo: int, hi: int) -> Iterator[dict]:
        first = 0  # global index of the current shard's first sample
        for shard in self.shards:
            if first >= hi:
                return
            if first + shard.count > lo:
                for i, sample in enumerate(read_range(shard, retries=self.retries, timeout_s=self.timeout_s), start=first):
                    if i >= hi:
                        break  # stop reading; the count check only runs on shards read to the end
                    if i >= lo:
                        yield sample
            first += shard.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        lo, hi = self.worker_range(worker, num_workers)
        raw_batches = wds.batched(self.batch_size, collation_fn=None, partial=True)(self._samples(lo, hi))
        for raw, acquire in zip(raw_batches, worker_slots(self.ring, worker), strict=False):
            yield _collate(raw, self.transform, self.checked, self.on_corrupt, acquire)


# --------------------------------------------------------------------------- loaders


PREFETCH = 2  # batches each loader worker makes ahead (the DataLoader's prefetch_factor)
WORKER_TERM_GRACE_S = 60  # a loader worker outlives a SIGTERM by at most this long


def _defer_term(signum, frame) -> None:
    signal.alarm(WORKER_TERM_GRACE_S)  # SIGALRM's default action ends the worker then
    request_stop()  # a read stalled on a silent pipe: command ends now, and nothing is retried


def _worker_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step, loader workers included. Preemption is the main
    process's business: it saves, then ends the workers through the loader. So a worker ignores
    SIGUSR1 and outlives SIGTERM by a grace period (a worker killed at once would turn an orderly save
    into a crash), but is never immortal (a parent exiting with a stray worker still gets it back)."""
    mark_started(worker_id)  # out of the fork (bcc.worker_start)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _defer_term)


def _from_worker(e: BccError) -> BccError:
    """A user error raised in a loader worker with its own message again: the DataLoader re-raises it
    in the main process with the worker's whole traceback as the message, which is no one-line error."""
    text = str(e)
    marker = f"{type(e).__name__}: "
    if "Original Traceback" not in text or marker not in text:
        return e
    try:
        return type(e)(text[text.rindex(marker) + len(marker):].strip())
    except Exception:  # noqa: BLE001 - a class with another signature keeps the long message
        return e


class BatchLoader:
    """An iterable of batch dicts with a known length; iterate it once per epoch.

    With `persistent=True` (and workers > 0) the workers outlive a completed iteration and serve the
    next one; `close()` ends them. An iteration that stops early or fails always ends them.
    `batch_shape` (batch, 3, S, S) of the dataset's images: with workers, they come through a
    `BatchRing` (bcc.stream_ring) instead of a new shared-memory segment per batch."""

    def __init__(
        self, dataset: IterableDataset, num_batches: int, *, workers: int, seed: int, pin_memory: bool,
        persistent: bool = False, what: str = "", rank: int = 0, device_transform=None,
        batch_shape: tuple[int, ...] | None = None,
    ):
        self.dataset = dataset
        self.device_transform = device_transform  # uint8 batch -> model input, for bcc.device_aug.on_device
        self.num_batches = num_batches
        self.what, self.rank = what, rank
        self.skipped: list[str] = []  # damaged samples left out by the last pass (data.on_corrupt=skip)
        self.persistent = persistent and workers > 0
        self.pin_memory = pin_memory
        self.ring = dataset.ring = make_ring(workers, batch_shape, PREFETCH + 1) if workers and batch_shape else None
        self.started = dataset.started = start_flags(workers)  # set by each worker: bcc.worker_start
        # an explicit generator: otherwise the DataLoader draws its worker base seed from the global RNG,
        # which would shift the trainer's random state by whether and when a loader was created
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=as_is,  # no per-batch conversion (the default walks every key: ~0.5 ms a batch)
            num_workers=workers,
            pin_memory=pin_memory and self.ring is None,  # the ring copies out into pinned memory itself
            prefetch_factor=PREFETCH if workers else None,
            in_order=True,  # the exact batch count and order rely on strict round robin over workers
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_worker_signals if workers else None,
            persistent_workers=self.persistent,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = start_workers(self.loader, self.started, self.what, self._shutdown)  # iter(), checked
        complete = False
        self.skipped = []
        try:
            for batch in batches:
                if "_slot" in batch:
                    self.ring.receive(batch, self.pin_memory)
                self.skipped += batch.get("corrupt", ())
                yield batch
            complete = True
            if self.skipped:  # every rank says it: the damage is in that rank's share
                err_console.print(
                    f"[yellow]warning:[/] rank {self.rank} skipped {len(self.skipped)} damaged sample(s) of "
                    f"{self.what} (data.on_corrupt=skip): {self.skipped[0]}", soft_wrap=True)
        except BccError as e:
            raise _from_worker(e) from None
        finally:
            if not (complete and self.persistent):
                # workers end now, also when iteration stops early or fails, instead of whenever the
                # iterator is garbage collected (a traceback can keep it alive indefinitely)
                self._shutdown(batches)

    def _shutdown(self, batches) -> None:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self.ring is not None:
            self.ring.reset()  # the workers are gone: slots they held are free
        if self.persistent:
            self.loader._iterator = None  # a later iteration starts fresh workers instead of dead ones

    def close(self) -> None:
        """End persistent workers (a no-op otherwise)."""
        batches = getattr(self.loader, "_iterator", None)
        if batches is not None:
            self._shutdown(batches)


class EpochBatches:
    """The batches of one epoch of a `TrainLoader` (after `skip_batches`); iterate once."""

    def __init__(self, owner: TrainLoader, epoch: int, skip_batches: int):
        self.owner, self.epoch, self.skip_batches = owner, epoch, skip_batches

    def __len__(self) -> int:
        return self.owner.batches_per_epoch - self.skip_batches

    @property
    def device_transform(self):
        return self.owner.device_transform

    @property
    def skipped(self) -> list[str]:
        """Damaged samples this epoch's pass left out (data.on_corrupt=skip), once iterated."""
        return self.owner._batches.skipped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # set when iteration starts: workers (persistent or new) read it when their iteration starts
        self.owner._epoch_state[0], self.owner._epoch_state[1] = self.epoch, self.skip_batches
        yield from self.owner._batches


class TrainLoader:
    """One rank's augmented training batches, epoch after epoch, from loader workers started once.

    `epoch(e, skip_batches=k)` gives batches k .. batches_per_epoch - 1 of epoch e: dicts of image
    ByteTensor[N, 3, S, S] (uint8 crops), label LongTensor[N] (leaf class index), key and source (lists
    of str) and augment_seed (int); `device_transform` (a `bcc.device_aug.DeviceAugment`) turns image
    and augment_seed into the model's input on the device.
    The same (manifest, data settings but workers, seed, rank, world_size, epoch) give the bitwise same
    batches in any process, with any number of loader workers. `close()` (or `with`) ends the workers.
    Raises StreamError when the split cannot fill one batch per rank; ShardError (when read) names a
    missing, unreadable or miscounted shard.
    """

    def __init__(
        self, manifest, data_cfg, *, seed: int, rank: int, world_size: int, pin_memory: bool = False,
        persistent: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} is outside 0..{world_size - 1}")
        split = manifest.split(data_cfg.train_split)
        shards = list(split.shards)
        if sum(s.count for s in shards) != split.count:
            raise ShardError(
                f"split '{split.name}': its shards hold {sum(s.count for s in shards)} samples by the manifest's "
                f"per-shard counts but the split's count is {split.count}; repack it"
            )
        weights = shard_weights(manifest, data_cfg.train_split)
        samples = epoch_length([s.count for s in shards], weights, data_cfg.sampling, data_cfg.epoch_samples)
        self.batches_per_epoch = batches_per_epoch(samples, data_cfg.batch_size, world_size)
        # without_replacement: samples of the pass left out; resample draws whole batches, drops nothing
        self.dropped_per_epoch = (dropped_per_epoch(samples, data_cfg.batch_size, world_size)
                                  if data_cfg.sampling == "without_replacement" else 0)
        self._epoch_state = RawArray("q", 2)  # (epoch, skip_batches), shared with the workers
        train_tf, _ = crops_from_config(data_cfg)
        self.device_transform, _ = device_transforms_from_config(data_cfg)
        dataset = _TrainStream(
            shards, seed=seed, rank=rank, world_size=world_size, batch_size=data_cfg.batch_size,
            shuffle_buffer=data_cfg.shuffle_buffer, transform=train_tf, epoch_state=self._epoch_state,
            checked=manifest.has_checksums, on_corrupt=data_cfg.on_corrupt, weights=weights,
            sampling=data_cfg.sampling, epoch_samples=samples, retries=data_cfg.retries,  # 0 resolved
            timeout_s=data_cfg.read_timeout_s,
        )
        self._batches = BatchLoader(
            dataset, self.batches_per_epoch, workers=data_cfg.workers, seed=mix_seed("loader", seed, rank),
            pin_memory=pin_memory, persistent=persistent, what=f"split '{data_cfg.train_split}'", rank=rank,
            batch_shape=(data_cfg.batch_size, 3, data_cfg.image_size, data_cfg.image_size),
        )

    def epoch(self, epoch: int, skip_batches: int = 0) -> EpochBatches:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise StreamError(
                f"skip_batches={skip_batches} is outside 0..{self.batches_per_epoch} (batches per epoch)"
            )
        return EpochBatches(self, epoch, skip_batches)

    def close(self) -> None:
        self._batches.close()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def workers_note(workers: int) -> str | None:
    """What a number of loader workers that does not divide LANES costs (see the module docstring), or None."""
    if not workers or LANES % workers == 0:
        return None
    return (f"data.workers={workers} does not divide the {LANES} lanes of a rank's stream: the workers share lanes "
            f"and each reads (not decodes) the bytes of the lanes it shares, {workers // math.gcd(workers, LANES)}x "
            "the split's bytes in all; 1, 2, 4 or 8 workers read each byte once")


def train_batches(manifest, data_cfg, world_size: int) -> int:
    """Training batches every rank runs per epoch for `data_cfg` (its sampling, source weights and
    epoch length); what `TrainLoader.batches_per_epoch` will be. Raises StreamError when the epoch
    cannot fill one batch per rank."""
    counts = [s.count for s in manifest.split(data_cfg.train_split).shards]
    samples = epoch_length(counts, shard_weights(manifest, data_cfg.train_split), data_cfg.sampling,
                           data_cfg.epoch_samples)
    try:
        return batches_per_epoch(samples, data_cfg.batch_size, world_size)
    except StreamError as e:
        if data_cfg.sampling == "resample":
            raise StreamError(f"data.sampling=resample: {e}, or raise data.epoch_samples") from None
        raise


def train_loader(
    manifest,
    data_cfg,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    skip_batches: int = 0,
    pin_memory: bool = False,
) -> EpochBatches:
    """Exactly `batches_per_epoch(...) - skip_batches` training batches of one epoch for this rank, from
    loader workers that end with the epoch (`TrainLoader` keeps them across epochs)."""
    loader = TrainLoader(manifest, data_cfg, seed=seed, rank=rank, world_size=world_size,
                         pin_memory=pin_memory, persistent=False)
    return loader.epoch(epoch, skip_batches)


def eval_loader(
    manifest, split: str, data_cfg, *, rank: int, world_size: int, pin_memory: bool = False
) -> BatchLoader:
    """This rank's share of `split`, every sample once across all ranks, in a fixed order.

    Ranks may get different numbers of batches (and a rank may get none when the split has fewer
    samples than there are ranks); the last batch of a rank may be short. Images are uint8 crops
    (`bcc.transforms.EvalCrop`); the loader's `device_transform` (`bcc.device_aug.DeviceNormalize`)
    makes them the model's input.
    """
    if not 0 <= rank < world_size:
        raise StreamError(f"rank {rank} is outside 0..{world_size - 1}")
    info = manifest.split(split)
    shards = list(info.shards)
    total = sum(s.count for s in shards)
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    batch_size = data_cfg.eval_batch_size
    _, eval_tf = crops_from_config(data_cfg)
    dataset = _EvalStream(shards, start=start, stop=stop, batch_size=batch_size, transform=eval_tf,
                          checked=manifest.has_checksums, on_corrupt=data_cfg.on_corrupt, retries=data_cfg.retries,
                          timeout_s=data_cfg.read_timeout_s)
    num_batches = math.ceil((stop - start) / batch_size)
    return BatchLoader(dataset, num_batches, workers=data_cfg.workers, seed=0, pin_memory=pin_memory,
                       what=f"split '{split}'", rank=rank, device_transform=device_transforms_from_config(data_cfg)[1],
                       batch_shape=(batch_size, 3, data_cfg.image_size, data_cfg.image_size))


def iter_keys(batches: Iterable[dict[str, Any]]) -> list[str]:
    """All sample keys of a stream, in order (handy for tests and checks)."""
    return [k for b in batches for k in b["key"]]
