"""Read-only queries on the index: the one matcher behind every lookup.

The same functions run on the on-disk database (an indexed answer) and on the
in-memory database that a read-through lookup fills from a freshly parsed
``index.json`` (:func:`indexer.store.write.store_snapshot`), so both kinds of
answer come from one piece of matching code.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from array import array

from indexer._record import Record
from indexer.graph import graph_key, unpack_pairs
from indexer.layout import INDEX_MEDIA_TYPES, FileIdentity
from indexer.names import Name
from indexer.store import path_of, path_value

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Mapping, Sequence

# A stored identity is trusted only when index.json was last changed well before it
# was read: a rewrite inside the file system's timestamp granularity (2 s on the
# coarsest, FAT; one kernel tick on ext4/xfs/tmpfs) can keep size and mtime
# (git's "racily clean" problem). Within this window a lookup hashes the file.
RACY_WINDOW_NS = 3_000_000_000


def settles_at(mtime_ns: int, ctime_ns: int, read_ns: int, since_ns: int | None) -> int:
    """The read time (wall clock, ns) from which a read that sees this identity proves the file settled.

    Either the file last changed a racy window before the read (the usual case), or the same identity
    was already seen by a read a racy window earlier (``since_ns``): that second rule is what settles
    a file whose timestamps lie in the future (a skewed file server's clock, ``touch -d``), which the
    first rule never would, so that it is hashed once more, not on every lookup forever. Both rest on
    the file system's clock moving on between the two reads as fast as ours.
    """
    by_change = max(mtime_ns, ctime_ns) + RACY_WINDOW_NS + 1
    if since_ns is None:
        return by_change
    return min(by_change, since_ns + RACY_WINDOW_NS)


# The same rule in SQL, on the columns of ``layouts``: when a read settles the stored identity, and
# whether the stored identity proves nothing (never read, or racily clean: StoredLayout.is_racy).
_BY_CHANGE_SQL = f"(max(mtime_ns, ctime_ns) + {RACY_WINDOW_NS + 1})"
SETTLES_AT_SQL = f"min({_BY_CHANGE_SQL}, coalesce(identity_since_ns + {RACY_WINDOW_NS}, {_BY_CHANGE_SQL}))"
RACY_SQL = f"coalesce(dev IS NULL OR read_ns IS NULL OR {SETTLES_AT_SQL} > read_ns, 1)"

_ENTRY_COLUMNS = "e.id, e.layout_id, e.position, e.digest, e.media_type, e.size, e.platform, e.annotations"


def parse_layers(text: str) -> list[tuple[str, str, int, bool]]:
    """``(digest, mediaType, size, external)`` of each layer of a ``manifests.layers`` value."""
    found: list[tuple[str, str, int, bool]] = []
    media_type = ""
    for item in json.loads(text):
        if len(item) > 2:
            media_type = item[2]
        found.append((item[0], media_type, item[1], len(item) > 3))
    return found


class StoredLayout(Record):
    """What the index knows of one layout's ``index.json`` (and, with the content graph, its ``blobs/``).

    ``presence`` is the identity of the directories of ``blobs/`` its graph rows were listed from
    (the columns ``blobs_dir`` ... ``blobs_root`` of ``layouts``), None before its graph was read;
    ``blobs_settles_ns`` is when a listing of them proves itself, ``blobs_listed_ns`` when it was made.
    """

    __slots__ = (
        "blobs_listed_ns",
        "blobs_settles_ns",
        "blobs_since_ns",
        "checked_ns",
        "content_hash",
        "depends",
        "entry_count",
        "error",
        "error_category",
        "graph_hash",
        "id",
        "identity",
        "identity_since_ns",
        "last_good_ns",
        "mnt_id",
        "path",
        "presence",
        "read_ns",
        "retry_ns",
        "state",
        "version",
    )

    def __init__(
        self,
        *,
        id: int,
        path: str,
        identity: FileIdentity | None,
        read_ns: int | None,
        content_hash: str | None,
        state: str,
        error_category: str | None,
        error: str | None,
        last_good_ns: int | None,
        checked_ns: int,
        entry_count: int,
        identity_since_ns: int | None = None,
        version: int = 0,
        presence: Presence | None = None,
        blobs_listed_ns: int | None = None,
        blobs_since_ns: int | None = None,
        blobs_settles_ns: int | None = None,
        graph_hash: str | None = None,
        retry_ns: int | None = None,
        depends: str | None = None,
        mnt_id: int | None = None,
    ) -> None:
        self.presence = presence
        self.blobs_listed_ns = blobs_listed_ns
        self.blobs_since_ns = blobs_since_ns
        self.blobs_settles_ns = blobs_settles_ns
        self.graph_hash = graph_hash
        self.id = id
        self.path = path
        self.identity = identity
        self.read_ns = read_ns
        self.content_hash = content_hash
        self.state = state
        self.error_category = error_category
        self.error = error
        self.last_good_ns = last_good_ns
        self.checked_ns = checked_ns
        self.entry_count = entry_count
        self.identity_since_ns = identity_since_ns
        self.version = version
        # Set while the last read failed for a reason outside the layout's bytes: when the daemon
        # reads it again (docs/reliability.md); such a row has no identity, so nothing proves it current.
        self.retry_ns = retry_ns
        # What the rows depend on besides index.json (encode_depends), or None: checked by every proof.
        self.depends = depends
        # The unique id of the mount index.json was read on (indexer._statx), or None (not known).
        self.mnt_id = mnt_id

    def is_current(self, identity: FileIdentity) -> bool:
        """Whether *identity* (a fresh ``stat``) proves the stored rows describe the file now."""
        return identity == self.identity and not self.is_racy()

    def is_racy(self) -> bool:
        """True when the stored identity cannot prove the file unchanged (see RACY_WINDOW_NS)."""
        identity = self.identity
        if identity is None or self.read_ns is None:
            return True
        return settles_at(identity.mtime_ns, identity.ctime_ns, self.read_ns, self.identity_since_ns) > self.read_ns

    def presence_current(self) -> bool:
        """Whether the directories of ``blobs/`` are as listed for the stored graph, settled (a ``stat`` each);
        always for a broken layout, which is proven by its ``index.json`` alone."""
        if self.state != "ok":
            return True
        presence = self.presence
        if presence is None or self.blobs_settles_ns is None or self.blobs_listed_ns is None:
            return False
        if self.blobs_settles_ns > self.blobs_listed_ns:
            return False
        return not presence_differs(self.path, *presence[:6])

    def to_json(self) -> dict[str, object]:
        """The object ``ocidx ls --json`` prints for a layout."""
        return {
            "layout": self.path,
            "state": self.state,
            "entries": self.entry_count,
            "error": self.error_category,
            "message": self.error,
            "content_hash": self.content_hash,
            "last_good_ns": self.last_good_ns,
            "checked_ns": self.checked_ns,
        }


_LAYOUT_COLUMNS = (
    "id, path, dev, ino, size, mtime_ns, ctime_ns, read_ns, content_hash, state, error_category, error, "
    "last_good_ns, checked_ns, entry_count, identity_since_ns, version, blobs_dir, blobs_dev, blobs_ino, "
    "blobs_mtime_ns, blobs_ctime_ns, blobs_more, blobs_root, blobs_listed_ns, blobs_since_ns, blobs_settles_ns, "
    "graph_hash, retry_ns, depends, mnt_id"
)

if TYPE_CHECKING:
    # The identity of the directories a layout's graph was listed from (layouts.blobs_dir ... blobs_root).
    Presence = tuple[str, int | None, int | None, int | None, int | None, str | None, str | None]


def presence_differs(
    path: str,
    name: str,
    dev: int | None,
    ino: int | None,
    mtime_ns: int | None,
    ctime_ns: int | None,
    more: str | None,
) -> bool:
    """Whether a directory of layout *path*'s ``blobs/`` is not as stored: the first (*name*, relative to
    the layout; *dev* None when it was absent) and those in *more* (JSON). One ``stat`` each."""
    if _directory_differs(path + "/" + name, dev, ino, mtime_ns, ctime_ns):
        return True
    if more:
        for other, *identity in json.loads(more):
            if _directory_differs(path + "/" + other, *identity):
                return True
    return False


def _directory_differs(path: str, dev: int | None, ino: int | None, mtime_ns: int | None, ctime_ns: int | None) -> bool:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return dev is not None
    except OSError:
        return True  # unreadable now: the read says why, never a proof
    return st.st_mtime_ns != mtime_ns or st.st_ctime_ns != ctime_ns or st.st_ino != ino or st.st_dev != dev


def _stored(row: Sequence[object]) -> StoredLayout:
    (lid, path, dev, ino, size, mtime, ctime, read_ns, chash, state, cat, err, good, checked, count, since, version) = (
        row[:17]
    )
    bdir, bdev, bino, bmtime, bctime, bmore, broot, blisted, bsince, bsettles, graph_hash = row[17:28]
    retry, depends, mnt_id = row[28:31]
    identity = (
        FileIdentity(dev=dev, ino=ino, size=size, mtime_ns=mtime, ctime_ns=ctime)  # type: ignore[arg-type]
        if dev is not None
        else None
    )
    return StoredLayout(
        id=lid,  # type: ignore[arg-type]
        path=path_of(path),  # type: ignore[arg-type]
        identity=identity,
        read_ns=read_ns,  # type: ignore[arg-type]
        content_hash=chash,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        error_category=cat,  # type: ignore[arg-type]
        error=err,  # type: ignore[arg-type]
        last_good_ns=good,  # type: ignore[arg-type]
        checked_ns=checked,  # type: ignore[arg-type]
        entry_count=count,  # type: ignore[arg-type]
        identity_since_ns=since,  # type: ignore[arg-type]
        version=version,  # type: ignore[arg-type]
        presence=(bdir, bdev, bino, bmtime, bctime, bmore, broot) if bdir is not None else None,  # type: ignore[arg-type]
        blobs_listed_ns=blisted,  # type: ignore[arg-type]
        blobs_since_ns=bsince,  # type: ignore[arg-type]
        blobs_settles_ns=bsettles,  # type: ignore[arg-type]
        graph_hash=graph_hash,  # type: ignore[arg-type]
        retry_ns=retry,  # type: ignore[arg-type]
        depends=depends,  # type: ignore[arg-type]
        mnt_id=mnt_id,  # type: ignore[arg-type]
    )


def encode_depends(depends: Iterable[tuple[str, object]]) -> str | None:
    """The stored form of a snapshot's dependencies (``layout.Snapshot.depends``): JSON, in path order,
    so that equal sets encode equal; None for none (the common case, which costs nothing to prove)."""
    items = sorted(depends)
    return json.dumps(items, separators=(",", ":")) if items else None


def same_rows_depend(stored: str | None, read: str | None) -> bool:
    """Whether two reads' dependencies (:func:`encode_depends`) make the same rows from the same
    ``index.json`` bytes: the same blobs absent, the same present but unusable. What each read found
    at the path of an unusable one (its identity, or unsettled) is for the proofs only."""
    if stored == read:
        return True
    if stored is None or read is None:
        return False

    def shape(encoded: str) -> list[tuple[str, bool]]:
        return [(path, state is None) for path, state in json.loads(encoded)]

    return shape(stored) == shape(read)


def depends_hold(path: str, depends: str | None) -> bool:
    """Whether everything stored rows of the layout at *path* depend on besides ``index.json`` is as
    it was when they were read: each path still absent, or still the same file; never for a path
    that was unsettled then or cannot be looked at now."""
    if depends is None:
        return True
    prefix = path if path.endswith("/") else path + "/"
    for relative, then in json.loads(depends):
        try:
            st = os.stat(prefix + relative)
        except OSError as exc:
            if then is None and exc.errno in _ABSENT:
                continue
            return False
        if then is None or not isinstance(then, list):
            return False  # it arrived (or was unsettled when read)
        if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] != then:
            return False
    return True


_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def mount_holds(path: str, stored: StoredLayout) -> bool:
    """Whether the layout's ``index.json`` is on the mount it was read on, as far as that is known: a
    file system with identical metadata mounted in its place has another mount id (indexer._statx).
    When the system cannot say now, the identity alone decides, as it did before mount ids."""
    if stored.mnt_id is None or stored.identity is None:
        return True
    from indexer._statx import mount_of

    now = mount_of(os.path.join(path, "index.json"))
    return now is None or now[0] != stored.identity.dev or now[1] == stored.mnt_id


def remounted(members: Mapping[tuple[int, int], Sequence[str]], file: str = "index.json") -> set[tuple[int, int]]:
    """The (device, mount id) pairs stored rows were read on that are known to be gone, for a whole
    walk at once: a file system keeps its device number while it is mounted, so a file that shows the
    device with another mount id is on another mount of that number, and so is everything stored with
    the pair. *members* maps each pair to a few paths read on it (directories, or layouts whose *file*
    is asked); the first that still shows the device answers for all. A pair none of them answers for
    (gone, replaced, or the system cannot say now) is left to each row's own identity, as before
    mount ids were kept."""
    if not members:
        return set()
    from indexer._statx import mount_of

    changed: set[tuple[int, int]] = set()
    for (device, mnt_id), paths in members.items():
        for path in paths:
            now = mount_of(os.path.join(path, file) if file else path)
            if now is not None and now[0] == device:
                if now[1] != mnt_id:
                    changed.add((device, mnt_id))
                break
    return changed


def mount_members(
    rows: Mapping[str, Sequence[object]], device: int, mount: int, per_mount: int = 3
) -> dict[tuple[int, int], list[str]]:
    """Rows by path grouped by (device, mount id) (the columns at *device* and *mount* of each row), a few
    paths each, for :func:`remounted`. The distinct pairs are taken in C (``set(map(itemgetter))``:
    0.6 ms at 10,000 rows, where a loop that groups them cost twice that); a few rows per pair are
    then looked for, usually among the first."""
    from operator import itemgetter

    members: dict[tuple[int, int], list[str]] = {}
    for key in set(map(itemgetter(device, mount), rows.values())):
        if key[0] is None or key[1] is None:
            continue
        found = members[key] = []
        for path, row in rows.items():
            if row[mount] == key[1] and row[device] == key[0]:
                found.append(path)
                if len(found) == per_mount:
                    break
    return members


def layout(conn: sqlite3.Connection, path: str) -> StoredLayout | None:
    """The stored state of the layout at *path* (resolved), or None."""
    row = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE path = ?", (path_value(path),)).fetchone()
    return None if row is None else _stored(row)


def layouts(conn: sqlite3.Connection, under: str | None = None) -> list[StoredLayout]:
    """Every stored layout (below directory *under* when given), by path."""
    if under is None:
        rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts ORDER BY path")
    else:
        # Compared as bytes, so that text and BLOB (non-UTF-8) paths below *under* are both found.
        prefix = os.fsencode(under.rstrip("/") + "/")
        rows = conn.execute(
            f"SELECT {_LAYOUT_COLUMNS} FROM layouts "
            "WHERE path = ? OR substr(CAST(path AS BLOB), 1, ?) = ? ORDER BY path",
            (path_value(under), len(prefix), prefix),
        )
    return [_stored(row) for row in rows]


def retries(conn: sqlite3.Connection, paths: Iterable[str] | None = None) -> dict[str, int]:
    """Layouts (all, or those at *paths*) whose last read failed for a reason outside their bytes, and
    when (wall clock, ns) the daemon reads each again."""
    if paths is None:
        rows = conn.execute("SELECT path, retry_ns FROM layouts WHERE retry_ns IS NOT NULL")
        return {path_of(path): when for path, when in rows}
    found: dict[str, int] = {}
    wanted = [path_value(p) for p in paths]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT path, retry_ns FROM layouts WHERE retry_ns IS NOT NULL AND path IN ({marks})", chunk
        )
        found.update((path_of(path), when) for path, when in rows)
    return found


def in_error(conn: sqlite3.Connection) -> list[StoredLayout]:
    """Every layout whose last read failed (state ``error``), by path."""
    rows = conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE state = 'error' ORDER BY path")
    return [_stored(row) for row in rows]


def layouts_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, StoredLayout]:
    """The stored layouts with these ids."""
    wanted = sorted(set(ids))
    result: dict[int, StoredLayout] = {}
    for chunk in _chunks(wanted):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_LAYOUT_COLUMNS} FROM layouts WHERE id IN ({marks})", chunk):
            stored = _stored(row)
            result[stored.id] = stored
    return result


class Hit(Record):
    """One entry (or child manifest) that a query reached."""

    __slots__ = (
        "annotations",
        "digest",
        "entry_id",
        "layout_id",
        "media_type",
        "platform",
        "position",
        "size",
        "source",
    )

    def __init__(
        self,
        *,
        entry_id: int,
        layout_id: int,
        position: int,
        digest: str,
        media_type: str,
        size: int,
        platform: dict[str, object] | None,
        annotations: dict[str, str],
        source: str,
    ) -> None:
        self.entry_id = entry_id
        self.layout_id = layout_id
        self.position = position
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.platform = platform
        self.annotations = annotations
        self.source = source


def _hit(row: Sequence[object], source: str) -> Hit:
    entry_id, layout_id, position, digest, media_type, size, platform, annotations = row
    return Hit(
        entry_id=entry_id,  # type: ignore[arg-type]
        layout_id=layout_id,  # type: ignore[arg-type]
        position=position,  # type: ignore[arg-type]
        digest=digest,  # type: ignore[arg-type]
        media_type=media_type,  # type: ignore[arg-type]
        size=size,  # type: ignore[arg-type]
        platform=json.loads(platform) if platform else None,  # type: ignore[arg-type]
        annotations=json.loads(annotations),  # type: ignore[arg-type]
        source=source,
    )


def _scope(layout_id: int | None, column: str) -> tuple[str, tuple[int, ...]]:
    if layout_id is None:
        return "", ()
    return f" AND {column} = ?", (layout_id,)


class Lookup(Record):
    """One indexed lookup: the rows of *table* (``names``, ``entries``, ``children``) whose *columns* equal *values*.

    The matching rules are stated once, as lookups (:func:`lookups`, :func:`pointing_lookup`);
    :func:`hits` runs them on SQLite, and the fleet renders the same lookups as PostgreSQL.
    """

    __slots__ = ("columns", "table", "values")

    def __init__(self, table: str, columns: tuple[str, ...], values: tuple[str, ...]) -> None:
        self.table = table
        self.columns = columns
        self.values = values


def lookups(*, name: str | None, tag: str | None, digest: str | None) -> list[Lookup]:
    """The rows a query reaches across layouts (docs/semantics.md), in answer order.

    A digest reaches top-level entries, then child manifests of nested indexes, whatever names
    come with it (those only check that the names point at it: :func:`pointing_lookup`); a name
    reaches its canonical (repository, tag) pair, tag '' being the untagged name; a bare tag
    reaches every repository's entries with that tag (``latest`` when none is given).
    """
    if digest is not None:
        return [Lookup("entries", ("digest",), (digest,)), Lookup("children", ("digest",), (digest,))]
    if name is not None:
        return [Lookup("names", ("name", "tag"), (name, tag or ""))]
    return [Lookup("names", ("tag",), (tag or "latest",))]


def pointing_lookup(*, name: str | None, tag: str | None) -> Lookup:
    """The names that must point at the digest of a ``NAME[:TAG]@DIGEST`` or ``:TAG@DIGEST`` query."""
    if name is not None:
        return Lookup("names", ("name", "tag"), (name, tag)) if tag else Lookup("names", ("name",), (name,))
    return Lookup("names", ("tag",), (tag or "",))


def hits(conn: sqlite3.Connection, lookup: Lookup, layout_id: int | None = None) -> list[Hit]:
    """The entries (or child manifests) *lookup* reaches, optionally in one layout, in index order."""
    if lookup.table == "names":
        where = " AND ".join(f"n.{column} = ?" for column in lookup.columns)
        scope, scope_args = _scope(layout_id, "n.layout_id")
        # The entries are picked by id first: an entry with thousands of matching names (a comma list)
        # is one id, where a DISTINCT over the joined rows compared its whole annotations once per name.
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries e WHERE e.id IN (SELECT n.entry_id FROM names n "
            f"WHERE {where}{scope}) ORDER BY e.layout_id, e.position",
            (*lookup.values, *scope_args),
        )
        return [_hit(row, "entry") for row in rows]
    (column,) = lookup.columns  # entries and children are looked up by digest
    if lookup.table == "entries":
        where, args = _scope(layout_id, "e.layout_id")
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries e WHERE e.{column} = ?{where} ORDER BY e.layout_id, e.position",
            (*lookup.values, *args),
        )
        return [_hit(row, "entry") for row in rows]
    where, args = _scope(layout_id, "c.layout_id")
    rows = conn.execute(
        "SELECT c.entry_id, c.layout_id, c.position, c.digest, c.media_type, c.size, c.platform, "
        f"c.annotations FROM children c WHERE c.{column} = ?{where} ORDER BY c.layout_id, c.entry_id, c.position",
        (*lookup.values, *args),
    )
    return [_hit(row, "child") for row in rows]


def by_tag(conn: sqlite3.Connection, tag: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with a name carrying *tag*, whatever the repository."""
    return hits(conn, Lookup("names", ("tag",), (tag,)), layout_id)


