"""Queue flood against a running server. Same as `elgs bench flood` (elgs.bench.flood)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "flood", *sys.argv[1:]]))
