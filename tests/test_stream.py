"""Stream: exact batch counts per rank, eval exactly once, per-epoch plan, determinism, errors.

The one-pass epoch over a grid of world sizes, workers and buffers is in test_epoch_pass.py.

Ranks are simulated in one process by passing rank/world_size. Shards are written directly with
webdataset's TarWriter so that layouts can be deliberately uneven.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from bcc.config import DataConfig
from bcc.errors import BccError
from bcc.manifest import Manifest
from bcc.shards import read_range, read_shard, sample_offset
from bcc.stream import (
    EpochPlan,
    ShardError,
    StreamError,
    TrainLoader,
    batches_per_epoch,
    dropped_per_epoch,
    eval_loader,
    iter_keys,
    train_loader,
)
from bcc.taxonomy import Taxonomy

UNEVEN = [30, 3, 3, 40]  # 76 samples


def write_pack(root: Path, layout: dict[str, list[int]]) -> Manifest:
    """Shards of 32 px PNG noise with the given sample count per shard, plus manifest.json."""
    taxonomy = Taxonomy.default()
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, counts in layout.items():
        shards, index = [], 0
        for s, n in enumerate(counts):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for _ in range(n):
                    rng = random.Random(f"{split}/{index}")
                    img = Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3))
                    buf = io.BytesIO()
                    img.save(buf, "PNG")
                    meta = {"label": index % 4, "source": f"{split}/{index}.png"}
                    writer.write(
                        {"__key__": f"{split}-{index:08d}", "png": buf.getvalue(), "json": json.dumps(meta)}
                    )
                    index += 1
            shards.append({"path": name, "count": n, "sha256": ""})
        splits[split] = {"count": index, "class_counts": {}, "shards": shards}
    manifest = {
        "format": "bcc-shards/1",
        "taxonomy": taxonomy.to_dict(),
        "classes": list(taxonomy.class_names),
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Manifest.load(root)


def data_cfg(**kw) -> DataConfig:
    base = dict(image_size=16, batch_size=4, eval_batch_size=3, workers=0, shuffle_buffer=8)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Manifest:
    return write_pack(tmp_path_factory.mktemp("pack"), {"train": UNEVEN, "val": [5, 2], "test": [7]})


def test_batches_per_epoch():
    assert batches_per_epoch(76, 4, 1) == 19
    assert batches_per_epoch(76, 4, 2) == 9
    with pytest.raises(StreamError, match="lower data.batch_size"):
        batches_per_epoch(7, 4, 2)
    assert dropped_per_epoch(76, 4, 2) == 4 and dropped_per_epoch(76, 4, 1) == 0
    assert all(dropped_per_epoch(n, 4, 3) < 3 * 4 for n in range(12, 100))
    assert issubclass(StreamError, BccError) and issubclass(ShardError, BccError)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_rank_yields_exactly_the_planned_batches(pack, world_size, workers):
    cfg = data_cfg(workers=workers)
    expected = batches_per_epoch(76, cfg.batch_size, world_size)
    for rank in range(world_size):
        loader = train_loader(pack, cfg, seed=0, epoch=1, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        for b in batches:
            assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.uint8  # crops; float on the device
            assert b["label"].dtype == torch.long and len(b["key"]) == len(b["source"]) == 4
            assert all(
                int(k.split("-")[1]) % 4 == label
                for k, label in zip(b["key"], b["label"].tolist(), strict=True)
            )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("counts", [[4, 5, 3, 2], [6], [1, 1]])
def test_eval_sees_every_sample_exactly_once(tmp_path, counts, workers):
    manifest = write_pack(tmp_path, {"train": [4], "val": counts})
    everything = sorted(f"val-{i:08d}" for i in range(sum(counts)))
    cfg = data_cfg(workers=workers)
    for world_size in (1, 2, 3):
        per_rank = []
        for rank in range(world_size):
            loader = eval_loader(manifest, "val", cfg, rank=rank, world_size=world_size)
            batches = list(loader)
            assert len(loader) == len(batches)
            assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
            keys = iter_keys(batches)
            assert keys == iter_keys(eval_loader(manifest, "val", cfg, rank=rank, world_size=world_size))
            per_rank.append(keys)
        union = [k for keys in per_rank for k in keys]
        assert sorted(union) == everything, (world_size, per_rank)


def test_eval_images_do_not_depend_on_workers(pack):
    a = list(eval_loader(pack, "test", data_cfg(workers=0), rank=0, world_size=1))
    b = list(eval_loader(pack, "test", data_cfg(workers=2), rank=0, world_size=1))
    by_key_a = {k: img for batch in a for k, img in zip(batch["key"], batch["image"], strict=True)}
    by_key_b = {k: img for batch in b for k, img in zip(batch["key"], batch["image"], strict=True)}
    assert by_key_a.keys() == by_key_b.keys()
    assert all(torch.equal(by_key_a[k], by_key_b[k]) for k in by_key_a)


def test_plan_shard_order_changes_with_epoch_and_seed(tmp_path):
    counts = [2] * 12

    def order(seed, epoch):
        return EpochPlan(counts, seed=seed, epoch=epoch, world_size=2, batch_size=2).order

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(5, 3)) == list(range(12))


def test_plan_cuts_ranks_inside_shards_whatever_the_layout():
    # uneven shards used to be dealt whole, which left one rank with {30, 3, 3} and another with {40};
    # now every rank gets exactly batches x batch_size samples, cut inside shards where needed
    for counts in (UNEVEN, [76], [0, 50, 0, 26], [1] * 76):
        for world in (1, 2, 3, 4):
            plan = EpochPlan(counts, seed=0, epoch=1, world_size=world, batch_size=4)
            for rank in range(world):
                for lane in range(plan.lanes):
                    segs = plan.segments(rank, lane)
                    n = sum(s.hi - s.lo - len(s.drop) for s in segs)
                    assert n == plan.lane_batches(lane) * 4
                    assert all(0 <= s.lo < s.hi <= counts[s.shard] for s in segs)
            assert len(plan.dropped) == dropped_per_epoch(76, 4, world)


def test_plan_cost_grows_with_shards_not_with_parts():
    from bcc.stream import time_plan

    small = time_plan(2_000, 64, repeat=1)
    big = time_plan(2_000, 1024, repeat=1)
    assert small["parts"] == 64 and big["parts"] == 1024
    assert big["rank_s"] < 0.5  # one rank's plan, whatever the number of parts (0.9 s before at 10k x 1024)


def test_rank_streams_change_with_epoch(pack):
    cfg = data_cfg()
    first = {e: iter_keys(train_loader(pack, cfg, seed=0, epoch=e, rank=0, world_size=2)) for e in range(3)}
    assert len({tuple(k) for k in first.values()}) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_same_arguments_give_bitwise_equal_batches(pack, workers):
    cfg = data_cfg(workers=workers)
    before = torch.get_rng_state()
    runs = [list(train_loader(pack, cfg, seed=3, epoch=2, rank=1, world_size=2)) for _ in range(2)]
    # the trainer's global RNG is neither used nor shifted, even when batches are made in-process
    assert torch.equal(before, torch.get_rng_state())
    for a, b in zip(*runs, strict=True):
        assert a["key"] == b["key"] and a["source"] == b["source"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other = list(train_loader(pack, cfg, seed=4, epoch=2, rank=1, world_size=2))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(runs[0], other, strict=True))


def stream_digest(root: Path, workers: int) -> str:
    manifest = Manifest.load(root)
    digest = hashlib.sha256()
    for b in train_loader(manifest, data_cfg(workers=workers), seed=7, epoch=1, rank=1, world_size=2):
        digest.update(b["image"].numpy().tobytes())
        digest.update(" ".join(b["key"]).encode())
    return digest.hexdigest()


def test_stream_is_identical_in_another_process(pack):
    root = pack.split("train").shards[0].path.parent
    code = (
        "import sys; from pathlib import Path; from test_stream import stream_digest; "
        "print(stream_digest(Path(sys.argv[1]), 2))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # nothing may depend on Python's salted hash()
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == stream_digest(root, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_is_the_tail_of_the_full_stream(pack, workers):
    cfg = data_cfg(workers=workers)
    full = list(train_loader(pack, cfg, seed=0, epoch=0, rank=0, world_size=1))
    for k in (1, 3, len(full)):
        loader = train_loader(pack, cfg, seed=0, epoch=0, rank=0, world_size=1, skip_batches=k)
        tail = list(loader)
        assert len(loader) == len(tail) == len(full) - k
        for a, b in zip(full[k:], tail, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    with pytest.raises(StreamError, match="skip_batches"):
        train_loader(pack, cfg, seed=0, epoch=0, rank=0, world_size=1, skip_batches=len(full) + 1)


def test_one_shard_feeds_many_ranks_and_workers(tmp_path):
    # this used to be refused ("at least 4 shards are needed"): the plan now cuts sample ranges, so any
    # number of shards feeds any number of ranks x workers (a small pack has a single train shard)
    manifest = write_pack(tmp_path, {"train": [40]})
    keys = [k for rank in range(3) for k in iter_keys(
        train_loader(manifest, data_cfg(workers=3), seed=0, epoch=0, rank=rank, world_size=3))]
    assert len(keys) == len(set(keys)) == 3 * 3 * 4


def test_missing_shard_is_named(tmp_path):
    manifest = write_pack(tmp_path, {"train": [8, 8], "val": [3, 3]})
    (tmp_path / "train-000001.tar").unlink()
    (tmp_path / "val-000000.tar").unlink()
    # the loaders stat nothing (no per-epoch stat of every shard on every rank): a missing shard is named
    # when it is opened, as one line, also from a worker; bcc.train.preflight.check_shards is the start-up check
    for workers in (0, 2):
        with pytest.raises(ShardError, match=r"^cannot read shard .*train-000001.tar") as e:
            list(train_loader(manifest, data_cfg(workers=workers), seed=0, epoch=0, rank=0, world_size=1))
        assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ShardError, match="val-000000.tar"):
            list(eval_loader(manifest, "val", data_cfg(workers=workers), rank=0, world_size=1))


def _live_children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_or_short_shard_is_named(tmp_path, workers):
    before = _live_children()  # e.g. multiprocessing's resource tracker from other tests stays
    manifest = write_pack(tmp_path, {"train": [8, 8], "val": [4]})
    broken = tmp_path / "train-000001.tar"
    broken.write_bytes(broken.read_bytes()[:5000])  # truncated in the middle of a member
    with pytest.raises(Exception, match="train-000001.tar"):
        list(train_loader(manifest, data_cfg(workers=workers), seed=0, epoch=0, rank=0, world_size=1))
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["splits"]["val"]["shards"][0]["count"] = 5
    data["splits"]["val"]["count"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"val-000000.tar holds 4 samples but the manifest says 5"):
        list(eval_loader(Manifest.load(tmp_path), "val", data_cfg(workers=workers), rank=0, world_size=1))
    # the failed loaders' workers are gone now, not whenever the traceback is collected (a stray worker
    # that outlives its parent's exit would hang the process: it ignores preemption signals)
    assert _live_children() <= before


def test_workers_outlive_sigterm_only_for_a_grace_period(monkeypatch):
    import signal

    from bcc import remote, stream

    monkeypatch.setattr(remote, "_STOPPING", [None])  # the termination request stays in this test
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stream._worker_signals(0)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        stream._defer_term(signal.SIGTERM, None)
        assert 0 < signal.alarm(0) <= stream.WORKER_TERM_GRACE_S  # an alarm was set, and is cancelled here
        assert remote.is_stopping()  # and a stalled remote read ends now, without retries
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_persistent_workers_serve_every_epoch_like_fresh_loaders(pack):
    cfg = data_cfg(workers=2)
    before = _live_children()
    with TrainLoader(pack, cfg, seed=1, rank=1, world_size=2) as loader:
        pids = []
        for epoch, skip in [(0, 0), (1, 3), (2, 0)]:
            batches = loader.epoch(epoch, skip_batches=skip)
            got = list(batches)
            assert len(got) == len(batches) == loader.batches_per_epoch - skip
            fresh = list(train_loader(pack, cfg, seed=1, epoch=epoch, rank=1, world_size=2, skip_batches=skip))
            for a, b in zip(got, fresh, strict=True):
                assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
            pids.append(_live_children() - before)
        assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]  # the same two workers all along
        # an epoch abandoned half-way (preemption) ends the workers; the next epoch starts new ones
        it = iter(loader.epoch(3))
        next(it)
        it.close()
        assert not (_live_children() - before)
        assert iter_keys(loader.epoch(3)) == iter_keys(train_loader(pack, cfg, seed=1, epoch=3, rank=1, world_size=2))
    assert _live_children() <= before


def test_split_count_must_match_its_shards(tmp_path):
    write_pack(tmp_path, {"train": [8, 8]})
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["splits"]["train"]["count"] = 17
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="hold 16 samples .* count is 17"):
        train_loader(Manifest.load(tmp_path), data_cfg(), seed=0, epoch=0, rank=0, world_size=1)


def test_a_range_read_seeks_past_its_start_and_matches_a_full_read(tmp_path):

    manifest = write_pack(tmp_path, {"train": [30]})
    shard = manifest.split("train").shards[0]
    full = [s["__key__"] for s in read_shard(shard)]
    assert full == [f"train-{i:08d}" for i in range(30)]
    for lo, hi, drop in [(1, 30, set()), (7, 12, {8}), (29, 30, set()), (0, 30, {0, 29}), (12, 13, set())]:
        got = list(read_range(shard, lo, hi, frozenset(drop)))
        assert [s["__key__"] for s in got] == [k for i, k in enumerate(full) if lo <= i < hi and i not in drop]
        assert all(set(s) >= {"png", "json", "__key__", "__url__"} for s in got)
    # a shard shorter than the manifest says: named, whether the range starts before or after its end
    broken = tmp_path / "train-000000.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    for lo, hi in [(0, 30), (5, 30), (25, 30)]:
        with pytest.raises(ShardError, match="train-000000.tar"):
            list(read_range(shard, lo, hi))


def test_a_range_read_of_a_bcc_pack_shard_matches_a_full_read(synth_shards):

    shard = Manifest.load(synth_shards).split("train").shards[1]
    full = [(s["__key__"], s["json"]) for s in read_shard(shard)]
    for lo in (1, shard.count // 2, shard.count - 1):
        got = [(s["__key__"], s["json"]) for s in read_range(shard, lo, shard.count)]
        assert got == full[lo:]
    assert sample_offset(str(shard.path), shard.count) == (None, shard.count)


@pytest.mark.parametrize("layout", ["gnu-long-names", "pax", "pax-global"])
def test_own_tar_reader_reads_what_webdataset_reads(tmp_path, layout):
    """bcc's header parser (local shards) against webdataset's tarfile reader: long names, pax records,
    a global pax header (handed to tarfile from there); a bad header checksum is named."""
    import tarfile

    from bcc.shards import _tar_samples

    path = tmp_path / "x.tar"
    fmt = tarfile.GNU_FORMAT if layout == "gnu-long-names" else tarfile.PAX_FORMAT
    headers = {"comment": "global"} if layout == "pax-global" else {}
    with tarfile.open(path, "w", format=fmt, pax_headers=headers) as tar:
        for i, name in enumerate(["a", "d" * 120 + "/b", "__meta__", "c"]):
            for ext, data in (("png", bytes([i]) * (700 + i)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                if layout == "pax":
                    info.pax_headers = {"comment": "é" * 3}
                tar.addfile(info, io.BytesIO(data))
    expected = list(wds.tariterators.tarfile_samples([{"url": str(path)}], handler=wds.reraise_exception))
    assert [s["__key__"] for s in expected] == ["a", "d" * 120 + "/b", "__meta__", "c"]
    with open(path, "rb") as f:
        assert list(_tar_samples(f, str(path))) == expected
    raw = bytearray(path.read_bytes())
    raw[0] ^= 1  # the first header's checksum no longer matches
    path.write_bytes(bytes(raw))
    with open(path, "rb") as f, pytest.raises(tarfile.ReadError, match="checksum"):
        list(_tar_samples(f, str(path)))


def test_a_worker_count_that_does_not_divide_the_lanes_is_noted():
    """data.workers=9 started 9 workers that share the 8 lanes, each reading the bytes of the lanes it
    shares, with no word of it (fourth breaker); the trainer prints this note at start-up."""
    from bcc.stream import workers_note

    assert all(workers_note(w) is None for w in (0, 1, 2, 4, 8))
    assert "data.workers=9 does not divide the 8 lanes" in workers_note(9) and ", 9x the split's bytes" in workers_note(9)
    assert ", 3x the split's bytes" in workers_note(6)