def by_name(conn: sqlite3.Connection, name: str, tag: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with the canonical (repository, tag) pair; tag '' is the untagged name."""
    return hits(conn, Lookup("names", ("name", "tag"), (name, tag)), layout_id)


def by_repository(conn: sqlite3.Connection, name: str, layout_id: int | None = None) -> list[Hit]:
    """Entries with any name in repository *name*, tagged or not."""
    return hits(conn, Lookup("names", ("name",), (name,)), layout_id)


def by_digest(conn: sqlite3.Connection, digest: str, layout_id: int | None = None) -> list[Hit]:
    """Top-level entries with *digest*, then child manifests of nested indexes with it."""
    return [h for lookup in lookups(name=None, tag=None, digest=digest) for h in hits(conn, lookup, layout_id)]


class ChildRow(Record):
    """A manifest listed by a nested index under one top-level entry."""

    __slots__ = ("depth", "digest", "media_type", "parent", "platform", "size")

    def __init__(
        self,
        *,
        parent: str,
        depth: int,
        digest: str,
        media_type: str,
        size: int,
        platform: dict[str, object] | None,
    ) -> None:
        self.parent = parent
        self.depth = depth
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.platform = platform


# The descriptors reachable from one index in one layout: each distinct index once (UNION), however
# many paths lead to it. Children are stored once per layout (layout.nested._ChildWalk), under the first
# entry that reached them, so they are found by digest, from any entry or nested index.
_REACHABLE_SQL = f"""
    WITH RECURSIVE reach(digest) AS (
        SELECT ?
        UNION
        SELECT c.digest FROM children c JOIN reach r ON c.parent = r.digest
        WHERE c.layout_id = ? AND c.media_type IN ({", ".join(f"'{t}'" for t in sorted(INDEX_MEDIA_TYPES))})
    )
    SELECT parent, depth, digest, media_type, size, platform FROM children
    WHERE layout_id = ? AND parent IN (SELECT digest FROM reach) ORDER BY entry_id, position
"""


def children(conn: sqlite3.Connection, layout_id: int, digest: str) -> list[ChildRow]:
    """The descriptors listed below the index *digest* in layout *layout_id*, nested ones too, each
    once, breadth first (the order the walk met them)."""
    return [
        ChildRow(
            parent=parent,
            depth=depth,
            digest=child,
            media_type=media_type,
            size=size,
            platform=json.loads(platform) if platform else None,
        )
        for parent, depth, child, media_type, size, platform in conn.execute(
            _REACHABLE_SQL, (digest, layout_id, layout_id)
        )
    ]


def names(conn: sqlite3.Connection, entry_ids: Iterable[int]) -> dict[int, list[Name]]:
    """The names of each entry, in the order they were read."""
    result: dict[int, list[Name]] = {}
    for chunk in _chunks(sorted(set(entry_ids))):
        marks = ",".join("?" * len(chunk))
        for entry_id, name, tag, how in conn.execute(
            f"SELECT entry_id, name, tag, how FROM names WHERE entry_id IN ({marks}) ORDER BY entry_id, rowid",
            chunk,
        ):
            result.setdefault(entry_id, []).append(Name(name, tag, how))
    return result


def entries(conn: sqlite3.Connection, layout_id: int) -> list[tuple[Hit, list[str], list[str]]]:
    """Every entry of a layout with its invalid raw names and warnings (for ``ls PATH``)."""
    rows = conn.execute(
        f"SELECT {_ENTRY_COLUMNS}, e.invalid_names, e.warnings FROM entries e "
        "WHERE e.layout_id = ? ORDER BY e.position",
        (layout_id,),
    )
    return [
        (_hit(row[:8], "entry"), json.loads(row[8]) if row[8] else [], json.loads(row[9]) if row[9] else [])
        for row in rows
    ]


def layout_warnings(conn: sqlite3.Connection, layout_id: int) -> list[str]:
    """The layout-level warnings of the last good read."""
    return [
        row[0]
        for row in conn.execute("SELECT message FROM layout_warnings WHERE layout_id = ? ORDER BY rowid", (layout_id,))
    ]


def sample_names(conn: sqlite3.Connection, layout_id: int, limit: int = 5) -> list[str]:
    """A few ``name:tag`` (or ``:tag``) the layout holds, for not-found messages."""
    out = []
    for name, tag in conn.execute(
        "SELECT DISTINCT name, tag FROM names WHERE entry_id IN (SELECT id FROM entries WHERE layout_id = ?) "
        "ORDER BY tag = 'latest' DESC, name, tag LIMIT ?",
        (layout_id, limit),
    ):
        out.append(f"{name}:{tag}" if name and tag else (name or f":{tag}"))
    return out


def _chunks(values: list[int], size: int = 500) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def count_names(conn: sqlite3.Connection, layout_id: int) -> int:
    """How many distinct ``name:tag`` the layout holds (for "and N more")."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT name, tag FROM names "
        "WHERE entry_id IN (SELECT id FROM entries WHERE layout_id = ?))",
        (layout_id,),
    ).fetchone()
    return int(row[0])


