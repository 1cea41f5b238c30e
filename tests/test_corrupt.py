"""Damaged shards: a flipped bit inside a stored image is caught as the stream reads it (pack format 2's
per-sample `stored_crc32`), stops the run with a named error or, with `data.on_corrupt: skip`, is left
out and counted; a truncated tar is a named error; packs of format 1 still train, unchecked, with a note."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from bcc.config import DataConfig
from bcc.manifest import Manifest
from bcc.pack import pack_folders
from bcc.shards import IMAGE_KEYS, sha256_file, write_shard
from bcc.stream import ShardError, eval_loader, iter_keys, train_loader

from conftest import launch, write_config

# 4 classes x 20: train 64 = 2 ranks x 2 batches x 16 (nothing dropped), val 8, test 8
FOLDERS = {"Benign": 20, "Early": 20, "Pre": 20, "Pro": 20}


@pytest.fixture(scope="module")
def clean_pack(tmp_path_factory) -> Path:
    from conftest import image_bytes

    src = tmp_path_factory.mktemp("src")
    for f, (folder, n) in enumerate(FOLDERS.items()):
        (src / folder).mkdir()
        for i in range(n):
            (src / folder / f"img{i:03d}.jpg").write_bytes(image_bytes(f * 1000 + i, 40))
    out = tmp_path_factory.mktemp("packed") / "pack"
    pack_folders(src, out, seed=0, min_shards=4)
    return out


def copy_pack(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def flip_image_bit(shard: Path, nth: int = 3) -> str:
    """Flip one bit in the middle of the nth image stored in `shard`; returns that sample's key."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.rsplit(".", 1)[-1] in IMAGE_KEYS]
    member = members[nth]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def data_cfg(**kw) -> DataConfig:
    return DataConfig(**{"image_size": 32, "batch_size": 16, "eval_batch_size": 16, "workers": 0,
                         "shuffle_buffer": 0, **kw})


