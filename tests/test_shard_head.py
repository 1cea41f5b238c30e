"""A shard replaced behind an unchanged manifest.json (issue 12 F10): another seed's pack copied over one
shard, two shards swapped. Sizes agree (tar pads them), so the start-up size check passes; the manifest's
per-shard `head_sha256` (format 6) lets the stream refuse the shard before any of its samples, with one
`error:` line naming split and shard. Older manifests (no `head_sha256`) still read, unchecked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from test_remote import serve

from bcc.manifest import Manifest
from bcc.shards import HEAD_BYTES, ShardReplacedError, read_range
from bcc.verify import verify_shards

from conftest import write_config
from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests


@pytest.fixture(scope="module")
def other_seed(synth_data, tmp_path_factory) -> Path:
    """`synth_data` packed as `synth_shards` is, but with another seed: same shard names and sizes."""
    from bcc.pack import pack_folders

    out = tmp_path_factory.mktemp("seed1") / "shards"
    pack_folders(synth_data, out, split=(0.7, 0.15, 0.15), seed=1, min_shards=4)
    return out


@pytest.fixture
def pack(synth_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    return out


def replace(pack: Path, other: Path, name: str) -> Path:
    """Copy `other`'s shard `name` over `pack`'s (the same size: what a size check cannot see)."""
    assert (pack / name).stat().st_size == (other / name).stat().st_size
    assert (pack / name).read_bytes() != (other / name).read_bytes()
    shutil.copyfile(other / name, pack / name)
    return pack / name


def swap(pack: Path, a: str, b: str) -> None:
    assert (pack / a).stat().st_size == (pack / b).stat().st_size
    (pack / a).rename(pack / "tmp")
    (pack / b).rename(pack / a)
    (pack / "tmp").rename(pack / b)


def one_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def forget_heads(pack: Path) -> None:
    """`pack`'s manifest as format 5 wrote it: no head_sha256."""
    data = json.loads((pack / "manifest.json").read_text())
    data["format"] = "bcc-shards/5"
    for split in data["splits"].values():
        for entry in split["shards"]:
            del entry["head_sha256"]
    (pack / "manifest.json").write_text(json.dumps(data))


def test_pack_records_each_shards_head(synth_shards):
    data = json.loads((synth_shards / "manifest.json").read_text())
    assert data["format"] == "bcc-shards/6"
    sizes = set()
    for name, split in data["splits"].items():
        for entry in split["shards"]:
            raw = (synth_shards / entry["path"]).read_bytes()
            assert entry["head_sha256"] == hashlib.sha256(raw[:HEAD_BYTES]).hexdigest()
            sizes.add(len(raw) > HEAD_BYTES)
        for shard in Manifest.load(synth_shards).split(name).shards:
            assert shard.head_sha256 and shard.split == name
    assert sizes == {True, False}  # shards above and below the head's size


@pytest.mark.parametrize("how", ["other_seed", "swapped"])
def test_train_stops_on_a_replaced_shard(pack, other_seed, tmp_path, bcc_main, how):
    if how == "other_seed":
        bad = [replace(pack, other_seed, "train-000001.tar")]
    else:
        swap(pack, "train-000000.tar", "train-000002.tar")
        bad = [pack / "train-000000.tar", pack / "train-000002.tar"]
    cfg = write_config(tmp_path / "cfg.yaml", pack, tmp_path / "run", train={"epochs": 1})
    line = one_error(bcc_main("train", "--config", cfg, "data.workers=2"))
    assert "split 'train'" in line and "is not the shard the manifest lists" in line, line
    assert any(f"shard {p} " in line for p in bad) and "repack" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # no epoch finished on the wrong images


def test_eval_stops_on_a_replaced_test_shard(pack, other_seed, trained_run, bcc_main):  # noqa: F811
    bad = replace(pack, other_seed, "test-000002.tar")
    line = one_error(bcc_main("eval", "--checkpoint", trained_run, "--data", pack, "--workers", "0"))
    assert f"split 'test': shard {bad} is not the shard the manifest lists" in line, line


