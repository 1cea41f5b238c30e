"""Bad inputs refused before the first step, each as one `error:` line with exit code 2 (issue 11, items
6-9): missing or truncated shards of any split, a split name that names no split, an empty val split, an
unknown backbone or metric, invalid values, precision the device would ignore, a full disk at checkpoint
time, symlink loops in a pack source; and a pack with default options that feeds 8 ranks x 2 workers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bcc.cli import main
from bcc.errors import EXIT_USAGE

from conftest import write_config


def _one_error(capsys, argv) -> str:
    """Run `bcc ARGV` in-process; assert exit 2, exactly one `error:` line on stderr, no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_USAGE, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def shards(synth_shards, tmp_path) -> Path:
    """A private copy of the session's packed data, to damage."""
    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    return out


def _train(capsys, tmp_path, shards, *overrides, **sections) -> str:
    cfg = write_config(tmp_path / "cfg.yaml", shards, tmp_path / "run", **sections)
    line = _one_error(capsys, ["train", "--config", cfg, *overrides])
    # refused before the first step: nothing trained, nothing logged, no checkpoint
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    return line


# --------------------------------------------------------------------------- item 6: found late


@pytest.mark.parametrize("split", ["val", "test"])
def test_missing_eval_shard_is_named_before_the_first_step(capsys, tmp_path, shards, split):
    gone = sorted(shards.glob(f"{split}-*.tar"))[1]
    gone.unlink()
    line = _train(capsys, tmp_path, shards)
    assert f"split '{split}': missing shard" in line and gone.name in line


@pytest.mark.parametrize("cut", [1, 512, "most"])
def test_truncated_shard_is_named_before_the_first_step(capsys, tmp_path, shards, cut):
    """A pack records each shard's size (format 5): a shard short by one byte is found by its stat,
    before the first step (before: only a cut below 2 KiB per sample was, the rest after an epoch)."""
    bad = sorted(shards.glob("val-*.tar"))[0]
    size = bad.stat().st_size
    keep = 1024 if cut == "most" else size - cut
    os.truncate(bad, keep)
    line = _train(capsys, tmp_path, shards)
    assert "truncated" in line and bad.name in line and f"({keep} bytes, the manifest says {size})" in line


