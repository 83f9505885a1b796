"""One OCI image layout on disk: ``index.json``, nested indexes in ``blobs/``, platforms.

The parsing is pure (:func:`parse_index` takes bytes); the reads around it are
small and synchronous, so the daemon runs them in a worker thread and the
lookup CLI calls them directly when it has to read a changed layout through.

This package is the public face of a layout (its ``__all__``); each part lives in one module, with the
choices it makes where the OCI image-layout specification is silent (docs/semantics.md restates them
for users):

* :mod:`indexer.layout.records`: the values read (:class:`FileIdentity`, :class:`Limits`,
  :class:`Entry`, :class:`Child`, :class:`IndexBlob`, :class:`Snapshot`) and the media types.
* :mod:`indexer.layout.platforms`: :class:`Platform`, and comparing platforms as containerd does.
* :mod:`indexer.layout.parse`: ``index.json`` parsed (a bad descriptor does not hide the good ones;
  the document itself is strict).
* :mod:`indexer.layout.files`: ``index.json`` and blobs read safely (torn reads, symlinks, containment
  in the layout, hashes), and which directories are layouts.
* :mod:`indexer.layout.nested`: the nested indexes followed into ``blobs/``.
* Here, :func:`read_layout`: the whole of one layout at one moment.

Code outside the package imports these names from ``indexer.layout``; a name not in ``__all__`` is
imported from its own module.
"""

from __future__ import annotations

import os

from indexer._statx import mount_of
from indexer.layout.files import (
    BlobMissing,
    _read_index,
    blob_path,
    is_layout_dir,
    layout_dir_state,
    read_blob,
    read_index_bytes,
)
from indexer.layout.nested import _walk_children, blob_state, read_children
from indexer.layout.parse import _parse_index, parse_index
from indexer.layout.platforms import Platform, normalize_platform, parse_platform_spec, platform_matches
from indexer.layout.records import (
    DEFAULT_LIMITS,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_FILE,
    INDEX_MEDIA_TYPES,
    LAYOUT_FILE,
    OCI_INDEX,
    OCI_MANIFEST,
    Child,
    Entry,
    FileIdentity,
    IndexBlob,
    Limits,
    Snapshot,
)
from indexer.names import DEFAULT_FAMILIAR_POLICY


def read_layout(layout: str, *, familiar: str = DEFAULT_FAMILIAR_POLICY, limits: Limits = DEFAULT_LIMITS) -> Snapshot:
    """Read one layout: ``index.json``, its entries and names, and the children of nested indexes."""
    import hashlib

    path = os.path.join(layout, INDEX_FILE)

    def parse(data: bytes) -> tuple[tuple[Entry, ...], tuple[str, ...], int]:
        return _parse_index(data, familiar=familiar, limits=limits, source=path)

    data, identity, parsed = _read_index(path, limits, parse)
    assert parsed is not None
    entries, warnings, skipped = parsed
    walk = _walk_children(layout, entries, limits)
    content_hash = "sha256:" + hashlib.sha256(data).hexdigest()
    # The mount of the file at that path now: the one that was read when it holds the device read.
    mount = mount_of(path)
    mnt_id = mount[1] if mount is not None and mount[0] == identity.dev else None
    return Snapshot(
        entries,
        tuple(walk.children),
        warnings + tuple(walk.warnings),
        content_hash,
        identity,
        tuple(walk.met.values()),
        skipped,
        walk.full,
        tuple(sorted(walk.depends.items())),
        mnt_id,
    )


__all__ = [
    "DEFAULT_LIMITS",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_FILE",
    "INDEX_MEDIA_TYPES",
    "LAYOUT_FILE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobMissing",
    "Child",
    "Entry",
    "FileIdentity",
    "IndexBlob",
    "Limits",
    "Platform",
    "Snapshot",
    "blob_path",
    "blob_state",
    "is_layout_dir",
    "layout_dir_state",
    "normalize_platform",
    "parse_index",
    "parse_platform_spec",
    "platform_matches",
    "read_blob",
    "read_children",
    "read_index_bytes",
    "read_layout",
]
