"""The fleet: one index across many hosts, in PostgreSQL (docs/fleet.md).

Each host keeps its own SQLite index; a daemon with a fleet DSN publishes it
(:mod:`indexer.fleet.publisher`) as the PostgreSQL role it connects as. This
module is the reading side: :class:`Fleet` answers ``find --fleet`` and
``hosts`` with psycopg's synchronous API (no event loop in a lookup), using the
reference parsing of :func:`indexer.query.parse_ref` and the matching rules of
:func:`indexer.store.read.lookups`, rendered here as PostgreSQL.

Nothing here is imported by a lookup without ``--fleet``: psycopg is an
optional extra (``pip install 'ocidx[fleet]'``).
"""

from __future__ import annotations

import json
import os

from indexer import config as config_mod
from indexer.errors import DatabaseError, FleetUnavailable, SchemaTooNew
from indexer.layout import INDEX_MEDIA_TYPES
from indexer.names import Name
from indexer.query import INDEXED, STALE, Answer, Query, Referrer, mismatch, parse_ref, with_image
from indexer.store import migration_files
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

    from collections.abc import Iterable, Sequence

    import psycopg

    from indexer.config import Config

LIVE = "live"
MIGRATIONS = "postgres"  # migrations/postgres/NNNN_name.sql
CONNECT_TIMEOUT_S = 10
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


