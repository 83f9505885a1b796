"""The single writer: whole batches of layout outcomes, one transaction each, rows diffed.

A scan (batch or daemon) turns every layout it looks at into one outcome (:mod:`indexer.store.outcomes`):
``Read``, ``Same``, ``Failed`` or ``Gone``.

:func:`apply`, a unit of the store's writer (one ``BEGIN IMMEDIATE``), writes a list of outcomes,
each only if the layout's stored row is still the one the outcome was decided against
(compare-and-set): two writers (a scan beside the daemon) can interleave in any order and never
leave a row describing an older file; a conflicting outcome comes back to be examined again. Every
change is stamped with one new version per transaction (``layouts.version``, ``layout_removals``),
which is what followers of the index read. Entry rows are keyed by a hash of their content
(``row_key``): an edit that adds one tag deletes and inserts only the entries that changed, which
measured 8-15x cheaper than rewriting the layout (docs/design.md).
The same :func:`store_snapshot` fills the in-memory database of a
read-through lookup, so indexed and read-through answers share one matcher.
"""

from __future__ import annotations

import time

from indexer._record import Record
from indexer.errors import printable
from indexer.store import path_value, read
from indexer.store.outcomes import Failed, Outcome, Read, Same
from indexer.store.read.stored import _LAYOUT_COLUMNS, _stored
from indexer.store.rows import snapshot_rows
from indexer.store.shared_rows import _unfounded_claims, collect_garbage, store_shared

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable

    from indexer.graph import LayoutGraph
    from indexer.layout import FileIdentity, Snapshot
    from indexer.store.read import StoredLayout
    from indexer.store.rows import LayoutRows, PresenceRow


class Applied(Record):
    """What :func:`apply` did: the outcomes written, and the paths whose stored row had moved on."""

    __slots__ = ("changed", "conflicts", "written")

    def __init__(self, changed: int, written: list[Outcome], conflicts: list[str]) -> None:
        self.changed = changed
        self.written = written
        self.conflicts = conflicts


# The removals kept for followers of the index (the fleet publisher); past this many the oldest
# are dropped and a follower behind them compares everything instead (docs/design.md).
MAX_REMOVALS = 10_000


def apply(conn: sqlite3.Connection, outcomes: Iterable[Outcome]) -> Applied:
    """A unit of work (:meth:`indexer.store.writer.Store.unit`): write *outcomes*, each only if its
    layout's row is still the one it was decided on (compare-and-set); the others are returned as
    conflicts, to be examined again.

    Set-based: the stored rows of the whole batch are read with one statement, and the batch's
    reads are diffed and written with a few statements for all of its layouts (:func:`_store_all`).
    """
    outcomes = list(outcomes)
    changed = 0
    written: list[Outcome] = []
    conflicts: list[str] = []
    ids = _IdAllocator(conn)
    versions = _Versions(conn)
    current_of = _current(conn, [outcome.path for outcome in outcomes])
    reads: list[tuple[str, LayoutRows, int, StoredLayout | None]] = []
    seen: set[str] = set()
    released: set[str] = set()  # digests whose references this transaction removed
    # The shared rows of every read, written or not: a later read of the same pass may claim them.
    store_shared(conn, [o.rows[6] for o in outcomes if isinstance(o, Read) and o.rows[6] is not None])
    unfounded = _unfounded_claims(conn, [o for o in outcomes if isinstance(o, Read)])
    for outcome in outcomes:
        current = current_of.get(outcome.path)
        if current != outcome.expected or outcome.path in seen or outcome.path in unfounded:
            # Another writer (a scan beside the daemon, a second daemon pass) wrote this layout
            # after the outcome's examination loaded it: the outcome may describe an older file.
            # (A path twice in one batch: the second was decided before the first was written.)
            # An unfounded read claims shared rows a GC removed since: read again, it sends them.
            conflicts.append(outcome.path)
            continue
        seen.add(outcome.path)
        written.append(outcome)
        if isinstance(outcome, Read):
            reads.append((outcome.path, outcome.rows, outcome.read_ns, current))
        elif isinstance(outcome, Same):
            assert current is not None  # a Same is only decided against a stored row
            _touch(conn, current, outcome, versions)
        elif isinstance(outcome, Failed):
            _fail(conn, outcome, current, versions)
        else:
            changed += _remove(conn, outcome.path, versions, released)
    changed += _store_all(conn, reads, ids, versions, released)
    collect_garbage(conn, released)
    versions.finish()
    return Applied(changed, written, conflicts)


