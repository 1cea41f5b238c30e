"""Device-dependent settings of a run, resolved once at start-up: precision, memory format, cuDNN/TF32,
torch.compile, SyncBatchNorm, DDP options, the process-group timeout and the learning-rate scaling.

The decisions are pure functions of the config and a `DeviceCaps` (what the device can do), so they are
tested on a CPU with a made-up GPU; `make_accelerator` applies them. A config holds `auto` where the
device decides; `resolve_config` returns the config the run actually trains with (every `auto` made
concrete, `train.lr` scaled), which the checkpoint records.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DynamoBackend,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
    parse_flag_from_env,
)
from torch import nn

from bcc.config import Config, TrainConfig
from bcc.errors import BccError


class DeviceSettingError(BccError):
    """A GPU setting this device, backend or the rest of the config cannot honour; names the key."""


@dataclass(frozen=True)
class DeviceCaps:
    """What the run's device can do; `device_caps` reads it, tests make one up."""

    type: str  # torch device type: cuda, cpu, mps, ...
    bf16: bool = False  # a CUDA device with bf16 arithmetic (Ampere and later)
    name: str = ""  # the GPU's name, for messages

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


def device_caps(device: torch.device) -> DeviceCaps:
    if device.type != "cuda":
        return DeviceCaps(device.type)
    return DeviceCaps("cuda", bf16=torch.cuda.is_bf16_supported(), name=torch.cuda.get_device_name(device))


def resolve_precision(setting: str, caps: DeviceCaps) -> str:
    """`train.mixed_precision` for Accelerate: auto is bf16 on a CUDA GPU that has it, fp16 (Accelerate adds
    the loss scaler) on one that has not, no elsewhere (CPU autocast to bf16 is slower than fp32 on most
    CPUs). An explicit no/bf16/fp16 is kept (`check_precision` refuses what the device would ignore)."""
    if setting != "auto":
        return setting
    if not caps.is_cuda:
        return "no"
    return "bf16" if caps.bf16 else "fp16"


