"""Benchmarks users run on their own machines: does the data path keep up, and what does the trainer cost.

`bench_data` times three ways of making augmented training batches from the same images, alternating
them round by round in one process so that background load hits all of them alike:
  (a) bcc's stream (`bcc.stream.train_loader`) reading the packed shards;
  (b) torchvision `ImageFolder` + `DataLoader` over a class-folder tree of the same images;
  (c) the per-core limit: decode + transform of the same JPEG bytes in a tight loop in one process, one
      intra-op thread (as in a loader worker); multiplied by the number of workers it is what (a) could
      reach if the loader cost nothing beyond decode and augmentation. With several workers the same loop
      also runs in that many processes at once, which shows how many cores the machine really has free.
`bench_rss` streams a synthetic dataset at two sizes and records the peak resident memory of the loader's
process tree (main process + workers), which must not grow with the dataset.
`bench_step` times `bcc.loop.train_step` with the loop's per-step bookkeeping against a plain PyTorch step
on the same model and a fixed in-memory batch, and the frozen-backbone step against the full one.

Everything here returns numbers; printing is the CLI's job (`bcc bench`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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


# --------------------------------------------------------------------------- data path


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


def _data_config(shards: str | Path, split: str, workers: int, batch_size: int, image_size: int):
    from bcc.config import DataConfig

    return dataclasses.replace(
        DataConfig(), shards=str(shards), train_split=split, workers=workers, batch_size=batch_size,
        image_size=image_size,
    )


def _time_batches(batches: Iterable, warmup: int, count: int, images_of: Callable) -> tuple[int, float]:
    """(images, seconds) of `count` batches after `warmup` untimed ones; worker start-up falls in the warm-up."""
    it = iter(batches)
    try:
        for _ in range(warmup):
            next(it)
        images = 0
        t0 = time.perf_counter()
        for _ in range(count):
            images += images_of(next(it))
        return images, time.perf_counter() - t0
    finally:
        del it  # shuts the workers down before the next measurement starts


def _read_raw_samples(shards: Sequence, limit: int) -> list[tuple[str, bytes, dict]]:
    """(extension, image bytes, json metadata) of the first `limit` samples of `shards` in order."""
    from bcc.stream import IMAGE_KEYS, _read_shard

    out = []
    for shard in shards:
        for sample in _read_shard(shard):
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
    from PIL import Image

    for data in raw:
        with Image.open(io.BytesIO(data)) as img:
            transform(img.convert("RGB"))


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
    progress: Progress = _quiet,
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
    from bcc.transforms import presets_from_config

    manifest = Manifest.load(shards)
    cfg = _data_config(shards, split, workers, batch_size, image_size)
    transform, _ = presets_from_config(cfg)
    info = manifest.split(split)

    with tempfile.TemporaryDirectory(prefix="bcc-bench-") as tmp:
        if source is None:
            progress(f"unpacking split '{split}' into a class-folder tree (untimed)")
            unpack_split(manifest, split, tmp)
            root = tmp
        else:
            root = str(source)
        folder = ImageFolder(root, transform=transform)

        # never ask for more batches than one epoch of either loader holds
        stream_len = len(train_loader(manifest, cfg, seed=0, epoch=0, rank=0, world_size=1))
        folder_len = len(folder) // batch_size
        available = min(stream_len, folder_len) - warmup
        if available < 1:
            raise ValueError(
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
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}: (a) bcc stream")
            loader = train_loader(manifest, cfg, seed=0, epoch=r, rank=0, world_size=1)
            n, s = _time_batches(loader, warmup, count, lambda b: b["label"].numel())
            stream_t.images.append(n)
            stream_t.seconds.append(s)

            progress(f"round {r + 1}/{rounds}: (b) ImageFolder + DataLoader")
            folder_loader = DataLoader(
                folder, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                generator=torch.Generator().manual_seed(r),
            )
            n, s = _time_batches(folder_loader, warmup, count, lambda b: b[1].numel())
            folder_t.images.append(n)
            folder_t.seconds.append(s)

            progress(f"round {r + 1}/{rounds}: (c) decode + transform, one process")
            with _threads(1):  # a DataLoader worker runs torch with one thread
                _decode_loop(raw[: min(len(raw), batch_size)], transform)  # warm-up
                t0 = time.perf_counter()
                _decode_loop(raw, transform)
                decode_t.seconds.append(time.perf_counter() - t0)
            decode_t.images.append(len(raw))
            if workers > 1:
                progress(f"round {r + 1}/{rounds}: (c) in {workers} processes at once")
                n, s = _parallel_decode(raw, transform, workers)
                parallel_t.images.append(n)
                parallel_t.seconds.append(s)

    return DataBench(
        stream=stream_t, folder=folder_t, decode=decode_t, parallel=parallel_t, workers=workers, batch_size=batch_size,
        batches=count, warmup=warmup, image_size=image_size, rounds=rounds, folder_root=root if source else "",
        folder_images=len(folder), split_images=info.count,
    )


# --------------------------------------------------------------------------- loader memory


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


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def write_synthetic_shards(out: str | Path, samples: int, *, per_shard: int = 1000, image_px: int = 16) -> Path:
    """A fake packed dataset of `samples` tiny JPEGs under `out` (one real shard, hard-linked as often as
    needed, and a manifest listing them). Only for memory and throughput checks of the stream."""
    from bcc.taxonomy import Taxonomy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = Taxonomy.default()
    classes = list(taxonomy.class_names)
    images = [_tiny_jpeg(i, image_px) for i in range(8)]
    first = out / "train-000000.tar"
    with tarfile.open(first, "w") as tar:
        for i in range(per_shard):
            label = i % len(classes)
            meta = {"class": classes[label], "label": label, "source": f"synthetic/{i}"}
            _add_bytes(tar, f"train-{i:08d}.jpg", images[i % len(images)])
            _add_bytes(tar, f"train-{i:08d}.json", json.dumps(meta).encode())
    shards, left, index = [], samples, 0
    while left > 0:
        n = min(per_shard, left)
        path = out / f"train-{index:06d}.tar"
        if n < per_shard:  # a short last shard gets its own file
            path = out / f"train-{index:06d}-short.tar"
            with tarfile.open(first) as src, tarfile.open(path, "w") as dst:
                members = src.getmembers()[: 2 * n]
                for m in members:
                    dst.addfile(m, src.extractfile(m))
        elif index > 0:
            os.link(first, path)
        shards.append({"path": path.name, "count": n, "sha256": ""})
        left -= n
        index += 1
    per_class = {c: samples // len(classes) + (i < samples % len(classes)) for i, c in enumerate(classes)}
    manifest = {
        "format": "bcc-shards/1", "created": "synthetic", "bcc_version": "bench", "source": "synthetic",
        "options": {}, "taxonomy": taxonomy.to_dict(), "classes": classes,
        "splits": {"train": {"count": samples, "class_counts": per_class, "shards": shards}},
        "skipped": [], "converted": [], "duplicates": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
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
    progress: Progress = _quiet,
) -> list[RssPoint]:
    """Peak RSS of the loader process tree over one full epoch of a synthetic dataset of each size."""
    from bcc.manifest import Manifest
    from bcc.stream import train_loader

    points = []
    with tempfile.TemporaryDirectory(prefix="bcc-bench-rss-") as tmp:
        for n in sizes:
            root = write_synthetic_shards(Path(tmp) / f"n{n}", n, per_shard=max(1, min(1000, n // max(workers, 1))))
            manifest = Manifest.load(root)
            cfg = _data_config(root, "train", workers, batch_size, image_size)
            loader = train_loader(manifest, cfg, seed=0, epoch=0, rank=0, world_size=1)
            progress(f"streaming {n:,} synthetic samples ({len(loader)} batches)")
            t0 = time.perf_counter()
            with _PeakRss() as rss:
                count = sum(1 for _ in loader)
            points.append(RssPoint(n, count, rss.peak, rss.processes, time.perf_counter() - t0))
    return points


# --------------------------------------------------------------------------- train step


@dataclass(frozen=True)
class StepBench:
    plain: Timing  # plain PyTorch loop, everything trainable
    full: Timing  # bcc train_step, schedule 'full'
    frozen: Timing  # bcc train_step, schedule 'frozen' (heads only)
    backbone: str
    batch_size: int
    image_size: int
    steps: int
    warmup: int
    rounds: int
    device: str
    mixed_precision: str
    trainable: dict[str, int]  # variant -> trainable parameters

    @property
    def overhead(self) -> float:
        """bcc step time over plain step time, minus 1 (0.02 = 2% slower)."""
        return self.plain.rate / self.full.rate - 1.0

    @property
    def frozen_speedup(self) -> float:
        return self.frozen.rate / self.full.rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _taxonomy_and_counts(cfg):
    """The dataset's taxonomy and train class counts when its manifest exists, else the default's."""
    from bcc.manifest import Manifest, ManifestError
    from bcc.taxonomy import Taxonomy

    try:
        manifest = Manifest.load(cfg.data.shards)
        split = manifest.split(cfg.data.train_split)
        return manifest.taxonomy, split.class_counts
    except ManifestError:
        taxonomy = Taxonomy.default()
        return taxonomy, {c: 1 for c in taxonomy.class_names}


class _BccLoop:
    """The loop's per-step work (`Trainer._run_epoch`) around `train_step`, for one schedule stage."""

    def __init__(self, cfg, accelerator, taxonomy, class_counts, preset: str):
        from bcc.config import ScheduleConfig
        from bcc.loop import class_weights_from_manifest, head_targets
        from bcc.loss import MultitaskLoss
        from bcc.model import build_model, count_parameters, group_of_module, parameter_groups
        from bcc.schedule import (
            apply_trainable,
            build_param_groups,
            frozen_batchnorms,
            resolve_stages,
            set_train_mode,
        )

        self.cfg, self.acc = cfg, accelerator
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, taxonomy.head_sizes)
        groups = parameter_groups(model)
        schedule = ScheduleConfig(preset=preset, frozen_bn=cfg.schedule.frozen_bn)
        self.stage = resolve_stages(schedule, 1, list(groups), cfg.train.warmup_steps)[0]
        apply_trainable(groups, self.stage.train)
        frozen_bn = (frozen_batchnorms(model, group_of_module(model), self.stage.train)
                     if cfg.schedule.frozen_bn == "eval" else [])
        t = cfg.train
        param_groups = build_param_groups(groups, self.stage, t.weight_decay)
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
        else:
            opt = torch.optim.AdamW(param_groups, lr=t.lr)
        self.model = model
        self.wrapped, self.optimizer = accelerator.prepare(model, opt)
        set_train_mode(model, frozen_bn)
        weights = class_weights_from_manifest(taxonomy, class_counts) if cfg.loss.class_weights == "auto" else None
        self.loss_fn = MultitaskLoss(taxonomy.head_names, cfg.loss.head_weights, weights,
                                     cfg.loss.label_smoothing).to(accelerator.device)
        table = taxonomy.target_table().to(accelerator.device)
        self.targets_of = lambda labels: head_targets(table, labels, taxonomy.head_names)
        self.trainable = count_parameters(model, trainable_only=True)
        self.step_index = 0
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_n = 0
        from bcc.loop import PreemptionFlag

        self.preempt = PreemptionFlag(install_handlers=False)

    def step(self, batch: dict) -> None:
        from bcc.loop import move_batch, train_step
        from bcc.schedule import lr_factor

        acc, cfg = self.acc, self.cfg
        self.preempt.agreed()  # the loop's per-step preemption vote
        factor = lr_factor(self.step_index, 1000, self.stage.warmup_steps, cfg.train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.train.lr * group["lr_mult"] * factor
        batch = move_batch(batch, acc.device, cfg.model.channels_last)
        loss = train_step(self.wrapped, batch, self.loss_fn, self.optimizer, acc, self.targets_of,
                          cfg.train.clip_grad)
        self.loss_sum += loss
        self.loss_n += 1
        if acc.sync_gradients:
            self.step_index += 1
            if self.step_index % cfg.train.log_every == 0:
                (self.loss_sum / max(self.loss_n, 1)).item()  # the loop's log-time sync point
                self.loss_sum.zero_()
                self.loss_n = 0


class _PlainLoop:
    """What a plain PyTorch script does: one optimizer over all parameters, cross-entropy per head."""

    def __init__(self, cfg, device, taxonomy, batch):
        from bcc.model import build_model, count_parameters

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, taxonomy.head_sizes).to(device)
        self.model.train()
        t = cfg.train
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        table = taxonomy.target_table()
        labels = batch["label"]
        self.targets = [table[labels, i].to(device) for i in range(table.shape[1])]
        self.trainable = count_parameters(self.model, trainable_only=True)
        precision = cfg.train.mixed_precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, batch: dict) -> None:
        import torch.nn.functional as F

        x = batch["image"].to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)
            loss = sum(F.cross_entropy(out, t, ignore_index=-1) for out, t in zip(logits, self.targets, strict=True))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


