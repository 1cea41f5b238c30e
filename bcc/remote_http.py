"""http(s) response bodies read as shards (`bcc.remote.open_location` opens them here; what a location is,
its credentials and its errors are `bcc.remote`'s).

After a termination request (`bcc.remote.request_stop`, from a SIGTERM handler) a body whose server has
sent nothing for `STOP_SILENCE_S` is cut (its socket shut down), as a silent `pipe:` command is ended:
a blocking socket read otherwise waits out its whole time-out (`data.read_timeout_s`, 60 s by default),
beyond Slurm's KillWait (30 s), and the job is killed with no `error:` line. A server that still sends,
however slowly, is read on, so the run can reach its preemption checkpoint. A watchdog thread per process
(started with the first body, asleep but for a flag check every `STOP_POLL_S`) does the cutting: a
signal handler cannot shorten a read already waiting in the kernel."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import weakref

from bcc import activity, remote
from bcc.remote import STOP_SILENCE_S, RemoteError

__all__ = ["STOP_SILENCE_S", "HttpBody"]

STOP_POLL_S = 1.0  # the watchdog checks this often for a termination request
CHUNK = 1 << 20  # a read(n) asks the connection for at most this much at a time

_OPEN: weakref.WeakSet = weakref.WeakSet()  # bodies being read in this process
_WATCHDOG_PID = [0]  # the process whose watchdog runs (a forked loader worker starts its own)


class HttpBody:
    """An HTTP response body (`read(n)`, `close()`) that raises a transient RemoteError when the connection
    ends before Content-Length bytes (http.client returns a short body silently), and a final one when
    it was cut after a termination request."""

    def __init__(self, response, where: str, timeout_s: float = remote.HTTP_TIMEOUT_S):
        self.response, self.where, self.timeout_s = response, where, timeout_s
        length = response.headers.get("Content-Length")
        self.remaining = int(length) if length and length.isdigit() else None
        self.received = 0
        self.progress = time.monotonic()  # when it last received bytes (or opened)
        self.cut = False
        _OPEN.add(self)
        _start_watchdog()

    def read(self, n: int = -1) -> bytes:
        whole = n is None or n < 0
        parts, got = [], 0
        try:
            while whole or got < n:  # piece by piece: each piece that arrives is progress (`_watch`)
                with activity.waiting(self.timeout_s + 1.0, self.where):  # the socket's time-out bounds it
                    data = self.response.read1(CHUNK if whole else min(CHUNK, n - got))
                if not data:
                    break
                self.progress = time.monotonic()
                parts.append(data)
                got += len(data)
        except (OSError, http.client.HTTPException) as e:
            self._check_cut()
            raise RemoteError(f"{self.where}: connection lost after {self.received + got} bytes: "
                              f"{type(e).__name__}: {e}", transient=True) from None
        self._check_cut()
        self.received += got
        if self.remaining is not None:
            self.remaining -= got
            if self.remaining > 0 and (whole or got < n):
                raise RemoteError(f"{self.where}: connection closed after {self.received} of "
                                  f"{self.received + self.remaining} bytes", transient=True)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check_cut(self) -> None:
        if self.cut:
            raise RemoteError(f"{self.where}: stopped waiting for the server, which sent nothing for "
                              f"{STOP_SILENCE_S:g} s: the process was asked to terminate (SIGTERM)")

    def shut(self) -> None:
        """Cut the connection under a blocked read (from the watchdog thread): the read returns at once."""
        self.cut = True
        try:
            with socket.socket(fileno=os.dup(self.response.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):  # already closed
            pass

    def close(self) -> None:
        _OPEN.discard(self)
        self.response.close()

    def __repr__(self) -> str:
        return self.where


def _start_watchdog() -> None:
    if _WATCHDOG_PID[0] != os.getpid():
        _WATCHDOG_PID[0] = os.getpid()
        threading.Thread(target=_watch, name="bcc-http-stop", daemon=True).start()


def _watch() -> None:
    while True:
        time.sleep(STOP_POLL_S)
        stopped_at = remote.stop_time()
        if stopped_at is None:
            continue
        now = time.monotonic()
        for body in list(_OPEN):
            if not body.cut and now - max(body.progress, stopped_at) >= STOP_SILENCE_S:
                body.shut()
