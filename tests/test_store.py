"""The SQLite index: migrations, refusing databases it cannot use (exit 4), WAL, diffed writes, packaging."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile

import pytest
from cli_run import ocidx
from layouts import Descriptor, Layout, named

import indexer.store as store
from indexer.cli import main
from indexer.errors import DatabaseError, SchemaTooNew

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIGRATIONS = os.path.join(CHECKOUT, "migrations")


@pytest.fixture
def indexed(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, Layout]:
    """A database holding one scanned layout; its path and the layout."""
    lay = Layout(os.path.join(tmp_path, "root", "one"))
    lay.write_index([named(lay.manifest(), ref="latest")])
    db = os.path.join(tmp_path, "index.db")
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root"))[0] == 0
    return db, lay


# -- migrations ------------------------------------------------------------------------------------


def test_schema_version_is_the_number_of_migration_files() -> None:
    files = sorted(n for n in os.listdir(MIGRATIONS) if n.endswith(".sql"))
    assert files, "migrations/ is empty"
    assert len(files) == store.SCHEMA_VERSION
    assert [name for name, _ in store.migration_files()] == [f[:-4] for f in files]
    # numbered 0001, 0002, ... without gaps, so the order is the numbering
    assert [int(f[:4]) for f in files] == list(range(1, len(files) + 1))


def test_migrations_are_recorded(indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    conn = sqlite3.connect(db)
    try:
        recorded = [row[0] for row in conn.execute("SELECT name FROM ocidx_migrations ORDER BY name")]
        assert recorded == [name for name, _ in store.migration_files()]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    finally:
        conn.close()


def test_reopening_applies_nothing_twice(indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    conn = store.open_writer(db)
    try:
        assert store.migrate(conn, db) == []
        assert conn.execute("SELECT count(*) FROM ocidx_migrations").fetchone()[0] == store.SCHEMA_VERSION
    finally:
        conn.close()


def test_a_failing_migration_leaves_neither_its_change_nor_its_record(
    tmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = os.path.join(tmp_path, "migrations")
    os.makedirs(migrations)
    first = sorted(os.listdir(MIGRATIONS))[0]
    shutil.copy(os.path.join(MIGRATIONS, first), migrations)
    with open(os.path.join(migrations, "9999_broken.sql"), "w") as f:
        f.write("CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n")
    monkeypatch.setattr(store, "migrations_dir", lambda: migrations)
    conn = sqlite3.connect(os.path.join(tmp_path, "m.db"), isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            store.migrate(conn)
        assert not conn.in_transaction
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "half_done" not in tables
        assert "layouts" in tables  # the first migration, in its own transaction, stays
        assert [row[0] for row in conn.execute("SELECT name FROM ocidx_migrations")] == [first[:-4]]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


# -- databases a lookup cannot use: exit 4 -----------------------------------------------------------


def test_database_newer_than_the_code(indexed: tuple[str, Layout], capsys: pytest.CaptureFixture[str]) -> None:
    db, lay = indexed
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    conn.execute("INSERT INTO ocidx_migrations VALUES ('9999_from_the_future', 0)")
    conn.close()
    code, out, err = ocidx(capsys, "resolve", "--db", db, f"oci-layout://{lay.path}")
    assert (code, out) == (4, "")
    assert "newer" in err
    assert db in err
    code, out, _ = ocidx(capsys, "resolve", "--db", db, "--json", f"oci-layout://{lay.path}")
    assert code == 4
    assert json.loads(out)["error"] == "schema_too_new"
    # the writer refuses it too, rather than run an old schema over it
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.dirname(lay.path))
    assert code == 4
    assert "newer" in err
    with pytest.raises(SchemaTooNew):
        store.open_reader(db)


def test_database_older_than_the_code_is_refused_by_lookups(
    indexed: tuple[str, Layout], capsys: pytest.CaptureFixture[str]
) -> None:
    db, lay = indexed
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION - 1}")
    conn.close()
    code, _, err = ocidx(capsys, "resolve", "--db", db, f"oci-layout://{lay.path}")
    assert code == 4
    assert "older" in err


def test_file_that_is_not_a_database(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(), ref="latest")])
    db = os.path.join(tmp_path, "notes.txt")
    with open(db, "w") as f:
        f.write("this is not a database, it is a shopping list\n" * 50)
    code, out, err = ocidx(capsys, "resolve", "--db", db, f"oci-layout://{lay.path}")
    assert (code, out) == (4, "")
    assert db in err
    code, out, _ = ocidx(capsys, "resolve", "--db", db, "--json", f"oci-layout://{lay.path}")
    assert code == 4
    assert json.loads(out)["error"] == "database"


def test_sqlite_database_of_another_program(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.path.join(tmp_path, "other.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.execute("INSERT INTO recipes VALUES ('soup')")
    conn.commit()
    conn.close()
    code, _, err = ocidx(capsys, "resolve", "--db", db, "--layout", str(tmp_path), ":latest")
    assert code == 4
    assert "not an ocidx database" in err
    root = os.path.join(tmp_path, "root")
    os.makedirs(root)
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", root)
    assert code == 4
    conn = sqlite3.connect(db)
    try:  # untouched
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("recipes",)]
        assert conn.execute("SELECT name FROM recipes").fetchall() == [("soup",)]
    finally:
        conn.close()


def test_damaged_database_is_exit_4_not_a_traceback(
    indexed: tuple[str, Layout], capsys: pytest.CaptureFixture[str]
) -> None:
    db, lay = indexed
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(db, "r+b") as f:  # the header (application id, schema version) survives, the pages do not
        size = f.seek(0, os.SEEK_END)
        f.seek(200)
        f.write(b"\xab" * (size - 200))
    for args in (
        ["resolve", f"oci-layout://{lay.path}"],
        ["resolve", "--layout", lay.path, ":latest"],
        ["find", ":latest"],
        ["ls"],
        ["status"],
    ):
        code, out, err = ocidx(capsys, args[0], "--db", db, "--json", *args[1:])
        assert code == 4, (args, err)
        assert json.loads(out)["error"] == "database"
        assert "Traceback" not in err
        assert db in err
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.dirname(lay.path))
    assert code == 4, err


def test_missing_database(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.path.join(tmp_path, "nowhere", "index.db")
    for args in (
        ["find", ":latest"],
        ["ls"],
        ["status"],
    ):
        code, out, err = ocidx(capsys, args[0], "--db", db, *args[1:])
        assert (code, out) == (4, ""), args
        assert "ocidx scan" in err
    # A single-layout lookup reads its layout through instead (tests/test_first_hour.py).
    code, _, err = ocidx(capsys, "resolve", "--db", db, "oci-layout:///nonexistent-x:latest")
    assert code == 1 and "does not exist" in err
    assert not os.path.exists(db)
    assert not os.path.exists(os.path.dirname(db))


def test_missing_database_from_environment(
    tmp_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = os.path.join(tmp_path, "env.db")
    monkeypatch.setenv("OCIDX_DB", db)
    code, _, err = ocidx(capsys, "find", ":latest")
    assert code == 4
    assert db in err


def test_wal_mode(indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_reader_never_writes(indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    conn = store.open_reader(db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM layouts")
    finally:
        conn.close()


def test_open_reader_errors_are_database_errors(tmp_path: str) -> None:
    with pytest.raises(DatabaseError):
        store.open_reader(os.path.join(tmp_path, "absent.db"))


# -- diffed writes ------------------------------------------------------------------------------------


def _rows(db: str) -> dict[str, tuple[int, int, list[int]]]:
    """Entry ref name -> (entry id, position, rowids of its name rows)."""
    conn = sqlite3.connect(db)
    try:
        out: dict[str, tuple[int, int, list[int]]] = {}
        for entry_id, position, annotations in conn.execute("SELECT id, position, annotations FROM entries"):
            name_rows = [r[0] for r in conn.execute("SELECT rowid FROM names WHERE entry_id = ?", (entry_id,))]
            key = json.loads(annotations)["org.opencontainers.image.ref.name"]
            out[key] = (entry_id, position, name_rows)
        return out
    finally:
        conn.close()


def _scan(capsys: pytest.CaptureFixture[str], db: str, root: str) -> str:
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", "--json", root)
    assert code == 0, err
    return err


def test_adding_one_tag_rewrites_only_that_entry(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, "big"))
    images = [lay.manifest(label=f"image-{i}") for i in range(100)]
    entries: list[Descriptor] = [named(image, ref=f"v{i}") for i, image in enumerate(images)]
    lay.write_index(entries, rename=False)
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, root)
    before = _rows(db)
    assert len(before) == 100

    lay.write_index([*entries, named(images[7], ref="stable")], rename=False)  # skopeo copy adds one entry
    _scan(capsys, db, root)
    after = _rows(db)
    assert set(after) == {*before, "stable"}
    assert {k: v for k, v in after.items() if k != "stable"} == before
    assert after["stable"][0] > max(entry_id for entry_id, _, _ in before.values())

    entries[42] = named(images[42], ref="v42-renamed")  # a tag moves: only that entry changes
    lay.write_index([*entries, named(images[7], ref="stable")], rename=False)
    _scan(capsys, db, root)
    renamed = _rows(db)
    assert "v42" not in renamed
    assert {k: v for k, v in renamed.items() if k != "v42-renamed"} == {k: v for k, v in after.items() if k != "v42"}

    # an entry inserted at the front shifts positions but keeps every row
    front = lay.manifest(label="front")
    lay.write_index([named(front, ref="front"), *entries, named(images[7], ref="stable")], rename=False)
    _scan(capsys, db, root)
    shifted = _rows(db)
    for key, (entry_id, position, name_rows) in renamed.items():
        assert shifted[key] == (entry_id, position + 1, name_rows)
    assert shifted["front"][1] == 0


def test_unchanged_rescan_writes_nothing(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, "same"))
    lay.write_index([named(lay.manifest(), ref="latest")])
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, root)
    before = _rows(db)
    code, out, _ = ocidx(capsys, "scan", "--db", db, "--no-progress", "--json", root)
    assert code == 0
    summary = json.loads(out)
    assert (summary["changed"], summary["unchanged"]) == (0, 1)
    assert _rows(db) == before


def test_identical_entries_are_both_kept(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, "twice"))
    image = lay.manifest()
    lay.write_index([named(image, ref="latest"), named(image, ref="latest")])
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, root)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*), count(DISTINCT position) FROM entries").fetchone() == (2, 2)
        lay.write_index([named(image, ref="latest")])
        _scan(capsys, db, root)
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM names").fetchone()[0] == 1
    finally:
        conn.close()


# -- packaging ---------------------------------------------------------------------------------------


def test_a_non_editable_install_ships_the_migrations(tmp_path: str) -> None:
    wheels = os.path.join(tmp_path, "wheels")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, CHECKOUT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    for directory, _dirs, files in os.walk(MIGRATIONS):  # the fleet's migrations/postgres/ too
        for name in files:
            assert f"indexer/migrations/{os.path.relpath(os.path.join(directory, name), MIGRATIONS)}" in shipped

    target = os.path.join(tmp_path, "site")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    # Run from elsewhere, with only the installed copy importable: the schema comes from inside it.
    script = (
        "import indexer.store as s, sys\n"
        "conn = s.open_writer(sys.argv[1]); conn.close()\n"
        "print(s.migrations_dir())\n"
        "print(s.open_reader(sys.argv[1]).execute('PRAGMA user_version').fetchone()[0])\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, os.path.join(tmp_path, "fresh.db")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": target},
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    where, version = ran.stdout.split()
    assert where == os.path.join(target, "indexer", "migrations")
    assert int(version) == store.SCHEMA_VERSION


def test_writer_refuses_a_newer_schema_version(indexed: tuple[str, Layout], capsys: pytest.CaptureFixture[str]) -> None:
    db, lay = indexed
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")  # no migration record: only the version
    conn.close()
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.dirname(lay.path))
    assert code == 4
    assert "newer" in err
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION + 1  # untouched
    finally:
        conn.close()


# -- a database written by another user (a root daemon) and read by a user who cannot write there ------


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


def _nobody_python() -> str:
    """An interpreter (3.11+) that user nobody can run with this checkout importable, or skip."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a lookup as another user")
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, indexer.store; assert sys.version_info >= (3, 11)"],
                capture_output=True,
                preexec_fn=_as_nobody,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": CHECKOUT},
                cwd="/",
                timeout=60,
                check=False,
            )
        except OSError:  # nobody may not enter the directory of this interpreter
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python 3.11+ that user nobody may run with this checkout")


