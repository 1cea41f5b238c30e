"""bcc.pack and `bcc pack`: shard round trips, determinism, split rules, bad input, safe output."""

import hashlib
import io
import json
import os
import subprocess
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from bcc import pack as pack_mod
from bcc import pack_pool
from bcc.pack import PackError, pack_folders
from bcc.shards import shard_sizes
from bcc.taxonomy import Taxonomy, TaxonomyError
from bcc.verify import verify_shards

from conftest import image_bytes

FOLDERS = {"Benign": 6, "Early": 8, "Pre": 7, "Pro": 9}


def bcc(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "bcc", "pack", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            h.update(p.read_bytes() + f"{st.st_mtime_ns} {st.st_mode}".encode())
    return h.hexdigest()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def split_of(manifest: dict) -> dict[str, str]:
    """source path -> split, read back from the shards' json."""
    out = {}
    root = Path(manifest["_root"])
    for name, s in manifest["splits"].items():
        for shard in s["shards"]:
            for sample in wds.WebDataset(str(root / shard["path"]), shardshuffle=False, empty_check=False):
                out[json.loads(sample["json"])["source"]] = name
    return out


def load_manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m["_root"] = str(out)
    return m


def test_round_trip_through_cli(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", FOLDERS)
    (src / "Pre" / "nested").mkdir()
    (src / "Pre" / "nested" / "deep.png").write_bytes(image_bytes(99, 48, "PNG"))
    (src / "Pre" / ".DS_Store").write_bytes(b"junk")  # hidden: not read, listed as skipped
    before = tree_digest(src)
    out = tmp_path / "out"
    proc = bcc(src, out, "--seed", 3, "--shard-size", 5, "--workers", 2, check_rc=0)
    assert "img/s" in proc.stdout and "train" in proc.stdout
    assert tree_digest(src) == before  # SRC untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no tmp left behind

    m = load_manifest(out)
    assert m["format"] == "bcc-shards/6" and m["classes"] == list(Taxonomy.default().class_names)
    assert m["skipped"] == [{"path": "Pre/.DS_Store", "reason": "hidden (its name starts with '.'), not read"}]
    assert m["converted"] == [] and m["source"] == str(src.resolve())
    taxonomy = Taxonomy.from_dict(m["taxonomy"])
    total = sum(FOLDERS.values()) + 1
    assert sum(s["count"] for s in m["splits"].values()) == total
    seen = set()
    for name, s in m["splits"].items():
        assert sum(sh["count"] for sh in s["shards"]) == s["count"] == sum(s["class_counts"].values())
        class_counts = defaultdict(int)
        for shard in s["shards"]:
            path = out / shard["path"]
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            names = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True,
                                   check=True).stdout.split()
            assert len(names) == 3 * shard["count"]  # image, json, cls
            samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
            assert len(samples) == shard["count"]
            for sample in samples:
                assert sample["__key__"].startswith(f"{name}-") and len(sample["__key__"]) == len(name) + 9
                meta = json.loads(sample["json"])
                ext = "png" if meta["source"].endswith(".png") else "jpg"
                assert sample[ext] == (src / meta["source"]).read_bytes()  # unchanged bytes
                assert meta["sha256"] == hashlib.sha256(sample[ext]).hexdigest()
                assert meta["stored_crc32"] == f"{zlib.crc32(sample[ext]):08x}"
                assert sample["cls"] == str(meta["label"]).encode()
                cls = taxonomy.resolve_folder(meta["folder"])
                assert meta["label"] == cls and meta["class"] == taxonomy.class_names[cls]
                assert {h: meta[h] for h in taxonomy.head_names} == taxonomy.targets(cls)
                class_counts[meta["class"]] += 1
                seen.add(meta["source"])
        assert {c: n for c, n in s["class_counts"].items() if n} == dict(class_counts)
    assert len(seen) == total

    info = json.loads((out / "_info.json").read_text())
    for name, s in m["splits"].items():
        assert info["splits"][name]["num_samples"] == s["count"]
        assert info["splits"][name]["filenames"] == [sh["path"] for sh in s["shards"]]
        assert info["splits"][name]["shard_lengths"] == [sh["count"] for sh in s["shards"]]

    # verify: OK, then a flipped byte is caught
    assert "MISMATCH" not in bcc("--verify", out, check_rc=0).stdout
    victim = out / m["splits"]["train"]["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = bcc("--verify", out, check_rc=1)
    assert "MISMATCH" in proc.stdout and victim.name in proc.stdout

    # OUT is not empty now: refused, then replaced with --overwrite
    proc = bcc(src, out, check_rc=2)
    assert str(out) in proc.stderr and "Traceback" not in proc.stderr
    bcc(src, out, "--overwrite", check_rc=0)
    assert verify_shards(out).ok


def test_timm_reads_info(tmp_path, make_class_tree):
    import timm.data as timm_data  # a core dependency: never skipped
    src = make_class_tree(tmp_path / "src", FOLDERS)
    pack_folders(src, tmp_path / "out", shard_size=4)
    m = load_manifest(tmp_path / "out")
    ds = timm_data.create_dataset("wds/out", root=str(tmp_path / "out"), split="train", target_key="label")
    assert len(ds) == m["splits"]["train"]["count"]
    labels = [int(t) for _, t in ds]
    assert len(labels) == m["splits"]["train"]["count"] and set(labels) <= {0, 1, 2, 3}


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 20, "Early": 20, "Pre": 20, "Pro": 20})
    a = pack_folders(src, tmp_path / "a", seed=7, shard_size=10, min_shards=1)
    b = pack_folders(src, tmp_path / "b", seed=7, shard_size=10, min_shards=1, workers=2)  # worker count must not matter
    c = pack_folders(src, tmp_path / "c", seed=8, shard_size=10, min_shards=1)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a.manifest["splits"] == b.manifest["splits"]
    assert split_of(load_manifest(tmp_path / "a")) != split_of(load_manifest(tmp_path / "c"))
    assert c.manifest["splits"]["train"]["count"] == 64  # exact: 0.8 of 20 per class
    # every shard mixes classes
    for s in a.manifest["splits"].values():
        for shard in s["shards"]:
            labels = {json.loads(x["json"])["label"] for x in wds.WebDataset(
                str(tmp_path / "a" / shard["path"]), shardshuffle=False, empty_check=False)}
            assert len(labels) > 1


