"""EMA of the weights (bcc/train/ema.py): the update, the checkpoint file, the config and metric checks.
Resume exactness of the EMA is tested end to end in test_resume.py (one process killed mid-epoch, two
processes preempted, with warmup)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bcc.checkpoint import (
    EMA_FILE,
    Checkpoint,
    CheckpointManager,
    DamagedCheckpointError,
    TrainState,
    load_checkpoint,
    load_ema_weights,
    save_rng_state,
)
from bcc.config import ConfigError, load_config
from bcc.train.ema import build_ema, ema_columns, restore_ema
from bcc.train.setup import TrainError


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_no_decay_no_ema():
    assert build_ema(tiny_model(), None, False, torch.device("cpu")) is None


@pytest.mark.parametrize("warmup", [False, True])
def test_update_is_the_step_decay_lerp(warmup):
    model = tiny_model()
    ema = build_ema(model, 0.9, warmup, torch.device("cpu"))
    assert not any(p.requires_grad for p in ema.module.parameters())
    decays = [ema.get_decay(step) for step in range(1, 50)]
    assert decays[0] == 0.0  # step 1 copies the weights
    if warmup:
        assert all(a <= b for a, b in zip(decays, decays[1:], strict=False)) and max(decays) == 0.9
        assert decays[1] < 0.9
    else:
        assert set(decays[1:]) == {0.9}
    for step in (1, 2, 3):
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        model(torch.randn(5, 4))  # BN running statistics move as well
        ema.update(model, step=step)
        d = ema.get_decay(step)
        for k, v in model.state_dict().items():
            got = ema.module.state_dict()[k]
            want = v if not v.is_floating_point() else before[k] + (1 - d) * (v - before[k])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_checkpoint_holds_the_ema_in_its_hashes(tmp_path):
    model = tiny_model()
    ema = build_ema(model, 0.5, False, torch.device("cpu"))
    ema.update(model, step=1)
    ckpt = Checkpoint(model=model.state_dict(), optimizer={}, scaler=None, rng=[save_rng_state()],
                      state=TrainState(step=3), meta={}, ema=ema.module.state_dict())
    path = CheckpointManager(tmp_path, keep_last=2, keep_top_k=0, metric="bacc", mode="max").save(ckpt)
    assert EMA_FILE in json.loads((path / "hashes.json").read_text())["files"]
    loaded = load_checkpoint(path)
    assert loaded.ema.keys() == ckpt.ema.keys() and all(torch.equal(loaded.ema[k], ckpt.ema[k]) for k in ckpt.ema)
    assert all(torch.equal(v, ckpt.ema[k]) for k, v in load_ema_weights(path).items())
    fresh = build_ema(tiny_model(), 0.5, False, torch.device("cpu"))
    restore_ema(fresh, loaded.ema, path)
    assert all(torch.equal(fresh.module.state_dict()[k], v) for k, v in ckpt.ema.items())

    data = bytearray((path / EMA_FILE).read_bytes())
    data[-3] ^= 0x01
    (path / EMA_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=EMA_FILE):
        load_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match=EMA_FILE):
        load_ema_weights(path)
    (path / EMA_FILE).unlink()  # listed in hashes.json, so a missing file is damage too
    with pytest.raises(DamagedCheckpointError, match=f"{EMA_FILE} is missing"):
        load_checkpoint(path)


def test_checkpoint_without_ema(tmp_path):
    model = tiny_model()
    ckpt = Checkpoint(model=model.state_dict(), optimizer={}, scaler=None, rng=[save_rng_state()],
                      state=TrainState(step=1), meta={})
    path = CheckpointManager(tmp_path, keep_last=2, keep_top_k=0, metric="bacc", mode="max").save(ckpt)
    assert not (path / EMA_FILE).exists() and load_checkpoint(path).ema is None and load_ema_weights(path) is None
    with pytest.raises(TrainError, match="holds no EMA weights"):
        restore_ema(build_ema(model, 0.9, False, torch.device("cpu")), None, path)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_decay_outside_the_open_unit_interval_is_refused(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"train\.ema_decay: must be in \(0, 1\)"):
        load_config(path, [f"train.ema_decay={value}"])
    assert load_config(path, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    assert load_config(path).train.ema_decay is None


def test_ema_metric_needs_an_ema(synth_shards, tmp_path):
    from bcc.manifest import Manifest
    from bcc.train.preflight import check_run

    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{shards: {synth_shards}}}\nmodel: {{backbone: test_resnet}}\n")
    manifest = Manifest.load(synth_shards)
    with pytest.raises(TrainError, match="ema_\\* metrics need train.ema_decay"):
        check_run(load_config(path, ["checkpoint.metric=ema_bacc"]), manifest)
    check_run(load_config(path, ["checkpoint.metric=ema_bacc", "train.ema_decay=0.99"]), manifest)


def test_ema_columns_keep_scalars():
    assert ema_columns({"bacc": 0.5, "count": 3, "per_class": [1, 2], "ok": True}) == {"ema_bacc": 0.5, "ema_count": 3}


def test_an_ema_run_fits_and_exports_the_ema_weights_own_calibration(synth_shards, tmp_path):
    """Training fits temperatures and the operating point for the EMA weights too (under `ema`); the
    final test rows carry the point's `op_*` columns; an EMA export ships the EMA's fit, its card quotes
    the EMA's val rates; a checkpoint calibrated on its raw weights only is not exported as EMA."""
    import subprocess
    import sys

    from bcc.export import ExportError, export_checkpoint
    from bcc.operating_point import threshold_for
    from bcc.predict import load_inference_model

    from conftest import write_config

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", synth_shards, run, train={"epochs": 1, "ema_decay": 0.5},
                       eval={"calibrate": True, "operating_point": "youden", "test_at_end": True})
    proc = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    best = run / "checkpoints" / "best"
    temps = json.loads((best / "temperature.json").read_text())
    point = json.loads((best / "operating_point.json").read_text())
    ema_t, ema_p = temps["ema"]["temperatures"], point["ema"]
    assert ema_t != temps["temperatures"] and ema_p["margin"] != point["margin"]  # fitted on other weights
    test = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"split": "test"' in line][-1]
    assert test["operating_point"] == "youden"
    # one scale for the threshold everywhere (issue-14 breaker: 0.918 in the test table, 0.7999 in the json):
    # the calibrated one operating_point.json stores, not the unscaled one the test pass applies
    assert test["binary_op_threshold"] == pytest.approx(point["threshold"])
    assert point["threshold"] != pytest.approx(threshold_for(point, 1.0))  # calibrated: the scales differ
    assert test["ema_binary_op_threshold"] == pytest.approx(ema_p["threshold"])
    assert {"binary_op_sens", "binary_op_spec", "ema_binary_op_sens", "binary_sens"} <= set(test)

    export_checkpoint(run, tmp_path / "hf", format="hf")  # auto: the EMA weights, with their own fit
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["weights"] == "ema" and config["temperatures"] == pytest.approx(ema_t)
    assert config["operating_point"]["margin"] == pytest.approx(ema_p["margin"])
    im = load_inference_model(tmp_path / "hf", device="cpu")
    assert im.threshold == pytest.approx(threshold_for(ema_p, ema_t["binary"]))
    chosen = ema_p["val"]["chosen"]
    assert f"{chosen['sens']:.3f}/{chosen['spec']:.3f} at this point" in (tmp_path / "hf" / "README.md").read_text()

    for name in ("temperature.json", "operating_point.json"):  # as `bcc calibrate` leaves them: raw only
        stored = json.loads((best / name).read_text())
        del stored["ema"]
        (best.resolve() / name).write_text(json.dumps(stored))
    with pytest.raises(ExportError, match="fitted on its raw weights, not on the EMA weights"):
        export_checkpoint(run, tmp_path / "ema", weights="ema")
    export_checkpoint(run, tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / "bcc_export.json").read_text())["weights"] == "raw"
