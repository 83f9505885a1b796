"""The daemon's database: opened as the store, moved aside when SQLite says it is damaged, made anew
when it was deleted or replaced under the running daemon (it is a cache of the layouts)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time

import anyio

from indexer.daemon.logs import fields
from indexer.errors import DatabaseError
from indexer.store import check_database_files
from indexer.store.writer import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")

# After an unexpected database error (for instance "database is locked"), wait before retrying.
RETRY_DELAY_S = 1.0

CORRUPTION_MARKERS = (
    "not a database",
    "database disk image is malformed",
    "malformed database schema",
    "database corruption",
)


class Rebuild(Exception):
    """Raised by a duty: the store must be made anew (corrupt, or deleted under the daemon)."""

    def __init__(self, reason: str, *, corrupt: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.corrupt = corrupt


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


def open_store(db_path: str) -> Store:
    """The store, after moving a corrupt database aside (it is rebuilt by the first pass)."""
    check_database_files(db_path)  # before the corruption check opens it
    reason = corruption_of(db_path)
    if reason is None:
        try:
            return Store(db_path)
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
        extra=fields(event="database_corrupt", database=db_path, moved_to=moved, reason=reason),
    )
    return Store(db_path)


def reopen(store: Store, rebuild: Rebuild) -> Store:
    """A new store in place of *store*: a corrupt file moved aside first; a deleted or replaced one left
    to whoever holds it now (blocking: run it in a worker thread)."""
    store.abandon()
    db_path = store.path
    if rebuild.corrupt:
        moved = move_aside(db_path)
        log.error(
            "database %s became corrupt (%s): moved it to %s and rebuilding the index",
            db_path,
            rebuild.reason,
            moved,
            extra=fields(event="database_corrupt", database=db_path, moved_to=moved, reason=rebuild.reason),
        )
    else:
        if not os.path.lexists(db_path):
            # A WAL left beside no database belongs to the deleted one: SQLite would replay its frames
            # into the new file. (Unlinking never follows a symlink.)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(db_path + suffix)
        log.error(
            "%s: making a new database there and rebuilding the index from the layouts",
            rebuild.reason,
            extra=fields(event="database_replaced", database=db_path, reason=rebuild.reason),
        )
    return open_store(db_path)


async def guarded(shared: Shared, step: Callable[[], Awaitable[None]]) -> None:
    """Run one step of a duty that writes: a corrupt database raises :class:`Rebuild` (the daemon makes
    it anew), any other database error ("database is locked", a full disk) is said, waited out, and
    followed by a reconcile pass, which finds whatever the failed step did not write."""
    try:
        await step()
    except (sqlite3.DatabaseError, BaseExceptionGroup) as raised:
        exc = only_database_errors(raised)
        if exc is None:
            raise
        if is_corruption(exc):
            raise Rebuild(str(exc), corrupt=True) from None
        log.warning(
            "database error, retrying in %.0fs: %s",
            RETRY_DELAY_S,
            exc,
            extra=fields(event="database_error", error=str(exc)),
        )
        await anyio.sleep(RETRY_DELAY_S)
        shared.request_reconcile("retry after a database error")
