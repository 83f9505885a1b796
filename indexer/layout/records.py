"""The values read from one layout: identities, limits, entries, nested descriptors, snapshots.

Value types only (:class:`indexer._record.Record`, the lookup path's records); what fills them is
in :mod:`indexer.layout.parse`, :mod:`indexer.layout.files` and :mod:`indexer.layout.nested`.
"""

from __future__ import annotations

from indexer._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os

    from indexer.layout.platforms import Platform
    from indexer.names import Name

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

INDEX_FILE = "index.json"
LAYOUT_FILE = "oci-layout"


class FileIdentity(Record):
    """What ``stat`` says about a file: enough to notice any rewrite, in place or by rename."""

    __slots__ = ("ctime_ns", "dev", "ino", "mtime_ns", "size")

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def __init__(self, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> None:
        self.dev = dev
        self.ino = ino
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        """The identity recorded in *st*."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def __eq__(self, other: object) -> bool:
        # Field by field: compared once per layout of every full pass (the daemon's reconcile), where
        # Record's generic tuple-building comparison was a tenth of the walk.
        if type(other) is not FileIdentity:
            return NotImplemented
        return (
            self.mtime_ns == other.mtime_ns
            and self.ctime_ns == other.ctime_ns
            and self.size == other.size
            and self.ino == other.ino
            and self.dev == other.dev
        )

    __hash__ = Record.__hash__


class Limits(Record):
    """Bounds on what one layout may cost to read."""

    __slots__ = (
        "max_blob_bytes",
        "max_children",
        "max_depth",
        "max_entries",
        "max_index_bytes",
        "torn_retries",
    )

    max_index_bytes: int
    max_blob_bytes: int
    max_depth: int
    max_entries: int
    max_children: int
    torn_retries: int

    def __init__(
        self,
        *,
        max_index_bytes: int = 64 * 1024 * 1024,
        max_blob_bytes: int = 16 * 1024 * 1024,
        max_depth: int = 4,
        max_entries: int = 1_000_000,
        max_children: int = 100_000,
        torn_retries: int = 5,
    ) -> None:
        self.max_index_bytes = max_index_bytes
        self.max_blob_bytes = max_blob_bytes
        self.max_depth = max_depth
        self.max_entries = max_entries
        self.max_children = max_children
        self.torn_retries = torn_retries


DEFAULT_LIMITS = Limits()


class Entry(Record):
    """One descriptor of ``index.json`` ``manifests`` with the names read from it."""

    __slots__ = (
        "annotations",
        "digest",
        "invalid_names",
        "media_type",
        "names",
        "platform",
        "position",
        "size",
        "warnings",
    )

    position: int
    digest: str
    media_type: str
    size: int
    annotations: dict[str, str]
    platform: Platform | None
    names: tuple[Name, ...]
    invalid_names: tuple[str, ...]
    warnings: tuple[str, ...]

    def __init__(
        self,
        position: int,
        digest: str,
        media_type: str,
        size: int,
        annotations: dict[str, str],
        platform: Platform | None = None,
        names: tuple[Name, ...] = (),
        invalid_names: tuple[str, ...] = (),
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.position = position
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.annotations = annotations
        self.platform = platform
        self.names = names
        self.invalid_names = invalid_names
        self.warnings = warnings


class Child(Record):
    """A descriptor listed inside a nested index (``blobs/``), below top-level entry ``entry_position``."""

    __slots__ = (
        "annotations",
        "depth",
        "digest",
        "entry_position",
        "media_type",
        "parent",
        "platform",
        "size",
    )

    parent: str
    entry_position: int
    depth: int
    digest: str
    media_type: str
    size: int
    platform: Platform | None
    annotations: dict[str, str]

    def __init__(
        self,
        parent: str,
        entry_position: int,
        depth: int,
        digest: str,
        media_type: str,
        size: int,
        platform: Platform | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.parent = parent
        self.entry_position = entry_position
        self.depth = depth
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.platform = platform
        self.annotations = annotations if annotations is not None else {}


class IndexBlob(Record):
    """A nested index blob as the walk of nested indexes met it (once per digest).

    ``state`` is ``ok`` (read, its hash checked), ``missing`` (not in ``blobs/``), ``invalid`` (refused: hash,
    size, type, not an index) or ``deep`` (beyond ``Limits.max_depth``, not followed). ``skipped`` counts the
    descriptors it lists that could not be used; ``head`` holds its own ``mediaType``, ``artifactType``,
    ``subject`` and ``annotations`` as written (checked by :mod:`indexer.graph`).
    """

    __slots__ = ("digest", "head", "size", "skipped", "state")

    digest: str
    size: int
    state: str
    skipped: int
    head: dict[str, object]

    def __init__(self, digest: str, size: int, state: str, skipped: int = 0, head: dict[str, object] | None = None):
        self.digest = digest
        self.size = size
        self.state = state
        self.skipped = skipped
        self.head = head if head is not None else {}


class Snapshot(Record):
    """Everything read from one layout at one moment.

    ``indexes`` are the nested index blobs the walk met; ``skipped`` counts the descriptors of
    ``index.json`` that could not be used, and ``truncated`` says the walk stopped at
    ``Limits.max_children``: what the layout references is then not wholly known (:attr:`complete`).

    ``depends`` is what the rows depend on besides ``index.json`` (:data:`Dependency`): the nested
    index blobs that were absent or unusable, each with what the read found at its path. A proof
    that the rows are current checks them too (``store.read.depends_hold``): a blob that arrives
    later, ``index.json`` untouched, changes what the layout answers.
    """

    __slots__ = (
        "children",
        "content_hash",
        "depends",
        "entries",
        "identity",
        "indexes",
        "mnt_id",
        "skipped",
        "truncated",
        "warnings",
    )

    entries: tuple[Entry, ...]
    children: tuple[Child, ...]
    warnings: tuple[str, ...]
    content_hash: str
    identity: FileIdentity
    indexes: tuple[IndexBlob, ...]
    skipped: int
    truncated: bool
    depends: tuple[Dependency, ...]
    mnt_id: int | None

    def __init__(
        self,
        entries: tuple[Entry, ...],
        children: tuple[Child, ...],
        warnings: tuple[str, ...],
        content_hash: str,
        identity: FileIdentity,
        indexes: tuple[IndexBlob, ...] = (),
        skipped: int = 0,
        truncated: bool = False,
        depends: tuple[Dependency, ...] = (),
        mnt_id: int | None = None,
    ) -> None:
        self.entries = entries
        self.children = children
        self.warnings = warnings
        self.content_hash = content_hash
        self.identity = identity
        self.indexes = indexes
        self.skipped = skipped
        self.truncated = truncated
        self.depends = depends
        # The unique id of the mount index.json was read on (indexer._statx), or None where the
        # system cannot say: compared by every proof, as the identity is.
        self.mnt_id = mnt_id

    @property
    def complete(self) -> bool:
        """Whether every descriptor of ``index.json`` and of its nested indexes was read."""
        return (
            not self.skipped
            and not self.truncated
            and all(blob.state == "ok" and not blob.skipped for blob in self.indexes)
        )


if TYPE_CHECKING:
    # A path inside the layout (``blobs/ALG/HEX``) and what a read found there: None, absent; the
    # identity (dev, ino, size, mtime_ns, ctime_ns) of the file that could not be used; or UNSETTLED,
    # a file changed within the racy window of the read, which proves nothing yet.
    Dependency = tuple[str, tuple[int, int, int, int, int] | str | None]

UNSETTLED = "unsettled"