def test_duplicates_and_groups_never_straddle_splits(tmp_path):
    src = tmp_path / "src"
    for folder in ("Benign", "Pre", "Pro"):
        (src / folder).mkdir(parents=True)
    seed = 0
    for folder in ("Benign", "Pre", "Pro"):
        for patient in range(8):
            for k in range(1 + patient % 3):  # groups of 1-3 images
                seed += 1
                (src / folder / f"P{folder}{patient:02d}_{k}.jpg").write_bytes(image_bytes(seed))
        for i in range(15):
            seed += 1
            (src / folder / f"solo{i:02d}.jpg").write_bytes(image_bytes(seed))
    for i in range(3):  # exact copies within a class
        (src / "Pro" / f"copy{i}.jpg").write_bytes((src / "Pro" / f"solo{i:02d}.jpg").read_bytes())
    conflict = (src / "Benign" / "solo00.jpg").read_bytes()
    (src / "Pre" / "conflict.jpg").write_bytes(conflict)  # same content in two classes

    fractions = (0.6, 0.2, 0.2)
    for s in range(3):
        result = pack_folders(src, tmp_path / f"out{s}", seed=s, split=fractions, group_regex=r"^(P\w+?)_")
        m = load_manifest(tmp_path / f"out{s}")
        where = split_of(m)
        groups = defaultdict(set)
        for path, split in where.items():
            name = Path(path).name
            if name.startswith("P"):
                groups[name.split("_")[0]].add(split)
        assert groups and all(len(v) == 1 for v in groups.values())
        dups = {tuple(d["paths"]): d for d in m["duplicates"]}
        assert ("Benign/solo00.jpg", "Pre/conflict.jpg") in dups
        assert dups[("Benign/solo00.jpg", "Pre/conflict.jpg")]["conflict"] is True
        assert any("different classes" in w for w in m["warnings"])
        for d in m["duplicates"]:
            assert {where[p] for p in d["paths"]} == {d["split"]}
        # per-class proportions within one unit (the largest group, 3 images) of the request
        for cls in ("Benign", "Pre-B", "Pro-B"):
            n = sum(s["class_counts"][cls] for s in m["splits"].values())
            for name, f in zip(("train", "val", "test"), fractions, strict=True):
                assert abs(m["splits"][name]["class_counts"][cls] - n * f) <= 3
        assert result.counts["duplicates"] == 4


