"""The cold-scan baseline: a plain single-threaded script doing the work a cold ``ocidx scan`` does.

``python benchmarks/baseline_scan.py TREE DB`` walks TREE (never into ``blobs/``), and for every
layout reads ``index.json``, hashes it, ``json.loads`` it, reads every nested index blob it lists
(recursively), checks each blob's hash, and writes one row per layout, entry, name and child into
the tables of ocidx's schema (``migrations/*.sql``) with ``executemany``, one transaction per 500
layouts, the lookup indexes created at the end. It reads names the simple way (each
``org.opencontainers.image.ref.name`` and ``io.containerd.image.name`` value, split on commas), checks
nothing else and handles no error beyond skipping a missing blob: ocidx's work is a superset of
this, which makes the ratio a fair upper bound on ocidx's overhead. Standard library only, on
purpose: it is what someone would write without ocidx. Prints the number of layouts.

``--graph`` adds the reads of the content graph, as a plain script does them: per layout one listing
of ``blobs/sha256`` (what the layout holds), then every manifest reachable from ``index.json``
(entries, and children of nested indexes) and its config, each digest read, hashed and
``json.loads``-ed once for the whole tree (blobs are content-addressed: the first layout holding it
is read, the others reuse the parse); rows: one per distinct manifest (config digest, the config's
os/architecture/variant/os.version and ``created``, ``subject``, ``artifactType``, layer count and
the image's size) and per layer of it, and per layout one per manifest it references, per
referenced blob it does not hold, and per held blob nothing references (``lstat`` for its size).
Those rows go to tables of its own (``baseline_*``), indexed at the end on what lookups would
search (layer digest, subject, manifest digest, layout).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sqlite3
import sys

NAME_KEYS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
BATCH = 500

GRAPH_SCHEMA = """
CREATE TABLE baseline_manifests (
    digest TEXT PRIMARY KEY, media_type TEXT, size INTEGER, config TEXT, os TEXT, architecture TEXT,
    variant TEXT, os_version TEXT, created TEXT, subject TEXT, artifact_type TEXT, layers INTEGER,
    image_size INTEGER
);
CREATE TABLE baseline_layers (manifest TEXT, position INTEGER, digest TEXT, media_type TEXT, size INTEGER);
CREATE TABLE baseline_layout_manifests (layout_id INTEGER, digest TEXT);
CREATE TABLE baseline_missing (layout_id INTEGER, digest TEXT);
CREATE TABLE baseline_unreferenced (layout_id INTEGER, digest TEXT, size INTEGER);
"""
GRAPH_INDEXES = (
    "CREATE INDEX baseline_layers_digest ON baseline_layers (digest)",
    "CREATE INDEX baseline_layers_manifest ON baseline_layers (manifest)",
    "CREATE INDEX baseline_manifests_subject ON baseline_manifests (subject)",
    "CREATE INDEX baseline_layout_manifests_digest ON baseline_layout_manifests (digest, layout_id)",
    "CREATE INDEX baseline_layout_manifests_layout ON baseline_layout_manifests (layout_id)",
    "CREATE INDEX baseline_missing_layout ON baseline_missing (layout_id)",
    "CREATE INDEX baseline_unreferenced_layout ON baseline_unreferenced (layout_id)",
)


def schema(conn: sqlite3.Connection, migrations: str) -> list[str]:
    """Create ocidx's tables; drop the indexes and return their SQL, to create them at the end."""
    for path in sorted(glob.glob(os.path.join(migrations, "*.sql"))):
        with open(path, encoding="utf-8") as fh:
            conn.executescript(fh.read())
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall()
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    return [sql for _name, sql in indexes]


