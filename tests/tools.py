"""External programs some tests drive (Chromium, docker-compose): found on PATH, never at a fixed place.

``.ci/run`` installs each of them and exports ``CI=true``; under CI a missing one fails the test that
needs it instead of skipping it, so a broken install cannot pass silently. Elsewhere the test skips
with the command that installs the program.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, set by ``.ci/run`` and by the usual CI services)."""
    return os.environ.get("CI", "").lower() == "true"


def require_program(*names: str, install: str) -> str:
    """The path of the first of ``names`` on PATH; skip without any, or fail under CI.

    Args:
        names: executable names to look for, in order (e.g. ``"chromium", "chromium-browser"``).
        install: how to get it, for the skip or failure message (e.g. ``"apt-get install chromium"``).
    """
    for name in names:
        if path := shutil.which(name):
            return path
    message = f"{' or '.join(names)} not found on PATH ({install})"
    if in_ci():
        pytest.fail(f"{message}; CI installs it (.ci/run), so a missing one is an error, not a skip", pytrace=False)
    pytest.skip(message)