def test_bad_inputs_are_skipped_with_reasons(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 4, "Early": 4, "Pre": 4})
    (src / "Pro").mkdir()  # empty class folder -> warning
    b = src / "Benign"
    (b / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (b / "truncated.jpg").write_bytes(image_bytes(5, 64)[:300])
    (b / "notes.txt").write_text("not an image")
    (b / "empty.jpg").write_bytes(b"")
    (b / "big.png").write_bytes(image_bytes(6, 80, "PNG"))  # 6400 px > --max-pixels 5000
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes(7))
    (b / "link.jpg").symlink_to(outside)
    (b / "inside.jpg").symlink_to(src / "Early" / "img0000.jpg")  # inside SRC: packed (a duplicate)
    e = src / "Early"
    (e / "gray.png").write_bytes(image_bytes(8, 32, "PNG", "L"))
    (e / "rgba.png").write_bytes(image_bytes(9, 32, "PNG", "RGBA"))
    (e / "palette.png").write_bytes(image_bytes(10, 32, "PNG", "P"))
    (e / "cmyk.jpg").write_bytes(image_bytes(11, 32, "JPEG", "CMYK"))
    Image.new("I;16", (32, 32), 40000).save(e / "deep16.png")
    expected = {
        "Benign/corrupt.jpg": "corrupt image",
        "Benign/truncated.jpg": "corrupt image",
        "Benign/notes.txt": "non-image file",
        "Benign/empty.jpg": "zero-byte file",
        "Benign/big.png": "decompression bomb",
        "Benign/link.jpg": "symlink outside SRC",
    }
    before = tree_digest(src)
    out = tmp_path / "out"
    proc = bcc(src, out, "--max-pixels", 5000, "--strict", check_rc=2)
    for path in expected:
        assert path in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["outside.jpg", "src"]

    proc = bcc(src, out, "--max-pixels", 5000, check_rc=0)
    assert "skipped" in proc.stdout
    m = load_manifest(out)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(expected)
    for path, reason in expected.items():
        assert reasons[path].startswith(reason), reasons[path]
    assert reasons["Benign/big.png"] == "decompression bomb: 6400 pixels > limit 5000"
    assert {c["path"]: c["mode"] for c in m["converted"]} == {
        "Early/gray.png": "L", "Early/rgba.png": "RGBA", "Early/palette.png": "P",
        "Early/cmyk.jpg": "CMYK", "Early/deep16.png": "I;16"}
    assert any("'Pro'" in w and "empty" in w for w in m["warnings"])
    assert sum(s["count"] for s in m["splits"].values()) == 12 + 1 + 5
    assert tree_digest(src) == before

    # converted images are stored as 8-bit RGB PNG, lossy sources too (the stored pixels are decode_rgb's)
    stored = {}
    for s in m["splits"].values():
        for shard in s["shards"]:
            for x in wds.WebDataset(str(out / shard["path"]), shardshuffle=False, empty_check=False):
                meta = json.loads(x["json"])
                ext = next(k for k in x if k not in ("__key__", "__url__", "__local_path__", "json", "cls"))
                stored[meta["source"]] = (ext, x[ext])
    for path in ("Early/gray.png", "Early/rgba.png", "Early/palette.png", "Early/deep16.png", "Early/cmyk.jpg"):
        assert stored[path][0] == "png"
    for _ext, data in stored.values():
        assert Image.open(io.BytesIO(data)).mode == "RGB"
    deep = Image.open(io.BytesIO(stored["Early/deep16.png"][1]))
    assert deep.getpixel((0, 0)) == (40000 >> 8,) * 3  # scaled, not clipped to white


def _denied(real, locked):
    """`real` (a function of a path) raising a permission error for `locked`: simulated, since the suite
    may run as root, who can read anything."""
    def call(path, *args):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    return call


def test_unreadable_file_is_skipped(tmp_path, make_class_tree, monkeypatch):
    src = make_class_tree(tmp_path / "src", {"Benign": 3})
    monkeypatch.setattr(pack_pool, "read_file", _denied(pack_pool.read_file, src / "Benign" / "img0000.jpg"))
    m = pack_folders(src, tmp_path / "out").manifest
    assert m["skipped"] == [{"path": "Benign/img0000.jpg", "reason": "unreadable: Permission denied"}]
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] + m["splits"]["test"]["count"] == 2


def test_unreadable_sub_folder_is_a_reported_skip(tmp_path, make_class_tree, monkeypatch):
    """A folder that cannot be listed is named in `skipped`, not passed over (os.walk's default silently
    dropped it and every image below it)."""
    import os

    src = make_class_tree(tmp_path / "src", {"Benign": 2, "Pro": 2})
    make_class_tree(src / "Benign", {"day2": 2})
    monkeypatch.setattr(os, "scandir", _denied(os.scandir, src / "Benign" / "day2"))
    m = pack_folders(src, tmp_path / "out").manifest
    assert m["skipped"] == [{"path": "Benign/day2", "reason": "unreadable folder: Permission denied"}]
    assert sum(m["splits"][k]["count"] for k in ("train", "val", "test")) == 4


