"""What the index knows besides the layouts' rows: the ``daemon`` row, the roots, the directory
cache and the layouts' stored identities the walk compares, and the racy re-checks, status and
counts read from the layouts table.

Everything here is schema knowledge for the writer's units (functions ``fn(conn, ...)`` run by
:meth:`indexer.store.writer.Store.unit`) and for readers (``find``, ``status``, the daemon's
reads). Standard library only: ``find`` and ``status`` read it on the lookup path.

The roots the index was built from are recorded in the ``daemon`` row so that ``find`` knows them.

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
import os
import sqlite3
import time

from indexer.config import Root
from indexer.store import path_of, path_value
from indexer.store.read import RACY_SQL, SETTLES_AT_SQL, retries

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping


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


def watched(conn: sqlite3.Connection) -> list[Root]:
    """The recorded roots the daemon watches."""
    return [root for root, watched in _entries(conn) or [] if watched]


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


# -- the daemon row ---------------------------------------------------------------------------------


def record_start(conn: sqlite3.Connection, *, pid: int, now_ns: int, mode: str, roots: list[Root]) -> None:
    """A unit: the daemon *pid* starts, watching *roots* (the layouts of earlier scans stay, and so do their roots)."""
    conn.execute(
        """
        INSERT INTO daemon (id, pid, started_ns, heartbeat_ns, stopped_ns, watch_mode, roots)
        VALUES (1, ?, ?, ?, NULL, ?, ?)
        ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_ns = excluded.started_ns,
            heartbeat_ns = excluded.heartbeat_ns, stopped_ns = NULL,
            watch_mode = excluded.watch_mode, roots = excluded.roots
        """,
        (pid, now_ns, now_ns, mode, merged(conn, roots, watched=True)),
    )


_DAEMON_COLUMNS = frozenset({"heartbeat_ns", "stopped_ns", "watch_mode", "last_reconcile_ns"})


def update_daemon(conn: sqlite3.Connection, /, *, pid: int, **values: object) -> None:
    """A unit: set columns of the daemon row (heartbeat, stop, watch mode, last reconcile), if the row is
    still daemon *pid*'s (another daemon may have taken the database over: its row is left alone)."""
    unknown = set(values) - _DAEMON_COLUMNS
    if unknown:
        raise ValueError(f"not a column of the daemon row: {', '.join(sorted(unknown))}")
    columns = ", ".join(f"{name} = ?" for name in values)
    conn.execute(f"UPDATE daemon SET {columns} WHERE id = 1 AND pid = ?", (*values.values(), pid))


def record_watched(conn: sqlite3.Connection, roots: list[Root]) -> None:
    """A unit: the daemon watches *roots* (and no other recorded root) from now on."""
    conn.execute("UPDATE daemon SET roots = ? WHERE id = 1", (merged(conn, roots, watched=True),))


class DaemonRow:
    """The daemon row as ``find`` and ``status`` read it."""

    __slots__ = ("heartbeat_ns", "last_reconcile_ns", "pid", "started_ns", "stopped_ns", "watch_mode")

    def __init__(self, row: tuple[object, ...]) -> None:
        pid, started, heartbeat, stopped, reconcile, mode = row
        self.pid = pid if isinstance(pid, int) else None
        self.started_ns = started if isinstance(started, int) else None
        self.heartbeat_ns = heartbeat if isinstance(heartbeat, int) else None
        self.stopped_ns = stopped if isinstance(stopped, int) else None
        self.last_reconcile_ns = reconcile if isinstance(reconcile, int) else None
        self.watch_mode = mode if isinstance(mode, str) else None

    def running(self) -> bool:
        """Not stopped, and its process alive."""
        return self.stopped_ns is None and _pid_alive(self.pid)


def daemon_row(conn: sqlite3.Connection) -> DaemonRow | None:
    """The daemon row, or None when no daemon ever ran on this index (a row of scans' roots only)."""
    row = conn.execute(
        "SELECT pid, started_ns, heartbeat_ns, stopped_ns, last_reconcile_ns, watch_mode FROM daemon WHERE id = 1"
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return DaemonRow(row)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- layouts the daemon looks at again ---------------------------------------------------------------


def racy_layouts(conn: sqlite3.Connection, paths: list[str] | None = None) -> dict[str, int]:
    """Layouts (all, or those at *paths*) whose stored identity is racily clean, and when (wall clock,
    ns) a read will settle it (``read.settles_at``)."""
    # The listing of a layout's blobs/ settles the same way (the content graph's presence): a layout is
    # due once both its index.json and that listing are proven.
    query = (
        f"SELECT path, max({SETTLES_AT_SQL}, coalesce(blobs_settles_ns, 0)) FROM layouts "
        f"WHERE dev IS NOT NULL AND read_ns IS NOT NULL "
        f"AND ({RACY_SQL} OR coalesce(blobs_settles_ns > blobs_listed_ns, 0))"
    )
    found: dict[str, int] = {}
    chunks: list[list[str] | None] = [None]
    if paths is not None:
        chunks = [paths[i : i + 500] for i in range(0, len(paths), 500)]
    for chunk in chunks:
        if chunk is None:
            rows = conn.execute(query)
        else:
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"{query} AND path IN ({marks})", tuple(map(path_value, chunk)))
        found.update((path_of(path), settles_at) for path, settles_at in rows)
    found.update(retries(conn, paths))  # reads that failed for the environment's sake: after their backoff
    return found


