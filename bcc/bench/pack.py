"""`bench_pack`: `bcc pack`'s throughput against the decode limit, and its peak memory, at two sizes.

The sources are synthetic blood-smear JPEGs: a pool of cells rendered by `bcc.synth.render_cell`, each
image a crop of a random 2x2 mosaic of its class's cells (so pHashes differ as real images' do, and
a million images cost a few minutes to make, not hours). They are made once, for the largest size, and
the smaller sizes are hard-linked subsets; making them is not timed.

The decode limit is the per-image first-pass work (read, sha256, full decode, pHash: `bcc.pack_pool`'s
`_inspect`, which `bcc.pack` runs) in this one process, on every k-th image of the set; the pack runs with
`workers` processes, so the goal is throughput >= 0.8 x limit x workers. On a shared 2-core machine one
5 s measurement swung 3,500-4,100 img/s back to back (the same files, the same process), so the limit is
the median of four 2.5 s measurements, two just before the pack and two just after, and their range is
reported: a ratio then measures the packer, not which second the limit happened to be taken in; for the
same reason the pack itself runs `repeats` times and its median img/s is taken (all runs are reported). The
same work is also measured in `workers` processes at once (disjoint files, rates summed): what the cores
really give together, which "limit x workers" takes to be linear; both ratios are reported. The limit
is the packer's necessary per-image work, no more (no pool, no staging copy, no shard write) and no less (a bare decode would
leave out the sha256 and the pHash that the duplicate and near-duplicate promises need). Peak RSS is
summed over the packer's process tree (a fresh interpreter running `pack_folders`, and its workers), sampled
every 20 ms: the packer's own footprint, not this benchmark's imports. Listing the tree is done every
200 ms only: it scans every process on the machine (~2 ms of CPU), which polled every 20 ms took ~7%
of a core from the packer it measured.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcc.bench import BenchError, Progress, quiet

__all__ = ["PackPoint", "bench_pack", "synthetic_sources"]

_CELLS_PER_CLASS = 64


@dataclass(frozen=True)
class PackPoint:
    images: int
    workers: int
    seconds: float  # of the median pack (the one whose stages are given)
    runs: tuple[float, ...]  # img/s of every pack of this size
    limit_per_process: float  # img/s of the first-pass work in one process (the decode limit: a median)
    limit_range: tuple[float, float]  # lowest and highest of the measurements the median is taken over
    limit_together: float  # img/s of the same work in `workers` processes at once, summed
    peak_rss: int  # bytes, summed over the packer's process tree
    processes: int
    shards: int
    near_duplicate_groups: int
    side_files: tuple[str, ...]
    load: tuple[float, float, float]  # 1, 5, 15 min load average when the pack started
    stages: dict  # seconds per stage of the median pack (scan, first pass, split, write, manifest)

    @property
    def images_per_s(self) -> float:
        """The median img/s of the packs (one pack swings +-5-8% on a quiet machine)."""
        return statistics.median(self.runs)

    @property
    def ratio(self) -> float:
        """throughput / (decode limit x workers); goal >= 0.8."""
        return self.images_per_s / (self.limit_per_process * self.workers)

    @property
    def first_pass_ratio(self) -> float:
        """The first pass alone (listing, pool start and worker imports included) / (limit x workers)."""
        seconds = self.stages.get("scan + first pass", 0.0)
        return self.images / seconds / (self.limit_per_process * self.workers) if seconds > 0 else 0.0

    @property
    def ratio_together(self) -> float:
        """throughput / (the decode limit measured in `workers` processes at once)."""
        return self.images_per_s / self.limit_together


def synthetic_sources(root: str | Path, n: int, *, image_px: int = 64, seed: int = 0) -> Path:
    """`n` synthetic JPEGs (image_px square) under `root/<Class>/`, classes in turn."""
    from PIL import Image

    from bcc.synth import SYNTH_CLASSES, render_cell

    root = Path(root)
    rng = np.random.default_rng(seed)
    cells = [[np.asarray(render_cell(c, image_px, rng)) for _ in range(_CELLS_PER_CLASS)] for c in SYNTH_CLASSES]
    for c in SYNTH_CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ci = i % len(SYNTH_CLASSES)
        pick = rng.integers(0, _CELLS_PER_CLASS, 4)
        pool = cells[ci]
        mosaic = np.concatenate([np.concatenate([pool[pick[0]], pool[pick[1]]], axis=1),
                                 np.concatenate([pool[pick[2]], pool[pick[3]]], axis=1)], axis=0)
        y, x = rng.integers(0, image_px, 2)
        crop = mosaic[y:y + image_px, x:x + image_px]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=90)
        (root / SYNTH_CLASSES[ci] / f"img{i // len(SYNTH_CLASSES):07d}.jpg").write_bytes(buf.getvalue())
    return root


def _subset(full: Path, out: Path, n: int) -> Path:
    """The first n images of `full` (classes in turn) as hard links under `out`."""
    from bcc.synth import SYNTH_CLASSES

    k = len(SYNTH_CLASSES)
    for ci, c in enumerate(SYNTH_CLASSES):
        (out / c).mkdir(parents=True, exist_ok=True)
        for j in range(n // k + (ci < n % k)):
            os.link(full / c / f"img{j:07d}.jpg", out / c / f"img{j:07d}.jpg")
    return out


def decode_limit(src: Path, *, images: int = 2000, seconds: float = 5.0,
                 part: tuple[int, int] = (0, 1)) -> float:
    """img/s of the packer's first-pass work per image in this one process (up to `images` files or
    `seconds`, whichever comes first), on files spread over the whole set (every classes' folder);
    `part` (k, W): every W-th of those files from the k-th."""
    from bcc.imageio import MAX_IMAGE_PIXELS
    from bcc.pack_pool import _inspect, _Options

    k, every = part
    every_file = sorted(str(p) for p in src.rglob("*.jpg"))
    spread = every_file[::max(1, len(every_file) // (images * every))]
    paths = spread[k::every][:images]
    opts = _Options(None, 90, MAX_IMAGE_PIXELS, "", phash=True)  # nothing to stage: JPEGs are stored as read
    _inspect(paths[0], opts)  # imports and first-call costs
    t0 = time.perf_counter()
    done = 0
    for p in paths:
        _inspect(p, opts)
        done += 1
        if time.perf_counter() - t0 > seconds:
            break
    return done / (time.perf_counter() - t0)


def _limit_part(args: tuple[Path, int, int]) -> float:
    src, k, workers = args
    return decode_limit(src, part=(k, workers))


def decode_limit_together(src: Path, workers: int) -> float:
    """Summed img/s of `decode_limit` run in `workers` processes at once on disjoint files: what the
    machine's cores give together for the same work (shared caches, memory bandwidth, clock limits),
    which `decode_limit` x workers assumes to be linear."""
    if workers <= 1:
        return decode_limit(src)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return sum(pool.map(_limit_part, [(src, k, workers) for k in range(workers)]))


_CHILD = """
import json, sys
from bcc.pack import pack_folders
r = pack_folders(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), shard_size=int(sys.argv[4]))
side = [v["file"] for v in r.manifest.values() if isinstance(v, dict) and "file" in v]
print(json.dumps({"seconds": r.elapsed_s, "images_per_s": r.images_per_s, "counts": r.counts, "side": side,
                  "stages": r.stages}))