def test_an_old_manifest_without_heads_still_trains(pack, other_seed, tmp_path):
    """No head_sha256 (format <= 5): read unchecked, as before; trained through `bcc train` by
    tests/test_corrupt.py's format-1 test, here through the stream the trainer uses."""
    from bcc.config import DataConfig
    from bcc.stream import eval_loader, iter_keys, train_loader

    replace(pack, other_seed, "train-000001.tar")
    replace(pack, other_seed, "val-000000.tar")
    forget_heads(pack)
    manifest = Manifest.load(pack)
    assert all(sh.head_sha256 is None for name in manifest.splits for sh in manifest.split(name).shards)
    cfg = DataConfig(image_size=32, batch_size=16, eval_batch_size=16, workers=0, shuffle_buffer=0)
    loader = train_loader(manifest, cfg, seed=0, epoch=0, rank=0, world_size=1)
    assert len(iter_keys(list(loader))) == len(loader) * 16
    assert len(iter_keys(eval_loader(manifest, "val", cfg, rank=0, world_size=1))) == manifest.split("val").count


def test_a_replaced_shard_over_http_and_pipe_is_refused_before_any_sample(pack, other_seed):
    bad = replace(pack, other_seed, "train-000003.tar")
    with serve(pack) as (_server, url):
        shard = next(sh for sh in Manifest.load(url).split("train").shards if str(sh.path).endswith("-000003.tar"))
        got = []
        with pytest.raises(ShardReplacedError, match=r"split 'train': shard http://127\.0\.0\.1:\d+/train-000003\.tar "
                                                     "is not the shard the manifest lists"):
            got.extend(read_range(shard))
        assert got == []
    piped = dataclasses.replace(shard, path=f"pipe:cat {bad}")
    with pytest.raises(ShardReplacedError, match="is not the shard the manifest lists"):
        got.extend(read_range(piped))
    assert got == []
    good = dataclasses.replace(piped, path=f"pipe:cat {other_seed / 'train-000003.tar'}",
                               head_sha256=hashlib.sha256((other_seed / "train-000003.tar").read_bytes()[:HEAD_BYTES]).hexdigest())
    assert len(list(read_range(good))) == good.count  # the right head reads through, put back in front


def test_a_lane_starting_inside_a_shard_checks_its_head_too(pack, other_seed):
    """A local lane that seeks to sample lo > 0 never reads the head on its way: it is read (pread) anyway."""
    replace(pack, other_seed, "train-000000.tar")
    shard = Manifest.load(pack).split("train").shards[0]
    with pytest.raises(ShardReplacedError):
        next(read_range(shard, lo=shard.count - 2))


def test_pack_verify_checks_the_head(pack, other_seed):
    data = json.loads((pack / "manifest.json").read_text())
    entry = data["splits"]["val"]["shards"][1]
    entry["head_sha256"] = "0" * 64  # the shard is the packed one, its fingerprint is not
    (pack / "manifest.json").write_text(json.dumps(data))
    replace(pack, other_seed, "train-000001.tar")
    bad = {Path(c.path).name: c for c in verify_shards(pack).mismatches}
    assert set(bad) == {"train-000001.tar", entry["path"]}
    assert "head_sha256" in bad[entry["path"]].detail and "training refuses" in bad[entry["path"]].detail
    assert "sha256" in bad["train-000001.tar"].detail and "head_sha256" in bad["train-000001.tar"].detail


def test_the_head_check_costs_one_small_hash_per_open(synth_shards):
    """Opening a shard with and without its head checked: the difference is one pread + sha256 of 64 KiB."""
    shard = next(sh for sh in Manifest.load(synth_shards).split("train").shards)
    unchecked = dataclasses.replace(shard, head_sha256=None)

    def per_open(sh, n=200):
        start = time.perf_counter()
        for _ in range(n):
            next(read_range(sh, hi=1))
        return (time.perf_counter() - start) / n

    per_open(shard, 20)
    extra = min(per_open(shard) for _ in range(3)) - min(per_open(unchecked) for _ in range(3))
    assert extra < 2e-3, extra  # ~0.05 ms measured; a generous bound for a loaded machine