# -- the content graph -------------------------------------------------------------------------------


class Image(Record):
    """What the content graph holds of one manifest or index digest (host-wide rows), with its config's
    platform and ``created``; ``layers`` is the stored list (:func:`parse_layers`), None for an index."""

    __slots__ = (
        "annotations",
        "artifact_type",
        "complete",
        "config",
        "config_media_type",
        "config_size",
        "created",
        "digest",
        "image_size",
        "kind",
        "layer_count",
        "layers",
        "media_type",
        "platform",
        "size",
        "subject",
    )

    def __init__(
        self,
        *,
        digest: str,
        kind: str,
        media_type: str,
        size: int,
        artifact_type: str,
        subject: str | None,
        annotations: dict[str, str],
        config: str | None,
        config_media_type: str | None,
        config_size: int | None,
        layers: str | None,
        layer_count: int | None,
        image_size: int | None,
        complete: bool,
        created: str | None = None,
        platform: dict[str, object] | None = None,
    ) -> None:
        self.digest = digest
        self.kind = kind
        self.media_type = media_type
        self.size = size
        self.artifact_type = artifact_type
        self.subject = subject
        self.annotations = annotations
        self.config = config
        self.config_media_type = config_media_type
        self.config_size = config_size
        self.layers = layers
        self.layer_count = layer_count
        self.image_size = image_size
        self.complete = complete
        self.created = created
        self.platform = platform

    def blobs(self) -> list[str]:
        """The digests an image is made of: the manifest, its config and its layers."""
        found = [self.digest]
        if self.config is not None:
            found.append(self.config)
        if self.layers:
            found.extend(layer[0] for layer in parse_layers(self.layers))
        return found

    def referrer_type(self) -> str:
        """``artifactType`` as the OCI referrers API gives it: the manifest's, else its config's media type."""
        return self.artifact_type or self.config_media_type or ""


