"""Reading and parsing layouts in worker processes, so that a scan uses every core.

A :class:`~indexer.scan.pool.Pool` runs ``[daemon] workers`` processes (0: one per core this process
may run on), each with a pipe of its own. Each task is a batch of layout paths; a worker reads every ``index.json`` and
its nested index blobs, checks hashes, parses, takes the row keys and encodes the JSON columns, and
returns plain tuples (:data:`Result`), so what crosses the process boundary is about the size of the
rows themselves. The parent decides from them what to write (``decide.decide``) against the stored
state it holds, so the compare-and-set stays where the one writer is.

Workers die with the process that started them: each sets ``PR_SET_PDEATHSIG`` (SIGKILL) and exits
at once when its parent is already gone, so a daemon killed with SIGKILL leaves no worker behind. A
worker that dies (a crash, the OOM killer) fails only the task it was reading (``pool.WorkerDied``);
the scanner reads that task's layouts again one at a time (docs/design.md).
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import time
from typing import cast

from indexer import layout as layout_mod
from indexer.errors import LayoutError, LayoutUnreadable, layout_failure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from indexer.graph import Known
    from indexer.layout import Limits
    from indexer.store.rows import LayoutRows

    # (path, read_ns, kind, detail): kind READ with LayoutRows; FAILED with (category, message,
    # identity tuple or None, how: SETTLED, TRANSIENT or PASSING); GONE (no longer a layout) with None.
    Result = tuple[str, int, int, object]

READ, FAILED, GONE = 0, 1, 2
# A layout directory (oci-layout is there) whose index.json is not: a writer making it (skopeo writes
# oci-layout and the blobs first), or one that left it half-written.
INCOMPLETE = "no index.json yet"
# How a FAILED read failed: its bytes (settled by its identity), the environment (read again by the
# next pass), or the environment for a moment (read again by this pass too: LayoutError.retry_soon).
SETTLED, TRANSIENT, PASSING = 0, 1, 2


def _how(error: LayoutError) -> int:
    return PASSING if error.transient and error.retry_soon else TRANSIENT if error.transient else SETTLED


PR_SET_PDEATHSIG = 1


def read_one(path: str, familiar: str, limits: Limits, known: Known | None = None) -> Result:
    """Read and parse one layout and its content graph into a compact :data:`Result` (in a worker, or
    in-process); *known* holds the shared rows already sent in this pass (:class:`indexer.graph.Known`).

    A failure of the layout's own files (invalid JSON, a bad digest, a FIFO) carries the identity of
    ``index.json``, so that it is not read again until it changes; a failure of the environment
    (``LayoutError.transient``: descriptors, memory, I/O, a permission) carries none, so that every
    pass reads it again (docs/reliability.md).
    """
    from indexer.graph import read_layout_graph
    from indexer.store.rows import snapshot_rows

    read_ns = time.time_ns()
    try:
        st = os.stat(os.path.join(path, "index.json"))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the layout was replaced by a file
        if not layout_mod.is_layout_dir(path):
            return (path, read_ns, GONE, None)
        return (path, read_ns, FAILED, ("layout_unreadable", f"{path}: {INCOMPLETE}", None, SETTLED))
    except OSError as exc:
        error = layout_failure(LayoutUnreadable, f"{path}/index.json: {exc.strerror}", exc)
        return (path, read_ns, FAILED, (error.category, error.message, None, _how(error)))
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    try:
        snapshot = layout_mod.read_layout(path, familiar=familiar, limits=limits)
        graph = read_layout_graph(path, snapshot, limits, known)
    except LayoutError as exc:
        return (path, read_ns, FAILED, (exc.category, exc.message, None if exc.transient else ident, _how(exc)))
    except OSError as exc:  # outside the reads of index.json and blobs (listing blobs/, a module imported lazily)
        error = layout_failure(LayoutUnreadable, f"{path}: {exc.strerror or exc}", exc)
        return (path, read_ns, FAILED, (error.category, error.message, None, max(_how(error), TRANSIENT)))
    except Exception as exc:  # MemoryError, or a bug met on these bytes: not known to be the layout's fault
        memory = isinstance(exc, MemoryError)
        category = "out_of_memory" if memory else "layout_unreadable"
        message = f"{path}: unexpected {type(exc).__name__}: {exc}"
        return (path, read_ns, FAILED, (category, message, None, PASSING if memory else TRANSIENT))
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
# claimed (store.rows.graph_rows). Only read_packed, in worker processes, uses it.
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
    """The error and identity of a FAILED :data:`Result`'s detail (no identity for a transient one)."""
    category, message, ident, how = cast("tuple[str, str, tuple[int, int, int, int, int] | None, int]", detail)
    return LayoutError(message, category=category, transient=how != SETTLED, retry_soon=how == PASSING), ident


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


def _serve(conn: Connection, parent: int) -> None:
    """A worker's whole life: read the tasks sent on *conn* until told to stop (None) or orphaned."""
    _die_with_parent(parent)
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return  # the parent closed its end
            if task is None:
                return
            paths, familiar, limits = task
            conn.send_bytes(read_packed(paths, familiar, limits))
    except Exception:
        os._exit(1)  # the parent reports the task failed (WorkerDied); no traceback on its stderr


def worker_died(path: str, read_ns: int, how: str) -> Result:
    """The result for a layout whose read killed its worker process again when read alone.

    A dead worker says nothing about the layout (the OOM killer picks the largest process, an admin
    kills what is in the way): it is a failure of the environment, stored without an identity, so
    the layout is read again by the next pass and, in the daemon, after a backoff (docs/reliability.md).
    """
    message = f"{path}: {how}; it is read again later"
    return (path, read_ns, FAILED, (LayoutUnreadable.category, message, None, PASSING))
