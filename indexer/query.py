"""Lookups: query forms, matching, ambiguity, platforms and freshness (docs/semantics.md).

The Python API is :class:`Index`; the CLI is a thin shell over it. Every
lookup goes through one path:

1. the target is split into a layout and a :class:`Query` (tag, name, digest);
2. :meth:`Index.view` decides where that layout's rows come from: the index
   when the ``index.json`` identity is unchanged and not racily clean
   (``indexed``), a fresh parse of the file into an in-memory database when it
   changed or was never indexed (``read-through``), or the last good rows when
   the file is torn or broken (``stale``);
3. :func:`indexer.store.read` functions match on whichever database that is.

This module, and everything it imports at module level, is standard library
only: a test holds it (the lookup budget is about 26 ms for a whole process).
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import time

from indexer import config as config_mod
from indexer import graph as graph_mod
from indexer import layout as layout_mod
from indexer import reference
from indexer._record import Record
from indexer.errors import (
    Ambiguous,
    DatabaseError,
    InvalidReference,
    LayoutError,
    LayoutNotFound,
    LayoutUnreadable,
    NotFound,
    OcidxError,
    PlatformNotFound,
    TagMismatch,
    UsageError,
    exhausted,
    printable,
)
from indexer.names import Name
from indexer.store import database_error, open_reader, schema_script
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from typing import Concatenate, ParamSpec, TypeVar

    from indexer.config import Config, Root

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

SCHEME = "oci-layout://"
INDEXED, READ_THROUGH, STALE = "indexed", "read-through", "stale"
# How many candidates an ambiguity, and how many names a not-found message, lists in text.
SHOWN = 5
# Where a database of a system-wide daemon is (docs/operations.md): named when the user's own is missing.
SHARED_DATABASES = ("/var/lib/ocidx/index.db",)
VERIFY_ALL = "\0verify-all\0"  # placeholder in a message, spelled as the caller speaks
# A read-through answer's image is read from its own blobs when a lookup shows at most this many of a
# layout's images; more (ls PATH of a big layout), and the layout's whole graph is read once.
FEW_IMAGES = 16


class Query(Record):
    """What to look for in a layout: a tag, a canonical name and tag, and/or a digest."""

    __slots__ = ("digest", "name", "tag", "text", "word")

    def __init__(
        self,
        text: str,
        *,
        tag: str | None = None,
        name: str | None = None,
        digest: str | None = None,
        word: str | None = None,
    ) -> None:
        self.text = text
        self.tag = tag  # None: no tag given; with name: '' means the untagged name
        self.name = name  # canonical repository, None for tag-only and digest-only queries
        self.digest = digest
        self.word = word  # the bare word typed as a name (``v1``), which could have meant the tag ``:v1``

    def describe(self) -> str:
        """The query as a user would write it, for messages."""
        head = self.name or ""
        if self.tag:
            head += f":{self.tag}"
        if self.digest:
            head += f"@{self.digest}"
        return head or self.text


class Answer(Record):
    """One resolved image: what ``resolve --json`` prints, and one item of ``find``."""

    __slots__ = (
        "annotations",
        "config",
        "created",
        "digest",
        "freshness",
        "image_size",
        "layers",
        "layout",
        "media_type",
        "names",
        "platform",
        "size",
        "source",
        "used_by",
        "warnings",
    )

    def __init__(
        self,
        *,
        layout: str,
        digest: str,
        media_type: str,
        size: int,
        names: list[Name],
        annotations: dict[str, str],
        platform: dict[str, object] | None,
        source: str,
        freshness: str,
        warnings: list[str],
        config: str | None = None,
        layers: int | None = None,
        image_size: int | None = None,
        created: str | None = None,
        used_by: list[str] | None = None,
    ) -> None:
        self.layout = layout
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.names = names
        self.annotations = annotations
        self.platform = platform
        self.source = source
        self.freshness = freshness
        self.warnings = warnings
        self.config = config
        self.layers = layers
        self.image_size = image_size
        self.created = created
        self.used_by = used_by

    def to_json(self) -> dict[str, object]:
        """The keys of docs/json.md (``resolve --json``), in a stable order."""
        return {
            "layout": self.layout,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
            "names": [n.to_json() for n in self.names],
            "annotations": self.annotations,
            "platform": _platform_out(self.platform),
            "config": self.config,
            "layers": self.layers,
            "image_size": self.image_size,
            "created": self.created,
            "source": self.source,
            "used_by": self.used_by,
            "freshness": self.freshness,
            "warnings": self.warnings,
        }

    def replaced(self, **fields: object) -> Answer:
        """This answer with *fields* replaced."""
        data = {name: getattr(self, name) for name in Answer.__slots__}
        data.update(fields)
        return Answer(**data)

    def context(self) -> str:
        """``oci-layout://ABS_PATH@DIGEST`` for ``docker buildx build --build-context``."""
        return f"{SCHEME}{self.layout}@{self.digest}"


def _platform_out(platform: dict[str, object] | None) -> dict[str, object] | None:
    if platform is None:
        return None
    return {
        "os": platform.get("os"),
        "architecture": platform.get("architecture"),
        "variant": platform.get("variant") or None,
    }


class Matches(list[Answer]):
    """What :meth:`Index.find` found: a list of answers, and what a person should know about it."""

    def __init__(self, query: Query, unverified: str | None) -> None:
        super().__init__()
        self.query = query
        self.unverified = unverified  # why the index could not be proven exact (each answer warns too)
        # Other things a person should know about the whole answer (layouts in scope that could not be
        # read now); each answer carries them among its warnings too.
        self.warnings: list[str] = []
        self.hint = ""  # for no answer: " (did you mean the tag ':v1'?)" when that would have matched


class Rows(list[dict[str, object]]):
    """What :meth:`Index.layouts` found: the rows, and why they may miss a change (None when exact)."""

    def __init__(self, rows: list[dict[str, object]], unverified: str | None) -> None:
        super().__init__(rows)
        self.unverified = unverified


