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
import sys
import tempfile
import time

import pytest
from layouts import OCI_MANIFEST, Layout, digest_of, named

from indexer.config import Config
from indexer.errors import OcidxError
from indexer.query import Index
from indexer.store import path_of
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 10.0
# docs/operations.md: a change is answered from the index about 0.1 s after it. Changes made while the
# daemon watches get this (generous) deadline, shorter than the 3 s after which the racy-clean
# re-check would find them anyway: so these tests fail if the watch path itself is broken.
FRESH_S = 2.0
MAX_QUEUED_EVENTS = "/proc/sys/fs/inotify/max_queued_events"

integration = pytest.mark.integration
needs_inotify = pytest.mark.skipif(not os.path.isdir("/proc/sys/fs/inotify"), reason="needs Linux inotify")


# -- helpers ------------------------------------------------------------------------------------


def image(label: str) -> dict[str, object]:
    """A manifest descriptor (its blob need not exist for tag lookups)."""
    data = f'{{"schemaVersion":2,"label":"{label}"}}'.encode()
    return {"mediaType": OCI_MANIFEST, "digest": digest_of(data), "size": len(data)}


def index_bytes(tag: str, label: str, **annotations: str) -> bytes:
    """An ``index.json`` naming one image *label* as *tag*."""
    lay_doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [named(image(label), ref=tag, **annotations)],
    }
    return json.dumps(lay_doc, separators=(",", ":")).encode()


def make_layout(path: str, tag: str = "v1", label: str = "one") -> Layout:
    lay = Layout(path)
    lay.write_index_bytes(index_bytes(tag, label))
    return lay


def rewrite_in_place(path: str, data: bytes) -> None:
    """BuildKit's and skopeo's way: open the existing file, write at 0, truncate the tail."""
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()


def replace_atomically(path: str, data: bytes) -> None:
    """umoci's and regclient's way: a temporary file beside it, renamed over it."""
    tmp = os.path.join(os.path.dirname(path), f".index.json.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def wait_until(condition: Callable[[], object], what: str, deadline_s: float = DEADLINE_S) -> object:
    """Poll *condition* until it is truthy; fail naming *what* after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s}s: {what}")
        time.sleep(0.02)


class Daemon:
    """One ``ocidx daemon`` subprocess with its database, config and log file."""

    def __init__(self, tmp: str, roots: list[str], *, reconcile_s: float = 300.0, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.db = os.path.join(tmp, "index.db")
        self.roots = roots
        self.config = os.path.join(tmp, "ocidx.toml")
        with open(self.config, "w", encoding="utf-8") as fh:
            fh.write(
                "[daemon]\ndebounce_ms = 20\n"
                f"reconcile_interval_s = {reconcile_s}\nheartbeat_interval_s = 0.2\nbatch_size = 50\n"
            )
        self.log_path = os.path.join(tmp, f"daemon-{len(glob.glob(os.path.join(tmp, 'daemon-*.log')))}.log")
        self.env = {k: v for k, v in os.environ.items() if k not in ("OCIDX_DB", "OCIDX_CONFIG", "OCIDX_WATCH_MODE")}
        self.env.update(XDG_CONFIG_HOME=os.path.join(tmp, "xdg"), XDG_DATA_HOME=os.path.join(tmp, "xdg"))
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "indexer", "daemon", "--config", self.config, "--db", self.db, *self.roots]

    def start(self) -> Daemon:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stderr=log, stdout=subprocess.DEVNULL, cwd=REPO, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_ready(self) -> None:
        wait_until(lambda: "ready:" in self.log() or self.exited(), "the daemon says ready")
        assert not self.exited(), self.log()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("the daemon did not stop within the deadline on " + signal.Signals(sig).name)

    # -- observations through the public lookup API --

    def answer(self, layout: str, ref: str) -> object:
        try:
            with Index(self.db, config=Config()) as index:
                return index.resolve_in(layout, ref)
        except OcidxError:
            return None

    def indexed(self, layout: str, ref: str, label: str, **annotations: str) -> bool:
        """The index itself (not a read-through) answers *ref* in *layout* with image *label*."""
        answer = self.answer(layout, ref)
        if answer is None:
            return False
        want = str(image(label)["digest"])
        got_annotations = answer.annotations  # type: ignore[attr-defined]
        return (
            answer.digest == want  # type: ignore[attr-defined]
            and answer.freshness == "indexed"  # type: ignore[attr-defined]
            and all(got_annotations.get(k) == v for k, v in annotations.items())
        )

    def layouts(self) -> set[str]:
        """The layouts the daemon's index holds (its rows, not what a lookup would read through)."""
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        except sqlite3.Error:
            return set()
        try:
            return {path_of(row[0]) for row in conn.execute("SELECT path FROM layouts")}
        except sqlite3.Error:
            return set()
        finally:
            conn.close()

    def status(self) -> dict[str, object]:
        with Index(self.db, config=Config()) as index:
            return index.status()

    def stored(self, layout: str) -> db.StoredLayout | None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return db.layout(conn, os.path.realpath(layout))
        finally:
            conn.close()


@pytest.fixture
def tmp(tmp_path: os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(tmp_path))


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is stopped (and killed if need be) at the end."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


def run_daemon(daemons: list[Daemon], tmp: str, roots: list[str], **options: object) -> Daemon:
    daemon = Daemon(tmp, roots, **options)  # type: ignore[arg-type]
    daemons.append(daemon)
    daemon.start().wait_ready()
    return daemon


def integrity(db_path: str) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- change detection ---------------------------------------------------------------------------


@integration
@needs_inotify
def test_atomic_rename_writer_is_indexed_then_settled_and_heartbeat_runs(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = make_layout(os.path.join(root, "cache"), "v1", "one")
    daemon = run_daemon(daemons, tmp, [root])
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state indexed")

    replace_atomically(lay.index_path, index_bytes("v1", "two"))
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "two"), "renamed-in index.json indexed", FRESH_S)

    # Read within the racy window, the identity is re-checked once the window passed, so
    # lookups can trust it again without hashing the file.
    wait_until(
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
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "a"), "first state indexed")
    before = os.stat(lay.index_path)
    rewrite_in_place(lay.index_path, index_bytes("v2", "b"))
    assert os.stat(lay.index_path).st_ino == before.st_ino and os.stat(lay.index_path).st_size < before.st_size
    wait_until(lambda: daemon.indexed(lay.path, ":v2", "b"), "in-place rewrite indexed", FRESH_S)
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
    wait_until(lambda: {keep.path, doomed.path, leaving.path} <= daemon.layouts(), "initial layouts")

    os.rename(made.path, os.path.join(root, "export"))  # a layout built elsewhere, renamed in
    os.rename(team, os.path.join(root, "team"))  # a tree holding two layouts
    wait_until(lambda: daemon.indexed(os.path.join(root, "export"), ":v9", "nine"), "renamed-in layout", FRESH_S)
    wait_until(lambda: daemon.indexed(os.path.join(root, "team", "deep", "b"), ":b", "b"), "nested layout", FRESH_S)
    wait_until(lambda: daemon.indexed(os.path.join(root, "team", "a"), ":a", "a"), "layout in renamed tree", FRESH_S)

    shutil.rmtree(doomed.path)
    os.rename(leaving.path, os.path.join(tmp, "left"))  # renamed out of the root
    wait_until(lambda: not ({doomed.path, leaving.path} & daemon.layouts()), "removed layouts dropped", FRESH_S)
    assert keep.path in daemon.layouts()
    # Back in under another name: watchdog still holds watches on the tree it lost track of.
    os.rename(os.path.join(tmp, "left"), os.path.join(root, "returned"))
    wait_until(lambda: daemon.indexed(os.path.join(root, "returned"), ":v1", "one"), "layout renamed back", FRESH_S)


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
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "first"), "layout in the new root")
    # And the new root is watched, not merely scanned once.
    replace_atomically(lay.index_path, index_bytes("v1", "second"))
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "second"), "change inside the new root", FRESH_S)


