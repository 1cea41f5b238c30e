"""One base class for every error bcc raises for the user, and the one place that turns it into a line.

A `BccError` is a user's mistake or an environment problem (bad config key, missing shard, corrupt
image, full disk): the entry points (`bcc ...`, `python -m bcc.train`) catch it in one place, print one
`error: ...` line that names the file, key or shard, and exit with `EXIT_USAGE` (2). Anything else is a
bug and keeps its traceback. `BCC_DEBUG=1` shows the traceback of a `BccError` too.
"""

from __future__ import annotations

import os

EXIT_USAGE = 2  # bad config, data or arguments (argparse uses 2 as well)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGUSR1/SIGTERM; launchers requeue on this code


class BccError(Exception):
    """Base of every exception bcc defines. The message is shown to the user as it is, on one line."""

    exit_code: int = EXIT_USAGE


def is_debug() -> bool:
    """True when `BCC_DEBUG=1`: user errors then keep their traceback."""
    return os.environ.get("BCC_DEBUG", "") not in ("", "0")
