"""The racy rule and a layout's stored identity: when the rows of a layout are proven current without
reading it (its ``index.json``, the files its rows depend on, its mount, its ``blobs/``)."""

from __future__ import annotations

import errno
import json
import os

from indexer._record import Record
from indexer.layout import FileIdentity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    # The identity of the directories a layout's graph was listed from (layouts.blobs_dir ... blobs_root).
    Presence = tuple[str, int | None, int | None, int | None, int | None, str | None, str | None]


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
