"""The fleet database's schema and its security: migrations, roles, row-level security (real PostgreSQL)."""

from __future__ import annotations

import os

import pytest
from cli_run import ocidx
from needs import module
from pg_cluster import FleetDb

from indexer.fleet import admin, known_migrations

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = pytest.mark.fleet

OTHER_ROWS = {
    # table: (an INSERT of a row belonging to host b, a WHERE picking b's rows)
    "layouts": "INSERT INTO layouts (host, id, path, version, state, entry_count) VALUES ('b', 99, 'x', 1, 'ok', 0)",
    "entries": "INSERT INTO entries (host, layout_id, position, digest, media_type, size, annotations) "
    "VALUES ('b', 1, 9, 'sha256:x', 't', 1, '{}')",
    "names": "INSERT INTO names (host, layout_id, entry_position, ordinal, name, tag, how) "
    "VALUES ('b', 1, 0, 9, 'n', 't', 'full')",
    "children": "INSERT INTO children (host, layout_id, entry_position, position, parent, depth, digest, media_type, "
    "size, annotations) VALUES ('b', 1, 0, 9, 'p', 1, 'd', 't', 1, '{}')",
    "layout_warnings": "INSERT INTO layout_warnings (host, layout_id, ordinal, message) VALUES ('b', 1, 9, 'm')",
    "heartbeats": "INSERT INTO heartbeats (host, backlog) VALUES ('b', 0)",
    "hosts": "INSERT INTO hosts (host) VALUES ('c')",
}
TABLES = list(OTHER_ROWS)


def _seed_host_b(fleet_db: FleetDb) -> None:
    """Host b publishes one layout with one entry, name, child and warning, and a heartbeat."""
    with psycopg.connect(fleet_db.add_host("b"), autocommit=True) as b, b.transaction():
        b.execute("INSERT INTO layouts (id, path, version, state, entry_count) VALUES (1, 'x', 1, 'ok', 1)")
        b.execute(
            "INSERT INTO entries (layout_id, position, digest, media_type, size, annotations) "
            "VALUES (1, 0, 'sha256:b', 't', 1, '{}')"
        )
        b.execute(
            "INSERT INTO names (layout_id, entry_position, ordinal, name, tag, how) VALUES (1, 0, 0, 'n', 't', 'full')"
        )
        b.execute(
            "INSERT INTO children (layout_id, entry_position, position, parent, depth, digest, media_type, size, "
            "annotations) VALUES (1, 0, 0, 'p', 1, 'd', 't', 1, '{}')"
        )
        b.execute("INSERT INTO layout_warnings (layout_id, ordinal, message) VALUES (1, 0, 'm')")
        b.execute("INSERT INTO heartbeats (backlog) VALUES (0)")


def _counts(fleet_db: FleetDb) -> dict[str, int]:
    with psycopg.connect(fleet_db.admin_dsn) as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}


def _refused(dsn: str, statement: str) -> str | None:
    """None when *statement* was refused (an error, or no row touched), else what it did."""
    with psycopg.connect(dsn) as conn:
        try:
            cur = conn.execute(statement)
        except psycopg.Error:
            return None
        touched = cur.rowcount
        conn.commit()
    return None if touched == 0 else f"{statement!r} touched {touched} rows"


def _every_write(table: str) -> list[str]:
    column = "message" if table == "layout_warnings" else "host"
    return [
        OTHER_ROWS[table],
        f"UPDATE {table} SET {column} = {column} WHERE host = 'b'",
        f"UPDATE {table} SET host = 'a' WHERE host = 'b'",
        f"DELETE FROM {table} WHERE host = 'b'",
        f"TRUNCATE {table} CASCADE",
    ]


def test_a_host_cannot_write_another_hosts_rows(fleet_db: FleetDb) -> None:
    _seed_host_b(fleet_db)
    a = fleet_db.add_host("a")
    before = _counts(fleet_db)
    done = [what for table in TABLES for s in _every_write(table) if (what := _refused(a, s)) is not None]
    # ... nor move its own rows to another host, nor write rows in another host's name
    with psycopg.connect(a, autocommit=True) as conn:
        conn.execute("INSERT INTO layouts (id, path, version, state, entry_count) VALUES (5, 'mine', 1, 'ok', 0)")
    done += [
        w
        for s in (
            "UPDATE layouts SET host = 'b' WHERE host = 'a'",
            "INSERT INTO layouts (host, id, path, version, state, entry_count) VALUES ('b', 6, 'y', 1, 'ok', 0)",
            "UPDATE hosts SET watermark = 7 WHERE host = 'b'",
            "UPDATE hosts SET host = 'z' WHERE host = 'a'",
            "CREATE TABLE mine (x int)",
            "ALTER TABLE layouts DISABLE ROW LEVEL SECURITY",
            "DROP POLICY layouts_read ON layouts",
        )
        if (w := _refused(a, s)) is not None
    ]
    assert done == []
    after = _counts(fleet_db)
    assert after == {**before, "layouts": before["layouts"] + 1}
    with psycopg.connect(fleet_db.admin_dsn) as conn:
        assert conn.execute("SELECT host, watermark FROM hosts ORDER BY host").fetchall() == [("a", 0), ("b", 0)]


def test_a_host_writes_its_own_rows(fleet_db: FleetDb) -> None:
    """The refusals above are row-level security, not a host that cannot write at all."""
    _seed_host_b(fleet_db)
    b = fleet_db.dsn("b")
    with psycopg.connect(b, autocommit=True) as conn:
        assert conn.execute("UPDATE hosts SET watermark = 3 WHERE host = 'b'").rowcount == 1
        assert conn.execute("UPDATE heartbeats SET backlog = 2").rowcount == 1
        assert conn.execute("DELETE FROM layouts").rowcount == 1  # its own only: cascades to its entries
    counts = _counts(fleet_db)
    assert {t: counts[t] for t in ("layouts", "entries", "names", "children", "layout_warnings")} == dict.fromkeys(
        ("layouts", "entries", "names", "children", "layout_warnings"), 0
    )


def test_a_reader_can_only_read(fleet_db: FleetDb) -> None:
    _seed_host_b(fleet_db)
    with psycopg.connect(fleet_db.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS dash")
        conn.execute("CREATE ROLE dash LOGIN IN ROLE ocidx_reader")
    reader = fleet_db.dsn("dash")
    before = _counts(fleet_db)
    done = [what for table in TABLES for s in _every_write(table) if (what := _refused(reader, s)) is not None]
    assert done == []
    assert _counts(fleet_db) == before
    with psycopg.connect(reader) as conn:
        assert conn.execute("SELECT host, path FROM layouts").fetchall() == [("b", b"x")]


def test_migrate_is_recorded_and_idempotent(fleet_db: FleetDb, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(fleet_db.admin_dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM ocidx_migrations ORDER BY name")] == known_migrations()
    code, out, err = ocidx(capsys, "fleet", "migrate", "--dsn", fleet_db.admin_dsn, "--json")
    assert (code, out.strip()) == (0, '{\n  "applied": []\n}'), err


def test_a_newer_fleet_schema_is_refused_with_exit_4(
    fleet_db: FleetDb, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fleet_db.add_host("a")
    with psycopg.connect(fleet_db.admin_dsn, autocommit=True) as conn:
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
    with psycopg.connect(fleet_db.admin_dsn) as conn:
        assert conn.execute("SELECT host FROM hosts").fetchall() == []
