"""The Python API: :class:`Index`, the lookups of docs/semantics.md over one index database."""

from __future__ import annotations

import os
import time

from indexer import layout as layout_mod
from indexer.errors import LayoutError, NotFound
from indexer.query.answers import INDEXED, READ_THROUGH, STALE, Rows, _platform_out
from indexer.query.content import ContentGraph
from indexer.query.matching import _answer, _child_hit
from indexer.query.messages import _no_nul
from indexer.query.views import _database_errors
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.query.answers import Answer


class Index(ContentGraph):
    """The lookups of docs/semantics.md over one index database, as a Python API."""

    def wait(
        self, target: str, *, timeout: float | None = None, platform: str | None = None, strict: bool = False
    ) -> Answer:
        """Block until *target* resolves (inotify, no daemon needed) and return the answer; WaitTimeout
        after *timeout* seconds (docs/semantics.md, Waiting)."""
        from indexer.wait import wait  # its inotify wrapper is for this call only

        return wait(self, target, timeout=timeout, platform=platform, strict=strict)

    @_database_errors
    def layouts(self, under: str | None = None) -> Rows:
        """Every layout below the roots with its state (``ls``): as indexed, or read through when it
        changed or appeared since (``freshness``), without those that are gone."""
        if under:
            _no_nul(under, "directory")
        scope = os.path.realpath(under) if under else None
        conn = self._require_database()
        fresh = self._changed(conn)
        rows = {s.path: s for s in db.layouts(conn, scope)}
        out: dict[str, dict[str, object]] = {}
        for path, stored in rows.items():
            if path not in fresh.gone:
                out[path] = {**stored.to_json(), "freshness": INDEXED}
        for path in fresh.changed:
            if scope is not None and path != scope and not path.startswith(scope.rstrip("/") + "/"):
                continue
            row = self._row_now(path, rows.get(path) or db.layout(conn, path))
            if row is None:
                out.pop(path, None)
            else:
                out[path] = row
        return Rows([out[path] for path in sorted(out)], fresh.unverified)

    def _row_now(self, path: str, stored: db.StoredLayout | None) -> dict[str, object] | None:
        """``ls``'s row for a layout that changed or appeared since it was indexed (None: no longer one)."""
        try:
            view = self._view(path, stored, strict=False)
        except NotFound:
            return None
        except LayoutError as exc:
            base = stored.to_json() if stored is not None else {"layout": path, "entries": 0, "content_hash": None}
            return {**base, "state": "error", "error": exc.category, "message": exc.message, "freshness": READ_THROUGH}
        now = db.layout(view.conn, path)
        base = now.to_json() if now is not None else {"layout": path}
        if stored is None:
            base["state"] = "not-indexed"
        return {**base, "freshness": view.freshness}

    @_database_errors
    def layout_detail(self, path: str) -> dict[str, object]:
        """One layout: state, entries with names and how each was read, warnings (``ls PATH``)."""
        view = self.view(path)
        stored = db.layout(self.conn, view.path)
        entries = []
        rows = db.entries(view.conn, view.layout_id)
        names = db.names(view.conn, [hit.entry_id for hit, _, _ in rows])
        kids = {
            hit.entry_id: (
                db.children(view.conn, view.layout_id, hit.digest)
                if hit.media_type in layout_mod.INDEX_MEDIA_TYPES
                else []
            )
            for hit, _, _ in rows
        }
        # Every image of the layout (entries and children) with what the content graph says of it.
        pairs = [(view, _answer(view, [hit], [], {})) for hit, _, _ in rows]
        pairs += [
            (view, _answer(view, [_child_hit(hit, child)], [], {}))
            for hit, _, _ in rows
            for child in kids[hit.entry_id]
        ]
        graph_of = {(a.source, a.digest): a for a in self.with_graph(pairs)}
        for hit, invalid, warnings in rows:
            image = graph_of[("entry", hit.digest)]
            entries.append(
                {
                    "digest": hit.digest,
                    "mediaType": hit.media_type,
                    "size": hit.size,
                    "platform": _platform_out(image.platform),
                    "config": image.config,
                    "layers": image.layers,
                    "image_size": image.image_size,
                    "created": image.created,
                    "names": [n.to_json() for n in names.get(hit.entry_id, [])],
                    "invalid_names": invalid,
                    "annotations": hit.annotations,
                    "warnings": warnings,
                    "children": [
                        {
                            "digest": c.digest,
                            "mediaType": c.media_type,
                            "platform": _platform_out(child.platform),
                            "config": child.config,
                            "layers": child.layers,
                            "image_size": child.image_size,
                            "created": child.created,
                        }
                        for c in kids[hit.entry_id]
                        for child in [graph_of[("child", c.digest)]]
                    ],
                }
            )
        if stored is None:  # read through: the keys of an indexed layout, describing this read
            fresh = db.layout(view.conn, view.path)
            base = {**(fresh.to_json() if fresh is not None else {}), "layout": view.path, "state": "not-indexed"}
        else:
            base = stored.to_json()
        return {
            **base,
            "freshness": view.freshness,
            "warnings": view.warnings + db.layout_warnings(view.conn, view.layout_id),
            "entries": entries,
        }

    @_database_errors
    def status(self) -> dict[str, object]:
        """Counts, errors, the daemon's heartbeat and last reconcile (``status``)."""
        from indexer.store import state

        conn = self._require_database()
        fresh = self._changed(conn)
        counts = state.counts(conn)
        for path in [*fresh.gone, *fresh.changed]:
            stored = db.layout(conn, path)
            if stored is not None:
                counts = counts.minus(state.layout_counts(conn, stored.id, error=stored.state != "ok"))
            if path in fresh.gone:
                continue
            try:
                view = self._view(path, stored, strict=False)
            except NotFound:
                continue
            except LayoutError:
                if stored is not None:  # what the index still answers for it
                    counts = counts.plus(state.layout_counts(conn, stored.id, error=True))
                else:
                    counts = counts.plus(state.Counts(layouts=1, entries=0, names=0, children=0, errors=1))
                continue
            counts = counts.plus(state.layout_counts(view.conn, view.layout_id, error=view.freshness == STALE))
        row = state.daemon_row(conn)
        daemon: dict[str, object] | None = None
        now = time.time_ns()
        if row is not None:
            daemon = {
                "pid": row.pid,
                "running": row.running(),
                "started_ns": row.started_ns,
                "heartbeat_age_s": None if row.heartbeat_ns is None else round((now - row.heartbeat_ns) / 1e9, 3),
                "last_reconcile_age_s": (
                    None if row.last_reconcile_ns is None else round((now - row.last_reconcile_ns) / 1e9, 3)
                ),
                "watch_mode": row.watch_mode,
            }
        fleet = state.fleet_status(conn, now)
        return {
            "database": os.path.abspath(self.db_path),
            "layouts": counts.layouts,
            "entries": counts.entries,
            "names": counts.names,
            "children": counts.children,
            "layouts_with_errors": counts.errors,
            "roots": [r.path for r in state.recorded(conn) or []],
            "unverified": fresh.unverified,
            "daemon": daemon,
            **({"fleet": fleet} if fleet is not None else {}),
        }
