"""Restore rate, clean kept and cost per saliency estimator. Same as `elgs bench estimators` (elgs.bench.estimators)."""

import sys

from elgs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "estimators", *sys.argv[1:]]))
