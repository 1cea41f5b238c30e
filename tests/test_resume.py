"""Checkpoints you can kill at any moment: exact mid-epoch resume after SIGKILL, and SIGUSR1 preemption
through the real entry points."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bcc.launch import accelerate_command

from conftest import write_config
from test_evaluate import trained_run  # noqa: F401 - session fixture: a one-epoch, one-process run

EXIT_PREEMPTED = 75


def final_weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / name)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def train_cmd(cfg: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bcc.train", "--config", str(cfg), *overrides]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held:\n{out[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def step_dirs(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "trainer_state.json").exists())


@pytest.fixture
def resume_config(synth_shards, tmp_path):
    def make(run_dir: Path, **sections) -> Path:
        sections["train"] = {"epochs": 3, **sections.get("train", {})}
        sections["checkpoint"] = {"every_steps": 2, "keep_last": 3, **sections.get("checkpoint", {})}
        sections["data"] = {"workers": 2, **sections.get("data", {})}
        return write_config(tmp_path / f"{run_dir.name}.yaml", synth_shards, run_dir, **sections)

    return make


def test_sigkill_then_auto_resume_is_bitwise_exact(resume_config, tmp_path):
    """One process, 2 loader workers: killed at a random checkpoint mid-epoch, resumed with 3 workers
    (data.workers is a safe resume change: the batch sequence does not depend on it), equal to
    uninterrupted in the raw weights and in their EMA (train.ema_decay, bcc/train/ema.py). The one
    end-to-end test of both promises (it was two runs each: this and an unkilled resume with other workers)."""
    ema = {"ema_decay": 0.9}
    straight = tmp_path / "straight"
    proc = subprocess.run(train_cmd(resume_config(straight, train=ema)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    killed = tmp_path / "killed"
    cfg = resume_config(killed, train=ema)
    steps_per_epoch = json.loads((straight / "summary.json").read_text())["ranks"][0]["steps"] // 3
    # a random checkpoint that is not at an epoch boundary, so the resume must skip consumed batches
    candidates = [s for s in range(2, 3 * steps_per_epoch, 2) if s % steps_per_epoch]
    target = random.Random(os.getpid()).choice(candidates)
    proc = subprocess.Popen(train_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(s >= target for s in step_dirs(killed)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(train_cmd(cfg, "data.workers=3"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "data.workers: 2 -> 3" in resumed.stdout, resumed.stdout[-2000:]
    assert_bitwise_equal(final_weights(straight), final_weights(killed))
    assert_bitwise_equal(final_weights(straight, "model_ema.safetensors"), final_weights(killed, "model_ema.safetensors"))
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["state"]["step"] == b["state"]["step"] and a["val"] == b["val"]
    assert "ema_bacc" in a["val"] and "ema_bacc" in a["test"]  # the EMA weights evaluated beside the raw ones
    hashes = json.loads((killed / "checkpoints" / "last" / "hashes.json").read_text())["files"]
    assert "model_ema.safetensors" in hashes
    # metrics.jsonl tells one story: the rows of redone work were replaced, not duplicated
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["epoch"]) for r in rows] == [("val", 1), ("val", 2), ("val", 3), ("test", 3)]


def copy_of_trained_run(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, run dir): a copy of the session's one-epoch, one-process run (`trained_run`: its last
    checkpoint is at the epoch end) and that run's config pointing at the copy (run.* is safe on resume).
    What a first `train.epochs=1` run of the test would have made, without training it again."""
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, symlinks=True)  # best/last are relative links
    cfg = yaml.safe_load((source.parent / "cfg.yaml").read_text())
    cfg["run"]["dir"] = str(run_dir)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def test_resume_refuses_unsafe_config_change_and_another_model(trained_run, synth_shards, tmp_path,  # noqa: F811
                                                                bcc_main):
    """The refusals run in-process (`bcc_main`): each ends before a step, after reading the checkpoint. The
    dataset may move (another data.shards holding the same shards, by sha256), not change."""
    cfg, run_dir = copy_of_trained_run(trained_run, tmp_path)
    proc = bcc_main("train", "--config", cfg, "train.lr=0.5")
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr
    proc = bcc_main("train", "--config", cfg, "model.head_hidden=64")
    assert proc.returncode == 2
    assert "another model" in proc.stderr and "head_hidden" in proc.stderr
    moved, other = shutil.copytree(synth_shards, tmp_path / "moved"), shutil.copytree(synth_shards, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # another shard, as far as the run can tell
    (other / "manifest.json").write_text(json.dumps(manifest))
    proc = bcc_main("train", "--config", cfg, f"data.shards={other}")
    assert proc.returncode == 2 and "keys that change the run: data.shards" in proc.stderr, proc.stderr
    # more epochs is safe, and so is the same dataset elsewhere: the run continues from its last checkpoint
    proc = subprocess.run(train_cmd(cfg, "train.epochs=2", f"data.shards={moved}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config change accepted: train.epochs" in proc.stdout
    assert "config change accepted: data.shards" in proc.stdout and "the same dataset" in proc.stdout
    # starting over into a run dir that holds checkpoints would mix two runs
    proc = bcc_main("train", "--config", cfg, "checkpoint.resume=none")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


def test_a_refused_resume_is_printed_once_under_plain_accelerate_launch(trained_run, tmp_path):  # noqa: F811
    """Every rank refuses the same resume alike (the same checkpoint, the same config): under plain
    `accelerate launch` (no `bcc launch` around it) both ranks printed the line; rank 0 prints it now."""
    cfg, _ = copy_of_trained_run(trained_run, tmp_path)
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    env.pop("BCC_DEBUG", None)
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bcc.train", "--config", str(cfg),
                           "train.lr=0.5"], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "ChildFailedError" in proc.stderr, proc.stderr[-2000:]  # accelerate's own exit
    assert len(errors) == 1 and "keys that change the run: train.lr" in errors[0], proc.stderr[-3000:]


def test_epoch_end_checkpoint_resumes_on_another_process_count(trained_run, tmp_path):  # noqa: F811
    cfg, run_dir = copy_of_trained_run(trained_run, tmp_path)  # one process, checkpointed at the epoch end
    cmd, env = accelerate_command(2, ["--config", str(cfg), "train.epochs=2"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 -> 2 processes at an epoch boundary" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["state"]["epoch"] == 2


def _children(pid: int) -> dict[int, int]:
    """Trainer rank -> pid of the processes under an `accelerate launch` (rank read from their RANK)."""
    import psutil

    # the ranks are the launcher's direct children; their forked (persistent) loader workers carry the
    # same command line (and RANK) one level further down
    ranks = {}
    for c in psutil.Process(pid).children():
        if "bcc.train" in " ".join(c.cmdline()):
            ranks[int(c.environ().get("RANK", -1))] = c.pid
    return ranks


def test_sigusr1_preempts_two_process_training_and_resume_matches(resume_config, tmp_path, bcc_main):
    """SIGUSR1 to rank 1 only: all ranks agree at the next vote, save together, exit 75, and the marker
    names the signal rank 1 got; resume is exact, the EMA (with its warmup) included, and both ranks hold
    the same EMA."""
    ema = {"ema_decay": 0.95, "ema_warmup": True}
    straight = tmp_path / "straight"
    cmd, env = accelerate_command(2, ["--config", str(resume_config(straight, train=ema))])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    run_dir = tmp_path / "preempted"
    cfg = resume_config(run_dir, checkpoint={"every_steps": 0}, train={"preempt_check_steps": 2, **ema})
    cmd, env = accelerate_command(2, ["--config", str(cfg)])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc)  # after the first epoch
    ranks = _children(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert "preempted" in out, out[-3000:]
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["signal"] == signal.SIGUSR1  # rank 0 writes it, but records the signal rank 1 got
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert 0 < state["step"]

    # a mid-epoch checkpoint replays each rank's stream: another process count is refused, clearly
    if state["batches_in_epoch"]:
        other = bcc_main("train", "--config", cfg)  # one process, in-process: refused before a step
        assert other.returncode == 2 and "mid-epoch by 2 processes" in other.stderr, other.stderr[-2000:]

    cmd, env = accelerate_command(2, ["--config", str(cfg)])
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert not (run_dir / "PREEMPTED").exists()
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["val"] == b["val"]
    assert a["ranks"][0]["weights_sha256"] == b["ranks"][0]["weights_sha256"]
    # the EMA: the same on both ranks, and equal after the preemption and resume
    assert a["ranks"][0]["ema_sha256"] == a["ranks"][1]["ema_sha256"] == b["ranks"][0]["ema_sha256"]
    assert_bitwise_equal(final_weights(straight, "model_ema.safetensors"), final_weights(run_dir, "model_ema.safetensors"))


def test_sigterm_to_the_whole_process_group_saves_and_exits_75(resume_config, tmp_path):
    """Like Slurm: SIGTERM reaches every process, loader workers included; the run still saves."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(resume_config(run_dir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wait_for(lambda: step_dirs(run_dir), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["signal"] == signal.SIGTERM
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == marker["step"] > 0


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigusr1_while_torch_is_still_loading_is_kept_for_the_first_vote(resume_config, tmp_path):
    """SIGUSR1's default action ends a process. `bcc train` catches it from before torch is imported
    (seconds before the run's own handler exists), so a signal sent the moment it is caught, while
    libtorch is not yet loaded, still ends in a checkpoint, the marker and exit 75."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(resume_config(run_dir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGUSR1):
            assert proc.poll() is None and time.monotonic() < deadline, "bcc train never caught SIGUSR1"
            time.sleep(0.002)
        torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert not torch_loaded, "SIGUSR1 was caught only after torch was loaded"
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["signal"] == signal.SIGUSR1
    assert (run_dir / "checkpoints" / "last" / "trainer_state.json").exists()


def test_damaged_latest_checkpoint_auto_resumes_from_previous_and_says_so(resume_config, tmp_path, bcc_main):
    """Damage after writing: a flipped bit in the latest checkpoint's weights and a truncated optimizer.pt
    in the one before. An explicit resume from the damaged one is a named error; resume=auto warns once
    per damaged checkpoint, resumes from the newest intact one and, being exact, ends with the weights
    the damaged latest checkpoint held."""
    run_dir = tmp_path / "run"
    cfg = resume_config(run_dir, train={"epochs": 1}, checkpoint={"every_steps": 2, "keep_last": 3, "keep_top_k": 0})
    proc = subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = step_dirs(run_dir)
    assert len(steps) == 3, steps
    root = run_dir / "checkpoints"
    latest, previous, intact = (root / f"step-{s:08d}" for s in reversed(steps))
    expected = {k: v.clone() for k, v in load_file(latest / "model.safetensors").items()}  # not the mmap
    weights = bytearray((latest / "model.safetensors").read_bytes())
    weights[-5] ^= 0x10  # inside the last tensor: safetensors alone would load it without complaint
    (latest / "model.safetensors").write_bytes(bytes(weights))
    optimizer = (previous / "optimizer.pt").read_bytes()
    (previous / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])

    explicit = bcc_main("train", "--config", cfg, f"checkpoint.resume={latest}")  # refused before a step
    assert explicit.returncode == 2, explicit.stdout[-2000:] + explicit.stderr[-2000:]
    errors = [line for line in explicit.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in explicit.stderr
    assert f"{latest.name} is damaged: model.safetensors" in errors[0]

    auto = subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=300)
    assert auto.returncode == 0, auto.stdout[-2000:] + auto.stderr[-2000:]
    warnings = [line for line in auto.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, auto.stdout[-3000:]
    assert f"{latest.name} is damaged: model.safetensors" in warnings[0]
    assert f"{previous.name} is damaged: optimizer.pt" in warnings[1]
    assert all(f"resuming from the previous complete checkpoint {intact.name}" in w for w in warnings)
    assert f"resumed from {intact}" in auto.stdout.replace("\n", "")
    assert_bitwise_equal(expected, final_weights(run_dir))


def test_resume_accepts_execution_keys_and_explains_a_scaled_lr():
    """timeout, compile and DDP options, and how remote shards are read (data.read_timeout_s, data.retries),
    change how a run executes, not what it computes: a requeued job may raise its timeout or drop the
    compiler (they were refused). A train.lr difference that comes from
    train.lr_scale (another process count at an epoch-end resume) says so and how to continue."""
    from bcc.config import load_config
    from bcc.taxonomy import Taxonomy
    from bcc.train.accel import device_caps, resolve_config
    from bcc.train.resume import check_resume_compatible
    from bcc.train.setup import TrainError

    tax = Taxonomy.default()
    meta = {"taxonomy": tax.to_dict()}
    saved = load_config(None, ["train.compile=true", "train.compile_backend=aot_eager"])
    current = load_config(None, ["train.timeout_s=60", "train.ddp_static_graph=true",
                                 "train.ddp_gradient_as_bucket_view=true", "data.read_timeout_s=120", "data.retries=5"])
    changes = check_resume_compatible(saved, current, meta, tax)
    assert {c.split(":")[0] for c in changes} == {"train.timeout_s", "train.compile", "train.compile_backend",
                                                   "train.ddp_static_graph", "train.ddp_gradient_as_bucket_view",
                                                   "data.read_timeout_s", "data.retries"}
    cpu = device_caps(torch.device("cpu"))
    scaled = load_config(None, ["train.lr_scale=linear", "train.lr_base_batch=64", "train.lr=0.1"])
    one, two = resolve_config(scaled, cpu, 1), resolve_config(scaled, cpu, 2)
    with pytest.raises(TrainError, match=r"train.lr: .*checkpoint trained at 0\.1; .* set train.lr=0.1 "
                                         r"train.lr_scale=none to continue at it"):
        check_resume_compatible(two, one, meta, tax)
    fixed = resolve_config(load_config(None, ["train.lr=0.1", "train.lr_scale=none", "train.lr_base_batch=64"]), cpu, 1)
    assert check_resume_compatible(two, fixed, meta, tax) == []


def test_a_run_log_cut_mid_line_by_kill_is_pruned_on_resume_and_damage_elsewhere_is_named(tmp_path, capsys):
    """kill -9 inside `RunLog.log`'s append leaves half a line; the resume's prune drops it with a
    warning (its work is redone) instead of a JSONDecodeError traceback. A bad line that is not the
    last one is real damage: RunLogError naming the line."""
    from bcc.train.runlog import RunLog, RunLogError

    log = RunLog(tmp_path, is_main=True, live=False)
    rows = [{"step": 1, "split": "train", "loss": 1.0}, {"step": 2, "split": "val", "bacc": 0.5},
            {"step": 3, "split": "train", "loss": 0.9}]
    good = "".join(json.dumps(r) + "\n" for r in rows)
    log.path.write_text(good + '{"step": 4, "split": "tr')
    log.prune(2)
    assert log.path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    assert "dropped its last line" in capsys.readouterr().out
    log.path.write_text(good.replace('"loss": 1.0}', '"loss": 1.0') + good)
    with pytest.raises(RunLogError, match="metrics.jsonl line 1 is not JSON"):
        log.prune(2)
