import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bcc.synth import SYNTH_CLASSES, render_cell, synthesize


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_counts_and_images(tmp_path):
    counts = synthesize(tmp_path / "d", per_class=3, size=40, seed=1)
    assert counts == {c: 3 for c in SYNTH_CLASSES}
    for cls in SYNTH_CLASSES:
        files = sorted((tmp_path / "d" / cls).iterdir())
        assert [f.name for f in files] == [f"{cls.lower()}_{i:05d}.jpg" for i in range(3)]
        with Image.open(files[0]) as img:
            assert img.size == (40, 40) and img.mode == "RGB"


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path):
    synthesize(tmp_path / "a", per_class=4, size=32, seed=7)
    synthesize(tmp_path / "b", per_class=4, size=32, seed=7, workers=2)
    synthesize(tmp_path / "c", per_class=4, size=32, seed=8)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_classes_differ_but_not_by_a_constant_colour():
    """Mean colour alone must not separate the classes (the task would be trivial)."""
    means = {}
    for ci, cls in enumerate(SYNTH_CLASSES):
        imgs = [np.asarray(render_cell(cls, 32, np.random.default_rng([0, ci, i])), np.float32) for i in range(40)]
        means[cls] = np.stack([im.reshape(-1, 3).mean(0) for im in imgs])
    # the per-class spread of mean colour overlaps the distance between class centres
    centres = {c: m.mean(0) for c, m in means.items()}
    spread = np.mean([m.std(0).mean() for m in means.values()])
    nearest = min(np.abs(centres[a] - centres[b]).mean() for a in SYNTH_CLASSES for b in SYNTH_CLASSES if a < b)
    assert nearest < 2 * spread


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(tmp_path / "d", per_class=1)
    assert (tmp_path / "d" / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="unknown synthetic class"):
        render_cell("Mystery", 32, np.random.default_rng(0))


def test_cli(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-m", "bcc", "synth", str(out), "--per-class", "2", "--size", "32",
                           "--format", "png"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 images" in proc.stdout
    assert len(list(out.rglob("*.png"))) == 8
    again = subprocess.run([sys.executable, "-m", "bcc", "synth", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr
