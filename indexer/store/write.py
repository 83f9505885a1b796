"""The single writer: whole batches of layout outcomes, one transaction each, rows diffed.

A scan (batch or daemon) turns every layout it looks at into one outcome:

* :class:`Read` - ``index.json`` was read and parsed: its rows are diffed in;
* :class:`Same` - it was read but its content hash is the one already stored:
  only the identity (stat) is refreshed, no row is touched;
* :class:`Failed` - it could not be read or parsed: the last good rows stay,
  the layout is flagged with the error;
* :class:`Gone` - the layout is no longer there: its rows are removed.

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

import json
import sys
import time

from indexer._record import Record
from indexer.errors import printable
from indexer.graph import graph_key, manifest_shape, pack_pairs, unpack_pairs
from indexer.store import path_value, read
from indexer.store.read import parse_layers

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable

    from indexer.errors import LayoutError
    from indexer.graph import BlobRef, Known, LayoutGraph
    from indexer.layout import Child, FileIdentity, Platform, Snapshot
    from indexer.store.read import StoredLayout


class Read(Record):
    """A layout whose ``index.json`` was read and parsed, as the rows to store (:func:`snapshot_rows`).

    ``epoch`` is the ``graph_epoch`` of the pass that read it: the shared rows its graph claims were
    sent before (:data:`GraphRows`) are taken as stored while the epoch has not moved since.
    """

    __slots__ = ("epoch", "expected", "path", "read_ns", "rows")

    def __init__(
        self, path: str, rows: LayoutRows, read_ns: int, expected: StoredLayout | None, epoch: int | None = None
    ) -> None:
        self.path = path
        self.rows = rows
        self.read_ns = read_ns
        self.expected = expected
        self.epoch = epoch

    @classmethod
    def of(
        cls,
        path: str,
        snapshot: Snapshot,
        read_ns: int,
        expected: StoredLayout | None,
        graph: LayoutGraph | None = None,
    ) -> Read:
        """The outcome of reading *snapshot* (and its *graph*), its rows computed here, in this process."""
        return cls(path, snapshot_rows(snapshot, graph), read_ns, expected)


class Same(Record):
    """A layout whose ``index.json`` and graph changed on disk but not in content: identities only."""

    __slots__ = ("depends", "expected", "identity", "mnt_id", "path", "presence", "read_ns")

    def __init__(
        self,
        path: str,
        identity: FileIdentity,
        read_ns: int,
        expected: StoredLayout | None,
        presence: PresenceRow | None = None,
        mnt_id: int | None = None,
        depends: str | None = None,
    ) -> None:
        self.path = path
        self.identity = identity
        self.read_ns = read_ns
        self.expected = expected
        self.presence = presence
        self.mnt_id = mnt_id
        self.depends = depends  # what this read found at the paths the rows depend on (read.encode_depends)


class Failed(Record):
    """A layout that could not be read; its last good rows are kept. ``error.transient`` tells a failure
    of the environment (stored with no identity, read again) from one of the layout's bytes."""

    __slots__ = ("error", "expected", "identity", "path", "read_ns")

    def __init__(
        self,
        path: str,
        error: LayoutError,
        identity: FileIdentity | None,
        read_ns: int,
        expected: StoredLayout | None,
    ) -> None:
        self.path = path
        self.error = error
        self.identity = identity
        self.read_ns = read_ns
        self.expected = expected


class Gone(Record):
    """A layout that vanished: its rows are removed."""

    __slots__ = ("expected", "path")

    def __init__(self, path: str, expected: StoredLayout | None) -> None:
        self.path = path
        self.expected = expected


Outcome = Read | Same | Failed | Gone


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
    rows = conn.execute(f"SELECT {read._LAYOUT_COLUMNS} FROM layouts WHERE path IN {wanted}")
    return {stored.path: stored for stored in map(read._stored, rows)}


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


_platform_json: dict[tuple[object, ...], str] = {}


