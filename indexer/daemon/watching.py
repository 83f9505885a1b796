"""The watching duty: inotify on the roots, the watch mode, the roots' health, and the mount table.

It places the watches (:class:`indexer.watch.watcher.Watcher`), reads the inotify descriptor
whenever it is readable and wakes the changes duty; every second it looks for a root that vanished,
was replaced or appeared; it keeps the watch mode that ``status`` shows and lookups trust:

* ``inotify``: every directory where a layout can be is watched; a lookup's barrier is exact;
* ``inotify: N directories unwatched (why)``: the watch limit in force was reached (or a directory
  could not be read): those trees are rediscovered every poll interval and before every barrier
  answer, so answers stay exact, and the log and the metrics say what to raise;
* ``polling: why`` (``OCIDX_WATCH_MODE=polling``, or no inotify at all): change detection is the
  reconcile pass alone, every ``min(reconcile_interval_s, 2 s)``; lookups do their own walk.

A file system mounted or unmounted below a root (:class:`indexer.watch.mounts.MountWatch`) is
watched and rediscovered, and every layout below it read again whatever its ``index.json`` identity
says: two file systems with the same content and metadata have the same identities.
"""

from __future__ import annotations

import logging
import os

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from indexer.config import Root
from indexer.daemon.database import persist
from indexer.daemon.logs import fields
from indexer.scan.discovery import in_layout_blobs
from indexer.store import state
from indexer.watch.mounts import MountWatch, mount_points
from indexer.watch.watcher import Pending, Watcher
from indexer.watch.watches import blobs_owner, relative_parts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from indexer.daemon.reports import Reports
    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")

# How often a vanished root, a root that appeared or a replaced one is looked for.
HEALTH_INTERVAL_S = 1.0
# The reconcile period when inotify cannot be used (it is then the only change detection), and how
# often unwatched trees are looked at.
POLL_INTERVAL_S = 2.0
# ... but at least this many times as long as the last pass took.
POLL_DUTY_FACTOR = 10.0
# Set to "polling" to watch by reconcile only (NFS and other file systems inotify cannot see into).
WATCH_MODE_ENV = "OCIDX_WATCH_MODE"


def forced_polling() -> bool:
    """Whether the environment asks for watching by reconcile only (OCIDX_WATCH_MODE=polling)."""
    return os.environ.get(WATCH_MODE_ENV, "").strip().lower() == "polling"


def poll_interval(shared: Shared) -> float:
    """``min(reconcile_interval_s, 2 s)``, stretched so that polling a big tree stays under ~10% of a core."""
    return min(shared.config.daemon.reconcile_s, max(POLL_INTERVAL_S, POLL_DUTY_FACTOR * shared.last_pass_s))


