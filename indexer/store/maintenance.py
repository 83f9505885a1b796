"""Keeping the database file and its WAL bounded over weeks of uptime.

SQLite's WAL grows while any reader holds a read transaction that started before the
frames it would have to overwrite, and a WAL file that grew is never shrunk by SQLite
itself; freed pages stay in the database file. The writer therefore:

* sets ``journal_size_limit`` (:data:`WAL_LIMIT_BYTES`) so a WAL that is reset is cut
  back to that size, and the database uses ``auto_vacuum = INCREMENTAL`` (set when it is
  created, converted once by a ``VACUUM`` for an older file: :func:`prepare`);
* every so often (the daemon's maintenance duty) runs :func:`maintain`: a passive
  checkpoint (never waits for readers), a ``TRUNCATE`` checkpoint that gives up at once
  when a reader is using the WAL, and an incremental vacuum of a bounded number of
  free pages when the free list is a large share of the file.

A reader that pins the WAL cannot be forced off; :func:`maintain` says so (``pinned``)
and which processes hold the database open, so the daemon can warn.
"""

from __future__ import annotations

import os

from indexer._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3

WAL_LIMIT_BYTES = 16 * 1024 * 1024  # journal_size_limit: what a reset WAL is cut back to
VACUUM_MIN_FREE_PAGES = 256  # below this many free pages, the file is left as it is
VACUUM_FREE_SHARE = 0.2  # ... and below this share of the file
VACUUM_STEP_PAGES = 2048  # pages returned per run: the write lock is held for milliseconds, not seconds
AUTO_VACUUM_INCREMENTAL = 2


class Maintenance(Record):
    """What one :func:`maintain` run found and did."""

    __slots__ = ("freed_pages", "pinned", "truncated", "wal_bytes", "wal_bytes_before")

    def __init__(
        self, *, wal_bytes_before: int, wal_bytes: int, pinned: bool, truncated: bool, freed_pages: int
    ) -> None:
        self.wal_bytes_before = wal_bytes_before
        self.wal_bytes = wal_bytes
        self.pinned = pinned
        self.truncated = truncated
        self.freed_pages = freed_pages


def prepare(conn: sqlite3.Connection, *, new: bool) -> None:
    """Set the size limits on a writer's connection; make the file incrementally vacuumable.

    *new*: the database has no tables yet, so ``auto_vacuum`` can simply be set; an older file
    is converted by one ``VACUUM`` (a one-time cost linear in its size, at the first writer's start).
    """
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return
    conn.execute(f"PRAGMA auto_vacuum = {AUTO_VACUUM_INCREMENTAL}")
    if not new or conn.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
        conn.execute("VACUUM")  # a file that had tables once takes the setting only through a rebuild


def wal_size(db_path: str) -> int:
    """The size of the database's WAL file in bytes (0 when there is none)."""
    try:
        return os.stat(db_path + "-wal").st_size
    except OSError:
        return 0


def maintain(conn: sqlite3.Connection, db_path: str) -> Maintenance:
    """Checkpoint the WAL as far as readers allow, cut it back, and return free pages (bounded)."""
    before = wal_size(db_path)
    _busy, log_frames, done_frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    # Frames a reader's snapshot still needs cannot be copied back: the WAL is pinned by that reader.
    pinned = log_frames > 0 and done_frames < log_frames
    truncated = False
    if not pinned and before > 0:
        timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute("PRAGMA busy_timeout = 0")  # a reader on the WAL now: give up, try next time
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            truncated = busy == 0
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
    freed = 0
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    if free >= VACUUM_MIN_FREE_PAGES and free >= pages * VACUUM_FREE_SHARE:
        step = min(free, VACUUM_STEP_PAGES)
        # executescript steps the pragma to its end (sqlite3_exec): execute() steps it once, which
        # frees a single page however many are asked for.
        conn.executescript(f"PRAGMA incremental_vacuum({step});")
        freed = free - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return Maintenance(
        wal_bytes_before=before, wal_bytes=wal_size(db_path), pinned=pinned, truncated=truncated, freed_pages=freed
    )


def holders(db_path: str, limit: int = 10) -> list[int]:
    """Pids of processes (other than this one) that have the database open, for the pinned-WAL warning."""
    target = os.path.realpath(db_path)
    found: list[int] = []
    me = os.getpid()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    found.append(pid)
                    break
            except OSError:
                continue
        if len(found) >= limit:
            break
    return found
