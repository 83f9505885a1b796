"""The nested indexes of a layout: the entries that are indexes followed into ``blobs/``.

Choices where the OCI image-layout specification is silent (docs/semantics.md restates them for users):

* **Nested indexes.** Entries whose media type is an OCI image index or a
  Docker manifest list are followed into ``blobs/``. Every descriptor found
  is a :class:`Child` (depth 1 = listed in a top-level entry's index);
  children that are indexes themselves are followed up to
  ``Limits.max_depth``, and never into an index already on the path
  (a cycle can only come from a forged blob, which the hash check already
  refuses). At most ``Limits.max_children`` children are kept. A missing or
  bad child blob is a layout warning, never fatal. Names in nested indexes
  are not read.
"""

from __future__ import annotations

import errno
import os

from indexer import reference
from indexer.errors import BlobError, IndexParseError, InvalidReference, LayoutUnreadable
from indexer.layout.files import BlobMissing, blob_path, read_blob
from indexer.layout.parse import _descriptor, _load_json, _manifests
from indexer.layout.records import DEFAULT_LIMITS, INDEX_MEDIA_TYPES, UNSETTLED, Child, Entry, IndexBlob, Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.layout.parse import _Descriptor
    from indexer.layout.records import Dependency


def read_children(
    layout: str, entries: tuple[Entry, ...], limits: Limits = DEFAULT_LIMITS
) -> tuple[tuple[Child, ...], tuple[str, ...], tuple[Dependency, ...]]:
    """Follow the entries that are indexes into ``blobs/``: every child descriptor, warnings, and the
    blobs that were absent or unusable (what the children depend on, :class:`Snapshot`)."""
    walk = _walk_children(layout, entries, limits)
    return tuple(walk.children), tuple(walk.warnings), tuple(sorted(walk.depends.items()))


def _walk_children(layout: str, entries: tuple[Entry, ...], limits: Limits) -> _ChildWalk:
    walk = _ChildWalk(layout, limits)
    walk.run(entries)
    return walk