_IMAGE_COLUMNS = (
    "key, digest, kind, media_type, size, artifact_type, subject, annotations, config, config_key, "
    "config_media_type, config_size, layers, layer_count, image_size, complete"
)


def images(conn: sqlite3.Connection, digests: Iterable[str]) -> dict[str, Image]:
    """The content graph's rows of *digests* (manifests and indexes read on this host), by digest."""
    wanted = {graph_key(d): d for d in set(digests)}
    rows: list[Sequence[object]] = []
    for chunk in _chunks(sorted(wanted)):
        marks = ",".join("?" * len(chunk))
        # A row of another digest with the same first 63 bits is not this image.
        found_rows = conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM manifests WHERE key IN ({marks})", chunk)
        rows.extend(row for row in found_rows if wanted.get(row[0]) == row[1])
    configs: dict[str, tuple[str | None, dict[str, object] | None]] = {}
    config_keys = sorted({int(row[9]) for row in rows if row[9] is not None})  # type: ignore[call-overload]
    for chunk in _chunks(config_keys):
        marks = ",".join("?" * len(chunk))
        for digest, os_, arch, variant, created in conn.execute(
            f"SELECT digest, os, architecture, variant, created FROM configs WHERE key IN ({marks})", chunk
        ):
            platform = {"os": os_, "architecture": arch, "variant": variant} if os_ is not None else None
            configs[digest] = (created, platform)
    found: dict[str, Image] = {}
    for row in rows:
        (_key, digest, kind, media_type, size, artifact, subject, notes, config, _config_key, config_type) = row[:11]
        config_size, layers, layer_count, size_of_image, complete = row[11:]
        created, platform = configs.get(config, (None, None)) if isinstance(config, str) else (None, None)
        found[str(digest)] = Image(
            digest=str(digest),
            kind=str(kind),
            media_type=str(media_type),
            size=int(size),  # type: ignore[call-overload]
            artifact_type=str(artifact),
            subject=subject,  # type: ignore[arg-type]
            annotations=json.loads(notes) if notes else {},  # type: ignore[arg-type]
            config=config,  # type: ignore[arg-type]
            config_media_type=config_type,  # type: ignore[arg-type]
            config_size=config_size,  # type: ignore[arg-type]
            layers=layers,  # type: ignore[arg-type]
            layer_count=layer_count,  # type: ignore[arg-type]
            image_size=size_of_image,  # type: ignore[arg-type]
            complete=bool(complete),
            created=created,
            platform=platform,
        )
    return found


