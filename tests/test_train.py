"""End-to-end training through the real entry points: `accelerate launch -m bcc.train` (2-process
CPU DDP over gloo) and `bcc train`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import webdataset as wds

from conftest import launch, write_config


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_keeps_ranks_identical_and_counts_eval_once(ddp_run, synth_shards):
    run_dir, proc = ddp_run  # 2 processes, 2 epochs (tests/conftest.py)
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # DDP kept the replicas bitwise equal
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    rows = read_rows(run_dir)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    for row in val:
        assert row["count"] == manifest["splits"]["val"]["count"]  # each sample exactly once across ranks
    test = [r for r in rows if r["split"] == "test"]
    assert test and test[0]["count"] == manifest["splits"]["test"]["count"]
    for key in ("acc", "bacc", "binary_bacc", "binary_auroc", "subtype_f1", "loss"):
        assert key in val[-1]
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "best").is_symlink() and (run_dir / "checkpoints" / "last").is_symlink()


def _write_uneven_shards(src, dst):
    """Re-shard the train split of a packed dataset into deliberately uneven shards (e.g. 60%, 5%, 5%, 30%)."""
    import shutil

    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir()
    samples = []
    for shard in manifest["splits"]["train"]["shards"]:
        samples += list(wds.WebDataset(str(src / shard["path"]), shardshuffle=False))
    n = len(samples)
    cuts = [0, int(n * 0.6), int(n * 0.65), int(n * 0.7), n]
    shards = []
    for i in range(4):
        name = f"train-{i:06d}.tar"
        with wds.TarWriter(str(dst / name)) as w:
            for s in samples[cuts[i]:cuts[i + 1]]:
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        shards.append({"path": name, "count": cuts[i + 1] - cuts[i], "sha256": ""})
    manifest["splits"]["train"]["shards"] = shards
    for split in ("val", "test"):
        for shard in manifest["splits"][split]["shards"]:
            shutil.copy(src / shard["path"], dst / shard["path"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return [s["count"] for s in shards]


def test_uneven_shards_do_not_hang_and_ranks_step_equally(synth_shards, tmp_path):
    counts = _write_uneven_shards(synth_shards, tmp_path / "uneven")
    assert max(counts) > 5 * min(counts)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "uneven", run_dir, train={"epochs": 1})
    proc = launch(cfg, processes=2, timeout=240)  # a hang fails through the timeout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((run_dir / "summary.json").read_text())["ranks"]
    expected = sum(counts) // (2 * 16)
    assert ranks[0]["steps"] == ranks[1]["steps"] == expected


@pytest.mark.slow
def test_short_cpu_run_learns_the_synthetic_task(synth_shards, tmp_path):
    """Well above chance (0.25) on the combined 4-class answer, and the binary head did not collapse."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, run_dir,
                       train={"epochs": 12, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05,
                              "warmup_steps": 5},
                       checkpoint={"metric": "bacc"}, eval={"calibrate": True})
    proc = subprocess.run([sys.executable, "-m", "bcc", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    test = [r for r in read_rows(run_dir) if r["split"] == "test"][-1]
    assert test["acc"] >= 0.6, test
    assert test["binary_bacc"] > 0.8, test
    # eval.calibrate: temperatures fitted on val and stored with the best checkpoint
    temps = json.loads((run_dir / "checkpoints" / "best" / "temperature.json").read_text())
    assert set(temps["temperatures"]) == {"binary", "subtype"}


def test_bad_config_key_fails_cleanly(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run")
    proc = bcc_main("train", "--config", cfg, "train.lrr=0.1")
    assert proc.returncode == 2
    assert "train.lrr" in proc.stderr and "did you mean 'lr'" in proc.stderr


def test_missing_dataset_is_named(tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "nowhere", tmp_path / "run")
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr


def test_calibration_at_the_end_uses_every_rank_and_matches_bcc_calibrate(ddp_run, synth_shards, tmp_path, bcc_main):
    """eval.calibrate fits the temperatures from the training eval path, all ranks' val logits gathered:
    the same temperatures `bcc calibrate` fits on the whole val split through the inference stack (both on
    the best checkpoint)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(ddp_run[0], run_dir, symlinks=True)  # bcc calibrate rewrites the files in its copy
    stored = json.loads((run_dir / "checkpoints" / "best" / "temperature.json").read_text())
    point = json.loads((run_dir / "checkpoints" / "best" / "operating_point.json").read_text())
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    assert stored["count"] == manifest["splits"]["val"]["count"]  # every val sample once, across both ranks
    assert point["count"] == stored["count"] and point["calibrated"] and point["rule"] == "sensitivity>=0.9"
    assert point["temperature"] == stored["temperatures"]["binary"] and point["val"]["chosen"]["sens"] >= 0.9
    proc = bcc_main("calibrate", "--checkpoint", run_dir, "--workers", "0", "--operating-point", "sensitivity>=0.9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    refit = json.loads((run_dir / "checkpoints" / "best" / "temperature.json").read_text())
    for head, t in stored["temperatures"].items():
        assert t == pytest.approx(refit["temperatures"][head], rel=1e-2), (stored, refit)
    # the rule depends only on the ranking of the val scores: the same samples pass on both paths
    again = json.loads((run_dir / "checkpoints" / "best" / "operating_point.json").read_text())
    for at in ("argmax", "chosen"):
        assert again["val"][at] == pytest.approx(point["val"][at])
