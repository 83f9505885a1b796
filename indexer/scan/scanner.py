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
import sqlite3

from indexer.scan import workers
from indexer.scan.counts import Counts, _count_skipped
from indexer.scan.decide import _unsettled, decide
from indexer.scan.discovery import below_any, discover_through, vanished
from indexer.scan.reading import POOL_MIN_LAYOUTS, Readers
from indexer.store import read as db
from indexer.store.deferred import defer_indexes, restore_indexes
from indexer.store.outcomes import Gone
from indexer.store.shared_rows import graph_epoch
from indexer.store.write import apply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from indexer.config import Config, Root
    from indexer.store.outcomes import Outcome
    from indexer.store.writer import Store

COLD_BUILD_MIN_LAYOUTS = 500
# A layout another writer keeps rewriting is examined again at most this often in one batch; past
# that, the other writer's rows (at least as new as ours) stand until the next change or pass.
CONFLICT_RETRIES = 4
# A full pass reads its transient failures that usually pass (LayoutError.retry_soon) again after
# each of these delays (seconds), while they last.
RETRY_DELAYS_S = (0.05, 0.25, 1.0)


class Scanner:
    """The scanning passes that feed the store's one writer (:class:`indexer.store.writer.Store`).

    What a pass decides to write is decided off the writer's thread: ``stat`` calls, reads and
    parses run in a worker thread or in worker processes, and each batch's outcomes are then one
    unit of the writer (:func:`indexer.store.write.apply`, compare-and-set).
    """

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.readers = Readers(config)  # the worker pool, fitted to the configuration

    @property
    def config(self) -> Config:
        """The configuration passes run with; setting it (the daemon's SIGHUP) applies to the next pass."""
        return self.readers.config

    @config.setter
    def config(self, config: Config) -> None:
        self.readers.config = config

    def close(self) -> None:
        """Stop the workers (the store is its owner's to close)."""
        self.readers.close()

    async def aclose(self) -> None:
        """:meth:`close` from the event loop (the workers are waited for in a thread)."""
        await self.readers.aclose()

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
        if not self.readers.uses_pool(len(paths)):
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
        pooled = self.readers.uses_pool(len(unread))
        self.readers.pool_busy |= pooled
        # A big pass loads hundreds of thousands of rows (from the workers, or parsed here): the
        # cyclic collector's passes over them were 15% of this process's CPU in a cold build, for
        # no cycle (rows are plain tuples). Paused for the pass; what it leaves is collected after.
        paused = len(unread) >= POOL_MIN_LAYOUTS and gc.isenabled()
        if paused:
            gc.disable()
        try:
            async with contextlib.aclosing(self.readers.read(batches, pooled)) as reads:
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
            if pooled:
                await self.readers.release()
        return await self._finish(counts, stored, extra)

    async def _finish(self, counts: Counts, stored: dict[str, db.StoredLayout], extra: list[Outcome] | None) -> Counts:
        """Write the outcomes decided outside the batches (removals) and the pass's own problems."""
        if extra:
            applied = await self.store.unit(apply, list(extra))  # a conflicting removal is left to the next pass
            counts.add(applied.written, 0, 0)
        counts.error_messages[:0] = self.readers.problems
        self.readers.problems = []
        return counts

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
        if not stored and self.readers.pool is not None:
            self.readers.pool.warm()  # a cold build reads everything: the workers start while discovery runs
        paths, problems, resolved, failed = await discover_through(self.store, roots)
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