def resolve_switch(key: str, setting: bool | str, caps: DeviceCaps, deterministic: bool) -> bool:
    """A speed switch that costs bitwise reproducibility (channels_last, cudnn_benchmark, tf32): auto is on
    on CUDA unless `train.deterministic`; true under `train.deterministic` is a contradiction (named)."""
    if setting == "auto":
        return caps.is_cuda and not deterministic
    if setting and deterministic:
        raise DeviceSettingError(f"{key}=true contradicts train.deterministic=true (it is not bitwise "
                                 f"reproducible); set {key}=auto or false")
    return bool(setting)


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over all ranks: data.batch_size x processes x train.grad_accum."""
    return cfg.data.batch_size * world_size * cfg.train.grad_accum


def scaled_lr(lr: float, rule: str, base_batch: int, batch: int) -> float:
    """timm's rule (train.py `lr_base`, `lr_base_size`, `lr_base_scale`): `lr` is the rate at `base_batch`
    samples per step; linear: lr x batch/base_batch, sqrt: lr x sqrt(batch/base_batch), none: lr."""
    if rule == "none":
        return lr
    ratio = batch / base_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise DeviceSettingError(f"train.lr_scale: {rule!r} is not one of 'none', 'linear', 'sqrt'")


def check_compile(t: TrainConfig) -> None:
    """Refuse a `train.compile_backend` that torch or Accelerate does not know, and an inductor-only mode
    with another backend (which would silently ignore it)."""
    if not t.compile:
        return
    # Accelerate's list (its TorchDynamoPlugin takes no other); torch checks at the first compile that the
    # backend's own package (tvm, onnxruntime, ...) is installed
    known = {b.value.lower() for b in DynamoBackend} - {"no"}
    if t.compile_backend not in known:
        raise DeviceSettingError(f"train.compile_backend: {t.compile_backend!r} is not a torch.compile backend "
                                 f"Accelerate can use; one of {', '.join(sorted(known))}")
    # Accelerate's list holds names this torch no longer registers (fx2trt, nvprims_nvfuser, ...) or registers
    # only with a plugin installed (onnxrt, tensorrt); tvm is registered but imports its package at the
    # first compile. Each failed as a traceback at the first step.
    from torch._dynamo.backends.registry import list_backends, lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(t.compile_backend)
    except InvalidBackend:
        usable = sorted(known & set(list_backends(exclude_tags=())))
        raise DeviceSettingError(f"train.compile_backend: {t.compile_backend!r} is not available in this torch "
                                 f"{torch.__version__} (a plugin package may be missing); usable here: "
                                 f"{', '.join(usable)}") from None
    package = {"tvm": "tvm"}.get(t.compile_backend)
    if package and importlib.util.find_spec(package) is None:
        raise DeviceSettingError(f"train.compile_backend={t.compile_backend} needs the {package!r} package, "
                                 "which is not installed")
    if t.compile_mode != "default" and t.compile_backend != "inductor":
        raise DeviceSettingError(f"train.compile_mode={t.compile_mode} is a mode of the inductor backend; "
                                 f"train.compile_backend={t.compile_backend} would ignore it")


def check_sync_bn(caps: DeviceCaps, backend: str | None) -> None:
    """SyncBatchNorm has kernels for CUDA tensors over NCCL only; refused elsewhere, before anything trains."""
    if caps.type != "cuda" or backend not in (None, "nccl"):
        where = f"{caps.type}" + (f" with the {backend} backend" if backend else "")
        raise DeviceSettingError(f"train.sync_bn=true needs CUDA GPUs and the NCCL backend; this run is on {where}. "
                                 "Set train.sync_bn=false")


def resolve_config(cfg: Config, caps: DeviceCaps, world_size: int) -> Config:
    """The config the run trains with on this device: precision, channels_last, cudnn_benchmark and tf32
    concrete, `train.lr` scaled by `train.lr_scale` (then recorded as none, so resolving twice is harmless).

    Raises DeviceSettingError for a setting the device cannot honour or that contradicts another."""
    t = cfg.train
    check_compile(t)
    if t.sync_bn:
        check_sync_bn(caps, None)
    lr = scaled_lr(t.lr, t.lr_scale, t.lr_base_batch, global_batch(cfg, world_size))
    train = dataclasses.replace(
        t, mixed_precision=resolve_precision(t.mixed_precision, caps),
        cudnn_benchmark=resolve_switch("train.cudnn_benchmark", t.cudnn_benchmark, caps, t.deterministic),
        tf32=resolve_switch("train.tf32", t.tf32, caps, t.deterministic), lr=lr, lr_scale="none")
    model = dataclasses.replace(cfg.model, channels_last=resolve_switch("model.channels_last", cfg.model.channels_last,
                                                                        caps, t.deterministic))
    return dataclasses.replace(cfg, train=train, model=model)


def describe(raw: Config, run: Config, world_size: int) -> str:
    """One line for the run's log: each resolved setting, `(auto)` where the device chose it."""
    def said(value, setting) -> str:
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        return f"{shown} (auto)" if setting == "auto" else shown

    t, r = run.train, raw.train
    parts = [f"precision {said(t.mixed_precision, r.mixed_precision)}",
             f"channels_last {said(run.model.channels_last, raw.model.channels_last)}",
             f"cudnn.benchmark {said(t.cudnn_benchmark, r.cudnn_benchmark)}", f"tf32 {said(t.tf32, r.tf32)}",
             f"deterministic {'on' if t.deterministic else 'off'}",
             f"compile {t.compile_backend}/{t.compile_mode}" if t.compile else "compile off"]
    if t.sync_bn:
        parts.append("sync_bn on")
    lr = f"lr {t.lr:.6g}"
    if r.lr_scale != "none":
        batch = global_batch(raw, world_size)
        lr += (f" = {r.lr:.6g} x {'sqrt' if r.lr_scale == 'sqrt' else ''}({batch}/{r.lr_base_batch}) "
               f"({r.lr_scale}; global batch {raw.data.batch_size} x {world_size} process(es) x {r.grad_accum} accum)")
    return ", ".join([*parts, lr, f"timeout {t.timeout_s:g}s"])