def _staged(conn: sqlite3.Connection, table: str, values: Iterable[object]) -> str:
    """Fill the TEMP staging table *table* (one column, ``v``) with *values*; the subquery that reads it."""
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (v PRIMARY KEY) WITHOUT ROWID")
    conn.execute(f"DELETE FROM {table}")
    conn.executemany(f"INSERT OR IGNORE INTO {table} (v) VALUES (?)", [(v,) for v in values])
    return f"(SELECT v FROM temp.{table})"


def _current(conn: sqlite3.Connection, paths: list[str]) -> dict[str, StoredLayout]:
    """The stored rows of *paths*, read inside the write transaction with one statement."""
    if not paths:
        return {}
    if len(paths) == 1:
        found = read.layout(conn, paths[0])
        return {} if found is None else {found.path: found}
    wanted = _staged(conn, "ocidx_stage_paths", (path_value(p) for p in paths))
    rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE path IN {wanted}")
    return {stored.path: stored for stored in map(_stored, rows)}


class _Versions:
    """The one version a write transaction stamps on every layout it changes (taken on first use)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.value: int | None = None
        self.removed = 0

    def take(self) -> int:
        if self.value is None:
            last = self.conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0]
            self.value = last + 1
            self.conn.execute("UPDATE ocidx_counters SET value = ? WHERE name = 'version'", (self.value,))
        return self.value

    def finish(self) -> None:
        """Keep the removals bounded: past MAX_REMOVALS, drop the oldest and record how far."""
        if not self.removed:
            return
        count = self.conn.execute("SELECT count(*) FROM layout_removals").fetchone()[0]
        excess = count - MAX_REMOVALS
        if excess <= 0:
            return
        through = self.conn.execute(
            "SELECT max(version) FROM (SELECT version FROM layout_removals ORDER BY version LIMIT ?)", (excess,)
        ).fetchone()[0]
        self.conn.execute("DELETE FROM layout_removals WHERE version <= ?", (through,))
        self.conn.execute(
            "UPDATE ocidx_counters SET value = max(value, ?) WHERE name = 'removals_pruned_through'", (through,)
        )


class _IdAllocator:
    """Ids assigned here (entries, new layouts) so that rows go in with executemany.

    Safe because there is exactly one writer, inside its own IMMEDIATE transaction.
    """

    def __init__(self, conn: sqlite3.Connection, table: str = "entries") -> None:
        self.next_id = (conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0) + 1

    def take(self) -> int:
        value = self.next_id
        self.next_id += 1
        return value

    def take_many(self, count: int) -> int:
        """The first of *count* consecutive ids."""
        value = self.next_id
        self.next_id += count
        return value


def store_snapshot(
    conn: sqlite3.Connection, path: str, snapshot: Snapshot, read_ns: int, graph: LayoutGraph | None = None
) -> int:
    """Diff *snapshot* (and its *graph*) into the rows of layout *path* (caller holds the transaction);
    1 if rows changed."""
    rows = snapshot_rows(snapshot, graph)
    if rows[6] is not None:
        store_shared(conn, [rows[6]])
    released: set[str] = set()
    reads = [(path, rows, read_ns, read.layout(conn, path))]
    changed = _store_all(conn, reads, _IdAllocator(conn), _Versions(conn), released)
    collect_garbage(conn, released)
    return changed


def _since(current: StoredLayout | None, identity: FileIdentity | None, read_ns: int) -> int:
    """When the identity being stored was first seen: kept while it stays the same (see read.settles_at)."""
    if current is not None and identity is not None and current.identity == identity:
        return current.identity_since_ns if current.identity_since_ns is not None else read_ns
    return read_ns


_LAYOUT_UPDATE = """
    UPDATE layouts SET dev = ?, ino = ?, size = ?, mtime_ns = ?, ctime_ns = ?, read_ns = ?, content_hash = ?,
                       state = 'ok', error_category = NULL, error = NULL, last_good_ns = ?, checked_ns = ?,
                       entry_count = ?, identity_since_ns = ?, depends = ?, mnt_id = ?, retry_ns = NULL,
                       failures = 0
    WHERE id = ?
