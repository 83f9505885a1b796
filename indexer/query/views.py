"""The core of :class:`indexer.query.Index`: its state, its connection, the view of a layout (indexed,
read through or stale), and what the content graph says of answers."""

from __future__ import annotations

import os
import sqlite3
import time

from indexer import config as config_mod
from indexer import graph as graph_mod
from indexer import layout as layout_mod
from indexer.errors import DatabaseError, LayoutError, LayoutNotFound, LayoutUnreadable, exhausted
from indexer.query.answers import INDEXED, READ_THROUGH, STALE, Answer, View
from indexer.query.matching import _graph_current, _graph_fields, _has_blob
from indexer.query.messages import _absolute_hint, _no_nul, describe_missing
from indexer.store import database_error, open_reader, schema_script
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Concatenate, ParamSpec, Self, TypeVar

    from indexer.config import Config
    from indexer.layout import Limits

    _P = ParamSpec("_P")
    _R = TypeVar("_R")
    _I = TypeVar("_I", bound="Views")


# Where a database of a system-wide daemon is (docs/operations.md): named when the user's own is missing.
SHARED_DATABASES = ("/var/lib/ocidx/index.db",)


# A read-through answer's image is read from its own blobs when a lookup shows at most this many of a
# layout's images; more (ls PATH of a big layout), and the layout's whole graph is read once.
FEW_IMAGES = 16


