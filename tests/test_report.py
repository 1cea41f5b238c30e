"""`bcc report`: one self-contained HTML page, checked by rendering it in a real headless Chromium.

Chromium comes from the system packages (`.ci/install-chromium.sh`, which `.ci/run` calls). Without it
the browser test skips on a workstation and fails under CI=true, so CI cannot pass without looking.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_sources import reseeded  # noqa: F401 - synth_shards' images packed with another seed

from conftest import bcc_in_process, write_config
from test_evaluate import trained_run, unpack_split  # noqa: F401 - trained_run: session fixture shared by the evaluation tests


@pytest.fixture(scope="module")
def report(trained_run, synth_shards, tmp_path_factory):  # noqa: F811
    """The report of `trained_run` through the CLI, in its own directory (the run's eval-test, which
    `bcc eval` writes first, is reused)."""
    out = tmp_path_factory.mktemp("report")
    if not (trained_run / "eval-test" / "metrics.json").is_file():
        assert bcc_in_process("eval", "-c", trained_run, "-d", synth_shards, "--workers", "0") == 0
    assert bcc_in_process("report", trained_run, "--out", out, "--worst", "6") == 0
    return out / "report.html"


def _wrong_sources(run: Path) -> list[str]:
    with open(run / "eval-test" / "predictions.csv", newline="") as f:
        return [r["source"] for r in csv.DictReader(f) if r["true_class"] != r["pred_class"]]


def test_report_is_one_self_contained_page(report, trained_run, tmp_path):  # noqa: F811
    page = report.read_text()
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.html"]
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "only inlined images"
    for section in ("Training curves", "Metrics per split", "Confusion matrix", "Reliability", "Worst mistakes"):
        assert section in page
    # each column says what it measured: the last val row of the log, training's final test (which
    # checkpoint), the evaluation (which step), and whose weights (all read "epoch N, log" before)
    for heading in (r"val \(log: epoch \d+, raw weights\)", r"test \(evaluation: step \d+, raw weights\)"):
        assert re.search(heading, page), heading
    assert "trained from random weights" in page
    from bcc.report import _log_column, _pretrained_text

    (tmp_path / "pretrained.json").write_text(json.dumps({"source": "runs/wbc", "sha256": "3f2a9c0d1b7e" + "0" * 52}))
    assert _pretrained_text(tmp_path, "runs/wbc", False) == "pretrained from <code>runs/wbc</code> (sha256 3f2a9c0d1b7e); "

    assert _log_column("test", {"epoch": 3, "checkpoint": "best", "acc": 0.5, "ema_acc": 0.6}) == (
        "test (log: the best checkpoint, raw weights; ema_*: EMA weights)")
    wrong = _wrong_sources(trained_run)
    assert wrong, "the one-epoch run should make mistakes on the test split"
    # file names relative to the data root, the binary head's malignant map offered
    assert sum(s in page for s in wrong) == min(6, len(wrong))
    assert "(positive label" in page or "binary: Malignant (predicted" in page
    assert page.count('class="mistake"') == min(6, len(wrong))


def test_hide_paths_shows_no_file_name_or_path(report, trained_run, tmp_path):  # noqa: F811
    from bcc.report import write_report

    evaluated = (trained_run / "eval-test" / "metrics.json").stat().st_mtime_ns
    path = write_report(trained_run, out=tmp_path, hide_paths=True, worst=50)
    assert (trained_run / "eval-test" / "metrics.json").stat().st_mtime_ns == evaluated, "evaluation not reused"
    page = path.read_text()
    metrics = json.loads((trained_run / "eval-test" / "metrics.json").read_text())
    for secret in [*_wrong_sources(trained_run), metrics["data"], metrics["checkpoint"], str(trained_run.parent)]:
        assert secret not in page
    assert "mistake 1" in page


def test_worst_mistakes_order_and_metric_names(report, trained_run):  # noqa: F811
    from bcc.report import canonical_metric, worst_mistakes
    from bcc.taxonomy import Taxonomy

    with open(trained_run / "eval-test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = worst_mistakes(rows, Taxonomy.default(), limit=1000)
    assert [m.rank for m in got] == list(range(1, len(got) + 1))
    assert [m.p_true for m in got] == sorted(m.p_true for m in got)
    assert all(m.true_class != m.pred_class for m in got) and len(got) == len(_wrong_sources(trained_run))
    assert [canonical_metric(n) for n in ("acc4", "bacc4", "acc", "bacc", "binary_bacc", "acc_x")] == [
        "acc", "bacc", "acc", "bacc", "binary_bacc", "acc_x"]


def test_all_zero_gradcam_map_says_so(report, trained_run, monkeypatch):  # noqa: F811
    import bcc.gradcam
    from bcc.predict import load_inference_model
    from bcc.report import _gradcam_panels, _read_images, worst_mistakes

    im = load_inference_model(trained_run, device="cpu")
    evaluation = json.loads((trained_run / "eval-test" / "metrics.json").read_text())
    with open(trained_run / "eval-test" / "predictions.csv", newline="") as f:
        mistakes = worst_mistakes(list(csv.DictReader(f)), im.taxonomy, 2)
    real = bcc.gradcam.GradCAM.__call__

    def zero_subtype(self, x, classes=None):
        maps = real(self, x, classes)
        return {**maps, "subtype": torch.zeros_like(maps["subtype"])}

    monkeypatch.setattr(bcc.gradcam.GradCAM, "__call__", zero_subtype)
    panels = _gradcam_panels(im, _read_images(evaluation, mistakes, im.config.data), mistakes)
    for row in panels:
        subtype = [p for p in row if p["title"].startswith("subtype:")]
        assert subtype and subtype[0]["png"] is None and "all zero" in subtype[0]["note"]
        assert any(p["title"].startswith("binary:") and p["png"] for p in row)


def test_an_evaluation_of_another_checkpoint_is_redone(report, trained_run, tmp_path):  # noqa: F811
    from bcc.report import write_report

    run = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    path = run / "eval-test" / "metrics.json"
    real = json.loads(path.read_text())
    path.write_text(json.dumps({**real, "checkpoint": str(tmp_path / "older")}))
    write_report(run, worst=1)  # no --out: redone in the run dir, as bcc eval would
    assert json.loads(path.read_text())["checkpoint"] == str(run.resolve() / Path(real["checkpoint"]).relative_to(
        trained_run.resolve()))


def test_report_out_writes_nothing_into_the_run_dir(trained_run, tmp_path, bcc_main):  # noqa: F811
    """`bcc report RUN --out DIR` evaluated into RUN/eval-test when it had to (issue-14 re-breaker): now the
    evaluation it makes goes under DIR, and the run dir is left as it was."""
    run = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    shutil.rmtree(run / "eval-test", ignore_errors=True)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert bcc_main("report", run, "--out", tmp_path / "out", "--worst", "1").returncode == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (tmp_path / "out" / "report.html").is_file()
    assert json.loads((tmp_path / "out" / "eval-test" / "metrics.json").read_text())["split"] == "test"


def test_report_on_an_image_folder(trained_run, synth_shards, tmp_path):  # noqa: F811
    from bcc.report import write_report

    folder = unpack_split(synth_shards, "test", tmp_path / "cells")
    page = write_report(trained_run, out=tmp_path, data=folder, worst=3).read_text()
    assert not (trained_run / "eval-cells").exists()  # under --out, not in the run dir
    metrics = json.loads((tmp_path / "eval-cells" / "metrics.json").read_text())
    assert metrics["kind"] == "folder" and Path(metrics["data"]) == folder.resolve()
    with open(tmp_path / "eval-cells" / "predictions.csv", newline="") as f:
        wrong = [r["source"] for r in csv.DictReader(f) if r["true_class"] != r["pred_class"]]
    assert wrong and sum(s in page for s in wrong) == min(3, len(wrong))  # relative to the folder
    assert str(folder.resolve() / wrong[0]) not in page


def test_decisions_use_the_stored_operating_point_and_show_argmax(trained_run, tmp_path):  # noqa: F811
    """A checkpoint with an operating point: the evaluation is redone at that point (the reused one was
    at argmax), the page says which decision it shows, and every mistake shows the argmax decision too."""
    from bcc.operating_point import write_operating_point
    from bcc.predict import load_inference_model
    from bcc.report import argmax_classes, write_report

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    rows = list(csv.DictReader((run / "eval-test" / "predictions.csv").read_text().splitlines()))
    im = load_inference_model(run, device="cpu")
    assert argmax_classes(rows, im.taxonomy) == [r["pred_class"] for r in rows]  # evaluated at argmax
    # a threshold between the binary probabilities, so that the point changes some decisions
    p = sorted(float(r["binary:Malignant"]) for r in rows)
    t = p[len(p) // 2] + 1e-6
    write_operating_point(im.checkpoint, "youden", t, im.taxonomy)
    page = write_report(run, out=tmp_path / "out", worst=50).read_text()
    evaluation = json.loads((tmp_path / "out" / "eval-test" / "metrics.json").read_text())
    assert evaluation["operating_point"]["threshold"] == pytest.approx(t)  # redone at the point
    rows = list(csv.DictReader((tmp_path / "out" / "eval-test" / "predictions.csv").read_text().splitlines()))
    argmax = argmax_classes(rows, im.taxonomy)
    assert any(a != r["pred_class"] for a, r in zip(argmax, rows, strict=True))
    assert f"when its probability is &ge; {t:.4f} (operating point youden" in page
    wrong = sum(r["true_class"] != r["pred_class"] for r in rows)
    wrong_argmax = sum(r["true_class"] != a for r, a in zip(rows, argmax, strict=True))
    assert f"{wrong} wrong at the operating point, {wrong_argmax} at argmax" in page
    assert page.count('class="mistake"') == page.count('argmax: <b class="argmax">') == min(50, wrong)


def test_report_errors_are_one_line(tmp_path, bcc_main):
    proc = bcc_main("report", tmp_path / "nope")
    assert proc.returncode == 2 and "error:" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    bad = bcc_main("report", tmp_path, "--worst", "-1")
    assert bad.returncode == 2 and "--worst" in bad.stderr


# --------------------------------------------------------------------------- the real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]
# written into the DOM after `load` (which waits for every image): how many images failed to decode
PROBE = ("<script>addEventListener('load', () => { const all = [...document.images];"
         " document.body.setAttribute('data-images', all.length);"
         " document.body.setAttribute('data-broken', all.filter(i => !i.complete || i.naturalWidth === 0).length);"
         " });</script>")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (run .ci/install-chromium.sh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI the browser test must run")
    pytest.skip(message)


def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI"):
        _chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _chromium()


def _browser(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    chromium = _chromium()
    page = report.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _browser(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.search(r'data-images="(\d+)"', dom.stdout)
    broken = re.search(r'data-broken="(\d+)"', dom.stdout)
    assert images and broken, "the probe did not run: " + dom.stdout[:500] + dom.stderr[-1000:]
    assert int(images.group(1)) == page.count("<img ") >= 3 + 2 * page.count('class="mistake"')
    assert broken.group(1) == "0", f"{broken.group(1)} of {images.group(1)} images did not load"

    shot = tmp_path / "report.png"
    proc = _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert proc.returncode == 0 and shot.is_file() and shot.stat().st_size > 0, proc.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour"


def test_report_on_a_pack_served_over_http(trained_run, synth_shards, tmp_path):  # noqa: F811
    """`--data URL` (or a run trained from a URL): evaluated from the server, its mistakes read back from
    there; a Path turned `http://` into `http:/` ('does not exist (moved?)')."""
    from test_remote import serve

    from bcc.report import write_report

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval-test", ignore_errors=True)
    with serve(synth_shards.parent) as (_, url):
        page = write_report(run, out=tmp_path / "out", data=f"{url}/{synth_shards.name}", worst=2).read_text()
    metrics = json.loads((tmp_path / "out" / "eval-test" / "metrics.json").read_text())
    assert metrics["data"] == f"{url}/{synth_shards.name}" and page.count("data:image/") >= 2


def test_a_runs_data_replaced_by_another_pack_is_refused_not_scored(synth_shards, reseeded, tmp_path, monkeypatch,  # noqa: F811
                                                                    bcc_main):
    """Breaker b12z F4: a run trained on `data.shards=pk` (relative) kept `pk` in its config.yaml, and `bcc
    report RUN` / `bcc calibrate` from another directory read whatever pack of that name was there: test
    images the model trained on scored as its test split, an operating point fitted on training images.
    Now the config records the absolute path, and a pack at it that is not the one the run trained on
    (the checkpoint's dataset fingerprint) is refused with one line."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(synth_shards, tmp_path / "pk")
    cfg = write_config(tmp_path / "c.yaml", "pk", tmp_path / "run", train={"epochs": 1}, eval={"test_at_end": False})
    trained = bcc_main("train", "--config", cfg)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["shards"] == str(tmp_path / "pk")
    # an evaluation of another pack left in the run dir (`bcc eval -d OTHER` writes RUN/eval-test) is not the
    # run's test split: a report without --data evaluates the run's own pack (breaker b12r R1)
    assert bcc_main("eval", "-c", tmp_path / "run", "-d", reseeded, "--workers", "0").returncode == 0
    assert bcc_main("report", tmp_path / "run", "--out", tmp_path / "rep0").returncode == 0
    done = json.loads((tmp_path / "rep0" / "eval-test" / "metrics.json").read_text())
    assert Path(done["data"]) == tmp_path / "pk", done["data"]

    shutil.rmtree(tmp_path / "pk")
    shutil.copytree(reseeded, tmp_path / "pk")  # the same images packed with another seed: other splits
    for args in (("report", tmp_path / "run", "--out", tmp_path / "rep"), ("calibrate", "--checkpoint", tmp_path / "run")):
        proc = bcc_main(*args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert errors[0].startswith(f"error: data.shards {tmp_path / 'pk'} is not the dataset checkpoint "), errors
        assert "its shards' sha256s differ from the checkpoint's record" in errors[0] and "pass --data" in errors[0]
    assert not list((tmp_path / "run").rglob("temperature.json")) and not (tmp_path / "rep" / "report.html").exists()
