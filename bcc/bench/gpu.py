"""`bench_gpu`: the GPU check (issue 13, item 6). One run on one GPU, at most ~5 minutes, one JSON report.

Parts, each recorded as its figures, `{"skipped": reason}` or `{"error": message}`, so one failing part
never loses the others:

steps    bcc's train step (the trainer's set-up and step, `bench.step._BccLoop`) per fine-tuning stage
         (frozen: heads; deepest: the deepest block + heads; full: everything; the `staged` plan's three
         stages) for {fp32, bf16} x {NCHW, NHWC} x the plan's batch sizes, on random tensors made on the
         device (no data loading).
loader   bcc's stream (`bcc.stream.TrainLoader`, training transform) at each worker count, over two packs
         it makes in a temporary directory: synthetic cells (`bcc.synth`) at an "original" size, packed
         as they are and pre-resized to the training size (`bcc.pack.pack_folders(resize=...)`).
decode   JPEG decode rate of both packs' images: per core with PIL (the trainer's reader,
         `bcc.imageio.decode_rgb`) and with `torchvision.io.decode_jpeg`, and on CUDA batched on the
         device (`decode_jpeg(..., device="cuda")`).
nccl     one DDP step in a 1-rank NCCL group (CUDA only)  } the model and loss of `build_components`, on a
gloo     one DDP step in a 2-rank gloo group              } batch with no malignant sample, so the subtype
                                                            head's targets are all masked: it must neither
                                                            fail nor hang (the ranks run under a timeout).
sync_bn  the same step with BatchNorm converted to SyncBatchNorm in both groups (CUDA only: DDP refuses it
         on the CPU; at world size 1 torch runs it as plain BatchNorm, the 2-rank group gathers statistics).
compile  `torch.compile` of the prepared model: the first (compiling) step, then compiled vs eager rate.

`--device cpu` runs the same code at tiny shapes (`plan_for`), which is what the test suite checks.

This module runs the parts and owns steps, loader, decode, compile and the report; the plan and the shared
pieces are `bench.gpu_plan`'s, the rank processes of nccl, gloo and sync_bn are `bench.gpu_ddp`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from bcc.bench import BenchError, Progress, quiet
from bcc.bench.gpu_ddp import run_ranks
from bcc.bench.gpu_plan import (
    LAYOUTS,
    PRECISIONS,
    STAGES,
    GpuPlan,
    _accelerator,
    _default_taxonomy,
    _device_batch,
    _error,
    _release,
    _step_config,
    plan_for,
)
from bcc.bench.step import time_steps

FORMAT = "bcc-bench-gpu/1"
PARTS = ("steps", "loader", "decode", "nccl", "gloo", "sync_bn", "compile")  # the report's sections, in run order


def resolve_device(name: str | None) -> torch.device:
    """`cuda`, `cpu`, or None (CUDA when a GPU is visible). Raises BenchError for CUDA without a GPU."""
    if name not in (None, "cuda", "cpu"):
        raise BenchError(f"--device must be cuda or cpu, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise BenchError(f"no CUDA device visible{where}: torch.cuda.is_available() is False; "
                         "pass --device cpu for the small CPU run of the same checks")
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------- steps


def bench_steps(plan: GpuPlan, device: torch.device, deadline: float, progress: Progress = quiet) -> dict:
    """img/s of bcc's train step per precision x layout x stage x batch size (a list of entries)."""
    from bcc.bench.step import _BccLoop

    taxonomy, counts = _default_taxonomy()
    classes = list(range(len(taxonomy.class_names)))
    results: list[dict] = []
    for precision in PRECISIONS:
        accelerator = _accelerator(precision, device)
        for layout in LAYOUTS:
            cfg = _step_config(plan, precision, layout)
            for stage_index, stage in enumerate(STAGES):
                keys = {"precision": precision, "layout": layout, "stage": stage}
                if time.monotonic() > deadline:
                    results += [{**keys, "batch_size": n, "skipped": "time budget spent"} for n in plan.batch_sizes]
                    continue
                progress(f"steps: {precision} {layout} {stage}")
                loop = None
                try:
                    loop = _BccLoop(cfg, accelerator, taxonomy, counts, "staged", stage=stage_index)
                except Exception as e:  # noqa: BLE001 -- recorded in the report, the grid goes on
                    results += [{**keys, "batch_size": n, **_error(e)} for n in plan.batch_sizes]
                for n in plan.batch_sizes if loop is not None else ():
                    entry = {**keys, "batch_size": n, "trainable_params": loop.trainable}
                    try:
                        batch = _device_batch(n, plan.image_size, device, LAYOUTS[layout], classes)
                        seconds = time_steps(lambda b=batch, lp=loop: lp.step(b), plan.steps, plan.warmup, device)
                        entry |= {"steps": plan.steps, "ms_per_step": 1000 * seconds / plan.steps,
                                  "img_per_s": n * plan.steps / seconds}
                    except Exception as e:  # noqa: BLE001 -- e.g. out of memory at the larger batch
                        entry |= _error(e)
                    results.append(entry)
                    batch = None
                loop = None
                accelerator.free_memory()  # Accelerate holds every prepared model until told otherwise
                _release(device)
    cudnn = torch.backends.cudnn
    return {"backbone": plan.backbone, "image_size": plan.image_size, "warmup": plan.warmup,
            "settings": {"cudnn_benchmark": cudnn.benchmark, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                         "tf32_cudnn": cudnn.allow_tf32},
            "results": results}


