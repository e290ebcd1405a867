"""A name -> object registry whose lookups fail with the list of valid names."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from kdbench.core.names import did_you_mean

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for an unknown registry key; the message names every valid choice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}.{did_you_mean(name, self._items)} Valid choices: {', '.join(sorted(self._items))}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
