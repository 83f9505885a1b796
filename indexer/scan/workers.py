"""Reading and parsing layouts in worker processes, so that a scan uses every core.

A :class:`Pool` is a ``ProcessPoolExecutor`` of ``[daemon] workers`` processes (0: one per core this
process may run on). Each task is a batch of layout paths; a worker reads every ``index.json`` and
its nested index blobs, checks hashes, parses, takes the row keys and encodes the JSON columns, and
returns plain tuples (:data:`Result`), so what crosses the process boundary is about the size of the
rows themselves. The parent decides from them what to write (``scanner.decide``) against the stored
state it holds, so the compare-and-set stays where the one writer is.

Workers die with the process that started them: each sets ``PR_SET_PDEATHSIG`` (SIGKILL) and exits
at once when its parent is already gone, so a daemon killed with SIGKILL leaves no worker behind. A
worker that dies (a crash, the OOM killer) breaks the pool: :meth:`Pool.read` then reads the batch's
layouts again one at a time in a fresh pool, and a layout whose read kills its worker again is
reported failed (``layout_unreadable``) while the others are indexed (docs/design.md).
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import time
from typing import cast

from indexer import layout as layout_mod
from indexer.errors import LayoutError, LayoutUnreadable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

    from indexer.graph import Known
    from indexer.layout import Limits
    from indexer.store.write import LayoutRows

    # (path, read_ns, kind, detail): kind READ with LayoutRows; FAILED with (category, message,
    # identity tuple or None); GONE (no longer a layout) with None.
    Result = tuple[str, int, int, object]

READ, FAILED, GONE = 0, 1, 2
# A layout directory (oci-layout is there) whose index.json is not: a writer making it (skopeo writes
# oci-layout and the blobs first), or one that left it half-written.
INCOMPLETE = "no index.json yet"
PR_SET_PDEATHSIG = 1


def read_one(path: str, familiar: str, limits: Limits, known: Known | None = None) -> Result:
    """Read and parse one layout and its content graph into a compact :data:`Result` (in a worker, or
    in-process); *known* holds the shared rows already sent in this pass (:class:`indexer.graph.Known`)."""
    from indexer.graph import read_layout_graph
    from indexer.store.write import snapshot_rows

    read_ns = time.time_ns()
    try:
        st = os.stat(os.path.join(path, "index.json"))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the layout was replaced by a file
        if not layout_mod.is_layout_dir(path):
            return (path, read_ns, GONE, None)
        return (path, read_ns, FAILED, ("layout_unreadable", f"{path}: {INCOMPLETE}", None))
    except OSError as exc:
        return (path, read_ns, FAILED, ("layout_unreadable", f"{path}/index.json: {exc.strerror}", None))
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    try:
        snapshot = layout_mod.read_layout(path, familiar=familiar, limits=limits)
        graph = read_layout_graph(path, snapshot, limits, known)
    except LayoutError as exc:
        return (path, read_ns, FAILED, (exc.category, exc.message, ident))
    except OSError as exc:  # listing blobs/ failed for a reason outside the layout's bytes
        message = f"{path}/blobs cannot be listed: {exc.strerror or exc}"
        return (path, read_ns, FAILED, ("layout_unreadable", message, ident))
    except Exception as exc:
        return (path, read_ns, FAILED, ("layout_unreadable", f"{path}: unexpected {type(exc).__name__}: {exc}", ident))
    rows: LayoutRows = snapshot_rows(snapshot, graph, known)
    return (path, read_ns, READ, rows)


def read_batch(paths: list[str], familiar: str, limits: Limits, known: Known | None = None) -> list[Result]:
    """Read a batch of layouts (in this process); every shared row is sent once in the batch, unless
    *known* says it was sent before."""
    from indexer.graph import Known

    if known is None:
        known = Known()
    return [read_one(path, familiar, limits, known) for path in paths]


# The shared rows this worker process sent in its pass (a worker lives for one pass): sent once, then
# claimed (store.write.graph_rows). Only read_packed, in worker processes, uses it.
_known_in_pass: Known | None = None


def read_packed(paths: list[str], familiar: str, limits: Limits) -> bytes:
    """Read a batch of layouts in a worker: the results as one ``marshal`` blob (:func:`unpack`).

    The results are plain tuples, lists, strings and numbers from our own worker, which ``marshal``
    writes and reads back about 3x faster than ``pickle`` (measured: 35 ms against 109 ms to load
    the rows of 1,000 layouts); the parent's loading is the serial part of the pipeline.
    """
    global _known_in_pass
    if _known_in_pass is None:
        from indexer.graph import Known

        _known_in_pass = Known()
    blob = marshal.dumps(read_batch(paths, familiar, limits, _known_in_pass))
    gc.collect(1)  # the young generations only: see _die_with_parent
    return blob


def unpack(blob: bytes) -> list[Result]:
    """The results of :func:`read_packed`."""
    results: list[Result] = marshal.loads(blob)
    return results


def failed_error(detail: object) -> tuple[LayoutError, tuple[int, int, int, int, int] | None]:
    """The error and identity of a FAILED :data:`Result`'s detail."""
    category, message, ident = cast("tuple[str, str, tuple[int, int, int, int, int] | None]", detail)
    return LayoutError(message, category=category), ident