"""
_PRESENCE_UPDATE = """
    UPDATE layouts SET blobs_dir = ?, blobs_dev = ?, blobs_ino = ?, blobs_mtime_ns = ?, blobs_ctime_ns = ?,
                       blobs_more = ?, blobs_root = ?, blobs_listed_ns = ?, blobs_since_ns = ?, blobs_settles_ns = ?,
                       graph_hash = ?
    WHERE id = ?
"""


def _presence_columns(current: StoredLayout | None, presence: PresenceRow | None) -> tuple[object, ...]:
    """The presence columns of ``layouts`` for *presence* (all NULL without one): the identity of the
    directories listed, when first seen (kept while they stay the same) and when a listing proves it."""
    if presence is None:
        return (None,) * 10
    *identity, listed_ns, changed_ns = presence
    since = listed_ns
    if current is not None and current.presence == tuple(identity) and current.blobs_since_ns is not None:
        since = current.blobs_since_ns
    return (*identity, listed_ns, since, read.settles_at(changed_ns, 0, listed_ns, since))


def _store_all(
    conn: sqlite3.Connection,
    reads: list[tuple[str, LayoutRows, int, StoredLayout | None]],
    ids: _IdAllocator,
    versions: _Versions,
    released: set[str],
) -> int:
    """Diff the rows of every read layout in *reads* against their stored rows and write the
    difference for all of them at once; return how many layouts' rows changed.

    A few statements per batch, not per layout: the stored entries and warnings of every updated
    layout are read with one statement each (their ids staged in a TEMP table), the diff is taken
    on the row keys, and deletions, moves and insertions go in with one ``executemany`` per table.
    Unchanged entries keep their ids. New layouts get their ids here, as entries do.
    """
    if not reads:
        return 0
    from indexer.layout import FileIdentity

    now = time.time_ns()
    known = [(path, rows, read_ns, current) for path, rows, read_ns, current in reads if current is not None]
    existing: dict[int, dict[str, tuple[int, int]]] = {current.id: {} for *_, current in known if current}
    old_warnings: dict[int, list[str]] = {lid: [] for lid in existing}
    if existing:
        staged = _staged(conn, "ocidx_stage_ids", existing)
        for lid, entry_id, key, position in conn.execute(
            f"SELECT layout_id, id, row_key, position FROM entries WHERE layout_id IN {staged}"
        ):
            existing[lid][key] = (entry_id, position)
        for lid, message in conn.execute(
            f"SELECT layout_id, message FROM layout_warnings WHERE layout_id IN {staged} ORDER BY rowid"
        ):
            old_warnings[lid].append(message)
    layout_ids = _IdAllocator(conn, "layouts")
    new_layouts: list[tuple[object, ...]] = []
    updated_layouts: list[tuple[object, ...]] = []
    stale: list[tuple[int]] = []
    moved: list[tuple[int, int]] = []
    entry_rows: list[tuple[object, ...]] = []
    name_rows: list[tuple[object, ...]] = []
    child_rows: list[tuple[object, ...]] = []
    warnings_gone: list[tuple[int]] = []
    warning_rows: list[tuple[int, str]] = []
    stamped: list[tuple[int, str]] = []
    presence_rows: list[tuple[object, ...]] = []
    graph_rows_now: list[tuple[object, ...]] = []
    graphs_gone: list[tuple[int]] = []
    changed = 0
    for path, rows, read_ns, current in reads:
        ident, content_hash, warnings_now, entries, names, children, graph, depends, mnt_id = rows
        since = _since(current, FileIdentity(*ident), read_ns)
        if current is None:
            layout_id = layout_ids.take()
            new_layouts.append(
                (
                    layout_id,
                    path_value(path),
                    *ident,
                    read_ns,
                    content_hash,
                    now,
                    now,
                    len(entries),
                    since,
                    depends,
                    mnt_id,
                )
            )
            have: dict[str, tuple[int, int]] = {}
            published_before: tuple[object, ...] | None = None
            warnings_before: list[str] = []
        else:
            layout_id = current.id
            updated_layouts.append(
                (*ident, read_ns, content_hash, now, now, len(entries), since, depends, mnt_id, layout_id)
            )
            have = existing[layout_id]
            published_before = (
                current.content_hash,
                current.state,
                current.error_category,
                current.error,
                current.entry_count,
                current.graph_hash,
            )
            warnings_before = old_warnings[layout_id]
        if have:
            wanted = {row[0]: index for index, row in enumerate(entries)}
            gone = [(entry_id,) for key, (entry_id, _position) in have.items() if key not in wanted]
            stale.extend(gone)
            shifted = [
                (entries[wanted[key]][1], entry_id)
                for key, (entry_id, position) in have.items()
                if key in wanted and entries[wanted[key]][1] != position
            ]
            moved.extend(shifted)
            fresh = {index for key, index in wanted.items() if key not in have}
            if fresh:
                id_of = {index: ids.take() for index in sorted(fresh)}
                entry_rows.extend(
                    (id_of[i], layout_id, row[1], row[0], *row[2:]) for i, row in enumerate(entries) if i in fresh
                )
                name_rows.extend((id_of[row[0]], layout_id, *row[1:]) for row in names if row[0] in fresh)
                child_rows.extend((id_of[row[0]], layout_id, *row[1:]) for row in children if row[0] in fresh)
            rows_changed = bool(gone or fresh or shifted)
        else:  # nothing stored (a new layout, or one that had no entries): every row is new, ids in a run
            base = ids.take_many(len(entries))
            entry_rows.extend((base + i, layout_id, row[1], row[0], *row[2:]) for i, row in enumerate(entries))
            name_rows.extend((base + row[0], layout_id, *row[1:]) for row in names)
            child_rows.extend((base + row[0], layout_id, *row[1:]) for row in children)
            rows_changed = bool(entries)
        warnings = list(warnings_now)
        if warnings != warnings_before:
            if warnings_before:
                warnings_gone.append((layout_id,))
            warning_rows.extend((layout_id, w) for w in warnings)
        graph_hash = graph[2] if graph is not None else None
        presence_rows.append(
            (*_presence_columns(current, graph[0] if graph is not None else None), graph_hash, layout_id)
        )
        if graph is None:
            if current is not None and current.graph_hash is not None:
                graphs_gone.append((layout_id,))
        elif current is None or current.graph_hash != graph_hash:
            graph_rows_now.append((layout_id, *graph[1]))
        changed += rows_changed
        published_now = (content_hash, "ok", None, None, len(entries), graph_hash)
        if rows_changed or warnings != warnings_before or published_before != published_now:
            stamped.append((layout_id, path))
    if new_layouts:
        conn.executemany(
            """
            INSERT INTO layouts (id, path, dev, ino, size, mtime_ns, ctime_ns, read_ns, content_hash, state,
                                 error_category, error, last_good_ns, checked_ns, entry_count, identity_since_ns,
                                 depends, mnt_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'ok', NULL, NULL, ?, ?, ?, ?, ?, ?)
            """,
            new_layouts,
        )
    if updated_layouts:
        conn.executemany(_LAYOUT_UPDATE, updated_layouts)
    conn.executemany(_PRESENCE_UPDATE, presence_rows)
    if graph_rows_now:
        conn.executemany("INSERT OR REPLACE INTO layout_graph VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", graph_rows_now)
    if graphs_gone:
        conn.executemany("DELETE FROM layout_graph WHERE layout_id = ?", graphs_gone)
    if stale:
        # The digests whose references go with these entries: the shared rows nothing else
        # references are collected at the end of the transaction (collect_garbage).
        staged = _staged(conn, "ocidx_stage_stale", (entry_id for (entry_id,) in stale))
        released.update(row[0] for row in conn.execute(f"SELECT digest FROM entries WHERE id IN {staged}"))
        released.update(row[0] for row in conn.execute(f"SELECT digest FROM children WHERE entry_id IN {staged}"))
        conn.executemany("DELETE FROM names WHERE entry_id = ?", stale)
        conn.executemany("DELETE FROM children WHERE entry_id = ?", stale)
        conn.executemany("DELETE FROM entries WHERE id = ?", stale)
    if moved:
        conn.executemany("UPDATE entries SET position = ? WHERE id = ?", moved)
    if entry_rows:
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", entry_rows)
        conn.executemany("INSERT INTO names VALUES (?, ?, ?, ?, ?)", name_rows)
        conn.executemany("INSERT INTO children VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", child_rows)
    if warnings_gone:
        conn.executemany("DELETE FROM layout_warnings WHERE layout_id = ?", warnings_gone)
    if warning_rows:
        conn.executemany("INSERT INTO layout_warnings VALUES (?, ?)", warning_rows)
    if stamped:
        version = versions.take()
        conn.executemany("UPDATE layouts SET version = ? WHERE id = ?", [(version, lid) for lid, _ in stamped])
        conn.executemany("DELETE FROM layout_removals WHERE path = ?", [(path_value(p),) for _, p in stamped])
    return changed


def _stamp(conn: sqlite3.Connection, layout_id: int, path: str, versions: _Versions) -> None:
    """Mark a layout changed for followers of the index; a path that comes back is no longer removed."""
    conn.execute("UPDATE layouts SET version = ? WHERE id = ?", (versions.take(), layout_id))
    conn.execute("DELETE FROM layout_removals WHERE path = ?", (path_value(path),))


def _touch(conn: sqlite3.Connection, current: StoredLayout, outcome: Same, versions: _Versions) -> None:
    """Refresh what proves a layout's rows current (identity, mount, what the dependencies look like
    now: a blob that settled since, the listing of blobs/), the rows themselves being the same."""
    identity, read_ns = outcome.identity, outcome.read_ns
    if outcome.presence is not None:
        conn.execute(_PRESENCE_UPDATE, (*_presence_columns(current, outcome.presence), current.graph_hash, current.id))
    conn.execute(
        """
        UPDATE layouts SET dev = ?, ino = ?, size = ?, mtime_ns = ?, ctime_ns = ?, read_ns = ?,
                           state = 'ok', error_category = NULL, error = NULL, checked_ns = ?,
                           identity_since_ns = ?, retry_ns = NULL, failures = 0, mnt_id = ?, depends = ?
        WHERE id = ?
        """,
        (
            identity.dev,
            identity.ino,
            identity.size,
            identity.mtime_ns,
            identity.ctime_ns,
            read_ns,
            time.time_ns(),
            _since(current, identity, read_ns),
            outcome.mnt_id,
            outcome.depends,
            current.id,
        ),
    )
    if current.state != "ok":  # a broken file restored to the content of the rows: its state is news
        _stamp(conn, current.id, current.path, versions)


# A layout whose read failed for a reason outside its bytes is read again by the daemon after this
# long, doubled with each consecutive such failure up to RETRY_MAX_NS (docs/reliability.md).
RETRY_FIRST_NS = 1_000_000_000
RETRY_MAX_NS = 64_000_000_000


def _fail(conn: sqlite3.Connection, outcome: Failed, current: StoredLayout | None, versions: _Versions) -> None:
    identity = outcome.identity
    ident = (
        (identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)
        if identity is not None
        else (None, None, None, None, None)
    )
    now = time.time_ns()
    message = printable(outcome.error.message)
    # A failure of the layout's own bytes is stored with the identity of the file that failed, so that
    # a reconcile does not re-read an unchanged broken file. A failure of the environment carries no
    # identity (nothing proves the row current: every pass reads it again) and a time for the daemon
    # to try again, backing off while it keeps failing. content_hash and the rows stay those of the
    # last good read.
    if outcome.error.transient:
        row = conn.execute("SELECT failures FROM layouts WHERE path = ?", (path_value(outcome.path),)).fetchone()
        failures = (row[0] if row is not None else 0) + 1
        retry_ns: int | None = now + min(RETRY_MAX_NS, RETRY_FIRST_NS << min(failures - 1, 32))
    else:
        failures, retry_ns = 0, None
    layout_id = conn.execute(
        """
        INSERT INTO layouts (path, dev, ino, size, mtime_ns, ctime_ns, read_ns, content_hash, state,
                             error_category, error, last_good_ns, checked_ns, entry_count, identity_since_ns,
                             retry_ns, failures)
        VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 'error', ?, ?, NULL, ?, 0, ?, ?, ?)
        ON CONFLICT (path) DO UPDATE SET
            dev = excluded.dev, ino = excluded.ino, size = excluded.size, mtime_ns = excluded.mtime_ns,
            ctime_ns = excluded.ctime_ns, read_ns = excluded.read_ns, state = 'error',
            error_category = excluded.error_category, error = excluded.error, checked_ns = excluded.checked_ns,
            identity_since_ns = excluded.identity_since_ns, retry_ns = excluded.retry_ns,
            failures = excluded.failures, mnt_id = NULL
        RETURNING id
        """,
        (
            path_value(outcome.path),
            *ident,
            outcome.read_ns,
            outcome.error.category,
            message,
            now,
            _since(current, identity, outcome.read_ns),
            retry_ns,
            failures,
        ),
    ).fetchone()[0]
    if (
        current is None
        or current.state != "error"
        or current.error_category != outcome.error.category
        or current.error != message
    ):
        _stamp(conn, layout_id, outcome.path, versions)


def _remove(conn: sqlite3.Connection, path: str, versions: _Versions, released: set[str]) -> int:
    row = conn.execute("SELECT id FROM layouts WHERE path = ?", (path_value(path),)).fetchone()
    if row is None:
        return 0
    layout_id = row[0]
    in_layout = "(SELECT id FROM entries WHERE layout_id = ?)"
    released.update(r[0] for r in conn.execute("SELECT digest FROM entries WHERE layout_id = ?", (layout_id,)))
    released.update(
        r[0] for r in conn.execute(f"SELECT digest FROM children WHERE entry_id IN {in_layout}", (layout_id,))
    )
    conn.execute("DELETE FROM layout_graph WHERE layout_id = ?", (layout_id,))
    conn.execute(f"DELETE FROM names WHERE entry_id IN {in_layout}", (layout_id,))
    conn.execute(f"DELETE FROM children WHERE entry_id IN {in_layout}", (layout_id,))
    conn.execute("DELETE FROM entries WHERE layout_id = ?", (layout_id,))
    conn.execute("DELETE FROM layout_warnings WHERE layout_id = ?", (layout_id,))
    conn.execute("DELETE FROM layouts WHERE id = ?", (layout_id,))
    conn.execute(
        "INSERT OR REPLACE INTO layout_removals (path, version) VALUES (?, ?)", (path_value(path), versions.take())
    )
    versions.removed += 1
    return 1
