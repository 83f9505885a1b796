"""The watches themselves: one inotify descriptor (:mod:`indexer.watch.inotify`) with a watch on every
directory below the roots in which a layout can be found: each root down to its depth limit, never a
layout's own ``blobs/`` but for the directories a digest names (a blob added or removed there is the
layout's change).

A directory that cannot be watched (the watch limit in force is reached: ``ENOSPC``; a directory
this user cannot read) is kept in :attr:`Watches.unwatched` with the reason (docs/operations.md,
"inotify limits"). What the events mean is :mod:`indexer.watch.watcher`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from indexer._record import Record
from indexer.scan.discovery import LAYOUT_MARKERS, in_layout_blobs
from indexer.watch import inotify
from indexer.watch.inotify import Inotify

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from indexer.config import Root

# The files whose change means "read this layout again".
LAYOUT_FILES = frozenset(LAYOUT_MARKERS)
# The directories below a layout's blobs/ that a digest can name (go-digest's algorithms): a blob
# added or removed there changes what the layout holds (a partial export completed, garbage).
BLOB_ALGORITHMS = frozenset({"sha256", "sha384", "sha512"})

# What a watched directory reports. Never IN_OPEN, IN_ACCESS or IN_CLOSE_NOWRITE (our own reads
# would feed the queue), never IN_MODIFY (it fires while a writer is mid-write: IN_CLOSE_WRITE and
# the rename that ends an atomic save are the moments the file is whole).
DIRECTORY_MASK = (
    inotify.IN_CLOSE_WRITE
    | inotify.IN_ATTRIB
    | inotify.IN_CREATE
    | inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
    | inotify.IN_EXCL_UNLINK
)

LIMIT_SYSCTLS = ("/proc/sys/user/max_inotify_watches", "/proc/sys/fs/inotify/max_user_watches")


def relative_parts(path: str, top: str) -> list[str] | None:
    """The components of *path* below directory *top*, or None when it is not below it."""
    if path == top:
        return []
    prefix = top.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    return [p for p in path[len(prefix) :].split("/") if p]


class _Dir(Record):
    """A watched directory: its path, the root whose rules apply below it, its depth below that root,
    and, for a layout's ``blobs/`` or ``blobs/ALG/``, that layout."""

    __slots__ = ("blobs_of", "depth", "path", "root")

    def __init__(self, path: str, root: Root, depth: int, blobs_of: str | None = None) -> None:
        self.path = path
        self.root = root
        self.depth = depth
        self.blobs_of = blobs_of


