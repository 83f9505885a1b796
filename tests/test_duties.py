"""Each duty of the daemon in-process: fed through its stream, checked by the rows of a real database.

No daemon process and no private state: a duty is built on a real store (a temporary SQLite file),
a real scanner and, for the watching duty, real inotify; the test sends what another duty would
send and reads what a lookup would read.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time

import anyio
import pytest
from layouts import Layout, named

from indexer.config import Config, DaemonSettings, Root
from indexer.daemon.barrier import Barrier
from indexer.daemon.changes import Changes
from indexer.daemon.database import Rebuild
from indexer.daemon.heartbeat import heartbeat
from indexer.daemon.maintenance import Maintenance
from indexer.daemon.publishing import publish
from indexer.daemon.reconcile import Reconcile
from indexer.daemon.reports import Reports
from indexer.daemon.shared import RECHECK, WAKE, PassReport, Shared, Sync
from indexer.daemon.watching import Watching
from indexer.scan.counts import Counts
from indexer.scan.scanner import Scanner
from indexer.store import state
from indexer.store.writer import Store
from indexer.sync import socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

QUICK = Config(daemon=DaemonSettings(debounce_ms=0, heartbeat_s=0.05, reconcile_s=300.0, workers=1))


def _layout(path: str, tag: str, label: str = "one") -> Layout:
    lay = Layout(path)
    lay.write_index([named(lay.manifest(label=label), ref=tag)])
    return lay


def _rows(db: str, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _tags(db: str) -> set[tuple[str, str]]:
    """(layout path, tag) of every name in the index."""
    return {
        (str(path), str(tag))
        for path, tag in _rows(db, "SELECT l.path, n.tag FROM names n JOIN layouts l ON l.id = n.layout_id")
    }


def _on_shared(tmp: str, root: str, test: Callable[[Shared], Awaitable[None]], config: Config = QUICK) -> None:
    """Run *test* with a Shared on a fresh store at tmp/index.db (closed afterwards)."""

    async def main() -> None:
        store = Store(os.path.join(tmp, "index.db"))
        shared = Shared(store.path, config, [Root(os.path.realpath(root))], store, Scanner(store, config))
        try:
            await store.unit(
                state.record_start, pid=os.getpid(), now_ns=time.time_ns(), mode="test", roots=shared.roots
            )
            await test(shared)
        finally:
            shared.close()
            await shared.scanner.aclose()
            await store.aclose()

    anyio.run(main)


async def _next_report(shared: Shared) -> PassReport:
    with anyio.fail_after(5):
        return await shared.reports_in.receive()


def test_changes_indexes_what_the_watcher_saw_on_a_wake_and_answers_a_sync(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    os.makedirs(root)

    async def test(shared: Shared) -> None:
        watching = Watching(shared, Reports(None))
        async with anyio.create_task_group() as tg:
            await tg.start(watching.run)
            await tg.start(Changes(shared, watching).run)
            lay = _layout(os.path.join(root, "a"), "v1")
            # What the watching duty sends once it read the events:
            shared.wake()
            report = await _next_report(shared)
            assert report.kind == "update" and report.counts.changed == 1
            assert _tags(shared.db_path) == {(os.path.realpath(lay.path), "v1")}
            # A barrier: the events are read by the duty itself, no wake needed, then the answer.
            _layout(lay.path, "v2")
            sync = Sync()
            shared.sync(sync)
            with anyio.fail_after(5):
                await sync.done.wait()
            assert _tags(shared.db_path) == {(os.path.realpath(lay.path), "v2")}
            tg.cancel_scope.cancel()

    _on_shared(tmp, root, test)


def test_changes_takes_racy_layouts_again_once_they_settle(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    lay = _layout(os.path.join(root, "a"), "v1")

    async def test(shared: Shared) -> None:
        await shared.scanner.process([os.path.realpath(lay.path)])  # read at once: its identity is racy
        assert await shared.store.read(state.racy_layouts)
        watching = Watching(shared, Reports(None))
        async with anyio.create_task_group() as tg:
            await tg.start(Changes(shared, watching).run)
            shared.recheck()
            with anyio.fail_after(10):  # the racy window (3 s) and the margin
                while await shared.store.read(state.racy_layouts):
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()

    _on_shared(tmp, root, test)


def test_reconcile_runs_the_start_up_pass_then_one_per_request(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    first = _layout(os.path.join(root, "a"), "v1")

    async def test(shared: Shared) -> None:
        shared.mode = "inotify"  # as the watching duty sets it
        async with anyio.create_task_group() as tg:
            tg.start_soon(Reconcile(shared).run)
            report = await _next_report(shared)
            assert (report.kind, report.why, report.counts.changed) == ("reconcile", "start-up", 1)
            with anyio.fail_after(5):
                await shared.ready.wait()
            assert await shared.changes_in.receive() == RECHECK
            second = _layout(os.path.join(root, "b"), "v2")
            shared.owe_pass("inotify queue overflow")  # what the changes duty does when events were lost
            assert shared.inexact() is not None
            report = await _next_report(shared)
            assert (report.why, report.counts.changed) == ("inotify queue overflow", 1)
            assert shared.settled == shared.owed and shared.inexact() is None
            tg.cancel_scope.cancel()
        assert _tags(shared.db_path) == {(os.path.realpath(first.path), "v1"), (os.path.realpath(second.path), "v2")}
        ((last,),) = _rows(shared.db_path, "SELECT last_reconcile_ns FROM daemon")
        assert isinstance(last, int)

    _on_shared(tmp, root, test)


def test_reports_logs_each_pass_and_refreshes_the_gauges(tmp_path: str, caplog: pytest.LogCaptureFixture) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    lay = _layout(os.path.join(root, "a"), "v1")
    from indexer.config import MetricsSettings
    from indexer.daemon.metrics import Metrics

    async def test(shared: Shared) -> None:
        metrics = Metrics(MetricsSettings(textfile=os.path.join(tmp, "ocidx.prom")), shared.db_path)
        reports = Reports(metrics)
        async with anyio.create_task_group() as tg:
            await tg.start(reports.run, shared)
            counts = await shared.scanner.process([os.path.realpath(lay.path)])
            shared.report(PassReport("update", counts, 0.01))
            with anyio.fail_after(5):
                while metrics.registry.get_sample_value("ocidx_entries") != 1:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        with open(os.path.join(tmp, "ocidx.prom"), encoding="utf-8") as fh:
            assert "ocidx_entries 1.0" in fh.read()

    with caplog.at_level(logging.INFO, logger="ocidx"):
        _on_shared(tmp, root, test)
    assert "update: 1 layout looked at" in caplog.text and os.path.realpath(lay.path) in caplog.text


def test_heartbeat_beats_and_raises_a_rebuild_when_the_database_is_deleted(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    os.makedirs(root)

    async def test(shared: Shared) -> None:
        (before,) = _rows(shared.db_path, "SELECT heartbeat_ns FROM daemon")[0]
        with anyio.move_on_after(0.3):
            await heartbeat(shared, None, Reports(None))
        (after,) = _rows(shared.db_path, "SELECT heartbeat_ns FROM daemon")[0]
        assert isinstance(before, int) and isinstance(after, int) and after > before
        os.unlink(shared.db_path)
        with pytest.raises(Rebuild, match="was deleted"), anyio.fail_after(5):
            await heartbeat(shared, None, Reports(None))

    _on_shared(tmp, root, test)


def test_maintenance_checkpoints_the_wal(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    for i in range(30):
        _layout(os.path.join(root, f"l{i}"), "v1", label=f"l{i}")

    async def test(shared: Shared) -> None:
        await shared.scanner.full_pass(shared.roots)
        assert os.path.getsize(shared.db_path + "-wal") > 0
        with anyio.move_on_after(0.3):
            await Maintenance(shared).run()
        assert os.path.getsize(shared.db_path + "-wal") == 0

    _on_shared(tmp, root, test)


def test_barrier_hands_a_sync_to_the_changes_stream_and_answers_when_it_is_done(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    os.makedirs(root)

    async def test(shared: Shared) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(Barrier(shared).run)

            def ask() -> bytes:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.connect(socket_path(shared.db_path))
                    client.sendall(b"sync\n")
                    return client.recv(200)

            async with anyio.create_task_group() as asking:
                answers: list[bytes] = []

                async def one() -> None:
                    answers.append(await anyio.to_thread.run_sync(ask))

                asking.start_soon(one)
                with anyio.fail_after(5):
                    sync = await shared.changes_in.receive()
                assert isinstance(sync, Sync)
                sync.done.set()  # as the changes duty does once everything before it is written
            assert answers == [b"inexact the daemon's start-up pass is not written yet\n"]
            tg.cancel_scope.cancel()
        assert not os.path.exists(socket_path(shared.db_path))  # removed on the way out

    _on_shared(tmp, root, test)


def test_watching_wakes_the_changes_duty_with_what_changed(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    os.makedirs(os.path.join(root, "deep", "er"))

    async def test(shared: Shared) -> None:
        watching = Watching(shared, Reports(None))
        async with anyio.create_task_group() as tg:
            await tg.start(watching.run)
            assert shared.mode == "inotify"
            (mode,) = _rows(shared.db_path, "SELECT watch_mode FROM daemon")[0]
            assert mode == "inotify"
            lay = _layout(os.path.join(root, "deep", "er", "app"), "v1")  # a new directory, then its files
            with anyio.fail_after(5):
                assert await shared.changes_in.receive() == WAKE
            pending = watching.take()
            assert os.path.join(root, "deep", "er", "app") in pending.trees or lay.path in pending.layouts
            tg.cancel_scope.cancel()

    _on_shared(tmp, root, test)


def test_publishing_without_a_fleet_forgets_an_earlier_publishers_state(tmp_path: str) -> None:
    tmp, root = str(tmp_path), os.path.join(str(tmp_path), "root")
    os.makedirs(root)

    def planted(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO fleet_publisher (id, state, since_ns) VALUES (1, 'connected', 1)")

    async def test(shared: Shared) -> None:
        await shared.store.unit(planted)
        await publish(shared, Reports(None))
        assert _rows(shared.db_path, "SELECT * FROM fleet_publisher") == []

    _on_shared(tmp, root, test)


def test_counts_merge_adds_every_figure() -> None:
    one, two = Counts(), Counts()
    one.seen, one.changed, one.changed_paths = 2, 1, ["/a"]
    two.seen, two.removed, two.removed_paths = 3, 1, ["/b"]
    one.merge(two)
    assert (one.seen, one.changed, one.removed, one.changed_paths, one.removed_paths) == (5, 1, 1, ["/a"], ["/b"])


def test_a_tree_is_covered_by_an_ancestor_only_as_deep_as_it_reaches() -> None:
    from indexer.daemon.changes import outermost

    same_root = [Root("/r/a", max_depth=3), Root("/r/a/b", max_depth=2), Root("/r/a/b/c", max_depth=1)]
    assert outermost(same_root) == [Root("/r/a", max_depth=3)]  # an rm -r's events: one rediscovery
    # A root nested in another, reaching deeper than the outer root's limit, keeps its own tree.
    nested = [Root("/r/a", max_depth=1), Root("/r/a/inner/x", max_depth=6)]
    assert outermost(nested) == nested