def blob_state(layout: str, digest: str) -> tuple[int, int, int, int, int] | str | None:
    """What is at the path of blob *digest* now, as a :data:`Dependency` records it; :class:`BlobError`
    for an invalid digest."""
    import time

    from indexer.store.read import RACY_WINDOW_NS

    try:
        st = os.stat(blob_path(layout, digest))
    except OSError as exc:
        return None if exc.errno in (errno.ENOENT, errno.ENOTDIR) else UNSETTLED
    if max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS >= time.time_ns():
        return UNSETTLED  # still being written, perhaps: a later read decides
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _ChildWalk:
    """The nested indexes of one layout as the graph they are: each distinct index (digest and size) is
    read and expanded once, breadth first, so at the smallest depth it is reachable at, and each
    distinct descriptor it lists is one :class:`Child`, whatever number of entries and indexes list
    it and however often. A walk that followed every path instead took F^10 steps for four levels
    that each list the same child F times, and stored F+F^2+F^3+F^4 children (issue 17); now the
    steps and the rows are bounded by the distinct descriptors of the distinct blobs read: by what
    the layout's bytes hold. A child is recorded under the first entry that reaches it
    (``Child.entry_position``); lookups follow the graph by digest from any entry (store.read)."""

    __slots__ = ("children", "depends", "full", "layout", "limits", "met", "resolved", "warnings")

    def __init__(self, layout: str, limits: Limits) -> None:
        self.layout = layout
        self.limits = limits
        self.resolved: dict[str, str] = {}
        self.children: list[Child] = []
        self.warnings: list[str] = []
        self.depends: dict[str, tuple[int, int, int, int, int] | str | None] = {}
        self.met: dict[str, IndexBlob] = {}  # every nested index blob met, once, in walk order
        self.full = False

    def run(self, entries: tuple[Entry, ...]) -> None:
        """Walk every nested index below *entries*, a level at a time."""
        seen: set[tuple[str, int]] = set()  # the indexes expanded, or to be at this or the next level
        level: list[tuple[str, int, int]] = []  # (digest, size, position of the entry that reached it)
        for entry in entries:
            if entry.media_type in INDEX_MEDIA_TYPES and (entry.digest, entry.size) not in seen:
                seen.add((entry.digest, entry.size))
                level.append((entry.digest, entry.size, entry.position))
        depth = 1
        while level:
            if depth > self.limits.max_depth:
                self.warnings.extend(
                    f"nested index {digest} (below manifests[{position}]) is deeper than "
                    f"{self.limits.max_depth} levels; not followed"
                    for digest, _size, position in level
                )
                for digest, size, _position in level:
                    self.met.setdefault(digest, IndexBlob(digest, size, "deep"))
                return
            following: list[tuple[str, int, int]] = []
            for digest, size, position in level:
                descriptors = self._descriptors(digest, size) or []
                # The same descriptor listed again in one index tells nothing more. Usually every digest
                # differs, which one set of them shows; only otherwise is each descriptor compared.
                listed: set[tuple[object, ...]] | None = (
                    None if len({d[0] for d in descriptors}) == len(descriptors) else set()
                )
                for child in descriptors:
                    child_digest, media_type, child_size, annotations, platform = child
                    if listed is not None:
                        key = (child_digest, media_type, child_size, id(platform), tuple(annotations.items()))
                        if key in listed:
                            continue
                        listed.add(key)
                    if len(self.children) >= self.limits.max_children:
                        if not self.full:
                            self.full = True
                            self.warnings.append(
                                f"more than {self.limits.max_children} nested descriptors; the rest are not read"
                            )
                        return
                    self.children.append(
                        Child(digest, position, depth, child_digest, media_type, child_size, platform, annotations)
                    )
                    if media_type in INDEX_MEDIA_TYPES and (child_digest, child_size) not in seen:
                        seen.add((child_digest, child_size))
                        following.append((child_digest, child_size, position))
            level = following
            depth += 1

    def _descriptors(self, digest: str, size: int) -> list[_Descriptor] | None:
        """The descriptors the nested index blob lists (None when it is absent or unusable: a warning)."""
        found: list[_Descriptor] | None = None
        what = f"nested index {digest}"
        try:
            data = read_blob(self.layout, digest, size, self.limits, resolved=self.resolved)
        except BlobMissing:
            self.warnings.append(f"{what} is not in blobs/ (a partial export?); its children are unknown")
            self.met[digest] = IndexBlob(digest, size, "missing")
            self.depends["blobs/" + digest.replace(":", "/", 1)] = None
        except BlobError as exc:
            if exc.transient:
                # Descriptors or memory used up, an I/O error: nothing is known of this blob, and the
                # layout's rows would say its children are unknown for good. The read fails instead.
                raise LayoutUnreadable(
                    f"{self.layout}: {exc.message}", category=exc.category, transient=True, retry_soon=exc.retry_soon
                ) from None
            self.warnings.append(f"{exc.message}; its children are unknown")
            self.met[digest] = IndexBlob(digest, size, "invalid")
            if _digest_names_a_path(digest):  # an invalid one names none: the bytes holding it decide alone
                self.depends["blobs/" + digest.replace(":", "/", 1)] = blob_state(self.layout, digest)
        else:
            # The blob's bytes were just read from this layout and matched its digest, so they are
            # the bytes of every other blob with that digest: the parse is shared across layouts
            # (popular multi-platform images repeat on a build host).
            parsed = _parsed_indexes.get(digest)
            if parsed is None:
                parsed = _parse_nested(data, what)
                if len(_parsed_indexes) >= _PARSED_INDEXES_MAX:
                    _parsed_indexes.clear()
                _parsed_indexes[digest] = parsed
            found, warnings, skipped, head = parsed
            self.warnings.extend(warnings)
            self.met[digest] = IndexBlob(digest, size, "ok" if found is not None else "invalid", skipped, head)
        return found


def _digest_names_a_path(digest: str) -> bool:
    try:
        reference.validate_digest(digest)
    except InvalidReference:
        return False
    return True


_PARSED_INDEXES_MAX = 4096
_parsed_indexes: dict[str, tuple[list[_Descriptor] | None, tuple[str, ...], int, dict[str, object]]] = {}
# The fields of an index document other than its descriptors (IndexBlob.head).
_HEAD_FIELDS = ("mediaType", "artifactType", "subject", "annotations")


def _parse_nested(data: bytes, what: str) -> tuple[list[_Descriptor] | None, tuple[str, ...], int, dict[str, object]]:
    """The descriptors of a nested index blob (None when it is not an index), its warnings, how many
    descriptors were skipped, and its head (IndexBlob.head)."""
    try:
        document = _load_json(data, what)
        items = _manifests(document, what)
    except IndexParseError as exc:
        return None, (f"{exc.message}; its children are unknown",), 0, {}
    assert isinstance(document, dict)
    found: list[_Descriptor] = []
    warnings: list[str] = []
    for number, item in enumerate(items):
        own: list[str] = []
        descriptor = _descriptor(item, own)
        if descriptor is not None:
            found.append(descriptor)
        if own:
            warnings.extend(f"{what} manifests[{number}]: {text}" for text in own)
    head = {key: document[key] for key in _HEAD_FIELDS if key in document}
    return found, tuple(warnings), len(items) - len(found), head
