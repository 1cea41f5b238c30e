"""The training epoch's plan: which samples every (rank, lane) reads, from the manifest's counts alone.

See `bcc.stream` for the contract (one pass per epoch, fewer than world_size x batch_size samples
dropped, a different dropped set every epoch, worker-independent batches). The plan opens and stats
no file, so every rank computes the same plan in O(shards + parts x log shards) time.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
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
        self, counts: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int, lanes: int = LANES
    ):
        self.world_size, self.batch_size, self.lanes = world_size, batch_size, lanes
        total = sum(counts)
        self.batches = batches_per_epoch(total, batch_size, world_size)  # per rank
        # shard order of this epoch, before splitting by rank; numpy's legacy RandomState stream is frozen
        # across numpy versions, and permutes 100,000 shards in milliseconds (random.shuffle: 0.2 s)
        order = np.random.RandomState(mix_seed("shards", seed, epoch) % 2**32).permutation(len(counts))
        self.order: list[int] = order.tolist()
        # start of each shard in the concatenation
        self.starts: list[int] = [0, *np.cumsum(np.asarray(counts, dtype=np.int64)[order]).tolist()]
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


def time_plan(num_shards: int = 100_000, parts: int = 1024, *, shard_size: int = 1000, batch_size: int = 32,
              repeat: int = 3) -> dict[str, float]:
    """Seconds to plan one epoch at `num_shards` shards and `parts` = ranks x LANES (for `bcc bench data
    --plan`): `plan_s` builds the plan (what every rank pays once per epoch), `rank_s` adds one rank's
    lanes, `all_parts_s` adds every part of every rank. Best of `repeat`."""
    world = max(1, parts // LANES)
    counts = [shard_size - (i % 7 == 0) for i in range(num_shards)]  # slightly uneven, like a real pack
    best = {"plan_s": math.inf, "rank_s": math.inf, "all_parts_s": math.inf}
    for r in range(repeat):
        t0 = time.perf_counter()
        plan = EpochPlan(counts, seed=0, epoch=r, world_size=world, batch_size=batch_size)
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
    return {"shards": num_shards, "parts": world * LANES, **best}


