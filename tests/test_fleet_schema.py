"""The fleet database's schema and its security: migrations, roles, row-level security (real PostgreSQL)."""

from __future__ import annotations

import json
import os

import pytest
from cli_run import ocidx
from needs import module
from pg_cluster import PG_ROWS, Cluster, FleetDb, admin_connect, pg_rows

from indexer.fleet import admin, known_migrations

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = pytest.mark.fleet

TABLES = [
    "hosts",
    "heartbeats",
    "layouts",
    "entries",
    "names",
    "children",
    "layout_warnings",
    "graph_manifests",
    "graph_attestations",
    "missing_blobs",
]
B_DIGEST = "sha256:" + "b" * 64
B_LAYER = "sha256:" + "e" * 64
# The functions of schema ocidx, by the group that may call them (hosts are readers too).
READER_FUNCTIONS = {
    "applied_migrations",
    "lookup",
    "layouts_of",
    "names_of",
    "hosts",
    "host_counts",
    "graph_users",
    "referrers",
}
PUBLISHER_FUNCTIONS = {
    "fleet_incarnation",
    "publisher_state",
    "host_layouts",
    "host_summary",
    "forget_host",
    "remove_layouts",
    "put_layouts",
    "put_rows",
    "put_graph",
    "beat",
}

# What a host or a reader could send to write another host's rows, or to get around the functions: each
# must be refused or change nothing of host b's (the test compares b's rows before and after).
DIRECT = [
    *(
        f"{verb} {schema}{table}"
        for table in TABLES
        for schema in ("", "public.", "ocidx_data.")
        for verb in (
            "DELETE FROM",
            "TRUNCATE",
        )
    ),
    "INSERT INTO ocidx_data.layouts (host, id, path, version, state, entry_count) VALUES ('b', 99, 'x', 1, 'ok', 0)",
    "UPDATE ocidx_data.hosts SET watermark = 7 WHERE host = 'b'",
    "UPDATE ocidx_data.layouts SET host = 'a'",
    "CREATE TABLE mine (x int)",
    "CREATE TABLE ocidx.mine (x int)",
    "CREATE TABLE ocidx_data.mine (x int)",
    "ALTER TABLE ocidx_data.layouts DISABLE ROW LEVEL SECURITY",
    "DROP POLICY layouts_api_write ON ocidx_data.layouts",
    "SET ROLE ocidx_api",
    "ALTER FUNCTION ocidx.forget_host() SECURITY INVOKER",
    "CREATE OR REPLACE FUNCTION ocidx.forget_host() RETURNS void LANGUAGE sql AS 'SELECT'",
    "DROP FUNCTION ocidx.forget_host()",
    "GRANT ocidx_api TO CURRENT_USER",
]
# Through the functions, aimed at host b's rows: they only ever touch the caller's own.
THROUGH_FUNCTIONS = [
    "SELECT ocidx.remove_layouts(ARRAY['x'::bytea])",
    "SELECT ocidx.forget_host()",
    "SELECT ocidx.put_rows('[[1, 5, \"sha256:" + "c" * 64 + '", "t", 1, null, "{}", null, null]]\', '
    "'[[1, 0, 5, \"n\", \"t\", \"full\"]]', '[]', '[]')",
    "SELECT ocidx.beat(3, 1, 9, 'mine')",
    # b's graph rows: a blob b's layout lacks (a's has no layout 1), and b's manifest released by a
    f"SELECT ocidx.put_graph('[]', '[]', '[[1, \"{B_LAYER}\"]]', '{{}}')",
    f"SELECT ocidx.put_graph('[]', '[]', '[]', ARRAY['{B_DIGEST}'])",
]