def bench_step(cfg, *, steps: int = 10, warmup: int = 2, rounds: int = 3, progress: Progress = _quiet) -> StepBench:
    """Plain PyTorch step vs bcc's train step (full and frozen backbone) on one fixed in-memory batch.

    Only `model`, `data.image_size`, `data.batch_size`, `loss` and `train` of `cfg` are used. Rounds
    alternate plain, full, frozen; each round runs `warmup` untimed steps, then `steps` timed ones.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum
    )
    device = accelerator.device
    taxonomy, counts = _taxonomy_and_counts(cfg)
    n, size = cfg.data.batch_size, cfg.data.image_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batch = {
        "image": torch.randn(n, 3, size, size, generator=gen),
        "label": torch.randint(len(taxonomy.class_names), (n,), generator=gen),
    }
    progress(f"building 3 x {cfg.model.backbone} on {device}")
    loops = {
        "plain": _PlainLoop(cfg, device, taxonomy, batch),
        "full": _BccLoop(cfg, accelerator, taxonomy, counts, "full"),
        "frozen": _BccLoop(cfg, accelerator, taxonomy, counts, "frozen"),
    }
    timings = {name: Timing(name) for name in loops}
    for r in range(rounds):
        for name, loop in loops.items():
            progress(f"round {r + 1}/{rounds}: {name}")
            for _ in range(warmup):
                loop.step(batch)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loop.step(batch)
            _sync(device)
            timings[name].seconds.append(time.perf_counter() - t0)
            timings[name].images.append(steps * n)
    return StepBench(
        plain=timings["plain"], full=timings["full"], frozen=timings["frozen"], backbone=cfg.model.backbone,
        batch_size=n, image_size=size, steps=steps, warmup=warmup, rounds=rounds, device=str(device),
        mixed_precision=cfg.train.mixed_precision,
        trainable={name: loop.trainable for name, loop in loops.items()},
    )
