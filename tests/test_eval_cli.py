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
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["_hashes"]
    (ckpt / "meta.json").write_text(json.dumps(meta))

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


@pytest.fixture(scope="session")
def ema_checkpoint(trained_run, tmp_path_factory):  # noqa: F811
    """A copy of `trained_run`'s best checkpoint with EMA weights (the raw ones halved: other outputs)
    and no calibration, as a run with train.ema_decay leaves it, without training a second run."""
    from safetensors.torch import load_file, save_file

    from bcc.predict import load_inference_model

    ckpt = tmp_path_factory.mktemp("ema") / "ckpt"
    shutil.copytree(load_inference_model(trained_run, device="cpu").checkpoint, ckpt)
    raw = load_file(ckpt / "model.safetensors")
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in raw.items()}, ckpt / "model_ema.safetensors")
    return ckpt


def _probs(path):
    return [row.split(",", 2)[2] for row in path.read_text().splitlines()[1:]]  # after source, key


def test_eval_weights_auto_is_the_ema_as_exported_raw_on_request(ema_checkpoint, trained_run, synth_shards,  # noqa: F811
                                                                 tmp_path, capsys):
    """`bcc eval --weights` decides as `bcc export --weights` does: auto evaluates the EMA weights (the
    same predictions as the EMA export), raw the raw ones; ema without EMA weights is one error line."""
    from bcc.cli import main
    from bcc.export import export_checkpoint

    def evaluate(checkpoint, out, *weights):
        code = main(["eval", "-c", str(checkpoint), "-d", str(synth_shards), "--workers", "0",
                     "--out", str(tmp_path / out), *weights])
        return code, capsys.readouterr()

    code, io = evaluate(ema_checkpoint, "auto")
    assert code == 0 and "(ema weights" in io.out
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["weights"] == "ema"
    export_checkpoint(ema_checkpoint, tmp_path / "export", weights="ema")
    capsys.readouterr()
    assert evaluate(tmp_path / "export", "exported")[0] == 0
    assert json.loads((tmp_path / "exported" / "metrics.json").read_text())["weights"] == "ema"
    assert _probs(tmp_path / "auto" / "predictions.csv") == _probs(tmp_path / "exported" / "predictions.csv")
    code, io = evaluate(ema_checkpoint, "raw", "--weights", "raw")
    assert code == 0 and "(raw weights" in io.out
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["weights"] == "raw"
    assert _probs(tmp_path / "raw" / "predictions.csv") != _probs(tmp_path / "auto" / "predictions.csv")

    for checkpoint, weights, expected in ((trained_run, "ema", "holds no EMA weights"),
                                          (tmp_path / "export", "raw", "holds the ema weights only")):
        code, io = evaluate(checkpoint, "bad", "--weights", weights)
        message = " ".join(io.err.split())  # rich may wrap the one line at the console width
        assert code == 2 and message.startswith(f"error: --weights {weights}: ") and "Traceback" not in message
        assert expected in message and str(checkpoint) in "".join(io.err.split())  # named, even if wrapped


def test_bcc_eval_names_the_data_option_for_a_bad_location(trained_run, synth_shards, bcc_main):  # noqa: F811
    """An error about the dataset location names `--data`, which the user wrote, not data.shards."""
    for location, match in [(f"pipe:cat {synth_shards}/manifest.json", "the pipe: dataset .* needs {name}"),
                            ("https://alice:wonderland-pw@h/ds", "holds a credential")]:
        proc = bcc_main("eval", "--checkpoint", trained_run, "--data", location, "--workers", "0")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: --data: ") and match.split(" .*")[0] in lines[0], lines[0]
        assert "data.shards" not in lines[0] and "wonderland-pw" not in lines[0]
