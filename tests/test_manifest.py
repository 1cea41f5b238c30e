import json

import pytest

from bcc.manifest import Manifest, ManifestError, ManifestNotFoundError
from bcc.pack import pack_folders
from bcc.taxonomy import Taxonomy


@pytest.fixture
def packed(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 10, "Early": 10})
    return pack_folders(src, tmp_path / "out", shard_size=3, min_shards=1, seed=2).out


def test_load(packed):
    m = Manifest.load(packed)
    assert m.root == packed.resolve()
    assert m.taxonomy == Taxonomy.default()
    assert m.classes == ("Benign", "early Pre-B", "Pre-B", "Pro-B")
    assert m.splits == ("train", "val", "test")
    assert m.options["seed"] == 2 and m.options["shard_size"] == 3
    train = m.split("train")
    assert train.name == "train" and train.count == 16
    assert train.class_counts == {"Benign": 8, "early Pre-B": 8, "Pre-B": 0, "Pro-B": 0}
    assert sum(s.count for s in train.shards) == 16 and len(train.shards) == 6
    for shard in train.shards:
        assert shard.path.is_absolute() and shard.path.is_file() and len(shard.sha256) == 64
    assert Manifest.load(packed / "manifest.json").split("val").count == 2


def test_unknown_split_lists_available(packed):
    with pytest.raises(ManifestError, match="'dev'.*train, val, test"):
        Manifest.load(packed).split("dev")


def test_errors_name_the_file(tmp_path, packed):
    with pytest.raises(ManifestNotFoundError, match=str(tmp_path / "nope" / "manifest.json")):
        Manifest.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="bad/manifest.json is not valid JSON"):
        Manifest.load(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(ManifestError, match="bad/manifest.json is not a bcc-shards manifest"):
        Manifest.load(bad)
    data = json.loads((packed / "manifest.json").read_text())
    del data["splits"]["train"]["count"]
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.load(bad)


def test_format_versions(tmp_path, packed):
    """A pack is `bcc-shards/6`; every earlier version still loads (without per-sample checksums); a
    newer one is refused by name, as is a version that is not a number."""
    m = Manifest.load(packed)
    assert m.data["format"] == "bcc-shards/6" and m.format_version == 6 and m.has_checksums
    data = json.loads((packed / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for fmt, version in (("bcc-shards/1", 1), ("bcc-shards/2", 2), ("bcc-shards/3", 3), ("bcc-shards/4", 4),
                        ("bcc-shards/5", 5), ("bcc-shards/6", 6)):
        (old / "manifest.json").write_text(json.dumps({**data, "format": fmt}))
        v = Manifest.load(old)
        assert v.format_version == version and v.has_checksums == (version >= 2)
    (old / "manifest.json").write_text(json.dumps({**data, "format": "bcc-shards/7"}))
    with pytest.raises(ManifestError, match="bcc-shards/7, written by a newer bcc; this bcc reads up to bcc-shards/6"):
        Manifest.load(old)
    for bad in ("bcc-shards/0", "bcc-shards/v2", "bcc-shards/", 2):
        (old / "manifest.json").write_text(json.dumps({**data, "format": bad}))
        with pytest.raises(ManifestError, match="is not a bcc-shards manifest"):
            Manifest.load(old)
