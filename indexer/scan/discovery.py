"""Finding layouts below the roots, and the re-scan that proves nothing changed.

Standard library only: ``ocidx scan`` first runs :func:`settled`, which needs no event loop,
and imports the async scanner (anyio, asyncio: about 30 ms) only when something did change.
"""

from __future__ import annotations

import errno
import gc
import os
import sqlite3
import stat
import time

from indexer._statx import mount_of
from indexer.store.read import RACY_SQL, depends_hold, mount_members, presence_differs, remounted, settles_at

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
    from typing import NoReturn, TypeVar

    from indexer.config import Config, Root

    T = TypeVar("T")
    R = TypeVar("R")

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
    listed now goes into *listed*, for :func:`store_cache` (a directory that did not settle too:
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
    from indexer.store import path_of

    try:
        return {
            path_of(row[0]): row[1:]
            for row in conn.execute(
                "SELECT path, dev, ino, mtime_ns, ctime_ns, listed_ns, layout, subdirs, links, mnt_id FROM directories"
            )
        }
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


def store_cache(
    conn: sqlite3.Connection,
    listed: Mapping[str, Listing],
    visited: Collection[str],
    tops: Collection[str],
    cached: Collection[str],
) -> None:
    """A unit of the writer: record the directories listed by a walk, and forget cached ones below
    *tops* (the walk's resolved roots) that it did not walk (removed, or no longer within a root's depth)."""
    from indexer.store import path_value

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


if TYPE_CHECKING:
    # What the walk compares with one layout's stat (:func:`stored_identities`): (path value, broken,
    # no proof (racily clean, or never read), dev, ino, size, mtime_ns, ctime_ns) of index.json, then the
    # directories of blobs/ its graph was listed from: (name, dev, ino, mtime_ns, ctime_ns, more), then
    # what the rows depend on besides (read.encode_depends) and the mount id index.json was read on.
    Identity = tuple[
        object, int, int, int, int, int, int, int, str, int, int, int, int, str | None, str | None, int | None
    ]

# A row that can prove nothing (its index.json racily clean or never read, read.RACY_SQL; in state ok,
# its blobs/ never listed or listed racily) says so in one column, and each row's identities come as
# one tuple to compare with stat's. A broken layout is proven by its index.json alone: until that
# changes, nothing of it is read again.
_IDENTITIES_SQL = (
    f"SELECT path, state != 'ok', coalesce({RACY_SQL} "
    "OR (state = 'ok' AND (blobs_dir IS NULL OR blobs_settles_ns > blobs_listed_ns)), 1), "
    "dev, ino, size, mtime_ns, ctime_ns, blobs_dir, blobs_dev, blobs_ino, blobs_mtime_ns, blobs_ctime_ns, "
    "blobs_more, depends, mnt_id FROM layouts"
)


def stored_identities(conn: sqlite3.Connection) -> dict[str, Identity]:
    """Every stored layout's ``index.json`` identity as plain rows, by path, for :func:`changes`:
    building a record per layout and comparing them field by field was a third of a 10,000-layout walk."""
    from indexer.store import path_of

    return {path_of(row[0]): row for row in conn.execute(_IDENTITIES_SQL)}


def changes(
    conn: sqlite3.Connection, roots: list[Root], processes: int = 0
) -> tuple[list[str], list[str], list[str], list[str], dict[str, Identity]]:
    """Compare the layouts stored in *conn* with those below *roots* by one walk (listing only the
    directories the directory cache does not hold as they are) and one ``stat`` per ``index.json``:
    ``(layouts present, new or changed or racily clean, stored ones that vanished, problems met,
    the stored identities)``. A stored layout below a directory the walk could not list is among
    the changed (it is to be looked at again), never among the vanished.

    When the cache holds a settled listing of every directory the walk would reach, the walk is
    planned from the cache alone (:func:`_planned_walk`) and its ``stat`` calls, of each directory
    and each ``index.json``, are shared among *processes* (``[daemon] workers``: 0 for one per
    core, 1 for this process alone; :func:`_checked`). One directory that is not as cached sends
    the whole comparison to the walk of :func:`discover`, so the answer is the same either way.

    The cyclic collector is paused meanwhile: the walk holds a row per layout and directory and
    makes no cycle, and the collector's passes over those rows cost 7% of a no-change ``ocidx
    scan`` of 50,000 layouts (0.61 s against 0.57 s, median of 7).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        stored = stored_identities(conn)
        cache = forget_remounted(load_cache(conn))
        errors: list[str] = []
        found: dict[str, None] = {}
        changed: list[str] | None = None
        plans = [_planned_walk(root, cache) for root in roots]
        if all(plan is not None for plan in plans):
            directories: list[tuple[str, Listing]] = []
            for plan in plans:
                assert plan is not None
                found.update(dict.fromkeys(plan[0]))
                directories.extend(plan[1])
            changed = _checked(directories, list(found), stored, processes)
        failed: dict[str, int] = {}
        if changed is None:  # a directory is not as cached: walk, listing what changed
            found.clear()
            for root in roots:
                for path in discover(root, errors, cache, failed=failed):
                    found[path] = None
            changed = [path for path in found if _differs(path, stored.get(path))]
            if failed:
                changed.extend(path for path in stored if path not in found and below_any(path, failed))
        # Each mount the stored rows were read on is asked once whether it is still there: a file
        # system with identical metadata mounted in its place passes every stat (indexer._statx).
        moved = remounted(mount_members(stored, 3, 15))
        if moved:
            listed = set(changed)
            changed.extend(p for p in found if p not in listed and (k := stored.get(p)) and (k[3], k[15]) in moved)
        present = list(found)
        follow = any(r.follow_symlinks for r in roots)
        tops = [os.path.realpath(r.path) for r in roots]
        gone = vanished(stored, found.keys(), tops, follow=follow, failed=failed)
        return present, changed, gone, errors, stored
    finally:
        if collecting:
            gc.enable()


def _differs(path: str, known: Identity | None) -> bool:
    """Whether the layout at *path* must be read: never read, racily clean, its ``index.json`` not the
    file stored (or not readable: the full read says why), a directory of its ``blobs/`` not as
    listed for its graph (a blob added or removed), or a nested index blob its rows depend on changed."""
    try:
        st = os.stat(path + "/index.json")  # a resolved layout path: never ends with "/" but for "/"
    except OSError:
        return True
    if (
        known is None
        or known[2]
        or st.st_mtime_ns != known[6]
        or st.st_ctime_ns != known[7]
        or st.st_size != known[5]
        or st.st_ino != known[4]
        or st.st_dev != known[3]
    ):
        return True
    if known[14] is not None and not depends_hold(path, known[14]):
        return True
    if known[1]:
        return False  # a broken layout is proven by its index.json alone
    if known[13] is not None:
        return presence_differs(path, *known[8:14])
    # The common case inline (one directory of blobs/, blobs/sha256): one more stat per layout.
    try:
        st = os.stat(path + "/" + known[8])
    except OSError:
        return presence_differs(path, *known[8:14])  # absent now, or unreadable: the one rule decides
    return st.st_mtime_ns != known[11] or st.st_ctime_ns != known[12] or st.st_ino != known[10] or st.st_dev != known[9]


def _planned_walk(root: Root, cache: Mapping[str, Listing]) -> tuple[list[str], list[tuple[str, Listing]]] | None:
    """The walk :func:`discover` makes of *root* when every directory is as the cache holds it: the
    layouts it yields, in its order, and each directory it would take from the cache with that
    listing; None when it would reach a directory the cache holds no settled listing of.

    Symbolic links are resolved as the walk resolves them; nothing else is looked at on disk: the
    caller proves each directory is as cached (:func:`_checked`) before trusting the plan.
    """
    top = os.path.realpath(root.path)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, int]] = [(top, 0)]
    failed: dict[str, int] = {}
    layouts: list[str] = []
    directories: list[tuple[str, Listing]] = []
    pop, push, extend, cached = stack.pop, stack.append, stack.extend, cache.get
    max_depth = root.max_depth
    while stack:
        directory, depth = pop()
        known = cached(directory)
        if known is None or not _settled(known):
            return None
        # Proven like every other: a path skipped as a directory already walked is one only if its
        # cached identity is its identity now (an entry out of date could name another's inode).
        directories.append((directory, known))
        here = (known[0], known[1])
        if here in seen:
            continue
        seen.add(here)
        if known[5]:
            layouts.append(directory)
        if depth >= max_depth:
            continue
        if known[7]:
            for target in _entered(directory, _names(known[7]), top, root.follow_symlinks, failed):
                push((target, depth + 1))
            if failed:
                return None  # a symlink's target cannot be looked at: the walk says what is known
        if known[6]:
            prefix = directory if directory.endswith("/") else directory + "/"
            extend([(prefix + name, depth + 1) for name in _names(known[6])])
    return layouts, directories


# Below this many stat calls (about 10 ms of them), none is shared: a forked process costs about 2 ms.
PARALLEL_MIN_STATS = 4096


def _checked(
    directories: list[tuple[str, Listing]], layouts: list[str], stored: Mapping[str, Identity], processes: int = 0
) -> list[str] | None:
    """The layouts of a planned walk that differ from the stored rows (:func:`_differs`), or None when
    a directory of the plan is not as cached. The stat calls are split among *processes* (0: one per
    core this process may run on): forked processes take a share each and send back what they found."""
    from indexer.config import default_workers

    parts = min(processes or default_workers(), max(1, (len(directories) + len(layouts)) // PARALLEL_MIN_STATS))
    # Contiguous shares: a child touches (and so copies on write) only the pages of its own rows.
    cut_d, cut_l = -(-len(directories) // parts), -(-len(layouts) // parts)
    shares = [
        (directories[i * cut_d : (i + 1) * cut_d], range(i * cut_l, min(len(layouts), (i + 1) * cut_l)))
        for i in range(parts)
    ]

    def check(share: tuple[list[tuple[str, Listing]], range]) -> list[int] | None:
        stat_of, is_dir = os.stat, stat.S_ISDIR
        for directory, known in share[0]:
            try:
                st = stat_of(directory)
            except OSError:
                return None
            if not is_dir(st.st_mode) or (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) != known[:4]:
                return None
        get = stored.get
        return [i for i in share[1] if _differs(layouts[i], get(layouts[i]))]

    results = forked(check, shares)
    if any(result is None for result in results):
        return None
    return [layouts[i] for i in sorted(i for result in results if result is not None for i in result)]


def forked(fn: Callable[[T], R], shares: list[T]) -> list[R]:
    """``[fn(share) for share in shares]``, the first share in this process and each other in a
    process forked for it, which sends back its ``marshal``-able result on a pipe.

    Forking is safe only with no other thread (a lock another thread held stays held in the child),
    so a process that has threads (as far as ``threading`` knows them) runs every share itself, as
    it does a share no process could be forked for (a process limit, no memory) and a share whose
    process died or sent nothing whole. Signals are blocked from just before each fork until the
    parent has recorded its child, and stay blocked in the child: no signal handler ever runs there
    (it would raise into the parent's code), and a Ctrl-C leaves no child unreaped. A child only
    computes, writes and exits with ``os._exit`` (no ``atexit`` hook, no buffer the parent would
    flush again, the parent's database connection never touched); it lives as long as its share.
    """
    import marshal
    import signal
    import threading

    if len(shares) < 2 or threading.active_count() > 1 or not hasattr(os, "fork"):
        return [fn(share) for share in shares]
    children: list[tuple[int, int, int]] = []  # (pid, the pipe's read end, the index of its share)
    alone: list[int] = []  # the shares no process could be forked for
    try:
        for index in range(1, len(shares)):
            if alone:
                alone.append(index)
                continue
            try:
                read_end, write_end = os.pipe()
            except OSError:
                alone.append(index)
                continue
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                pid = os.fork()
            except OSError:
                pid = -1
            if pid == 0:
                _child(fn, shares[index], read_end, write_end)
            try:
                os.close(write_end)
                if pid < 0:
                    os.close(read_end)
                    alone.append(index)
                else:
                    children.append((pid, read_end, index))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        results: dict[int, R] = {0: fn(shares[0])}
        for index in alone:
            results[index] = fn(shares[index])
        while children:
            pid, read_end, index = children.pop(0)
            try:
                with open(read_end, "rb", closefd=True) as pipe:
                    data = pipe.read()
            finally:
                _, status = os.waitpid(pid, 0)
            try:
                if status != 0:
                    raise ValueError(status)
                results[index] = marshal.loads(data)
            except (ValueError, EOFError, TypeError):
                results[index] = fn(shares[index])  # the child died or sent nothing whole: done here
        return [results[index] for index in range(len(shares))]
    finally:
        for pid, read_end, _index in children:  # left by an exception: reap them, leave no zombie
            os.close(read_end)
            os.waitpid(pid, 0)


def _child(fn: Callable[[T], R], share: T, read_end: int, write_end: int) -> NoReturn:
    """A forked process's whole life: ``fn(share)``, its result on the pipe, ``os._exit``."""
    import marshal

    status = 1
    try:
        os.close(read_end)
        data = marshal.dumps(fn(share))  # type: ignore[arg-type]  # R: what marshal takes
        with open(write_end, "wb", closefd=True) as out:
            out.write(data)
        status = 0
    finally:
        os._exit(status)


def settled(db_path: str, roots: list[Root], processes: int = 0) -> tuple[int, int] | None:
    """``(layouts, still broken)`` when the index provably holds every layout below *roots* as it is
    on disk (nothing to write), else None: :func:`changes` on the stored rows and directory cache."""
    from indexer.errors import DatabaseError
    from indexer.store import open_reader

    try:
        conn = open_reader(db_path)
    except DatabaseError:
        return None  # no database yet, or one to migrate: the full pass deals with it
    try:
        present, changed, gone, errors, stored = changes(conn, roots, processes)
    except sqlite3.Error:
        return None  # a damaged database: the full pass reports it (exit 4)
    finally:
        conn.close()
    if changed or gone or errors:
        return None  # the full pass writes the changes and reports the problems
    return len(present), sum(stored[path][1] for path in present)
