"""Read your own writes: every lookup answers with every change completed before it started.

A real daemon with a long debounce (so that, without the barrier, its index lags every change by
half a second), real inotify, lookups through the public API and the CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest
from harness import Daemon, needs_inotify, wait_for
from layouts import make_layout

from indexer.config import Config
from indexer.query import Index
from indexer.sync import TIMEOUT_S, barrier, socket_path

pytestmark = [pytest.mark.integration, needs_inotify]
SLOW_DEBOUNCE = "debounce_ms = 500"


def _slow_daemon(daemons: list[Daemon], tmp: str, root: str) -> Daemon:
    daemon = Daemon(tmp, [root])
    with open(daemon.config, encoding="utf-8") as fh:
        text = fh.read().replace("debounce_ms = 20", SLOW_DEBOUNCE)
    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write(text)
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "the daemon answers barriers")
    return daemon


def _find(db: str, ref: str) -> list[str]:
    with Index(db, config=Config()) as index:
        return sorted(answer.layout for answer in index.find(ref))


def test_find_ls_and_status_include_a_layout_made_just_before(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "first"), "v0")
    daemon = _slow_daemon(daemons, tmp, root)
    for trial in range(40):
        path = os.path.realpath(os.path.join(root, f"app{trial:02d}"))
        make_layout(path, f"v{trial + 1}")  # the daemon's debounce alone would hold it back 0.5 s
        assert _find(daemon.db, f":v{trial + 1}") == [path], f"trial {trial}"
        with Index(daemon.db, config=Config()) as index:
            rows = index.layouts()
            assert rows.unverified is None
            assert path in {row["layout"] for row in rows}
            assert index.status()["layouts"] == trial + 2
    assert "update" in daemon.log()


def test_a_daemon_that_does_not_answer_is_not_trusted(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "first"), "v0")
    daemon = _slow_daemon(daemons, tmp, root)
    os.kill(daemon.pid, signal.SIGSTOP)  # alive by its row and its pid, but it answers nothing
    try:
        path = os.path.realpath(os.path.join(root, "late"))
        make_layout(path, "v1")
        started = time.monotonic()
        assert _find(daemon.db, ":v1") == [path]  # walked: exact all the same
        assert time.monotonic() - started < TIMEOUT_S + 2.0
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def test_the_barrier_answers_one_question_and_stays_bounded(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "first"), "v0")
    daemon = _slow_daemon(daemons, tmp, root)
    path = socket_path(daemon.db)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.connect(path)
        other.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert other.recv(100).startswith(b"error: the only request is 'sync'")
    # A local user's flood of idle connections: the daemon serves a bounded number at a time, never
    # runs out of descriptors, keeps indexing, and lookups stay exact (they walk when it cannot answer).
    before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    idle = []
    try:
        for _ in range(600):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # a full backlog: the kernel holds the rest, not the daemon
                client.connect(path)
            idle.append(client)
        late = os.path.realpath(os.path.join(root, "during-the-flood"))
        make_layout(late, "v1")
        wait_for(lambda: daemon.indexed(late, ":v1", "one"), "indexed during the flood")
        assert _find(daemon.db, ":v1") == [late]
        assert len(os.listdir(f"/proc/{daemon.pid}/fd")) < before + 64 + 8
    finally:
        for client in idle:
            client.close()
    wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "barriers answered again once the flood is gone")


def test_a_socket_that_is_not_the_daemons_is_never_replaced(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    make_layout(os.path.join(root, "first"), "v0")
    daemon = Daemon(tmp, [root])
    os.symlink("/etc/passwd", socket_path(daemon.db))  # planted where the daemon would listen
    daemons.append(daemon)
    daemon.start().wait_ready()
    assert os.readlink(socket_path(daemon.db)) == "/etc/passwd"
    assert "no barrier for lookups" in daemon.log()
    late = os.path.realpath(os.path.join(root, "late"))
    make_layout(late, "v1")
    assert _find(daemon.db, ":v1") == [late]  # walked, exact