def test_a_pack_before_format_5_keeps_the_per_sample_lower_bound(capsys, tmp_path, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format"] = "bcc-shards/4"
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            del entry["bytes"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    bad = sorted(shards.glob("val-*.tar"))[0]
    os.truncate(bad, 1024)
    line = _train(capsys, tmp_path, shards)
    assert "truncated" in line and bad.name in line and "(1024 bytes for" in line


@pytest.mark.parametrize(("key", "value"), [("data.val_split", "valid"), ("data.test_split", "holdout"),
                                            ("data.train_split", "training")])
def test_split_that_names_no_split(capsys, tmp_path, shards, key, value):
    line = _train(capsys, tmp_path, shards, f"{key}={value}")
    assert f"{key} '{value}' names no split" in line and "available: train, val, test" in line


def test_unknown_metric_and_backbone(capsys, tmp_path, shards):
    line = _train(capsys, tmp_path, shards, "checkpoint.metric=accuracy")
    assert "checkpoint.metric 'accuracy' is not a metric" in line
    line = _train(capsys, tmp_path, shards, "model.backbone=resnet_18")
    assert "model.backbone 'resnet_18'" in line and "did you mean" in line and "resnet18" in line


def test_empty_val_split_is_refused_not_scored_nan(capsys, tmp_path, make_class_tree):
    from bcc.pack import pack_folders

    src = make_class_tree(tmp_path / "src", {"Benign": 20, "Pre-B": 20, "Pro-B": 20, "early Pre-B": 20}, size=16)
    result = pack_folders(src, tmp_path / "packed", split=(0.9, 0.0, 0.1))
    assert "split 'val' is empty: training refuses an empty val split" in result.manifest["warnings"]
    line = _train(capsys, tmp_path, tmp_path / "packed")
    assert "data.val_split 'val'" in line and "is empty" in line


def test_preflight_runs_on_the_main_process_only_and_every_rank_gets_its_verdict(shards, monkeypatch):
    """Rank 1 never looks at the storage; the main process's verdict reaches it as the same error,
    through the process group's store (here an in-memory one shared by two threads)."""
    import threading

    import torch.distributed as dist

    from bcc.config import load_config
    from bcc.manifest import Manifest
    from bcc.train import heartbeat
    from bcc.train import preflight as pf

    class FakeAccelerator:
        def __init__(self, rank):
            self.is_main_process, self.num_processes = rank == 0, 2

    calls = []
    monkeypatch.setattr(pf, "check_run", lambda cfg, m: calls.append(1) or (_ for _ in ()).throw(
        pf.TrainError("split 'val': missing shard x.tar")))
    store = dist.HashStore()
    monkeypatch.setattr(heartbeat, "default_store", lambda: store)
    monkeypatch.setattr(heartbeat, "_ROUNDS", iter([0, 0]))  # the two "ranks" share one process here
    cfg, manifest = load_config(None, [f"data.shards={shards}"]), Manifest.load(shards)
    raised = {}

    def rank(r):
        try:
            pf.preflight(cfg, manifest, FakeAccelerator(r))
        except pf.TrainError as e:
            raised[r] = (str(e), e.shared)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # rank 1 waits first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert raised == {r: ("split 'val': missing shard x.tar", "job") for r in (0, 1)}
    assert len(calls) == 1


def test_a_waiting_rank_waits_while_rank_0_works_and_fails_when_it_stops(monkeypatch):
    """Rank 0 works for 4 x timeout_s, silent but within a bound of its own (a remote read within its
    data.read_timeout_s), and beats meanwhile: the waiting rank gets its result. With no sign of life the
    waiting rank fails after timeout_s with the lost-peer line (a time-out: an error line)."""
    import threading

    import torch.distributed as dist

    from bcc import activity
    from bcc.errors import is_time_out, lost_peer_message
    from bcc.train import heartbeat

    store, got = dist.HashStore(), {}
    monkeypatch.setattr(heartbeat, "_ROUNDS", iter([0, 0, 1]))  # rank 1's and rank 0's first call, then one more

    def work():
        with activity.waiting(5.0, "a slow server"):
            time.sleep(2.0)
        return "the verdict"

    waiter = threading.Thread(target=lambda: got.setdefault(1, heartbeat.on_rank0(
        work, False, 0.5, "a check", store=store)))
    waiter.start()
    got[0] = heartbeat.on_rank0(work, True, 0.5, "a check", store=store)
    waiter.join(timeout=30)
    assert got == {0: "the verdict", 1: "the verdict"}
    t0 = time.monotonic()
    with pytest.raises(dist.DistBackendError) as e:  # round 1: no rank 0 at all
        heartbeat.on_rank0(work, False, 0.5, "a check", store=store)
    assert 0.5 <= time.monotonic() - t0 < 10
    line = lost_peer_message(e.value)
    assert line.startswith("rank ") and "lost contact with the other ranks" in line and is_time_out(line), line
    assert "no sign of life for 0.5 s (train.timeout_s) while it did a check" in line, line


def _rounds(monkeypatch):
    from bcc.train import heartbeat

    monkeypatch.setattr(heartbeat, "_ROUNDS", iter([0, 0]))  # two "ranks" in one process share the round


def test_a_rank_0_whose_check_hangs_ends_every_rank_after_train_timeout_s(monkeypatch):
    """A start-up check that hangs where nothing bounds the wait (a name lookup that never answers, here:
    the probe's getaddrinfo) beat on forever before, and the job hung. Now rank 0 beats only while its work
    moves on (its stack, bcc.activity's ticks, waits within their bound), so after train.timeout_s
    every rank gets one error naming the read past its time-out, and rank 0's check is ended too."""
    import socket
    import threading

    import torch.distributed as dist

    from bcc import activity, remote
    from bcc.train import heartbeat

    _rounds(monkeypatch)
    # an earlier in-process test's probe thread may still wait or retry (its process would have ended):
    # its waits and ticks count as progress, so this test starts once it is gone, with no wait recorded
    for t in threading.enumerate():
        if t.name == "bcc-probe":
            t.join(timeout=60)
    monkeypatch.setattr(activity, "_WAITS", {})
    hung = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: hung.wait() and [])
    monkeypatch.setattr(remote, "RESOLVE_S", 0.0)  # the request's bound: 2 x 0.2 s
    store, got = dist.HashStore(), {}
    work = lambda: str(remote.probe_all(["http://shards.example/train-000000.tar"], 0, 0.2))  # noqa: E731
    waiter = threading.Thread(target=lambda: got.setdefault(1, heartbeat.on_rank0(work, False, 1.0, "a check",
                                                                                  store=store)))
    waiter.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(heartbeat.StuckError) as e:  # raised in this (main) thread by SIGALRM
            heartbeat.on_rank0(work, True, 1.0, "a check", store=store)
        took = time.monotonic() - t0
        waiter.join(timeout=30)
    finally:
        hung.set()
    assert took < 10, took
    assert str(e.value) == got[1], got
    assert got[1].startswith("rank 0 made no progress for 1 s (train.timeout_s) while it did a check: a read of "
                             "http://shards.example/train-000000.tar outlived its time-out"), got[1]


def test_a_rank_0_stuck_where_no_signal_reaches_exits_with_the_error(tmp_path):
    """A working thread the SIGALRM cannot interrupt (here it blocks the signal; really: a call the kernel
    does not interrupt, a file system that stopped answering) does not keep rank 0 alive: after
    STUCK_GRACE_S it prints the error and exits 2."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import signal, time\n"
        "import torch.distributed as dist\n"
        "from bcc.train import heartbeat\n"
        "heartbeat.STUCK_GRACE_S = 0.5\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "heartbeat.on_rank0(lambda: time.sleep(60), True, 1.0, 'a check', store=dist.HashStore())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == EXIT_USAGE and time.monotonic() - t0 < 30, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 made no progress for 1 s (train.timeout_s) "
                                                   "while it did a check: stuck in _work (bcc/train/heartbeat.py:"), lines


def test_a_waiting_rank_logs_nothing_while_it_waits(capfd, monkeypatch):
    """The waiting rank polls for rank 0's result without a store.wait that times out every interval
    (torch's TCPStore logged two `waitForInput ... timed out` lines on stderr for each)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from bcc import activity
    from bcc.train import heartbeat

    _rounds(monkeypatch)
    server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 2, False, timeout=timedelta(seconds=30))

    def work():
        with activity.waiting(5.0):
            time.sleep(1.5)  # 6 intervals of the waiting rank
        return "done"

    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault(1, heartbeat.on_rank0(work, False, 2.0, "a check",
                                                                                  store=client)))
    waiter.start()
    got[0] = heartbeat.on_rank0(work, True, 2.0, "a check", store=server)
    waiter.join(timeout=30)
    assert got == {0: "done", 1: "done"}
    err = capfd.readouterr().err
    assert "waitForInput" not in err and "timed out" not in err, err


