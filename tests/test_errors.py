"""One error base, caught in one place: every exception class bcc defines derives from BccError, and a
user error reaches the user of `bcc` as one `error:` line with exit code 2 (a traceback only under
BCC_DEBUG=1)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import bcc
from bcc.cli import main
from bcc.errors import EXIT_USAGE, BccError

from conftest import image_bytes

# defined in the files of the training package split (issue 10, branch a1-train); they join BccError there


def test_every_exception_class_derives_from_bcc_error():
    found = []
    for info in pkgutil.walk_packages(bcc.__path__, "bcc."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(f"{info.name}.{name}")
                assert issubclass(obj, BccError), f"{info.name}.{name} does not derive from BccError"
    assert {"bcc.imageio.ImageError", "bcc.shards.ShardError", "bcc.checkpoint.CheckpointError",
            "bcc.manifest.ManifestNotFoundError", "bcc.predict.TaxonomyMismatchError"} <= set(found)


def _run(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def not_empty(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    (d / "x").write_text("x")
    return d


def test_pack_family(tmp_path, capsys, not_empty):
    assert "is not a directory" in _run(capsys, "pack", tmp_path / "nope", tmp_path / "out")
    src = tmp_path / "src" / "Benign"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(image_bytes(1))
    assert "is not empty" in _run(capsys, "pack", tmp_path / "src", not_empty)
    assert "no manifest at" in _run(capsys, "pack", "--verify", tmp_path)
    (tmp_path / "src" / "Mystery").mkdir()
    assert "Mystery" in _run(capsys, "pack", tmp_path / "src", tmp_path / "out2")


def test_synth_family(capsys, not_empty):
    assert "not empty" in _run(capsys, "synth", not_empty)


@pytest.mark.parametrize("command", [
    ["eval", "--data", "."], ["predict", "x.jpg"], ["calibrate"], ["export", "--out", "exported"],
])
def test_checkpoint_commands(tmp_path, capsys, command):
    line = _run(capsys, command[0], "--checkpoint", tmp_path / "no-run", *command[1:])
    assert f"no checkpoint at {tmp_path / 'no-run'}" in line


def test_stream_user_errors_are_bcc_errors():
    from bcc.stream import ShardError, StreamError, batches_per_epoch

    with pytest.raises(ShardError, match="lower data.batch_size"):
        batches_per_epoch(10, 8, 2)
    # (too few shards for ranks x workers is no error any more: the epoch plan cuts inside shards)
    assert issubclass(StreamError, ShardError) and issubclass(ShardError, BccError)


def test_a_worker_error_keeps_its_own_message():
    """The DataLoader re-raises a worker's exception with the worker's traceback as its message; the
    loader gives the user the original one-line message back."""
    from bcc.stream import ShardError, _from_worker

    wrapped = ShardError("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1, in f\nbcc.stream.ShardError: cannot read shard "
                         "/data/train-000001.tar: unexpected end of data\n")
    clean = _from_worker(wrapped)
    assert type(clean) is ShardError
    assert str(clean) == "cannot read shard /data/train-000001.tar: unexpected end of data"


def test_real_entry_point_and_bcc_debug(tmp_path):
    cmd = [sys.executable, "-m", "bcc", "pack", str(tmp_path / "nope"), str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "BCC_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BCC_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "PackError: SRC" in proc.stderr


@pytest.mark.parametrize("message, lost", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:37772. "
     "This is typically caused by a remote worker crashing.", True),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation", True),
    ("NCCL communicator was aborted on rank 1: Watchdog caught collective operation timeout: ran for 600000 "
     "milliseconds before timing out.", True),
    ("Application timeout caused pair closure", True),  # gloo, from a DDP hook in backward
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("Connection closed by peer", False),  # no distributed backend named: a bug keeps its traceback
])
def test_a_rank_that_lost_its_peers_prints_one_line(monkeypatch, capsys, message, lost):
    """A collective failing because another rank died: the survivor says so on one line and exits 1."""
    from bcc.cli import call
    from bcc.errors import EXIT_LOST_PEER, lost_peer_message

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("BCC_DEBUG", raising=False)

    def fails(_):
        raise RuntimeError(message)

    if not lost:
        assert lost_peer_message(RuntimeError(message)) is None
        with pytest.raises(RuntimeError):
            call(fails, None)
        return
    assert call(fails, None) == EXIT_LOST_PEER
    err = capsys.readouterr().err.strip()
    # a time-out is this rank's own error (a peer hangs); a closed link follows a peer that exited and
    # printed its own error line: a note, so the job shows one error line
    prefix = "error" if re.search(r"timed out|timing out|timeout", message, re.I) else "note"
    assert len(err.splitlines()) == 1 and err.startswith(f"{prefix}: rank 1: lost contact with the other ranks "
                                                         "(another rank failed or stopped: see its error above;")
    assert "RuntimeError: " in err and "pair.cc" not in err
    monkeypatch.setenv("BCC_DEBUG", "1")
    with pytest.raises(RuntimeError):
        call(fails, None)


def test_a_store_that_cannot_be_reached_before_the_group_exists_is_one_line(monkeypatch, capsys):
    """The rendezvous store unreachable (rank 0 or the launcher gone, a wrong MASTER_ADDR): torch raises a
    DistNetworkError (a connect that timed out) or a DistStoreError (a wait that timed out), which name
    no backend, so they ended in a traceback. Now: the one lost-peer line naming the store, exit 1."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from bcc.cli import call
    from bcc.errors import EXIT_LOST_PEER

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("BCC_DEBUG", raising=False)
    server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=0.3), wait_for_workers=False)

    def connect(_):
        dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=1))

    for fails, kind in [(connect, "DistNetworkError"), (lambda _: server.get("never-set"), "DistStoreError")]:
        assert call(fails, None) == EXIT_LOST_PEER
        err = capsys.readouterr().err.strip().splitlines()
        line = [x for x in err if x.startswith(("error:", "note:"))]
        assert len(line) == 1 and "Traceback" not in "\n".join(err), err
        assert line[0].startswith(f"error: rank 1: lost contact with the other ranks (the store the ranks meet at "
                                  f"(MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}) could not be reached"), line
        assert f"; {kind}: " in line[0], line


