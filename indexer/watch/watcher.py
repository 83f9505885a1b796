"""watchdog (inotify) to a lock-guarded set of dirty layouts and one wake-up of the event loop.

watchdog calls its handlers on its own dispatch thread. Nothing here ever
blocks that thread or lets an exception escape it (an exception kills the
observer: research/python-anchors.md B1): a handler only files the layout
directory it concerns into :class:`Dirty` and, when the set was empty, calls
the loop's wake-up once. The loop (``indexer.daemon``) debounces, drains and
scans.

What watchdog 7 does and does not tell us, and how each gap is covered:

* ``index.json`` replaced by rename arrives as a move whose ``dest_path`` is
  ``index.json``; written in place, as a close-after-write. Both paths of an
  event are looked at; ``modified`` is not listened to (it fires mid-write).
* A whole layout renamed in arrives as a directory create or move; a tree
  removed or renamed out as a directory delete or move. Directories are filed
  as *trees*: the loop rediscovers layouts below them and re-examines the
  stored layouts below them.
* A queue overflow reaches no handler, only a WARNING from
  ``watchdog.observers.inotify_c``; :class:`OverflowAlarm` listens for it and
  files a *lost* mark, on which the loop runs a reconcile pass.
* inotify does not cross mount points: a file system mounted below a root
  after its watch was placed is invisible to that watch. :class:`MountWatch`
  polls ``/proc/self/mountinfo`` (the kernel signals ``POLLPRI | POLLERR`` on
  every mount or unmount in our namespace) and files a *mounts* mark; the loop
  diffs :func:`mount_points`, watches each new mount point and rediscovers it.
* The watch limit is not reported at all by watchdog 7.1 (watches are
  silently missing), so :func:`watch_capacity` compares ``/proc/sys/fs/inotify``
  with the number of directories before any watch is placed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
import time
import warnings

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

from indexer._record import Record
from indexer.config import Root
from indexer.scan.discovery import in_layout_blobs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from watchdog.observers.api import ObservedWatch

log = logging.getLogger("ocidx.watcher")

# The files whose change means "re-read this layout".
LAYOUT_FILES = frozenset({"index.json", "oci-layout"})
# The directories of blobs/ a digest can name (go-digest's algorithms): a change there is a change of
# what the layout holds (its content graph's presence).
BLOB_ALGORITHMS = frozenset({"sha256", "sha384", "sha512"})

# Closed-after-write, moved, created and deleted; never opened/closed-no-write (our own
# reads would feed the queue) and never modified (fires while a writer is mid-write).
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

_WATCHDOG_INOTIFY_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
INOTIFY_SYSCTL = "/proc/sys/fs/inotify"


class Pending(Record):
    """What :meth:`Dirty.drain` hands the loop: layouts to re-examine, trees to rediscover, lost marks,
    and whether the mount table changed."""

    __slots__ = ("layouts", "lost", "mounts", "trees")

    def __init__(self, layouts: set[str], trees: dict[str, Root], lost: list[str], mounts: bool = False) -> None:
        self.layouts = layouts
        self.trees = trees
        self.lost = lost
        self.mounts = mounts

    def __bool__(self) -> bool:
        return bool(self.layouts or self.trees or self.lost or self.mounts)


class Dirty:
    """The layouts and trees changed since the loop last drained, filled from any thread."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._layouts: set[str] = set()
        self._trees: dict[str, Root] = {}
        self._lost: list[str] = []
        self._mounts = False
        self._wake = wake

    def _empty(self) -> bool:
        return not (self._layouts or self._trees or self._lost or self._mounts)

    def add_layout(self, path: str) -> None:
        """File one layout directory; wake the loop if nothing was pending."""
        with self._lock:
            was_empty = self._empty()
            self._layouts.add(path)
        if was_empty:
            self._wake()

    def add_tree(self, tree: Root) -> None:
        """File a directory below which layouts may have appeared or vanished."""
        with self._lock:
            was_empty = self._empty()
            known = self._trees.get(tree.path)
            if known is None or known.max_depth < tree.max_depth:
                self._trees[tree.path] = tree
        if was_empty:
            self._wake()

    def mark_lost(self, why: str) -> None:
        """Events were lost (overflow, a dead observer): the loop must reconcile."""
        with self._lock:
            was_empty = self._empty()
            if why not in self._lost:
                self._lost.append(why)
        if was_empty:
            self._wake()

    def mark_mounts(self) -> None:
        """The mount table changed (a file system mounted or unmounted somewhere)."""
        with self._lock:
            was_empty = self._empty()
            self._mounts = True
        if was_empty:
            self._wake()

    def drain(self) -> Pending:
        """Take everything filed so far, leaving the set empty."""
        with self._lock:
            pending = Pending(self._layouts, self._trees, self._lost, self._mounts)
            self._layouts, self._trees, self._lost, self._mounts = set(), {}, [], False
        return pending


