"""`bcc cv`: every fold trained on the other folds, mean +- sd, out-of-fold predictions covering train+val once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds

from conftest import write_config


def _bcc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bcc", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_cv_two_folds_end_to_end(synth_data, synth_shards, tmp_path, bcc_main):
    from bcc.pack import pack_folders

    shards = tmp_path / "shards"
    pack_folders(synth_data, shards, split=(0.7, 0.15, 0.15), seed=0, min_shards=2, folds=2)
    manifest = json.loads((shards / "manifest.json").read_text())
    fold_of = {}
    for name in ("train", "val"):
        for sh in manifest["splits"][name]["shards"]:
            for s in wds.WebDataset(str(shards / sh["path"]), shardshuffle=False, empty_check=False):
                fold_of[s["__key__"]] = json.loads(s["json"])["fold"]

    out = tmp_path / "cv"
    cfg = write_config(tmp_path / "cv.yaml", shards, out, train={"epochs": 1, "lr": 0.05, "warmup_steps": 1},
                       data={"workers": 0})
    proc = _bcc("cv", "--config", cfg, "--folds", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2-fold cross-validation" in proc.stdout and "±" in proc.stdout

    for k in range(2):  # each fold run validated on its fold, trained on the other
        saved = (out / f"fold-{k}" / "config.yaml").read_text()
        assert f"fold: {k}" in saved
        rows = [json.loads(line) for line in (out / f"fold-{k}" / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if r.get("split") == "val"]
        assert val and val[-1]["count"] == sum(1 for f in fold_of.values() if f == k)

    with open(out / "oof_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["key"] for r in oof) == sorted(fold_of)  # every train+val sample exactly once
    assert all(int(r["fold"]) == fold_of[r["key"]] for r in oof)
    classes = manifest["classes"]
    for r in oof[:20]:
        assert r["true_class"] in classes
        assert abs(sum(float(r[f"combined:{c}"]) for c in classes) - 1) < 1e-6

    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and summary["oof"]["count"] == len(fold_of)
    for split in ("val", "test"):
        acc = summary[split]["acc"]
        assert len(acc["per_fold"]) == 2 and acc["mean"] == pytest.approx(sum(acc["per_fold"]) / 2)
    assert (out / "CV.md").is_file()

    # aggregation alone reads the runs back; a pack without folds, or K that disagrees, is one error line
    # (in-process: each ends before training)
    again = bcc_main("cv", "--aggregate", out, "--folds", 2)
    assert again.returncode == 0, again.stderr
    bad = bcc_main("cv", "--config", cfg, "--folds", 3, "--out", tmp_path / "x")
    assert bad.returncode == 2 and "packed with 2 folds" in bad.stderr and "Traceback" not in bad.stderr
    nofolds = write_config(tmp_path / "nf.yaml", synth_shards, tmp_path / "nf")
    bad = bcc_main("cv", "--config", nofolds, "--folds", 2)
    assert bad.returncode == 2 and "no cross-validation folds" in bad.stderr
    bad = bcc_main("train", "--config", nofolds, "data.fold=0")
    assert bad.returncode == 2 and "has no folds" in bad.stderr and "Traceback" not in bad.stderr
