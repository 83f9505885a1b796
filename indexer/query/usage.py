"""``du``'s figures of one layout: what it references and holds, and whether the index's are current."""

from __future__ import annotations

import json
import os

from indexer import layout as layout_mod
from indexer.store import read as db

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
