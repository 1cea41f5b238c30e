"""Shards -> batches: the WebDataset stream for training and evaluation.

Training (`train_loader`):
- The split's shards are shuffled by (seed, epoch) and then dealt to the (rank, worker) parts. Every rank
  computes the same deal from the manifest alone, so no communication is needed, and the deal changes
  every epoch. Dealing is greedy by sample count (each shard goes to the part holding the fewest samples
  so far), which is plain round robin (split by node, then by worker) for equal shards and keeps uneven
  layouts (30, 3, 3, 40 samples) as balanced as shards allow.
- Every rank yields exactly `batches_per_epoch(...)` batches, so all ranks run the same number of steps
  and DDP cannot hang on a rank that ran dry. A worker's part is cycled (repeated) as often as needed.
- Exactness with W workers rests on the DataLoader's in-order round robin over workers: output batch i
  comes from worker i % W, so worker w yields exactly len(range(w, N, W)) batches. The order cannot
  depend on timing: a worker is only retired once its StopIteration arrives, which can only happen after
  batch N - 1 was requested, so batches 0 .. N - 1 are all requested in strict round robin.
- Determinism: the sample shuffle buffer of each worker uses a `random.Random` seeded from (seed, epoch,
  rank, worker), and torch's global RNG, which the torchvision presets draw from, is re-seeded before
  every batch from (seed, epoch, rank, batch index) inside `torch.random.fork_rng` (the presets draw
  from torch's RNG only, not from Python's `random`). Forking keeps the
  same single code path safe for workers=0, where the batches are made in the trainer's process and must
  not disturb the trainer's own RNG (dropout, resume). Per-batch seeding also makes `skip_batches=k`
  exact without decoding: the skipped batches are read and shuffled as raw bytes, never decoded; and
  since the DataLoader always asks worker 0 first, physical worker p then plays the logical worker that
  owns batch k + p.
  The stream depends on (seed, epoch, rank, world_size, workers, batch_size, shuffle_buffer); resuming
  mid-epoch needs the same values.

Evaluation (`eval_loader`): samples are numbered in manifest order (shards in order, samples in tar
order); rank r takes the r-th contiguous slice of that numbering, so every sample is seen exactly once
even with fewer shards than ranks. Within a rank each worker takes a contiguous run of whole batches, so
workers read disjoint parts of the shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bcc.errors import BccError
from bcc.imageio import IMAGE_SUFFIXES, decode_rgb
from bcc.transforms import presets_from_config

# sample keys (extensions) that hold the image: every suffix bcc.imageio reads
IMAGE_KEYS = tuple(s[1:] for s in IMAGE_SUFFIXES)


class ShardError(BccError):
    """A shard that is missing, unreadable or disagrees with the manifest, or shards too few or too
    small for the requested batches, ranks and loader workers."""


def _mix_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Training batches every rank runs per epoch (drop_last over the whole world)."""
    n = num_samples // (world_size * batch_size)
    if n < 1:
        raise ShardError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} "
            f"ranks (needs {world_size * batch_size}); lower data.batch_size or use fewer processes"
        )
    return n


# --------------------------------------------------------------------------- shard plans


def _deal(shards: Sequence, parts: int) -> list[list]:
    """Give each shard, in order, to the part with the fewest samples so far (ties: lowest index)."""
    out: list[list] = [[] for _ in range(parts)]
    load = [0] * parts
    for shard in shards:
        i = min(range(parts), key=lambda p: (load[p], p))
        out[i].append(shard)
        load[i] += shard.count
    return out


def shard_assignment(
    shards: Sequence, *, seed: int, epoch: int, world_size: int, workers: int
) -> list[list[list]]:
    """`[rank][worker] -> shards` for one training epoch; the same on every rank.

    Shards are shuffled by (seed, epoch) first, then dealt to the world_size x workers parts (workers=0
    counts as one). Raises ShardError, naming the shard count needed, when some worker would get none.
    """
    per_rank = max(workers, 1)
    need = world_size * per_rank
    if len(shards) < need:
        fewer = len(shards) // world_size
        hint = f" or set data.workers={fewer}" if fewer >= 1 else ""
        raise ShardError(
            f"{len(shards)} training shards cannot feed {world_size} rank(s) x {per_rank} loader worker(s): "
            f"at least {need} shards are needed; repack with `bcc pack --min-shards {need}`{hint}"
        )
    order = list(shards)
    random.Random(_mix_seed("shards", seed, epoch)).shuffle(order)
    # one deal over all (rank, worker) parts: greedy dealing fills every empty part before any part gets
    # a second shard, so each worker has a shard; part p is rank p % world_size, worker p // world_size,
    # which for equal shards is exactly split_by_node followed by split_by_worker
    parts = _deal(order, need)
    plan = [[parts[w * world_size + r] for w in range(per_rank)] for r in range(world_size)]
    for rank, rank_parts in enumerate(plan):
        for worker, part in enumerate(rank_parts):
            if sum(s.count for s in part) == 0:
                raise ShardError(
                    f"rank {rank} worker {worker} got only empty shards: {[str(s.path) for s in part]}"
                )
    return plan


