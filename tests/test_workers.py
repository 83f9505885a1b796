"""Parsing in worker processes: the same rows as in-process, no orphans, a dying worker is survived.

Every test runs real ``ocidx scan`` or ``ocidx daemon`` processes with ``[daemon] workers = 2`` on
enough layouts that the pass uses its worker processes (scanner.POOL_MIN_LAYOUTS).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import DEADLINE_S, Daemon, environment, indexed, integrity, rows, run, wait_for, workers_of, write_config
from layouts import LINUX_AMD64, Layout, named

from indexer.scan.reading import POOL_MIN_LAYOUTS
from indexer.store.read import RACY_WINDOW_NS

FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_OPEN_PERM, FAN_ALLOW, AT_FDCWD = 0x4, 0x1, 0x1, 0x10000, 0x1, -100
EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
RESPONSE = struct.Struct("=iI")  # struct fanotify_response


def corpus(root: str, count: int) -> list[str]:
    """*count* small layouts, some with a nested index (their blobs are read by the workers)."""
    paths = []
    for number in range(count):
        lay = Layout(os.path.join(root, f"l{number // 10:02d}", f"layout-{number:03d}"))
        image = lay.manifest(platform=LINUX_AMD64, label=f"image-{number}")
        if number % 3 == 0:
            image = lay.index([image, lay.manifest(platform={"architecture": "arm64", "os": "linux"})])
        lay.write_index([named(image, ref=f"v{number}")])
        paths.append(lay.path)
    return paths


def alive(pid: int) -> bool:
    """Whether *pid* is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def with_workers(tmp: str, extra: str = "") -> str:
    return write_config(tmp, f"[daemon]\nworkers = 2\nbatch_size = 10\n{extra}")


def test_workers_write_the_rows_an_in_process_scan_writes(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "root")
    corpus(root, POOL_MIN_LAYOUTS + 16)
    pooled, alone = os.path.join(tmp, "pooled.db"), os.path.join(tmp, "alone.db")
    scan = run(tmp, "scan", "--db", pooled, "--config", with_workers(tmp), "--json", root)
    assert scan.rc == 0, scan
    one = write_config(tmp, "[daemon]\nworkers = 1\n")
    assert run(tmp, "scan", "--db", alone, "--config", one, root).rc == 0
    assert rows(pooled) == rows(alone)
    assert scan.json()["changed"] == POOL_MIN_LAYOUTS + 16  # type: ignore[index]


def _daemon(tmp: str) -> Daemon:
    """A daemon on a cold build of 400 layouts read by two workers, in batches of 5 (a long pass)."""
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus(root, 400)
    return Daemon(tmp, [root], db=db, config=write_config(tmp, "[daemon]\nworkers = 2\nbatch_size = 5\n")).start()


def _mid_pass(daemon: Daemon, db: str) -> list[int]:
    """Wait until the start-up pass has written some batches; its workers and resource tracker."""
    wait_for(lambda: indexed(db) >= 20 or daemon.exited(), "the first batches written")
    pids = workers_of(daemon.pid, b"multiprocessing")
    assert " ready: " not in daemon.log(), "the start-up pass ended before the test could stop the daemon"
    assert len(workers_of(daemon.pid)) == 2
    return pids


def test_no_worker_outlives_a_daemon_killed_with_sigkill(tmp_path: Path) -> None:
    with _daemon(str(tmp_path)) as daemon:
        pids = _mid_pass(daemon, os.path.join(str(tmp_path), "index.db"))
        daemon.kill()
        wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to die with the daemon")


def test_no_worker_outlives_a_daemon_stopped_with_sigterm(tmp_path: Path) -> None:
    with _daemon(str(tmp_path)) as daemon:
        pids = _mid_pass(daemon, os.path.join(str(tmp_path), "index.db"))
        workers = workers_of(daemon.pid)
        assert daemon.stop() == 0
        assert not any(alive(pid) for pid in workers)  # stopped before the daemon exited
        # multiprocessing's resource tracker ends when the daemon's end of its pipe closes
        wait_for(lambda: not any(alive(pid) for pid in pids), "the resource tracker to end")


