"""Setting up the fleet database: ``ocidx fleet migrate``, ``add-host`` and ``remove-host``.

These run as an administrative role (one that may create roles and owns the
tables), never as a host. Migrations are the files ``migrations/postgres/NNNN_name.sql``,
forward-only, each applied in its own transaction with its row in
``ocidx_migrations``, under an advisory lock so two administrators migrating at
once apply each file once; a database with a migration this ocidx does not know
is refused (exit 4), as the SQLite index is.

An administrator's session finds the tables through its search_path (schema
``ocidx_data`` first, where migration 0002 moved them) and waits at most
ADMIN_LOCK_TIMEOUT_S for any lock: a host or reader in an open transaction, or
another administrator, makes a command fail with a clear message instead of
queueing a strong lock that every reader and publisher would then wait behind.
"""

from __future__ import annotations

import contextlib

from indexer.errors import FleetUnavailable, SchemaTooNew, UsageError
from indexer.fleet.connection import MIGRATIONS, bounds_sql, connect, describe_dsn, failure, schema_problem
from indexer.store import migration_files

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    import psycopg

# pg_advisory_lock key of the fleet migrations: "ocdx" as in the SQLite application_id.
MIGRATE_LOCK = 0x6F636478
RESERVED_PREFIXES = ("pg_", "ocidx_")
NAME_LIMIT = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
# Short: while a migration waits for a lock, every session that asks for one after it waits too.
ADMIN_LOCK_TIMEOUT_S = 5.0


@contextlib.contextmanager
def _session(admin_dsn: str, command: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """An admin connection for ``ocidx fleet COMMAND``; a PostgreSQL error is FleetUnavailable (exit 4)."""
    import psycopg

    conn = connect(admin_dsn, application=f"ocidx fleet {command}")
    try:
        conn.execute(bounds_sql(lock_s=ADMIN_LOCK_TIMEOUT_S))
        conn.execute("SELECT set_config('search_path', 'ocidx_data, ' || current_setting('search_path'), false)")
        yield conn
    except psycopg.Error as exc:
        why = failure(exc, lock_s=ADMIN_LOCK_TIMEOUT_S)
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            why += (
                " (another 'ocidx fleet' command, or a host or reader in a transaction it keeps open: "
                "see pg_stat_activity, then try again)"
            )
        raise FleetUnavailable(f"fleet {command} failed on {describe_dsn(admin_dsn)}: {why}") from None
    finally:
        conn.close()


def migrate(admin_dsn: str) -> list[str]:
    """Create or upgrade the fleet schema and its group roles; the migrations applied now."""
    with _session(admin_dsn, "migrate") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ocidx_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = [str(row[0]) for row in conn.execute("SELECT name FROM ocidx_migrations")]
        problem = schema_problem(applied)
        if isinstance(problem, SchemaTooNew):  # forward-only: never "upgrade" a newer schema
            raise problem
        done = []
        for name, path in migration_files(MIGRATIONS):
            if name in applied:
                continue
            with open(path, encoding="utf-8") as fh:
                script = fh.read()
            with conn.transaction():
                conn.execute(script)  # no parameters: a multi-statement script
                conn.execute("INSERT INTO ocidx_migrations (name) VALUES (%s)", (name,))
            done.append(name)
        return done


def check_host_name(name: str) -> None:
    """Refuse a host name that is not a plain role name of ours to create (UsageError, exit 2)."""
    if not name or len(name.encode("utf-8")) > NAME_LIMIT:
        raise UsageError(f"host name {name!r} must be 1 to {NAME_LIMIT} bytes")
    if not name.isprintable() or any(c in name for c in "\"'\\"):
        raise UsageError(f"host name {name!r} may not hold quotes, backslashes or control characters")
    if name.lower().startswith(RESERVED_PREFIXES) or name in ("public", "postgres"):
        raise UsageError(f"host name {name!r} is reserved (pg_*, ocidx_*, public, postgres)")


def _current(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    from indexer.fleet.connection import check_schema

    check_schema(conn)


def add_host(admin_dsn: str, name: str) -> dict[str, object]:
    """Create login role *name* when missing, let it publish, and register it as a host."""
    from psycopg import sql

    check_host_name(name)
    with _session(admin_dsn, "add-host") as conn:
        _current(conn)
        with conn.transaction():
            row = conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            created = row is None
            if row is None:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            elif row[0]:
                raise UsageError(
                    f"role {name!r} is a superuser or bypasses row-level security: a host must be an ordinary role"
                )
            conn.execute(sql.SQL("GRANT ocidx_publisher TO {}").format(sql.Identifier(name)))
            conn.execute("INSERT INTO hosts (host) VALUES (%s) ON CONFLICT (host) DO NOTHING", (name,))
        return {"host": name, "role_created": created}


def remove_host(admin_dsn: str, name: str) -> dict[str, object]:
    """Delete every row host *name* published and stop it publishing (its login role is kept)."""
    from psycopg import sql

    check_host_name(name)
    with _session(admin_dsn, "remove-host") as conn:
        _current(conn)
        with conn.transaction():
            layouts = conn.execute("SELECT count(*) FROM layouts WHERE host = %s", (name,)).fetchone()
            gone = conn.execute("DELETE FROM hosts WHERE host = %s", (name,)).rowcount
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None:
                conn.execute(sql.SQL("REVOKE ocidx_publisher FROM {}").format(sql.Identifier(name)))
        return {"host": name, "removed": bool(gone), "layouts": int(layouts[0]) if layouts is not None else 0}
