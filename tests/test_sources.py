"""Several sources (`data.sources`, issue 12.2) and resampled epochs (`data.sampling=resample`, 12.3).

The promises are proven where they are made: the plans over a grid of world sizes, loader workers and
accumulation windows (ranks and workers simulated in one process as in test_epoch_pass, reading real
tiny shards, images left undecoded), the 1M-image cluster start with fake counts, and two real runs:
2-process DDP training from two weighted sources through `accelerate launch -m bcc.train`, and a
resampled run resumed mid-epoch that ends with bitwise the uninterrupted run's weights.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from test_epoch_pass import simulate
from test_stream import data_cfg, write_pack

from bcc import stream
from bcc.config import ConfigError, SourceConfig, load_config
from bcc.manifest import Manifest
from bcc.plan import LANES, ResamplePlan, StreamError, batches_per_epoch, make_plan
from bcc.sources import SourceError, load_data, shard_weights, weighted_class_counts
from bcc.stream import TrainLoader, train_batches
from bcc.trackers import tracker_values

from conftest import write_config

BATCH = 4
A, B = [30, 3, 3, 40], [5, 0, 12]  # 76 + 17 samples; B has an empty shard


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Manifest:
    """Source a (weight 1) and source b (weight 3) of the same taxonomy, with train, val and test."""
    root = tmp_path_factory.mktemp("sources")
    write_pack(root / "a", {"train": A, "val": [3, 2], "test": [4]})
    write_pack(root / "b", {"train": B, "val": [2], "test": [3]})
    return load_data(data_cfg(sources=(SourceConfig(str(root / "a"), 1), SourceConfig(str(root / "b"), 3))))


@pytest.fixture
def keys_by_source(monkeypatch):
    """Batches of `source/key` (keys repeat across packs), undecoded."""
    monkeypatch.setattr(stream, "_collate", lambda raw, *_: {
        "key": [f"{Path(s['__url__']).parent.name}/{s['__key__']}" for s in raw]})


def cfg_of(manifest, **kw):
    sources = tuple(SourceConfig(str(s.manifest.root), s.weight) for s in manifest.sources)
    return data_cfg(batch_size=BATCH, sources=sources, **kw)


# --------------------------------------------------------------------------- the mixed manifest


def test_mixed_manifest_concatenates_the_sources_and_weights_them(mixed):
    train = mixed.split("train")
    assert train.count == 93 and [s.count for s in train.shards] == A + B
    assert shard_weights(mixed, "train") == [1.0] * 4 + [3.0] * 3
    assert mixed.split("val").count == 7 and mixed.split("test").count == 7
    a, b = (s.manifest.split("train").class_counts for s in mixed.sources)
    counts = weighted_class_counts(mixed, "train")
    assert counts == {c: a.get(c, 0) + 3 * b.get(c, 0) for c in set(a) | set(b)}
    assert [s.name for s in mixed.sources] == ["a", "b"]
    # per-source metrics rows reach the trackers under their source, beside the combined row's names
    assert tracker_values({"split": "val", "source": "a", "bacc": 0.5}) == {"val/a/bacc": 0.5}


def test_sources_that_cannot_mix_are_named(mixed, tmp_path):
    a, b = (str(s.manifest.root) for s in mixed.sources)
    other = write_pack(tmp_path / "kvasir", {"train": [4]})
    data = json.loads(other.path.read_text())
    data["taxonomy"] = yaml.safe_load((Path(__file__).parents[1] / "configs/taxonomy/kvasir.yaml").read_text())
    data["classes"] = data["taxonomy"]["heads"][0]["labels"]
    other.path.write_text(json.dumps(data))
    with pytest.raises(SourceError, match=r"taxonomies of 'a' \(.*\) and 'kvasir' \(.*\) differ"):
        load_data(data_cfg(sources=(SourceConfig(a), SourceConfig(str(other.root)))))
    # the same labels under another taxonomy name mix; another difference is named (not two equal class lists)
    renamed = json.loads(mixed.sources[1].manifest.path.read_text())
    renamed["taxonomy"]["name"] = "renamed"
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "manifest.json").write_text(json.dumps(renamed))
    load_data(data_cfg(sources=(SourceConfig(a), SourceConfig(str(tmp_path / "renamed")))))
    classes = renamed["taxonomy"]["classes"]  # two classes' subtypes swapped: same names, other meaning
    classes[1]["targets"]["subtype"], classes[2]["targets"]["subtype"] = "Pre-B", "early Pre-B"
    (tmp_path / "renamed" / "manifest.json").write_text(json.dumps(renamed))
    with pytest.raises(SourceError, match=r"differ \(class 'early Pre-B': targets \{.*'subtype': 'early Pre-B'\} "
                                          r"vs \{.*'subtype': 'Pre-B'\}\)"):
        load_data(data_cfg(sources=(SourceConfig(a), SourceConfig(str(tmp_path / "renamed")))))
    with pytest.raises(SourceError, match=r"^data.sources\[1\].shards: http://\*\*\*@h/ds holds a credential"):
        load_data(data_cfg(sources=(SourceConfig(a), SourceConfig("http://u:pw12345678@h/ds"))))
    with pytest.raises(SourceError, match="data.fold"):
        load_data(data_cfg(sources=(SourceConfig(a), SourceConfig(b)), fold=1))
    for overrides, message in [
        ([f"data.shards={a}", f"data.sources=[{{shards: {b}}}]"], "data.sources and data.shards .* are exclusive"),
        ([f"data.sources=[{{shards: {a}}}, {{shards: {b}, weight: 2.5}}]"],
         r"data.sources\[1\].weight: 2.5 is not an integer.*data.sampling=resample"),
        ([f"data.sources=[{{shards: {a}, weight: 0}}]"], r"data.sources\[0\].weight: must be > 0"),
        ([f"data.sources=[{{shards: {a}, weight: -1}}]", "data.sampling=resample"], r"weight: must be > 0"),
        ([f"data.sources=[{{shards: {a}, weight: .inf}}]"], r"data.sources\[0\].weight: must be > 0 and at most 1e6, got inf"),
        ([f"data.sources=[{{shards: {a}, weight: .inf}}]", "data.sampling=resample"], r"weight: must be > 0 and at most 1e6, got inf"),
        (["train.lr=.inf"], r"train.lr: must be > 0, got inf"),
        ([f"data.sources=[{{shards: {a}}}, {{shards: {b}, weight: 1e308}}]", "data.sampling=resample"],
         r"data.sources\[1\].weight: must be > 0 and at most 1e6, got 1e\+308"),  # weight x count overflowed
        (["data.sources[1].weight=0"], r"override 'data.sources\[1\].weight=0': one item of a list cannot be set "
                                       r"on its own; give the whole list as YAML, e.g. data.sources='\[\{shards: A\}"),
        ([f"data.sources=[{{shards: {a}}}, {{shards: {a}}}]"], r"data.sources\[1\].name: 'a' also names"),
        (["data.epoch_samples=100"], "data.epoch_samples: sets the epoch length of data.sampling=resample"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    cfg = load_config(None, [f"data.sources=[{{shards: {a}}}, {{shards: {b}, weight: 2.5}}]", "data.sampling=resample"])
    assert cfg.data.sources[1].weight == 2.5


# --------------------------------------------------------------------------- one pass, repeated sources


def rank_batches(plan, rank: int) -> list[list[tuple[int, int]]]:
    """A rank's batches of (shard, index) in batch order, from the plan alone (the stream's lane order:
    batch i is the (i // LANES)-th batch of lane i % LANES; no shuffle buffer)."""
    lanes = []
    for lane in range(plan.lanes):
        samples = [(s.shard, i) for s in plan.segments(rank, lane) for i in range(s.lo, s.hi) if i not in s.drop]
        lanes.append([samples[j:j + plan.batch_size] for j in range(0, len(samples), plan.batch_size)])
    return [lanes[i % plan.lanes][i // plan.lanes] for i in range(plan.batches)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_repeat_factors_pass_each_source_that_many_times(world_size):
    counts, weights = A + B, [1] * 4 + [3] * 3
    total = sum(c * w for c, w in zip(counts, weights, strict=True))  # 76 + 51
    for epoch in range(3):
        plan = make_plan(counts, weights, sampling="without_replacement", epoch_samples=0, seed=1, epoch=epoch,
                         world_size=world_size, batch_size=BATCH)
        ranks = [rank_batches(plan, r) for r in range(world_size)]
        assert all(len(r) == batches_per_epoch(total, BATCH, world_size) for r in ranks)
        assert all(len(b) == BATCH for r in ranks for b in r)
        seen = Counter(x for r in ranks for b in r for x in b)
        assert all(n <= weights[shard] for (shard, _), n in seen.items())  # each sample at most `weight` times
        assert total - seen.total() < world_size * BATCH  # the pass, less fewer than one world batch
        for shard, count in enumerate(counts):  # and every sample of a weight-3 shard is there about 3 times
            assert all(seen[(shard, i)] >= weights[shard] - (total - seen.total()) for i in range(count))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_two_sources_one_pass_over_workers_and_accumulation(mixed, keys_by_source, world_size):
    """The real stream over the grid: every rank the same number of batches and optimizer steps, source b
    passing 3 times, the same batches whatever the number of workers, and a resume at any optimizer
    step (of 1, 2 or 3 accumulated batches) with other workers continuing exactly."""
    everything = {f"a/train-{i:08d}" for i in range(76)} | {f"b/train-{i:08d}" for i in range(17)}
    total = 76 + 3 * 17
    by_workers = {}
    for workers in (0, 1, 2, 3):
        cfg = cfg_of(mixed, workers=workers, shuffle_buffer=5)
        ranks = [simulate(mixed, cfg, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
        assert [len(r) for r in ranks] == [batches_per_epoch(total, BATCH, world_size)] * world_size
        seen = Counter(k for r in ranks for b in r for k in b)
        assert set(seen) <= everything and max(n for k, n in seen.items() if k.startswith("a/")) == 1
        assert max(seen.values()) <= 3 and total - seen.total() < world_size * BATCH
        from_b = sum(n for k, n in seen.items() if k.startswith("b/"))
        assert 3 * 17 - from_b <= total - seen.total()  # source b passes three times, less its drops
        by_workers[workers] = ranks
    assert all(ranks == by_workers[0] for ranks in by_workers.values())
    full = by_workers[0]
    for accum in (1, 2, 3):
        for rank in range(world_size):
            for step in {1, len(full[rank]) // accum}:
                k = step * accum
                rest = simulate(mixed, cfg_of(mixed, workers=(accum + rank) % 4, shuffle_buffer=5), epoch=1,
                                rank=rank, world_size=world_size, skip=k)
                assert rest == full[rank][k:]


# --------------------------------------------------------------------------- resampled epochs


def test_a_million_images_in_800_shards_start_on_128_ranks_by_8_workers():
    counts = [1250] * 800  # 1,000,000 samples; 800 shards < 128 x 8 = 1,024 (rank, worker) pairs
    plan = make_plan(counts, [1.0] * 800, sampling="resample", epoch_samples=sum(counts), seed=0, epoch=3,
                     world_size=128, batch_size=32)
    assert plan.batches == 1_000_000 // (128 * 32)
    for rank in (0, 77, 127):
        for lane in range(LANES):
            segments = plan.segments(rank, lane)
            assert sum(s.hi - s.lo for s in segments) == plan.lane_batches(lane) * 32
            assert all(0 <= s.shard < 800 and 0 <= s.lo < s.hi <= 1250 for s in segments)
    # with fewer shards than ranks x workers, each part reads from one or two draws, not the same shard
    firsts = {plan.segments(r, lane)[0][:2] for r in range(128) for lane in range(LANES)}
    assert len(firsts) > 900
    # the one-pass plan starts there too (its cuts fall inside shards), dropping fewer than a world batch
    one_pass = make_plan(counts, [1] * 800, sampling="without_replacement", epoch_samples=0, seed=0, epoch=3,
                         world_size=128, batch_size=32)
    assert one_pass.batches == plan.batches and len(one_pass.dropped) < 128 * 32


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_resample_plans_the_epoch_length_on_every_rank(world_size):
    counts, weights = [40, 1, 0, 7], [1.0, 1.0, 1.0, 2.5]  # a shard of one sample, an empty one
    for samples in (sum(counts), 1000):
        plan = ResamplePlan(counts, weights=weights, seed=2, epoch=0, world_size=world_size, batch_size=BATCH,
                            epoch_samples=samples)
        ranks = [rank_batches(plan, r) for r in range(world_size)]
        assert [len(r) for r in ranks] == [samples // (world_size * BATCH)] * world_size
        assert all(len(b) == BATCH for r in ranks for b in r)
        drawn = Counter(shard for r in ranks for b in r for shard, _ in b)
        assert drawn[2] == 0 and all(0 <= i < counts[s] for r in ranks for b in r for s, i in b)
    with pytest.raises(StreamError, match="one batch"):
        ResamplePlan(counts, seed=0, epoch=0, world_size=4, batch_size=BATCH, epoch_samples=15)
    with pytest.raises(StreamError, match="no sample"):
        ResamplePlan([0, 0], seed=0, epoch=0, world_size=1, batch_size=BATCH, epoch_samples=8)


def test_resample_weights_are_sampling_probabilities():
    # two equal sources, weights 1 and 3: three quarters of the draws come from the second
    counts, weights = [100] * 20, [1.0] * 10 + [3.0] * 10
    plan = make_plan(counts, weights, sampling="resample", epoch_samples=40_000, seed=0, epoch=0, world_size=4,
                     batch_size=BATCH)
    drawn = Counter(s.shard >= 10 for r in range(4) for lane in range(LANES) for s in plan.segments(r, lane)
                    for _ in range(s.lo, s.hi))
    assert abs(drawn[True] / drawn.total() - 0.75) < 0.05
    # and every sample of a shard is read about as often (the read starts at a random sample)
    hits = Counter(i for r in range(4) for lane in range(LANES) for s in plan.segments(r, lane) for i in range(s.lo, s.hi))
    assert max(hits.values()) < 1.5 * min(hits.values())


def test_resample_stream_is_worker_independent_and_resumes_exactly(mixed, keys_by_source):
    base = cfg_of(mixed, shuffle_buffer=5, sampling="resample", epoch_samples=60)
    base = replace(base, sources=(replace(base.sources[0], weight=1.0), replace(base.sources[1], weight=2.5)))
    full = [simulate(mixed, replace(base, workers=w), epoch=2, rank=1, world_size=2) for w in (0, 1, 3)]
    assert full[0] == full[1] == full[2] and len(full[0]) == 60 // (2 * BATCH)
    assert full[0] != simulate(mixed, base, epoch=3, rank=1, world_size=2)  # a new draw every epoch
    for k in (1, 4, len(full[0])):
        assert simulate(mixed, replace(base, workers=2), epoch=2, rank=1, world_size=2, skip=k) == full[0][k:]
    loader = TrainLoader(mixed, base, seed=0, rank=0, world_size=2)
    assert loader.batches_per_epoch == 7 and loader.dropped_per_epoch == 0
    with pytest.raises(StreamError, match="resample: .* or raise data.epoch_samples"):
        train_batches(mixed, replace(base, epoch_samples=7), 2)


def test_resample_default_epoch_length_is_the_train_split(mixed, keys_by_source):
    """data.epoch_samples=0 (the default) means the train split's size in the workers too (they planned
    a 0-sample epoch: every resampled run without epoch_samples failed at its first batch)."""
    base = cfg_of(mixed, sampling="resample", epoch_samples=0)
    batches = simulate(mixed, base, epoch=0, rank=0, world_size=2)
    assert len(batches) == train_batches(mixed, base, 2) == (76 + 17) // (2 * BATCH)


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def second_source(tmp_path_factory) -> Path:
    """A second, smaller pack of the synthetic task (2 shards per split)."""
    from bcc.pack import pack_folders
    from bcc.synth import synthesize

    root = tmp_path_factory.mktemp("second")
    synthesize(root / "data", per_class=10, size=32, seed=1)
    pack_folders(root / "data", root / "shards", split=(0.6, 0.2, 0.2), seed=0, min_shards=2)
    return root / "shards"


def sources_config(path: Path, synth_shards: Path, second: Path, run_dir: Path, **data) -> Path:
    from conftest import write_config

    second_weight = data.pop("second_weight", 3)
    write_config(path, synth_shards, run_dir, data=data, train={"epochs": 1, "lr": 0.05, "log_every": 5})
    cfg = yaml.safe_load(path.read_text())
    del cfg["data"]["shards"]
    cfg["data"]["sources"] = [{"shards": str(synth_shards), "name": "big"},
                              {"shards": str(second), "weight": second_weight}]
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_process_training_from_two_weighted_sources(synth_shards, second_source, tmp_path):
    from conftest import launch

    run_dir = tmp_path / "run"
    done = launch(sources_config(tmp_path / "cfg.yaml", synth_shards, second_source, run_dir))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    big, small = Manifest.load(synth_shards), Manifest.load(second_source)
    assert "source big: weight 1" in done.stdout and "source shards: weight 3" in done.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["source"]: r for r in rows if r["split"] == "sources"}
    assert logged["big"]["train_samples"] == big.split("train").count
    assert logged["shards"]["train_samples"] == small.split("train").count
    for split in ("val", "test"):
        by = {r.get("source"): r for r in rows if r["split"] == split}
        assert set(by) == {"big", "shards", None}
        assert by["big"]["count"] + by["shards"]["count"] == by[None]["count"] == big.split(split).count + small.split(split).count
    summary = json.loads((run_dir / "summary.json").read_text())
    bpe = batches_per_epoch(big.split("train").count + 3 * small.split("train").count, 16, 2)
    assert [r["batches"] for r in summary["ranks"]] == [bpe, bpe]
    assert len({r["weights_sha256"] for r in summary["ranks"]}) == 1


@pytest.mark.slow
def test_resampled_run_resumed_mid_epoch_is_bitwise_exact(synth_shards, second_source, tmp_path):
    from safetensors.torch import load_file

    def train(name: str, workers: int, **checkpoint) -> Path:
        run_dir = tmp_path / name
        cfg = sources_config(tmp_path / f"{name}.yaml", synth_shards, second_source, run_dir, sampling="resample",
                             epoch_samples=128, second_weight=2.5, workers=workers)
        done = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg), "eval.test_at_end=false",
                               *(f"checkpoint.{k}={v}" for k, v in checkpoint.items())],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert ("resumed from" in done.stdout) == ("resume" in checkpoint)
        return run_dir

    straight = train("straight", 1, every_steps=3, keep_last=100)  # 128 / 16 = 8 steps in the epoch
    resumed = train("resumed", 2, resume=str(straight / "checkpoints" / f"step-{3:08d}"))
    a = load_file(straight / "checkpoints" / "last" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def edited_copy(pack: Path, dst: Path, edit) -> Path:
    """A copy of `pack` whose manifest dict `edit` changes in place (a hand-edited pack)."""
    import shutil

    shutil.copytree(pack, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_a_source_with_an_empty_train_split_is_refused_by_its_key(tmp_path, synth_shards, bcc_main):
    """A hand-edited copy of a pack with no train samples, mixed in with weight 2, trained in silence (its
    weight did nothing; only `train 0` in its source line): one error line naming data.sources[1]."""
    empty = edited_copy(synth_shards, tmp_path / "empty-train",
                        lambda m: m["splits"].update(train={"count": 0, "class_counts": {}, "shards": []}))
    cfg = sources_config(tmp_path / "cfg.yaml", synth_shards, empty, tmp_path / "run", second_weight=2)
    proc = bcc_main("train", "--config", cfg)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: data.sources[1] ('empty-train', shards {empty}): its train split 'train' "
                               "holds no samples, so its weight 2 would do nothing"), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the same pack as the one dataset of data.shards: the empty train split is refused as before
    proc = bcc_main("train", "--config", write_config(tmp_path / "one.yaml", empty, tmp_path / "run1"))
    assert proc.returncode == 2 and "data.train_split 'train' of" in proc.stderr and "is empty" in proc.stderr


def test_a_huge_epoch_samples_is_refused_up_front(tmp_path, synth_shards, bcc_main):
    """data.epoch_samples=10**15 planned segment lists that filled the memory: one error line instead."""
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run")
    proc = bcc_main("train", "--config", cfg, "data.sampling=resample", f"data.epoch_samples={10**15}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.epoch_samples: must be >= 0 and at most 10,000,000,000" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    plan = ResamplePlan([5, 7], seed=0, epoch=0, world_size=1, batch_size=4, epoch_samples=10**10)
    first = list(itertools.islice(plan.iter_segments(0, 0), 3))  # drawn as read, not planned whole
    assert len(first) == 3 and sum(s.hi - s.lo for s in first) <= 7 * 3



def test_a_shard_listed_twice_among_the_splits_a_run_reads_is_refused(tmp_path, synth_shards, bcc_main):
    """A test shard also listed in train (a hand-edited manifest; two sources packed from the same
    images) trained on what it scored, and `bcc pack --verify` saw nothing wrong (fourth breaker): one
    error line naming both places. The same pack twice as data.sources: read twice per epoch unasked."""
    from bcc.config import DataConfig
    from bcc.train.preflight import check_no_shared_shards
    from bcc.train.setup import TrainError

    def put_a_test_shard_in_train(manifest: dict) -> None:
        train, test = manifest["splits"]["train"], manifest["splits"]["test"]
        train["shards"].append({**test["shards"][0], "sha256": test["shards"][0]["sha256"].upper()})  # same bytes
        train["count"] += test["shards"][0]["count"]

    leaky = edited_copy(synth_shards, tmp_path / "leaky", put_a_test_shard_in_train)
    test = json.loads((leaky / "manifest.json").read_text())["splits"]["test"]
    proc = bcc_main("train", "--config", write_config(tmp_path / "cfg.yaml", leaky, tmp_path / "run"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    first = test["shards"][0]["path"]
    assert lines[0].startswith(f"error: the same shard (sha256 {test['shards'][0]['sha256'][:12]}...) is listed twice: "
                               f"split 'train' {leaky / first} and split 'test' {leaky / first}; its samples would "
                               "be trained on and scored"), lines[0]
    twice = load_data(DataConfig(sources=(SourceConfig(shards=str(synth_shards), name="a"),
                                          SourceConfig(shards=str(synth_shards), name="b"))))
    with pytest.raises(TrainError, match=rf"source 'a' \({synth_shards / 'manifest.json'}\) split 'train' .* source 'b' "
                                         r"\(.*\) split 'train' .* read twice per epoch"):
        check_no_shared_shards(twice, {"data.train_split": "train", "data.val_split": "val"})
    # bcc pack --verify said every shard of that manifest matched
    proc = bcc_main("pack", "--verify", str(leaky))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"LISTED TWICE {first}: the same sha256 as split 'train' {leaky / first}" in " ".join(proc.stdout.split())
    # a split named twice is one split; fold views share shards by design
    check_no_shared_shards(Manifest.load(synth_shards), {"data.train_split": "train", "data.test_split": "train"})


def test_a_source_without_val_samples_is_said_to_be_left_out_of_validation(tmp_path, synth_shards, second_source):
    """A source packed without a validation fraction is left out of each validation: the run says so once
    (it printed only the other sources' tables and the combined one)."""
    noval = edited_copy(second_source, tmp_path / "noval",
                        lambda m: m["splits"].update(val={"count": 0, "class_counts": {}, "shards": []}))
    cfg = sources_config(tmp_path / "cfg.yaml", synth_shards, noval, tmp_path / "run", second_weight=1)
    done = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg), "eval.test_at_end=false",
                           "train.epochs=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = " ".join(done.stdout.split())
    assert out.count("note: source 'noval' is not evaluated on 'val': its 'val' split holds no samples") == 1, out[-3000:]


def test_a_split_one_source_lacks_names_that_source(tmp_path, synth_shards, second_source):
    from bcc.config import DataConfig
    from bcc.train.preflight import check_run
    from bcc.train.setup import TrainError

    notest = edited_copy(second_source, tmp_path / "notest", lambda m: m["splits"].pop("test"))
    mixed = load_data(DataConfig(sources=(SourceConfig(shards=str(synth_shards), name="a"),
                                          SourceConfig(shards=str(notest), name="b"))))
    cfg = load_config(None, ["model.backbone=test_resnet"])
    with pytest.raises(TrainError, match=r"data.test_split 'test' names no split of data.sources \(.*\) \(source 'b' "
                                         rf"\({notest / 'manifest.json'}\) has none\); available: train, val; or set eval.test_at_end=false"):
        check_run(cfg, mixed)


# --------------------------------------------------------------------------- images shared across sources


def _sample_meta(pack: Path, key: str) -> dict:
    """The json of the sample keyed `key` of `pack`."""
    from bcc.shards import read_shard

    manifest = Manifest.load(pack)
    for shard in manifest.split(key.rsplit("-", 1)[0]).shards:
        for sample in read_shard(shard):
            if sample["__key__"] == key:
                return json.loads(sample["json"])
    raise AssertionError(f"no sample {key} in {pack}")


@pytest.fixture(scope="module")
def reseeded(synth_data, tmp_path_factory) -> Path:
    """`synth_shards`' images packed with another seed: other shards, other splits, the same images."""
    from bcc.pack import pack_folders

    out = tmp_path_factory.mktemp("reseeded") / "reseeded"
    pack_folders(synth_data, out, split=(0.7, 0.15, 0.15), seed=1, min_shards=2)
    return out


def test_the_same_image_in_one_sources_train_and_anothers_test_is_refused(tmp_path, reseeded, synth_shards, bcc_main):
    """The same class folders packed twice with another seed: no shard repeats (the shard check passes),
    but images of one pack's train split are in the other's val and test splits: trained on and scored.
    One error line with the total and, per pair of splits, the count, how many are the same file and one
    sample key of each side (their json sha256 agree, or their pHashes are within 4 bits); the test
    split counts even with eval.test_at_end=false (a later bcc eval scores it)."""
    import re

    import numpy as np

    from bcc.neardup import hamming

    assert (reseeded / "sample_index.npz").is_file()
    cfg = sources_config(tmp_path / "cfg.yaml", synth_shards, reseeded, tmp_path / "run", second_weight=1)
    proc = bcc_main("train", "--config", cfg, "eval.test_at_end=false")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    head = re.match(r"error: data\.sources: (\d+) image\(s\) trained on in one source are evaluated in another \(the "
                    r"same file by sha256, or the same picture re-encoded: pHash within 4 bits\): ", lines[0])
    assert head and lines[0].endswith("They would be trained on and scored; pack the overlapping folders together (one "
                                      "pack keeps copies and near-copies on one side), or set data.source_overlap=warn "
                                      "(train anyway) or ignore (no check)"), lines[0]
    pairs = re.findall(r"(\d+) of '(\w+)' \(\S+\) split '(\w+)' in '(\w+)' \(\S+\) split 'train' \((\d+) the same "
                       r"file; e\.g\. sample (\S+) and ([^\s,)]+)(?:, pHash \d bits apart)?\)", lines[0])
    packs = {"big": synth_shards, "reseeded": reseeded}
    index = {name: np.load(pack / "sample_index.npz") for name, pack in packs.items()}
    assert {(e, s) for _, e, s, *_ in pairs} == {(e, s) for e in packs for s in ("val", "test")}
    for n, evaluated, split, trained, same, key_e, key_t in pairs:
        exact = np.isin(index[evaluated][f"{split}.sha"], index[trained]["train.sha"]).sum()
        assert int(same) == exact and int(n) >= exact > 0
        a, b = _sample_meta(packs[evaluated], key_e), _sample_meta(packs[trained], key_t)
        assert a["sha256"] == b["sha256"] or hamming(int(a["phash"], 16), int(b["phash"], 16)) <= 4
    assert int(head.group(1)) == sum(int(p[0]) for p in pairs)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # 2-process DDP: rank 0 checks, every rank stops, the job shows the one error line once
    from conftest import launch

    done = launch(cfg, "eval.test_at_end=false")
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error: data.sources:" in line]
    assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    # data.source_overlap=warn: one warning line, and the run trains
    proc = bcc_main("train", "--config", cfg, "eval.test_at_end=false", "data.source_overlap=warn", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " ".join(proc.stdout.split()).count(f"warning: data.sources: {head.group(1)} image(s) trained on in one "
                                               "source are evaluated in another") == 1
    # the index holds every sample's sha256 prefix, class and pHash at its key's position
    from bcc.shards import read_shard

    manifest = Manifest.load(reseeded)
    for split in manifest.splits:
        samples = [json.loads(s["json"]) | {"key": s["__key__"]} for sh in manifest.split(split).shards
                   for s in read_shard(sh)]
        assert [m["key"] for m in samples] == [f"{split}-{p:08d}" for p in range(len(samples))]
        assert [f"{v:016x}" for v in index["reseeded"][f"{split}.sha"]] == [m["sha256"][:16] for m in samples]
        assert index["reseeded"][f"{split}.label"].tolist() == [m["label"] for m in samples]
        assert [f"{v:016x}" for v in index["reseeded"][f"{split}.phash"]] == [m["phash"] for m in samples]


def test_start_up_notes_and_warnings_are_saved_in_the_run_directory(tmp_path, reseeded, synth_shards, bcc_main):
    """The overlap warning (and every other `note:`/`warning:` line a start prints) is in the run dir's
    notes.json, not only on a console whose output a batch job may lose; a resumed start adds its own."""
    from bcc.train.runlog import read_notes

    cfg = sources_config(tmp_path / "cfg.yaml", synth_shards, reseeded, tmp_path / "run", second_weight=1)
    args = ("train", "--config", cfg, "eval.test_at_end=false", "data.source_overlap=warn")
    proc = bcc_main(*args, "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith(("note:", "warning:"))]
    assert any(line.startswith("warning: data.sources: ") for line in printed), proc.stdout[-3000:]
    starts = read_notes(tmp_path / "run")
    assert [(s["step"], s["notes"]) for s in starts] == [(0, printed)]
    proc = bcc_main(*args, "train.epochs=2", "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    starts = read_notes(tmp_path / "run")
    assert len(starts) == 2 and starts[0]["notes"] == printed and starts[1]["step"] > 0
    assert any(line.startswith("warning: data.sources: ") for line in starts[1]["notes"]), starts[1]


@pytest.mark.parametrize("damage", ["step is text", "step is null", "a directory", "not JSON", "no starts"])
def test_a_damaged_notes_file_is_kept_aside_and_a_new_one_begun(tmp_path, damage):
    """notes.json is a record, not the run's state: a damaged one (a step that is text or null, a directory,
    not JSON) gave a traceback on resume. Now it is renamed aside (kept, not lost), one warning naming it
    joins this start's notes, and a new notes.json begins; reading it directly is a RunLogError."""
    from bcc.console import keeping_notes
    from bcc.train.runlog import RunLog, RunLogError, read_notes

    path = tmp_path / "notes.json"
    old = {"step is text": '{"starts": [{"step": "3", "time": "t", "notes": []}]}',
           "step is null": '{"starts": [{"step": null, "time": "t", "notes": []}]}',
           "not JSON": '{"starts": [', "no starts": "[1, 2]"}.get(damage)
    if old is None:
        (path / "inside").mkdir(parents=True)
    else:
        path.write_text(old)
    with pytest.raises(RunLogError, match="cannot read .*notes.json"):
        read_notes(tmp_path)
    with keeping_notes() as lines:
        RunLog(tmp_path, is_main=True).save_notes(lines, step=5, fresh=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("notes.json.damaged-")]
    assert len(aside) == 1 and (aside[0].is_dir() if old is None else aside[0].read_text() == old)
    starts = read_notes(tmp_path)
    assert len(starts) == 1 and starts[0]["step"] == 5 and len(starts[0]["notes"]) == 1, starts
    assert starts[0]["notes"][0].startswith("warning: cannot read ") and f"kept as {aside[0].name}" in (
        starts[0]["notes"][0]), starts


def test_a_small_dev_shm_warning_is_saved_with_the_start_up_notes(tmp_path, synth_shards, bcc_main, monkeypatch):
    """The loader's own start-up warnings (here: /dev/shm too small for the batch ring, printed on stderr
    by each rank) land in notes.json too, as README says of start-up warnings."""
    import shutil

    from bcc import stream_ring
    from bcc.train.runlog import read_notes

    monkeypatch.setattr(stream_ring, "_WARNED", set())  # once per process: this test's own
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024) if str(p) == "/dev/shm"
                        else real(p))
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", train={"epochs": 1},
                       eval={"test_at_end": False})
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shm = [line for line in proc.stderr.splitlines() if line.startswith("warning: /dev/shm has 0 MiB free")]
    assert shm, proc.stderr[-2000:]
    assert shm[0] in read_notes(tmp_path / "run")[0]["notes"]


def test_images_shared_without_a_leak_are_noted_and_the_index_is_checked(tmp_path, synth_shards, second_source,
                                                                         bcc_main):
    """Shared images that do not leak (two train splits, two test splits) are notes, a warning when their
    classes differ; the same picture (an equal pHash, another file) across train and test is a leak like
    a copy, a near-identical one (pHash 6 bits apart) a warning; an index copied from another pack and a
    pack without pHashes are notes; one that is no npz (a web page saved in its place), a damaged zip or
    none beside a current manifest: an error (tests/test_sample_index.py has the cases)."""
    import shutil

    import numpy as np

    from bcc import sample_index
    from bcc.sample_index import SampleIndexError, check_sources
    from bcc.sources import Source

    splits = {"data.train_split": "train", "data.val_split": "val", "data.test_split": "test"}

    def source(name: str, pack: Path) -> Source:
        return Source(name, 1.0, Manifest.load(pack))

    # the same images and split, packed again (another --resize): every split shared with its own kind
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    counts = {s: Manifest.load(synth_shards).split(s).count for s in ("train", "val", "test")}
    lines = check_sources([source("a", synth_shards), source("b", copy)], splits)
    named = {"a": f"'a' ({synth_shards / 'manifest.json'})", "b": f"'b' ({copy / 'manifest.json'})"}
    assert len(lines) == 3 and lines[0].startswith(
        f"note: data.sources: {counts['train']} image(s) are in both {named['a']} split 'train' and {named['b']} split "
        "'train' (e.g. sample train-") and lines[0].endswith("read once per source each epoch"), lines
    assert lines[2].startswith(f"note: data.sources: {counts['test']} image(s) are in both {named['a']} split 'test' "
                               f"and {named['b']} split 'test' (e.g. sample test-") and lines[2].endswith(
        "scored twice in the combined 'test' metrics"), lines
    assert check_sources([source("a", synth_shards)], splits) == []  # one source: nothing to compare

    def craft(pack: Path, seed: int, columns: dict | None = None) -> dict:
        manifest = Manifest.load(pack)
        rng = np.random.default_rng(seed)  # random 64-bit hashes: two lie within 6 bits with probability ~5e-12
        made = {s: {"sha": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                    "phash": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                    "label": np.zeros(manifest.split(s).count, np.int16)} for s in manifest.splits}
        for (split, column), values in (columns or {}).items():
            made[split][column] = values
        sample_index.write(manifest, made)
        return made

    # the same file in two train splits under another class: a warning
    mine = dict(np.load(synth_shards / "sample_index.npz"))
    craft(copy, 0, {("train", "sha"): mine["train.sha"], ("train", "label"): (mine["train.label"] + 1) % 4})
    lines = check_sources([source("a", synth_shards), source("b", copy)], splits)
    first = int(np.flatnonzero(mine["train.sha"] == mine["train.sha"].min())[0])  # the example: the smallest digest
    assert lines == [f"warning: data.sources: {np.unique(mine['train.sha']).size} image(s) are in both {named['a']} split "
                     f"'train' and {named['b']} split 'train' (e.g. sample train-{first:08d} and train-{first:08d}): read "
                     f"once per source each epoch; {np.unique(mine['train.sha']).size} of them with another class in "
                     "each source"], lines
    # a near-identical picture (pHash 6 bits apart, another file) across train and test: a warning
    near = tmp_path / "near"
    shutil.copytree(second_source, near)
    base = craft(copy, 1)
    test = base["test"]["phash"].copy()
    other = craft(near, 2)["test"]["phash"]
    other[5] = base["train"]["phash"][7] ^ np.uint64(0b111111)
    craft(near, 2, {("test", "phash"): other})
    assert check_sources([source("a", copy), source("b", near)], splits) == [
        "warning: data.sources: 1 image(s) evaluated in one source have a near-identical picture (pHash 5-6 bits apart: "
        f"different pictures can lie that close) trained on in another: 1 of 'b' ({near / 'manifest.json'}) split "
        f"'test' in 'a' ({copy / 'manifest.json'}) split 'train' (e.g. sample test-00000005 and train-00000007, pHash 6 "
        "bits apart); if they are the same field re-shot, pack the overlapping folders together (one pack keeps "
        "copies and near-copies on one side)"]
    other[5] = base["train"]["phash"][7]  # the same picture, re-encoded: an error
    craft(near, 2, {("test", "phash"): other})
    with pytest.raises(SampleIndexError, match=r"1 image\(s\) trained on .* 1 of 'b' \(.*\) split 'test' in 'a' \(.*\) "
                                               r"split 'train' \(0 the same file; e\.g\. sample test-00000005 and "
                                               r"train-00000007, pHash 0 bits apart\)"):
        check_sources([source("a", copy), source("b", near)], splits)
    assert check_sources([source("a", copy), source("b", near)], splits, "warn")[0].startswith(
        "warning: data.sources: 1 image(s) trained on in one source are evaluated in another")
    assert check_sources([source("a", copy), source("b", near)], splits, "ignore") == []
    assert test.size  # (the crafted test split of 'a' shares nothing)

    # an index copied beside another pack; foreign bytes; none at all; no pHashes
    shutil.copy(near / "sample_index.npz", copy / "sample_index.npz")
    lines = check_sources([source("a", copy), source("b", near)], splits)
    assert lines == [f"note: data.sources[0] 'a' ({copy / 'manifest.json'}): {copy / 'sample_index.npz'} does not "
                     "describe split(s) 'train', "
                     "'val', 'test' as the manifest lists them (edited since it was packed, or an index of another "
                     "pack); those are checked by shard only"], lines
    proc = bcc_main("pack", "--verify", str(copy))  # bcc pack --verify calls it a mismatch
    assert proc.returncode == 1, proc.stdout[-1000:]
    assert ("MISMATCH sample_index.npz: describes split(s) train, val, test with other shards than the manifest "
            "lists") in " ".join(proc.stdout.split()), proc.stdout[-1000:]
    assert "OK        sample_index.npz" in bcc_main("pack", "--verify", str(near)).stdout
    (copy / "sample_index.npz").write_bytes(b"<html><body>Not here</body></html>")  # a page saved in its place
    with pytest.raises(SampleIndexError, match=r"copy/sample_index.npz is damaged: not a zip file \(it begins "
                                               r"'<html><body>Not here</body></html>'\)"):
        check_sources([source("a", copy), source("b", near)], splits)
    (copy / "sample_index.npz").write_bytes(b"PK\x03\x04 and then no zip")
    with pytest.raises(SampleIndexError, match=r"copy/sample_index.npz is damaged: a zip file that cannot be read .*; "
                                               r"copy it again from the packed output, or re-pack \(bcc pack --verify "
                                               r"LOCATION checks it\); or set data.source_overlap=ignore"):
        check_sources([source("a", copy), source("b", near)], splits)
    (copy / "sample_index.npz").unlink()  # beside a manifest of today's format: lost
    with pytest.raises(SampleIndexError, match=r"copy/sample_index.npz is missing: "):
        check_sources([source("a", copy), source("b", near)], splits)
    # the setting's values survive YAML, in a file and on the command line (an unquoted `off` was a bool)
    (tmp_path / "c.yaml").write_text("data:\n  source_overlap: ignore\n")
    assert load_config(tmp_path / "c.yaml", ["data.source_overlap=warn"]).data.source_overlap == "warn"
    assert load_config(tmp_path / "c.yaml", []).data.source_overlap == "ignore"
    craft(copy, 1, {(s, "phash"): None for s in ("train", "val", "test")})
    assert check_sources([source("a", copy), source("b", near)], splits) == [
        f"note: data.sources[0] 'a' ({copy / 'manifest.json'}): packed without pHashes (--no-near-dup): its images are "
        "compared with the other sources' by file only, not by picture"]


def test_a_pretrained_run_that_trained_on_the_images_this_run_evaluates_is_warned_of(ddp_run, reseeded, capsys):
    """model.pretrained = a run trained on synth_shards' train split; this run evaluates the same images
    packed with another seed, so most of its val and test images were the source's training images with
    their labels: one warning per split with the count (the breaker's finding: no word). The source's own
    pack and split: nothing to say. A pack of an older format without an index says the check was not
    made; one of today's format whose index was lost is an error (unless data.source_overlap=ignore)."""
    import shutil

    import numpy as np

    from bcc.pretrained_overlap import check_pretrained
    from bcc.sample_index import SampleIndexError
    from bcc.train.preflight import check_run

    run_dir, _ = ddp_run
    source = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["shards"])
    trained = set(np.load(source / "sample_index.npz")["train.sha"].tolist())

    def cfg_for(pack: Path):
        return load_config(None, [f"data.shards={pack}", "model.backbone=test_resnet", f"model.pretrained={run_dir}"])

    check_run(cfg_for(reseeded), Manifest.load(reseeded))
    out = " ".join(capsys.readouterr().out.split())
    index = np.load(reseeded / "sample_index.npz")
    trained_ph = np.load(source / "sample_index.npz")["train.phash"]
    for split in ("val", "test"):  # the same file, or the same picture (pHash within 4 bits)
        hit = [sha in trained or int(np.bitwise_count(trained_ph ^ np.uint64(ph)).min()) <= 4
               for sha, ph in zip(index[f"{split}.sha"].tolist(), index[f"{split}.phash"].tolist(), strict=True)]
        assert 0 < sum(hit) < len(hit)
        assert (f"warning: model.pretrained {run_dir} was trained on {sum(hit)} of the {len(hit)} images of split "
                f"'{split}' of {reseeded / 'manifest.json'} (the same file by sha256, or the same picture: pHash within 4 "
                "bits): "
                "scores there are flattered") in out, out
    assert check_pretrained(cfg_for(source), Manifest.load(source), ["val", "test"]) == []
    # the source's pack holds other shards than when it trained (repacked in place): not checked, said
    moved = reseeded.parent / "run-of-another-pack"
    shutil.copytree(run_dir, moved, symlinks=True)
    for meta in [*moved.glob("checkpoints/step-*/meta.json")]:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "dataset": "0" * 64}))
    best = json.loads((moved / "model_best.json").read_text())
    (moved / "model_best.json").write_text(json.dumps({**best, "meta": {**best["meta"], "dataset": "0" * 64}}))
    cfg = load_config(None, [f"data.shards={reseeded}", "model.backbone=test_resnet", f"model.pretrained={moved}"])
    assert check_pretrained(cfg, Manifest.load(reseeded), ["val", "test"]) == [
        f"note: whether {moved} (model.pretrained) was trained on images this run evaluates is not checked: its data "
        f"({source / 'manifest.json'}) holds other shards than when it trained (repacked since?)"]
    bare = reseeded.parent / "bare"
    shutil.copytree(reseeded, bare)
    (bare / "sample_index.npz").unlink()  # beside a manifest of today's format: lost
    with pytest.raises(SampleIndexError, match=r"bare/sample_index.npz is missing: .*; or set data.source_overlap=ignore"):
        check_pretrained(cfg_for(bare), Manifest.load(bare), ["val", "test"])
    ignore = load_config(None, [f"data.shards={bare}", "model.backbone=test_resnet", f"model.pretrained={run_dir}",
                                "data.source_overlap=ignore"])
    assert check_pretrained(ignore, Manifest.load(bare), ["val", "test"]) == []
    manifest = json.loads((bare / "manifest.json").read_text())
    (bare / "manifest.json").write_text(json.dumps({**manifest, "format": "bcc-shards/5"}))  # packed before the index
    assert check_pretrained(cfg_for(bare), Manifest.load(bare), ["val", "test"]) == [
        f"note: whether {run_dir} (model.pretrained) was trained on images this run evaluates is not checked for "
        f"{bare / 'manifest.json'}: it has no sample_index.npz: packed before bcc always wrote one (manifest format "
        "bcc-shards/5); to have its images compared, re-pack it with this bcc"]


def test_a_fold_view_reads_its_samples_from_the_index(synth_data, tmp_path):
    """`bcc pack --folds K` stores each sample's fold in the index: a `data.fold` view's train and val
    are the pack's train+val samples of the other folds and of the fold, as many as the view counts."""
    import numpy as np

    from bcc import sample_index
    from bcc.pack import pack_folders

    pack_folders(synth_data, tmp_path / "folds", split=(0.7, 0.15, 0.15), seed=0, min_shards=2, folds=3)
    base = Manifest.load(tmp_path / "folds")
    view = base.with_fold(1)
    index = sample_index.load(view)
    folds = index.columns["fold"]
    assert not isinstance(index, str) and not index.stale and set(folds) == {"train", "val", "test"}
    assert set(folds["test"].tolist()) == {-1}
    train, val = (sample_index.view_ids(view, index, s, "train", "val") for s in ("train", "val"))
    assert (len(train), len(val)) == (view.split("train").count, view.split("val").count)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])),
                          np.sort(np.concatenate([index.sha["train"], index.sha["val"]])))