def test_a_killed_packer_takes_its_workers_with_it():
    """SIGKILL (or an unhandled SIGTERM) of `bcc pack` left its pool's workers waiting for tasks for good;
    they now end with it (PR_SET_PDEATHSIG, Linux)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux's")
    # also: a worker's start-up imports no torch (the parent-death helper once pulled it in: ~1 s of CPU
    # and ~650 MiB RSS per pack worker); the initializer runs in every worker before its first task
    torch_in = "sorted(m for m in __import__('sys').modules if m.split('.')[0] in ('torch', 'torchvision'))"
    code = ("import time\nfrom bcc.pack_pool import _start_pool\npool = _start_pool(2)\n"
            f"print(pool.submit(eval, {torch_in!r}).result(), flush=True)\ntime.sleep(0.5)\n"
            "print(' '.join(str(p) for p in pool._processes), flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "[]", "a pack worker imported torch"
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [w for w in workers if running(w)]
    assert not alive, f"pack workers {alive} outlived the killed packer"


def test_unknown_folder_fails_before_work(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 2, "Weird": 2})
    proc = bcc(src, tmp_path / "out", check_rc=2)
    assert "'Weird'" in proc.stderr and "'Benign'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(TaxonomyError, match="Weird"):
        pack_folders(src, tmp_path / "out")


def test_custom_taxonomy_and_resize(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"polyps": 5, "Esophagitis": 5}, size=48)
    kvasir = Path(__file__).resolve().parents[1] / "configs" / "taxonomy" / "kvasir.yaml"
    bcc(src, tmp_path / "out", "--taxonomy", kvasir, "--resize", 24, "--split", "0.6,0.4,0", check_rc=0)
    m = load_manifest(tmp_path / "out")
    assert len(m["classes"]) == 8 and m["options"]["resize"] == 24
    assert m["splits"]["test"] == {"count": 0, "class_counts": {c: 0 for c in m["classes"]}, "shards": []}
    for x in wds.WebDataset(str(tmp_path / "out" / m["splits"]["train"]["shards"][0]["path"]),
                            shardshuffle=False, empty_check=False):
        assert min(Image.open(io.BytesIO(x["jpg"])).size) == 24
        assert json.loads(x["json"])["finding"] == json.loads(x["json"])["label"]


def test_interrupted_pack_leaves_nothing(tmp_path, make_class_tree, monkeypatch):
    src = make_class_tree(tmp_path / "src", FOLDERS)
    calls = []

    def boom(task, stored):
        calls.append(task[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, stored)

    real = pack_pool._shard_samples
    monkeypatch.setattr(pack_pool, "_shard_samples", boom)
    with pytest.raises(KeyboardInterrupt):
        pack_folders(src, tmp_path / "out", shard_size=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    # with --overwrite, the old OUT survives an interrupted replacement untouched
    monkeypatch.setattr(pack_pool, "_shard_samples", real)
    pack_folders(src, tmp_path / "out", shard_size=5)
    old = shard_bytes(tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(pack_pool, "_shard_samples", boom)
    with pytest.raises(KeyboardInterrupt):
        pack_folders(src, tmp_path / "out", shard_size=5, seed=1, overwrite=True)
    assert shard_bytes(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # a killed pack (kill -9) leaves OUT.tmp-PID: the next pack to OUT removes it once PID is gone,
    # and leaves a running pack's alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(pack_pool, "_shard_samples", real)
    for pid in (dead, str(os.getppid())):
        (tmp_path / f"out.tmp-{pid}" / "_staging").mkdir(parents=True)
    pack_folders(src, tmp_path / "out", shard_size=5, seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", f"out.tmp-{os.getppid()}", "src"]


def test_refuses_non_empty_out_and_nested_paths(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 2})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        pack_folders(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(PackError, match="contain"):
        pack_folders(src, src / "Benign" / "out")
    (tmp_path / "empty").mkdir()
    pack_folders(src, tmp_path / "empty")  # an empty OUT is fine
    assert (tmp_path / "empty" / "manifest.json").is_file()


@pytest.mark.parametrize("bad", ["0.5,0.5", "0.8,0.3,-0.1", "0.5,0.2,0.2", "0,0.5,0.5", "a,b,c"])
def test_bad_split_rejected(tmp_path, bad):
    proc = bcc(tmp_path, tmp_path / "out", "--split", bad, check_rc=2)
    assert "--split" in proc.stderr


def test_group_regex_validated(tmp_path):
    assert "capturing group" in bcc(tmp_path, tmp_path / "o", "--group-regex", "P\\d+", check_rc=2).stderr
    assert "compile" in bcc(tmp_path, tmp_path / "o", "--group-regex", "(P", check_rc=2).stderr


def test_shard_sizes_balanced(tmp_path, make_class_tree):
    assert shard_sizes(0, 10, 4) == []
    assert shard_sizes(25, 10, 1) == [9, 8, 8]
    assert shard_sizes(10, 100, 4) == [3, 3, 2, 2]
    assert shard_sizes(3, 100, 8) == [1, 1, 1]
    src = make_class_tree(tmp_path / "src", {"Benign": 10, "Pro": 10})
    m = pack_folders(src, tmp_path / "out", shard_size=7, min_shards=3).manifest
    train = [s["count"] for s in m["splits"]["train"]["shards"]]
    assert train == [6, 5, 5]
    assert [s["count"] for s in m["splits"]["val"]["shards"]] == [1, 1]


# --------------------------------------------------------------------------- near-duplicates


def _smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random image (8x8 colour noise upsampled): its pHash is stable under re-encoding."""
    import random as _random

    rng = _random.Random(seed)
    small = Image.new("RGB", (8, 8))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64)])
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _plant_near_pair(src: Path) -> tuple[str, str]:
    """An image and its resized, re-encoded copy (different bytes) in one class; returns their sources."""
    original = _smooth_image(12345)
    original.save(src / "Pre" / "field_a.png")
    buf = io.BytesIO()
    original.resize((57, 57), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=80)
    (src / "Pre" / "field_a_reshot.jpg").write_bytes(buf.getvalue())
    return "Pre/field_a.png", "Pre/field_a_reshot.jpg"


