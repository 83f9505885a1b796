"""A rebuilt index or a restored fleet database never leaves wrong rows in the fleet (docs/fleet.md).

Versions only mean something within one life of each database: an index rebuilt from scratch hands
out the same (id, version) pairs again for other contents, and a fleet database restored from a dump
holds rows older than the watermark its publishers follow. Each side has an incarnation; the publisher
starts over when either changes, and a check of counts and a checksum once per reconcile interval
catches a data-only restore, which changes neither. Every test ends with the host's rows in
PostgreSQL equal, table by table, to its SQLite index as a fresh read of that file gives them, and
holding what a fresh ``ocidx scan`` of its layouts finds.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from fleet_hosts import CONVERGE_S, churn, local_answers, start_host, wait_converged
from harness import REPO, Daemon, wait_for
from layouts import Layout, named
from needs import module
from pg_cluster import HOST_TABLES, FleetDb, admin_connect, pg_rows, sqlite_rows

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

# The daemon's publisher, alone, in a process of its own (the daemon's own publisher reads the index
# the daemon writes; here `ocidx scan` writes it, and replaces it, under a publisher that runs on).
PUBLISHER = (
    "import logging, sys, anyio\n"
    "from indexer.fleet.publisher import Publisher\n"
    "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
    "anyio.run(Publisher(sys.argv[1], sys.argv[2], heartbeat_s=0.2).run)\n"
)


@pytest.fixture
def publishers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def scan(db: str, root: str) -> None:
    """``ocidx scan`` of *root* into the index *db*, as a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "scan", "--db", db, "--no-progress", root],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def ids_and_versions(db: str) -> dict[bytes, tuple[object, object]]:
    """Every layout's (id, version) in the index *db*, by path."""
    return {bytes(row[1]): (row[0], row[2]) for row in sqlite_rows(db)["layouts"]}  # type: ignore[call-overload]


def matches(fleet_db: FleetDb, host: str, db: str) -> bool:
    """The host's rows in PostgreSQL are exactly those of the index *db* (which is not empty)."""
    try:
        local = sqlite_rows(db)
        return bool(local["layouts"]) and pg_rows(fleet_db.admin_dsn, host) == local
    except (sqlite3.Error, psycopg.Error):
        return False


def by_path(rows: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    """*rows* (of pg_rows or sqlite_rows) with each layout id replaced by its path, and the ids and versions
    that only one index's life gives left out: what two indexes of the same layouts hold alike."""
    paths = {row[0]: bytes(row[1]) for row in rows["layouts"]}  # type: ignore[call-overload]
    out = {"layouts": sorted((paths[row[0]], *row[3:]) for row in rows["layouts"])}
    for table, table_rows in rows.items():
        if table in HOST_TABLES:  # the host's own rows: no layout id in them
            out[table] = sorted(table_rows)
        elif table != "layouts":
            out[table] = sorted((paths[row[0]], *row[1:]) for row in table_rows)
    return out


def fresh_scan(root: str, tmp: str) -> dict[str, list[tuple[object, ...]]]:
    """What a fresh ``ocidx scan`` of *root* into a new index holds, by path."""
    db = os.path.join(tmp, f"fresh-{len(os.listdir(tmp))}.db")
    scan(db, root)
    return by_path(sqlite_rows(db))


def remove_index(db: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)


def test_an_index_rebuilt_under_a_publisher_is_published_again_in_full(
    fleet_db: FleetDb, publishers: list[subprocess.Popen[bytes]], tmp_path: os.PathLike[str]
) -> None:
    tmp = os.path.realpath(os.fspath(tmp_path))
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    app = Layout(os.path.join(root, "app"))
    app.write_index([named(app.manifest(label="v1"), ref="latest")])
    base_layout = Layout(os.path.join(root, "base"))
    base_layout.write_index([named(base_layout.manifest(label="base"), ref="3.16")])
    scan(db, root)
    with open(os.path.join(tmp, "publisher.log"), "wb") as log:
        publishers.append(
            subprocess.Popen([sys.executable, "-c", PUBLISHER, fleet_db.add_host("h1"), db], stderr=log, cwd=REPO)
        )
    wait_for(lambda: matches(fleet_db, "h1", db), "the first index is published", CONVERGE_S)
    published, old = ids_and_versions(db), sqlite_rows(db)

    # The index is deleted and rebuilt (a cleanup job, a corrupt file moved aside) while the layout changes.
    remove_index(db)
    app.write_index([named(app.manifest(label="v2"), ref="latest")])
    scan(db, root)
    assert ids_and_versions(db) == published  # the same (id, version) pairs, handed out again...
    assert sqlite_rows(db)["entries"] != old["entries"]  # ...for another digest

    wait_for(lambda: matches(fleet_db, "h1", db), "the rebuilt index is published", CONVERGE_S)
    assert by_path(pg_rows(fleet_db.admin_dsn, "h1")) == fresh_scan(root, tmp)
    with open(os.path.join(tmp, "publisher.log"), encoding="utf-8") as fh:
        assert "every row replaced, 2 layouts published (its rows came from another index" in fh.read()


def test_a_fleet_restored_from_an_older_dump_while_publishers_stay_connected_converges(
    fleet_db: FleetDb, daemons: list[Daemon], base: str, tmp_path: os.PathLike[str]
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    churn(h1.roots[0], 5, "v1")
    churn(h2.roots[0], 2, "v1")
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)
    dump = os.path.join(os.fspath(tmp_path), "fleet.dump")
    fleet_db.cluster.client("pg_dump", "--format=custom", "--file", dump, dbname=fleet_db.dbname)
    at_dump = pg_rows(fleet_db.admin_dsn, "h1")

    # Later: new digests, a layout gone, a layout new; all published.
    churn(h1.roots[0], 4, "v2")
    shutil.rmtree(os.path.join(h1.roots[0], "l004"))
    fresh = Layout(os.path.join(h1.roots[0], "new"))
    fresh.write_index([named(fresh.manifest(label="new"), ref="v2")])
    wait_for(lambda: len(local_answers(h1, ":v2")) == 5 and len(h1.layouts()) == 5, "h1 indexes the changes")
    wait_converged(fleet_db, "h1", h1)
    assert sqlite_rows(h1.db) != at_dump  # what the restore brings back is wrong now
    pids = (h1.pid, h2.pid)

    # The whole database comes back from the dump, under the running publishers.
    fleet_db.cluster.client(
        "pg_restore",
        "--clean",
        "--if-exists",
        "--single-transaction",
        "--dbname",
        fleet_db.dbname,
        dump,
        dbname=fleet_db.dbname,
    )
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)
    for name, daemon in (("h1", h1), ("h2", h2)):
        assert by_path(pg_rows(fleet_db.admin_dsn, name)) == fresh_scan(daemon.roots[0], os.fspath(tmp_path))
    assert "fleet: the fleet database was restored or replaced" in h1.log()
    assert (h1.pid, h2.pid) == pids and not h1.exited() and not h2.exited()


