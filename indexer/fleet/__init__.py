"""The fleet: one index across many hosts, in PostgreSQL (docs/fleet.md).

Each host keeps its own SQLite index; a daemon with a fleet DSN publishes it
(:mod:`indexer.fleet.publisher`) as the PostgreSQL role it connects as. This
module is the reading side: :class:`Fleet` answers ``find --fleet``,
``referrers --fleet`` and ``hosts`` with psycopg's synchronous API (no event loop in a lookup), using the
reference parsing of :func:`indexer.query.parse_ref` and the matching rules of
:func:`indexer.store.read.lookups`, rendered here as PostgreSQL.

Readers reach the fleet only through the functions of schema ``ocidx``
(``migrations/postgres/0002_functions_only.sql``; the content graph's,
``ocidx.graph_users`` and ``ocidx.referrers``, in ``0003_content_graph.sql``),
every statement bounded by
``lock_timeout`` and ``statement_timeout``, and validate every row they read: a
host's malformed rows are dropped with a warning naming the host, and never
hide another host's answers.

Nothing here is imported by a lookup without ``--fleet``: psycopg is an
optional extra (``pip install 'ocidx[fleet]'``).
"""

from __future__ import annotations

import json
import os

from indexer import config as config_mod
from indexer import names as names_mod
from indexer import reference
from indexer.errors import DatabaseError, FleetUnavailable, NotFound, SchemaTooNew, printable
from indexer.graph import MAX_CREATED
from indexer.layout import INDEX_MEDIA_TYPES
from indexer.names import Name
from indexer.query import (
    INDEXED,
    SCHEME,
    STALE,
    Answer,
    Query,
    Referrer,
    blob_use_answer,
    mismatch,
    parse_ref,
    with_image,
)
from indexer.store import migration_files
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

    from collections.abc import Sequence

    import psycopg

    from indexer.config import Config
    from indexer.query import Index

LIVE = "live"
MIGRATIONS = "postgres"  # migrations/postgres/NNNN_name.sql
CONNECT_TIMEOUT_S = 10
# A reader waits this long for a lock (only an administrator's migration or maintenance takes one that
# conflicts with reading), and this long for any one statement, then fails with exit 4.
READ_LOCK_TIMEOUT_S = 10.0
READ_STATEMENT_TIMEOUT_S = 60.0
NO_FLEET = "no fleet database is configured: set [fleet] dsn in the config file or $OCIDX_FLEET_DSN"


def driver() -> object:
    """The psycopg module, or FleetUnavailable (exit 4) saying how to install it."""
    try:
        import psycopg
    except ImportError:
        raise FleetUnavailable("the fleet needs the PostgreSQL driver psycopg 3: pip install 'ocidx[fleet]'") from None
    return psycopg