def _seed_host_b(fleet_db: FleetDb) -> None:
    """Host b publishes one layout with one entry, name, child and warning, and a heartbeat, as its publisher does."""
    with psycopg.connect(fleet_db.add_host("b"), autocommit=True) as b, b.transaction():
        b.execute(
            "SELECT ocidx.put_layouts(ARRAY[1]::bigint[], ARRAY['x'::bytea], ARRAY[1]::bigint[], ARRAY['ok'], "
            "ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[1])"
        )
        b.execute(
            "SELECT ocidx.put_rows(%s, %s, %s, %s)",
            (
                json.dumps([[1, 0, B_DIGEST, "t", 1, None, "{}", None, None]]),
                json.dumps([[1, 0, 0, "", "t", "tag-only"]]),
                json.dumps([[1, 0, 0, B_DIGEST, 1, "sha256:" + "d" * 64, "t", 1, None, "{}"]]),
                json.dumps([[1, 0, "m"]]),
            ),
        )
        b.execute(
            "SELECT ocidx.put_graph(%s, %s, %s, '{}')",
            (
                json.dumps([[B_DIGEST, "", None, None, None, None, None, [B_LAYER], ["t"], [1]]]),
                json.dumps([[B_DIGEST, "sha256:" + "d" * 64, "sha256:" + "f" * 64]]),
                json.dumps([[1, B_LAYER]]),
            ),
        )
        b.execute("SELECT ocidx.beat(0, 1, 1, 'b-index')")


def _rows_of_b(fleet_db: FleetDb) -> dict[str, object]:
    with admin_connect(fleet_db.admin_dsn) as conn:
        hosts = conn.execute("SELECT host, watermark, sqlite_incarnation FROM hosts ORDER BY host").fetchall()
        beats = conn.execute("SELECT host, backlog FROM heartbeats ORDER BY host").fetchall()
    return {"rows": pg_rows(fleet_db.admin_dsn, "b"), "hosts": hosts, "heartbeats": beats}


def _attempt(dsn: str, statements: list[str]) -> list[str]:
    """Run each statement in its own transaction, committed when it worked; the ones that worked."""
    worked = []
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            try:
                conn.execute(statement)
            except psycopg.Error:
                conn.rollback()
                continue
            conn.commit()
            worked.append(statement)
    return worked


def test_a_host_cannot_write_another_hosts_rows(fleet_db: FleetDb) -> None:
    _seed_host_b(fleet_db)
    a = fleet_db.add_host("a")
    before = _rows_of_b(fleet_db)
    assert _attempt(a, DIRECT) == []
    # Through the functions a host writes only its own rows: b's stay as they were.
    assert _attempt(a, THROUGH_FUNCTIONS) == [
        THROUGH_FUNCTIONS[0],
        THROUGH_FUNCTIONS[1],
        THROUGH_FUNCTIONS[3],
        THROUGH_FUNCTIONS[5],
    ]
    after = _rows_of_b(fleet_db)
    assert after["rows"] == before["rows"]
    assert after["hosts"] == [("a", 9, "mine"), ("b", 1, "b-index")]
    assert after["heartbeats"] == [("a", 3), ("b", 0)]


def test_a_host_writes_its_own_rows_through_the_functions_only(fleet_db: FleetDb) -> None:
    _seed_host_b(fleet_db)
    b = fleet_db.dsn("b")
    assert pg_rows(fleet_db.admin_dsn, "b")["names"] == [(1, 0, 0, "", "t", "tag-only")]
    assert pg_rows(fleet_db.admin_dsn, "b")["graph_manifests"] == [
        (B_DIGEST, "", None, None, None, None, None, B_LAYER, "1")
    ]
    with psycopg.connect(b, autocommit=True) as conn, conn.transaction():
        # Objects a caller makes cannot stand in for the tables: the functions' search_path is pinned.
        conn.execute("CREATE TEMP TABLE layouts (LIKE pg_class)")
        conn.execute("CREATE TEMP TABLE graph_manifests (LIKE pg_class)")
        # Its own layout, and all below it; then the graph's rows it alone named, as a publisher does.
        released = conn.execute("SELECT ocidx.remove_layouts(ARRAY['x'::bytea])").fetchone()
        assert released is not None and released[0] == [B_DIGEST, "sha256:" + "d" * 64]
        conn.execute("SELECT ocidx.put_graph('[]', '[]', '[]', %s)", (released[0],))
    assert pg_rows(fleet_db.admin_dsn, "b") == {t: [] for t in PG_ROWS}
    assert _attempt(b, ["DELETE FROM layouts", "LOCK TABLE ocidx_data.layouts", "SELECT * FROM ocidx_data.hosts"]) == []