def test_a_data_only_restore_is_caught_by_the_check_of_counts_and_checksum(
    fleet_db: FleetDb, daemons: list[Daemon], base: str, tmp_path: os.PathLike[str]
) -> None:
    tmp = os.path.join(base, "h1")
    os.makedirs(os.path.join(tmp, "root"))
    h1 = Daemon(tmp, [os.path.join(tmp, "root")], reconcile_s=1.0, env={"OCIDX_FLEET_DSN": fleet_db.add_host("h1")})
    daemons.append(h1)
    h1.start().wait_ready()
    churn(h1.roots[0], 5, "v1")
    wait_converged(fleet_db, "h1", h1)
    data = os.path.join(os.fspath(tmp_path), "fleet-data.sql")
    fleet_db.cluster.client("pg_dump", "--data-only", "--schema", "ocidx_data", "--file", data, dbname=fleet_db.dbname)
    at_dump = pg_rows(fleet_db.admin_dsn, "h1")

    churn(h1.roots[0], 3, "v2")
    shutil.rmtree(os.path.join(h1.roots[0], "l004"))
    wait_for(lambda: len(local_answers(h1, ":v2")) == 3 and len(h1.layouts()) == 4, "h1 indexes the changes")
    wait_converged(fleet_db, "h1", h1)
    assert sqlite_rows(h1.db) != at_dump  # what the restore brings back is wrong now

    # Every table emptied and filled from the dump, in one transaction: the schema, the tables and
    # their oids, the fleet's incarnation, all as they were; only the rows are old.
    fleet_db.cluster.client(
        "psql",
        "--no-psqlrc",
        "--set",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "--command",
        "TRUNCATE ocidx_data.hosts, ocidx_data.ocidx_migrations, ocidx_data.fleet CASCADE",
        "--file",
        data,
        dbname=fleet_db.dbname,
    )
    wait_converged(fleet_db, "h1", h1)
    assert by_path(pg_rows(fleet_db.admin_dsn, "h1")) == fresh_scan(h1.roots[0], os.fspath(tmp_path))
    assert "its rows differ from the index" in h1.log()


def test_graph_rows_lost_from_the_fleet_are_caught_by_the_check_of_counts(
    fleet_db: FleetDb, daemons: list[Daemon], base: str
) -> None:
    """The content graph's rows (fleet migration 0003) are counted too: a restore that lost them, every
    layout's own rows intact, is noticed and repaired."""
    tmp = os.path.join(base, "h1")
    os.makedirs(os.path.join(tmp, "root"))
    h1 = Daemon(tmp, [os.path.join(tmp, "root")], reconcile_s=1.0, env={"OCIDX_FLEET_DSN": fleet_db.add_host("h1")})
    daemons.append(h1)
    h1.start().wait_ready()
    churn(h1.roots[0], 3, "v1")
    partial = Layout(os.path.join(h1.roots[0], "l000"))
    image = partial.manifest(label="v1-0")  # the image churn wrote there: its layer goes
    with open(partial.blob_path(str(image["digest"])), "rb") as f:
        partial.remove_blob(json.load(f)["layers"][0])
    wait_for(
        lambda: [row[1:] for row in sqlite_rows(h1.db)["missing_blobs"]] == [(1,)], "h1 indexes the partial export"
    )
    wait_converged(fleet_db, "h1", h1)
    assert len(pg_rows(fleet_db.admin_dsn, "h1")["graph_manifests"]) == 6

    with admin_connect(fleet_db.admin_dsn) as conn:
        conn.execute("DELETE FROM graph_manifests WHERE host = 'h1'")
        conn.execute("DELETE FROM missing_blobs WHERE host = 'h1'")
        conn.commit()
    wait_converged(fleet_db, "h1", h1)
    assert "its rows differ from the index (here/in the fleet: graph_manifests 6/0, missing_blobs 1/0)" in h1.log()
