"""`accelerate launch` with the same arguments, made fit for batch jobs that get preempted: the
trainer's exit code kept (75: requeue me; 2: a user's mistake, without torch's traceback), SIGUSR1 and
SIGTERM forwarded to the training processes, and no silent CPU fallback of a GPU launch. The same as
`bcc launch`; what it does and why: `bcc.launch.accelerate_main`.

    python launch/accelerate_launch.py [accelerate launch options] -m bcc.train --config FILE [key=value ...]
"""

import argparse
import sys

from bcc.cli import call
from bcc.launch import accelerate_main

if __name__ == "__main__":
    sys.exit(call(lambda _: accelerate_main(), argparse.Namespace()))  # a LaunchError: one `error:` line, exit 2
