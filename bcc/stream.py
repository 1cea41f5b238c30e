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
unknown). Packs of format 1 carry no checksums: they are read unchecked, with a note.

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

from bcc.console import console, err_console
from bcc.errors import BccError
from bcc.imageio import IMAGE_SUFFIXES, decode_rgb
from bcc.shards import SampleError, check_sample
from bcc.transforms import presets_from_config

# sample keys (extensions) that hold the image: every suffix bcc.imageio reads
IMAGE_KEYS = tuple(s[1:] for s in IMAGE_SUFFIXES)


class ShardError(BccError):
    """A shard that is missing, unreadable or disagrees with the manifest, or shards too few or too
    small for the requested batches, ranks and loader workers."""


class CorruptSampleError(ShardError):
    """One sample whose stored bytes fail their pack-time checksum, or that does not decode."""


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
    """Raw samples of one shard; any failure names the shard, and so does a count that disagrees."""
    path = str(shard.path)
    n = 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": path}], handler=wds.reraise_exception):
            n += 1
            yield sample
    except Exception as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    if n != shard.count:
        raise ShardError(f"shard {path} holds {n} samples but the manifest says {shard.count}; repack it")


def _decode(sample: dict, transform, checked: bool) -> tuple[torch.Tensor, int, str, str]:
    """(image, label, key, source) of one raw sample; `checked`: verify it first (format 2 on).
    Raises CorruptSampleError naming shard and key."""
    key = sample["__key__"]
    where = f"sample {key} in shard {sample.get('__url__')}"
    try:
        meta = json.loads(sample["json"])
        if checked:
            data = check_sample(sample, meta)
        else:
            data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        # the packer checked the size limit; the stored image is read by the one policy of bcc.imageio
        image = transform(decode_rgb(data, max_pixels=None))
        return image, int(meta["label"]), key, str(meta.get("source", ""))
    except StopIteration:
        raise CorruptSampleError(f"{where} has no image ({', '.join(IMAGE_KEYS)})") from None
    except SampleError as e:
        raise CorruptSampleError(f"{where}: {e}") from None
    except Exception as e:
        raise CorruptSampleError(f"cannot decode {where}: {type(e).__name__}: {e}") from e


def _collate(samples: list[dict], transform, checked: bool = False, on_corrupt: str = "error") -> dict[str, Any]:
    """A batch dict; damaged samples raise ShardError, or with on_corrupt="skip" are left out and listed
    under "corrupt" (see the module docstring)."""
    decoded, corrupt = [], []
    for s in samples:
        try:
            decoded.append(_decode(s, transform, checked))
        except CorruptSampleError as e:
            if on_corrupt != "skip":
                raise ShardError(f"{e}. Repack from the source, or set data.on_corrupt=skip to leave damaged "
                                 "samples out") from None
            corrupt.append(str(e))
    if len(decoded) < max(1, math.ceil(len(samples) / 2)):
        raise ShardError(f"{len(corrupt)} of the {len(samples)} samples of one batch are damaged "
                         f"(data.on_corrupt=skip tolerates fewer than half): {corrupt[0]}; repack the shard")
    images, labels, keys, sources = zip(*decoded, strict=True)
    return {
        "image": torch.stack(images),
        "label": torch.tensor(labels, dtype=torch.long),
        "key": list(keys),
        "source": list(sources),
        "corrupt": corrupt,
    }


_NOTED: set[str] = set()


def _note_unchecked(manifest) -> None:
    """Once per process and pack: say that a format-1 pack's samples are read unchecked."""
    if manifest.has_checksums or str(manifest.root) in _NOTED:
        return
    _NOTED.add(str(manifest.root))
    console.print(f"note: {manifest.root} is pack format {manifest.format_version}: its samples carry no "
                  "checksum, so a damaged image is not detected as it is read; repack it with this bcc to "
                  "check every sample", soft_wrap=True)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


class _TrainStream(IterableDataset):
    """One rank's training stream; see the module docstring for the contract."""

    def __init__(self, parts, *, num_batches, batch_size, shuffle_buffer, transform, seed, epoch, rank, skip,
                 checked=False, on_corrupt="error"):
        self.parts = parts  # this rank's shards per worker
        self.checked, self.on_corrupt = checked, on_corrupt
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
                batch = _collate(raw, self.transform, self.checked, self.on_corrupt)
            yield batch


class _EvalStream(IterableDataset):
    """Samples [start, stop) of a split in manifest order, in batches; workers take contiguous runs."""

    def __init__(self, shards, *, start, stop, batch_size, transform, checked=False, on_corrupt="error"):
        self.shards = shards
        self.checked, self.on_corrupt = checked, on_corrupt
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
            yield _collate(raw, self.transform, self.checked, self.on_corrupt)


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
        self, dataset: IterableDataset, num_batches: int, *, workers: int, seed: int, pin_memory: bool,
        what: str = "", rank: int = 0,
    ):
        self.dataset = dataset
        self.num_batches = num_batches
        self.what, self.rank = what, rank
        self.skipped: list[str] = []  # damaged samples left out by the last pass (data.on_corrupt=skip)
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
        self.skipped = []
        try:
            for batch in batches:
                self.skipped += batch.get("corrupt", ())
                yield batch
            if self.skipped:  # every rank says it: the damage is in that rank's share
                err_console.print(
                    f"[yellow]warning:[/] rank {self.rank} skipped {len(self.skipped)} damaged sample(s) of "
                    f"{self.what} (data.on_corrupt=skip): {self.skipped[0]}", soft_wrap=True)
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
    _note_unchecked(manifest)
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
        checked=manifest.has_checksums,
        on_corrupt=data_cfg.on_corrupt,
    )
    loader_seed = _mix_seed("loader", seed, epoch, rank)
    return BatchLoader(
        dataset, num_batches - skip_batches, workers=data_cfg.workers, seed=loader_seed, pin_memory=pin_memory,
        what=f"split '{data_cfg.train_split}' in epoch {epoch + 1}", rank=rank,
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
    _note_unchecked(manifest)
    dataset = _EvalStream(shards, start=start, stop=stop, batch_size=batch_size, transform=eval_tf,
                          checked=manifest.has_checksums, on_corrupt=data_cfg.on_corrupt)
    num_batches = math.ceil((stop - start) / batch_size)
    return BatchLoader(dataset, num_batches, workers=data_cfg.workers, seed=0, pin_memory=pin_memory,
                       what=f"split '{split}'", rank=rank)


def iter_keys(batches: Iterable[dict[str, Any]]) -> list[str]:
    """All sample keys of a stream, in order (handy for tests and checks)."""
    return [k for b in batches for k in b["key"]]
