"""`bcc demo` (what `make demo` runs): synth -> pack -> 2-process DDP through accelerate launch -> table."""

import json
import sys

from conftest import run_bounded


def test_bcc_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    proc = run_bounded(
        [sys.executable, "-m", "bcc", "demo", "--out", str(out), "--per-class", "24", "--size", "32",
         "train.epochs=2", "data.image_size=32"],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1/2" in proc.stdout  # really two processes
    assert "4-class accuracy" in proc.stdout and "run directory" in proc.stdout
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert test and test[-1]["count"] == json.loads((out / "shards" / "manifest.json").read_text())["splits"]["test"]["count"]
    # a second run reuses the synthetic data and starts a fresh training run
    again = run_bounded([sys.executable, "-m", "bcc", "demo", "--out", str(out), "--per-class", "24", "--size",
                         "32", "train.epochs=1", "data.image_size=32"], timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