def _database_errors(method: Callable[Concatenate[_I, _P], _R]) -> Callable[Concatenate[_I, _P], _R]:
    """Turn SQLite failures of a damaged index (malformed pages, I/O) into DatabaseError, exit 4."""

    def run(self: _I, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise database_error(f"{self.db_path} is not a usable ocidx database: {exc}", self.db_path) from None

    run.__name__, run.__qualname__, run.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return run


class Views:
    """The state of an :class:`indexer.query.Index`, its connection, and where each layout's rows come from."""

    def __init__(self, db_path: str | None = None, *, config: Config | str | None = None) -> None:
        self.config = config if isinstance(config, config_mod.Config) else config_mod.load(config)
        self.db_path = config_mod.database_path(db_path, self.config)
        self._conn: sqlite3.Connection | None = None
        self.has_database = True  # False once a lookup found no database file (and read through)
        # The connection may pass from one thread to the next (AsyncIndex's pool), never to two at once.
        self.shared_between_threads = False
        # Messages name options as the command line spells them (--verify-all) instead of as the
        # API's arguments (verify_all=True): set by the CLI only.
        self.speaks_cli = False

    def _option(self, cli: str, api: str) -> str:
        """*cli* (``--verify-all``) for the command line, *api* (``verify_all=True``) for the Python API."""
        return cli if self.speaks_cli else api

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """The read-only connection to the index, opened on first use.

        With no database file at all (a fresh machine: no scan yet, no daemon), an empty index in
        memory: single-layout lookups then read their layout through and create no file; lookups
        across layouts call :meth:`_require_database` first.
        """
        if self._conn is None:
            if not os.path.exists(self.db_path):
                self.has_database = False
                mem = sqlite3.connect(
                    ":memory:", isolation_level=None, check_same_thread=not self.shared_between_threads
                )
                mem.executescript(schema_script())
                self._conn = mem
            else:
                self._conn = open_reader(self.db_path, any_thread=self.shared_between_threads)
        return self._conn

    def _require_database(self) -> sqlite3.Connection:
        """The connection to a database file, or the DatabaseError saying what to run (exit 4)."""
        conn = self.conn
        if not self.has_database:
            elsewhere = self._option("--db PATH or $OCIDX_DB", "db_path or $OCIDX_DB")
            shared = next((p for p in SHARED_DATABASES if p != self.db_path and os.path.exists(p)), None)
            raise DatabaseError(
                f"no index database at {os.path.abspath(self.db_path)}: run 'ocidx scan ROOT' once, or start "
                "'ocidx daemon', to index the layouts below ROOT (a single layout needs none: "
                f"ocidx resolve oci-layout://PATH:TAG); to use the database of a daemon that runs already, "
                f"name it with {elsewhere}"
                + (f" ({shared} exists: the system daemon's, docs/operations.md)" if shared else "")
            )
        return conn

    def close(self) -> None:
        """Close the database connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def view(self, path: str, *, strict: bool = False) -> View:
        """Decide, with one ``stat``, where the rows of the layout at *path* come from (docs/semantics.md)."""
        _no_nul(path, "layout path")
        real = os.path.realpath(path)
        try:
            return self._view(real, db.layout(self.conn, real), strict)
        except LayoutNotFound as exc:
            hint = _absolute_hint(path)
            if hint:
                raise LayoutNotFound(exc.message + hint) from None
            raise

    def _view(self, real: str, stored: db.StoredLayout | None, strict: bool) -> View:
        """:meth:`view` of a resolved path whose stored state (or None) the caller already has."""
        index_file = os.path.join(real, "index.json")
        try:
            st = os.stat(index_file)
        except OSError as exc:
            if not layout_mod.is_layout_dir(real):
                was = "; it was indexed but is gone now" if stored is not None else ""
                raise LayoutNotFound(f"{describe_missing(real)}{was}") from None
            unreadable = LayoutUnreadable(f"{index_file}: {exc.strerror or exc}")
            if stored is not None and stored.last_good_ns is not None:
                return self._stale(stored, unreadable.message, strict, unreadable)
            raise unreadable from None
        identity = layout_mod.FileIdentity.of(st)
        if (
            stored is not None
            and stored.is_current(identity)
            and db.depends_hold(real, stored.depends)
            and db.mount_holds(real, stored)
        ):
            if stored.state == "ok":
                return View(self.conn, stored.id, real, INDEXED, [], stored=stored)
            return self._stale(stored, stored.error or "index.json is broken", strict)
        read_ns = time.time_ns()
        try:
            snapshot = layout_mod.read_layout(real, familiar=self.config.familiar, limits=self.config.limits)
        except LayoutError as exc:
            # Out of descriptors or memory: nothing is wrong with the layout; say what is (exit 6).
            if (resource := exhausted(exc, f"reading {real}")) is not None:
                raise resource from None
            # docs/semantics.md: exit 5 is for a layout unreadable *with no last good state*; with one, answer stale.
            if stored is not None and stored.last_good_ns is not None:
                return self._stale(stored, exc.message, strict, exc)
            raise
        if (
            stored is not None
            and stored.content_hash == snapshot.content_hash
            and db.same_rows_depend(stored.depends, db.encode_depends(snapshot.depends))
        ):
            # The rows hold what the file holds now (a touch, the same bytes on another mount).
            return View(self.conn, stored.id, real, INDEXED, [], stored=stored, snapshot=snapshot)
        return self._read_through(real, snapshot, read_ns, None)

    def _read_through(
        self, real: str, snapshot: layout_mod.Snapshot, read_ns: int, graph: graph_mod.LayoutGraph | None
    ) -> View:
        """A view on an in-memory index of *snapshot* (and its *graph*, when read) alone."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        mem.executescript(schema_script())
        mem.execute("BEGIN")
        from indexer.store.write import store_snapshot  # read-through only: off the indexed path

        store_snapshot(mem, real, snapshot, read_ns, graph)
        mem.execute("COMMIT")
        # The layout's parse warnings are in mem's layout_warnings, shown by `ls PATH` as for an indexed
        # layout; an answer carries only warnings about itself (tag mismatch, staleness).
        view = View(mem, 1, real, READ_THROUGH, [], snapshot=snapshot)
        if graph is not None:
            view.graph.append(view)
        return view

    def graph_view(self, view: View) -> View:
        """The view that holds *view*'s layout's content graph as it is now (kept in *view*).

        An indexed layout whose ``blobs/`` is as listed for its graph (a ``stat`` of each directory)
        answers from the index; otherwise its graph is read now (its manifests and configs, one
        listing of ``blobs/``), as a read-through. A stale view answers from the last good rows.
        """
        if view.graph:
            return view.graph[0]
        found = view
        if view.freshness == READ_THROUGH or (view.freshness == INDEXED and not _graph_current(view.stored)):
            read_ns = time.time_ns()
            snapshot = view.snapshot
            limits = self.config.limits
            try:
                if snapshot is None:
                    snapshot = layout_mod.read_layout(view.path, familiar=self.config.familiar, limits=limits)
                graph = graph_mod.read_layout_graph(view.path, snapshot, limits)
            except (LayoutError, OSError) as exc:
                message = exc.message if isinstance(exc, LayoutError) else (exc.strerror or str(exc))
                found = View(
                    view.conn,
                    view.layout_id,
                    view.path,
                    STALE,
                    [*view.warnings, f"{view.path}: its blobs/ could not be read now ({message})"],
                    stored=view.stored,
                )
            else:
                found = self._read_through(view.path, snapshot, read_ns, graph)
        view.graph.append(found)
        return found

    def _stale(self, stored: db.StoredLayout, why: str, strict: bool, exc: LayoutError | None = None) -> View:
        if exc is None:  # the error recorded by the last scan, with its category
            exc = LayoutError(f"{stored.path}: {why}", category=stored.error_category or None)
        if stored.last_good_ns is None or strict:
            raise exc
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stored.last_good_ns / 1e9))
        return View(
            self.conn,
            stored.id,
            stored.path,
            STALE,
            [f"{stored.path}: index.json is unreadable now ({why}); answering from its last good state of {when}"],
        )

    def with_graph(self, pairs: list[tuple[View, Answer]]) -> list[Answer]:
        """Each answer (an entry or child image, in the layout of its view) with what the content
        graph says of it (:func:`_graph_fields`); others as they are. A few statements for all."""
        out = [answer for _view, answer in pairs]
        groups: dict[int, tuple[sqlite3.Connection, list[tuple[int, View, Answer]]]] = {}
        unknown: dict[int, list[tuple[int, View, Answer]]] = {}
        for number, (view, answer) in enumerate(pairs):
            if answer.source not in ("entry", "child") or answer.media_type not in graph_mod.MANIFEST_MEDIA_TYPES:
                continue
            found = self._known_graph(view)
            if found is None:
                unknown.setdefault(id(view), []).append((number, view, answer))
            else:
                groups.setdefault(id(found.conn), (found.conn, []))[1].append((number, found, answer))
        for items in unknown.values():
            if len(items) > FEW_IMAGES:  # many images of one layout: its whole graph, read once
                found = self.graph_view(items[0][1])
                groups.setdefault(id(found.conn), (found.conn, []))[1].extend((n, found, a) for n, _v, a in items)
                continue
            for number, view, answer in items:  # a few: each image from its own blobs
                image, gone = _image_on_disk(view, answer, self.config.limits)
                out[number] = _graph_fields(answer, image, gone)
        for conn, items in groups.values():
            images = db.images(conn, [answer.digest for _n, _v, answer in items])
            absent = db.missing(conn, [found.layout_id for _n, found, _a in items])
            for number, found, answer in items:
                filled = _graph_fields(answer, images.get(answer.digest), absent.get(found.layout_id))
                more = [w for w in found.warnings if w not in filled.warnings]  # its blobs/ unreadable now
                out[number] = filled.replaced(warnings=[*filled.warnings, *more]) if more else filled
        return out

    def _known_graph(self, view: View) -> View | None:
        """The view holding *view*'s content graph when that costs no read of the layout (already read,
        or indexed with its ``blobs/`` as listed); else None."""
        if view.graph:
            return view.graph[0]
        if view.freshness == STALE or (view.freshness == INDEXED and _graph_current(view.stored)):
            view.graph.append(view)
            return view
        return None