def relative_parts(path: str, top: str) -> list[str] | None:
    """The components of *path* below directory *top*, or None when it is not below it."""
    if path == top:
        return []
    prefix = top.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    return [p for p in path[len(prefix) :].split("/") if p]


class LayoutEvents(FileSystemEventHandler):
    """The handler of one root's recursive watch: events to :class:`Dirty`, never an exception."""

    def __init__(self, root: Root, dirty: Dirty) -> None:
        super().__init__()
        self.root = root
        self.dirty = dirty

    def dispatch(self, event: FileSystemEvent) -> None:
        """Route *event*; any failure is logged and turned into a reconcile, never raised."""
        try:
            self._route(event)
        except Exception as exc:  # an exception here would kill watchdog's thread
            with contextlib.suppress(Exception):  # the last line of defence for the observer thread
                log.error("watch event handler failed on %r: %s", event, exc)
                self.dirty.mark_lost("an event could not be handled")

    def _route(self, event: FileSystemEvent) -> None:
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        if event.is_directory:
            if isinstance(event, DirCreatedEvent | DirMovedEvent | DirDeletedEvent):
                for path in paths:
                    self._tree(path)
                    self._blobs(path)
            return
        if not isinstance(event, FileClosedEvent | FileMovedEvent | FileCreatedEvent | FileDeletedEvent):
            return
        for path in paths:
            if os.path.basename(path) in LAYOUT_FILES:
                self._layout(os.path.dirname(path))
            else:
                self._blobs(os.path.dirname(path))

    def _blobs(self, directory: str) -> None:
        """A change in ``LAYOUT/blobs`` or ``LAYOUT/blobs/ALG`` (a blob or a blobs directory added or
        removed) is a change of that layout's content graph: the layout is examined again."""
        name = os.path.basename(directory)
        if name == "blobs":
            self._layout(os.path.dirname(directory))
        elif name in BLOB_ALGORITHMS and os.path.basename(os.path.dirname(directory)) == "blobs":
            self._layout(os.path.dirname(os.path.dirname(directory)))

    def _depth_left(self, directory: str) -> int | None:
        """How deep discovery may still go below *directory*, or None when no layout can be there."""
        parts = relative_parts(directory, self.root.path)
        if parts is None or ("blobs" in parts and in_layout_blobs(self.root.path, parts)):
            return None
        left = self.root.max_depth - len(parts)
        return left if left >= 0 else None

    def _layout(self, directory: str) -> None:
        if self._depth_left(directory) is not None:
            self.dirty.add_layout(directory)

    def _tree(self, directory: str) -> None:
        left = self._depth_left(directory)
        if left is not None:
            self.dirty.add_tree(Root(directory, max_depth=left, follow_symlinks=self.root.follow_symlinks))


MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points(path: str = MOUNTINFO) -> dict[int, str]:
    """Every mount of our namespace: mount id to mount point (``/proc/self/mountinfo``), {} without /proc."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    found: dict[int, str] = {}
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        # The kernel writes space, tab, newline and backslash in a mount point as \ooo.
        point = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
        found[int(fields[0])] = os.fsdecode(point)
    return found


class MountWatch:
    """A thread waiting for the kernel to say the mount table changed; calls *on_change* (never raises)."""

    def __init__(self, on_change: Callable[[], None], path: str = MOUNTINFO) -> None:
        self.on_change = on_change
        self.path = path
        self._thread: threading.Thread | None = None
        self._stop_w: int | None = None

    def start(self) -> None:
        """Start watching; OSError when the mount table cannot be watched (no /proc)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        poller.register(stop_r, select.POLLIN)
        poller.poll(0)  # the first poll reports the table as changed: consume that
        self._stop_w = stop_w
        self._thread = threading.Thread(target=self._run, args=(poller, fd, stop_r), name="ocidx-mounts", daemon=True)
        self._thread.start()

    def _run(self, poller: select.poll, fd: int, stop_r: int) -> None:
        try:
            while True:
                events = poller.poll()
                if any(which == stop_r for which, _ in events):
                    return
                if any(which == fd and mask & (select.POLLPRI | select.POLLERR) for which, mask in events):
                    with contextlib.suppress(Exception):
                        self.on_change()
        except Exception as exc:  # the loop's periodic reconcile still covers what is missed
            with contextlib.suppress(Exception):
                log.error("watching the mount table failed: %s", exc)
        finally:
            os.close(fd)
            os.close(stop_r)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (blocking: call it from a worker thread)."""
        stop_w, self._stop_w = self._stop_w, None
        thread, self._thread = self._thread, None
        if stop_w is None:
            return
        with contextlib.suppress(OSError):
            os.write(stop_w, b"x")
        if thread is not None:
            thread.join(timeout)
        os.close(stop_w)


class OverflowAlarm(logging.Handler):
    """Turns watchdog's overflow WARNING (its only trace of lost events) into a reconcile."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.on_lost = on_lost

    def emit(self, record: logging.LogRecord) -> None:
        """Called on watchdog's thread: never raises."""
        try:
            text = record.getMessage().lower()
            if "overflow" in text:
                self.on_lost("inotify queue overflow")
            elif "unable to rebuild" in text:
                self.on_lost("inotify watches could not be rebuilt")
        except Exception:
            return  # never raise into watchdog's thread

    def attach(self) -> None:
        """Listen to watchdog's inotify loggers (kept at WARNING so the alarm always hears them)."""
        for name in _WATCHDOG_INOTIFY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET or logger.level > logging.WARNING:
                logger.setLevel(logging.WARNING)
            logger.addHandler(self)
            logger.addFilter(_quiet_shutdown)

    def detach(self) -> None:
        """Stop listening."""
        for name in _WATCHDOG_INOTIFY_LOGGERS:
            logging.getLogger(name).removeHandler(self)


def _shorten_watch_group_repr() -> None:
    """Work around a watchdog 7.1 slowdown that stalls its thread for seconds to minutes.

    When a directory that was renamed out of a watched tree comes back, watchdog re-adds the
    watches it never removed and warns once per directory; the warning's text is the dataclass
    repr of the whole watch group, every watched path included. Formatting it is O(watched
    directories) per directory: 900 directories moved back into a 9,000-directory tree stalled
    event delivery for 10 s. A short repr makes each warning cheap; the warnings themselves
    (harmless: the watch is simply reused) are not shown.
    """
    from watchdog.observers.inotify import InotifyWatchGroup

    def short(group: InotifyWatchGroup) -> str:
        return f"<InotifyWatchGroup {group.path!r}>"

    InotifyWatchGroup.__repr__ = short  # type: ignore[method-assign,assignment]
    warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


