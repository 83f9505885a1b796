"""``ocidx scan``: one pass over the roots, or the proof that nothing changed (no event loop then)."""

from __future__ import annotations

import os
import sqlite3
import sys
import time

from indexer import config as config_mod
from indexer.errors import printable
from indexer.scan.counts import Counts
from indexer.scan.discovery import roots_for
from indexer.scan.proof import settled
from indexer.scan.scanner import Scanner
from indexer.store import open_writer, transaction
from indexer.store import state as roots_mod

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from indexer.config import Root


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
    quick = None if full else settled(db_path, scan_roots, config.daemon.workers)
    if quick is not None:
        counts = Counts()
        counts.seen, counts.still_broken = quick
        counts.unchanged = counts.seen  # as the full pass counts: a skipped broken layout is unchanged too
        _record_roots(db_path, scan_roots)
        # settled: every root is there, everything was read
        return {**_summarize(counts, time.perf_counter() - started), "bad_roots": [], "resource_error": None}

    async def go() -> Counts:
        from indexer.store.writer import Store  # aiosqlite: only once something is to be written

        store = Store(db_path)
        scanner = Scanner(store, config)
        try:
            counts = await scanner.full_pass(scan_roots, full=full, progress=bar)
            await store.unit(roots_mod.record, _resolved_roots(scan_roots))
            return counts
        finally:
            await scanner.aclose()
            await store.aclose()

    import anyio  # with asyncio, about 30 ms: only once something is to be written

    try:
        counts = anyio.run(go)
    except sqlite3.Error as exc:  # a full disk, or a database damaged under the writer
        from indexer.store import database_error

        raise database_error(f"index database {db_path} cannot be written: {exc}", db_path) from None
    # A root that does not exist or is not a directory is an error of this scan (discovery put its
    # message first in error_messages); ``ocidx scan`` exits 2 for it, as for any bad argument.
    bad_roots = [r.path for r in scan_roots if not os.path.isdir(r.path)]
    counts.errors += len(bad_roots)
    summary = {**_summarize(counts, time.perf_counter() - started), "bad_roots": bad_roots}
    return {**summary, "resource_error": _resource_error(counts)}


def _resource_error(counts: Counts) -> str | None:
    """What to say when the pass ran out of descriptors or memory (the scan then exits 6): the
    directories and layouts it could not read for that are kept, and read again by the next pass."""
    from indexer.errors import ResourceExhausted, exhausted

    unread = [failed.error for failed in counts.transient.values()]
    for error in unread:
        if (resource := exhausted(error, "reading layouts")) is not None:
            break
    else:
        causes = [OSError(code, os.strerror(code)) for code in counts.unlisted.values()]
        resource = next((r for exc in causes if (r := exhausted(exc, "listing directories")) is not None), None)
    if not isinstance(resource, ResourceExhausted):
        return None
    return (
        f"{resource.message} ({len(unread)} layouts and {len(counts.unlisted)} directories could not be read "
        "for that; they are kept as they were, and read again by the next pass)"
    )


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
        transaction(conn, roots_mod.record, resolved)
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