def _image_on_disk(view: View, answer: Answer, limits: Limits) -> tuple[db.Image | None, set[int] | None]:
    """What the layout's own blobs say of one image (a read-through answer): its manifest and config
    (read once per process), and which of its blobs are absent (a ``stat`` each)."""
    try:
        manifest = graph_mod.read_manifest(view.path, answer.digest, answer.size, limits)
    except LayoutError:
        return None, None
    config = manifest.config
    created: str | None = None
    platform: dict[str, object] | None = None
    if config is not None and config.media_type in graph_mod.IMAGE_CONFIG_TYPES and _has_blob(view.path, config.digest):
        try:
            found = graph_mod.read_config(view.path, config.digest, config.size, limits)
        except LayoutError:
            pass
        else:
            created = found.created
            platform = {**found.platform.to_json()} if found.platform is not None else None
    from indexer.store.rows import layers_json  # read-through only

    image = db.Image(
        digest=manifest.digest,
        kind=manifest.kind,
        media_type=manifest.media_type,
        size=manifest.size,
        artifact_type=manifest.artifact_type,
        subject=manifest.subject,
        annotations=manifest.annotations,
        config=config.digest if config is not None else None,
        config_media_type=config.media_type if config is not None else None,
        config_size=config.size if config is not None else None,
        layers=layers_json(manifest.layers),
        layer_count=len(manifest.layers),
        image_size=manifest.image_size,
        complete=manifest.complete,
        created=created,
        platform=platform,
    )
    external = {layer.digest for layer in manifest.layers if layer.external}
    absent = {graph_mod.graph_key(d) for d in image.blobs() if d not in external and not _has_blob(view.path, d)}
    return image, absent
