"""Staged unfreezing end to end: 2-process DDP through `accelerate launch` (an unfrozen block syncs,
frozen blocks stay bitwise unchanged, BatchNorm statistics included), a kill in the middle of a stage
resumed to the same result as an uninterrupted run, and `bcc compare` on synthetic data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcc.checkpoint import find_latest

from conftest import REPO, launch, write_config

# block4 is test_resnet's deepest group (timm groups start at block0 = stem; see `bcc model groups`)
STAGES = [{"epochs": 1, "train": ["heads"]},
          {"epochs": 1, "train": ["heads", "block4"], "lr_mult": {"block4": 0.5}}]
FROZEN = ("block0", "block1", "block2", "block3")


def initial_state(cfg_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The run's initial weights, rebuilt the way `bcc.train.setup.build_components` builds them (`set_seed`, then
    `build_model`), and the parameter group of every state-dict key (buffers included)."""
    from accelerate.utils import set_seed

    from bcc.config import load_config
    from bcc.manifest import Manifest
    from bcc.model import build_model, group_of_module, parameter_groups

    cfg = load_config(cfg_path)
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, Manifest.load(cfg.data.shards).taxonomy.head_sizes)
    group_of = {name: g for g, members in parameter_groups(model).items() for name, _ in members}
    modules = group_of_module(model)
    for key in model.state_dict():
        if key not in group_of:  # a buffer: the group of the module that owns it
            group_of[key] = modules[key.rsplit(".", 1)[0]]
    return {k: v.clone() for k, v in model.state_dict().items()}, group_of


def step_dirs(run_dir: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in (run_dir / "checkpoints").glob("step-*")}


def changed(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def test_ddp_unfrozen_block_syncs_and_frozen_blocks_stay_bitwise(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, run_dir,
                       train={"epochs": 2, "lr": 0.05, "warmup_steps": 1},
                       finetune={"stages": STAGES, "frozen_bn": "eval"},
                       checkpoint={"keep_last": 10, "resume": "none"})
    proc = launch(cfg, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 1: training block4, heads" in proc.stdout

    # every rank ends with the same weights: the new DDP wrapper synced block4's gradients
    # (a wrapper built in stage 0 has no hooks for block4, and the ranks would drift apart)
    ranks = json.loads((run_dir / "summary.json").read_text())["ranks"]
    assert len(ranks) == 2 and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    init, group_of = initial_state(cfg)
    steps = step_dirs(run_dir)
    first_epoch_end = min(steps)  # saved at the end of stage 0
    after_stage0 = load_file(str(steps[first_epoch_end] / "model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert json.loads((steps[first_epoch_end] / "trainer_state.json").read_text())["trainable"] == ["heads"]
    assert json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())["trainable"] == [
        "block4", "heads"]
    by_group = {g: [k for k in init if group_of[k] == g] for g in set(group_of.values())}
    bn_stats = [k for k in init if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert {group_of[k] for k in bn_stats} >= set(FROZEN) | {"block4"}

    # frozen groups: weights and BatchNorm statistics bitwise equal to the initial ones, to the end
    for g in FROZEN:
        assert changed(init, final, by_group[g]) == [], f"{g} changed although frozen"
    # block4: untouched through stage 0, trained in stage 1 (weights and its BN statistics)
    assert changed(init, after_stage0, by_group["block4"]) == []
    block4_params = [k for k in by_group["block4"] if k not in bn_stats]
    assert changed(init, final, block4_params) == block4_params
    assert set(changed(init, final, [k for k in by_group["block4"] if k in bn_stats])) >= {
        k for k in by_group["block4"] if k.endswith("running_mean")}
    assert changed(init, after_stage0, by_group["heads"]) == by_group["heads"]


def _train_proc(cfg: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bcc.train", "--config", str(cfg), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _optimizer_groups(ckpt: Path) -> list[dict]:
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    return [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])} for g in groups]


def test_kill_in_stage_two_resumes_to_the_same_weights(synth_shards, tmp_path):
    stages = [{"epochs": 1, "train": ["heads"]},
              {"epochs": 2, "train": ["heads", "block4"], "lr_mult": {"block4": 0.5}}]

    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.yaml", synth_shards, tmp_path / name,
                            train={"epochs": 3, "lr": 0.05, "warmup_steps": 2},
                            finetune={"stages": stages},
                            checkpoint={"every_steps": 3, "keep_last": 100, "resume": "auto"})

    reference = _train_proc(config("reference"))
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]
    ref_dir = tmp_path / "reference"
    ref_steps = step_dirs(ref_dir)
    ref_states = {s: json.loads((p / "trainer_state.json").read_text()) for s, p in ref_steps.items()}
    steps_per_epoch = min(s for s, st in ref_states.items() if st["epoch"] == 1 and st["batches_in_epoch"] == 0)
    # the first every_steps checkpoint strictly inside the second epoch (stage 1, mid-epoch)
    target = next(s for s in sorted(ref_steps) if steps_per_epoch < s < 2 * steps_per_epoch)
    assert ref_states[target]["stage"] == 1 and ref_states[target]["batches_in_epoch"] > 0

    run_dir = tmp_path / "killed"
    cfg = config("killed")
    proc = _train_proc(cfg)
    deadline = time.monotonic() + 600
    try:
        while not (run_dir / "checkpoints" / f"step-{target:08d}" / "trainer_state.json").exists():
            assert proc.poll() is None, "training ended before it could be killed: " + proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint inside stage 2 within the time limit"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    latest = find_latest(run_dir / "checkpoints")
    killed_state = json.loads((latest / "trainer_state.json").read_text())
    final_step = max(ref_steps)
    assert killed_state["step"] < final_step, "killed too late to test a resume"
    assert killed_state["stage"] == 1 and killed_state["trainable"] == ["block4", "heads"]
    resumed_at = killed_state["step"]

    resumed = _train_proc(cfg)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"step {resumed_at}" in out and "stage 1" in out

    # same trainable set, same optimizer param groups (group, lr multiplier, current lr) and state
    last_ref = ref_dir / "checkpoints" / "last"
    last = run_dir / "checkpoints" / "last"
    for key in ("step", "epoch", "stage", "trainable"):
        assert json.loads((last / "trainer_state.json").read_text())[key] == json.loads(
            (last_ref / "trainer_state.json").read_text())[key]
    for s, path in step_dirs(run_dir).items():
        if s > resumed_at:
            assert _optimizer_groups(path) == _optimizer_groups(ref_steps[s]), f"step {s}"
    assert {g["group"]: g["lr_mult"] for g in _optimizer_groups(last)} == {"block4": 0.5, "heads": 1.0}
    # ... and bitwise the same final weights (BatchNorm statistics included)
    ref_w = load_file(str(last_ref / "model.safetensors"))
    got_w = load_file(str(last / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    assert [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])] == []
    ref_opt = torch.load(last_ref / "optimizer.pt", weights_only=True)["state"]
    got_opt = torch.load(last / "optimizer.pt", weights_only=True)["state"]
    assert ref_opt.keys() == got_opt.keys()
    assert all(torch.equal(ref_opt[i]["momentum_buffer"], got_opt[i]["momentum_buffer"]) for i in ref_opt)


