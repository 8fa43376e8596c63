"""One error hierarchy for the service's refusals: each error says which HTTP status it means and, for a
503, when to retry, and survives pickling whole (a Ray model replica raises it, the ingress re-raises the
same object). Nothing here knows HTTP beyond that number; ``elgs.api.errors`` turns it into a response.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """A refusal with the status it means (``status``, a class attribute) and ``retry_after_s`` (None: no
    ``Retry-After``).

    A subclass whose constructor takes other arguments than its message keeps them in ``init_args``:
    pickling calls the constructor with those again (the default would pass the message alone).
    """

    status: ClassVar[int] = 500
    retry_after_s: int | None = None

    def __reduce__(self) -> tuple:
        return type(self), self.__dict__.get("init_args", self.args), dict(self.__dict__)
