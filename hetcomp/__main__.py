"""``python -m hetcomp ...``: the command line (see hetcomp.cli)."""

import sys

from hetcomp.cli import main

if __name__ == "__main__":
    sys.exit(main())
