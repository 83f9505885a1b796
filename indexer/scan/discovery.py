"""Finding layouts below the roots: the walk, the directory cache it lists through, and which stored
layouts are gone.

Standard library only (the walk of the no-change proof, :mod:`indexer.scan.proof`, is this one);
:func:`discover_through` alone runs on the event loop, for a pass.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time

from indexer._statx import mount_of
from indexer.store import state
from indexer.store.read import mount_members, remounted, settles_at

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Mapping

    from indexer.config import Config, Root
    from indexer.store.writer import Store

LAYOUT_MARKERS = ("oci-layout", "index.json")


if TYPE_CHECKING:
    # A listing as the directory cache keeps it: (dev, ino, mtime_ns, ctime_ns, listed_ns, layout,
    # subdirectory names, symlink names, mount id), the names as NUL-separated bytes (migrations/0005,
    # 0007; the mount id None where the system cannot say).
    Listing = tuple[int, int, int, int, int, int, bytes, bytes, int | None]


def discover(
    root: Root,
    errors: list[str] | None = None,
    cache: Mapping[str, Listing] | None = None,
    listed: dict[str, Listing] | None = None,
    visited: set[str] | None = None,
    failed: dict[str, int] | None = None,
) -> Iterator[str]:
    """Yield the resolved path of every layout below *root* (never inside ``blobs/``).

    With *cache* (the directory cache, :func:`load_cache`), a directory whose identity is the one
    stored with its listing, settled when it was listed, is not listed again. Every directory
    listed now goes into *listed*, for :func:`indexer.store.state.record_listings` (a directory that did not settle too:
    its next listing may), and every directory walked into *visited*.

    A directory that could not be looked at for a reason other than its absence (a permission,
    descriptors used up, an I/O error) goes into *failed* with the errno: nothing is known of what
    is below it, so nothing stored below it may be taken as gone (:func:`vanished`). A listing
    in which the type of an entry could not be learnt is not recorded in *listed* (it is no proof),
    and the entry goes into *failed*.
    """
    top = os.path.realpath(root.path)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, int]] = [(top, 0)]
    pop, push, extend, stat_of, is_dir = stack.pop, stack.append, stack.extend, os.stat, stat.S_ISDIR
    cached = cache.get if cache is not None else None
    max_depth = root.max_depth
    unknown = failed if failed is not None else {}
    while stack:
        directory, depth = pop()
        try:
            st = stat_of(directory)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                unknown[directory] = exc.errno or 0
            if errors is not None and (directory == top or exc.errno not in _ABSENT):
                errors.append(f"{'root ' if directory == top else ''}{directory}: {exc.strerror}")
            continue
        if not is_dir(st.st_mode):
            if errors is not None and directory == top:
                errors.append(f"root {top} is not a directory")
            continue
        here = (st.st_dev, st.st_ino)
        if here in seen:
            continue
        seen.add(here)
        if visited is not None:
            visited.add(directory)
        known = cached(directory) if cached is not None else None
        if (
            known is not None
            and known[2] == st.st_mtime_ns
            and known[3] == st.st_ctime_ns
            and known[1] == st.st_ino
            and known[0] == st.st_dev
            and _settled(known)
        ):
            is_layout = bool(known[5])
            subdirs, links = _names(known[6]), _names(known[7])
        else:
            listed_ns = time.time_ns()
            try:
                with os.scandir(directory) as it:
                    listing = list(it)
            except OSError as exc:
                if exc.errno not in _ABSENT:  # gone since its parent was listed: nothing below it
                    unknown[directory] = exc.errno or 0
                    if errors is not None:
                        errors.append(f"{directory}: {exc.strerror}")
                continue
            names = {e.name for e in listing}
            is_layout = any(marker in names for marker in LAYOUT_MARKERS)
            subdirs, links = [], []
            whole = True
            for item in listing:
                if is_layout and item.name == "blobs":
                    continue  # the layout's own content store; any other "blobs" is an ordinary directory
                try:
                    if item.is_symlink():
                        links.append(item.name)
                    elif item.is_dir(follow_symlinks=False):
                        subdirs.append(item.name)
                except OSError as exc:
                    if exc.errno not in _ABSENT:  # its type unknown (no d_type, and lstat failed)
                        whole = False
                        unknown[item.path] = exc.errno or 0
                        if errors is not None:
                            errors.append(f"{item.path}: {exc.strerror}")
            if listed is not None and whole:
                mount = mount_of(directory)
                listed[directory] = (
                    st.st_dev,
                    st.st_ino,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    listed_ns,
                    int(is_layout),
                    b"\0".join(map(os.fsencode, subdirs)),
                    b"\0".join(map(os.fsencode, links)),
                    mount[1] if mount is not None and mount[0] == st.st_dev else None,
                )
        if is_layout:
            yield directory
        if depth >= max_depth:
            continue
        for target in _entered(directory, links, top, root.follow_symlinks, unknown):
            push((target, depth + 1))
        if subdirs:
            prefix = directory if directory.endswith("/") else directory + "/"  # os.path.join, without its cost
            extend([(prefix + name, depth + 1) for name in subdirs])


# What a failed stat or listing may say about a path: it is not there (no longer, or a file took a
# directory's place). Any other failure (EACCES, EMFILE, EIO, ...) says nothing about what is below it.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR})


def _settled(known: Listing) -> bool:
    """Whether a cached listing proves the directory's entries: it was made a racy window after the
    directory last changed (the rule ``index.json`` identities follow, ``settles_at``)."""
    return settles_at(known[2], known[3], known[4], None) <= known[4]


def _names(joined: bytes) -> list[str]:
    """The names a cached listing holds NUL-separated (none for empty bytes). One decode for all:
    NUL is ASCII, so it splits the decoded text where it split the bytes."""
    return os.fsdecode(joined).split("\0") if joined else []


def _entered(
    directory: str, links: Iterable[str], top: str, follow: bool, failed: dict[str, int] | None = None
) -> Iterator[str]:
    """The directories a walk enters through the symlinks *links* of *directory*: each resolved
    anew (its target may change without the directory changing), and only inside the root *top*
    unless the root follows symlinks out of it. A target that cannot be looked at for a reason other
    than its absence goes into *failed*."""
    for name in links:
        target = os.path.realpath(os.path.join(directory, name))
        inside = target == top or target.startswith(top.rstrip("/") + "/")
        if not (follow or inside):
            continue
        try:
            is_directory = stat.S_ISDIR(os.stat(target).st_mode)
        except OSError as exc:
            if failed is not None and exc.errno not in _ABSENT and exc.errno != errno.ELOOP:
                failed[target] = exc.errno or 0  # layouts are stored at their real paths
            continue
        if is_directory:
            yield target


def load_cache(conn: sqlite3.Connection) -> dict[str, Listing]:
    """The directory cache, by directory path (empty when the table is unreadable)."""
    try:
        return state.directory_listings(conn)  # type: ignore[return-value]  # rows of Listing's shape
    except sqlite3.Error:
        return {}


def forget_remounted(cache: dict[str, Listing]) -> dict[str, Listing]:
    """*cache* without the listings made on a mount that is no longer there (read.remounted): a file
    system with identical metadata mounted in its place would pass their identity check."""
    gone = remounted(mount_members(cache, 0, 8), file="")
    if gone:
        for path in [p for p, row in cache.items() if (row[0], row[8]) in gone]:
            del cache[path]
    return cache


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


def vanished(
    stored: Iterable[str],
    present: Collection[str],
    tops: list[str],
    *,
    follow: bool = False,
    failed: Collection[str] = (),
) -> list[str]:
    """Stored layouts that are gone: below a root and not discovered, or elsewhere and no longer a
    layout at all, or (when *follow*: a root follows symlinks) elsewhere and no longer reached.

    A stored layout outside every root got there through a symlink the pass followed, or through
    another scan's roots. Where no root follows symlinks only the latter is possible, and such a
    layout is kept while it is one. Where a root does, a layout outside the roots that this pass
    did not reach was reached through a symlink that is gone, and is dropped (docs/semantics.md).

    Only a listing that succeeded may remove a layout: one at or below a directory of *failed*
    (:func:`discover` could not list it, or not even ``stat`` it, for a reason other than its
    absence) is kept, and so is one outside the roots whose directory cannot be looked at now.
    """
    from indexer.layout import layout_dir_state

    prefixes = [top.rstrip("/") + "/" for top in tops]
    unknown = set(failed)
    return [
        path
        for path in stored
        if path not in present
        and not (unknown and below_any(path, unknown))
        and (follow or any(path == p[:-1] or path.startswith(p) for p in prefixes) or layout_dir_state(path) is False)
    ]


def below_any(path: str, directories: Collection[str]) -> bool:
    """Whether *path* is one of *directories* or below one (one lookup per component of *path*)."""
    here = path
    while True:
        if here in directories:
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent


async def discover_through(
    store: Store, roots: Iterable[Root]
) -> tuple[list[str], list[str], list[str], dict[str, int]]:
    """Every layout below *roots*, the problems met on the way, the roots resolved, and the
    directories that could not be listed (with the errno): nothing below them is known. A pass's
    walk, through the store (:class:`~indexer.store.writer.Store`), on the event loop.

    The walk lists only the directories the directory cache does not hold as they are, and
    records what it listed (:func:`discover`, migrations/0005).
    """
    import anyio.to_thread

    roots = list(roots)
    cache = await store.read(load_cache)
    listed: dict[str, Listing] = {}
    visited: set[str] = set()
    failed: dict[str, int] = {}

    def walk() -> tuple[list[str], list[str], list[str]]:
        errors: list[str] = []
        found: dict[str, None] = {}
        for root in roots:
            for path in discover(root, errors, cache, listed, visited, failed):
                found[path] = None
        return list(found), errors, [os.path.realpath(r.path) for r in roots]

    paths, errors, resolved = await anyio.to_thread.run_sync(walk)
    await store.unit(state.record_listings, listed, visited, resolved, cache.keys())
    return paths, errors, resolved, failed
