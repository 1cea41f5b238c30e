"""bcc.checkpoint: round trips, weights-only loading, find_latest, crash safety, retention, best."""

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bcc.checkpoint as ck
from bcc.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    DamagedCheckpointError,
    TrainState,
    checkpoint_name,
    find_latest,
    find_latest_intact,
    load_checkpoint,
    read_meta,
    read_train_state,
    resolve_checkpoint,
    restore_rng_state,
    save_rng_state,
)

META = {"taxonomy": {"name": "all-4class"}, "model": {"backbone": "tiny"}, "world_size": 1}


def tiny_training(seed=0):
    """A tiny BN model and an SGD-momentum optimizer with populated state after one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def make_ckpt(step, model=None, opt=None, **state_kw):
    if model is None:
        model, opt = tiny_training()
    return Checkpoint(
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scaler=None,
        rng=[save_rng_state()],
        state=TrainState(step=step, **state_kw),
        meta=META,
    )


def manager(root, keep_last=2, keep_top_k=2, mode="max"):
    return CheckpointManager(root, keep_last=keep_last, keep_top_k=keep_top_k, metric="bacc", mode=mode)


def step_dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_round_trip_tensors_optimizer_rng(tmp_path):
    model, opt = tiny_training()
    ckpt = make_ckpt(7, model, opt, epoch=1, batches_in_epoch=3, samples_seen=35, trainable=["heads"])
    ckpt.scaler = {"scale": 1024.0, "growth_factor": 2.0, "_growth_tracker": 3}
    ckpt.scheduler = {"last_epoch": 7, "base_lrs": [0.1]}
    ckpt.extra = {"temperature": torch.tensor([1.5])}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.rng = [save_rng_state(), save_rng_state()]
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))

    path = manager(tmp_path / "run" / "checkpoints").save(ckpt)
    assert path.name == "step-00000007"
    assert sorted(os.listdir(path)) == sorted(
        [
            "model.safetensors",
            "optimizer.pt",
            "scaler.pt",
            "scheduler.pt",
            "rng.pt",
            "extra.safetensors",
            "meta.json",
            "trainer_state.json",
            "hashes.json",
        ]
    )
    back = load_checkpoint(path)

    assert back.model.keys() == ckpt.model.keys()
    for k, v in ckpt.model.items():
        assert torch.equal(back.model[k], v), k
    fresh_model, _ = tiny_training(seed=1)
    fresh_model.load_state_dict(back.model)
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.5, momentum=0.0)
    fresh_opt.load_state_dict(back.optimizer)
    assert fresh_opt.param_groups[0]["momentum"] == 0.9
    for p, q in zip(
        opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert back.scaler == ckpt.scaler and back.scheduler == ckpt.scheduler
    assert torch.equal(back.extra["temperature"], torch.tensor([1.5]))
    assert back.state == ckpt.state and back.meta == META
    assert len(back.rng) == 2

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(back.rng[1])
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])

    assert read_train_state(path) == ckpt.state and read_meta(path) == META


def test_every_file_loads_weights_only(tmp_path, monkeypatch):
    path = manager(tmp_path / "checkpoints").save(make_ckpt(1))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path)
    assert calls and all(w is True for w in calls)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = manager(tmp_path / "checkpoints").save(make_ckpt(1))
    (path / "hashes.json").unlink()  # as an older checkpoint: the hash would refuse the file before unpickling
    _older_bcc(path)
    with open(path / "optimizer.pt", "wb") as f:
        torch.save({"state": Evil()}, f)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_or_corrupt_files_are_named(tmp_path):
    path = manager(tmp_path / "checkpoints").save(make_ckpt(1))
    rng = (path / "rng.pt").read_bytes()
    (path / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="rng.pt.*missing"):
        load_checkpoint(path)
    (path / "rng.pt").write_bytes(rng[:100])
    with pytest.raises(CheckpointError, match="rng.pt"):
        load_checkpoint(path)
    (path / "rng.pt").write_bytes(rng)
    load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)
    (path / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*trainer_state.json"):
        load_checkpoint(path)


def test_find_latest_picks_highest_complete_step(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_latest(root) is None
    mgr = manager(root, keep_last=5)
    for step in (10, 20, 9):
        mgr.save(make_ckpt(step))  # resumed from before step 10: 10 and 20 are an abandoned timeline
    assert step_dirs(root) == ["step-00000009"]
    for step in (20, 30):
        mgr.save(make_ckpt(step))
    # a crash mid-write (tmp dir), an incomplete higher step, and a stale `last`
    shutil.copytree(root / "step-00000030", root / ".tmp-step-00000050-12345")
    incomplete = root / "step-00000040"
    shutil.copytree(root / "step-00000030", incomplete)
    (incomplete / "trainer_state.json").unlink()
    (root / "last").unlink()
    os.symlink("step-00000010", root / "last")
    (root / "step-00000031").write_text("a file, not a checkpoint")
    assert find_latest(root) == root / "step-00000030"
    assert resolve_checkpoint(root / "last") == root / "step-00000030"
    # a crash between the two renames of a re-save: the moved-aside dir still counts
    os.replace(root / "step-00000030", root / ".tmp-old-step-00000030-777")
    assert find_latest(root) == root / ".tmp-old-step-00000030-777"
    manager(root, keep_last=5).save(make_ckpt(35))  # the next save puts it back and removes the leftovers
    # incomplete step 40 is above the new step (abandoned); the stray file is not a checkpoint: left alone
    assert step_dirs(root) == [
        "step-00000009",
        "step-00000020",
        "step-00000030",
        "step-00000031",
        "step-00000035",
    ]
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    mgr = manager(root)
    first = mgr.save(make_ckpt(10))
    real_save = torch.save
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    failed = make_ckpt(20)
    with pytest.raises(CheckpointError, match="disk full; the previous checkpoint .*step-00000010 is intact"):
        mgr.save(failed, metric_value=0.9)
    monkeypatch.setattr(torch, "save", real_save)
    assert failed.state.top_k == [] and failed.state.best_step is None

    assert step_dirs(root) == ["step-00000010"]
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]
    assert find_latest(root) == first
    assert os.readlink(root / "last") == "step-00000010"
    assert load_checkpoint(root / "last").state.step == 10


def test_hard_crash_leftovers_are_ignored_then_cleaned(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    mgr = manager(root)
    mgr.save(make_ckpt(10))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs

    monkeypatch.setattr(ck.CheckpointManager, "_install", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        mgr.save(make_ckpt(20))
    monkeypatch.undo()
    assert (root / f".tmp-step-00000020-{os.getpid()}" / "trainer_state.json").exists()
    assert find_latest(root) == root / "step-00000010"
    mgr.save(make_ckpt(30))
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]


def test_resave_same_step_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = manager(root)
    mgr.save(make_ckpt(40, epoch=0, batches_in_epoch=40))
    mgr.save(make_ckpt(40, epoch=1, batches_in_epoch=0))
    assert step_dirs(root) == ["step-00000040"]
    assert read_train_state(find_latest(root)).epoch == 1
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]


def test_retention_top_k_best_and_resume(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    mgr = manager(root, keep_last=2, keep_top_k=2)
    metrics = {10: 0.50, 20: 0.80, 30: 0.60, 40: 0.70, 50: 0.40}
    state = TrainState()
    for step, m in metrics.items():
        state.step = step
        model, opt = tiny_training(seed=step)
        ckpt = make_ckpt(step, model, opt)
        ckpt.state = state
        mgr.save(ckpt, metric_value=m)
    # last 2: 40, 50; top 2: 20 (0.8), 40 (0.7); best: 20
    assert step_dirs(root) == ["step-00000020", "step-00000040", "step-00000050"]
    assert [e["step"] for e in state.top_k] == [20, 40]
    assert (state.best_step, state.best_metric) == (20, 0.80)
    assert os.readlink(root / "best") == "step-00000020"
    assert os.readlink(root / "last") == "step-00000050"
    best_weights = load_file(run / "model_best.safetensors")
    for k, v in tiny_training(seed=20)[0].state_dict().items():
        assert torch.equal(best_weights[k], v), k
    info = json.loads((run / "model_best.json").read_text())
    assert info["step"] == 20 and info["metric"] == "bacc" and info["meta"] == META
    assert resolve_checkpoint(run) == root / "best"
    assert resolve_checkpoint(run, prefer="latest") == root / "step-00000050"

    # resume: a new manager, state restored from trainer_state.json, continues the same bookkeeping
    state = load_checkpoint(find_latest(root)).state
    assert [e["step"] for e in state.top_k] == [20, 40]
    mgr = manager(root, keep_last=2, keep_top_k=2)
    for step, m in {60: 0.75, 70: 0.90, 80: None}.items():
        state.step = step
        model, opt = tiny_training(seed=step)
        ckpt = make_ckpt(step, model, opt)
        ckpt.state = state
        mgr.save(ckpt, metric_value=m)
    # last 2: 70, 80; top 2: 70 (0.9), 20 (0.8, remembered across the resume); best: 70
    assert step_dirs(root) == ["step-00000020", "step-00000070", "step-00000080"]
    assert [(e["step"], e["metric"]) for e in state.top_k] == [(70, 0.90), (20, 0.80)]
    assert os.readlink(root / "best") == "step-00000070"
    assert json.loads((run / "model_best.json").read_text())["step"] == 70
    assert torch.equal(
        load_file(run / "model_best.safetensors")["0.weight"], tiny_training(seed=70)[0][0].weight
    )
    assert read_train_state(root / "step-00000080").best_step == 70


def test_min_mode_nan_and_ties(tmp_path):
    mgr = manager(tmp_path / "checkpoints", keep_top_k=2, mode="min")
    state = TrainState()
    for step, loss in [(1, 0.5), (2, float("nan")), (3, 0.5), (4, 0.3)]:
        state.step = step
        mgr.record(state, loss)
    assert [e["step"] for e in state.top_k] == [4, 1]
    assert state.best_step == 4


def test_manager_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        manager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="mode"):
        manager(tmp_path, mode="up")


def test_checkpoint_name():
    assert checkpoint_name(40) == "step-00000040"
    with pytest.raises(ValueError):
        checkpoint_name(-1)


def test_shared_and_non_tensor_entries(tmp_path):
    w = torch.randn(3, 3)
    ckpt = make_ckpt(1)
    ckpt.model = {"a": w, "b": w}  # tied weights share storage; safetensors refuses those as-is
    path = manager(tmp_path / "checkpoints").save(ckpt)
    back = load_checkpoint(path).model
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w)
    ckpt.model = {"a": w, "_extra_state": {"x": 1}}
    with pytest.raises(CheckpointError, match="_extra_state"):
        manager(tmp_path / "checkpoints").save(ckpt)


KILL_LOOP = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import make_ckpt, manager
mgr = manager({root!r}, keep_last=2, keep_top_k=1)
model, opt = torch.nn.Linear(64, 64), None
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(2, 64)).sum().backward()
opt.step()
step = 0
while True:
    step += 1
    mgr.save(make_ckpt(step, model, opt), metric_value=float(step % 7))
"""


