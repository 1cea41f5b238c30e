"""`bcc bench data|step` through the real CLI on tiny inputs: the output has the figures (not their values)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
    assert "unpacking split 'train'" in out  # no --source: the ImageFolder tree came from the shards
    assert len(row(out, "     200 │")) >= 4 and len(row(out, "     400 │")) >= 4, out
    assert re.search(rf"peak RSS 400 / 200 samples = {NUMBER}", out), out


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


def test_bench_step_names_a_bad_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bcc", "bench", "step", "train.lrr=1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.lrr" in proc.stderr
