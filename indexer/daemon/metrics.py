"""The daemon's Prometheus metrics (``[metrics]`` in the config; docs/operations.md, Metrics).

Imported by the daemon only, and only when ``[metrics]`` asks for metrics: ``prometheus_client``
is never on the lookup path. Two ways out, either or both:

* ``listen = "127.0.0.1:9464"``: ``prometheus_client``'s own HTTP server in a thread, serving
  ``/metrics`` (a host left out is loopback: exposing the metrics further is a decision to write);
* ``textfile = "/var/lib/prometheus/node-exporter/ocidx.prom"``: the same text, rewritten after
  every pass and every heartbeat for node_exporter's textfile collector. The file is replaced
  atomically (a temporary file in the same directory, created ``O_EXCL | O_NOFOLLOW``, then
  renamed over it), so a scrape never reads half a file and a symlink planted at the temporary
  name is never followed.

The fleet (another process publishing this index elsewhere) reports its backlog through
:meth:`Metrics.set_publish_backlog`; the gauge exists from its first report on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from indexer.errors import DaemonError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from indexer.config import MetricsSettings
    from indexer.scan.scanner import Counts

# Seconds: a reconcile pass takes milliseconds for a few layouts and seconds for 100,000.
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds from the change that woke the daemon to its batch committed (the debounce included).
UPDATE_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric of one daemon, in a registry of its own, and where they are exposed."""

    def __init__(self, settings: MetricsSettings, db_path: str) -> None:
        self.settings = settings
        self.db_path = db_path
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.layouts = Gauge("ocidx_layouts", "Layouts in the index", registry=r)
        self.entries = Gauge("ocidx_entries", "Top-level entries of the indexed layouts", registry=r)
        self.layouts_with_errors = Gauge(
            "ocidx_layouts_with_errors", "Indexed layouts whose last read failed (ocidx ls shows why)", registry=r
        )
        self.wal_bytes = Gauge(
            "ocidx_wal_bytes", "Size of the database's WAL file; growing for long: a reader pins it", registry=r
        )
        self.heartbeat = Gauge(
            "ocidx_heartbeat_timestamp_seconds", "When the daemon last wrote its heartbeat (Unix time)", registry=r
        )
        self.last_reconcile = Gauge(
            "ocidx_last_reconcile_timestamp_seconds", "When the last full reconcile pass ended (Unix time)", registry=r
        )
        self.events = Counter(
            "ocidx_watch_events", "Changes reported by the watcher, coalesced per layout or tree", registry=r
        )
        self.lost_events = Counter(
            "ocidx_lost_events",
            "Times the watcher lost events (inotify queue overflow, ...): each forced a reconcile",
            registry=r,
        )
        self.layout_errors = Counter(
            "ocidx_layout_errors", "Layouts that failed to read in a pass, and roots that were missing", registry=r
        )
        self.changed = Counter("ocidx_layouts_changed", "Layouts read and written because they changed", registry=r)
        self.removed = Counter("ocidx_layouts_removed", "Layouts dropped because they vanished", registry=r)
        self.reconcile_seconds = Histogram(
            "ocidx_reconcile_duration_seconds",
            "Duration of full reconcile passes",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.update_seconds = Histogram(
            "ocidx_update_latency_seconds",
            "From the change that woke the daemon to its batch committed (debounce included)",
            buckets=UPDATE_BUCKETS,
            registry=r,
        )
        self.publish_backlog: Gauge | None = None
        self._server: WSGIServer | None = None

    # -- exposing --------------------------------------------------------------------------------

    def start(self) -> str | None:
        """Start the HTTP server when ``listen`` is set; its ``http://HOST:PORT/metrics`` URL, or None."""
        if self.settings.port is None or self.settings.host is None:
            return None
        from prometheus_client import start_http_server

        try:
            self._server, _thread = start_http_server(self.settings.port, self.settings.host, registry=self.registry)
        except OSError as exc:
            where = f"{self.settings.host}:{self.settings.port}"
            raise DaemonError(f"metrics.listen {where} cannot be served: {exc.strerror or exc}") from None
        host, port = str(self._server.server_address[0]), int(self._server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    def stop(self) -> None:
        """Stop the HTTP server (the textfile stays: node_exporter reports its age)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def write_textfile(self) -> None:
        """Replace the textfile atomically, never following a symlink; OSError when it cannot be written."""
        path = self.settings.textfile
        if path is None:
            return
        directory, name = os.path.split(path)
        data = generate_latest(self.registry)
        dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Not *.prom: node_exporter must never read the temporary file.
            temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o644, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)

    # -- what the daemon reports -----------------------------------------------------------------

    def refresh(self, conn: sqlite3.Connection) -> None:
        """Read the index's counts and the WAL size (in the writer's thread, on its connection)."""
        layouts, errors, entries = conn.execute(
            "SELECT count(*), coalesce(sum(state = 'error'), 0), coalesce(sum(entry_count), 0) FROM layouts"
        ).fetchone()
        self.layouts.set(layouts)
        self.layouts_with_errors.set(errors)
        self.entries.set(entries)
        try:
            self.wal_bytes.set(os.stat(self.db_path + "-wal").st_size)
        except FileNotFoundError:
            self.wal_bytes.set(0)

    def beat(self, when_ns: int) -> None:
        """The heartbeat was written at *when_ns*."""
        self.heartbeat.set(when_ns / 1e9)

    def watched(self, changes: int) -> None:
        """The watcher reported *changes* layouts or trees."""
        if changes:
            self.events.inc(changes)

    def lost(self, times: int) -> None:
        """The watcher lost events *times* times since the last drain."""
        if times:
            self.lost_events.inc(times)

    def passed(self, counts: Counts, seconds: float | None, *, reconcile: bool, ended_ns: int) -> None:
        """One pass ended: a reconcile (*seconds*: its duration) or an update (*seconds*: its latency
        from the change that woke the daemon; None for the daemon's own re-checks, which no change woke)."""
        self.changed.inc(counts.changed)
        self.removed.inc(counts.removed)
        self.layout_errors.inc(counts.errors)
        if reconcile:
            if seconds is not None:
                self.reconcile_seconds.observe(seconds)
            self.last_reconcile.set(ended_ns / 1e9)
        elif seconds is not None:
            self.update_seconds.observe(seconds)

    def set_publish_backlog(self, pending: int) -> None:
        """The hook for the fleet: how many changes wait to be published (``ocidx_publish_backlog``)."""
        if self.publish_backlog is None:
            self.publish_backlog = Gauge(
                "ocidx_publish_backlog", "Index changes not yet published to the fleet", registry=self.registry
            )
        self.publish_backlog.set(pending)