def platform_json(platform: Platform | None) -> str | None:
    """The stored form of a platform: the JSON of ``Platform.to_json()``, or NULL (cached: few distinct)."""
    if platform is None:
        return None
    key = (platform.os, platform.architecture, platform.variant, platform.os_version, platform.os_features)
    text = _platform_json.get(key)
    if text is None:
        if len(_platform_json) > 4096:
            _platform_json.clear()
        text = _platform_json[key] = json.dumps(platform.to_json(), sort_keys=True)
    return text


def _sorted_encoder() -> Callable[[dict[str, str]], str]:
    """``json.dumps(value, sort_keys=True)`` for a dict of strings, without its per-call set-up.

    ``JSONEncoder.encode`` builds a new C encoder on every call, half the cost of encoding a
    descriptor's annotations (measured: 1.6 µs against 0.9 µs); this builds json's C encoder once,
    with the same separators and escaping (ASCII), and no circular-reference check (a parsed
    annotations object holds only strings). Without the C accelerator, the plain encoder.
    """
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(sort_keys=True).encode
    once = make(None, None, encoder.encode_basestring_ascii, None, ": ", ", ", True, False, True)

    def encode(value: dict[str, str]) -> str:
        return "".join(once(value, 0))

    return encode


_encode_sorted = _sorted_encoder()


def _annotations_json(annotations: dict[str, str]) -> str:
    return _encode_sorted(annotations) if annotations else "{}"


if TYPE_CHECKING:
    # What one read layout crosses the process boundary as (plain tuples pickle compactly):
    # (identity (dev, ino, size, mtime_ns, ctime_ns), content_hash, warnings, entries, names, children,
    # depends (read.encode_depends), mnt_id);
    # an entry (row_key, position, digest, media_type, size, platform, annotations, invalid_names, warnings),
    # a name (entry's index in entries, name, tag, how), a child (entry's index in entries, position,
    # parent, depth, digest, media_type, size, platform, annotations); JSON columns already encoded.
    EntryRow = tuple[str, int, str, str, int, str | None, str, str | None, str | None]
    NameRow = tuple[int, str, str, str]
    ChildRow = tuple[int, int, str, int, str, str, int, str | None, str]
    # The content graph of one layout (:func:`graph_rows`), or None when it was not read:
    # (presence, layout_graph row, graph hash, shared rows, claims). Presence: (first directory's name,
    # dev, ino, mtime_ns, ctime_ns, further directories as JSON, blobs/ itself as JSON, listed_ns, the
    # latest mtime or ctime of any directory listed). The layout_graph row: (complete, referenced
    # blobs, referenced bytes, missing blobs, unreferenced blobs, unreferenced bytes, missing, held:
    # the graph keys of the missing blobs, and of the held ones with their sizes, packed as int64s).
    # Shared rows: (manifests, layer_users, configs, attestations) rows, each only the first time its
    # worker sent it in a pass; claims: the graph keys of the manifests and configs this layout
    # references whose rows that worker sent before (with another layout; configs' negated less one).
    PresenceRow = tuple[str, int | None, int | None, int | None, int | None, str | None, str | None, int, int]
    LayoutGraphRow = tuple[int, int, int, int, int, int, bytes | None, bytes]
    SharedRows = tuple[
        list[tuple[object, ...]], list[tuple[int, int]], list[tuple[object, ...]], list[tuple[object, ...]]
    ]
    GraphRows = tuple[PresenceRow, LayoutGraphRow, str, SharedRows, list[int]]
    LayoutRows = tuple[
        tuple[int, int, int, int, int],
        str,
        tuple[str, ...],
        list[EntryRow],
        list[NameRow],
        list[ChildRow],
        GraphRows | None,
        str | None,
        int | None,
    ]


