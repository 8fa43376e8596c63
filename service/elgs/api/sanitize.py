"""What an error message may quote of what a client sent (issue 18): a short, printable excerpt.

Messages name the bad value so a user sees what to fix, but a path of 5,000 characters, a NUL or a
terminal escape must not come back whole: :func:`quote_client_text` shows at most
:data:`QUOTE_LIMIT` printable characters, and :func:`sanitize_detail` replaces, in a message written
elsewhere (the engine's, pydantic's), every quotation of a value the request carried.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Characters of a client's value an error message shows.
QUOTE_LIMIT = 40
# Longest error detail sent (our messages are far shorter; a cap for what slipped through).
MAX_DETAIL_CHARS = 600


def printable(text: str) -> str:
    """``text`` with every character that is not printable (NUL, escapes, line breaks) shown as ``?``."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def quote_client_text(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` quoted for an error message: printable, at most ``limit`` characters, longer ones cut
    with ``...`` and their length, e.g. ``'xxxx...' (5000 characters)``."""
    text = str(value)
    if len(text) <= limit:
        return f"'{printable(text)}'"
    return f"'{printable(text[:limit])}...' ({len(text)} characters)"


def _pieces(value: str) -> set[str]:
    """``value`` and the parts a parser may quote alone (``name:key=value,...`` specs)."""
    pieces = {value, value.strip()}
    for separators in ("[:,]", "[:,=]"):
        pieces.update(part.strip() for part in re.split(separators, value))
    return {piece for piece in pieces if piece}


def client_values(path_params: Mapping[str, object], query: Iterable[tuple[str, str]]) -> set[str]:
    """The texts a request carried in its path and query, and their parts."""
    values: set[str] = set()
    for value in [*path_params.values(), *(value for _, value in query)]:
        if isinstance(value, str):
            values |= _pieces(value)
    return values


def sanitize_detail(detail: str, values: Iterable[str] = ()) -> str:
    """``detail`` with each ``repr`` of one of ``values`` that is long or not printable replaced by
    :func:`quote_client_text` of it, then made printable and cut at :data:`MAX_DETAIL_CHARS`."""
    for value in sorted(values, key=len, reverse=True):
        if len(value) > QUOTE_LIMIT or not value.isprintable():
            detail = detail.replace(repr(value), quote_client_text(value))
    detail = printable(detail)
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS - 3] + "..."
