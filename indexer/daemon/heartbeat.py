"""The heartbeat duty: the daemon row's ``heartbeat_ns``, and the check that the database it writes is
still the one at its path.

Every ``daemon.heartbeat_interval_s`` it writes the heartbeat (``find`` and ``status`` judge a daemon
live by it), and first makes sure the path still names the database the store writes: a cleanup job
or an operator's ``rm`` would otherwise leave the daemon indexing into an unlinked file forever
while every lookup finds no index. Then the daemon says so and makes a new database with a full pass
(:class:`indexer.daemon.database.Rebuild`); the lock file is renewed the same way, so that the path
keeps refusing a second daemon.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import anyio

from indexer.daemon.database import Rebuild
from indexer.store import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.daemon.lock import DatabaseLock
    from indexer.daemon.reports import Reports
    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")


async def heartbeat(shared: Shared, lock: DatabaseLock | None, reports: Reports) -> None:
    """Beat every interval until cancelled; raise :class:`Rebuild` when the database file is gone."""
    while True:
        await anyio.sleep(shared.config.daemon.heartbeat_s)
        replaced = shared.store.file_replaced()
        if replaced is not None:
            raise Rebuild(replaced, corrupt=False)
        if lock is not None:
            lock.renew()
        beat_ns = time.time_ns()
        try:
            await shared.store.unit(state.update_daemon, heartbeat_ns=beat_ns)
        except sqlite3.Error as exc:
            log.warning("heartbeat not written: %s", exc)
            continue
        await reports.beat(beat_ns)