def layers_json(layers: tuple[BlobRef, ...]) -> str:
    """A manifest's layers as ``manifests.layers`` holds them: ``[digest, size, mediaType, 1]``, the
    media type left out when it is the previous layer's and the last item only for an external one."""
    items: list[list[object]] = []
    previous = None
    for layer in layers:
        item: list[object] = [layer.digest, layer.size]
        if layer.media_type != previous or layer.external:
            item.append(layer.media_type)
        if layer.external:
            item.append(1)
        previous = layer.media_type
        items.append(item)
    return json.dumps(items, separators=(",", ":"))


def graph_rows(graph: LayoutGraph, known: Known | None = None) -> GraphRows:
    """The rows of one layout's content graph as stored (in a parsing worker, or here).

    The shared rows are those of the manifests, indexes and configs parsed for *graph*: each goes
    into *known* (what this process sent in this pass, :class:`~indexer.graph.Known`), so that a
    later layout holding it claims it (``graph.claims``) instead of reading it again.
    """
    from array import array

    found = graph.reach
    # Presence: every blobs/ALG listed, and blobs/ itself when a referenced algorithm has no
    # directory (its creation is then a change) or blobs/ is absent; the first one in columns.
    alg_dirs = [ident for ident in graph.identities if ident[0] != "blobs"]
    root = next((ident for ident in graph.identities if ident[0] == "blobs"), None)
    proof: list[tuple[str, int | None, int | None, int | None, int | None]] = list(alg_dirs)
    if root is None:
        proof = [("blobs", None, None, None, None)]
    else:
        listed = {name.removeprefix("blobs/") for name, *_ in alg_dirs}
        if not alg_dirs or graph.dirs_refused or found.algorithms - listed:
            proof.insert(0, root)
    first, more = proof[0], proof[1:]
    changed = max((max(ident[3], ident[4]) for ident in graph.identities), default=0)
    presence: PresenceRow = (
        *first,
        json.dumps([list(ident) for ident in more]) if more else None,
        json.dumps(list(root[1:])) if root is not None else None,
        graph.listed_ns,
        changed,
    )
    refs, present, unreferenced = found.refs, graph.present, graph.unreferenced
    held_refs = sorted([key for key in refs if key in present])
    held_other = sorted(unreferenced)
    sizes = array("q", [refs[key] for key in held_refs] + [unreferenced[key] for key in held_other])
    if sys.byteorder != "little":
        sizes.byteswap()
    held = pack_pairs(held_refs + held_other) + sizes.tobytes()
    missing = pack_pairs(graph.missing) if graph.missing else None
    figures = (
        int(graph.complete),
        len(held_refs),
        sum(refs[key] for key in held_refs),
        len(graph.missing),
        len(held_other),
        sum(unreferenced.values()),
    )
    layout_row: LayoutGraphRow = (*figures, missing, held)
    import hashlib

    graph_hash = hashlib.blake2b(repr(figures).encode() + (missing or b"") + b"|" + held, digest_size=16).hexdigest()
    manifests: list[tuple[object, ...]] = []
    layer_users: list[tuple[int, int]] = []
    configs: list[tuple[object, ...]] = []
    attestations: list[tuple[object, ...]] = []
    for digest, image_config in graph.configs.items():
        key = graph_key(digest)
        if known is not None:
            known.configs[key] = image_config.warnings
        platform = image_config.platform
        configs.append(
            (
                key,
                digest,
                platform.os if platform is not None else None,
                platform.architecture if platform is not None else None,
                (platform.variant or None) if platform is not None else None,
                (platform.os_version or None) if platform is not None else None,
                json.dumps(list(platform.os_features)) if platform is not None and platform.os_features else None,
                image_config.created,
                json.dumps(list(image_config.warnings)) if image_config.warnings else None,
            )
        )
    shapes = found.shapes
    for manifest in (*found.manifests.values(), *graph.indexes.values()):
        key = graph_key(manifest.digest)
        config, layers = manifest.config, manifest.layers
        shape = shapes.get(manifest.digest) or manifest_shape(manifest)
        if known is not None:
            if shape.config is not None and graph_key(shape.config) in known.configs:
                shape = shape._replace(config=None)  # its config's row is sent: no need of its digest
            known.manifests[key] = shape
        keys = unpack_pairs(shape.pairs)  # the config's key and size first, then each layer's
        manifests.append(
            (
                key,
                manifest.digest,
                manifest.kind,
                manifest.media_type,
                manifest.size,
                manifest.artifact_type,
                manifest.subject,
                _annotations_json(manifest.annotations) if manifest.annotations else None,
                config.digest if config is not None else None,
                keys[0] if config is not None else None,
                config.media_type if config is not None else None,
                config.size if config is not None else None,
                layers_json(layers) if manifest.kind == "manifest" else None,
                len(layers) if manifest.kind == "manifest" else None,
                manifest.image_size,
                int(manifest.complete),
                json.dumps(list(manifest.warnings)) if manifest.warnings else None,
            )
        )
        if layers:
            layer_users.extend((layer_key, key) for layer_key in dict.fromkeys(keys[2::2] if config else keys[::2]))
    for index, digest, target in graph.attestations:
        if index in graph.indexes:  # they go with the index's row, once
            attestations.append((graph_key(target), graph_key(index), digest, target))
    return presence, layout_row, graph_hash, (manifests, layer_users, configs, attestations), list(graph.claims)


