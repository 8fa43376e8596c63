"""``python -m elgs.cli``, the same as ``elgs`` and ``python -m elgs``."""

import sys

from elgs.cli import main

sys.exit(main())
