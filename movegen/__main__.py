"""``python -m movegen``: the ``movegen`` console script."""

import sys

from .cli import main

sys.exit(main())
