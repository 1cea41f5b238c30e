"""`bcc bench data|step|pack|vote` through the real CLI on tiny inputs: the output has the figures (not their values)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import write_config

NUMBER = r"[\d,]+(?:\.\d+)?"


def bcc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # no wrapped table cells
    proc = subprocess.run([sys.executable, "-m", "bcc", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def row(out: str, label: str) -> list[str]:
    """Numbers in the table row that starts with `label`."""
    line = next((ln for ln in out.splitlines() if ln.startswith("│") and label in ln), None)
    assert line is not None, f"no row {label!r} in:\n{out}"
    return re.findall(NUMBER, line.split(label, 1)[1])


def test_bench_data_prints_the_three_loaders_ratios_and_rss(synth_shards):
    out = bcc("bench", "data", "--shards", str(synth_shards), "--workers", "2", "--batches", "3",
              "--warmup", "1", "--batch-size", "8", "--image-size", "32", "--rounds", "2",
              "--rss", "--rss-samples", "200,400").stdout
    for label in ("(a) bcc stream", "(b) ImageFolder + DataLoader", "(c) per-core limit x 2",
                  "(c) in 2 processes at once"):
        assert len(row(out, label)) >= 6, out  # img/s, per worker, min-max, / (c), / (b)
    for column in ("img/s", "/ (c)", "/ (b)"):
        assert column in out
    assert re.search(rf"\(a\)/\(c\*workers\) = {NUMBER}", out), out
    assert re.search(rf"\(a\)/\(b\) = {NUMBER}", out), out
    assert re.search(rf"\(a\)/\(c in 2 processes\) = {NUMBER}", out), out
    assert re.search(rf"\(c\)/\(a\) CPU = {NUMBER}", out), out  # what explains (a)/(c*workers)
    assert "unpacking split 'train'" in out  # no --source: the ImageFolder tree came from the shards
    assert len(row(out, "     200 │")) >= 4 and len(row(out, "     400 │")) >= 4, out
    assert re.search(rf"peak RSS 400 / 200 samples = {NUMBER}", out), out


def test_bench_data_rss_runs_on_format_6_packs_without_a_sample_index(synth_shards, tmp_path):
    """The memory bench streams its own synthetic pack, written as manifest format 6 without the
    `sample_index.npz` that `bcc pack` writes beside every format-6 manifest; and the user's pack given
    with --shards may have lost its index (a copy that left it out). Neither is needed to stream: the
    bench runs through, no `sample_index` error and no traceback (the index is only for overlap checks)."""
    import shutil

    from bcc.bench import write_synthetic_shards
    from bcc.manifest import FORMAT_VERSION, Manifest
    from bcc.sample_index import FILE, INDEXED_SINCE

    synthetic = Manifest.load(write_synthetic_shards(tmp_path / "synthetic", 50, per_shard=20))
    assert synthetic.format_version == FORMAT_VERSION >= INDEXED_SINCE and not (tmp_path / "synthetic" / FILE).exists()
    pack = shutil.copytree(synth_shards, tmp_path / "pack")
    (pack / FILE).unlink()
    proc = bcc("bench", "data", "--shards", str(pack), "--workers", "1", "--batches", "1", "--warmup", "0",
               "--batch-size", "8", "--image-size", "32", "--rounds", "1", "--rss", "--rss-samples", "100,200")
    assert "Traceback" not in proc.stderr and "sample_index" not in proc.stdout + proc.stderr, proc.stderr
    assert len(row(proc.stdout, "(a) bcc stream")) >= 6, proc.stdout
    assert re.search(rf"peak RSS 200 / 100 samples = {NUMBER}", proc.stdout), proc.stdout


def test_bench_data_plan_times_both_sampling_modes_without_data(bcc_main, synth_shards):
    """`bcc bench data --plan` (issue: planning measured at 100,000 shards x 1,024 parts; small here)."""
    out = bcc("bench", "data", "--plan", "--plan-shards", "2000", "--plan-parts", "64,1024").stdout
    for sampling in ("without_replacement", "resample"):
        for parts in ("64", "1,024"):
            line = next(ln for ln in out.splitlines() if sampling in ln and f"│ {parts} │" in " ".join(ln.split()))
            assert len(re.findall(NUMBER, line)) == 4, line  # parts, plan, + one rank, + every part
        assert re.search(rf"{sampling}: one rank {NUMBER}x from 64 to 1,024 parts", out), out
    proc = bcc_main("bench", "data")  # neither --shards nor --plan
    assert proc.returncode == 2 and proc.stderr.startswith("error: bcc bench data: --shards DIR is required"), proc.stderr
    # a batch the split cannot fill is named by this command's option, before the split is unpacked
    proc = bcc_main("bench", "data", "--shards", str(synth_shards), "--batch-size", "100000")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --batch-size 100000: split 'train' holds "), proc.stderr
    assert "unpacking" not in proc.stdout
    proc = bcc_main("bench", "data", "--plan", "--plan-shards", str(10**11))  # was OOM-killed at 23 GB
    assert proc.returncode == 2 and "--plan-shards: at most 10,000,000, got 100,000,000,000" in proc.stderr


def test_bench_data_reads_a_source_tree(synth_shards, synth_data):
    out = bcc("bench", "data", "--shards", str(synth_shards), "--workers", "0", "--batches", "2",
              "--warmup", "1", "--batch-size", "8", "--image-size", "32", "--rounds", "1",
              "--source", str(synth_data)).stdout
    assert "unpacking" not in out
    assert str(synth_data) in out.replace("\n", "")
    assert len(row(out, "(a) bcc stream")) >= 6


def test_bench_step_prints_plain_full_frozen_and_overhead(synth_shards, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run")
    out = bcc("bench", "step", "--config", str(cfg), "train.log_every=2", "--steps", "2", "--warmup", "1",
              "--rounds", "2").stdout
    for label in ("plain PyTorch", "bcc train_step, finetune full", "bcc train_step, finetune frozen"):
        assert len(row(out, label)) >= 6, out  # params, ms/step, img/s, min-max, / plain, / full
    assert "test_resnet" in out
    assert re.search(rf"bcc overhead vs plain = [+-]{NUMBER}%", out), out
    assert re.search(rf"frozen / full speed = {NUMBER}x", out), out


def test_bench_step_without_a_dataset_uses_the_default_taxonomy(tmp_path):
    out = bcc("bench", "step", f"data.shards={tmp_path / 'absent'}", "model.backbone=test_resnet",
              "data.image_size=32", "data.batch_size=4", "--steps", "1", "--warmup", "0", "--rounds", "1").stdout
    assert len(row(out, "bcc train_step, finetune full")) >= 6


def test_bench_step_names_a_bad_key(bcc_main):
    proc = bcc_main("bench", "step", "train.lrr=1")
    assert proc.returncode == 2
    assert "train.lrr" in proc.stderr


def test_bench_vote_prints_per_vote_and_per_step_cost():
    out = bcc("bench", "vote", "--processes", "2,3", "--votes", "20", "--every", "1,10").stdout
    for n in ("2", "3"):
        line = next(ln for ln in out.splitlines() if re.match(rf"│\s+{n} │", ln))
        median, _, per1, per10 = (float(v.replace(",", "")) for v in re.findall(NUMBER, line)[1:])
        assert median > 0 and per1 == pytest.approx(median, rel=0.01) and per10 == pytest.approx(median / 10, rel=0.05)


def test_bench_pack_prints_both_ratios_the_limit_range_and_the_rss_ratio():
    out = bcc("bench", "pack", "--sizes", "40,80", "--workers", "2", "--image-px", "16", "--repeats", "2").stdout
    for size in ("40", "80"):
        line = next(ln for ln in out.splitlines() if re.match(rf"│\s+{size} │", ln))
        assert re.search(rf"{NUMBER} x 2 \({NUMBER}-{NUMBER}\)", line), line  # median limit (range of 4)
        assert re.search(rf"{NUMBER} \({NUMBER}, {NUMBER}\)", line), line  # median pack (every pack's img/s)
        assert re.search(rf"{size} images: throughput / \(decode limit x workers\) = {NUMBER} \(goal >= 0.8; "
                         rf"the first pass alone {NUMBER}\)", out.replace("\n", " ")), out
    assert re.search(rf"RSS 80/40 = {NUMBER} \(goal <= 1.5\)", out), out


def test_train_step_makes_no_per_step_package_probes_or_signature_inspection(monkeypatch):
    """The loop's step must not pay Accelerate's per-call `importlib` probes (`is_lomo_available`) or
    `inspect.signature` (wrapper `zero_grad`): each is ~0.1 ms, a few percent of a GPU step."""
    import importlib.util
    import inspect

    import torch
    from accelerate import Accelerator

    from bcc.config import load_config
    from bcc.taxonomy import Taxonomy
    from bcc.train.epoch import train_step
    from bcc.train.setup import build_components, enter_stage

    cfg = load_config(None, ["model.backbone=test_resnet", "data.image_size=16", "train.grad_accum=2",
                             "train.clip_grad=1.0"])
    acc = Accelerator(gradient_accumulation_steps=2)
    taxonomy = Taxonomy.default()
    parts = build_components(cfg, taxonomy, {c: 1 for c in taxonomy.class_names}, acc.device)
    stage = enter_stage(parts, acc, 0)
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.arange(4) % len(taxonomy.class_names)}
    for _ in range(2):  # a first window: lazy imports on first use are not per-step costs
        train_step(stage.wrapped, batch, parts.loss_fn, stage.optimizer, acc, parts.targets_of, cfg.train.clip_grad)
    calls = {"find_spec": 0, "signature": 0}
    real_find_spec, real_signature = importlib.util.find_spec, inspect.signature

    def find_spec(*a, **k):
        calls["find_spec"] += 1
        return real_find_spec(*a, **k)

    def signature(*a, **k):
        calls["signature"] += 1
        return real_signature(*a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(inspect, "signature", signature)
    before = [p.detach().clone() for p in parts.model.parameters()]
    for _ in range(4):  # two windows
        train_step(stage.wrapped, batch, parts.loss_fn, stage.optimizer, acc, parts.targets_of, cfg.train.clip_grad)
    assert calls == {"find_spec": 0, "signature": 0}
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters(), strict=True))
    assert all(p.grad is None for p in parts.model.parameters())  # cleared after the window's step


@pytest.mark.parametrize("sizes", ["40,20", "30,30", "16,40,40"])
def test_bench_sizes_smallest_first_and_different(sizes, bcc_main):
    """`--sizes 40,20` printed `RSS 20/40 = 1.00 (goal <= 1.5)`: reversed (or equal) sizes met the memory
    goal trivially. They are refused naming the option, as `bench data --rss-samples` (the same type)."""
    from bcc.bench import BenchError
    from bcc.bench.pack import bench_pack

    for argv in (("bench", "pack", "--sizes", sizes), ("bench", "data", "--rss", "--rss-samples", sizes)):
        proc = bcc_main(*argv)
        assert proc.returncode == 2 and "increasing order" in proc.stderr, proc.stderr
        assert argv[-2] in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    with pytest.raises(BenchError, match="different sizes"):
        bench_pack((30, 30))
