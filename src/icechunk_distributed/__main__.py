"""``python -m icechunk_distributed``: the command line."""

import sys

from icechunk_distributed.cli import main

if __name__ == "__main__":
    sys.exit(main())