def test_every_function_runs_as_ocidx_api_with_its_search_path_pinned_for_its_group_only(fleet_db: FleetDb) -> None:
    with admin_connect(fleet_db.admin_dsn) as conn:
        rows = conn.execute(
            "SELECT p.proname, pg_get_userbyid(p.proowner), p.prosecdef, p.proconfig, "
            "p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0), "
            "has_function_privilege('ocidx_reader', p.oid, 'EXECUTE'), "
            "has_function_privilege('ocidx_publisher', p.oid, 'EXECUTE') "
            "FROM pg_proc p WHERE p.pronamespace = 'ocidx'::regnamespace ORDER BY p.proname"
        ).fetchall()
    assert {row[0] for row in rows} == READER_FUNCTIONS | PUBLISHER_FUNCTIONS
    for name, owner, definer, config, public, reader, publisher in rows:
        # The content graph's lookups also forbid parallel workers and JIT (few index probes each).
        lookup = ["max_parallel_workers_per_gather=0", "jit=off"] if name in ("graph_users", "referrers") else []
        assert (owner, definer, config) == ("ocidx_api", True, ["search_path=ocidx_data, pg_temp", *lookup]), name
        assert not public, f"{name}: every role may execute it"
        assert (reader, publisher) == ((True, True) if name in READER_FUNCTIONS else (False, True)), name


def test_a_reader_can_only_read(fleet_db: FleetDb) -> None:
    _seed_host_b(fleet_db)
    reader = fleet_db.add_reader("dash")
    before = _rows_of_b(fleet_db)
    assert _attempt(reader, DIRECT) == []
    assert _attempt(reader, THROUGH_FUNCTIONS) == []  # the publishing functions are the hosts' only
    assert _rows_of_b(fleet_db) == before
    with psycopg.connect(reader) as conn:
        assert conn.execute(
            "SELECT host, id, path FROM ocidx.layouts_of(ARRAY['b'], ARRAY[1]::bigint[])"
        ).fetchall() == [("b", 1, b"x")]
        assert conn.execute(
            "SELECT host, digest FROM ocidx.lookup('entries', ARRAY['digest'], %s)", ([B_DIGEST],)
        ).fetchall() == [("b", B_DIGEST)]
        assert conn.execute(
            "SELECT host, layout_id, manifest, source, missing FROM ocidx.graph_users(%s)", (B_LAYER,)
        ).fetchall() == [("b", 1, B_DIGEST, "layer", True)]


def test_a_non_superuser_administrator_sets_up_the_fleet(
    pg_cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/fleet.md's recipe: an administrator with CREATEROLE that owns the database, not a superuser."""
    dbname = f"recipe_{os.getpid()}"
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{dbname}"')
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        if conn.execute("SELECT FROM pg_roles WHERE rolname = 'fleet_admin'").fetchone() is None:
            conn.execute("CREATE ROLE fleet_admin LOGIN CREATEROLE")
    pg_cluster.psql(f'CREATE DATABASE "{dbname}" OWNER fleet_admin')
    admin_dsn = pg_cluster.dsn("fleet_admin", dbname)
    for argv in (["migrate"], ["add-host", "recipe_host"]):
        code, _out, err = ocidx(capsys, "fleet", *argv, "--dsn", admin_dsn)
        assert code == 0, err
    fleet_db = FleetDb(pg_cluster, dbname)
    fleet_db.admin_dsn = admin_dsn
    with psycopg.connect(fleet_db.dsn("recipe_host"), autocommit=True) as conn:
        conn.execute("SELECT ocidx.beat(0, 1, 0, 'i')")
    with admin_connect(admin_dsn) as conn:  # the administrator owns the tables and reads them
        assert conn.execute("SELECT host, backlog FROM heartbeats").fetchall() == [("recipe_host", 0)]
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.add_reader("recipe_reader"))
    code, out, err = ocidx(capsys, "hosts", "--json")
    assert code == 0, err
    assert [h["host"] for h in json.loads(out)] == ["recipe_host"]
    code, _out, err = ocidx(capsys, "fleet", "remove-host", "--dsn", admin_dsn, "recipe_host")
    assert code == 0, err