def _wake_on_paired_moves() -> None:
    """Work around a watchdog 7.1 stall of every event for half a second after a rename.

    watchdog holds an ``IN_MOVED_FROM`` for up to 0.5 s (``InotifyMoveEventGrouper.delay``) so that
    its ``IN_MOVED_TO`` can be paired with it; the pair is queued again at the tail. But the
    emitter's ``DelayedQueue.get``, finding the lone half at the head of the queue, sleeps out the
    whole delay without looking again: when it looks between the two halves (its thread won the GIL
    in between, more often while a reconcile keeps other threads busy), the pair arrives a moment
    later and still every event queued behind it waits the rest of the 0.5 s. With a writer that
    renames ``index.json`` into place (umoci, regclient), that was one 0.6 s gap in the daemon's
    updates about every few minutes at 20 changes/s (docs/design.md, "The last half-second
    stalls"). This ``get`` waits on the queue's condition instead, which every ``put`` notifies,
    and looks at the head again: the same order, the same pairing, no wait for a half already paired.
    """
    import collections

    from watchdog.utils.delayed_queue import DelayedQueue

    if getattr(DelayedQueue.get, "_ocidx", False):
        return
    # The replacement reads the queue's private state as watchdog 6 and 7 keep it; another
    # watchdog keeps its own get (and its own delays) rather than a get that misreads it.
    probe: DelayedQueue[object] = DelayedQueue(0.5)
    probe.put(None)
    state = getattr(probe, "_queue", None)
    if not (
        isinstance(state, collections.deque)
        and len(state[0]) == 3
        and isinstance(getattr(probe, "_not_empty", None), threading.Condition)
        and hasattr(probe, "_closed")
    ):
        return

    def get(self: DelayedQueue[object]) -> object | None:
        with self._not_empty:
            while True:
                while not self._queue and not self._closed:
                    self._not_empty.wait()
                if self._closed:
                    return None
                head, inserted, delay = self._queue[0]
                left = inserted + self.delay - time.monotonic() if delay else 0.0
                if left <= 0:
                    self._queue.popleft()
                    return head
                self._not_empty.wait(left)  # a put (the other half, paired) wakes it to look again

    get._ocidx = True  # type: ignore[attr-defined]
    DelayedQueue.get = get  # type: ignore[method-assign,assignment]


def _quiet_shutdown(record: logging.LogRecord) -> bool:
    """Drop watchdog 7.1's ERROR when an emitter that is being stopped reads once more (harmless)."""
    return "called when the thread is inactive" not in str(record.msg)


class Capacity(Record):
    """Whether inotify can watch every directory below the roots, and why not."""

    __slots__ = ("directories", "instances_in_use", "max_instances", "max_watches", "watches_in_use")

    def __init__(
        self,
        *,
        directories: int,
        max_watches: int | None,
        watches_in_use: int,
        max_instances: int | None,
        instances_in_use: int,
    ) -> None:
        self.directories = directories
        self.max_watches = max_watches
        self.watches_in_use = watches_in_use
        self.max_instances = max_instances
        self.instances_in_use = instances_in_use

    def shortfall(self) -> str | None:
        """None when the watches fit, else a sentence saying what is short."""
        if self.max_instances is not None and self.instances_in_use + 1 > self.max_instances:
            return (
                f"fs.inotify.max_user_instances={self.max_instances} is used up "
                f"({self.instances_in_use} inotify instances already open by this user)"
            )
        if self.max_watches is not None:
            free = self.max_watches - self.watches_in_use
            if self.directories > free:
                return (
                    f"{self.directories} directories below the roots need as many inotify watches, but "
                    f"fs.inotify.max_user_watches={self.max_watches} leaves {free} free "
                    f"({self.watches_in_use} in use by this user)"
                )
        return None


