"""Finding layouts below the roots, and the re-scan that proves nothing changed.

Standard library only: ``ocidx scan`` first runs :func:`settled`, which needs no event loop,
and imports the async scanner (anyio, asyncio: about 30 ms) only when something did change.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time

from indexer.layout import FileIdentity
from indexer.store.read import settles_at

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Mapping

    from indexer.config import Config, Root
    from indexer.store.read import StoredLayout

LAYOUT_MARKERS = ("oci-layout", "index.json")


if TYPE_CHECKING:
    # A listing as the directory cache keeps it: (dev, ino, mtime_ns, ctime_ns, listed_ns, layout,
    # subdirectory names, symlink names), the names as NUL-separated bytes (migrations/0005).
    Listing = tuple[int, int, int, int, int, int, bytes, bytes]


def discover(
    root: Root,
    errors: list[str] | None = None,
    cache: Mapping[str, Listing] | None = None,
    listed: dict[str, Listing] | None = None,
) -> Iterator[str]:
    """Yield the resolved path of every layout below *root* (never inside ``blobs/``).

    With *cache* (the directory cache, :func:`load_cache`), a directory whose identity is the one
    stored with its listing, settled when it was listed, is not listed again. Every directory
    listed now goes into *listed*, for :func:`store_cache` (a directory that did not settle too:
    its next listing may).
    """
    top = os.path.realpath(root.path)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, int]] = [(top, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            st = os.stat(directory)
        except OSError as exc:
            if errors is not None and directory == top:
                errors.append(f"root {top}: {exc.strerror}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            if errors is not None and directory == top:
                errors.append(f"root {top} is not a directory")
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        known = cache.get(directory) if cache is not None else None
        if (
            known is not None
            and known[0] == st.st_dev
            and known[1] == st.st_ino
            and known[2] == st.st_mtime_ns
            and known[3] == st.st_ctime_ns
            and settles_at(known[2], known[3], known[4], None) <= known[4]
        ):
            is_layout = bool(known[5])
            subdirs = [os.fsdecode(n) for n in known[6].split(b"\0")] if known[6] else []
            links = [os.fsdecode(n) for n in known[7].split(b"\0")] if known[7] else []
        else:
            listed_ns = time.time_ns()
            try:
                with os.scandir(directory) as it:
                    listing = list(it)
            except OSError as exc:
                if errors is not None:
                    errors.append(f"{directory}: {exc.strerror}")
                continue
            names = {e.name for e in listing}
            is_layout = any(marker in names for marker in LAYOUT_MARKERS)
            subdirs, links = [], []
            for item in listing:
                if item.name == "blobs":
                    continue
                try:
                    if item.is_symlink():
                        links.append(item.name)
                    elif item.is_dir(follow_symlinks=False):
                        subdirs.append(item.name)
                except OSError:
                    continue
            if listed is not None:
                listed[directory] = (
                    st.st_dev,
                    st.st_ino,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    listed_ns,
                    int(is_layout),
                    b"\0".join(map(os.fsencode, subdirs)),
                    b"\0".join(map(os.fsencode, links)),
                )
        if is_layout:
            yield directory
        if depth >= root.max_depth:
            continue
        for name in links:
            try:
                target = os.path.realpath(os.path.join(directory, name))
                inside = target == top or target.startswith(top.rstrip("/") + "/")
                if not (root.follow_symlinks or inside) or not os.path.isdir(target):
                    continue
                stack.append((target, depth + 1))
            except OSError:
                continue
        stack.extend((os.path.join(directory, name), depth + 1) for name in subdirs)


def load_cache(conn: sqlite3.Connection) -> dict[str, Listing]:
    """The directory cache, by directory path (empty when the table is unreadable)."""
    from indexer.store import path_of

    try:
        return {
            path_of(row[0]): row[1:]
            for row in conn.execute(
                "SELECT path, dev, ino, mtime_ns, ctime_ns, listed_ns, layout, subdirs, links FROM directories"
            )
        }
    except sqlite3.Error:
        return {}


def store_cache(
    conn: sqlite3.Connection, listed: Mapping[str, Listing], visited_under: Collection[str], cached: Collection[str]
) -> None:
    """Record the directories listed by a walk, and forget cached ones below *visited_under* (the walk's
    resolved roots) that the walk no longer reached (removed, or no longer below a root's depth)."""
    from indexer.store import path_value

    prefixes = [top.rstrip("/") + "/" for top in visited_under]
    forget = [
        (path_value(path),)
        for path in cached
        if path not in listed and any(path == p[:-1] or path.startswith(p) for p in prefixes)
    ]
    if not listed and not forget:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("DELETE FROM directories WHERE path = ?", forget)
        conn.executemany(
            "INSERT OR REPLACE INTO directories VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(path_value(path), *row) for path, row in listed.items()],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def roots_for(config: Config, extra: Iterable[str]) -> list[Root]:
    """The config's ``[[roots]]`` plus roots named on the command line (relative to the cwd)."""
    from indexer.config import Root

    return [*config.roots, *(Root(os.path.abspath(path)) for path in extra)]


def vanished(stored: Iterable[str], present: Collection[str], tops: list[str]) -> list[str]:
    """Stored layouts that are gone: below a root and not discovered, or elsewhere (reached through
    a followed symlink, or by another scan's roots) and no longer a layout at all."""
    from indexer.layout import is_layout_dir

    prefixes = [top.rstrip("/") + "/" for top in tops]
    return [
        path
        for path in stored
        if path not in present
        and (any(path == p[:-1] or path.startswith(p) for p in prefixes) or not is_layout_dir(path))
    ]


def changes(
    stored: Mapping[str, StoredLayout], roots: list[Root], cache: Mapping[str, Listing] | None = None
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Compare *stored* with the layouts below *roots* by one walk (listing only the directories that
    *cache* does not hold as they are) and one ``stat`` per ``index.json``:
    ``(layouts present, new or changed, stored ones that vanished, problems met)``."""
    errors: list[str] = []
    found: dict[str, None] = {}
    for root in roots:
        for path in discover(root, errors, cache):
            found[path] = None
    present = list(found)
    gone = vanished(stored, found.keys(), [os.path.realpath(r.path) for r in roots])
    changed = []
    for path in present:
        known = stored.get(path)
        try:
            st = os.stat(os.path.join(path, "index.json"))
        except OSError:
            changed.append(path)  # a layout without a readable index.json: the full read says why
            continue
        if known is None or not known.is_current(FileIdentity.of(st)):
            changed.append(path)
    return present, changed, gone, errors


def settled(db_path: str, roots: list[Root]) -> tuple[int, int] | None:
    """``(layouts, still broken)`` when the index provably holds every layout below *roots* as it is
    on disk (nothing to write), else None: one listing walk and one ``stat`` per ``index.json``."""
    from indexer.errors import DatabaseError
    from indexer.store import open_reader
    from indexer.store import read as db

    try:
        conn = open_reader(db_path)
    except DatabaseError:
        return None  # no database yet, or one to migrate: the full pass deals with it
    try:
        stored = {s.path: s for s in db.layouts(conn)}
        cache = load_cache(conn)
    except sqlite3.Error:
        return None  # a damaged database: the full pass reports it (exit 4)
    finally:
        conn.close()
    present, changed, gone, errors = changes(stored, roots, cache)
    if errors or changed or gone:
        return None  # the full pass writes the changes and reports the problems
    return len(present), sum(stored[path].state != "ok" for path in present)