def all_train_keys(manifest, cfg, world_size=2):
    keys, corrupt = [], []
    for rank in range(world_size):
        loader = train_loader(manifest, cfg, seed=0, epoch=0, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # every rank: the planned number of batches
        keys += iter_keys(batches)
        corrupt += [c for b in batches for c in b["corrupt"]]
        assert loader.skipped == corrupt[len(corrupt) - len(loader.skipped):]
    return keys, corrupt


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_bit_is_a_named_error_or_skipped_and_counted(clean_pack, tmp_path, workers):
    pack = copy_pack(clean_pack, tmp_path / "pack")
    manifest = Manifest.load(pack)
    assert manifest.has_checksums
    clean, none = all_train_keys(manifest, data_cfg(workers=workers))
    assert len(clean) == len(set(clean)) == 64 and none == []

    shard = manifest.split("train").shards[1].path
    key = flip_image_bit(shard)
    with pytest.raises(ShardError) as e:
        all_train_keys(manifest, data_cfg(workers=workers))
    message = str(e.value)
    assert f"sample {key} in shard {shard}" in message and "checksum" in message and "data.on_corrupt=skip" in message
    assert "\n" not in message and "Traceback" not in message  # the worker's traceback is not the message

    keys, corrupt = all_train_keys(manifest, data_cfg(workers=workers, on_corrupt="skip"))
    assert sorted(keys) == sorted(k for k in clean if k != key)  # only the damaged one is missing
    assert len(corrupt) == 1 and key in corrupt[0] and str(shard) in corrupt[0]

    val_shard = manifest.split("val").shards[0].path
    val_key = flip_image_bit(val_shard, nth=0)
    with pytest.raises(ShardError, match=f"sample {val_key} in shard {val_shard}"):
        list(eval_loader(manifest, "val", data_cfg(workers=workers), rank=0, world_size=1))
    loader = eval_loader(manifest, "val", data_cfg(workers=workers, on_corrupt="skip"), rank=0, world_size=1)
    seen = iter_keys(loader)
    assert len(seen) == manifest.split("val").count - 1 and val_key not in seen
    assert len(loader.skipped) == 1 and val_key in loader.skipped[0]


def test_label_damage_is_caught_by_the_cls_cross_check(clean_pack, tmp_path):
    """A json whose label digit changed (the image intact) disagrees with the sample's cls entry."""
    pack = copy_pack(clean_pack, tmp_path / "pack")
    manifest = Manifest.load(pack)
    shard = manifest.split("val").shards[0].path
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    meta = json.loads(samples[0]["json"])
    meta["label"] = (meta["label"] + 1) % 4
    samples[0]["json"] = json.dumps(meta).encode()
    write_shard(shard, [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in samples])
    with pytest.raises(ShardError, match=f"sample {samples[0]['__key__']} .*cls entry"):
        list(eval_loader(manifest, "val", data_cfg(), rank=0, world_size=1))


def test_too_much_damage_in_one_batch_is_an_error_even_with_skip(clean_pack, tmp_path):
    pack = copy_pack(clean_pack, tmp_path / "pack")
    manifest = Manifest.load(pack)
    shard = manifest.split("val").shards[0].path
    for nth in range(2):
        flip_image_bit(shard, nth)
    with pytest.raises(ShardError, match="2 of the 2 samples of one batch are damaged"):
        list(eval_loader(manifest, "val", data_cfg(eval_batch_size=2, on_corrupt="skip"), rank=0, world_size=1))


def make_format1(src: Path, dst: Path) -> Path:
    """`src` as bcc 0.x wrote it before format 2: no `cls` entry, no `stored_crc32`, format bcc-shards/1."""
    copy_pack(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data["format"] = "bcc-shards/1"
    for split in data["splits"].values():
        for entry in split["shards"]:
            path = dst / entry["path"]
            samples = []
            for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                meta = json.loads(s["json"])
                del meta["stored_crc32"]
                samples.append({"__key__": s["__key__"], "json": json.dumps(meta).encode(),
                                **{k: v for k, v in s.items() if k in IMAGE_KEYS}})
            write_shard(path, samples)
            entry["sha256"] = sha256_file(path)
            entry.pop("bytes", None)  # format 5 added it
            entry.pop("head_sha256", None)  # and format 6 this
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_format1_pack_trains_and_evaluates_unchecked_with_a_note(clean_pack, tmp_path):
    old = make_format1(clean_pack, tmp_path / "old")
    manifest = Manifest.load(old)
    assert manifest.format_version == 1 and not manifest.has_checksums
    key = flip_image_bit(manifest.split("train").shards[0].path)
    keys, corrupt = all_train_keys(manifest, data_cfg())  # a flipped bit in a JPEG decodes: unnoticed
    assert key in keys and corrupt == []

    cfg = write_config(tmp_path / "c.yaml", old, tmp_path / "run", train={"epochs": 1})
    proc = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "pack format 1" in notes[0] and "no checksum" in notes[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "acc" in summary["val"] and "acc" in summary["test"]


def test_entry_point_names_a_damaged_sample_and_a_truncated_shard(clean_pack, tmp_path):
    """One `error:` line naming shard and key, exit 2, no DataLoader-worker traceback (2 loader workers)."""
    pack = copy_pack(clean_pack, tmp_path / "pack")
    manifest = Manifest.load(pack)
    shard = manifest.split("train").shards[2].path
    key = flip_image_bit(shard)
    cfg = write_config(tmp_path / "c.yaml", pack, tmp_path / "run", train={"epochs": 1}, data={"workers": 2})
    cmd = [sys.executable, "-m", "bcc.train", "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"sample {key} in shard {shard}" in errors[0] and "checksum" in errors[0]

    other = manifest.split("train").shards[0].path
    other.write_bytes(other.read_bytes()[: other.stat().st_size // 2])  # truncated in the middle
    proc = subprocess.run([*cmd, "run.dir=" + str(tmp_path / "run2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(other) in errors[0] or str(shard) in errors[0]  # whichever the stream reaches first


def test_skip_keeps_two_ranks_in_step_and_counts_per_epoch(clean_pack, tmp_path):
    """2-process DDP with data.on_corrupt=skip: both ranks run the same steps, the run log counts the
    damaged sample in each epoch (nothing is dropped: 64 = 2 ranks x 2 batches x 16), a warning names it."""
    pack = copy_pack(clean_pack, tmp_path / "pack")
    manifest = Manifest.load(pack)
    key = flip_image_bit(manifest.split("train").shards[1].path)
    cfg = write_config(tmp_path / "c.yaml", pack, tmp_path / "run", train={"epochs": 2, "log_every": 1},
                       data={"workers": 1, "on_corrupt": "skip"})
    proc = launch(cfg, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["steps"] for r in summary["ranks"]] == [4, 4]
    assert len({r["weights_sha256"] for r in summary["ranks"]}) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["skipped_corrupt"]) for r in rows if "skipped_corrupt" in r] == [(1, 1), (2, 1)]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and key in line]
    assert len(warnings) == 2, proc.stderr[-3000:]