class Referrer(Record):
    """One manifest or index that refers to an image: what ``referrers --json`` prints for it."""

    __slots__ = ("annotations", "artifact_type", "digest", "how", "layout", "media_type", "subject")

    def __init__(
        self,
        *,
        layout: str,
        digest: str,
        media_type: str,
        artifact_type: str | None,
        subject: str,
        annotations: dict[str, str],
        how: str,
    ) -> None:
        self.layout = layout
        self.digest = digest
        self.media_type = media_type
        self.artifact_type = artifact_type
        self.subject = subject
        self.annotations = annotations
        self.how = how

    def to_json(self) -> dict[str, object]:
        """The keys of docs/json.md (``referrers --json``), in a stable order."""
        return {
            "layout": self.layout,
            "digest": self.digest,
            "mediaType": self.media_type,
            "artifactType": self.artifact_type,
            "subject": self.subject,
            "annotations": self.annotations,
            "how": self.how,
        }


class Referrers(list[Referrer]):
    """What :meth:`Index.referrers` found, the digests it looked for, and what a person should know."""

    def __init__(self, subjects: list[str], unverified: str | None) -> None:
        super().__init__()
        self.subjects = subjects
        self.unverified = unverified
        self.warnings: list[str] = []


_DU_FIGURES = (
    "referenced_bytes",
    "unique_bytes",
    "shared_bytes",
    "unreferenced_bytes",
    "unreferenced_blobs",
    "missing_blobs",
)


class _Held:
    """One layout's figures for ``du``: its own counts, and the graph keys and sizes of what it holds
    (packed arrays: 2.9 million blobs at 10,000 layouts would be 230 MB as lists of ints)."""

    __slots__ = (
        "complete",
        "keys",
        "missing_blobs",
        "referenced_blobs",
        "referenced_bytes",
        "sizes",
        "unreferenced_blobs",
        "unreferenced_bytes",
    )

    def __init__(self, usage: db.Usage) -> None:
        self.keys, self.sizes = usage.held_arrays()
        self.complete = bool(usage.complete)
        self.referenced_blobs = int(usage.referenced_blobs)  # type: ignore[call-overload]
        self.referenced_bytes = int(usage.referenced_bytes)  # type: ignore[call-overload]
        self.unreferenced_bytes = int(usage.unreferenced_bytes)  # type: ignore[call-overload]
        self.unreferenced_blobs = int(usage.unreferenced_blobs)  # type: ignore[call-overload]
        self.missing_blobs = int(usage.missing_blobs)  # type: ignore[call-overload]

    @classmethod
    def of(cls, usage: db.Usage) -> _Held:
        """The figures of a ``layout_graph`` row."""
        return cls(usage)

    def to_json(self, path: str, shared: set[int], warnings: list[str]) -> dict[str, object]:
        """The ``du --json`` object of this layout; *shared* holds the keys another layout holds too."""
        count = self.referenced_blobs
        own = set(self.keys[:count]) - shared
        unique = 0
        if own:
            referenced = dict(zip(self.keys[:count], self.sizes[:count], strict=True))
            unique = sum(map(referenced.__getitem__, own))
        notes = list(warnings)
        if not self.complete:
            notes.append(
                "what it references is not wholly known (a manifest or index absent or refused): some blobs "
                "counted as unreferenced may be referenced"
            )
        return {
            "layout": path,
            "referenced_bytes": self.referenced_bytes,
            "unique_bytes": unique,
            "shared_bytes": self.referenced_bytes - unique,
            "unreferenced_bytes": self.unreferenced_bytes,
            "unreferenced_blobs": self.unreferenced_blobs,
            "missing_blobs": self.missing_blobs,
            "warnings": notes,
        }


def _usage_current(stored: db.StoredLayout, proven: bool = False) -> bool:
    """Whether the index's figures of a layout's ``blobs/`` are what it holds now: its ``index.json``,
    each directory its graph was listed from (both already *proven* by a walk of its root), and
    ``blobs/`` itself (a new ``blobs/ALG``, which no proof covers when nothing references it)."""
    if not proven:
        try:
            st = os.stat(stored.path + "/index.json")
        except OSError:
            return False
        if not stored.is_current(layout_mod.FileIdentity.of(st)) or not stored.presence_current():
            return False
    if stored.state != "ok":
        return False
    presence = stored.presence
    if presence is None or presence[0] == "blobs":
        return presence is not None  # blobs/ itself is the first directory of the proof
    dev, ino, mtime_ns, ctime_ns = json.loads(presence[6]) if presence[6] else (None, None, None, None)
    return not db.presence_differs(stored.path, "blobs", dev, ino, mtime_ns, ctime_ns, None)


class View(Record):
    """Where one layout's rows come from for this lookup, and how fresh they are.

    ``stored`` is the layout's indexed state (None for a layout read through with no index row);
    ``snapshot`` the read just made, for a read-through; ``graph`` keeps the view that holds the
    layout's content graph once a lookup needed it (:meth:`Index.graph_view`).
    """

    __slots__ = ("conn", "freshness", "graph", "layout_id", "path", "snapshot", "stored", "warnings")

    def __init__(
        self,
        conn: sqlite3.Connection,
        layout_id: int,
        path: str,
        freshness: str,
        warnings: list[str],
        *,
        stored: db.StoredLayout | None = None,
        snapshot: layout_mod.Snapshot | None = None,
    ) -> None:
        self.conn = conn
        self.layout_id = layout_id
        self.path = path
        self.freshness = freshness
        self.warnings = warnings
        self.stored = stored
        self.snapshot = snapshot
        self.graph: list[View] = []  # filled once, by Index.graph_view


def parse_ref(text: str) -> Query:
    """A REF of ``resolve --layout`` and ``find``: ``:TAG``, ``@DIGEST``, ``NAME[:TAG][@DIGEST]``, 64-hex."""
    if text == "":
        raise UsageError("empty reference")
    if text.startswith(":") or text.startswith("@"):
        tag_part, at, digest_part = text[1:].partition("@") if text.startswith(":") else ("", "@", text[1:])
        if text.startswith(":") and tag_part == "":
            raise InvalidReference(f"empty tag in {text!r}", category="tag_invalid_format")
        if tag_part and not reference.is_tag(tag_part):
            raise InvalidReference(f"invalid tag {tag_part!r} in {text!r}", category="tag_invalid_format")
        digest = reference.validate_digest(digest_part) if at else None
        return Query(text, tag=tag_part or None, digest=digest)
    ref = reference.parse_any_reference(text)
    if not ref.path:
        return Query(text, digest=ref.digest)
    tag = ref.tag
    if tag is None and ref.digest is None:
        tag = "latest"  # ParseDockerRef: a bare name means :latest
    word = text if ref.tag is None and ref.digest is None and "/" not in text and reference.is_tag(text) else None
    return Query(text, name=ref.name, tag=tag or "", digest=ref.digest, word=word)


