"""bcc predict: what it is given to read and where it writes. A FIFO nobody writes to is refused by
name within seconds (it hung forever), a FIFO or pipe with a writer is predicted as the file it carries;
Grad-CAM overlays never go into an input folder nor over an input file."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests


def _predict_bounded(bcc_main, fifo: Path, *args, timeout: float = 120):
    """`bcc predict *args` (in this thread: the entry point sets signal handlers), watched: should it still
    run after `timeout` (blocked opening `fifo`), the FIFO gets writers that close at once, so that the
    reader sees its end and the command comes back; then the test fails."""
    done, stuck = threading.Event(), threading.Event()

    def watch():
        if done.wait(timeout):
            return
        stuck.set()
        while not done.wait(0.1):
            with contextlib.suppress(OSError):  # ENXIO while no reader has it open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Thread(target=watch, daemon=True)
    start = time.monotonic()
    watchdog.start()
    try:
        proc = bcc_main("predict", *args)
    finally:
        done.set()
        watchdog.join()
    if stuck.is_set():
        pytest.fail(f"bcc predict still waited on the FIFO {fifo} after {timeout:.0f} s")
    return proc, time.monotonic() - start


def _image(synth_data: Path) -> Path:
    return sorted((synth_data / "Pro").iterdir())[0]


def test_a_fifo_without_writer_or_a_device_is_refused_by_name(trained_run, synth_data, tmp_path,  # noqa: F811
                                                              bcc_main):
    odd = tmp_path / "odd"
    odd.mkdir()
    fifo = odd / "fifo.jpg"
    os.mkfifo(fifo)
    proc, took = _predict_bounded(bcc_main, fifo, "--checkpoint", trained_run, fifo, os.devnull, _image(synth_data))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # the image is still predicted
    err = " ".join(proc.stderr.split())
    assert f"error: {fifo}: cannot read image {fifo}: FIFO with no writer" in err
    assert f"error: {os.devnull}: cannot read image {os.devnull}: not a regular file: a character device" in err
    assert "1 image(s) predicted, 2 failed" in proc.stdout
    assert took < 60
    # folder mode lists it and skips it, as before
    proc = bcc_main("predict", "--checkpoint", trained_run, odd)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


def test_a_fifo_with_a_writer_and_a_pipe_are_predicted_as_the_file(trained_run, synth_data, tmp_path,  # noqa: F811
                                                                   bcc_main):
    """A named FIFO whose writer is already waiting (and one that writes after a pause), and an anonymous
    pipe opened as /dev/fd/N, as `<(cat x.png)` gives it: each answers as the file it carries."""
    data = _image(synth_data).read_bytes()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)

    def write_fifo():
        with open(fifo, "wb") as f:  # blocks until bcc predict opens it for reading
            time.sleep(0.3)  # a slow producer: nothing written yet when the reader looks
            f.write(data)

    read_end, write_end = os.pipe()
    pipe = f"/dev/fd/{read_end}"

    def write_pipe():
        time.sleep(1.5)  # longer than the wait for a writer: this pipe has one from the start
        os.write(write_end, data)
        os.close(write_end)

    writers = [threading.Thread(target=w, daemon=True) for w in (write_fifo, write_pipe)]
    for w in writers:
        w.start()
    out = tmp_path / "p.json"
    try:
        proc, _ = _predict_bounded(bcc_main, fifo, "--checkpoint", trained_run, _image(synth_data), fifo, pipe,
                                   "--json", out)
    finally:
        os.close(read_end)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    preds = {p["path"]: p["head_probs"] for p in json.loads(out.read_text())["predictions"]}
    assert set(preds) == {str(_image(synth_data)), str(fifo), pipe}
    assert preds[str(fifo)] == preds[pipe] == preds[str(_image(synth_data))]


def test_gradcam_dir_in_an_input_folder_is_refused(trained_run, synth_data, tmp_path, bcc_main):  # noqa: F811
    """Overlays written into a class folder were read as images by the next pack or predict of it."""
    gc = tmp_path / "gc"
    gc.mkdir()
    (gc / "cell.png").write_bytes(_image(synth_data).read_bytes())
    (tmp_path / "link").symlink_to(gc)
    for cams in (gc, gc / "cams" / "deeper", tmp_path / "link" / "cams"):
        proc = bcc_main("predict", "--checkpoint", trained_run, gc, "--gradcam", cams)
        err = " ".join(proc.stderr.split())
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert err.startswith(f"error: --gradcam {cams}: ") and f"the input folder {gc};" in err, err
        assert proc.stderr.count("error:") == 1
        assert sorted(p.name for p in gc.iterdir()) == ["cell.png"]  # nothing written there, not even the folder
    # a folder beside the inputs is fine
    proc = bcc_main("predict", "--checkpoint", trained_run, gc, "--gradcam", tmp_path / "cams")
    assert proc.returncode == 0 and sorted(p.name for p in (tmp_path / "cams").iterdir()) == [
        "cell.binary.png", "cell.subtype.png"]


def test_gradcam_never_overwrites_an_input_file(trained_run, synth_data, tmp_path, bcc_main):  # noqa: F811
    """`x.png` and `cams/x.binary.png` predicted with `--gradcam cams`: x's overlays were written over the
    second input; they are named x-2 instead, and the input keeps its bytes."""
    src, cams = tmp_path / "src", tmp_path / "cams"
    src.mkdir()
    cams.mkdir()
    data = _image(synth_data).read_bytes()
    (src / "x.png").write_bytes(data)
    (cams / "x.binary.png").write_bytes(data)
    (tmp_path / "y.png").symlink_to(cams / "y.subtype.png")  # a link to a file where an overlay would go
    (cams / "y.subtype.png").write_bytes(data)
    out = tmp_path / "p.json"
    proc = bcc_main("predict", "--checkpoint", trained_run, src / "x.png", cams / "x.binary.png", tmp_path / "y.png",
                    "--gradcam", cams, "--json", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (cams / "x.binary.png").read_bytes() == data and (cams / "y.subtype.png").read_bytes() == data
    written = {Path(p["path"]).name: sorted(Path(c).name for c in p["gradcam"])
               for p in json.loads(out.read_text())["predictions"]}
    assert written == {"x.png": ["x-2.binary.png", "x-2.subtype.png"],
                       "x.binary.png": ["x.binary.binary.png", "x.binary.subtype.png"],
                       "y.png": ["y-2.binary.png", "y-2.subtype.png"]}