# --------------------------------------------------------------------------- synthetic packs, loader, decode


def make_packs(plan: GpuPlan, tmp: Path) -> dict[str, Path]:
    """Synthetic cells at `plan.original_px` packed twice: as they are ("original") and resized to the
    training size ("pre-resized"). Each rendered image is stored `plan.copies` times (hard links)."""
    from bcc.pack import pack_folders
    from bcc.synth import SYNTH_CLASSES, synthesize

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    src = tmp / "images"
    synthesize(src, per_class=plan.unique_images // len(SYNTH_CLASSES), size=plan.original_px, seed=0,
               workers=cpus)
    for image in sorted(src.glob("*/*.jpg")):
        for k in range(1, plan.copies):
            os.link(image, image.with_name(f"{image.stem}_copy{k:03d}.jpg"))
    packs = {}
    for kind, resize in (("pre-resized", plan.image_size), ("original", None)):
        packs[kind] = tmp / kind
        pack_folders(src, packs[kind], split=(1.0, 0.0, 0.0), resize=resize, min_shards=max(plan.loader_workers),
                     workers=cpus, near_dup_threshold=None)
    return packs


def _epoch_batches(loader) -> Iterable[dict]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def bench_loader(plan: GpuPlan, packs: dict[str, Path], device: torch.device, deadline: float,
                 progress: Progress = quiet) -> dict:
    """img/s of bcc's training stream per pack and worker count (one rank, `plan.loader_batch_size`)."""
    from bcc.bench.data import _time_batches, data_config
    from bcc.manifest import Manifest
    from bcc.stream import TrainLoader

    pin = device.type == "cuda"
    results = []
    for kind, shards in packs.items():
        manifest = Manifest.load(shards)
        for workers in plan.loader_workers:
            entry: dict[str, Any] = {"pack": kind, "workers": workers}
            if time.monotonic() > deadline:
                results.append({**entry, "skipped": "time budget spent"})
                continue
            progress(f"loader: {kind} pack, {workers} worker(s)")
            cfg = data_config(shards, "train", workers, plan.loader_batch_size, plan.image_size)
            try:
                with TrainLoader(manifest, cfg, seed=0, rank=0, world_size=1, pin_memory=pin) as loader:
                    # one untimed batch per worker: each worker's first batch carries its start-up
                    images, seconds, _, _ = _time_batches(_epoch_batches(loader), workers, plan.loader_batches,
                                                    lambda b: b["label"].numel())
                entry |= {"batches": plan.loader_batches, "img_per_s": images / seconds,
                          "img_per_s_per_worker": images / seconds / workers}
            except Exception as e:  # noqa: BLE001
                entry |= _error(e)
            results.append(entry)
    return {"image_size": plan.image_size, "batch_size": plan.loader_batch_size, "pin_memory": pin,
            "stored_px": {"pre-resized": plan.image_size, "original": plan.original_px},
            "samples_per_pack": plan.samples, "results": results}


def _rate(work: Callable[[], int], min_seconds: float) -> float:
    """Images per second of repeated `work()` calls (each returns its image count), timed >= min_seconds."""
    images, t0 = 0, time.perf_counter()
    while True:
        images += work()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return images / elapsed


