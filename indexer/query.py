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

import json
import os
import sqlite3
import time

from indexer import config as config_mod
from indexer import layout as layout_mod
from indexer import reference
from indexer._record import Record
from indexer.errors import (
    Ambiguous,
    DatabaseError,
    LayoutError,
    LayoutUnreadable,
    NotFound,
    PlatformNotFound,
    ReferenceError_,
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
    from collections.abc import Callable, Mapping
    from typing import Concatenate, ParamSpec, TypeVar

    from indexer.config import Config, Root

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

SCHEME = "oci-layout://"
INDEXED, READ_THROUGH, STALE = "indexed", "read-through", "stale"
# A daemon whose heartbeat is older than this many of its intervals is not keeping the index current.
HEARTBEAT_MISSES = 3
# How many candidates an ambiguity, and how many names a not-found message, lists in text.
SHOWN = 5


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
        "digest",
        "freshness",
        "layout",
        "media_type",
        "names",
        "platform",
        "size",
        "source",
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
            "source": self.source,
            "freshness": self.freshness,
            "warnings": self.warnings,
        }

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


class View(Record):
    """Where one layout's rows come from for this lookup, and how fresh they are."""

    __slots__ = ("conn", "freshness", "layout_id", "path", "warnings")

    def __init__(
        self, conn: sqlite3.Connection, layout_id: int, path: str, freshness: str, warnings: list[str]
    ) -> None:
        self.conn = conn
        self.layout_id = layout_id
        self.path = path
        self.freshness = freshness
        self.warnings = warnings


