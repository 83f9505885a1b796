"""Publishing a host's SQLite index to the fleet database, as whole layouts (docs/fleet.md).

The SQLite writer stamps every change with a version (``layouts.version``,
``layout_removals``, the counter ``ocidx_counters.version``), handed out under
its write lock, so that a read transaction that sees the counter at W has seen
every change with a version up to W. The publisher follows those versions:

* on every (re)connect it reconciles in full: the host's layout paths, ids and
  versions in PostgreSQL against SQLite's; what differs is published, what
  PostgreSQL has and SQLite does not is deleted; its watermark becomes the
  counter it read;
* then, polling SQLite, it publishes the layouts with a version above its
  watermark and the removals above it, in one PostgreSQL transaction per batch:
  a layout's rows replace its previous rows (delete, then insert), and the
  host row's watermark moves in the same transaction, so a retry of a batch
  whose commit was lost is harmless;
* a watermark below ``removals_pruned_through`` (the writer keeps the newest
  10,000 removals), a counter below the watermark or a database file replaced
  under it (a corrupt index rebuilt) means a full reconcile again.

It reads SQLite on its own read-only connection in a worker thread, so it never
holds up local indexing or local answers; PostgreSQL down, slow, restarted or
failed over means it logs once per change of state, retries with exponential
backoff (capped), and catches up. Its state (connected or why not, watermark,
last publish) is kept in SQLite's ``fleet_publisher`` row for ``ocidx status``
and in PostgreSQL (the host row and its heartbeat, with the backlog).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time

import anyio
import anyio.to_thread

from indexer.errors import DatabaseError, FleetUnavailable
from indexer.fleet import CONNECT_TIMEOUT_S, _first_line, describe_dsn, schema_problem
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
CONNECTED = "connected"

# What a batch reads from SQLite for each layout, and writes to PostgreSQL.
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
# The content graph's rows, once per host and digest (migrations/postgres/0003): never replaced, as
# a digest's content never changes; removed with the last layout of the host that references them.
_GRAPH_MANIFESTS_SQL = (
    "INSERT INTO graph_manifests (digest, config, config_media_type, config_size, artifact_type, subject, "
    "annotations, layers, layer_types, layer_sizes) "
    "SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, r->>4, r->>5, r->>6, "
    "ARRAY(SELECT json_array_elements_text(r->7)), ARRAY(SELECT json_array_elements_text(r->8)), "
    "ARRAY(SELECT json_array_elements_text(r->9))::bigint[] "
    "FROM json_array_elements(%s::json) AS r ON CONFLICT (host, digest) DO NOTHING"
)
_GRAPH_ATTESTATIONS_SQL = (
    "INSERT INTO graph_attestations (index_digest, digest, target) SELECT r->>0, r->>1, r->>2 "
    "FROM json_array_elements(%s::json) AS r ON CONFLICT (host, index_digest, digest) DO NOTHING"
)
_PG_TYPES = {
    "layouts": ("bigint", "bytea", "bigint", "text", "text", "text", "text", "integer"),
    "entries": ("bigint", "integer", "text", "text", "bigint", "text", "text", "text", "text", "text"),
    "names": ("bigint", "integer", "integer", "text", "text", "text"),
    "children": ("bigint", "integer", "integer", "text", "integer", "text", "text", "bigint", "text", "text", "text"),
    "layout_warnings": ("bigint", "integer", "text"),
}


def pg_path(value: str | bytes) -> bytes:
    """A ``layouts.path`` value of SQLite as PostgreSQL's ``bytea`` path: the directory's bytes."""
    return value if isinstance(value, bytes) else os.fsencode(path_of(value))


def insert_sql(table: str) -> str:
    """One INSERT of a whole column set as arrays (row-level security forbids COPY FROM for hosts)."""
    columns = _PG_TABLES[table]
    arrays = ", ".join(f"%s::{kind}[]" for kind in _PG_TYPES[table])
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays})"


def insert_json_sql(table: str) -> str:
    """One INSERT of many rows sent as one JSON array of arrays (no bytea columns).

    ``json.dumps`` encodes the rows in C, where adapting a Python list per column cost psycopg about
    half of an insert; measured 15-25% faster per batch than :func:`insert_sql` (docs/design.md).
    """
    columns = _PG_TABLES[table]
    values = ", ".join(f"(r->>{i})::{kind}" for i, kind in enumerate(_PG_TYPES[table]))
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values} FROM json_array_elements(%s::json) AS r"


class Rows:
    """The published rows of some layouts, read from SQLite in one read transaction, by PostgreSQL table,
    and the content graph's rows they reference (``manifests``, ``attestations``)."""

    __slots__ = ("attestations", "ids", "manifests", "paths", "tables")

    def __init__(self) -> None:
        self.tables: dict[str, list[tuple[object, ...]]] = {table: [] for table in _PG_TABLES}
        self.ids: list[int] = []
        self.paths: list[bytes] = []
        self.manifests: list[list[object]] = []
        self.attestations: list[list[str]] = []


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
        images = _graph(conn, rows, [(e[2], e[3]) for e in entries] + [(c[5], c[6]) for c in kids])
        absent = db.missing(conn, chunk)
        entries = [(*e, _image_json(images.get(e[2]), e[3], absent.get(e[0]))) for e in entries]
        kids = [(*c, _image_json(images.get(c[5]), c[6], absent.get(c[0]))) for c in kids]
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


