"""How a pass reads layouts: in a worker thread of this process, or by the worker processes of the
pool the configuration asks for (:mod:`indexer.scan.workers`), the next batches being read while the
writer writes the one before them."""

from __future__ import annotations

import time

from indexer import config as config_mod
from indexer.scan import pool as pool_mod
from indexer.scan import workers

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncGenerator
    from concurrent.futures import Future

    from indexer.config import Config

# A pass with fewer layouts to read than this reads them in this process (see Readers.uses_pool).
POOL_MIN_LAYOUTS = 64
# Layouts per worker task: a batch (one write transaction) is read as tasks of at most this many.
# Smaller tasks keep each process's high-water memory low (measured at 10,000 layouts: 219 MB for
# the scan and its workers with tasks of 500, 152 MB with tasks of 100, in the same time).
TASK_LAYOUTS = 100


class Readers:
    """The worker pool of the passes, fitted to the configuration, and the batches read with it or in
    this process."""

    def __init__(self, config: Config) -> None:
        self.problems: list[str] = []  # said once per pass, in its error messages
        self.pool: pool_mod.Pool | None = None
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
        # to the new configuration once that pass lets it go (:meth:`release`).

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
        self.pool = pool_mod.Pool(count, config.familiar, config.limits) if count > 1 else None

    def close(self) -> None:
        """Stop the workers."""
        if self.pool is not None:
            self.pool.close()

    async def aclose(self) -> None:
        """:meth:`close` from the event loop (the workers are waited for in a thread)."""
        import anyio.to_thread

        with anyio.CancelScope(shield=True):
            if self.pool is not None:
                await anyio.to_thread.run_sync(self.pool.close)

    def uses_pool(self, count: int) -> bool:
        """Worker processes for a pass with enough to read; a handful of changes (the daemon's common
        case) is read in this process: a round trip to a worker would only add to its latency. A pass
        running beside another that holds the pool reads in this process too."""
        return self.pool is not None and not self.pool_busy and count >= POOL_MIN_LAYOUTS

    async def release(self) -> None:
        """Stop the workers a pass read with (its end), and fit the pool to a configuration reloaded meanwhile."""
        import anyio.to_thread

        if self.pool is not None:
            # Idle workers would hold their memory (about 50 MB each) until the next big pass,
            # which may be hours away in the daemon; starting them again costs about 0.1 s.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.pool.close)
            self.pool_busy = False
            self._fit_pool()  # a configuration reloaded during the pass

    async def read(
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
                    except pool_mod.WorkerDied:
                        results.extend(await self._read_alone(task))
                    except pool_mod.WorkersUnavailable as exc:
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
            except pool_mod.WorkerDied as exc:
                out.append(workers.worker_died(path, read_ns, str(exc)))
            except pool_mod.WorkersUnavailable:
                out.extend(
                    await anyio.to_thread.run_sync(workers.read_batch, [path], self.config.familiar, self.config.limits)
                )
        return out


def _retrieved(future: asyncio.Future[bytes]) -> None:
    """Mark the outcome of a read no longer waited for as seen (its batch is read again, or the pass ended)."""
    if not future.cancelled():
        future.exception()


def _wrap(future: Future[bytes]) -> asyncio.Future[bytes]:
    """A worker's task as an asyncio future (the pool's manager thread sets it; the loop never blocks)."""
    import asyncio

    return asyncio.wrap_future(future)
