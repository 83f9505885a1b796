"""The roots the index was built from, recorded in the ``daemon`` row so that ``find`` knows them.

``ocidx scan`` and the daemon add the roots they walk to those recorded: the layouts found below
a root stay in the index after the last scan of it, so ``find`` must keep looking there too.
``find`` without a live daemon walks these roots again (``discovery.changes``, the walk of a
no-change ``ocidx scan``) to prove the index exact; with a live daemon it walks only the roots that
daemon does not watch (roots of earlier scans), since the daemon keeps its own current.

The ``roots`` column holds a JSON list of ``{"path", "max_depth", "follow_symlinks", "watched"}``
objects (``watched``: the running or last daemon watches it); a plain string (what earlier versions
wrote) is a root with the default settings, not watched.

Standard library only: ``find`` reads this on the lookup path.
"""

from __future__ import annotations

import json
import sqlite3

from indexer.config import Root


def to_json(roots: list[tuple[Root, bool]]) -> str:
    """The ``daemon.roots`` value for *roots* and their watched flags (in order, first of a path wins)."""
    seen: dict[str, tuple[Root, bool]] = {}
    for root, watched in roots:
        seen.setdefault(root.path, (root, watched))
    return json.dumps(
        [
            {"path": r.path, "max_depth": r.max_depth, "follow_symlinks": r.follow_symlinks, "watched": watched}
            for r, watched in seen.values()
        ]
    )


def from_json(text: object) -> list[tuple[Root, bool]] | None:
    """The roots in a ``daemon.roots`` value with their watched flags, or None when none were recorded
    (or the value is unreadable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    roots = []
    for item in items:
        if isinstance(item, str):
            roots.append((Root(item), False))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            depth = item.get("max_depth")
            root = Root(
                item["path"],
                max_depth=depth if isinstance(depth, int) and not isinstance(depth, bool) else 8,
                follow_symlinks=item.get("follow_symlinks") is True,
            )
            roots.append((root, item.get("watched") is True))
        else:
            return None
    return roots


def _entries(conn: sqlite3.Connection) -> list[tuple[Root, bool]] | None:
    row = conn.execute("SELECT roots FROM daemon WHERE id = 1").fetchone()
    return None if row is None else from_json(row[0])


def recorded(conn: sqlite3.Connection) -> list[Root] | None:
    """Every root recorded in the database, or None."""
    entries = _entries(conn)
    return None if entries is None else [root for root, _watched in entries]


def unwatched(conn: sqlite3.Connection) -> list[Root]:
    """The recorded roots the daemon does not watch (those only ``ocidx scan`` walked)."""
    return [root for root, watched in _entries(conn) or [] if not watched]


def merged(conn: sqlite3.Connection, roots: list[Root], *, watched: bool) -> str:
    """The ``daemon.roots`` value with *roots* (resolved paths) added to those recorded.

    *watched* (the daemon's roots): they are the watched ones, every other root is not; else (a
    scan's roots) the recorded flags stay and the new roots are not watched.
    """
    known = _entries(conn) or []
    if watched:
        return to_json([*((root, True) for root in roots), *((root, False) for root, _w in known)])
    return to_json([*known, *((root, False) for root in roots)])


def record(conn: sqlite3.Connection, roots: list[Root]) -> None:
    """Add the roots of ``ocidx scan`` (resolved paths) to those recorded, in the writer's connection."""
    value = merged(conn, roots, watched=False)
    if value == to_json(_entries(conn) or []):
        return
    conn.execute(
        "INSERT INTO daemon (id, roots) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET roots = excluded.roots",
        (value,),
    )
