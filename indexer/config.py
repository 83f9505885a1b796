"""Configuration: TOML to immutable records, validated with errors that name the key.

Where settings come from, first match wins:

* the config file: ``--config``, then ``$OCIDX_CONFIG``, then
  ``$XDG_CONFIG_HOME/ocidx/config.toml`` (``~/.config/...``) when it exists;
  no file at all is a valid, empty configuration;
* the database: ``--db``, then ``$OCIDX_DB``, then ``[database] path``, then
  ``$XDG_DATA_HOME/ocidx/index.db`` (``~/.local/share/...``).

Relative paths in a config file are relative to the file's own directory, so
a config behaves the same whatever directory the daemon is started from.
``tomllib`` is imported only when a file is actually read: the lookup path
without a config file stays standard-library-light.
"""

from __future__ import annotations

import math
import os
import re

from indexer._record import Record
from indexer.errors import ConfigError
from indexer.layout import Limits
from indexer.names import FAMILIAR_POLICIES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

LOG_FORMATS = ("text", "json")

# The sane range of every number in the config (config.example.toml documents them). Below the
# lower bounds a daemon spins (a reconcile every nanosecond); above the upper ones a value is a
# typo that would hold memory or hide changes for years.
RECONCILE_RANGE_S = (0.1, 7 * 24 * 3600.0)
HEARTBEAT_RANGE_S = (0.1, 3600.0)
DEBOUNCE_RANGE_MS = (0, 60_000)
BATCH_RANGE = (1, 100_000)
WORKERS_RANGE = (0, 256)  # 0: one per core
MAX_DEPTH_RANGE = (0, 64)
NESTED_DEPTH_RANGE = (0, 16)
BYTES_RANGE = (2, 1 << 32)
GRACE_RANGE_S = (0.0, 365 * 86400.0)


class Root(Record):
    """A directory below which layouts are discovered."""

    __slots__ = ("follow_symlinks", "max_depth", "path")

    def __init__(self, path: str, *, max_depth: int = 8, follow_symlinks: bool = False) -> None:
        self.path = path
        self.max_depth = max_depth
        self.follow_symlinks = follow_symlinks


class DaemonSettings(Record):
    """Timing and batching of the daemon (``[daemon]``)."""

    __slots__ = ("batch_size", "debounce_ms", "heartbeat_s", "log_format", "reconcile_s", "workers")

    def __init__(
        self,
        *,
        debounce_ms: int = 100,
        reconcile_s: float = 300.0,
        batch_size: int = 500,
        heartbeat_s: float = 5.0,
        log_format: str = "text",
        workers: int = 0,
    ) -> None:
        self.workers = workers  # parsing processes: 0 = one per core, 1 = parse in this process
        self.debounce_ms = debounce_ms
        self.reconcile_s = reconcile_s
        self.batch_size = batch_size
        self.heartbeat_s = heartbeat_s
        self.log_format = log_format


class MetricsSettings(Record):
    """Where the daemon exposes Prometheus metrics (``[metrics]``); both None: no metrics."""

    __slots__ = ("host", "port", "textfile")

    def __init__(self, *, host: str | None = None, port: int | None = None, textfile: str | None = None) -> None:
        self.host = host  # with port: serve /metrics over HTTP there
        self.port = port
        self.textfile = textfile  # write the metrics to this file for node_exporter's textfile collector

    @property
    def enabled(self) -> bool:
        """Whether any way of exposing metrics is configured."""
        return self.port is not None or self.textfile is not None


