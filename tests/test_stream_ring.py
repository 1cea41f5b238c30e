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
