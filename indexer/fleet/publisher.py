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

It reads SQLite on its own read-only connection in a worker thread, so it never
holds up local indexing or local answers; PostgreSQL down, slow, restarted or
failed over means it logs once per change of state, retries with exponential
backoff (capped), and catches up. Every statement is bounded by
``lock_timeout`` and ``statement_timeout``. It writes only through the
functions of schema ``ocidx`` (migration 0002), which keep a host to its own
rows. Its state (connected or why not, watermark, last publish) is kept in
SQLite's ``fleet_publisher`` row for ``ocidx status`` and in PostgreSQL (the
host row and its heartbeat, with the backlog).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import time

import anyio
import anyio.to_thread

from indexer.errors import DatabaseError, FleetUnavailable
from indexer.fleet import (
    APPLIED_SQL,
    APPLIED_V1_SQL,
    CONNECT_TIMEOUT_S,
    NO_SCHEMA,
    PROBE_MIGRATIONS_SQL,
    bounds_sql,
    describe_dsn,
    failure,
    schema_problem,
)
from indexer.graph import MANIFEST_MEDIA_TYPES, graph_key
from indexer.query import image_fields
from indexer.store import check_schema, path_of
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from typing import Any

    import psycopg

log = logging.getLogger("ocidx.fleet")

POLL_S = 0.1  # how often SQLite's version counter is looked at
BATCH_LAYOUTS = 500  # layouts per PostgreSQL transaction (a version is never split)
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
BATCH_TIMEOUT_S = 120.0  # a batch PostgreSQL has not committed by then counts as a lost connection
# Every statement: a lock wait (only an administrator's DDL conflicts with publishing), a statement,
# and a transaction left idle (a publisher stopped mid-batch) are each bounded.
LOCK_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 60.0
IDLE_IN_TRANSACTION_S = 60.0
RECONCILE_S = 300.0  # the default of [daemon] reconcile_interval_s: how often the rows are checked
CONNECTED = "connected"

# What a batch reads from SQLite for each layout, and sends to PostgreSQL: the columns of
# ocidx.put_layouts and ocidx.put_rows, in their order (an entry's and a child's image, computed
# from the content graph, last).
_LAYOUT_COLUMNS = "id, path, version, state, error_category, error, content_hash, entry_count"
_PG_TABLES = {
    "layouts": ("id", "path", "version", "state", "error_category", "error", "content_hash", "entry_count"),
    "entries": (
        "layout_id",
        "position",
        "digest",
        "media_type",
        "size",
        "platform",
        "annotations",
        "invalid_names",
        "warnings",
        "image",
    ),
    "names": ("layout_id", "entry_position", "ordinal", "name", "tag", "how"),
    "children": (
        "layout_id",
        "entry_position",
        "position",
        "parent",
        "depth",
        "digest",
        "media_type",
        "size",
        "platform",
        "annotations",
        "image",
    ),
    "layout_warnings": ("layout_id", "ordinal", "message"),
}


def pg_path(value: str | bytes) -> bytes:
    """A ``layouts.path`` value of SQLite as PostgreSQL's ``bytea`` path: the directory's bytes."""
    return value if isinstance(value, bytes) else os.fsencode(path_of(value))


class Rows:
    """The published rows of some layouts, read from SQLite in one read transaction, by PostgreSQL table,
    and the content graph's rows they name (the arguments of ``ocidx.put_graph``): each manifest's and
    index's row once (``manifests``), its attestation links (``attestations``), and the referenced
    blobs each layout lacks (``missing``)."""

    __slots__ = ("attestations", "ids", "manifests", "missing", "paths", "tables")

    def __init__(self) -> None:
        self.tables: dict[str, list[tuple[object, ...]]] = {table: [] for table in _PG_TABLES}
        self.ids: list[int] = []
        self.paths: list[bytes] = []
        self.manifests: dict[str, list[object]] = {}
        self.attestations: list[tuple[str, str, str]] = []
        self.missing: list[tuple[int, str]] = []