def _die_with_parent(parent: int) -> None:
    """Worker initializer: be killed when the process that started the pool dies, however it dies."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl (not Linux): the pipe to the parent still ends the worker once idle
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)
    # A Ctrl-C in a terminal reaches the whole process group: the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No automatic collections: parsing allocates millions of short-lived dicts and lists, and the
    # collector's passes over them (and over the caches a worker builds) were 8% of its CPU time.
    # What the parse leaves is freed by reference counting; read_packed collects the young
    # generations after each task, so a cycle made on an error path lives one task at most, and a
    # worker lives for one pass.
    gc.disable()


class Pool:
    """Worker processes that read batches of layouts (started on first use, restarted after a crash)."""

    def __init__(self, workers: int, familiar: str, limits: Limits) -> None:
        self.workers = workers
        self.familiar = familiar
        self.limits = limits
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent has threads (the writer's, the event loop's workers) whose locks a
            # forked child would inherit held; a spawned worker starts clean and is a direct child.
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
        return self._executor

    def submit(self, paths: list[str]) -> Future[bytes]:
        """Start reading *paths* in a worker (its results: :func:`unpack`); a pool that a dead worker
        broke gives a future that fails with BrokenProcessPool, as the tasks already in it do."""
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._pool().submit(read_packed, paths, self.familiar, self.limits)
        except BrokenProcessPool as exc:
            failed: Future[bytes] = Future()
            failed.set_exception(exc)
            return failed

    def warm(self) -> None:
        """Start every worker now (an empty task each), so that their start-up overlaps other work."""
        for _ in range(self.workers):
            self.submit([]).add_done_callback(_ignore)

    def broken(self) -> None:
        """Forget a pool a dead worker broke (its other workers are stopped)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes' ids (for status and tests)."""
        executor = self._executor
        processes = getattr(executor, "_processes", None) or {}
        return sorted(processes)


def _ignore(future: Future[bytes]) -> None:
    """A warm-up task's outcome: a worker that could not start is met again by the first real batch."""
    future.exception()


def worker_died(path: str, read_ns: int, how: str) -> Result:
    """The result for a layout whose read killed its worker process again when read alone.

    The identity of ``index.json`` is stored with the error, so the layout is not read again (and
    does not kill another worker) until it changes.
    """
    message = f"{path}: the worker process reading it died ({how}); it is read again when it changes"
    try:
        st = os.stat(os.path.join(path, "index.json"))
        ident: tuple[int, int, int, int, int] | None = (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
    except OSError:
        ident = None
    return (path, read_ns, FAILED, (LayoutUnreadable.category, message, ident))