def _database_errors(method: Callable[Concatenate[Index, _P], _R]) -> Callable[Concatenate[Index, _P], _R]:
    """Turn SQLite failures of a damaged index (malformed pages, I/O) into DatabaseError, exit 4."""

    def run(self: Index, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise database_error(f"{self.db_path} is not a usable ocidx database: {exc}", self.db_path) from None

    run.__name__, run.__qualname__, run.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return run


class Index:
    """The lookups of docs/semantics.md over one index database, as a Python API."""

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

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _is_layout(self, path: str) -> bool:
        real = os.path.realpath(path)
        return db.layout(self.conn, real) is not None or layout_mod.is_layout_dir(real)

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

    # -- target parsing ------------------------------------------------------------------------------

    def parse_target(self, target: str) -> tuple[str, Query]:
        """Split ``oci-layout://...`` into a layout path and a query (docs/semantics.md, Targets)."""
        _no_nul(target, "target")
        if not target.startswith(SCHEME):
            if target.startswith("oci:") and len(target) > 4:
                raise UsageError(
                    f"target {target!r} is skopeo's oci:PATH:REF; here it is written {_from_skopeo(target)}"
                )
            plain = self._option("'resolve --layout PATH REF' or 'find REF'", "resolve_in(layout, ref) or find(ref)")
            raise UsageError(
                f"target {target!r} is not oci-layout://PATH[:TAG][@DIGEST]; for a plain reference use {plain}"
            )
        rest = target[len(SCHEME) :]
        if not rest:
            raise UsageError(f"target {target!r} names no layout")
        digest = None
        head, at, tail = rest.rpartition("@")
        if at and "/" not in tail:
            try:
                digest = reference.validate_digest(tail)
            except InvalidReference as exc:
                raise InvalidReference(f"{exc.message} in {target!r}", category=exc.category) from None
            rest = head
        store, colon, store_tag = rest.partition(":")
        if store in self.config.stores and "/" not in store:
            if colon and not store_tag:
                raise InvalidReference(f"empty tag in {target!r}", category="tag_invalid_format")
            if colon and not reference.is_tag(store_tag):
                raise InvalidReference(f"invalid tag {store_tag!r} in {target!r}", category="tag_invalid_format")
            return self.config.stores[store], self._tag_query(target, store_tag or None, digest)
        path, colon, tag = rest.rpartition(":")
        bad_tag = None
        if colon and "/" not in tag and self._is_layout(path or "/"):
            if tag == "":
                raise InvalidReference(f"empty tag in {target!r}", category="tag_invalid_format")
            if reference.is_tag(tag):
                return path, self._tag_query(target, tag, digest)
            bad_tag = tag
        if self._is_layout(rest):
            return rest, self._tag_query(target, None, digest)
        parts = rest.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:cut]) or "/"
            if self._is_layout(prefix):
                name_text = "/".join(parts[cut:])
                query = parse_ref(name_text + (f"@{digest}" if digest else ""))
                if query.name is None:
                    raise InvalidReference(f"{name_text!r} in {target!r} is not an image name")
                return prefix, Query(target, name=query.name, tag=query.tag, digest=query.digest, word=query.word)
        if bad_tag is not None:  # PATH is a layout, and no longer prefix is: the tag is what is wrong
            raise InvalidReference(f"invalid tag {bad_tag!r} in {target!r}", category="tag_invalid_format")
        head_path, colon, tail_tag = rest.rpartition(":")
        tried = head_path if colon and "/" not in tail_tag and head_path else rest
        raise LayoutNotFound(f"no OCI layout found in {target!r}: {describe_missing(tried)}")

    @staticmethod
    def _tag_query(target: str, tag: str | None, digest: str | None) -> Query:
        if tag is None and digest is None:
            tag = "latest"  # buildx: oci-layout://PATH means :latest
        return Query(target, tag=tag, digest=digest)

    # -- lookups ----------------------------------------------------------------------------------------

    @_database_errors
    def resolve(self, target: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """Resolve ``oci-layout://...`` to one image, or raise NotFound / Ambiguous / LayoutError."""
        path, query = self.parse_target(target)
        return self._resolve(path, query, platform=platform, strict=strict)

    @_database_errors
    def resolve_in(self, layout: str, ref: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """Resolve REF (``:TAG``, ``@DIGEST``, ``NAME[:TAG][@DIGEST]``) in the layout at *layout*."""
        return self._resolve(layout, parse_ref(ref), platform=platform, strict=strict)

    def _resolve(self, path: str, query: Query, *, platform: str | None, strict: bool) -> Answer:
        want = layout_mod.parse_platform_spec(platform) if platform else None
        view = self.view(path, strict=strict)
        hits, warnings = _match(view, query, strict=strict, blobs=True)
        if not hits:
            raise NotFound(self._not_found_message(view, query))
        digests = {hit.digest for hit in hits}
        if len(digests) > 1:
            raise Ambiguous(
                f"{query.describe()} is ambiguous in {view.path}: {len(digests)} different digests match",
                _candidates(view.conn, hits, view.path),
            )
        answer = _answer(view, hits, warnings)
        if want is not None:
            answer = _select_platform(self, view, hits[0], answer, want)
        (answer,) = self.with_graph([(view, answer)])
        return answer

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
                image, gone = self._image_on_disk(view, answer)
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

    def _image_on_disk(self, view: View, answer: Answer) -> tuple[db.Image | None, set[int] | None]:
        """What the layout's own blobs say of one image (a read-through answer): its manifest and config
        (read once per process), and which of its blobs are absent (a ``stat`` each)."""
        limits = self.config.limits
        try:
            manifest = graph_mod.read_manifest(view.path, answer.digest, answer.size, limits)
        except LayoutError:
            return None, None
        config = manifest.config
        created: str | None = None
        platform: dict[str, object] | None = None
        if (
            config is not None
            and config.media_type in graph_mod.IMAGE_CONFIG_TYPES
            and _has_blob(view.path, config.digest)
        ):
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

    def _not_found_message(self, view: View, query: Query) -> str:
        held = db.sample_names(view.conn, view.layout_id, limit=SHOWN + 1)
        more = ""
        if len(held) > SHOWN:
            more = f" and {db.count_names(view.conn, view.layout_id) - SHOWN} more (ocidx ls {view.path})"
            held = held[:SHOWN]
        held_text = f"; it holds {', '.join(held)}{more}" if held else "; it holds no named images"
        hint = _tag_hint(view.conn, query, view.layout_id, lambda tag: f"{SCHEME}{view.path}:{tag}")
        return f"{query.describe()} not found in {view.path}{held_text}{hint}"

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

    def resolve_many(
        self,
        targets: Iterable[str],
        *,
        layout: str | None = None,
        platform: str | None = None,
        strict: bool = False,
    ) -> Iterator[tuple[str, Answer | OcidxError]]:
        """:meth:`resolve` (or, with *layout*, :meth:`resolve_in`) of each target, in order, on this one
        connection: ``(target, answer)``, or ``(target, error)`` for a target that failed (the others
        go on). A bad *platform* raises at once, before any target."""
        if platform:
            layout_mod.parse_platform_spec(platform)
        for target in targets:
            try:
                if layout is not None:
                    answer = self.resolve_in(layout, target, platform=platform, strict=strict)
                else:
                    answer = self.resolve(target, platform=platform, strict=strict)
            except OcidxError as exc:
                yield target, exc
            else:
                yield target, answer

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

    @_database_errors
    def referrers(self, target: str) -> Referrers:
        """Every manifest or index, across the indexed layouts, that refers to TARGET's image: by its
        ``subject``, as a BuildKit attestation manifest, or under a fallback tag (docs/semantics.md).

        TARGET is ``oci-layout://...`` (resolved in its layout), ``@DIGEST`` (or a bare digest), or a
        name (``alpine:3.16``: every digest it has across the layouts). Each layout answered is
        verified as ``find`` verifies it.
        """
        digests = self._target_digests(target)
        conn = self._require_database()
        fresh = self._changed(conn)
        hits = [hit for digest in digests for hit in db.referrer_hits(conn, digest)]
        stored = db.layouts_by_id(conn, {hit.layout_id for hit in hits})
        in_index: dict[str, list[db.ReferrerHit]] = {}
        for hit in hits:
            in_index.setdefault(stored[hit.layout_id].path, []).append(hit)
        found_stored = {layout.path: layout for layout in stored.values()}
        scope, unverified = self._scope(conn, set(in_index), found_stored, False, fresh)
        answers = Referrers(sorted(digests), unverified)
        groups: list[tuple[View, list[db.ReferrerHit]]] = []
        for path in sorted(scope):
            try:
                view = self._view(path, found_stored.get(path), strict=False)
            except NotFound:
                continue
            except LayoutError as exc:
                if path in in_index:
                    answers.warnings.append(f"{path}: {exc.message}; its referrers could not be verified")
                    groups.append((View(conn, in_index[path][0].layout_id, path, STALE, []), in_index[path]))
                continue
            if view.freshness == INDEXED:
                groups.append((view, in_index.get(path, [])))
                continue
            graph = self.graph_view(view)
            groups.append((graph, [h for d in digests for h in db.referrer_hits(graph.conn, d, graph.layout_id)]))
        by_conn: dict[int, tuple[sqlite3.Connection, list[tuple[View, db.ReferrerHit]]]] = {}
        for view, layout_hits in groups:
            by_conn.setdefault(id(view.conn), (view.conn, []))[1].extend((view, hit) for hit in layout_hits)
        for graph_conn, items in by_conn.values():
            images = db.images(graph_conn, [hit.digest for _view, hit in items])
            for view, hit in items:
                image = images.get(hit.digest)
                answers.append(
                    Referrer(
                        layout=view.path,
                        digest=hit.digest,
                        media_type=hit.media_type,
                        artifact_type=image.referrer_type() if image is not None else None,
                        subject=hit.subject,
                        annotations=image.annotations if image is not None else {},
                        how=hit.how,
                    )
                )
        answers.sort(key=lambda r: (r.layout, r.subject, r.how, r.digest))
        return answers

    def _target_digests(self, target: str) -> set[str]:
        """The digests a ``referrers`` TARGET names (NotFound when a layout or a name holds none)."""
        _no_nul(target, "target")
        if target.startswith(SCHEME):
            return {self.resolve(target).digest}
        query = parse_ref(target)
        if query.digest is not None and query.name is None and query.tag is None:
            return {query.digest}
        found = {a.digest for a in self.find(target) if a.source in ("entry", "child")}
        if not found:
            raise NotFound(f"{query.describe()} not found in any indexed layout")
        return found

    @_database_errors
    def du(self, paths: list[str] | None = None) -> dict[str, object]:
        """Per layout (those at or below *paths*, or all indexed) and in total: bytes referenced, unique
        to it, shared with another indexed layout, bytes and blobs nothing references, and referenced
        blobs that are missing (docs/semantics.md). Every indexed layout is verified first (its
        ``index.json`` and the directories of its ``blobs/``), and one that changed is read through:
        what is shared depends on them all."""
        conn = self._require_database()
        fresh = self._changed(conn)
        every = {s.path: s for s in db.layouts(conn)}
        scope, unverified = self._scope(conn, set(), every, True, fresh)
        usage = db.usage(conn)
        figures: dict[str, _Held] = {}
        warnings: dict[str, list[str]] = {}
        for path in scope:
            stored = every.get(path)
            row = usage.get(stored.id) if stored is not None else None
            if stored is not None and row is not None and _usage_current(stored, fresh.proves(path)):
                figures[path] = _Held.of(row)
                continue
            try:
                figures[path] = self._held_now(path)
            except NotFound:
                continue
            except LayoutError as exc:
                if row is not None:
                    figures[path] = _Held.of(row)
                    warnings.setdefault(path, []).append(f"{exc.message}; from its last good state")
        wanted = sorted(figures) if not paths else sorted(self._du_scope(paths, figures))
        # Each key's holders counted in C (Counter over the packed arrays): 2.9 million held blobs at
        # 10,000 layouts of the benchmark corpus (0.6 s; set operations took 0.8 s, a dict loop 3x).
        holders: collections.Counter[int] = collections.Counter()
        for held in figures.values():
            holders.update(held.keys)
        shared = {key for key, count in holders.items() if count > 1}
        del holders
        rows = [figures[path].to_json(path, shared, warnings.get(path, [])) for path in wanted]
        total = {key: sum(int(row[key]) for row in rows) for key in _DU_FIGURES}  # type: ignore[call-overload]
        return {"layouts": rows, "total": total, "warnings": [unverified] if unverified else []}

    def _held_now(self, path: str) -> _Held:
        """What one layout references and holds, read from it now."""
        if not layout_mod.is_layout_dir(path):
            raise LayoutNotFound(describe_missing(path))
        from indexer.store.rows import graph_rows  # read-through only

        limits = self.config.limits
        snapshot = layout_mod.read_layout(path, familiar=self.config.familiar, limits=limits)
        try:
            graph = graph_mod.read_layout_graph(path, snapshot, limits)
        except OSError as exc:
            raise LayoutUnreadable(f"{path}/blobs cannot be listed: {exc.strerror or exc}") from None
        (*_presence, _listed, _changed), row, _hash, _shared, _claims = graph_rows(graph)
        return _Held.of(db.Usage((0, *row)))

    def _du_scope(self, paths: list[str], figures: dict[str, _Held]) -> set[str]:
        """The layouts of *figures* at or below each of *paths*; NotFound for a path that holds none."""
        chosen: set[str] = set()
        for path in paths:
            _no_nul(path, "path")
            real = os.path.realpath(path)
            prefix = real.rstrip("/") + "/"
            mine = {p for p in figures if p == real or p.startswith(prefix)}
            if not mine:
                raise NotFound(f"no indexed layout at or below {real}" + _absolute_hint(path))
            chosen |= mine
        return chosen

    @_database_errors
    def _changed(self, conn: sqlite3.Connection) -> Changed:
        """What the index does not hold yet of the changes made before this lookup (before it reads the
        index): a live daemon keeps its own roots current once it answered a barrier; the other roots
        (those only scans walked, or all of them without a daemon that vouches for its index) are
        walked here, as a no-change ``ocidx scan`` walks them."""
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


def _tag_hint(
    conn: sqlite3.Connection, query: Query, layout_id: int | None, instead: Callable[[str], str] | None = None
) -> str:
    """Why a name found nothing where a tag would have (in the layout, or anywhere in the index for
    ``find``): `` (did you mean the tag ':v1'?)`` for a bare word read as a name; for ``NAME:TAG``
    whose tag is held without that name (``skopeo copy ... oci:DIR:TAG`` writes the tag only), that
    the tag is there, with *instead*: how to look the tag up."""
    if query.digest is not None:
        return ""
    if query.word is not None:
        return f" (did you mean the tag ':{query.word}'?)" if db.by_tag(conn, query.word, layout_id) else ""
    if query.name is None or not query.tag or instead is None or not db.by_tag(conn, query.tag, layout_id):
        return ""
    held = "a layout holds" if layout_id is None else "the layout holds"
    how = instead(query.tag)
    return f" ({held} the tag {query.tag} without that name, as skopeo's oci:DIR:TAG writes it: {how})"


class Changed(Record):
    """What the index does not hold yet of the changes made before a lookup: layouts new or changed since
    they were indexed, stored layouts that are gone, and why that may be incomplete; and which layouts
    are proven as indexed (*proven* by the walk, or below the roots a live daemon vouched for)."""

    __slots__ = ("changed", "gone", "proven", "unverified", "vouched")

    def __init__(
        self,
        changed: list[str],
        gone: set[str],
        unverified: str | None,
        proven: frozenset[str] = frozenset(),
        vouched: tuple[str, ...] = (),
    ) -> None:
        self.changed = changed
        self.gone = gone
        self.unverified = unverified
        self.proven = proven
        self.vouched = vouched

    def proves(self, path: str) -> bool:
        """Whether the layout at *path* is proven as indexed (its ``index.json`` and ``blobs/``)."""
        return path in self.proven or any(path == top or path.startswith(top.rstrip("/") + "/") for top in self.vouched)


def _changed_below_roots(conn: sqlite3.Connection, recorded: list[Root] | None, processes: int) -> Changed:
    """What the *recorded* roots hold that the index does not (:class:`Changed`); directories the index's
    directory cache holds as they are now are not listed again (their stat calls shared among *processes*)."""
    if recorded is None:
        return Changed(
            [],
            set(),
            "no daemon is running and this index records no roots, so layouts added or changed since "
            f"it was built are not seen: run 'ocidx scan ROOT' to record them, or use {VERIFY_ALL}",
        )
    if not recorded:
        return Changed([], set(), None)
    # A root that does not exist holds no layout: the walk of the others is still exact.
    from indexer.scan.proof import changes  # the walk of a no-change scan

    present, changed, gone, errors, _stored = changes(conn, [r for r in recorded if os.path.isdir(r.path)], processes)
    proven = frozenset(present).difference(changed)
    if errors:
        why = f"the roots no running daemon watches could not all be read ({errors[0]})"
        return Changed(changed, set(gone), f"{why}: this answer may miss layouts there", proven)
    return Changed(changed, set(gone), None, proven)


def _from_skopeo(target: str) -> str:
    """``oci:PATH[:REF]`` (skopeo's: the path ends at the first colon) as the ``oci-layout://`` target
    that means the same: ``PATH:TAG`` for a tag, ``PATH/NAME[:TAG]`` for a name."""
    path, colon, ref = target[len("oci:") :].partition(":")
    if not colon or not ref:
        return f"{SCHEME}{path}"
    return f"{SCHEME}{path}:{ref}" if reference.is_tag(ref) else f"{SCHEME}{path}/{ref}"


def describe_missing(text: str) -> str:
    """What is at the path *text* (relative to the working directory), for a "no layout there" message."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        return f"{path} is not an OCI layout (no index.json or oci-layout)"
    if os.path.lexists(path):
        return f"{path} is not a directory, so not an OCI layout"
    return f"{path} does not exist" + _absolute_hint(text, target=True)


def _absolute_hint(text: str, *, target: bool = False) -> str:
    """``; did you mean /PATH?`` when *text* is a relative path that does not exist but ``/PATH`` does
    (with how to write it in an ``oci-layout://`` *target*, where one slash too few is easy to miss)."""
    if os.path.isabs(text) or os.path.lexists(text) or not os.path.lexists("/" + text):
        return ""
    tip = f" (oci-layout:///{text}, with three slashes, names an absolute path)" if target else ""
    return f"; did you mean /{text}?{tip}"


def _no_nul(text: str, what: str) -> None:
    """No path holds a NUL character; os functions would raise ValueError on one."""
    if "\0" in text:
        raise UsageError(f"the {what} {text!r} contains a NUL character")


def _match(view: View, query: Query, *, strict: bool, blobs: bool) -> tuple[list[db.Hit], list[str]]:
    """Hits for *query* in one layout view, and warnings (a tag that no longer points at the digest)."""
    conn, lid = view.conn, view.layout_id
    warnings = list(view.warnings)
    if query.digest is None:
        if query.name is not None:
            return db.by_name(conn, query.name, query.tag or "", lid), warnings
        return db.by_tag(conn, query.tag or "latest", lid), warnings
    hits = db.by_digest(conn, query.digest, lid)
    entries = [h for h in hits if h.source == "entry"]
    hits = entries or hits
    if not hits and blobs:
        blob = _blob_hit(view, query.digest)
        hits = [blob] if blob is not None else []
    if hits and (query.tag or query.name):
        pointed = db.hits(conn, db.pointing_lookup(name=query.name, tag=query.tag), lid)
        message = mismatch(query, view.path, {h.digest for h in pointed})
        if message is not None:
            if strict:
                raise TagMismatch(message)
            warnings.append(message)
    return hits, warnings


def mismatch(query: Query, path: str, pointed: set[str]) -> str | None:
    """The warning when the name or tag of a ``...@DIGEST`` query points elsewhere in *path* (digests *pointed*)."""
    if query.digest is None or query.digest in pointed:
        return None
    label = (query.name or "") + (f":{query.tag}" if query.tag else "")
    now = sorted(pointed)
    return f"{label} in {path} does not point at {query.digest}" + (
        f" (it points at {', '.join(now)})" if now else " (it names nothing there)"
    )


def _match_all(conn: sqlite3.Connection, query: Query) -> tuple[dict[str, list[Answer]], dict[str, db.StoredLayout]]:
    """Matches of *query* in the whole index by layout path (not yet verified), and those layouts.

    A digest alone also matches the layouts that reference it as a layer or a config of one of
    their manifests (``source`` ``layer`` or ``config``, docs/semantics.md)."""
    hits = [
        h for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest) for h in db.hits(conn, lookup)
    ]
    graph_hits: list[db.GraphHit] = []
    if query.digest is not None and query.name is None and query.tag is None:
        graph_hits = db.graph_hits(conn, query.digest)
    stored = db.layouts_by_id(conn, {h.layout_id for h in hits} | {h.layout_id for h in graph_hits})
    # One names query for every hit (it chunks its IN list), not one per answer.
    names_of = db.names(conn, [h.entry_id for h in hits if h.source == "entry"])
    grouped: dict[str, list[db.Hit]] = {}
    for hit in hits:
        grouped.setdefault(stored[hit.layout_id].path, []).append(hit)
    out: dict[str, list[Answer]] = {}
    for path, layout_hits in grouped.items():
        view = View(conn, layout_hits[0].layout_id, path, INDEXED, [])
        if query.digest is not None and (query.tag or query.name):
            try:
                layout_hits, warnings = _match(view, query, strict=True, blobs=False)
            except TagMismatch:
                continue  # a search: list only the layouts where the name points at the digest
        else:
            warnings = []
        out[path] = _answers_by_digest(view, layout_hits, warnings, names_of)
    by_layout: dict[int, list[db.GraphHit]] = {}
    for graph_hit in graph_hits:
        by_layout.setdefault(graph_hit.layout_id, []).append(graph_hit)
    for lid, layout_graph_hits in by_layout.items():
        path = stored[lid].path
        if path not in out:  # a digest that is an image of the layout is answered as that
            out[path] = _graph_answers(View(conn, lid, path, INDEXED, []), layout_graph_hits)
    return out, {layout.path: layout for layout in stored.values()}


def _graph_answers(view: View, hits: list[db.GraphHit]) -> list[Answer]:
    """The answers of ``find @DIGEST`` for a digest that *view*'s layout uses as a layer or config
    (:func:`blob_use_answer`)."""
    absent = db.missing(view.conn, [view.layout_id]).get(view.layout_id) or set()
    return [
        blob_use_answer(
            layout=view.path,
            hit=hit,
            freshness=view.freshness,
            warnings=view.warnings,
            lacking=graph_mod.graph_key(hit.digest) in absent,
        )
        for hit in hits
        if hit.layout_id == view.layout_id
    ]


def blob_use_answer(*, layout: str, hit: db.GraphHit, freshness: str, warnings: list[str], lacking: bool) -> Answer:
    """The answer of ``find @DIGEST`` (and ``find --fleet``) for a digest that a layout's manifests use as
    a layer or config (*hit*); a warning when the layout's ``blobs/`` lacks it (*lacking*: a partial
    export). *warnings* come first."""
    said = list(warnings)
    if lacking:
        said.append(f"{hit.digest} is not in {layout}/blobs (a partial export?)")
    return Answer(
        layout=layout,
        digest=hit.digest,
        media_type=hit.media_type,
        size=hit.size,
        names=[],
        annotations={},
        platform=None,
        source=hit.source,
        freshness=freshness,
        warnings=said,
        used_by=hit.used_by,
    )


def _answers_by_digest(
    view: View, hits: list[db.Hit], warnings: list[str], names_of: dict[int, list[Name]] | None = None
) -> list[Answer]:
    by_digest: dict[str, list[db.Hit]] = {}
    for hit in hits:
        by_digest.setdefault(hit.digest, []).append(hit)
    return [_answer(view, group, warnings, names_of) for group in by_digest.values()]


def _answer(
    view: View, hits: list[db.Hit], warnings: list[str], names_of: dict[int, list[Name]] | None = None
) -> Answer:
    """One answer from hits that all share a digest: the first hit, with every entry's names.

    *names_of* holds the names of these hits' entries when the caller fetched them already.
    """
    first = hits[0]
    entry_hits = [h for h in hits if h.source == "entry"]
    if names_of is None:
        names_of = db.names(view.conn, [h.entry_id for h in entry_hits])
    # Ordered and without repeats, in linear time: one entry can carry thousands of names.
    names = list(dict.fromkeys(name for hit in entry_hits for name in names_of.get(hit.entry_id, [])))
    return Answer(
        layout=view.path,
        digest=first.digest,
        media_type=first.media_type,
        size=first.size,
        names=names,
        annotations=first.annotations,
        platform=first.platform,
        source=first.source,
        freshness=view.freshness,
        warnings=list(warnings),
    )


def _child_hit(entry: db.Hit, child: db.ChildRow) -> db.Hit:
    """A child manifest of *entry*'s nested indexes, as the hit a lookup of its digest would give."""
    return db.Hit(
        entry_id=entry.entry_id,
        layout_id=entry.layout_id,
        position=entry.position,
        digest=child.digest,
        media_type=child.media_type,
        size=child.size,
        platform=child.platform,
        annotations={},
        source="child",
    )


def _with_warning(answer: Answer, warning: str) -> Answer:
    data = {name: getattr(answer, name) for name in Answer.__slots__}
    data["warnings"] = [*answer.warnings, warning]
    return Answer(**data)


def _candidates(conn: sqlite3.Connection, hits: list[db.Hit], path: str) -> list[dict[str, object]]:
    """Each digest of an ambiguity with its names, and ``pick``: the target that resolves to it alone."""
    names_of = db.names(conn, [h.entry_id for h in hits if h.source == "entry"])
    out: dict[str, dict[Name, None]] = {}
    for hit in hits:
        listed = out.setdefault(hit.digest, {})
        for name in names_of.get(hit.entry_id, []) if hit.source == "entry" else []:
            listed[name] = None
    owners: dict[tuple[str, str], set[str]] = {}
    for digest, names in out.items():
        for name in names:
            owners.setdefault((name.name, name.tag), set()).add(digest)
    found: list[dict[str, object]] = []
    for digest, names in out.items():
        # A full name held by this digest alone picks it (oci-layout://PATH/alpine:3.16); else the digest.
        unique = [n for n in names if n.name and n.tag and owners[(n.name, n.tag)] == {digest}]
        pick = f"{SCHEME}{path}/{_familiar(unique[0].name)}:{unique[0].tag}" if unique else f"{SCHEME}{path}@{digest}"
        found.append({"digest": digest, "names": [n.to_json() for n in names], "pick": pick})
    return found


def _familiar(name: str) -> str:
    """``docker.io/library/alpine`` as ``alpine``: what a person types after ``oci-layout://PATH/``."""
    try:
        return reference.parse_normalized_named(name).familiar_name()
    except InvalidReference:
        return name


def _blob_hit(view: View, digest: str) -> db.Hit | None:
    """A bare blob under ``blobs/`` with *digest* (single-layout lookups only)."""
    try:
        path = layout_mod.blob_path(view.path, digest)
        st = os.stat(path)
    except (LayoutError, OSError):
        return None
    return db.Hit(
        entry_id=0,
        layout_id=view.layout_id,
        position=-1,
        digest=digest,
        media_type="",
        size=st.st_size,
        platform=None,
        annotations={},
        source="blob",
    )


def _select_platform(index: Index, view: View, hit: db.Hit, answer: Answer, want: layout_mod.Platform) -> Answer:
    """Follow an index (or manifest list) down to the manifest for platform *want*; on a single
    manifest, check its platform: the descriptor's, else its config's (as containerd and BuildKit)."""
    if hit.media_type not in layout_mod.INDEX_MEDIA_TYPES:
        platform, problem = hit.platform, None
        if platform is None and hit.media_type in graph_mod.MANIFEST_MEDIA_TYPES:
            platform, problem = _config_platform(index, view, hit.digest, hit.size)
            if problem is not None:
                return _with_warning(
                    answer, f"the platform of {answer.digest} in {view.path} could not be checked: {problem}"
                )
        have = _platform_record(platform)
        if have is not None and layout_mod.platform_matches(want, have):
            if answer.platform is None:
                answer = _with_platform(answer, platform)
            return answer
        if have is None and hit.media_type not in graph_mod.MANIFEST_MEDIA_TYPES:
            return answer  # a bare blob, or a media type ocidx does not read: nothing to compare
        what = (
            f"a single manifest for {_platform_text(platform)}" if have is not None else "an artifact with no platform"
        )
        raise PlatformNotFound(
            f"{answer.digest} in {view.path} is {what}, not {_platform_text(want.to_json())}",
            [p for p in [_platform_out(platform)] if p is not None],
        )
    kids = db.children(view.conn, view.layout_id, hit.digest)
    by_parent: dict[str, list[db.ChildRow]] = {}
    for kid in kids:
        by_parent.setdefault(kid.parent, []).append(kid)
    seen: dict[str, dict[str, object]] = {}  # the platforms present, in index order, once each
    searched: set[str] = set()  # each index looked into once: the graph may reach one by many paths

    def matches(platform: dict[str, object] | None) -> bool:
        have = _platform_record(platform)
        return have is not None and layout_mod.platform_matches(want, have)

    def platform_of(kid: db.ChildRow) -> dict[str, object] | None:
        # A child manifest whose descriptor names no platform is matched by its config's, as
        # containerd's images.Manifest does; one whose config cannot be read is not a match.
        if kid.platform is None and kid.media_type in graph_mod.MANIFEST_MEDIA_TYPES:
            return _config_platform(index, view, kid.digest, kid.size)[0]
        return kid.platform

    def search(parent: str, depth: int) -> db.ChildRow | None:
        # As containerd's images.Manifest: a nested index is followed when its descriptor names
        # no platform or the wanted one; the first manifest for the platform, in index order, wins.
        searched.add(parent)
        level = [(kid, platform_of(kid)) for kid in by_parent.get(parent, [])]
        for _kid, platform in level:
            shown = _platform_out(platform)
            if shown is not None:
                seen.setdefault(json.dumps(shown, sort_keys=True), shown)
        for kid, platform in level:
            if kid.media_type in layout_mod.INDEX_MEDIA_TYPES:
                if depth < 16 and kid.digest not in searched and (not kid.platform or matches(kid.platform)):
                    found = search(kid.digest, depth + 1)
                    if found is not None:
                        return found
            elif matches(platform):
                return kid if platform is kid.platform else _child_with_platform(kid, platform)
        return None

    chosen = search(hit.digest, 0)
    if chosen is not None:
        if not _has_blob(view.path, chosen.digest):
            raise PlatformNotFound(
                f"{answer.digest} in {view.path} lists {_platform_text(chosen.platform)} as {chosen.digest}, "
                "but that blob is absent from the layout (a partial export?)",
                list(seen.values()),
            )
        return Answer(
            layout=answer.layout,
            digest=chosen.digest,
            media_type=chosen.media_type,
            size=chosen.size,
            names=answer.names,
            annotations=answer.annotations,
            platform=chosen.platform,
            source="child",
            freshness=answer.freshness,
            warnings=answer.warnings,
        )
    listed = ", ".join(_platform_text(p) for p in seen.values()) or "none recorded"
    raise PlatformNotFound(
        f"no manifest for {_platform_text(want.to_json())} under {answer.digest} in {view.path} "
        f"(platforms present: {listed})",
        list(seen.values()),
    )


def _graph_current(stored: db.StoredLayout | None) -> bool:
    """Whether the index's content graph of an indexed layout is its ``blobs/`` as it is now."""
    return stored is not None and stored.presence_current()


def image_fields(image: db.Image | None, absent: set[int] | None) -> dict[str, object] | None:
    """What the content graph says of one image in one layout (whose absent blobs are *absent*):
    ``config``, ``layers``, ``image_size``, ``created`` and ``platform`` (the config's), or None
    when it knows no such image. The config's ``created`` and platform count only where the layout
    holds the config (else they could not be checked there)."""
    if image is None:
        return None
    config_here = absent is not None and (image.config is None or graph_mod.graph_key(image.config) not in absent)
    return {
        "config": image.config,
        "layers": image.layer_count,
        "image_size": db.image_size(image, absent),
        "created": image.created if config_here else None,
        "platform": image.platform if config_here else None,
    }


def with_image(answer: Answer, fields: dict[str, object] | None) -> Answer:
    """*answer* with the fields of :func:`image_fields`; a descriptor's platform wins over the config's,
    as in containerd's matcher. Its ``freshness`` stays that of the rows it was matched on."""
    if fields is None:
        return answer
    return answer.replaced(
        config=fields["config"],
        layers=fields["layers"],
        image_size=fields["image_size"],
        created=fields["created"],
        platform=answer.platform if answer.platform is not None else fields["platform"],
    )


def _graph_fields(answer: Answer, image: db.Image | None, absent: set[int] | None) -> Answer:
    """*answer* with what the content graph says of its image (:func:`image_fields`, :func:`with_image`)."""
    return with_image(answer, image_fields(image, absent))


def _has_blob(layout: str, digest: str) -> bool:
    """Whether *layout*'s ``blobs/`` holds a blob named *digest* (an invalid digest names none)."""
    try:
        return os.path.exists(layout_mod.blob_path(layout, digest))
    except LayoutError:
        return False


def _config_platform(index: Index, view: View, digest: str, size: int) -> tuple[dict[str, object] | None, str | None]:
    """The platform in the config of manifest *digest*: ``(platform, None)``; ``(None, why)`` when it
    cannot be checked (a blob absent or refused, a config naming none); and ``(None, None)`` for an
    artifact, whose config is not an image config and names no platform. From the index when it
    holds the layout's graph as it is; else read from the layout."""
    known = index._known_graph(view)
    if known is not None:
        image = db.images(known.conn, [digest]).get(digest)
        absent = db.missing(known.conn, [known.layout_id]).get(known.layout_id)
        if image is not None and absent is not None:
            if graph_mod.graph_key(digest) in absent:
                return None, f"the manifest {digest} is not in blobs/ (a partial export?)"
            if image.config is None or image.config_media_type not in graph_mod.IMAGE_CONFIG_TYPES:
                return None, None
            if graph_mod.graph_key(image.config) in absent:
                return None, f"its config {image.config} is not in blobs/ (a partial export?)"
            if image.platform is not None:
                return image.platform, None
            # A config the index could not read, or one naming no platform: the layout says which.
    limits = index.config.limits
    if not _has_blob(view.path, digest):
        return None, f"the manifest {digest} is not in blobs/ (a partial export?)"
    try:
        manifest = graph_mod.read_manifest(view.path, digest, size, limits)
    except LayoutError as exc:
        return None, exc.message
    config = manifest.config
    if config is None or config.media_type not in graph_mod.IMAGE_CONFIG_TYPES:
        return None, None
    if not _has_blob(view.path, config.digest):
        return None, f"its config {config.digest} is not in blobs/ (a partial export?)"
    try:
        found = graph_mod.read_config(view.path, config.digest, config.size, limits)
    except LayoutError as exc:
        return None, exc.message
    if found.platform is None:
        return None, f"its config {config.digest} names no os and architecture"
    return dict(found.platform.to_json()), None


def _with_platform(answer: Answer, platform: dict[str, object] | None) -> Answer:
    data = {name: getattr(answer, name) for name in Answer.__slots__}
    data["platform"] = platform
    return Answer(**data)


def _child_with_platform(kid: db.ChildRow, platform: dict[str, object] | None) -> db.ChildRow:
    return db.ChildRow(
        parent=kid.parent,
        depth=kid.depth,
        digest=kid.digest,
        media_type=kid.media_type,
        size=kid.size,
        platform=platform,
    )


def _platform_record(platform: dict[str, object] | None) -> layout_mod.Platform | None:
    if not platform:
        return None
    return layout_mod.Platform(
        os=str(platform.get("os") or ""),
        architecture=str(platform.get("architecture") or ""),
        variant=str(platform.get("variant") or ""),
    )


def _platform_text(platform: Mapping[str, object] | None) -> str:
    if not platform:
        return "an unknown platform"
    parts = [str(platform.get("os") or "?"), str(platform.get("architecture") or "?")]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return printable("/".join(parts))
