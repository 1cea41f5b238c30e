import torch
from PIL import Image

from bcc.plots import plot_confusion, plot_curves, plot_reliability


def is_png(path, min_side=200):
    with Image.open(path) as img:
        return img.format == "PNG" and min(img.size) >= min_side


def test_confusion_reliability_and_curves(tmp_path):
    names = ["Benign", "early Pre-B", "Pre-B", "Pro-B"]
    assert is_png(plot_confusion([[5, 1, 0, 0], [0, 4, 2, 0], [0, 1, 6, 1], [0, 0, 0, 0]], names, tmp_path / "c.png"))
    probs = torch.softmax(torch.randn(100, 4) * 3, 1)
    targets = torch.randint(0, 4, (100,))
    assert is_png(plot_reliability(probs, targets, tmp_path / "r.png", title="test"))
    runs = {m: [{"split": "val", "epoch": e, "bacc4": 0.3 + 0.1 * e + (0.05 if m == "full" else 0)}
                for e in range(1, 4)] for m in ("frozen", "full")}
    assert is_png(plot_curves(runs, "bacc4", tmp_path / "v.png"))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind
