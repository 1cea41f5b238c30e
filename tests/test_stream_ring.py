"""Batches through the shared-memory ring (bcc.stream_ring) are bitwise those made in the main process.

Loader workers hand their uint8 images over in slots allocated once; the main process copies them out.
Over a grid of worker counts and batch sizes (batches that fill the ring many times over, short eval
batches, a persistent loader over two epochs and a resume), every tensor must equal the workers=0 one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_stream import data_cfg, write_pack

from bcc import stream_ring
from bcc.stream import PREFETCH, TrainLoader, eval_loader
from bcc.stream_ring import BatchRing


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return write_pack(tmp_path_factory.mktemp("ring"), {"train": [30, 3, 3, 40], "val": [7, 6]})


def batches(manifest, cfg, *, epoch=0, skip=0, loader=None) -> list[dict]:
    own = loader is None
    loader = loader or TrainLoader(manifest, cfg, seed=3, rank=0, world_size=1)
    try:
        return list(loader.epoch(epoch, skip))
    finally:
        if own:
            loader.close()


def assert_same(got: list[dict], want: list[dict], ring: bool = True) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["image"].dtype == torch.uint8 and g["image"].is_shared() != ring  # from the ring: an owned copy
        assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"])
        assert g["key"] == w["key"] and g["augment_seed"] == w["augment_seed"] and "_slot" not in g


@pytest.mark.parametrize("batch_size", [3, 4])
@pytest.mark.parametrize("workers", [1, 3])
def test_ring_batches_equal_in_process_batches(pack, workers, batch_size):
    ref = data_cfg(batch_size=batch_size, eval_batch_size=batch_size, workers=0)
    cfg = data_cfg(batch_size=batch_size, eval_batch_size=batch_size, workers=workers)
    with TrainLoader(pack, cfg, seed=3, rank=0, world_size=1) as loader:
        assert loader._batches.ring is not None
        assert len(loader._batches) > workers * (PREFETCH + 1)  # every slot is reused
        for epoch, skip in ((0, 0), (1, 0), (1, 5)):  # persistent workers, then a fresh resume
            assert_same(batches(pack, cfg, epoch=epoch, skip=skip, loader=loader),
                        batches(pack, ref, epoch=epoch, skip=skip))
    # evaluation: workers take contiguous runs of batches, so the order differs; each sample must not
    got, want = (by_key(eval_loader(pack, "val", c, rank=0, world_size=1)) for c in (cfg, ref))
    assert got.keys() == want.keys() and len(got) == 13  # 13 = a short batch for both sizes
    assert all(torch.equal(got[k][0], want[k][0]) and got[k][1] == want[k][1] for k in got)


def by_key(loader) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (b["image"][i], int(b["label"][i])) for b in loader for i, k in enumerate(b["key"])}


def test_a_pass_stopped_early_leaves_no_slot_taken(pack):
    cfg = data_cfg(workers=2)
    with TrainLoader(pack, cfg, seed=3, rank=0, world_size=1) as loader:
        for i, _ in enumerate(loader.epoch(0)):
            if i == 3:
                break  # the workers end with slots full; the next pass starts new ones
        assert_same(batches(pack, cfg, loader=loader), batches(pack, data_cfg(workers=0)))
        assert [s.get_value() for s in loader._batches.ring.free] == [PREFETCH + 1] * 2  # all free again


def test_skipped_samples_leave_every_other_crop_with_its_key(pack, monkeypatch):
    # each crop goes into the slot as it is made, so with data.on_corrupt=skip the batch's good crops are
    # packed together there: every image must still come with its own key and label, as in-process
    from bcc import stream_samples

    decode = stream_samples.decode_sample

    def damaged(sample, *args):  # workers are forked: they inherit the patch
        if sample["__key__"].endswith("3"):
            raise stream_samples.CorruptSampleError(f"sample {sample['__key__']}: damaged")
        return decode(sample, *args)

    monkeypatch.setattr(stream_samples, "decode_sample", damaged)
    got, want = (batches(pack, data_cfg(workers=w, on_corrupt="skip")) for w in (2, 0))
    assert_same(got, want)
    assert sum(len(b["corrupt"]) for b in got) >= 5 and any(0 < len(b["key"]) < 4 for b in got)


def test_without_room_in_dev_shm_batches_go_the_dataloader_way(pack, monkeypatch, capsys):
    monkeypatch.setattr(stream_ring.shutil, "disk_usage", lambda _: SimpleNamespace(free=1024))
    monkeypatch.setattr(stream_ring, "_WARNED", set())  # warned once per shape and process
    cfg = data_cfg(workers=1)
    with TrainLoader(pack, cfg, seed=3, rank=0, world_size=1) as loader:
        assert loader._batches.ring is None
        assert_same(batches(pack, cfg, loader=loader), batches(pack, data_cfg(workers=0)), ring=False)
    assert "/dev/shm has 0 MiB free" in capsys.readouterr().err


def test_a_worker_waiting_for_a_slot_ends_when_the_main_process_is_gone(monkeypatch):
    ring = BatchRing(1, (2, 3, 4, 4), slots=1)
    images = [torch.full((3, 4, 4), 7, dtype=torch.uint8)] * 2
    address = ring.put(0, 0, images)
    assert torch.equal(ring.take(address), torch.stack(images))  # taken: the slot is free again
    ring.put(0, 1, images)  # the one slot is full now
    monkeypatch.setattr(stream_ring, "WAIT_S", 0.01)
    monkeypatch.setattr(stream_ring, "_main_alive", lambda: False)  # as if the main process had ended
    with pytest.raises(RuntimeError, match="main process ended"):
        ring.put(0, 2, images)


def _hang_once_in_fork(marker):
    """A worker_init stand-in: the first worker to get here hangs as a child stuck in fork() would
    (python/cpython#112275), every later one marks itself started."""
    import os
    import time

    from bcc import worker_start

    def mark(worker_id):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # only the first worker of all attempts
        except FileExistsError:
            return worker_start.mark_started(worker_id)
        time.sleep(3600)

    return mark


@pytest.mark.timeout(120)  # without the fix it waits for the stuck worker forever
@pytest.mark.parametrize("persistent", [True, False])
def test_a_worker_stuck_in_fork_is_killed_and_the_loader_started_again(pack, tmp_path, monkeypatch, capsys, persistent):
    # the hang of CI's demo: a DataLoader worker that never returns from fork(); the loader must not wait
    # for it forever but kill it and start its workers again, giving the same batches
    from bcc import stream, worker_start

    monkeypatch.setattr(worker_start, "WORKER_START_S", 2.0)
    cfg, ref = data_cfg(workers=2), data_cfg(workers=0)
    want = batches(pack, ref, epoch=1)
    monkeypatch.setattr(stream, "mark_started", _hang_once_in_fork(str(tmp_path / "hung")))
    loader = TrainLoader(pack, cfg, seed=3, rank=0, world_size=1, persistent=persistent)
    try:
        assert_same(batches(pack, cfg, epoch=1, loader=loader), want)
        assert (tmp_path / "hung").exists()
        assert_same(batches(pack, cfg, epoch=1, loader=loader), want)  # later starts: no warning, same
    finally:
        loader.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "did not start" in line]
    assert len(warnings) == 1 and "python/cpython#112275" in warnings[0], warnings
    # a worker that never starts, every time: one clear error after START_ATTEMPTS tries, no hang
    monkeypatch.setattr(stream, "mark_started", lambda worker_id: __import__("time").sleep(3600))
    monkeypatch.setattr(worker_start, "WORKER_START_S", 0.5)
    with pytest.raises(worker_start.WorkerStartError, match="did not start in 3 tries"):
        list(eval_loader(pack, "val", cfg, rank=0, world_size=1))