"""


def _tree(proc) -> list:
    """`proc` (psutil.Process) and its descendants now (a scan of every process on the machine)."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_rss(tree: list) -> tuple[int, int]:
    """(summed RSS in bytes, processes alive) of the processes in `tree`."""
    import psutil

    total, n = 0, 0
    for p in tree:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:  # exited between listing and reading
            pass
    return total, n


def _pack_in_child(src: Path, out: Path, workers: int, shard_size: int) -> tuple[dict, int, int]:
    """Run `pack_folders` in a fresh interpreter (the packer's own imports, not this benchmark's) and
    poll the peak RSS of its process tree every 20 ms (the tree itself listed every 200 ms). Returns
    (its result, peak bytes, processes)."""
    import json
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out), str(workers), str(shard_size)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    peak, processes, tree = 0, 0, []
    for k in itertools.count():
        if child.poll() is not None:
            break
        if k % 10 == 0:  # listing the tree scans all processes (~2 ms of CPU, taken from the packer's
            tree = _tree(proc)  # cores): the pool is forked at the start and stays, so list it now and then
        rss, n = _tree_rss(tree)
        peak, processes = max(peak, rss), max(processes, n)
        time.sleep(0.02)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise BenchError(f"bcc pack of {src} failed in its benchmark process: {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), peak, processes


def bench_pack(sizes: Sequence[int] = (20_000, 200_000), *, workers: int | None = None, image_px: int = 64,
               shard_size: int = 1000, repeats: int = 3, progress: Progress = quiet) -> list[PackPoint]:
    """Pack synthetic sources of each size with `workers` processes (default: the CPU affinity) in a
    fresh interpreter, `repeats` times; one `PackPoint` per size, smallest first (near-duplicate grouping on, as by
    default): the median throughput (one pack swings +-5-8% on a quiet 2-core machine, as the limit
    does), the peak RSS of all of them."""
    from bcc.pack import default_workers

    workers = workers or default_workers()
    if len(sizes) < 1 or min(sizes) < 8:
        raise BenchError(f"bench pack needs sizes of at least 8 images, got {list(sizes)}")
    if len(set(sizes)) != len(sizes):
        raise BenchError(f"bench pack needs different sizes, got {list(sizes)}")
    sizes = sorted(sizes)  # points smallest first: the memory goal is the largest's over the smallest's
    points = []
    with tempfile.TemporaryDirectory(prefix="bcc-bench-pack-") as tmp:
        tmp = Path(tmp)
        largest = max(sizes)
        progress(f"making {largest:,} synthetic {image_px} px JPEGs (not timed)")
        full = synthetic_sources(tmp / f"src{largest}", largest, image_px=image_px)
        subsets = {n: full if n == largest else _subset(full, tmp / f"src{n}", n) for n in sizes}
        if hasattr(os, "sync"):  # the sources' write-back to disk is not the packer's work: done before timing
            os.sync()
        for n in sizes:
            src = subsets[n]
            limits = [decode_limit(src, seconds=2.5) for _ in range(2)]
            together = decode_limit_together(src, workers)
            progress(f"packing {n:,} images with {workers} worker(s); one process does "
                     f"{statistics.median(limits):,.0f} img/s, {workers} at once {together:,.0f}")
            load = os.getloadavg()
            runs = []
            for _ in range(repeats):
                runs.append(_pack_in_child(src, tmp / f"out{n}", workers, shard_size))
                shutil.rmtree(tmp / f"out{n}")
            limits += [decode_limit(src, seconds=2.5) for _ in range(2)]  # the same work just after the packs
            limit = statistics.median(limits)
            rates = [r["images_per_s"] for r, _, _ in runs]
            result = sorted(runs, key=lambda r: r[0]["images_per_s"])[len(runs) // 2][0]  # the median run
            points.append(PackPoint(n, workers, result["seconds"], tuple(rates), limit,
                                    (min(limits), max(limits)), together, max(peak for _, peak, _ in runs),
                                    max(p for _, _, p in runs), result["counts"]["shards"],
                                    result["counts"]["near_duplicate_groups"], tuple(result["side"]), load,
                                    result["stages"]))
            progress(f"{n:,} images: {points[-1].images_per_s:,.0f} img/s, / (limit x workers) "
                     f"{points[-1].ratio:.2f} (limit {limit:,.0f}, measured {min(limits):,.0f}-{max(limits):,.0f}), "
                     f"/ limit together {points[-1].ratio_together:.2f}, peak RSS {points[-1].peak_rss / 2**20:,.0f} MiB, "
                     f"stages {result['stages']}")
    return points