def apply_backend_flags(t: TrainConfig, caps: DeviceCaps) -> None:
    """Set cuDNN/TF32/determinism process-wide from a resolved `train` config. Nothing changes on a CPU
    run unless `train.deterministic` (CPU float32 matmul precision stays at torch's default)."""
    if caps.is_cuda:
        torch.backends.cudnn.benchmark = bool(t.cudnn_benchmark)
        torch.backends.cudnn.allow_tf32 = bool(t.tf32)  # torch's default is True: off must be said
        torch.set_float32_matmul_precision("high" if t.tf32 else "highest")
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def kwargs_handlers(t: TrainConfig) -> list:
    """Accelerate's handlers for the process group (timeout) and the DDP wrapper (static graph, buckets)."""
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=t.timeout_s)),
            DistributedDataParallelKwargs(static_graph=t.ddp_static_graph,
                                          gradient_as_bucket_view=t.ddp_gradient_as_bucket_view)]


def dynamo_plugin(t: TrainConfig) -> TorchDynamoPlugin:
    """torch.compile as Accelerate documents it for DDP: `prepare` wraps the model in DDP, then compiles the
    wrapper (DDPOptimizer splits the graph at bucket boundaries so communication overlaps the backward).
    Always explicit, so an ACCELERATE_DYNAMO_BACKEND in the environment cannot compile behind the config."""
    if not t.compile:
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=t.compile_backend, mode=t.compile_mode if t.compile_backend == "inductor" else None)


def make_accelerator(cfg: Config, **kwargs) -> tuple[Accelerator, Config]:
    """The Accelerator of a run and the config resolved for its device (`resolve_config`).

    The process group starts first (with `train.timeout_s`), so the device is known before the precision
    is chosen. `kwargs` go to the Accelerator (log_with, project_dir). Raises DeviceSettingError."""
    handlers = kwargs_handlers(cfg.train)
    # as AcceleratorState would start it: ACCELERATE_USE_CPU=true is the CPU opt-in (gloo across processes)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **handlers[0].to_kwargs())
    caps = device_caps(state.device)
    run_cfg = resolve_config(cfg, caps, state.num_processes)
    if run_cfg.train.sync_bn:
        check_sync_bn(caps, torch.distributed.get_backend() if torch.distributed.is_initialized() else None)
    apply_backend_flags(run_cfg.train, caps)
    acc = Accelerator(mixed_precision=run_cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                      kwargs_handlers=handlers, dynamo_plugin=dynamo_plugin(run_cfg.train), **kwargs)
    return acc, run_cfg


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm (statistics over all ranks). Keeps the Parameter objects, so
    parameter groups built before or after see the same tensors."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def compile_count() -> int:
    """Frames torch.compile has compiled in this process so far (dynamo's `frames.ok` counter); a first
    compile of a DDP-wrapped model is several frames (DDP's own code between graph breaks)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def compile_records() -> list:
    """Dynamo's records of its recent compilations (`torch._dynamo.utils.get_compilation_metrics`, a
    bounded deque), each with `recompile_reason` set when a frame compiled before was compiled again."""
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


@dataclass(frozen=True)
class StageCompiles:
    stage: int
    frames: int  # frames compiled while the stage ran (first compiles and recompilations)
    recompiles: int  # of those, frames compiled again after their guards failed
    reasons: tuple[str, ...] = ()  # dynamo's first guard failure of each recompilation


class CompileCounter:
    """torch.compile's compilations per fine-tuning stage. The first stage a process runs compiles its
    frames once; a stage change recompiles the forward frame once (a stage changes `requires_grad` and
    BatchNorm modes, which the compiled graph's guards check); a recompilation beyond that means a guard
    fails within the stage (a compile per occurrence) and is worth a warning."""

    def __init__(self) -> None:
        self.stage: int | None = None
        self.frames = 0
        self.last = None  # the newest compile record when the stage started

    def enter(self, stage: int) -> StageCompiles | None:
        """Start counting `stage`; returns the previous stage's counts, or None at the first stage."""
        done = self.finish()
        records = compile_records()
        self.stage, self.frames, self.last = stage, compile_count(), records[-1] if records else None
        return done

    def finish(self) -> StageCompiles | None:
        """The open stage's counts, and stop counting; None when no stage is open."""
        if self.stage is None:
            return None
        records = compile_records()
        # records after the stage's start marker (all of them if the bounded deque dropped the marker)
        start = next((i + 1 for i in range(len(records) - 1, -1, -1) if records[i] is self.last), 0)
        reasons = tuple(r.recompile_reason for r in records[start:] if getattr(r, "recompile_reason", None))
        done = StageCompiles(self.stage, compile_count() - self.frames, len(reasons), reasons)
        self.stage = None
        return done
