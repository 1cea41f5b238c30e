"""A run directory written by an older bcc (config key `schedule`, metrics `acc4`/`bacc4`) still resumes,
evaluates, predicts and aggregates: saved configs and logs are migrated on read, user configs are not."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import write_config


def bcc(*args):
    return subprocess.run([sys.executable, "-m", "bcc", *map(str, args)], capture_output=True, text=True, timeout=400)


def _age(config: dict) -> dict:
    """What an older bcc saved: `schedule:` for the fine-tuning plan, `bacc4` as the tracked metric."""
    config = dict(config)
    config["schedule"] = config.pop("finetune")
    config["checkpoint"] = {**config["checkpoint"], "metric": "bacc4"}
    return config


def _make_old(run_dir):
    for meta_path in run_dir.glob("checkpoints/step-*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["config"] = _age(meta["config"])
        meta.pop("_hashes", None)  # nor the mark saying a hashes.json was written
        meta_path.write_text(json.dumps(meta))
        (meta_path.parent / "hashes.json").unlink(missing_ok=True)  # an older bcc wrote none
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(_age(yaml.safe_load(config_path.read_text())), sort_keys=False))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    old = [{("acc4" if k == "acc" else "bacc4" if k == "bacc" else k): v for k, v in r.items()} for r in rows]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))


def test_old_run_resumes_evaluates_and_aggregates(synth_shards, tmp_path, bcc_main):
    from bcc.compare import read_mode
    from bcc.predict import load_inference_model

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, run_dir, train={"epochs": 1, "warmup_steps": 0},
                       data={"workers": 0})
    proc = bcc("train", "--config", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _make_old(run_dir)
    old_ckpt = next(run_dir.glob("checkpoints/step-*"))
    assert "schedule" in json.loads((old_ckpt / "meta.json").read_text())["config"]

    # predict/evaluate read the checkpoint's config in today's names
    im = load_inference_model(old_ckpt, device="cpu")
    assert im.config.finetune.preset == "full" and im.config.checkpoint.metric == "bacc"
    proc = bcc_main("eval", "--checkpoint", old_ckpt, "--data", synth_shards, "--workers", "0", "--out", tmp_path / "ev")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    # compare reads the old run dir: config.yaml migrated, acc4/bacc4 rows read as acc/bacc
    result = read_mode("full", run_dir)
    assert set(result.val) == {"bacc", "acc"} and result.best_epoch == 1

    # the user's config (today's names) resumes the old run for one more epoch
    proc = bcc("train", "--config", cfg, "train.epochs=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "train.epochs: 1 -> 2" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["split"] == "val"] == [1, 2]
    assert "bacc" in rows[-1] and "bacc4" not in rows[-1]


def test_a_user_config_with_the_old_key_is_refused_naming_the_new_one(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", schedule={"preset": "frozen"})
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2
    assert "'schedule' is now 'finetune'" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_metric_is_checked_before_the_first_step(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", checkpoint={"metric": "bacc4"})
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2
    assert "checkpoint.metric 'bacc4'" in proc.stderr and "binary_bacc" in proc.stderr
    assert "epoch 1/" not in proc.stdout  # refused before any training step