def test_bcc_compare_writes_a_table_of_the_three_modes(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused",
                       train={"epochs": 3, "lr": 0.05, "warmup_steps": 1, "log_every": 50},
                       data={"batch_size": 32})
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "bcc", "compare", "--config", str(cfg), "--modes", "frozen,staged,full",
           "--out", str(out), "--bench-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["mode"] for r in rows] == ["frozen", "staged", "full"]
    for r in rows:
        for key in ("val_bacc", "val_acc", "test_bacc", "train_time_s", "trainable_final"):
            assert float(r[key]) >= 0, (key, r)
    counts = {r["mode"]: (int(r["trainable_final"]), float(r["trainable_mean"])) for r in rows}
    assert counts["frozen"][0] < counts["staged"][0] == counts["full"][0]
    assert counts["frozen"][1] < counts["staged"][1] < counts["full"][1]
    md = (out / "RESULTS.md").read_text()
    assert all(f"| {m} |" in md for m in ("frozen", "staged", "full"))
    assert "frozen / full step time ratio" in md
    assert (out / "val_curves.png").stat().st_size > 1000
    # aggregation alone rebuilds the same table from the run directories (the sbatch array's last step)
    (out / "results.csv").unlink()
    proc = bcc_main("compare", "--aggregate", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["mode"] for r in csv.DictReader((out / "results.csv").open())] == ["frozen", "staged", "full"]


@pytest.mark.parametrize("bad", ["--modes frozen,warm", "--aggregate {tmp}/nothing"])
def test_bcc_compare_refuses_unknown_modes_and_empty_dirs(bad, tmp_path, bcc_main):
    args = bad.format(tmp=tmp_path).split()
    proc = bcc_main("compare", "--out", tmp_path / "o", *args)
    assert proc.returncode == 2
    assert "unknown mode 'warm'" in proc.stderr or "no finished run" in proc.stderr