@pytest.mark.parametrize(("rank", "local", "shared", "quiet"), [
    (None, None, "job", False), (0, 0, "job", False), (1, 1, "job", True), (5, 1, "job", True),
    (0, 0, "node", False), (1, 1, "node", True), (4, 0, "node", False), (5, 1, "node", True),
    (1, 1, None, False), (4, 0, None, False),
])
def test_an_error_every_rank_raises_is_printed_once_per_job_or_machine(monkeypatch, rank, local, shared, quiet):
    """A launch of N ranks printed a config error N times; rank 0 prints what every rank raises alike
    ("job": a broadcast verdict; "node": the same files, so each machine's local rank 0 prints it)."""
    from bcc.errors import BccError, quiet_on_this_rank

    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    error = BccError("x")
    error.shared = shared
    assert quiet_on_this_rank(error) is quiet


@pytest.mark.parametrize(("shared", "ended", "printed"), [
    ("node", True, False), ("node", False, True), ("job", True, False), ("job", False, False)])
def test_a_quiet_rank_the_launcher_does_not_end_prints_a_node_error_after_all(monkeypatch, capsys, shared, ended,
                                                                             printed):
    """A quiet rank waits for the launcher's SIGTERM (rank 0 exited, having printed); a "node" error that no
    SIGTERM follows was this rank's own (rank 0 goes on), so it is printed after all, never lost. A "job"
    verdict rank 0 got by broadcast stays quiet."""
    import signal
    import threading
    import time

    from bcc import cli, remote

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("BCC_DEBUG", raising=False)
    monkeypatch.setattr(cli, "QUIET_WAIT_S", 3.0)

    def fails(_):
        error = BccError("the same on every rank, presumably")
        error.shared = shared
        raise error

    stopping = [False]  # whether a SIGTERM reached the process before the error (`bcc.remote.is_stopping`)
    monkeypatch.setattr(remote, "is_stopping", lambda: stopping[0])
    late: list[int] = []  # a SIGTERM that missed the wait's handler lands here, not in pytest's default action

    def keep(signum, frame):
        late.append(signum)

    outer = signal.signal(signal.SIGTERM, keep)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        if ended:
            timer.start()
        start = time.monotonic()
        assert cli.call(fails, None) == EXIT_USAGE
        waited = time.monotonic() - start
        if ended:
            timer.join()
        assert (waited < 2.0) if ended else (waited >= 3.0), waited  # a SIGTERM ends the wait at once
        assert late == [] and signal.getsignal(signal.SIGTERM) is keep  # the wait's handler took it, and left
        err = capsys.readouterr().err
        assert (err.strip() == "error: the same on every rank, presumably") if printed else (err == ""), err
        if shared == "node" and not ended:  # the SIGTERM came before the error (kept by the trainer's set-up)
            stopping[0] = True
            start = time.monotonic()
            assert cli.call(fails, None) == EXIT_USAGE and time.monotonic() - start < 1.0
            assert capsys.readouterr().err == ""
    finally:
        signal.signal(signal.SIGTERM, outer)


