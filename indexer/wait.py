"""``ocidx wait TARGET``: block until an ``oci-layout://`` target resolves (docs/semantics.md, Waiting).

No daemon and no database are needed: the layout itself is watched with inotify. Every directory
along the target's path that exists is watched (any of them may turn out to be the layout, as in
``oci-layout://PATH/NAME:TAG``), and each new directory along it is watched as soon as it appears,
so a layout created by ``skopeo copy`` into a new directory tree is seen; ``blobs/`` and
``blobs/ALG/`` of a layout along the path are watched too. After each batch of events that concerns
the path (the next directory of the path, ``index.json``, ``oci-layout``, a blob), a real
:meth:`Index.resolve <indexer.query.Index.resolve>` decides; nothing is checked on a timer, so the
file system is never polled. The watches are placed before each check, so a change made
between a check and the wait that follows it is an event, never a lost wake-up.

Standard library only (``select``, and :mod:`indexer.watch.inotify` over ``ctypes``): it is a
lookup, and imports nothing of the daemon. :class:`Watch` is the mechanism without the waiting,
for the asynchronous API, which waits for the descriptor on its own event loop.
"""

from __future__ import annotations

import errno
import math
import os
import select
import time

from indexer import layout as layout_mod
from indexer.errors import (
    DaemonError,
    DatabaseError,
    InvalidReference,
    LayoutError,
    NotFound,
    UsageError,
    WaitTimeout,
)
from indexer.query import SCHEME
from indexer.watch import inotify

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from indexer.errors import OcidxError
    from indexer.query import Answer, Index

# What can make a directory of the path appear, change, or a layout's files be (re)written.
_MASK = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_DELETE
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_ATTRIB
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
)
# Events about the watched directory itself: the path changed shape, so every watch is placed again.
_SELF = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED | inotify.IN_Q_OVERFLOW
_LAYOUT_FILES = (b"index.json", b"oci-layout", b"blobs")
ANY = b"/"  # no name holds a slash: a watch on which every event counts (a layout's blobs)


def watch_path(target: str, stores: Mapping[str, str]) -> str:
    """The absolute directory the layout of *target* is at or below: its text after the scheme, less
    a ``@DIGEST`` and a ``:TAG`` suffix (a store name is its configured path)."""
    if not target.startswith(SCHEME):
        return ""  # resolve says what is wrong with it
    rest = target[len(SCHEME) :]
    head, at, tail = rest.rpartition("@")
    if at and "/" not in tail:
        rest = head
    store, _colon, _tag = rest.partition(":")
    if store in stores and "/" not in store:
        return os.path.abspath(stores[store])
    head, colon, tail = rest.rpartition(":")
    if colon and "/" not in tail and head:
        rest = head
    return os.path.abspath(rest or ".")


