"""What the autocast fast path costs in accuracy. Same as `elgs bench precision` (elgs.bench.precision)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "precision", *sys.argv[1:]]))