def bench_decode(plan: GpuPlan, packs: dict[str, Path], device: torch.device, progress: Progress = quiet) -> dict:
    """JPEG decode rate of each pack's distinct images: one CPU core with PIL and with torchvision, and
    (on CUDA) batched on the device."""
    import torchvision
    from torchvision.io import decode_jpeg

    from bcc.bench.data import _read_raw_samples, _threads
    from bcc.imageio import decode_rgb
    from bcc.manifest import Manifest

    out: dict[str, Any] = {"torchvision": torchvision.__version__, "results": {}}
    for kind, shards in packs.items():
        progress(f"decode: {kind} pack")
        split = Manifest.load(shards).split("train")
        # the distinct images among the first few copies' worth of samples (each is stored `copies` times)
        limit = min(split.count, 4 * plan.unique_images)
        raw = list(dict.fromkeys(data for _, data, _ in _read_raw_samples(split.shards, limit)))
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in raw]
        entry: dict[str, Any] = {"images": len(raw), "mean_kib": sum(map(len, raw)) / len(raw) / 1024}
        with _threads(1):  # one core, as in a loader worker
            for name, decode in (("pil_per_core", lambda raw=raw: [decode_rgb(d) for d in raw]),
                                 ("torchvision_cpu_per_core", lambda ts=tensors: [decode_jpeg(t) for t in ts])):
                try:
                    entry[name] = _rate(lambda decode=decode: len(decode()), plan.decode_seconds)
                except Exception as e:  # noqa: BLE001
                    entry[name] = _error(e)
        if device.type == "cuda":
            try:
                entry["torchvision_cuda"] = _cuda_decode_rate(tensors, device, plan)
            except Exception as e:  # noqa: BLE001
                entry["torchvision_cuda"] = _error(e)
        else:
            entry["torchvision_cuda"] = {"skipped": "CPU run: on-device decode needs CUDA"}
        out["results"][kind] = entry
    return out


def _cuda_decode_rate(tensors: list[torch.Tensor], device: torch.device, plan: GpuPlan) -> dict:
    from torchvision.io import decode_jpeg

    batches = [tensors[i:i + plan.decode_batch] for i in range(0, len(tensors), plan.decode_batch)]

    def work() -> int:
        n = 0
        for b in batches:
            n += len(decode_jpeg(b, device=device))
        torch.cuda.synchronize(device)  # decoding is queued on the device: count only finished images
        return n

    work()  # warm-up: nvjpeg handles and buffers
    return {"img_per_s": _rate(work, plan.decode_seconds), "batch": plan.decode_batch}


# --------------------------------------------------------------------------- compile


def bench_compile(plan: GpuPlan, device: torch.device, progress: Progress = quiet) -> dict:
    """bcc's full-stage step at the first batch size, eager vs `torch.compile(backend=plan.compile_backend)`
    of the prepared model; bf16 NHWC on CUDA (the design's settings), fp32 NCHW on the CPU."""
    from bcc.bench.step import _BccLoop

    precision, layout = ("bf16", "NHWC") if device.type == "cuda" else ("fp32", "NCHW")
    if plan.compile_backend == "inductor" and device.type == "cpu" and shutil.which("cc") is None:
        return {"skipped": "inductor needs a C compiler on the CPU and none is on PATH"}
    taxonomy, counts = _default_taxonomy()
    n = plan.batch_sizes[0]
    accelerator = _accelerator(precision, device)
    loop = _BccLoop(_step_config(plan, precision, layout), accelerator, taxonomy, counts, "staged", stage=2)
    batch = _device_batch(n, plan.image_size, device, LAYOUTS[layout], range(len(taxonomy.class_names)))
    progress("compile: eager steps")
    eager = time_steps(lambda: loop.step(batch), plan.steps, plan.warmup, device)
    import torch._dynamo

    torch._dynamo.reset()
    loop.stage.wrapped = torch.compile(loop.stage.wrapped, backend=plan.compile_backend)
    progress(f"compile: first compiled step (backend {plan.compile_backend})")
    first = time_steps(lambda: loop.step(batch), 1, 0, device)
    compiled = time_steps(lambda: loop.step(batch), plan.steps, plan.warmup, device)
    out = {"backend": plan.compile_backend, "precision": precision, "layout": layout, "stage": "full",
           "batch_size": n, "steps": plan.steps, "first_step_s": first,
           "eager_img_per_s": n * plan.steps / eager, "compiled_img_per_s": n * plan.steps / compiled,
           "speedup": eager / compiled}
    try:  # dynamo's own counters (internal API): graphs made and graph breaks, a recompile shows as a graph
        from torch._dynamo.utils import counters

        out["graphs"] = int(counters["stats"]["unique_graphs"])
        out["graph_breaks"] = int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        pass
    torch._dynamo.reset()
    return out


