"""Experiment trackers (`run.report_to`): TensorBoard, MLflow and W&B (offline) written under the run
directory, read back with each tool's own reader; a resumed run continues them without duplicate steps."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bcc.config import ConfigError, load_config
from bcc.trackers import TrackerError, flatten_config, require_trackers, start_trackers, tracker_values

from conftest import write_config


def train(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_run(run_dir: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as bcc sets it for its own file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "bcc"]
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def wandb_records(path: Path):
    """The records of a W&B offline run file (`run-ID.wandb`): a 7-byte header (":W&B", magic, version),
    then LevelDB log blocks of 32 KiB whose chunks (crc32c, length, type) carry protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            assert record.history.step.num not in rows  # W&B's own step, one row per step
            rows[record.history.step.num] = items
    return rows


# --------------------------------------------------------------------------- config and helpers


def test_report_to_is_a_checked_list_of_tracker_names():
    assert load_config().run.report_to == ()
    assert load_config(None, ["run.report_to=[tensorboard, mlflow]"]).run.report_to == ("tensorboard", "mlflow")
    assert load_config(None, ["run.report_to=wandb"]).run.report_to == ("wandb",)
    with pytest.raises(ConfigError, match=r"run.report_to\[1\]: 'tensorbord' is not one of 'tensorboard'"):
        load_config(None, ["run.report_to=[wandb, tensorbord]"])
    assert require_trackers(["tensorboard", "tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_error_naming_the_extra(name, monkeypatch, synth_shards, tmp_path, capsys):
    import bcc.train.fit  # noqa: F401  imported first: accelerate notes the trackers it finds at import
    from bcc.cli.train import main

    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(TrackerError, match=rf"run.report_to: {name} is not installed.*pip install 'bcc\[trackers\]'"):
        require_trackers([name])
    cfg = write_config(tmp_path / "c.yaml", synth_shards, tmp_path / "run", run={"report_to": [name]})
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bcc[trackers]" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_flatten_config_gives_dotted_scalar_hyperparameters():
    flat = flatten_config({"train": {"lr": 0.1, "epochs": 2}, "loss": {"head_weights": {}},
                           "finetune": {"stages": [{"epochs": 1}]}, "run": {"report_to": ["wandb"], "x": None}})
    assert flat == {"train.lr": 0.1, "train.epochs": 2, "loss.head_weights": "{}",
                    "finetune.stages": '[{"epochs": 1}]', "run.report_to": '["wandb"]', "run.x": "null"}
    row = {"step": 9, "epoch": 1, "split": "val", "bacc": 0.5, "checkpoint": "best", "flag": True}
    assert tracker_values(row) == {"val/epoch": 1, "val/bacc": 0.5}


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    """A hard-killed process logged steps 1-6; the resume from step 3 re-logs 4-8: each step shows once,
    with the resumed values. A fresh start (no checkpoint yet) drops everything an earlier attempt logged."""
    from accelerate import Accelerator

    def attempt(resumed: int, steps: range, offset: float) -> None:
        acc = Accelerator(cpu=True, log_with=["tensorboard"], project_dir=str(tmp_path))
        start_trackers(acc, ["tensorboard"], tmp_path, "r", {"train": {"lr": 0.1}}, resumed_step=resumed)
        for step in steps:
            acc.log({"train/loss": offset + step}, step=step)
        acc.end_training()

    attempt(0, range(1, 7), 0.0)
    attempt(3, range(4, 9), 100.0)
    assert tensorboard_scalars(tmp_path / "bcc")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                   *((s, 100.0 + s) for s in range(4, 9))]
    assert json.loads((tmp_path / "trackers.json").read_text())["tensorboard"]["config_logged"] is True
    attempt(0, range(1, 3), 200.0)
    assert tensorboard_scalars(tmp_path / "bcc")["train/loss"] == [(1, 201.0), (2, 202.0)]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_training_reports_to_all_trackers_and_a_resume_continues_them(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", synth_shards, run_dir, train={"epochs": 1},
                       run={"report_to": ["tensorboard", "wandb", "mlflow"], "name": "tracked"})
    first = train(cfg)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((run_dir / "trackers.json").read_text())
    resumed = train(cfg, "train.epochs=2")  # a safe change: continues from the epoch-1 checkpoint
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert json.loads((run_dir / "trackers.json").read_text()) == state  # same tracker runs

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in rows if r["split"] == "val"]
    assert len(val_steps) == 2
    steps_per_epoch = val_steps[0]
    train_steps = [5, steps_per_epoch, steps_per_epoch + 5, 2 * steps_per_epoch]  # log_every 5, and epoch ends

    # TensorBoard: every log step once, both evaluations, both final tests, and the hyperparameters
    scalars = tensorboard_scalars(run_dir / "bcc")
    assert [s for s, _ in scalars["train/loss"]] == train_steps
    assert [s for s, _ in scalars["train/lr"]] == train_steps
    assert [s for s, _ in scalars["val/bacc"]] == val_steps
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [v for _, v in scalars["val/bacc"]] == pytest.approx([r["bacc"] for r in val_rows])
    assert [s for s, _ in scalars["test/bacc"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert list((run_dir / "bcc").rglob("hparams.yml"))  # accelerate's copy of the hyperparameters

    # MLflow: one run named run.name, reused by the resume, hyperparameters once, no duplicate steps
    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1 and runs[0].info.run_id == state["mlflow"]["run_id"]
    run = runs[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["run.report_to"] == \
        '["tensorboard", "wandb", "mlflow"]'
    for key, steps in (("train/loss", train_steps), ("val/bacc", val_steps)):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == steps, key
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/bacc"), key=lambda m: m.step)] \
        == pytest.approx([r["bacc"] for r in val_rows])

    # W&B offline: one offline-run directory per process, both with the stored run id; read back from the
    # .wandb files: the run name, the hyperparameters once, and every step once across both processes
    wandb_id = state["wandb"]["id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(wandb_id) for d in offline)
    records = [list(wandb_records(d / f"run-{wandb_id}.wandb")) for d in offline]
    runs = [r.run for rs in records for r in rs if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {wandb_id} and {r.display_name for r in runs} == {"tracked"}
    configs = [{i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"}
               for rs in records for r in rs if r.WhichOneof("record_type") == "config"]
    configs = [c for c in configs if c]
    assert len(configs) == 1 and configs[0]["train.lr"] == 0.05 and configs[0]["train.epochs"] == 1
    histories = [wandb_history(d / f"run-{wandb_id}.wandb") for d in offline]
    assert not histories[0].keys() & histories[1].keys()
    history = {**histories[0], **histories[1]}
    assert sorted(s for s, row in history.items() if "train/loss" in row) == train_steps
    assert [history[s]["val/bacc"] for s in val_steps] == pytest.approx([r["bacc"] for r in val_rows])
    assert max(histories[0]) == steps_per_epoch < min(histories[1])  # the resume logged only later steps


@pytest.mark.slow
def test_two_process_training_reports_once_from_the_main_process(ddp_run):
    run_dir, _ = ddp_run  # 2 processes, 2 epochs, report_to tensorboard and mlflow (tests/conftest.py)
    assert len(list((run_dir / "bcc").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    scalars = tensorboard_scalars(run_dir / "bcc")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 2
    assert scalars["val/bacc"] == [(r["step"], pytest.approx(r["bacc"])) for r in val]  # each step once
    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1 and runs[0].info.run_name == "ddp"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/bacc")) == [r["step"] for r in val]
