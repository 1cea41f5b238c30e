"""`bcc compare` over seeds: the bootstrap, the aggregation and the choice on validation as pure functions
(grids of small cases), and one end-to-end `bcc compare --seeds 2`."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bcc.compare import (
    CompareError,
    ModeResult,
    Predictions,
    plan_arms,
    read_predictions,
    run_overrides,
    seed_list,
)
from bcc.compare_table import choose_arm, paired_difference, seed_mean_ci, summarize_arms
from bcc.stats import SAMPLE_METRICS, accuracy, balanced_accuracy, bootstrap_ci, mean_sd, recall_of

from conftest import REPO, write_config

# --------------------------------------------------------------------------- bootstrap


def _mean_of(data):
    data = np.asarray(data, dtype=float)
    return lambda idx: float(data[idx[0]].mean())


def test_bootstrap_two_points_known_case():
    # the mean of a resample of [0, 1] is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are the extremes
    assert bootstrap_ci(_mean_of([0, 1]), [2], n_boot=1000, seed=0) == (0.0, 1.0)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_bootstrap_of_a_constant_is_a_point(value):
    assert bootstrap_ci(_mean_of([value] * 7), [7]) == (value, value)


@pytest.mark.parametrize("n", [50, 400])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_bootstrap_of_a_proportion_matches_the_normal_interval(n, p):
    data = np.zeros(n)
    data[: round(p * n)] = 1
    lo, hi = bootstrap_ci(_mean_of(data), [n], n_boot=2000, seed=1)
    m = data.mean()
    se = math.sqrt(m * (1 - m) / n)
    assert lo <= m <= hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_is_reproducible_and_rejects_a_bad_level():
    data = np.random.default_rng(3).random(30)
    assert bootstrap_ci(_mean_of(data), [30], seed=5) == bootstrap_ci(_mean_of(data), [30], seed=5)
    assert bootstrap_ci(_mean_of(data), [30], seed=5) != bootstrap_ci(_mean_of(data), [30], seed=6)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(_mean_of(data), [30], level=1.0)


def test_bootstrap_drops_nan_replicates():
    assert all(math.isnan(v) for v in bootstrap_ci(lambda idx: math.nan, [3]))
    # NaN whenever the resample misses row 0: the finite replicates are the ones that hold it
    lo, hi = bootstrap_ci(lambda idx: 1.0 if 0 in idx[0] else math.nan, [4], n_boot=200)
    assert (lo, hi) == (1.0, 1.0)


# --------------------------------------------------------------------------- metrics and mean +- sd


@pytest.mark.parametrize(("y", "p", "acc", "bacc"), [
    ([0, 0, 0, 1], [0, 0, 0, 0], 0.75, 0.5),
    ([0, 1, 2, 2], [0, 1, 2, 2], 1.0, 1.0),
    ([0, 1, 1, 1], [1, 1, 1, 0], 0.5, (0 + 2 / 3) / 2),
    ([2, 2], [0, 2], 0.5, 0.5),  # classes absent from y do not count
])
def test_accuracy_and_balanced_accuracy(y, p, acc, bacc):
    y, p = np.array(y), np.array(p)
    assert accuracy(y, p) == pytest.approx(acc) and balanced_accuracy(y, p) == pytest.approx(bacc)


def test_sensitivity_and_specificity():
    y, p = np.array([1, 1, 1, 0, 0]), np.array([1, 0, 1, 0, 1])
    assert recall_of(1)(y, p) == pytest.approx(2 / 3) and recall_of(0)(y, p) == pytest.approx(0.5)
    assert math.isnan(recall_of(1)(np.array([0]), np.array([0])))


@pytest.mark.parametrize(("values", "mean", "sd"), [
    ([1.0], 1.0, math.nan), ([1.0, 3.0], 2.0, math.sqrt(2)), ([2.0, math.nan, 4.0], 3.0, math.sqrt(2)),
    ([math.nan], math.nan, math.nan), ([0.5, 0.5, 0.5], 0.5, 0.0),
])
def test_mean_sd(values, mean, sd):
    got = mean_sd(values)
    for g, w in zip(got, (mean, sd), strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w)


# --------------------------------------------------------------------------- aggregation over seeds


def preds(y, p, keys=None, binary=False) -> Predictions:
    y, p = np.array(y), np.array(p)
    keys = tuple(keys or (f"k{i}" for i in range(len(y))))
    return Predictions(keys, y, p, (y > 0).astype(int) if binary else None, (p > 0).astype(int) if binary else None)


def test_paired_difference_grid():
    y = [0, 1, 2, 0, 1, 2]
    right, wrong = preds(y, y), preds(y, [1, 2, 0, 1, 2, 0])
    same = paired_difference([right, right], [right, right], "acc", n_boot=200)
    assert same["per_seed"] == [0.0, 0.0] and same["mean"] == 0.0 and same["ci"] == (0.0, 0.0)
    better = paired_difference([right, right], [wrong, wrong], "acc", n_boot=200)
    assert better["per_seed"] == [1.0, 1.0] and better["ci"] == (1.0, 1.0)
    half = preds(y, [0, 1, 2, 1, 2, 0])  # right on the first three
    mixed = paired_difference([half], [wrong], "bacc", n_boot=500)
    assert mixed["per_seed"] == [pytest.approx(0.5)] and mixed["ci"][0] < 0.5 < mixed["ci"][1]
    assert math.isnan(paired_difference([right], [wrong], "binary_sens")["mean"])  # no binary head
    with pytest.raises(CompareError, match="different test samples"):
        paired_difference([right], [preds(y, y, keys=[f"x{i}" for i in range(6)])], "acc")


def test_seed_mean_ci_shares_the_resample_of_one_test_set():
    y = [0, 1] * 10
    a, b = preds(y, y), preds(y, [1 - v for v in y])  # one seed always right, one always wrong
    # on one test set both seeds see the same resample: their mean accuracy is 0.5 in every replicate
    assert seed_mean_ci([a, b], "acc", n_boot=300) == (0.5, 0.5)
    other = preds(y, [1 - v for v in y], keys=[f"o{i}" for i in range(20)])
    assert seed_mean_ci([a, other], "acc", n_boot=300) == (0.5, 0.5)  # still exact: both constant
    noisy = preds(y, [0] * 20, keys=[f"o{i}" for i in range(20)])
    lo, hi = seed_mean_ci([a, noisy], "acc", n_boot=300)
    assert lo < 0.75 < hi  # independent resamples of another pack's test set add their noise
    assert all(math.isnan(v) for v in seed_mean_ci([a, b], "binary_bacc"))  # no binary head


@pytest.mark.parametrize(("vals", "mode", "want"), [
    ({"a": 0.5, "b": 0.7}, "max", "b"), ({"a": 0.5, "b": 0.7}, "min", "a"), ({"a": 0.7, "b": 0.7}, "max", "a"),
    ({"a": math.nan, "b": 0.1}, "max", "b"), ({"a": math.nan}, "max", None), ({}, "max", None),
])
def test_choose_arm(vals, mode, want):
    assert choose_arm(vals, mode) == want


def _result(arm, seed, val, test) -> ModeResult:
    return ModeResult(mode=arm, run_dir=Path(arm), best_epoch=1, val={"bacc": val}, test={"bacc": test},
                      train_time=1.0, steps=1, epochs=1, trainable_final=1, trainable_mean=1.0, total_params=1,
                      metrics=["bacc"], finetune=arm, init="scratch", seed=seed, test_all={"bacc": test, "acc": test})


def test_summarize_chooses_on_validation_never_on_test():
    y = [0, 1, 2, 3] * 3
    good, bad = preds(y, y), preds(y, [0] * 12)
    # "probe" has the better validation, "full" the better test: the choice is "probe"
    runs = {"probe": [_result("probe", 0, 0.9, 0.25), _result("probe", 1, 0.8, 0.25)],
            "full": [_result("full", 0, 0.6, 1.0), _result("full", 1, 0.7, 1.0)]}
    out = summarize_arms(runs, {"probe": [bad, bad], "full": [good, good]}, ["bacc"], ["bacc", "acc"], "bacc", "max",
                         n_boot=100)
    probe, full = out
    assert probe.chosen and not full.chosen
    assert probe.val["bacc"][0] == pytest.approx(0.85) and probe.val["bacc"][1] == pytest.approx(math.sqrt(0.005))
    assert full.test["bacc"] == (1.0, 0.0) and full.ci["bacc"] == (1.0, 1.0)
    assert probe.paired == {} and full.paired["bacc"]["per_seed"] == [0.75, 0.75]
    assert full.paired["acc"]["mean"] == pytest.approx(0.75)
    # a seed missing from the chosen arm is left out of the pairing
    runs["full"].append(_result("full", 2, 0.5, 1.0))
    out = summarize_arms(runs, {"probe": [bad, bad], "full": [good, good, good]}, ["bacc"], ["bacc"], "bacc", "max",
                         n_boot=50)
    assert out[1].paired["bacc"]["per_seed"] == [0.75, 0.75]


@pytest.mark.parametrize(("modes", "inits", "pretrained", "names"), [
    (["frozen", "full"], None, "", ["frozen", "full"]),
    (["frozen", "full"], None, "w.safetensors", ["frozen", "full"]),
    (["lpft"], ["pretrained", "scratch"], "runs/wbc", ["lpft", "lpft-scratch"]),
    (["frozen", "lpft"], ["scratch"], "runs/wbc", ["frozen-scratch", "lpft-scratch"]),
    (["full"], ["scratch"], "", ["full"]),
])
def test_arms(modes, inits, pretrained, names):
    arms = plan_arms(modes, inits, pretrained)
    assert [a.name for a in arms] == names
    scratch = [a for a in arms if a.forces_scratch]
    assert all("model.pretrained=''" in run_overrides(a, Path("o") / a.name, None, None) for a in scratch)
    assert run_overrides(arms[0], Path("o"), 3, "p1")[-2:] == ["train.seed=3", "data.shards=p1"]


@pytest.mark.parametrize(("modes", "inits", "pretrained", "message"), [
    (["warm"], None, "", "unknown mode 'warm'"),
    (["full"], ["imagenet"], "", "unknown init 'imagenet'"),
    (["full"], ["pretrained", "scratch"], "", "--init pretrained needs model.pretrained"),
])
def test_arms_refused(modes, inits, pretrained, message):
    with pytest.raises(CompareError, match=message):
        plan_arms(modes, inits, pretrained)


def test_seed_list():
    assert seed_list(7, 3) == [7, 8, 9]
    with pytest.raises(CompareError, match="--seeds must be >= 1"):
        seed_list(0, 0)


def test_bcc_compare_refuses_packs_that_do_not_match_the_seeds(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused")
    proc = bcc_main("compare", "--config", cfg, "--seeds", "2", "--packs", synth_shards, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: --packs gives 1 pack(s) for --seeds 2: one pack per seed"]
    assert not (tmp_path / "o").exists()


def test_bcc_compare_refuses_packs_of_another_data_set_or_taxonomy(synth_shards, tmp_path, bcc_main):
    """--packs are seeds of one data set: a pack of other images or another taxonomy is refused by name."""
    import json

    manifest = json.loads((synth_shards / "manifest.json").read_text())
    other, wbc = tmp_path / "other", tmp_path / "wbc"
    for path in (other, wbc):
        path.mkdir()
    fewer = json.loads(json.dumps(manifest))
    split = next(iter(fewer["splits"].values()))
    cls = next(c for c, n in split["class_counts"].items() if n)
    split["class_counts"][cls] -= 1
    (other / "manifest.json").write_text(json.dumps(fewer))
    relabelled = json.loads(json.dumps(manifest))
    relabelled["taxonomy"]["heads"][0]["labels"] = relabelled["taxonomy"]["heads"][0]["labels"][::-1]
    (wbc / "manifest.json").write_text(json.dumps(relabelled))
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused")
    for pack, said in ((other, "holds other images than"), (wbc, "has taxonomy")):
        proc = bcc_main("compare", "--plan", "--config", cfg, "--seeds", "2", "--packs", f"{synth_shards},{pack}",
                        "--out", tmp_path / "o")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: --packs: {pack} {said}") and str(synth_shards) in line


def test_bcc_compare_refuses_packs_of_other_images_with_the_same_class_counts(synth_data, synth_shards, tmp_path,
                                                                              bcc_main):
    """--packs compare images, not class totals: a pack where two images of one class are other files
    (the same counts per class and split) is refused with the count, by each pack's sample index; the
    same images split by another seed pass; a pack without an index falls back to the totals, noted."""
    import io
    import shutil

    from PIL import Image

    from bcc.pack import pack_folders

    changed = tmp_path / "changed"
    shutil.copytree(synth_data, changed)
    for path in sorted((changed / "Early").iterdir())[:2]:  # another file (bytes), same class
        with Image.open(path) as im:
            buf = io.BytesIO()
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=80)
        path.write_bytes(buf.getvalue())
    other, reseeded = tmp_path / "other", tmp_path / "reseeded"
    pack_folders(changed, other, split=(0.7, 0.15, 0.15), seed=0, min_shards=4)
    pack_folders(synth_data, reseeded, split=(0.7, 0.15, 0.15), seed=1, min_shards=4)
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused")

    def compare(pack):
        return bcc_main("compare", "--plan", "--config", cfg, "--modes", "full", "--seeds", "2",
                        "--packs", f"{synth_shards},{pack}",
                        "--out", tmp_path / "o")

    proc = compare(other)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: --packs: {other} holds other images than {synth_shards}: 2 of its 240 images "
                           f"(source file and class) are not in {synth_shards}, 2 of {synth_shards}'s are not in it"), line
    proc = compare(reseeded)  # the same images, split by another seed
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stdout + proc.stderr
    (other / "sample_index.npz").unlink()  # lost beside a manifest of today's format: an error
    proc = compare(other)
    assert proc.returncode == 2 and f"error: --packs: {other}: {other / 'sample_index.npz'} is missing: " in proc.stderr
    manifest = json.loads((other / "manifest.json").read_text())  # packed before the index: class totals only, said so
    (other / "manifest.json").write_text(json.dumps({**manifest, "format": "bcc-shards/5"}))
    proc = compare(other)
    assert proc.returncode == 0, proc.stderr
    assert f"note: --packs: {other}: it has no sample_index.npz" in " ".join((proc.stdout + proc.stderr).split())


# --------------------------------------------------------------------------- end to end


def test_bcc_compare_with_two_seeds(synth_shards, tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused",
                       train={"epochs": 1, "warmup_steps": 1, "log_every": 50}, data={"batch_size": 32, "workers": 0},
                       eval={"operating_point": "youden"})
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "bcc", "compare", "--config", str(cfg), "--modes", "frozen,full", "--seeds", "2",
           "--bench-steps", "0", "--bootstrap", "200", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["mode"], r["seed"]) for r in rows] == [("frozen", "0"), ("frozen", "1"), ("full", "0"), ("full", "1")]
    for r in rows:  # the bootstrap's per-sample predictions are the run's own test decisions
        p = read_predictions(out / r["mode"] / f"seed-{r['seed']}")
        for m in ("acc", "bacc", "binary_bacc", "binary_sens"):
            assert SAMPLE_METRICS[m][0](*p.columns(m)) == pytest.approx(float(r[f"test_{m}"]), abs=1e-5), (m, r)
        # and the binary head at the operating point fitted on val (eval.operating_point), per run
        assert 0 <= float(r["test_binary_op_sens"]) <= 1 and 0 < float(r["test_binary_op_threshold"]) < 1
    arms = {r["arm"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(arms) == {"frozen", "full"} and sum(int(a["chosen"]) for a in arms.values()) == 1
    chosen = next(a for a in arms.values() if a["chosen"] == "1")
    other = next(a for a in arms.values() if a["chosen"] == "0")
    assert float(chosen["val_bacc_mean"]) >= float(other["val_bacc_mean"])  # on validation
    for a in arms.values():
        seeds = [float(r["test_bacc"]) for r in rows if r["mode"] == a["arm"]]
        assert float(a["test_bacc_mean"]) == pytest.approx(np.mean(seeds), abs=1e-5)
        assert float(a["test_bacc_ci_lo"]) <= float(a["test_bacc_ci_hi"])
    assert len(other["delta_bacc_per_seed"].split()) == 2 and other["delta_bacc_ci_lo"] != "nan"
    md = (out / "RESULTS.md").read_text()
    assert f"Chosen on validation: {chosen['arm']}" in md and "Paired differences" in md and " ± " in md

    # --aggregate with a seed run that did not finish (an array task that failed): said, not dropped silently
    (out / "full" / "seed-1" / "summary.json").unlink()
    again = bcc_main("compare", "--aggregate", out, "--modes", "frozen,full", "--bootstrap", 20)
    assert again.returncode == 0, again.stderr
    assert "Fewer seeds finished than asked: full (1 of 2)" in (out / "RESULTS.md").read_text()


def test_a_runs_cpu_seconds_count_from_its_own_start_not_the_process_start():
    """`bcc compare --processes 1` trains the runs one after another in one process: each run's
    `cpu_seconds` (summary.json, the table's CPU minutes) must be its own, not the process's total."""
    import time

    from bcc.train.runlog import RunLog, process_cpu_seconds

    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # CPU spent before this run starts (an earlier run)
        sum(range(1000))
    log = RunLog.__new__(RunLog)
    log.start_clock()
    assert process_cpu_seconds() >= 0.3
    assert 0 <= log.cpu_elapsed() < 0.2


def test_bcc_compare_packs_take_urls_and_pipe_templates(synth_shards, tmp_path, bcc_main):
    """--packs takes every data.shards form (breaker b12z F5: an http(s) or pipe: pack was refused as "no
    manifest.json"); --pack, repeated, gives a location holding a comma (an rclone pipe: template)."""
    from test_remote import serve

    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused")
    template = f"pipe:cat {synth_shards}/{{name}} # ,x"  # a comma, harmless in the shell
    with serve(synth_shards) as (_, url):
        proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "full", "--seeds", "2",
                        "--pack", url, "--pack", template, "--out", tmp_path / "o")
        gone = bcc_main("compare", "--plan", "--config", cfg, "--seeds", "2", "--pack", f"{url}/nowhere", "--pack", url)
    assert gone.returncode == 2 and "error: --packs: " in gone.stderr and "--packs: --packs" not in gone.stderr  # R4
    assert "HTTP 404" in gone.stderr, gone.stderr
    assert proc.returncode == 0, proc.stderr
    assert [line.split("\t")[-1] for line in proc.stdout.splitlines()] == [f"data.shards={url}",
                                                                            f"data.shards={template}"]
    both = bcc_main("compare", "--plan", "--config", cfg, "--seeds", "2", "--pack", url, "--packs", f"{url},{url}")
    assert both.returncode == 2 and "error: --pack and --packs both give the packs" in both.stderr


def test_bcc_compare_plan_lists_every_arm_and_seed_once_with_its_pack(synth_shards, tmp_path, bcc_main, monkeypatch):
    # what slurm/compare.sbatch trains one per array task: modes x inits x seeds, arm-major, pack k for seed k
    packs = [tmp_path / "p0", tmp_path / "p1"]
    for p in packs:
        p.mkdir()
        for name in ("manifest.json", "sample_index.npz"):  # a pack's copy without its shards (a plan reads none)
            (p / name).write_bytes((synth_shards / name).read_bytes())
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "unused",
                       model={"backbone": "test_resnet", "pretrained": str(tmp_path / "weights.pt")},
                       train={"seed": 5})
    (tmp_path / "weights.pt").write_bytes(b"")  # planning resolves the source (metadata only: none here)
    monkeypatch.chdir(tmp_path)  # --out o is relative
    proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "frozen,lpft", "--init", "pretrained,scratch",
                    "--seeds", "2", "--packs", ",".join(map(str, packs)), "--out", "o", "data.batch_size=8")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [str(k) for k in range(8)]
    want = [(mode, init, seed) for mode in ("frozen", "lpft") for init in ("pretrained", "scratch") for seed in (5, 6)]
    for row, (mode, init, seed) in zip(rows, want, strict=True):
        arm = mode + ("-scratch" if init == "scratch" else "")
        assert row[1] == f"o/{arm}/seed-{seed}"
        assert row[2:] == [f"finetune.preset={mode}", f"run.dir=o/{arm}/seed-{seed}",
                           *(["model.pretrained=''"] if init == "scratch" else []),
                           f"train.seed={seed}", f"data.shards={packs[seed - 5]}"]
    assert not (tmp_path / "o").exists()  # --plan trains nothing
    # a mode given twice is one arm: an array job must not train one run dir in two tasks at once
    proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "full,full", "--out", "o")
    assert proc.returncode == 0 and [line.split("\t")[1] for line in proc.stdout.splitlines()] == ["o/full"]