def read_rows(conn: sqlite3.Connection, where: str, args: Sequence[object]) -> Rows:
    """The rows of the layouts ``WHERE`` *where* (caller holds the read transaction)."""
    rows = Rows()
    layout_rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE {where}", tuple(args)).fetchall()
    for lid, path, *rest in layout_rows:
        rows.ids.append(lid)
        rows.paths.append(pg_path(path))
        rows.tables["layouts"].append((lid, rows.paths[-1], *rest))
    for chunk in _chunks(rows.ids):
        marks = ",".join("?" * len(chunk))
        entries = conn.execute(
            "SELECT layout_id, position, digest, media_type, size, platform, annotations, invalid_names, warnings "
            f"FROM entries WHERE layout_id IN ({marks})",
            chunk,
        ).fetchall()
        kids = conn.execute(
            "SELECT c.layout_id, e.position, c.position, c.parent, c.depth, c.digest, c.media_type, c.size, "
            f"c.platform, c.annotations FROM children c JOIN entries e ON e.id = c.entry_id "
            f"WHERE c.layout_id IN ({marks})",
            chunk,
        ).fetchall()
        named: dict[int, set[str]] = {}
        for row in entries:
            named.setdefault(row[0], set()).add(row[2])
        for row in kids:
            named.setdefault(row[0], set()).add(row[5])
        images = db.images(conn, {digest for digests in named.values() for digest in digests})
        absent = db.missing(conn, chunk)
        entries = [(*e, _image_json(images.get(e[2]), e[3], absent.get(e[0]))) for e in entries]
        kids = [(*c, _image_json(images.get(c[5]), c[6], absent.get(c[0]))) for c in kids]
        _graph_rows(conn, rows, images)
        _missing_rows(rows, named, images, absent)
        rows.tables["entries"].extend(_no_nul(entries, 3))
        ordinal: dict[tuple[int, int], int] = {}
        for lid, pos, name, tag, how in conn.execute(
            "SELECT n.layout_id, e.position, n.name, n.tag, n.how FROM names n JOIN entries e ON e.id = n.entry_id "
            f"WHERE n.layout_id IN ({marks}) ORDER BY n.entry_id, n.rowid",
            chunk,
        ):
            n = ordinal.get((lid, pos), 0)
            ordinal[(lid, pos)] = n + 1
            rows.tables["names"].append((lid, pos, n, name, tag, how))
        rows.tables["children"].extend(_no_nul(kids, 6))
        counter: dict[int, int] = {}
        for lid, message in conn.execute(
            f"SELECT layout_id, message FROM layout_warnings WHERE layout_id IN ({marks}) ORDER BY rowid", chunk
        ):
            n = counter.get(lid, 0)
            counter[lid] = n + 1
            rows.tables["layout_warnings"].append((lid, n, message))
    return rows


def _image_json(image: db.Image | None, media_type: str, absent: set[int] | None) -> str | None:
    """The ``image`` column of an entry or child: what the host's own lookups answer of its image
    (:func:`indexer.query.image_fields`, which they apply to manifests only), as JSON."""
    if media_type not in MANIFEST_MEDIA_TYPES:
        return None
    fields = image_fields(image, absent)
    return json.dumps(fields, sort_keys=True) if fields is not None else None


def _graph_rows(conn: sqlite3.Connection, rows: Rows, images: dict[str, db.Image]) -> None:
    """Add to *rows* the graph's rows of *images* it does not hold yet: each manifest's or index's row
    (``ocidx.put_graph``'s columns; NUL spelled out in its free text, as :func:`pg_text` says) and the
    attestation links of the indexes."""
    indexes: dict[int, str] = {}
    for digest, image in images.items():
        if digest in rows.manifests:
            continue
        layers = db.parse_layers(image.layers) if image.kind == "manifest" and image.layers is not None else None
        rows.manifests[digest] = [
            digest,
            pg_text(image.artifact_type),
            image.subject,
            json.dumps(image.annotations, sort_keys=True) if image.annotations else None,
            image.config,
            pg_text(image.config_media_type) if image.config_media_type is not None else None,
            image.config_size,
            [layer[0] for layer in layers] if layers is not None else None,
            [pg_text(layer[1]) for layer in layers] if layers is not None else None,
            [layer[2] for layer in layers] if layers is not None else None,
        ]
        if image.kind == "index":
            indexes[graph_key(digest)] = digest
    keys = sorted(indexes)
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for index_key, digest, target in conn.execute(
            f"SELECT index_key, digest, target FROM attestations WHERE index_key IN ({marks})", chunk
        ):
            rows.attestations.append((indexes[index_key], digest, target))


def _missing_rows(
    rows: Rows, named: dict[int, set[str]], images: dict[str, db.Image], absent: dict[int, set[int]]
) -> None:
    """Add to *rows* the blobs each layout references and lacks, by digest: SQLite keeps their keys
    (:func:`indexer.graph.graph_key`), which the digests the layout names, and those their images are
    made of (configs, layers), give back."""
    for lid, keys in absent.items():
        if not keys:
            continue
        candidates = set(named.get(lid, ()))
        for digest in named.get(lid, ()):
            image = images.get(digest)
            if image is not None:
                candidates.update(image.blobs())
        rows.missing.extend((lid, digest) for digest in sorted(candidates) if graph_key(digest) in keys)


def pg_text(value: str) -> str:
    """*value* as PostgreSQL text, which cannot hold NUL: a NUL is spelled ``\\x00``, as ocidx prints it.

    Only a ``mediaType`` can carry one into the index (every other text column is validated, JSON or
    escaped already); without this, one hostile ``index.json`` would stop its host publishing for good.
    """
    return value.replace("\x00", "\\x00") if "\x00" in value else value


def _no_nul(rows: list[tuple[Any, ...]], column: int) -> list[tuple[Any, ...]]:
    return [(*row[:column], pg_text(row[column]), *row[column + 1 :]) if "\x00" in row[column] else row for row in rows]


def _chunks(values: list[int], size: int = 500) -> list[list[int]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


class Changes:
    """What one look at SQLite found above the watermark."""

    __slots__ = ("backlog", "full", "incarnation", "removed", "rows", "through")

    def __init__(
        self, *, through: int, rows: Rows | None, removed: list[bytes], backlog: int, full: bool, incarnation: str
    ) -> None:
        self.through = through  # the version this batch publishes through
        self.rows = rows
        self.removed = removed
        self.backlog = backlog  # changes still unpublished after this batch
        self.full = full  # the watermark cannot be followed: reconcile in full
        self.incarnation = incarnation  # the index's, as this read transaction saw it


def incarnation_of(conn: sqlite3.Connection) -> str:
    """The index's incarnation (caller holds the read transaction)."""
    return str(conn.execute("SELECT incarnation FROM ocidx_incarnation").fetchone()[0])


def backlog_of(conn: sqlite3.Connection, watermark: int) -> int:
    """Changes committed locally above *watermark*: layouts changed and layouts removed."""
    changed = conn.execute("SELECT count(*) FROM layouts WHERE version > ?", (watermark,)).fetchone()[0]
    removed = conn.execute("SELECT count(*) FROM layout_removals WHERE version > ?", (watermark,)).fetchone()[0]
    return int(changed) + int(removed)


def read_changes(conn: sqlite3.Connection, watermark: int, limit: int = BATCH_LAYOUTS) -> Changes:
    """The next batch above *watermark*, cut at a version boundary, in one read transaction."""
    conn.execute("BEGIN")
    try:
        counters = dict(conn.execute("SELECT name, value FROM ocidx_counters").fetchall())
        counter, pruned = int(counters["version"]), int(counters["removals_pruned_through"])
        incarnation = incarnation_of(conn)
        if counter < watermark or watermark < pruned:
            return Changes(through=counter, rows=None, removed=[], backlog=0, full=True, incarnation=incarnation)
        if counter == watermark:
            return Changes(through=counter, rows=None, removed=[], backlog=0, full=False, incarnation=incarnation)
        cut = conn.execute(
            "SELECT version FROM layouts WHERE version > ? ORDER BY version LIMIT 1 OFFSET ?", (watermark, limit)
        ).fetchone()
        through = counter
        if cut is not None:
            first = conn.execute("SELECT min(version) FROM layouts WHERE version > ?", (watermark,)).fetchone()[0]
            through = cut[0] - 1 if cut[0] - 1 >= first else cut[0]  # one version is never split
        rows = read_rows(conn, "version > ? AND version <= ?", (watermark, through))
        removed = [
            pg_path(row[0])
            for row in conn.execute(
                "SELECT path FROM layout_removals WHERE version > ? AND version <= ?", (watermark, through)
            )
        ]
        return Changes(
            through=through,
            rows=rows,
            removed=removed,
            backlog=backlog_of(conn, through),
            full=False,
            incarnation=incarnation,
        )
    finally:
        conn.execute("COMMIT")


def read_all(conn: sqlite3.Connection) -> tuple[int, str, dict[bytes, tuple[int, int, str | None]]]:
    """The version counter, the incarnation, and every layout's (id, version, content hash) by path,
    in one read transaction."""
    conn.execute("BEGIN")
    try:
        counter = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0]
        layouts = {
            pg_path(path): (lid, version, content_hash)
            for lid, path, version, content_hash in conn.execute("SELECT id, path, version, content_hash FROM layouts")
        }
        return int(counter), incarnation_of(conn), layouts
    finally:
        conn.execute("COMMIT")