class Usage(Record):
    """What one layout's ``blobs/`` holds (``layout_graph``): figures, missing keys, held set."""

    __slots__ = (
        "complete",
        "held",
        "layout_id",
        "missing",
        "missing_blobs",
        "referenced_blobs",
        "referenced_bytes",
        "unreferenced_blobs",
        "unreferenced_bytes",
    )

    def __init__(self, row: Sequence[object]) -> None:
        (
            self.layout_id,
            self.complete,
            self.referenced_blobs,
            self.referenced_bytes,
            self.missing_blobs,
            self.unreferenced_blobs,
            self.unreferenced_bytes,
            self.missing,
            self.held,
        ) = row

    def missing_keys(self) -> set[int]:
        """The graph keys of the referenced blobs absent from the layout."""
        return set(unpack_pairs(self.missing)) if self.missing else set()  # type: ignore[arg-type]

    def held_arrays(self) -> tuple[array[int], array[int]]:
        """The keys of the blobs present (referenced ones first, :func:`graph_key`) and their sizes, as
        int64 arrays."""
        held: bytes = self.held  # type: ignore[assignment]
        half = len(held) // 2
        keys, sizes = array("q"), array("q")
        keys.frombytes(held[:half])
        sizes.frombytes(held[half:])
        if sys.byteorder != "little":
            sizes.byteswap()  # stored little-endian (the keys are only compared)
        return keys, sizes


