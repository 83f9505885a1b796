"""The store's one writer, and the reader beside it, for ``ocidx scan`` and the daemon.

:class:`Store` owns the only write connection (as datasette's ``Database`` owns its write thread):
every change to the index is a *unit* of work, a plain function ``fn(conn, ...)`` that only writes
and that :meth:`Store.unit` runs on the writer's thread inside ``BEGIN IMMEDIATE ... COMMIT``
(:func:`transaction`), after every unit queued before it. Whatever a unit needs to know of the disk
(a ``stat``, a read, a parse) is done before it is queued, in a worker thread or a worker process:
the writer's thread never waits for the file system, so one slow layout never holds back the
others' writes. Reads of the index that the writer's callers need (the stored rows of a batch, the
directory cache) go to a separate read-only connection (:meth:`Store.read`): in WAL mode it sees
every unit committed before the read began.

The writer's thread is aiosqlite's: it runs the queued calls in order on its own ``sqlite3``
connection, and the event loop pays one await per unit, never one per statement
(docs/design.md, "One writer").
"""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings

import aiosqlite
import anyio
import anyio.to_thread

from indexer.store import BUSY_TIMEOUT_MS, open_writer, transaction

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Concatenate, ParamSpec, TypeVar

    P = ParamSpec("P")
    T = TypeVar("T")


class Store:
    """The index as its writer sees it: units of work on the one write connection, reads beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        conn = open_writer(path)
        self._conn = conn
        try:
            st: os.stat_result | None = os.stat(path)
        except OSError:
            st = None
        # The file this store writes (device, inode): the daemon compares it with what the path names
        # now, to notice a database deleted or replaced under it (docs/reliability.md).
        self.identity = (st.st_dev, st.st_ino) if st is not None else None
        from indexer.store.deferred import restore_indexes

        restore_indexes(conn)  # a cold build killed half-way left them deferred
        self._aio = aiosqlite.Connection(lambda: conn, iter_chunk_size=64)
        self._started = False
        # Opened now, with the writer: a pass that begins once descriptors are used up (idle clients of
        # the daemon's sockets, docs/reliability.md) still reads what is stored, and says what failed.
        try:
            self._reader: sqlite3.Connection | None = _open_reader(path)
        except BaseException:
            conn.close()
            raise
        self._reader_lock = threading.Lock()

    # -- writing ------------------------------------------------------------------------------------

    async def unit(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` as one transaction on the writer's thread, after every unit queued before it.

        Shielded: a cancelled caller still waits for its unit to commit or roll back, so nothing else
        (a close) touches the connection while a transaction of it is open.
        """
        return await self._queue(transaction, self._conn, fn, *args, **kw)

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` on the writer's thread outside a transaction: what SQLite refuses inside
        one (checkpoints, ``PRAGMA`` settings, ``ANALYZE``, an incremental vacuum)."""
        return await self._queue(fn, self._conn, *args, **kw)

    async def _queue(self, fn: Callable[..., T], *args: object, **kw: object) -> T:
        with anyio.CancelScope(shield=True):
            if not self._started:
                self._started = True
                await self._aio  # starts the thread; the connector hands over the open connection
            # aiosqlite's documented calls are one statement each; a unit is queued the way they are
            # (its _execute), as one call on the same thread.
            result: T = await self._aio._execute(fn, *args, **kw)  # type: ignore[no-untyped-call]
        return result

    def unit_now(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """:meth:`unit` before the writer's thread has started (opening a store, in its own thread)."""
        if self._started:
            raise RuntimeError("the writer's thread is running: queue units with Store.unit")
        return transaction(self._conn, fn, *args, **kw)

    def run_now(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """:meth:`run` before the writer's thread has started."""
        if self._started:
            raise RuntimeError("the writer's thread is running: queue work with Store.run")
        return fn(self._conn, *args, **kw)

    # -- reading ------------------------------------------------------------------------------------

    def read_now(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` on the read-only connection, in this thread (one caller at a time)."""
        with self._reader_lock:
            conn = self._reader
            if conn is None:
                raise sqlite3.ProgrammingError(f"the store of {self.path} is closed")
            return fn(conn, *args, **kw)

    async def read(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """:meth:`read_now` in a worker thread: what every committed unit wrote, never blocking the loop."""
        return await anyio.to_thread.run_sync(lambda: self.read_now(fn, *args, **kw))

    # -- closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close both connections (after ``PRAGMA optimize``, when the database still allows it)."""
        try:
            self._conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass  # a full disk or a damaged file: the error that matters was raised already
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close both connections without ``PRAGMA optimize`` (a database found corrupt or deleted)."""
        try:
            with self._reader_lock:
                reader, self._reader = self._reader, None
                if reader is not None:
                    reader.close()
            self._conn.close()
        finally:
            self._stop()

    async def aclose(self, *, optimize: bool = True) -> None:
        """:meth:`close` (or :meth:`abandon`) from the event loop, the thread joined in a worker thread."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close if optimize else self.abandon)

    def _stop(self) -> None:
        if not self._started:
            return
        self._started = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # stop() asks for a loop it may not find
            self._aio.stop()
        thread = getattr(self._aio, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def file_replaced(self) -> str | None:
        """Why the path no longer names the file this store writes (deleted, or replaced), or None."""
        if self.identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"{self.path} was deleted"
        except OSError:
            return None  # EIO, EACCES...: nothing proves it was replaced; the next look may
        if (st.st_dev, st.st_ino) != self.identity:
            return f"{self.path} was replaced by another file"
        return None


def _open_reader(path: str) -> sqlite3.Connection:
    """The writer's read-only companion connection (the writer made sure the schema is ours)."""
    from indexer.store import _uri_path

    conn = sqlite3.connect(
        f"file:{_uri_path(path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    conn.execute("PRAGMA query_only = 1")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # SQLite opens the files at the first read
    except BaseException:
        conn.close()
        raise
    return conn
