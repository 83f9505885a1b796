"""The stored rows of layouts: their state, entries, names, children and warnings."""

from __future__ import annotations

import json
import os

from indexer._record import Record
from indexer.layout import INDEX_MEDIA_TYPES, FileIdentity
from indexer.names import Name
from indexer.store import path_of, path_value
from indexer.store.read.identity import StoredLayout
from indexer.store.read.matcher import _ENTRY_COLUMNS, Hit, _hit

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Sequence


_LAYOUT_COLUMNS = (
    "id, path, dev, ino, size, mtime_ns, ctime_ns, read_ns, content_hash, state, error_category, error, "
    "last_good_ns, checked_ns, entry_count, identity_since_ns, version, blobs_dir, blobs_dev, blobs_ino, "
    "blobs_mtime_ns, blobs_ctime_ns, blobs_more, blobs_root, blobs_listed_ns, blobs_since_ns, blobs_settles_ns, "
    "graph_hash, retry_ns, depends, mnt_id"
)


def _stored(row: Sequence[object]) -> StoredLayout:
    (lid, path, dev, ino, size, mtime, ctime, read_ns, chash, state, cat, err, good, checked, count, since, version) = (
        row[:17]
    )
    bdir, bdev, bino, bmtime, bctime, bmore, broot, blisted, bsince, bsettles, graph_hash = row[17:28]
    retry, depends, mnt_id = row[28:31]
    identity = (
        FileIdentity(dev=dev, ino=ino, size=size, mtime_ns=mtime, ctime_ns=ctime)  # type: ignore[arg-type]
        if dev is not None
        else None
    )
    return StoredLayout(
        id=lid,  # type: ignore[arg-type]
        path=path_of(path),  # type: ignore[arg-type]
        identity=identity,
        read_ns=read_ns,  # type: ignore[arg-type]
        content_hash=chash,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        error_category=cat,  # type: ignore[arg-type]
        error=err,  # type: ignore[arg-type]
        last_good_ns=good,  # type: ignore[arg-type]
        checked_ns=checked,  # type: ignore[arg-type]
        entry_count=count,  # type: ignore[arg-type]
        identity_since_ns=since,  # type: ignore[arg-type]
        version=version,  # type: ignore[arg-type]
        presence=(bdir, bdev, bino, bmtime, bctime, bmore, broot) if bdir is not None else None,  # type: ignore[arg-type]
        blobs_listed_ns=blisted,  # type: ignore[arg-type]
        blobs_since_ns=bsince,  # type: ignore[arg-type]
        blobs_settles_ns=bsettles,  # type: ignore[arg-type]
        graph_hash=graph_hash,  # type: ignore[arg-type]
        retry_ns=retry,  # type: ignore[arg-type]
        depends=depends,  # type: ignore[arg-type]
        mnt_id=mnt_id,  # type: ignore[arg-type]
    )


def layout(conn: sqlite3.Connection, path: str) -> StoredLayout | None:
    """The stored state of the layout at *path* (resolved), or None."""
    row = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE path = ?", (path_value(path),)).fetchone()
    return None if row is None else _stored(row)


def layouts(conn: sqlite3.Connection, under: str | None = None) -> list[StoredLayout]:
    """Every stored layout (below directory *under* when given), by path."""
    if under is None:
        rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts ORDER BY path")
    else:
        # Compared as bytes, so that text and BLOB (non-UTF-8) paths below *under* are both found.
        prefix = os.fsencode(under.rstrip("/") + "/")
        rows = conn.execute(
            f"SELECT {_LAYOUT_COLUMNS} FROM layouts "
            "WHERE path = ? OR substr(CAST(path AS BLOB), 1, ?) = ? ORDER BY path",
            (path_value(under), len(prefix), prefix),
        )
    return [_stored(row) for row in rows]


def retries(conn: sqlite3.Connection, paths: Iterable[str] | None = None) -> dict[str, int]:
    """Layouts (all, or those at *paths*) whose last read failed for a reason outside their bytes, and
    when (wall clock, ns) the daemon reads each again."""
    if paths is None:
        rows = conn.execute("SELECT path, retry_ns FROM layouts WHERE retry_ns IS NOT NULL")
        return {path_of(path): when for path, when in rows}
    found: dict[str, int] = {}
    wanted = [path_value(p) for p in paths]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT path, retry_ns FROM layouts WHERE retry_ns IS NOT NULL AND path IN ({marks})", chunk
        )
        found.update((path_of(path), when) for path, when in rows)
    return found


def in_error(conn: sqlite3.Connection) -> list[StoredLayout]:
    """Every layout whose last read failed (state ``error``), by path."""
    rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE state = 'error' ORDER BY path")
    return [_stored(row) for row in rows]