def test_a_full_disk_anywhere_is_one_line_naming_the_file(monkeypatch, capsys, tmp_path):
    """ENOSPC/EDQUOT/EFBIG/EROFS as Python raises it, inside torch's RuntimeError, or as safetensors'
    "(os error 28)" text: one `error:` line, exit 2 (c2-break11: end-of-run files and model.safetensors
    ended in tracebacks). Other errors keep theirs."""
    import errno
    import io

    from bcc.atomic import write_json
    from bcc.cli import call
    from bcc.errors import storage_error

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 36864 vs 36816")
    wrapped.__context__ = full
    rust = Exception("Error while serializing: I/O error: File too large (os error 27)")
    assert storage_error(full) is full and storage_error(wrapped) is full
    assert storage_error(rust).errno == errno.EFBIG
    for other in (OSError(errno.ENOENT, "No such file"), RuntimeError("boom"), Exception("(os error 2)")):
        assert storage_error(other) is None
    monkeypatch.delenv("BCC_DEBUG", raising=False)

    class FullFile(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a real write(): no file name

    def writes(_):  # a write that fails inside an atomic write: the file meant is named
        with monkeypatch.context() as m:
            m.setattr("bcc.atomic.open", lambda *a, **k: FullFile(), raising=False)
            write_json(tmp_path / "summary.json", {})

    capsys.readouterr()
    for func in (writes, lambda _: (_ for _ in ()).throw(rust)):
        assert call(func, None) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: cannot write"), err
        assert func is not writes or f"cannot write {tmp_path / 'summary.json'}: No space left" in err, err
    assert not (tmp_path / "summary.json").exists()


def test_interrupts_raise_one_error_with_the_signals_exit_code_and_keep_an_ignored_signal():
    """`interrupts_raise` turns SIGINT/SIGTERM into `Interrupted` (exit 128 + the signal, one line with its
    detail, given as text or as a function called when the signal comes); a signal the process ignores
    (SIGINT in a shell script's background job) stays ignored, and the old handlers come back."""
    import signal

    from bcc.errors import Interrupted, interrupts_raise

    state = []
    old_term = signal.getsignal(signal.SIGTERM)  # whatever an earlier in-process `bcc train` left
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(Interrupted) as e, interrupts_raise("bcc x", lambda: "after " + ",".join(state)):
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored
            state.append("step 1")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs at the next bytecode
                pass
        assert str(e.value) == "bcc x: interrupted (SIGTERM); after step 1" and e.value.exit_code == 143
        assert Interrupted("bcc y", signal.SIGINT).exit_code == 130 and isinstance(e.value, BccError)
        assert signal.getsignal(signal.SIGTERM) == old_term
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in a command without its own handler (bcc predict, eval, compare ...), or while the parser
    imports the commands: `error: bcc predict: interrupted (SIGINT)` and 130, not a 45-line
    KeyboardInterrupt traceback; BCC_DEBUG=1 keeps the traceback."""
    import argparse

    import bcc.cli as cli

    monkeypatch.delenv("BCC_DEBUG", raising=False)

    def interrupted(_):
        raise KeyboardInterrupt

    assert cli.call(interrupted, argparse.Namespace(command="predict")) == 130
    assert capsys.readouterr().err.strip() == "error: bcc predict: interrupted (SIGINT)"
    monkeypatch.setattr(cli, "build_parser", lambda: interrupted(None))
    assert cli.main(["eval"]) == 130
    assert capsys.readouterr().err.strip() == "error: bcc: interrupted (SIGINT)"
    monkeypatch.setenv("BCC_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.call(interrupted, argparse.Namespace(command="predict"))
