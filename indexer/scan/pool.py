"""The pool of worker processes a pass reads with: each worker with a pipe of its own, and a manager
thread that hands them tasks, starts and replaces them, and notices their deaths.

A worker that dies (a crash, the OOM killer) fails only the task it was reading (:class:`WorkerDied`);
the scanner reads that task's layouts again one at a time (docs/design.md). What a worker does is
:mod:`indexer.scan.workers`.
"""

from __future__ import annotations

import contextlib
import os

from indexer.scan.workers import _serve

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from concurrent.futures import Future
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from indexer.layout import Limits


class WorkerDied(Exception):
    """The worker process reading a task died (a crash, the OOM killer, a signal) before it answered."""


class WorkersUnavailable(Exception):
    """No worker process could be started (a process or descriptor limit): no layout is to blame."""


# Tasks sent to one worker ahead of its answers: the one it reads and the next, waiting in its pipe,
# so that it starts the next at once instead of waiting for the manager thread (which shares the GIL
# with the writer) to read its answer and send another. Cold scans of 10,000 layouts, medians of 3
# interleaved with concurrent.futures' pool (which queues ahead too) on a loaded machine: one task
# at a time 18.2 s wall against 13.6 s; two ahead 10.0 s against 11.3 s.
TASKS_AHEAD = 2


class _Worker:
    """One worker process, the parent's end of its own pipe, and the tasks sent to it, oldest first
    (its answers come back in that order)."""

    __slots__ = ("conn", "process", "tasks")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.tasks: list[tuple[Future[bytes], list[str]]] = []


class _Manager:
    """The manager thread of a :class:`Pool`: it waits on every busy worker's pipe and every worker's
    exit at once, hands waiting tasks to the workers, starts them when tasks wait (or when warming),
    and fails only the tasks of a worker that died. Its state is the pool's, shared under ``_lock``."""

    workers: int
    _lock: threading.Lock
    _pending: list[tuple[Future[bytes], list[str], str, Limits]]
    _running: list[_Worker]
    _thread: threading.Thread | None
    _wake: tuple[int, int] | None
    _warm: bool
    _closing: bool
    _broken: str | None
    _limit: int | None

    def _manage(self) -> None:
        wake = self._wake
        assert wake is not None
        try:
            # Here, not at the top: ocidx scan imports this module, and a scan that proves nothing
            # changed starts no worker (multiprocessing.connection is about 20 ms of imports).
            from multiprocessing.connection import wait

            while True:
                with self._lock:
                    if self._closing:
                        break
                    self._dispatch()
                    spawn = self._to_spawn()
                if spawn:
                    self._spawn(spawn)
                    continue
                with self._lock:
                    busy = [w for w in self._running if w.tasks]
                    exits = [w.process.sentinel for w in self._running]
                ready = wait([wake[0], *(w.conn for w in busy), *exits])
                if wake[0] in ready:
                    try:
                        while os.read(wake[0], 4096):
                            pass
                    except BlockingIOError:
                        pass
                for worker in busy:
                    if worker.conn in ready:
                        self._answered(worker)
                for worker in list(self._running):
                    if worker.process.sentinel in ready:
                        self._died(worker)
        except BaseException as exc:  # whatever stops this thread, no task may wait forever
            self._broken = f"{type(exc).__name__}: {exc}"
        finally:
            self._stop_all()

    def _dispatch(self) -> None:
        """Hand waiting tasks to the workers, the least busy first, up to TASKS_AHEAD each (the lock is held)."""
        for ahead in range(1, TASKS_AHEAD + 1):
            for worker in self._running:
                while len(worker.tasks) < ahead and self._pending:
                    future, paths, familiar, limits = self._pending.pop(0)
                    if not future.set_running_or_notify_cancel():
                        continue  # cancelled while it waited
                    try:
                        worker.conn.send((paths, familiar, limits))
                    except OSError:
                        # The worker is gone (its exit is reported next).
                        future.set_exception(WorkerDied("the worker process exited before it took the task"))
                        break
                    worker.tasks.append((future, paths))

    def _to_spawn(self) -> int:
        """How many workers to start now: for the tasks no idle worker takes, or all when warming."""
        idle = sum(1 for w in self._running if not w.tasks)
        wanted = self.workers if self._warm else min(self.workers, len(self._running) - idle + len(self._pending))
        if self._limit is not None:
            wanted = min(wanted, self._limit)
        return max(0, wanted - len(self._running))

    def _spawn(self, count: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        for _ in range(count):
            try:
                # spawn, not fork: the parent has threads (the writer's, the watcher's) whose locks a
                # forked child would inherit held; a spawned worker starts clean and is a direct child.
                parent_end, child_end = context.Pipe(duplex=True)
                try:
                    process = context.Process(target=_serve, args=(child_end, os.getpid()), daemon=True)
                    process.start()
                finally:
                    child_end.close()  # the worker holds the only other end: its death is EOF here
            except OSError as exc:
                with self._lock:
                    if self._running:  # serve with these; try again once one exits
                        self._limit = len(self._running)
                    else:  # nothing would ever take the waiting tasks; the next task tries again
                        failed, self._pending = self._pending, []
                        for future, *_ in failed:
                            if future.set_running_or_notify_cancel():
                                future.set_exception(WorkersUnavailable(exc.strerror or str(exc)))
                    self._warm = False
                return
            with self._lock:
                self._running.append(_Worker(process, parent_end))
        with self._lock:
            self._warm = False

    def _answered(self, worker: _Worker) -> None:
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._died(worker)  # it closed its pipe or died mid-answer: its exit follows
            return
        if worker.tasks:
            worker.tasks.pop(0)[0].set_result(data)

    def _died(self, worker: _Worker) -> None:
        """A worker exited: its tasks (but those whose whole answer is in the pipe) fail with WorkerDied."""
        tasks, worker.tasks = worker.tasks, []
        while tasks:
            try:
                data = worker.conn.recv_bytes() if worker.conn.poll() else None
            except (EOFError, OSError):
                data = None
            if data is None:
                break
            tasks.pop(0)[0].set_result(data)
        if tasks:
            worker.process.join(1.0)
            code = worker.process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            for future, _paths in tasks:
                future.set_exception(WorkerDied(f"the worker process reading it died ({how})"))
        with self._lock:
            if worker in self._running:
                self._running.remove(worker)
            self._limit = None  # its descriptors and process are free again: a replacement may start
        _reap(worker)

    def _stop_all(self) -> None:
        """Stop every worker; fail every task still waiting or being read (WorkersUnavailable when the
        manager thread itself failed: descriptors used up, say, so that the pass reads them itself)."""
        with self._lock:
            running, self._running = self._running, []
            pending, self._pending = self._pending, []
            broken, self._broken = self._broken, None
            if broken is not None:  # the next task starts a new manager
                self._thread = None
                wake, self._wake = self._wake, None
                for end in wake or ():
                    os.close(end)
        for future, *_ in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(
                    WorkersUnavailable(broken) if broken else WorkerDied("the worker processes were stopped")
                )
        for worker in running:
            tasks, worker.tasks = worker.tasks, []
            if not tasks:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)  # an idle worker leaves on its own
                continue
            for future, _paths in tasks:
                future.set_exception(
                    WorkersUnavailable(broken) if broken else WorkerDied("the worker processes were stopped")
                )
            worker.process.terminate()  # reading layouts nobody waits for any more
        for worker in running:
            _reap(worker)


