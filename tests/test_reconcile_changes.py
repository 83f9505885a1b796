"""A change arriving while the daemon runs a long reconcile pass is indexed during the pass."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from harness import Daemon, indexed, wait_for, workers_of, write_config
from layouts import image, index_bytes, make_layout, replace_atomically

from indexer import Index
from indexer.config import Config


def first_indexed(db: str) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT path FROM layouts ORDER BY id LIMIT 1").fetchone()[0])
    finally:
        conn.close()


def answers(db: str, layout: str, label: str) -> bool:
    with Index(db, config=Config()) as index:
        answer = index.resolve_in(layout, ":v1")
    return answer.digest == image(label)["digest"] and answer.freshness == "indexed"


def test_a_change_during_a_long_reconcile_is_indexed_before_the_pass_ends(tmp_path: Path) -> None:
    tmp = os.path.realpath(str(tmp_path))
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    count = 1200
    for number in range(count):
        make_layout(os.path.join(root, f"g{number // 50:02d}", f"layout-{number:04d}"), "v1", "one")
    # One transaction per two layouts, read in the daemon's process: a start-up pass of many seconds.
    config = write_config(tmp, "[daemon]\nworkers = 1\nbatch_size = 2\ndebounce_ms = 20\n")
    with Daemon(tmp, [root], db=db, config=config).start() as daemon:
        wait_for(lambda: indexed(db) >= 40, "the start-up pass to be under way")
        target = first_indexed(db)
        replace_atomically(os.path.join(target, "index.json"), index_bytes("v1", "two"))
        wait_for(lambda: answers(db, target, "two"), "the change indexed")
        assert " ready: " not in daemon.log(), "the change waited for the whole pass"
        assert indexed(db) < count
        daemon.wait_ready()
        assert answers(db, target, "two")  # the pass's own, older, decision did not bring "one" back
        assert daemon.stop() == 0


def discovered(db: str) -> bool:
    """Whether a pass has recorded its walk (the directory cache, written once discovery ends)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT 1 FROM directories LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:
        return False  # not created or not migrated yet
    finally:
        conn.close()


def test_a_change_is_indexed_while_the_pass_waits_on_a_step(tmp_path: Path) -> None:
    # The start-up pass reads its one batch in two worker processes, stopped here once discovery is
    # over, as an overloaded machine can stall them: the pass waits on that step, and the change
    # made meanwhile must not wait with it.
    tmp = os.path.realpath(str(tmp_path))
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    count = 1000
    paths = [os.path.join(root, f"g{number // 50:02d}", f"layout-{number:04d}") for number in range(count)]
    for path in paths:
        make_layout(path, "v1", "one")
    config = write_config(tmp, "[daemon]\nworkers = 2\nbatch_size = 1000\ndebounce_ms = 20\n")
    with Daemon(tmp, [root], db=db, config=config).start() as daemon:
        wait_for(
            lambda: (len(workers_of(daemon.pid)) == 2 and discovered(db)) or daemon.exited(),
            "the start-up pass's discovery and workers",
        )
        stopped = workers_of(daemon.pid)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert indexed(db) == 0, "the pass wrote its batch before the test could stop its workers"
            target = paths[count // 2]
            replace_atomically(os.path.join(target, "index.json"), index_bytes("v1", "two"))
            wait_for(lambda: answers(db, target, "two"), "the change indexed while the pass waits")
            assert indexed(db) == 1  # the pass is still waiting on its workers
            assert " ready: " not in daemon.log()
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        daemon.wait_ready()
        assert indexed(db) == count
        assert answers(db, target, "two")
        assert daemon.stop() == 0
