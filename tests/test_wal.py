"""The database stays bounded: a pinned WAL comes back down, freed pages go back to the file system."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import DEADLINE_S, Daemon, run, select, wait_for, write_config
from layouts import churn_corpus

from indexer.store import maintenance, migrate, open_writer

READER = """
import sqlite3, sys, time
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM entries").fetchone()  # the read transaction's snapshot starts here
open(sys.argv[2], "w").close()
while not __import__("os").path.exists(sys.argv[3]):
    time.sleep(0.02)
conn.execute("COMMIT")
"""


def churn(db: str, rounds: int) -> None:
    """Write *rounds* transactions of real rows through the writer's connection."""
    conn = open_writer(db)
    try:
        for i in range(rounds):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO layout_warnings (layout_id, message) VALUES (?, ?)",
                [(0, f"{i}-{j}-" + "x" * 200) for j in range(200)],
            )
            conn.execute("DELETE FROM layout_warnings")
            conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_pinned_wal_comes_back_down(tmp_path: Path) -> None:
    db = str(tmp_path / "index.db")
    writer = open_writer(db)
    reading, release = str(tmp_path / "reading"), str(tmp_path / "release")
    reader = subprocess.Popen([sys.executable, "-c", READER, db, reading, release])
    try:
        wait_for(lambda: os.path.exists(reading), "the reader to hold its read transaction")
        churn(db, 400)
        grown = maintenance.wal_size(db)
        pinned = maintenance.maintain(writer, db)
        assert pinned.pinned and not pinned.truncated
        assert grown > maintenance.WAL_LIMIT_BYTES, grown  # what the reader costs while it stays
        assert reader.pid in maintenance.holders(db)
        open(release, "w").close()
        assert reader.wait(DEADLINE_S) == 0
        after = maintenance.maintain(writer, db)
        assert not after.pinned and after.truncated
        assert maintenance.wal_size(db) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        writer.close()


def test_a_reset_wal_is_cut_back_to_the_limit(tmp_path: Path) -> None:
    # Without the daemon's maintenance, SQLite's own checkpoints keep the WAL at journal_size_limit.
    db = str(tmp_path / "index.db")
    reading, release = str(tmp_path / "reading"), str(tmp_path / "release")
    open_writer(db).close()
    reader = subprocess.Popen([sys.executable, "-c", READER, db, reading, release])
    keep = open_writer(db)  # an open connection keeps the WAL file from being removed at close
    try:
        wait_for(lambda: os.path.exists(reading), "the reader to hold its read transaction")
        churn(db, 400)
        assert maintenance.wal_size(db) > maintenance.WAL_LIMIT_BYTES
        open(release, "w").close()
        assert reader.wait(DEADLINE_S) == 0
        churn(db, 40)  # SQLite's auto-checkpoints now reset the WAL, and the limit cuts it back
        assert maintenance.wal_size(db) <= maintenance.WAL_LIMIT_BYTES
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        keep.close()


def page_counts(db: str) -> tuple[int, int]:
    """The database's page count and free-list count."""
    ((pages, free),) = select(db, "SELECT * FROM pragma_page_count(), pragma_freelist_count()")
    return int(pages), int(free)


def test_freed_pages_go_back_after_churn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "VACUUM_MIN_FREE_PAGES", 16)  # a small index; the rule is the same
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 300)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    full_pages, _ = page_counts(db)
    for path in sorted(corpus)[1:]:
        shutil.rmtree(path)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    _, free = page_counts(db)
    assert free > maintenance.VACUUM_MIN_FREE_PAGES  # what the removals left behind
    conn = open_writer(db)
    try:
        done = maintenance.maintain(conn, db)  # one run returns them all (up to VACUUM_STEP_PAGES)
    finally:
        conn.close()
    pages, free = page_counts(db)
    assert done.freed_pages > free
    assert free < maintenance.VACUUM_MIN_FREE_PAGES
    assert pages < full_pages / 2, (pages, full_pages)
    assert os.path.getsize(db) == pages * 4096


