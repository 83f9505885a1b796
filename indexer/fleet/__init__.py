"""The fleet: one index across many hosts, in PostgreSQL (docs/fleet.md).

Each host keeps its own SQLite index; a daemon with a fleet DSN publishes it as the PostgreSQL role
it connects as, and readers ask across every host. Hosts and readers reach the database only
through the ``SECURITY DEFINER`` functions of schema ``ocidx`` (``migrations/postgres``). The parts:

* :mod:`indexer.fleet.connection`: connections, their bounds, the schema's migrations;
* the reading side: :class:`Fleet` (:mod:`indexer.fleet.reader`) answers ``find --fleet``,
  ``referrers --fleet`` and ``hosts`` from the rows :mod:`indexer.fleet.reads` reads and
  :mod:`indexer.fleet.checks` checks, by the rules of :mod:`indexer.fleet.answers`;
* the publishing side: :class:`indexer.fleet.publisher.Publisher`, the daemon's, reads the host's
  index (:mod:`indexer.fleet.local`) and writes it (:mod:`indexer.fleet.publish`);
* :mod:`indexer.fleet.admin`: ``ocidx fleet migrate``, ``add-host`` and ``remove-host``.

Nothing here is imported by a lookup without ``--fleet``: psycopg is an optional extra
(``pip install 'ocidx[fleet]'``).
"""

from __future__ import annotations

from indexer.fleet.answers import FleetAnswer, FleetMatches, FleetReferrer, FleetReferrers, HostRows
from indexer.fleet.connection import (
    APPLIED_SQL,
    APPLIED_V1_SQL,
    CONNECT_TIMEOUT_S,
    MIGRATIONS,
    NO_SCHEMA,
    NOT_A_READER,
    PROBE_MIGRATIONS_SQL,
    applied_migrations,
    bounds_sql,
    check_schema,
    connect,
    describe_dsn,
    driver,
    failure,
    known_migrations,
    schema_problem,
)
from indexer.fleet.reader import NO_FLEET, READ_LOCK_TIMEOUT_S, READ_STATEMENT_TIMEOUT_S, Fleet
from indexer.fleet.reads import LIVE

__all__ = [
    "APPLIED_SQL",
    "APPLIED_V1_SQL",
    "CONNECT_TIMEOUT_S",
    "LIVE",
    "MIGRATIONS",
    "NOT_A_READER",
    "NO_FLEET",
    "NO_SCHEMA",
    "PROBE_MIGRATIONS_SQL",
    "READ_LOCK_TIMEOUT_S",
    "READ_STATEMENT_TIMEOUT_S",
    "Fleet",
    "FleetAnswer",
    "FleetMatches",
    "FleetReferrer",
    "FleetReferrers",
    "HostRows",
    "applied_migrations",
    "bounds_sql",
    "check_schema",
    "connect",
    "describe_dsn",
    "driver",
    "failure",
    "known_migrations",
    "schema_problem",
]
