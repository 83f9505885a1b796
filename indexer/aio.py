"""The lookups for event loops: :class:`AsyncIndex`, for asyncio and trio alike (through anyio).

Each lookup of :class:`indexer.query.Index` takes well under a millisecond from SQLite, but a
read-through parses a file, and ``find`` with no live daemon walks the roots: either would stall
an event loop. So every call runs in a worker thread (``anyio.to_thread``) on an :class:`Index` of
a small pool, at most one call per :class:`Index` at a time (SQLite connections are used by one
thread at a time, not shared). :meth:`AsyncIndex.wait` waits on the loop itself: the inotify
descriptor of :class:`indexer.wait.Watch` is awaited with ``anyio.wait_readable``, and only the
resolve after each batch of events goes to a thread.

The exceptions are those of the synchronous API (``from indexer import NotFound``), with the same
messages. anyio is imported here, and this module only when ``indexer.AsyncIndex`` is first used:
neither ``import indexer`` nor the command line pays for it.
"""

from __future__ import annotations

import functools
import math
import threading

import anyio
import anyio.to_thread

from indexer import config as config_mod
from indexer.errors import UsageError
from indexer.query import Answer, Index, Matches
from indexer.wait import Watch, attempt, check_timeout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import TypeVar

    from indexer.config import Config
    from indexer.errors import OcidxError

    T = TypeVar("T")

# Lookups at once, each in its own thread on its own connection: enough to keep two cores busy
# while one call waits on a cold disk.
DEFAULT_CONCURRENCY = 4


class AsyncIndex:
    """The lookups of :class:`indexer.query.Index`, awaitable: ``async with AsyncIndex(db) as index``."""

    def __init__(
        self, db_path: str | None = None, *, config: Config | str | None = None, concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"concurrency must be 1 or more, not {concurrency!r}")
        # Loaded once, here: a bad config file is an error of the constructor, as for Index.
        self.config = config if isinstance(config, config_mod.Config) else config_mod.load(config)
        self.db_path = config_mod.database_path(db_path, self.config)
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._idle: list[Index] = []
        self._lock = threading.Lock()  # the pool is taken from and given back to in worker threads
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------------

    def _take(self) -> Index:
        with self._lock:
            if self._closed:
                raise UsageError("this AsyncIndex is closed")
            if self._idle:
                return self._idle.pop()
        index = Index(self.db_path, config=self.config)
        index.shared_between_threads = True
        return index

    def _give_back(self, index: Index) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(index)
                return
        index.close()

    async def _run(self, call: Callable[[Index], T]) -> T:
        """*call* on an Index of the pool, in a worker thread; the Index goes back to the pool after."""

        def work() -> T:
            index = self._take()
            try:
                return call(index)
            finally:
                self._give_back(index)

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def aclose(self) -> None:
        """Close every connection; calls after this raise UsageError."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for index in idle:
            index.close()

    async def __aenter__(self) -> AsyncIndex:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- lookups ----------------------------------------------------------------------------------

    async def resolve(self, target: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """:meth:`Index.resolve <indexer.query.Index.resolve>`: ``oci-layout://...`` to one image."""
        return await self._run(lambda index: index.resolve(target, platform=platform, strict=strict))

    async def resolve_in(self, layout: str, ref: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """:meth:`Index.resolve_in <indexer.query.Index.resolve_in>`: REF in the layout at *layout*."""
        return await self._run(lambda index: index.resolve_in(layout, ref, platform=platform, strict=strict))

    async def find(self, ref: str, *, verify_all: bool = False) -> Matches:
        """:meth:`Index.find <indexer.query.Index.find>`: every match of REF across the indexed layouts."""
        return await self._run(lambda index: index.find(ref, verify_all=verify_all))

    async def resolve_many(
        self,
        targets: Iterable[str],
        *,
        layout: str | None = None,
        platform: str | None = None,
        strict: bool = False,
    ) -> list[tuple[str, Answer | OcidxError]]:
        """:meth:`Index.resolve_many <indexer.query.Index.resolve_many>`, as a list, in one worker thread."""
        given = list(targets)
        return await self._run(
            lambda index: list(index.resolve_many(given, layout=layout, platform=platform, strict=strict))
        )

    async def find_many(
        self, refs: Iterable[str], *, verify_all: bool = False
    ) -> list[tuple[str, Matches | OcidxError]]:
        """:meth:`Index.find_many <indexer.query.Index.find_many>`, as a list, in one worker thread."""
        given = list(refs)
        return await self._run(lambda index: list(index.find_many(given, verify_all=verify_all)))

    async def layouts(self, under: str | None = None) -> list[dict[str, object]]:
        """:meth:`Index.layouts <indexer.query.Index.layouts>`: every indexed layout with its state."""
        return await self._run(lambda index: index.layouts(under))

    async def layout_detail(self, path: str) -> dict[str, object]:
        """:meth:`Index.layout_detail <indexer.query.Index.layout_detail>`: one layout's entries and names."""
        return await self._run(lambda index: index.layout_detail(path))

    async def status(self) -> dict[str, object]:
        """:meth:`Index.status <indexer.query.Index.status>`: counts, errors, the daemon's heartbeat."""
        return await self._run(Index.status)

    async def wait(
        self,
        target: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Index.wait: WaitTimeout says why, a cancel scope cannot
        platform: str | None = None,
        strict: bool = False,
    ) -> Answer:
        """:func:`indexer.wait.wait` on this loop: the answer once *target* resolves; WaitTimeout after
        *timeout* seconds. Cancelling the task ends the wait (the watches are closed)."""
        check_timeout(timeout)
        check = functools.partial(attempt, target=target, platform=platform, strict=strict)
        with Watch(target, self.config.stores) as watch:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                watch.arm()
                while True:
                    result = await self._run(check)
                    if isinstance(result, Answer):
                        return result
                    watch.reason = result
                    while True:
                        await anyio.wait_readable(watch.fileno())
                        if watch.drain():
                            break
            raise watch.timeout(timeout or 0.0)
