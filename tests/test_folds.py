"""k-fold cross-validation: fold assignment, the packed folds, the manifest's fold view and its stream."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from bcc.config import DataConfig
from bcc.manifest import FoldError, Manifest
from bcc.split import SplitError, Units, assign_folds, compile_group_regex, sample_units
from bcc.stream import eval_loader, iter_keys, train_loader


def _samples(n: int, classes: int = 3, groups: int | None = None) -> list[dict]:
    def source(i: int) -> str:
        return f"C/P{i % groups}_{i}.jpg" if groups else f"C/{i}.jpg"

    return [{"sha256": f"h{i}", "label": (i * 7) % classes, "source": source(i)} for i in range(n)]


@pytest.mark.parametrize("n,k", [(10, 2), (37, 3), (61, 5), (100, 4)])
@pytest.mark.parametrize("seed", [0, 7])
def test_singleton_folds_are_stratified_within_one_per_class(n, k, seed):
    samples = _samples(n)
    folds = assign_folds(samples, sample_units(samples), k, seed)
    assert all(f in range(k) for f in folds)  # every sample in exactly one fold
    for cls in {s["label"] for s in samples}:
        per = Counter(f for s, f in zip(samples, folds, strict=True) if s["label"] == cls)
        sizes = [per.get(f, 0) for f in range(k)]
        assert max(sizes) - min(sizes) <= 1, (cls, sizes)
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert assign_folds(samples, sample_units(samples), k, seed) == folds  # deterministic by seed
    assert any(assign_folds(samples, sample_units(samples), k, s) != folds for s in range(seed + 1, seed + 4))


@pytest.mark.parametrize("seed", range(4))
def test_groups_never_split_and_only_included_samples_get_a_fold(seed):
    samples = _samples(90, groups=17)
    samples[3]["sha256"] = samples[40]["sha256"]  # an exact duplicate joins two groups
    units = sample_units(samples, compile_group_regex(r"^(P\d+)_"))
    # the test split: whole units, as the split keeps them
    test_units = units.members[::5]
    excluded = {i for u in test_units for i in u}
    include = [i not in excluded for i in range(len(samples))]
    folds = assign_folds(samples, units, 3, seed, include=include)
    assert [f is None for f in folds] == [not x for x in include]
    for members in units.members:
        assert len({folds[i] for i in members}) == 1, members
    assert len({folds[3], folds[40]} - {None}) <= 1
    counts = Counter(f for f in folds if f is not None)
    assert sorted(counts) == [0, 1, 2] and sum(counts.values()) == sum(include)


def test_fold_options_are_checked():
    samples = _samples(6)
    units = sample_units(samples)
    for bad in (1, 0, True, 2.0):
        with pytest.raises(SplitError, match="folds"):
            assign_folds(samples, units, bad, 0)
    with pytest.raises(SplitError, match="cannot fill"):
        assign_folds(samples, units, 7, 0)
    with pytest.raises(SplitError, match="stay together"):
        assign_folds(samples, Units([[0, 1], [2], [3], [4], [5]], 0, units.near), 2, 0,
                     include=[True, False, True, True, True, True])


# --------------------------------------------------------------------------- packed folds


@pytest.fixture(scope="module")
def fold_pack(synth_data, tmp_path_factory) -> Path:
    from bcc.pack import pack_folders

    out = tmp_path_factory.mktemp("folds") / "shards"
    pack_folders(synth_data, out, split=(0.6, 0.2, 0.2), seed=1, shard_size=20, min_shards=2, folds=3)
    return out


def _read_all(root: Path) -> dict[str, dict[str, dict]]:
    """split -> key -> json, plus the shard each key is in (under "_shard")."""
    m = json.loads((root / "manifest.json").read_text())
    out = {}
    for name, s in m["splits"].items():
        out[name] = {}
        for sh in s["shards"]:
            for sample in wds.WebDataset(str(root / sh["path"]), shardshuffle=False, empty_check=False):
                out[name][sample["__key__"]] = {**json.loads(sample["json"]), "_shard": sh["path"]}
    return out


def test_pack_writes_fold_ids_and_per_shard_fold_counts(fold_pack):
    m = json.loads((fold_pack / "manifest.json").read_text())
    samples = _read_all(fold_pack)
    assert m["options"]["folds"] == 3 and m["folds"]["k"] == 3
    assert all("fold" not in meta for meta in samples["test"].values())  # the test split stays fixed
    pool = {k: meta for name in ("train", "val") for k, meta in samples[name].items()}
    assert all(meta["fold"] in (0, 1, 2) for meta in pool.values())
    assert m["folds"]["counts"] == [sum(1 for x in pool.values() if x["fold"] == f) for f in range(3)]
    for f in range(3):
        assert m["folds"]["class_counts"][f] == {
            c: sum(1 for x in pool.values() if x["fold"] == f and x["class"] == c) for c in m["classes"]}
    for name in ("train", "val"):
        for sh in m["splits"][name]["shards"]:
            in_shard = Counter(x["fold"] for x in samples[name].values() if x["_shard"] == sh["path"])
            assert sh["fold_counts"] == [in_shard.get(f, 0) for f in range(3)]
    for cls in m["classes"]:  # stratified: groups are near-dup/duplicate sets only, so within +-1 or so
        sizes = [m["folds"]["class_counts"][f][cls] for f in range(3)]
        assert max(sizes) - min(sizes) <= 2


def test_fold_view_validates_on_fold_k_and_trains_on_the_others(fold_pack):
    manifest = Manifest.load(fold_pack)
    samples = _read_all(fold_pack)
    pool = {k: meta["fold"] for name in ("train", "val") for k, meta in samples[name].items()}
    cfg = DataConfig(shards=str(fold_pack), image_size=32, batch_size=8, eval_batch_size=16, workers=0,
                     shuffle_buffer=10)
    assert manifest.with_fold(None) is manifest
    for k in range(3):
        view = manifest.with_fold(k)
        fold_keys = {key for key, f in pool.items() if f == k}
        other_keys = {key for key, f in pool.items() if f != k}
        assert view.split("val").count == len(fold_keys) and view.split("train").count == len(other_keys)
        assert view.split("test") == manifest.split("test")
        names = manifest.classes
        assert sum(view.split("train").class_counts[c] for c in names) == len(other_keys)
        # evaluation: exactly the fold's samples, each once, on any number of ranks
        for world in (1, 2):
            got = [key for r in range(world)
                   for key in iter_keys(eval_loader(view, "val", cfg, rank=r, world_size=world))]
            assert sorted(got) == sorted(fold_keys)
        # training: one epoch is one pass over exactly the other folds (less fewer than world x batch
        # dropped samples), every rank the exact planned batch count; with 1 or 2 loader workers
        for world, workers in ((1, 0), (2, 0), (2, 2)):
            wcfg = dataclasses.replace(cfg, workers=workers)
            for epoch in range(2):
                keys = []
                for r in range(world):
                    loader = train_loader(view, wcfg, seed=0, epoch=epoch, rank=r, world_size=world)
                    got = iter_keys(loader)
                    assert len(got) == len(loader) * cfg.batch_size
                    keys += got
                assert len(set(keys)) == len(keys) and set(keys) <= other_keys
                assert len(other_keys) - len(keys) < world * cfg.batch_size


def test_fold_errors_are_named(fold_pack, synth_shards):
    with pytest.raises(FoldError, match="has no folds"):
        Manifest.load(synth_shards).with_fold(0)
    for bad in (3, -1):
        with pytest.raises(FoldError, match=r"outside 0\.\.2"):
            Manifest.load(fold_pack).with_fold(bad)


def test_folds_missing_a_class_are_a_warning(tmp_path, make_class_tree):
    from bcc.pack import pack_folders
    from bcc.split import fold_warnings

    assert fold_warnings([{"A": 2, "B": 1}, {"A": 1, "B": 1}]) == []
    assert fold_warnings([{"A": 2, "B": 0, "C": 0}, {"A": 1, "B": 1, "C": 0}]) == [
        "1 class(es) are missing from some of the 2 folds: 'B' (in 1); they have fewer groups in train+val "
        "than folds, so those folds validate without them (use fewer folds)"]  # C: not in train+val at all
    src = make_class_tree(tmp_path / "src", {"Benign": 6, "Early": 6, "Pre": 2, "Pro": 6}, size=16)
    result = pack_folders(src, tmp_path / "out", split=(0.8, 0.2, 0.0), seed=0, folds=3, near_dup_threshold=None)
    warned = [w for w in result.manifest["warnings"] if "missing from some of the 3 folds" in w]
    assert len(warned) == 1 and "'Pre-B' (in 2)" in warned[0] and "Benign" not in warned[0]


def test_more_folds_than_groups_warn_at_pack_and_an_empty_fold_is_refused_by_name(tmp_path, make_class_tree):
    """--folds 10 over 8 train+val groups (16 images, two per group): 2 folds are empty. The pack says so (not only "a class is
    missing"), and data.fold=<an empty fold> is refused naming the fold (was: "val split is empty; repack
    with a non-zero validation fraction", though the pack's val split was not)."""
    from bcc.config import load_config
    from bcc.pack import pack_folders
    from bcc.train.preflight import check_run
    from bcc.train.setup import TrainError

    src = make_class_tree(tmp_path / "src", {"Benign": 2, "Early": 2, "Pre": 2, "Pro": 2}, size=16)
    for f in list(src.rglob("img*")):  # an exact copy of each: one group of two
        (f.parent / f"copy-{f.name}").write_bytes(f.read_bytes())
    result = pack_folders(src, tmp_path / "out", split=(0.5, 0.5, 0.0), seed=0, folds=10, near_dup_threshold=None)
    counts = [sum(f.values()) for f in result.manifest["folds"]["class_counts"]]
    empty = [i for i, c in enumerate(counts) if c == 0]
    assert len(empty) == 2
    assert f"2 of the 10 folds are empty (fold {empty[0]}, {empty[1]})" in " ".join(result.manifest["warnings"])
    cfg = load_config(None, [f"data.shards={tmp_path / 'out'}", "model.backbone=test_resnet",
                             "eval.test_at_end=false"])
    with pytest.raises(TrainError, match=rf"^data.fold={empty[0]}: fold {empty[0]} of .* is empty .*fewer --folds"):
        check_run(cfg, Manifest.load(tmp_path / "out").with_fold(empty[0]))