def layout_checksum(lid: int, version: int, content_hash: str | None, path: bytes) -> int:
    """One layout's term of the checksum ``ocidx.host_summary()`` computes in PostgreSQL."""
    return int(hashlib.md5(f"{lid}:{version}:{content_hash or ''}:".encode() + path).hexdigest()[:15], 16)


class Summary:
    """A host's rows in brief: counts per table and a checksum of its layouts (ids, versions, hashes, paths)."""

    __slots__ = (
        "checksum",
        "children",
        "entries",
        "graph_attestations",
        "graph_manifests",
        "layout_warnings",
        "layouts",
        "missing_blobs",
        "names",
    )

    def __init__(
        self,
        *,
        layouts: int,
        checksum: int,
        entries: int,
        names: int,
        children: int,
        layout_warnings: int,
        graph_manifests: int,
        graph_attestations: int,
        missing_blobs: int,
    ) -> None:
        self.layouts = layouts
        self.checksum = checksum
        self.entries = entries
        self.names = names
        self.children = children
        self.layout_warnings = layout_warnings
        self.graph_manifests = graph_manifests
        self.graph_attestations = graph_attestations
        self.missing_blobs = missing_blobs

    def differences(self, other: Summary) -> list[str]:
        """What differs from *other*, as ``name here/there``."""
        return [
            f"{name} {getattr(self, name)}/{getattr(other, name)}"
            for name in self.__slots__
            if getattr(self, name) != getattr(other, name)
        ]


# What the host's rows in each table of the fleet count, counted in SQLite: the graph's rows are every
# manifest and index row (each is named by an entry or child of some layout, or it is gone: the
# writer's collect_garbage), every attestation link, and every referenced blob a layout lacks.
_SUMMARY_COUNTS = {
    "entries": "SELECT count(*) FROM entries",
    "names": "SELECT count(*) FROM names",
    "children": "SELECT count(*) FROM children",
    "layout_warnings": "SELECT count(*) FROM layout_warnings",
    "graph_manifests": "SELECT count(*) FROM manifests",
    "graph_attestations": "SELECT count(*) FROM attestations",
    "missing_blobs": "SELECT coalesce(sum(missing_blobs), 0) FROM layout_graph",
}


