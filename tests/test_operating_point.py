"""bcc.operating_point: parsing the rule, fitting the threshold on validation scores, the one decision
that uses it (bcc.metrics.decide), and a stored point used by predict, eval, calibrate and export."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from bcc.errors import BccError
from bcc.metrics import EvalMetrics, decide
from bcc.operating_point import (
    OperatingPoint,
    OperatingPointError,
    binary_head,
    fit_threshold,
    parse_operating_point,
    rates,
    threshold_for,
    write_operating_point,
)
from bcc.taxonomy import Taxonomy

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests

ALL = Taxonomy.default()
WBC = Taxonomy.from_dict({"name": "wbc", "heads": [{"name": "cell", "labels": ["EOS", "LYM", "MON", "NEU"]}]})


def test_rules_parse_and_bad_ones_are_named():
    assert parse_operating_point("argmax").is_argmax
    assert parse_operating_point(" Youden ") == OperatingPoint("youden")
    assert parse_operating_point("sensitivity>=0.95") == OperatingPoint("sensitivity", 0.95)
    assert parse_operating_point("specificity >= .9") == OperatingPoint("specificity", 0.9)
    assert str(parse_operating_point("sensitivity>=0.95")) == "sensitivity>=0.95"
    for bad in ("sensitivity>=1", "specificity>=0", "sensitivity>=1.5", "sensitivity>0.9", "recall>=0.9", ""):
        with pytest.raises(OperatingPointError, match="operating point") as e:
            parse_operating_point(bad)
        assert isinstance(e.value, BccError)


def test_a_bad_rule_in_the_config_names_the_key_and_its_source(tmp_path):
    from bcc.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {shards: /x}\nmodel: {backbone: test_resnet}\neval: {operating_point: 'sensitivity>=2'}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: eval\.operating_point: must be argmax, youden, .* got 'sensitivity>=2'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'eval\.operating_point=youdn': eval\.operating_point: must be"):
        load_config(path, ["eval.operating_point=youdn"])
    assert load_config(path, ["eval.operating_point=youden"]).eval.operating_point == "youden"


def test_youden_is_exact_on_a_hand_made_example():
    # negatives 0.1 0.2 0.3 0.45, positives 0.4 0.42 0.6 0.8: J is 0.75 only between 0.3 and 0.4
    scores = torch.tensor([0.1, 0.2, 0.3, 0.45, 0.4, 0.42, 0.6, 0.8])
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    t = fit_threshold(scores, target, "youden")
    assert t == pytest.approx(0.35)
    assert rates(scores, target, t) == {"sens": 1.0, "spec": 0.75, "bacc": 0.875}
    assert rates(scores, target, None) == {"sens": 0.5, "spec": 1.0, "bacc": 0.75}  # argmax
    assert fit_threshold(scores, target, "argmax") is None


def test_bounds_are_met_on_validation_with_the_best_other_rate():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(400, generator=g) < 0.4).long()
    scores = torch.sigmoid(torch.randn(400, generator=g) + 1.2 * (2 * target - 1))
    target[:5] = -1  # rows where the head does not apply are ignored
    t = fit_threshold(scores, target, "sensitivity>=0.95")
    r = rates(scores, target, t)
    assert r["sens"] >= 0.95
    above = scores[(target >= 0) & (scores > t)].min()  # the next candidate up loses the sensitivity
    assert rates(scores, target, float(above) + 1e-9)["sens"] < 0.95
    assert r["sens"] > rates(scores, target, None)["sens"]
    t = fit_threshold(scores, target, "specificity>=0.95")
    assert rates(scores, target, t)["spec"] >= 0.95
    below = scores[(target >= 0) & (scores < t)].max()
    assert rates(scores, target, float(below))["spec"] < 0.95


def test_fitting_needs_both_classes_and_a_binary_root_head():
    with pytest.raises(OperatingPointError, match="1 positive and 0 negative"):
        fit_threshold(torch.tensor([0.3]), torch.tensor([1]), "youden")
    assert binary_head(ALL) == (0, "binary")
    with pytest.raises(OperatingPointError, match="no root head with two labels"):
        binary_head(WBC)
    with pytest.raises(OperatingPointError):
        decide(WBC, [torch.zeros(2, 4)], threshold=0.3)


@pytest.mark.parametrize(("rule", "counts", "refused"), [
    ("youden", {"Benign": 3, "Pro-B": 1}, None),
    ("argmax", {"Benign": 3}, None),  # argmax needs no threshold
    ("sensitivity>=0.95", {"Benign": 0, "Pre-B": 2, "Pro-B": 1}, "holds 3 Malignant and 0 Benign samples"),
    ("specificity>=0.9", {"Benign": 4}, "holds 0 Malignant and 4 Benign samples"),
])
def test_a_rule_that_cannot_be_fitted_on_the_val_counts_is_refused_up_front(rule, counts, refused):
    from bcc.operating_point import check_fittable

    if refused is None:
        check_fittable(rule, ALL, counts, "split val")
        return
    with pytest.raises(OperatingPointError) as e:
        check_fittable(rule, ALL, counts, "split val")
    assert str(e.value).startswith(f"eval.operating_point={rule}: split val {refused}")
    assert "use eval.operating_point=argmax" in str(e.value)
    with pytest.raises(OperatingPointError, match="no root head with two labels"):
        check_fittable(rule, WBC, {"EOS": 1}, "split val")


def test_training_with_a_val_split_lacking_a_class_is_refused_before_it_trains(synth_shards, tmp_path, bcc_main):
    from conftest import write_config

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"]["class_counts"]["Benign"] = 0  # as a val split without a benign sample reads
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", eval={"operating_point": "sensitivity>=0.95"})
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: eval.operating_point=sensitivity>=0.95: the validation split 'val' of {shards / 'manifest.json'} holds "
        f"{sum(v for k, v in manifest['splits']['val']['class_counts'].items() if k != 'Benign')} Malignant and 0 "
        "Benign samples; fitting a threshold of head 'binary' needs both; use eval.operating_point=argmax or a "
        "validation split with both"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def logits_of(p_malignant: list[float], subtype: int = 2) -> list[torch.Tensor]:
    p = torch.tensor(p_malignant)
    binary = torch.stack([torch.log1p(-p), torch.log(p)], dim=1)
    sub = torch.full((len(p_malignant), 3), -2.0)
    sub[:, subtype] = 2.0
    return [binary, sub]


def test_decide_flips_exactly_the_samples_between_threshold_and_half():
    logits = logits_of([0.2, 0.41, 0.45, 0.6])
    assert decide(ALL, logits).tolist() == [0, 0, 0, 3]  # argmax: Benign unless p > 0.5
    assert decide(ALL, logits, threshold=None).tolist() == [0, 0, 0, 3]
    assert decide(ALL, logits, threshold=0.42).tolist() == [0, 0, 3, 3]  # 0.45 flips to Malignant: Pro-B
    assert decide(ALL, logits, threshold=0.7).tolist() == [0, 0, 0, 0]


def test_the_stored_point_is_one_decision_whatever_the_temperature(tmp_path):
    write_operating_point(tmp_path, "youden", 0.3, ALL, temperature=2.0)
    point = json.loads((tmp_path / "operating_point.json").read_text())
    assert point["head"] == "binary" and point["positive_label"] == "Malignant" and point["rule"] == "youden"
    assert threshold_for(point, 2.0) == pytest.approx(0.3)
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(1)) * 3
    at = {t: torch.softmax(z / t, dim=1)[:, 1] >= threshold_for(point, t) for t in (0.5, 1.0, 2.0, 4.0)}
    assert all(torch.equal(at[2.0], v) for v in at.values())


def test_eval_metrics_report_argmax_and_the_operating_point():
    logits = logits_of([0.2, 0.41, 0.45, 0.6])
    labels = torch.tensor([0, 0, 3, 3])  # the 0.45 sample is malignant
    plain = EvalMetrics(ALL)
    plain.update(logits, labels)
    out = plain.compute()
    assert not any("_op_" in k for k in out) and out["binary_sens"] == 0.5
    m = EvalMetrics(ALL, threshold=0.42)
    m.update(logits, labels)
    out = m.compute()
    assert out["binary_sens"] == 0.5 and out["binary_spec"] == 1.0  # the head at argmax
    assert out["binary_op_sens"] == 1.0 and out["binary_op_spec"] == 1.0 and out["binary_op_bacc"] == 1.0
    assert out["binary_op_threshold"] == 0.42 and out["acc"] == 1.0  # the combined decision uses the point


# --------------------------------------------------------------------------- a stored point in use


@pytest.fixture
def run_copy(trained_run, tmp_path):  # noqa: F811 - the fixture imported above
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, symlinks=True)
    return dst


def test_predict_eval_and_export_use_the_stored_point(run_copy, synth_data, synth_shards, tmp_path):
    from bcc.evaluate import evaluate_checkpoint
    from bcc.export import export_checkpoint, load_exported
    from bcc.predict import load_inference_model, predict_paths

    images = sorted(p for p in synth_data.rglob("*") if p.is_file())[::6]
    im = load_inference_model(run_copy, device="cpu")
    assert im.threshold is None  # nothing stored: argmax, as before
    before = predict_paths(im, images)
    p = {r.path: r.head_probs["binary"]["Malignant"] for r in before.predictions}
    below = [v for v in p.values() if v <= 0.5]
    assert below, "the one-epoch model calls some image benign"
    t = max(below) - 1e-6  # flips the most malignant-looking of the benign calls, nothing else
    write_operating_point(im.checkpoint, "sensitivity>=0.95", t, im.taxonomy)

    im = load_inference_model(run_copy, device="cpu")
    assert im.threshold == pytest.approx(t)
    after = predict_paths(im, images)
    assert after.threshold == pytest.approx(t)
    for a, b in zip(before.predictions, after.predictions, strict=True):
        flips = t <= p[a.path] <= 0.5
        assert (a.answer.startswith("Malignant") != b.answer.startswith("Malignant")) == flips, (a, b, t)
        assert b.answer.startswith("Malignant") == (p[a.path] >= t)
        assert b.head_labels["binary"] == ("Malignant" if p[a.path] >= t else "Benign")
    assert sum(t <= v <= 0.5 for v in p.values()) >= 1
    assert load_inference_model(run_copy, device="cpu", operating_point=False).threshold is None

    report = evaluate_checkpoint(run_copy, synth_shards, split="val", out=tmp_path / "ev", workers=0)
    assert report["operating_point"]["threshold"] == pytest.approx(t)
    binary = report["heads"]["binary"]
    assert {"sens", "spec", "bacc", "op_sens", "op_spec", "op_bacc", "op_threshold"} <= set(binary)
    assert binary["op_sens"] >= binary["sens"]
    plain = evaluate_checkpoint(run_copy, synth_shards, split="val", out=tmp_path / "ev0", workers=0,
                                operating_point=False)
    assert plain["operating_point"] is None and "op_sens" not in plain["heads"]["binary"]
    assert plain["metrics"]["binary_sens"] == report["metrics"]["binary_sens"]  # argmax reported alike

    export_checkpoint(run_copy, tmp_path / "export")
    info = json.loads((tmp_path / "export" / "bcc_export.json").read_text())
    assert info["operating_point"]["threshold"] == pytest.approx(t)
    assert load_exported(tmp_path / "export")[2].threshold == pytest.approx(t)


def test_bcc_calibrate_fits_the_point_after_the_temperatures(run_copy, synth_shards, bcc_main):

    from bcc.calibrate_run import calibrate_checkpoint

    result = calibrate_checkpoint(run_copy, synth_shards, "val", workers=0, operating_point="sensitivity>=0.9")
    point = result["operating_point"]
    assert point["val"]["chosen"]["sens"] >= 0.9
    stored = json.loads((run_copy / "checkpoints" / "best" / "operating_point.json").read_text())
    t = result["temperatures"]["binary"]
    assert stored["threshold"] == point["threshold"] and stored["temperature"] == t and stored["calibrated"]
    assert math.isclose(stored["margin"], t * math.log(point["threshold"] / (1 - point["threshold"])))
    calibrate_checkpoint(run_copy, synth_shards, "val", workers=0, operating_point="argmax")
    assert not (run_copy / "checkpoints" / "best" / "operating_point.json").exists()
    # fitting on the test split is said (breaker b14h F7): every later test metric would be flattered
    proc = bcc_main("calibrate", "-c", run_copy, "--workers", "0", "--split", "test", "--operating-point", "youden")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --split test is the run's test split (data.test_split): the temperatures and the operating " \
           "point fitted on it flatter" in proc.stdout
    proc = bcc_main("calibrate", "-c", run_copy, "--workers", "0", "--operating-point", "sensitivity>=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: operating point 'sensitivity>=2': the bound must lie in (0, 1)" in proc.stderr


def test_eval_and_report_warn_on_the_split_the_fits_were_made_on(run_copy, synth_shards, bcc_main, tmp_path):
    """After `bcc calibrate --operating-point` on val, `bcc eval`/`bcc report --split val` say in one
    `warning:` line that the calibration and the point's decisions there are flattered (not the test
    split's); a file of an older bcc (no `fold`, no `data`) too; a fit on the test split flags the test split."""
    best = run_copy / "checkpoints" / "best"

    def run(*args):
        proc = bcc_main(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("calibrate", "-c", run_copy, "--workers", "0", "--operating-point", "youden")
    ev = ("eval", "-c", run_copy, "-d", synth_shards, "--out", tmp_path / "ev", "--workers", "0")
    want = ("warning: --split val holds the samples the temperatures and the operating point (raw weights) were "
            "fitted on: the calibration (ECE, loss) and the decisions at the operating point (op_sens/op_spec, acc, "
            "bacc) measured there are flattered by that fit; the held-out test split (--split test) gives "
            "unflattered figures")
    out = run(*ev, "--split", "val")
    assert out.count("warning:") == 1 and want in out, out
    assert "warning:" not in run(*ev, "--split", "test")
    assert "warning: --split val holds the samples the operating point (raw weights) was fitted on: the decisions" \
        in run(*ev, "--split", "val", "--no-calibration")
    out = run("report", run_copy, "--split", "val", "--out", tmp_path / "rep", "--worst", "0")
    assert out.count("warning:") == 1 and want in out
    assert "flattered by that fit" in (tmp_path / "rep" / "report.html").read_text()

    for name in ("operating_point.json", "temperature.json"):  # as an older bcc wrote them
        stored = json.loads((best / name).read_text())
        (best / name).write_text(json.dumps({k: v for k, v in stored.items() if k not in ("fold", "data")}))
    assert want in run(*ev, "--split", "val")

    run("calibrate", "-c", run_copy, "--workers", "0", "--split", "test", "--operating-point", "youden")
    out = run(*ev, "--split", "test")
    assert out.count("warning:") == 1 and "warning: --split test holds the samples the temperatures and the " \
        "operating point (raw weights) were fitted on" in out and "refit on validation (bcc calibrate)" in out
    assert "warning:" not in run(*ev, "--split", "val")


@pytest.fixture
def ema_run_copy(run_copy):
    """`run_copy` with EMA weights in its best checkpoint (the raw ones halved: other outputs), as a run with
    train.ema_decay leaves them, without training a second run."""
    from safetensors.torch import load_file, save_file

    best = (run_copy / "checkpoints" / "best").resolve()
    raw = load_file(best / "model.safetensors")
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in raw.items()}, best / "model_ema.safetensors")
    return run_copy


