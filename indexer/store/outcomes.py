"""What a scan decides for each layout it looks at: one outcome, written by :func:`indexer.store.write.apply`.

A scan (batch or daemon) turns every layout it looks at into one outcome:

* :class:`Read` - ``index.json`` was read and parsed: its rows are diffed in;
* :class:`Same` - it was read but its content hash is the one already stored:
  only the identity (stat) is refreshed, no row is touched;
* :class:`Failed` - it could not be read or parsed: the last good rows stay,
  the layout is flagged with the error;
* :class:`Gone` - the layout is no longer there: its rows are removed.
"""

from __future__ import annotations

from indexer._record import Record
from indexer.store.rows import snapshot_rows

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.errors import LayoutError
    from indexer.graph import LayoutGraph
    from indexer.layout import FileIdentity, Snapshot
    from indexer.store.read import StoredLayout
    from indexer.store.rows import LayoutRows, PresenceRow


class Read(Record):
    """A layout whose ``index.json`` was read and parsed, as the rows to store (:func:`snapshot_rows`).

    ``epoch`` is the ``graph_epoch`` of the pass that read it: the shared rows its graph claims were
    sent before (:data:`GraphRows`) are taken as stored while the epoch has not moved since.
    """

    __slots__ = ("epoch", "expected", "path", "read_ns", "rows")

    def __init__(
        self, path: str, rows: LayoutRows, read_ns: int, expected: StoredLayout | None, epoch: int | None = None
    ) -> None:
        self.path = path
        self.rows = rows
        self.read_ns = read_ns
        self.expected = expected
        self.epoch = epoch

    @classmethod
    def of(
        cls,
        path: str,
        snapshot: Snapshot,
        read_ns: int,
        expected: StoredLayout | None,
        graph: LayoutGraph | None = None,
    ) -> Read:
        """The outcome of reading *snapshot* (and its *graph*), its rows computed here, in this process."""
        return cls(path, snapshot_rows(snapshot, graph), read_ns, expected)


class Same(Record):
    """A layout whose ``index.json`` and graph changed on disk but not in content: identities only."""

    __slots__ = ("depends", "expected", "identity", "mnt_id", "path", "presence", "read_ns")

    def __init__(
        self,
        path: str,
        identity: FileIdentity,
        read_ns: int,
        expected: StoredLayout | None,
        presence: PresenceRow | None = None,
        mnt_id: int | None = None,
        depends: str | None = None,
    ) -> None:
        self.path = path
        self.identity = identity
        self.read_ns = read_ns
        self.expected = expected
        self.presence = presence
        self.mnt_id = mnt_id
        self.depends = depends  # what this read found at the paths the rows depend on (read.encode_depends)


class Failed(Record):
    """A layout that could not be read; its last good rows are kept. ``error.transient`` tells a failure
    of the environment (stored with no identity, read again) from one of the layout's bytes."""

    __slots__ = ("error", "expected", "identity", "path", "read_ns")

    def __init__(
        self,
        path: str,
        error: LayoutError,
        identity: FileIdentity | None,
        read_ns: int,
        expected: StoredLayout | None,
    ) -> None:
        self.path = path
        self.error = error
        self.identity = identity
        self.read_ns = read_ns
        self.expected = expected


class Gone(Record):
    """A layout that vanished: its rows are removed."""

    __slots__ = ("expected", "path")

    def __init__(self, path: str, expected: StoredLayout | None) -> None:
        self.path = path
        self.expected = expected


Outcome = Read | Same | Failed | Gone
