"""What the fleet publisher writes to PostgreSQL, and reads back of its own host (docs/fleet.md).

A publisher writes only through the functions of schema ``ocidx`` (migration 0002; the content
graph's ``ocidx.put_graph`` in 0003), which keep a host to its own rows. One batch is one
transaction (:func:`publish_rows`), which ends by reading the fleet's incarnation; its host's
state, layouts and row counts are read back (:func:`remote_state`, :func:`remote_layouts`,
:func:`remote_summary`) to reconcile and to check them. Every statement is bounded by
``lock_timeout`` and ``statement_timeout``, and a transaction left idle by
``idle_in_transaction_session_timeout``.
"""

from __future__ import annotations

import json
import os

import anyio

from indexer.errors import FleetUnavailable
from indexer.fleet.connection import (
    APPLIED_SQL,
    APPLIED_V1_SQL,
    CONNECT_TIMEOUT_S,
    NO_SCHEMA,
    PROBE_MIGRATIONS_SQL,
    bounds_sql,
    schema_problem,
)
from indexer.fleet.local import PG_TABLES, Rows, Summary

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    import psycopg

# Every statement: a lock wait (only an administrator's DDL conflicts with publishing), a statement,
# and a transaction left idle (a publisher stopped mid-batch) are each bounded.
LOCK_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 60.0
IDLE_IN_TRANSACTION_S = 60.0


def not_a_host(role: str | None) -> FleetUnavailable:
    """The error of a role that may not publish."""
    return FleetUnavailable(
        f"role {role} is not a host of the fleet (run 'ocidx fleet add-host --dsn ADMIN_DSN {role}')"
    )


async def connect_publisher(dsn: str) -> tuple[psycopg.AsyncConnection[tuple[Any, ...]], str]:
    """A publisher's connection, its waits bounded, and the role it connects as: the host it publishes as."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="ocidx publisher"
    )
    try:
        await conn.execute(
            bounds_sql(lock_s=LOCK_TIMEOUT_S, statement_s=STATEMENT_TIMEOUT_S, idle_s=IDLE_IN_TRANSACTION_S)
        )
        row = await (await conn.execute("SELECT session_user")).fetchone()
        assert row is not None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.close()
        raise
    return conn, str(row[0])


async def check_publisher(conn: psycopg.AsyncConnection[tuple[Any, ...]], host: str) -> None:
    """Raise FleetUnavailable (or SchemaTooNew, exit 4) unless *host* may publish and the database holds
    exactly the fleet schema this ocidx knows."""
    row = await (await conn.execute("SELECT pg_has_role(session_user, 'ocidx_publisher', 'MEMBER')")).fetchone()
    if row is None or not row[0]:
        raise not_a_host(host)
    probe = await (await conn.execute(PROBE_MIGRATIONS_SQL)).fetchone()
    if probe is None or not (probe[0] or probe[1]):
        raise FleetUnavailable(NO_SCHEMA)
    cur = await conn.execute(APPLIED_SQL if probe[0] else APPLIED_V1_SQL)
    problem = schema_problem([str(r[0]) for r in await cur.fetchall()])
    if problem is not None:
        raise problem


async def remote_state(conn: psycopg.AsyncConnection[tuple[Any, ...]], host: str | None) -> tuple[int, str | None, str]:
    """The host row's watermark and the SQLite incarnation its rows came from, and the fleet's
    incarnation; :func:`not_a_host` when the host is not registered."""
    row = await (await conn.execute("SELECT * FROM ocidx.publisher_state()")).fetchone()
    if row is None or not row[0]:
        raise not_a_host(host)
    return int(row[1]), row[2], str(row[3])


async def remote_layouts(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> dict[bytes, tuple[int, int, str | None]]:
    """The host's layouts in the fleet: (id, version, content hash) by path."""
    rows = await (await conn.execute("SELECT * FROM ocidx.host_layouts()")).fetchall()
    return {bytes(path): (int(lid), int(version), content_hash) for lid, path, version, content_hash in rows}


