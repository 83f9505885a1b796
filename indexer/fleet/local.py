"""What the fleet publisher reads from the host's SQLite index (docs/fleet.md, "What is published").

Every read is one read transaction on the publisher's own read-only connection
(:class:`LocalIndex`, used from a worker thread, so that it never holds up local indexing or
local answers): the rows of some layouts as the fleet's publishing functions take them
(:func:`read_rows`), with the content graph's rows they name; the next batch above a watermark
(:func:`read_changes`); every layout's version and hash (:func:`read_all`), for a reconcile; and
counts and a checksum (:func:`read_summary`), for the check of the host's rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import anyio
import anyio.to_thread

from indexer.errors import DatabaseError
from indexer.graph import MANIFEST_MEDIA_TYPES, graph_key
from indexer.query import image_fields
from indexer.store import check_schema, path_of
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

BATCH_LAYOUTS = 500  # layouts per PostgreSQL transaction (a version is never split)

# What a batch reads from SQLite for each layout, and sends to PostgreSQL: the columns of
# ocidx.put_layouts and ocidx.put_rows, in their order (an entry's and a child's image, computed
# from the content graph, last).
_LAYOUT_COLUMNS = "id, path, version, state, error_category, error, content_hash, entry_count"
PG_TABLES = {
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
        self.tables: dict[str, list[tuple[object, ...]]] = {table: [] for table in PG_TABLES}
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


class LocalIndex:
    """The publisher's own read-only connection to the index at *path*, opened on first use, used from
    one worker thread at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._ino = 0
        self._limiter = anyio.CapacityLimiter(1)  # one thread at a time on the connection

    async def run(self, fn: Callable[..., Any], *args: object) -> Any:
        """*fn(conn, *args)* in a worker thread."""
        if self._conn is None:
            self._conn, self._ino = await anyio.to_thread.run_sync(open_sqlite, self.path, limiter=self._limiter)
        conn = self._conn
        return await anyio.to_thread.run_sync(lambda: fn(conn, *args), limiter=self._limiter)

    async def replaced(self) -> bool:
        """Whether the database file was replaced under the connection (a corrupt index moved aside)."""
        try:
            ino = (await anyio.to_thread.run_sync(os.stat, self.path)).st_ino
        except OSError:
            return True
        return ino != self._ino

    def close(self) -> None:
        """Close the connection; the next :meth:`run` opens the file again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
