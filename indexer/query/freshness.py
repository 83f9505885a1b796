"""What the index does not hold yet of the changes made before a lookup: the walk of the recorded roots."""

from __future__ import annotations

import os
import sqlite3

from indexer._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.config import Root


VERIFY_ALL = "\0verify-all\0"  # placeholder in a message, spelled as the caller speaks


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