def test_another_user_can_read_a_database_it_cannot_write() -> None:
    python = _nobody_python()
    base = tempfile.mkdtemp(prefix="ocidx-perm-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        lay = Layout(os.path.join(base, "root", "lay"))
        image = lay.manifest()
        lay.write_index([named(image, ref="latest")])
        db = os.path.join(base, "db", "index.db")
        assert main(["scan", "--db", db, "--no-progress", os.path.join(base, "root")]) == 0
        for directory, dirs, files in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(directory, name), 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        assert sorted(os.listdir(os.path.dirname(db))) == ["index.db", "index.db.migrate-lock"]  # no -wal, no -shm

        def resolve(target: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [python, "-m", "indexer", "resolve", "--db", db, "--json", target],
                capture_output=True,
                text=True,
                preexec_fn=_as_nobody,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": CHECKOUT, "HOME": base},
                cwd="/",
                timeout=60,
                check=False,
            )

        done = resolve(f"oci-layout://{lay.path}")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["digest"] == image["digest"]

        newer = lay.manifest(label="newer")  # changed after the scan: still read through, fresh
        lay.write_index([named(newer, ref="latest")])
        os.chmod(lay.index_path, 0o644)
        done = resolve(f"oci-layout://{lay.path}")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["digest"], answer["freshness"]) == (newer["digest"], "read-through")

        writer = sqlite3.connect(db)  # a daemon holding the database open: -shm exists, owned by root
        try:
            writer.execute("SELECT count(*) FROM layouts").fetchone()
            done = resolve(f"oci-layout://{lay.path}")
            assert done.returncode == 0, done.stderr
        finally:
            writer.close()
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize(
    "annotations",
    [
        {},
        {"org.opencontainers.image.ref.name": "v1", "a": "b"},
        {"z": "last", "a": "first", "m": "middle"},
        {"quote": 'say "hi"', "back\\slash": "\\", "ctl": "\x00\x1b\n\t\x7f"},
        {"caf\u00e9": "\u00fcber", "emoji": "\U0001f600", "rtl": "\u202e", "cjk": "\u4e2d"},
    ],
)
def test_the_stored_annotations_json_is_what_json_dumps_gives(annotations: dict[str, str]) -> None:
    """Stored JSON is read back by lookups and compared across versions: the fast encoder must not drift."""
    from indexer.store.rows import _annotations_json

    assert _annotations_json(annotations) == json.dumps(annotations, sort_keys=True)
