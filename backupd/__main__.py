"""``python -m backupd``."""

import sys

from backupd.cli import main

sys.exit(main())
