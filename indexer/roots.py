"""The roots the index was built from, recorded in the ``daemon`` row so that ``find`` knows them.

``ocidx scan`` and the daemon add the roots they walk to those recorded: the layouts found below
a root stay in the index after the last scan of it, so ``find`` must keep looking there too.
``find`` without a live daemon walks these roots again (``discovery.changes``, the walk of a
no-change ``ocidx scan``) to prove the index exact.
The ``roots`` column holds a JSON list of ``{"path", "max_depth", "follow_symlinks"}`` objects; a
plain string (what earlier versions wrote) is a root with the default settings.

Standard library only: ``find`` reads this on the lookup path.
"""

from __future__ import annotations

import json
import sqlite3

from indexer.config import Root


def to_json(roots: list[Root]) -> str:
    """The ``daemon.roots`` value for *roots* (resolved paths, in order, without duplicates)."""
    seen: dict[str, Root] = {}
    for root in roots:
        seen.setdefault(root.path, root)
    return json.dumps(
        [{"path": r.path, "max_depth": r.max_depth, "follow_symlinks": r.follow_symlinks} for r in seen.values()]
    )


def from_json(text: object) -> list[Root] | None:
    """The roots in a ``daemon.roots`` value, or None when none were recorded (or the value is unreadable)."""
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
            roots.append(Root(item))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            depth = item.get("max_depth")
            roots.append(
                Root(
                    item["path"],
                    max_depth=depth if isinstance(depth, int) and not isinstance(depth, bool) else 8,
                    follow_symlinks=item.get("follow_symlinks") is True,
                )
            )
        else:
            return None
    return roots


def recorded(conn: sqlite3.Connection) -> list[Root] | None:
    """The roots recorded in the database, or None."""
    row = conn.execute("SELECT roots FROM daemon WHERE id = 1").fetchone()
    return None if row is None else from_json(row[0])


def record(conn: sqlite3.Connection, roots: list[Root]) -> None:
    """Add *roots* (resolved paths) to those recorded, in the writer's connection."""
    known = recorded(conn) or []
    merged = to_json([*known, *roots])
    if merged == to_json(known):
        return
    conn.execute(
        "INSERT INTO daemon (id, roots) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET roots = excluded.roots",
        (merged,),
    )
