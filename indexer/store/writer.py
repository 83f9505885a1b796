"""The one write connection: an ``aiosqlite`` connection, awaited from the event loop.

aiosqlite keeps one ``sqlite3`` connection on a thread of its own and runs what is queued to it in
order. The connection is opened by :func:`indexer.store.open_writer` (its file checks, migrations,
pragmas); every unit of work (a batch's compare-and-set transaction, the daemon's row, maintenance)
is one queued call of a plain function on that connection, so a transaction is never interleaved
with another task's statements on the same connection, and the event loop pays one await per unit,
not one per statement (docs/design.md, "One aiosqlite writer"). Writers only: never on the lookup path.
"""

from __future__ import annotations

import sqlite3
import warnings

import aiosqlite
import anyio

from indexer.store import open_writer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Concatenate, ParamSpec, TypeVar

    P = ParamSpec("P")
    T = TypeVar("T")


class Writer:
    """The single writer's connection, on aiosqlite's thread."""

    def __init__(self, path: str) -> None:
        self.conn: sqlite3.Connection = open_writer(path)
        conn = self.conn
        self._aio = aiosqlite.Connection(lambda: conn, iter_chunk_size=64)
        self._started = False

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """Run ``fn(conn, *args)`` on the writer's thread, after every unit queued before it.

        Shielded: a cancelled caller still waits for its unit to finish, so nothing else (a close)
        can touch the connection while a transaction of it is open.
        """
        with anyio.CancelScope(shield=True):
            if not self._started:
                self._started = True
                await self._aio  # starts the thread; the connector hands over the open connection
            # aiosqlite's documented calls are one statement each; a unit of work is queued the
            # way they are (its _execute), as one call on the same thread.
            result: T = await self._aio._execute(fn, self.conn, *args, **kw)  # type: ignore[no-untyped-call]
        return result

    def close(self) -> None:
        """Close the connection (after PRAGMA optimize, when the database still allows it) and stop the thread."""
        try:
            self.conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass  # a full disk or a damaged file: the error that matters was raised already
        finally:
            self.conn.close()
            self._stop()

    def abandon(self) -> None:
        """Close the connection without PRAGMA optimize (a database found corrupt), and stop the thread."""
        try:
            self.conn.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        if not self._started:
            return
        self._started = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # stop() asks for a loop it may not find
            self._aio.stop()
        thread = getattr(self._aio, "_thread", None)
        if thread is not None:
            thread.join()
