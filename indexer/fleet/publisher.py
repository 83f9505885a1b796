"""Publishing a host's SQLite index to the fleet database, as whole layouts (docs/fleet.md).

The SQLite writer stamps every change with a version (``layouts.version``,
``layout_removals``, the counter ``ocidx_counters.version``), handed out under
its write lock, so that a read transaction that sees the counter at W has seen
every change with a version up to W. The publisher follows those versions:

* on every (re)connect it reconciles: the host's layout paths, ids, versions and
  content hashes in PostgreSQL against SQLite's; what differs is published, what
  PostgreSQL has and SQLite does not is deleted; its watermark becomes the
  counter it read;
* then, polling SQLite, it publishes the layouts with a version above its
  watermark and the removals above it, in one PostgreSQL transaction per batch:
  a layout's rows replace its previous rows, and the host row's watermark moves
  in the same transaction, so a retry of a batch whose commit was lost is
  harmless;
* a watermark below ``removals_pruned_through`` (the writer keeps the newest
  10,000 removals), a counter below the watermark or a database file replaced
  under it means a reconcile again.

Versions only mean something within one life of each database. The SQLite index
has an incarnation (``ocidx_incarnation``, made with the file) and so has the
fleet database (``ocidx.fleet_incarnation()``: a restore or a failover changes
it); every batch ends by reading the fleet's, and the host row records the
SQLite incarnation its rows came from. A rebuilt index (another incarnation, or
a counter gone back) is published again in full, every row replaced; a restored
fleet database is reconciled. A data-only restore changes neither: once per
``reconcile_s`` the publisher compares counts and a checksum of the host's rows
with SQLite's, and publishes in full when they differ.

It reads SQLite on its own read-only connection in a worker thread
(:mod:`indexer.fleet.local`), so it never holds up local indexing or local
answers, and writes through the functions of schema ``ocidx``
(:mod:`indexer.fleet.publish`); PostgreSQL down, slow, restarted or failed over
means it logs once per change of state, retries with exponential backoff
(capped), and catches up. Its state (connected or why not, watermark, last publish) is kept in
SQLite's ``fleet_publisher`` row for ``ocidx status`` and in PostgreSQL (the
host row and its heartbeat, with the backlog).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import time

import anyio

from indexer.errors import DatabaseError, FleetUnavailable
from indexer.fleet.connection import describe_dsn, failure
from indexer.fleet.local import (
    BATCH_LAYOUTS,
    Changes,
    LocalIndex,
    backlog_of,
    read_all,
    read_changes,
    read_some,
    read_summary,
)
from indexer.fleet.publish import (
    LOCK_TIMEOUT_S,
    STATEMENT_TIMEOUT_S,
    FleetReplaced,
    check_publisher,
    connect_publisher,
    publish_rows,
    remote_layouts,
    remote_state,
    remote_summary,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    import psycopg

log = logging.getLogger("ocidx.fleet")

POLL_S = 0.1  # how often SQLite's version counter is looked at
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
BATCH_TIMEOUT_S = 120.0  # a batch PostgreSQL has not committed by then counts as a lost connection
RECONCILE_S = 300.0  # the default of [daemon] reconcile_interval_s: how often the rows are checked
CONNECTED = "connected"


class PublisherState:
    """What a publisher says of itself: its state (``connected``, or why not), logged once per change,
    and recorded with its watermark in SQLite's ``fleet_publisher`` row (for ``ocidx status``) through
    *record*; its backlog, handed to *on_backlog*."""

    def __init__(
        self,
        dsn: str,
        *,
        record: Callable[[Callable[[sqlite3.Connection], None]], Awaitable[None]] | None = None,
        on_backlog: Callable[[int], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.record = record  # runs a write on the daemon's SQLite writer (serialized with its batches)
        self.on_backlog = on_backlog
        self.state = "starting"
        self.host: str | None = None
        self.watermark = 0
        self.backlog = 0

    async def _set_state(self, state: str, **extra: object) -> None:
        """Record a change of state in the log (once) and in SQLite's fleet_publisher row."""
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state == "stopped":
            pass
        elif state == CONNECTED:
            log.info(
                "fleet: publishing to %s as host %s",
                describe_dsn(self.dsn),
                self.host,
                extra={"fields": {"event": "fleet_connected", "host": self.host}},
            )
        else:
            log.warning(
                "fleet: not publishing (%s); indexing goes on locally, %d changes waiting",
                state,
                self.backlog,
                extra={"fields": {"event": "fleet_disconnected", "reason": state, "was": previous, **extra}},
            )
        await self._record_row()

    async def _record_row(self, published: bool = False) -> None:
        if self.record is None:
            return
        from indexer.store.state import record_publisher

        write = functools.partial(
            record_publisher,
            host=self.host,
            state=self.state,
            now_ns=time.time_ns(),
            watermark=self.watermark,
            published=published,
        )
        try:
            await self.record(write)
        except sqlite3.Error as exc:
            log.warning("fleet: publisher state not recorded locally: %s", exc)

    def _set_backlog(self, backlog: int) -> None:
        self.backlog = backlog
        if self.on_backlog is not None:
            self.on_backlog(backlog)


