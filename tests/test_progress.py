"""The progress view: a live rich bar per epoch on a terminal (run under a pseudo-terminal here), the plain
grep-able lines when stdout is a pipe or a file (Slurm logs, CI), even where FORCE_COLOR is set."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import write_config

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")
PLAIN_LINE = re.compile(r"epoch 1/1 batch \d+/\d+ step \d+ loss \d+\.\d{4} lr \S+ \d+\.\d img/s eta \d:\d\d:\d\d")


def train_cmd(cfg) -> list[str]:
    return [sys.executable, "-m", "bcc.train", "--config", str(cfg)]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_INTERACTIVE", "COLUMNS")}
    return {**env, **extra}


def run_in_pty(cmd: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a 50x200 pseudo-terminal; returns (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, end = b"", time.time() + timeout
    try:
        while time.time() < end:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=max(end - time.time(), 1)), out.decode("utf-8", "replace")


@pytest.fixture
def one_epoch(synth_shards, tmp_path):
    def make(name: str):
        return write_config(tmp_path / f"{name}.yaml", synth_shards, tmp_path / name, train={"epochs": 1, "log_every": 2})

    return make


@pytest.mark.slow
def test_a_terminal_gets_a_live_progress_bar(one_epoch):
    code, out = run_in_pty(train_cmd(one_epoch("tty")), clean_env(TERM="xterm-256color"))
    assert code == 0, out[-3000:]
    assert "\x1b[?25l" in out  # rich's live display hides the cursor while it redraws
    text = ANSI.sub("", out)
    m = re.search(r"epoch 1/1 stage 0 ━+ batch (\d+)/(\d+) step \d+ loss \d+\.\d{4} lr \S+ \d+\.\d img/s "
                  r"\d:\d\d:\d\d eta \d:\d\d:\d\d", text)
    assert m, text[-3000:]
    assert re.search(rf"batch {m.group(2)}/{m.group(2)} ", text)  # the finished bar stays on the screen
    assert not PLAIN_LINE.search(text)  # no plain lines on a terminal
    assert "val after epoch 1" in text  # tables still print (below the finished bar)


@pytest.mark.slow
@pytest.mark.parametrize("force_color", [False, True])
def test_a_pipe_gets_plain_lines(one_epoch, force_color):
    env = clean_env(**({"FORCE_COLOR": "1"} if force_color else {}))
    proc = subprocess.run(train_cmd(one_epoch("pipe")), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = ANSI.sub("", proc.stdout)
    assert len(PLAIN_LINE.findall(text)) >= 2
    assert not re.search(r"stage \d+ ━", text) and "\x1b[?25l" not in proc.stdout  # no bar, no cursor games
