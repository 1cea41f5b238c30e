"""The training epoch's plan: which samples every (rank, lane) reads, from the manifest's counts alone.

See `bcc.stream` for the contract (one pass per epoch, fewer than world_size x batch_size samples
dropped, a different dropped set every epoch, worker-independent batches). The plan opens and stats
no file, so every rank computes the same plan in O(shards + parts x log shards) time.

Two samplings (`data.sampling`, built by `make_plan`):
- `without_replacement` (`EpochPlan`): one pass per epoch. A shard with repeat factor r (its source's
  integer weight, `data.sources`) enters the epoch's concatenation r times, so its samples pass r times
  per epoch, each at most r times (exactly r, less the < world_size x batch_size dropped samples).
- `resample` (`ResamplePlan`): every (seed, epoch, rank, lane) draws shards with replacement, a shard
  with probability proportional to weight x count, and reads each drawn shard from a random sample on,
  wrapping round to its start, until the lane has its samples. The epoch is `epoch_samples` long and
  cut into the same number of batches on every rank; any number of shards (one is enough) feeds any
  number of ranks and workers. The lane, not the worker, is the unit of drawing (webdataset's
  ResampledShards draws per worker), so a resume with another `data.workers` stays exact.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from bcc.shards import ShardError

LANES = 8  # per rank; fixed, so that the batch sequence does not depend on the number of loader workers


class StreamError(ShardError, ValueError):
    """Settings the stream cannot serve (too few samples for one batch, a resume point past the end)."""


def mix_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Training batches every rank runs per epoch (drop_last over the whole world)."""
    n = num_samples // (world_size * batch_size)
    if n < 1:
        raise StreamError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} "
            f"ranks (needs {world_size * batch_size}); lower data.batch_size or use fewer processes"
        )
    return n