def test_migrate_is_recorded_and_idempotent(fleet_db: FleetDb, capsys: pytest.CaptureFixture[str]) -> None:
    with admin_connect(fleet_db.admin_dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM ocidx_migrations ORDER BY name")] == known_migrations()
    code, out, err = ocidx(capsys, "fleet", "migrate", "--dsn", fleet_db.admin_dsn, "--json")
    assert (code, out.strip()) == (0, '{\n  "applied": []\n}'), err


def test_a_newer_fleet_schema_is_refused_with_exit_4(
    fleet_db: FleetDb, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fleet_db.add_host("a")
    with admin_connect(fleet_db.admin_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO ocidx_migrations (name) VALUES ('9999_from_the_future')")
    monkeypatch.setenv("OCIDX_FLEET_DSN", host)
    for argv in (["find", "--fleet", ":latest"], ["hosts"], ["fleet", "migrate", "--dsn", fleet_db.admin_dsn]):
        code, _out, err = ocidx(capsys, *argv)
        assert code == 4, argv
        assert "9999_from_the_future" in err and "upgrade ocidx" in err
    with pytest.raises(Exception, match="9999_from_the_future"):
        admin.add_host(fleet_db.admin_dsn, "c")


def test_an_unmigrated_or_unreachable_fleet_is_exit_4(
    fleet_db: FleetDb, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet_db.cluster.psql('DROP DATABASE IF EXISTS "empty_fleet"')
    fleet_db.cluster.psql('CREATE DATABASE "empty_fleet"')
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.cluster.dsn(dbname="empty_fleet"))
    code, _out, err = ocidx(capsys, "find", "--fleet", ":latest")
    assert code == 4 and "no ocidx fleet schema" in err and "ocidx fleet migrate" in err
    missing = os.path.join(fleet_db.cluster.base, "nowhere")
    monkeypatch.setenv("OCIDX_FLEET_DSN", f"host={missing} port=1 dbname=x user=y")
    code, out, err = ocidx(capsys, "hosts", "--json")
    assert code == 4 and "unreachable" in err and '"fleet_unavailable"' in out
    monkeypatch.setenv("OCIDX_FLEET_DSN", "")
    code, _out, err = ocidx(capsys, "find", "--fleet", ":latest")
    assert code == 4 and "no fleet database is configured" in err


def test_add_host_refuses_reserved_and_privileged_roles(fleet_db: FleetDb, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ocidx_reader", "pg_monitor", "postgres", "", 'a"b'):
        code, _out, err = ocidx(capsys, "fleet", "add-host", "--dsn", fleet_db.admin_dsn, name)
        assert code == 2, (name, err)
    with psycopg.connect(fleet_db.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS mighty")
        conn.execute("CREATE ROLE mighty LOGIN BYPASSRLS")
    code, _out, err = ocidx(capsys, "fleet", "add-host", "--dsn", fleet_db.admin_dsn, "mighty")
    assert code == 2 and "bypasses row-level security" in err
    with admin_connect(fleet_db.admin_dsn) as conn:
        assert conn.execute("SELECT host FROM hosts").fetchall() == []
