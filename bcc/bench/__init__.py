"""Benchmarks users run on their own machines: does the data path keep up, and what does the trainer cost.

data.py  `bench_data`: bcc's stream vs ImageFolder + DataLoader vs the per-core decode limit
rss.py   `bench_rss`: peak loader memory streaming a synthetic dataset at two sizes
step.py  `bench_step`: bcc's train step (the trainer's own set-up) vs a plain PyTorch step, frozen vs full;
         `time_steps`, the one step timer (also behind `bcc compare`'s step times)
vote.py  `bench_vote`: the preemption vote's cost with 2, 4, 8 gloo processes
pack.py  `bench_pack`: `bcc pack`'s throughput against the decode limit, and its peak memory
gpu.py   `bench_gpu`: the GPU check, one JSON report (its plan: gpu_plan.py; its DDP ranks: gpu_ddp.py)

Everything here returns numbers; printing is the CLI's job (`bcc bench`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bcc.errors import BccError

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


class BenchError(BccError):
    """A benchmark that cannot run on what it was given, with a message for the user."""


@dataclass(frozen=True)
class Timing:
    """Images and seconds of each round of one measurement."""

    name: str
    images: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [n / max(s, 1e-9) for n, s in zip(self.images, self.seconds, strict=True)]

    @property
    def rate(self) -> float:
        """Median img/s over the rounds."""
        return statistics.median(self.rates) if self.rates else float("nan")


from bcc.bench.data import DataBench, bench_data, unpack_split  # noqa: E402
from bcc.bench.rss import RssPoint, bench_rss, write_synthetic_shards  # noqa: E402
from bcc.bench.step import StepBench, bench_step, step_seconds, time_steps  # noqa: E402
from bcc.bench.vote import VotePoint, bench_vote  # noqa: E402

__all__ = ["BenchError", "DataBench", "Progress", "RssPoint", "StepBench", "Timing", "bench_data", "bench_rss", "bench_step",
           "bench_vote", "step_seconds", "time_steps", "unpack_split", "VotePoint", "write_synthetic_shards"]