def _read_sysctl(name: str) -> int | None:
    try:
        with open(os.path.join(INOTIFY_SYSCTL, name), encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def count_directories(tops: Iterable[str]) -> int:
    """Every directory a recursive watch of *tops* would watch (the tops included; symlinks not followed)."""
    total = 0
    for top in tops:
        if not os.path.isdir(top):
            continue
        total += 1
        for _dirpath, dirnames, _files in os.walk(top, followlinks=False):
            total += sum(1 for d in dirnames if not os.path.islink(os.path.join(_dirpath, d)))
    return total


def inotify_in_use(uid: int | None = None) -> tuple[int, int]:
    """(instances, watches) of inotify held by *other* processes of *uid*, from ``/proc/*/fdinfo`` (best effort).

    Our own process is left out: on a re-check its watches are the ones being counted for.
    """
    uid = os.getuid() if uid is None else uid
    me = str(os.getpid())
    instances = watches = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return 0, 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
                    watches += sum(1 for line in fh if line.startswith("inotify wd:"))
                instances += 1
            except OSError:
                continue
    return instances, watches


def watch_capacity(tops: Iterable[str]) -> Capacity:
    """Measure what a recursive inotify watch of *tops* needs and what the kernel allows."""
    instances, watches = inotify_in_use()
    return Capacity(
        directories=count_directories(tops),
        max_watches=_read_sysctl("max_user_watches"),
        watches_in_use=watches,
        max_instances=_read_sysctl("max_user_instances"),
        instances_in_use=instances,
    )


class Watcher:
    """One inotify observer with one recursive, filtered schedule per root."""

    def __init__(self, dirty: Dirty) -> None:
        self.dirty = dirty
        self._observer: InotifyObserver | None = None
        self._watches: dict[str, tuple[ObservedWatch, tuple[int, int]]] = {}
        self._mounts: dict[str, ObservedWatch] = {}

    @property
    def roots(self) -> list[str]:
        """The root directories currently scheduled."""
        return list(self._watches)

    def start(self) -> None:
        """Start the observer thread (raises OSError when inotify is unavailable)."""
        _shorten_watch_group_repr()
        _wake_on_paired_moves()
        observer = InotifyObserver()
        observer.daemon = True
        observer.start()
        self._observer = observer

    def schedule(self, root: Root) -> None:
        """Watch *root* (its resolved path) recursively; OSError when it cannot be watched."""
        observer = self._observer
        if observer is None:
            raise RuntimeError("watcher not started")
        st = os.stat(root.path)
        watch = observer.schedule(
            LayoutEvents(root, self.dirty), root.path, recursive=True, event_filter=list(EVENT_FILTER)
        )
        self._watches[root.path] = (watch, (st.st_dev, st.st_ino))

    def schedule_mount(self, root: Root, point: str) -> None:
        """Watch *point*, a file system mounted below *root* after its watch was placed (inotify does
        not cross into it); events are routed as *root*'s. OSError when it cannot be watched."""
        observer = self._observer
        if observer is None:
            raise RuntimeError("watcher not started")
        self.unschedule_mount(point)
        self._mounts[point] = observer.schedule(
            LayoutEvents(root, self.dirty), point, recursive=True, event_filter=list(EVENT_FILTER)
        )

    def unschedule_mount(self, point: str) -> None:
        """Stop watching the mount point *point* (it was unmounted)."""
        watch = self._mounts.pop(point, None)
        if watch is None or self._observer is None:
            return
        try:
            self._observer.unschedule(watch)
        except (KeyError, RuntimeError, OSError) as exc:
            log.debug("unscheduling mount %s: %s", point, exc)

    def unschedule_mounts_below(self, top: str) -> None:
        """Stop watching every mount point below *top* (a root no longer watched)."""
        prefix = top.rstrip("/") + "/"
        for point in [p for p in self._mounts if p.startswith(prefix)]:
            self.unschedule_mount(point)

    def unschedule(self, path: str) -> None:
        """Stop watching the root at *path* (it vanished, or its watch died)."""
        found = self._watches.pop(path, None)
        if found is None or self._observer is None:
            return
        try:
            self._observer.unschedule(found[0])
        except (KeyError, RuntimeError, OSError) as exc:
            log.debug("unscheduling %s: %s", path, exc)

    def observer_alive(self) -> bool:
        """Whether the dispatch thread still runs (an exception in it would have ended it)."""
        return self._observer is not None and self._observer.is_alive()

    def broken_roots(self) -> list[str]:
        """Scheduled roots whose watch no longer works: the directory vanished or was replaced, or its emitter ended."""
        observer = self._observer
        if observer is None:
            return list(self._watches)
        try:
            alive = {emitter.watch for emitter in list(observer.emitters) if emitter.is_alive()}
        except RuntimeError:  # the observer changed its emitters meanwhile: look again next time
            return []
        broken = []
        for path, (watch, ident) in self._watches.items():
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino) == ident
            except OSError:
                same = False
            if not same or watch not in alive:
                broken.append(path)
        return broken

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the observer (blocking: call it from a worker thread)."""
        observer, self._observer = self._observer, None
        self._watches.clear()
        self._mounts.clear()
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout)
        except RuntimeError as exc:
            log.debug("stopping the observer: %s", exc)
