"""Preemption under gradient accumulation, the vote's cadence, the agreed signal and the non-finite loss
check, in-process (`fit` called directly; the signal is a real SIGUSR1 to this process at a chosen
micro-batch)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcc.config import load_config
from bcc.manifest import Manifest
from bcc.stream import batches_per_epoch
from bcc.train import epoch as epoch_mod
from bcc.train.fit import fit
from bcc.train.setup import TrainError

from conftest import write_config

BATCH = 14  # 168 training samples -> 12 batches per epoch: whole windows for grad_accum 2 and 3
EPOCHS = 2


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def make_cfg(shards: Path, run_dir: Path, **train):
    path = write_config(run_dir.parent / f"{run_dir.name}.yaml", shards, run_dir,
                        data={"batch_size": BATCH, "workers": 1},
                        train={"epochs": EPOCHS, "log_every": 100, **train},
                        eval={"test_at_end": False})
    return load_config(path)


def bpe(shards: Path) -> int:
    return batches_per_epoch(Manifest.load(shards).split("train").count, BATCH, 1)


def signal_after(monkeypatch, micro_batch: int, make_loss=None) -> None:
    """SIGUSR1 to this process right after the `micro_batch`-th train step (1-based, counted over the run);
    `make_loss(n, loss)` may replace the n-th step's returned loss."""
    calls = {"n": 0}
    real = epoch_mod.train_step

    def step(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == micro_batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        return make_loss(calls["n"], loss) if make_loss else loss

    monkeypatch.setattr(epoch_mod, "train_step", step)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


_straight: dict[int, tuple[dict, int]] = {}


def straight_run(shards: Path, tmp_path_factory, accum: int) -> tuple[dict, int]:
    """Uninterrupted run's final weights and step count (one per grad_accum, shared by the grid)."""
    if accum not in _straight:
        run_dir = tmp_path_factory.mktemp(f"straight{accum}") / "run"
        result = fit(make_cfg(shards, run_dir, grad_accum=accum, preempt_check_steps=1))
        assert "preempted" not in result
        state = json.loads((run_dir / "summary.json").read_text())["state"]
        _straight[accum] = (weights(run_dir), state["step"])
    return _straight[accum]


# (grad_accum, preempt_check_steps, micro-batch after which the signal lands): odd and even batches,
# first/middle/last position in a window, a signal in the epoch's last window (voted at the epoch end)
GRID = [(2, 1, 3), (2, 1, 4), (2, 3, 1), (2, 4, 11), (3, 1, 2), (3, 2, 4), (3, 3, 9), (3, 5, 13)]


@pytest.mark.parametrize("accum,check,at", GRID)
def test_preemption_inside_an_accumulation_window_resumes_bitwise(synth_shards, tmp_path, tmp_path_factory,
                                                                  monkeypatch, accum, check, at):
    want_weights, want_steps = straight_run(synth_shards, tmp_path_factory, accum)
    steps_per_epoch = bpe(synth_shards) // accum
    # the window holding micro-batch `at` ends at this step; the vote is the next multiple of `check`
    # or the epoch's end, whichever comes first
    window_end = math.ceil(at / accum)
    expect = next(s for s in range(window_end, want_steps + 1) if s % check == 0 or s % steps_per_epoch == 0)

    run_dir = tmp_path / "run"
    cfg = make_cfg(synth_shards, run_dir, grad_accum=accum, preempt_check_steps=check)
    with monkeypatch.context() as m:
        signal_after(m, at)
        result = fit(cfg)
    assert result == {"preempted": True, "step": expect}
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["step"] == expect and marker["signal"] == signal.SIGUSR1
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["batches_in_epoch"] % accum == 0 and state["step"] == expect

    result = fit(cfg)  # resume: auto
    assert "preempted" not in result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"]["step"] == want_steps
    got = weights(run_dir)
    assert got.keys() == want_weights.keys()
    for k in got:
        assert torch.equal(got[k], want_weights[k]), f"{k} differs"


def test_non_finite_loss_is_named_at_its_step_before_any_checkpoint(synth_shards, tmp_path, monkeypatch):
    """A loss going NaN at micro-batch 7 (step 4 with grad_accum 2) is found at the next check point --
    here the every-2-steps checkpoint, long before the next log step -- and named by its own step."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(synth_shards, run_dir, grad_accum=2)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=2))
    with monkeypatch.context() as m:
        signal_after(m, 0, make_loss=lambda n, loss: loss * float("nan") if n == 7 else loss)
        with pytest.raises(TrainError, match=r"loss is nan at step 4 \(epoch 1\)"):
            fit(cfg)
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved == ["step-00000002"]  # step 4's checkpoint was refused


def test_sigterm_while_a_rank_waits_for_rank_0_at_start_up_ends_it_at_once(monkeypatch):
    """Before training starts there is nothing to save: a SIGTERM reaching a rank that waits for rank 0's
    start-up check ends it at once with one line and the requeue code 75, instead of being kept for a
    vote minutes away (the launcher SIGKILLed it 30 s later, silently). After `training_begins` it is
    kept for the vote again, and so is a second SIGTERM that comes while the first one's error unwinds."""
    import threading
    import time

    import torch.distributed as dist

    from bcc import remote
    from bcc.errors import EXIT_PREEMPTED, Interrupted
    from bcc.train import heartbeat
    from bcc.train.preempt import PreemptionFlag

    monkeypatch.setattr(remote, "_STOPPING", [None])
    monkeypatch.setenv("RANK", "1")
    flag = PreemptionFlag()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as e:  # rank 0 never answers: only the signal ends the wait
        heartbeat.on_rank0(lambda: None, False, 60.0, "a check", store=dist.HashStore())
    assert time.monotonic() - t0 < 5
    assert e.value.exit_code == EXIT_PREEMPTED and e.value.shared == "job"  # rank 0 says it for the job
    assert str(e.value) == ("bcc train (rank 1): interrupted (SIGTERM); during start-up, before the first training "
                            "step: nothing to save; exit code 75 (launchers requeue on it)")
    flag.signum = None
    os.kill(os.getpid(), signal.SIGTERM)  # a second one (Slurm's and the launcher's) while the first unwinds
    assert flag.signum == signal.SIGTERM  # kept, not raised again
    flag.signum = None
    flag.training_begins()
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.signum == signal.SIGTERM  # kept, not raised
