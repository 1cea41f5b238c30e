"""The evaluation commands through the real CLI: `bcc eval` (default output dir, table, files, a clear
taxonomy error) and `bcc calibrate` (temperatures stored with the checkpoint, ECE not worse on an
over-confident model, then used by eval)."""

from __future__ import annotations

import json
import shutil

import pytest

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests


def test_bcc_eval_writes_into_the_run_and_prints_a_table(trained_run, synth_shards, bcc_main):  # noqa: F811
    proc = bcc_main("eval", "--checkpoint", trained_run, "--data", synth_shards, "--workers", "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = trained_run / "eval-test"
    for name in ("metrics.json", "predictions.csv", "confusion.png", "reliability.png"):
        assert (out / name).is_file(), name
    for row in ("combined", "binary", "subtype"):
        assert row in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "test" and report["calibrated"] is False and "ece_raw" not in report["combined"]
    assert f"{report['count']} images" in proc.stdout


def test_bcc_eval_names_both_taxonomies_on_a_mismatch(trained_run, synth_shards, tmp_path, capsys):  # noqa: F811
    from bcc.cli import main

    manifest = json.loads((synth_shards / "manifest.json").read_text())
    manifest["taxonomy"]["name"] = "all-3class"
    manifest["taxonomy"]["classes"] = manifest["taxonomy"]["classes"][:3]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # in-process through the real parser and run(): the same code path as `bcc eval`, without a new interpreter
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(tmp_path)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert message.startswith("error: taxonomy mismatch")
    assert "'all-4class'" in message and "'all-3class'" in message and str(tmp_path) in message


def test_calibrate_lowers_ece_of_an_overconfident_model(trained_run, synth_shards, tmp_path, bcc_main):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from bcc.evaluate import evaluate_checkpoint
    from bcc.predict import load_inference_model

    ckpt = tmp_path / "hot"
    shutil.copytree(load_inference_model(trained_run, device="cpu").checkpoint, ckpt)
    state = load_file(ckpt / "model.safetensors")
    for key in state:
        if key.startswith("heads.") and ".3." in key:  # the final Linear of every head: logits x 10
            state[key] = state[key] * 10
    save_file(state, ckpt / "model.safetensors")
    (ckpt / "hashes.json").unlink()  # weights edited on purpose: load them unchecked, as an older checkpoint

    proc = bcc_main("calibrate", "--checkpoint", ckpt, "--data", synth_shards, "--workers", "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ECE before" in proc.stdout and "temperature.json" in proc.stdout
    stored = json.loads((ckpt / "temperature.json").read_text())
    assert stored["split"] == "val" and set(stored["temperatures"]) == {"binary", "subtype"}
    # temperature scaling fits each head's NLL: it promises calibration per head; the combined
    # (hierarchical product) probabilities may move either way
    for head in ("binary", "subtype"):
        assert stored["ece_after"][head] <= stored["ece_before"][head] + 1e-9, head
    assert all(t > 1 for t in stored["temperatures"].values())  # over-confident: the fit softens

    report = evaluate_checkpoint(ckpt, synth_shards, out=tmp_path / "eval", workers=0)
    assert report["calibrated"] and report["temperatures"] == pytest.approx(stored["temperatures"])
    assert all(report["metrics"][f"{h}_ece"] < report["metrics"][f"{h}_ece_raw"] for h in ("binary", "subtype"))
    assert all(f"{h}_ece_raw" in report["metrics"] for h in ("binary", "subtype"))
