"""The fleet's Python API for readers: :class:`Fleet` (``find --fleet``, ``referrers --fleet``, ``hosts``).

It holds one connection (psycopg's synchronous API: no event loop in a lookup), bounds every
statement by ``lock_timeout`` and ``statement_timeout``, checks the schema on first use, and turns
any PostgreSQL failure mid-way into :class:`~indexer.errors.FleetUnavailable` (exit 4). Each call
reads through :class:`~indexer.fleet.reads.Reads` and answers by :mod:`indexer.fleet.answers`.
"""

from __future__ import annotations

from indexer import config as config_mod
from indexer.errors import FleetUnavailable
from indexer.fleet import answers
from indexer.fleet.connection import bounds_sql, check_schema, connect, describe_dsn, failure
from indexer.fleet.reads import Reads
from indexer.query import SCHEME, parse_ref

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    import psycopg

    from indexer.config import Config
    from indexer.fleet.answers import FleetMatches, FleetReferrers, HostRows
    from indexer.query import Index

    T = TypeVar("T")

# A reader waits this long for a lock (only an administrator's migration or maintenance takes one that
# conflicts with reading), and this long for any one statement, then fails with exit 4.
READ_LOCK_TIMEOUT_S = 10.0
READ_STATEMENT_TIMEOUT_S = 60.0
NO_FLEET = "no fleet database is configured: set [fleet] dsn in the config file or $OCIDX_FLEET_DSN"


class Fleet:
    """``find --fleet``, ``referrers --fleet`` and ``hosts`` over the fleet database, as a Python API.

    *dsn* defaults to ``$OCIDX_FLEET_DSN``, then ``[fleet] dsn`` of *config* (a path or a
    :class:`~indexer.config.Config`; default: the user's config file).
    """

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

    def _reads(self) -> Reads:
        return Reads(self.conn, stale_after_s=self.stale_after_s)

    def find(self, ref: str) -> FleetMatches:
        """Every match of REF (the forms of ``find``) on every host, by host, layout and digest."""
        query = parse_ref(ref)  # a bad reference is exit 2 before any connection
        return self._guarded(lambda: answers.find(self._reads(), query))

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
                    digest = local.resolve(target).digest
            else:
                digest = index.resolve(target).digest
            return self._guarded(lambda: answers.referrers(self._reads(), [digest]))
        query = parse_ref(target)  # a bad reference is exit 2 before any connection
        if query.digest is not None and query.name is None and query.tag is None:
            digests = [query.digest]
            return self._guarded(lambda: answers.referrers(self._reads(), digests))
        return self._guarded(lambda: answers.referrers_of_name(self._reads(), query))

    def hosts(self) -> HostRows:
        """Every host: ``host``, ``host_state``, ``heartbeat_age_s``, ``layouts``, ``entries``, ``backlog``."""
        return self._guarded(lambda: answers.hosts(self._reads()))
