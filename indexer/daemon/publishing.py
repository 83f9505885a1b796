"""The fleet publishing duty: with a fleet DSN, follow the index into PostgreSQL
(:class:`indexer.fleet.publisher.Publisher`), on a read connection of its own, so that PostgreSQL
never holds up indexing or answers; its own state row goes through the store's writer."""

from __future__ import annotations

import logging

from indexer import config as config_mod
from indexer.daemon.database import persist
from indexer.store import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from indexer.daemon.reports import Reports
    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")


async def publish(shared: Shared, reports: Reports) -> None:
    """Publish until cancelled; without a fleet DSN, forget any earlier publisher's state and return."""
    dsn = config_mod.fleet_dsn(shared.config)
    if not dsn:
        await persist(shared, "the fleet's state", state.forget_fleet)  # status shows no stale fleet
        return
    try:
        from indexer.fleet.publisher import Publisher
    except ImportError:
        log.error("fleet: a fleet DSN is set but psycopg is not installed: pip install 'ocidx[fleet]'")
        return

    async def record(fn: Callable[[sqlite3.Connection], None]) -> None:
        await shared.store.unit(fn)

    await Publisher(
        dsn,
        shared.db_path,
        heartbeat_s=shared.config.daemon.heartbeat_s,
        reconcile_s=shared.config.daemon.reconcile_s,  # its check of the host's rows runs as often
        record=record,
        on_backlog=reports.backlog,
    ).run()