def test_near_duplicates_never_straddle_splits_and_are_listed(tmp_path, make_class_tree):
    from bcc.neardup import hamming, phash

    src = make_class_tree(tmp_path / "src", {"Benign": 6, "Early": 6, "Pre": 8, "Pro": 6})
    for i in range(6):  # distinct smooth images too, so the pair is not the only image of its kind
        _smooth_image(i).save(src / "Pro" / f"smooth{i}.png")
    a, b = _plant_near_pair(src)
    assert (src / a).read_bytes() != (src / b).read_bytes()
    with Image.open(src / a) as ia, Image.open(src / b) as ib:
        assert hamming(phash(ia.convert("RGB")), phash(ib.convert("RGB"))) <= 6

    straddled = 0
    for seed in range(8):
        out = tmp_path / f"near{seed}"
        result = pack_folders(src, out, split=(0.4, 0.3, 0.3), seed=seed)
        m = load_manifest(out)
        where = split_of(m)
        assert where[a] == where[b], f"seed {seed}: the near-duplicate pair straddles splits"
        assert [g["paths"] for g in m["near_duplicates"]] == [[a, b]]
        assert m["near_duplicates"][0]["split"] == where[a] and m["near_duplicates"][0]["max_distance"] <= 6
        assert m["options"]["near_dup_threshold"] == 6 and m["options"]["imagehash"]
        assert result.counts["near_duplicate_groups"] == 1
        off = tmp_path / f"off{seed}"
        pack_folders(src, off, split=(0.4, 0.3, 0.3), seed=seed, near_dup_threshold=None)
        where_off = split_of(load_manifest(off))
        straddled += where_off[a] != where_off[b]
        assert "near_duplicates" not in load_manifest(off)
    assert straddled > 0  # without the grouping the pair does land in two splits for some seed

    # the CLI: default on, --no-near-dup off, --near-dup-threshold 0 still groups nothing here
    proc = bcc(src, tmp_path / "cli", "--seed", 1, check_rc=0)
    assert "1 near-duplicate groups" in proc.stdout
    bcc(src, tmp_path / "cli_off", "--no-near-dup", check_rc=0)
    m = load_manifest(tmp_path / "cli_off")
    assert m["options"]["near_dup_threshold"] is None and "near_duplicates" not in m
    bcc(src, tmp_path / "cli_bad", "--near-dup-threshold", "40", check_rc=2)


def test_near_duplicates_across_classes_are_conflicts(tmp_path, make_class_tree):
    """The same field filed under two classes (re-encoded): grouped, and flagged like identical files."""
    src = make_class_tree(tmp_path / "src", {"Benign": 4, "Early": 4, "Pre": 4, "Pro": 4}, size=16)
    a, b = _plant_near_pair(src)
    (src / b).rename(src / "Pro" / "field_a_reshot.jpg")
    result = pack_folders(src, tmp_path / "out", split=(0.5, 0.25, 0.25), seed=0)
    (group,) = load_manifest(tmp_path / "out")["near_duplicates"]
    assert group["paths"] == [a, "Pro/field_a_reshot.jpg"] and group["conflict"] is True
    assert result.counts["near_duplicate_conflicts"] == 1