def read_summary(conn: sqlite3.Connection) -> tuple[int, str, Summary]:
    """The version counter, the incarnation and the summary of the index, in one read transaction."""
    conn.execute("BEGIN")
    try:
        counter = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0]
        layouts = checksum = 0
        for lid, path, version, content_hash in conn.execute("SELECT id, path, version, content_hash FROM layouts"):
            layouts += 1
            checksum += layout_checksum(lid, version, content_hash, pg_path(path))
        counts = {name: int(conn.execute(sql).fetchone()[0]) for name, sql in _SUMMARY_COUNTS.items()}
        summary = Summary(layouts=layouts, checksum=checksum, **counts)
        return int(counter), incarnation_of(conn), summary
    finally:
        conn.execute("COMMIT")


def read_some(conn: sqlite3.Connection, ids: list[int]) -> Rows:
    """The rows of the layouts with these ids (those still there), in one read transaction."""
    conn.execute("BEGIN")
    try:
        marks = ",".join("?" * len(ids))
        return read_rows(conn, f"id IN ({marks})", ids)
    finally:
        conn.execute("COMMIT")


def open_sqlite(path: str) -> tuple[sqlite3.Connection, int]:
    """The publisher's own read-only connection to the index (any worker thread), and the file's inode."""
    try:
        ino = os.stat(path).st_ino
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False, isolation_level=None
        )
    except (OSError, sqlite3.Error) as exc:
        raise DatabaseError(f"the fleet publisher cannot open {path}: {exc}") from None
    try:
        check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn, ino


class FleetReplaced(Exception):
    """The fleet database is not the one the host's rows were reconciled against (restored, failed over)."""

    def __init__(self, expected: str | None, found: str) -> None:
        super().__init__(f"the fleet database's incarnation is {found}, not {expected}")
        self.expected = expected
        self.found = found


async def publish_rows(
    conn: psycopg.AsyncConnection[tuple[Any, ...]],
    rows: Rows | None,
    removed: Sequence[bytes],
    *,
    watermark: int | None,
    backlog: int | None,
    incarnation: str | None,
    fleet: str | None,
    stale_paths: Sequence[bytes] = (),
    forget: bool = False,
) -> str:
    """One PostgreSQL transaction: (forget every row of the host,) remove paths, replace whole layouts,
    add the graph's rows they name and delete those nothing names any more, move the watermark
    (recording the SQLite *incarnation*), beat; return the fleet's incarnation.

    When the fleet's incarnation is not *fleet* (the one the rows were reconciled against), the
    transaction is rolled back and :class:`FleetReplaced` raised.
    """
    async with conn.transaction():
        if forget:
            await conn.execute("SELECT ocidx.forget_host()")
        # The digests the rows deleted below named: the graph's rows that only they named go too.
        released: list[str] = []
        gone = [*removed, *stale_paths]
        if gone:
            released.extend(await _released(conn, "SELECT ocidx.remove_layouts(%s::bytea[])", (gone,)))
        if rows is not None and rows.ids:
            data = rows.tables["layouts"]
            released.extend(
                await _released(
                    conn,
                    "SELECT ocidx.put_layouts(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], "
                    "%s::text[], %s::text[], %s::integer[])",
                    [[row[i] for row in data] for i in range(len(_PG_TABLES["layouts"]))],
                )
            )
            # JSON encodes the rows in C, where adapting a Python list per column cost psycopg about half
            # of an insert (docs/design.md); paths, which JSON cannot carry, went as bytea above.
            await conn.execute(
                "SELECT ocidx.put_rows(%s::json, %s::json, %s::json, %s::json)",
                tuple(json.dumps(rows.tables[t]) for t in ("entries", "names", "children", "layout_warnings")),
            )
        if released or (rows is not None and (rows.manifests or rows.attestations or rows.missing)):
            await conn.execute(
                "SELECT ocidx.put_graph(%s::json, %s::json, %s::json, %s::text[])",
                (
                    json.dumps(list(rows.manifests.values()) if rows is not None else []),
                    json.dumps(rows.attestations if rows is not None else []),
                    json.dumps(rows.missing if rows is not None else []),
                    sorted(set(released)),
                ),
            )
        cur = await conn.execute(
            "SELECT ocidx.beat(%s, %s, %s, %s)",
            (backlog, os.getpid(), watermark, incarnation if watermark is not None else None),
        )
        row = await cur.fetchone()
        found = str(row[0]) if row is not None else ""
        if fleet is not None and found != fleet:
            raise FleetReplaced(fleet, found)
    return found


