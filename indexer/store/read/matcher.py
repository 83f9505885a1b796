"""The one matcher behind every lookup: which rows a tag, a name or a digest selects (:func:`lookups`), and
the hits they give."""

from __future__ import annotations

import json

from indexer._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence


_ENTRY_COLUMNS = "e.id, e.layout_id, e.position, e.digest, e.media_type, e.size, e.platform, e.annotations"


class Hit(Record):
    """One entry (or child manifest) that a query reached."""

    __slots__ = (
        "annotations",
        "digest",
        "entry_id",
        "layout_id",
        "media_type",
        "platform",
        "position",
        "size",
        "source",
    )

    def __init__(
        self,
        *,
        entry_id: int,
        layout_id: int,
        position: int,
        digest: str,
        media_type: str,
        size: int,
        platform: dict[str, object] | None,
        annotations: dict[str, str],
        source: str,
    ) -> None:
        self.entry_id = entry_id
        self.layout_id = layout_id
        self.position = position
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.platform = platform
        self.annotations = annotations
        self.source = source


def _hit(row: Sequence[object], source: str) -> Hit:
    entry_id, layout_id, position, digest, media_type, size, platform, annotations = row
    return Hit(
        entry_id=entry_id,  # type: ignore[arg-type]
        layout_id=layout_id,  # type: ignore[arg-type]
        position=position,  # type: ignore[arg-type]
        digest=digest,  # type: ignore[arg-type]
        media_type=media_type,  # type: ignore[arg-type]
        size=size,  # type: ignore[arg-type]
        platform=json.loads(platform) if platform else None,  # type: ignore[arg-type]
        annotations=json.loads(annotations),  # type: ignore[arg-type]
        source=source,
    )


def _scope(layout_id: int | None, column: str) -> tuple[str, tuple[int, ...]]:
    if layout_id is None:
        return "", ()
    return f" AND {column} = ?", (layout_id,)


class Lookup(Record):
    """One indexed lookup: the rows of *table* (``names``, ``entries``, ``children``) whose *columns* equal *values*.

    The matching rules are stated once, as lookups (:func:`lookups`, :func:`pointing_lookup`);
    :func:`hits` runs them on SQLite, and the fleet renders the same lookups as PostgreSQL.
    """

    __slots__ = ("columns", "table", "values")

    def __init__(self, table: str, columns: tuple[str, ...], values: tuple[str, ...]) -> None:
        self.table = table
        self.columns = columns
        self.values = values


def lookups(*, name: str | None, tag: str | None, digest: str | None) -> list[Lookup]:
    """The rows a query reaches across layouts (docs/semantics.md), in answer order.

    A digest reaches top-level entries, then child manifests of nested indexes, whatever names
    come with it (those only check that the names point at it: :func:`pointing_lookup`); a name
    reaches its canonical (repository, tag) pair, tag '' being the untagged name; a bare tag
    reaches every repository's entries with that tag (``latest`` when none is given).
    """
    if digest is not None:
        return [Lookup("entries", ("digest",), (digest,)), Lookup("children", ("digest",), (digest,))]
    if name is not None:
        return [Lookup("names", ("name", "tag"), (name, tag or ""))]
    return [Lookup("names", ("tag",), (tag or "latest",))]


def pointing_lookup(*, name: str | None, tag: str | None) -> Lookup:
    """The names that must point at the digest of a ``NAME[:TAG]@DIGEST`` or ``:TAG@DIGEST`` query."""
    if name is not None:
        return Lookup("names", ("name", "tag"), (name, tag)) if tag else Lookup("names", ("name",), (name,))
    return Lookup("names", ("tag",), (tag or "",))


def hits(conn: sqlite3.Connection, lookup: Lookup, layout_id: int | None = None) -> list[Hit]:
    """The entries (or child manifests) *lookup* reaches, optionally in one layout, in index order."""
    if lookup.table == "names":
        where = " AND ".join(f"n.{column} = ?" for column in lookup.columns)
        scope, scope_args = _scope(layout_id, "n.layout_id")
        # The entries are picked by id first: an entry with thousands of matching names (a comma list)
        # is one id, where a DISTINCT over the joined rows compared its whole annotations once per name.
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries e WHERE e.id IN (SELECT n.entry_id FROM names n "
            f"WHERE {where}{scope}) ORDER BY e.layout_id, e.position",
            (*lookup.values, *scope_args),
        )
        return [_hit(row, "entry") for row in rows]
    (column,) = lookup.columns  # entries and children are looked up by digest
    if lookup.table == "entries":
        where, args = _scope(layout_id, "e.layout_id")
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries e WHERE e.{column} = ?{where} ORDER BY e.layout_id, e.position",
            (*lookup.values, *args),
        )
        return [_hit(row, "entry") for row in rows]
    where, args = _scope(layout_id, "c.layout_id")
    rows = conn.execute(
        "SELECT c.entry_id, c.layout_id, c.position, c.digest, c.media_type, c.size, c.platform, "
        f"c.annotations FROM children c WHERE c.{column} = ?{where} ORDER BY c.layout_id, c.entry_id, c.position",
        (*lookup.values, *args),
    )
    return [_hit(row, "child") for row in rows]


def by_tag(conn: sqlite3.Connection, tag: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with a name carrying *tag*, whatever the repository."""
    return hits(conn, Lookup("names", ("tag",), (tag,)), layout_id)


def by_name(conn: sqlite3.Connection, name: str, tag: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with the canonical (repository, tag) pair; tag '' is the untagged name."""
    return hits(conn, Lookup("names", ("name", "tag"), (name, tag)), layout_id)


def by_repository(conn: sqlite3.Connection, name: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with any name in repository *name*, tagged or not."""
    return hits(conn, Lookup("names", ("name",), (name,)), layout_id)


def by_digest(conn: sqlite3.Connection, digest: str, layout_id: int | None = None) -> list[Hit]:
    """Top-level entries with *digest*, then child manifests of nested indexes with it."""
    return [h for lookup in lookups(name=None, tag=None, digest=digest) for h in hits(conn, lookup, layout_id)]