def stored_under(conn: sqlite3.Connection, trees: list[str]) -> list[str]:
    """Stored layouts at or below each of *trees*, by range scans of the path index.

    ``layouts.path`` holds text for UTF-8 paths and raw bytes (a BLOB) for the others
    (``store.path_value``), and SQLite orders every TEXT before every BLOB: below a tree, the
    UTF-8 paths are one text range and the others one byte range (bytewise, as text compares).
    """
    found: list[str] = []
    for tree in trees:
        raw = os.fsencode(tree.rstrip("/") or "/")
        prefix = raw.rstrip(b"/") + b"/"
        ranges: list[tuple[str | bytes, str | bytes, str | bytes]] = [(raw, prefix, prefix[:-1] + b"0")]
        exact = path_value(tree)
        if isinstance(exact, str):  # a UTF-8 tree: the text paths below it too
            ranges.append((exact, prefix.decode(), prefix[:-1].decode() + "0"))
        for equal, low, high in ranges:
            rows = conn.execute(
                "SELECT path FROM layouts WHERE path = ? OR (path >= ? AND path < ?)", (equal, low, high)
            )
            found.extend(path_of(row[0]) for row in rows)
    return found


def with_index_file(conn: sqlite3.Connection, files: list[tuple[str, int, int]]) -> list[str]:
    """Stored layouts other than *path* whose ``index.json`` is the file (device, inode) of each
    ``(path, dev, ino)`` in *files*: a hard link shared by several layouts (``layouts_identity``)."""
    found: list[str] = []
    for path, dev, ino in files:
        rows = conn.execute("SELECT path FROM layouts WHERE dev = ? AND ino = ?", (dev, ino))
        found.extend(other for other in map(path_of, (row[0] for row in rows)) if other != path)
    return found


# -- counts -------------------------------------------------------------------------------------------


class Counts:
    """How much the index holds: what ``status`` prints and the daemon's gauges show."""

    __slots__ = ("children", "entries", "errors", "layouts", "names")

    def __init__(self, *, layouts: int, entries: int, names: int, children: int, errors: int) -> None:
        self.layouts = layouts
        self.entries = entries
        self.names = names
        self.children = children
        self.errors = errors

    def plus(self, other: Counts) -> Counts:
        """These counts and *other*'s."""
        return Counts(
            layouts=self.layouts + other.layouts,
            entries=self.entries + other.entries,
            names=self.names + other.names,
            children=self.children + other.children,
            errors=self.errors + other.errors,
        )

    def minus(self, other: Counts) -> Counts:
        """These counts without *other*'s."""
        return Counts(
            layouts=self.layouts - other.layouts,
            entries=self.entries - other.entries,
            names=self.names - other.names,
            children=self.children - other.children,
            errors=self.errors - other.errors,
        )


def layout_counts(conn: sqlite3.Connection, layout_id: int, *, error: bool) -> Counts:
    """One layout's share of :func:`counts` (*error*: its state is an error)."""
    entries = conn.execute("SELECT count(*) FROM entries WHERE layout_id = ?", (layout_id,)).fetchone()[0]
    names = conn.execute("SELECT count(*) FROM names WHERE layout_id = ?", (layout_id,)).fetchone()[0]
    children = conn.execute("SELECT count(*) FROM children WHERE layout_id = ?", (layout_id,)).fetchone()[0]
    return Counts(layouts=1, entries=entries, names=names, children=children, errors=int(error))


def counts(conn: sqlite3.Connection, *, rows: bool = True) -> Counts:
    """The index's counts; *rows* False counts from the layouts table alone (what the daemon's gauges
    need after every pass: layouts, errors, and entries as each layout's count of them)."""
    layouts, errors, entries = conn.execute(
        "SELECT count(*), coalesce(sum(state = 'error'), 0), coalesce(sum(entry_count), 0) FROM layouts"
    ).fetchone()
    names = children = 0
    if rows:
        entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        names = conn.execute("SELECT count(*) FROM names").fetchone()[0]
        children = conn.execute("SELECT count(*) FROM children").fetchone()[0]
    return Counts(layouts=layouts, entries=entries, names=names, children=children, errors=errors)


