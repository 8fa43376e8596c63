"""Where a model's torch ops should run. Same as `elgs bench placement` (elgs.bench.placement)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "placement", *sys.argv[1:]]))