_USAGE_COLUMNS = (
    "layout_id, complete, referenced_blobs, referenced_bytes, missing_blobs, unreferenced_blobs, "
    "unreferenced_bytes, missing, held"
)


def usage(conn: sqlite3.Connection, layout_ids: Iterable[int] | None = None) -> dict[int, Usage]:
    """What the ``blobs/`` of each layout (of *layout_ids*, or all) holds, by layout id."""
    if layout_ids is None:
        return {row[0]: Usage(row) for row in conn.execute(f"SELECT {_USAGE_COLUMNS} FROM layout_graph")}
    found: dict[int, Usage] = {}
    for chunk in _chunks(sorted(set(layout_ids))):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_USAGE_COLUMNS} FROM layout_graph WHERE layout_id IN ({marks})", chunk):
            found[row[0]] = Usage(row)
    return found


def missing(conn: sqlite3.Connection, layout_ids: Iterable[int]) -> dict[int, set[int]]:
    """The keys (:func:`graph_key`) of the referenced blobs absent from each layout (of *layout_ids*) whose
    ``blobs/`` the index knows (a layout with no entry here: not known)."""
    found: dict[int, set[int]] = {}
    for chunk in _chunks(sorted(set(layout_ids))):
        marks = ",".join("?" * len(chunk))
        for lid, keys in conn.execute(
            f"SELECT layout_id, missing FROM layout_graph WHERE layout_id IN ({marks})", chunk
        ):
            found[lid] = set(unpack_pairs(keys)) if keys else set()
    return found


