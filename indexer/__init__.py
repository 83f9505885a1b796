"""ocidx: an index of OCI image layouts, kept fresh, queried in milliseconds.

``from indexer import Index`` is the Python API of the lookups in docs/semantics.md; it is imported
lazily so that ``import indexer`` (and the lookup CLI) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.query import Index as Index

__all__ = ["Index", "__version__"]


def __getattr__(name: str) -> object:
    if name == "Index":
        from indexer.query import Index

        return Index
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