def test_near_dup_options_agree_and_do_not_contradict(tmp_path, capsys):
    from bcc.cli import main

    for value in ("64", "-1"):
        with pytest.raises(SystemExit):
            main(["pack", "src", str(tmp_path / "o"), "--near-dup-threshold", value])
        assert "--no-near-dup" in capsys.readouterr().err and "-1 to switch" not in value
    assert main(["pack", "src", str(tmp_path / "o"), "--no-near-dup", "--near-dup-threshold", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: --no-near-dup and --near-dup-threshold 3 contradict each other" in err
    assert not (tmp_path / "o").exists()


def _messy_tree(tmp_path, make_class_tree) -> Path:
    """A small tree with one of each per-file list entry: a near pair, an exact copy, a converted image
    (re-encoded through the staging folder) and a skipped file."""
    src = make_class_tree(tmp_path / "src", {"Benign": 6, "Early": 6, "Pre": 6, "Pro": 6})
    _plant_near_pair(src)
    (src / "Pro" / "copy.jpg").write_bytes((src / "Benign" / "img0001.jpg").read_bytes())
    (src / "Early" / "grey.png").write_bytes(image_bytes(77, 32, "PNG", "L"))
    (src / "Pre" / "notes.txt").write_text("not an image")
    return src


def test_workers_do_not_change_a_byte(tmp_path, make_class_tree, monkeypatch):
    """--workers 1 and 2 give byte-identical shards, side files and manifest (apart from `created`),
    with every per-file list in a side file, folds, a staged conversion and shards written out of order;
    so does a listing fed to the first pass in walk order, which here differs from the sorted order the
    split uses (files beside subfolders, "a b/" sorting before "a/"): the same bytes as a sorted listing."""
    from bcc import imageio
    from bcc import manifest as manifest_mod

    src = _messy_tree(tmp_path, make_class_tree)
    for sub, name in (("a", "img0002.jpg"), ("a b", "img0003.jpg")):
        (src / "Benign" / sub).mkdir()
        (src / "Benign" / name).rename(src / "Benign" / sub / name)
    monkeypatch.setattr(manifest_mod, "LIST_INLINE", 0)
    outs = {}
    for workers in (1, 2, "sorted"):
        if workers == "sorted":  # the listing as before the overlap: all of it, sorted, then the pass
            monkeypatch.setattr(pack_mod, "iter_class_folders",
                                lambda *a: iter(sorted(imageio.iter_class_folders(*a), key=lambda e: e.rel)))
        out = tmp_path / f"w{workers}" / "data"  # the name goes into _info.json
        pack_folders(src, out, seed=4, shard_size=3, min_shards=2, folds=2, workers=2 if workers == "sorted" else workers)
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        outs[workers]["manifest.json"] = {k: v for k, v in json.loads(outs[workers]["manifest.json"]).items()
                                          if k != "created"}
    assert outs[1] == outs[2] == outs["sorted"]
    m = outs[1]["manifest.json"]
    for key in ("skipped", "converted", "duplicates", "near_duplicates"):
        assert m[key] == {"file": f"{key}.jsonl", "count": 1,
                          "sha256": hashlib.sha256(outs[1][f"{key}.jsonl"]).hexdigest()}, key
    assert not any(name.startswith(".") or "tmp" in name for name in outs[1])  # no shard temporaries left


def test_long_lists_go_to_hashed_side_files_and_read_back(tmp_path, monkeypatch, make_class_tree):
    from bcc import manifest as manifest_mod
    from bcc.manifest import Manifest, ManifestError

    src = _messy_tree(tmp_path, make_class_tree)
    inline = pack_folders(src, tmp_path / "inline", seed=0).manifest
    monkeypatch.setattr(manifest_mod, "LIST_INLINE", 0)
    pack_folders(src, tmp_path / "out", seed=0)
    m = Manifest.load(tmp_path / "out")
    for key in ("skipped", "converted", "duplicates", "near_duplicates"):
        assert isinstance(m.data[key], dict) and inline[key] and m.file_list(key) == inline[key], key
    assert [g["paths"] for g in m.near_duplicates()] == [["Pre/field_a.png", "Pre/field_a_reshot.jpg"]]

    side = tmp_path / "out" / "duplicates.jsonl"
    side.write_bytes(side.read_bytes().replace(b"Pro/copy.jpg", b"Pro/cope.jpg"))
    with pytest.raises(ManifestError, match="duplicates.jsonl does not match the sha256"):
        m.file_list("duplicates")
    proc = bcc("--verify", tmp_path / "out", check_rc=1)  # shards fine, one side file damaged
    assert "MISMATCH  duplicates.jsonl" in proc.stdout and "OK        skipped.jsonl" in proc.stdout
    side.unlink()
    with pytest.raises(ManifestError, match="cannot read .*duplicates.jsonl"):
        m.file_list("duplicates")
    # format 3 kept a long near-duplicate list in near_duplicates.json, a JSON list without a hash
    groups = m.near_duplicates()
    (tmp_path / "out" / "near_duplicates.json").write_text(json.dumps(groups))
    m.data["near_duplicates"] = {"file": "near_duplicates.json", "count": 1}
    assert m.near_duplicates() == groups


def test_each_source_is_read_once_and_its_first_pass_bytes_are_stored(tmp_path, make_class_tree, monkeypatch):
    """The write phase copies the bytes the first pass staged: every source is read exactly once, and a
    source edited or removed after the first pass changes nothing (the shard holds the bytes hashed);
    a staging file cut under the pack fails it naming the file, leaving nothing behind."""
    src = make_class_tree(tmp_path / "src", {"Benign": 3, "Early": 3})
    (src / "Early" / "grey.png").write_bytes(image_bytes(77, 32, "PNG", "L"))  # re-encoded, also staged
    edited, removed = src / "Early" / "img0001.jpg", src / "Benign" / "img0000.jpg"
    before = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.*")}
    reads = Counter()
    real_read, real_all = pack_pool.read_file, pack_mod._inspect_all

    def read(path, *args):
        reads[Path(path).relative_to(src).as_posix()] += 1
        return real_read(path, *args)

    def then_change(*args, **kwargs):
        records = real_all(*args, **kwargs)
        edited.write_bytes(edited.read_bytes()[:-3] + b"\0\0\0")
        removed.unlink()
        return records

    monkeypatch.setattr(pack_pool, "read_file", read)
    monkeypatch.setattr(pack_mod, "_inspect_all", then_change)
    m = pack_folders(src, tmp_path / "out", min_shards=1).manifest
    assert reads == dict.fromkeys(before, 1)
    stored = {}
    for s in m["splits"].values():
        for shard in s["shards"]:
            for x in wds.WebDataset(str(tmp_path / "out" / shard["path"]), shardshuffle=False, empty_check=False):
                meta = json.loads(x["json"])
                stored[meta["source"]] = (x.get("jpg") or x["png"], meta["sha256"])
    assert set(stored) == set(before)
    for rel, (data, sha) in stored.items():
        assert sha == hashlib.sha256(before[rel]).hexdigest()
        assert data == before[rel] or rel == "Early/grey.png"
    assert verify_shards(tmp_path / "out").ok
    assert not list(tmp_path.glob("out.tmp-*"))

    def then_cut(*args, **kwargs):
        records = real_all(*args, **kwargs)
        for staged in (tmp_path / f"out2.tmp-{os.getpid()}" / "_staging").iterdir():
            os.truncate(staged, 10)
        return records

    monkeypatch.setattr(pack_mod, "_inspect_all", then_cut)
    with pytest.raises(PackError, match=r"staging file .*_staging/\d+\.bin lost bytes"):
        pack_folders(src, tmp_path / "out2", min_shards=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_full_disk_while_staging_is_named(tmp_path, make_class_tree, monkeypatch):
    """The staged copy needs room for about one more output: a failed staging write stops the pack with
    one PackError naming the staging file and the reason, and leaves nothing behind."""
    src = make_class_tree(tmp_path / "src", {"Benign": 2})

    def full(path, mode="r", **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(pack_pool, "open", full, raising=False)  # the module's `open`, not the builtin
    with pytest.raises(PackError, match=r"cannot write the staging file .*_staging/\d+\.bin \(No space left on "
                       r"device\): the pack needs free room for one more copy of its output"):
        pack_folders(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_workers_value_is_named(tmp_path, make_class_tree):
    src = make_class_tree(tmp_path / "src", {"Benign": 2})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PackError, match=f"workers must be an integer >= 1, got {bad!r}"):
            pack_folders(src, tmp_path / "out", workers=bad)
    proc = bcc(src, tmp_path / "out", "--workers", "0", check_rc=2)
    assert "--workers" in proc.stderr and "'0'" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_pack_reports_the_ratios_through_the_cli(tmp_path):
    """`bcc bench pack` at tiny sizes: the table and the two goal lines (values are not asserted)."""
    proc = subprocess.run([sys.executable, "-m", "bcc", "bench", "pack", "--sizes", "16,40", "--workers", "2",
                           "--image-px", "16"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "240"},
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "40 images: throughput / (decode limit x workers) = " in proc.stdout
    assert "RSS 40/16 = " in proc.stdout and "load average" in proc.stdout


# --------------------------------------------------------------------------- format 2: checksums, cls


def test_stored_crc32_is_of_the_stored_bytes_after_resize_and_conversion(tmp_path, make_class_tree):
    """`sha256` is the source file's; `stored_crc32` is of what the shard holds, which differs after
    --resize or a conversion. A BMP (RGB, stored as-is before format 2) is stored as lossless PNG."""
    src = make_class_tree(tmp_path / "src", {"Benign": 3, "Early": 3, "Pre": 3, "Pro": 3}, size=40)
    (src / "Pro" / "grey.png").write_bytes(image_bytes(5, 40, "PNG", mode="L"))
    bmp = image_bytes(6, 40, "BMP")
    (src / "Pro" / "bitmap.bmp").write_bytes(bmp)
    for resize in (None, 24):
        out = tmp_path / f"out-{resize}"
        m = pack_folders(src, out, resize=resize, seed=1).manifest
        assert m["format"] == "bcc-shards/6"
        n = 0
        for s in m["splits"].values():
            for shard in s["shards"]:
                for x in wds.WebDataset(str(out / shard["path"]), shardshuffle=False, empty_check=False):
                    meta = json.loads(x["json"])
                    ext = next(k for k in ("jpg", "png", "webp") if k in x)
                    assert meta["stored_crc32"] == f"{zlib.crc32(x[ext]):08x}"
                    assert x["cls"] == str(meta["label"]).encode()
                    source = (src / meta["source"]).read_bytes()
                    assert meta["sha256"] == hashlib.sha256(source).hexdigest()
                    if resize or meta["source"] in ("Pro/grey.png", "Pro/bitmap.bmp"):
                        assert x[ext] != source  # re-encoded: the source hash could not check it
                    if meta["source"] == "Pro/bitmap.bmp":
                        assert ext == ("jpg" if resize else "png")
                        assert Image.open(io.BytesIO(x[ext])).tobytes() == Image.open(io.BytesIO(bmp)).tobytes() \
                            or resize
                    n += 1
        assert n == 14


def _timm_labels(out: Path, split: str) -> list[int]:
    from timm.data import create_dataset

    ds = create_dataset(f"wds/{out.name}", root=str(out), split=split)
    return [int(target) for _img, target in ds]


def test_timm_and_plain_webdataset_read_every_sample_with_its_label(tmp_path, make_class_tree, caplog):
    """timm's `create_dataset("wds/NAME", root, split)` (reads `cls` by default) and
    `WebDataset(url).decode("pil").to_tuple("jpg", "cls")` get every sample with the json's label."""
    src = make_class_tree(tmp_path / "src", {"Benign": 5, "Early": 6, "Pre": 7, "Pro": 8})
    out = tmp_path / "all4"
    m = pack_folders(src, out, seed=2, shard_size=4, split=(0.6, 0.2, 0.2)).manifest
    for split, s in m["splits"].items():
        want = []
        for shard in s["shards"]:
            for x in wds.WebDataset(str(out / shard["path"]), shardshuffle=False, empty_check=False):
                want.append(json.loads(x["json"])["label"])
        assert len(want) == s["count"] > 0
        caplog.clear()
        assert _timm_labels(out, split) == want  # manifest order: shards in order, samples in tar order
        assert "KeyError" not in caplog.text and "Ignoring" not in caplog.text

        urls = [str(out / sh["path"]) for sh in s["shards"]]
        pairs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls"))
        assert [int(c) for _img, c in pairs] == want
        assert all(isinstance(img, Image.Image) and img.size == (32, 32) for img, _ in pairs)


@pytest.mark.parametrize("files", [{}, {"Benign": []}, {"Benign": ["bad.jpg"], "Early": []}])
def test_source_without_a_usable_image_is_refused(tmp_path, files):
    """No images at all (an empty SRC, only empty class folders, only corrupt files) is a PackError naming
    SRC, and OUT is not written; an empty class folder next to full ones stays a warning (test above)."""
    src = tmp_path / "src"
    src.mkdir()
    for folder, names in files.items():
        (src / folder).mkdir()
        for name in names:
            (src / folder / name).write_bytes(b"not an image")
    with pytest.raises(PackError, match=f"SRC {src}: no (usable )?images"):
        pack_folders(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_shard_writer_gives_webdataset_tarwriters_bytes():
    """`bcc.tar_writer.TarStream` builds tar headers from a template (3x faster than tarfile's per-member
    work) and must give byte for byte what `wds.TarWriter` with the same mtime and owner gives: short
    ASCII names on the fast path, long and non-ASCII names through tarfile, empty and odd-sized data."""
    from bcc.tar_writer import TarStream

    keys = ["train-00000001", "x" * 97, "y" * 120, "caf\u00e9-1", "a/b-2"]
    samples = [{"__key__": key, "jpg": bytes(range(256)) * (k * 3), "json": b"{}" * (k * 200 + 1), "cls": b"3"}
               for k, key in enumerate(keys)]
    for batch in ([], samples[:1], samples):
        want, got = io.BytesIO(), io.BytesIO()
        writer = wds.TarWriter(want, encoder=False, mtime=0, user="bcc", group="bcc")
        for x in batch:
            writer.write(x)
        writer.close()
        stream = TarStream(got, 0, "bcc", "bcc")
        for x in batch:
            stream.write(x)
        stream.close()
        assert got.getvalue() == want.getvalue()


def test_pack_write_phase_samples_are_make_samples():
    """The write phase makes each sample's json from per-shard templates (no dict, no `json.dumps` a
    sample); it must be exactly `bcc.shards.make_sample`'s: names and sources with quotes, backslashes,
    control characters, DEL, non-ASCII and astral characters; with and without pHash and folds; classes
    with one and two heads' targets and none. (No head is named like a fixed key: test_taxonomy.)"""
    import numpy as np

    from bcc.pack_pool import _EXTS, _SampleMeta, _shard_samples
    from bcc.shards import make_sample

    targets = ({"binary": 0}, {"binary": 1, "subtype": 2}, {})

    odd = ["plain", 'q"uote', "back\\slash", "tab\tx", "caf\u00e9", "del\x7f", "\U0001f600", "a/b c.jpg"]
    n = 24
    rng = np.random.default_rng(0)
    cols = {"label": np.arange(n) % 3, "folder": np.arange(n) % len(odd), "ext": 1 + np.arange(n) % len(_EXTS),
            "stage": np.zeros(n, int), "offset": np.arange(n) * 7, "length": np.arange(n) % 5,
            "phash": rng.integers(0, 2 ** 63, n, dtype=np.uint64), "fold": np.arange(n) % 4 - 1,
            "sha": rng.integers(0, 256, (n, 32), dtype=np.uint8)}
    sources = [f"{odd[i % len(odd)]}/{odd[(i * 5) % len(odd)]}{i}" for i in range(n)]
    for phash in (True, False):
        meta = _SampleMeta(tuple(odd[:3]), tuple(odd), targets, phash, 3)
        task = ("x.tar", [], "train", 40, cols, sources, meta)
        got = list(_shard_samples(task, lambda stage, offset, length: bytes([offset % 256]) * length))
        for j, (key, members) in enumerate(got):
            label, fold = int(cols["label"][j]), int(cols["fold"][j])
            want_meta = {"class": odd[label], "folder": odd[int(cols["folder"][j])], "source": sources[j],
                         "sha256": cols["sha"][j].tobytes().hex(), "label": label, **targets[label]}
            if phash:
                want_meta["phash"] = f"{int(cols['phash'][j]):016x}"
            if fold >= 0:
                want_meta["fold"] = fold
            want = make_sample(f"train-{40 + j:08d}", _EXTS[int(cols["ext"][j]) - 1],
                               bytes([(j * 7) % 256]) * (j % 5), want_meta)
            assert key == want.pop("__key__")
            assert members == sorted(want.items())


def test_group_scope_class_through_bcc_pack(tmp_path):
    """`bcc pack --group-regex '^_(\\d+)_' --group-scope class`: copies `_<source>_<n>` of one source stay
    in one split, while the same source number in another class folder is another source; the default
    scope (dataset) joins them across classes; a bad scope is one argparse error (exit 2)."""
    from bcc.cli import main

    src = tmp_path / "src"
    seed = 0
    for folder in ("Benign", "Pre", "Pro"):
        (src / folder).mkdir(parents=True)
        for source in range(10):
            for n in range(3):
                seed += 1
                (src / folder / f"_{source}_{n}.jpg").write_bytes(image_bytes(seed))
    common = ["--group-regex", r"^_(\d+)_", "--no-near-dup", "--split", "0.6,0.2,0.2", "--min-shards", "1"]
    for scope in ("class", "dataset"):
        assert main(["pack", str(src), str(tmp_path / scope), "--group-scope", scope, *common]) == 0
        m = load_manifest(tmp_path / scope)
        assert m["options"]["group_scope"] == scope
        units = defaultdict(set)
        for path, split in split_of(m).items():
            folder, name = path.split("/")
            units[(folder if scope == "class" else "", name.split("_")[1])].add(split)
        assert len(units) == (30 if scope == "class" else 10)
        assert all(len(v) == 1 for v in units.values()), units
        by_number = defaultdict(set)
        for (_, number), splits in units.items():
            by_number[number] |= splits
        # class scope: one number in three class folders is three sources, dealt on their own
        assert any(len(v) > 1 for v in by_number.values()) == (scope == "class")
    with pytest.raises(SystemExit) as e:
        main(["pack", str(src), str(tmp_path / "bad"), "--group-scope", "patient"])
    assert e.value.code == 2