def test_scratch_arms_take_the_data_settings_the_pretrained_arms_resolve_to(synth_shards, tmp_path, bcc_main):
    """A source whose metadata gives 48 px and mean/std 0.5 (a timm model folder): the scratch arm of the
    same comparison trains at those too, not at the config defaults; a key the user set stays theirs."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"")
    (model / "config.json").write_text(json.dumps({"architecture": "test_resnet", "pretrained_cfg": {
        "input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.95}}))
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, synth_shards, tmp_path / "unused",
                 model={"backbone": "test_resnet", "pretrained": str(model / "pytorch_model.bin")})
    cfg.write_text(cfg.read_text().replace("image_size: 32", "workers: 0"))  # image_size follows the source
    proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "full", "--init", "pretrained,scratch",
                    "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    pre, scratch = (line.split("\t")[2:] for line in proc.stdout.splitlines())
    assert not any(o.startswith("data.") for o in pre)
    assert {"data.image_size=48", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.crop_pct=0.95"} <= set(scratch)
    proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "full", "--init", "pretrained,scratch",
                    "--out", tmp_path / "o", "data.image_size=32")
    scratch = proc.stdout.splitlines()[1].split("\t")[2:]
    assert "data.image_size=48" not in scratch and "data.crop_pct=0.95" in scratch  # the user's 32 for both arms
    # scratch arms alone load nothing: a source that is gone is no error (issue-14 re-breaker N3)
    proc = bcc_main("compare", "--plan", "--config", cfg, "--modes", "full", "--init", "scratch", "--out",
                    tmp_path / "o", f"model.pretrained={tmp_path / 'gone.bin'}")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr

    from bcc.compare import ModeResult
    from bcc.compare_table import ArmResult, _data_text
    from bcc.config import load_config, save_config

    arms = []
    for name, extra in (("full", ["data.image_size=48"]), ("full-scratch", ["model.pretrained=''"])):
        (tmp_path / name).mkdir()
        save_config(load_config(cfg, extra), tmp_path / name / "config.yaml")
        run = ModeResult(name, tmp_path / name, 1, {}, {}, 0.0, 1, 1, 0, 0.0, 0, init="scratch" if extra else "pretrained")
        arms.append(ArmResult(name, [run], {}, {}, {}))
    assert _data_text(arms).startswith("**Arms train at different data settings**: full: 48 px")


# --------------------------------------------------------------------------- checks before training and tables


def test_seed_list_refuses_a_last_seed_past_numpy_range():
    assert seed_list(2**32 - 2, 2) == [2**32 - 2, 2**32 - 1]
    with pytest.raises(CompareError, match=r"seeds up to 4294967296, past the largest train.seed 4294967295; "
                                           r"lower train.seed to at most 4294967294"):
        seed_list(2**32 - 1, 2)


def _planned(cfg_path, out, modes=("frozen",), seeds=2, overrides=(), inits=None):
    from bcc.compare import plan_runs
    from bcc.config import load_config

    return plan_runs(load_config(cfg_path, list(overrides)), modes, out, seeds, inits)


def _fake_run(run, cfg_path, overrides, finished=True):
    """A run dir as an earlier `bcc compare` left it: its config.yaml (and summary.json when it finished)."""
    from bcc.compare import RESUME
    from bcc.config import load_config, save_config

    save_config(load_config(cfg_path, [*overrides, *run.overrides, RESUME]), run.run_dir / "config.yaml")
    if finished:
        (run.run_dir / "summary.json").write_text("{}")


@pytest.mark.parametrize(("old", "new", "refused"), [
    ([], [], None),
    # how a run executes: free, as on resume
    (["data.workers=2", "train.log_every=3", "checkpoint.keep_last=5"], ["data.workers=0"], None),
    (["train.epochs=1"], ["train.epochs=2"], "train.epochs: 1 -> 2"),  # free on resume, not across a table
    (["train.lr=0.1"], [], "train.lr: 0.1 -> 0.05"),
    ([], ["checkpoint.metric=acc"], "checkpoint.metric: 'bacc' -> 'acc'"),
    (["data.shards=other"], [], "data.shards: 'other' -> "),
    # fitted at the end of training and read by the table: a reused run would show the old rule's columns
    (["eval.operating_point=youden"], ["eval.operating_point=argmax"], "eval.operating_point: 'youden' -> 'argmax'"),
    (["eval.calibrate=false"], ["eval.calibrate=true"], "eval.calibrate: False -> True"),
])
def test_a_run_dir_holding_another_configs_run_is_refused(tmp_path, old, new, refused):
    from bcc.compare_check import check_runs

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused")
    runs = _planned(cfg, tmp_path / "o", overrides=new)
    runs[0].run_dir.mkdir(parents=True)
    _fake_run(runs[0], cfg, old)
    if refused is None:
        check_runs(cfg, new, runs)
        return
    with pytest.raises(CompareError) as e:
        check_runs(cfg, new, runs)
    assert str(e.value).startswith(f"{runs[0].run_dir} holds a run of another config than this command's (")
    assert refused in str(e.value) and "use another --out, or delete the run" in str(e.value)


def test_a_pretrained_runs_followed_data_count_unless_the_user_sets_them(tmp_path):
    from bcc.compare_check import check_runs

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused",
                       model={"backbone": "test_resnet", "pretrained": str(tmp_path / "w.safetensors")})
    runs = _planned(cfg, tmp_path / "o", seeds=1)
    runs[0].run_dir.mkdir(parents=True)
    _fake_run(runs[0], cfg, ["data.mean=[0.5,0.5,0.5]"])  # what the run took from its source
    check_runs(cfg, [], runs)
    with pytest.raises(CompareError, match=r"data.mean: \[0.5, 0.5, 0.5\] -> \[0.4"):
        check_runs(cfg, ["data.mean=[0.4,0.4,0.4]"], runs)
    (runs[0].run_dir / "config.yaml").unlink()  # a run nobody can tell the config of
    with pytest.raises(CompareError, match="holds summary.json but no config.yaml"):
        check_runs(cfg, [], runs)


def test_a_finished_run_from_other_weights_at_the_same_source_path_is_refused(tmp_path):
    """Reuse compares the source's sha256 now with the run's pretrained.json (a retrained step-1 run at the
    same path would otherwise be averaged beside the old one); RESULTS.md/CV.md name source and hash."""
    import json

    import torch
    from safetensors.torch import save_file

    from bcc.compare_check import check_runs, pretrained_text
    from bcc.shards import sha256_file

    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused",
                       model={"backbone": "test_resnet", "pretrained": str(weights)})
    runs = _planned(cfg, tmp_path / "o", seeds=2)
    old = sha256_file(weights)
    for run in runs:
        run.run_dir.mkdir(parents=True)
        _fake_run(run, cfg, [])
        (run.run_dir / "pretrained.json").write_text(json.dumps({"source": str(weights), "sha256": old}))
    check_runs(cfg, [], runs)
    text = pretrained_text([r.run_dir for r in runs], tmp_path / "o")
    assert text == f"Pretrained source: `{weights}` (sha256 {old[:12]}) for every run that starts from one."

    save_file({"w": torch.ones(2)}, str(weights))  # step 1 retrained to the same path
    new = sha256_file(weights)
    with pytest.raises(CompareError) as e:
        check_runs(cfg, [], runs, command="bcc cv")
    msg = str(e.value)
    assert msg.startswith(f"{runs[0].run_dir} was trained from pretrained source {weights} with sha256 {old[:12]}")
    assert f"now holds sha256 {new[:12]}" in msg and "bcc cv would reuse it" in msg and "delete the run dir" in msg
    (runs[1].run_dir / "pretrained.json").write_text(json.dumps({"source": str(weights), "sha256": new}))
    assert "Pretrained sources differ between runs" in pretrained_text([r.run_dir for r in runs], tmp_path / "o")


@pytest.mark.parametrize(("mode", "epochs", "refused"), [
    ("frozen", 1, None), ("lpft", 1, "lpft' has 2 stages and needs train.epochs >= 2, got 1"),
    ("lpft", 2, None), ("staged", 2, "staged' has 3 stages and needs train.epochs >= 3, got 2"), ("staged", 3, None),
])
def test_every_planned_runs_finetune_plan_is_checked_before_training(tmp_path, mode, epochs, refused):
    from bcc.compare_check import check_runs

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused")
    runs = _planned(cfg, tmp_path / "o", ("frozen", mode), 1, [f"train.epochs={epochs}"])
    if refused is None:
        check_runs(cfg, [f"train.epochs={epochs}"], runs)
        return
    with pytest.raises(CompareError, match=f"^{tmp_path / 'o' / mode}: finetune preset '{refused} \\(nothing trained\\)"):
        check_runs(cfg, [f"train.epochs={epochs}"], runs)


def test_bcc_compare_refuses_a_late_failing_mode_before_training_anything(tmp_path, bcc_main):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused")
    common = ("compare", "--config", cfg, "--out", tmp_path / "o", "--bench-steps", "0", "--seeds", "2")
    proc = bcc_main(*common, "--modes", "frozen,lpft", "train.epochs=1")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'o' / 'lpft' / 'seed-0'}: finetune preset 'lpft' has 2 stages and needs train.epochs "
        ">= 2, got 1 (nothing trained)"]
    assert not (tmp_path / "o").exists()  # no frozen run trained first
    proc = bcc_main(*common, "train.seed=4294967295")
    assert proc.returncode == 2 and "past the largest train.seed 4294967295" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bcc_compare_rerun_with_another_budget_is_refused_before_training(tmp_path, bcc_main):
    # the 1-epoch frozen runs of an earlier command are not reused beside 2-epoch lpft runs
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "shards", tmp_path / "unused")
    out = tmp_path / "o"
    for run in _planned(cfg, out, overrides=["train.epochs=1"]):
        run.run_dir.mkdir(parents=True)
        _fake_run(run, cfg, ["train.epochs=1"], finished=run.seed == 0)  # seed 1: interrupted
    proc = bcc_main("compare", "--config", cfg, "--out", out, "--bench-steps", "0", "--modes", "frozen,lpft",
                    "--seeds", "2", "train.epochs=2")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {out / 'frozen' / 'seed-0'} holds a run of another config than this command's "
                     "(train.epochs: 1 -> 2): compare would reuse it beside runs of this config; use another --out, "
                     "or delete the run to train it again"]
    assert not (out / "lpft").exists()
    (out / "frozen" / "seed-0" / "summary.json").unlink()
    (out / "frozen" / "seed-0" / "config.yaml").unlink()
    with pytest.raises(CompareError, match=r"seed-1 holds a run .*\(train.epochs: 1 -> 2\): compare would resume"):
        _planned_check(cfg, out)


def _planned_check(cfg, out):
    from bcc.compare_check import check_runs

    check_runs(cfg, ["train.epochs=2"], _planned(cfg, out, ("frozen", "lpft"), 2, ["train.epochs=2"]))


@pytest.mark.parametrize(("second", "init", "refused"), [
    (["train.seed=1", "finetune.preset=full", "data.shards=p1", "data.workers=0"], "pretrained", None),
    (["model.pretrained=''", "data.mean=[0.5,0.5,0.5]"], "pretrained", None),  # scratch keeps the config's
    (["data.mean=[0.5,0.5,0.5]"], "pretrained", "data.mean: "),
    (["finetune.preset=lpft", "train.epochs=2"], "scratch", "train.epochs: 1 -> 2"),
    (["train.head_lr_mult=0.01"], "scratch", "train.head_lr_mult: 1.0 -> 0.01"),
])
def test_aggregate_refuses_runs_of_different_configs(tmp_path, second, init, refused):
    from bcc.compare_table import aggregate
    from bcc.config import load_config, save_config

    base = ["train.epochs=1", "finetune.preset=frozen"]
    if init == "pretrained":
        base.append(f"model.pretrained={tmp_path / 'w.safetensors'}")
    for k, arm in enumerate(["frozen", "other"]):
        d = tmp_path / "o" / arm
        d.mkdir(parents=True)
        save_config(load_config(None, [*base, *(second if k else [])]), d / "config.yaml")
        (d / "summary.json").write_text("{}")
    if refused is None:
        from bcc.compare_check import check_same_config

        check_same_config([tmp_path / "o" / "frozen", tmp_path / "o" / "other"])
        return
    with pytest.raises(CompareError) as e:
        aggregate(tmp_path / "o", arms=["frozen", "other"])
    assert str(e.value).startswith(f"{tmp_path / 'o' / 'other'} was trained under another config than "
                                   f"{tmp_path / 'o' / 'frozen'} (")
    assert refused in str(e.value) and not (tmp_path / "o" / "RESULTS.md").exists()