class Watch:
    """inotify watches on every existing directory along a target's path (a store name: its path)."""

    def __init__(self, target: str, stores: Mapping[str, str]) -> None:
        self.target = target
        self.path = watch_path(target, stores)
        self.reason = ""  # why the target did not resolve at the last check
        self._watches: dict[int, tuple[str, bytes]] = {}  # wd: (directory, the next name along the path)
        try:
            self._inotify = inotify.Inotify()
        except OSError as exc:
            raise _unwatchable(exc, "cannot start inotify") from None

    def fileno(self) -> int:
        """The inotify descriptor: readable when events are queued."""
        return self._inotify.fileno()

    def arm(self) -> None:
        """Watch every directory along the path that exists now (again: one may have appeared or been replaced)."""
        if not self.path:
            return
        parts = [part for part in self.path.split("/") if part]
        watches: dict[int, tuple[str, bytes]] = {}
        directory = "/"
        for depth in range(len(parts) + 1):
            following = os.fsencode(parts[depth]) if depth < len(parts) else b""
            try:
                wd = self._inotify.add_watch(directory, _MASK)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    break  # the deepest existing directory is watched: what comes below appears in it
                if exc.errno == errno.EACCES and depth < len(parts):
                    wd = -1  # an ancestor we may not watch; the directories below it still may be
                else:
                    raise _unwatchable(exc, f"cannot watch {directory}") from None
            if wd >= 0:
                watches[wd] = (directory, following)
            if depth == len(parts):
                break
            directory = os.path.join(directory, parts[depth])
        for layout in [d for d, _ in watches.values() if layout_mod.is_layout_dir(d)]:
            self._watch_blobs(layout, watches)
        for wd in set(self._watches) - set(watches):
            self._inotify.rm_watch(wd)  # a directory no longer along the path (it was replaced)
        self._watches = watches

    def _watch_blobs(self, layout: str, watches: dict[int, tuple[str, bytes]]) -> None:
        """Watch ``blobs/`` and ``blobs/ALG/`` of a layout along the path: a digest target may be a bare
        blob, and a platform's manifest may arrive after ``index.json`` names it (a partial export
        completed later). Any event there is worth a check."""
        blobs = os.path.join(layout, "blobs")
        try:
            algorithms = [os.path.join(blobs, name) for name in os.listdir(blobs)]
        except OSError:
            return  # no blobs/ yet: its creation is an event in the layout, which is watched
        for directory in [blobs, *algorithms]:
            try:
                wd = self._inotify.add_watch(directory, _MASK)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                    continue  # gone, not a directory, or not ours to read: resolve says what it can
                raise _unwatchable(exc, f"cannot watch {directory}") from None
            watches[wd] = (directory, ANY)

    def drain(self) -> bool:
        """Read every queued event; whether one concerns the path (the watches are then placed again)."""
        relevant = False
        for event in self._inotify.read():
            if event.mask & _SELF:
                relevant = True
                continue
            watched = self._watches.get(event.wd)
            if watched is not None and (watched[1] in (ANY, event.name) or event.name in _LAYOUT_FILES):
                relevant = True
        if relevant:
            self.arm()
        return relevant

    def timeout(self, seconds: float) -> WaitTimeout:
        """The error of a wait that ran out after *seconds*, with why the target did not resolve."""
        why = f": {self.reason}" if self.reason else ""
        return WaitTimeout(f"{self.target} did not resolve within {seconds:g} s{why}")

    def close(self) -> None:
        """Close the inotify descriptor (every watch goes with it)."""
        self._inotify.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attempt(index: Index, target: str, *, platform: str | None = None, strict: bool = False) -> Answer | str:
    """Resolve *target* now: the answer, or why it does not resolve yet (a message).

    Errors that waiting cannot change are raised: a bad target or reference, an ambiguity, an
    unusable database. A missing layout, tag or platform, and a layout that cannot be read (a
    writer is half-way through ``index.json``), are reasons to wait.
    """
    try:
        return index.resolve(target, platform=platform, strict=strict)
    except (UsageError, InvalidReference, DatabaseError):
        raise
    except (NotFound, LayoutError) as exc:
        return exc.message


def _unwatchable(exc: OSError, what: str) -> OcidxError:
    if exc.errno in (errno.ENOSPC, errno.EMFILE):
        return DaemonError(
            f"{what}: {exc.strerror} (the inotify limits fs.inotify.max_user_watches and "
            "max_user_instances are reached: raise them with sysctl, docs/operations.md)"
        )
    return DaemonError(f"{what}: {exc.strerror or exc}")


def check_timeout(timeout: float | None) -> None:
    """A timeout is None (no limit) or a finite number of seconds, 0 or more (UsageError)."""
    if timeout is not None and not 0 <= timeout < math.inf:
        raise UsageError(f"timeout must be a number of seconds, 0 or more, not {timeout!r}")


def wait(
    index: Index,
    target: str,
    *,
    timeout: float | None = None,
    platform: str | None = None,
    strict: bool = False,
    waiting: Callable[[str], None] | None = None,
) -> Answer:
    """Block until *target* resolves and return its answer; :class:`WaitTimeout` after *timeout* seconds.

    *waiting* is called once, with why the target does not resolve yet, when the wait begins."""
    check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    with Watch(target, index.config.stores) as watch:
        poller = select.poll()
        poller.register(watch.fileno(), select.POLLIN)
        watch.arm()
        while True:
            result = attempt(index, target, platform=platform, strict=strict)
            if not isinstance(result, str):
                return result
            watch.reason = result
            if waiting is not None:
                waiting(watch.reason)
                waiting = None
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise watch.timeout(timeout or 0.0)
                poller.poll(None if remaining is None else max(1, int(remaining * 1000 + 0.999)))
                if watch.drain():
                    break
