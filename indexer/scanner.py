"""Batch scanning: discover layouts, skip the unchanged, read and parse in worker threads, write in batches.

One :class:`Scanner` owns the only write connection. ``ocidx scan`` runs one
:meth:`Scanner.full_pass`; the daemon runs the same pass at start-up and on
its reconcile timer, and :meth:`Scanner.process` for the layouts watchdog
reported. Each batch is read, parsed and written (one transaction) in a single
worker-thread call, serialized with every other write (one thread hop per batch:
research/python-anchors.md B4). Reading beside writing in two threads measured
slower on 2 cores: both are GIL-bound (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import anyio
import anyio.to_thread

from indexer import config as config_mod
from indexer import layout as layout_mod
from indexer import roots as roots_mod
from indexer.discovery import discover, roots_for, settled, vanished
from indexer.errors import LayoutError, LayoutUnreadable, printable
from indexer.store import open_writer
from indexer.store import read as db
from indexer.store.write import Failed, Gone, Outcome, Read, Same, apply, defer_indexes, restore_indexes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from indexer.config import Config, Root

COLD_BUILD_MIN_LAYOUTS = 500
# How many changed (and removed) layouts a pass remembers by path, for the daemon's log.
LOGGED_PATHS = 10
# A layout another writer keeps rewriting is examined again at most this often in one batch; past
# that, the other writer's rows (at least as new as ours) stand until the next change or pass.
CONFLICT_RETRIES = 4


def examine(path: str, stored: db.StoredLayout | None, *, config: Config, full: bool = False) -> Outcome | None:
    """Look at one layout: None when its stored state is provably current, else what to write."""
    read_ns = time.time_ns()
    try:
        st = os.stat(os.path.join(path, "index.json"))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the layout was replaced by a file
        if not layout_mod.is_layout_dir(path):
            return Gone(path, stored) if stored is not None else None
        return Failed(path, LayoutUnreadable(f"{path}: no index.json"), None, read_ns, stored)
    except OSError as exc:
        return Failed(path, LayoutUnreadable(f"{path}/index.json: {exc.strerror}"), None, read_ns, stored)
    identity = layout_mod.FileIdentity.of(st)
    if not full and stored is not None and stored.is_current(identity):
        return None
    try:
        snapshot = layout_mod.read_layout(path, familiar=config.familiar, limits=config.limits)
    except LayoutError as exc:
        return Failed(path, exc, identity, read_ns, stored)
    except Exception as exc:
        error = LayoutError(f"{path}: unexpected {type(exc).__name__}: {exc}")
        return Failed(path, error, identity, read_ns, stored)
    if not full and stored is not None and stored.state == "ok" and stored.content_hash == snapshot.content_hash:
        return Same(path, snapshot.identity, read_ns, stored)
    return Read(path, snapshot, read_ns, stored)


def examine_batch(
    paths: Iterable[str], stored: dict[str, db.StoredLayout], *, config: Config, full: bool
) -> list[Outcome]:
    """Examine a batch of layouts in one worker-thread call."""
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
            elif isinstance(outcome, Gone):
                self.removed += 1
                if len(self.removed_paths) < LOGGED_PATHS:
                    self.removed_paths.append(outcome.path)
            if not isinstance(outcome, Same):
                written += 1
        self.unchanged += max(0, looked_at - written)

    def to_json(self, seconds: float) -> dict[str, object]:
        """The summary ``ocidx scan --json`` prints."""
        return {
            "layouts": self.seen,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "errors": self.errors,
            "removed": self.removed,
            "still_broken": self.still_broken,
            "seconds": round(seconds, 3),
            "error_messages": self.error_messages[:50],
        }


class Scanner:
    """The single writer and the scanning passes that feed it."""

    def __init__(self, db_path: str, config: Config) -> None:
        self.db_path = db_path
        self.config = config
        self.conn: sqlite3.Connection = open_writer(db_path)
        restore_indexes(self.conn)  # a cold build killed half-way left them deferred
        self._write_limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        """Close the write connection (after PRAGMA optimize, when the database still allows it)."""
        try:
            self.conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass  # a full disk or a damaged file: the error that matters was raised already
        finally:
            self.conn.close()

    async def _write(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Write outcomes decided outside a batch (removals); a conflicting one is left to the next pass."""
        if not outcomes:
            return []
        applied = await anyio.to_thread.run_sync(apply, self.conn, outcomes, limiter=self._write_limiter)
        return applied.written

    async def _stored(self, paths: list[str] | None = None) -> dict[str, db.StoredLayout]:
        def load() -> dict[str, db.StoredLayout]:
            if paths is None:
                return {s.path: s for s in db.layouts(self.conn)}
            out = {}
            for path in paths:
                found = db.layout(self.conn, path)
                if found is not None:
                    out[path] = found
            return out

        return await anyio.to_thread.run_sync(load, limiter=self._write_limiter)

    async def process(
        self,
        paths: list[str],
        *,
        full: bool = False,
        stored: dict[str, db.StoredLayout] | None = None,
        progress: Callable[[int, int], None] | None = None,
        extra: list[Outcome] | None = None,
    ) -> Counts:
        """Examine *paths* in batches and write what changed, a batch per worker-thread call.

        Reading and writing in one thread, batch after batch, measured 28% less wall time and
        33% less CPU than a reader thread beside the writer on 2 cores: both are GIL-bound, and
        the reader waited for the GIL after every read (benchmarks/RESULTS.md).
        """
        if stored is None:
            stored = await self._stored(paths)
        counts = Counts()
        size = max(1, self.config.daemon.batch_size)
        batches = [paths[i : i + size] for i in range(0, len(paths), size)]
        done = 0

        def broken_and_skipped(batch: list[str], outcomes: list[Outcome]) -> int:
            examined = {outcome.path for outcome in outcomes}
            return sum(
                1
                for path in batch
                if path not in examined and (known := stored.get(path)) is not None and known.state == "error"
            )

        def examine_and_write(batch: list[str]) -> list[Outcome]:
            outcomes = examine_batch(batch, stored, config=self.config, full=full)
            written: list[Outcome] = []
            for _attempt in range(CONFLICT_RETRIES):
                if not outcomes:
                    break
                applied = apply(self.conn, outcomes)
                written.extend(applied.written)
                if not applied.conflicts:
                    break
                # Another writer changed these layouts since *stored* was loaded: examine them again
                # against the rows as they are now (compare-and-set, docs/design.md).
                fresh = {path: found for path in applied.conflicts if (found := db.layout(self.conn, path))}
                for path in applied.conflicts:
                    stored.pop(path, None)
                stored.update(fresh)
                outcomes = examine_batch(applied.conflicts, stored, config=self.config, full=full)
            return written

        for batch in batches:
            outcomes = await anyio.to_thread.run_sync(examine_and_write, batch, limiter=self._write_limiter)
            counts.add(outcomes, len(batch), broken_and_skipped(batch, outcomes))
            done += len(batch)
            if progress is not None:
                progress(done, len(paths))
        if extra:
            applied = await self._write(list(extra))
            counts.add(applied, 0, 0)
        return counts

    async def discover(self, roots: Iterable[Root]) -> tuple[list[str], list[str], list[str]]:
        """Every layout below *roots*, the problems met on the way, and the roots resolved."""
        roots = list(roots)

        def walk() -> tuple[list[str], list[str], list[str]]:
            errors: list[str] = []
            found: dict[str, None] = {}
            for root in roots:
                for path in discover(root, errors):
                    found[path] = None
            return list(found), errors, [os.path.realpath(r.path) for r in roots]

        return await anyio.to_thread.run_sync(walk)

    async def full_pass(
        self,
        roots: Iterable[Root],
        *,
        full: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Counts:
        """Discover, examine every layout, and drop those that vanished from below the roots."""
        roots = list(roots)
        paths, problems, resolved = await self.discover(roots)
        stored = await self._stored()
        gone: list[Outcome] = [
            Gone(path, stored[path])
            for path in await anyio.to_thread.run_sync(
                lambda: vanished(list(stored), set(paths), resolved, follow=any(r.follow_symlinks for r in roots))
            )
        ]
        # A cold build (an empty index, many layouts) inserts without the lookup indexes and builds
        # them once at the end: 3x cheaper than keeping them up to date row by row.
        cold = not stored and len(paths) >= COLD_BUILD_MIN_LAYOUTS
        if cold:
            await anyio.to_thread.run_sync(defer_indexes, self.conn, limiter=self._write_limiter)
        try:
            counts = await self.process(paths, full=full, stored=stored, progress=progress, extra=gone)
        finally:
            if cold:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(restore_indexes, self.conn, limiter=self._write_limiter)
        counts.error_messages[:0] = problems
        return counts


def _progress_bar() -> Callable[[int, int], None]:
    write = sys.stderr.write

    def show(done: int, total: int) -> None:
        width = 30
        filled = width if total == 0 else int(width * done / total)
        write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} layouts")
        if done >= total:
            write("\n")
        sys.stderr.flush()

    return show


