"""bcc.evaluate: packed split == the same images as a folder, 2 processes == 1, metrics.json agrees with
predictions.csv, unreadable files are reported, a taxonomy mismatch is a clear error.

`trained_run` (one tiny training per session, cached under pytest's base temp dir) is imported by the
other evaluation test modules.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import write_config


@pytest.fixture(scope="session")
def trained_run(synth_shards, tmp_path_factory) -> Path:
    """A run dir trained for one epoch on `synth_shards` (test_resnet, 32 px); trained once per session
    even when several modules import this fixture (the result is cached on disk)."""
    root = tmp_path_factory.getbasetemp() / "bcc-eval-trained"
    run = root / "run"
    if (root / ".done").exists():
        return run
    root.mkdir(exist_ok=True)
    cfg = write_config(root / "cfg.yaml", synth_shards, run, train={"epochs": 1}, eval={"test_at_end": False})
    proc = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (root / ".done").touch()
    return run


def unpack_split(shards: Path, split: str, dst: Path) -> Path:
    """The images of a packed split written back as `dst/<source>` (class folders), bytes unchanged."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / shard["path"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for files in samples.values():
            meta = json.loads(files.pop("json"))
            files.pop("cls", None)  # format 2: the label as text beside the json
            out = dst / meta["source"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(next(iter(files.values())))
    return dst


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(a: dict, b: dict) -> None:
    for scope in ("combined", "heads"):
        assert _close(a[scope], b[scope]), f"{scope}: {a[scope]} != {b[scope]}"


def _close(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, float):
        return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
    return x == y


@pytest.fixture(scope="module")
def packed_eval(trained_run, synth_shards, tmp_path_factory):
    from bcc.evaluate import evaluate_checkpoint

    out = tmp_path_factory.mktemp("eval-packed")
    report = evaluate_checkpoint(trained_run, synth_shards, split="test", out=out, workers=0)
    return report, out


def test_packed_split_and_image_folder_give_the_same_metrics(packed_eval, trained_run, synth_shards, tmp_path):
    from bcc.evaluate import evaluate_checkpoint

    packed, packed_out = packed_eval
    folder = unpack_split(synth_shards, "test", tmp_path / "test-images")
    report = evaluate_checkpoint(trained_run, folder, out=tmp_path / "out", batch_size=7, workers=1)
    assert report["kind"] == "folder" and packed["kind"] == "packed"
    assert report["count"] == packed["count"] == json.loads((synth_shards / "manifest.json").read_text())[
        "splits"]["test"]["count"]
    assert_same_metrics(report, packed)
    rows_p, rows_f = read_csv(packed_out / "predictions.csv"), read_csv(tmp_path / "out" / "predictions.csv")
    assert [(r["source"], r["true_class"], r["pred_class"]) for r in rows_p] == \
        [(r["source"], r["true_class"], r["pred_class"]) for r in rows_f]


def test_metrics_json_agrees_with_predictions_csv(packed_eval):
    report, out = packed_eval
    rows = read_csv(out / "predictions.csv")
    classes = report["classes"]
    assert len(rows) == report["count"] == report["combined"]["count"]
    confusion = [[0] * len(classes) for _ in classes]
    for r in rows:
        confusion[classes.index(r["true_class"])][classes.index(r["pred_class"])] += 1
    assert confusion == report["combined"]["confusion"]
    assert report["combined"]["acc"] == pytest.approx(sum(r["true_class"] == r["pred_class"] for r in rows) / len(rows))
    recalls = [confusion[i][i] / sum(confusion[i]) for i in range(len(classes)) if sum(confusion[i])]
    assert report["combined"]["bacc"] == pytest.approx(sum(recalls) / len(recalls))
    assert report["metrics"]["bacc"] == report["combined"]["bacc"]
    # probabilities: every head and the combined leaves sum to 1; the loss is the NLL of the true class
    for r in rows:
        for prefix in ("binary:", "subtype:", "combined:"):
            assert sum(float(v) for k, v in r.items() if k.startswith(prefix)) == pytest.approx(1, abs=1e-5)
    nll = -sum(math.log(float(r[f"combined:{r['true_class']}"])) for r in rows) / len(rows)
    assert report["combined"]["loss"] == pytest.approx(nll, rel=1e-4)
    # binary head: sensitivity is the recall of Malignant, from the per-head argmax
    malignant = [r for r in rows if r["true_class"] != "Benign"]
    sens = sum(float(r["binary:Malignant"]) > float(r["binary:Benign"]) for r in malignant) / len(malignant)
    assert report["heads"]["binary"]["sens"] == pytest.approx(sens)
    assert report["heads"]["binary"]["positive_label"] == "Malignant"
    for name in ("confusion.png", "reliability.png", "metrics.json"):
        assert (out / name).stat().st_size > 0


def test_two_processes_equal_one_and_unreadable_images_are_named(packed_eval, trained_run, synth_shards, tmp_path):
    """2-process eval of the folder (rank-strided, with a corrupt image and a stray text file) gives
    the metrics of the 1-process packed eval and names the corrupt file."""
    from bcc.launch import accelerate_command

    folder = unpack_split(synth_shards, "test", tmp_path / "images")
    (folder / "Pre" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "Pro" / "notes.txt").write_text("a note")
    cmd, env = accelerate_command(2, ["eval", "--checkpoint", str(trained_run), "--data", str(folder),
                                      "--out", str(tmp_path / "out"), "--workers", "0"], module="bcc")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["processes"] == 2
    assert report["failed"] == [{"source": "Pre/broken.jpg", "reason": report["failed"][0]["reason"]}]
    assert "broken.jpg" in report["failed"][0]["reason"]
    assert report["skipped"] == [{"source": "Pro/notes.txt", "reason": "not an image file (.txt)"}]
    assert "Pre/broken.jpg" in proc.stdout
    packed, packed_out = packed_eval
    assert report["count"] == packed["count"]  # every readable image exactly once across the ranks
    assert_same_metrics(report, packed)
    assert [r["source"] for r in read_csv(tmp_path / "out" / "predictions.csv")] == \
        [r["source"] for r in read_csv(packed_out / "predictions.csv")]


def test_taxonomy_mismatch_is_a_clear_error(trained_run, synth_shards, tmp_path):
    from bcc.evaluate import evaluate_checkpoint
    from bcc.predict import TaxonomyMismatchError

    manifest = json.loads((synth_shards / "manifest.json").read_text())
    manifest["taxonomy"] = {"name": "blood-binary", "heads": [{"name": "binary", "labels": ["Benign", "Malignant"]}]}
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TaxonomyMismatchError) as e:
        evaluate_checkpoint(trained_run, other, out=tmp_path / "o1", workers=0)
    assert "'all-4class'" in str(e.value) and "'blood-binary'" in str(e.value)
    assert str(other) in str(e.value)

    (tmp_path / "cells" / "Monocyte").mkdir(parents=True)
    with pytest.raises(TaxonomyMismatchError, match=r"Monocyte.*all-4class.*known names: 'Benign'"):
        evaluate_checkpoint(trained_run, tmp_path / "cells", out=tmp_path / "o2", workers=0)
