"""GPU settings and bounded failure (bcc/train/accel.py): the device decisions as pure functions over a
made-up device, torch.compile through the entry point (one compile per stage, exact resume), and a
2-process job that a stuck, dead or failing rank ends in bounded time."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcc.config import ConfigError, load_config
from bcc.launch import accelerate_command
from bcc.train.accel import (
    CompileCounter,
    DeviceCaps,
    DeviceSettingError,
    StageCompiles,
    apply_backend_flags,
    check_compile,
    check_sync_bn,
    describe,
    dynamo_plugin,
    global_batch,
    kwargs_handlers,
    resolve_config,
    resolve_precision,
    resolve_switch,
    scaled_lr,
)

from conftest import launched, trainer_ranks, wait_until, write_config

CPU = DeviceCaps("cpu")
A100 = DeviceCaps("cuda", bf16=True, name="fake A100")
V100 = DeviceCaps("cuda", bf16=False, name="fake V100")


# --------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize("setting, caps, expected", [
    ("auto", CPU, "no"), ("auto", A100, "bf16"), ("auto", V100, "fp16"),
    ("no", A100, "no"), ("bf16", CPU, "bf16"), ("fp16", A100, "fp16"),
])
def test_mixed_precision_auto_is_bf16_where_the_gpu_has_it_fp16_otherwise_and_no_on_cpu(setting, caps, expected):
    assert resolve_precision(setting, caps) == expected


@pytest.mark.parametrize("setting, caps, deterministic, expected", [
    ("auto", CPU, False, False), ("auto", A100, False, True), ("auto", A100, True, False),
    (True, CPU, False, True), (False, A100, False, False), (False, A100, True, False),
])
def test_speed_switches_are_on_for_cuda_by_default_and_off_when_deterministic(setting, caps, deterministic, expected):
    assert resolve_switch("train.tf32", setting, caps, deterministic) is expected


def test_a_switch_set_true_under_deterministic_is_refused_naming_both_keys():
    with pytest.raises(DeviceSettingError, match=r"train.cudnn_benchmark=true contradicts train.deterministic=true"):
        resolve_switch("train.cudnn_benchmark", True, A100, deterministic=True)


@pytest.mark.parametrize("rule, batch, expected", [
    ("none", 1024, 0.1), ("linear", 1024, 0.4), ("sqrt", 1024, 0.2), ("linear", 64, 0.025), ("sqrt", 64, 0.05),
    ("linear", 256, 0.1),
])
def test_lr_scale_follows_timms_rule(rule, batch, expected):
    """timm train.py: lr = lr_base x global_batch / lr_base_size (sqrt of the ratio for the sqrt rule)."""
    assert math.isclose(scaled_lr(0.1, rule, 256, batch), expected)


def test_global_batch_is_batch_size_times_processes_times_accumulation():
    cfg = load_config(None, ["data.batch_size=32", "train.grad_accum=4"])
    assert global_batch(cfg, 8) == 32 * 8 * 4


def test_resolved_config_is_concrete_for_the_device_and_resolving_twice_changes_nothing():
    cfg = load_config(None, ["train.lr=0.1", "train.lr_scale=linear", "train.lr_base_batch=256",
                             "data.batch_size=64"])
    gpu = resolve_config(cfg, A100, world_size=8)  # global batch 512
    assert (gpu.train.mixed_precision, gpu.model.channels_last, gpu.train.cudnn_benchmark, gpu.train.tf32) == (
        "bf16", True, True, True)
    assert math.isclose(gpu.train.lr, 0.2) and gpu.train.lr_scale == "none"
    assert resolve_config(gpu, A100, world_size=8) == gpu
    cpu = resolve_config(cfg, CPU, world_size=1)
    assert (cpu.train.mixed_precision, cpu.model.channels_last, cpu.train.cudnn_benchmark, cpu.train.tf32) == (
        "no", False, False, False)
    det = resolve_config(load_config(None, ["train.deterministic=true"]), A100, world_size=1)
    assert (det.model.channels_last, det.train.cudnn_benchmark, det.train.tf32) == (False, False, False)
    assert det.train.mixed_precision == "bf16"  # precision is not a reproducibility switch
    line = describe(cfg, gpu, 8)
    assert "precision bf16 (auto)" in line and "lr 0.2 = 0.1 x (512/256) (linear" in line, line


def test_sync_bn_conversion_keeps_the_parameters_and_frozen_batchnorms_still_find_the_layers():
    from bcc.finetune import frozen_batchnorms
    from bcc.train.accel import convert_sync_bn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weight = model[1].weight
    converted = convert_sync_bn(model)
    assert isinstance(converted[1], torch.nn.SyncBatchNorm) and converted[1].weight is weight
    assert frozen_batchnorms(converted, {"1": "block0"}, ["heads"]) == [converted[1]]


def test_sync_bn_is_refused_off_cuda_and_on_gloo_with_a_named_error():
    with pytest.raises(DeviceSettingError, match=r"train.sync_bn=true needs CUDA GPUs .* this run is on cpu"):
        resolve_config(load_config(None, ["train.sync_bn=true"]), CPU, world_size=2)
    with pytest.raises(DeviceSettingError, match=r"on cuda with the gloo backend"):
        check_sync_bn(A100, "gloo")
    check_sync_bn(A100, "nccl")
    check_sync_bn(A100, None)  # one process: no group yet


def test_unknown_values_are_named_errors():
    for override, message in [("train.timeout_s=0", r"train.timeout_s: must be in \[1, 31536000\] seconds"),
                              ("train.timeout_s=.inf", r"train.timeout_s: must be in \[1, 31536000\]"),  # was an
                              ("train.timeout_s=1e14", r"train.timeout_s: must be in \[1, 31536000\]"),  # Overflow-
                              ("train.timeout_s=.nan", r"train.timeout_s: must be in \[1, 31536000\]"),  # Error
                              ("train.timeout_s=abc", r"train.timeout_s: expected a number, got 'abc'"),
                              ("train.lr_scale=cube", r"train.lr_scale: 'cube' is not one of"),
                              ("train.mixed_precision=fp8", r"train.mixed_precision: 'fp8' is not one of 'auto'"),
                              ("model.channels_last=maybe", r"model.channels_last: 'maybe' fits none of bool or 'auto'"),
                              ("train.compile_mode=fast", r"train.compile_mode: 'fast' is not one of"),
                              ("train.lr_base_batch=0", r"train.lr_base_batch: must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(DeviceSettingError, match=r"train.compile_backend: 'turbo' is not a torch.compile backend"):
        check_compile(load_config(None, ["train.compile=true", "train.compile_backend=turbo"]).train)
    for stale in ("fx2trt", "nvprims_nvfuser", "onnxrt"):  # in Accelerate's list, not in this torch: a traceback
        with pytest.raises(DeviceSettingError, match=rf"train.compile_backend: '{stale}' is not available in this "
                                                     r"torch .*usable here: .*aot_eager"):
            check_compile(load_config(None, ["train.compile=true", f"train.compile_backend={stale}"]).train)
    if importlib.util.find_spec("tvm") is None:
        with pytest.raises(DeviceSettingError, match=r"train.compile_backend=tvm needs the 'tvm' package"):
            check_compile(load_config(None, ["train.compile=true", "train.compile_backend=tvm"]).train)
    check_compile(load_config(None, ["train.compile=true", "train.compile_backend=aot_eager"]).train)
    with pytest.raises(DeviceSettingError, match=r"train.compile_mode=max-autotune is a mode of the inductor"):
        check_compile(load_config(None, ["train.compile=true", "train.compile_backend=eager",
                                         "train.compile_mode=max-autotune"]).train)


def test_accelerate_gets_the_timeout_the_ddp_options_and_the_compile_plugin():
    t = load_config(None, ["train.timeout_s=42", "train.ddp_static_graph=true",
                           "train.ddp_gradient_as_bucket_view=true"]).train
    init, ddp = kwargs_handlers(t)
    assert init.to_kwargs() == {"timeout": timedelta(seconds=42)}
    assert ddp.to_kwargs() == {"static_graph": True, "gradient_as_bucket_view": True}
    assert dynamo_plugin(t).backend.value == "NO"
    on = load_config(None, ["train.compile=true", "train.compile_mode=max-autotune"]).train
    assert dynamo_plugin(on).to_kwargs() == {"backend": "inductor", "mode": "max-autotune"}


def test_backend_flags_on_a_cuda_device_and_none_on_cpu(monkeypatch):
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        apply_backend_flags(resolve_config(load_config(None), A100, 1).train, A100)
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        apply_backend_flags(resolve_config(load_config(None, ["train.tf32=false"]), A100, 1).train, A100)
        assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        torch.backends.cudnn.benchmark = False
        apply_backend_flags(resolve_config(load_config(None), CPU, 1).train, CPU)
        assert not torch.backends.cudnn.benchmark  # a CPU run leaves them alone
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_compile_counter_counts_frames_and_recompilations_per_stage(monkeypatch):
    from types import SimpleNamespace

    import bcc.train.accel as accel

    frames, records = [0], []
    monkeypatch.setattr(accel, "compile_count", lambda: frames[0])
    monkeypatch.setattr(accel, "compile_records", lambda: list(records))

    def compile_frames(n: int, reason: str | None = None) -> None:
        frames[0] += n
        records.extend(SimpleNamespace(recompile_reason=reason) for _ in range(n))

    counter = CompileCounter()
    assert counter.enter(0) is None
    compile_frames(3)  # the first stage: DDP's frames, compiled once each
    assert counter.enter(1) == StageCompiles(0, frames=3, recompiles=0)
    compile_frames(1, "requires_grad mismatch")
    compile_frames(1, "size mismatch")
    done = counter.finish()
    assert (done.stage, done.frames, done.recompiles, done.reasons) == (1, 2, 2, ("requires_grad mismatch",
                                                                                "size mismatch"))
    assert counter.finish() is None
    records.clear()  # the bounded deque dropped the marker: every record left counts
    counter.enter(2)
    records.append(SimpleNamespace(recompile_reason="x"))
    assert counter.finish().recompiles == 1


def test_a_later_stage_in_one_process_is_compiled_again():
    """Accelerate returns a model it prepared before as it is; in one process that is the bare (uncompiled)
    model, so every stage after the first trained eagerly under train.compile=true."""
    from types import SimpleNamespace

    from accelerate.utils import DynamoBackend, TorchDynamoPlugin, is_compiled_module

    from bcc.train.setup import compile_again

    model = torch.nn.Linear(2, 2)
    on = SimpleNamespace(state=SimpleNamespace(dynamo_plugin=TorchDynamoPlugin(backend="aot_eager")))
    again = compile_again(on, model)
    assert is_compiled_module(again) and again._orig_mod is model
    assert compile_again(on, again) is again  # a DDP stage: Accelerate compiled its new wrapper already
    off = SimpleNamespace(state=SimpleNamespace(dynamo_plugin=TorchDynamoPlugin(backend=DynamoBackend.NO)))
    assert compile_again(off, model) is model


# --------------------------------------------------------------------------- through the entry points


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def test_compile_compiles_once_per_stage_and_resume_is_bitwise_exact(synth_shards, tmp_path):
    """`train.compile` with a 2-stage plan (heads, then heads + block4): each stage compiles at most once
    (counted from dynamo and logged per stage), and resuming mid-stage-2 from a checkpoint of the same
    run ends with the same weights, bit for bit. aot_eager traces forward and backward like inductor
    but needs no C++ compiler."""
    stages = [{"epochs": 1, "train": ["heads"]}, {"epochs": 1, "train": ["heads", "block4"]}]
    cfg = write_config(tmp_path / "c.yaml", synth_shards, tmp_path / "straight",
                       train={"compile": True, "compile_backend": "aot_eager"}, finetune={"stages": stages},
                       data={"batch_size": 32}, checkpoint={"every_steps": 2, "keep_last": 100},
                       eval={"test_at_end": False})
    cmd = [sys.executable, "-m", "bcc.train", "--config", str(cfg)]
    straight = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    assert "compile aot_eager/default" in straight.stdout
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    compiles = {r["stage"]: (r["frames"], r["recompiles"]) for r in rows if r.get("split") == "compile"}
    assert compiles.keys() == {0, 1}, compiles
    assert compiles[0][0] >= 1 and compiles[0][1] == 0, compiles  # compiled at the first step, never again
    # the stage change: one recompilation, and the new stage does run compiled (in one process Accelerate
    # used to hand stage 1 back uncompiled: 0 frames, silently eager)
    assert compiles[1][0] >= 1 and compiles[1][1] <= 1, compiles

    states = {p: json.loads((p / "trainer_state.json").read_text())
              for p in (tmp_path / "straight" / "checkpoints").glob("step-*")}
    mid = min((p for p, s in states.items() if s["stage"] == 1 and s["batches_in_epoch"]), key=lambda p: p.name)
    resumed = subprocess.run([*cmd, f"run.dir={tmp_path / 'resumed'}", f"checkpoint.resume={mid}"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["recompiles"]) for r in rows if r.get("split") == "compile"] == [(1, 0)]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_stuck_or_dead_rank_ends_the_two_process_job_within_train_timeout_s(synth_shards, tmp_path):
    """Rank 1 is stopped mid-training (SIGSTOP: a rank whose host vanished without closing its
    connections, the worst case of a dead rank, or one stuck in a read): rank 0 fails its next collective
    after train.timeout_s (gloo: "Timed out waiting 5000ms"; with the default 30 minutes the test's own
    bound would fail), then rank 1 is killed (SIGKILL) and the launch ends non-zero. The same run checks
    lr scaling through the entry point (linear, global batch 2 x 16 against a base of 16) and trains its
    first steps with both DDP options on."""
    run_dir = tmp_path / "run"
    timeout_s = 5
    cfg = write_config(tmp_path / "c.yaml", synth_shards, run_dir,
                       train={"epochs": 3, "timeout_s": timeout_s, "lr_scale": "linear", "lr_base_batch": 16,
                              "ddp_static_graph": True, "ddp_gradient_as_bucket_view": True},
                       checkpoint={"every_steps": 2, "keep_last": 10})
    with launched(cfg) as proc:
        first = run_dir / "checkpoints" / "step-00000002" / "trainer_state.json"
        wait_until(first.exists, proc, "checkpoint")
        # the scaled lr is the one the optimizer used (warmup 2: step 2 runs at the full rate)
        groups = torch.load(first.parent / "optimizer.pt", weights_only=True)["param_groups"]
        assert {round(g["lr"], 9) for g in groups} == {0.1}, groups
        ranks = trainer_ranks(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        ranks[0].wait(timeout=timeout_s + 120)  # the bound: timeout_s, plus a loaded machine
        waited = time.monotonic() - t_stop
        ranks[1].kill()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    # rank 0 ends on its own, within the bound, on a failed collective: gloo's "Timed out waiting 5000ms"
    # (or "Application timeout caused pair closure" when DDP's hook in backward waits; rarely a connection
    # error instead, when the stopped rank's side of the link is torn down first),
    # said on one line (bcc.errors.lost_peer_message), not with a page of traceback
    rank0 = [line for line in out.splitlines()  # a time-out is an error line, a closed link a note
             if line.startswith(("error: rank 0: lost contact with the other ranks", "note: rank 0: lost contact"))]
    assert waited < timeout_s + 60, f"rank 0 ran {waited:.0f} s past rank 1's stop"
    assert any(re.search(r"Timed out waiting|timeout caused pair closure|Connection (closed|reset)", line) for line in rank0), (
        "\n".join(line for line in out.splitlines() if "rank0" in line or "rror" in line)[-6000:])
    assert "[rank0]: Traceback" not in out, out[-3000:]
    assert "lr 0.1 = 0.05 x (32/16) (linear; global batch 16 x 2 process(es) x 1 accum)" in out, out[:3000]
    assert not (run_dir / "summary.json").exists()
    print(f"rank 0 ended {waited:.1f} s after rank 1 stopped")


def test_a_read_error_on_one_rank_ends_the_job_with_the_error_line(synth_shards, tmp_path):
    """One damaged sample with data.on_corrupt=error: only the rank that reads it raises; the other is
    waiting in a collective. The job ends non-zero with the `error:` line naming the sample."""
    from test_corrupt import copy_pack, flip_image_bit

    from bcc.manifest import Manifest

    pack = copy_pack(synth_shards, tmp_path / "pack")
    shard = Manifest.load(pack).split("train").shards[1].path
    key = flip_image_bit(shard)
    cfg = write_config(tmp_path / "c.yaml", pack, tmp_path / "run", train={"epochs": 1, "timeout_s": 20},
                       data={"on_corrupt": "error"})
    cmd, env = accelerate_command(2, ["--config", str(cfg)])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20 + 240)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and f"sample {key} in shard {shard}" in errors[0], proc.stderr[-3000:]
    # the other rank, if its collective failed before the launcher stopped it, says so in one `note:` line
    # (its link closed: the error above says why); only a time-out would be a second error line
    assert all(line.startswith("error: rank ") and "lost contact with the other ranks" in line
               and re.search(r"tim(ed|ing) out", line, re.I) for line in errors[1:]), errors
    assert "]: Traceback" not in proc.stderr, proc.stderr[-3000:]