def test_the_daemon_keeps_no_idle_workers_between_passes(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus(root, POOL_MIN_LAYOUTS + 6)
    with Daemon(tmp, [root], db=db, config=with_workers(tmp)).start() as daemon:
        daemon.wait_ready()
        wait_for(lambda: not workers_of(daemon.pid), "the start-up pass's workers to stop")
        assert indexed(db) == POOL_MIN_LAYOUTS + 6
        assert daemon.stop() == 0


class WorkerKiller:
    """SIGKILL the worker process that opens *blob* while its open waits (a fanotify permission event),
    as a crash or the OOM killer would while that layout is being read; anyone else's open is allowed.
    Workers reading other layouts are left alone. Needs root (CAP_SYS_ADMIN)."""

    def __init__(self, blob: str) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        self.fd = self.libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
        if self.fd < 0:
            pytest.skip(f"fanotify is not available here: {os.strerror(ctypes.get_errno())}")
        if self.libc.fanotify_mark(self.fd, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, os.fsencode(blob)) < 0:
            os.close(self.fd)
            pytest.skip(f"fanotify permission events are not available here: {os.strerror(ctypes.get_errno())}")
        self.parent: int | None = None
        self.killed: set[int] = set()
        self.opens = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stopped.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            data = os.read(self.fd, 4096)
            for offset in range(0, len(data) - len(data) % EVENT.size, EVENT.size):
                _length, _version, _, _, _mask, fd, pid = EVENT.unpack_from(data, offset)
                self.opens += 1
                if self.parent is not None and pid in workers_of(self.parent):
                    os.kill(pid, signal.SIGKILL)  # while its open of the blob is held
                    self.killed.add(pid)
                os.write(self.fd, RESPONSE.pack(fd, FAN_ALLOW))
                os.close(fd)

    def __enter__(self) -> WorkerKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(DEADLINE_S)
        os.close(self.fd)


def test_a_layout_whose_reader_is_killed_is_read_again_not_pinned(tmp_path: Path) -> None:
    # A dead worker says nothing about the layout it was reading (the OOM killer, an admin's kill).
    # Before: a layout whose read killed its worker twice was stored failed *with its identity*, and
    # stayed failed ("read again when it changes") after the killer was gone.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    good = corpus(root, POOL_MIN_LAYOUTS + 6)
    # The victim: a worker that opens its nested index blob is killed (WorkerKiller).
    victim = Layout(os.path.join(root, "victim"))
    nested = victim.index([victim.manifest(platform=LINUX_AMD64, label="victim")])
    victim.write_index([named(nested, ref="d")])
    blob = os.path.join(victim.path, "blobs", *str(nested["digest"]).split(":"))
    # Settled before the scan (outside the racy window), so that a stored identity would be a proof.
    changed_ns = os.stat(os.path.join(victim.path, "index.json")).st_ctime_ns
    wait_for(lambda: time.time_ns() > changed_ns + RACY_WINDOW_NS, "index.json to leave the racy window")
    args = [sys.executable, "-m", "indexer", "scan", "--db", db, "--config", with_workers(tmp), "--json", root]
    with WorkerKiller(blob) as killer:
        scan = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(tmp), cwd=tmp)
        killer.parent = scan.pid
        out, err = scan.communicate(timeout=DEADLINE_S)
    assert len(killer.killed) >= 2, "the victim was not read in a worker, then alone in another"
    assert scan.returncode == 0, err
    assert b"Traceback" not in err, err
    # Read again after a backoff (here by the writer's own process, which no killer targets): indexed.
    summary = json.loads(out)
    assert (summary["changed"], summary["errors"]) == (len(good) + 1, 0), (summary, killer.killed, err)
    listed = {r["layout"]: r for r in run(tmp, "ls", "--db", db, "--json").json()}  # type: ignore[attr-defined]
    assert all(listed[path]["state"] == "ok" for path in [*good, victim.path]), listed[victim.path]
    assert integrity(db) == "ok"
    wait_for(lambda: not any(alive(pid) for pid in killer.killed), "the killed workers to be reaped")
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


def test_no_worker_outlives_a_scan_killed_with_sigkill_mid_pass(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus(root, 400)
    config = write_config(tmp, "[daemon]\nworkers = 2\nbatch_size = 5\n")  # many transactions: killed mid-way
    args = [sys.executable, "-m", "indexer", "scan", "--db", db, "--config", config, "--no-progress", root]
    scan = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(tmp), cwd=tmp)
    wait_for(lambda: indexed(db) >= 20 or scan.poll() is not None, "the scan to write its first batches")
    pids = workers_of(scan.pid, b"multiprocessing")
    assert scan.poll() is None, "the scan ended before it could be killed"
    assert len(workers_of(scan.pid)) == 2
    scan.kill()
    scan.wait(DEADLINE_S)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to die with the scan")
    assert integrity(db) == "ok"
    again = run(tmp, "scan", "--db", db, "--config", config, root)
    assert again.rc == 0, again
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


def test_a_new_configuration_reaches_the_workers(tmp_path: Path) -> None:
    # What the daemon's SIGHUP does: the next pass's workers read with the new [limits].
    import anyio
    from harness import scanner_on

    from indexer.config import Config, DaemonSettings, Root
    from indexer.layout import Limits

    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus(root, POOL_MIN_LAYOUTS + 6)
    with scanner_on(db, Config(daemon=DaemonSettings(workers=2, batch_size=10))) as scanner:
        scanner.config = Config(daemon=DaemonSettings(workers=2, batch_size=10), limits=Limits(max_entries=0))
        counts = anyio.run(scanner.full_pass, [Root(root)])
    assert (counts.changed, counts.errors) == (0, POOL_MIN_LAYOUTS + 6)
    assert all("over the limit of 0" in message for message in counts.error_messages)


