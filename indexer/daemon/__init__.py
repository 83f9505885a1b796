"""``ocidx daemon``: keep the index fresh while layouts change (docs/operations.md).

One process per database (:mod:`.lock`), one event loop, one task group of duties around the store's
one writer (:mod:`.app` draws it): :mod:`.watching` (inotify, the watch mode, roots, mounts),
:mod:`.changes` (what the watcher saw, and the lookups' barriers), :mod:`.reconcile` (the full pass),
:mod:`.heartbeat`, :mod:`.maintenance`, :mod:`.reports` (log and metrics), :mod:`.barrier` (read your
own writes) and :mod:`.publishing` (the fleet). The daemon never writes into a layout and never
touches BuildKit's ``index.json.lock``.
"""

from __future__ import annotations

import logging
import os
import resource

from indexer import config as config_mod
from indexer.errors import UsageError
from indexer.scan.discovery import roots_for

# The daemon's own work must never run out of descriptors: its soft limit is raised this far
# (never past the hard limit); clients of its sockets are bounded apart (indexer.daemon.serving).
NOFILE_WANTED = 65536


def run_daemon(*, db: str | None, config_path: str | None, roots: list[str], log_format: str | None) -> int:
    """``ocidx daemon``: lock the database, then watch and index until SIGTERM/SIGINT; the exit code."""
    import anyio

    from indexer.daemon.app import Daemon
    from indexer.daemon.lock import DatabaseLock
    from indexer.daemon.logs import setup_logging

    config = config_mod.load(config_path)
    handler = setup_logging(log_format or config.daemon.log_format)
    try:
        db_path = os.path.abspath(config_mod.database_path(db, config))
        daemon_roots = roots_for(config, roots)
        if not daemon_roots:
            raise UsageError("no roots to watch: name one (ocidx daemon ROOT) or add [[roots]] to the config")
        raise_descriptor_limit()
        lock = DatabaseLock(db_path)
        lock.acquire()
        try:
            daemon = Daemon(db_path, config, daemon_roots, config_path=config_path, cli_roots=tuple(roots), lock=lock)
            return anyio.run(daemon.run, backend="asyncio")
        finally:
            lock.release()
    finally:
        logging.getLogger().removeHandler(handler)


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files toward the hard one (systemd's default soft limit is 1,024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError):
        pass  # a limit we may not raise: the bounded endpoints still keep clients within theirs
