"""The daemon's wiring: one task group of duties around the store's one writer.

::

    signals ── SIGTERM/SIGINT: cancel the work, then shut down (bounded); SIGHUP: reload
       │
    ┌──┴─ a generation (one store; a rebuilt database starts the next one) ────────────────────┐
    │  watching ──WAKE──▶ changes ◀──Sync── barrier ◀── lookups (<db>.sock)                    │
    │     │                  │  ▲                                                              │
    │     └──requests──▶ reconcile ──RECHECK                                                   │
    │                        │  │                                                              │
    │  heartbeat, maintenance, publishing        reports ◀── PassReport (log, metrics)         │
    │                        ▼  ▼                                                              │
    │                   store: Store.unit ─▶ the one writer (BEGIN IMMEDIATE … COMMIT)         │
    └──────────────────────────────────────────────────────────────────────────────────────────┘

Each duty is a module of this package with a plain loop over its own trigger (docs/design.md has
the table). Duties that others depend on are started with ``tg.start`` (reports, watching, changes,
the barrier); the others with ``start_soon``. A duty that finds the database corrupt, or deleted
under the daemon, raises :class:`~indexer.daemon.database.Rebuild`: the generation's task group ends,
the store is made anew, and the next generation starts with a full pass.

SIGTERM and SIGINT cancel the work in hand: a unit being written commits (the store's calls are
shielded), then the row gets ``stopped_ns`` and the workers and the connections are closed, which
gives up after :data:`SHUTDOWN_S` (a unit in hand is not counted in it: it commits or rolls back
first). The signal receiver stays installed until the shutdown is done, then SIGTERM and SIGINT are
ignored until the process exits, so a second SIGTERM (what ``timeout`` and many supervisors send)
is noted, not fatal. SIGHUP re-reads the configuration (roots
watched again, settings applied; an invalid file is logged and the running configuration kept).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sqlite3
import time

import anyio
import anyio.to_thread

from indexer import config as config_mod
from indexer.daemon.barrier import Barrier
from indexer.daemon.changes import Changes
from indexer.daemon.database import Rebuild, open_store, persist, reopen
from indexer.daemon.heartbeat import heartbeat
from indexer.daemon.logs import fields
from indexer.daemon.maintenance import Maintenance
from indexer.daemon.publishing import publish
from indexer.daemon.reconcile import Reconcile
from indexer.daemon.reports import Reports
from indexer.daemon.shared import Shared
from indexer.daemon.watching import Watching
from indexer.errors import OcidxError, UsageError
from indexer.scan.discovery import roots_for
from indexer.scan.scanner import Scanner
from indexer.store import exposure_warning, state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from indexer.config import Config, Root
    from indexer.daemon.lock import DatabaseLock

log = logging.getLogger("ocidx.daemon")

# Shutdown (the stop recorded, workers and connections closed) gives up after this long.
SHUTDOWN_S = 10.0


class Daemon:
    """One daemon on one database (its lock held by the caller), until SIGTERM or SIGINT."""

    def __init__(
        self,
        db_path: str,
        config: Config,
        roots: list[Root],
        *,
        config_path: str | None = None,
        cli_roots: tuple[str, ...] = (),
        lock: DatabaseLock | None = None,
    ) -> None:
        self.db_path = db_path
        self.config = config
        self.roots = [resolved(root) for root in roots]
        self.config_path = config_path
        self.cli_roots = cli_roots
        self.lock = lock
        self.shared: Shared | None = None
        metrics = None
        if config.metrics.enabled:
            from indexer.daemon.metrics import Metrics

            metrics = Metrics(config.metrics, db_path)
        self.reports = Reports(metrics)
        self._work: anyio.CancelScope | None = None  # the duties' scope: a signal cancels it
        self._reloads_in: MemoryObjectReceiveStream[None] | None = None
        self._reload: MemoryObjectSendStream[None] | None = None

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; the exit code."""
        self._work = anyio.CancelScope()
        self._reload, self._reloads_in = anyio.create_memory_object_stream[None](math.inf)
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self._signals, signals, self._work, self._reload)
                    try:
                        with self._work:
                            await self._serve()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await self._shutdown()
                        outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            # Leaving the receiver put back the default action (death by signal); the daemon has
            # stopped, so a signal from here to the process's exit (a supervisor's second SIGTERM,
            # sent while the event loop is torn down) has nothing left to stop and must not turn a
            # clean exit into a death by signal.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
            self._reload.close()
            self._reloads_in.close()
        return 0

    async def _signals(
        self, signals: AsyncIterator[int], work: anyio.CancelScope, reload: MemoryObjectSendStream[None]
    ) -> None:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not stopping:
                    reload.send_nowait(None)  # systemd's ExecReload convention
                continue
            if stopping:
                log.info("received %s again: already stopping", name, extra=fields(event="stopping", signal=name))
                continue
            stopping = True
            log.info(
                "received %s: finishing the batch in hand and stopping",
                name,
                extra=fields(event="stopping", signal=name),
            )
            work.cancel()

    async def _serve(self) -> None:
        """Run generations of duties, each on one store, until cancelled."""
        with anyio.CancelScope(shield=True):  # a signal now still leaves a store to close
            store = await anyio.to_thread.run_sync(open_store, self.db_path)
        generation = 0
        while True:
            shared = Shared(self.db_path, self.config, self.roots, store, Scanner(store, self.config))
            self.shared = shared
            try:
                await self._generation(shared, generation)
                return
            except BaseException as raised:
                rebuild = _rebuild_in(raised)
                if rebuild is None:
                    raise
            finally:
                shared.close()
            with anyio.CancelScope(shield=True):
                await shared.scanner.aclose()
                store = await anyio.to_thread.run_sync(reopen, shared.store, rebuild)
            generation += 1

    async def _generation(self, shared: Shared, generation: int) -> None:
        await persist(
            shared,
            "the daemon row",
            state.record_start,
            pid=shared.pid,
            now_ns=time.time_ns(),
            mode=shared.mode,
            roots=shared.roots,
        )
        watching = Watching(shared, self.reports)
        async with anyio.create_task_group() as tg:
            await tg.start(self.reports.run, shared)
            await tg.start(watching.run)
            await tg.start(Changes(shared, watching).run)
            tg.start_soon(Reconcile(shared).run)
            tg.start_soon(heartbeat, shared, self.lock, self.reports)
            tg.start_soon(Maintenance(shared).run)
            tg.start_soon(publish, shared, self.reports)
            await tg.start(Barrier(shared).run)
            await tg.start(self._reloads, shared, watching)
            if generation == 0:
                log.info(
                    "ocidx daemon %d started on %s, roots: %s",
                    os.getpid(),
                    self.db_path,
                    ", ".join(root.path for root in shared.roots),
                    extra=fields(event="started", pid=os.getpid(), database=self.db_path),
                )
                if (exposed := exposure_warning(self.db_path)) is not None:  # docs/operations.md, Permissions
                    log.warning("%s", exposed, extra=fields(event="database_exposed", database=self.db_path))

    async def _shutdown(self) -> None:
        shared, self.shared = self.shared, None
        with anyio.move_on_after(SHUTDOWN_S) as scope:
            if shared is not None:
                now = time.time_ns()
                try:
                    await shared.store.unit(state.update_daemon, pid=shared.pid, stopped_ns=now, heartbeat_ns=now)
                except sqlite3.Error as exc:
                    log.error("could not record the stop in the database: %s", exc)
                await shared.scanner.aclose()
                await shared.store.aclose()
        if scope.cancelled_caught:
            log.error("stopping took longer than %.0fs: leaving the rest to the system", SHUTDOWN_S)
        log.info("ocidx daemon %d stopped", os.getpid(), extra=fields(event="stopped", pid=os.getpid()))

    # -- reloading ----------------------------------------------------------------------------------

    async def _reloads(
        self, shared: Shared, watching: Watching, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        receive = self._reloads_in
        assert receive is not None
        task_status.started()
        async for _ in receive:
            await self._apply_reload(shared, watching)

    async def _apply_reload(self, shared: Shared, watching: Watching) -> None:
        """SIGHUP: re-read the config file; apply its roots and settings, or keep the old ones if it is bad."""
        source = self.config_path or config_mod.default_config_path() or "(no config file)"
        try:
            config, roots = await anyio.to_thread.run_sync(load_config, self.config_path, self.cli_roots)
        except (OcidxError, OSError) as exc:
            message = exc.message if isinstance(exc, OcidxError) else str(exc)
            log.error(
                "SIGHUP: not reloading, the configuration is invalid (%s); keeping the running one",
                message,
                extra=fields(event="reload_failed", config=source, error=message),
            )
            return
        old = shared.config
        self.config = shared.config = config
        shared.scanner.config = config
        for changed, what, event in (
            (config.database != old.database, f"[database] path changed to {config.database}", "database"),
            (config.fleet != old.fleet, "[fleet] changed", "fleet"),
            (config.metrics != old.metrics, "[metrics] changed", "metrics"),
        ):
            if changed:
                log.warning(
                    "SIGHUP: %s; the daemon keeps the one it started with until it is restarted",
                    what,
                    extra=fields(event=f"reload_{event}_ignored"),
                )
        added, removed = await watching.set_roots(roots)
        self.roots = roots
        # find trusts the index for watched roots only: the removed ones are walked again from now on.
        await persist(shared, "the watched roots", state.record_watched, roots)
        # Names and limits decide what is stored for every layout: a changed policy re-reads them all,
        # and the index cannot vouch for its names until that pass is written.
        shared.full_pass_due = (old.familiar, old.limits) != (config.familiar, config.limits)
        if shared.full_pass_due:
            shared.owe_pass("names or limits changed")
        log.info(
            "SIGHUP: configuration reloaded from %s: %d roots (%d added, %d removed)%s",
            source,
            len(roots),
            len(added),
            len(removed),
            "; names or limits changed: re-reading every layout" if shared.full_pass_due else "",
            extra=fields(event="reloaded", config=source, added=added, removed=removed),
        )
        shared.request_reconcile("configuration reloaded")


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one failure a task group wrapped (a DaemonError, a DatabaseError...), raised as itself for
    the exit codes; the group when it holds more than one."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner if isinstance(inner, Exception) else group


def _rebuild_in(raised: BaseException) -> Rebuild | None:
    """The :class:`Rebuild` that ended a generation (task groups wrap it), or None for anything else."""
    if isinstance(raised, Rebuild):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        found = [_rebuild_in(inner) for inner in raised.exceptions]
        rebuilds = [r for r in found if r is not None]
        others = [e for e, r in zip(raised.exceptions, found, strict=True) if r is None]
        if rebuilds and all(isinstance(e, anyio.get_cancelled_exc_class()) for e in others):
            return rebuilds[0]
    return None


def load_config(config_path: str | None, cli_roots: tuple[str, ...]) -> tuple[Config, list[Root]]:
    """The config file read again and the roots it gives with the command line's (resolved)."""
    config = config_mod.load(config_path)
    roots = [resolved(root) for root in roots_for(config, cli_roots)]
    if not roots:
        raise UsageError("the new config names no roots and none was given on the command line")
    return config, roots


def resolved(root: Root) -> Root:
    """*root* with its path resolved, as discovery compares paths."""
    return config_mod.Root(os.path.realpath(root.path), max_depth=root.max_depth, follow_symlinks=root.follow_symlinks)