def describe_dsn(dsn: str) -> str:
    """The DSN without secrets, for messages: host, port, dbname and user only."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:  # an unparsable DSN: say nothing of its contents
        return "the configured DSN"
    shown = [f"{key}={parts[key]}" for key in ("host", "port", "dbname", "user") if parts.get(key)]
    return " ".join(shown) or "the default libpq connection"


def connect(dsn: str, *, autocommit: bool = True, application: str = "ocidx") -> psycopg.Connection[tuple[Any, ...]]:
    """A connection to the fleet database, or FleetUnavailable saying why it is unreachable."""
    driver()
    import psycopg

    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S, application_name=application
        )
    except psycopg.Error as exc:
        raise FleetUnavailable(f"the fleet database is unreachable ({describe_dsn(dsn)}): {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def bounds_sql(*, lock_s: float, statement_s: float | None = None, idle_s: float | None = None) -> str:
    """The statement that bounds a session's waits (``lock_timeout``, and ``statement_timeout`` and
    ``idle_in_transaction_session_timeout`` when given), for the whole session."""
    settings = {"lock_timeout": lock_s, "statement_timeout": statement_s, "idle_in_transaction_session_timeout": idle_s}
    return "SELECT " + ", ".join(
        f"set_config('{name}', '{round(value * 1000)}', false)" for name, value in settings.items() if value is not None
    )


def failure(exc: BaseException, *, lock_s: float, statement_s: float | None = None) -> str:
    """What a PostgreSQL error means, for a message: a lock or statement timeout says which, and how long."""
    import psycopg

    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return f"another session held a lock it needed for over {lock_s:g}s (lock_timeout)"
    if isinstance(exc, psycopg.errors.QueryCanceled) and statement_s is not None and "statement timeout" in str(exc):
        return f"a statement ran for over {statement_s:g}s (statement_timeout)"
    return _first_line(exc)


def known_migrations() -> list[str]:
    """The names of the fleet migrations this ocidx knows, in order."""
    return [name for name, _path in migration_files(MIGRATIONS)]


def schema_problem(applied: Sequence[str]) -> DatabaseError | None:
    """Why a fleet database with migrations *applied* cannot be used by this ocidx, or None."""
    known = known_migrations()
    unknown = sorted(set(applied) - set(known))
    if unknown:
        return SchemaTooNew(
            f"the fleet database has migrations this ocidx does not know ({', '.join(unknown)}): upgrade ocidx"
        )
    missing = [name for name in known if name not in set(applied)]
    if missing:
        return FleetUnavailable(
            f"the fleet database lacks migrations {', '.join(missing)}: run 'ocidx fleet migrate --dsn ADMIN_DSN'"
        )
    return None


# How a session finds the migrations applied: ocidx.applied_migrations() from schema version 2 on,
# else the table of a version 1 schema (an administrator's session finds either).
PROBE_MIGRATIONS_SQL = (
    "SELECT to_regprocedure('ocidx.applied_migrations()') IS NOT NULL, to_regclass('ocidx_migrations') IS NOT NULL"
)
APPLIED_SQL = "SELECT ocidx.applied_migrations()"
APPLIED_V1_SQL = "SELECT name FROM ocidx_migrations ORDER BY name"
NOT_A_READER = "this role may not read the fleet database: grant it ocidx_reader (or add it as a host)"
NO_SCHEMA = "the fleet database has no ocidx fleet schema: run 'ocidx fleet migrate --dsn ADMIN_DSN'"


def applied_migrations(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str] | None:
    """The fleet migrations recorded in the database, or None when it has no fleet schema."""
    import psycopg

    try:
        row = conn.execute(PROBE_MIGRATIONS_SQL).fetchone()
        if row is not None and row[0]:
            return [str(r[0]) for r in conn.execute(APPLIED_SQL)]
        if row is not None and row[1]:
            return [str(r[0]) for r in conn.execute(APPLIED_V1_SQL)]
    except psycopg.errors.InsufficientPrivilege:
        raise FleetUnavailable(NOT_A_READER) from None
    return None


def check_schema(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Raise FleetUnavailable or SchemaTooNew (exit 4) unless the database has exactly our fleet schema."""
    applied = applied_migrations(conn)
    if applied is None:
        raise FleetUnavailable(NO_SCHEMA)
    problem = schema_problem(applied)
    if problem is not None:
        raise problem


class FleetAnswer(Answer):
    """One ``find --fleet`` match: a local find's answer plus the host that holds it."""

    __slots__ = ("heartbeat_age_s", "host", "host_state")

    def __init__(self, answer: Answer, *, host: str, host_state: str, heartbeat_age_s: float | None) -> None:
        super().__init__(**{name: getattr(answer, name) for name in Answer.__slots__})
        self.host = host
        self.host_state = host_state
        self.heartbeat_age_s = heartbeat_age_s

    def to_json(self) -> dict[str, object]:
        """``find --json``'s keys, then ``host``, ``host_state`` and ``heartbeat_age_s``."""
        return {
            **super().to_json(),
            "host": self.host,
            "host_state": self.host_state,
            "heartbeat_age_s": self.heartbeat_age_s,
        }


class FleetReferrer(Referrer):
    """One ``referrers --fleet`` answer: a local ``referrers`` answer plus the host that holds it."""

    __slots__ = ("heartbeat_age_s", "host", "host_state")

    def __init__(self, referrer: Referrer, *, host: str, host_state: str, heartbeat_age_s: float | None) -> None:
        super().__init__(**{name: getattr(referrer, name) for name in Referrer.__slots__})
        self.host = host
        self.host_state = host_state
        self.heartbeat_age_s = heartbeat_age_s

    def to_json(self) -> dict[str, object]:
        """``referrers --json``'s keys, then ``host``, ``host_state`` and ``heartbeat_age_s``."""
        return {
            **super().to_json(),
            "host": self.host,
            "host_state": self.host_state,
            "heartbeat_age_s": self.heartbeat_age_s,
        }


class FleetReferrers(list[FleetReferrer]):
    """What :meth:`Fleet.referrers` found: the referrers, the digests looked for (``subjects``), and
    warnings about rows dropped as malformed."""

    def __init__(
        self, referrers: Sequence[FleetReferrer] = (), subjects: Sequence[str] = (), warnings: Sequence[str] = ()
    ) -> None:
        super().__init__(referrers)
        self.subjects = list(subjects)
        self.warnings = list(warnings)


