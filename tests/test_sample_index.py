"""`sample_index.npz` read back (`bcc.sample_index.load`) and checked (`bcc pack --verify`), and the
pHash radii of the overlap checks (issue-12 breaker): an index that is there but damaged, or lost
beside a manifest whose packs always have one, is an error naming the file, never the note "packed by
an older bcc" that let the leakage check go unmade; only older manifests get that note, with the way
to get the check for where the pack is read (a folder, a server, a `pipe:` command)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_remote import serve
from test_sources import second_source  # noqa: F401 - a second, smaller pack of the synthetic task

from bcc.manifest import Manifest
from bcc.sample_index import FILE, INDEXED_SINCE, OPT_OUT, SampleIndex, SampleIndexError, check_sources, load
from bcc.sources import Source
from bcc.verify import check_index, verify_shards

SPLITS = {"data.train_split": "train", "data.val_split": "val", "data.test_split": "test"}
DAMAGE = {"empty": b"", "zeros": bytes(4096), "random": np.random.default_rng(0).bytes(4096),
          "a web page": b"<html><body>Not here</body></html>"}


def _copy(pack: Path, to: Path, version: int | None = None) -> Path:
    """A copy of `pack`; its manifest's format set to `version` (an older pack) when given."""
    shutil.copytree(pack, to)
    if version is not None:
        manifest = json.loads((to / "manifest.json").read_text())
        (to / "manifest.json").write_text(json.dumps({**manifest, "format": f"bcc-shards/{version}"}))
    return to


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_local_index_is_an_error_naming_it(damage, synth_shards, tmp_path, bcc_main):
    """An empty file, zeros, random bytes, a web page saved in its place: one error naming the file and
    the fix, in `load`, in the check across sources (naming the source by its path: one given as
    `.../manifest.json` is named 'manifest.json') and in `bcc pack --verify` (a mismatch, exit 1), for a
    pack of any format: the file is there, so it is damaged."""
    pack = _copy(synth_shards, tmp_path / "p", version=INDEXED_SINCE - 1)
    (pack / FILE).write_bytes(DAMAGE[damage])
    with pytest.raises(SampleIndexError, match=rf"^{pack / FILE} is damaged: "
                                               + ("empty" if damage == "empty" else "not a zip file")
                                               + r".*; copy it again from the packed output, or re-pack"):
        load(Manifest.load(pack))
    given = Source("manifest.json", 1.0, Manifest.load(pack / "manifest.json"))
    with pytest.raises(SampleIndexError) as e:
        check_sources([given, Source("b", 1.0, Manifest.load(synth_shards))], SPLITS)
    assert str(e.value).startswith(f"data.sources[0] 'manifest.json' ({pack / 'manifest.json'}): {pack / FILE} is "
                                   "damaged") and str(e.value).endswith(OPT_OUT), e.value
    assert check_index(Manifest.load(pack)).status == "mismatch" and not verify_shards(pack).ok
    proc = bcc_main("pack", "--verify", str(pack))
    assert proc.returncode == 1 and f"MISMATCH  {FILE}: {pack / FILE} is damaged" in proc.stdout, proc.stdout[-600:]


def test_a_lost_index_is_an_error_and_only_an_older_pack_gets_the_note(synth_shards, tmp_path, bcc_main):
    """No index beside a manifest of format `INDEXED_SINCE` (whose packs always have one): the file was
    lost, an error, a mismatch for `--verify`. Beside an older manifest: the note, saying how to get
    the check, and `--verify` passes (NONE)."""
    current = _copy(synth_shards, tmp_path / "current")
    (current / FILE).unlink()
    with pytest.raises(SampleIndexError, match=rf"^{current / FILE} is missing: {current / 'manifest.json'} is format "
                                               rf"bcc-shards/{INDEXED_SINCE}, whose packs always have one"):
        load(Manifest.load(current))
    proc = bcc_main("pack", "--verify", str(current))
    assert proc.returncode == 1 and f"MISMATCH  {FILE}: {current / FILE} is missing" in proc.stdout, proc.stdout[-600:]

    older = _copy(current, tmp_path / "older", version=INDEXED_SINCE - 1)
    note = (f"it has no {FILE}: packed before bcc always wrote one (manifest format bcc-shards/{INDEXED_SINCE - 1}); "
            "to have its images compared, re-pack it with this bcc")
    assert load(Manifest.load(older)) == note
    assert check_sources([Source("older", 1.0, Manifest.load(older)), Source("b", 1.0, Manifest.load(synth_shards))],
                         SPLITS) == [f"note: data.sources[0] 'older' ({older / 'manifest.json'}): {note}; until then "
                                     "images it shares with another source are found only where whole shards repeat"]
    proc = bcc_main("pack", "--verify", str(older))
    assert proc.returncode == 0 and f"NONE      {FILE}: {note}\n" in proc.stdout, proc.stdout[-600:]