def parse_ref(text: str) -> Query:
    """A REF of ``resolve --layout`` and ``find``: ``:TAG``, ``@DIGEST``, ``NAME[:TAG][@DIGEST]``, 64-hex."""
    if text == "":
        raise UsageError("empty reference")
    if text.startswith(":") or text.startswith("@"):
        tag_part, at, digest_part = text[1:].partition("@") if text.startswith(":") else ("", "@", text[1:])
        if text.startswith(":") and tag_part == "":
            raise ReferenceError_(f"empty tag in {text!r}", category="tag_invalid_format")
        if tag_part and not reference.is_tag(tag_part):
            raise ReferenceError_(f"invalid tag {tag_part!r} in {text!r}", category="tag_invalid_format")
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
                mem = sqlite3.connect(":memory:", isolation_level=None)
                mem.executescript(schema_script())
                self._conn = mem
            else:
                self._conn = open_reader(self.db_path)
        return self._conn

    def _require_database(self) -> sqlite3.Connection:
        """The connection to a database file, or the DatabaseError saying what to run (exit 4)."""
        conn = self.conn
        if not self.has_database:
            raise DatabaseError(
                f"no index database at {os.path.abspath(self.db_path)}: run 'ocidx scan ROOT' once, or start "
                "'ocidx daemon', to index the layouts below ROOT (a single layout needs none: "
                "ocidx resolve oci-layout://PATH:TAG)"
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
        except NotFound as exc:
            hint = _absolute_hint(path)
            if hint:
                raise NotFound(exc.message + hint) from None
            raise

    def _view(self, real: str, stored: db.StoredLayout | None, strict: bool) -> View:
        """:meth:`view` of a resolved path whose stored state (or None) the caller already has."""
        index_file = os.path.join(real, "index.json")
        try:
            st = os.stat(index_file)
        except OSError as exc:
            if not layout_mod.is_layout_dir(real):
                was = "; it was indexed but is gone now" if stored is not None else ""
                raise NotFound(f"{_missing(real)}{was}") from None
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
                return View(self.conn, stored.id, real, INDEXED, [])
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
            return View(self.conn, stored.id, real, INDEXED, [])
        mem = sqlite3.connect(":memory:", isolation_level=None)
        mem.executescript(schema_script())
        mem.execute("BEGIN")
        from indexer.store.write import store_snapshot  # read-through only: off the indexed path

        store_snapshot(mem, real, snapshot, read_ns)
        mem.execute("COMMIT")
        # The layout's parse warnings are in mem's layout_warnings, shown by `ls PATH` as for an indexed
        # layout; an answer carries only warnings about itself (tag mismatch, staleness).
        return View(mem, 1, real, READ_THROUGH, [])

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
            raise UsageError(
                f"target {target!r} is not oci-layout://PATH[:TAG][@DIGEST]; "
                "for a plain reference use 'resolve --layout PATH REF' or 'find REF'"
            )
        rest = target[len(SCHEME) :]
        if not rest:
            raise UsageError(f"target {target!r} names no layout")
        digest = None
        head, at, tail = rest.rpartition("@")
        if at and "/" not in tail:
            try:
                digest = reference.validate_digest(tail)
            except ReferenceError_ as exc:
                raise ReferenceError_(f"{exc.message} in {target!r}", category=exc.category) from None
            rest = head
        store, colon, store_tag = rest.partition(":")
        if store in self.config.stores and "/" not in store:
            if colon and not store_tag:
                raise ReferenceError_(f"empty tag in {target!r}", category="tag_invalid_format")
            if colon and not reference.is_tag(store_tag):
                raise ReferenceError_(f"invalid tag {store_tag!r} in {target!r}", category="tag_invalid_format")
            return self.config.stores[store], self._tag_query(target, store_tag or None, digest)
        path, colon, tag = rest.rpartition(":")
        bad_tag = None
        if colon and "/" not in tag and self._is_layout(path or "/"):
            if tag == "":
                raise ReferenceError_(f"empty tag in {target!r}", category="tag_invalid_format")
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
                    raise ReferenceError_(f"{name_text!r} in {target!r} is not an image name")
                return prefix, Query(target, name=query.name, tag=query.tag, digest=query.digest, word=query.word)
        if bad_tag is not None:  # PATH is a layout, and no longer prefix is: the tag is what is wrong
            raise ReferenceError_(f"invalid tag {bad_tag!r} in {target!r}", category="tag_invalid_format")
        head_path, colon, tail_tag = rest.rpartition(":")
        tried = head_path if colon and "/" not in tail_tag and head_path else rest
        raise NotFound(f"no OCI layout found in {target!r}: {_missing(tried)}")

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
            answer = _select_platform(view, hits[0], answer, want)
        return answer

    def _not_found_message(self, view: View, query: Query) -> str:
        held = db.sample_names(view.conn, view.layout_id, limit=SHOWN + 1)
        more = ""
        if len(held) > SHOWN:
            more = f" and {db.count_names(view.conn, view.layout_id) - SHOWN} more (ocidx ls {view.path})"
            held = held[:SHOWN]
        held_text = f"; it holds {', '.join(held)}{more}" if held else "; it holds no named images"
        return f"{query.describe()} not found in {view.path}{held_text}{_tag_hint(view.conn, query, view.layout_id)}"

    @_database_errors
    def find(self, ref: str, *, verify_all: bool = False) -> Matches:
        """Every match of REF across the indexed layouts, each layout verified fresh.

        With no live daemon, the roots the index was built from are walked as a no-change
        ``ocidx scan`` does, and the layouts that appeared or changed since are read through, so
        the answer is exact; where that cannot be proven, :attr:`Matches.unverified` says why.
        """
        query = parse_ref(ref)
        conn = self._require_database()
        in_index, stored = _match_all(conn, query)
        scope = set(in_index)
        unverified = None
        # A live daemon keeps its own roots current; the others (those only scans walked, or all of
        # them without a daemon) are walked here.
        from indexer.store import state as roots_mod  # find and status only: resolve does not pay for it

        walk = roots_mod.unwatched(conn) if self._daemon_alive(conn) else roots_mod.recorded(conn)
        if walk is None or walk:
            changed, unverified = _changed_below_roots(conn, walk, self.config.daemon.workers)
            scope.update(changed)
            # One SELECT per changed layout (each is then read through, which costs far more), not a
            # record of every stored layout (50 ms at 10,000).
            for path in changed:
                if path not in stored and (known := db.layout(conn, path)) is not None:
                    stored[path] = known
        if verify_all:
            stored = {s.path: s for s in db.layouts(conn)}
            scope.update(stored)
        # Layouts whose last read failed hold no rows, or only a last good state: each is read again
        # here, and those that still cannot be read are named, since they may hold what was asked for.
        for known in db.in_error(conn):
            scope.add(known.path)
            stored.setdefault(known.path, known)
        answers = Matches(query, unverified)
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
                answers.extend(in_index.get(path, []))
                continue
            try:
                hits, warnings = _match(view, query, strict=True, blobs=False)
            except TagMismatch:
                continue  # a search for NAME@DIGEST: the name points elsewhere in this layout
            answers.extend(_answers_by_digest(view, hits, warnings))
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
            answers.hint = _tag_hint(conn, query, None)
        return answers

    def _daemon_alive(self, conn: sqlite3.Connection) -> bool:
        """Whether a daemon keeps this index current: not stopped, pid alive, heartbeat within a few
        intervals, and watching with inotify (polling sees a change only at its next pass)."""
        row = conn.execute("SELECT pid, heartbeat_ns, stopped_ns, watch_mode FROM daemon WHERE id = 1").fetchone()
        if row is None or row[1] is None or row[2] is not None or row[3] != "inotify" or not _pid_alive(row[0]):
            return False
        age_s = (time.time_ns() - int(row[1])) / 1e9
        return age_s <= HEARTBEAT_MISSES * self.config.daemon.heartbeat_s

    @_database_errors
    def layouts(self, under: str | None = None) -> list[dict[str, object]]:
        """Every indexed layout with its state (``ls``)."""
        if under:
            _no_nul(under, "directory")
        scope = os.path.realpath(under) if under else None
        return [s.to_json() for s in db.layouts(self._require_database(), scope)]

    @_database_errors
    def layout_detail(self, path: str) -> dict[str, object]:
        """One layout: state, entries with names and how each was read, warnings (``ls PATH``)."""
        view = self.view(path)
        stored = db.layout(self.conn, view.path)
        entries = []
        rows = db.entries(view.conn, view.layout_id)
        names = db.names(view.conn, [hit.entry_id for hit, _, _ in rows])
        for hit, invalid, warnings in rows:
            entries.append(
                {
                    "digest": hit.digest,
                    "mediaType": hit.media_type,
                    "size": hit.size,
                    "platform": _platform_out(hit.platform),
                    "names": [n.to_json() for n in names.get(hit.entry_id, [])],
                    "invalid_names": invalid,
                    "annotations": hit.annotations,
                    "warnings": warnings,
                    "children": [
                        {"digest": c.digest, "mediaType": c.media_type, "platform": _platform_out(c.platform)}
                        for c in (
                            db.children(view.conn, view.layout_id, hit.digest)
                            if hit.media_type in layout_mod.INDEX_MEDIA_TYPES
                            else []
                        )
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
        from indexer.store import state as roots

        conn = self._require_database()
        count = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("layouts", "entries", "names", "children")
        }
        errors = conn.execute("SELECT count(*) FROM layouts WHERE state = 'error'").fetchone()[0]
        row = conn.execute(
            "SELECT pid, started_ns, heartbeat_ns, stopped_ns, last_reconcile_ns, watch_mode FROM daemon"
        ).fetchone()
        daemon: dict[str, object] | None = None
        now = time.time_ns()
        if row is not None and row[0] is not None:  # a row holding only the roots of a scan: no daemon ran
            pid, started, heartbeat, stopped, reconcile, mode = row
            daemon = {
                "pid": pid,
                "running": stopped is None and _pid_alive(pid),
                "started_ns": started,
                "heartbeat_age_s": None if heartbeat is None else round((now - heartbeat) / 1e9, 3),
                "last_reconcile_age_s": None if reconcile is None else round((now - reconcile) / 1e9, 3),
                "watch_mode": mode,
            }
        return {
            "database": os.path.abspath(self.db_path),
            "layouts": count["layouts"],
            "entries": count["entries"],
            "names": count["names"],
            "children": count["children"],
            "layouts_with_errors": errors,
            "roots": [r.path for r in roots.recorded(conn) or []],
            "daemon": daemon,
            **_fleet_status(conn, now),
        }


def _tag_hint(conn: sqlite3.Connection, query: Query, layout_id: int | None) -> str:
    """`` (did you mean the tag ':v1'?)`` when the bare word *query* was read as a name found nothing
    but the tag ``:WORD`` would have (in the layout, or anywhere in the index for ``find``)."""
    if query.word is None or query.digest is not None or not db.by_tag(conn, query.word, layout_id):
        return ""
    return f" (did you mean the tag ':{query.word}'?)"


def _changed_below_roots(
    conn: sqlite3.Connection, recorded: list[Root] | None, processes: int
) -> tuple[list[str], str | None]:
    """The layouts below the *recorded* roots that are new or changed since they were indexed, and
    why that list may be incomplete (None when it is exact); directories the index's directory
    cache holds as they are now are not listed again (their stat calls shared among *processes*)."""
    if recorded is None:
        return [], (
            "no daemon is running and this index records no roots, so layouts added or changed since "
            "it was built are not seen: run 'ocidx scan ROOT' to record them, or use --verify-all"
        )
    # A root that does not exist holds no layout: the walk of the others is still exact.
    from indexer.scan.discovery import changes  # the walk of a no-change scan

    _present, changed, _gone, errors, _stored = changes(conn, [r for r in recorded if os.path.isdir(r.path)], processes)
    if errors:
        why = f"the roots no running daemon watches could not all be read ({errors[0]})"
        return changed, f"{why}: this answer may miss layouts there"
    return changed, None


def _missing(text: str) -> str:
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


def _fleet_status(conn: sqlite3.Connection, now: int) -> dict[str, object]:
    """``fleet`` of ``status`` on a publishing host: connected or why not, the backlog, the last publish."""
    row = conn.execute("SELECT host, state, since_ns, watermark, published_ns FROM fleet_publisher").fetchone()
    if row is None:
        return {}
    host, state, since, watermark, published = row
    backlog = (
        conn.execute("SELECT count(*) FROM layouts WHERE version > ?", (watermark,)).fetchone()[0]
        + conn.execute("SELECT count(*) FROM layout_removals WHERE version > ?", (watermark,)).fetchone()[0]
    )
    return {
        "fleet": {
            "host": host,
            "connected": state == "connected",
            "state": state,
            "state_age_s": round((now - since) / 1e9, 3),
            "backlog": backlog,
            "last_published_age_s": None if published is None else round((now - published) / 1e9, 3),
        }
    }


def _no_nul(text: str, what: str) -> None:
    """No path holds a NUL character; os functions would raise ValueError on one."""
    if "\0" in text:
        raise UsageError(f"the {what} {text!r} contains a NUL character")


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """Matches of *query* in the whole index by layout path (not yet verified), and those layouts."""
    hits = [
        h for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest) for h in db.hits(conn, lookup)
    ]
    stored = db.layouts_by_id(conn, {h.layout_id for h in hits})
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
    return out, {layout.path: layout for layout in stored.values()}


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
    except ReferenceError_:
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


def _select_platform(view: View, hit: db.Hit, answer: Answer, want: layout_mod.Platform) -> Answer:
    """Follow an index (or manifest list) down to the manifest for platform *want*."""
    if hit.media_type not in layout_mod.INDEX_MEDIA_TYPES:
        have = _platform_record(hit.platform)
        if have is None or layout_mod.platform_matches(want, have):
            return answer
        raise PlatformNotFound(
            f"{answer.digest} in {view.path} is a single manifest for {_platform_text(hit.platform)}, "
            f"not {_platform_text(want.to_json())}",
            [p for p in [_platform_out(hit.platform)] if p is not None],
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

    def search(parent: str, depth: int) -> db.ChildRow | None:
        # As containerd's images.Manifest: a nested index is followed when its descriptor names
        # no platform or the wanted one; the first manifest for the platform, in index order, wins.
        searched.add(parent)
        level = by_parent.get(parent, [])
        for kid in level:
            shown = _platform_out(kid.platform)
            if shown is not None:
                seen.setdefault(json.dumps(shown, sort_keys=True), shown)
        for kid in level:
            if kid.media_type in layout_mod.INDEX_MEDIA_TYPES:
                if depth < 16 and kid.digest not in searched and (not kid.platform or matches(kid.platform)):
                    found = search(kid.digest, depth + 1)
                    if found is not None:
                        return found
            elif matches(kid.platform):
                return kid
        return None

    chosen = search(hit.digest, 0)
    if chosen is not None:
        try:
            present = os.path.exists(layout_mod.blob_path(view.path, chosen.digest))
        except LayoutError:
            present = False
        if not present:
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