class AnswerKiller:
    """SIGKILL worker processes of process *parent* while they send their answer, as the OOM killer or
    an admin's ``kill -9`` would at that instant; then, twice, at random moments of the rest of the pass.

    To find a worker mid-answer every time, the parent is stopped (SIGSTOP) for that moment, as a
    busy machine deschedules it: a worker that finishes its task then blocks writing an answer larger
    than a pipe or socket holds (TASK_LAYOUTS generated layouts: several hundred KB), and is killed
    there; the parent is then continued (SIGCONT) and meets a partial answer."""

    def __init__(self, kills: int, seed: int) -> None:
        import random

        self.kills = kills
        self.rng = random.Random(seed)
        self.parent: int | None = None
        self.killed: list[tuple[int, str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _sending(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                where = f.read()
        except OSError:
            return False
        return "write" in where or "send" in where  # pipe_write, anon_pipe_write, sock_alloc_send_pskb

    def _watch(self) -> None:
        while not self.stopped.is_set() and len(self.killed) < self.kills:
            parent = self.parent
            workers = workers_of(parent) if parent is not None else []
            if parent is None or not any(map(_running, workers)):  # stopped now, no task would end
                time.sleep(0.002)
                continue
            os.kill(parent, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 2
                while not self.stopped.is_set() and time.monotonic() < deadline:
                    answering = [pid for pid in workers if self._sending(pid)]
                    if answering:
                        self._kill(answering[0], "while answering")
                        break
                    time.sleep(0.001)
            finally:
                os.kill(parent, signal.SIGCONT)
            time.sleep(self.rng.uniform(0.05, 0.2))
        for _ in range(2):
            if self.stopped.wait(self.rng.uniform(0.05, 0.3)) or self.parent is None:
                return
            found = workers_of(self.parent)
            if found:
                self._kill(self.rng.choice(found), "at random")

    def _kill(self, pid: int, how: str) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed.append((pid, how))

    def __enter__(self) -> AnswerKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(DEADLINE_S)
        if self.parent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.parent, signal.SIGCONT)


def _running(pid: int) -> bool:
    """Whether process *pid* is on a CPU or waiting for one (a worker reading its task)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"R"
    except OSError:
        return False


def _generated(root: str, count: int) -> None:
    """*count* layouts of the benchmark generator: about 20 entries each, so that a task's answer
    (TASK_LAYOUTS layouts) is several hundred KB, more than a pipe or socket holds at once."""
    from benchmarks.generate import generate_tree

    generate_tree(root, count, "workers-killed")


def test_workers_killed_while_answering_never_hang_the_pass(tmp_path: Path) -> None:
    # concurrent.futures' process pool shared one result pipe and one lock among its workers: a
    # worker killed mid-answer left a partial message the pool's thread waited on forever (and the
    # lock held by a dead process), so the scan hung for good (12 runs in 12 with this killer).
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    _generated(root, 500)
    config = write_config(tmp, "[daemon]\nworkers = 2\n")  # batches of 500: tasks of TASK_LAYOUTS layouts
    args = [sys.executable, "-m", "indexer", "scan", "--db", db, "--config", config, "--json", root]
    with AnswerKiller(kills=2, seed=1) as killer:
        scan = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(tmp), cwd=tmp)
        killer.parent = scan.pid
        try:
            out, err = scan.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            scan.kill()
            scan.communicate()
            raise AssertionError(f"the scan hung after its workers were killed: {killer.killed}") from None
    assert any(how == "while answering" for _, how in killer.killed), killer.killed
    assert scan.returncode == 0, err
    assert b"Traceback" not in err, err
    # Every layout read: a task whose worker died is read again, one layout at a time.
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, "--config", write_config(tmp, "[daemon]\nworkers = 1\n"), root).rc == 0
    assert rows(db) == rows(fresh), (killer.killed, json.loads(out))


def test_a_daemon_whose_workers_are_killed_while_answering_gets_ready(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    _generated(root, 400)
    with (
        AnswerKiller(kills=2, seed=7) as killer,
        Daemon(tmp, [root], db=db, config=write_config(tmp, "[daemon]\nworkers = 2\n")).start() as daemon,
    ):
        killer.parent = daemon.pid
        daemon.wait_ready()
        assert any(how == "while answering" for _, how in killer.killed), killer.killed
        assert daemon.stop() == 0
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh), killer.killed
