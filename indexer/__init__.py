"""ocidx: an index of OCI image layouts, kept fresh, queried in milliseconds.

``from indexer import Index`` is the Python API of the lookups in docs/api.md (``AsyncIndex`` for
asyncio and trio), and the exceptions a caller catches come from here too
(``from indexer import NotFound, Ambiguous``). Each is imported on first use, so that
``import indexer`` (and the lookup CLI) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.aio import AsyncIndex as AsyncIndex
    from indexer.errors import Ambiguous as Ambiguous
    from indexer.errors import ConfigError as ConfigError
    from indexer.errors import DatabaseError as DatabaseError
    from indexer.errors import InvalidReference as InvalidReference
    from indexer.errors import LayoutError as LayoutError
    from indexer.errors import LayoutNotFound as LayoutNotFound
    from indexer.errors import NotFound as NotFound
    from indexer.errors import OcidxError as OcidxError
    from indexer.errors import PlatformNotFound as PlatformNotFound
    from indexer.errors import TagMismatch as TagMismatch
    from indexer.errors import UsageError as UsageError
    from indexer.errors import WaitTimeout as WaitTimeout
    from indexer.query import Index as Index

# The exceptions of indexer.errors that a caller of the API catches (docs/api.md, Errors).
_ERRORS = (
    "Ambiguous",
    "ConfigError",
    "DatabaseError",
    "InvalidReference",
    "LayoutError",
    "LayoutNotFound",
    "NotFound",
    "OcidxError",
    "PlatformNotFound",
    "TagMismatch",
    "UsageError",
    "WaitTimeout",
)

__all__ = ["AsyncIndex", "Index", "__version__", *_ERRORS]


def __getattr__(name: str) -> object:
    if name == "Index":
        from indexer.query import Index

        return Index
    if name == "AsyncIndex":
        from indexer.aio import AsyncIndex

        return AsyncIndex
    if name in _ERRORS:
        from indexer import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
