"""`bcc cv`: every fold trained on the other folds, mean +- sd, out-of-fold predictions covering train+val once."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from conftest import write_config


def _bcc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bcc", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def cv_pack(synth_data, tmp_path_factory):
    """`synth_data` packed with 2 folds; returns (shards, fold of every train+val key)."""
    from bcc.pack import pack_folders

    shards = tmp_path_factory.mktemp("cvpack") / "shards"
    pack_folders(synth_data, shards, split=(0.7, 0.15, 0.15), seed=0, min_shards=2, folds=2)
    manifest = json.loads((shards / "manifest.json").read_text())
    fold_of = {}
    for name in ("train", "val"):
        for sh in manifest["splits"][name]["shards"]:
            for s in wds.WebDataset(str(shards / sh["path"]), shardshuffle=False, empty_check=False):
                fold_of[s["__key__"]] = json.loads(s["json"])["fold"]
    return shards, fold_of


@pytest.fixture(scope="module")
def cv_run(cv_pack, tmp_path_factory):
    """`bcc cv --folds 2` on `cv_pack`. The folds train with an EMA (decay 0.5: its weights differ from the
    raw ones after the first step), two fine-tuning stages (heads + block4 at lr_mult 0.5, then all groups)
    and train.head_lr_mult=3, uncalibrated at argmax (probabilities compare as they are).
    Returns (out, config, the CompletedProcess)."""
    root = tmp_path_factory.mktemp("cv")
    out = root / "cv"
    stages = [{"epochs": 1, "train": ["heads", "block4"], "lr_mult": {"block4": 0.5}},
              {"epochs": 1, "train": ["all"]}]
    cfg = write_config(root / "cv.yaml", cv_pack[0], out, data={"workers": 0},
                       train={"epochs": 2, "lr": 0.05, "warmup_steps": 1, "ema_decay": 0.5, "head_lr_mult": 3.0},
                       finetune={"preset": "custom", "stages": stages}, eval={"calibrate": False})
    return out, cfg, _bcc("cv", "--config", cfg, "--folds", 2)


@pytest.mark.slow
def test_cv_two_folds_end_to_end(cv_pack, cv_run, synth_shards, tmp_path, bcc_main):
    (shards, fold_of), (out, cfg, proc) = cv_pack, cv_run
    manifest = json.loads((shards / "manifest.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2-fold cross-validation" in proc.stdout and "±" in proc.stdout
    assert "Weights: EMA weights" in proc.stdout  # auto, as bcc eval: the folds' EMA weights throughout

    for k in range(2):  # each fold run validated on its fold, trained on the other
        saved = (out / f"fold-{k}" / "config.yaml").read_text()
        assert f"fold: {k}" in saved
        rows = [json.loads(line) for line in (out / f"fold-{k}" / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if r.get("split") == "val"]
        assert val and val[-1]["count"] == sum(1 for f in fold_of.values() if f == k)

    with open(out / "oof_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["key"] for r in oof) == sorted(fold_of)  # every train+val sample exactly once
    assert all(int(r["fold"]) == fold_of[r["key"]] for r in oof)
    classes = manifest["classes"]
    for r in oof[:20]:
        assert r["true_class"] in classes
        assert abs(sum(float(r[f"combined:{c}"]) for c in classes) - 1) < 1e-6

    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and summary["oof"]["count"] == len(fold_of)
    for split in ("val", "test"):
        acc = summary[split]["acc"]
        assert len(acc["per_fold"]) == 2 and acc["mean"] == pytest.approx(sum(acc["per_fold"]) / 2)
    assert (out / "CV.md").is_file()

    # aggregation alone reads the runs back; a pack without folds, or K that disagrees, is one error line
    # (in-process: each ends before training)
    again = bcc_main("cv", "--aggregate", out, "--folds", 2)
    assert again.returncode == 0, again.stderr
    from bcc.cv import CvError, aggregate

    with pytest.raises(CvError, match="packed with 2 folds"):  # K below the pack's (the CLI takes K >= 2 only)
        aggregate(out, 1)
    bad = bcc_main("cv", "--config", cfg, "--folds", 3, "--out", tmp_path / "x")
    assert bad.returncode == 2 and "packed with 2 folds" in bad.stderr and "Traceback" not in bad.stderr
    nofolds = write_config(tmp_path / "nf.yaml", synth_shards, tmp_path / "nf")
    bad = bcc_main("cv", "--config", nofolds, "--folds", 2)
    assert bad.returncode == 2 and "no cross-validation folds" in bad.stderr
    bad = bcc_main("train", "--config", nofolds, "data.fold=0")
    assert bad.returncode == 2 and "has no folds" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- one EMA fold run, read by every command


def test_cv_refuses_a_finished_fold_of_another_config(cv_pack, tmp_path, bcc_main):
    """A fold dir holding a finished run of another config is not reused in mean +- sd: one error line naming
    the run dir and the key, before any fold trains (how a run executed, e.g. data.workers, is free); and a
    fold that cannot fit eval.operating_point is refused before any fold trains."""
    from bcc.config import load_config, save_config

    cfg = write_config(tmp_path / "cv.yaml", cv_pack[0], tmp_path / "cv", train={"epochs": 1})
    for k, lr in ((0, 0.1), (1, 0.05)):
        run = tmp_path / "cv" / f"fold-{k}"
        run.mkdir(parents=True)
        save_config(load_config(cfg, [f"train.lr={lr}", "data.workers=3", f"data.fold={k}", f"run.dir={run}",
                                      "checkpoint.resume=auto"]), run / "config.yaml")
        (run / "summary.json").write_text("{}")
    proc = bcc_main("cv", "--config", cfg, "--folds", 2)
    assert proc.returncode == 2
    fold0 = tmp_path / "cv" / "fold-0"
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {fold0} holds a run of another config than this command's (train.lr: 0.1 -> 0.05): bcc cv would "
        "reuse it beside runs of this config; use another --out, or delete the run to train it again"]
    assert not (tmp_path / "cv" / "CV.md").exists()
    again = bcc_main("cv", "--aggregate", tmp_path / "cv", "--folds", 2)  # runs trained elsewhere: the same check
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert re.search(r"error: .*fold-1 was trained under another config than .*fold-0 \(train.lr: 0.1 -> 0.05\)",
                     again.stderr), again.stderr

    # a fold whose validation fold has no benign cell cannot fit an operating point: refused before fold 0 trains
    shards = tmp_path / "shards"
    shutil.copytree(cv_pack[0], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["folds"]["class_counts"][1]["Benign"] = 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = bcc_main("cv", "--config", cfg, "--folds", 2, "--out", tmp_path / "op", f"data.shards={shards}",
                    "eval.operating_point=youden")
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {tmp_path / 'op' / 'fold-1'}: eval.operating_point=youden: the validation split "
                           f"'val' (data.fold=1) of {shards / 'manifest.json'} holds ")
    assert "Malignant and 0 Benign samples" in line and line.endswith("(nothing trained)")
    assert not (tmp_path / "op" / "fold-0").exists()


def _probs(path):
    with open(path, newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_report_cv_and_compare_evaluate_the_ema_weights_bcc_eval_takes(cv_pack, cv_run, bcc_main):
    """`bcc eval` takes the EMA weights by default (--weights auto); the report, the out-of-fold
    predictions and the comparison's test predictions and metrics are of those weights too, and say so."""
    import torch

    from bcc.compare_table import aggregate
    from bcc.cv import predict_fold
    from bcc.evaluate import _infer
    from bcc.predict import load_inference_model
    from bcc.sources import load_data
    from bcc.stream import eval_loader

    (shards, _), (out, _, cv) = cv_pack, cv_run
    assert cv.returncode == 0, cv.stdout + cv.stderr
    run = out / "fold-0"
    # a raw-weights evaluation where the report looks first: the report must not reuse it
    assert bcc_main("eval", "-c", run, "-d", shards, "--weights", "raw").returncode == 0
    raw = _probs(run / "eval-test" / "predictions.csv")
    proc = bcc_main("eval", "-c", run, "-d", shards, "--out", out / "eval-auto")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "eval-auto" / "metrics.json").read_text())["weights"] == "ema"
    ema = _probs(out / "eval-auto" / "predictions.csv")
    col = next(c for c in ema[next(iter(ema))] if c.startswith("combined:"))
    assert any(abs(float(ema[k][col]) - float(raw[k][col])) > 1e-4 for k in ema)  # the two weights differ

    proc = bcc_main("report", run, "--worst", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "eval-test" / "metrics.json").read_text())["weights"] == "ema"
    reported = _probs(run / "eval-test" / "predictions.csv")
    assert all(float(reported[k][col]) == pytest.approx(float(ema[k][col]), abs=1e-6) for k in ema)
    assert "EMA weights" in (run / "report.html").read_text()

    # bcc compare's aggregation over this run: test predictions and metrics of the EMA weights
    (arm,) = aggregate(out, arms=["fold-0"], n_boot=20)
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = json.loads((shards / "manifest.json").read_text())["classes"]
    assert {r["weights"] for r in rows} == {"ema"}
    assert {r["key"]: names[int(r["pred"])] for r in rows} == {k: r["pred_class"] for k, r in ema.items()}
    evaluated = json.loads((out / "eval-auto" / "metrics.json").read_text())["metrics"]
    assert arm.runs[0].weights == "ema" and arm.runs[0].test_all["bacc"] == pytest.approx(evaluated["bacc"], abs=1e-6)
    with open(out / "results.csv", newline="") as f:
        assert next(csv.DictReader(f))["weights"] == "ema"
    assert "EMA weights" in (out / "RESULTS.md").read_text()

    # bcc cv's out-of-fold predictions: the EMA weights' probabilities on fold 0
    oof = predict_fold(run)
    assert oof["weights"] == "ema"

    def val_probs(weights):
        im = load_inference_model(run, device="cpu", weights=weights, calibrated=False, operating_point=False)
        data = im.config.data
        got = _infer(im, eval_loader(load_data(data), data.val_split, data, rank=0, world_size=1))
        return {k: torch.softmax(got["logits"][0][i].double(), 0) for i, k in enumerate(got["key"])}

    want, raw_val = val_probs("ema"), val_probs("raw")
    assert sorted(oof["key"]) == sorted(want)
    for i, k in enumerate(oof["key"]):
        torch.testing.assert_close(oof["head_probs"][0][i], want[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(want[k], raw_val[k], atol=1e-4) for k in want)


@pytest.mark.slow
def test_head_lr_mult_holds_in_the_optimizer_that_trains_in_every_stage(cv_run):
    """train.head_lr_mult: the heads' param group runs at mult x the rate of a backbone group of the same
    stage multiplier, in the optimizer state each checkpoint saved (stage 0: heads + block4 at 0.5, stage
    1 after the stage change: every group)."""
    from bcc.checkpoint import load_checkpoint

    run = cv_run[0] / "fold-0"
    steps = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(steps) == 2
    for path, backbone, mult in zip(steps, (["block4"], ["block0", "block2", "block4"]), (0.5, 1.0),
                                    strict=True):
        lr = {g["group"]: g["lr"] for g in load_checkpoint(path).optimizer["param_groups"]}
        assert set(backbone) < set(lr), lr
        for name in backbone:
            assert lr[name] > 0 and lr["heads"] == pytest.approx(3.0 / mult * lr[name], rel=1e-9), (path.name, lr)


@pytest.mark.slow
def test_calibrate_and_eval_of_a_fold_run_use_its_fold_and_keep_the_ema_fit(cv_pack, cv_run, tmp_path, bcc_main):
    """A fold run's `bcc calibrate` and `bcc eval --split val` read fold k (the run's data.fold view), not
    the pack's val split it mostly trained on; calibrate's default --weights auto refits the EMA weights
    too, so the weights eval/predict/export choose (auto: EMA) stay the same; --weights raw keeps the EMA fit."""
    from bcc.predict import load_inference_model

    (shards, fold_of), (out, _, cv) = cv_pack, cv_run
    assert cv.returncode == 0, cv.stdout + cv.stderr
    run = tmp_path / "fold-0"
    shutil.copytree(out / "fold-0", run, symlinks=True)
    best = run / "checkpoints" / "best"
    n0 = sum(f == 0 for f in fold_of.values())
    assert n0 != json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"]
    proc = bcc_main("calibrate", "-c", run, "--workers", "0", "--operating-point", "youden")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert f"({n0} images)" in text and "fold 0 of the pack's train+val" in text
    assert "raw and ema weights calibrated" in text
    temps = json.loads((best / "temperature.json").read_text())
    point = json.loads((best / "operating_point.json").read_text())
    assert temps["fold"] == 0 and temps["count"] == n0 and set(temps["ema"]["temperatures"]) == {"binary", "subtype"}
    assert point["fold"] == 0 and point["ema"]["rule"] == "youden" and point["ema"]["margin"] != point["margin"]
    im = load_inference_model(run, device="cpu", weights="auto")
    assert im.weights == "ema" and im.temperatures == temps["ema"]["temperatures"]
    assert im.operating_point["margin"] == point["ema"]["margin"]

    proc = bcc_main("calibrate", "-c", run, "--workers", "0", "--weights", "raw")
    assert proc.returncode == 0 and "raw weights calibrated" in proc.stdout, proc.stderr
    assert json.loads((best / "temperature.json").read_text())["ema"] == temps["ema"]
    assert load_inference_model(run, device="cpu").weights == "raw"  # None: raw, as before
    assert load_inference_model(run, device="cpu", weights="auto").weights == "ema"

    proc = bcc_main("eval", "-c", run, "-d", shards, "--split", "val", "--out", tmp_path / "ev", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["count"] == n0 and metrics["fold"] == 0 and "fold 0" in " ".join(proc.stdout.split())


@pytest.mark.slow
def test_report_of_a_fold_run_shows_its_fold_for_val(cv_pack, cv_run, tmp_path, bcc_main):
    """`bcc report --split val` of a fold run evaluates fold k (as `bcc eval --split val` does), finds the
    mistakes' images there (fold k's samples lie mostly in the pack's train shards: the report looked in
    its val shards and failed) and names the fold; an older evaluation without `fold` is redone."""
    (_, fold_of), (out, _, cv) = cv_pack, cv_run
    assert cv.returncode == 0, cv.stdout + cv.stderr
    run = tmp_path / "fold-0"
    shutil.copytree(out / "fold-0", run, symlinks=True)
    n0 = sum(f == 0 for f in fold_of.values())
    proc = bcc_main("report", run, "--split", "val", "--out", tmp_path / "rep", "--worst", "40")
    assert proc.returncode == 0, proc.stderr
    evaluated = tmp_path / "rep" / "eval-val"
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["fold"] == 0 and metrics["count"] == n0
    with open(evaluated / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["key"] for r in rows) == sorted(k for k, f in fold_of.items() if f == 0)
    wrong = [r["key"] for r in rows if r["true_class"] != r["pred_class"]]
    assert any(k.startswith("train-") for k in wrong), "the gallery must show a fold-0 image from a train shard"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("val (fold 0 of the pack&#x27;s train+val: the run&#x27;s data.fold)") >= 4  # table, headings
    assert "val (log: fold 0, epoch" in page

    metrics.pop("fold")  # as an evaluation written before fold views: its val may be the pack's val split
    metrics["count"] = -1
    (evaluated / "metrics.json").write_text(json.dumps(metrics))
    proc = bcc_main("report", run, "--split", "val", "--out", tmp_path / "rep", "--worst", "0")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["fold"] == 0 and metrics["count"] == n0  # evaluated again, not reused


@pytest.fixture(scope="module")
def fold_point_run(cv_pack, tmp_path_factory):
    """One fold run (`bcc train` with data.fold=1 of `cv_pack`) that fits temperatures and a youden
    operating point on its validation fold at the end, for the raw and the EMA weights (no test pass)."""
    root = tmp_path_factory.mktemp("foldpoint")
    run = root / "run"
    cfg = write_config(root / "cfg.yaml", cv_pack[0], run, data={"workers": 0, "fold": 1},
                       train={"epochs": 1, "ema_decay": 0.5},
                       eval={"calibrate": True, "operating_point": "youden", "test_at_end": False})
    proc = _bcc("train", "--config", cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_fold_runs_fits_record_the_fold_they_were_fitted_on(cv_pack, fold_point_run, tmp_path):
    """Training's operating_point.json and temperature.json of a fold run say which fold the fit used
    (`bcc calibrate` already did), in the EMA's entries too; without the key a file reads as before."""
    from bcc.operating_point import read_operating_point, stored_points

    (shards, fold_of) = cv_pack
    best = fold_point_run / "checkpoints" / "best"
    n1 = sum(f == 1 for f in fold_of.values())
    point = json.loads((best / "operating_point.json").read_text())
    temps = json.loads((best / "temperature.json").read_text())
    for record in (point, point["ema"], temps, temps["ema"]):
        assert record["split"] == "val" and record["fold"] == 1 and record["count"] == n1, record
        assert Path(record["data"]) == shards.resolve()
    assert point["rule"] == point["ema"]["rule"] == "youden"
    older = {k: v for k, v in point.items() if k != "fold"}  # a file of an older bcc: no `fold`
    older["ema"] = {k: v for k, v in point["ema"].items() if k != "fold"}
    (tmp_path / "operating_point.json").write_text(json.dumps(older))
    assert read_operating_point(tmp_path)["margin"] == point["margin"] and "fold" not in read_operating_point(tmp_path)
    assert stored_points(tmp_path)["ema"]["margin"] == point["ema"]["margin"]

    # the model card of an export says so too (it read the split only, through its own copy of the lookup)
    from bcc.export import export_checkpoint

    export_checkpoint(fold_point_run, tmp_path / "hf", format="hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    fold = "the `val (fold 1 of the pack's train+val: the run's data.fold)` split"
    assert f"fitted on {fold} ({n1} images)" in card and f"; fitted on {fold}." in card, card


@pytest.mark.slow
def test_eval_and_report_warn_on_the_fold_the_fits_were_made_on(cv_pack, fold_point_run, synth_shards, tmp_path,
                                                                  bcc_main):
    """A fold run's temperatures and operating point were fitted on fold 1: `bcc eval` / `bcc report` of
    `--split val` (that fold) say in one `warning:` line that its figures are flattered by the fit; the
    test split, and another pack's val split, are not what was fitted on: no warning."""
    shards, run = cv_pack[0], fold_point_run
    fold = "--split val (fold 1 of the pack's train+val: the run's data.fold) holds the samples the "
    both = fold + "temperatures and the operating point (ema weights) were fitted on: the calibration (ECE, loss) " \
                  "and the decisions at the operating point"

    def evaluate(*args, data=shards):
        proc = bcc_main("eval", "-c", run, "-d", data, "--out", tmp_path / "ev", "--workers", "0", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = evaluate("--split", "val")
    assert out.count("warning:") == 1 and both in out, out
    assert "warning:" not in evaluate("--split", "test")
    assert "warning:" not in evaluate("--split", "val", data=synth_shards)  # a pack without folds: its own val
    out = evaluate("--split", "val", "--argmax")  # the temperatures alone
    assert fold + "temperatures (ema weights) were fitted on: the calibration (ECE, loss) measured there is " \
                  "flattered" in out
    assert "warning:" not in evaluate("--split", "val", "--argmax", "--no-calibration")

    for _ in range(2):  # evaluated (bcc eval's line), then reused (the report's own): said once each time
        proc = bcc_main("report", run, "--split", "val", "--out", tmp_path / "rep", "--worst", "0")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("warning:") == 1 and both in proc.stdout, proc.stdout
    page = (tmp_path / "rep" / "report.html").read_text()
    assert '<p class="warn">warning: --split val (fold 1 of the pack&#x27;s train+val' in page
    proc = bcc_main("report", run, "--out", tmp_path / "rep", "--worst", "0")  # the test split
    assert proc.returncode == 0 and "warning:" not in proc.stdout, proc.stdout + proc.stderr
    assert "warning:" not in (tmp_path / "rep" / "report.html").read_text()
