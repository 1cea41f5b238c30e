"""An epoch is one pass (issue 11.1) and a mid-epoch resume with another `data.workers` is exact (11.3).

Over a grid of world sizes, loader workers, shuffle buffers and shard layouts (sizes that divide
world x batch and sizes that do not, one shard, many one-sample shards, empty shards), the keys of an
epoch collected over all ranks and workers must hold no key twice, leave out exactly
`dropped_per_epoch` (< world_size x batch_size) samples, a different set each epoch, and give every rank
the same number of full batches. Ranks and loader workers are simulated in one process for the grid
(a worker's share is chosen by `bcc.stream._worker`, and the DataLoader's strict in-order round robin is
replayed); real DataLoader workers are checked against the simulation, and one real 2-process
`accelerate launch` run collects its keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from test_stream import data_cfg, write_pack

from bcc import stream
from bcc.manifest import Manifest
from bcc.stream import TrainLoader, batches_per_epoch, dropped_per_epoch, iter_keys, train_loader

BATCH = 4
LAYOUTS = {
    "uneven": [30, 3, 3, 40],  # 76
    "one-shard": [45],
    "one-sample-shards": [1] * 37,
    "empty-shards": [0, 20, 0, 13],  # 33
    "divides": [24, 24],  # 48 = 1, 2, 3, 4 ranks x 4 x whole batches: nothing dropped
}
WORKERS = (0, 1, 2, 3)
BUFFERS = (0, 5, 1000)  # none, small, larger than the data


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Manifest]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: write_pack(root / name, {"train": counts}) for name, counts in LAYOUTS.items()}


@pytest.fixture
def keys_only(monkeypatch):
    """Batches of keys, undecoded: the grid checks which samples go where, not the pixels."""
    monkeypatch.setattr(stream, "_collate", lambda raw, *_: {"key": [s["__key__"] for s in raw]})


def simulate(manifest, cfg, *, seed=0, epoch, rank, world_size, skip=0) -> list[list[str]]:
    """One rank's batches (key lists) as `cfg.workers` DataLoader workers would deliver them."""
    loader = TrainLoader(manifest, replace(cfg, workers=0), seed=seed, rank=rank, world_size=world_size)
    dataset = loader._batches.dataset
    dataset.epoch_state[0], dataset.epoch_state[1] = epoch, skip
    n = max(cfg.workers, 1)
    made = []
    for worker in range(n):
        with patch.object(stream, "_worker", return_value=(worker, n)):
            made.append(iter([b["key"] for b in dataset]))
    out, alive, turn = [], [True] * n, 0
    while any(alive):  # in-order round robin; a worker leaves the cycle at its StopIteration
        worker, turn = turn % n, turn + 1
        if alive[worker]:
            batch = next(made[worker], None)
            if batch is None:
                alive[worker] = False
            else:
                out.append(batch)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_an_epoch_is_one_pass(packs, keys_only, layout, world_size):
    manifest, total = packs[layout], sum(LAYOUTS[layout])
    everything = {f"train-{i:08d}" for i in range(total)}
    batches = batches_per_epoch(total, BATCH, world_size)
    dropped = dropped_per_epoch(total, BATCH, world_size)
    assert dropped < world_size * BATCH
    for buffer in BUFFERS:
        dropped_sets = []
        for epoch in (0, 1):
            by_workers = {}
            for workers in WORKERS:
                cfg = data_cfg(batch_size=BATCH, workers=workers, shuffle_buffer=buffer)
                ranks = [simulate(manifest, cfg, epoch=epoch, rank=r, world_size=world_size) for r in range(world_size)]
                assert [len(r) for r in ranks] == [batches] * world_size  # the same count on every rank
                assert all(len(b) == BATCH for r in ranks for b in r)
                keys = [k for r in ranks for b in r for k in b]
                assert len(keys) == len(set(keys)), f"a sample twice in epoch {epoch}"
                left_out = everything - set(keys)
                assert len(left_out) == dropped and set(keys) <= everything
                by_workers[workers] = ranks
            # the batch sequence of every rank is the same whatever the number of workers (exact resume)
            assert all(ranks == by_workers[0] for ranks in by_workers.values())
            dropped_sets.append(frozenset(left_out))
        if dropped:
            assert len(set(dropped_sets)) > 1, "the same samples are dropped every epoch"


def test_dropped_samples_are_spread_over_the_data(packs, keys_only):
    # each sample is dropped about equally often over epochs, not always the tail of one shard
    manifest = packs["uneven"]  # 76 samples, 3 ranks x 4: 4 dropped per epoch
    cfg = data_cfg(batch_size=BATCH, workers=0, shuffle_buffer=5)
    counts: dict[str, int] = {}
    for epoch in range(30):
        keys = {k for r in range(3) for b in simulate(manifest, cfg, epoch=epoch, rank=r, world_size=3) for k in b}
        for k in {f"train-{i:08d}" for i in range(76)} - keys:
            counts[k] = counts.get(k, 0) + 1
    assert sum(counts.values()) == 30 * 4
    assert len(counts) > 76 // 2 and max(counts.values()) <= 8  # uniform: ~61 distinct, rarely more than 5


