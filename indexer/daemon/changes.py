"""The changes duty: what the watcher saw, debounced and coalesced per layout, written in batches.

A plain loop over the ``changes`` stream (:mod:`indexer.daemon.shared`):

* on :data:`~indexer.daemon.shared.WAKE` it waits ``daemon.debounce_ms`` (a burst of writes to one
  layout becomes one read), takes what the watcher saw, and indexes it: the layouts whose
  ``index.json`` changed (and the other layouts sharing that file by a hard link), the layouts
  below every directory that appeared or vanished, and the racily clean layouts due for a second
  look;
* on a :class:`~indexer.daemon.shared.Sync` (a lookup's barrier) it does not wait: it reads every
  event the kernel queued until now (inotify queues an event when the change happens, so reading
  the descriptor until it is empty is exact), rediscovers the trees no watch covers, indexes all of
  it and then answers;
* when a racily clean layout comes due (``store.read.RACY_WINDOW_NS`` after it last changed), it
  reads it once more, so that its stored identity becomes one a lookup can trust.

Events the watcher lost ask the reconcile duty for a pass. The reconcile duty runs beside this one:
its pass never holds a change back, and compare-and-set keeps their writes in order.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time

import anyio
import anyio.to_thread

from indexer.config import Root
from indexer.daemon.database import guarded
from indexer.daemon.logs import fields
from indexer.daemon.shared import RECHECK, WAKE, PassReport, Sync
from indexer.scan.discovery import discover
from indexer.store import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream

    from indexer.daemon.shared import Message, Shared
    from indexer.daemon.watching import Watching
    from indexer.watch.watcher import Pending

log = logging.getLogger("ocidx.daemon")

# A second look at a racily clean layout waits this much past the racy window...
RACY_MARGIN_NS = 100_000_000
# ... and takes along the others coming due within this much after the first.
RACY_GROUP_NS = 250_000_000


class Changes:
    """The changes duty (see the module)."""

    def __init__(self, shared: Shared, watching: Watching) -> None:
        self.shared = shared
        self.watching = watching
        self.racy: dict[str, int] = {}  # layout -> when (wall clock, ns) a read settles its identity
        self.woke = time.monotonic()  # when a change last woke the duty: an update's latency starts there

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Index changes as they come, until cancelled."""
        receive = self.shared.changes_in
        task_status.started()
        while True:
            message = await self._next(receive)
            syncs: list[Sync] = []
            recheck = False
            woken = message == WAKE
            if isinstance(message, Sync):
                syncs.append(message)
            elif message == RECHECK:
                recheck = True
            elif woken:
                self.woke = time.monotonic()
                debounced = await self._debounce(receive)
                syncs.extend(m for m in debounced if isinstance(m, Sync))
                recheck = recheck or RECHECK in debounced
            for queued in _queued(receive):
                if isinstance(queued, Sync):
                    syncs.append(queued)
                recheck = recheck or queued == RECHECK
                woken = woken or queued == WAKE
            self.shared.taken()
            if recheck:
                await guarded(self.shared, self._load_racy)
            self.watching.read_now()
            pending = self.watching.take(unwatched=bool(syncs))
            if syncs:
                # A root that appeared or was replaced since the last look is watched and taken now.
                await self.watching.settle_roots(pending)
            try:
                await guarded(self.shared, functools.partial(self._index, pending, woken))
            finally:
                for sync in syncs:
                    sync.done.set()

    async def _next(self, receive: MemoryObjectReceiveStream[Message]) -> Message | None:
        """The next message, or None when racily clean layouts come due first."""
        if not self.racy:
            return await receive.receive()
        # Racy layouts written in a burst come due one after another: take them in groups.
        first_ns = min(self.racy.values()) + RACY_GROUP_NS
        with anyio.move_on_after(max(0.0, (first_ns - time.time_ns()) / 1e9)):
            return await receive.receive()
        return None

    async def _debounce(self, receive: MemoryObjectReceiveStream[Message]) -> list[Message]:
        """Wait ``debounce_ms`` for a burst to end; a barrier ends the wait at once. What came meanwhile."""
        came: list[Message] = []
        debounce_s = self.shared.config.daemon.debounce_ms / 1000
        if not debounce_s:
            return came
        with anyio.move_on_after(debounce_s):
            while True:
                message = await receive.receive()
                came.append(message)
                if isinstance(message, Sync):
                    break
        return came

    async def _load_racy(self) -> None:
        found = await self.shared.store.read(state.racy_layouts)
        self.racy = {path: when + RACY_MARGIN_NS for path, when in found.items()}

    async def _index(self, pending: Pending, woken: bool) -> None:
        """Index what *pending* says changed, and the racy layouts now due."""
        shared = self.shared
        if pending.lost:
            log.warning(
                "events were lost (%s): reconciling now",
                ", ".join(pending.lost),
                extra=fields(event="events_lost", reasons=pending.lost),
            )
            self.watching.reports.lost(len(pending.lost))
            shared.owe_pass(", ".join(pending.lost))
        forced: set[str] = set()
        if pending.mounts:
            forced = await self.watching.mounts.apply(pending)
        paths = set(pending.layouts)
        if paths:
            # An index.json hard-linked into other layouts changed for them too, but inotify reports a
            # write only through the directory it was made in: find them by the file's identity.
            files = await anyio.to_thread.run_sync(_linked_index_files, sorted(paths))
            if files:
                paths.update(await shared.store.read(state.with_index_file, files))
        now_ns = time.time_ns()
        paths.update(path for path, when in self.racy.items() if when <= now_ns)
        reread: set[str] = set()
        if pending.trees:
            trees = outermost(pending.trees.values())
            tops = [root.path for root in shared.roots]
            below, errors = await anyio.to_thread.run_sync(_discover_trees, trees, tops)
            if errors:
                # A listing that failed proves nothing: the pass owed for it lists it again.
                shared.owe_pass(f"a directory could not be listed ({errors[0]})")
            below.extend(await shared.store.read(state.stored_under, [t.path for t in trees]))
            paths.update(below)
            reread = {path for path in below if any(_at_or_below(path, top) for top in forced)}
        # Read again whatever their index.json says: below a mount that changed (the same identities
        # can name other files), and layouts whose blobs/ changed (what their answers depend on).
        reread |= pending.blobs
        paths |= pending.blobs
        if not paths:
            return
        ordered = sorted(paths - reread)
        counts = await shared.scanner.process(ordered)
        if reread:
            counts.merge(await shared.scanner.process(sorted(reread), full=True))
            ordered = sorted(paths)
        shared.report(PassReport("update", counts, time.monotonic() - self.woke if woken else None))
        for path in ordered:
            self.racy.pop(path, None)
        found = await shared.store.read(state.racy_layouts, ordered)
        self.racy.update((path, when + RACY_MARGIN_NS) for path, when in found.items())


