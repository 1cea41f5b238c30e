"""`pipe:` locations: a shell command's standard output read as a shard (`bcc.remote.open_location`
opens them here; what a location is and which may run a command is `bcc.remote`'s)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
import time

from bcc import activity
from bcc.remote import STDERR_TAIL, STOP_SILENCE_S, RemoteError, is_stopping

__all__ = ["STOP_SILENCE_S", "PipeError", "PipeOutput"]


STOP_POLL_S = 1.0  # a silent command is checked this often for a termination request (`request_stop`)
# a command that exited while something it started still holds its output (ssh's ControlPersist master, a
# helper daemon): silent this long after the exit, its output has ended
EXITED_SILENCE_S = 1.0


class PipeError(RemoteError):
    """A `pipe:` command that exited non-zero (its exit code and the tail of its stderr are named) or
    stalled (no output for `timeout_s`)."""


class PipeOutput:
    """A `pipe:` command's standard output; at its end a non-zero exit raises PipeError naming the
    exit code and the tail of the command's stderr. A command that prints nothing for `timeout_s`
    seconds (`data.read_timeout_s`; a stalled download) is ended and raises PipeError (transient: the caller's retry reopens the
    shard), as a socket read does. The command runs in its own process group, so ending it (early
    close, stall, an interrupted run) ends what it started too (`sh -c`'s children). A command that closes
    its output but does not exit within `timeout_s` is ended the same way (PipeError, transient); one that
    exited while a process it started still holds its output (ssh ControlPersist) has ended its output
    once silent for EXITED_SILENCE_S after its exit."""

    def __init__(self, command: str, where: str, timeout_s: float):
        self.where, self.timeout_s = where, timeout_s
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty stderr cannot block the command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.printed = 0  # bytes read so far, for the stall's message

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip()
        text = text[-STDERR_TAIL:] if len(text) > STDERR_TAIL else text
        return " | ".join(line for line in text.splitlines() if line.strip())

    def _chunk(self, n: int) -> bytes:
        """Up to n bytes as soon as some are there (b"" at the end); PipeError after a silent time-out, or
        after STOP_SILENCE_S of silence once the process was asked to terminate (no retry follows then)."""
        with activity.waiting(self.timeout_s + STOP_POLL_S + 1.0, self.where):
            return self._wait_for_chunk(n)

    def _wait_for_chunk(self, n: int) -> bytes:
        start = time.monotonic()
        deadline, exited = start + self.timeout_s, None
        while True:
            poll = EXITED_SILENCE_S / 4 if exited is not None else STOP_POLL_S
            ready, _, _ = select.select([self.fd], [], [], max(0.0, min(poll, deadline - time.monotonic())))
            if ready:
                data = os.read(self.fd, n)
                self.printed += len(data)
                return data
            now = time.monotonic()
            if exited is None and self.proc.poll() is not None:
                exited = now  # the command is gone; what holds its output open is not the command
            if exited is not None and now - exited >= min(EXITED_SILENCE_S, self.timeout_s):
                return b""  # the end of its output: the exit status decides (`_exit_code`)
            if is_stopping() and now - start >= min(STOP_SILENCE_S, self.timeout_s):
                self._end()
                raise PipeError(f"{self.where}: stopped waiting for the command, which printed nothing: the "
                                "process was asked to terminate (SIGTERM)")
            if now >= deadline:
                break
        self._end()
        silent = (f"went silent for {self.timeout_s:g} s after {self.printed:,} bytes" if self.printed
                  else f"printed nothing for {self.timeout_s:g} s")
        raise PipeError(f"{self.where}: the command {silent} (stalled; data.read_timeout_s)", transient=True)

    def read(self, n: int = -1) -> bytes:
        whole = n is None or n < 0
        parts, got = [], 0
        while whole or got < n:
            data = self._chunk(1 << 20 if whole else n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        if whole or got < n:  # the end of the output: the exit status decides
            code = self._exit_code()
            if code != 0:
                tail = self._stderr_tail()
                raise PipeError(f"{self.where}: the command exited with code {code}"
                                + (f"; its stderr ends: {tail}" if tail else " (no stderr)"), transient=True)
        return b"".join(parts)

    def check_exit(self, tail_bytes: int = 1 << 16) -> None:
        """After a whole shard was read: the rest of the output (a tar's end padding; up to `tail_bytes`)
        and the command's exit status, which decides as it does at the end of `read` (`_exit_code`: one that
        closed its output but does not exit is an error there too). A command that printed a complete shard
        and then failed was taken for a good read (`bcc pack --verify`, which reads to the end, called it
        missing). A command that goes on printing past `tail_bytes` is left to `close`."""
        got = 0
        while got <= tail_bytes:
            data = self._chunk(1 << 14)
            if not data:
                break
            got += len(data)
        else:
            return
        code = self._exit_code()
        if code != 0:
            tail = self._stderr_tail()
            raise PipeError(f"{self.where}: the command exited with code {code} after printing the whole shard"
                            + (f"; its stderr ends: {tail}" if tail else " (no stderr)"), transient=True)

    def _exit_code(self) -> int:
        """The command's exit code once its output ended. One that closed its output but does not exit within
        `timeout_s` (STOP_SILENCE_S once the process was asked to terminate) is ended and raises PipeError,
        transient as a stall is: its verdict on the bytes it printed is unknown (an unbounded wait here hung
        the loader for good on `pipe:cat x.tar; exec >&-; sleep 1000`)."""
        start = time.monotonic()
        with activity.waiting(self.timeout_s + STOP_POLL_S + 1.0, self.where):
            while True:
                left = self.timeout_s - (time.monotonic() - start)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return self.proc.wait(timeout=max(0.0, min(STOP_POLL_S, left)))
                waited = time.monotonic() - start
                if is_stopping() and waited >= min(STOP_SILENCE_S, self.timeout_s):
                    self._end()
                    raise PipeError(f"{self.where}: stopped waiting for the command, which closed its output but "
                                    "did not exit: the process was asked to terminate (SIGTERM)")
                if waited >= self.timeout_s:
                    self._end()
                    raise PipeError(f"{self.where}: the command closed its output but did not exit within "
                                    f"{self.timeout_s:g} s (data.read_timeout_s)", transient=True)

    def _end(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the command and what it started

    def close(self) -> None:
        self._end()  # read far enough (a lane's end) or failed: the rest is not wanted
        self.proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed: it ends at once unless stuck in the kernel
            self.proc.wait(timeout=min(self.timeout_s, STOP_SILENCE_S))  # (then Popen reaps it later)
        self.stderr.close()

    def __repr__(self) -> str:
        return self.where
