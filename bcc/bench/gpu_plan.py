"""The GPU check's plan and the pieces its parts share (`bench.gpu` runs the parts, `bench.gpu_ddp` the
DDP ones): `GpuPlan` and `plan_for` (the run's shapes and counts on a GPU and on the CPU), the report's
grid names (`STAGES`, `PRECISIONS`, `LAYOUTS`), the design's step config, the default taxonomy, a random
batch made on the device, a fresh Accelerator, and a part's `{"error": ...}` entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