def _graph(conn: sqlite3.Connection, rows: Rows, descriptors: list[tuple[str, str]]) -> dict[str, db.Image]:
    """The content graph's rows of the manifests and indexes *descriptors* name, added to *rows* (the
    host's ``graph_manifests`` and ``graph_attestations``); the images by digest."""
    from indexer.graph import MANIFEST_MEDIA_TYPES, graph_key
    from indexer.layout import INDEX_MEDIA_TYPES

    wanted = {digest for digest, media_type in descriptors if media_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES}
    images = db.images(conn, wanted)
    for image in images.values():
        layers = db.parse_layers(image.layers) if image.layers else []
        rows.manifests.append(
            [
                image.digest,
                image.config,
                image.config_media_type,
                image.config_size,
                pg_text(image.artifact_type),
                image.subject,
                json.dumps(image.annotations, sort_keys=True) if image.annotations else None,
                [layer[0] for layer in layers],
                [pg_text(layer[1]) for layer in layers],
                [layer[2] for layer in layers],
            ]
        )
        if image.kind == "index":
            rows.attestations.extend(
                [image.digest, digest, target]
                for digest, target in conn.execute(
                    "SELECT digest, target FROM attestations WHERE index_key = ?", (graph_key(image.digest),)
                )
            )
    return images


def _image_json(image: db.Image | None, media_type: str, absent: set[int] | None) -> str | None:
    """The ``image`` column of an entry or child: what the host answers of its image, as JSON."""
    from indexer.graph import MANIFEST_MEDIA_TYPES
    from indexer.query import image_fields

    if media_type not in MANIFEST_MEDIA_TYPES:
        return None
    fields = image_fields(image, absent)
    return json.dumps(fields, sort_keys=True) if fields is not None else None


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

    __slots__ = ("backlog", "full", "removed", "rows", "through")

    def __init__(self, *, through: int, rows: Rows | None, removed: list[bytes], backlog: int, full: bool) -> None:
        self.through = through  # the version this batch publishes through
        self.rows = rows
        self.removed = removed
        self.backlog = backlog  # changes still unpublished after this batch
        self.full = full  # the watermark cannot be followed: reconcile in full


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
        if counter < watermark or watermark < pruned:
            return Changes(through=counter, rows=None, removed=[], backlog=0, full=True)
        if counter == watermark:
            return Changes(through=counter, rows=None, removed=[], backlog=0, full=False)
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
        return Changes(through=through, rows=rows, removed=removed, backlog=backlog_of(conn, through), full=False)
    finally:
        conn.execute("COMMIT")


def read_all(conn: sqlite3.Connection) -> tuple[int, dict[bytes, tuple[int, int]]]:
    """The version counter and every layout's (id, version) by path, in one read transaction."""
    conn.execute("BEGIN")
    try:
        counter = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0]
        layouts = {
            pg_path(path): (lid, version)
            for lid, path, version in conn.execute("SELECT id, path, version FROM layouts")
        }
        return int(counter), layouts
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


