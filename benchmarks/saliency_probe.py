"""Where the saliency sits on patched images. Same as `elgs bench saliency-probe` (elgs.bench.saliency_probe)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "saliency-probe", *sys.argv[1:]]))
