"""Upgrading a live fleet to the content graph (fleet migration 0003, docs/fleet.md "Upgrading").

The migration runs while readers and publishers of the previous schema go on: readers must read on
through its costly part (building indexes on the biggest tables), a publisher caught mid-batch must
neither deadlock it nor lose its batch, and once it is applied every host publishes its images and
graph rows at once, not at the next check of its counts minutes later.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from cli_run import ocidx
from fleet_hosts import fleet_api, fleet_through, local_answers, wait_converged
from harness import REPO, Daemon, wait_for
from layouts import LINUX_AMD64, Layout, built_image, document, named
from needs import module
from pg_cluster import Cluster, FleetDb, admin_connect, sqlite_rows

from indexer.fleet import admin

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from psycopg import Connection

BEFORE_GRAPH = "0002_functions_only"
WAIT_S = 60.0  # how long the test's sessions wait for a lock: the test, not a timeout, decides


def add_old_host(fleet_db: FleetDb, name: str) -> str:
    """Register host *name* as ``fleet add-host`` did before the content graph; its DSN."""
    from psycopg import sql

    with admin_connect(fleet_db.admin_dsn, autocommit=True) as conn:
        if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        conn.execute(sql.SQL("GRANT ocidx_publisher TO {}").format(sql.Identifier(name)))
        conn.execute("INSERT INTO hosts (host) VALUES (%s) ON CONFLICT DO NOTHING", (name,))
    return fleet_db.dsn(name)


def publish_as_before(conn: Connection[tuple[object, ...]], rows: dict[str, list[tuple[object, ...]]]) -> None:
    """Send *rows* (a host's tables, as :func:`pg_cluster.sqlite_rows` gives them) the way a publisher of
    migration 0002 did, in the caller's transaction: no images, no graph rows."""
    layouts = rows["layouts"]
    conn.execute(
        "SELECT ocidx.put_layouts(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], %s::text[], "
        "%s::text[], %s::integer[])",
        [[row[i] for row in layouts] for i in range(8)],
    )
    conn.execute(
        "SELECT ocidx.put_rows(%s::json, %s::json, %s::json, %s::json)",
        tuple(json.dumps(rows[t]) for t in ("entries", "names", "children", "layout_warnings")),
    )


def waiting_for(admin: Connection[tuple[object, ...]], application: str) -> list[str]:
    """The relations the sessions of *application* wait to lock."""
    rows = admin.execute(
        "SELECT l.relation::regclass::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE a.application_name = %s AND NOT l.granted AND l.relation IS NOT NULL",
        (application,),
    ).fetchall()
    return sorted(str(row[0]) for row in rows)


def test_the_upgrade_stops_no_reader_while_it_builds_and_deadlocks_no_publisher(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet_db = fleet_through(pg_cluster, f"upgrade_locks_{os.getpid()}", BEFORE_GRAPH)
    host_dsn = add_old_host(fleet_db, "upgrading_host")
    reader_dsn = fleet_db.add_reader("upgrading_reader")
    old, new = ("sha256:" + c * 64 for c in "ab")

    def layout_rows(lid: int, digest: str, tag: str) -> dict[str, list[tuple[object, ...]]]:
        return {
            "layouts": [(lid, f"/srv/{tag}".encode(), lid, "ok", None, None, None, 1)],
            "entries": [(lid, 0, digest, "application/vnd.oci.image.manifest.v1+json", 7, None, "{}", None, None)],
            "names": [(lid, 0, 0, "", tag, "tag-only")],
            "children": [],
            "layout_warnings": [],
        }

    with psycopg.connect(host_dsn) as conn:
        publish_as_before(conn, layout_rows(1, old, "v1"))
        conn.execute("SELECT ocidx.beat(0, 1, 1, 'an-index')")
    with admin_connect(fleet_db.admin_dsn, autocommit=True) as watcher:
        # A publisher that began waiting long before the migration reaches its last statements (as
        # one does during a long index build): its own deadlock check has run, found nothing, and
        # will not run again, so only the migration's could end a deadlock, by failing itself.
        watcher.execute(f"ALTER ROLE upgrading_host IN DATABASE \"{fleet_db.dbname}\" SET deadlock_timeout = '10min'")
        # Whatever waits here waits for the test, not for a timeout.
        monkeypatch.setattr(admin, "ADMIN_LOCK_TIMEOUT_S", WAIT_S)
        pause = admin_connect(fleet_db.admin_dsn)
        # A heartbeat in flight: the migration stops at the graph's first foreign key (onto hosts),
        # after building its indexes, holding what it held while it built them.
        pause.execute("LOCK TABLE hosts IN ROW EXCLUSIVE MODE")
        outcome: dict[str, object] = {}

        def migrate() -> None:
            try:
                outcome["applied"] = admin.migrate(fleet_db.admin_dsn)
            except Exception as exc:
                outcome["applied"] = exc

        def publish() -> None:
            with psycopg.connect(
                host_dsn, application_name="old publisher", options=f"-c lock_timeout={int(WAIT_S)}s"
            ) as conn:
                try:
                    publish_as_before(conn, layout_rows(2, new, "v2"))
                    conn.execute("SELECT ocidx.beat(0, 1, 2, 'an-index')")
                    conn.commit()
                    outcome["published"] = True
                except psycopg.Error as exc:
                    outcome["published"] = exc

        migrating = threading.Thread(target=migrate)
        migrating.start()
        publishing = threading.Thread(target=publish)
        try:
            wait_for(
                lambda: waiting_for(watcher, "ocidx fleet migrate") == ["hosts"],
                "the migration, its indexes built, waits for hosts",
                WAIT_S,
            )
            # A reader of the previous schema reads on (the indexes were built under SHARE locks).
            with psycopg.connect(reader_dsn, options="-c lock_timeout=2s") as conn:
                found = conn.execute("SELECT host, digest FROM ocidx.lookup('names', ARRAY['tag'], ARRAY['v1'])")
                assert found.fetchall() == [("upgrading_host", old)]
            # A publisher of the previous schema starts a batch, and waits.
            publishing.start()
            wait_for(
                lambda: waiting_for(watcher, "old publisher") != [], "the publisher waits for the migration", WAIT_S
            )
            assert waiting_for(watcher, "old publisher") == ["layouts"]  # holding nothing the migration needs
        finally:
            pause.close()
            migrating.join(WAIT_S * 2)
            if publishing.ident is not None:
                publishing.join(WAIT_S * 2)
        assert outcome == {"applied": ["0003_content_graph"], "published": True}, outcome
        tags = watcher.execute("SELECT digest FROM entries WHERE host = 'upgrading_host' ORDER BY digest")
        assert [row[0] for row in tags.fetchall()] == [old, new]  # the batch lost nothing


def test_after_the_upgrade_every_host_publishes_its_images_and_graph_at_once(
    pg_cluster: Cluster, daemons: list[Daemon], base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_db = fleet_through(pg_cluster, f"upgrade_publish_{os.getpid()}", BEFORE_GRAPH)
    host_dsn = add_old_host(fleet_db, "graphless")
    tmp = os.path.join(base, "graphless")
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    lay = Layout(os.path.join(root, "app"))
    image = built_image(lay, LINUX_AMD64, "app", [b"a base layer", b"app"])
    lay.write_index([named(image, ref="v1")])
    layer = str(document(lay, image)["layers"][0]["digest"])
    daemon = Daemon(tmp, [root], env={"OCIDX_FLEET_DSN": host_dsn})
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "scan", "--db", daemon.db, root], capture_output=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # The host's index, published by the ocidx before the content graph, exactly: its rows, watermark
    # and incarnation (so that nothing but the missing graph tells them from the index).
    with sqlite3.connect(daemon.db) as conn:
        (counter,) = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()
        (incarnation,) = conn.execute("SELECT incarnation FROM ocidx_incarnation").fetchone()
    with psycopg.connect(host_dsn) as conn:
        publish_as_before(conn, sqlite_rows(daemon.db))
        conn.execute("SELECT ocidx.beat(0, 1, %s, %s)", (counter, incarnation))

    code, out, err = ocidx(capsys, "fleet", "migrate", "--dsn", fleet_db.admin_dsn, "--json")
    assert code == 0, err
    assert json.loads(out)["applied"] == ["0003_content_graph"]
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_converged(fleet_db, "graphless", daemon)  # graph_manifests, graph_attestations, missing_blobs included
    assert "every row replaced" in daemon.log()
    with fleet_api(fleet_db) as fleet:
        for ref in (":v1", f"@{layer}"):
            found = [
                {k: v for k, v in a.to_json().items() if k not in ("host", "host_state", "heartbeat_age_s")}
                for a in fleet.find(ref)
            ]
            assert found == local_answers(daemon, ref), ref
            assert found != []
