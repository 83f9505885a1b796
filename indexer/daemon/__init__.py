"""``ocidx daemon``: keep the index fresh while layouts change (docs/operations.md).

The daemon is one process per database (an exclusive ``flock`` on
``<db>.lock``) and one event loop holding the one :class:`Scanner`, so there is
exactly one writer. It runs:

* a reconcile pass (:meth:`Scanner.full_pass`) at start-up, every
  ``daemon.reconcile_interval_s``, whenever events were lost (inotify queue
  overflow, a dead observer thread, a root that appeared, vanished or was
  replaced), and, when inotify cannot watch every directory, every
  ``min(reconcile_interval_s, 2 s)`` instead of watching part of the tree;
* the layouts watchdog reported (``indexer.watch.watcher``), debounced by
  ``daemon.debounce_ms`` and coalesced per layout, fed to :meth:`Scanner.process`:
  by the loop between passes, and by a task beside a pass while one runs, so that
  no step of a pass holds a change back;
* every ``reconcile_interval_s``, a check that inotify can still watch every
  directory (a count of them all, in a task of its own);
* a second look at every layout whose ``index.json`` changed within the racy
  window of its read (``store.read.RACY_WINDOW_NS``), once that window has
  passed, so the stored identity becomes one a lookup can trust;
* a heartbeat in the ``daemon`` row every ``daemon.heartbeat_interval_s``;
* on a change of the mount table (``indexer.watch.watcher.MountWatch``), a watch on
  each file system newly mounted below a root and a rediscovery of it;
* for every changed ``index.json`` with more than one hard link, the other
  stored layouts sharing its (device, inode).

SIGHUP re-reads the config between two steps (roots re-watched, settings
applied; an invalid file is logged and the running config kept). SIGTERM and
SIGINT cancel the work in hand: a batch already being written commits (the
write runs in a worker thread that cancellation waits for), the row gets
``stopped_ns``, the connection is closed. A database that SQLite
reports corrupt is moved aside to ``<db>.corrupt-<timestamp>`` and rebuilt: it
is a cache of the layouts. The daemon never writes into a layout and never
touches BuildKit's ``index.json.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
import time

import anyio
import anyio.to_thread

from indexer import config as config_mod
from indexer.errors import DaemonError, DatabaseError, OcidxError, UsageError, printable
from indexer.scan.discovery import discover, in_layout_blobs, roots_for
from indexer.scan.scanner import LOGGED_PATHS, Counts, Scanner
from indexer.store import check_database_files, exposure_warning, maintenance, open_beside_database, path_of, path_value
from indexer.store import read as db
from indexer.store import state as roots_mod
from indexer.watch.watcher import (
    Capacity,
    Dirty,
    MountWatch,
    OverflowAlarm,
    Pending,
    Watcher,
    mount_points,
    relative_parts,
    watch_capacity,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable
    from typing import TypeVar

    from anyio.abc import TaskGroup

    from indexer.config import Config, Root
    from indexer.daemon.metrics import Metrics

    T = TypeVar("T")

log = logging.getLogger("ocidx.daemon")

# How often a dead observer, a vanished root or a root that appeared is looked for.
HEALTH_INTERVAL_S = 1.0
# The reconcile period when inotify cannot be used (it is then the only change detection).
POLL_INTERVAL_S = 2.0
# A second look at a racily-clean layout waits this much past the racy window.
RACY_MARGIN_NS = 100_000_000
# ... and takes along the others coming due within this much after the first.
RACY_GROUP_NS = 250_000_000
# ... but at least this many times as long as the last pass took.
POLL_DUTY_FACTOR = 10.0
# After an unexpected database error (for instance "database is locked"), wait before retrying.
RETRY_DELAY_S = 1.0
# A log line names the changed layouts of a batch up to this many, else the first LOGGED_PATHS_SHOWN.
LOGGED_PATHS_SHOWN = 3
# Set to "polling" to watch by reconcile only (NFS and other file systems inotify cannot see into).
WATCH_MODE_ENV = "OCIDX_WATCH_MODE"

CORRUPTION_MARKERS = (
    "not a database",
    "database disk image is malformed",
    "malformed database schema",
    "database corruption",
)


# -- logging ------------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``2026-11-27 17:30:01.123 INFO indexed 3 layouts``: one line a person can read."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """The standard line with control characters taken from layouts escaped.

        The message is one line whatever it holds: a newline in a path stays ``\\x0a``. Only a
        traceback (our own text) spans lines, each escaped and indented below the message.
        """
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in extra:
            line += "".join("\n    " + printable(part) for part in text.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and any ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        document: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=True, default=str)


def setup_logging(log_format: str) -> logging.Handler:
    """Send our records and watchdog's warnings to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    return handler


def _fields(**values: object) -> dict[str, object]:
    return {"fields": values}


# -- the lock -----------------------------------------------------------------------------------