def _check_exist(shards: Sequence, split: str) -> None:
    missing = [str(s.path) for s in shards if not Path(s.path).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardError(f"split '{split}': missing shard {', '.join(missing[:3])}{more}")


# --------------------------------------------------------------------------- reading and decoding


def _read_shard(shard) -> Iterator[dict]:
    """Raw samples of one shard; any failure names the shard, and so does a count that disagrees.

    A shard of a cross-validation view (`Manifest.with_fold`) yields only its folds' samples, and
    its count is theirs."""
    path = str(shard.path)
    n = 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": path}], handler=wds.reraise_exception):
            if getattr(shard, "folds", None) is not None and not shard.is_kept(json.loads(sample["json"])):
                continue
            n += 1
            yield sample
    except Exception as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    if n != shard.count:
        raise ShardError(f"shard {path} holds {n} samples but the manifest says {shard.count}; repack it")


def _decode(sample: dict, transform) -> tuple[torch.Tensor, int, str, str]:
    key = sample["__key__"]
    try:
        data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        # the packer checked the size limit; the stored image is read by the one policy of bcc.imageio
        image = transform(decode_rgb(data, max_pixels=None))
        meta = json.loads(sample["json"])
        return image, int(meta["label"]), key, str(meta.get("source", ""))
    except StopIteration:
        raise ShardError(
            f"sample {key} in {sample.get('__url__')} has no image ({', '.join(IMAGE_KEYS)})"
        ) from None
    except Exception as e:
        raise ShardError(f"cannot decode sample {key} in {sample.get('__url__')}: {e}") from e


def _collate(samples: list[dict], transform) -> dict[str, Any]:
    images, labels, keys, sources = zip(*(_decode(s, transform) for s in samples), strict=True)
    return {
        "image": torch.stack(images),
        "label": torch.tensor(labels, dtype=torch.long),
        "key": list(keys),
        "source": list(sources),
    }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


class _TrainStream(IterableDataset):
    """One rank's training stream; see the module docstring for the contract."""

    def __init__(self, parts, *, num_batches, batch_size, shuffle_buffer, transform, seed, epoch, rank, skip):
        self.parts = parts  # this rank's shards per worker
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.seed, self.epoch, self.rank, self.skip = seed, epoch, rank, skip

    def _samples(self, worker: int) -> Iterator[dict]:
        while True:  # cycle: a short part repeats until the worker has made its batches
            for shard in self.parts[worker]:
                yield from _read_shard(shard)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, num_workers = _worker()
        # the DataLoader always starts at worker 0; after skipping k batches, batch k must come first, so
        # physical worker p plays the logical worker that owns batch k + p
        worker = (physical + self.skip) % num_workers
        samples = self._samples(worker)
        if self.shuffle_buffer > 1:
            rng = random.Random(_mix_seed("buffer", self.seed, self.epoch, self.rank, worker))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        raw_batches = wds.batched(self.batch_size, collation_fn=None, partial=False)(samples)
        indices = range(worker, self.num_batches, num_workers)
        if not indices or indices[-1] < self.skip:
            return  # everything this worker owns was consumed before the resume
        # the range comes first in zip so that no raw batch beyond this worker's share is read
        for index, raw in zip(indices, raw_batches, strict=False):
            if index < self.skip:
                continue  # read and shuffled like the full stream, never decoded
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix_seed("augment", self.seed, self.epoch, self.rank, index))
                batch = _collate(raw, self.transform)
            yield batch