async def publish_rows(
    conn: psycopg.AsyncConnection[tuple[Any, ...]],
    rows: Rows | None,
    removed: Sequence[bytes],
    *,
    watermark: int | None,
    backlog: int | None,
    stale_paths: Sequence[bytes] = (),
) -> None:
    """One PostgreSQL transaction: remove paths, replace whole layouts, move the watermark, beat."""
    async with conn.transaction():
        gone = [*removed, *stale_paths]
        ids = rows.ids if rows is not None else []
        paths = rows.paths if rows is not None else []
        # The digests the layouts about to be replaced or removed name: the content graph's rows that
        # nothing else of this host names go with them (below).
        released = await conn.execute(
            "SELECT e.digest FROM entries e JOIN layouts l ON l.host = e.host AND l.id = e.layout_id "
            "WHERE l.host = session_user AND (l.path = ANY(%s) OR l.id = ANY(%s) OR l.path = ANY(%s)) "
            "UNION SELECT c.digest FROM children c JOIN layouts l ON l.host = c.host AND l.id = c.layout_id "
            "WHERE l.host = session_user AND (l.path = ANY(%s) OR l.id = ANY(%s) OR l.path = ANY(%s))",
            (gone, ids, paths, gone, ids, paths),
        )
        candidates = [str(row[0]) for row in await released.fetchall()]
        if gone:
            await conn.execute("DELETE FROM layouts WHERE host = session_user AND path = ANY(%s)", (gone,))
        if rows is not None and rows.ids:
            # A layout's previous rows go with it (the foreign keys cascade), whether the host knew it
            # by this path or this id: a retried batch writes the same rows again.
            await conn.execute(
                "DELETE FROM layouts WHERE host = session_user AND (id = ANY(%s) OR path = ANY(%s))",
                (rows.ids, rows.paths),
            )
            for table, columns in _PG_TABLES.items():
                data = rows.tables[table]
                if not data:
                    continue
                if table == "layouts":  # paths are bytea, which JSON cannot carry
                    await conn.execute(insert_sql(table), [[row[i] for row in data] for i in range(len(columns))])
                else:
                    await conn.execute(insert_json_sql(table), (json.dumps(data),))
            if rows.manifests:
                await conn.execute(_GRAPH_MANIFESTS_SQL, (json.dumps(rows.manifests),))
            if rows.attestations:
                await conn.execute(_GRAPH_ATTESTATIONS_SQL, (json.dumps(rows.attestations),))
        if candidates:
            await conn.execute(
                "DELETE FROM graph_manifests g WHERE g.host = session_user AND g.digest = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.host = g.host AND e.digest = g.digest) "
                "AND NOT EXISTS (SELECT 1 FROM children c WHERE c.host = g.host AND c.digest = g.digest)",
                (candidates,),
            )
            await conn.execute(
                "DELETE FROM graph_attestations a WHERE a.host = session_user AND a.index_digest = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM graph_manifests g WHERE g.host = a.host AND g.digest = a.index_digest)",
                (candidates,),
            )
        if watermark is not None:
            await conn.execute(
                "UPDATE hosts SET watermark = %s, published_at = now() WHERE host = session_user", (watermark,)
            )
        if backlog is not None:
            await beat(conn, backlog)


