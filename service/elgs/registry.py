"""One generic name registry (timm's idea) for the defences, the saliency estimators and the model zoo.

A :class:`Registry` maps names to frozen entries in registration order; it reads like a dict
(``REGISTRY["lgs"]``, ``list(REGISTRY)``, ``.items()``), refuses a name twice and answers an unknown name
with a ``KeyError`` that lists the choices. Pure Python: the defences (which import only torch) can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one kind by name.

    Args:
        kind: what an entry is, for messages (``"defence"``, ``"saliency estimator"``, ``"model"``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Tool:
        ...     name: str
        >>> tools = Registry[Tool]("tool")
        >>> tools.register(Tool("saw")).name
        'saw'
        >>> tools.find("saw"), tools.names()
        (Tool(name='saw'), ['saw'])
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name``; ``ValueError`` when the name is taken."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    @contextmanager
    def temporarily(self, entry: T) -> Iterator[T]:
        """``entry`` registered for the ``with`` block only (tests, experiments)."""
        self.register(entry)
        try:
            yield entry
        finally:
            del self._entries[entry.name]

    def find(self, name: str) -> T:
        """The entry called ``name``; ``KeyError`` naming the choices otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}") from None

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        """Registered names in registration order, only those ``where`` accepts when given."""
        return [name for name, entry in self._entries.items() if where is None or where(entry)]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry[{self.kind}]({', '.join(self._entries)})"