class DatabaseLock:
    """An exclusive ``flock`` on ``<db>.lock`` holding the pid of its owner."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DaemonError naming the pid that holds it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            # A symlink or another user's file planted at the lock's name is refused (UnsafeFile):
            # the pid is written into the file, which must be this user's own.
            fd, _created = open_beside_database(self.path)
        except OSError as exc:
            raise DaemonError(f"cannot open the daemon lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder is not None else "another process"
                raise DaemonError(
                    f"another ocidx daemon ({who}) is already running on this database: it holds {self.path}"
                ) from None
            raise DaemonError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the pid and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# -- corrupt databases --------------------------------------------------------------------------


def is_corruption(exc: BaseException) -> bool:
    """Whether *exc* is SQLite saying the file is damaged (not busy, not someone else's database)."""
    text = str(exc).lower()
    return any(marker in text for marker in CORRUPTION_MARKERS)


def only_database_errors(exc: BaseException) -> sqlite3.DatabaseError | None:
    """The first SQLite error in *exc* when that is all it holds (groups unwrapped), else None."""
    if isinstance(exc, sqlite3.DatabaseError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [only_database_errors(inner) for inner in exc.exceptions]
        if found and all(error is not None for error in found):
            return found[0]
    return None


def corruption_of(path: str) -> str | None:
    """Why the database file at *path* is unusable (``PRAGMA quick_check``), or None when it is sound or absent."""
    try:
        if os.path.getsize(path) == 0:
            return None
    except OSError:
        return None
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        raise
    if rows != [("ok",)]:
        return "quick_check: " + "; ".join(str(row[0]) for row in rows[:5])
    return None


def move_aside(path: str) -> str:
    """Rename the database (and its -wal and -shm) to ``<db>.corrupt-<timestamp>``; the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = f"{path}.corrupt-{stamp}"
    serial = 1
    while os.path.lexists(target):
        serial += 1
        target = f"{path}.corrupt-{stamp}-{serial}"
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, target + suffix)
    return target


def open_scanner(db_path: str, config: Config) -> Scanner:
    """The writer, after moving a corrupt database aside (it is rebuilt by the first pass)."""
    check_database_files(db_path)  # before the corruption check opens it
    reason = corruption_of(db_path)
    if reason is None:
        try:
            return Scanner(db_path, config)
        except DatabaseError as exc:
            if not is_corruption(exc):
                raise
            reason = exc.message
    moved = move_aside(db_path)
    log.error(
        "database %s is corrupt (%s): moved it to %s and rebuilding the index from the layouts",
        db_path,
        reason,
        moved,
        extra=_fields(event="database_corrupt", database=db_path, moved_to=moved, reason=reason),
    )
    return Scanner(db_path, config)


# -- the daemon ---------------------------------------------------------------------------------


class Daemon:
    """The loop: reconcile, drain watchdog's dirty set, re-check racy layouts, heartbeat."""

    def __init__(
        self,
        db_path: str,
        config: Config,
        roots: list[Root],
        *,
        config_path: str | None = None,
        cli_roots: tuple[str, ...] = (),
    ) -> None:
        self.db_path = db_path
        self.config = config
        self.settings = config.daemon
        self.config_path = config_path
        self.cli_roots = cli_roots
        self.reload_requested = False
        self.full_pass_due = False
        self.mount_watch: MountWatch | None = None
        self.known_mounts: dict[int, str] = {}
        self.roots = [_resolved(root) for root in roots]
        self.scanner: Scanner | None = None
        self.watcher: Watcher | None = None
        self.alarm: OverflowAlarm | None = None
        self.mode = "starting"
        self.wake = anyio.Event()
        self.changes = anyio.Event()  # as wake, for the task that indexes changes beside a reconcile pass
        self.passing = False  # a reconcile pass is running (its companion task indexes the changes)
        self.dirty = Dirty(self._wake_from_thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.racy: dict[str, int] = {}
        self.reconcile_due = 0.0
        self.last_pass_s = 0.0
        self.reconcile_reasons: list[str] = []
        self.mode_check_due = 0.0
        self.counting = False  # the periodic mode check's walk is running (_count_watches)
        self.counted: tuple[list[str], Capacity] | None = None  # its result (roots, capacity), not yet applied
        self.tasks: TaskGroup | None = None
        self.health_due = 0.0
        self.pending_roots: set[str] = set()
        self.reported: set[str] = set()
        self.metrics: Metrics | None = None  # [metrics] in the config (indexer.daemon.metrics, imported only then)
        self.woke = time.monotonic()  # when a change last woke the loop: an update's latency starts there
        self.wal_pinned_since: float | None = None  # monotonic time a reader was first seen pinning the WAL
        self.wal_warned = False

    # -- plumbing ---------------------------------------------------------------------------------

    def _wake_from_thread(self) -> None:
        """Called by watchdog's thread: wake the loop once; never raises."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: we are shutting down
            loop.call_soon_threadsafe(self._wake_now)

    def _wake_now(self) -> None:
        self.wake.set()
        self.changes.set()

    async def _db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* on the writer's connection, on its thread (serialized with its batches)."""
        scanner = self.scanner
        assert scanner is not None
        return await scanner.on_writer(fn)

    def _request_reconcile(self, why: str) -> None:
        if why not in self.reconcile_reasons:
            self.reconcile_reasons.append(why)
        self.wake.set()

    # -- the daemon row ---------------------------------------------------------------------------

    async def _write_start_row(self) -> None:
        now = time.time_ns()

        def write(conn: sqlite3.Connection) -> None:
            # The layouts of earlier scans stay indexed: `find` keeps walking their roots too.
            roots = roots_mod.merged(conn, self.roots, watched=True)
            conn.execute(
                """
                INSERT INTO daemon (id, pid, started_ns, heartbeat_ns, stopped_ns, watch_mode, roots)
                VALUES (1, ?, ?, ?, NULL, ?, ?)
                ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_ns = excluded.started_ns,
                    heartbeat_ns = excluded.heartbeat_ns, stopped_ns = NULL,
                    watch_mode = excluded.watch_mode, roots = excluded.roots
                """,
                (os.getpid(), now, now, self.mode, roots),
            )

        await self._db(write)

    async def _set_row(self, **values: object) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE daemon SET {columns} WHERE id = 1", tuple(values.values()))

        await self._db(write)

    async def _set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self.mode = mode
            await self._set_row(watch_mode=mode)

    # -- start, run, stop -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; the exit code."""
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tg:
                self.tasks = tg
                tg.start_soon(self._signals, tg.cancel_scope)
                await self._start()
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._maintenance)
                tg.start_soon(self._publish)
                tg.start_soon(self._main)
        except BaseExceptionGroup as group:
            # One failure (a DaemonError, a DatabaseError...) is raised as itself, for the CLI's exit codes.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        return 0

    async def _start(self) -> None:
        with anyio.CancelScope(shield=True):  # a signal now still leaves a scanner to close
            self.scanner = await anyio.to_thread.run_sync(open_scanner, self.db_path, self.config)
        await self._write_start_row()
        if self.config.metrics.enabled:
            from indexer.daemon.metrics import Metrics

            self.metrics = Metrics(self.config.metrics, self.db_path)
            url = self.metrics.start()
            where = ", ".join(w for w in (url, self.config.metrics.textfile) if w)
            log.info(
                "metrics: %s", where, extra=_fields(event="metrics", url=url, textfile=self.config.metrics.textfile)
            )
        await self._watch_mounts()
        log.info(
            "ocidx daemon %d started on %s, roots: %s",
            os.getpid(),
            self.db_path,
            ", ".join(root.path for root in self.roots),
            extra=_fields(event="started", pid=os.getpid(), database=self.db_path),
        )
        if (exposed := exposure_warning(self.db_path)) is not None:  # docs/operations.md, Permissions
            log.warning("%s", exposed, extra=_fields(event="database_exposed", database=self.db_path))

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # systemd's ExecReload convention: the loop re-reads the config between two steps.
                    self.reload_requested = True
                    self.wake.set()
                    continue
                log.info(
                    "received %s: finishing the batch in hand and stopping",
                    signal.Signals(signum).name,
                    extra=_fields(event="stopping", signal=signal.Signals(signum).name),
                )
                scope.cancel()
                return

    async def _publish(self) -> None:
        """The fleet publisher (indexer.fleet.publisher) when a fleet DSN is set: a task of its own that
        reads SQLite on its own connection, so that PostgreSQL never holds up indexing or answers."""
        dsn = config_mod.fleet_dsn(self.config)
        if not dsn:
            await self._db(lambda conn: conn.execute("DELETE FROM fleet_publisher"))  # status shows no stale fleet
            return
        try:
            from indexer.fleet.publisher import Publisher
        except ImportError:
            log.error("fleet: a fleet DSN is set but psycopg is not installed: pip install 'ocidx[fleet]'")
            return

        async def record(fn: Callable[[sqlite3.Connection], None]) -> None:
            if self.scanner is not None:  # not while the database is being rebuilt
                await self._db(fn)

        on_backlog = self.metrics.set_publish_backlog if self.metrics is not None else None  # ocidx_publish_backlog
        await Publisher(
            dsn, self.db_path, heartbeat_s=self.settings.heartbeat_s, record=record, on_backlog=on_backlog
        ).run()

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            if self.scanner is None:
                continue  # the database is being rebuilt
            try:
                beat_ns = time.time_ns()
                await self._set_row(heartbeat_ns=beat_ns)
            except sqlite3.Error as exc:
                log.warning("heartbeat not written: %s", exc)
                continue
            if self.metrics is not None:
                self.metrics.beat(beat_ns)
                await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        """Refresh the gauges from the index and rewrite the textfile; a failure is logged once."""
        metrics = self.metrics
        if metrics is None or self.scanner is None:
            return
        try:
            await self._db(metrics.refresh)
            await anyio.to_thread.run_sync(metrics.write_textfile)
        except (OSError, sqlite3.Error) as exc:
            self._report(f"metrics not updated: {exc}")

    async def _maintenance(self) -> None:
        """Keep the WAL and the file bounded (store.maintenance); warn while a reader pins the WAL."""
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            if self.scanner is None:
                continue  # the database is being rebuilt
            try:
                done = await self._db(functools.partial(maintenance.maintain, db_path=self.db_path))
            except sqlite3.Error as exc:
                log.warning("database maintenance not done: %s", exc)
                continue
            self._report_wal(done)

    def _report_wal(self, done: maintenance.Maintenance) -> None:
        mib = 1024 * 1024
        if done.pinned:
            if self.wal_pinned_since is None:
                self.wal_pinned_since = time.monotonic()
            if not self.wal_warned and done.wal_bytes > maintenance.WAL_LIMIT_BYTES:
                self.wal_warned = True
                pids = maintenance.holders(self.db_path)
                held = f"; processes with it open: {', '.join(map(str, pids))}" if pids else ""
                log.warning(
                    "the WAL of %s is %.1f MiB and cannot be checkpointed: a reader has kept one read "
                    "transaction open for at least %.0f s%s",
                    self.db_path,
                    done.wal_bytes / mib,
                    time.monotonic() - self.wal_pinned_since,
                    held,
                    extra=_fields(event="wal_pinned", wal_bytes=done.wal_bytes, pids=pids),
                )
        elif self.wal_pinned_since is not None:
            if self.wal_warned:
                log.info(
                    "the WAL of %s is checkpointed again: %.1f MiB, was %.1f MiB",
                    self.db_path,
                    done.wal_bytes / mib,
                    done.wal_bytes_before / mib,
                    extra=_fields(event="wal_released", wal_bytes=done.wal_bytes),
                )
            self.wal_pinned_since = None
            self.wal_warned = False
        if done.freed_pages:
            log.debug("returned %d free pages of %s", done.freed_pages, self.db_path)

    async def _shutdown(self) -> None:
        if self.metrics is not None:
            await anyio.to_thread.run_sync(self.metrics.stop)
        mount_watch, self.mount_watch = self.mount_watch, None
        if mount_watch is not None:
            await anyio.to_thread.run_sync(mount_watch.stop)
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            await anyio.to_thread.run_sync(watcher.stop)
        if self.alarm is not None:
            self.alarm.detach()
        self._loop = None
        scanner = self.scanner
        if scanner is None:
            return
        try:
            await self._set_row(stopped_ns=time.time_ns(), heartbeat_ns=time.time_ns())
        except sqlite3.Error as exc:
            log.error("could not record the stop in the database: %s", exc)
        await scanner.aclose()
        self.scanner = None
        log.info("ocidx daemon %d stopped", os.getpid(), extra=_fields(event="stopped", pid=os.getpid()))

    # -- watching ---------------------------------------------------------------------------------

    def _poll_interval(self) -> float:
        """``min(reconcile_interval_s, 2 s)``, stretched so that polling a big tree stays under ~10% of a core."""
        return min(self.settings.reconcile_s, max(POLL_INTERVAL_S, POLL_DUTY_FACTOR * self.last_pass_s))

    async def _choose_mode(self, capacity: Capacity | None = None) -> None:
        """inotify when every directory can be watched, else polling by reconcile, said plainly
        (*capacity*: counted already, for the roots the daemon has now)."""
        if _forced_polling():
            await self._to_polling(f"{WATCH_MODE_ENV}=polling")
            return
        if capacity is None:
            tops = [root.path for root in self.roots]
            capacity = await anyio.to_thread.run_sync(watch_capacity, tops)
        short = capacity.shortfall()
        if short is not None:
            await self._to_polling(short + "; raise the limit (docs/operations.md)")
            return
        if self.watcher is None:
            await self._to_inotify(capacity.directories)

    def _check_mode_later(self) -> None:
        """Start the periodic mode check: its count of every directory below the roots walks the whole
        tree (a second and more at 10,000 layouts under load), so it runs in a task of its own while
        the loop goes on indexing changes; the loop applies what it found (:meth:`_apply_count`)."""
        if self.counting or self.tasks is None or _forced_polling():  # forced: set at start-up for good
            return
        self.counting = True
        self.tasks.start_soon(self._count_watches, [root.path for root in self.roots])

    async def _count_watches(self, tops: list[str]) -> None:
        try:
            capacity = await anyio.to_thread.run_sync(watch_capacity, tops)
        finally:
            self.counting = False
        self.counted = (tops, capacity)
        self.wake.set()

    async def _apply_count(self) -> None:
        """Switch mode if the last periodic count says so (a count for roots since replaced is dropped)."""
        counted, self.counted = self.counted, None
        if counted is None:
            return
        tops, capacity = counted
        if tops == [root.path for root in self.roots]:
            await self._choose_mode(capacity)
        else:
            self.mode_check_due = time.monotonic()  # a reload changed the roots meanwhile: count them

    async def _to_polling(self, why: str) -> None:
        mode = f"polling: {why}"
        if self.mode == mode:
            return
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            await anyio.to_thread.run_sync(watcher.stop)
        log.warning(
            "not watching with inotify: %s; polling every %.1fs by reconcile instead",
            why,
            self._poll_interval(),
            extra=_fields(event="watch_mode", watch_mode="polling", reason=why),
        )
        await self._set_mode(mode)
        self.reconcile_due = min(self.reconcile_due, time.monotonic() + self._poll_interval())

    async def _to_inotify(self, directories: int) -> None:
        watcher = Watcher(self.dirty)
        try:
            await anyio.to_thread.run_sync(watcher.start)
        except OSError as exc:
            await self._to_polling(f"inotify is unavailable: {exc.strerror or exc}")
            return
        if self.alarm is None:
            self.alarm = OverflowAlarm(self.dirty.mark_lost)
            self.alarm.attach()
        self.watcher = watcher
        if self.mode.startswith("polling"):
            self._request_reconcile("switched from polling to inotify")
        self.pending_roots = {root.path for root in self.roots}
        await self._schedule_pending()
        await self._set_mode("inotify")
        log.info(
            "watching %s with inotify (%d director%s)",
            "1 root" if len(watcher.roots) == 1 else f"{len(watcher.roots)} roots",
            directories,
            "y" if directories == 1 else "ies",
            extra=_fields(event="watch_mode", watch_mode="inotify", directories=directories),
        )

    async def _schedule_pending(self) -> bool:
        """Watch the roots that exist now; True when one was added."""
        watcher = self.watcher
        if watcher is None:
            return False
        added = False
        for root in self.roots:
            if root.path not in self.pending_roots:
                continue
            problem = await anyio.to_thread.run_sync(_root_problem, root.path)
            if problem is not None:
                self._report(problem)
                continue
            try:
                await anyio.to_thread.run_sync(watcher.schedule, root)
            except OSError as exc:
                self._report(f"root {root.path} cannot be watched: {exc.strerror or exc}")
                continue
            self.pending_roots.discard(root.path)
            self.reported -= {m for m in self.reported if m.startswith(f"root {root.path} ")}  # said again if lost
            added = True
            log.info("watching root %s", root.path, extra=_fields(event="root_watched", root=root.path))
        return added

    def _report(self, message: str) -> None:
        """Log a standing problem once, not on every check."""
        if message not in self.reported:
            self.reported.add(message)
            log.warning("%s", message)

    async def _check_health(self) -> None:
        """Restart a dead observer, re-watch vanished or replaced roots, pick up roots that appeared."""
        watcher = self.watcher
        if watcher is None:
            return
        if not watcher.observer_alive():
            log.error(
                "the inotify observer thread died: restarting it and reconciling",
                extra=_fields(event="observer_died"),
            )
            await anyio.to_thread.run_sync(watcher.stop)
            self.watcher = None
            self.mode = "restarting"
            await self._choose_mode()
            self._request_reconcile("the observer thread was restarted")
            return
        for path in await anyio.to_thread.run_sync(watcher.broken_roots):
            log.warning(
                "root %s vanished or was replaced: its watch is gone; reconciling",
                path,
                extra=_fields(event="root_lost", root=path),
            )
            await anyio.to_thread.run_sync(watcher.unschedule, path)
            self.pending_roots.add(path)
            self._request_reconcile(f"root {path} vanished or was replaced")
        if self.pending_roots and await self._schedule_pending():
            self._request_reconcile("a root appeared")

    # -- mounts -----------------------------------------------------------------------------------

    async def _watch_mounts(self) -> None:
        """Learn the mount table and start waiting for the kernel to say it changed."""
        self.known_mounts = await anyio.to_thread.run_sync(mount_points)
        watch = MountWatch(self.dirty.mark_mounts)
        try:
            await anyio.to_thread.run_sync(watch.start)
        except OSError as exc:
            log.warning(
                "cannot watch the mount table (%s): file systems mounted below a root are found by reconcile",
                exc.strerror or exc,
            )
            return
        self.mount_watch = watch

    async def _mounts_changed(self, pending: Pending) -> None:
        """A file system was mounted or unmounted: watch new mount points below a root (inotify does not
        cross into them) and rediscover both kinds in this step, as for a directory that appeared."""
        current = await anyio.to_thread.run_sync(mount_points)
        old, self.known_mounts = self.known_mounts, current
        removed = [point for mount_id, point in old.items() if mount_id not in current]
        added = [point for mount_id, point in current.items() if mount_id not in old]
        for point, mounted in [(p, False) for p in removed] + [(p, True) for p in added]:
            for root in self.roots:
                parts = relative_parts(point, root.path)
                if not parts:  # not below this root (a mount on the root itself is a replaced root)
                    continue
                left = root.max_depth - len(parts)
                if left < 0 or await anyio.to_thread.run_sync(in_layout_blobs, root.path, parts):
                    break
                known = pending.trees.get(point)
                if known is None or known.max_depth < left:
                    pending.trees[point] = config_mod.Root(point, max_depth=left, follow_symlinks=root.follow_symlinks)
                await self._watch_mount(root, point, mounted)
                break

    async def _watch_mount(self, root: Root, point: str, mounted: bool) -> None:
        watcher = self.watcher
        what = "mounted" if mounted else "unmounted"
        log.info(
            "a file system was %s at %s below root %s: %s",
            what,
            point,
            root.path,
            "watching and discovering it" if mounted else "rediscovering what is there now",
            extra=_fields(event="mount", mounted=mounted, mount_point=point, root=root.path),
        )
        if watcher is None:
            return
        if not mounted:
            await anyio.to_thread.run_sync(watcher.unschedule_mount, point)
            return
        try:
            await anyio.to_thread.run_sync(watcher.schedule_mount, root, point)
        except OSError as exc:
            log.warning("cannot watch the file system mounted at %s: %s", point, exc.strerror or exc)
            self._request_reconcile(f"a mount at {point} cannot be watched")

    # -- reloading --------------------------------------------------------------------------------

    async def _reload(self) -> None:
        """SIGHUP: re-read the config file; apply its roots and settings, or keep the old ones if it is bad."""
        self.reload_requested = False
        source = self.config_path or config_mod.default_config_path() or "(no config file)"
        try:
            config, roots = await anyio.to_thread.run_sync(_load_config, self.config_path, self.cli_roots)
        except (OcidxError, OSError) as exc:
            message = exc.message if isinstance(exc, OcidxError) else str(exc)
            log.error(
                "SIGHUP: not reloading, the configuration is invalid (%s); keeping the running one",
                message,
                extra=_fields(event="reload_failed", config=source, error=message),
            )
            return
        old, self.config = self.config, config
        self.settings = config.daemon
        if self.scanner is not None:
            self.scanner.config = config
        if config.database != old.database:
            log.warning(
                "SIGHUP: [database] path changed to %s; the daemon keeps %s until it is restarted",
                config.database,
                self.db_path,
                extra=_fields(event="reload_database_ignored", database=config.database),
            )
        before = {root.path: root for root in self.roots}
        after = {root.path: root for root in roots}
        removed = [path for path in before if path not in after or before[path] != after[path]]
        added = [path for path in after if path not in before or before[path] != after[path]]
        self.roots = roots
        # find trusts the index for watched roots only: the removed ones are walked again from now on.
        await self._db(functools.partial(_record_watched, roots=roots))
        if config.fleet != old.fleet:
            log.warning(
                "SIGHUP: [fleet] changed; the daemon keeps publishing as at start-up until it is restarted",
                extra=_fields(event="reload_fleet_ignored"),
            )
        if config.metrics != old.metrics:
            log.warning(
                "SIGHUP: [metrics] changed; the daemon keeps exposing them as at start-up until it is restarted",
                extra=_fields(event="reload_metrics_ignored"),
            )
        watcher = self.watcher
        for path in removed:
            self.pending_roots.discard(path)
            if watcher is not None:
                await anyio.to_thread.run_sync(watcher.unschedule, path)
                await anyio.to_thread.run_sync(watcher.unschedule_mounts_below, path)
        self.pending_roots.update(added)
        if watcher is not None and added:
            # Too many new directories for inotify: the next mode check falls back to polling.
            self.mode_check_due = time.monotonic()
            await self._schedule_pending()
        # Names and limits decide what is stored for every layout: a changed policy re-reads them all.
        self.full_pass_due = (old.familiar, old.limits) != (config.familiar, config.limits)
        log.info(
            "SIGHUP: configuration reloaded from %s: %d roots (%d added, %d removed)%s",
            source,
            len(roots),
            len(added),
            len(removed),
            "; names or limits changed: re-reading every layout" if self.full_pass_due else "",
            extra=_fields(event="reloaded", config=source, added=added, removed=removed),
        )
        self._request_reconcile("configuration reloaded")

    # -- scanning ---------------------------------------------------------------------------------

    async def _reconcile(self, why: str) -> None:
        scanner = self.scanner
        assert scanner is not None
        started = time.perf_counter()
        full, self.full_pass_due = self.full_pass_due, False
        try:
            async with anyio.create_task_group() as tg:
                self.passing = True
                tg.start_soon(self._serve_during_pass)
                try:
                    counts = await scanner.full_pass(self.roots, full=full)
                finally:
                    self.passing = False
                    self.changes.set()  # the companion task finishes the batch in hand and returns
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):  # raised as itself
                raise group.exceptions[0] from None
            raise
        self.last_pass_s = time.perf_counter() - started
        ended_ns = time.time_ns()
        await self._set_row(last_reconcile_ns=ended_ns)
        self._log_counts("reconcile", counts, time.perf_counter() - started, why)
        if self.metrics is not None:
            self.metrics.passed(counts, self.last_pass_s, reconcile=True, ended_ns=ended_ns)
            await self._publish_metrics()
        self.racy = await self._db(_racy_layouts)

    async def _serve_during_pass(self) -> None:
        """Beside a reconcile pass: index the changes watchdog reports as they come, debounced as
        between passes, so that no step of the pass holds them back (a walk, the stat of every
        layout, worker processes starting, all awaited by the pass while this loop runs). The
        writer queues their transactions between the pass's; the pass's own decisions about those
        layouts were taken from an older state, and compare-and-set sends them back to be examined
        again."""
        self.changes = anyio.Event()
        if self.wake.is_set():
            self.changes.set()  # reported after the loop drained, before the pass began
        while True:
            await self.changes.wait()
            if not self.passing:
                return
            self.changes = anyio.Event()
            if self.settings.debounce_ms:
                await anyio.sleep(self.settings.debounce_ms / 1000)
            await self._serve_changes()

    async def _drain(self) -> Pending:
        """What watchdog reported since the last drain, counted in the metrics, mounts seen to."""
        pending = self.dirty.drain()
        if self.metrics is not None:
            self.metrics.watched(len(pending.layouts) + len(pending.trees))
            self.metrics.lost(len(pending.lost))
        if pending.mounts:
            await self._mounts_changed(pending)
        return pending

    async def _serve_changes(self) -> None:
        """Index the changes watchdog reported during a reconcile pass (those since the last call)."""
        if not self.wake.is_set():
            return
        self.woke = time.monotonic()
        if not self.reconcile_reasons and not self.reload_requested:
            self.wake = anyio.Event()  # else the loop wakes for them once the pass is done
        pending = await self._drain()
        if pending.lost:
            self._request_reconcile(f"events were lost ({', '.join(pending.lost)})")
        await self._process(pending)

    async def _process(self, pending: Pending) -> None:
        scanner = self.scanner
        assert scanner is not None
        paths = set(pending.layouts)
        if paths:
            # An index.json hard-linked into other layouts changed for them too, but inotify reports
            # a write only through the directory it was made in: find them by the file's identity.
            paths.update(await self._db(functools.partial(_sharing_index_file, paths=sorted(paths))))
        now_ns = time.time_ns()
        due = [path for path, when in self.racy.items() if when <= now_ns]
        paths.update(due)
        if pending.trees:
            trees = outermost(pending.trees.values())
            tops = [root.path for root in self.roots]
            paths.update(await anyio.to_thread.run_sync(_discover_trees, trees, tops))
            paths.update(await self._db(functools.partial(_stored_under, trees=[t.path for t in trees])))
        if not paths:
            return
        started = time.perf_counter()
        ordered = sorted(paths)
        counts = await scanner.process(ordered)
        self._log_counts("update", counts, time.perf_counter() - started, None)
        if self.metrics is not None:
            woken = bool(pending.layouts or pending.trees)  # not only the racy re-checks of a timer
            latency = time.monotonic() - self.woke if woken else None
            self.metrics.passed(counts, latency, reconcile=False, ended_ns=time.time_ns())
        for path in ordered:
            self.racy.pop(path, None)
        self.racy.update(await self._db(functools.partial(_racy_layouts, paths=ordered)))

    def _log_counts(self, what: str, counts: Counts, seconds: float, why: str | None) -> None:
        for message in counts.error_messages[:20]:
            self._report_layout(message)
        changed = counts.changed or counts.removed or counts.errors
        routine = what != "reconcile" or why in ("periodic", "polling")
        level = logging.INFO if (changed or not routine) else logging.DEBUG
        reason = f" ({why})" if why else ""
        named = "".join(
            f"; {label}: {_some(paths, count)}"
            for label, paths, count in (
                ("changed", counts.changed_paths, counts.changed),
                ("removed", counts.removed_paths, counts.removed),
            )
            if count
        )
        log.log(
            level,
            "%s%s: %s looked at in %.3fs: %d changed, %d unchanged, %d with errors, %d removed%s",
            what,
            reason,
            _layouts(counts.seen),
            seconds,
            counts.changed,
            counts.unchanged,
            counts.errors,
            counts.removed,
            named,
            extra=_fields(
                event=what,
                reason=why,
                **counts.to_json(seconds),
                changed_layouts=counts.changed_paths[:LOGGED_PATHS],
                removed_layouts=counts.removed_paths[:LOGGED_PATHS],
            ),
        )

    def _report_layout(self, message: str) -> None:
        if message.startswith("root ") and ("No such file" in message or message.endswith(" is not a directory")):
            # A missing root: said once (the same words as the watcher's check), not on every poll.
            path = message[len("root ") :].rpartition(": ")[0] or message[len("root ") : -len(" is not a directory")]
            self._report(_root_problem(path) or message)
        else:
            log.warning("%s", message, extra=_fields(event="layout_error"))

    async def _main(self) -> None:
        await self._choose_mode()
        await self._guarded(self._reconcile, "start-up")
        # What the start-up pass left alive (modules, caches) lives as long as the daemon: kept out of
        # the collector's full passes, which a reconcile's temporary objects set off every few passes.
        gc.collect()
        gc.freeze()
        log.info("ready: %s", self.mode, extra=_fields(event="ready", watch_mode=self.mode, pid=os.getpid()))
        self.mode_check_due = time.monotonic() + self.settings.reconcile_s  # counted just before the pass
        self._schedule_next_reconcile()
        self.health_due = time.monotonic() + HEALTH_INTERVAL_S
        while True:
            await self._wait()
            if self.reload_requested:
                await self._reload()
                self._schedule_next_reconcile()
            now = time.monotonic()
            if self.wake.is_set():
                self.woke = now
                self.wake = anyio.Event()
                if self.settings.debounce_ms and not self.reconcile_reasons:
                    await anyio.sleep(self.settings.debounce_ms / 1000)
            if now >= self.health_due:
                self.health_due = now + HEALTH_INTERVAL_S
                await self._check_health()
            if now >= self.mode_check_due:
                self.mode_check_due = now + self.settings.reconcile_s
                self._check_mode_later()
            await self._apply_count()
            pending = await self._drain()
            reasons = list(self.reconcile_reasons) + pending.lost
            self.reconcile_reasons.clear()
            if time.monotonic() >= self.reconcile_due:
                reasons.append("periodic" if self.mode == "inotify" else "polling")
            if reasons:
                if pending.lost:
                    log.warning(
                        "events were lost (%s): reconciling now",
                        ", ".join(pending.lost),
                        extra=_fields(event="events_lost", reasons=pending.lost),
                    )
                if pending.layouts or pending.trees:
                    await self._guarded(self._process, pending)  # first: the pass would hold them back
                await self._guarded(self._reconcile, ", ".join(reasons))
                self._schedule_next_reconcile()
            else:
                await self._guarded(self._process, pending)

    def _schedule_next_reconcile(self) -> None:
        period = self.settings.reconcile_s if self.mode == "inotify" else self._poll_interval()
        self.reconcile_due = time.monotonic() + period

    async def _wait(self) -> None:
        """Sleep until woken, or the next reconcile, health check or racy re-check is due."""
        now = time.monotonic()
        deadline = min(self.reconcile_due, self.health_due if self.watcher is not None else self.reconcile_due)
        if self.racy:
            # Racy layouts written in a burst come due one after another: take them in groups.
            first_ns = min(self.racy.values()) + RACY_GROUP_NS
            deadline = min(deadline, now + max(0.0, (first_ns - time.time_ns()) / 1e9))
        with anyio.move_on_after(max(0.0, deadline - now)):
            await self.wake.wait()

    async def _guarded(self, step: Callable[[T], Awaitable[None]], arg: T) -> None:
        """Run one scan step; a corrupt database is rebuilt, a busy one retried."""
        try:
            await step(arg)
        except (sqlite3.DatabaseError, BaseExceptionGroup) as raised:
            # The scanner's passes run in task groups, which wrap what they raise.
            exc = only_database_errors(raised)
            if exc is None:
                raise
            if is_corruption(exc):
                await self._rebuild(str(exc))
                return
            log.warning(
                "database error, retrying in %.0fs: %s",
                RETRY_DELAY_S,
                exc,
                extra=_fields(event="database_error", error=str(exc)),
            )
            await anyio.sleep(RETRY_DELAY_S)
            self._request_reconcile("retry after a database error")

    async def _rebuild(self, reason: str) -> None:
        scanner = self.scanner
        assert scanner is not None
        with contextlib.suppress(sqlite3.Error):
            await scanner.abandon()
        self.scanner = None
        moved = await anyio.to_thread.run_sync(move_aside, self.db_path)
        log.error(
            "database %s became corrupt (%s): moved it to %s and rebuilding the index",
            self.db_path,
            reason,
            moved,
            extra=_fields(event="database_corrupt", database=self.db_path, moved_to=moved, reason=reason),
        )
        self.scanner = await anyio.to_thread.run_sync(Scanner, self.db_path, self.config)
        mode, self.mode = self.mode, "rebuilding"
        await self._write_start_row()
        await self._set_mode(mode)
        self._request_reconcile("the database was rebuilt")


def _forced_polling() -> bool:
    """Whether the environment asks for watching by reconcile only (OCIDX_WATCH_MODE=polling)."""
    return os.environ.get(WATCH_MODE_ENV, "").strip().lower() == "polling"


def _load_config(config_path: str | None, cli_roots: tuple[str, ...]) -> tuple[Config, list[Root]]:
    """The config file read again and the roots it gives with the command line's (resolved)."""
    config = config_mod.load(config_path)
    roots = [_resolved(root) for root in roots_for(config, cli_roots)]
    if not roots:
        raise UsageError("the new config names no roots and none was given on the command line")
    return config, roots


def _record_watched(conn: sqlite3.Connection, *, roots: list[Root]) -> None:
    """The daemon watches *roots* (and no other recorded root) from now on (indexer.store.state)."""
    conn.execute("UPDATE daemon SET roots = ? WHERE id = 1", (roots_mod.merged(conn, roots, watched=True),))


def _root_problem(path: str) -> str | None:
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


def _layouts(count: int) -> str:
    """``1 layout``, ``3 layouts``."""
    return f"{count} layout" if count == 1 else f"{count} layouts"


def _some(paths: list[str], count: int) -> str:
    """The paths of a small batch, or the first few and how many more for a big one."""
    shown = paths[:LOGGED_PATHS_SHOWN] if count > LOGGED_PATHS else paths
    more = count - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _resolved(root: Root) -> Root:
    from indexer.config import Root

    return Root(os.path.realpath(root.path), max_depth=root.max_depth, follow_symlinks=root.follow_symlinks)


def _discover_trees(trees: list[Root], tops: list[str]) -> list[str]:
    """The layouts below each changed directory of a root (*tops*: the roots' real paths).

    A directory that is now a symlink leading out of every root (a layout directory replaced by
    ``ln -s /elsewhere``) is not followed unless its root follows symlinks: discovery resolves the
    directory it starts from, which is right for a root, not for a name below one.
    """
    prefixes = [top.rstrip("/") + "/" for top in tops]
    found: list[str] = []
    for tree in trees:
        if not os.path.isdir(tree.path):
            continue
        real = os.path.realpath(tree.path)
        if real != tree.path and not tree.follow_symlinks and not any(real.startswith(p) for p in prefixes):
            continue
        found.extend(discover(tree))
    return found


def outermost(trees: Iterable[Root]) -> list[Root]:
    """*trees* without those inside another of them (an ``rm -r`` reports every directory it removes).

    Trees of one root reach the same depth below it, so an ancestor covers its descendants.
    """
    by_path = {tree.path: tree for tree in trees}
    kept = []
    for path, tree in by_path.items():
        here = path
        while (parent := os.path.dirname(here)) != here:
            if parent in by_path:
                break
            here = parent
        else:
            kept.append(tree)
    return kept


def _stored_under(conn: sqlite3.Connection, *, trees: list[str]) -> list[str]:
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


def _sharing_index_file(conn: sqlite3.Connection, *, paths: list[str]) -> list[str]:
    """Stored layouts whose ``index.json`` is (by device and inode) a hard link of one at *paths*.

    One ``stat`` per changed layout; the index lookup (``layouts_identity``) only for a file with
    more than one link.
    """
    found: list[str] = []
    for path in paths:
        try:
            st = os.stat(os.path.join(path, "index.json"))
        except OSError:
            continue
        if st.st_nlink < 2:
            continue
        rows = conn.execute("SELECT path FROM layouts WHERE dev = ? AND ino = ?", (st.st_dev, st.st_ino))
        found.extend(other for other in map(path_of, (row[0] for row in rows)) if other != path)
    return found


def _racy_layouts(conn: sqlite3.Connection, paths: list[str] | None = None) -> dict[str, int]:
    """Layouts (all, or those at *paths*) whose stored identity is racily clean, and when (wall clock, ns)
    a re-read will settle it."""
    settles = db.SETTLES_AT_SQL
    query = (
        f"SELECT path, {settles} FROM layouts "
        f"WHERE mtime_ns IS NOT NULL AND read_ns IS NOT NULL AND {settles} > read_ns"
    )
    found: dict[str, int] = {}
    chunks = [None] if paths is None else [paths[i : i + 500] for i in range(0, len(paths), 500)]
    for chunk in chunks:
        if chunk is None:
            rows = conn.execute(query)
        else:
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"{query} AND path IN ({marks})", tuple(map(path_value, chunk)))
        found.update((path_of(path), settles_at + RACY_MARGIN_NS) for path, settles_at in rows)
    found.update(db.retries(conn, paths))  # reads that failed for the environment's sake: after their backoff
    return found


def run_daemon(*, db: str | None, config_path: str | None, roots: list[str], log_format: str | None) -> int:
    """``ocidx daemon``: lock the database, then watch and index until SIGTERM/SIGINT; the exit code."""
    config = config_mod.load(config_path)
    handler = setup_logging(log_format or config.daemon.log_format)
    try:
        db_path = os.path.abspath(config_mod.database_path(db, config))
        daemon_roots = roots_for(config, roots)
        if not daemon_roots:
            raise UsageError("no roots to watch: name one (ocidx daemon ROOT) or add [[roots]] to the config")
        lock = DatabaseLock(db_path)
        lock.acquire()
        try:
            daemon = Daemon(db_path, config, daemon_roots, config_path=config_path, cli_roots=tuple(roots))
            return anyio.run(daemon.run, backend="asyncio")
        finally:
            lock.release()
    finally:
        logging.getLogger().removeHandler(handler)