def snapshot_rows(snapshot: Snapshot, graph: LayoutGraph | None = None, known: Known | None = None) -> LayoutRows:
    """The rows of *snapshot* (and its *graph*) as stored: row keys taken, JSON encoded (in a parsing
    worker, or here); *known* as :func:`graph_rows` takes it."""
    children_of: dict[int, list[Child]] = {}
    for child in snapshot.children:
        children_of.setdefault(child.entry_position, []).append(child)
    entries: list[EntryRow] = []
    names: list[NameRow] = []
    children: list[ChildRow] = []
    occurrences: dict[str, int] = {}  # identical descriptors are numbered: linear however many repeat
    for index, entry in enumerate(snapshot.entries):
        platform = platform_json(entry.platform)
        annotations = _annotations_json(entry.annotations)
        invalid = json.dumps(list(entry.invalid_names)) if entry.invalid_names else None
        warnings = json.dumps(list(entry.warnings)) if entry.warnings else None
        entry_names = [(n.name, n.tag, n.how) for n in entry.names]
        kids = children_of.get(entry.position)
        kid_rows = (
            [
                (
                    c.parent,
                    c.depth,
                    c.digest,
                    c.media_type,
                    c.size,
                    platform_json(c.platform),
                    _annotations_json(c.annotations),
                )
                for c in kids
            ]
            if kids
            else []
        )
        key = _row_key(
            (
                entry.digest,
                entry.media_type,
                entry.size,
                platform,
                annotations,
                entry_names,
                invalid,
                warnings,
                kid_rows,
            )
        )
        occurrence = occurrences.get(key, 0)
        occurrences[key] = occurrence + 1
        entries.append(
            (
                f"{key}#{occurrence}",
                entry.position,
                entry.digest,
                entry.media_type,
                entry.size,
                platform,
                annotations,
                invalid,
                warnings,
            )
        )
        if entry_names:
            names.extend((index, name, tag, how) for name, tag, how in entry_names)
        if kid_rows:
            children.extend(
                (index, i, parent, depth, digest, media_type, size, platform_text, annotations_text)
                for i, (parent, depth, digest, media_type, size, platform_text, annotations_text) in enumerate(kid_rows)
            )
    identity = snapshot.identity
    layout_warnings = snapshot.warnings if graph is None else (*snapshot.warnings, *graph.warnings)
    return (
        (identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns),
        snapshot.content_hash,
        tuple(dict.fromkeys(printable(w) for w in layout_warnings)),
        entries,
        names,
        children,
        graph_rows(graph, known) if graph is not None else None,
        read.encode_depends(snapshot.depends),
        snapshot.mnt_id,
    )


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