def test_an_index_read_from_a_server_or_a_pipe_command(synth_shards, tmp_path):
    """Over http: a 404 or a web page in its place is "not there" (a note for an older pack, saying to put
    the file on the server; an error for a current one), an empty or foreign body the server sent as
    the file is damage. Through a `pipe:` command, which cannot tell "not there" from "failed": a
    failure, no output or a web page is "not there", the note saying where the command must find the
    file; other output is damage."""
    older = _copy(synth_shards, tmp_path / "older", version=INDEXED_SINCE - 1)
    current = _copy(synth_shards, tmp_path / "current")
    with serve(tmp_path) as (_, url):
        assert isinstance(load(Manifest.load(f"{url}/current"), retries=0), SampleIndex)
        for pack in (older, current):
            (pack / FILE).unlink()
        note = load(Manifest.load(f"{url}/older"), retries=0)
        assert note.startswith(f"the server has no {FILE} ({url}/older/{FILE}: HTTP 404 ") and note.endswith(
            f"): packed before bcc always wrote one (manifest format bcc-shards/{INDEXED_SINCE - 1}); to have its images "
            f"compared, re-pack it with this bcc and put its {FILE} on the server beside manifest.json"), note
        with pytest.raises(SampleIndexError, match=rf"^{url}/current/{FILE} is missing \(.*HTTP 404.*\): .* put its "
                                                   rf"{FILE} on the server beside manifest.json, or re-pack"):
            load(Manifest.load(f"{url}/current"), retries=0)
        (older / FILE).write_bytes(DAMAGE["a web page"])
        assert load(Manifest.load(f"{url}/older"), retries=0).startswith(
            f"the server has no {FILE} (it sent a web page, which begins '<html>")
        for body, what in ((b"", "empty"), (DAMAGE["zeros"], "not a zip file")):
            (older / FILE).write_bytes(body)  # served with status 200 and its length: the file, damaged
            with pytest.raises(SampleIndexError, match=rf"^{url}/older/{FILE} is damaged: {what}"):
                load(Manifest.load(f"{url}/older"), retries=0)

    (older / FILE).unlink()
    for command, what in ((f"pipe:cat {older}/{{name}}", "it failed: "), (f"pipe:cat {older}/{{name}} || true",
                                                                         "it printed nothing")):
        assert load(Manifest.load(command), retries=0).startswith(f"the pipe: command gives no {FILE} ({what}")
        assert load(Manifest.load(command), retries=0).endswith(
            f"re-pack it with this bcc and put its {FILE} beside manifest.json in the store the pipe: command reads "
            f"(run with {{name}} = {FILE} it must print the file)")
    with pytest.raises(SampleIndexError, match=rf"^pipe:cat {current}/{FILE} is missing \(it failed: .*\): .*put its "
                                               rf"{FILE} beside manifest.json in the store the pipe: command reads"):
        load(Manifest.load(f"pipe:cat {current}/{{name}}"), retries=0)
    (older / FILE).write_bytes(DAMAGE["random"])
    with pytest.raises(SampleIndexError, match=rf"^pipe:cat {older}/{FILE} is damaged: not a zip file"):
        load(Manifest.load(f"pipe:cat {older}/{{name}}"), retries=0)


def test_same_picture_and_near_identical_radii(synth_shards, second_source, tmp_path):  # noqa: F811
    """Across train and test of two sources: pHashes 4 bits apart (re-encodes of one image were measured at
    0-4) are the same picture, an error naming both samples and the distance; 6 bits apart (one real pair
    of different fields was measured at 6) a warning, counted and named; 8 bits apart (different images)
    nothing."""
    from bcc import sample_index

    def craft(pack: Path, seed: int, test_phash=None) -> dict:
        manifest = Manifest.load(pack)
        rng = np.random.default_rng(seed)  # random 64-bit hashes: two lie within 6 bits with probability ~5e-12
        made = {s: {"sha": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                    "phash": rng.integers(0, 2**64, manifest.split(s).count, dtype=np.uint64),
                    "label": np.zeros(manifest.split(s).count, np.int16)} for s in manifest.splits}
        if test_phash is not None:
            made["test"]["phash"] = test_phash
        sample_index.write(manifest, made)
        return made

    a, b = _copy(synth_shards, tmp_path / "a"), _copy(second_source, tmp_path / "b")
    train = craft(a, 1)["train"]["phash"]
    test = craft(b, 2)["test"]["phash"]
    sources = [Source("a", 1.0, Manifest.load(a)), Source("b", 1.0, Manifest.load(b))]
    assert check_sources(sources, SPLITS) == []
    for bits, mask in ((8, 0xFF), (6, 0b111111), (4, 0b1111)):
        test[5] = train[7] ^ np.uint64(mask)
        craft(b, 2, test)
        if bits == 8:
            assert check_sources(sources, SPLITS) == []
        elif bits == 6:
            assert check_sources(sources, SPLITS) == [
                f"warning: data.sources: 1 image(s) evaluated in one source have a near-identical picture (pHash 5-6 "
                f"bits apart: different pictures can lie that close) trained on in another: 1 of 'b' ({b / 'manifest.json'}) "
                f"split 'test' in 'a' ({a / 'manifest.json'}) split 'train' (e.g. sample test-00000005 and "
                "train-00000007, pHash 6 bits apart); if they are the same field re-shot, pack the overlapping folders "
                "together (one pack keeps copies and near-copies on one side)"]
        else:
            with pytest.raises(SampleIndexError, match=r"1 image\(s\) trained on in one source are evaluated in another "
                                                       r"\(the same file by sha256, or the same picture re-encoded: pHash "
                                                       r"within 4 bits\): 1 of 'b' .* \(0 the same file; e\.g\. sample "
                                                       r"test-00000005 and train-00000007, pHash 4 bits apart\)"):
                check_sources(sources, SPLITS)
