"""Comparing nested answers (dicts, lists, floats) as the evaluation and equivalence tests do."""

from __future__ import annotations

import pytest


def nested_close(a, b, *, rel: float, abs: float) -> bool:  # noqa: A002 - pytest.approx's names
    """``a == b`` through dicts and lists, floats within ``rel`` or ``abs``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_close(a[k], b[k], rel=rel, abs=abs)
                                                                     for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(nested_close(x, y, rel=rel, abs=abs)
                                                                 for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=abs)
    return a == b