class Publisher(PublisherState):
    """The daemon's publishing duty: follow SQLite's versions into the fleet database, forever."""

    def __init__(
        self,
        dsn: str,
        db_path: str,
        *,
        heartbeat_s: float = 5.0,
        record: Callable[[Callable[[sqlite3.Connection], None]], Awaitable[None]] | None = None,
        batch_layouts: int = BATCH_LAYOUTS,
        on_backlog: Callable[[int], None] | None = None,
        reconcile_s: float = RECONCILE_S,
    ) -> None:
        super().__init__(dsn, record=record, on_backlog=on_backlog)
        self.sqlite = LocalIndex(db_path)
        self.heartbeat_s = heartbeat_s
        self.batch_layouts = batch_layouts
        self.reconcile_s = reconcile_s  # at least this often, the host's rows are checked (counts, checksum)
        self.published_batches = 0
        self.sqlite_incarnation: str | None = None  # the index's, as the rows in PostgreSQL were made from
        self.fleet_incarnation: str | None = None  # the fleet database's, as last reconciled against
        self.checked_at = 0.0  # time.monotonic() of the last check of the rows (or reconcile)

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        conn, self.host = await connect_publisher(self.dsn)
        try:
            await check_publisher(conn, self.host)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def _publish(
        self, conn: psycopg.AsyncConnection[tuple[Any, ...]], changes: Changes | None, *, fleet: str | None
    ) -> None:
        """One batch of *changes* (None: a heartbeat alone), committed within BATCH_TIMEOUT_S."""
        with anyio.fail_after(BATCH_TIMEOUT_S):
            if changes is None:
                await publish_rows(conn, None, [], watermark=None, backlog=0, incarnation=None, fleet=fleet)
                return
            await publish_rows(
                conn,
                changes.rows,
                changes.removed,
                watermark=changes.through,
                backlog=changes.backlog,
                incarnation=changes.incarnation,
                fleet=fleet,
            )

    async def reconcile(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], *, rewrite: str | None = None) -> None:
        """Make the host's rows in PostgreSQL those of SQLite: publish what differs, delete what SQLite lacks.

        With *rewrite* (why), or when the rows were published from another incarnation of the index, or
        from a later state of it (its counter went back: versions will be handed out again), every row
        of the host is deleted and every layout published again.
        """
        remote_watermark, remote_incarnation, fleet = await remote_state(conn, self.host)
        counter, incarnation, local = await self.sqlite.run(read_all)
        if rewrite is None and remote_incarnation != incarnation:
            rewrite = (
                f"its rows came from another index (incarnation {remote_incarnation}, now {incarnation})"
                if remote_incarnation is not None
                else "the fleet records no index for its rows (never published, or before fleet migration 0003)"
            )
        if rewrite is None and counter < remote_watermark:
            rewrite = f"the index went back from version {remote_watermark} to {counter}"
        remote = await remote_layouts(conn) if rewrite is None else {}
        stale = [path for path in remote if path not in local]
        differ = sorted(values[0] for path, values in local.items() if remote.get(path) != values)
        chunks = [differ[i : i + self.batch_layouts] for i in range(0, len(differ), self.batch_layouts)] or [[]]
        for n, ids in enumerate(chunks):
            rows = await self.sqlite.run(read_some, ids) if ids else None
            last = n == len(chunks) - 1
            backlog = await self.sqlite.run(backlog_of, counter) if last else None
            with anyio.fail_after(BATCH_TIMEOUT_S):
                await publish_rows(
                    conn,
                    rows,
                    [],
                    stale_paths=stale if n == 0 else (),
                    forget=rewrite is not None and n == 0,
                    watermark=counter if last else None,
                    backlog=backlog,
                    incarnation=incarnation,
                    fleet=fleet,
                )
        self.watermark = counter
        self.sqlite_incarnation = incarnation
        self.fleet_incarnation = fleet
        self.checked_at = time.monotonic()
        self._set_backlog(await self.sqlite.run(backlog_of, counter))
        log.info(
            "fleet: reconciled host %s: %s",
            self.host,
            f"{len(differ)} layouts published, {len(stale)} removed"
            if rewrite is None
            else f"every row replaced, {len(differ)} layouts published ({rewrite})",
            extra={
                "fields": {
                    "event": "fleet_reconciled",
                    "published": len(differ),
                    "removed": len(stale),
                    "rewrite": rewrite,
                }
            },
        )
        await self._record_row(published=True)

    async def check(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> bool:
        """Compare the host's rows in PostgreSQL with SQLite (counts, a checksum of the layouts, the watermark
        and incarnation recorded) and publish everything again when they differ (a data-only restore
        keeps the fleet's incarnation). False when SQLite moved meanwhile: nothing was compared."""
        counter, incarnation, local = await self.sqlite.run(read_summary)
        if counter != self.watermark or incarnation != self.sqlite_incarnation:
            return False
        remote, watermark, recorded = await remote_summary(conn)
        differences = local.differences(remote)
        if watermark != self.watermark:
            differences.append(f"watermark {self.watermark}/{watermark}")
        if recorded != self.sqlite_incarnation:
            differences.append(f"incarnation {self.sqlite_incarnation}/{recorded}")
        self.checked_at = time.monotonic()
        if differences:
            why = f"its rows differ from the index (here/in the fleet: {', '.join(differences)})"
            log.warning(
                "fleet: host %s: %s; a restored fleet database? publishing every layout again",
                self.host,
                why,
                extra={"fields": {"event": "fleet_rows_differ", "differences": differences}},
            )
            await self.reconcile(conn, rewrite=why)
        return True

    async def follow(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """Publish each change above the watermark as it commits locally; return only by raising."""
        beat_due = time.monotonic() + self.heartbeat_s
        while True:
            try:
                if await self.sqlite.replaced():
                    self.sqlite.close()
                    await self.reconcile(conn)
                    continue
                changes: Changes = await self.sqlite.run(read_changes, self.watermark, self.batch_layouts)
                if changes.incarnation != self.sqlite_incarnation:
                    log.warning(
                        "fleet: the index was rebuilt (incarnation %s, now %s): publishing every layout again",
                        self.sqlite_incarnation,
                        changes.incarnation,
                        extra={"fields": {"event": "fleet_index_rebuilt"}},
                    )
                    await self.reconcile(conn)
                    continue
                if changes.full:
                    await self.reconcile(conn)
                    continue
                if changes.rows is not None or changes.removed:
                    await self._publish(conn, changes, fleet=self.fleet_incarnation)
                    self.watermark = changes.through
                    self.published_batches += 1
                    self._set_backlog(changes.backlog)
                    beat_due = time.monotonic() + self.heartbeat_s
                    await self._record_row(published=True)
                    continue  # more may be waiting: no sleep between batches
                if time.monotonic() >= self.checked_at + self.reconcile_s and not await self.check(conn):
                    continue  # the index moved under the check: publish that first, then check
                if time.monotonic() >= beat_due:
                    await self._publish(conn, None, fleet=self.fleet_incarnation)
                    beat_due = time.monotonic() + self.heartbeat_s
            except FleetReplaced as exc:
                log.warning(
                    "fleet: the fleet database was restored or replaced (incarnation %s, now %s): reconciling host %s",
                    exc.expected,
                    exc.found,
                    self.host,
                    extra={"fields": {"event": "fleet_replaced"}},
                )
                await self.reconcile(conn)
                continue
            await anyio.sleep(POLL_S)

    async def run(self) -> None:
        """Connect, reconcile, follow; on any failure log it, back off and start again (until cancelled)."""
        import psycopg

        delay = BACKOFF_FIRST_S
        try:
            while True:
                conn = None
                try:
                    conn = await self._connect()
                    await self.reconcile(conn)
                    await self._set_state(CONNECTED)
                    delay = BACKOFF_FIRST_S
                    await self.follow(conn)
                except (psycopg.Error, OSError, TimeoutError, FleetUnavailable, FleetReplaced) as exc:
                    if isinstance(exc, FleetUnavailable):
                        why = exc.message
                    elif isinstance(exc, TimeoutError):
                        why = f"PostgreSQL did not answer within {BATCH_TIMEOUT_S:g}s"
                    else:
                        why = failure(exc, lock_s=LOCK_TIMEOUT_S, statement_s=STATEMENT_TIMEOUT_S)
                    with contextlib.suppress(sqlite3.Error, DatabaseError):
                        self._set_backlog(await self.sqlite.run(backlog_of, self.watermark))
                    await self._set_state(f"unreachable: {why}" if isinstance(exc, psycopg.OperationalError) else why)
                except (DatabaseError, sqlite3.Error) as exc:  # the local index is unreadable (being rebuilt?)
                    self.sqlite.close()
                    why = exc.message if isinstance(exc, DatabaseError) else str(exc)
                    await self._set_state(f"local index unreadable: {why}")
                finally:
                    if conn is not None:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            await conn.close()
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP_S)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._set_state("stopped")
            self.sqlite.close()
