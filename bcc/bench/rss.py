"""`bench_rss`: stream a synthetic dataset at two sizes and record the peak resident memory of the loader's
process tree (main process + workers), which must not grow with the dataset."""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcc.bench import Progress, quiet
from bcc.bench.data import data_config


@dataclass(frozen=True)
class RssPoint:
    samples: int
    batches: int
    peak_rss: int  # bytes, summed over the loader's process tree
    processes: int  # most processes seen at once
    seconds: float


def _tiny_jpeg(seed: int, size: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_synthetic_shards(out: str | Path, samples: int, *, per_shard: int = 1000, image_px: int = 16) -> Path:
    """A fake packed dataset of `samples` tiny JPEGs under `out` (one real shard, hard-linked as often as
    needed, and a manifest listing them). Only for memory and throughput checks of the stream.

    The samples and shards are written by their owners (`bcc.shards.make_sample`/`write_shard`), the
    manifest by `bcc.manifest.write_manifest`: what the stream reads is today's pack format, checksums included.
    """
    from bcc.manifest import split_entry, write_manifest
    from bcc.shards import make_sample, write_shard
    from bcc.taxonomy import Taxonomy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = Taxonomy.default()
    classes = list(taxonomy.class_names)
    images = [_tiny_jpeg(i, image_px) for i in range(8)]

    def shard(path: Path, n: int) -> None:
        write_shard(path, (make_sample(f"train-{i:08d}", "jpg", images[i % len(images)],
                                       {"class": classes[i % len(classes)], "label": i % len(classes),
                                        "source": f"synthetic/{i}"}) for i in range(n)))

    first = out / "train-000000.tar"
    shard(first, min(per_shard, samples))
    shards, left, index = [], samples, 0
    per_class = dict.fromkeys(classes, 0)
    while left > 0:
        n = min(per_shard, left)
        path = out / f"train-{index:06d}.tar"
        if n < per_shard:  # a short last shard gets its own file
            path = out / f"train-{index:06d}-short.tar"
            shard(path, n)
        elif index > 0:
            os.link(first, path)
        for i in range(n):  # each shard holds samples 0..n-1 of the same label cycle
            per_class[classes[i % len(classes)]] += 1
        shards.append({"path": path.name, "count": n, "sha256": ""})
        left -= n
        index += 1
    write_manifest(out, taxonomy, {"train": split_entry(shards, per_class)}, source="synthetic",
                   options={"synthetic": True})
    return out


class _PeakRss:
    """Polls the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total, n = 0, 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                n += 1
            except psutil.Error:  # a worker that exited between listing and reading
                pass
        self.peak = max(self.peak, total)
        self.processes = max(self.processes, n)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> _PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def bench_rss(
    sizes: Sequence[int] = (10_000, 100_000),
    *,
    workers: int = 2,
    batch_size: int = 32,
    image_size: int = 16,
    progress: Progress = quiet,
) -> list[RssPoint]:
    """Peak RSS of the loader process tree over one full epoch of a synthetic dataset of each size."""
    from bcc.manifest import Manifest
    from bcc.stream import train_loader

    points = []
    with tempfile.TemporaryDirectory(prefix="bcc-bench-rss-") as tmp:
        for n in sizes:
            root = write_synthetic_shards(Path(tmp) / f"n{n}", n, per_shard=max(1, min(1000, n // max(workers, 1))))
            manifest = Manifest.load(root)
            cfg = data_config(root, "train", workers, batch_size, image_size)
            loader = train_loader(manifest, cfg, seed=0, epoch=0, rank=0, world_size=1)
            progress(f"streaming {n:,} synthetic samples ({len(loader)} batches)")
            t0 = time.perf_counter()
            with _PeakRss() as rss:
                count = sum(1 for _ in loader)
            points.append(RssPoint(n, count, rss.peak, rss.processes, time.perf_counter() - t0))
    return points