def image_size(image: Image, absent: set[int] | None) -> int | None:
    """The bytes of *image* in a layout whose absent blobs are *absent* (:func:`graph_key`): None for an
    index, for an image whose blobs are not all in that layout, or when what it holds is not known."""
    if image.kind != "manifest" or image.image_size is None or absent is None:
        return None
    if absent and any(graph_key(d) in absent for d in image.blobs()):
        return None
    return image.image_size


class GraphHit(Record):
    """A layout that references a digest as a layer or a config (``find @DIGEST``)."""

    __slots__ = ("digest", "layout_id", "media_type", "size", "source", "used_by")

    def __init__(
        self, *, layout_id: int, digest: str, source: str, media_type: str, size: int, used_by: list[str]
    ) -> None:
        self.layout_id = layout_id
        self.digest = digest
        self.source = source
        self.media_type = media_type
        self.size = size
        self.used_by = used_by


def users(conn: sqlite3.Connection, digest: str) -> list[tuple[str, str, str, int]]:
    """The manifests (read on this host) that use *digest* as a layer or as their config:
    ``(manifest digest, "layer" or "config", mediaType, size)``."""
    key = graph_key(digest)
    found: list[tuple[str, str, str, int]] = []
    for manifest, layers in conn.execute(
        "SELECT m.digest, m.layers FROM layer_users u JOIN manifests m ON m.key = u.manifest WHERE u.layer = ?",
        (key,),
    ):
        for layer, media_type, size, _external in parse_layers(layers or "[]"):
            if layer == digest:
                found.append((manifest, "layer", media_type, size))
                break
    for manifest, media_type, size in conn.execute(
        "SELECT digest, config_media_type, config_size FROM manifests WHERE config_key = ? AND config = ?",
        (key, digest),
    ):
        found.append((manifest, "config", media_type, size))
    return found


def referencing(conn: sqlite3.Connection, digests: Iterable[str], layout_id: int | None = None) -> dict[int, set[str]]:
    """The layouts whose entries or children name any of *digests*: layout id to the digests it names."""
    found: dict[int, set[str]] = {}
    where, args = _scope(layout_id, "layout_id")
    for digest in set(digests):
        for table in ("entries", "children"):
            for (lid,) in conn.execute(
                f"SELECT DISTINCT layout_id FROM {table} WHERE digest = ?{where}", (digest, *args)
            ):
                found.setdefault(lid, set()).add(digest)
    return found


def graph_hits(conn: sqlite3.Connection, digest: str, layout_id: int | None = None) -> list[GraphHit]:
    """The layouts (or layout *layout_id*) that reference *digest* as a layer or a config of a manifest
    they reference, each with those manifests (``used_by``), by layout then source."""
    used = users(conn, digest)
    if not used:
        return []
    by_manifest: dict[str, tuple[str, str, int]] = {m: (source, mt, size) for m, source, mt, size in used}
    return blob_uses(digest, referencing(conn, by_manifest, layout_id), by_manifest)


