"""What one training step through a defence costs. Same as `elgs bench through` (elgs.bench.through_cost)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "through", *sys.argv[1:]]))
