"""``python -m delta_format``: the ``delta-format`` command line."""

import sys

from .cli import main

sys.exit(main())