def parse_listen(text: str, full: str, source: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` as (host, port); no host is loopback, port 0 any free one."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536 or "[" in host or "]" in host:
        raise ConfigError(f"{source}: {full} must be HOST:PORT (127.0.0.1:9464), not {text!r}")
    return host or "127.0.0.1", int(port_text)


class FleetSettings(Record):
    """The fleet database (``[fleet]``): where to publish and look, and when a host counts as stale."""

    __slots__ = ("dsn", "stale_after_s")

    def __init__(self, *, dsn: str = "", stale_after_s: float = 60.0) -> None:
        self.dsn = dsn
        self.stale_after_s = stale_after_s


class GcSettings(Record):
    """``ocidx gc`` (``[gc]``): how old an unreferenced blob must be before ``--delete`` removes it."""

    __slots__ = ("grace_s",)

    def __init__(self, *, grace_s: float = 3600.0) -> None:
        self.grace_s = grace_s


class Config(Record):
    """Everything ocidx reads from its config file, with defaults applied."""

    __slots__ = ("daemon", "database", "familiar", "fleet", "gc", "limits", "metrics", "roots", "source", "stores")

    def __init__(
        self,
        *,
        source: str | None = None,
        database: str | None = None,
        roots: tuple[Root, ...] = (),
        stores: dict[str, str] | None = None,
        familiar: str = "normalize",
        limits: Limits | None = None,
        daemon: DaemonSettings | None = None,
        fleet: FleetSettings | None = None,
        metrics: MetricsSettings | None = None,
        gc: GcSettings | None = None,
    ) -> None:
        self.source = source
        self.database = database
        self.roots = roots
        self.stores = dict(stores or {})
        self.familiar = familiar
        self.limits = limits if limits is not None else Limits()
        self.daemon = daemon if daemon is not None else DaemonSettings()
        self.fleet = fleet if fleet is not None else FleetSettings()
        self.metrics = metrics if metrics is not None else MetricsSettings()
        self.gc = gc if gc is not None else GcSettings()


def default_workers() -> int:
    """One worker per core this process may run on (``taskset``, cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_config_path() -> str | None:
    """The config file used when none is named, or None when there is none."""
    env = os.environ.get("OCIDX_CONFIG")
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    candidate = os.path.join(base, "ocidx", "config.toml")
    return candidate if os.path.isfile(candidate) else None


def default_database_path() -> str:
    """The per-user database path used when nothing else names one."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "ocidx", "index.db")


def database_path(cli_db: str | None, config: Config) -> str:
    """``--db``, then ``$OCIDX_DB``, then ``[database] path``, then the per-user default."""
    return cli_db or os.environ.get("OCIDX_DB") or config.database or default_database_path()


FLEET_DSN_ENV = "OCIDX_FLEET_DSN"
STALE_AFTER_RANGE_S = (1.0, 7 * 86400.0)


def fleet_dsn(config: Config) -> str:
    """``$OCIDX_FLEET_DSN`` when set (an empty value turns the fleet off), else ``[fleet] dsn``; '' is no fleet."""
    env = os.environ.get(FLEET_DSN_ENV)
    return (env if env is not None else config.fleet.dsn).strip()


def load(path: str | None) -> Config:
    """Read and validate the config file at *path* (or the default one); none is empty config."""
    if path is None:
        path = default_config_path()
        if path is None:
            return Config()
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    return from_mapping(data, source=os.path.abspath(path))


def from_mapping(data: Mapping[str, object], *, source: str) -> Config:
    """Validate an already-parsed TOML document; *source* names the file in errors."""
    here = os.path.dirname(source)
    _only(data, {"database", "roots", "stores", "names", "limits", "daemon", "fleet", "metrics", "gc"}, "", source)

    database_table = _table(data, "database", source)
    _only(database_table, {"path"}, "database.", source)
    database = _opt_str(database_table, "path", "database.path", source)

    roots: list[Root] = []
    raw_roots = data.get("roots", [])
    if not isinstance(raw_roots, list):
        raise ConfigError(f"{source}: roots must be an array of tables ([[roots]])")
    for i, raw in enumerate(raw_roots):
        key = f"roots[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {key} must be a table")
        _only(raw, {"path", "max_depth", "follow_symlinks"}, f"{key}.", source)
        root_path = _opt_str(raw, "path", f"{key}.path", source)
        if not root_path:
            raise ConfigError(f"{source}: {key}.path is required")
        roots.append(
            Root(
                _resolve(here, root_path, f"{key}.path", source),
                max_depth=_int(raw, "max_depth", 8, f"{key}.max_depth", source, *MAX_DEPTH_RANGE),
                follow_symlinks=_bool(raw, "follow_symlinks", False, f"{key}.follow_symlinks", source),
            )
        )

    stores_table = _table(data, "stores", source)
    stores: dict[str, str] = {}
    for name, value in stores_table.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: stores.{name} must be a non-empty path string")
        if not name or "/" in name or ":" in name or "@" in name:
            raise ConfigError(f"{source}: stores.{name}: a store name has no '/', ':' or '@'")
        stores[name] = _resolve(here, value, f"stores.{name}", source)

    names_table = _table(data, "names", source)
    _only(names_table, {"familiar_ref_names"}, "names.", source)
    familiar = _opt_str(names_table, "familiar_ref_names", "names.familiar_ref_names", source) or "normalize"
    if familiar not in FAMILIAR_POLICIES:
        raise ConfigError(
            f"{source}: names.familiar_ref_names must be one of {', '.join(FAMILIAR_POLICIES)}, not {familiar!r}"
        )

    limits_table = _table(data, "limits", source)
    _only(limits_table, {"max_index_bytes", "max_blob_bytes", "max_nested_depth"}, "limits.", source)
    defaults = Limits()
    limits = Limits(
        max_index_bytes=_int(
            limits_table, "max_index_bytes", defaults.max_index_bytes, "limits.max_index_bytes", source, *BYTES_RANGE
        ),
        max_blob_bytes=_int(
            limits_table, "max_blob_bytes", defaults.max_blob_bytes, "limits.max_blob_bytes", source, *BYTES_RANGE
        ),
        max_depth=_int(
            limits_table,
            "max_nested_depth",
            defaults.max_depth,
            "limits.max_nested_depth",
            source,
            *NESTED_DEPTH_RANGE,
        ),
    )

    daemon_table = _table(data, "daemon", source)
    _only(
        daemon_table,
        {"debounce_ms", "reconcile_interval_s", "batch_size", "heartbeat_interval_s", "log_format", "workers"},
        "daemon.",
        source,
    )
    log_format = _opt_str(daemon_table, "log_format", "daemon.log_format", source) or "text"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: daemon.log_format must be 'text' or 'json', not {log_format!r}")
    daemon = DaemonSettings(
        debounce_ms=_int(daemon_table, "debounce_ms", 100, "daemon.debounce_ms", source, *DEBOUNCE_RANGE_MS),
        reconcile_s=_number(
            daemon_table, "reconcile_interval_s", 300.0, "daemon.reconcile_interval_s", source, *RECONCILE_RANGE_S
        ),
        batch_size=_int(daemon_table, "batch_size", 500, "daemon.batch_size", source, *BATCH_RANGE),
        heartbeat_s=_number(
            daemon_table, "heartbeat_interval_s", 5.0, "daemon.heartbeat_interval_s", source, *HEARTBEAT_RANGE_S
        ),
        log_format=log_format,
        workers=_int(daemon_table, "workers", 0, "daemon.workers", source, *WORKERS_RANGE),
    )
    metrics_table = _table(data, "metrics", source)
    _only(metrics_table, {"listen", "textfile"}, "metrics.", source)
    listen = _opt_str(metrics_table, "listen", "metrics.listen", source)
    host, port = parse_listen(listen, "metrics.listen", source) if listen is not None else (None, None)
    textfile = _opt_str(metrics_table, "textfile", "metrics.textfile", source)
    if textfile is not None and not textfile.endswith(".prom"):
        raise ConfigError(f"{source}: metrics.textfile must end in .prom (node_exporter reads only those)")
    metrics = MetricsSettings(
        host=host, port=port, textfile=_resolve(here, textfile, "metrics.textfile", source) if textfile else None
    )
    gc_table = _table(data, "gc", source)
    _only(gc_table, {"grace_s"}, "gc.", source)
    gc = GcSettings(grace_s=_number(gc_table, "grace_s", 3600.0, "gc.grace_s", source, *GRACE_RANGE_S))
    return Config(
        source=source,
        gc=gc,
        database=_resolve(here, database, "database.path", source) if database else None,
        fleet=_fleet(_table(data, "fleet", source), source),
        roots=tuple(roots),
        stores=stores,
        familiar=familiar,
        limits=limits,
        daemon=daemon,
        metrics=metrics,
    )


def _fleet(table: Mapping[str, object], source: str) -> FleetSettings:
    _only(table, {"dsn", "stale_after_s"}, "fleet.", source)
    dsn = _opt_str(table, "dsn", "fleet.dsn", source) or ""
    if _has_password(dsn):
        raise ConfigError(
            f"{source}: fleet.dsn holds a password: keep it out of ocidx's config and give it to libpq "
            "(a ~/.pgpass or PGPASSFILE file, a service file, or a client certificate; docs/fleet.md)"
        )
    stale = _number(table, "stale_after_s", 60.0, "fleet.stale_after_s", source, *STALE_AFTER_RANGE_S)
    return FleetSettings(dsn=dsn, stale_after_s=stale)


def _has_password(dsn: str) -> bool:
    """Whether a libpq connection string (key=value or URI form) carries a password."""
    if re.search(r"(?:^|\s)password\s*=", dsn):
        return True
    scheme, sep, rest = dsn.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        authority = rest.split("/", 1)[0].split("?", 1)[0]
        if "@" in authority and ":" in authority.rpartition("@")[0]:
            return True
        if re.search(r"[?&]password=", rest):
            return True
    return False


def _resolve(here: str, path: str, full: str, source: str) -> str:
    if "\0" in path:  # TOML can spell it (\u0000); no file system path holds it
        raise ConfigError(f"{source}: {full} contains a NUL character")
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(here, path))


def _only(table: Mapping[str, object], allowed: set[str], prefix: str, source: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(allowed))})")


def _table(data: Mapping[str, object], key: str, source: str) -> dict[str, object]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{key}] must be a table")
    return value


def _opt_str(table: Mapping[str, object], key: str, full: str, source: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {full} must be a string")
    return value


def _bool(table: Mapping[str, object], key: str, default: bool, full: str, source: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {full} must be true or false")
    return value


def _int(
    table: Mapping[str, object],
    key: str,
    default: int,
    full: str,
    source: str,
    low: int = 0,
    high: int | None = None,
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {full} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{source}: {full} must be {bound}, not {value}")
    return value


def _number(
    table: Mapping[str, object], key: str, default: float, full: str, source: str, low: float, high: float
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {full} must be a number of seconds")
    # TOML spells nan and inf; every comparison with nan is false, so finiteness is checked first.
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{source}: {full} must be a finite number from {low:g} to {high:g}, not {value!r}")
    return float(value)
