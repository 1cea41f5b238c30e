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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bcc.bench import BenchError, Progress, quiet
from bcc.bench.step import time_steps

FORMAT = "bcc-bench-gpu/1"
PARTS = ("steps", "loader", "decode", "nccl", "gloo", "sync_bn", "compile")  # the report's sections, in run order
STAGES = ("frozen", "deepest", "full")  # the `staged` plan's stages 0, 1, 2
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # report name -> train.mixed_precision
LAYOUTS = {"NCHW": False, "NHWC": True}  # report name -> model.channels_last


@dataclass(frozen=True)
class GpuPlan:
    """Shapes and counts of one run; `plan_for` gives the GPU plan and the tiny CPU one."""

    device: str  # "cuda" or "cpu"
    backbone: str
    image_size: int  # training crop, px
    batch_sizes: tuple[int, ...]  # per step measurement
    steps: int  # timed steps per measurement
    warmup: int  # untimed steps first (cudnn autotuning, allocator)
    loader_workers: tuple[int, ...]
    loader_batch_size: int
    loader_batches: int  # timed batches per loader measurement, after one per worker untimed
    original_px: int  # side of the synthetic "original" images
    unique_images: int  # rendered images (a multiple of 4 classes) ...
    copies: int  # ... each stored this many times (rendering is the slow part)
    decode_batch: int  # images per batched device decode call
    decode_seconds: float  # time each decode measurement at least this long
    rank_timeout_s: float  # process-group timeout of the DDP parts; the parent waits this + start-up
    rank_startup_s: float
    compile_backend: str
    budget_s: float  # parts not started by then are skipped

    @property
    def samples(self) -> int:
        return self.unique_images * self.copies


def plan_for(device: str, steps: int | None = None) -> GpuPlan:
    """The design's model at 224 px on a GPU; the `test_resnet` backbone at 16 px on the CPU.

    `steps` replaces the timed steps per measurement (the warm-up stays)."""
    if device == "cuda":
        plan = GpuPlan(
            device="cuda", backbone="vgg16_bn", image_size=224, batch_sizes=(32, 128), steps=10, warmup=3,
            loader_workers=(4, 8, 12, 16), loader_batch_size=32, loader_batches=32, original_px=1024,
            unique_images=64, copies=32, decode_batch=64, decode_seconds=2.0, rank_timeout_s=60.0,
            rank_startup_s=90.0, compile_backend="inductor", budget_s=300.0,
        )
    else:
        # dynamo's capture alone (backend "eager"): inductor's C++ compile takes minutes on a small CPU
        plan = GpuPlan(
            device="cpu", backbone="test_resnet", image_size=16, batch_sizes=(4, 8), steps=2, warmup=1,
            loader_workers=(1, 2), loader_batch_size=4, loader_batches=4, original_px=32,
            unique_images=16, copies=2, decode_batch=8, decode_seconds=0.1, rank_timeout_s=30.0,
            rank_startup_s=60.0, compile_backend="eager", budget_s=600.0,
        )
    return dataclasses.replace(plan, steps=steps) if steps else plan


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


# --------------------------------------------------------------------------- shared pieces


def _error(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}".strip()}


def _step_config(plan: GpuPlan, precision: str = "fp32", layout: str = "NCHW"):
    """The design's loss and optimizer (all_vgg16_multitask: SGD 0.01, momentum, clipping at 5, label
    smoothing 0.05) with the plan's model and shapes, and the 3-stage `staged` plan."""
    from bcc.config import Config, FinetuneConfig

    c = Config()
    return dataclasses.replace(
        c,
        data=dataclasses.replace(c.data, image_size=plan.image_size, batch_size=plan.batch_sizes[0]),
        model=dataclasses.replace(c.model, backbone=plan.backbone, channels_last=LAYOUTS[layout]),
        loss=dataclasses.replace(c.loss, label_smoothing=0.05),
        train=dataclasses.replace(c.train, epochs=3, lr=0.01, clip_grad=5.0, mixed_precision=PRECISIONS[precision]),
        finetune=FinetuneConfig(preset="staged"),
    )


def _default_taxonomy():
    """The default (ALL) taxonomy and equal class counts: every class weight 1."""
    from bcc.taxonomy import Taxonomy

    taxonomy = Taxonomy.default()
    return taxonomy, dict.fromkeys(taxonomy.class_names, 1)


