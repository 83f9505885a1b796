"""A tiny immutable record base for the lookup path.

``dataclasses`` costs about 6 ms of import time and ``typing`` about 3 ms on
this machine; the lookup path has a 26 ms budget for a whole process, so the
value types it uses derive from :class:`Record` instead (see docs/design.md).
"""

from __future__ import annotations


class Record:
    """Equality, hashing and repr from ``__slots__``; subclasses write ``__init__``.

    Records are values: nothing assigns to a field after ``__init__``. That is a convention,
    not a check: a ``__setattr__`` guard cost 0.6 s per 1,000 layouts scanned (661k calls).
    """

    __slots__: tuple[str, ...] = ()

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(_freeze(v) for v in self._key())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


def _freeze(value: object) -> object:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
