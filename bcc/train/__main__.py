"""`python -m bcc.train --config FILE [key=value ...]`, also under `accelerate launch`; see bcc/cli/train.py."""

import sys

from bcc.cli.train import main

sys.exit(main())
