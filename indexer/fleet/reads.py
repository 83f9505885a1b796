"""A reader's reads of the fleet: the functions of schema ``ocidx``, called, every row they return checked.

Readers reach the fleet only through those functions (``migrations/postgres/0002_functions_only.sql``;
the content graph's, ``ocidx.graph_users`` and ``ocidx.referrers``, in ``0003_content_graph.sql``).
:class:`Reads` calls them on one connection and gives back only rows that passed
:mod:`indexer.fleet.checks`; the others are counted in its :class:`~indexer.fleet.checks.Dropped`,
against the host that published them.
"""

from __future__ import annotations

from indexer.fleet.checks import BlobUse, Dropped, Hit, Malformed, Referring, name_of, path_of, state_of
from indexer.query import STALE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    import psycopg

    from indexer.names import Name
    from indexer.store import read as db

LIVE = "live"


class Reads:
    """One lookup's reads, on *conn*; a host whose heartbeat is older than *stale_after_s* is stale.
    :attr:`dropped` counts the rows left out as malformed."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], *, stale_after_s: float) -> None:
        self.conn = conn
        self.stale_after_s = stale_after_s
        self.dropped = Dropped()

    def host_states(self) -> dict[str, tuple[str, float | None, object]]:
        """Every host's (state, heartbeat age in seconds by the server's clock, backlog as reported, unchecked)."""
        out: dict[str, tuple[str, float | None, object]] = {}
        for host, age, backlog in self.conn.execute("SELECT * FROM ocidx.hosts()"):
            if type(host) is not str or not host:
                self.dropped.add(host, None, "hosts", "the host is not a name")
                continue
            age_s = None if age is None else round(max(0.0, float(age)), 3)
            state = LIVE if age_s is not None and age_s <= self.stale_after_s else STALE
            out[host] = (state, age_s, backlog)
        return out

    def host_counts(self) -> dict[str, tuple[int, int | None]]:
        """Every host's (layouts, entries as its layouts say, None when that cannot be)."""
        counts: dict[str, tuple[int, int | None]] = {}
        for host, n, entries in self.conn.execute("SELECT * FROM ocidx.host_counts()"):
            if type(entries) is not int or entries < 0:  # the sum of what the host said its layouts hold
                self.dropped.add(host, None, "layouts", f"the entry counts add up to {entries!r}")
                entries = None
            counts[host] = (int(n), entries)
        return counts

    def hits(self, lookup: db.Lookup, only: Sequence[tuple[str, int]] | None = None) -> list[Hit]:
        """The rows one lookup reaches (in the layouts *only*, (host, id) pairs, when given)."""
        args: tuple[object, ...] = (lookup.table, list(lookup.columns), list(lookup.values))
        sql = "SELECT * FROM ocidx.lookup(%s, %s::text[], %s::text[])"
        if only is not None:
            sql = "SELECT * FROM ocidx.lookup(%s, %s::text[], %s::text[], %s::text[], %s::bigint[])"
            args += ([k[0] for k in only], [k[1] for k in only])
        out: list[Hit] = []
        for row in self.conn.execute(sql, args):
            try:
                out.append(Hit(row))
            except Malformed as exc:
                self.dropped.add(row[0], row[1], "children" if row[11] == "child" else "entries", str(exc))
        return out

    def layouts(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, str]]:
        """The path and state of each layout of *keys* (host, id) still there."""
        layouts: dict[tuple[str, int], tuple[str, str]] = {}
        if not keys:
            return layouts
        for host, lid, path, state in self.conn.execute(
            "SELECT * FROM ocidx.layouts_of(%s::text[], %s::bigint[])", ([k[0] for k in keys], [k[1] for k in keys])
        ):
            try:
                layouts[(host, lid)] = (path_of(path), state_of(state))
            except Malformed as exc:
                self.dropped.add(host, lid, "layouts", str(exc))
        return layouts

    def names(self, keys: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int, int], list[Name]]:
        """The names of the entries of *keys* (host, layout id, position), in their order."""
        names: dict[tuple[str, int, int], list[Name]] = {}
        if not keys:
            return names
        for host, lid, pos, *name_row in self.conn.execute(
            "SELECT * FROM ocidx.names_of(%s::text[], %s::bigint[], %s::integer[])",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
        ):
            try:
                names.setdefault((host, lid, pos), []).append(name_of(name_row))
            except Malformed as exc:
                self.dropped.add(host, lid, "names", str(exc))
        return names

    def uses(self, digest: str) -> list[BlobUse]:
        """The layouts, on every host, whose manifests use *digest* as a layer or a config
        (``ocidx.graph_users``)."""
        out: list[BlobUse] = []
        for row in self.conn.execute("SELECT * FROM ocidx.graph_users(%s)", (digest,)):
            try:
                out.append(BlobUse(row))
            except Malformed as exc:
                self.dropped.add(row[0], row[1], "graph_manifests", str(exc))
        return out

    def referring(self, targets: list[str], tags: list[str]) -> list[Referring]:
        """The manifests and indexes, on every host, that refer to one of *targets* or are named by one of
        the fallback *tags* (``ocidx.referrers``)."""
        out: list[Referring] = []
        for row in self.conn.execute("SELECT * FROM ocidx.referrers(%s::text[], %s::text[])", (targets, tags)):
            try:
                out.append(Referring(row))
            except Malformed as exc:
                self.dropped.add(row[0], row[1], Referring.table(row, exc), str(exc))
        return out