async def _released(conn: psycopg.AsyncConnection[tuple[Any, ...]], sql: str, args: Sequence[object]) -> list[str]:
    """Run ``ocidx.put_layouts`` or ``ocidx.remove_layouts``; the digests the rows it deleted named."""
    row = await (await conn.execute(sql, args)).fetchone()
    return [str(digest) for digest in row[0]] if row is not None and row[0] is not None else []


class Publisher:
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
        self.dsn = dsn
        self.db_path = db_path
        self.heartbeat_s = heartbeat_s
        self.record = record  # runs a write on the daemon's SQLite writer (serialized with its batches)
        self.batch_layouts = batch_layouts
        self.on_backlog = on_backlog
        self.reconcile_s = reconcile_s  # at least this often, the host's rows are checked (counts, checksum)
        self.state = "starting"
        self.host: str | None = None
        self.watermark = 0
        self.backlog = 0
        self.published_batches = 0
        self.sqlite_incarnation: str | None = None  # the index's, as the rows in PostgreSQL were made from
        self.fleet_incarnation: str | None = None  # the fleet database's, as last reconciled against
        self.checked_at = 0.0  # time.monotonic() of the last check of the rows (or reconcile)
        self._sqlite: sqlite3.Connection | None = None
        self._ino = 0
        self._limiter = anyio.CapacityLimiter(1)  # one thread at a time on the SQLite connection

    # -- SQLite -----------------------------------------------------------------------------------

    async def _local(self, fn: Callable[..., Any], *args: object) -> Any:
        """Run *fn(conn, *args)* on the publisher's own SQLite connection in a worker thread."""
        if self._sqlite is None:
            self._sqlite, self._ino = await anyio.to_thread.run_sync(open_sqlite, self.db_path, limiter=self._limiter)
        conn = self._sqlite
        return await anyio.to_thread.run_sync(lambda: fn(conn, *args), limiter=self._limiter)

    async def _replaced(self) -> bool:
        """Whether the database file was replaced under the connection (a corrupt index moved aside)."""
        try:
            ino = (await anyio.to_thread.run_sync(os.stat, self.db_path)).st_ino
        except OSError:
            return True
        return ino != self._ino

    def _close_sqlite(self) -> None:
        conn, self._sqlite = self._sqlite, None
        if conn is not None:
            conn.close()

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

    # -- PostgreSQL -------------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="ocidx publisher"
        )
        try:
            await conn.execute(
                bounds_sql(lock_s=LOCK_TIMEOUT_S, statement_s=STATEMENT_TIMEOUT_S, idle_s=IDLE_IN_TRANSACTION_S)
            )
            row = await (
                await conn.execute("SELECT session_user, pg_has_role(session_user, 'ocidx_publisher', 'MEMBER')")
            ).fetchone()
            assert row is not None
            self.host = str(row[0])
            if not row[1]:
                raise self._not_a_host()
            probe = await (await conn.execute(PROBE_MIGRATIONS_SQL)).fetchone()
            if probe is None or not (probe[0] or probe[1]):
                raise FleetUnavailable(NO_SCHEMA)
            cur = await conn.execute(APPLIED_SQL if probe[0] else APPLIED_V1_SQL)
            applied = [str(r[0]) for r in await cur.fetchall()]
            problem = schema_problem(applied)
            if problem is not None:
                raise problem
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    def _not_a_host(self) -> FleetUnavailable:
        return FleetUnavailable(
            f"role {self.host} is not a host of the fleet (run 'ocidx fleet add-host --dsn ADMIN_DSN {self.host}')"
        )

    async def reconcile(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], *, rewrite: str | None = None) -> None:
        """Make the host's rows in PostgreSQL those of SQLite: publish what differs, delete what SQLite lacks.

        With *rewrite* (why), or when the rows were published from another incarnation of the index, or
        from a later state of it (its counter went back: versions will be handed out again), every row
        of the host is deleted and every layout published again.
        """
        row = await (await conn.execute("SELECT * FROM ocidx.publisher_state()")).fetchone()
        if row is None or not row[0]:
            raise self._not_a_host()
        remote_watermark, remote_incarnation, fleet = int(row[1]), row[2], str(row[3])
        counter, incarnation, local = await self._local(read_all)
        if rewrite is None and remote_incarnation != incarnation:
            rewrite = (
                f"its rows came from another index (incarnation {remote_incarnation}, now {incarnation})"
                if remote_incarnation is not None
                else "the fleet records no index for its rows (never published, or before fleet migration 0003)"
            )
        if rewrite is None and counter < remote_watermark:
            rewrite = f"the index went back from version {remote_watermark} to {counter}"
        remote: dict[bytes, tuple[int, int, str | None]] = {}
        if rewrite is None:
            remote = {
                bytes(path): (int(lid), int(version), content_hash)
                for lid, path, version, content_hash in await (
                    await conn.execute("SELECT * FROM ocidx.host_layouts()")
                ).fetchall()
            }
        stale = [path for path in remote if path not in local]
        differ = sorted(values[0] for path, values in local.items() if remote.get(path) != values)
        chunks = [differ[i : i + self.batch_layouts] for i in range(0, len(differ), self.batch_layouts)] or [[]]
        for n, ids in enumerate(chunks):
            rows = await self._local(read_some, ids) if ids else None
            last = n == len(chunks) - 1
            backlog = await self._local(backlog_of, counter) if last else None
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
        self._set_backlog(await self._local(backlog_of, counter))
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
        counter, incarnation, local = await self._local(read_summary)
        if counter != self.watermark or incarnation != self.sqlite_incarnation:
            return False
        row = await (await conn.execute("SELECT * FROM ocidx.host_summary()")).fetchone()
        assert row is not None
        remote = Summary(
            layouts=int(row[0]),
            checksum=int(row[1]),
            entries=int(row[2]),
            names=int(row[3]),
            children=int(row[4]),
            layout_warnings=int(row[5]),
            graph_manifests=int(row[8]),
            graph_attestations=int(row[9]),
            missing_blobs=int(row[10]),
        )
        differences = local.differences(remote)
        if row[6] != self.watermark:
            differences.append(f"watermark {self.watermark}/{row[6]}")
        if row[7] != self.sqlite_incarnation:
            differences.append(f"incarnation {self.sqlite_incarnation}/{row[7]}")
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
                if await self._replaced():
                    self._close_sqlite()
                    await self.reconcile(conn)
                    continue
                changes: Changes = await self._local(read_changes, self.watermark, self.batch_layouts)
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
                    with anyio.fail_after(BATCH_TIMEOUT_S):
                        await publish_rows(
                            conn,
                            changes.rows,
                            changes.removed,
                            watermark=changes.through,
                            backlog=changes.backlog,
                            incarnation=changes.incarnation,
                            fleet=self.fleet_incarnation,
                        )
                    self.watermark = changes.through
                    self.published_batches += 1
                    self._set_backlog(changes.backlog)
                    beat_due = time.monotonic() + self.heartbeat_s
                    await self._record_row(published=True)
                    continue  # more may be waiting: no sleep between batches
                if time.monotonic() >= self.checked_at + self.reconcile_s and not await self.check(conn):
                    continue  # the index moved under the check: publish that first, then check
                if time.monotonic() >= beat_due:
                    with anyio.fail_after(BATCH_TIMEOUT_S):
                        await publish_rows(
                            conn,
                            None,
                            [],
                            watermark=None,
                            backlog=0,
                            incarnation=None,
                            fleet=self.fleet_incarnation,
                        )
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
                        self._set_backlog(await self._local(backlog_of, self.watermark))
                    await self._set_state(f"unreachable: {why}" if isinstance(exc, psycopg.OperationalError) else why)
                except (DatabaseError, sqlite3.Error) as exc:  # the local index is unreadable (being rebuilt?)
                    self._close_sqlite()
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
            self._close_sqlite()