def layouts_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, StoredLayout]:
    """The stored layouts with these ids."""
    wanted = sorted(set(ids))
    result: dict[int, StoredLayout] = {}
    for chunk in _chunks(wanted):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE id IN ({marks})", chunk):
            stored = _stored(row)
            result[stored.id] = stored
    return result


class ChildRow(Record):
    """A manifest listed by a nested index under one top-level entry."""

    __slots__ = ("depth", "digest", "media_type", "parent", "platform", "size")

    def __init__(
        self,
        *,
        parent: str,
        depth: int,
        digest: str,
        media_type: str,
        size: int,
        platform: dict[str, object] | None,
    ) -> None:
        self.parent = parent
        self.depth = depth
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.platform = platform


# The descriptors reachable from one index in one layout: each distinct index once (UNION), however
# many paths lead to it. Children are stored once per layout (layout.nested._ChildWalk), under the first
# entry that reached them, so they are found by digest, from any entry or nested index.
_REACHABLE_SQL = f"""
    WITH RECURSIVE reach(digest) AS (
        SELECT ?
        UNION
        SELECT c.digest FROM children c JOIN reach r ON c.parent = r.digest
        WHERE c.layout_id = ? AND c.media_type IN ({", ".join(f"'{t}'" for t in sorted(INDEX_MEDIA_TYPES))})
    )
    SELECT parent, depth, digest, media_type, size, platform FROM children
    WHERE layout_id = ? AND parent IN (SELECT digest FROM reach) ORDER BY entry_id, position
"""


def children(conn: sqlite3.Connection, layout_id: int, digest: str) -> list[ChildRow]:
    """The descriptors listed below the index *digest* in layout *layout_id*, nested ones too, each
    once, breadth first (the order the walk met them)."""
    return [
        ChildRow(
            parent=parent,
            depth=depth,
            digest=child,
            media_type=media_type,
            size=size,
            platform=json.loads(platform) if platform else None,
        )
        for parent, depth, child, media_type, size, platform in conn.execute(
            _REACHABLE_SQL, (digest, layout_id, layout_id)
        )
    ]


def names(conn: sqlite3.Connection, entry_ids: Iterable[int]) -> dict[int, list[Name]]:
    """The names of each entry, in the order they were read."""
    result: dict[int, list[Name]] = {}
    for chunk in _chunks(sorted(set(entry_ids))):
        marks = ",".join("?" * len(chunk))
        for entry_id, name, tag, how in conn.execute(
            f"SELECT entry_id, name, tag, how FROM names WHERE entry_id IN ({marks}) ORDER BY entry_id, rowid",
            chunk,
        ):
            result.setdefault(entry_id, []).append(Name(name, tag, how))
    return result


def entries(conn: sqlite3.Connection, layout_id: int) -> list[tuple[Hit, list[str], list[str]]]:
    """Every entry of a layout with its invalid raw names and warnings (for ``ls PATH``)."""
    rows = conn.execute(
        f"SELECT {_ENTRY_COLUMNS}, e.invalid_names, e.warnings FROM entries e "
        "WHERE e.layout_id = ? ORDER BY e.position",
        (layout_id,),
    )
    return [
        (_hit(row[:8], "entry"), json.loads(row[8]) if row[8] else [], json.loads(row[9]) if row[9] else [])
        for row in rows
    ]


def layout_warnings(conn: sqlite3.Connection, layout_id: int) -> list[str]:
    """The layout-level warnings of the last good read."""
    return [
        row[0]
        for row in conn.execute("SELECT message FROM layout_warnings WHERE layout_id = ? ORDER BY rowid", (layout_id,))
    ]


def sample_names(conn: sqlite3.Connection, layout_id: int, limit: int = 5) -> list[str]:
    """A few ``name:tag`` (or ``:tag``) the layout holds, for not-found messages."""
    out = []
    for name, tag in conn.execute(
        "SELECT DISTINCT name, tag FROM names WHERE entry_id IN (SELECT id FROM entries WHERE layout_id = ?) "
        "ORDER BY tag = 'latest' DESC, name, tag LIMIT ?",
        (layout_id, limit),
    ):
        out.append(f"{name}:{tag}" if name and tag else (name or f":{tag}"))
    return out


def _chunks(values: list[int], size: int = 500) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def count_names(conn: sqlite3.Connection, layout_id: int) -> int:
    """How many distinct ``name:tag`` the layout holds (for "and N more")."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT name, tag FROM names "
        "WHERE entry_id IN (SELECT id FROM entries WHERE layout_id = ?))",
        (layout_id,),
    ).fetchone()
    return int(row[0])
