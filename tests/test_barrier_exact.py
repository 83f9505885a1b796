"""The barrier stays exact through what a tree and its operators do: an `ok` is never given while a
change made before the request is missing from the index (a review of the redesigned daemon found
each of these cases answering `ok` with a wrong answer).

Real daemons, real inotify, real SQLite, lookups through the public API.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import tempfile
import time

import anyio
import pytest
from harness import Daemon, needs_inotify, wait_for
from layouts import Layout, make_layout, named

from indexer.config import Config, DaemonSettings, Root
from indexer.query import Index
from indexer.sync import barrier

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, needs_inotify]


def _find(db: str, ref: str) -> list[str]:
    with Index(db, config=Config()) as index:
        return sorted(answer.layout for answer in index.find(ref))


def _daemon(daemons: list[Daemon], tmp: str, roots: list[str], *, debounce_ms: int = 500) -> Daemon:
    """A daemon whose index lags every change by *debounce_ms* unless a barrier drains it."""
    daemon = Daemon(tmp, roots)
    with open(daemon.config, encoding="utf-8") as fh:
        text = fh.read().replace("debounce_ms = 20", f"debounce_ms = {debounce_ms}")
    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write(text)
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "the daemon answers barriers")
    return daemon


def test_a_touched_directory_keeps_its_watches(tmp: str, daemons: list[Daemon]) -> None:
    # Before: IN_ATTRIB on a directory (touch, chmod, cp -a restoring times) removed every watch below
    # it; later layouts there were missed with the barrier saying ok.
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "team", "app"), "v0")
    daemon = _daemon(daemons, tmp, [root])
    os.utime(os.path.join(root, "team"))
    os.chmod(os.path.join(root, "team"), 0o750)
    late = os.path.realpath(os.path.join(root, "team", "app2"))
    make_layout(late, "v1")
    assert _find(daemon.db, ":v1") == [late]
    copied = os.path.join(root, "copied")
    shutil.copytree(os.path.join(root, "team"), copied, copy_function=shutil.copy2)
    later = os.path.realpath(os.path.join(copied, "app3"))
    make_layout(later, "v2")
    assert _find(daemon.db, ":v2") == [later]


def test_directories_made_while_events_were_lost_are_watched_after(tmp: str, daemons: list[Daemon]) -> None:
    # Before: after a queue overflow the reconcile found the layouts but no watch was placed on the
    # directories the lost events would have reported; later changes there were missed with ok.
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    os.makedirs(os.path.join(root, "noise"))
    daemon = _daemon(daemons, tmp, [root], debounce_ms=20)
    with open("/proc/sys/fs/inotify/max_queued_events", encoding="ascii") as fh:
        burst = int(fh.read()) + 100
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for i in range(burst // 2 + 1):  # a create and a close-after-write each: past the queue's size
            open(os.path.join(root, "noise", f"f{i}"), "w").close()
        hidden = os.path.realpath(os.path.join(root, "team", "app"))
        make_layout(hidden, "n1")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    wait_for(lambda: "events were lost" in daemon.log(), "the overflow seen")
    assert _find(daemon.db, ":n1") == [hidden]
    wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "the owed pass written")
    make_layout(hidden, "n2")
    third = os.path.realpath(os.path.join(root, "team", "app3"))
    make_layout(third, "n3")
    assert (_find(daemon.db, ":n2"), _find(daemon.db, ":n3")) == ([hidden], [third])


def test_a_step_that_failed_on_a_busy_database_is_owed_not_answered(tmp: str, daemons: list[Daemon]) -> None:
    # Before: the changes duty's unit failed ("database is locked"), the batch was dropped, and the
    # barrier said ok while the index lacked it.
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    daemon = _daemon(daemons, tmp, [root], debounce_ms=20)
    blocker = sqlite3.connect(daemon.db, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        late = os.path.realpath(os.path.join(root, "app"))
        make_layout(late, "new")
        wait_for(lambda: "database error" in daemon.log(), "the changes duty's unit fails", 15)
        answer = barrier(daemon.db, daemon.pid)
        assert answer is None or answer.startswith("inexact"), answer
        assert _find(daemon.db, ":new") == [late]  # walked: exact
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "ok again once the owed pass is written", 15)
    assert _find(daemon.db, ":new") == [late]


def test_a_root_that_appears_or_is_replaced_is_taken_by_the_barrier(tmp: str, daemons: list[Daemon]) -> None:
    # Before: a root made after start, or replaced, was trusted before it was watched or indexed.
    first, second = os.path.join(tmp, "r1"), os.path.join(tmp, "r2")
    make_layout(os.path.join(first, "a"), "v0")
    daemon = _daemon(daemons, tmp, [first, second])
    new = os.path.realpath(os.path.join(second, "app"))
    make_layout(new, "new")
    assert _find(daemon.db, ":new") == [new]
    os.rename(first, first + ".old")
    os.mkdir(first)
    replaced = os.path.realpath(os.path.join(first, "b"))
    make_layout(replaced, "repl")
    assert _find(daemon.db, ":repl") == [replaced]
    assert _find(daemon.db, ":v0") == []


def test_a_blob_that_arrives_later_changes_the_answers(tmp: str, daemons: list[Daemon]) -> None:
    # A nested index blob written after index.json (or a partial export completed): index.json never
    # changes, yet the layout's answers do. Before: the daemon saw the blob but skipped the layout,
    # its index.json being as stored.
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "app"))
    arm = lay.manifest(platform={"os": "linux", "architecture": "arm64"})
    nested = lay.index([arm])
    with open(lay.blob_path(str(nested["digest"])), "rb") as fh:
        nested_bytes = fh.read()
    lay.remove_blob(nested)
    lay.write_index([named(nested, ref="v1")])
    daemon = _daemon(daemons, tmp, [root])
    child = f"@{arm['digest']}"
    assert _find(daemon.db, child) == []  # the index blob is missing: its children are unknown
    with open(lay.blob_path(str(nested["digest"])), "wb") as fh:
        fh.write(nested_bytes)
    assert _find(daemon.db, child) == [os.path.realpath(lay.path)]


def test_a_symlink_out_of_a_root_is_neither_watched_nor_indexed(tmp: str, daemons: list[Daemon]) -> None:
    # Before: a link made in a root after start was followed out of it by the watcher even with
    # follow_symlinks = false: watches spent on the target, and its layouts indexed.
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    outside = os.path.join(tmp, "outside")
    make_layout(os.path.join(outside, "secret"), "outside")
    daemon = _daemon(daemons, tmp, [root], debounce_ms=20)
    watches = _watches(daemon.pid)
    os.symlink(outside, os.path.join(root, "link"))
    assert _find(daemon.db, ":outside") == []
    assert _watches(daemon.pid) == watches


def _watches(pid: int) -> int:
    """How many inotify watches the process *pid* holds (``/proc/PID/fdinfo``)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
                return sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    raise AssertionError("no inotify descriptor")