def _device_batch(n: int, size: int, device: torch.device, channels_last: bool, labels: Sequence[int],
                  seed: int = 0) -> dict:
    """image FloatTensor[n, 3, size, size] and label LongTensor[n] drawn from `labels`, made on `device`."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, size, size, generator=gen)
    label = torch.tensor(labels)[torch.randint(len(labels), (n,), generator=gen)]
    image = image.to(device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {"image": image, "label": label.to(device)}


def _accelerator(precision: str, device: torch.device):
    """A fresh Accelerator at `precision`. Accelerate keeps one state per process and refuses another
    precision, so its singletons are reset first (as accelerate's own tests do between cases)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=PRECISIONS[precision], cpu=device.type == "cpu")


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
                    images, seconds = _time_batches(_epoch_batches(loader), workers, plan.loader_batches,
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


# --------------------------------------------------------------------------- DDP, SyncBatchNorm


def _masked_labels(taxonomy) -> tuple[list[int], list[str]]:
    """Leaf classes whose targets leave some head masked (-1; Benign: no subtype), and those heads."""
    table = taxonomy.target_table()
    rows = [i for i in range(table.shape[0]) if bool((table[i] < 0).any())]
    if not rows:
        raise BenchError("the taxonomy has no class that masks a head")
    heads = [h for j, h in enumerate(taxonomy.head_names) if bool((table[rows, j] < 0).all())]
    return rows, heads


def _ddp_step(spec: dict, device: torch.device, rank: int, sync_bn: bool) -> dict:
    """Two DDP steps (the first untimed) of the plan's model on a batch without malignant samples; the
    result holds the per-head losses, whether the masked heads' losses are 0 and whether the ranks'
    weights agree afterwards."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bcc.config import FinetuneConfig
    from bcc.train.setup import build_components, make_optimizer

    plan = GpuPlan(**spec["plan"])
    cfg = _step_config(plan)
    taxonomy, counts = _default_taxonomy()
    labels, masked = _masked_labels(taxonomy)
    parts = build_components(cfg, taxonomy, counts, device, finetune=FinetuneConfig(preset="full"))
    model = parts.model.to(device)
    converted = 0
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        converted = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model.train()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(cfg, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    # each rank its own batch (seeded by rank): the all-reduce has something to average
    batch = _device_batch(plan.batch_sizes[0], plan.image_size, device, False, labels, seed=rank)
    per_head = {}
    for i in range(2):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        loss, per_head = parts.loss_fn(ddp(batch["image"]), parts.targets_of(batch["label"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum()])
    if dist.get_backend() == "gloo":
        fingerprint = fingerprint.cpu()  # gloo's MIN/MAX of doubles: certain on the host
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    losses = {h: float(v) for h, v in per_head.items()}
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "device": str(device),
            "batch_size": plan.batch_sizes[0], "labels": [taxonomy.class_names[i] for i in labels],
            "masked_heads": masked, "head_losses": losses, "loss": float(loss.detach()),
            "is_loss_finite": bool(torch.isfinite(loss.detach())), "are_masked_losses_zero": all(losses[h] == 0.0 for h in masked),
            "are_weights_in_sync": bool(torch.equal(low, high)), "seconds_per_step": seconds,
            **({"sync_batchnorm_layers": converted} if sync_bn else {})}


def _rank_main(rank: int, world_size: int, backend: str, device_type: str, run_dir: str, spec: dict) -> None:
    """One rank of a DDP part (started by torch.multiprocessing); rank 0 writes `result.json`."""
    import torch.distributed as dist

    from bcc.atomic import write_json

    if device_type == "cpu":
        torch.set_num_threads(1)  # the ranks share the machine's cores
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)  # every rank on the one GPU (gloo allows that, NCCL needs 1 rank)
    dist.init_process_group(backend, init_method=f"file://{run_dir}/rendezvous", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    try:
        out: dict[str, Any] = {}
        for name, sync_bn in (("ddp", False), ("sync_bn", True)):
            if name == "sync_bn" and not spec["sync_bn"]:
                continue
            try:
                out[name] = _ddp_step(spec, device, rank, sync_bn)
            except Exception as e:  # noqa: BLE001 -- a failure on one rank leaves the others waiting: the
                # process-group timeout, then the parent's, ends them
                out[name] = {**_error(e), "traceback": traceback.format_exc(limit=-3)}
        if rank == 0:
            write_json(Path(run_dir) / "result.json", out)
    finally:
        dist.destroy_process_group()


def run_ranks(plan: GpuPlan, world_size: int, backend: str, device: torch.device, tmp: Path,
              sync_bn: bool = False) -> dict:
    """Run `_rank_main` in `world_size` processes and return rank 0's result; ranks that have not ended
    `rank_timeout_s + rank_startup_s` seconds after the start are killed and the part is an error."""
    import torch.multiprocessing as mp

    run_dir = Path(tempfile.mkdtemp(prefix=f"{backend}{world_size}-", dir=tmp))
    spec = {"plan": dataclasses.asdict(plan), "timeout_s": plan.rank_timeout_s, "sync_bn": sync_bn}
    # CUDA cannot be used in a forked child of a process that has used it; fork is much faster on the CPU
    method = "spawn" if device.type == "cuda" else "fork"
    context = mp.start_processes(_rank_main, args=(world_size, backend, device.type, str(run_dir), spec),
                                 nprocs=world_size, join=False, start_method=method)
    limit = plan.rank_timeout_s + plan.rank_startup_s
    t0 = time.monotonic()
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() - t0 > limit:
                return {"error": f"{world_size}-rank {backend} step: no result after {limit:.0f} s (a rank hung); "
                                 "ranks killed"}
    except mp.ProcessRaisedException as e:
        return {"error": f"{world_size}-rank {backend} step: a rank raised: {str(e).strip().splitlines()[-1]}"}
    except mp.ProcessExitedException as e:
        return {"error": f"{world_size}-rank {backend} step: {e}"}
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
    result = run_dir / "result.json"
    if not result.is_file():
        return {"error": f"{world_size}-rank {backend} step: rank 0 wrote no result"}
    out = json.loads(result.read_text())
    out["ddp"]["wall_s"] = time.monotonic() - t0
    return out


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