def store_shared(conn: sqlite3.Connection, graphs: list[GraphRows]) -> None:
    """Insert the shared rows (manifests, their layers' users, configs, attestations) of *graphs*,
    each once per host: a row already there is the same (its key names its content)."""
    for table, columns, index in (
        ("manifests", 17, 0),
        ("layer_users", 2, 1),
        ("configs", 9, 2),
        ("attestations", 4, 3),
    ):
        # Each row once, in key order: B-tree inserts in order touch each page once (random order,
        # measured, cost a third more in a cold build).
        rows = sorted({row[:2]: row for graph in graphs for row in graph[3][index]}.values())
        if rows:
            marks = ",".join("?" * columns)
            conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)


def graph_epoch(conn: sqlite3.Connection) -> int:
    """How many times shared rows of the graph have been removed: a read of a pass that began at
    another epoch may claim rows that are gone (:func:`_unfounded_claims`)."""
    row = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'graph_epoch'").fetchone()
    return int(row[0]) if row is not None else 0


def _unfounded_claims(conn: sqlite3.Connection, reads: list[Read]) -> set[str]:
    """The paths of *reads* that claim shared rows no longer stored (removed by a GC since their pass
    began): they are conflicts, read again (and their rows sent) in this process."""
    claiming = [r for r in reads if r.rows[6] is not None and r.rows[6][4]]
    if not claiming:
        return set()
    epoch = graph_epoch(conn)
    doubtful = [r for r in claiming if r.epoch != epoch]
    if not doubtful:
        return set()
    wanted = {key for r in doubtful for key in r.rows[6][4]}  # type: ignore[index]
    present: set[int] = set()
    manifests = [k for k in wanted if k >= 0]
    configs = [-k - 1 for k in wanted if k < 0]
    for table, keys, sign in (("manifests", manifests, 1), ("configs", configs, -1)):
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for (key,) in conn.execute(f"SELECT key FROM {table} WHERE key IN ({marks})", chunk):
                present.add(key if sign > 0 else -key - 1)
    return {r.path for r in doubtful if not set(r.rows[6][4]) <= present}  # type: ignore[index]


def collect_garbage(conn: sqlite3.Connection, released: set[str]) -> int:
    """Delete the shared rows of the digests in *released* that no layout references any more (no
    entry or child has the digest), with their layers' users, attestations and configs no manifest
    names; bump ``graph_epoch`` when anything went. How many manifests rows were deleted."""
    if not released:
        return 0
    gone = 0
    configs: set[int] = set()
    for digest in released:
        key = graph_key(digest)
        row = conn.execute(
            "DELETE FROM manifests WHERE key = ? AND digest = ? "
            "AND NOT EXISTS (SELECT 1 FROM entries WHERE digest = ?) "
            "AND NOT EXISTS (SELECT 1 FROM children WHERE digest = ?) RETURNING config_key, layers",
            (key, digest, digest, digest),
        ).fetchone()
        if row is None:
            continue
        gone += 1
        config_key, layers = row
        if layers:
            conn.executemany(
                "DELETE FROM layer_users WHERE layer = ? AND manifest = ?",
                [(graph_key(layer[0]), key) for layer in parse_layers(layers)],
            )
        conn.execute("DELETE FROM attestations WHERE index_key = ?", (key,))
        if config_key is not None:
            configs.add(config_key)
    for config_key in configs:
        conn.execute(
            "DELETE FROM configs WHERE key = ? AND NOT EXISTS (SELECT 1 FROM manifests WHERE config_key = ?)",
            (config_key, config_key),
        )
    if gone:
        conn.execute("UPDATE ocidx_counters SET value = value + 1 WHERE name = 'graph_epoch'")
    return gone


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


def _row_key(stored: tuple[object, ...]) -> str:
    """A hash of everything stored for one entry (its columns, names and children, JSON already
    encoded); ``repr`` of plain strings and numbers is exact and cheaper than encoding them again."""
    import hashlib

    return hashlib.blake2b(repr(stored).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


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
