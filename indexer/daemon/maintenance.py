"""The maintenance duty: keep the WAL and the database file bounded (:mod:`indexer.store.maintenance`),
and warn while a reader pins the WAL."""

from __future__ import annotations

import functools
import logging
import sqlite3
import time

import anyio

from indexer.daemon.logs import fields
from indexer.store import maintenance

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")
MIB = 1024 * 1024


class Maintenance:
    """The maintenance duty: one run every heartbeat interval."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.pinned_since: float | None = None  # when a reader was first seen pinning the WAL
        self.warned = False

    async def run(self) -> None:
        """Maintain until cancelled."""
        while True:
            await anyio.sleep(self.shared.config.daemon.heartbeat_s)
            store = self.shared.store
            try:
                done = await store.run(functools.partial(maintenance.maintain, db_path=store.path))
            except sqlite3.Error as exc:
                log.warning("database maintenance not done: %s", exc)
                continue
            self._report(done)

    def _report(self, done: maintenance.Maintenance) -> None:
        db_path = self.shared.db_path
        if done.pinned:
            if self.pinned_since is None:
                self.pinned_since = time.monotonic()
            if not self.warned and done.wal_bytes > maintenance.WAL_LIMIT_BYTES:
                self.warned = True
                pids = maintenance.holders(db_path)
                held = f"; processes with it open: {', '.join(map(str, pids))}" if pids else ""
                log.warning(
                    "the WAL of %s is %.1f MiB and cannot be checkpointed: a reader has kept one read "
                    "transaction open for at least %.0f s%s",
                    db_path,
                    done.wal_bytes / MIB,
                    time.monotonic() - self.pinned_since,
                    held,
                    extra=fields(event="wal_pinned", wal_bytes=done.wal_bytes, pids=pids),
                )
        elif self.pinned_since is not None:
            if self.warned:
                log.info(
                    "the WAL of %s is checkpointed again: %.1f MiB, was %.1f MiB",
                    db_path,
                    done.wal_bytes / MIB,
                    done.wal_bytes_before / MIB,
                    extra=fields(event="wal_released", wal_bytes=done.wal_bytes),
                )
            self.pinned_since = None
            self.warned = False
        if done.freed_pages:
            log.debug("returned %d free pages of %s", done.freed_pages, db_path)
