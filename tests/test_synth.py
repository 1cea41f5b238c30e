import hashlib

import numpy as np
import pytest
from PIL import Image

from bcc.synth import SYNTH_CLASSES, SynthError, render_cell, synthesize


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
    with pytest.raises(SynthError, match="unknown synthetic class"):
        render_cell("Mystery", 32, np.random.default_rng(0))


def test_cli(tmp_path, bcc_main):
    out = tmp_path / "d"
    proc = bcc_main("synth", out, "--per-class", "2", "--size", "32", "--format", "png")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 images" in proc.stdout
    assert len(list(out.rglob("*.png"))) == 8
    again = bcc_main("synth", out)
    assert again.returncode == 2 and "not empty" in again.stderr


def _load_folder(root):
    import torch

    images, labels = [], []
    for ci, cls in enumerate(SYNTH_CLASSES):
        for path in sorted((root / cls).iterdir()):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(ci)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    return x, torch.tensor(labels)


def test_a_tiny_cnn_learns_the_classes(tmp_path):
    """Learnable but not trivial: a 3-conv net trained for a few seconds on 4x150 images at 32 px gets the
    4 classes well above chance (0.25) and Benign vs malignant better still, on images of another seed."""
    import torch
    from torch import nn

    synthesize(tmp_path / "train", per_class=150, size=32, seed=0)
    synthesize(tmp_path / "test", per_class=50, size=32, seed=1)
    x_train, y_train = _load_folder(tmp_path / "train")
    x_test, y_test = _load_folder(tmp_path / "test")

    torch.manual_seed(0)

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    net = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(SYNTH_CLASSES)))
    epochs, batch = 15, 32
    steps = epochs * -(-len(y_train) // batch)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train)).split(batch):
            xb = x_train[idx]
            # a smear has no up/down or left/right: flips are free augmentation
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(3), xb)
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(2), xb)
            loss = nn.functional.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    net.eval()
    with torch.no_grad():
        pred = net(x_test).argmax(1)
    accuracy = (pred == y_test).float().mean().item()
    benign, said_benign = y_test == 0, pred == 0
    balanced = 0.5 * (said_benign[benign].float().mean() + (~said_benign[~benign]).float().mean()).item()
    assert accuracy >= 0.6, accuracy
    assert balanced >= 0.8, balanced
