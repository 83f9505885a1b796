"""The content graph's shared rows (manifests, their layers' users, configs, attestations): stored
once per host, claimed by later reads of a pass, and collected when no layout references them."""

from __future__ import annotations

from indexer.graph import graph_key
from indexer.store.read import parse_layers

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3

    from indexer.store.outcomes import Read
    from indexer.store.rows import GraphRows


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
