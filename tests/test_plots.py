"""bcc.plots: each figure is written atomically as a valid PNG of a sensible size."""

import math

import pytest
import torch
from PIL import Image

from bcc.plots import plot_confusion, plot_curves, plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_bytes=10_000):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert 300 < w < 3000 and 300 < h < 3000
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []  # no temp file left


def test_plot_confusion(tmp_path):
    names = ["Benign", "early Pre-B", "Pre-B", "Pro-B"]
    confusion = [[30, 3, 1, 0], [2, 40, 5, 1], [0, 6, 35, 2], [0, 0, 0, 0]]  # Pro-B absent: no crash
    path = plot_confusion(confusion, names, tmp_path / "sub" / "confusion.png", title="test")
    check_png(path)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion(confusion, names[:3], tmp_path / "bad.png")


def test_plot_reliability(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (1000,), generator=g)
    x = 1.6 * torch.nn.functional.one_hot(y, 3) + torch.randn(1000, 3, generator=g)
    probs = (8 * x).softmax(1)
    check_png(plot_reliability(probs, y, tmp_path / "reliability.png", title="subtype"))


def test_plot_curves(tmp_path):
    runs = {
        name: [{"epoch": e, "step": 10 * e, "split": "val", "bacc": 0.3 + 0.5 * (1 - math.exp(-e / k))}
               for e in range(1, 9)]
        + [{"epoch": 1, "split": "train", "bacc": 0.99}, {"epoch": 2, "split": "val", "bacc": float("nan")}]
        for name, k in [("frozen", 4), ("staged", 2), ("full", 1)]
    }
    check_png(plot_curves(runs, "bacc", tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="bacc"):
        plot_curves(runs, "no_such_metric", tmp_path / "none.png")