def fleet_status(conn: sqlite3.Connection, now_ns: int | None = None) -> dict[str, object] | None:
    """The fleet publisher's state on a publishing host (``status``'s ``fleet``), or None."""
    row = conn.execute("SELECT host, state, since_ns, watermark, published_ns FROM fleet_publisher").fetchone()
    if row is None:
        return None
    now = time.time_ns() if now_ns is None else now_ns
    host, state, since, watermark, published = row
    backlog = (
        conn.execute("SELECT count(*) FROM layouts WHERE version > ?", (watermark,)).fetchone()[0]
        + conn.execute("SELECT count(*) FROM layout_removals WHERE version > ?", (watermark,)).fetchone()[0]
    )
    return {
        "host": host,
        "connected": state == "connected",
        "state": state,
        "state_age_s": round((now - since) / 1e9, 3),
        "backlog": backlog,
        "last_published_age_s": None if published is None else round((now - published) / 1e9, 3),
    }


def record_publisher(
    conn: sqlite3.Connection, *, host: str | None, state: str, now_ns: int, watermark: int, published: bool
) -> None:
    """A unit: the fleet publisher's state (``status``'s ``fleet``): the host it publishes as (kept when
    not known yet), its state and since when, its watermark, and when it last published."""
    conn.execute(
        "INSERT INTO fleet_publisher (id, host, state, since_ns, watermark, published_ns) "
        "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET host = coalesce(excluded.host, host), "
        "state = excluded.state, "
        "since_ns = CASE WHEN state = excluded.state THEN since_ns ELSE excluded.since_ns END, "
        "watermark = excluded.watermark, published_ns = coalesce(excluded.published_ns, published_ns)",
        (host, state, now_ns, watermark, now_ns if published else None),
    )


def forget_fleet(conn: sqlite3.Connection) -> None:
    """A unit: no fleet publishes this index (so ``status`` shows no stale fleet state)."""
    conn.execute("DELETE FROM fleet_publisher")


# -- what the walk of the layouts compares (indexer/scan/discovery.py, indexer/scan/proof.py) ---------

# Each stored layout's identities as one row to compare with stat's (scan/proof.py's Identity): the
# path, whether it is broken, whether it can prove nothing (its index.json racily clean or never read,
# RACY_SQL; in state ok, its blobs/ never listed or listed racily), then index.json's (dev, ino, size,
# mtime_ns, ctime_ns), the blobs/ directories' identities, what the rows depend on besides, and the
# mount id index.json was read on. A broken layout is proven by its index.json alone: until that
# changes, nothing of it is read again.
_IDENTITIES_SQL = (
    f"SELECT path, state != 'ok', coalesce({RACY_SQL} "
    "OR (state = 'ok' AND (blobs_dir IS NULL OR blobs_settles_ns > blobs_listed_ns)), 1), "
    "dev, ino, size, mtime_ns, ctime_ns, blobs_dir, blobs_dev, blobs_ino, blobs_mtime_ns, blobs_ctime_ns, "
    "blobs_more, depends, mnt_id FROM layouts"
)


def layout_identities(conn: sqlite3.Connection) -> dict[str, tuple[object, ...]]:
    """Every stored layout's identities as one plain row (:data:`_IDENTITIES_SQL`), by path."""
    return {path_of(row[0]): row for row in conn.execute(_IDENTITIES_SQL)}


def directory_listings(conn: sqlite3.Connection) -> dict[str, tuple[object, ...]]:
    """The directory cache, by directory path: (dev, ino, mtime_ns, ctime_ns, listed_ns, layout,
    subdirectory names, symlink names, mount id) per directory."""
    return {
        path_of(row[0]): row[1:]
        for row in conn.execute(
            "SELECT path, dev, ino, mtime_ns, ctime_ns, listed_ns, layout, subdirs, links, mnt_id FROM directories"
        )
    }


def record_listings(
    conn: sqlite3.Connection,
    listed: Mapping[str, tuple[object, ...]],
    visited: Collection[str],
    tops: Collection[str],
    cached: Collection[str],
) -> None:
    """A unit of the writer: record the directories a walk listed, and forget the cached ones below
    *tops* (the walk's resolved roots) that it did not walk (removed, or no longer within a root's depth)."""
    prefixes = [top.rstrip("/") + "/" for top in tops]
    forget = [
        (path_value(path),)
        for path in cached
        if path not in visited and any(path == p[:-1] or path.startswith(p) for p in prefixes)
    ]
    if not listed and not forget:
        return
    conn.executemany("DELETE FROM directories WHERE path = ?", forget)
    conn.executemany(
        "INSERT OR REPLACE INTO directories VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(path_value(path), *row) for path, row in listed.items()],
    )