async def remote_summary(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> tuple[Summary, object, object]:
    """The host's rows in the fleet in brief (as :func:`indexer.fleet.local.read_summary` counts them
    in SQLite), with the watermark and the SQLite incarnation its host row records."""
    row = await (await conn.execute("SELECT * FROM ocidx.host_summary()")).fetchone()
    assert row is not None
    summary = Summary(
        layouts=int(row[0]),
        checksum=int(row[1]),
        entries=int(row[2]),
        names=int(row[3]),
        children=int(row[4]),
        layout_warnings=int(row[5]),
        graph_manifests=int(row[8]),
        graph_attestations=int(row[9]),
        missing_blobs=int(row[10]),
    )
    return summary, row[6], row[7]


class FleetReplaced(Exception):
    """The fleet database is not the one the host's rows were reconciled against (restored, failed over)."""

    def __init__(self, expected: str | None, found: str) -> None:
        super().__init__(f"the fleet database's incarnation is {found}, not {expected}")
        self.expected = expected
        self.found = found


async def publish_rows(
    conn: psycopg.AsyncConnection[tuple[Any, ...]],
    rows: Rows | None,
    removed: Sequence[bytes],
    *,
    watermark: int | None,
    backlog: int | None,
    incarnation: str | None,
    fleet: str | None,
    stale_paths: Sequence[bytes] = (),
    forget: bool = False,
) -> str:
    """One PostgreSQL transaction: (forget every row of the host,) remove paths, replace whole layouts,
    add the graph's rows they name and delete those nothing names any more, move the watermark
    (recording the SQLite *incarnation*), beat; return the fleet's incarnation.

    When the fleet's incarnation is not *fleet* (the one the rows were reconciled against), the
    transaction is rolled back and :class:`FleetReplaced` raised.
    """
    async with conn.transaction():
        if forget:
            await conn.execute("SELECT ocidx.forget_host()")
        # The digests the rows deleted below named: the graph's rows that only they named go too.
        released: list[str] = []
        gone = [*removed, *stale_paths]
        if gone:
            released.extend(await _released(conn, "SELECT ocidx.remove_layouts(%s::bytea[])", (gone,)))
        if rows is not None and rows.ids:
            data = rows.tables["layouts"]
            released.extend(
                await _released(
                    conn,
                    "SELECT ocidx.put_layouts(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], "
                    "%s::text[], %s::text[], %s::integer[])",
                    [[row[i] for row in data] for i in range(len(PG_TABLES["layouts"]))],
                )
            )
            # JSON encodes the rows in C, where adapting a Python list per column cost psycopg about half
            # of an insert (docs/design.md); paths, which JSON cannot carry, went as bytea above.
            await conn.execute(
                "SELECT ocidx.put_rows(%s::json, %s::json, %s::json, %s::json)",
                tuple(json.dumps(rows.tables[t]) for t in ("entries", "names", "children", "layout_warnings")),
            )
        if released or (rows is not None and (rows.manifests or rows.attestations or rows.missing)):
            await conn.execute(
                "SELECT ocidx.put_graph(%s::json, %s::json, %s::json, %s::text[])",
                (
                    json.dumps(list(rows.manifests.values()) if rows is not None else []),
                    json.dumps(rows.attestations if rows is not None else []),
                    json.dumps(rows.missing if rows is not None else []),
                    sorted(set(released)),
                ),
            )
        cur = await conn.execute(
            "SELECT ocidx.beat(%s, %s, %s, %s)",
            (backlog, os.getpid(), watermark, incarnation if watermark is not None else None),
        )
        row = await cur.fetchone()
        found = str(row[0]) if row is not None else ""
        if fleet is not None and found != fleet:
            raise FleetReplaced(fleet, found)
    return found


async def _released(conn: psycopg.AsyncConnection[tuple[Any, ...]], sql: str, args: Sequence[object]) -> list[str]:
    """Run ``ocidx.put_layouts`` or ``ocidx.remove_layouts``; the digests the rows it deleted named."""
    row = await (await conn.execute(sql, args)).fetchone()
    return [str(digest) for digest in row[0]] if row is not None and row[0] is not None else []
