"""Robustness through a running service. Same as `elgs bench robustness` (elgs.bench.robustness)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "robustness", *sys.argv[1:]]))