class Pool(_Manager):
    """Worker processes that read batches of layouts, each with a pipe of its own.

    Not ``concurrent.futures.ProcessPoolExecutor``: its workers share one result pipe under one
    lock, so a worker killed while it writes a result (the OOM killer, an admin's ``kill -9``) leaves
    a partial message that the executor's thread waits on forever, with the lock held, and every
    other worker blocked behind it (a pass hung for good, about one run in four under a killer; a
    worker spawned while that thread waits is not among the processes it watches either). Here a
    task goes to one worker over that worker's own pipe (TASKS_AHEAD at most); a manager thread
    waits on every busy pipe and every worker's exit at once, so a death fails only the tasks that
    worker held (:class:`WorkerDied`), and a partial result ends in EOF, since the dead worker held
    the only other end. Workers are started when tasks wait for them (or by :meth:`warm`), replaced
    after a death, and stopped by :meth:`close`.
    """

    def __init__(self, workers: int, familiar: str, limits: Limits) -> None:
        import threading

        self.workers = workers
        self.familiar = familiar
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: list[tuple[Future[bytes], list[str], str, Limits]] = []
        self._running: list[_Worker] = []
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # a non-blocking pipe that wakes the manager thread
        self._warm = False
        self._closing = False
        self._broken: str | None = None  # why the manager thread stopped, when it failed
        # After a worker could not be started (EMFILE, a process limit): as many as are running, until
        # one exits; trying again at once would spin instead of serving the workers that run.
        self._limit: int | None = None

    def submit(self, paths: list[str]) -> Future[bytes]:
        """Start reading *paths* in a worker; the future's result is for :func:`unpack`, or it fails
        with :class:`WorkerDied` (the worker died) or :class:`WorkersUnavailable` (none could start)."""
        from concurrent.futures import Future

        future: Future[bytes] = Future()
        task = (future, paths, self.familiar, self.limits)
        with self._lock:
            self._pending.append(task)
            try:
                self._start()
            except (OSError, RuntimeError) as exc:  # no pipe or thread for the manager (EMFILE, a limit)
                self._pending.remove(task)
                future.set_running_or_notify_cancel()
                future.set_exception(WorkersUnavailable(str(exc)))
        return future

    def warm(self) -> None:
        """Start every worker now, so that their start-up overlaps other work."""
        with self._lock:
            self._warm = True
            try:
                self._start()
            except (OSError, RuntimeError):
                self._warm = False  # the first task meets the same failure, and says so

    def _start(self) -> None:
        """Start the manager thread, or wake it (the lock is held)."""
        import threading

        if self._thread is None:
            self._closing = False
            wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            thread = threading.Thread(target=self._manage, name="ocidx-workers", daemon=True)
            try:
                self._wake = wake
                thread.start()
            except BaseException:
                self._wake = None
                for end in wake:
                    os.close(end)
                raise
            self._thread = thread
        else:
            self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):  # its pipe is full: the manager is woken already
                os.write(wake[1], b"!")

    def close(self) -> None:
        """Stop the workers: tasks waiting fail, a worker reading is stopped (its result is not wanted)."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._closing = True
            self._poke()
        thread.join()
        with self._lock:
            self._limit = None
            if self._thread is thread:  # (a manager that failed has cleared up after itself)
                self._thread = None
                wake, self._wake = self._wake, None
                for end in wake or ():
                    os.close(end)
            self._warm = False

    def pids(self) -> list[int]:
        """The worker processes' ids (for status and tests)."""
        with self._lock:
            return sorted(w.process.pid for w in self._running if w.process.pid is not None)


def _reap(worker: _Worker) -> None:
    """Wait for a worker that was told to leave (or died), killing it if it does not."""
    worker.process.join(5.0)
    if worker.process.exitcode is None:
        worker.process.kill()
        worker.process.join()
    worker.conn.close()
    worker.process.close()