def test_an_older_database_is_made_vacuumable_once(tmp_path: Path) -> None:
    db = str(tmp_path / "old.db")
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    migrate(old, db)  # an index made by an ocidx that did not set auto_vacuum
    old.execute("INSERT INTO layout_warnings VALUES (1, 'kept')")
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    conn = open_writer(db)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == maintenance.AUTO_VACUUM_INCREMENTAL
        assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == maintenance.WAL_LIMIT_BYTES
        assert conn.execute("SELECT message FROM layout_warnings").fetchall() == [("kept",)]
    finally:
        conn.close()


def test_daemon_warns_while_a_reader_pins_the_wal_and_recovers(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 200)
    config = write_config(tmp, "[daemon]\nheartbeat_interval_s = 0.2\ndebounce_ms = 0\n")
    reading, release = os.path.join(tmp, "reading"), os.path.join(tmp, "release")
    with Daemon(tmp, [root], db=db, config=config).start() as daemon:
        daemon.wait_ready()
        reader = subprocess.Popen([sys.executable, "-c", READER, db, reading, release])
        try:
            wait_for(lambda: os.path.exists(reading), "the reader to hold its read transaction")
            which = 1
            # Flip every layout until the daemon says the WAL is pinned (the flips are the load).
            deadline = time.monotonic() + DEADLINE_S
            while "cannot be checkpointed" not in daemon.log():
                assert time.monotonic() < deadline, daemon.log()
                for path, info in corpus.items():
                    text = info["documents"][which]  # type: ignore[index]
                    with open(os.path.join(path, "index.json"), "w") as f:
                        f.write(str(text))
                which = 1 - which
            assert f"processes with it open: {reader.pid}" in daemon.log()
            open(release, "w").close()
            assert reader.wait(DEADLINE_S) == 0
            wait_for(lambda: "checkpointed again" in daemon.log(), "the daemon to checkpoint the WAL again")
            wait_for(lambda: maintenance.wal_size(db) <= maintenance.WAL_LIMIT_BYTES, "the WAL to come back down")
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert daemon.stop() == 0


@pytest.mark.parametrize(("umask", "mode"), [(0o007, "0o660"), (0o002, "0o660"), (0o027, "0o640")])
def test_a_new_database_takes_the_writers_umask_and_is_never_readable_by_others(
    tmp_path: Path, umask: int, mode: str
) -> None:
    # docs/operations.md's reader group: the daemon runs with UMask=0007, and readers in its group
    # must be able to create and write -shm; no other user may read the index, even under the
    # UMask=0002 the recipe once gave (index.db was 0664). SQLite alone creates every file 0644.
    tmp = str(tmp_path)
    os.makedirs(os.path.join(tmp, "root"))
    db = os.path.join(tmp, "index.db")
    keep = os.path.join(tmp, "keep.py")
    with open(keep, "w") as f:  # a writer that stays open, so -wal and -shm are there to look at
        f.write(
            f"import os, sys\nos.umask({umask})\nfrom indexer.store import open_writer\n"
            "conn = open_writer(sys.argv[1])\nconn.execute('CREATE TABLE IF NOT EXISTS t (x)')\n"
            "conn.execute('INSERT INTO t VALUES (1)')\nprint(oct(os.stat(sys.argv[1]).st_mode & 0o777), "
            "oct(os.stat(sys.argv[1] + '-wal').st_mode & 0o777), oct(os.stat(sys.argv[1] + '-shm').st_mode & 0o777), "
            "oct(os.stat(sys.argv[1] + '.migrate-lock').st_mode & 0o777))\n"
        )
    done = subprocess.run([sys.executable, keep, db], capture_output=True, text=True, timeout=DEADLINE_S, check=True)
    assert done.stdout.split() == [mode, mode, mode, "0o600"]
