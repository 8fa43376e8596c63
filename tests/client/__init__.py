"""SDK tests. The SDK is imported from the checkout (``clients/python``), so they exercise the working
tree whether or not ``elgs-client`` is installed."""

import sys
from pathlib import Path

SDK_ROOT = Path(__file__).resolve().parents[2] / "clients" / "python"
if str(SDK_ROOT) not in sys.path:
    sys.path.insert(0, str(SDK_ROOT))