def _queued(receive: MemoryObjectReceiveStream[Message]) -> list[Message]:
    """Every message waiting in *receive* now, without waiting."""
    found: list[Message] = []
    while True:
        try:
            found.append(receive.receive_nowait())
        except anyio.WouldBlock:
            return found


def _linked_index_files(paths: list[str]) -> list[tuple[str, int, int]]:
    """``(layout, dev, ino)`` of each ``index.json`` among *paths* with more than one hard link."""
    files = []
    for path in paths:
        try:
            st = os.stat(os.path.join(path, "index.json"))
        except OSError:
            continue
        if st.st_nlink > 1:
            files.append((path, st.st_dev, st.st_ino))
    return files


def _at_or_below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _discover_trees(trees: list[Root], tops: list[str]) -> tuple[list[str], list[str]]:
    """The layouts below each changed directory of a root (*tops*: the roots' real paths), and the
    problems met listing them.

    A directory that is now a symlink leading out of every root (a layout directory replaced by
    ``ln -s /elsewhere``) is not followed unless its root follows symlinks: discovery resolves the
    directory it starts from, which is right for a root, not for a name below one.
    """
    prefixes = [top.rstrip("/") + "/" for top in tops]
    found: list[str] = []
    errors: list[str] = []
    for tree in trees:
        try:
            st = os.stat(tree.path)
        except FileNotFoundError:
            continue  # gone: the stored layouts below it are looked at (and dropped)
        except OSError as exc:
            errors.append(f"{tree.path}: {exc.strerror}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        real = os.path.realpath(tree.path)
        if real != tree.path and not tree.follow_symlinks and not any(real.startswith(p) for p in prefixes):
            continue
        found.extend(discover(tree, errors))
    return found, errors


def outermost(trees: Iterable[Root]) -> list[Root]:
    """*trees* without those another of them covers (an ``rm -r`` reports every directory it removes).

    An ancestor covers a tree inside it when its discovery reaches at least as deep (trees of one root
    do; a root nested in another may reach deeper than the outer one's depth limit).
    """
    by_path = {tree.path: tree for tree in trees}
    kept = []
    for path, tree in by_path.items():
        here, below = path, 0
        while (parent := os.path.dirname(here)) != here:
            below += 1
            ancestor = by_path.get(parent)
            if ancestor is not None and ancestor.max_depth >= tree.max_depth + below:
                break
            here = parent
        else:
            kept.append(tree)
    return kept