class FleetMatches(list[FleetAnswer]):
    """What :meth:`Fleet.find` found: the answers, and warnings about rows dropped as malformed."""

    def __init__(self, answers: Sequence[FleetAnswer] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(answers)
        self.warnings = list(warnings)


class HostRows(list[dict[str, object]]):
    """What :meth:`Fleet.hosts` found: one dict per host, and warnings about values dropped as malformed."""

    def __init__(self, rows: Sequence[dict[str, object]] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(rows)
        self.warnings = list(warnings)


# -- validating what the fleet holds --------------------------------------------------------------
#
# A row is published by its host, or left by a restore, or planted by hand: a reader trusts none of
# it. Each row is checked against what ocidx's own publisher writes (the SQLite index's rows, whose
# JSON columns ocidx's writer encoded); a row that fails is dropped and counted against its host.

MAX_PATH_BYTES = 4096  # PATH_MAX: no layout directory has a longer absolute path
_HOWS = frozenset((names_mod.HOW_CONTAINERD, names_mod.HOW_TAG, names_mod.HOW_FULL, names_mod.HOW_FAMILIAR))
_STATES = frozenset(("ok", "error"))


class Malformed(Exception):
    """A row of the fleet that is not what a publisher writes; the message says what is wrong with it,
    ``table`` (when given) where the wrong column comes from."""

    def __init__(self, message: str, table: str | None = None) -> None:
        super().__init__(message)
        self.table = table


def _integer(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value < 2**63:
        raise Malformed(f"{what} is {value!r}, not an integer from {low}")
    return value


def _text(value: object, what: str) -> str:
    if type(value) is not str:
        raise Malformed(f"{what} is not text")
    return value


def _json(value: object, what: str) -> object:
    try:
        return json.loads(_text(value, what))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise Malformed(f"{what} is not valid JSON") from None


def _strings(value: object, what: str) -> list[str]:
    """A JSON column holding NULL or a list of strings (invalid names, warnings)."""
    if value is None:
        return []
    found = _json(value, what)
    if type(found) is not list or not all(type(item) is str for item in found):
        raise Malformed(f"{what} is not a JSON list of strings")
    return found


def annotations_of(value: object, what: str = "annotations") -> dict[str, str]:
    """The annotations column: a JSON object of strings."""
    found = _json(value, what)
    if type(found) is not dict or not all(type(item) is str for item in found.values()):
        raise Malformed(f"{what} is not a JSON object of strings")
    return found


def platform_of(value: object, what: str = "platform") -> dict[str, object] | None:
    """The platform column: NULL, or a JSON object whose ``os`` and ``architecture`` are strings and whose
    ``variant`` is a string or null (keys a later ocidx may add are left alone)."""
    if value is None:
        return None
    return _platform(_json(value, what), what)


def _platform(found: object, what: str) -> dict[str, object]:
    if (
        type(found) is not dict
        or type(found.get("os")) is not str
        or type(found.get("architecture")) is not str
        or type(found.get("variant")) not in (str, type(None))
    ):
        raise Malformed(f"{what} is not a JSON object with os and architecture strings")
    return found


_IMAGE_KEYS = frozenset(("config", "layers", "image_size", "created", "platform"))


def image_of(value: object, what: str = "image") -> dict[str, object] | None:
    """The image column of an entry or child: NULL, or the JSON object the publisher writes
    (:func:`indexer.query.image_fields`): ``config`` a digest or null, ``layers`` and ``image_size``
    counts or null, ``created`` a time (a short string) or null, ``platform`` null or as the platform
    column."""
    if value is None:
        return None
    found = _json(value, what)
    if type(found) is not dict or set(found) != _IMAGE_KEYS:
        raise Malformed(f"{what} is not a JSON object of {', '.join(sorted(_IMAGE_KEYS))}")
    if found["config"] is not None:
        digest_of(found["config"], f"{what} config")
    for key in ("layers", "image_size"):
        if found[key] is not None:
            _integer(found[key], f"{what} {key}")
    created = found["created"]
    if created is not None and (type(created) is not str or len(created) > MAX_CREATED):
        raise Malformed(f"{what} created is not a time")
    if found["platform"] is not None:
        _platform(found["platform"], f"{what} platform")
    return found


def digest_of(value: object, what: str = "digest") -> str:
    """A digest go-digest accepts."""
    if type(value) is not str or not reference.is_digest(value):
        raise Malformed(f"{what} {printable(str(value)[:80])!r} is not a valid digest")
    return value


def path_of(value: object) -> str:
    """A layout's path: the bytes of a normalized absolute path, without NUL, at most PATH_MAX long."""
    if type(value) is not bytes:
        raise Malformed("path is not bytes")
    if (
        not value.startswith(b"/")
        or b"\0" in value
        or len(value) > MAX_PATH_BYTES
        or os.path.normpath(value) != value
        or value.startswith(b"//")
    ):
        raise Malformed(f"path {printable(os.fsdecode(value[:200]))!r} is not a normalized absolute path")
    return os.fsdecode(value)


def name_of(row: Sequence[object]) -> Name:
    """A names row's (name, tag, how): a canonical repository or '', a valid tag or '', a known way."""
    name, tag, how = row
    if type(name) is not str or (name and not reference.ANCHORED_NAME_RE.match(name)):
        raise Malformed(f"name {printable(str(name)[:80])!r} is not a repository name")
    if type(tag) is not str or (tag and not reference.is_tag(tag)):
        raise Malformed(f"tag {printable(str(tag)[:80])!r} is not a valid tag")
    if how not in _HOWS:
        raise Malformed(f"how {printable(str(how)[:80])!r} is not one of {', '.join(sorted(_HOWS))}")
    return Name(name, tag, how)


class Dropped:
    """The rows a reader dropped as malformed: per host how many and why the first was, per layout how many."""

    def __init__(self) -> None:
        self.hosts: dict[str, tuple[int, str]] = {}
        self.layouts: dict[tuple[str, int], int] = {}

    def add(self, host: object, layout_id: object, table: str, why: str) -> None:
        """Count one dropped row of *table* published by *host* (in layout *layout_id* when known)."""
        name = host if type(host) is str else repr(host)
        count, first = self.hosts.get(name, (0, f"{table}: {why}"))
        self.hosts[name] = (count + 1, first)
        if type(layout_id) is int:
            self.layouts[(name, layout_id)] = self.layouts.get((name, layout_id), 0) + 1

    def warnings(self) -> list[str]:
        """One warning per host that had rows dropped, naming it."""
        return [
            f"host {host}: {count} malformed row{'s' if count != 1 else ''} dropped (the first: {first})"
            for host, (count, first) in sorted(self.hosts.items())
        ]

    def about(self, host: str, layout_id: int) -> list[str]:
        """The warning an answer from this layout carries when rows of it were dropped."""
        count = self.layouts.get((host, layout_id))
        if not count:
            return []
        return [f"host {host} published {count} malformed row{'s' if count != 1 else ''} for this layout: dropped"]


class _Hit:
    """One row a lookup reached on one host, checked."""

    __slots__ = (
        "annotations",
        "digest",
        "entry_position",
        "host",
        "image",
        "layout_id",
        "media_type",
        "platform",
        "size",
        "source",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, position, entry_position, digest, media_type, size, platform, annotations = row[:9]
        invalid_names, warnings, source, image = row[9:13]
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        _integer(position, "position")
        self.entry_position: int = _integer(entry_position, "entry_position")
        self.digest: str = digest_of(digest)
        self.media_type: str = _text(media_type, "mediaType")
        self.size: int = _integer(size, "size")
        self.platform: dict[str, object] | None = platform_of(platform)
        self.annotations: dict[str, str] = annotations_of(annotations)
        _strings(invalid_names, "invalid_names")
        _strings(warnings, "warnings")
        self.source: str = source
        self.image: dict[str, object] | None = image_of(image)


class _Use:
    """One row of ``ocidx.graph_users``, checked: a layout on one host whose manifest *manifest* uses the
    digest looked for as its config or a layer, with the blob's media type and size as that manifest
    says, and whether the layout lacks the blob."""

    __slots__ = ("host", "layout_id", "manifest", "media_type", "missing", "size", "source")

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, manifest, source, media_type, size, missing = row
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        self.manifest: str = digest_of(manifest, "manifest")
        if source not in ("config", "layer"):
            raise Malformed(f"source {printable(str(source)[:40])!r} is not config or layer")
        self.source: str = source
        self.media_type: str = _text(media_type, f"the {source}'s mediaType")
        self.size: int = _integer(size, f"the {source}'s size")
        self.missing: bool = missing is True


_REFERRER_HOWS = {"subject": "graph_manifests", "attestation": "graph_attestations"}
_FALLBACK_HOWS = {"fallback-tag": "entries", "fallback-child": "children"}


class _Referring:
    """One row of ``ocidx.referrers``, checked: a manifest or index in a layout of one host that refers to
    a target (``how``, ``subject``), or is named by a fallback tag, with the target or tag it was found by
    (``matched``) and its graph row's artifactType and annotations when the host has one."""

    __slots__ = (
        "annotations",
        "artifact_type",
        "digest",
        "entry_position",
        "host",
        "how",
        "layout_id",
        "matched",
        "media_type",
        "subject",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, entry_position, digest, media_type, how, subject, matched = row[:8]
        artifact_type, config_media_type, annotations = row[8:]
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        self.entry_position: int = _integer(entry_position, "entry_position")
        self.digest: str = digest_of(digest)
        self.media_type: str = _text(media_type, "mediaType")
        if how not in _REFERRER_HOWS and how not in _FALLBACK_HOWS:
            raise Malformed(f"how {printable(str(how)[:40])!r} is not a way of referring")
        self.how: str = how
        self.subject: str | None = digest_of(subject, "subject") if how in _REFERRER_HOWS else None
        self.matched: str = _text(matched, "the target or tag")
        # A manifest the host read has its graph row (artifactType is never NULL there); as the OCI
        # referrers API, artifactType is the manifest's, else its config's media type.
        self.artifact_type: str | None = None
        self.annotations: dict[str, str] = {}
        if artifact_type is not None:
            try:
                self.artifact_type = _text(artifact_type, "artifactType") or (
                    _text(config_media_type, "the config's mediaType") if config_media_type is not None else ""
                )
                self.annotations = annotations_of(annotations) if annotations is not None else {}
            except Malformed as exc:
                raise Malformed(str(exc), "graph_manifests") from None

    @staticmethod
    def table(row: Sequence[Any], exc: Malformed) -> str:
        """The table a malformed row is counted against."""
        return exc.table or _REFERRER_HOWS.get(row[5]) or _FALLBACK_HOWS.get(row[5]) or "graph_manifests"


class Fleet:
    """``find --fleet`` and ``hosts`` over the fleet database, as a Python API."""

    def __init__(self, dsn: str | None = None, *, config: Config | str | None = None) -> None:
        self.config = config if isinstance(config, config_mod.Config) else config_mod.load(config)
        self.dsn = dsn or config_mod.fleet_dsn(self.config)
        if not self.dsn:
            raise FleetUnavailable(NO_FLEET)
        self.stale_after_s = self.config.fleet.stale_after_s
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    @property
    def conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, opened, its waits bounded and its schema checked on first use."""
        if self._conn is None:
            conn = connect(self.dsn)
            try:
                bounds = bounds_sql(lock_s=READ_LOCK_TIMEOUT_S, statement_s=READ_STATEMENT_TIMEOUT_S)
                self._guarded(lambda: conn.execute(bounds))
                self._guarded(lambda: check_schema(conn))
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guarded(self, fn: Callable[[], T]) -> T:
        """Run *fn*; a PostgreSQL failure mid-way (a restart, a failover, a timeout) is FleetUnavailable, exit 4."""
        import psycopg

        try:
            return fn()
        except psycopg.Error as exc:
            self.close()
            why = failure(exc, lock_s=READ_LOCK_TIMEOUT_S, statement_s=READ_STATEMENT_TIMEOUT_S)
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                why += ": an administrator's migration or maintenance may be holding the fleet's tables"
            raise FleetUnavailable(f"the fleet database failed ({describe_dsn(self.dsn)}): {why}") from None

    def _host_states(self, dropped: Dropped) -> dict[str, tuple[str, float | None, object]]:
        """Every host's (state, heartbeat age in seconds by the server's clock, backlog as reported, unchecked)."""
        out: dict[str, tuple[str, float | None, object]] = {}
        for host, age, backlog in self.conn.execute("SELECT * FROM ocidx.hosts()"):
            if type(host) is not str or not host:
                dropped.add(host, None, "hosts", "the host is not a name")
                continue
            age_s = None if age is None else round(max(0.0, float(age)), 3)
            state = LIVE if age_s is not None and age_s <= self.stale_after_s else STALE
            out[host] = (state, age_s, backlog)
        return out

    def _hits(self, dropped: Dropped, lookup: db.Lookup, only: Sequence[tuple[str, int]] | None = None) -> list[_Hit]:
        """The checked rows one lookup reaches (in the layouts *only*, when given)."""
        args: tuple[object, ...] = (lookup.table, list(lookup.columns), list(lookup.values))
        sql = "SELECT * FROM ocidx.lookup(%s, %s::text[], %s::text[])"
        if only is not None:
            sql = "SELECT * FROM ocidx.lookup(%s, %s::text[], %s::text[], %s::text[], %s::bigint[])"
            args += ([k[0] for k in only], [k[1] for k in only])
        out: list[_Hit] = []
        for row in self.conn.execute(sql, args):
            try:
                out.append(_Hit(row))
            except Malformed as exc:
                dropped.add(row[0], row[1], "children" if row[11] == "child" else "entries", str(exc))
        return out

    def find(self, ref: str) -> FleetMatches:
        """Every match of REF (the forms of ``find``) on every host, by host, layout and digest."""
        query = parse_ref(ref)  # a bad reference is exit 2 before any connection
        return self._guarded(lambda: self._find(query))

    def _find(self, query: Query) -> FleetMatches:
        conn = self.conn
        dropped = Dropped()
        found: list[_Hit] = []
        for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest):
            found.extend(self._hits(dropped, lookup))
        uses: list[_Use] = []
        if query.digest is not None and query.name is None and query.tag is None:
            # As find: a layout where the digest is an image is answered as that, not as a layer.
            images = {(h.host, h.layout_id) for h in found}
            uses = [u for u in self._uses(dropped, query.digest) if (u.host, u.layout_id) not in images]
        if not found and not uses:
            return FleetMatches(warnings=dropped.warnings())
        keys = sorted({(h.host, h.layout_id) for h in found} | {(u.host, u.layout_id) for u in uses})
        layouts = self._layouts(dropped, keys)
        entry_keys = sorted({(h.host, h.layout_id, h.entry_position) for h in found if h.source == "entry"})
        names: dict[tuple[str, int, int], list[Name]] = {}
        for host, lid, pos, *name_row in conn.execute(
            "SELECT * FROM ocidx.names_of(%s::text[], %s::bigint[], %s::integer[])",
            ([k[0] for k in entry_keys], [k[1] for k in entry_keys], [k[2] for k in entry_keys]),
        ):
            try:
                names.setdefault((host, lid, pos), []).append(name_of(name_row))
            except Malformed as exc:
                dropped.add(host, lid, "names", str(exc))
        if query.digest is not None and (query.tag or query.name):
            # A search, as local find: only the layouts where the name or tag points at the digest.
            for key in self._mismatches(dropped, query, keys, layouts):
                layouts.pop(key, None)
        states = self._host_states(dropped)
        grouped: dict[tuple[str, int, str], list[_Hit]] = {}
        for hit in found:
            if (hit.host, hit.layout_id) in layouts:  # a layout replaced between the two reads is left out
                grouped.setdefault((hit.host, hit.layout_id, hit.digest), []).append(hit)
        answers: list[FleetAnswer] = []
        for (host, lid, _digest), group in grouped.items():
            path, layout_state = layouts[(host, lid)]
            first = group[0]
            # Ordered, without repeats, in linear time (one entry can carry thousands of names).
            merged = list(
                dict.fromkeys(
                    n for hit in group if hit.source == "entry" for n in names.get((host, lid, hit.entry_position), [])
                )
            )
            host_state, age, _backlog = states.get(host, (STALE, None, None))
            answer = Answer(
                layout=path,
                digest=first.digest,
                media_type=first.media_type,
                size=first.size,
                names=merged,
                annotations=first.annotations,
                platform=first.platform,
                source=first.source,
                # A layout whose index.json is broken on its host answers from its last good rows.
                freshness=INDEXED if layout_state == "ok" else STALE,
                warnings=dropped.about(host, lid),
            )
            answer = with_image(answer, first.image)  # what the host's own find adds from its content graph
            answers.append(FleetAnswer(answer, host=host, host_state=host_state, heartbeat_age_s=age))
        if uses:
            answers.extend(self._use_answers(dropped, query.digest or "", uses, layouts, states))
        answers.sort(key=lambda a: (a.host, a.layout, a.digest))
        return FleetMatches(answers, dropped.warnings())

    def _layouts(self, dropped: Dropped, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, str]]:
        """The path and state of each layout of *keys* (host, id) still there, checked."""
        layouts: dict[tuple[str, int], tuple[str, str]] = {}
        for host, lid, path, state in self.conn.execute(
            "SELECT * FROM ocidx.layouts_of(%s::text[], %s::bigint[])", ([k[0] for k in keys], [k[1] for k in keys])
        ):
            try:
                if state not in _STATES:
                    raise Malformed(f"state {printable(str(state)[:40])!r} is not ok or error")
                layouts[(host, lid)] = (path_of(path), state)
            except Malformed as exc:
                dropped.add(host, lid, "layouts", str(exc))
        return layouts

    def _uses(self, dropped: Dropped, digest: str) -> list[_Use]:
        """The checked rows of ``ocidx.graph_users``: the layouts, on every host, whose manifests use
        *digest* as a layer or a config."""
        out: list[_Use] = []
        for row in self.conn.execute("SELECT * FROM ocidx.graph_users(%s)", (digest,)):
            try:
                out.append(_Use(row))
            except Malformed as exc:
                dropped.add(row[0], row[1], "graph_manifests", str(exc))
        return out

    def _use_answers(
        self,
        dropped: Dropped,
        digest: str,
        uses: list[_Use],
        layouts: dict[tuple[str, int], tuple[str, str]],
        states: dict[str, tuple[str, float | None, object]],
    ) -> list[FleetAnswer]:
        """The answers of a layer's or config's digest, as each host's own find gives them
        (:func:`indexer.store.read.blob_uses`, :func:`indexer.query.blob_use_answer`)."""
        by_host: dict[str, tuple[dict[int, set[str]], dict[str, tuple[str, str, int]], set[int]]] = {}
        for use in uses:
            referencing, by_manifest, lacking = by_host.setdefault(use.host, ({}, {}, set()))
            referencing.setdefault(use.layout_id, set()).add(use.manifest)
            by_manifest[use.manifest] = (use.source, use.media_type, use.size)
            if use.missing:
                lacking.add(use.layout_id)
        out: list[FleetAnswer] = []
        for host, (referencing, by_manifest, lacking) in by_host.items():
            host_state, age, _backlog = states.get(host, (STALE, None, None))
            for hit in db.blob_uses(digest, referencing, by_manifest):
                if (host, hit.layout_id) not in layouts:
                    continue
                path, layout_state = layouts[(host, hit.layout_id)]
                answer = blob_use_answer(
                    layout=path,
                    hit=hit,
                    freshness=INDEXED if layout_state == "ok" else STALE,
                    warnings=dropped.about(host, hit.layout_id),
                    lacking=hit.layout_id in lacking,
                )
                out.append(FleetAnswer(answer, host=host, host_state=host_state, heartbeat_age_s=age))
        return out

    def _mismatches(
        self,
        dropped: Dropped,
        query: Query,
        keys: list[tuple[str, int]],
        layouts: dict[tuple[str, int], tuple[str, str]],
    ) -> dict[tuple[str, int], list[str]]:
        """The layouts where the query's name or tag points elsewhere, each with the mismatch message."""
        pointed: dict[tuple[str, int], set[str]] = {key: set() for key in keys}
        for hit in self._hits(dropped, db.pointing_lookup(name=query.name, tag=query.tag), keys):
            pointed.setdefault((hit.host, hit.layout_id), set()).add(hit.digest)
        out: dict[tuple[str, int], list[str]] = {}
        for key, digests in pointed.items():
            if key in layouts:
                message = mismatch(query, layouts[key][0], digests)
                if message is not None:
                    out[key] = [message]
        return out

    def referrers(self, target: str, *, index: Index | None = None) -> FleetReferrers:
        """Every manifest or index, on every host, that refers to TARGET's image, by the rules of
        ``referrers`` (its ``subject``, a BuildKit attestation manifest, a fallback tag), as each host's
        own ``referrers`` finds them; by host, layout, subject, how and digest.

        TARGET is ``@DIGEST`` (or a bare digest), a name (every digest :meth:`find` finds for it on any
        host), or ``oci-layout://...``, resolved in the local index (*index*, else the configured one).
        """
        if target.startswith(SCHEME):
            if index is None:
                from indexer.query import Index

                with Index(config=self.config) as local:
                    digests = {local.resolve(target).digest}
            else:
                digests = {index.resolve(target).digest}
            return self._guarded(lambda: self._referrers(sorted(digests), Dropped()))
        query = parse_ref(target)  # a bad reference is exit 2 before any connection
        if query.digest is not None and query.name is None and query.tag is None:
            return self._guarded(lambda: self._referrers([query.digest or ""], Dropped()))
        return self._guarded(lambda: self._referrers_of_name(query))

    def _referrers_of_name(self, query: Query) -> FleetReferrers:
        found = self._find(query)
        digests = sorted({a.digest for a in found if a.source in ("entry", "child")})
        if not digests:
            raise NotFound(f"{query.describe()} not found on any host of the fleet")
        referrers = self._referrers(digests, Dropped())
        referrers.warnings[:0] = [w for w in found.warnings if w not in referrers.warnings]
        return referrers

    def _referrers(self, targets: list[str], dropped: Dropped) -> FleetReferrers:
        conn = self.conn
        tag_targets = {tag: target for target in targets for tag in db.fallback_tags(target)}
        rows: list[_Referring] = []
        for raw in conn.execute("SELECT * FROM ocidx.referrers(%s::text[], %s::text[])", (targets, list(tag_targets))):
            try:
                rows.append(_Referring(raw))
            except Malformed as exc:
                dropped.add(raw[0], raw[1], _Referring.table(raw, exc), str(exc))
        # As referrers on one host (indexer.store.read.referrer_hits), per target: what refers to it by its
        # subject, the attestation manifests listed for it, those it lists (an index), and its fallback
        # tags; the first way a referrer is found in a layout is the one answered.
        found: dict[tuple[str, str, int, str, str], tuple[_Referring, str]] = {}

        def add(target: str, row: _Referring, how: str, subject: str) -> None:
            found.setdefault((target, row.host, row.layout_id, row.digest, how), (row, subject))

        def order(row: _Referring) -> tuple[int, int]:
            if row.how == "subject":
                return (0, row.entry_position)
            if row.how == "attestation":
                return (1 if row.subject == row.matched else 2, row.entry_position)
            return (3, row.entry_position)

        children: dict[tuple[str, int, int, str], list[_Referring]] = {}
        for row in sorted(rows, key=order):
            if row.how == "fallback-child":
                children.setdefault((row.host, row.layout_id, row.entry_position, row.matched), []).append(row)
            elif row.how != "fallback-tag" and row.subject is not None:
                add(row.matched, row, row.how, row.subject)
        for row in sorted(rows, key=order):
            if row.how != "fallback-tag" or row.matched not in tag_targets:
                continue
            target = tag_targets[row.matched]
            if row.matched == db.fallback_tags(target)[0] and row.media_type in INDEX_MEDIA_TYPES:
                # The OCI fallback tag names an index whose descriptors are the referrers themselves.
                for child in children.get((row.host, row.layout_id, row.entry_position, row.matched), []):
                    add(target, child, "fallback-tag", target)
            else:
                add(target, row, "fallback-tag", target)
        keys = sorted({(key[1], key[2]) for key in found})
        layouts = self._layouts(dropped, keys) if keys else {}
        states = self._host_states(dropped)
        out: list[FleetReferrer] = []
        for key, (row, subject) in found.items():
            if (row.host, row.layout_id) not in layouts:
                continue  # replaced between the reads
            referrer = Referrer(
                layout=layouts[(row.host, row.layout_id)][0],
                digest=row.digest,
                media_type=row.media_type,
                artifact_type=row.artifact_type,
                subject=subject,
                annotations=row.annotations,
                how=key[4],
            )
            host_state, age, _backlog = states.get(row.host, (STALE, None, None))
            out.append(FleetReferrer(referrer, host=row.host, host_state=host_state, heartbeat_age_s=age))
        out.sort(key=lambda r: (r.host, r.layout, r.subject, r.how, r.digest))
        return FleetReferrers(out, targets, dropped.warnings())

    def hosts(self) -> HostRows:
        """Every host: ``host``, ``host_state``, ``heartbeat_age_s``, ``layouts``, ``entries``, ``backlog``."""
        return self._guarded(self._hosts)

    def _hosts(self) -> HostRows:
        dropped = Dropped()
        states = self._host_states(dropped)
        counts: dict[str, tuple[int, int | None]] = {}
        for host, n, entries in self.conn.execute("SELECT * FROM ocidx.host_counts()"):
            if type(entries) is not int or entries < 0:  # the sum of what the host said its layouts hold
                dropped.add(host, None, "layouts", f"the entry counts add up to {entries!r}")
                entries = None
            counts[host] = (int(n), entries)
        out: list[dict[str, object]] = []
        for host in sorted(states):
            state, age, backlog = states[host]
            if backlog is not None and (type(backlog) is not int or backlog < 0):
                dropped.add(host, None, "heartbeats", f"backlog is {backlog!r}, not a count")
                backlog = None
            layouts, entries = counts.get(host, (0, 0))
            out.append(
                {
                    "host": host,
                    "host_state": state,
                    "heartbeat_age_s": age,
                    "layouts": layouts,
                    "entries": entries,
                    "backlog": backlog,
                }
            )
        return HostRows(out, dropped.warnings())