def blob_uses(
    digest: str, referencing: dict[int, set[str]], by_manifest: dict[str, tuple[str, str, int]]
) -> list[GraphHit]:
    """The hits of :func:`graph_hits`: for each layout of *referencing* (layout id to the manifests it
    references that use *digest*), by layout, the config use then the layer use, each with its manifests
    sorted and the media type and size the first of them gives (*by_manifest*: manifest to ``(source,
    mediaType, size)``)."""
    hits: list[GraphHit] = []
    for lid, manifests in sorted(referencing.items()):
        for source in ("config", "layer"):
            mine = sorted(m for m in manifests if by_manifest[m][0] == source)
            if mine:
                _source, media_type, size = by_manifest[mine[0]]
                hits.append(
                    GraphHit(
                        layout_id=lid, digest=digest, source=source, media_type=media_type, size=size, used_by=mine
                    )
                )
    return hits


class ReferrerHit(Record):
    """A manifest or index in a layout that refers to a target digest, and how (``referrers``)."""

    __slots__ = ("digest", "how", "layout_id", "media_type", "subject")

    def __init__(self, *, layout_id: int, digest: str, media_type: str, subject: str, how: str) -> None:
        self.layout_id = layout_id
        self.digest = digest
        self.media_type = media_type
        self.subject = subject
        self.how = how


FALLBACK_SUFFIXES = ("", ".sig", ".att", ".sbom")


def fallback_tags(digest: str) -> list[str]:
    """The tags that registries without the referrers API give a digest's referrers: the OCI
    distribution spec's ``ALG-HEX`` (an index of referrers; HEX cut at 64 characters) and cosign's
    ``ALG-HEX.sig``, ``.att`` and ``.sbom``."""
    algorithm, _, encoded = digest.partition(":")
    base = f"{algorithm}-{encoded[:64]}"
    return [base + suffix for suffix in FALLBACK_SUFFIXES]


def referrer_hits(conn: sqlite3.Connection, target: str, layout_id: int | None = None) -> list[ReferrerHit]:
    """Every manifest or index, in every layout (or layout *layout_id*), that refers to *target*: by its
    ``subject``, as a BuildKit attestation manifest listed for it (or listed in it, for an index), or
    under a fallback tag."""
    found: dict[tuple[int, str, str], ReferrerHit] = {}

    def add(lid: int, digest: str, media_type: str, how: str, subject: str = target) -> None:
        found.setdefault(
            (lid, digest, how),
            ReferrerHit(layout_id=lid, digest=digest, media_type=media_type, subject=subject, how=how),
        )

    where, args = _scope(layout_id, "layout_id")
    referrers = [row[0] for row in conn.execute("SELECT digest FROM manifests WHERE subject = ?", (target,))]
    for digest in referrers:
        for table in ("entries", "children"):
            for lid, media_type in conn.execute(
                f"SELECT DISTINCT layout_id, media_type FROM {table} WHERE digest = ?{where}", (digest, *args)
            ):
                add(lid, digest, media_type, "subject")
    key = graph_key(target)
    # Attestation manifests listed for the target (beside it, in the index that lists it) ...
    listed = conn.execute(
        "SELECT a.digest, m.digest, a.target FROM attestations a JOIN manifests m ON m.key = a.index_key "
        "WHERE a.target_key = ? AND a.target = ?",
        (key, target),
    ).fetchall()
    # ... and, when the target is an index, those it lists (for the images of its platforms).
    own = conn.execute("SELECT digest FROM manifests WHERE key = ? AND digest = ? AND kind = 'index'", (key, target))
    if own.fetchone() is not None:
        rows = conn.execute("SELECT digest, target FROM attestations WHERE index_key = ?", (key,))
        listed += [(digest, target, subject) for digest, subject in rows]
    for digest, index, subject in listed:
        for lid, media_type in conn.execute(
            f"SELECT DISTINCT layout_id, media_type FROM children WHERE digest = ? AND parent = ?{where}",
            (digest, index, *args),
        ):
            add(lid, digest, media_type, "attestation", subject)
    tags = fallback_tags(target)
    marks = ",".join("?" * len(tags))
    where_n, args_n = _scope(layout_id, "n.layout_id")
    for entry_id, lid, digest, media_type, tag in conn.execute(
        f"SELECT e.id, e.layout_id, e.digest, e.media_type, n.tag FROM names n JOIN entries e ON e.id = n.entry_id "
        f"WHERE n.tag IN ({marks}){where_n}",
        (*tags, *args_n),
    ):
        if tag == tags[0] and media_type in INDEX_MEDIA_TYPES:
            # The OCI fallback tag names an index whose descriptors are the referrers themselves.
            for child_digest, child_type in conn.execute(
                "SELECT digest, media_type FROM children WHERE entry_id = ? AND depth = 1 ORDER BY position",
                (entry_id,),
            ):
                add(lid, child_digest, child_type, "fallback-tag")
        else:
            add(lid, digest, media_type, "fallback-tag")
    return sorted(found.values(), key=lambda h: (h.layout_id, h.how, h.digest))
