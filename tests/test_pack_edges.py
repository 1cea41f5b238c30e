"""`bcc pack` at its edges (a breaker's findings): what it prints, how long lists and large inputs are
bounded, names that are not UTF-8, and an interrupted pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import image_bytes


def bcc_pack(*args, columns: int = 80, **kwargs) -> subprocess.CompletedProcess:
    """`bcc pack ARGS` in a new interpreter whose output is a pipe (as in a batch job's log)."""
    return subprocess.run([sys.executable, "-m", "bcc", "pack", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": str(columns)}, timeout=300, **kwargs)


def tree(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    for f, (folder, n) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / folder / f"img{i:03d}.jpg").write_bytes(image_bytes(1000 * f + i, size))
    return root


# --------------------------------------------------------------------------- what it prints


def test_an_unknown_class_folder_is_the_one_line_and_nothing_else(tmp_path):
    # rich's transient progress bar, started before the folders were checked, left an empty line first
    src = tree(tmp_path / "src", {"Benign": 2, "Weird": 2})
    proc = bcc_pack(src, tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == "", repr(proc.stdout)
    assert proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_warning_lines_are_never_wrapped_in_a_log(tmp_path):
    # a group of 8 identical images out of 12 cannot follow the split: a warning far longer than 80 columns
    src = tree(tmp_path / "src", {"Pro": 4})
    (src / "Benign").mkdir()
    for i in range(8):
        (src / "Benign" / f"copy{i}.jpg").write_bytes(image_bytes(7))
    proc = bcc_pack(src, tmp_path / "out", "--min-shards", 1, "--workers", 1, columns=80)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    group = [line for line in lines if line.startswith("warning: one group of 8 samples")]
    assert len(group) == 1 and group[0].endswith("--no-near-dup"), proc.stdout
    assert not any(line.startswith("chain)") for line in lines), proc.stdout
    assert proc.stdout.splitlines()[0].strip(), "an empty first line (the progress bar's)"


def test_verify_lines_are_never_wrapped_in_a_log(tmp_path, monkeypatch):
    from bcc import manifest as manifest_mod
    from bcc.pack import pack_folders

    src = tree(tmp_path / "src", {"Benign": 4, "Pro": 4})
    (src / "Pro" / "notes.txt").write_text("not an image")
    monkeypatch.setattr(manifest_mod, "LIST_INLINE", 0)  # the one skip goes to skipped.jsonl
    out = tmp_path / "a-pack-whose-path-is-long-enough-to-fill-a-line"
    pack_folders(src, out, min_shards=1)
    side = out / "skipped.jsonl"
    side.write_bytes(side.read_bytes().replace(b"notes", b"nodes"))
    proc = bcc_pack("--verify", out, columns=80)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MISMATCH"))
    assert line.endswith("damaged or replaced") and str(out / "manifest.json") in line, proc.stdout


# --------------------------------------------------------------------------- bounded manifest


def test_a_large_duplicate_set_goes_to_the_side_file(tmp_path, monkeypatch, bcc_main):
    """The side-file threshold counted entries: one set of 1,101 hard links of one image stayed inline
    with 1,101 paths (a placeholder copied 500,000 times would put 500,000 paths in manifest.json)."""
    from bcc import manifest as manifest_mod
    from bcc.manifest import Manifest

    src = tree(tmp_path / "src", {"Benign": 3, "Pro": 3})
    (src / "Pro" / "pair.jpg").write_bytes((src / "Pro" / "img000.jpg").read_bytes())
    for i in range(6):  # one set of 6 copies (a single entry)
        os.link(src / "Benign" / "img000.jpg", src / "Benign" / f"link{i}.jpg")
    monkeypatch.setattr(manifest_mod, "LIST_INLINE", 5)
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--min-shards", 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = Manifest.load(tmp_path / "out")
    assert m.data["duplicates"]["file"] == "duplicates.jsonl" and m.data["duplicates"]["count"] == 2
    assert sorted(len(d["paths"]) for d in m.file_list("duplicates")) == [2, 7]
    monkeypatch.setattr(manifest_mod, "LIST_INLINE", 9)  # 9 paths in 2 entries: inline
    assert bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--min-shards", 1, "--overwrite").returncode == 0
    assert isinstance(json.loads((tmp_path / "out" / "manifest.json").read_text())["duplicates"], list)


# --------------------------------------------------------------------------- large files


def test_a_file_too_large_for_the_pixel_limit_is_skipped_unread(tmp_path, bcc_main):
    """A 3 GB junk `.jpg` was read whole (twice its size in RSS) before it was found corrupt. A file larger
    than an image within --max-pixels can take (8 bytes a pixel + 64 MiB) is skipped without a read; the
    test's file is sparse (no disk), and the pack's Python allocations stay far below its size."""
    import tracemalloc

    from bcc.imageio import max_file_bytes

    src = tree(tmp_path / "src", {"Benign": 3, "Pro": 3})
    cap = max_file_bytes(1000)
    assert cap == 1000 * 8 + (64 << 20)
    with open(src / "Benign" / "huge.jpg", "wb") as f:
        f.truncate(cap + 1)
    args = ("pack", src, tmp_path / "out", "--workers", 1, "--min-shards", 1, "--max-pixels", 1000, "--overwrite")
    assert bcc_main(*args).returncode == 0  # imports and first-call costs, not counted below
    tracemalloc.start()
    try:
        proc = bcc_main(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert peak < cap / 4, f"{peak / 2**20:.0f} MiB allocated while packing"
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["skipped"] == [{"path": "Benign/huge.jpg", "reason": f"too large: {cap + 1} bytes, more than the {cap} "
                             "an image within the pixel limit can take (--max-pixels x 8 bytes + 64 MiB)"}]
    assert "too large" in proc.stdout


def test_a_file_read_in_several_calls_is_held_once(tmp_path, monkeypatch):
    """Linux reads at most 2 GiB a call: a larger file came back in parts that were then joined (two
    copies). Here every read call gives at most 1 MiB, as for a 2 GiB+ file in the small."""
    import tracemalloc

    from bcc.imageio import read_file

    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(b"x")
        f.truncate(8 << 20)
    real_read, real_readv = os.read, os.readv
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1 << 20)))
    monkeypatch.setattr(os, "readv", lambda fd, bufs: real_readv(fd, [memoryview(bufs[0])[:1 << 20]]))
    tracemalloc.start()
    try:
        data = read_file(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 8 << 20 and data[:2] == b"x\0" and not any(data[1:])
    assert peak < 1.3 * (8 << 20), f"{peak / 2**20:.1f} MiB to read an 8 MiB file"


# --------------------------------------------------------------------------- --resize bounds


def test_a_resize_above_the_pixel_limit_is_refused_by_name(tmp_path, bcc_main):
    """`--resize 100000` on 40 px images was OOM-killed (23 GB RSS, rc 137, no message): every image would
    have been 10^10 pixels. Refused before any file is read, naming --resize and the largest that fits."""
    src = tree(tmp_path / "src", {"Benign": 2})
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--resize", 100000)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --resize 100000 would make"), proc.stderr
    assert "--max-pixels" in proc.stderr and "the largest --resize within it is 9459" in proc.stderr
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--resize", 100, "--max-pixels", 9999)
    assert proc.returncode == 2 and "largest --resize within it is 99" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_upscaled_images_are_counted_and_a_long_strip_is_skipped(tmp_path, bcc_main):
    """`--resize 4000` upscaled 40 px images 100x without a word. Images made larger are counted in a
    warning (printed and in the manifest) with the largest factor; one whose resized form would exceed
    the pixel limit (a 200x10 strip at a 40 px short side: 800x40) is skipped with the reason."""
    from PIL import Image

    src = tree(tmp_path / "src", {"Benign": 3, "Pro": 3}, size=24)
    (src / "Pro" / "big.png").write_bytes(image_bytes(9, 48, "PNG"))  # downscaled: not counted
    Image.new("RGB", (200, 10), (200, 30, 30)).save(src / "Pro" / "strip.png")
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--min-shards", 1, "--resize", 40,
                    "--max-pixels", 4000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    warning = "6 image(s) upscaled by --resize 40 (up to 1.67x, from a 24 px short side)"
    assert any(w.startswith(warning) for w in m["warnings"]), m["warnings"]
    assert f"warning: {warning}" in proc.stdout
    assert m["skipped"] == [{"path": "Pro/strip.png", "reason": "too large after --resize: 200x10 would become "
                             "800x40 = 32000 pixels > limit 4000"}]
    assert sum(s["count"] for s in m["splits"].values()) == 7


# --------------------------------------------------------------------------- names that are not UTF-8


def bad_name(folder: Path, raw: bytes) -> Path:
    """A path in `folder` whose name is the raw bytes `raw` (a Latin-1 name from a zip made on Windows)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + raw))


def test_names_that_are_not_utf8_are_packed_and_stored_printable(tmp_path, bcc_main):
    """A file named b'bad\\xff\\xfe.jpg' packed fine, then its source ("Pro/bad\\udcff\\udcfe.jpg") crashed
    `bcc eval` and `bcc report` (UnicodeEncodeError in the CSV writer). Every name pack stores (the
    sample's source, skipped, converted, duplicates, warnings) is its printable form: `\\xNN` a byte."""
    import webdataset as wds

    src = tree(tmp_path / "src", {"Benign": 3, "Pro": 3})
    copy = bad_name(src / "Pro", b"bad\xff\xfe.jpg")
    copy.write_bytes((src / "Benign" / "img000.jpg").read_bytes())  # identical across classes: a warning too
    bad_name(src / "Pro", b"grey\xe9.png").write_bytes(image_bytes(3, 24, "PNG", "L"))  # converted
    bad_name(src / "Pro", b"notes\x85.txt").write_text("no image")  # skipped
    bad_name(src / "Benign", b"dir\xff").mkdir()
    bad_name(src / "Benign", b"dir\xff/x.jpg").symlink_to("/")  # a link out of SRC, in a folder so named
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 2, "--min-shards", 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "\\udc" not in text, "a surrogate escape stored"
    m = json.loads(text)
    assert {s["path"] for s in m["skipped"]} == {"Benign/dir\\xff/x.jpg", "Pro/notes\\x85.txt"}
    assert m["converted"] == [{"path": "Pro/grey\\xe9.png", "mode": "L"}]
    assert m["duplicates"][0]["paths"] == ["Benign/img000.jpg", "Pro/bad\\xff\\xfe.jpg"]
    assert any("Pro/bad\\xff\\xfe.jpg" in w for w in m["warnings"]) and "Pro/bad\\xff\\xfe.jpg" in proc.stdout
    sources = {json.loads(s["json"])["source"] for shard in sorted((tmp_path / "out").glob("*.tar"))
               for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)}
    assert {"Pro/bad\\xff\\xfe.jpg", "Pro/grey\\xe9.png"} <= sources and len(sources) == 8


def test_an_unknown_class_folder_that_is_not_utf8_is_named_printable(tmp_path, bcc_main):
    src = tree(tmp_path / "src", {"Benign": 1})
    (src / "Benign").rename(bad_name(src, b"Pr\xffo"))
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown class folder 'Pr\\xffo' for taxonomy"), proc.stderr


def test_display_path_is_the_printable_form_of_a_name():
    from bcc.imageio import display_path

    assert display_path(os.fsdecode(b"Pro/bad\xff\xfe.jpg")) == "Pro/bad\\xff\\xfe.jpg"
    assert display_path("a\nb\x1b[31m.jpg") == "a\\x0ab\\x1b[31m.jpg"  # no line break, no terminal escape
    assert display_path("été/細胞.jpg") == "été/細胞.jpg" and display_path(Path("ok.jpg")) == "ok.jpg"
    display_path(os.fsdecode(b"\xc3(\xa0")).encode("utf-8")  # always writable as UTF-8
    # invisible characters that reorder or hide text: `cell\u202egpj.exe` shows as `cellexe.jpg` (fifth breaker)
    assert display_path("cell\u202egpj.exe") == "cell\\u202egpj.exe" and display_path("a\u200bb") == "a\\u200bb"


# --------------------------------------------------------------------------- Ctrl-C and kill


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signalled_pack_prints_one_line_and_leaves_nothing(tmp_path, sig, code):
    """Ctrl-C printed a 30-line KeyboardInterrupt traceback (the packer's and each worker's); SIGTERM ended
    the packer silently (rc 143) and left OUT.tmp-PID behind. Both now: one `error:` line, the temporary
    folder removed, the pool's workers ended, exit 128 + the signal. SIGINT goes to the whole process
    group, as a terminal's Ctrl-C does; SIGTERM to the packer alone, as `kill` does."""
    import signal
    import time

    import psutil

    src = tree(tmp_path / "src", {"Benign": 150, "Pro": 150}, size=64)
    proc = subprocess.Popen([sys.executable, "-m", "bcc", "pack", str(src), str(tmp_path / "out"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("out.tmp-*/_staging")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = [p.pid for p in psutil.Process(proc.pid).children()]
    assert proc.poll() is None and len(workers) == 2, "the pack ended before the signal"
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    assert err == f"error: bcc pack: interrupted ({sig}); nothing written\n", err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    time.sleep(0.2)
    assert not [w for w in workers if psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE]


def test_a_signal_while_the_packer_itself_decodes_ends_the_pack(tmp_path):
    """With --workers 1 the packer decodes in its own process, where the decoder's catch-all took the
    signal's exception for a corrupt image: the pack skipped a good image and ended with rc 0 (fifth
    breaker). `bcc pack --verify` had no interrupt handling at all (a traceback on Ctrl-C)."""
    import signal
    import time

    src = tree(tmp_path / "src", {"Benign": 30, "Pro": 30}, size=64)
    proc = subprocess.Popen([sys.executable, "-m", "bcc", "pack", str(src), str(tmp_path / "out"), "--workers", "1",
                             "--resize", "5000"],  # upscaled: most of the pack's time is in the decoder's resize
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("out.tmp-*/_staging")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(1.0)
    assert proc.poll() is None, "the pack ended before the signal"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err == "error: bcc pack: interrupted (SIGTERM); nothing written\n", out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # --verify of a pack whose shards come from a slow command
    assert bcc_pack(src, tmp_path / "out", "--workers", 1, "--min-shards", 1).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "bcc", "pack", "--verify", f"pipe:sleep 20; cat {tmp_path}/out/{{name}}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "error: bcc pack --verify: interrupted (SIGTERM)\n", out + err


def test_an_interrupt_between_the_renames_puts_the_old_out_back(tmp_path, monkeypatch):
    """With --overwrite the old OUT is renamed aside before the new one takes its name: a signal between
    the two renames left no OUT at all (and the next pack removed the old one as a dead pack's leftover)."""
    from bcc import pack as pack_mod

    src = tree(tmp_path / "src", {"Benign": 4, "Pro": 4})
    pack_mod.pack_folders(src, tmp_path / "out", min_shards=1)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the signal, after the first rename
        real(a, b)

    monkeypatch.setattr(pack_mod.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        pack_mod.pack_folders(src, tmp_path / "out", min_shards=1, seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_hidden_files_and_folders_are_skipped_with_a_reason(tmp_path, bcc_main):
    """A hidden image (`.cell_001.jpg`), a hidden folder (`.ipynb_checkpoints/`) and `.DS_Store` were left
    out of the pack without a word (fourth breaker): each is a skip with its reason; `bcc predict DIR`
    names the hidden image and passes over the rest."""
    src = tree(tmp_path / "src", {"Benign": 2, "Pro": 2})
    (src / "Pro" / ".cell_001.jpg").write_bytes(image_bytes(7, 24))
    (src / "Pro" / ".ipynb_checkpoints").mkdir()
    (src / "Pro" / ".ipynb_checkpoints" / "img000.jpg").write_bytes(image_bytes(8, 24))
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    proc = bcc_main("pack", src, tmp_path / "out", "--workers", 1, "--min-shards", 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = {s["path"]: s["reason"] for s in json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]}
    assert set(skipped) == {".DS_Store", "Pro/.cell_001.jpg", "Pro/.ipynb_checkpoints"}, skipped
    assert all(r.startswith("hidden") for r in skipped.values())
    from bcc.imageio import collect_images

    files, problems = collect_images([src / "Pro"])
    assert [f.name for f in files] == ["img000.jpg", "img001.jpg"]
    assert [Path(p).name for p, _ in problems] == [".cell_001.jpg"] and problems[0][1].startswith("hidden")