def run_scan(
    *, db: str | None, config_path: str | None, roots: list[str], full: bool = False, progress: bool = True
) -> dict[str, object]:
    """``ocidx scan``: one pass; prints a one-line summary on stderr and returns it."""
    config = config_mod.load(config_path)
    db_path = config_mod.database_path(db, config)
    scan_roots = roots_for(config, roots)
    if not scan_roots:
        from indexer.errors import UsageError

        raise UsageError("no roots to scan: name one (ocidx scan ROOT) or add [[roots]] to the config")
    bar = _progress_bar() if progress and sys.stderr.isatty() else None
    started = time.perf_counter()
    # Nothing changed is the common case on a build host: proving it takes a walk and a stat per
    # layout, and no event loop (asyncio alone costs about 40 ms of a 0.1 s re-scan).
    quick = None if full else settled(db_path, scan_roots)
    if quick is not None:
        counts = Counts()
        counts.seen, counts.still_broken = quick
        counts.unchanged = counts.seen  # as the full pass counts: a skipped broken layout is unchanged too
        _record_roots(db_path, scan_roots)
        return {**_summarize(counts, time.perf_counter() - started), "bad_roots": []}  # settled: every root is there

    async def go() -> Counts:
        scanner = Scanner(db_path, config)
        try:
            counts = await scanner.full_pass(scan_roots, full=full, progress=bar)
            roots_mod.record(scanner.conn, _resolved_roots(scan_roots))
            return counts
        finally:
            scanner.close()

    try:
        counts = anyio.run(go)
    except sqlite3.Error as exc:  # a full disk, or a database damaged under the writer
        from indexer.errors import DatabaseError

        raise DatabaseError(f"index database {db_path} cannot be written: {exc}") from None
    # A root that does not exist or is not a directory is an error of this scan (discovery put its
    # message first in error_messages); ``ocidx scan`` exits 2 for it, as for any bad argument.
    bad_roots = [r.path for r in scan_roots if not os.path.isdir(r.path)]
    counts.errors += len(bad_roots)
    return {**_summarize(counts, time.perf_counter() - started), "bad_roots": bad_roots}


