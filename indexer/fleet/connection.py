"""Reaching the fleet database: the driver, connections and their bounds, the schema's migrations.

What readers (:mod:`indexer.fleet.reader`), publishers (:mod:`indexer.fleet.publish`) and the
administrator's commands (:mod:`indexer.fleet.admin`) share: a DSN described without its secrets,
a connection that says why it could not be made, the statement that bounds a session's waits, what
a PostgreSQL error means for a message, and whether the database holds exactly the fleet schema this
ocidx knows (``migrations/postgres``).
"""

from __future__ import annotations

from indexer.errors import DatabaseError, FleetUnavailable, SchemaTooNew
from indexer.store import migration_files

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    import psycopg

MIGRATIONS = "postgres"  # migrations/postgres/NNNN_name.sql
CONNECT_TIMEOUT_S = 10


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