def _as_nobody(body: Callable[[int], None]) -> tuple[int, int]:
    """Run ``body(ready)`` in a child process as the user nobody (group nogroup), *ready* a pipe it
    writes one byte to once it is set up; the child's pid, and the pipe's end that byte arrives on
    (end of file instead: the child failed). The child exits when *body* returns or raises, or when
    it is killed."""
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_r)
            os.setgroups([])
            os.setgid(nogroup)
            os.setuid(nobody)
            body(ready_w)
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    return pid, ready_r


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory other users can reach (the test's own temporary directory is root's alone)."""
    path = tempfile.mkdtemp(prefix="ocidx-shared-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_socket_planted_by_another_user_is_not_trusted(shared_dir: str, daemons: list[Daemon]) -> None:
    # Before: a member of the readers' group planted a socket answering ok at the barrier's name in
    # the documented 3775 directory; the daemon could not listen, and root's lookups trusted the plant.
    tmp = shared_dir
    state = os.path.join(tmp, "state")
    os.mkdir(state)
    os.chown(state, 0, grp.getgrnam("nogroup").gr_gid)
    os.chmod(state, 0o3775)
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    daemon = Daemon(tmp, [root])
    daemon.db = os.path.join(state, "index.db")
    with open(daemon.config, encoding="utf-8") as fh:
        text = fh.read().replace("debounce_ms = 20", "debounce_ms = 500")
    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write(text)

    def plant(ready: int) -> None:  # a member of the readers' group, before the daemon starts
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(daemon.db + ".sock")
        os.chmod(daemon.db + ".sock", 0o777)
        server.listen(64)
        os.write(ready, b"r")
        while True:
            client, _ = server.accept()
            client.recv(64)
            client.sendall(b"ok\n")
            client.close()

    planter, ready_r = _as_nobody(plant)
    try:
        assert os.read(ready_r, 1) == b"r"
        daemons.append(daemon)
        daemon.start().wait_ready()
        assert barrier(daemon.db, daemon.pid) is None  # the plant is not the daemon
        for i in range(5):
            path = os.path.realpath(os.path.join(root, f"app{i}"))
            make_layout(path, f"t{i}")
            assert _find(daemon.db, f":t{i}") == [path]
    finally:
        _stop(planter)
        os.close(ready_r)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_one_users_flood_does_not_hold_back_anothers_lookups(shared_dir: str, daemons: list[Daemon]) -> None:
    # Before: 64 slots for all users, each held up to 10 s: 72 idle connections made every find wait
    # its 2 s bound.
    tmp = shared_dir
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    daemon = _daemon(daemons, tmp, [root], debounce_ms=20)
    os.chmod(daemon.db + ".sock", 0o666)

    def flood(ready: int) -> None:
        held = []
        for _ in range(300):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # a full backlog still holds the connection
                client.connect(daemon.db + ".sock")
            held.append(client)
        os.write(ready, b"r")
        time.sleep(60)

    flooder, ready_r = _as_nobody(flood)
    try:
        assert os.read(ready_r, 1) == b"r"  # (an empty read: the flood could not connect at all)
        started = time.monotonic()
        assert barrier(daemon.db, daemon.pid) == "ok"
        assert time.monotonic() - started < 0.5
    finally:
        _stop(flooder)
        os.close(ready_r)


def test_a_new_worker_count_waits_for_the_pass_that_holds_the_pool(tmp_path: str) -> None:
    # Before: a SIGHUP changing [daemon] workers closed the pool under a running pass (a crash about
    # one run in six, else worker processes left behind).
    from harness import scanner_on

    root = os.path.join(str(tmp_path), "root")
    for i in range(300):
        lay = Layout(os.path.join(root, f"l{i:03d}"))
        lay.write_index([named(lay.manifest(label=f"m{i}"), ref="v1")])
    two = Config(daemon=DaemonSettings(workers=2, batch_size=20))
    three = Config(daemon=DaemonSettings(workers=3, batch_size=20))

    async def go() -> int:
        with scanner_on(os.path.join(str(tmp_path), "index.db"), two) as scanner:
            async with anyio.create_task_group() as tg:
                tg.start_soon(scanner.full_pass, [Root(root)])
                with anyio.fail_after(30):
                    while not scanner.readers.pool_busy:
                        await anyio.sleep(0.001)
                scanner.config = three  # what a reload does while the pass reads
                assert scanner.readers.pool is not None and scanner.readers.pool.workers == 2
            assert scanner.readers.pool is not None
            return scanner.readers.pool.workers

    assert anyio.run(go) == 3


def test_a_reload_while_the_database_is_busy_does_not_stop_the_daemon(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "a"), "v0")
    daemon = _daemon(daemons, tmp, [root], debounce_ms=20)
    blocker = sqlite3.connect(daemon.db, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        os.kill(daemon.pid, signal.SIGHUP)  # systemctl reload ocidx
        wait_for(lambda: "not written yet, retrying" in daemon.log(), "the reload waits for the database", 15)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: "configuration reloaded" in daemon.log(), "the reload done")
    assert not daemon.exited()
    assert daemon.stop() == 0
