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
BATCH = 500


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


def main() -> int:
    tree, db = sys.argv[1], sys.argv[2]
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    indexes = schema(conn, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations"))
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
            for key in NAME_KEYS:
                for name in (notes.get(key) or "").split(","):
                    if name:
                        repository, _, tag = name.rpartition(":")
                        names.append((entry_id, layout_id, repository, tag))
            if item["mediaType"] in INDEX_TYPES:
                found: list[tuple[object, ...]] = []
                children(dirpath, item["digest"], 0, found, set())
                kids.extend((entry_id, layout_id, i, *row) for i, row in enumerate(found))
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