async def beat(conn: psycopg.AsyncConnection[tuple[Any, ...]], backlog: int) -> None:
    """The host's heartbeat row (the server's clock), with the backlog as it stands."""
    await conn.execute(
        "INSERT INTO heartbeats (host, beat_at, backlog, pid, started_at) "
        "VALUES (session_user, now(), %s, %s, now()) "
        "ON CONFLICT (host) DO UPDATE SET beat_at = now(), backlog = excluded.backlog, pid = excluded.pid",
        (backlog, os.getpid()),
    )


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
    ) -> None:
        self.dsn = dsn
        self.db_path = db_path
        self.heartbeat_s = heartbeat_s
        self.record = record  # runs a write on the daemon's SQLite writer (serialized with its batches)
        self.batch_layouts = batch_layouts
        self.on_backlog = on_backlog
        self.state = "starting"
        self.host: str | None = None
        self.watermark = 0
        self.backlog = 0
        self.published_batches = 0
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
        now = time.time_ns()
        state, host, watermark = self.state, self.host, self.watermark

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO fleet_publisher (id, host, state, since_ns, watermark, published_ns) "
                "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET host = coalesce(excluded.host, host), "
                "state = excluded.state, "
                "since_ns = CASE WHEN state = excluded.state THEN since_ns ELSE excluded.since_ns END, "
                "watermark = excluded.watermark, published_ns = coalesce(excluded.published_ns, published_ns)",
                (host, state, now, watermark, now if published else None),
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
            row = await (
                await conn.execute("SELECT session_user, pg_has_role(session_user, 'ocidx_publisher', 'MEMBER')")
            ).fetchone()
            assert row is not None
            self.host = str(row[0])
            not_a_host = FleetUnavailable(
                f"role {self.host} is not a host of the fleet (run 'ocidx fleet add-host --dsn ADMIN_DSN {self.host}')"
            )
            if not row[1]:
                raise not_a_host
            exists = await (await conn.execute("SELECT to_regclass('ocidx_migrations') IS NOT NULL")).fetchone()
            if not exists or not exists[0]:
                raise FleetUnavailable("the fleet database has no ocidx fleet schema (run 'ocidx fleet migrate')")
            applied = [str(r[0]) for r in await (await conn.execute("SELECT name FROM ocidx_migrations")).fetchall()]
            problem = schema_problem(applied)
            if problem is not None:
                raise problem
            registered = await (
                await conn.execute("SELECT EXISTS (SELECT FROM hosts WHERE host = session_user)")
            ).fetchone()
            if not registered or not registered[0]:
                raise not_a_host
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def reconcile(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """Make the host's rows in PostgreSQL those of SQLite: publish what differs, delete what SQLite lacks."""
        counter, local = await self._local(read_all)
        remote = {
            bytes(path): (int(lid), int(version))
            for lid, path, version in await (
                await conn.execute("SELECT id, path, version FROM layouts WHERE host = session_user")
            ).fetchall()
        }
        stale = [path for path in remote if path not in local]
        differ = sorted(lid for path, (lid, version) in local.items() if remote.get(path) != (lid, version))
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
                    watermark=counter if last else None,
                    backlog=backlog,
                )
        self.watermark = counter
        self._set_backlog(await self._local(backlog_of, counter))
        log.info(
            "fleet: reconciled host %s: %d layouts published, %d removed",
            self.host,
            len(differ),
            len(stale),
            extra={"fields": {"event": "fleet_reconciled", "published": len(differ), "removed": len(stale)}},
        )
        await self._record_row(published=True)

    async def follow(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """Publish each change above the watermark as it commits locally; return only by raising."""
        beat_due = time.monotonic() + self.heartbeat_s
        while True:
            if await self._replaced():
                self._close_sqlite()
                await self.reconcile(conn)
            changes: Changes = await self._local(read_changes, self.watermark, self.batch_layouts)
            if changes.full:
                await self.reconcile(conn)
                continue
            if changes.rows is not None or changes.removed:
                with anyio.fail_after(BATCH_TIMEOUT_S):
                    await publish_rows(
                        conn, changes.rows, changes.removed, watermark=changes.through, backlog=changes.backlog
                    )
                self.watermark = changes.through
                self.published_batches += 1
                self._set_backlog(changes.backlog)
                beat_due = time.monotonic() + self.heartbeat_s
                await self._record_row(published=True)
                continue  # more may be waiting: no sleep between batches
            if time.monotonic() >= beat_due:
                with anyio.fail_after(BATCH_TIMEOUT_S):
                    await beat(conn, 0)
                beat_due = time.monotonic() + self.heartbeat_s
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
                except (psycopg.Error, OSError, TimeoutError, FleetUnavailable) as exc:
                    why = exc.message if isinstance(exc, FleetUnavailable) else _first_line(exc)
                    if isinstance(exc, TimeoutError):
                        why = f"PostgreSQL did not answer within {BATCH_TIMEOUT_S:g}s"
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