def test_sigkill_during_saves_leaves_a_loadable_latest(tmp_path):
    """A real SIGKILL at an arbitrary moment of a save loop: the latest complete checkpoint loads."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "run" / "checkpoints"
    code = KILL_LOOP.format(tests=os.path.dirname(__file__), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while (latest := find_latest(root)) is None or read_train_state(latest).step < 20:
            assert proc.poll() is None, "save loop died"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.05))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = find_latest(root)
    ckpt = load_checkpoint(latest)
    assert ckpt.state.step >= 20
    ckpt.state.step += 1
    manager(root, keep_last=2, keep_top_k=1).save(ckpt)
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]
    assert load_checkpoint(root / "last").state.step == ckpt.state.step


# --------------------------------------------------------------------------- damage after writing


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) - 9 if offset is None else offset  # inside the last tensor's data, past the header
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_hashes_written_last_and_cover_every_file(tmp_path):
    path = manager(tmp_path / "checkpoints").save(make_ckpt(3))
    hashes = json.loads((path / "hashes.json").read_text())
    assert hashes["format"] == "bcc-checkpoint-hashes/1" and hashes["algorithm"] == "sha256"
    files = sorted(p.name for p in path.iterdir() if p.name != "hashes.json")
    assert sorted(hashes["files"]) == files
    for name in files:
        assert hashes["files"][name] == hashlib.sha256((path / name).read_bytes()).hexdigest()


def test_damage_after_writing_is_found_on_load(tmp_path):
    """A flipped bit inside a tensor loads silently by itself (safetensors has no checksum); the hash
    names the file. A truncated optimizer.pt, a missing listed file: named too."""
    path = manager(tmp_path / "checkpoints").save(make_ckpt(1))
    good = load_checkpoint(path)
    _flip(path / "model.safetensors")
    hashes = (path / "hashes.json").read_bytes()
    (path / "hashes.json").unlink()
    with pytest.raises(DamagedCheckpointError, match="its hashes.json is missing"):  # meta.json says it had one
        load_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match="its hashes.json is missing"):
        ck.load_model_weights(path)
    meta = (path / "meta.json").read_bytes()
    _older_bcc(path)
    silent = load_checkpoint(path)  # what an older checkpoint (no hashes.json) gets: wrong weights, no error
    assert any(not torch.equal(good.model[k], silent.model[k]) for k in good.model)
    (path / "meta.json").write_bytes(meta)
    (path / "hashes.json").write_bytes(hashes)
    with pytest.raises(DamagedCheckpointError, match=r"step-00000001 is damaged: model.safetensors .*sha256"):
        load_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match="model.safetensors"):
        ck.verify_checkpoint(path)
    _flip(path / "model.safetensors")  # flipped back: intact again
    load_checkpoint(path)
    _truncate(path / "optimizer.pt")
    with pytest.raises(DamagedCheckpointError, match="is damaged: optimizer.pt"):
        load_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(DamagedCheckpointError, match="optimizer.pt is missing"):
        load_checkpoint(path)
    (path / "hashes.json").write_text("{}")
    with pytest.raises(DamagedCheckpointError, match="hashes.json is not"):
        load_checkpoint(path)
    assert issubclass(DamagedCheckpointError, CheckpointError)


def test_find_latest_intact_walks_back_past_damaged_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = manager(root, keep_last=3, keep_top_k=0)
    model, opt = tiny_training()
    paths = [mgr.save(make_ckpt(s, model, opt)) for s in (2, 4, 6)]
    assert find_latest_intact(root) == (paths[2], [])
    _flip(paths[2] / "model.safetensors")
    latest, damaged = find_latest_intact(root)
    assert latest == paths[1] and [d for d, _ in damaged] == [paths[2]]
    assert "model.safetensors" in damaged[0][1]
    _truncate(paths[1] / "optimizer.pt")
    latest, damaged = find_latest_intact(root)
    assert latest == paths[0] and [d for d, _ in damaged] == [paths[2], paths[1]]
    assert "optimizer.pt" in damaged[1][1]
    assert find_latest(root) == paths[2]  # completeness alone does not read files
    (paths[0] / "hashes.json").unlink()  # lost: damage, since meta.json says it was written
    latest, damaged = find_latest_intact(root)
    assert latest is None and "hashes.json is missing" in damaged[2][1]
    for p in paths:  # checkpoints of an older bcc: no hashes, taken as they are
        (p / "hashes.json").unlink(missing_ok=True)
        _older_bcc(p)
    assert find_latest_intact(root) == (paths[2], [])


def _older_bcc(path):
    """Make a checkpoint look written by a bcc from before hashes.json: no file, no mark in meta.json."""
    meta = json.loads((path / "meta.json").read_text())
    del meta[ck.HASHED_KEY]
    (path / "meta.json").write_text(json.dumps(meta))


def test_inference_weights_are_checked_too(tmp_path):
    from bcc.checkpoint import load_model_weights

    path = manager(tmp_path / "checkpoints").save(make_ckpt(1))
    assert load_model_weights(path).keys() == load_checkpoint(path).model.keys()
    _flip(path / "model.safetensors")
    with pytest.raises(DamagedCheckpointError, match="model.safetensors"):
        load_model_weights(path)