@pytest.mark.parametrize("workers", [1, 3])
def test_real_workers_deliver_the_simulated_batches(packs, workers):
    manifest = packs["uneven"]
    cfg = data_cfg(batch_size=BATCH, workers=workers, shuffle_buffer=5)
    with patch.object(stream, "_collate", lambda raw, *_: {"key": [s["__key__"] for s in raw]}):
        expected = [simulate(manifest, cfg, epoch=2, rank=r, world_size=2) for r in range(2)]
    for rank in range(2):
        got = [b["key"] for b in train_loader(manifest, cfg, seed=0, epoch=2, rank=rank, world_size=2)]
        assert got == expected[rank]


@pytest.mark.parametrize(("before", "after"), [(0, 3), (2, 1), (3, 2), (1, 4), (2, 0)])
def test_resume_with_other_workers_continues_exactly(packs, keys_only, before, after):
    for layout, world_size in [("uneven", 2), ("one-shard", 3), ("one-sample-shards", 1)]:
        manifest = packs[layout]
        for buffer in (0, 1000):
            first = data_cfg(batch_size=BATCH, workers=before, shuffle_buffer=buffer)
            second = replace(first, workers=after)
            for rank in range(world_size):
                full = simulate(manifest, first, epoch=1, rank=rank, world_size=world_size)
                for k in sorted({1, 2, 5, len(full) - 1, len(full)}):
                    rest = simulate(manifest, second, epoch=1, rank=rank, world_size=world_size, skip=k)
                    assert rest == full[k:], (layout, rank, k)


def test_real_resume_with_other_workers_is_bitwise_exact(packs):
    manifest = packs["uneven"]
    full = list(train_loader(manifest, data_cfg(workers=2), seed=4, epoch=1, rank=0, world_size=2))
    for k, workers in [(3, 3), (4, 0), (1, 1)]:
        rest = list(train_loader(manifest, data_cfg(workers=workers), seed=4, epoch=1, rank=0, world_size=2,
                                 skip_batches=k))
        assert len(rest) == len(full) - k
        for a, b in zip(full[k:], rest, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


# the trainer resumed mid-epoch with another number of workers, bitwise equal to the uninterrupted run, through
# the real entry point: tests/test_resume.py::test_sigkill_then_auto_resume_is_bitwise_exact (2 -> 3 workers)


# --------------------------------------------------------------------------- real 2-process run


def _ddp_main(argv: list[str]) -> None:
    """Run under `accelerate launch`: each rank writes the keys of two epochs from persistent workers,
    and (argv[2:], `PACK=WEIGHT` each) of one epoch of those weighted sources (data.sources), as
    `PACK_NAME/key` (keys repeat across packs; images left undecoded)."""
    from accelerate import Accelerator

    from bcc.config import SourceConfig
    from bcc.sources import load_data

    state = Accelerator()  # as the trainer makes it: rank and world size come from the launcher
    manifest, out = Manifest.load(argv[0]), Path(argv[1])
    cfg = data_cfg(batch_size=BATCH, workers=2, shuffle_buffer=5)
    with TrainLoader(manifest, cfg, seed=0, rank=state.process_index, world_size=state.num_processes) as loader:
        epochs = {str(e): iter_keys(loader.epoch(e)) for e in (0, 1)}
    if argv[2:]:
        cfg = replace(cfg, sources=tuple(SourceConfig(p, float(w)) for p, w in (a.rsplit("=", 1) for a in argv[2:])))
        stream._collate = lambda raw, *_: {"key": [f"{Path(s['__url__']).parent.name}/{s['__key__']}" for s in raw]}
        with TrainLoader(load_data(cfg), cfg, seed=0, rank=state.process_index,
                         world_size=state.num_processes) as loader:
            epochs["sources"] = iter_keys(loader.epoch(1))
    (out / f"rank{state.process_index}.json").write_text(json.dumps(epochs))


def test_two_process_accelerate_epoch_is_one_pass(packs, tmp_path):
    """Also data.sources (issue 12.2): source b of weight 3 passes three times in a real 2-process epoch."""
    from bcc.launch import accelerate_command

    tests = Path(__file__).parent
    manifest = packs["uneven"]
    a, b = write_pack(tmp_path / "a", {"train": [30, 3, 3, 40]}), write_pack(tmp_path / "b", {"train": [5, 0, 12]})
    cmd, env = accelerate_command(2, [str(manifest.root), str(tmp_path), f"{a.root}=1", f"{b.root}=3"],
                                  module="test_epoch_pass")
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sets = []
    for epoch in ("0", "1"):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == batches_per_epoch(76, BATCH, 2) * BATCH
        keys = ranks[0][epoch] + ranks[1][epoch]
        assert len(keys) == len(set(keys)) == 76 - dropped_per_epoch(76, BATCH, 2)
        sets.append(set(keys))
    assert sets[0] != sets[1]  # 4 of 76 dropped, a different 4 each epoch
    total, per_rank = 76 + 3 * 17, batches_per_epoch(76 + 3 * 17, BATCH, 2) * BATCH
    assert len(ranks[0]["sources"]) == len(ranks[1]["sources"]) == per_rank
    seen = Counter(ranks[0]["sources"] + ranks[1]["sources"])
    assert max(n for k, n in seen.items() if k.startswith("a/")) == 1 and max(seen.values()) == 3
    assert {k.split("/")[0] for k in seen} == {"a", "b"} and total - seen.total() < 2 * BATCH


if __name__ == "__main__":
    _ddp_main(sys.argv[1:])