def children(layout: str, digest: str, parent_depth: int, out: list[tuple[object, ...]], seen: set[str]) -> None:
    """Read the nested index blob *digest*, check its hash, and add a row per child (recursively)."""
    if digest in seen:
        return
    seen.add(digest)
    algorithm, _, encoded = digest.partition(":")
    try:
        with open(os.path.join(layout, "blobs", algorithm, encoded), "rb") as fh:
            data = fh.read()
    except OSError:
        return
    if hashlib.new(algorithm, data).hexdigest() != encoded:
        return
    for item in json.loads(data).get("manifests") or ():
        out.append(
            (
                digest,
                parent_depth + 1,
                item["digest"],
                item["mediaType"],
                item["size"],
                json.dumps(item["platform"], sort_keys=True) if item.get("platform") else None,
                json.dumps(item.get("annotations") or {}, sort_keys=True),
            )
        )
        if item["mediaType"] in INDEX_TYPES:
            children(layout, item["digest"], parent_depth + 1, out, seen)


def read_blob(layout: str, digest: str) -> bytes | None:
    """The blob *digest* of *layout* when its bytes hash to it, else None."""
    algorithm, _, encoded = digest.partition(":")
    try:
        with open(os.path.join(layout, "blobs", algorithm, encoded), "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if hashlib.new(algorithm, data).hexdigest() != encoded:
        return None
    return data


class Graph:
    """The content graph's reads and rows: each manifest and config parsed once for the whole tree."""

    def __init__(self) -> None:
        # manifest digest -> (its config digest, the digests of its layers)
        self.manifests: dict[str, tuple[str, list[str]]] = {}
        self.configs: dict[str, tuple[object, ...]] = {}
        self.manifest_rows: list[tuple[object, ...]] = []
        self.layer_rows: list[tuple[object, ...]] = []
        self.link_rows: list[tuple[object, ...]] = []
        self.missing_rows: list[tuple[object, ...]] = []
        self.unreferenced_rows: list[tuple[object, ...]] = []

    def manifest(self, layout: str, digest: str, size: int, held: set[str]) -> tuple[str, list[str]] | None:
        """The config and layer digests of manifest *digest*, read from *layout* the first time."""
        found = self.manifests.get(digest)
        if found is not None:
            return found
        data = read_blob(layout, digest)
        if data is None:
            return None  # a bad blob here: another layout's copy may be good
        document = json.loads(data)
        config = document.get("config") or {}
        layers = document.get("layers") or []
        config_digest = config.get("digest", "")
        platform = self.configs.get(config_digest)
        if platform is None and config_digest.partition(":")[2] in held:
            raw = read_blob(layout, config_digest)
            if raw is not None:
                parsed = json.loads(raw)
                platform = self.configs[config_digest] = (
                    parsed.get("os"),
                    parsed.get("architecture"),
                    parsed.get("variant"),
                    parsed.get("os.version"),
                    parsed.get("created"),
                )
        subject = document.get("subject") or {}
        self.manifest_rows.append(
            (
                digest,
                document.get("mediaType"),
                size,
                config_digest,
                *(platform or (None,) * 5),
                subject.get("digest"),
                document.get("artifactType") or config.get("mediaType"),
                len(layers),
                size + config.get("size", 0) + sum(layer.get("size", 0) for layer in layers),
            )
        )
        self.layer_rows.extend(
            (digest, i, layer["digest"], layer.get("mediaType"), layer.get("size")) for i, layer in enumerate(layers)
        )
        found = self.manifests[digest] = (config_digest, [layer["digest"] for layer in layers])
        return found

    def layout(self, layout: str, layout_id: int, descriptors: list[tuple[str, str, int]]) -> None:
        """Rows for one layout from its listing and the descriptors (digest, mediaType, size) that
        index.json and its nested indexes give."""
        try:
            held = set(os.listdir(os.path.join(layout, "blobs", "sha256")))
        except OSError:
            held = set()
        referenced: set[str] = set()
        for digest, media_type, size in descriptors:
            referenced.add(digest)
            if media_type not in MANIFEST_TYPES or digest.partition(":")[2] not in held:
                continue
            parsed = self.manifest(layout, digest, size, held)
            if parsed is None:
                continue
            self.link_rows.append((layout_id, digest))
            referenced.add(parsed[0])
            referenced.update(parsed[1])
        held_digests = {"sha256:" + name for name in held}
        self.missing_rows.extend((layout_id, digest) for digest in referenced - held_digests)
        for digest in held_digests - referenced:
            path = os.path.join(layout, "blobs", "sha256", digest[7:])
            self.unreferenced_rows.append((layout_id, digest, os.lstat(path).st_size))

    def flush(self, conn: sqlite3.Connection) -> None:
        """Insert the rows gathered so far (inside the caller's transaction)."""
        conn.executemany(f"INSERT INTO baseline_manifests VALUES ({', '.join('?' * 13)})", self.manifest_rows)
        conn.executemany("INSERT INTO baseline_layers VALUES (?, ?, ?, ?, ?)", self.layer_rows)
        conn.executemany("INSERT INTO baseline_layout_manifests VALUES (?, ?)", self.link_rows)
        conn.executemany("INSERT INTO baseline_missing VALUES (?, ?)", self.missing_rows)
        conn.executemany("INSERT INTO baseline_unreferenced VALUES (?, ?, ?)", self.unreferenced_rows)
        for rows in (self.manifest_rows, self.layer_rows, self.link_rows, self.missing_rows, self.unreferenced_rows):
            rows.clear()


def main() -> int:
    args = sys.argv[1:]
    graph = Graph() if "--graph" in args else None
    tree, db = [arg for arg in args if arg != "--graph"]
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    indexes = schema(conn, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations"))
    if graph is not None:
        conn.executescript(GRAPH_SCHEMA)
        indexes.extend(GRAPH_INDEXES)
    layouts: list[tuple[object, ...]] = []
    entries: list[tuple[object, ...]] = []
    names: list[tuple[object, ...]] = []
    kids: list[tuple[object, ...]] = []
    layout_id = entry_id = count = 0

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO layouts (id, path, state, content_hash, checked_ns) VALUES (?, ?, 'ok', ?, 0)", layouts
        )
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, '', ?, ?, ?, ?, ?, NULL, NULL)", entries)
        conn.executemany("INSERT INTO names VALUES (?, ?, ?, ?, 'plain')", names)
        conn.executemany("INSERT INTO children VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", kids)
        if graph is not None:
            graph.flush(conn)
        conn.execute("COMMIT")
        for rows in (layouts, entries, names, kids):
            rows.clear()

    for dirpath, dirnames, filenames in os.walk(tree):
        if "blobs" in dirnames:
            dirnames.remove("blobs")
        if "index.json" not in filenames:
            continue
        with open(os.path.join(dirpath, "index.json"), "rb") as fh:
            data = fh.read()
        layout_id += 1
        count += 1
        layouts.append((layout_id, dirpath, "sha256:" + hashlib.sha256(data).hexdigest()))
        descriptors: list[tuple[str, str, int]] = []
        for position, item in enumerate(json.loads(data).get("manifests") or ()):
            entry_id += 1
            notes = item.get("annotations") or {}
            entries.append(
                (
                    entry_id,
                    layout_id,
                    position,
                    item["digest"],
                    item["mediaType"],
                    item["size"],
                    json.dumps(item["platform"], sort_keys=True) if item.get("platform") else None,
                    json.dumps(notes, sort_keys=True),
                )
            )
            descriptors.append((item["digest"], item["mediaType"], item["size"]))
            for key in NAME_KEYS:
                for name in (notes.get(key) or "").split(","):
                    if name:
                        repository, _, tag = name.rpartition(":")
                        names.append((entry_id, layout_id, repository, tag))
            if item["mediaType"] in INDEX_TYPES:
                found: list[tuple[object, ...]] = []
                children(dirpath, item["digest"], 0, found, set())
                kids.extend((entry_id, layout_id, i, *row) for i, row in enumerate(found))
                descriptors.extend((str(row[2]), str(row[3]), int(str(row[4]))) for row in found)
        if graph is not None:
            graph.layout(dirpath, layout_id, descriptors)
        if count % BATCH == 0:
            flush()
    flush()
    for sql in indexes:
        conn.execute(sql)
    conn.execute("ANALYZE")
    conn.close()
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
