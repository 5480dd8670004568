"""``python -m oracle`` is ``bp-oracle``."""

import sys

from .cli import main

sys.exit(main())
