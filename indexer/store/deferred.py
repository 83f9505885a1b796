"""The lookup indexes a cold build drops and recreates after it (their definitions kept in the database,
so a build that was killed is finished by the next writer)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3


# Lookup indexes a cold build may drop and recreate; entries_layout stays, because every
# store_snapshot reads a layout's existing rows by it (without it the build is quadratic).
DEFERRABLE_INDEXES = (
    "entries_digest",
    "names_tag",
    "names_name_tag",
    "names_entry",
    "children_entry",
    "children_digest",
    "children_parent",
    "layout_warnings_layout",
    "manifests_subject",
    "manifests_config",
    "attestations_index",
)


def defer_indexes(conn: sqlite3.Connection) -> int:
    """A unit of work: drop the lookup indexes for a cold build, their definitions kept in the same transaction."""
    marks = ",".join("?" * len(DEFERRABLE_INDEXES))
    rows = conn.execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name IN ({marks})", DEFERRABLE_INDEXES
    ).fetchall()
    for name, sql in rows:
        conn.execute("INSERT OR REPLACE INTO ocidx_deferred_indexes (name, sql) VALUES (?, ?)", (name, sql))
        conn.execute(f'DROP INDEX "{name}"')
    return len(rows)


def restore_indexes(conn: sqlite3.Connection) -> int:
    """Recreate the indexes a cold build deferred (after the build, or after one that was killed).

    Run outside a transaction (:meth:`indexer.store.writer.Store.run`): the sorter's threads are a
    setting, and ``ANALYZE`` follows the one transaction that builds the indexes.
    """
    from indexer.store import transaction

    rows = conn.execute("SELECT name, sql FROM ocidx_deferred_indexes ORDER BY name").fetchall()
    if not rows:
        return 0
    # SQLite's sorter may use helper threads for CREATE INDEX: the build is the cold build's serial
    # tail (0.6 s at 10,000 layouts), 13% shorter with two threads here; as many as the cores this
    # process may run on (taskset, cpusets), at most 4.
    from indexer.config import default_workers

    threads = conn.execute("PRAGMA threads").fetchone()[0]
    conn.execute(f"PRAGMA threads = {max(threads, min(4, default_workers()))}")
    try:
        transaction(conn, _create_deferred, rows)
    finally:
        conn.execute(f"PRAGMA threads = {threads}")
    conn.execute("ANALYZE")
    return len(rows)


def _create_deferred(conn: sqlite3.Connection, rows: list[tuple[str, str]]) -> None:
    for name, sql in rows:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
        if exists.fetchone() is None:
            conn.execute(sql)
    conn.execute("DELETE FROM ocidx_deferred_indexes")
