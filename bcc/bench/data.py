"""`bench_data`: three ways of making training batches from the same images, alternated round by round in
one process so that background load hits all of them alike. All three run the loader workers' part of
the training transform (`bcc.transforms.TrainCrop`: decode, random resized crop, flips -> uint8); the
float part (rotation, jitter, normalise) runs batched on the training device (`bcc.device_aug`) and is not
timed here: the figures are batches arriving in the main process, before the on-device step.
  (a) bcc's stream (`bcc.stream.train_loader`) reading the packed shards;
  (b) torchvision `ImageFolder` + `DataLoader` over a class-folder tree of the same images;
  (c) the per-core limit: decode + crop of the same image bytes in a tight loop in one process, one
      intra-op thread (as in a loader worker); multiplied by the number of workers it is what (a) could
      reach if the loader cost nothing beyond decode and crop. With several workers the same loop also
      runs in that many processes at once, which shows how many cores the machine really has free.
Each also reports the CPU time it spends per image (loader workers and main process apart; (c): the one
process): (c)/(a)'s CPU per image is what (a)/(c*workers) would be with a free core per worker and one for
the main process, and it holds still on a busy machine where the img/s do not. (a) and (c) do the same
work per image where it counts: the same reader (`decode_rgb` without a pixel limit, as the stream reads
stored images), the same crop object, one torch thread (DataLoader workers run with one).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bcc.bench import BenchError, Progress, Timing, quiet


@dataclass(frozen=True)
class DataBench:
    stream: Timing  # (a)
    folder: Timing  # (b)
    decode: Timing  # (c), one process
    parallel: Timing  # (c) run in `workers` processes at once: what this machine's free cores give
    workers: int
    batch_size: int
    batches: int
    warmup: int
    image_size: int
    rounds: int
    folder_root: str
    folder_images: int
    split_images: int
    # CPU seconds per image, one entry per round: "(a) workers", "(a) main", "(b) workers", "(b) main", "(c)"
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def cpu_per_image(self, name: str) -> float:
        """Median CPU seconds per image of `name` over the rounds (nan when not measured)."""
        values = self.cpu.get(name, [])
        return statistics.median(values) if values else float("nan")

    @property
    def stream_cpu_vs_limit(self) -> float:
        """(c)'s CPU per image over (a)'s (workers + main process): (a)/(c*workers) given a core each."""
        return self.cpu_per_image("(c)") / (self.cpu_per_image("(a) workers") + self.cpu_per_image("(a) main"))

    @property
    def limit(self) -> float:
        """(c) scaled by the number of worker processes (the main process decodes when workers=0)."""
        return self.decode.rate * max(self.workers, 1)

    @property
    def parallel_rate(self) -> float:
        return self.parallel.rate if self.parallel.rates else self.limit

    @property
    def stream_vs_limit(self) -> float:
        return self.stream.rate / self.limit

    @property
    def stream_vs_folder(self) -> float:
        return self.stream.rate / self.folder.rate


def data_config(shards: str | Path, split: str, workers: int, batch_size: int, image_size: int):
    from bcc.config import DataConfig

    return dataclasses.replace(
        DataConfig(), shards=str(shards), train_split=split, workers=workers, batch_size=batch_size,
        image_size=image_size,
    )


def _cpu_seconds(processes: list) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - a worker that already ended: psutil.NoSuchProcess and kin
            pass
    return total


def _time_batches(batches: Iterable, warmup: int, count: int, images_of: Callable) -> tuple[int, float, float, float]:
    """(images, seconds, loader workers' CPU seconds, main process CPU seconds) of `count` batches after
    `warmup` untimed ones; worker start-up falls in the warm-up."""
    import psutil

    it = iter(batches)
    try:
        for _ in range(warmup):
            next(it)
        workers = psutil.Process().children()
        images = 0
        w0, m0, t0 = _cpu_seconds(workers), time.process_time(), time.perf_counter()
        for _ in range(count):
            images += images_of(next(it))
        seconds, main = time.perf_counter() - t0, time.process_time() - m0
        return images, seconds, _cpu_seconds(workers) - w0, main
    finally:
        del it  # shuts the workers down before the next measurement starts


def _read_raw_samples(shards: Sequence, limit: int) -> list[tuple[str, bytes, dict]]:
    """(extension, image bytes, json metadata) of the first `limit` samples of `shards` in order."""
    from bcc.shards import IMAGE_KEYS, read_shard

    out = []
    for shard in shards:
        for sample in read_shard(shard):
            ext = next(k for k in IMAGE_KEYS if k in sample)
            out.append((ext, sample[ext], json.loads(sample["json"])))
            if len(out) >= limit:
                return out
    return out


def unpack_split(manifest, split: str, out: str | Path) -> int:
    """Write the split's images as `out/<class>/<n>.<ext>` (an ImageFolder tree); returns the count."""
    info = manifest.split(split)
    out = Path(out)
    for i, (ext, data, meta) in enumerate(_read_raw_samples(info.shards, info.count)):
        folder = out / meta["class"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}.{ext}").write_bytes(data)
    return info.count


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decode_loop(raw: list[bytes], transform) -> None:
    from bcc.imageio import decode_rgb  # the trainer's reader: the loop times what the stream decodes

    for data in raw:
        transform(decode_rgb(data, max_pixels=None))  # as the stream reads stored images (bcc.stream_samples)


_PARALLEL: tuple = ()  # (raw, transform, barrier), inherited by the forked decode processes


def _parallel_job(_: int) -> tuple[float, float]:
    raw, transform, barrier = _PARALLEL
    torch.set_num_threads(1)
    _decode_loop(raw[:8], transform)  # warm-up
    barrier.wait()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    _decode_loop(raw, transform)
    return t0, time.perf_counter()


def _parallel_decode(raw: list[bytes], transform, processes: int) -> tuple[int, float]:
    """(images, seconds) of `processes` forked processes each running the decode loop at the same time."""
    import multiprocessing

    global _PARALLEL
    ctx = multiprocessing.get_context("fork")
    _PARALLEL = (raw, transform, ctx.Barrier(processes))
    try:
        with ctx.Pool(processes) as pool:
            spans = pool.map(_parallel_job, range(processes))
    finally:
        _PARALLEL = ()
    return processes * len(raw), max(e for _, e in spans) - min(s for s, _ in spans)


def bench_data(
    shards: str | Path,
    *,
    split: str = "train",
    workers: int = 2,
    batches: int = 50,
    warmup: int = 5,
    batch_size: int = 32,
    image_size: int = 224,
    source: str | Path | None = None,
    rounds: int = 3,
    progress: Progress = quiet,
) -> DataBench:
    """Measure (a) bcc's stream, (b) ImageFolder + DataLoader and (c) the per-core decode limit.

    `source` is the original class-folder tree for (b); without it the split is unpacked into a temporary
    tree first (untimed). Each round runs a, b, c in turn; the medians over rounds are reported. With more
    than one worker, (c) also runs in `workers` processes at once: on a busy machine that, not (c) x
    workers, is what the free cores allow.
    """
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from bcc.manifest import Manifest
    from bcc.stream import train_loader
    from bcc.transforms import crops_from_config

    manifest = Manifest.load(shards)
    cfg = data_config(shards, split, workers, batch_size, image_size)
    transform, _ = crops_from_config(cfg)  # what a loader worker runs; the float part is on the device
    info = manifest.split(split)

    from bcc.stream import StreamError, train_batches

    try:  # before the split is unpacked: a batch the split cannot fill fails at once, named by this command's option
        stream_len = train_batches(manifest, cfg, 1)
    except StreamError:
        raise BenchError(f"--batch-size {batch_size}: split '{split}' holds {info.count} images, fewer than one "
                         "batch; lower --batch-size") from None
    with tempfile.TemporaryDirectory(prefix="bcc-bench-") as tmp:
        if source is None:
            progress(f"unpacking split '{split}' into a class-folder tree (untimed)")
            unpack_split(manifest, split, tmp)
            root = tmp
        else:
            root = str(source)
        try:
            folder = ImageFolder(root, transform=transform)
        except FileNotFoundError as e:  # no such folder, or no class folder with images in it
            raise BenchError(f"--source {root}: {e}") from None

        # never ask for more batches than one epoch of either loader holds
        folder_len = len(folder) // batch_size
        available = min(stream_len, folder_len) - warmup
        if available < 1:
            raise BenchError(
                f"{min(stream_len, folder_len)} batches of {batch_size} per epoch leave none after "
                f"{warmup} warm-up batches; lower --batch-size or the warm-up"
            )
        count = min(batches, available)
        per_process = max(1, count * batch_size // max(workers, 1))
        raw = [data for _, data, _ in _read_raw_samples(info.shards, per_process)]
        while len(raw) < per_process:  # a split smaller than the loop cycles its bytes
            raw += raw[: per_process - len(raw)]

        stream_t, folder_t, decode_t = Timing("stream"), Timing("folder"), Timing("decode")
        parallel_t = Timing("parallel")
        cpu: dict[str, list[float]] = {k: [] for k in ("(a) workers", "(a) main", "(b) workers", "(b) main", "(c)")}
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}: (a) bcc stream")
            loader = train_loader(manifest, cfg, seed=0, epoch=r, rank=0, world_size=1)
            n, s, wcpu, mcpu = _time_batches(loader, warmup, count, lambda b: b["label"].numel())
            stream_t.images.append(n)
            stream_t.seconds.append(s)
            cpu["(a) workers"].append(wcpu / n)
            cpu["(a) main"].append(mcpu / n)

            progress(f"round {r + 1}/{rounds}: (b) ImageFolder + DataLoader")
            folder_loader = DataLoader(
                folder, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                generator=torch.Generator().manual_seed(r),
            )
            n, s, wcpu, mcpu = _time_batches(folder_loader, warmup, count, lambda b: b[1].numel())
            folder_t.images.append(n)
            folder_t.seconds.append(s)
            cpu["(b) workers"].append(wcpu / n)
            cpu["(b) main"].append(mcpu / n)

            progress(f"round {r + 1}/{rounds}: (c) decode + transform, one process")
            with _threads(1):  # a DataLoader worker runs torch with one thread
                _decode_loop(raw[: min(len(raw), batch_size)], transform)  # warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                _decode_loop(raw, transform)
                decode_t.seconds.append(time.perf_counter() - t0)
                cpu["(c)"].append((time.process_time() - c0) / len(raw))
            decode_t.images.append(len(raw))
            if workers > 1:
                progress(f"round {r + 1}/{rounds}: (c) in {workers} processes at once")
                n, s = _parallel_decode(raw, transform, workers)
                parallel_t.images.append(n)
                parallel_t.seconds.append(s)

    return DataBench(
        stream=stream_t, folder=folder_t, decode=decode_t, parallel=parallel_t, workers=workers, batch_size=batch_size,
        batches=count, warmup=warmup, image_size=image_size, rounds=rounds, folder_root=root if source else "",
        folder_images=len(folder), split_images=info.count, cpu=cpu,
    )
