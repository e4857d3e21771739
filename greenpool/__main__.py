"""``python -m greenpool``: the command line (see :mod:`greenpool.cli`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