def test_calibrate_argmax_drops_the_point_of_the_weights_named_only(ema_run_copy, synth_shards, bcc_main, tmp_path):
    """issue-14 re-breaker N1: `bcc calibrate --weights raw --operating-point argmax` removed the EMA's point
    too (the whole file), so predict/export of the EMA weights fell back to argmax, and `--weights ema`
    could not put the EMA's point back. Now each --weights drops (or refits) its own point only."""
    from bcc.operating_point import stored_points
    from bcc.predict import load_inference_model

    run, best = ema_run_copy, (ema_run_copy / "checkpoints" / "best").resolve()

    def calibrate(*args):
        proc = bcc_main("calibrate", "-c", run, "-d", synth_shards, "--workers", "0", *args)
        assert proc.returncode == 0, proc.stderr
        return stored_points(best)

    both = calibrate("--operating-point", "youden")  # auto: the raw and the EMA weights
    assert both["raw"]["rule"] == both["ema"]["rule"] == "youden" and both["raw"]["margin"] != both["ema"]["margin"]

    points = calibrate("--weights", "raw", "--operating-point", "argmax")
    assert points["raw"] is None and points["ema"] == both["ema"]
    im = load_inference_model(run, device="cpu", weights="auto")  # auto: the EMA weights, still deciding at their point
    assert im.weights == "ema" and im.operating_point["margin"] == both["ema"]["margin"]
    assert load_inference_model(run, device="cpu", weights="raw").threshold is None
    assert bcc_main("export", "-c", run, "-o", tmp_path / "export").returncode == 0
    exported = json.loads((tmp_path / "export" / "bcc_export.json").read_text())
    assert exported["weights"] == "ema" and exported["operating_point"]["rule"] == "youden"

    assert calibrate("--weights", "ema", "--operating-point", "argmax") is None  # both argmax: no file
    assert load_inference_model(run, device="cpu", weights="auto").threshold is None
    points = calibrate("--weights", "ema", "--operating-point", "youden")  # the EMA's point back on its own
    assert points["raw"] is None and points["ema"]["rule"] == "youden"
    assert load_inference_model(run, device="cpu", weights="auto").operating_point["margin"] == points["ema"]["margin"]
    points = calibrate("--weights", "raw", "--operating-point", "sensitivity>=0.9")
    assert points["raw"]["rule"] == "sensitivity>=0.9" and points["ema"]["rule"] == "youden"
    points = calibrate("--weights", "ema", "--operating-point", "argmax")
    assert points["raw"]["rule"] == "sensitivity>=0.9" and points["ema"] is None
    assert load_inference_model(run, device="cpu", weights="auto").threshold is None  # the EMA at argmax, as stored
    assert calibrate("--operating-point", "argmax") is None  # auto drops both


def test_an_older_file_with_a_raw_point_only_reads_as_before(tmp_path):
    """A file of an older bcc (the raw point at the top, no `ema` entry) and one with an `ema` entry."""
    from bcc.operating_point import read_operating_point, stored_points, update_operating_point

    write_operating_point(tmp_path, "youden", 0.4, ALL, 1.5, {"split": "val"})
    assert stored_points(tmp_path).keys() == {"raw"} and read_operating_point(tmp_path, ALL)["threshold"] == 0.4
    raw = read_operating_point(tmp_path)
    update_operating_point(tmp_path, raw=None, ema=raw)  # the raw weights at argmax, the EMA's point kept
    stored = json.loads((tmp_path / "operating_point.json").read_text())
    assert stored["rule"] == "argmax" and "margin" not in stored and stored["ema"]["threshold"] == 0.4
    assert read_operating_point(tmp_path, ALL) is None and stored_points(tmp_path, ALL)["ema"] == raw
