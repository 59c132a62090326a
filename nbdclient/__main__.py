"""``python -m nbdclient``."""

import sys

from .cli import main

sys.exit(main())
