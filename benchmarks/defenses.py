"""Defence-op time over model-pass time per method (DESIGN 8). Same as `elgs bench defenses`."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "defenses", *sys.argv[1:]]))