def test_preflight_at_100k_shards_is_cheap(tmp_path):
    """100,000 shard entries: the manifest check stats each local shard once and opens none."""
    from bcc.config import load_config
    from bcc.manifest import Manifest
    from bcc.taxonomy import Taxonomy
    from bcc.train.preflight import TrainError, check_run

    n, per = 100_000, 10
    split = {"count": n * per, "class_counts": {}, "shards": [
        {"path": f"train-{i:06d}.tar", "count": per, "sha256": "0" * 64} for i in range(n)]}
    tiny = {"count": 1, "class_counts": {}, "shards": [{"path": "val-000000.tar", "count": 1, "sha256": "0" * 64}]}
    tax = Taxonomy.default()
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "bcc-shards/1", "taxonomy": tax.to_dict(), "classes": list(tax.class_names),
        "splits": {"train": split, "val": tiny, "test": tiny}}))
    for i in range(n - 1):  # all present but the last, at the size a 10-sample shard has at least
        with open(tmp_path / f"train-{i:06d}.tar", "wb") as f:
            f.truncate(per * 2048)
    cfg = load_config(None, [f"data.shards={tmp_path}", "model.backbone=test_resnet"])
    t0 = time.perf_counter()
    manifest = Manifest.load(tmp_path)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with pytest.raises(TrainError, match=r"split 'train': missing shard .*train-099999\.tar"):
        check_run(cfg, manifest)
    t_check = time.perf_counter() - t0
    # a figure, not a gate: timings on shared machines are noise (about 1 s unloaded, 6-9 s at load 12)
    print(f"100k shards: manifest load {t_load:.2f} s, preflight {t_check:.2f} s")


