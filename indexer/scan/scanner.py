"""Batch scanning: discover layouts, skip the unchanged, read and parse in worker processes, write in batches.

One :class:`Scanner` owns the only write connection (:class:`indexer.store.writer.Writer`, an
aiosqlite connection). ``ocidx scan`` runs one :meth:`Scanner.full_pass`; the daemon runs the same
pass at start-up and on its reconcile timer, and :meth:`Scanner.process` for the layouts the watcher
reported. Layouts are read and parsed in batches by worker processes (:mod:`indexer.scan.workers`), which
return compact rows; while the writer writes batch k (one compare-and-set transaction), batches
k+1..k+n are being parsed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import time

from indexer import config as config_mod
from indexer import layout as layout_mod
from indexer.scan import workers
from indexer.scan.discovery import below_any, discover, load_cache, store_cache, vanished
from indexer.store import read as db
from indexer.store.deferred import defer_indexes, restore_indexes
from indexer.store.outcomes import Failed, Gone, Outcome, Read, Same
from indexer.store.shared_rows import graph_epoch
from indexer.store.write import apply

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncGenerator, Callable, Iterable
    from concurrent.futures import Future

    from indexer.config import Config, Root
    from indexer.scan.discovery import Listing
    from indexer.store.rows import LayoutRows
    from indexer.store.writer import Store

COLD_BUILD_MIN_LAYOUTS = 500
# How many changed (and removed) layouts a pass remembers by path, for the daemon's log.
LOGGED_PATHS = 10
# A layout another writer keeps rewriting is examined again at most this often in one batch; past
# that, the other writer's rows (at least as new as ours) stand until the next change or pass.
CONFLICT_RETRIES = 4
# A pass with fewer layouts to read than this reads them in this process (see Scanner._uses_pool).
POOL_MIN_LAYOUTS = 64
# A full pass reads its transient failures that usually pass (LayoutError.retry_soon) again after
# each of these delays (seconds), while they last.
RETRY_DELAYS_S = (0.05, 0.25, 1.0)
# Layouts per worker task: a batch (one write transaction) is read as tasks of at most this many.
# Smaller tasks keep each process's high-water memory low (measured at 10,000 layouts: 219 MB for
# the scan and its workers with tasks of 500, 152 MB with tasks of 100, in the same time).
TASK_LAYOUTS = 100


def examine(path: str, stored: db.StoredLayout | None, *, config: Config, full: bool = False) -> Outcome | None:
    """Look at one layout: None when its stored state is provably current, else what to write."""
    if not full and stored is not None and _is_current(path, stored):
        return None
    return decide(workers.read_one(path, config.familiar, config.limits), stored, full=full)


def _is_current(path: str, stored: db.StoredLayout) -> bool:
    """Whether one ``stat`` of the layout's ``index.json``, one of each directory of ``blobs/`` its
    graph was listed from, and one of each nested index blob its rows depend on besides, when any
    (``read.depends_hold``), prove its stored rows current."""
    try:
        st = os.stat(os.path.join(path, "index.json"))
    except OSError:
        return False  # gone, or unreadable: the read says which
    return (
        stored.is_current(layout_mod.FileIdentity.of(st))
        and stored.presence_current()
        and db.depends_hold(path, stored.depends)
    )


def decide(
    result: workers.Result, stored: db.StoredLayout | None, *, full: bool, epoch: int | None = None
) -> Outcome | None:
    """What to write for one read layout (a worker's :data:`workers.Result`), against *stored*;
    *epoch* is the graph epoch of the pass the read belongs to (``store.outcomes.Read``)."""
    path, read_ns, kind, detail = result
    if kind == workers.GONE:
        return Gone(path, stored) if stored is not None else None
    if kind == workers.FAILED:
        error, ident = workers.failed_error(detail)
        identity = layout_mod.FileIdentity(*ident) if ident is not None else None
        return Failed(path, error, identity, read_ns, stored)
    rows: LayoutRows = detail  # type: ignore[assignment]
    graph = rows[6]
    if (
        not full
        and stored is not None
        and stored.state == "ok"
        and stored.content_hash == rows[1]
        and graph is not None
        and stored.graph_hash == graph[2]
        and db.same_rows_depend(stored.depends, rows[7])
    ):
        return Same(path, layout_mod.FileIdentity(*rows[0]), read_ns, stored, graph[0], rows[8], rows[7])
    return Read(path, rows, read_ns, stored, epoch)


def examine_batch(
    paths: Iterable[str], stored: dict[str, db.StoredLayout], *, config: Config, full: bool
) -> list[Outcome]:
    """Examine a batch of layouts in this process."""
    out = []
    for path in paths:
        outcome = examine(path, stored.get(path), config=config, full=full)
        if outcome is not None:
            out.append(outcome)
    return out


class Counts:
    """What one pass did."""

    def __init__(self) -> None:
        self.seen = 0
        self.changed = 0
        self.unchanged = 0
        self.errors = 0
        self.removed = 0
        self.still_broken = 0  # unchanged since a scan found them broken: skipped, still in error
        self.error_messages: list[str] = []
        # The first few layouts written or dropped, for the daemon's log (the counts say how many).
        self.changed_paths: list[str] = []
        self.removed_paths: list[str] = []
        # Layouts whose read failed for a reason outside their bytes (LayoutError.transient): stored with
        # no identity, read again (by this pass after a backoff, then by the next pass).
        self.transient: dict[str, Failed] = {}
        # Directories a full pass could not list (path: errno); the layouts below them were kept.
        self.unlisted: dict[str, int] = {}

    def add(self, outcomes: list[Outcome], looked_at: int, still_broken: int = 0) -> None:
        """Account for one written batch."""
        self.seen += looked_at
        self.still_broken += still_broken
        written = 0
        for outcome in outcomes:
            if isinstance(outcome, Read):
                self.changed += 1
                if len(self.changed_paths) < LOGGED_PATHS:
                    self.changed_paths.append(outcome.path)
            elif isinstance(outcome, Failed):
                self.errors += 1
                self.error_messages.append(outcome.error.message)
                if outcome.error.transient:
                    self.transient[outcome.path] = outcome
            elif isinstance(outcome, Gone):
                self.removed += 1
                if len(self.removed_paths) < LOGGED_PATHS:
                    self.removed_paths.append(outcome.path)
            if not isinstance(outcome, Same):
                written += 1
        self.unchanged += max(0, looked_at - written)

    def merge(self, other: Counts) -> None:
        """Add what *other* (another pass's counts) did to these."""
        self.seen += other.seen
        self.changed += other.changed
        self.unchanged += other.unchanged
        self.errors += other.errors
        self.removed += other.removed
        self.still_broken += other.still_broken
        self.error_messages.extend(other.error_messages)
        self.transient.update(other.transient)
        self.unlisted.update(other.unlisted)
        self.changed_paths.extend(other.changed_paths[: max(0, LOGGED_PATHS - len(self.changed_paths))])
        self.removed_paths.extend(other.removed_paths[: max(0, LOGGED_PATHS - len(self.removed_paths))])

    def retried(self, again: Counts, paths: list[str]) -> None:
        """Replace what this pass counted for the transient failures at *paths* by *again*, the pass
        that read them again: they count once, as what that read found."""
        for path in paths:
            failed = self.transient.pop(path)
            self.errors -= 1
            if failed.error.message in self.error_messages:
                self.error_messages.remove(failed.error.message)
        self.transient.update(again.transient)
        self.changed += again.changed
        self.unchanged += again.unchanged
        self.errors += again.errors
        self.removed += again.removed
        self.error_messages.extend(again.error_messages)
        self.changed_paths.extend(again.changed_paths[: max(0, LOGGED_PATHS - len(self.changed_paths))])
        self.removed_paths.extend(again.removed_paths[: max(0, LOGGED_PATHS - len(self.removed_paths))])

    def to_json(self, seconds: float) -> dict[str, object]:
        """The summary ``ocidx scan --json`` prints."""
        return {
            "layouts": self.seen,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "errors": self.errors,
            "removed": self.removed,
            "still_broken": self.still_broken,
            "read_again": len(self.transient),
            "unlisted": len(self.unlisted),
            "seconds": round(seconds, 3),
            "error_messages": self.error_messages[:50],
        }


class Scanner:
    """The scanning passes that feed the store's one writer (:class:`indexer.store.writer.Store`).

    What a pass decides to write is decided off the writer's thread: ``stat`` calls, reads and
    parses run in a worker thread or in worker processes, and each batch's outcomes are then one
    unit of the writer (:func:`indexer.store.write.apply`, compare-and-set).
    """

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.problems: list[str] = []  # said once per pass, in its error messages
        self.pool: workers.Pool | None = None
        # Set while a pass reads with the pool: the daemon indexes changes beside a reconcile pass, and
        # a second pass using the pool at the same time would stop its workers under the first at its end.
        self.pool_busy = False
        self.config = config

    @property
    def config(self) -> Config:
        """The configuration passes run with; setting it (the daemon's SIGHUP) applies to the next pass."""
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        if not self.pool_busy:
            self._fit_pool()
        # else a pass is reading with the pool (the daemon's duties run side by side): it is fitted
        # to the new configuration once that pass lets it go.

    def _fit_pool(self) -> None:
        """Make the pool what the configuration asks for (its size, and what its workers read with)."""
        config = self._config
        count = config.daemon.workers or config_mod.default_workers()
        pool = self.pool
        if pool is not None and pool.workers == count:
            pool.familiar, pool.limits = config.familiar, config.limits  # read by the next task submitted
            return
        if pool is not None:
            pool.close()  # no pass is reading with it
        self.pool = workers.Pool(count, config.familiar, config.limits) if count > 1 else None

    def close(self) -> None:
        """Stop the workers (the store is its owner's to close)."""
        if self.pool is not None:
            self.pool.close()

    async def aclose(self) -> None:
        """:meth:`close` from the event loop (the workers are waited for in a thread)."""
        import anyio.to_thread

        with anyio.CancelScope(shield=True):
            if self.pool is not None:
                await anyio.to_thread.run_sync(self.pool.close)

    async def _write(self, outcomes: list[Outcome], stored: dict[str, db.StoredLayout], full: bool) -> list[Outcome]:
        """Write *outcomes* as one unit of the writer; a layout whose stored row moved on meanwhile
        (another writer wrote it: compare-and-set) is examined again against its row as it is now and
        written in a unit of its own, up to CONFLICT_RETRIES times (rare)."""
        import anyio.to_thread

        written: list[Outcome] = []
        familiar, limits = self.config.familiar, self.config.limits
        for _attempt in range(CONFLICT_RETRIES):
            if not outcomes:
                break
            applied = await self.store.unit(apply, outcomes)
            written.extend(applied.written)
            if not applied.conflicts:
                break
            conflicts = applied.conflicts
            now = await self.store.read(_stored_rows, conflicts)
            for path in conflicts:
                stored.pop(path, None)
                if path in now:
                    stored[path] = now[path]

            def examine_again(paths: list[str] = conflicts) -> list[workers.Result]:
                again = paths if full else _unsettled(paths, stored)
                return workers.read_batch(again, familiar, limits)

            results = await anyio.to_thread.run_sync(examine_again)
            outcomes = [o for r in results if (o := decide(r, stored.get(r[0]), full=full)) is not None]
        return written

    async def _stored(self, paths: list[str] | None = None) -> dict[str, db.StoredLayout]:
        return await self.store.read(_stored_rows, paths)

    def _uses_pool(self, count: int) -> bool:
        """Worker processes for a pass with enough to read; a handful of changes (the daemon's common
        case) is read in this process: a round trip to a worker would only add to its latency. A pass
        running beside another that holds the pool reads in this process too."""
        return self.pool is not None and not self.pool_busy and count >= POOL_MIN_LAYOUTS

    async def process(
        self,
        paths: list[str],
        *,
        full: bool = False,
        stored: dict[str, db.StoredLayout] | None = None,
        progress: Callable[[int, int], None] | None = None,
        extra: list[Outcome] | None = None,
    ) -> Counts:
        """Examine *paths* and write what changed, one unit of the writer per batch.

        Layouts whose ``index.json`` one ``stat`` proves unchanged are skipped here; the others are
        read in batches by the worker processes while the writer writes the batches already read
        (or, for a few layouts or ``workers = 1``, read in a worker thread of this process).
        """
        import contextlib

        import anyio.to_thread

        if stored is None:
            stored = await self._stored(paths)
        counts = Counts()
        size = max(1, self.config.daemon.batch_size)
        familiar, limits = self.config.familiar, self.config.limits
        if not self._uses_pool(len(paths)):
            # A few layouts (the daemon's changes), or no workers: each batch is read in a worker
            # thread, then written as one unit.
            done = 0
            for start in range(0, len(paths), size):
                batch = paths[start : start + size]

                def examine(batch: list[str] = batch) -> tuple[list[workers.Result], int]:
                    unread = batch if full else _unsettled(batch, stored)
                    return workers.read_batch(unread, familiar, limits), len(unread)

                results, read = await anyio.to_thread.run_sync(examine)
                outcomes = [o for r in results if (o := decide(r, stored.get(r[0]), full=full)) is not None]
                written = await self._write(outcomes, stored, full)
                counts.add(written, read)
                _count_skipped(counts, batch, stored, written, read)
                done += len(batch)
                if progress is not None:
                    progress(done, len(paths))
            return await self._finish(counts, stored, extra)
        if full:
            unread: list[str] = list(paths)
        else:
            unread = await anyio.to_thread.run_sync(_unsettled, paths, stored)
        skipped = len(paths) - len(unread)
        if skipped:
            unread_set = set(unread)
            counts.seen += skipped
            counts.unchanged += skipped
            counts.still_broken += sum(
                1
                for path in paths
                if path not in unread_set and (known := stored.get(path)) is not None and known.state == "error"
            )
        batches = [unread[i : i + size] for i in range(0, len(unread), size)]
        # The graph epoch now: the workers of this pass send each shared row once and claim it after,
        # which holds while no shared row is removed (store.shared_rows._unfounded_claims).
        epoch = await self.store.read(graph_epoch)
        done = skipped
        if progress is not None and skipped:
            progress(done, len(paths))
        pooled = self._uses_pool(len(unread))
        self.pool_busy |= pooled
        # A big pass loads hundreds of thousands of rows (from the workers, or parsed here): the
        # cyclic collector's passes over them were 15% of this process's CPU in a cold build, for
        # no cycle (rows are plain tuples). Paused for the pass; what it leaves is collected after.
        paused = len(unread) >= POOL_MIN_LAYOUTS and gc.isenabled()
        if paused:
            gc.disable()
        try:
            async with contextlib.aclosing(self._read(batches, pooled)) as reads:
                async for batch, results in reads:
                    outcomes = [
                        o for r in results if (o := decide(r, stored.get(r[0]), full=full, epoch=epoch)) is not None
                    ]
                    written = await self._write(outcomes, stored, full)
                    counts.add(written, len(batch))
                    done += len(batch)
                    if progress is not None:
                        progress(done, len(paths))
        finally:
            if paused:
                gc.enable()
            if pooled and self.pool is not None:
                # Idle workers would hold their memory (about 50 MB each) until the next big pass,
                # which may be hours away in the daemon; starting them again costs about 0.1 s.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.pool.close)
                self.pool_busy = False
                self._fit_pool()  # a configuration reloaded during the pass
        return await self._finish(counts, stored, extra)

    async def _finish(self, counts: Counts, stored: dict[str, db.StoredLayout], extra: list[Outcome] | None) -> Counts:
        """Write the outcomes decided outside the batches (removals) and the pass's own problems."""
        if extra:
            applied = await self.store.unit(apply, list(extra))  # a conflicting removal is left to the next pass
            counts.add(applied.written, 0, 0)
        counts.error_messages[:0] = self.problems
        self.problems = []
        return counts

    async def _read(
        self, batches: list[list[str]], pooled: bool
    ) -> AsyncGenerator[tuple[list[str], list[workers.Result]], None]:
        """Each batch with its read results, in order; with the pool (*pooled*), the next batches are
        being read (in tasks of TASK_LAYOUTS) while the caller writes the one before them.

        A task whose worker died (a crash, the OOM killer) is read again one layout at a time
        (:meth:`_read_alone`); when no worker can be started at all, the rest of the pass is read in
        this process.
        """
        import collections

        import anyio.to_thread

        familiar, limits = self.config.familiar, self.config.limits
        pool = self.pool
        queue: collections.deque[tuple[list[str], list[tuple[list[str], asyncio.Future[bytes]]]]] = collections.deque()
        upcoming = iter(batches)
        try:
            while True:
                # Keep two batches (and at least two tasks per worker) in flight: while the writer
                # writes one, the workers read the next.
                while (
                    pool is not None
                    and pooled
                    and (len(queue) < 2 or sum(len(f) for _, f in queue) < 2 * pool.workers)
                    and (following := next(upcoming, None)) is not None
                ):
                    tasks = [following[i : i + TASK_LAYOUTS] for i in range(0, len(following), TASK_LAYOUTS)]
                    queue.append((following, [(task, _wrap(pool.submit(task))) for task in tasks]))
                if not queue:
                    following = next(upcoming, None)
                    if following is None:
                        return
                    yield following, await anyio.to_thread.run_sync(workers.read_batch, following, familiar, limits)
                    continue
                batch, futures = queue.popleft()
                results: list[workers.Result] = []
                for task, future in futures:
                    try:
                        results.extend(workers.unpack(await future))
                    except workers.WorkerDied:
                        results.extend(await self._read_alone(task))
                    except workers.WorkersUnavailable as exc:
                        if pooled:  # said once; the rest of the pass is read here
                            self.problems.append(
                                f"worker processes could not be started ({exc}): reading layouts in this process"
                            )
                            pooled = False
                        results.extend(await anyio.to_thread.run_sync(workers.read_batch, task, familiar, limits))
                yield batch, results
        finally:
            for _batch, futures in queue:
                for _task, future in futures:
                    future.add_done_callback(_retrieved)
                    future.cancel()

    async def _read_alone(self, task: list[str]) -> list[workers.Result]:
        """Read each layout of a task whose worker died by itself in the pool: one whose read kills
        its worker again is a failure of the environment (``workers.worker_died``), read again later."""
        import anyio.to_thread

        pool = self.pool
        assert pool is not None
        out: list[workers.Result] = []
        for path in task:
            read_ns = time.time_ns()
            try:
                out.extend(workers.unpack(await _wrap(pool.submit([path]))))
            except workers.WorkerDied as exc:
                out.append(workers.worker_died(path, read_ns, str(exc)))
            except workers.WorkersUnavailable:
                out.extend(
                    await anyio.to_thread.run_sync(workers.read_batch, [path], self.config.familiar, self.config.limits)
                )
        return out

    async def discover(self, roots: Iterable[Root]) -> tuple[list[str], list[str], list[str], dict[str, int]]:
        """Every layout below *roots*, the problems met on the way, the roots resolved, and the
        directories that could not be listed (with the errno): nothing below them is known.

        The walk lists only the directories the directory cache does not hold as they are, and
        records what it listed (discovery.discover, migrations/0005).
        """
        import anyio.to_thread

        roots = list(roots)
        cache = await self.store.read(load_cache)
        listed: dict[str, Listing] = {}
        visited: set[str] = set()
        failed: dict[str, int] = {}

        def walk() -> tuple[list[str], list[str], list[str]]:
            errors: list[str] = []
            found: dict[str, None] = {}
            for root in roots:
                for path in discover(root, errors, cache, listed, visited, failed):
                    found[path] = None
            return list(found), errors, [os.path.realpath(r.path) for r in roots]

        paths, errors, resolved = await anyio.to_thread.run_sync(walk)
        await self.store.unit(store_cache, listed, visited, resolved, cache.keys())
        return paths, errors, resolved, failed

    async def full_pass(
        self,
        roots: Iterable[Root],
        *,
        full: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Counts:
        """Discover, examine every layout, and drop those that vanished from below the roots."""
        import anyio
        import anyio.to_thread

        roots = list(roots)
        stored = await self._stored()
        if not stored and self.pool is not None:
            self.pool.warm()  # a cold build reads everything: the workers start while discovery runs
        paths, problems, resolved, failed = await self.discover(roots)
        gone: list[Outcome] = [
            Gone(path, stored[path])
            for path in await anyio.to_thread.run_sync(
                lambda: vanished(
                    list(stored), set(paths), resolved, follow=any(r.follow_symlinks for r in roots), failed=failed
                )
            )
        ]
        if failed:
            # Only a listing that succeeded may remove a layout: those stored below a directory that
            # could not be listed are kept, and looked at one by one (their own index.json may be
            # readable); the next pass lists the directory again.
            found = set(paths)
            kept = [path for path in stored if path not in found and below_any(path, failed)]
            paths = [*paths, *kept]
            if kept:
                problems.append(
                    f"{len(kept)} indexed layout{'s' if len(kept) != 1 else ''} below "
                    f"{'a directory' if len(failed) == 1 else f'{len(failed)} directories'} that could not be "
                    "listed kept and looked at again"
                )
        # A cold build (an empty index, many layouts) inserts without the lookup indexes and builds
        # them once at the end: 3x cheaper than keeping them up to date row by row.
        cold = not stored and len(paths) >= COLD_BUILD_MIN_LAYOUTS
        if cold:
            await self.store.unit(defer_indexes)
        try:
            counts = await self.process(paths, full=full, stored=stored, progress=progress, extra=gone)
        except BaseException:
            if cold:
                # The indexes back before the error goes on (shielded, as everything queued to the
                # writer); a database too damaged for that must not hide the error itself.
                with contextlib.suppress(sqlite3.Error):
                    await self.store.run(restore_indexes)
            raise
        if cold:
            await self.store.run(restore_indexes)
        # A read that failed for a reason outside the layout's bytes that usually passes (descriptors
        # or memory used up for a moment, a worker killed, a writer mid-rewrite) is tried again after
        # a backoff before the pass ends; what still fails, and what does not pass by waiting (a
        # permission), is stored with no identity, so the next pass (and the daemon, on its own
        # schedule) reads it again.
        for delay in RETRY_DELAYS_S:
            again = sorted(path for path, failed in counts.transient.items() if failed.error.retry_soon)
            if not again:
                break
            await anyio.sleep(delay)
            counts.retried(await self.process(again, full=full), again)
        counts.error_messages[:0] = problems
        counts.unlisted = failed
        return counts


def _retrieved(future: asyncio.Future[bytes]) -> None:
    """Mark the outcome of a read no longer waited for as seen (its batch is read again, or the pass ended)."""
    if not future.cancelled():
        future.exception()


def _wrap(future: Future[bytes]) -> asyncio.Future[bytes]:
    """A worker's task as an asyncio future (the pool's manager thread sets it; the loop never blocks)."""
    import asyncio

    return asyncio.wrap_future(future)


def _stored_rows(conn: sqlite3.Connection, paths: list[str] | None = None) -> dict[str, db.StoredLayout]:
    """The stored rows of *paths* (all layouts when None), by path."""
    if paths is None:
        return {s.path: s for s in db.layouts(conn)}
    out = {}
    for path in paths:
        found = db.layout(conn, path)
        if found is not None:
            out[path] = found
    return out


def _count_skipped(
    counts: Counts, batch: list[str], stored: dict[str, db.StoredLayout], written: list[Outcome], read: int
) -> None:
    """Account for the layouts of *batch* that were skipped unread (proven unchanged)."""
    skipped = len(batch) - read
    if not skipped:
        return
    counts.seen += skipped
    counts.unchanged += skipped
    examined = {outcome.path for outcome in written}
    # A skipped layout last found broken is still broken (the full pass counts it apart).
    counts.still_broken += sum(
        1
        for path in batch
        if path not in examined and (known := stored.get(path)) is not None and known.state == "error"
    )


def _unsettled(paths: list[str], stored: dict[str, db.StoredLayout]) -> list[str]:
    """The layouts of *paths* that one ``stat`` does not prove unchanged: those to read (all of those
    read on a mount that is no longer there, whatever their ``stat`` says: ``read.remounted``)."""
    mounts = {
        path: (known.identity.dev, known.mnt_id)
        for path in paths
        if (known := stored.get(path)) is not None and known.identity is not None
    }
    gone = db.remounted(db.mount_members(mounts, 0, 1))
    return [
        path
        for path in paths
        if (known := stored.get(path)) is None
        or not _is_current(path, known)
        or (gone and known.identity is not None and (known.identity.dev, known.mnt_id) in gone)
    ]