def applied_migrations(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str] | None:
    """The fleet migrations recorded in the database, or None when it has no fleet schema."""
    import psycopg

    exists = conn.execute("SELECT to_regclass('ocidx_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    try:
        return [str(row[0]) for row in conn.execute("SELECT name FROM ocidx_migrations ORDER BY name")]
    except psycopg.errors.InsufficientPrivilege:
        raise FleetUnavailable(
            "this role may not read the fleet database: grant it ocidx_reader (or add it as a host)"
        ) from None


def check_schema(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Raise FleetUnavailable or SchemaTooNew (exit 4) unless the database has exactly our fleet schema."""
    applied = applied_migrations(conn)
    if applied is None:
        raise FleetUnavailable(
            "the fleet database has no ocidx fleet schema: run 'ocidx fleet migrate --dsn ADMIN_DSN'"
        )
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


def _checked_image(image: dict[str, object] | None, host: str) -> dict[str, object] | None:
    """A host's ``image`` column, only when it has the shape the publisher writes (a host's rows are
    its own to write: malformed ones are ignored, never let through to an answer)."""
    if image is None:
        return None
    valid = (
        isinstance(image, dict)
        and set(image) == {"config", "layers", "image_size", "created", "platform"}
        and (image["config"] is None or isinstance(image["config"], str))
        and (image["layers"] is None or type(image["layers"]) is int)
        and (image["image_size"] is None or type(image["image_size"]) is int)
        and (image["created"] is None or isinstance(image["created"], str))
        and (
            image["platform"] is None
            or (
                isinstance(image["platform"], dict)
                and all(isinstance(v, str | None) for v in image["platform"].values())
            )
        )
    )
    return image if valid else None


# The hit columns of every lookup: host, layout id, position, the entry position names hang on, digest, ...
_ENTRY_HIT = (
    "e.host, e.layout_id, e.position, e.position, e.digest, e.media_type, e.size, e.platform, e.annotations, 'entry', "
    "e.image"
)
_CHILD_HIT = (
    "c.host, c.layout_id, c.position, c.entry_position, c.digest, c.media_type, c.size, c.platform, c.annotations, "
    "'child', c.image"
)


def lookup_sql(lookup: db.Lookup) -> tuple[str, tuple[str, ...]]:
    """The PostgreSQL statement of one matching lookup (:func:`indexer.store.read.lookups`) across hosts."""
    if lookup.table == "names":
        where = " AND ".join(f"n.{column} = %s" for column in lookup.columns)
        return (
            f"SELECT DISTINCT {_ENTRY_HIT} FROM names n JOIN entries e "
            "ON e.host = n.host AND e.layout_id = n.layout_id AND e.position = n.entry_position "
            f"WHERE {where}",
            lookup.values,
        )
    where = " AND ".join(f"{lookup.table[0]}.{column} = %s" for column in lookup.columns)
    if lookup.table == "entries":
        return f"SELECT {_ENTRY_HIT} FROM entries e WHERE {where}", lookup.values
    return f"SELECT {_CHILD_HIT} FROM children c WHERE {where}", lookup.values


class _Hit:
    """One row a lookup reached on one host."""

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
        "used_by",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        self.host: str = row[0]
        self.layout_id: int = row[1]
        self.entry_position: int = row[3]
        self.digest: str = row[4]
        self.media_type: str = row[5]
        self.size: int = row[6]
        self.platform: dict[str, object] | None = json.loads(row[7]) if row[7] else None
        self.annotations: dict[str, str] = json.loads(row[8])
        self.source: str = row[9]
        self.image: dict[str, object] | None = json.loads(row[10]) if row[10] else None
        self.used_by: list[str] | None = None


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
        """The connection, opened and its schema checked on first use."""
        if self._conn is None:
            conn = connect(self.dsn)
            try:
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
        """Run *fn*; a PostgreSQL failure mid-way (a restart, a failover) is FleetUnavailable, exit 4."""
        import psycopg

        try:
            return fn()
        except psycopg.Error as exc:
            self.close()
            raise FleetUnavailable(
                f"the fleet database failed ({describe_dsn(self.dsn)}): {_first_line(exc)}"
            ) from None

    def _host_states(self) -> dict[str, tuple[str, float | None]]:
        """Every host's (state, heartbeat age in seconds by the server's clock)."""
        rows = self.conn.execute(
            "SELECT h.host, extract(epoch FROM now() - b.beat_at)::float8 FROM hosts h "
            "LEFT JOIN heartbeats b ON b.host = h.host"
        ).fetchall()
        out: dict[str, tuple[str, float | None]] = {}
        for host, age in rows:
            age_s = None if age is None else round(max(0.0, float(age)), 3)
            state = LIVE if age_s is not None and age_s <= self.stale_after_s else STALE
            out[str(host)] = (state, age_s)
        return out

    def find(self, ref: str) -> list[FleetAnswer]:
        """Every match of REF (the forms of ``find``) on every host, by host, layout and digest."""
        query = parse_ref(ref)  # a bad reference is exit 2 before any connection
        return self._guarded(lambda: self._find(query))

    def _find(self, query: Query) -> list[FleetAnswer]:
        conn = self.conn
        found: list[_Hit] = []
        for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest):
            sql, values = lookup_sql(lookup)
            found.extend(_Hit(row) for row in conn.execute(sql, values))
        if query.digest is not None and query.name is None and query.tag is None:
            found.extend(self._graph_hits(query.digest, {(h.host, h.layout_id) for h in found}))
        if not found:
            return []
        keys = sorted({(h.host, h.layout_id) for h in found})
        layouts = {
            (str(host), int(lid)): (os.fsdecode(bytes(path)), str(state))
            for host, lid, path, state in conn.execute(
                "SELECT l.host, l.id, l.path, l.state FROM layouts l "
                "JOIN unnest(%s::text[], %s::bigint[]) AS k (host, id) ON l.host = k.host AND l.id = k.id",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
        }
        entry_keys = sorted({(h.host, h.layout_id, h.entry_position) for h in found if h.source == "entry"})
        names: dict[tuple[str, int, int], list[Name]] = {}
        for host, lid, pos, name, tag, how in conn.execute(
            "SELECT n.host, n.layout_id, n.entry_position, n.name, n.tag, n.how FROM names n "
            "JOIN unnest(%s::text[], %s::bigint[], %s::integer[]) AS k (host, layout_id, position) "
            "ON n.host = k.host AND n.layout_id = k.layout_id AND n.entry_position = k.position "
            "ORDER BY n.host, n.layout_id, n.entry_position, n.ordinal",
            ([k[0] for k in entry_keys], [k[1] for k in entry_keys], [k[2] for k in entry_keys]),
        ):
            names.setdefault((str(host), int(lid), int(pos)), []).append(Name(str(name), str(tag), str(how)))
        if query.digest is not None and (query.tag or query.name):
            # A search, as local find: only the layouts where the name or tag points at the digest.
            for key in self._mismatches(query, keys, layouts):
                layouts.pop(key, None)
        states = self._host_states()
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
            host_state, age = states.get(host, (STALE, None))
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
                warnings=[],
                used_by=first.used_by,
            )
            answer = with_image(answer, _checked_image(first.image, host))
            answers.append(FleetAnswer(answer, host=host, host_state=host_state, heartbeat_age_s=age))
        answers.sort(key=lambda a: (a.host, a.layout, a.digest))
        return answers

    def _graph_hits(self, digest: str, holding: set[tuple[str, int]]) -> list[_Hit]:
        """The layouts, on every host, whose manifests use *digest* as a layer or a config (``find
        --fleet @DIGEST``), as hits with ``used_by``; a layout where it is an image itself is left out."""
        users: dict[str, dict[str, tuple[str, str, int]]] = {}  # host -> manifest -> (source, type, size)
        for host, manifest, layers, types, sizes, config, config_type, config_size in self.conn.execute(
            "SELECT host, digest, layers, layer_types, layer_sizes, config, config_media_type, config_size "
            "FROM graph_manifests WHERE layers @> ARRAY[%s] OR config = %s",
            (digest, digest),
        ):
            if config == digest:
                users.setdefault(str(host), {})[str(manifest)] = (
                    "config",
                    str(config_type or ""),
                    int(config_size or 0),
                )
            elif isinstance(layers, list) and digest in layers:
                at = layers.index(digest)
                users.setdefault(str(host), {})[str(manifest)] = ("layer", str(types[at]), int(sizes[at]))
        if not users:
            return []
        pairs = [(host, manifest) for host, mine in users.items() for manifest in mine]
        hits: dict[tuple[str, int, str], _Hit] = {}
        for host, lid, manifest in self.conn.execute(
            "SELECT DISTINCT e.host, e.layout_id, e.digest FROM entries e "
            "JOIN unnest(%s::text[], %s::text[]) AS k (host, digest) ON e.host = k.host AND e.digest = k.digest "
            "UNION SELECT DISTINCT c.host, c.layout_id, c.digest FROM children c "
            "JOIN unnest(%s::text[], %s::text[]) AS k (host, digest) ON c.host = k.host AND c.digest = k.digest",
            ([p[0] for p in pairs], [p[1] for p in pairs], [p[0] for p in pairs], [p[1] for p in pairs]),
        ):
            host, lid = str(host), int(lid)
            if (host, lid) in holding:
                continue
            source, media_type, size = users[host][str(manifest)]
            hit = hits.get((host, lid, source))
            if hit is None:
                hit = hits[(host, lid, source)] = _Hit(
                    (host, lid, -1, -1, digest, media_type, size, None, "{}", source, None)
                )
                hit.used_by = []
            assert hit.used_by is not None
            hit.used_by.append(str(manifest))
        for hit in hits.values():
            hit.used_by = sorted(set(hit.used_by or []))
        return list(hits.values())

    def referrers(self, digests: Iterable[str]) -> list[FleetReferrer]:
        """Every manifest or index, on every host, that refers to one of *digests* (``referrers --fleet``),
        as ``referrers`` finds them on one host; by host, layout, subject, how and digest."""
        return self._guarded(lambda: self._referrers(sorted(set(digests))))

    def _referrers(self, targets: list[str]) -> list[FleetReferrer]:
        conn = self.conn
        found: dict[tuple[str, int, str, str], tuple[str, str]] = {}  # (host, layout, digest, how) -> (type, subject)
        for host, lid, digest, media_type, subject in conn.execute(
            "SELECT e.host, e.layout_id, e.digest, e.media_type, g.subject FROM graph_manifests g "
            "JOIN entries e ON e.host = g.host AND e.digest = g.digest WHERE g.subject = ANY(%s) "
            "UNION SELECT c.host, c.layout_id, c.digest, c.media_type, g.subject FROM graph_manifests g "
            "JOIN children c ON c.host = g.host AND c.digest = g.digest WHERE g.subject = ANY(%s)",
            (targets, targets),
        ):
            found.setdefault((str(host), int(lid), str(digest), "subject"), (str(media_type), str(subject)))
        for host, lid, digest, media_type, target in conn.execute(
            "SELECT c.host, c.layout_id, c.digest, c.media_type, a.target FROM graph_attestations a "
            "JOIN children c ON c.host = a.host AND c.digest = a.digest AND c.parent = a.index_digest "
            "WHERE a.target = ANY(%s) OR a.index_digest = ANY(%s)",
            (targets, targets),
        ):
            found.setdefault((str(host), int(lid), str(digest), "attestation"), (str(media_type), str(target)))
        tags = {tag: target for target in targets for tag in db.fallback_tags(target)}
        fallback_index = {db.fallback_tags(target)[0] for target in targets}
        for host, lid, position, digest, media_type, tag in conn.execute(
            "SELECT e.host, e.layout_id, e.position, e.digest, e.media_type, n.tag FROM names n JOIN entries e "
            "ON e.host = n.host AND e.layout_id = n.layout_id AND e.position = n.entry_position "
            "WHERE n.tag = ANY(%s)",
            (list(tags),),
        ):
            key = (str(host), int(lid))
            if tag in fallback_index and media_type in INDEX_MEDIA_TYPES:
                for child, child_type in conn.execute(
                    "SELECT digest, media_type FROM children WHERE host = %s AND layout_id = %s "
                    "AND entry_position = %s AND depth = 1 ORDER BY position",
                    (*key, position),
                ):
                    found.setdefault((*key, str(child), "fallback-tag"), (str(child_type), tags[tag]))
            else:
                found.setdefault((*key, str(digest), "fallback-tag"), (str(media_type), tags[tag]))
        if not found:
            return []
        keys = sorted({(k[0], k[1]) for k in found})
        layouts = {
            (str(host), int(lid)): os.fsdecode(bytes(path))
            for host, lid, path in conn.execute(
                "SELECT l.host, l.id, l.path FROM layouts l "
                "JOIN unnest(%s::text[], %s::bigint[]) AS k (host, id) ON l.host = k.host AND l.id = k.id",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
        }
        manifests: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        pairs = sorted({(k[0], k[2]) for k in found})
        for host, digest, artifact_type, config_type, notes in conn.execute(
            "SELECT g.host, g.digest, g.artifact_type, g.config_media_type, g.annotations FROM graph_manifests g "
            "JOIN unnest(%s::text[], %s::text[]) AS k (host, digest) ON g.host = k.host AND g.digest = k.digest",
            ([p[0] for p in pairs], [p[1] for p in pairs]),
        ):
            manifests[(str(host), str(digest))] = (str(artifact_type or config_type or ""), json.loads(notes or "{}"))
        states = self._host_states()
        out: list[FleetReferrer] = []
        for (host, lid, digest, how), (media_type, subject) in found.items():
            if (host, lid) not in layouts:
                continue  # replaced between the reads
            known = manifests.get((host, digest))
            referrer = Referrer(
                layout=layouts[(host, lid)],
                digest=digest,
                media_type=media_type,
                artifact_type=known[0] if known is not None else None,
                subject=subject,
                annotations=known[1] if known is not None else {},
                how=how,
            )
            host_state, age = states.get(host, (STALE, None))
            out.append(FleetReferrer(referrer, host=host, host_state=host_state, heartbeat_age_s=age))
        out.sort(key=lambda r: (r.host, r.layout, r.subject, r.how, r.digest))
        return out

    def _mismatches(
        self, query: Query, keys: list[tuple[str, int]], layouts: dict[tuple[str, int], tuple[str, str]]
    ) -> dict[tuple[str, int], list[str]]:
        """The layouts where the query's name or tag points elsewhere, each with the mismatch message."""
        sql, values = lookup_sql(db.pointing_lookup(name=query.name, tag=query.tag))
        pointed: dict[tuple[str, int], set[str]] = {key: set() for key in keys}
        for row in self.conn.execute(
            f"{sql} AND (e.host, e.layout_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))",
            (*values, [k[0] for k in keys], [k[1] for k in keys]),
        ):
            pointed.setdefault((str(row[0]), int(row[1])), set()).add(str(row[4]))
        out: dict[tuple[str, int], list[str]] = {}
        for key, digests in pointed.items():
            if key in layouts:
                message = mismatch(query, layouts[key][0], digests)
                if message is not None:
                    out[key] = [message]
        return out

    def hosts(self) -> list[dict[str, object]]:
        """Every host: ``host``, ``host_state``, ``heartbeat_age_s``, ``layouts``, ``entries``, ``backlog``."""
        return self._guarded(self._hosts)

    def _hosts(self) -> list[dict[str, object]]:
        states = self._host_states()
        counts = {
            str(host): (int(n), int(entries))
            for host, n, entries in self.conn.execute(
                "SELECT host, count(*), coalesce(sum(entry_count), 0) FROM layouts GROUP BY host"
            )
        }
        backlogs = {
            str(host): int(backlog) for host, backlog in self.conn.execute("SELECT host, backlog FROM heartbeats")
        }
        out: list[dict[str, object]] = []
        for host in sorted(states):
            state, age = states[host]
            layouts, entries = counts.get(host, (0, 0))
            out.append(
                {
                    "host": host,
                    "host_state": state,
                    "heartbeat_age_s": age,
                    "layouts": layouts,
                    "entries": entries,
                    "backlog": backlogs.get(host),
                }
            )
        return out