def _resolved_roots(roots: list[Root]) -> list[Root]:
    """*roots* with their paths resolved, as discovery compares them (and as ``find`` walks them again)."""
    return [
        config_mod.Root(os.path.realpath(r.path), max_depth=r.max_depth, follow_symlinks=r.follow_symlinks)
        for r in roots
        if os.path.isdir(r.path)
    ]


def _record_roots(db_path: str, roots: list[Root]) -> None:
    """Record the roots of a scan that had nothing to write, unless they are recorded already."""
    from indexer.store import open_reader

    resolved = _resolved_roots(roots)
    conn = open_reader(db_path)
    try:
        known = {r.path for r in roots_mod.recorded(conn) or []}
    finally:
        conn.close()
    if all(r.path in known for r in resolved):
        return
    conn = open_writer(db_path)
    try:
        roots_mod.record(conn, resolved)
    finally:
        conn.close()


def _summarize(counts: Counts, seconds: float) -> dict[str, object]:
    for message in counts.error_messages[:20]:
        sys.stderr.write(printable(f"ocidx: {message}") + "\n")
    sys.stderr.write(
        f"ocidx: scanned {counts.seen} layout{'' if counts.seen == 1 else 's'} in {seconds:.2f}s: "
        f"{counts.changed} changed, "
        f"{counts.unchanged} unchanged, {counts.errors + counts.still_broken} with errors, {counts.removed} removed\n"
    )
    return counts.to_json(seconds)
