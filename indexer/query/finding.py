"""Finding a reference across the indexed layouts, each verified fresh (``find``)."""

from __future__ import annotations

import sqlite3

from indexer.errors import LayoutError, NotFound, OcidxError, TagMismatch
from indexer.query.answers import INDEXED, STALE, Answer, Matches, Query, View, parse_ref
from indexer.query.matching import _answers_by_digest, _graph_answers, _match, _match_all, _with_warning
from indexer.query.messages import _tag_hint
from indexer.query.resolving import Resolving
from indexer.query.views import _database_errors
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from indexer.query.freshness import Changed


class Finding(Resolving):
    """The searches across the index, and what changed below its roots since it was written."""

    @_database_errors
    def _changed(self, conn: sqlite3.Connection) -> Changed:
        """What the index does not hold yet of the changes made before this lookup (before it reads the
        index): a live daemon keeps its own roots current once it answered a barrier; the other roots
        (those only scans walked, or all of them without a daemon that vouches for its index) are
        walked here, as a no-change ``ocidx scan`` walks them."""
        from indexer.query.freshness import Changed, _changed_below_roots
        from indexer.store import state  # find, ls and status only: resolve does not pay for it

        if not self._daemon_synced(conn):
            return _changed_below_roots(conn, state.recorded(conn), self.config.daemon.workers)
        fresh = _changed_below_roots(conn, state.unwatched(conn), self.config.daemon.workers)
        vouched = tuple(root.path for root in state.watched(conn))
        return Changed(fresh.changed, fresh.gone, fresh.unverified, fresh.proven, vouched)

    def _daemon_synced(self, conn: sqlite3.Connection) -> bool:
        """Whether a live daemon vouches that its index holds every change made before now: its row says
        it runs, and it answered a barrier with ``ok`` (indexer.sync) within the bound."""
        from indexer.store import state
        from indexer.sync import barrier

        row = state.daemon_row(conn)
        if row is None or not row.running():
            return False
        return barrier(self.db_path, row.pid) == "ok"

    @_database_errors
    def find(self, ref: str, *, verify_all: bool = False) -> Matches:
        """Every match of REF across the indexed layouts, each layout verified fresh.

        With no live daemon, the roots the index was built from are walked as a no-change
        ``ocidx scan`` does, and the layouts that appeared or changed since are read through, so
        the answer is exact; where that cannot be proven, :attr:`Matches.unverified` says why.
        """
        query = parse_ref(ref)
        conn = self._require_database()
        return self._find(conn, query, self._changed(conn), verify_all)

    def find_many(self, refs: Iterable[str], *, verify_all: bool = False) -> Iterator[tuple[str, Matches | OcidxError]]:
        """:meth:`find` of each REF, in order: ``(ref, matches)`` or ``(ref, error)``. The barrier (or the
        walk of the roots) is made once, before the first REF is answered, so every answer sees every
        change made before then."""
        fresh: Changed | None = None
        for ref in refs:
            try:
                query = parse_ref(ref)
                conn = self._require_database()
                if fresh is None:
                    fresh = self._changed(conn)
                found = self._find(conn, query, fresh, verify_all)
            except OcidxError as exc:
                yield ref, exc
            else:
                yield ref, found

    @_database_errors
    def _find(self, conn: sqlite3.Connection, query: Query, fresh: Changed, verify_all: bool) -> Matches:
        """:meth:`find` of a parsed *query*, with what changed below the roots (:meth:`_changed`) known."""
        in_index, stored = _match_all(conn, query)
        scope, unverified = self._scope(conn, set(in_index), stored, verify_all, fresh)
        answers = Matches(query, unverified)
        pairs: list[tuple[View, Answer]] = []
        # Layouts whose last read failed hold no rows, or only a last good state: each is read again
        # here, and those that still cannot be read are named, since they may hold what was asked for.
        for known in db.in_error(conn):
            scope.add(known.path)
            stored.setdefault(known.path, known)
        unreadable: list[str] = []
        for path in sorted(scope):
            try:
                # Stored paths are resolved already: no realpath, no second SELECT per layout.
                view = self._view(path, stored.get(path), strict=False)
            except NotFound:
                continue  # verified: the layout is gone, so are its matches
            except LayoutError as exc:
                unreadable.append(f"{path}: {exc.message}")
                if path in in_index:
                    answers.extend(
                        _with_warning(a, f"{path}: {exc.message}; this match could not be verified")
                        for a in in_index[path]
                    )
                continue
            if view.freshness == STALE:
                unreadable.append(view.warnings[0] if view.warnings else path)
            if view.freshness == INDEXED:
                pairs.extend((view, answer) for answer in in_index.get(path, []))
                continue
            try:
                hits, warnings = _match(view, query, strict=True, blobs=False)
            except TagMismatch:
                continue  # a search for NAME@DIGEST: the name points elsewhere in this layout
            pairs.extend((view, answer) for answer in _answers_by_digest(view, hits, warnings))
            if not hits and query.digest is not None and query.name is None and query.tag is None:
                found = self.graph_view(view)
                pairs.extend((view, a) for a in _graph_answers(found, db.graph_hits(found.conn, query.digest)))
        answers.extend(self.with_graph(pairs))
        answers.sort(key=lambda a: (a.layout, a.digest))
        if unreadable:
            more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
            answers.warnings.append(
                f"{len(unreadable)} indexed layout{'s' if len(unreadable) > 1 else ''} could not be read now "
                f"({unreadable[0]}{more}): this answer may miss images in them"
            )
        for note in ([unverified] if unverified is not None else []) + answers.warnings:
            answers[:] = [_with_warning(a, note) for a in answers]
        if unverified is None and not answers:
            answers.hint = _tag_hint(
                conn, query, None, lambda tag: self._option(f"ocidx find :{tag}", f"find(':{tag}')")
            )
        return answers

    def _scope(
        self,
        conn: sqlite3.Connection,
        matched: set[str],
        stored: dict[str, db.StoredLayout],
        verify_all: bool,
        fresh: Changed,
    ) -> tuple[set[str], str | None]:
        """The layouts a search across the index must verify (*matched*, those changed or new since the
        index was written that *fresh* found, and with *verify_all* every indexed one), and why that
        may be incomplete (None when exact). *stored* gains the rows of the layouts added."""
        scope = set(matched)
        scope.update(fresh.changed)
        # One SELECT per changed layout (each is then read through, which costs far more), not a record
        # of every stored layout (50 ms at 10,000).
        for path in fresh.changed:
            if path not in stored and (known := db.layout(conn, path)) is not None:
                stored[path] = known
        if verify_all:
            stored.update((s.path, s) for s in db.layouts(conn))
            scope.update(stored)
        return scope, fresh.unverified
