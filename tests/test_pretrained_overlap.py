"""The pretrained-overlap check where a reader of results looks (issue-14 re-breaker N2, N4): a run whose
`model.pretrained` was trained on images it evaluates records them in RUN/pretrained.json, and
`bcc compare`'s RESULTS.md and `bcc cv`'s CV.md say so; an export of a bcc run is checked like the run
(the export records its training data), and an export whose data cannot be followed says it was not
checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from test_sources import reseeded  # noqa: F401 - synth_shards' images packed with another seed

from bcc.config import load_config
from bcc.manifest import Manifest
from bcc.pretrained_overlap import check_pretrained

from conftest import write_config
from test_evaluate import trained_run  # noqa: F401 - session fixture: one epoch on synth_shards' train split


def _cfg(pack, pretrained):
    return load_config(None, [f"data.shards={pack}", "model.backbone=test_resnet", f"model.pretrained={pretrained}"])


def _warnings(lines):
    return [line for line in lines if line.startswith("warning: model.pretrained")]


def test_the_overlap_is_recorded_and_shown_in_results_md(trained_run, reseeded, tmp_path, bcc_main):  # noqa: F811
    """Most val/test images of the reseeded pack were the source run's training images: the start-up
    warning's split counts land in RUN/pretrained.json (`overlap`) and in RESULTS.md as a warning line
    (the same line CV.md gets from `pretrained_text`)."""
    from bcc.compare_check import pretrained_text

    out = tmp_path / "cmp"
    run = out / "full"
    cfg = write_config(tmp_path / "c.yaml", reseeded, run, model={"pretrained": str(trained_run)},
                       train={"epochs": 1}, eval={"test_at_end": True})
    proc = subprocess.run([sys.executable, "-m", "bcc.train", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = _warnings(" ".join(proc.stdout.split()).replace(" warning: ", "\nwarning: ").splitlines())
    record = json.loads((run / "pretrained.json").read_text())
    hits = [e for e in record["overlap"] if "split" in e]
    assert {e["split"] for e in hits} == {"val", "test"} and all(0 < e["count"] <= e["total"] for e in hits)
    for e in hits:  # the counts the start-up printed
        assert any(f"was trained on {e['count']} of the {e['total']} images of split '{e['split']}'" in line
                   for line in printed), printed

    assert bcc_main("compare", "--aggregate", out, "--modes", "full").returncode == 0
    results = (out / "RESULTS.md").read_text()
    (line,) = [ln for ln in results.splitlines() if ln.startswith("**Warning: the pretrained source was trained on")]
    for e in hits:
        assert f"{e['count']} of {e['total']} images of split '{e['split']}'" in line
    assert line in pretrained_text([run], out)  # bcc cv's CV.md takes the same text

    # a run fine-tuned from that run passes on what its own source trained on (breaker b12z F2: it was
    # loaded without a word): run trained on the pack's train split only, its source on most of val and test
    lines = check_pretrained(_cfg(reseeded, run), Manifest.load(reseeded), ["val", "test"])
    chained = [ln for ln in lines if ln.startswith("warning: ")]
    assert len(chained) == 2, lines
    for e, ln in zip(hits, chained, strict=True):
        assert ln.startswith(f"warning: {trained_run}, the pretrained source of {run} (model.pretrained), was trained "
                             f"on {e['count']} of the {e['total']} images of split '{e['split']}'"), ln

    clean = tmp_path / "clean"  # a run whose pretrained.json records no overlap: no warning
    clean.mkdir()
    (clean / "pretrained.json").write_text(json.dumps({**record, "overlap": []}))
    assert "Warning" not in pretrained_text([clean], tmp_path)


def test_an_export_of_a_run_is_checked_like_the_run(trained_run, reseeded, tmp_path, bcc_main, capsys):  # noqa: F811
    """model.pretrained = a `bcc export` of the source run: the same warnings as for the run (the export
    records its training data); an older export without that record follows its source checkpoint, and
    one whose checkpoint is gone too, or a Hub export, gets a note that it was not checked."""
    from bcc.train.preflight import check_run

    manifest = Manifest.load(reseeded)
    expected = check_pretrained(_cfg(reseeded, trained_run), manifest, ["val", "test"])
    assert len(_warnings(expected)) == 2
    export = tmp_path / "export"
    assert bcc_main("export", "-c", trained_run, "-o", export).returncode == 0
    got = check_pretrained(_cfg(reseeded, export), manifest, ["val", "test"])
    assert got == [line.replace(str(trained_run), str(export)) for line in expected]
    assert check_pretrained(_cfg(reseeded, export / "model.safetensors"), manifest, ["val", "test"]) == [
        line.replace(str(trained_run), str(export / "model.safetensors")) for line in expected]

    info = json.loads((export / "bcc_export.json").read_text())
    del info["trained_on"]  # as an older bcc wrote it: its source checkpoint is followed
    (export / "bcc_export.json").write_text(json.dumps(info))
    assert check_pretrained(_cfg(reseeded, export), manifest, ["val", "test"]) == got
    (export / "bcc_export.json").write_text(json.dumps({**info, "source_checkpoint": str(tmp_path / "gone")}))
    note = (f"note: whether {export} (model.pretrained) was trained on images this run evaluates is not checked: "
            "it is an export that records no training data (exported by an older bcc, and its source checkpoint "
            "is gone)")
    assert check_pretrained(_cfg(reseeded, export), manifest, ["val", "test"]) == [note]

    hf = tmp_path / "hf"
    assert bcc_main("export", "-c", trained_run, "-o", hf, "--format", "hf").returncode == 0
    assert check_pretrained(_cfg(reseeded, hf), manifest, ["val", "test"]) == [
        f"note: whether {hf} (model.pretrained) was trained on images this run evaluates is not checked: it is "
        "a Hub export, which records no training data"]

    shutil.rmtree(hf)
    capsys.readouterr()
    check_run(_cfg(reseeded, export), manifest)  # what the start-up of such a run prints
    assert note in " ".join(capsys.readouterr().out.split())



def test_the_same_picture_counts_and_a_near_identical_one_is_named(trained_run, synth_shards, tmp_path):  # noqa: F811
    """The pHash radii of the check against model.pretrained's training images: a val image 4 bits from a
    training image (another file) counts as trained on, one 6 bits away is named apart as near-identical
    (different pictures can lie that close), one 8 bits away not at all; a split with only the latter is
    a warning of its own; RESULTS.md counts only the former."""
    import numpy as np

    from bcc import sample_index
    from bcc.pretrained_overlap import overlap_warning, pretrained_overlap

    trained = np.load(synth_shards / "sample_index.npz")["train.phash"]
    pack = tmp_path / "crafted"
    shutil.copytree(synth_shards, pack)
    manifest = Manifest.load(pack)
    rng = np.random.default_rng(3)  # random 64-bit hashes: two lie within 6 bits with probability ~5e-12
    made = {s: {"sha": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                "phash": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                "label": np.zeros(manifest.split(s).count, np.int16)} for s in manifest.splits}
    for position, mask in enumerate((0b1111, 0b111111, 0xFF)):  # 4, 6 and 8 bits apart
        made["val"]["phash"][position] = trained[position] ^ np.uint64(mask)
    made["test"]["phash"][0] = trained[9] ^ np.uint64(0b111111)
    sample_index.write(manifest, made)

    found = pretrained_overlap(_cfg(pack, trained_run), manifest, ["val", "test"])
    common = {"fold": None, "data": str(pack / "manifest.json"), "source": str(trained_run), "via": []}
    assert found == [{"split": "val", "count": 1, "near": 1, "total": manifest.split("val").count, **common},
                     {"split": "test", "count": 0, "near": 1, "total": manifest.split("test").count, **common}], found
    lines = check_pretrained(_cfg(pack, trained_run), manifest, ["val", "test"])
    near = "near-identical pictures (pHash 5-6 bits apart: different pictures can lie that close, look at them)"
    assert lines[0].startswith(f"warning: model.pretrained {trained_run} was trained on 1 of the "
                               f"{manifest.split('val').count} images of split 'val' of {pack / 'manifest.json'} (the "
                               f"same file by sha256, or the same picture: pHash within 4 bits), and on {near} of 1 more: "
                               "scores there are flattered"), lines
    assert lines[1] == (f"warning: model.pretrained {trained_run} was trained on {near} of 1 of the "
                        f"{manifest.split('test').count} images of split 'test' of {pack / 'manifest.json'}")
    assert "split 'test'" not in overlap_warning({"run": found}) and "1 of" in overlap_warning({"run": found})