class _EvalStream(IterableDataset):
    """Samples [start, stop) of a split in manifest order, in batches; workers take contiguous runs."""

    def __init__(self, shards, *, start, stop, batch_size, transform):
        self.shards = shards
        self.start, self.stop = start, stop
        self.batch_size = batch_size
        self.transform = transform

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
                for i, sample in enumerate(_read_shard(shard), start=first):
                    if i >= hi:
                        break  # stop reading; the count check only runs on shards read to the end
                    if i >= lo:
                        yield sample
            first += shard.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lo, hi = self.worker_range(*_worker())
        raw_batches = wds.batched(self.batch_size, collation_fn=None, partial=True)(self._samples(lo, hi))
        for raw in raw_batches:
            yield _collate(raw, self.transform)


# --------------------------------------------------------------------------- loaders


WORKER_TERM_GRACE_S = 60  # a loader worker outlives a SIGTERM by at most this long


def _defer_term(signum, frame) -> None:
    signal.alarm(WORKER_TERM_GRACE_S)  # SIGALRM's default action ends the worker then


def _worker_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step, loader workers included. Preemption is the main
    process's business: it saves, then ends the workers through the loader. So a worker ignores
    SIGUSR1 and outlives SIGTERM by a grace period (a worker killed at once would turn an orderly save
    into a crash), but is never immortal (a parent exiting with a stray worker still gets it back)."""
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
    """An iterable of batch dicts with a known length; iterate it once per epoch."""

    def __init__(
        self, dataset: IterableDataset, num_batches: int, *, workers: int, seed: int, pin_memory: bool
    ):
        self.dataset = dataset
        self.num_batches = num_batches
        # an explicit generator: otherwise the DataLoader draws its worker base seed from the global RNG,
        # which would shift the trainer's random state by whether and when a loader was created
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            in_order=True,  # the exact batch count and order rely on strict round robin over workers
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_worker_signals if workers else None,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        try:
            yield from batches
        except BccError as e:
            raise _from_worker(e) from None
        finally:
            # workers end now, also when iteration stops early or fails, instead of whenever the
            # iterator is garbage collected (a traceback can keep it alive indefinitely)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


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
) -> BatchLoader:
    """Exactly `batches_per_epoch(...) - skip_batches` augmented training batches for this rank.

    Batches are dicts: image FloatTensor[N, 3, S, S], label LongTensor[N] (leaf class index), key and
    source (lists of str). The same arguments give the bitwise same batches in any process.
    """
    split = manifest.split(data_cfg.train_split)
    shards = list(split.shards)
    num_batches = batches_per_epoch(split.count, data_cfg.batch_size, world_size)
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(f"skip_batches={skip_batches} is outside 0..{num_batches} (batches per epoch)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    plan = shard_assignment(shards, seed=seed, epoch=epoch, world_size=world_size, workers=data_cfg.workers)
    _check_exist(shards, data_cfg.train_split)
    train_tf, _ = presets_from_config(data_cfg)
    dataset = _TrainStream(
        plan[rank],
        num_batches=num_batches,
        batch_size=data_cfg.batch_size,
        shuffle_buffer=data_cfg.shuffle_buffer,
        transform=train_tf,
        seed=seed,
        epoch=epoch,
        rank=rank,
        skip=skip_batches,
    )
    loader_seed = _mix_seed("loader", seed, epoch, rank)
    return BatchLoader(
        dataset, num_batches - skip_batches, workers=data_cfg.workers, seed=loader_seed, pin_memory=pin_memory
    )


def eval_loader(
    manifest, split: str, data_cfg, *, rank: int, world_size: int, pin_memory: bool = False
) -> BatchLoader:
    """This rank's share of `split`, every sample once across all ranks, in a fixed order.

    Ranks may get different numbers of batches (and a rank may get none when the split has fewer
    samples than there are ranks); the last batch of a rank may be short.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    info = manifest.split(split)
    shards = list(info.shards)
    _check_exist(shards, split)
    total = sum(s.count for s in shards)
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    batch_size = data_cfg.eval_batch_size
    _, eval_tf = presets_from_config(data_cfg)
    dataset = _EvalStream(shards, start=start, stop=stop, batch_size=batch_size, transform=eval_tf)
    num_batches = math.ceil((stop - start) / batch_size)
    return BatchLoader(dataset, num_batches, workers=data_cfg.workers, seed=0, pin_memory=pin_memory)


def iter_keys(batches: Iterable[dict[str, Any]]) -> list[str]:
    """All sample keys of a stream, in order (handy for tests and checks)."""
    return [k for b in batches for k in b["key"]]