def dropped_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Training samples left out of every epoch: `num_samples mod (world_size x batch_size)`, so always
    fewer than world_size x batch_size (which ones changes every epoch)."""
    return num_samples - world_size * batch_size * batches_per_epoch(num_samples, batch_size, world_size)


# --------------------------------------------------------------------------- epoch plan


class Segment(NamedTuple):
    """Samples [lo, hi) of one shard in tar order, less those in `drop` (left out this epoch)."""

    shard: int  # index into the split's shard list (manifest order)
    lo: int
    hi: int
    drop: frozenset[int] = frozenset()


class EpochPlan:
    """Which samples every (rank, lane) reads in one training epoch; see the module docstring.

    Built from the per-shard sample counts only, in O(shards + dropped) time; `segments(rank, lane)`
    costs O(log shards + its segments). The same arguments give the same plan in every process.
    """

    def __init__(
        self, counts: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int, lanes: int = LANES,
        repeats: Sequence[int] | None = None,
    ):
        self.world_size, self.batch_size, self.lanes = world_size, batch_size, lanes
        # a shard repeated r times enters the concatenation as r copies (which the shuffle scatters)
        shard_of = np.arange(len(counts)) if repeats is None else np.repeat(np.arange(len(counts)), repeats)
        sizes = np.asarray(counts, dtype=np.int64)[shard_of]
        total = int(sizes.sum())
        self.batches = batches_per_epoch(total, batch_size, world_size)  # per rank
        # shard order of this epoch, before splitting by rank; numpy's legacy RandomState stream is frozen
        # across numpy versions, and permutes 100,000 shards in milliseconds (random.shuffle: 0.2 s)
        order = np.random.RandomState(mix_seed("shards", seed, epoch) % 2**32).permutation(len(sizes))
        self.order: list[int] = shard_of[order].tolist()  # shard index of each piece of the concatenation
        # start of each piece in the concatenation
        self.starts: list[int] = [0, *np.cumsum(sizes[order]).tolist()]
        kept = world_size * batch_size * self.batches
        # positions in the concatenation left out this epoch; sample() is O(dropped), not O(total)
        self.dropped = sorted(random.Random(mix_seed("drop", seed, epoch)).sample(range(total), total - kept))
        self._shifted = [d - j for j, d in enumerate(self.dropped)]  # non-decreasing: kept index -> position

    def _position(self, kept: int) -> int:
        """Position in the concatenation of the `kept`-th sample that is not dropped."""
        return kept + bisect_right(self._shifted, kept)

    def lane_batches(self, lane: int) -> int:
        """Batches of a lane (the rank's batches lane, lane + lanes, ...)."""
        q, r = divmod(self.batches, self.lanes)
        return q + (lane < r)

    def iter_segments(self, rank: int, lane: int) -> Iterator[Segment]:
        return iter(self.segments(rank, lane))  # O(shards) already (ResamplePlan's draws are lazy)

    def segments(self, rank: int, lane: int) -> list[Segment]:
        """What lane `lane` of rank `rank` reads, in order: exactly lane_batches(lane) x batch_size samples."""
        q, r = divmod(self.batches, self.lanes)
        first = rank * self.batches + lane * q + min(lane, r)  # in batches over the whole world
        n = self.lane_batches(lane)
        if n == 0:
            return []
        a = self._position(first * self.batch_size)
        b = self._position((first + n) * self.batch_size - 1) + 1
        out = []
        i = bisect_right(self.starts, a) - 1
        while i < len(self.order) and self.starts[i] < b:
            s0, s1 = self.starts[i], self.starts[i + 1]
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                drops = self.dropped[bisect_left(self.dropped, lo) : bisect_left(self.dropped, hi)]
                out.append(Segment(self.order[i], lo - s0, hi - s0, frozenset(d - s0 for d in drops)))
            i += 1
        return out


class ResamplePlan:
    """What every (rank, lane) reads in one epoch of `data.sampling=resample`; see the module docstring.

    Same interface as `EpochPlan` (`batches`, `lanes`, `lane_batches`, `segments`). Built in O(shards);
    `segments(rank, lane)` costs O(draws x log shards), a draw per shard the lane reads.
    Raises StreamError when the epoch cannot fill one batch per rank or no shard holds a sample.
    """

    def __init__(
        self, counts: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int, epoch_samples: int,
        weights: Sequence[float] | None = None, lanes: int = LANES,
    ):
        self.world_size, self.batch_size, self.lanes = world_size, batch_size, lanes
        self.seed, self.epoch = seed, epoch
        self.batches = batches_per_epoch(epoch_samples, batch_size, world_size)  # per rank, nothing dropped
        self.counts = [int(c) for c in counts]
        mass = np.asarray(self.counts, dtype=np.float64)
        if weights is not None:
            mass = mass * np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(mass)
        if not len(counts) or self.cumulative[-1] <= 0:
            raise StreamError("data.sampling=resample: the train split holds no sample to draw")

    def lane_batches(self, lane: int) -> int:
        q, r = divmod(self.batches, self.lanes)
        return q + (lane < r)

    def _draw(self, rng: random.Random) -> int:
        # random() is the one generator call whose stream Python keeps across versions
        i = int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right"))
        return min(i, len(self.counts) - 1)  # rng.random() < 1, so only rounding lands past the end

    def segments(self, rank: int, lane: int) -> list[Segment]:
        """What lane `lane` of rank `rank` reads, in order: exactly lane_batches(lane) x batch_size samples."""
        return list(self.iter_segments(rank, lane))

    def iter_segments(self, rank: int, lane: int) -> Iterator[Segment]:
        """`segments`, drawn as they are read: the stream's memory does not grow with `epoch_samples`."""
        need = self.lane_batches(lane) * self.batch_size
        rng = random.Random(mix_seed("resample", self.seed, self.epoch, rank, lane))
        while need > 0:
            shard = self._draw(rng)
            count = self.counts[shard]
            start = int(rng.random() * count)  # each sample of the shard equally likely to be read first
            for lo, hi in ((start, count), (0, start)):  # the shard from `start` on, then its head
                take = min(hi - lo, need)
                if take > 0:
                    yield Segment(shard, lo, lo + take)
                    need -= take


def make_plan(
    counts: Sequence[int], weights: Sequence[float], *, sampling: str, epoch_samples: int, seed: int, epoch: int,
    world_size: int, batch_size: int,
) -> EpochPlan | ResamplePlan:
    """The plan of one training epoch for `data.sampling`; `weights` per shard (its source's weight;
    integers for without_replacement), `epoch_samples` as `epoch_length` gives it."""
    if sampling == "resample":
        return ResamplePlan(counts, weights=weights, seed=seed, epoch=epoch, world_size=world_size,
                            batch_size=batch_size, epoch_samples=epoch_samples)
    repeats = None if all(w == 1 for w in weights) else [int(w) for w in weights]
    return EpochPlan(counts, seed=seed, epoch=epoch, world_size=world_size, batch_size=batch_size, repeats=repeats)


def epoch_length(counts: Sequence[int], weights: Sequence[float], sampling: str, epoch_samples: int = 0) -> int:
    """Training samples one epoch draws from (before the drop to whole batches): without_replacement,
    the sum of count x repeat factor; resample, `epoch_samples`, or the split's size when 0."""
    if sampling == "resample":
        return epoch_samples or sum(counts)
    return sum(int(c) * int(w) for c, w in zip(counts, weights, strict=True))


def time_plan(num_shards: int = 100_000, parts: int = 1024, *, shard_size: int = 1000, batch_size: int = 32,
              repeat: int = 3, sampling: str = "without_replacement") -> dict[str, float]:
    """Seconds to plan one epoch at `num_shards` shards and `parts` = ranks x LANES (`bcc bench data
    --plan`): `plan_s` builds the plan (what every rank pays once per epoch), `rank_s` adds one rank's
    lanes, `all_parts_s` adds every part of every rank. Best of `repeat`. `sampling`: the one-pass
    `EpochPlan` or the `ResamplePlan` (an epoch of as many samples as the shards hold)."""
    world = max(1, parts // LANES)
    counts = [shard_size - (i % 7 == 0) for i in range(num_shards)]  # slightly uneven, like a real pack

    def make(epoch: int) -> EpochPlan | ResamplePlan:
        if sampling == "resample":
            return ResamplePlan(counts, seed=0, epoch=epoch, world_size=world, batch_size=batch_size,
                                epoch_samples=sum(counts))
        return EpochPlan(counts, seed=0, epoch=epoch, world_size=world, batch_size=batch_size)

    best = {"plan_s": math.inf, "rank_s": math.inf, "all_parts_s": math.inf}
    for r in range(repeat):
        t0 = time.perf_counter()
        plan = make(r)
        t1 = time.perf_counter()
        for lane in range(LANES):
            plan.segments(world - 1, lane)
        t2 = time.perf_counter()
        for rank in range(world):
            for lane in range(LANES):
                plan.segments(rank, lane)
        t3 = time.perf_counter()
        best = {"plan_s": min(best["plan_s"], t1 - t0), "rank_s": min(best["rank_s"], t2 - t0),
                "all_parts_s": min(best["all_parts_s"], (t1 - t0) + (t3 - t2))}
    return {"shards": num_shards, "parts": world * LANES, "sampling": sampling, **best}


