"""Lookups: query forms, matching, ambiguity, platforms and freshness (docs/semantics.md).

The Python API is :class:`Index`; the CLI is a thin shell over it. Every
lookup goes through one path:

1. the target is split into a layout and a :class:`Query` (tag, name, digest);
2. :meth:`Index.view` decides where that layout's rows come from: the index
   when the ``index.json`` identity is unchanged and not racily clean
   (``indexed``), a fresh parse of the file into an in-memory database when it
   changed or was never indexed (``read-through``), or the last good rows when
   the file is torn or broken (``stale``);
3. :func:`indexer.store.read` functions match on whichever database that is.

The package's modules, by responsibility (docs/design.md): :mod:`.answers` (the query forms and
answer types), :mod:`.matching` (hits to answers), :mod:`.platforms` (``--platform``),
:mod:`.messages` (what errors say), :mod:`.freshness` (the walk of the roots), :mod:`.usage`
(``du``'s figures), and :class:`Index` built from layers that each use the ones below:
:mod:`.views` (state, connection, views), :mod:`.resolving`, :mod:`.finding`, :mod:`.content`
(``referrers``, ``du``) and :mod:`.index` (``ls``, ``status``). Names with a leading underscore
are the package's own. What other modules import is re-exported here, its one public home.

This package, and everything it imports at module level, is standard library
only: a test holds it (the lookup budget is about 26 ms for a whole process).
"""

from __future__ import annotations

from indexer.query.answers import (
    INDEXED,
    READ_THROUGH,
    SCHEME,
    STALE,
    Answer,
    Matches,
    Query,
    Referrer,
    Referrers,
    Rows,
    View,
    parse_ref,
)
from indexer.query.index import Index
from indexer.query.matching import blob_use_answer, image_fields, mismatch, with_image
from indexer.query.messages import describe_missing

__all__ = [
    "INDEXED",
    "READ_THROUGH",
    "SCHEME",
    "STALE",
    "Answer",
    "Index",
    "Matches",
    "Query",
    "Referrer",
    "Referrers",
    "Rows",
    "View",
    "blob_use_answer",
    "describe_missing",
    "image_fields",
    "mismatch",
    "parse_ref",
    "with_image",
]
