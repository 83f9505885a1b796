"""Finding layouts below the roots, and the re-scan that proves nothing changed.

Standard library only: ``ocidx scan`` first runs :func:`settled`, which needs no event loop,
and imports the async scanner (anyio, asyncio: about 30 ms) only when something did change.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from indexer.layout import FileIdentity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Mapping

    from indexer.config import Config, Root
    from indexer.store.read import StoredLayout

LAYOUT_MARKERS = ("oci-layout", "index.json")


def discover(root: Root, errors: list[str] | None = None) -> Iterator[str]:
    """Yield the resolved path of every layout below *root* (never inside ``blobs/``)."""
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
        try:
            with os.scandir(directory) as it:
                listing = list(it)
        except OSError as exc:
            if errors is not None:
                errors.append(f"{directory}: {exc.strerror}")
            continue
        names = {e.name for e in listing}
        is_layout = any(marker in names for marker in LAYOUT_MARKERS)
        if is_layout:
            yield directory
        if depth >= root.max_depth:
            continue
        for item in listing:
            if is_layout and item.name == "blobs":
                continue  # the layout's own content store; any other "blobs" is an ordinary directory
            try:
                if item.is_symlink():
                    target = os.path.realpath(item.path)
                    inside = target == top or target.startswith(top.rstrip("/") + "/")
                    if not (root.follow_symlinks or inside) or not os.path.isdir(target):
                        continue
                    stack.append((target, depth + 1))
                elif item.is_dir(follow_symlinks=False):
                    stack.append((item.path, depth + 1))
            except OSError:
                continue


def in_layout_blobs(top: str, parts: list[str]) -> bool:
    """Whether the directory *top*/*parts* is inside a layout's own ``blobs/`` (no layout is looked for there).

    One ``lexists`` per ``blobs`` component of the path: a directory named ``blobs`` is a layout's
    content store only when the directory holding it is a layout.
    """
    for i, part in enumerate(parts):
        if part == "blobs":
            parent = os.path.join(top, *parts[:i])
            if any(os.path.lexists(os.path.join(parent, marker)) for marker in LAYOUT_MARKERS):
                return True
    return False


def roots_for(config: Config, extra: Iterable[str]) -> list[Root]:
    """The config's ``[[roots]]`` plus roots named on the command line (relative to the cwd)."""
    from indexer.config import Root

    return [*config.roots, *(Root(os.path.abspath(path)) for path in extra)]


def vanished(stored: Iterable[str], present: Collection[str], tops: list[str], *, follow: bool = False) -> list[str]:
    """Stored layouts that are gone: below a root and not discovered, or elsewhere and no longer a
    layout at all, or (when *follow*: a root follows symlinks) elsewhere and no longer reached.

    A stored layout outside every root got there through a symlink the pass followed, or through
    another scan's roots. Where no root follows symlinks only the latter is possible, and such a
    layout is kept while it is one. Where a root does, a layout outside the roots that this pass
    did not reach was reached through a symlink that is gone, and is dropped (docs/semantics.md).
    """
    from indexer.layout import is_layout_dir

    prefixes = [top.rstrip("/") + "/" for top in tops]
    return [
        path
        for path in stored
        if path not in present
        and (follow or any(path == p[:-1] or path.startswith(p) for p in prefixes) or not is_layout_dir(path))
    ]


def changes(stored: Mapping[str, StoredLayout], roots: list[Root]) -> tuple[list[str], list[str], list[str], list[str]]:
    """Compare *stored* with the layouts below *roots* by one listing walk and one ``stat`` per
    ``index.json``: ``(layouts present, new or changed, stored ones that vanished, problems met)``."""
    errors: list[str] = []
    found: dict[str, None] = {}
    for root in roots:
        for path in discover(root, errors):
            found[path] = None
    present = list(found)
    follow = any(r.follow_symlinks for r in roots)
    gone = vanished(stored, found.keys(), [os.path.realpath(r.path) for r in roots], follow=follow)
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
    except sqlite3.Error:
        return None  # a damaged database: the full pass reports it (exit 4)
    finally:
        conn.close()
    present, changed, gone, errors = changes(stored, roots)
    if errors or changed or gone:
        return None  # the full pass writes the changes and reports the problems
    return len(present), sum(stored[path].state != "ok" for path in present)
