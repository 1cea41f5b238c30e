"""bcc predict: the hierarchical answer (subtype only when malignant), probabilities, TTA, unreadable
files named with exit code 1, Grad-CAM overlays of each image's own size, CSV/JSON output."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests


def test_answer_names_the_subtype_only_for_malignant_decisions():
    from bcc.predict import answer_text, decide
    from bcc.taxonomy import Taxonomy

    t = Taxonomy.default()
    assert [answer_text(t, i) for i in range(4)] == ["Benign", "Malignant: early Pre-B", "Malignant: Pre-B",
                                                     "Malignant: Pro-B"]
    binary = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    subtype = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    # a confident subtype does not make a benign cell malignant
    assert [answer_text(t, int(c)) for c in decide(t, [binary, subtype])] == ["Benign", "Malignant: Pro-B", "Benign"]


def test_predict_cli(trained_run, synth_data, tmp_path, bcc_main):  # noqa: F811
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    sources = sorted((synth_data / "Benign").iterdir())[:2] + sorted((synth_data / "Pro").iterdir())[:2]
    for i, src in enumerate(sources):
        img = Image.open(src).convert("RGB")
        if i == 1:
            img = img.resize((72, 48))  # non-square: the overlay must keep this size
        img.save(images / ("nested" if i == 3 else "") / f"cell{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "out"
    proc = bcc_main("predict", "--checkpoint", trained_run, images, "--tta", "--json", out / "p.json",
                    "--csv", out / "p.csv", "--gradcam", out / "cam")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # one file failed
    assert "broken.jpg" in proc.stderr
    data = json.loads((out / "p.json").read_text())
    assert data["tta"] is True and [f["path"] for f in data["failures"]] == [str(images / "broken.jpg")]
    preds = data["predictions"]
    assert sorted(p["path"].rsplit("/", 1)[-1] for p in preds) == ["cell0.png", "cell1.png", "cell2.png", "cell3.png"]
    for p in preds:
        for head, probs in p["head_probs"].items():
            assert sum(probs.values()) == pytest.approx(1, abs=1e-5), head
        assert sum(p["class_probs"].values()) == pytest.approx(1, abs=1e-5)
        if p["head_labels"]["binary"] == "Benign":
            assert p["answer"] == "Benign"
        else:
            assert p["answer"] == f"Malignant: {p['head_labels']['subtype']}"
        assert f"{p['path']}: {p['answer']}  |  binary: Benign" in proc.stdout
        # one overlay per head, each of the original image's size
        assert [c.rsplit("/", 1)[-1] for c in p["gradcam"]] == [
            f"{p['path'].rsplit('/', 1)[-1][:-4]}.{h}.png" for h in ("binary", "subtype")]
        original = Image.open(p["path"]).size
        for c in p["gradcam"]:
            assert Image.open(c).size == original
    assert Image.open(out / "cam" / "cell1.binary.png").size == (72, 48)
    with open(out / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and [r["error"] != "" for r in rows].count(True) == 1
    assert "4 image(s) predicted, 1 failed" in proc.stdout
