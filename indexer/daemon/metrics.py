"""The daemon's Prometheus metrics (``[metrics]`` in the config; docs/operations.md, Metrics).

Imported by the daemon only, and only when ``[metrics]`` asks for metrics: ``prometheus_client``
is never on the lookup path. Two ways out, either or both:

* ``listen = "127.0.0.1:9464"``: ``GET /metrics`` over HTTP, served on the daemon's event loop
  within the bounds of :mod:`indexer.daemon.serving` (at most 16 clients at once, 5 s each: a
  local user's idle connections never use up the daemon's descriptors); a host left out is
  loopback: exposing the metrics further is a decision to write;
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
import functools
import os
import secrets
import time

import anyio
from anyio.abc import SocketAttribute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from indexer.daemon.serving import read_request, serve
from indexer.errors import DaemonError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.abc import SocketStream, TaskStatus

    from indexer.config import MetricsSettings
    from indexer.scan.counts import Counts
    from indexer.store.state import Counts as IndexCounts

# The HTTP endpoint's bounds: a scraper needs one connection for milliseconds.
MAX_CLIENTS = 16
REQUEST_DEADLINE_S = 5.0

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
        self.events = Counter("ocidx_watch_events", "inotify events the watcher read", registry=r)
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
        self.watches = Gauge("ocidx_inotify_watches", "Directories the daemon watches with inotify", registry=r)
        self.unwatched = Gauge(
            "ocidx_unwatched_directories",
            "Trees below the roots no inotify watch covers (the watch limit): rediscovered by polling",
            registry=r,
        )
        self.exact = Gauge(
            "ocidx_watching_exactly",
            "1 while every directory where a layout can be is watched with inotify, else 0 (polling)",
            registry=r,
        )
        self.publish_backlog: Gauge | None = None
        self._events_seen = 0

    # -- exposing --------------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[str | None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve ``/metrics`` when ``listen`` is set (its ``http://HOST:PORT/metrics`` URL is the start
        value, None when not set), until cancelled."""
        settings = self.settings
        if settings.port is None or settings.host is None:
            task_status.started(None)
            return
        try:
            multi = await anyio.create_tcp_listener(local_host=settings.host, local_port=settings.port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise DaemonError(f"metrics.listen {where} cannot be served: {exc.strerror or exc}") from None
        address = multi.listeners[0].extra(SocketAttribute.local_address)
        host, port = str(address[0]), int(address[1])
        shown = f"[{host}]" if ":" in host else host
        async with anyio.create_task_group() as tg:
            for listener in multi.listeners:
                tg.start_soon(
                    functools.partial(
                        serve,
                        listener,
                        self._answer,
                        name="metrics",
                        max_clients=MAX_CLIENTS,
                        deadline_s=REQUEST_DEADLINE_S,
                    )
                )
            task_status.started(f"http://{shown}:{port}/metrics")

    async def _answer(self, client: SocketStream) -> None:
        """One HTTP/1.0 exchange: ``GET /metrics`` (or ``/``) gets the exposition, anything else 404."""
        request = await read_request(client, b"\r\n\r\n")
        if request is None:
            return
        method, _, rest = request.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD") or target not in (b"/metrics", b"/"):
            await client.send(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        body = generate_latest(self.registry)
        head = (
            f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        await client.send(head + (body if method == b"GET" else b""))

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

    def counted(self, counts: IndexCounts) -> None:
        """Set the index's gauges from *counts*, and the WAL's size."""
        self.layouts.set(counts.layouts)
        self.layouts_with_errors.set(counts.errors)
        self.entries.set(counts.entries)
        try:
            self.wal_bytes.set(os.stat(self.db_path + "-wal").st_size)
        except FileNotFoundError:
            self.wal_bytes.set(0)

    def beat(self, when_ns: int) -> None:
        """The heartbeat was written at *when_ns*."""
        self.heartbeat.set(when_ns / 1e9)

    def watched_total(self, events: int) -> None:
        """The watcher has read *events* inotify events since it started."""
        if events > self._events_seen:
            self.events.inc(events - self._events_seen)
        self._events_seen = events

    def watching(self, mode: str, watches: int, unwatched: int) -> None:
        """The watch mode changed: how many directories are watched, how many trees are not."""
        self.watches.set(watches)
        self.unwatched.set(unwatched)
        self.exact.set(1 if mode == "inotify" else 0)

    def lost(self, times: int) -> None:
        """The watcher lost events *times* times since the last drain."""
        if times:
            self.lost_events.inc(times)

    def passed(self, counts: Counts, seconds: float | None, *, reconcile: bool) -> None:
        """One pass ended: a reconcile (*seconds*: its duration) or an update (*seconds*: its latency
        from the change that woke the daemon; None for the daemon's own re-checks, which no change woke)."""
        self.changed.inc(counts.changed)
        self.removed.inc(counts.removed)
        self.layout_errors.inc(counts.errors)
        if reconcile:
            if seconds is not None:
                self.reconcile_seconds.observe(seconds)
            self.last_reconcile.set(time.time())
        elif seconds is not None:
            self.update_seconds.observe(seconds)

    def set_publish_backlog(self, pending: int) -> None:
        """The hook for the fleet: how many changes wait to be published (``ocidx_publish_backlog``)."""
        if self.publish_backlog is None:
            self.publish_backlog = Gauge(
                "ocidx_publish_backlog", "Index changes not yet published to the fleet", registry=self.registry
            )
        self.publish_backlog.set(pending)