class Watching:
    """The watching duty (see the module)."""

    def __init__(self, shared: Shared, reports: Reports) -> None:
        self.shared = shared
        self.reports = reports
        self.watcher: Watcher | None = None
        self.waiting_roots: set[str] = set()  # roots to watch once they exist
        self.mounts = Mounts(self)
        self.forced: set[str] = set()  # trees whose layouts must be read again (a mount changed)

    # -- what the changes duty asks ------------------------------------------------------------------

    def read_now(self) -> None:
        """Read every event the kernel queued until now (the barrier's drain)."""
        if self.watcher is not None and self.watcher.read():
            self.reports.watched(self.watcher.events)

    def take(self, *, unwatched: bool = False) -> Pending:
        """What the watcher saw since the last take; *unwatched*: with every tree no watch covers."""
        pending = self.watcher.take() if self.watcher is not None else Pending()
        if unwatched:
            self.file_unwatched(pending)
        return pending

    def file_unwatched(self, pending: Pending) -> None:
        """Add to *pending* what no watch covers: each unwatched tree to rediscover, and the layout of an
        unwatched ``blobs/`` to read again (the watch limit, an unreadable directory)."""
        watcher = self.watcher
        if watcher is None:
            return
        for path in watcher.unwatched:
            layout = blobs_owner(path)
            if layout is not None:
                pending.blobs.add(layout)
                continue
            for root in self.shared.roots:
                parts = relative_parts(path, root.path)
                if parts is not None:
                    depth = root.max_depth - len(parts)
                    pending.add_tree(Root(path, max_depth=depth, follow_symlinks=root.follow_symlinks))
                    break

    # -- the duty -------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Choose the mode and place the watches, then read events and look after the roots."""
        try:
            await self._start()
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_events)
                tg.start_soon(self._health)
        finally:
            await self._stop()

    async def _start(self) -> None:
        await self.mounts.start()
        if forced_polling():
            await self._set_mode(f"polling: {WATCH_MODE_ENV}=polling")
            return
        try:
            watcher = Watcher()
        except OSError as exc:
            await self._set_mode(f"polling: inotify is unavailable: {exc.strerror or exc}")
            return
        self.watcher = watcher
        self.waiting_roots = {root.path for root in self.shared.roots}
        await self._watch_waiting(threaded=True)
        await self._set_mode(self._inotify_mode())

    async def _stop(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.mounts.stop()
            watcher, self.watcher = self.watcher, None
            if watcher is not None:
                watcher.close()

    async def _read_events(self) -> None:
        watcher = self.watcher
        if watcher is None:
            return
        while True:
            await anyio.wait_readable(watcher.fileno())
            self.read_now()
            if watcher.pending:
                self.shared.wake()

    async def _health(self) -> None:
        polled = anyio.current_time()
        while True:
            await anyio.sleep(HEALTH_INTERVAL_S)
            if self.watcher is None:
                continue
            if await self.settle_roots(self.watcher.pending):
                self.shared.wake()
            mode = self._inotify_mode()
            if mode != self.shared.mode:
                await self._set_mode(mode)
            if self.watcher.unwatched and anyio.current_time() - polled >= poll_interval(self.shared):
                polled = anyio.current_time()
                self._retry_unwatched()
                self.file_unwatched(self.watcher.pending)
                self.shared.wake()

    async def settle_roots(self, pending: Pending) -> bool:
        """Watch again a root that vanished or was replaced, and a waiting root that appeared, and file
        each as a tree to rediscover in *pending* (the changes duty indexes it: no pass to wait for);
        whether any was."""
        watcher = self.watcher
        if watcher is None:
            return False
        changed = False
        for path in watcher.broken_roots():
            log.warning(
                "root %s vanished or was replaced: watching it again when it is there",
                path,
                extra=fields(event="root_lost", root=path),
            )
            watcher.unwatch_root(path)
            self.waiting_roots.add(path)
            changed = True
            for root in self.shared.roots:  # what it held is looked at again, gone or not
                if root.path == path:
                    pending.add_tree(root)
        for root in await self._watch_waiting():
            pending.add_tree(root)
            changed = True
        return changed

    def _retry_unwatched(self) -> None:
        """Place the watches that did not fit again (the limit may have been raised, another program may
        have let some go); forget unwatched trees that are gone."""
        watcher = self.watcher
        if watcher is None:
            return
        for path in list(watcher.unwatched):
            if not os.path.isdir(path):
                watcher.unwatched.pop(path, None)
            else:
                watcher.rewatch(path)

    # -- roots ------------------------------------------------------------------------------------------

    async def _watch_waiting(self, *, threaded: bool = False) -> list[Root]:
        """Watch the waiting roots that exist now; those that were.

        The watcher is the loop's own once its events are being read: only the first placement, before
        that, walks the tree in a worker thread.
        """
        watcher = self.watcher
        if watcher is None:
            return []
        added = []
        for root in self.shared.roots:
            if root.path not in self.waiting_roots:
                continue
            problem = root_problem(root.path)
            if problem is not None:
                self.reports.problem(problem)
                continue
            try:
                if threaded:
                    await anyio.to_thread.run_sync(watcher.watch_root, root)
                else:
                    watcher.watch_root(root)
            except OSError as exc:
                self.reports.problem(f"root {root.path} cannot be watched: {exc.strerror or exc}")
                continue
            self.waiting_roots.discard(root.path)
            self.reports.forget(f"root {root.path} ")
            added.append(root)
            log.info("watching root %s", root.path, extra=fields(event="root_watched", root=root.path))
        return added

    async def set_roots(self, roots: list[Root]) -> tuple[list[str], list[str]]:
        """The reload's new roots: stop watching the removed ones, watch the added; (added, removed)."""
        before = {root.path: root for root in self.shared.roots}
        after = {root.path: root for root in roots}
        removed = [path for path in before if path not in after or before[path] != after[path]]
        added = [path for path in after if path not in before or before[path] != after[path]]
        self.shared.roots = roots
        for path in removed:
            self.waiting_roots.discard(path)
            if self.watcher is not None:
                self.watcher.unwatch_root(path)
        self.waiting_roots.update(added)
        if self.watcher is not None and added:
            for root in await self._watch_waiting():
                self.watcher.pending.add_tree(root)  # indexed by the changes duty, now
            self.shared.wake()
            await self._set_mode(self._inotify_mode())
        return added, removed

    # -- the mode ---------------------------------------------------------------------------------------

    def _inotify_mode(self) -> str:
        watcher = self.watcher
        if watcher is None:
            return self.shared.mode
        if not watcher.unwatched:
            return "inotify"
        count = len(watcher.unwatched)
        why = next(iter(watcher.unwatched.values()))
        return f"inotify: {count} director{'y' if count == 1 else 'ies'} unwatched, rediscovered every poll ({why})"

    async def _set_mode(self, mode: str) -> None:
        if mode == self.shared.mode:
            return
        self.shared.mode = mode
        watches = self.watcher.watches if self.watcher is not None else 0
        self.reports.mode(mode, watches, self.unwatched_count())
        await persist(self.shared, "the watch mode", state.update_daemon, pid=self.shared.pid, watch_mode=mode)
        _log_mode(mode, self.shared, watches, self.watcher.unwatched if self.watcher is not None else {})

    def unwatched_count(self) -> int:
        """How many trees below the roots no watch covers."""
        return len(self.watcher.unwatched) if self.watcher is not None else 0


class Mounts:
    """The watching duty's mount table: a file system mounted or unmounted below a root is watched and
    rediscovered, and every layout below it read again (see the module)."""

    def __init__(self, watching: Watching) -> None:
        self.watching = watching
        self.known: dict[int, str] = {}
        self.watch: MountWatch | None = None

    async def start(self) -> None:
        """Read the mount table, and watch it (a warning when it cannot be watched)."""
        self.known = await anyio.to_thread.run_sync(mount_points)
        token = anyio.lowlevel.current_token()
        watch = MountWatch(lambda: anyio.from_thread.run_sync(self.changed, token=token))
        try:
            await anyio.to_thread.run_sync(watch.start)
            self.watch = watch
        except OSError as exc:
            log.warning(
                "cannot watch the mount table (%s): file systems mounted below a root are found by reconcile",
                exc.strerror or exc,
            )

    async def stop(self) -> None:
        """Stop watching the mount table."""
        watch, self.watch = self.watch, None
        if watch is not None:
            await anyio.to_thread.run_sync(watch.stop)

    def changed(self) -> None:
        """Called from the mount watch's thread (through the loop): the changes duty applies it."""
        watcher, shared = self.watching.watcher, self.watching.shared
        if watcher is not None:
            watcher.pending.mounts = True
        else:
            shared.request_reconcile("the mount table changed")
        shared.wake()

    async def apply(self, pending: Pending) -> set[str]:
        """A file system was mounted or unmounted: watch the new mount points below a root (inotify does
        not cross into them) and rediscover both kinds, as for a directory that appeared; the trees
        whose layouts must be read again whatever their identities say."""
        current = await anyio.to_thread.run_sync(mount_points)
        old, self.known = self.known, current
        removed = [point for mount_id, point in old.items() if mount_id not in current]
        added = [point for mount_id, point in current.items() if mount_id not in old]
        forced: set[str] = set()
        for point, mounted in [(p, False) for p in removed] + [(p, True) for p in added]:
            for root in self.watching.shared.roots:
                parts = relative_parts(point, root.path)
                if not parts:  # not below this root (a mount on the root itself is a replaced root)
                    continue
                left = root.max_depth - len(parts)
                if left < 0 or await anyio.to_thread.run_sync(in_layout_blobs, root.path, parts):
                    break
                pending.add_tree(Root(point, max_depth=left, follow_symlinks=root.follow_symlinks))
                forced.add(point)
                log.info(
                    "a file system was %s at %s below root %s: %s",
                    "mounted" if mounted else "unmounted",
                    point,
                    root.path,
                    "watching it and reading every layout there" if mounted else "reading what is there now",
                    extra=fields(event="mount", mounted=mounted, mount_point=point, root=root.path),
                )
                watcher = self.watching.watcher
                if watcher is not None:
                    watcher.watch_tree(point)  # the mounted file system, or the directory it covered
                break
        return forced


def _log_mode(mode: str, shared: Shared, watches: int, unwatched: dict[str, str]) -> None:
    """Say the watch mode the daemon is in now, and what to do about it."""
    if mode.startswith("polling"):
        log.warning(
            "not watching with inotify: %s; polling every %.1fs by reconcile instead",
            mode.removeprefix("polling: "),
            poll_interval(shared),
            extra=fields(event="watch_mode", watch_mode="polling", reason=mode),
        )
    elif mode == "inotify":
        roots = len(shared.roots)
        log.info(
            "watching %s with inotify (%d director%s)",
            "1 root" if roots == 1 else f"{roots} roots",
            watches,
            "y" if watches == 1 else "ies",
            extra=fields(event="watch_mode", watch_mode="inotify", directories=watches),
        )
    else:
        shown = sorted(unwatched)
        log.warning(
            "%s: %s",
            mode,
            ", ".join(shown[:5]) + (" and more" if len(shown) > 5 else ""),
            extra=fields(event="watch_mode", watch_mode="inotify-partial", unwatched=shown[:50]),
        )


def root_problem(path: str) -> str | None:
    """What to do about a root that is not a directory (or None when it is one): logged once."""
    if os.path.isdir(path):
        return None
    if os.path.lexists(path):
        return (
            f"root {path} is not a directory: point [[roots]] path (or the ROOT argument) at the directory of layouts"
        )
    return (
        f"root {path} does not exist (yet); it is indexed as soon as it appears: create it "
        f"(mkdir -p {path}) and put layouts in it, for example "
        f"skopeo copy docker://docker.io/library/alpine:3.16 oci:{path}/alpine:3.16"
    )