# --------------------------------------------------------------------------- the report


def _environment(device: torch.device) -> dict:
    import torchvision

    from bcc import __version__

    env = {"bcc": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count(),
           "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None,
                "bf16_supported": torch.cuda.is_bf16_supported()}
    return env


def bench_gpu(device: str | None = None, *, steps: int | None = None, progress: Progress = quiet) -> dict:
    """Run every part (see the module docstring) and return the report (JSON-ready dict).

    Raises BenchError only for a device that cannot be used; a part that fails is recorded as
    `{"error": ...}` in its place and the others still run.
    """
    dev = resolve_device(device)
    plan = plan_for(dev.type, steps)
    t0 = time.monotonic()
    deadline = t0 + plan.budget_s
    report: dict[str, Any] = {
        "format": FORMAT, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": _environment(dev), "plan": dataclasses.asdict(plan),
    }
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # tiny shapes: one intra-op thread is as fast, and on a shared machine far faster than a pool
        # spinning against other jobs (measured 50x at a load average of 20 on 2 cores)
        torch.set_num_threads(1)
    if dev.type == "cuda":
        # what a GPU run uses: cuDNN picks the fastest kernels, fp32 matmuls/convolutions on TF32 cores
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report["environment"]["torch_threads"] = torch.get_num_threads()
    try:
        _run_parts(plan, dev, deadline, report, progress)
    finally:
        torch.set_num_threads(threads)
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report


def _run_parts(plan: GpuPlan, dev: torch.device, deadline: float, report: dict, progress: Progress) -> None:
    def share(fraction: float) -> float:
        """A part's own deadline: at most `fraction` of the budget from now, never past the run's."""
        return min(deadline, time.monotonic() + fraction * plan.budget_s)

    def part(name: str, run: Callable[[], dict]) -> None:
        if time.monotonic() > deadline:
            report[name] = {"skipped": f"the {plan.budget_s:.0f} s budget was spent before this part"}
            return
        started = time.monotonic()
        try:
            report[name] = run()
        except Exception as e:  # noqa: BLE001 -- one failing part never loses the others
            report[name] = {**_error(e), "traceback": traceback.format_exc(limit=-3)}
        report[name]["seconds"] = round(time.monotonic() - started, 2)
        _release(dev)

    with tempfile.TemporaryDirectory(prefix="bcc-bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        part("steps", lambda: bench_steps(plan, dev, share(0.4), progress))
        packs: dict[str, Path] = {}

        def loader() -> dict:
            progress("loader: rendering and packing synthetic cells")
            packs.update(make_packs(plan, tmp))
            return bench_loader(plan, packs, dev, share(0.2), progress)

        part("loader", loader)
        part("decode", lambda: bench_decode(plan, packs, dev, progress) if packs
             else {"skipped": "no packs: see the loader part's error"})
        cuda = dev.type == "cuda"
        groups: dict[str, dict] = {}

        def ranks(key: str, world_size: int, backend: str) -> dict:
            progress(f"{key}: {world_size}-rank DDP step" + (" (+ SyncBatchNorm)" if cuda else ""))
            groups[key] = run_ranks(plan, world_size, backend, dev, tmp, sync_bn=cuda)
            return groups[key].get("ddp", groups[key])

        part("nccl", lambda: ranks("nccl", 1, "nccl") if cuda else {"skipped": "CPU run: NCCL needs CUDA devices"})
        part("gloo", lambda: ranks("gloo", 2, "gloo"))

        def sync_bn() -> dict:
            if not cuda:
                return {"skipped": "CPU run: DDP refuses SyncBatchNorm on CPU modules "
                                   "('SyncBatchNorm layers only work with GPU modules')"}
            out = {}
            for key, name in (("nccl", "nccl_1rank"), ("gloo", "gloo_2rank")):
                result = groups.get(key, {})
                out[name] = result.get("sync_bn") or {"error": f"no result from the {key} group: "
                                                               f"{result.get('error', 'see its part')}"}
            # torch runs SyncBatchNorm as plain BatchNorm in a 1-rank group (no statistics to gather)
            out["note"] = "1 rank: conversion and step only; 2 ranks (gloo, one GPU): statistics gathered across ranks"
            return out

        part("sync_bn", sync_bn)
        part("compile", lambda: bench_compile(plan, dev, progress))

