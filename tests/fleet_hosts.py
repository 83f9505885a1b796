"""The hosts of a fleet in tests: each a real ``ocidx daemon`` publishing to the throwaway
PostgreSQL of tests/pg_cluster.py, and what a test compares (their rows, their answers)."""

from __future__ import annotations

import os
import sqlite3

from harness import Daemon, wait_for
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named
from pg_cluster import Cluster, FleetDb, pg_rows, sqlite_rows

from indexer.config import Config, FleetSettings
from indexer.fleet import Fleet
from indexer.query import Index
from indexer.store import migration_files

CONVERGE_S = 30.0  # generous: two cores shared with other test runs


def converged(fleet_db: FleetDb, host: str, daemon: Daemon, layouts: int | None = None) -> bool:
    """The host's rows in PostgreSQL are exactly its SQLite rows (and the index is not empty, or holds
    *layouts* layouts: a daemon may have indexed some of a burst of writes, and published those)."""
    import psycopg

    try:
        local = sqlite_rows(daemon.db)
        held = len(local["layouts"])
        if held == 0 or (layouts is not None and held != layouts):
            return False
        return pg_rows(fleet_db.admin_dsn, host) == local
    except (sqlite3.Error, psycopg.Error):
        return False


def wait_converged(fleet_db: FleetDb, host: str, daemon: Daemon, layouts: int | None = None) -> None:
    wait_for(
        lambda: converged(fleet_db, host, daemon, layouts),
        f"host {host}'s rows in PostgreSQL equal SQLite's" + (f" ({layouts} layouts)" if layouts is not None else ""),
        CONVERGE_S,
    )


def start_host(daemons: list[Daemon], fleet_db: FleetDb, base: str, host: str) -> Daemon:
    """``ocidx daemon`` on its own root and database, publishing as role *host*."""
    tmp = os.path.join(base, host)
    os.makedirs(os.path.join(tmp, "root"), exist_ok=True)
    daemon = Daemon(tmp, [os.path.join(tmp, "root")], env={"OCIDX_FLEET_DSN": fleet_db.add_host(host)})
    daemons.append(daemon)
    daemon.start().wait_ready()
    return daemon


def restart(daemon: Daemon) -> None:
    daemon.start().wait_ready()


def alpine(lay: Layout, label: str) -> dict[str, object]:
    """An alpine:3.16 index for two platforms, named as containerd and BuildKit write it."""
    index = lay.index(
        [lay.manifest(platform=LINUX_AMD64, label=label), lay.manifest(platform=LINUX_ARM64, label=label)]
    )
    return named(index, ref="3.16", containerd="docker.io/library/alpine:3.16")


def fleet_api(fleet_db: FleetDb, stale_after_s: float = 60.0) -> Fleet:
    config = Config(fleet=FleetSettings(dsn=fleet_db.admin_dsn, stale_after_s=stale_after_s))
    return Fleet(config=config)


def fleet_find(fleet_db: FleetDb, ref: str) -> list[tuple[str, str]]:
    """(host, layout) of each ``find --fleet`` answer, through the Python API."""
    with fleet_api(fleet_db) as fleet:
        return [(a.host, a.layout) for a in fleet.find(ref)]


def local_answers(daemon: Daemon, ref: str) -> list[dict[str, object]]:
    with Index(daemon.db, config=Config()) as index:
        return [a.to_json() for a in index.find(ref)]


def churn(root: str, n: int, label: str) -> None:
    """Rewrite the first *n* layouts of *root* with new images tagged *label*."""
    for i in range(n):
        lay = Layout(os.path.join(root, f"l{i:03d}"))
        lay.write_index(
            [named(lay.manifest(label=f"{label}-{i}"), ref=label), named(lay.manifest(label=f"k{i}"), ref="keep")]
        )


def fleet_through(cluster: Cluster, dbname: str, last: str) -> FleetDb:
    """A new database holding the fleet schema through migration *last*, applied as ``ocidx fleet
    migrate`` of that ocidx applied it (each file in its own transaction, with its row)."""
    import psycopg

    cluster.psql(f'DROP DATABASE IF EXISTS "{dbname}"')
    cluster.psql(f'CREATE DATABASE "{dbname}"')
    fleet_db = FleetDb(cluster, dbname)
    with psycopg.connect(fleet_db.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ocidx_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for name, path in migration_files("postgres"):
            with open(path, encoding="utf-8") as fh, conn.transaction():
                conn.execute(fh.read())
                conn.execute("INSERT INTO ocidx_migrations (name) VALUES (%s)", (name,))
            if name == last:
                break
    return fleet_db