@integration
@needs_inotify
def test_root_removed_and_recreated_is_dropped_then_watched_again(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    old = make_layout(os.path.join(root, "old"), "v1", "old")
    daemon = run_daemon(daemons, tmp, [root])
    wait_until(lambda: daemon.indexed(old.path, ":v1", "old"), "first state")
    shutil.rmtree(root)
    wait_until(lambda: old.path not in daemon.layouts(), "layouts of the removed root dropped", FRESH_S)
    new = make_layout(os.path.join(root, "new"), "v1", "new")
    wait_until(lambda: daemon.indexed(new.path, ":v1", "new"), "layout in the recreated root", FRESH_S)
    replace_atomically(new.index_path, index_bytes("v1", "newer"))
    wait_until(lambda: daemon.indexed(new.path, ":v1", "newer"), "the recreated root is watched", FRESH_S)


@integration
@needs_inotify
def test_burst_of_5000_rewrites_ends_in_the_exact_final_state(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    layouts = [make_layout(os.path.join(root, f"l{i:02d}")) for i in range(50)]
    daemon = run_daemon(daemons, tmp, [root])
    wait_until(lambda: len(daemon.layouts()) == 50, "initial 50 layouts")
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

    wait_until(all_final, "all 50 layouts at their 100th write")
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
    wait_until(lambda: len(daemon.layouts()) == 40, "initial layouts")

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

    wait_until(lambda: "reconcile (inotify queue overflow" in daemon.log(), "a reconcile for the overflow", FRESH_S)
    wait_until(
        lambda: all(daemon.indexed(lay.path, ":v1", f"final-{n}") for n, lay in enumerate(final)),
        "changes lost by inotify caught up by the reconcile",
        FRESH_S,
    )
    wait_until(
        lambda: all(daemon.indexed(lay.path, ":n", f"noise-{rounds - 1}") for lay in noise), "noise layouts final"
    )


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
    wait_until(lambda: daemon.layouts() or daemon.exited(), "the first batch is committed", deadline_s=30)
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
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state")
    other = sqlite3.connect(daemon.db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as a long `ocidx scan` or a stray sqlite3 shell would
        replace_atomically(lay.index_path, index_bytes("v1", "two"))
        wait_until(lambda: "database error, retrying" in daemon.log(), "the daemon reports the busy database")
    finally:
        other.execute("ROLLBACK")
        other.close()
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "two"), "the change indexed once the database is free")
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
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "one"), "rebuilt index answers")
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
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state")
    status = daemon.status()["daemon"]
    assert isinstance(status, dict) and str(status["watch_mode"]).startswith("polling: ")
    rewrite_in_place(lay.index_path, index_bytes("v1", "two"))
    wait_until(lambda: daemon.indexed(lay.path, ":v1", "two"), "change found by polling")


@integration
@needs_inotify
def test_json_logs_are_one_object_per_line(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"))
    daemon = Daemon(tmp, [root])
    daemon.command = lambda: [*Daemon.command(daemon), "--log-format", "json"]  # type: ignore[method-assign]
    daemons.append(daemon)
    daemon.start()
    wait_until(lambda: '"event": "ready"' in daemon.log(), "ready logged as JSON")
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    assert {r["event"] for r in records if "event" in r} >= {"started", "ready", "stopped"}
    assert all({"time", "level", "message"} <= r.keys() for r in records)