class Watches:
    """inotify watches on every directory below the roots where a layout can be (see the module)."""

    def __init__(self) -> None:
        self._inotify = Inotify()  # OSError (EMFILE: the instance limit) when inotify cannot be had
        self._dirs: dict[int, _Dir] = {}
        self._wd_of: dict[str, int] = {}
        self._roots: dict[str, tuple[Root, tuple[int, int]]] = {}
        self.unwatched: dict[str, str] = {}

    def fileno(self) -> int:
        """The inotify descriptor, readable when events are queued."""
        return self._inotify.fileno()

    @property
    def roots(self) -> list[str]:
        """The roots watched now."""
        return list(self._roots)

    @property
    def watches(self) -> int:
        """How many directories are watched."""
        return len(self._dirs)

    def watch_root(self, root: Root) -> None:
        """Watch *root* (a resolved path) and every directory below it where a layout can be.

        OSError when the root itself cannot be watched; a directory below it that cannot be is
        kept in :attr:`unwatched` instead.
        """
        st = os.stat(root.path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", root.path)
        self._add(root.path, root, 0, raise_errors=True)
        self._roots[root.path] = (root, (st.st_dev, st.st_ino))
        self.unwatched = {p: why for p, why in self.unwatched.items() if relative_parts(p, root.path) is None}
        self._watch_below(root.path, root, 0)

    def unwatch_root(self, path: str) -> None:
        """Stop watching the root at *path* and every directory below it (a root nested inside it keeps
        its watches: they are placed again)."""
        self._roots.pop(path, None)
        self._forget_below(path, remove=True)
        self.unwatched = {p: why for p, why in self.unwatched.items() if relative_parts(p, path) is None}
        for root, _ident in list(self._roots.values()):
            if relative_parts(root.path, path) is not None:
                self.rewatch(root.path)

    def rewatch(self, top: str) -> None:
        """Place the watches below *top* again (idempotent): after an overflow, whose lost events may have
        been directories that appeared; for a tree left unwatched, now that the limit may allow it."""
        found = self._placement(top)
        if found is None:
            return
        root, depth = found
        if self._add(top, root, depth):
            self._watch_below(top, root, depth)

    def watch_tree(self, directory: str) -> None:
        """Watch *directory* (a mount point, a directory that appeared) and below, by the rules of its root."""
        found = self._placement(directory)
        if found is None:
            return
        root, depth = found
        if self._add(directory, root, depth):
            self._watch_below(directory, root, depth)

    def _placement(self, directory: str) -> tuple[Root, int] | None:
        """The root whose rules apply at *directory* (the innermost that holds it) and its depth there,
        or None (no layout can be there)."""
        found: tuple[Root, int] | None = None
        for root, _ident in self._roots.values():
            parts = relative_parts(directory, root.path)
            if parts is None or len(parts) > root.max_depth:
                continue
            if "blobs" in parts and in_layout_blobs(root.path, parts):
                return None
            if found is None or len(parts) < found[1]:
                found = (root, len(parts))
        return found

    def _add(
        self, directory: str, root: Root, depth: int, *, raise_errors: bool = False, blobs_of: str | None = None
    ) -> bool:
        try:
            wd = self._inotify.add_watch(directory, DIRECTORY_MASK)
        except OSError as exc:
            if raise_errors:
                raise
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False  # gone meanwhile: its parent's event says so
            self.unwatched[directory] = _why_unwatched(exc)
            return False
        known = self._dirs.get(wd)
        if known is None or known.path != directory or depth < known.depth:
            if known is not None and self._wd_of.get(known.path) == wd:
                del self._wd_of[known.path]
            self._dirs[wd] = _Dir(directory, root, depth, blobs_of)
        self._wd_of[directory] = wd
        self.unwatched.pop(directory, None)
        return True

    def _watch_below(self, top: str, root: Root, depth: int) -> None:
        """Watch the directories below *top* (watched already, at *depth*) where a layout can be."""
        stack = [(top, depth)]
        while stack:
            directory, level = stack.pop()
            if level >= root.max_depth:
                continue
            try:
                with os.scandir(directory) as it:
                    listing = list(it)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    self.unwatched[directory] = _why_unwatched(exc)
                continue
            is_layout = any(item.name in LAYOUT_FILES for item in listing)
            prefix = directory if directory.endswith("/") else directory + "/"
            for item in listing:
                if is_layout and item.name == "blobs":
                    self._watch_blobs(prefix + "blobs", directory, root, level)
                    continue
                try:
                    if item.is_dir(follow_symlinks=False):
                        target = prefix + item.name
                    elif item.is_symlink() and (root.follow_symlinks or _inside(item.path, root.path)):
                        target = os.path.realpath(item.path)
                        if not os.path.isdir(target):
                            continue
                    else:
                        continue
                except OSError:
                    continue
                if self._add(target, root, level + 1):
                    stack.append((target, level + 1))

    def _watch_blobs(self, blobs: str, layout: str, root: Root, level: int) -> None:
        """Watch a layout's ``blobs/`` and its ``blobs/ALG/`` directories: their changes are the layout's."""
        if not self._add(blobs, root, level + 1, blobs_of=layout):
            return
        for algorithm in BLOB_ALGORITHMS:
            path = f"{blobs}/{algorithm}"
            if os.path.isdir(path) and not os.path.islink(path):
                self._add(path, root, level + 2, blobs_of=layout)

    def _forget_below(self, top: str, *, remove: bool) -> None:
        """Drop the watches of *top* and every directory below it (*remove*: tell the kernel too)."""
        prefix = top.rstrip("/") + "/"
        for path in [p for p in self._wd_of if p == top or p.startswith(prefix)]:
            wd = self._wd_of.pop(path)
            known = self._dirs.get(wd)
            if known is not None and known.path == path:
                del self._dirs[wd]
                if remove:
                    with contextlib.suppress(OSError):  # gone with its directory already
                        self._inotify.rm_watch(wd)

    # -- health ---------------------------------------------------------------------------------------

    def broken_roots(self) -> list[str]:
        """Watched roots whose directory vanished or was replaced (its watch no longer sees it)."""
        broken = []
        for path, (_root, ident) in self._roots.items():
            wd = self._wd_of.get(path)
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino) == ident
            except OSError:
                same = False
            if not same or wd is None or wd not in self._dirs:
                broken.append(path)
        return broken

    def close(self) -> None:
        """Close the descriptor: every watch goes with it."""
        self._inotify.close()
        self._dirs.clear()
        self._wd_of.clear()
        self._roots.clear()


def blobs_owner(directory: str) -> str | None:
    """The layout whose ``blobs/`` or ``blobs/ALG/`` *directory* is, or None."""
    name = os.path.basename(directory)
    if name == "blobs":
        layout = os.path.dirname(directory)
    elif name in BLOB_ALGORITHMS and os.path.basename(os.path.dirname(directory)) == "blobs":
        layout = os.path.dirname(os.path.dirname(directory))
    else:
        return None
    if any(os.path.lexists(os.path.join(layout, marker)) for marker in LAYOUT_MARKERS):
        return layout
    return None


def _inside(path: str, top: str) -> bool:
    """Whether the symbolic link *path* leads inside *top* (as discovery follows links within a root)."""
    try:
        target = os.path.realpath(path)
    except OSError:
        return False
    return target == top or target.startswith(top.rstrip("/") + "/")


def _why_unwatched(exc: OSError) -> str:
    """Why a directory could not be watched, said so that an operator knows what to raise."""
    if exc.errno == errno.ENOSPC:
        limits = [
            f"{os.path.basename(name)}={value}" for name in LIMIT_SYSCTLS if (value := _read_int(name)) is not None
        ]
        shown = f" ({', '.join(limits)})" if limits else ""
        return f"the inotify watch limit in force is reached{shown}; raise it (docs/operations.md)"
    return f"it cannot be watched: {exc.strerror or exc}"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def count_directories(tops: Iterable[str]) -> int:
    """Every directory below *tops* (the tops included; symlinks not followed): for the docs' sizing rule."""
    total = 0
    for top in tops:
        if not os.path.isdir(top):
            continue
        total += 1
        for _dirpath, dirnames, _files in os.walk(top, followlinks=False):
            total += sum(1 for d in dirnames if not os.path.islink(os.path.join(_dirpath, d)))
    return total
