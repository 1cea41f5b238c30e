"""`bcc bench gpu`: the CPU run through the real CLI writes every part, sane; a failing part is recorded,
a hung rank is killed in bounded time, and the others still run; a missing GPU and a bad --out are one
`error:` line each."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bcc.bench import BenchError, gpu, gpu_ddp


def _is_rate(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_gpu_cpu_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bcc", "bench", "gpu", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout.replace("\n", "")
    report = json.loads(out.read_text())
    assert report["format"] == gpu.FORMAT and report["environment"]["device"] == "cpu"
    plan = report["plan"]
    for name in gpu.PARTS:
        assert "error" not in report[name], (name, report[name])

    steps = report["steps"]["results"]  # precision x layout x stage x batch size, every one measured
    assert len(steps) == len(gpu.PRECISIONS) * len(gpu.LAYOUTS) * len(gpu.STAGES) * len(plan["batch_sizes"])
    assert all(_is_rate(e["img_per_s"]) for e in steps), steps
    trainable = {e["stage"]: e["trainable_params"] for e in steps if (e["precision"], e["layout"]) == ("fp32", "NCHW")}
    assert trainable["frozen"] < trainable["deepest"] < trainable["full"]

    loader = report["loader"]["results"]
    assert {(e["pack"], e["workers"]) for e in loader} == {
        (kind, w) for kind in ("pre-resized", "original") for w in plan["loader_workers"]}
    assert all(_is_rate(e["img_per_s"]) for e in loader), loader
    for kind in ("pre-resized", "original"):
        decode = report["decode"]["results"][kind]
        assert _is_rate(decode["pil_per_core"]) and _is_rate(decode["torchvision_cpu_per_core"])
        assert "needs CUDA" in decode["torchvision_cuda"]["skipped"]

    gloo = report["gloo"]  # 2 ranks, a batch without malignant cells: the subtype head is all masked
    assert (gloo["world_size"], gloo["backend"], gloo["masked_heads"]) == (2, "gloo", ["subtype"])
    assert gloo["is_loss_finite"] and gloo["are_masked_losses_zero"] and gloo["are_weights_in_sync"]
    assert gloo["head_losses"]["subtype"] == 0.0 and gloo["head_losses"]["binary"] > 0
    assert "NCCL needs CUDA" in report["nccl"]["skipped"]
    assert "SyncBatchNorm" in report["sync_bn"]["skipped"]

    compiled = report["compile"]
    assert compiled["backend"] == "eager" and compiled["graphs"] >= 1
    assert _is_rate(compiled["eager_img_per_s"]) and _is_rate(compiled["compiled_img_per_s"])


def test_a_failing_part_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "bench_steps", boom)
    monkeypatch.setattr(gpu, "make_packs", lambda plan, tmp: {"pre-resized": tmp_path})
    monkeypatch.setattr(gpu, "bench_loader", lambda *a, **k: {"results": ["loader ran"]})
    monkeypatch.setattr(gpu, "bench_decode", boom)
    monkeypatch.setattr(gpu, "run_ranks", lambda plan, n, backend, *a, **k: {"ddp": {"world_size": n}})
    monkeypatch.setattr(gpu, "bench_compile", lambda *a, **k: {"speedup": 1.0})
    report = gpu.bench_gpu("cpu")
    for name in ("steps", "decode"):
        assert report[name]["error"] == "RuntimeError: CUDA out of memory (simulated)"
        assert "Traceback" in report[name]["traceback"]
    assert report["loader"]["results"] == ["loader ran"]
    assert report["gloo"]["world_size"] == 2 and report["compile"]["speedup"] == 1.0
    assert all("seconds" in report[name] for name in gpu.PARTS)


def test_no_gpu_asks_for_device_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in (None, "cuda"):
        with pytest.raises(BenchError, match="no CUDA device visible.*pass --device cpu"):
            gpu.resolve_device(device)
    assert gpu.resolve_device("cpu").type == "cpu"


def test_out_in_a_missing_directory_is_one_error_line(tmp_path, bcc_main):
    out = tmp_path / "absent" / "gpu.json"
    proc = bcc_main("bench", "gpu", "--device", "cpu", "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out {out}: directory {out.parent} does not exist"]



def test_out_that_is_a_directory_or_unwritable_is_one_error_before_measuring(monkeypatch, tmp_path):
    import argparse

    from bcc.cli import bench as cli_bench

    ran = []
    monkeypatch.setattr(gpu, "bench_gpu", lambda *a, **k: ran.append(1) or {})
    args = argparse.Namespace(device="cpu", steps=None, out=str(tmp_path))  # a directory, not a file
    with pytest.raises(BenchError, match=f"--out {tmp_path}: is a directory"):
        cli_bench.run_gpu(args)
    assert ran == []  # refused before minutes of measuring

    def read_only(path, report):  # what a read-only filesystem does even to root
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr("bcc.atomic.write_json", read_only)
    args.out = str(tmp_path / "gpu.json")
    with pytest.raises(BenchError, match="cannot write the report: Read-only file system"):
        cli_bench.run_gpu(args)

def test_steps_is_bounded_so_the_budget_holds():
    import argparse

    from bcc.cli.bench import MAX_GPU_STEPS, gpu_steps

    assert gpu_steps(str(MAX_GPU_STEPS)) == MAX_GPU_STEPS
    for bad in ("0", "-3", "abc", str(MAX_GPU_STEPS + 1), "100000"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_steps(bad)


def _hang_on_rank_1(rank, world_size, backend, device_type, run_dir, spec):
    import time

    while rank == 1:
        time.sleep(1)


def _raise_on_rank_0(rank, world_size, backend, device_type, run_dir, spec):
    if rank == 0:
        raise RuntimeError("NCCL error (simulated)")


def test_a_hung_or_failing_rank_is_an_error_in_bounded_time(monkeypatch, tmp_path):
    import dataclasses
    import time

    plan = dataclasses.replace(gpu.plan_for("cpu"), rank_timeout_s=0.5, rank_startup_s=1.5)
    monkeypatch.setattr(gpu_ddp, "_rank_main", _hang_on_rank_1)
    t0 = time.monotonic()
    out = gpu_ddp.run_ranks(plan, 2, "gloo", torch.device("cpu"), tmp_path)
    assert out == {"error": "2-rank gloo step: no result after 2 s (a rank hung); ranks killed"}
    assert time.monotonic() - t0 < 30
    monkeypatch.setattr(gpu_ddp, "_rank_main", _raise_on_rank_0)
    out = gpu_ddp.run_ranks(plan, 2, "gloo", torch.device("cpu"), tmp_path)
    assert out == {"error": "2-rank gloo step: a rank raised: RuntimeError: NCCL error (simulated)"}
