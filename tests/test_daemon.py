"""``ocidx daemon``: a real daemon process, real inotify, real writers' ways of replacing ``index.json``.

Every wait polls a condition a user could observe (a lookup answering from the
index, a row in ``ocidx status``) against a deadline; nothing sleeps to
synchronize. "Indexed" below means the lookup API answered with
``freshness == "indexed"``: the database, not a read-through, holds the answer.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile

import pytest
from harness import DEADLINE_S, FRESH_S, REPO, Daemon, integrity, needs_inotify, run_daemon, wait_for
from layouts import Layout, index_bytes, make_layout, replace_atomically, rewrite_in_place

MAX_QUEUED_EVENTS = "/proc/sys/fs/inotify/max_queued_events"

integration = pytest.mark.integration


# -- change detection ---------------------------------------------------------------------------


@integration
@needs_inotify
def test_atomic_rename_writer_is_indexed_then_settled_and_heartbeat_runs(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = make_layout(os.path.join(root, "cache"), "v1", "one")
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state indexed")

    replace_atomically(lay.index_path, index_bytes("v1", "two"))
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "two"), "renamed-in index.json indexed", FRESH_S)

    # Read within the racy window, the identity is re-checked once the window passed, so
    # lookups can trust it again without hashing the file.
    wait_for(
        lambda: (s := daemon.stored(lay.path)) is not None and s.content_hash and not s.is_racy(),
        "racily-clean layout re-examined",
    )
    status = daemon.status()["daemon"]
    assert isinstance(status, dict)
    assert status["pid"] == daemon.pid and status["running"] is True and status["watch_mode"] == "inotify"
    first = status["heartbeat_age_s"]
    assert isinstance(first, float) and first < 2.0


@integration
@needs_inotify
def test_in_place_rewrite_with_trailing_truncate_is_indexed(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "skopeo"))
    lay.write_index_bytes(index_bytes("v1", "a", **{"test.pad": "x" * 200}))
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "a"), "first state indexed")
    before = os.stat(lay.index_path)
    rewrite_in_place(lay.index_path, index_bytes("v2", "b"))
    assert os.stat(lay.index_path).st_ino == before.st_ino and os.stat(lay.index_path).st_size < before.st_size
    wait_for(lambda: daemon.indexed(lay.path, ":v2", "b"), "in-place rewrite indexed", FRESH_S)
    assert daemon.answer(lay.path, ":v1") is None


@integration
@needs_inotify
def test_whole_layouts_renamed_in_appear_and_removed_or_renamed_out_disappear(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    keep = make_layout(os.path.join(root, "keep"))
    doomed = make_layout(os.path.join(root, "doomed"))
    leaving = make_layout(os.path.join(root, "leaving"))
    outside = os.path.join(tmp, "staging")
    made = make_layout(os.path.join(outside, "export"), "v9", "nine")
    team = os.path.join(tmp, "team")
    make_layout(os.path.join(team, "a"), "a", "a")
    make_layout(os.path.join(team, "deep", "b"), "b", "b")
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: {keep.path, doomed.path, leaving.path} <= daemon.layouts(), "initial layouts")

    os.rename(made.path, os.path.join(root, "export"))  # a layout built elsewhere, renamed in
    os.rename(team, os.path.join(root, "team"))  # a tree holding two layouts
    wait_for(lambda: daemon.indexed(os.path.join(root, "export"), ":v9", "nine"), "renamed-in layout", FRESH_S)
    wait_for(lambda: daemon.indexed(os.path.join(root, "team", "deep", "b"), ":b", "b"), "nested layout", FRESH_S)
    wait_for(lambda: daemon.indexed(os.path.join(root, "team", "a"), ":a", "a"), "layout in renamed tree", FRESH_S)

    shutil.rmtree(doomed.path)
    os.rename(leaving.path, os.path.join(tmp, "left"))  # renamed out of the root
    wait_for(lambda: not ({doomed.path, leaving.path} & daemon.layouts()), "removed layouts dropped", FRESH_S)
    assert keep.path in daemon.layouts()
    # Back in under another name: watchdog still holds watches on the tree it lost track of.
    os.rename(os.path.join(tmp, "left"), os.path.join(root, "returned"))
    wait_for(lambda: daemon.indexed(os.path.join(root, "returned"), ":v1", "one"), "layout renamed back", FRESH_S)


@integration
@needs_inotify
def test_root_created_after_start_is_watched(tmp: str, daemons: list[Daemon]) -> None:
    present = os.path.join(tmp, "present")
    os.makedirs(present)
    later = os.path.join(tmp, "later")
    daemon = run_daemon(daemons, tmp, [present, later])
    assert "does not exist (yet)" in daemon.log()
    os.makedirs(later)
    lay = make_layout(os.path.join(later, "cache"), "v1", "first")
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "first"), "layout in the new root")
    # And the new root is watched, not merely scanned once.
    replace_atomically(lay.index_path, index_bytes("v1", "second"))
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "second"), "change inside the new root", FRESH_S)


@integration
@needs_inotify
def test_root_removed_and_recreated_is_dropped_then_watched_again(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    old = make_layout(os.path.join(root, "old"), "v1", "old")
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(old.path, ":v1", "old"), "first state")
    shutil.rmtree(root)
    wait_for(lambda: old.path not in daemon.layouts(), "layouts of the removed root dropped", FRESH_S)
    new = make_layout(os.path.join(root, "new"), "v1", "new")
    wait_for(lambda: daemon.indexed(new.path, ":v1", "new"), "layout in the recreated root", FRESH_S)
    replace_atomically(new.index_path, index_bytes("v1", "newer"))
    wait_for(lambda: daemon.indexed(new.path, ":v1", "newer"), "the recreated root is watched", FRESH_S)


@integration
@needs_inotify
def test_burst_of_5000_rewrites_ends_in_the_exact_final_state(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    layouts = [make_layout(os.path.join(root, f"l{i:02d}")) for i in range(50)]
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: len(daemon.layouts()) == 50, "initial 50 layouts")
    for seq in range(100):
        for n, lay in enumerate(layouts):
            data = index_bytes("cur", f"img-{n}-{seq % 7}", **{"test.seq": str(seq)})
            if n % 2:
                rewrite_in_place(lay.index_path, data)
            else:
                replace_atomically(lay.index_path, data)

    def all_final() -> bool:
        return all(
            daemon.indexed(lay.path, ":cur", f"img-{n}-{99 % 7}", **{"test.seq": "99"}) for n, lay in enumerate(layouts)
        )

    wait_for(all_final, "all 50 layouts at their 100th write")
    assert daemon.status()["layouts_with_errors"] == 0


def _set_queue_limit(value: str) -> str | None:
    """Set max_queued_events (new inotify instances only); the old value, or None when not allowed."""
    try:
        with open(MAX_QUEUED_EVENTS, encoding="ascii") as fh:
            old = fh.read().strip()
        with open(MAX_QUEUED_EVENTS, "w", encoding="ascii") as fh:
            fh.write(value)
    except OSError:
        return None
    return old


@integration
@needs_inotify
def test_queue_overflow_loses_no_change(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    noise = [make_layout(os.path.join(root, f"noise{i:02d}")) for i in range(20)]
    final = [make_layout(os.path.join(root, f"final{i:02d}")) for i in range(20)]
    daemon = Daemon(tmp, [root])
    daemons.append(daemon)
    # The sysctl is global: a lock keeps two test runs from restoring each other's small value.
    with open(os.path.join(tempfile.gettempdir(), "ocidx-test-max-queued-events.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        old = _set_queue_limit("256")
        try:
            daemon.start().wait_ready()  # its inotify instance now has the small queue
        finally:
            if old is not None:
                _set_queue_limit(old)
    rounds = 20 if old is not None else 400  # without root, outrun the default 16384-event queue
    wait_for(lambda: len(daemon.layouts()) == 40, "initial layouts")

    # Stop the daemon so the kernel queue fills: the noise rewrites fill it, the final ones are dropped.
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for seq in range(rounds):
            for lay in noise:
                replace_atomically(lay.index_path, index_bytes("n", f"noise-{seq}"))
        for n, lay in enumerate(final):
            replace_atomically(lay.index_path, index_bytes("v1", f"final-{n}"))
    finally:
        os.kill(daemon.pid, signal.SIGCONT)

    wait_for(lambda: "reconcile (inotify queue overflow" in daemon.log(), "a reconcile for the overflow", FRESH_S)
    wait_for(
        lambda: all(daemon.indexed(lay.path, ":v1", f"final-{n}") for n, lay in enumerate(final)),
        "changes lost by inotify caught up by the reconcile",
        FRESH_S,
    )
    wait_for(lambda: all(daemon.indexed(lay.path, ":n", f"noise-{rounds - 1}") for lay in noise), "noise layouts final")


# -- process life -------------------------------------------------------------------------------


@integration
@needs_inotify
def test_second_daemon_on_the_same_database_is_refused_naming_the_holder(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"))
    first = run_daemon(daemons, tmp, [root])
    second = Daemon(tmp, [root])
    done = subprocess.run(second.command(), capture_output=True, cwd=REPO, env=second.env, timeout=DEADLINE_S)
    message = done.stderr.decode()
    assert done.returncode != 0
    assert f"pid {first.pid}" in message and "already running" in message
    assert not first.exited()
    with open(first.db + ".lock", encoding="ascii") as fh:
        assert fh.read().strip() == str(first.pid)


@integration
@needs_inotify
def test_sigterm_mid_batch_leaves_a_consistent_database_marked_stopped(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    count = 3000
    for i in range(count):
        make_layout(os.path.join(root, f"l{i:04d}"), "v1", f"img-{i}")
    daemon = Daemon(tmp, [root])
    daemons.append(daemon)
    daemon.start()
    # Stop it while the start-up pass (60 batches of 50) is being written.
    wait_for(lambda: daemon.layouts() or daemon.exited(), "the first batch is committed", timeout=30)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    assert "reconcile (start-up)" not in daemon.log(), "the pass finished before the signal: nothing was interrupted"
    assert 0 < len(daemon.layouts()) < count
    assert "received SIGTERM" in daemon.log()
    assert integrity(daemon.db) == "ok"
    conn = sqlite3.connect(daemon.db)
    try:
        stopped, pid = conn.execute("SELECT stopped_ns, pid FROM daemon").fetchone()
        mismatched = conn.execute(
            "SELECT count(*) FROM layouts l "
            "WHERE entry_count != (SELECT count(*) FROM entries e WHERE e.layout_id = l.id)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert stopped is not None and pid == daemon.pid
    assert mismatched == 0
    status = daemon.status()["daemon"]
    assert isinstance(status, dict) and status["running"] is False


@integration
@needs_inotify
def test_sigint_stops_cleanly_too(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"))
    daemon = run_daemon(daemons, tmp, [root])
    assert daemon.stop(signal.SIGINT) == 0
    conn = sqlite3.connect(daemon.db)
    try:
        assert conn.execute("SELECT stopped_ns FROM daemon").fetchone()[0] is not None
    finally:
        conn.close()


@integration
@needs_inotify
def test_a_database_held_busy_by_another_writer_delays_changes_but_loses_none(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = make_layout(os.path.join(root, "cache"), "v1", "one")
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state")
    other = sqlite3.connect(daemon.db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as a long `ocidx scan` or a stray sqlite3 shell would
        replace_atomically(lay.index_path, index_bytes("v1", "two"))
        wait_for(lambda: "database error, retrying" in daemon.log(), "the daemon reports the busy database")
    finally:
        other.execute("ROLLBACK")
        other.close()
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "two"), "the change indexed once the database is free")
    assert not daemon.exited()


@integration
@needs_inotify
def test_corrupt_database_is_moved_aside_and_rebuilt(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = make_layout(os.path.join(root, "cache"), "v1", "one")
    garbage = b"this was never a database " * 200
    with open(os.path.join(tmp, "index.db"), "wb") as fh:
        fh.write(garbage)
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "one"), "rebuilt index answers")
    aside = glob.glob(daemon.db + ".corrupt-*")
    assert len(aside) == 1
    with open(aside[0], "rb") as fh:
        assert fh.read() == garbage
    assert "corrupt" in daemon.log() and aside[0] in daemon.log()


@integration
@needs_inotify
def test_polling_mode_when_inotify_is_not_wanted(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = make_layout(os.path.join(root, "nfs"), "v1", "one")
    daemon = run_daemon(daemons, tmp, [root], reconcile_s=0.3, env={"OCIDX_WATCH_MODE": "polling"})
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state")
    status = daemon.status()["daemon"]
    assert isinstance(status, dict) and str(status["watch_mode"]).startswith("polling: ")
    rewrite_in_place(lay.index_path, index_bytes("v1", "two"))
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "two"), "change found by polling")


@integration
@needs_inotify
def test_json_logs_are_one_object_per_line(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"))
    daemon = Daemon(tmp, [root])
    daemon.command = lambda: [*Daemon.command(daemon), "--log-format", "json"]  # type: ignore[method-assign]
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: '"event": "ready"' in daemon.log(), "ready logged as JSON")
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    assert {r["event"] for r in records if "event" in r} >= {"started", "ready", "stopped"}
    assert all({"time", "level", "message"} <= r.keys() for r in records)
