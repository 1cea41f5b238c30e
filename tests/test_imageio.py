"""bcc.imageio: one reader for every command. The same file gives the same pixels through pack -> stream,
predict and folder eval: EXIF orientation applied, 16-bit grey scaled by its range, .jpe/.jfif read
everywhere, one size limit, one link policy."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bcc.imageio import (
    IMAGE_SUFFIXES,
    ImageError,
    collect_images,
    decode_rgb,
    is_image_name,
    scan_class_folders,
)
from bcc.taxonomy import Taxonomy

from conftest import image_bytes


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _rotated_jpeg() -> bytes:
    """A 40x24 JPEG whose EXIF says: rotate 90 degrees (orientation 6) to display it."""
    img = Image.open(io.BytesIO(image_bytes(3, 40))).resize((40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _awkward_tree(root):
    """Class folders holding the images that commands used to read differently."""
    (root / "Benign").mkdir(parents=True)
    (root / "Early").mkdir()
    (root / "Benign" / "rotated.jpg").write_bytes(_rotated_jpeg())
    deep = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(deep).save(root / "Benign" / "deep16.png")  # mode I;16
    (root / "Early" / "cell.jfif").write_bytes(image_bytes(4, 32))
    (root / "Early" / "cell2.JPE").write_bytes(image_bytes(5, 32))
    (root / "Early" / "plain.png").write_bytes(image_bytes(6, 32, "PNG"))
    return root


def test_policy_orientation_bit_depth_and_suffixes(tmp_path):
    root = _awkward_tree(tmp_path / "src")
    rotated = decode_rgb(root / "Benign" / "rotated.jpg")
    assert rotated.size == (24, 40) and rotated.mode == "RGB"  # EXIF orientation applied
    deep = np.asarray(decode_rgb(root / "Benign" / "deep16.png"))
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 200  # scaled, not clipped white
    assert {".jpe", ".jfif"} <= set(IMAGE_SUFFIXES) and is_image_name("X.JFIF")
    files, problems = collect_images([root])
    assert sorted(f.name for f in files) == ["cell.jfif", "cell2.JPE", "deep16.png", "plain.png", "rotated.jpg"]
    assert problems == []


def test_size_limit_and_bad_files_are_image_errors(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(1, 80, "PNG"))
    with pytest.raises(ImageError, match="decompression bomb: 6400 pixels > limit 5000"):
        decode_rgb(big, max_pixels=5000)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match=f"cannot read image {junk}: cannot identify image format") as e:
        decode_rgb(junk)
    assert isinstance(e.value, OSError) and e.value.is_unidentified
    with pytest.raises(ImageError, match="corrupt image"):
        decode_rgb(image_bytes(2, 64)[:300])


def test_links_are_listed_by_one_policy(tmp_path):
    root = tmp_path / "src"
    (root / "Benign").mkdir(parents=True)
    (root / "Benign" / "a.jpg").write_bytes(image_bytes(1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.jpg").write_bytes(image_bytes(2))
    (root / "Benign" / "out.jpg").symlink_to(outside / "o.jpg")
    (root / "Benign" / "sub").symlink_to(outside)
    entries, skipped, _ = scan_class_folders(root, Taxonomy.default().resolve_folder)
    assert [e.rel for e in entries] == ["Benign/a.jpg"]
    reasons = {s["path"]: s["reason"].split(":")[0] for s in skipped}
    assert reasons == {"Benign/out.jpg": "symlink outside SRC", "Benign/sub": "symlink outside SRC"}
    files, problems = collect_images([root])
    assert [f.name for f in files] == ["a.jpg"]
    assert sorted(os.path.basename(p) for p, _ in problems) == ["out.jpg", "sub"]


def test_same_tensor_through_pack_stream_predict_and_folder_eval(tmp_path):
    """Every file of the tree, read by the stream from the packed shards, by predict and by folder
    eval, gives the same uint8 tensor as `decode_rgb` of the source file."""
    from bcc.evaluate import _FolderDataset
    from bcc.evaluate import scan_class_folders as eval_scan
    from bcc.manifest import Manifest
    from bcc.pack import pack_folders
    from bcc.predict import read_image
    from bcc.shards import read_shard as _read_shard
    from bcc.stream_samples import decode_sample

    root = _awkward_tree(tmp_path / "src")
    out = tmp_path / "packed"
    pack_folders(root, out, split=(1.0, 0.0, 0.0))
    manifest = Manifest.load(out)
    streamed = {}
    for shard in manifest.split("train").shards:
        for sample in _read_shard(shard):
            image, _, _, source = decode_sample(sample, _tensor)
            streamed[source] = image
    taxonomy = manifest.taxonomy
    items, skipped = eval_scan(root, taxonomy)
    assert skipped == []
    folder = {it.source: _FolderDataset(items, _tensor)[it.index]["image"] for it in items}
    assert sorted(streamed) == sorted(folder) == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    for source, image in streamed.items():
        expected = _tensor(decode_rgb(root / source))
        assert torch.equal(image, expected), source
        assert torch.equal(folder[source], expected), source
        assert torch.equal(_tensor(read_image(root / source)), expected), source


def test_path_list_round_trips_names_as_a_list_of_str_would():
    from bcc.imageio import PathList

    names = ["Benign/a.jpg", "Pro/é ü.png", "Pre/\udcff\udc80.jpg", "", "x" * 300]  # undecodable bytes too
    paths = PathList(names)
    assert len(paths) == len(names) and list(paths) == names
    assert [paths[i] for i in range(-len(names), len(names))] == names + names
    assert list(paths.permuted([4, 0, 2])) == [names[4], names[0], names[2]]
    with pytest.raises(IndexError):
        paths[len(names)]
