import sys

from elgs.cli import main

sys.exit(main())
