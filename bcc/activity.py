"""Signs that slow I/O work moves on, for a watcher in another thread (`bcc.train.heartbeat`).

Two kinds, both cheap enough to note for every MiB read:
- `tick()`: a step of the work completed (a remote request answered, a piece of a body or of a `pipe:`
  command's output received, a retry's pause over, a local shard stat'ed).
- `waiting(bound_s, what)`: a blocking wait in flight that has a bound of its own (a socket operation with
  `data.read_timeout_s`, a silent `pipe:` command, a retry's back-off). Until `bound_s` has passed it is
  work, however long it is silent; past it, it is how a hang looks from outside.

What has no bound of its own (a name lookup, `getaddrinfo`; a file system that stopped answering, where
`os.stat` or `open` wait in the kernel; a lock never released) shows as neither: no ticks, no wait within
its bound, and a thread stack that does not change (`bcc.train.heartbeat` looks at that too).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

_TICKS = [0]  # a lost increment (two threads at once) does not matter: only "it changed" is read
_WAITS: dict[int, tuple[float, str]] = {}  # id of a wait -> (monotonic deadline, what it waits on)


def tick() -> None:
    """A step of slow work completed."""
    _TICKS[0] += 1


@contextlib.contextmanager
def waiting(bound_s: float, what: str = "") -> Iterator[None]:
    """Inside: a blocking wait that ends within `bound_s` seconds on its own (`what`: the location it waits
    on, for a message). Leaving it is a `tick`."""
    token = object()
    _WAITS[id(token)] = (time.monotonic() + bound_s, what)
    try:
        yield
    finally:
        _WAITS.pop(id(token), None)  # gone already if a test swapped the table
        tick()


def snapshot() -> tuple[int, bool, list[str]]:
    """(ticks so far, whether a wait is in flight within its bound, what the waits past their bound wait on)."""
    now = time.monotonic()
    waits = list(_WAITS.values())  # a copy: other threads add and remove waits meanwhile
    return _TICKS[0], any(deadline > now for deadline, _ in waits), [w for deadline, w in waits if deadline <= now]
