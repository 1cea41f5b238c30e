"""bcc predict: the hierarchical answer (subtype only when malignant), probabilities, TTA, unreadable
files named with exit code 1, Grad-CAM overlays of each image's own size, CSV/JSON output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_cli import ema_checkpoint  # noqa: F401 - a copy of trained_run's checkpoint with EMA weights

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


def test_predict_csv_carries_the_argmax_answer_and_the_threshold(trained_run, synth_data, tmp_path,  # noqa: F811
                                                                   bcc_main):
    """With an operating point the CSV gives the decision at the point (answer, class) and at argmax
    (answer_argmax, class_argmax) and the threshold, appended after the older columns; without one the
    two agree and the threshold is 0.5 (argmax)."""
    import shutil

    from bcc.operating_point import write_operating_point
    from bcc.predict import load_inference_model, predict_paths, prob_columns

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    images = sorted(p for p in synth_data.rglob("*") if p.is_file())[::8]
    im = load_inference_model(run, device="cpu")
    p = {r.path: r.head_probs["binary"]["Malignant"] for r in predict_paths(im, images).predictions}
    below = [v for v in p.values() if v <= 0.5]
    assert below and len(below) < len(p), "the one-epoch model calls some images benign, some malignant"
    t = max(below) - 1e-6  # the most malignant-looking benign call flips to malignant at the point
    write_operating_point(im.checkpoint, "sensitivity>=0.95", t, im.taxonomy)

    def predict(*args):
        out = tmp_path / f"p{len(args)}.csv"
        proc = bcc_main("predict", "-c", run, *images, tmp_path / "missing.png", "--csv", out, *args)
        assert proc.returncode == 1, proc.stderr  # the missing file
        with open(out, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = [dict(zip(header, r, strict=True)) for r in reader]
        assert header == ["path", "answer", "class", *prob_columns(im.taxonomy), "gradcam", "error",
                          "answer_argmax", "class_argmax", "threshold"]
        assert [r for r in rows if r["error"]] == [{**{k: "" for k in header}, "path": str(tmp_path / "missing.png"),
                                                    "error": rows[-1]["error"]}]
        return [r for r in rows if not r["error"]]

    rows = predict()
    threshold = load_inference_model(run, device="cpu").threshold  # t through the stored margin: t to ~1e-16
    assert len(rows) == len(p) and {r["threshold"] for r in rows} == {repr(threshold)}
    assert threshold == pytest.approx(t, abs=1e-12)
    flipped = [r for r in rows if t <= p[r["path"]] <= 0.5]
    assert flipped
    for r in rows:
        assert r["answer"].startswith("Malignant") == (p[r["path"]] >= t)
        assert r["answer_argmax"].startswith("Malignant") == (p[r["path"]] > 0.5)
        assert (r["answer"] != r["answer_argmax"]) == (r in flipped)
        assert r["class_argmax"] == ("Benign" if p[r["path"]] <= 0.5 else r["class"])
    rows = predict("--argmax")
    assert {r["threshold"] for r in rows} == {"0.5"}
    assert all(r["answer"] == r["answer_argmax"] and r["class"] == r["class_argmax"] for r in rows)


def test_predict_weights_auto_is_the_ema_model_raw_on_request(ema_checkpoint, trained_run, synth_data,  # noqa: F811
                                                              tmp_path, capsys):
    """`bcc predict --weights` as `bcc export`: auto answers with model_ema.safetensors loaded into the
    model (compared with loading it by hand), raw with the raw weights, ema without EMA weights is one
    error line naming the checkpoint."""
    from safetensors.torch import load_file

    from bcc.cli import main
    from bcc.predict import load_inference_model, predict_paths

    images = [str(p) for p in sorted((synth_data / "Pro").iterdir())[:2]]
    raw = load_inference_model(ema_checkpoint, device="cpu")  # the library's default: raw
    ema = load_inference_model(ema_checkpoint, device="cpu")
    ema.model.load_state_dict({**ema.model.state_dict(), **load_file(ema_checkpoint / "model_ema.safetensors")})
    got = {}
    for kind, weights, im in (("ema", [], ema), ("raw", ["--weights", "raw"], raw)):  # auto first
        out = tmp_path / f"{kind}.json"
        assert main(["predict", "-c", str(ema_checkpoint), *images, "--json", str(out), *weights]) == 0
        assert f"({kind} weights, uncalibrated)" in " ".join(capsys.readouterr().out.split())
        got[kind] = [p["head_probs"] for p in json.loads(out.read_text())["predictions"]]
        expected = [p.to_dict()["head_probs"] for p in predict_paths(im, images).predictions]
        assert len(got[kind]) == len(expected) == 2
        assert all(g[h] == pytest.approx(e[h], abs=1e-6) for g, e in zip(got[kind], expected, strict=True) for h in e)
    assert got["ema"] != got["raw"]
    assert main(["predict", "-c", str(trained_run), *images, "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weights ema: checkpoint") and "holds no EMA weights" in " ".join(err.split())
    assert len(err.strip().splitlines()) <= 2  # one line, which rich may wrap at the console width


def test_a_raw_only_calibration_keeps_the_ema_weights_out_unless_unused(ema_checkpoint, tmp_path):  # noqa: F811
    """Temperatures fitted on the raw weights (`bcc calibrate`): auto takes the raw weights, ema is
    refused naming the checkpoint, and ema with neither temperatures nor operating point is allowed."""
    import shutil

    from bcc.export import ExportError
    from bcc.predict import load_inference_model, write_temperatures

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ema_checkpoint, ckpt)
    write_temperatures(ckpt, {"binary": 2.0, "subtype": 2.0}, {})
    assert load_inference_model(ckpt, device="cpu", weights="auto").weights == "raw"
    with pytest.raises(ExportError, match=f"checkpoint {ckpt}.* fitted on its raw weights"):
        load_inference_model(ckpt, device="cpu", weights="ema")
    im = load_inference_model(ckpt, device="cpu", weights="ema", calibrated=False, operating_point=False)
    assert im.weights == "ema" and im.temperatures == {} and im.threshold is None


def test_names_that_are_not_utf8_are_printed_and_written_printable(trained_run, synth_data, tmp_path,  # noqa: F811
                                                                   bcc_main, monkeypatch):
    """A file named b'bad\\xff.png' (a zip made on Windows) crashed every text writer (UnicodeEncodeError in
    the CSV writer, a traceback): `bcc predict` prints and writes its printable form `bad\\xff.png` (the
    Grad-CAM overlays are named so), and `bcc eval` of a pack made before that form (its sources hold the
    surrogates `os` gives such a name) writes its predictions.csv; a folder report finds the file again."""
    import os

    from bcc import pack as pack_mod
    from bcc.report import _folder_file

    folder = tmp_path / "images" / "Pro"
    folder.mkdir(parents=True)
    bad = os.fsdecode(os.fsencode(folder) + b"/bad\xff.png")
    Image.open(sorted((synth_data / "Pro").iterdir())[0]).save(bad, "PNG")
    with open(os.fsdecode(os.fsencode(folder) + b"/broken\xfe.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff truncated")
    out = tmp_path / "out"
    proc = bcc_main("predict", "--checkpoint", trained_run, folder, "--json", out / "p.json", "--csv", out / "p.csv",
                    "--gradcam", out / "cam")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # the broken one
    shown = f"{folder}/bad\\xff.png"
    assert f"{shown}: " in proc.stdout and f"{folder}/broken\\xfe.jpg" in proc.stderr
    data = json.loads((out / "p.json").read_text())
    assert [p["path"] for p in data["predictions"]] == [shown]
    assert [f["path"] for f in data["failures"]] == [f"{folder}/broken\\xfe.jpg"]
    assert all(Path(c).is_file() and "\\xff" in c for c in data["predictions"][0]["gradcam"])
    with open(out / "p.csv", newline="", encoding="utf-8") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == [shown, f"{folder}/broken\\xfe.jpg"]
    assert _folder_file(tmp_path / "images", "Pro/bad\\xff.png") == Path(bad)

    monkeypatch.setattr(pack_mod, "display_path", lambda name: name)  # a pack as bcc wrote it before
    for cls in ("Benign", "Early", "Pre"):
        (tmp_path / "images" / cls).mkdir()
        for p in sorted((synth_data / cls).iterdir())[:2]:
            (tmp_path / "images" / cls / p.name).write_bytes(p.read_bytes())
    os.unlink(os.fsdecode(os.fsencode(folder) + b"/broken\xfe.jpg"))
    pack_mod.pack_folders(tmp_path / "images", tmp_path / "old", split=(1, 0, 0), min_shards=1)
    proc = bcc_main("eval", "--checkpoint", trained_run, "--data", tmp_path / "old", "--split", "train",
                    "--out", tmp_path / "ev")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "ev" / "predictions.csv", newline="", encoding="utf-8") as f:
        assert "Pro/bad\\xff.png" in {r["source"] for r in csv.DictReader(f)}
