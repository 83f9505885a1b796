"""Read-only queries on the index: the one matcher behind every lookup.

The same functions run on the on-disk database (an indexed answer) and on the
in-memory database that a read-through lookup fills from a freshly parsed
``index.json`` (:func:`indexer.store.write.store_snapshot`), so both kinds of
answer come from one piece of matching code.

The package's modules, by responsibility (docs/design.md): :mod:`.identity` (the racy rule and when
a layout's stored rows are proven current), :mod:`.matcher` (:func:`lookups` and the hits they give),
:mod:`.stored` (the rows of layouts, entries, names and children) and :mod:`.graph` (the content
graph's reads). What other modules use is re-exported here: ``from indexer.store import read as db``.
"""

from __future__ import annotations

from indexer.store.read.graph import (
    FALLBACK_SUFFIXES,
    GraphHit,
    Image,
    ReferrerHit,
    Usage,
    blob_uses,
    fallback_tags,
    graph_hits,
    image_size,
    images,
    missing,
    parse_layers,
    referencing,
    referrer_hits,
    usage,
    users,
)
from indexer.store.read.identity import (
    RACY_SQL,
    RACY_WINDOW_NS,
    SETTLES_AT_SQL,
    StoredLayout,
    depends_hold,
    encode_depends,
    mount_holds,
    mount_members,
    presence_differs,
    remounted,
    same_rows_depend,
    settles_at,
)
from indexer.store.read.matcher import (
    Hit,
    Lookup,
    by_digest,
    by_name,
    by_repository,
    by_tag,
    hits,
    lookups,
    pointing_lookup,
)
from indexer.store.read.stored import (
    ChildRow,
    children,
    count_names,
    entries,
    in_error,
    layout,
    layout_warnings,
    layouts,
    layouts_by_id,
    names,
    retries,
    sample_names,
)

__all__ = [
    "FALLBACK_SUFFIXES",
    "RACY_SQL",
    "RACY_WINDOW_NS",
    "SETTLES_AT_SQL",
    "ChildRow",
    "GraphHit",
    "Hit",
    "Image",
    "Lookup",
    "ReferrerHit",
    "StoredLayout",
    "Usage",
    "blob_uses",
    "by_digest",
    "by_name",
    "by_repository",
    "by_tag",
    "children",
    "count_names",
    "depends_hold",
    "encode_depends",
    "entries",
    "fallback_tags",
    "graph_hits",
    "hits",
    "image_size",
    "images",
    "in_error",
    "layout",
    "layout_warnings",
    "layouts",
    "layouts_by_id",
    "lookups",
    "missing",
    "mount_holds",
    "mount_members",
    "names",
    "parse_layers",
    "pointing_lookup",
    "presence_differs",
    "referencing",
    "referrer_hits",
    "remounted",
    "retries",
    "same_rows_depend",
    "sample_names",
    "settles_at",
    "usage",
    "users",
]