# --------------------------------------------------------------------------- item 7: tracebacks


@pytest.mark.parametrize(("override", "key"), [
    ("train.lr=-0.1", "train.lr"), ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=-4", "data.batch_size"), ("data.image_size=0", "data.image_size"),
    ("data.workers=-1", "data.workers"), ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("model.head_dropout=1", "model.head_dropout"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.preempt_check_steps=0", "train.preempt_check_steps"),
])
def test_invalid_values_name_the_key_and_the_override(capsys, tmp_path, shards, override, key):
    line = _train(capsys, tmp_path, shards, "train.epochs=1", override)
    assert line.startswith(f"error: override '{override}': {key}: must be")


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_shard_found_by_a_loader_worker_is_one_line(capsys, tmp_path, shards, damage):
    """Damage the preflight's size check cannot see: the stream names the shard from inside a worker."""
    from bcc.manifest import Manifest

    shard = Manifest.load(shards).split("train").shards[0]
    bad = Path(shard.path)
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[:shard.count * 2048 + 4096]  # above the preflight's lower bound, short of the whole
        assert len(data) < bad.stat().st_size
        _forget_shard_sizes(shards)  # as a pack of format <= 4 (or a server that gives no size): read finds it
    else:
        data[len(data) // 2:len(data) // 2 + 2048] = b"\xff" * 2048  # a header block or image bytes garbled
    bad.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "cfg.yaml", shards, tmp_path / "run")
    line = _one_error(capsys, ["train", "--config", cfg, "data.workers=2", "train.epochs=1"])
    assert bad.name in line and ("cannot read shard" in line or "cannot decode sample" in line
                                 or "holds" in line), line


def _forget_shard_sizes(shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            entry.pop("bytes", None)
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_too_few_images_for_one_batch(capsys, tmp_path, shards):
    line = _train(capsys, tmp_path, shards, "data.batch_size=1000")
    assert "cannot fill one batch of 1000" in line and "data.batch_size" in line


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch

    from bcc import checkpoint as ck

    manager = ck.CheckpointManager(tmp_path / "checkpoints", keep_last=2, keep_top_k=1, metric="bacc", mode="max")

    def ckpt(step):
        return ck.Checkpoint(model={"w": torch.ones(3) * step}, optimizer={}, scaler=None, rng=[],
                             state=ck.TrainState(step=step), meta={})

    manager.save(ckpt(1), 0.5)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    second = ckpt(2)
    with pytest.raises(ck.CheckpointError) as info:
        manager.save(second, 0.9)
    msg = str(info.value)
    assert "cannot write checkpoint step-00000002" in msg and "No space left on device" in msg
    assert "MiB free" in msg and "the previous checkpoint" in msg and "step-00000001 is intact" in msg
    assert "\n" not in msg
    assert second.state.best_step is None and second.state.top_k == []  # the unwritten one is not the best
    assert ck.find_latest(tmp_path / "checkpoints").name == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-00000001"]
    assert ck.load_checkpoint(tmp_path / "checkpoints" / "step-00000001").model["w"].tolist() == [1, 1, 1]


def test_symlink_loops_in_a_pack_source_are_skipped_with_their_reason(tmp_path, make_class_tree, capsys):
    from bcc.pack import pack_folders

    src = make_class_tree(tmp_path / "src", {"Benign": 3}, size=16)
    os.symlink("loop-b", src / "Benign" / "loop-a")
    os.symlink("loop-a", src / "Benign" / "loop-b")
    os.symlink("self", src / "Benign" / "self")
    os.symlink("top-b", src / "top-a")
    os.symlink("top-a", src / "top-b")
    result = pack_folders(src, tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in result.manifest["skipped"]}
    assert reasons == {"Benign/loop-a": "symlink loop: -> loop-b", "Benign/loop-b": "symlink loop: -> loop-a",
                       "Benign/self": "symlink loop: -> self", "top-a": "symlink loop: -> top-b",
                       "top-b": "symlink loop: -> top-a"}
    assert result.counts["packed"] == 3
    # --strict refuses them like any other skipped file (its error lists the files, one per line)
    assert main(["pack", "--strict", str(src), str(tmp_path / "strict")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: 5 file(s) would be skipped (--strict)") and "Traceback" not in err
    assert "top-a: symlink loop: -> top-b" in err and not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------- item 8: blame


def test_a_bad_value_is_blamed_on_the_override_that_set_it():
    from bcc.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.mixed_precision=fp8", "train.epochs=1"])
    assert str(info.value).startswith("override 'train.mixed_precision=fp8': train.mixed_precision: 'fp8'")


def test_an_unknown_key_in_a_file_is_blamed_on_the_file(tmp_path):
    from bcc.config import ConfigError, load_config

    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 2\ndata:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=0.1", "train.epochs=1"])
    assert str(info.value).startswith(f"{path}: unknown config key 'data.batchsize'; did you mean 'batch_size'?")
    path.write_text("train:\n  lr: -1\n")  # a value rule, set by the file, fixed by no override
    with pytest.raises(ConfigError, match=rf"^{path}: train.lr: must be > 0, got -1"):
        load_config(path, ["train.epochs=1"])
    assert load_config(path, ["train.lr=0.1"]).train.lr == 0.1  # an override that fixes the file wins


@pytest.mark.parametrize("prog", ["bcc", "python -m bcc.train"])
def test_overrides_on_both_sides_of_config_are_all_read_in_order(tmp_path, bcc_main, capsys, prog):
    """`bcc train a=1 --config F b=2`: argparse leaves `b=2` over; it is an override like the others
    (before: "unrecognized arguments: train.epochs=1", a valid key blamed), and the last one wins."""
    from bcc.cli.train import main as train_main

    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 2\n")
    argv = ["train.lr=0.5", "--config", str(path), "train.epochs=1", "nosuch.key=3"]
    if prog == "bcc":
        proc = bcc_main("train", *argv)
        rc, err = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        rc, err = train_main(argv), capsys.readouterr().err
    assert rc == 2 and err.startswith("error: override 'nosuch.key=3': unknown config key 'nosuch'"), err


def test_fp16_on_a_cpu_is_refused_at_set_up(synth_shards, tmp_path):
    """The real entry point: without this check Accelerate silently trains fp16 runs in fp32 on a CPU."""
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "BCC_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg), "train.mixed_precision=fp16"],
                          capture_output=True, text=True, timeout=300, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: train.mixed_precision=fp16 needs a CUDA GPU"), lines


# --------------------------------------------------------------------------- item 9: default packs


def test_a_default_pack_feeds_8_ranks_x_2_workers(tmp_path, make_class_tree):
    """`bcc demo --processes 8`-like: a small set packed with defaults builds every rank's train loader."""
    from bcc.config import load_config
    from bcc.manifest import Manifest
    from bcc.pack import pack_folders
    from bcc.stream import train_loader

    src = make_class_tree(tmp_path / "src", {"Benign": 40, "Pre-B": 40, "Pro-B": 40, "early Pre-B": 40}, size=16)
    pack_folders(src, tmp_path / "packed")
    manifest = Manifest.load(tmp_path / "packed")
    assert len(manifest.split("train").shards) >= 16
    cfg = load_config(None, [f"data.shards={tmp_path / 'packed'}", "data.batch_size=4", "data.workers=2",
                             "data.image_size=16"])
    for rank in range(8):
        loader = train_loader(manifest, cfg.data, seed=0, epoch=0, rank=rank, world_size=8)
        assert len(loader) == 128 // (8 * 4)
    keys = [k for batch in loader for k in batch["key"]]  # the last rank, through its 2 loader workers
    assert len(keys) == len(set(keys)) == 16


def test_tiny_eval_splits_are_warned_about_at_pack_time(tmp_path, make_class_tree):
    from bcc.pack import pack_folders

    src = make_class_tree(tmp_path / "src", {"Benign": 10, "Pre-B": 10, "Pro-B": 10, "early Pre-B": 10}, size=16)
    warnings_ = pack_folders(src, tmp_path / "packed").manifest["warnings"]
    assert "split 'val' has only 4 sample(s) (fewer than 5 per class): its metrics will be noisy" in warnings_
    assert "split 'test' has only 4 sample(s) (fewer than 5 per class): its metrics will be noisy" in warnings_
