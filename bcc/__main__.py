import sys

from bcc.cli import main

sys.exit(main())
