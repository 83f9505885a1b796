"""One OCI image layout on disk: ``index.json``, nested indexes in ``blobs/``, platforms.

The parsing is pure (:func:`parse_index` takes bytes); the reads around it are
small and synchronous, so the daemon runs them in a worker thread and the
lookup CLI calls them directly when it has to read a changed layout through.

Choices where the OCI image-layout specification is silent (docs/semantics.md restates them for users):

* **A bad descriptor does not hide the good ones.** A ``manifests`` item that
  is not an object, or whose ``digest`` (validated as go-digest does),
  ``size`` (an integer 0 … 2⁶³-1; ``true`` and ``1.0`` are not) or
  ``mediaType`` (a string, missing → ``""``) is wrong, is skipped with a
  layout warning. Optional parts are dropped, the entry kept: annotations
  that are not an object, annotation values that are not strings, and a
  ``platform`` that is not an object of strings. Go's decoder would refuse
  the whole file; a layout with one hand-edited entry should not vanish.
* **The document itself is strict.** Not UTF-8, a UTF-8 BOM, ``NaN`` or
  ``Infinity``, trailing data, a top level that is not an object,
  ``manifests`` that is not a list (``null`` and missing are an empty
  layout), nesting too deep for the decoder, more than
  ``Limits.max_entries`` entries, or more than ``Limits.max_index_bytes``
  bytes: :class:`~indexer.errors.IndexParseError`. Duplicate keys keep the
  last value, as Go does. Lone UTF-16 surrogates (``"\\ud800"``) become
  U+FFFD, as Go does, so every kept string can be stored.
* ``Entry.position`` is the item's index in ``manifests``, so skipped items
  leave gaps. Entry warnings are repeated in the layout's warnings, prefixed
  with ``manifests[N]``.
* **Torn reads.** ``index.json`` is opened with ``O_NONBLOCK`` (a FIFO never
  blocks; anything but a regular file is refused) and ``fstat``-ed before
  and after the read; a change, or a read whose length is not the size, is
  retried (``Limits.torn_retries`` times, backoff 1, 2, 4 … ms). A read that
  fails to parse is read again: if the bytes or the identity differ it was
  torn and is retried too, and only a file that reads the same twice is
  reported as broken. Retries exhausted: :class:`~indexer.errors.TornRead`.
  A rename-replaced file read through the old descriptor is a consistent
  old version, not a torn one.
* **index.json through a symlink.** ``index.json`` may be a symlink only to a file inside the
  layout (its real path below the layout's real path, checked again on the opened descriptor);
  one leading anywhere else is refused as :class:`~indexer.errors.LayoutUnreadable` (the layout is
  in state ``error``), so nothing of a file outside the layout (its content, annotations, hash)
  reaches the index. ``oci-layout`` is never read, only its presence marks a layout.
* **Blobs.** A digest is validated before it becomes a path. The blob's real
  path (symlinks resolved) must stay inside the layout's real path; symlinks
  inside the layout are followed, the final open uses ``O_NOFOLLOW``. Only a
  regular file of the descriptor's size, at most ``Limits.max_blob_bytes``,
  whose hash matches, is returned. A missing blob is
  :class:`BlobMissing` (normal in partial exports), any other problem
  :class:`~indexer.errors.BlobError`.
* **Nested indexes.** Entries whose media type is an OCI image index or a
  Docker manifest list are followed into ``blobs/``. Every descriptor found
  is a :class:`Child` (depth 1 = listed in a top-level entry's index);
  children that are indexes themselves are followed up to
  ``Limits.max_depth``, and never into an index already on the path
  (a cycle can only come from a forged blob, which the hash check already
  refuses). At most ``Limits.max_children`` children are kept. A missing or
  bad child blob is a layout warning, never fatal. Names in nested indexes
  are not read.
* **Platforms** keep the descriptor's strings as written; comparison
  normalizes both sides as containerd's ``platforms.Normalize`` does
  (``arm64/v8`` ≡ ``arm64``: ``v8`` becomes ``""``; ``arm`` → ``v7``;
  ``x86_64`` → ``amd64``) except that an empty OS stays empty (containerd
  would substitute the host's). Matching compares the normalized
  (os, architecture, variant) exactly, as containerd's ``NewMatcher`` does
  (not the more lenient ``Only``, which also accepts older variants):
  ``linux/amd64`` does not match ``linux/amd64/v3``, nor ``linux/arm/v7``
  ``linux/arm/v6``. ``os.version`` and ``os.features`` are kept, not compared.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

from indexer import reference
from indexer._record import Record
from indexer._statx import mount_of
from indexer.errors import (
    BlobError,
    IndexParseError,
    InvalidReference,
    LayoutUnreadable,
    TornRead,
    UsageError,
    layout_failure,
)
from indexer.names import DEFAULT_FAMILIAR_POLICY, quote_value, read_names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from indexer.names import Name

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

INDEX_FILE = "index.json"
LAYOUT_FILE = "oci-layout"

_MAX_SIZE = 2**63 - 1  # a Go int64: what every writer's descriptor size is
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_PLATFORM_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
_LOWER_HEX = "0123456789abcdef"


class BlobMissing(BlobError):
    """The blob is not in ``blobs/``: normal for partial exports, so callers tell it apart."""

    category = "blob_missing"


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


class Platform(Record):
    """A descriptor's platform, strings as written (``""`` when absent)."""

    __slots__ = ("architecture", "os", "os_features", "os_version", "variant")

    os: str
    architecture: str
    variant: str
    os_version: str
    os_features: tuple[str, ...]

    def __init__(
        self,
        os: str,
        architecture: str,
        variant: str = "",
        os_version: str = "",
        os_features: tuple[str, ...] = (),
    ) -> None:
        self.os = os
        self.architecture = architecture
        self.variant = variant
        self.os_version = os_version
        self.os_features = os_features

    def normalized(self) -> Platform:
        """This platform as containerd normalizes it (see :func:`normalize_platform`)."""
        os_, arch, variant = normalize_platform(self.os, self.architecture, self.variant)
        return Platform(os_, arch, variant, self.os_version, self.os_features)

    def to_json(self) -> dict[str, str | None]:
        """The ``{"os", "architecture", "variant"}`` object of ``--json`` output."""
        return {"os": self.os, "architecture": self.architecture, "variant": self.variant or None}

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def normalize_platform(os: str, arch: str, variant: str) -> tuple[str, str, str]:
    """(os, architecture, variant) as containerd's ``platforms.Normalize`` makes them."""
    os, arch, variant = os.lower(), arch.lower(), variant.lower()
    if os == "macos":
        os = "darwin"
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        if variant == "v1":
            variant = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return os, arch, variant


def parse_platform_spec(spec: str) -> Platform:
    """Parse ``OS/ARCH[/VARIANT]`` as given to ``--platform``; :class:`UsageError` when malformed."""
    parts = spec.split("/")
    if not 2 <= len(parts) <= 3 or not all(part and not part.strip(_PLATFORM_CHARS) for part in parts):
        raise UsageError(f"invalid platform {quote_value(spec)}: expected OS/ARCH[/VARIANT], such as linux/arm64/v8")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def platform_matches(want: Platform, have: Platform) -> bool:
    """Whether *have* is the platform *want* asks for, both normalized as containerd does."""
    return normalize_platform(want.os, want.architecture, want.variant) == normalize_platform(
        have.os, have.architecture, have.variant
    )


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
    from typing import TypeVar

    _Descriptor = tuple[str, str, int, dict[str, str], Platform | None]
    _P = TypeVar("_P")
    # A path inside the layout (``blobs/ALG/HEX``) and what a read found there: None, absent; the
    # identity (dev, ino, size, mtime_ns, ctime_ns) of the file that could not be used; or UNSETTLED,
    # a file changed within the racy window of the read, which proves nothing yet.
    Dependency = tuple[str, tuple[int, int, int, int, int] | str | None]

UNSETTLED = "unsettled"


# -- parsing (pure) ----------------------------------------------------------------------------


def parse_index(
    data: bytes,
    *,
    familiar: str = DEFAULT_FAMILIAR_POLICY,
    limits: Limits = DEFAULT_LIMITS,
    source: str = INDEX_FILE,
) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """Parse ``index.json`` bytes into entries and layout warnings; :class:`IndexParseError` if unusable.

    *source* names the file in error messages (its path, when there is one).
    """
    entries, warnings, _skipped = _parse_index(data, familiar=familiar, limits=limits, source=source)
    return entries, warnings


def _parse_index(
    data: bytes, *, familiar: str, limits: Limits, source: str
) -> tuple[tuple[Entry, ...], tuple[str, ...], int]:
    """:func:`parse_index`, and how many descriptors were skipped."""
    if len(data) > limits.max_index_bytes:
        raise IndexParseError(f"{source} is {len(data)} bytes, over the limit of {limits.max_index_bytes} bytes")
    items = _manifests(_load_json(data, source), source)
    if len(items) > limits.max_entries:
        raise IndexParseError(f"{source} lists {len(items)} manifests, over the limit of {limits.max_entries}")
    entries: list[Entry] = []
    warnings: list[str] = []
    for position, item in enumerate(items):
        own: list[str] = []
        descriptor = _descriptor(item, own)
        if descriptor is not None:
            digest, media_type, size, annotations, platform = descriptor
            reading = read_names(annotations, familiar=familiar)
            own.extend(reading.warnings)
            entries.append(
                Entry(
                    position,
                    digest,
                    media_type,
                    size,
                    annotations,
                    platform,
                    reading.names,
                    reading.invalid,
                    tuple(own),
                )
            )
        if own:
            warnings.extend(f"manifests[{position}]: {text}" for text in own)
    return tuple(entries), tuple(warnings), len(items) - len(entries)


def _load_json(data: bytes, what: str) -> object:
    if not data or data.isspace():
        raise IndexParseError(f"{what} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexParseError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            detail = (
                f"trailing data after the JSON document at line {exc.lineno} column {exc.colno}"
                " (old bytes left by an in-place rewrite?)"
            )
        elif exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
            detail = "truncated: the JSON document ends early"
        else:
            reason = exc.msg.removesuffix(" at")  # json says "Invalid control character at"
            detail = f"not valid JSON: {reason} at line {exc.lineno} column {exc.colno}"
        raise IndexParseError(f"{what} is {detail}") from None
    except RecursionError:
        raise IndexParseError(f"{what} is nested too deeply to parse") from None
    except ValueError as exc:  # NaN/Infinity, or an integer longer than Python converts
        if "int_max_str_digits" in str(exc) or "Exceeds the limit" in str(exc):
            raise IndexParseError(f"{what} is not valid JSON: a number has more than 4,300 digits") from None
        raise IndexParseError(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every document: json.loads with an argument makes a new one per call, which was
# 4% of a worker's time (a pass decodes index.json, nested indexes, every manifest and config).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _manifests(document: object, what: str) -> list[object]:
    if not isinstance(document, dict):
        raise IndexParseError(f"{what} is a JSON {_kind(document)}, not an object")
    items = document.get("manifests")
    if items is None:
        return []
    if not isinstance(items, list):
        raise IndexParseError(f'{what}: "manifests" is a JSON {_kind(items)}, not a list')
    return items


def _descriptor(item: object, warnings: list[str]) -> _Descriptor | None:
    """Check one descriptor; ``None`` (with a warning) when it cannot be used."""
    if type(item) is dict:
        # The common case first: fields of the expected types, an ASCII media type, a digest
        # already accepted (most repeat across layouts); anything else takes the checks below.
        digest, size, media_type = item.get("digest"), item.get("size"), item.get("mediaType", "")
        if (
            type(digest) is str
            and digest in reference.VALID_DIGESTS
            and type(size) is int
            and 0 <= size <= _MAX_SIZE
            and type(media_type) is str
            and media_type.isascii()
        ):
            return (
                digest,
                media_type,
                size,
                _annotations(item.get("annotations"), warnings),
                _platform(item.get("platform"), warnings),
            )
    if not isinstance(item, dict):
        warnings.append(f"descriptor is a JSON {_kind(item)}, not an object; skipped")
        return None
    digest = item.get("digest")
    if not isinstance(digest, str):
        warnings.append(f'"digest" is a JSON {_kind(digest)}, not a string; skipped')
        return None
    try:
        reference.validate_digest(digest)
    except InvalidReference as exc:
        warnings.append(f"digest {quote_value(digest)} is invalid ({exc.category}); skipped")
        return None
    size = item.get("size")
    if type(size) is not int or not 0 <= size <= _MAX_SIZE:
        shown = size if type(size) is int else f"a JSON {_kind(size)}"
        warnings.append(f'"size" is {shown}, not an integer from 0 to 2^63-1; skipped')
        return None
    media_type = item.get("mediaType", "")
    if not isinstance(media_type, str):
        warnings.append(f'"mediaType" is a JSON {_kind(media_type)}, not a string; skipped')
        return None
    return (
        digest,
        sys.intern(_clean(media_type)),  # a few distinct values: one object each, sent once (marshal)
        size,
        _annotations(item.get("annotations"), warnings),
        _platform(item.get("platform"), warnings),
    )


def _annotations(value: object, warnings: list[str]) -> dict[str, str]:
    if type(value) is dict:
        # The common case, checked in C: every value a string (join raises otherwise; JSON keys
        # always are) and all of it ASCII, so nothing needs cleaning and the parsed dict is kept.
        try:
            if "".join(value.values()).isascii() and "".join(value).isascii():
                return value
        except TypeError:
            pass
    if value is None:
        return {}
    if not isinstance(value, dict):
        warnings.append(f'"annotations" is a JSON {_kind(value)}, not an object; ignored')
        return {}
    kept: dict[str, str] = {}
    for key, text in value.items():
        if isinstance(text, str):
            kept[_clean(key)] = _clean(text)
        else:
            warnings.append(f"annotation {quote_value(key)} is a JSON {_kind(text)}, not a string; dropped")
    return kept


def _platform(value: object, warnings: list[str]) -> Platform | None:
    if type(value) is dict and "os.features" not in value:
        # The common case: plain ASCII strings, no features; few distinct platforms, shared.
        os_, arch = value.get("os", ""), value.get("architecture", "")
        variant, os_version = value.get("variant", ""), value.get("os.version", "")
        if type(os_) is str and type(arch) is str and type(variant) is str and type(os_version) is str:
            key = (os_, arch, variant, os_version)
            found = _platforms.get(key)
            if found is None and (os_ + arch + variant + os_version).isascii():
                if len(_platforms) >= _PLATFORMS_MAX:
                    _platforms.clear()
                found = _platforms[key] = Platform(os_, arch, variant, os_version)
            if found is not None:
                return found
    if value is None:
        return None
    if not isinstance(value, dict):
        warnings.append(f'"platform" is a JSON {_kind(value)}, not an object; ignored')
        return None
    fields: list[str] = []
    for field in ("os", "architecture", "variant", "os.version"):
        text = value.get(field, "")
        if not isinstance(text, str):
            warnings.append(f'platform "{field}" is a JSON {_kind(text)}, not a string; platform ignored')
            return None
        fields.append(_clean(text))
    features = value.get("os.features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        warnings.append('platform "os.features" is not a list of strings; platform ignored')
        return None
    return Platform(fields[0], fields[1], fields[2], fields[3], tuple(_clean(f) for f in features))


_PLATFORMS_MAX = 1024
_platforms: dict[tuple[str, str, str, str], Platform] = {}


def _clean(text: str) -> str:
    """*text* with lone surrogates replaced, as Go's decoder does (they cannot be stored as UTF-8)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- reading index.json ------------------------------------------------------------------------


def read_index_bytes(layout: str, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, FileIdentity]:
    """Read ``LAYOUT/index.json`` whole, retrying a read that a writer tore; return bytes and identity."""
    data, identity, _ = _read_index(os.path.join(layout, INDEX_FILE), limits, None)
    return data, identity


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


def _read_index(
    path: str,
    limits: Limits,
    parse: Callable[[bytes], _P] | None,
    read_once: Callable[[str, Limits], tuple[bytes, FileIdentity] | None] | None = None,
) -> tuple[bytes, FileIdentity, _P | None]:
    """The retry loop around one read (and parse) of ``index.json``; *read_once* is for tests."""
    read = read_once or _read_index_once
    attempts = limits.torn_retries + 1
    attempt = 0
    while attempt < attempts:
        if attempt:
            _backoff(attempt)
        attempt += 1
        got = read(path, limits)
        if got is None:
            continue
        data, identity = got
        if parse is None:
            return data, identity, None
        try:
            return data, identity, parse(data)
        except IndexParseError:
            # Broken, or torn in a way stat could not see (a rewrite within the
            # timestamp granularity): a file that reads the same again is broken.
            _backoff(1)
            if read(path, limits) == got:
                raise
            attempt += 1
    raise TornRead(f"{path} kept changing while it was read ({attempts} attempts); a writer is rewriting it")


def _read_index_once(path: str, limits: Limits) -> tuple[bytes, FileIdentity] | None:
    """One read of *path*; ``None`` when it changed while being read."""
    try:
        target = _index_target(path)
        # Refuse a device, FIFO or socket before opening it: opening some devices has effects
        # (a root daemon must never open a tape or a terminal a user's index.json points at).
        # The fstat after the open below still catches a swap between the two calls.
        kind = os.lstat(target).st_mode
        if not stat.S_ISREG(kind):
            raise LayoutUnreadable(f"{path} is {_file_kind(kind)}, not a regular file")
        fd = os.open(target, _OPEN_FLAGS | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LayoutUnreadable(f"{path} became a symlink while it was opened; refused") from None
        raise layout_failure(LayoutUnreadable, _open_error(path, exc), exc) from None
    try:
        _check_opened_inside(fd, path)
        try:
            before = os.fstat(fd)
        except OSError as exc:
            raise layout_failure(LayoutUnreadable, f"{path} cannot be read: {exc.strerror}", exc) from None
        if not stat.S_ISREG(before.st_mode):
            raise LayoutUnreadable(f"{path} is {_file_kind(before.st_mode)}, not a regular file")
        if before.st_size > limits.max_index_bytes:
            raise IndexParseError(f"{path} is {before.st_size} bytes, over the limit of {limits.max_index_bytes} bytes")
        try:
            data = _read_all(fd, limits.max_index_bytes, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            raise layout_failure(LayoutUnreadable, f"{path} cannot be read: {exc.strerror}", exc) from None
    finally:
        os.close(fd)
    identity = FileIdentity.of(before)
    if FileIdentity.of(after) != identity or len(data) != before.st_size:
        return None
    return data, identity


def _index_target(path: str) -> str:
    """What to open for *path* (``LAYOUT/index.json``): itself, or, when it is a symlink, its real path,
    which must be inside the layout's real path.

    ``index.json`` is read as root into a database other users can read: a symlink to a file
    outside the layout (``/root/.docker/config.json``, another user's layout) would copy what it
    holds, or its hash, into the index. Like blobs, it may point only inside its own layout.
    """
    if not stat.S_ISLNK(os.lstat(path).st_mode):
        return path
    layout = os.path.realpath(os.path.dirname(path))
    inside = layout if layout.endswith(os.sep) else layout + os.sep
    real = os.path.realpath(path)
    if not real.startswith(inside):
        raise LayoutUnreadable(f"{path} is a symlink leading outside the layout (to {real}); refused")
    if os.path.islink(real):
        raise LayoutUnreadable(f"{path} is a symlink that never resolves (a loop)")
    return real


def _check_opened_inside(fd: int, path: str) -> None:
    """Raise unless the file open at *fd* is inside the layout directory as named, by the kernel's
    account of where *fd* is (``/proc/self/fd``).

    Layouts are read at their real paths (discovery resolves them; lookups resolve what they are
    given). A layout directory replaced by a symlink after it was indexed (``mv app old; ln -s
    /root/x app``), or a directory on the way swapped between the resolution and the open, would
    otherwise make a root daemon read a file outside the layout under the layout's name.
    """
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: the checks before the open are all there is
    opened = opened.removesuffix(" (deleted)")  # replaced by a rename since: still the file we opened
    layout = os.path.dirname(os.path.abspath(path))
    inside = layout if layout.endswith(os.sep) else layout + os.sep
    if not opened.startswith(inside):
        raise LayoutUnreadable(f"{path} led outside the layout directory when opened (to {opened}); refused")


def _read_all(fd: int, limit: int, expected: int) -> bytes:
    """Read *fd* to its end, but never more than ``limit + 1`` bytes."""
    chunks: list[bytes] = []
    total = 0
    want = min(expected, limit) + 1
    while total <= limit:
        request = min(want, limit + 1 - total)
        chunk = os.read(fd, request)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if len(chunk) < request:
            break  # a regular file reads short only at its end; the fstat after the read checks the rest
        want = 1 << 20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _backoff(attempt: int) -> None:
    import time

    time.sleep(0.001 * (1 << min(attempt - 1, 6)))


def _open_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"{path} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"{path} does not exist: a parent is not a directory"
    if exc.errno == errno.ENXIO:
        return f"{path} is a socket or device, not a regular file"
    return f"{path} cannot be opened: {exc.strerror}"


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


# -- blobs -------------------------------------------------------------------------------------


def blob_path(layout: str, digest: str) -> str:
    """``LAYOUT/blobs/ALG/HEX`` for a digest validated first; :class:`BlobError` when invalid."""
    try:
        reference.validate_digest(digest)
    except InvalidReference as exc:
        raise BlobError(f"invalid digest {quote_value(digest)} ({exc.category})") from None
    algorithm, _, encoded = digest.partition(":")
    return os.path.join(layout, "blobs", algorithm, encoded)


def read_blob(
    layout: str,
    digest: str,
    size: int | None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    resolved: dict[str, str] | None = None,
) -> bytes:
    """The verified content of one blob; :class:`BlobMissing` when absent, :class:`BlobError` when bad.

    *resolved* caches the resolved layout and ``blobs/ALG`` directories across the calls for one
    layout: resolving every blob's whole path cost 0.1 ms a blob, most of a nested-index walk.
    """
    import hashlib

    if len(digest) == 71 and digest.startswith("sha256:") and not digest[7:].strip(_LOWER_HEX):
        # The common digest, checked as go-digest would in a few C calls (the set of digests
        # validate_digest keeps is far smaller than the blobs of a host).
        path = os.path.join(layout, "blobs", "sha256", digest[7:])
    else:
        path = blob_path(layout, digest)
    cache = resolved if resolved is not None else {}
    algorithm, _, encoded = digest.partition(":")
    directory = cache.get(algorithm)
    if directory is None:
        directory = cache[algorithm] = _blob_directory(layout, os.path.dirname(path), cache)
    if not directory:
        real = os.path.realpath(path)
        raise BlobError(f"blob {digest} at {path} leads outside the layout (to {real}); refused")
    real = directory + os.sep + encoded
    try:
        try:
            # The directory is resolved and inside the layout; O_NOFOLLOW refuses a symlinked blob,
            # which is then resolved in full and allowed only when it stays inside the layout.
            fd = os.open(real, _OPEN_FLAGS | _NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            real = os.path.realpath(path)
            if not real.startswith(_inside(layout, cache)):
                raise BlobError(f"blob {digest} at {path} leads outside the layout (to {real}); refused") from None
            fd = os.open(real, _OPEN_FLAGS | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BlobMissing(f"blob {digest} is not in {os.path.join(layout, 'blobs')}") from None
        if exc.errno == errno.ELOOP:
            raise BlobError(f"blob {digest} at {path} became a symlink while opened; refused") from None
        raise layout_failure(BlobError, f"blob {digest} at {path} cannot be opened: {exc.strerror}", exc) from None
    limit = limits.max_blob_bytes
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BlobError(f"blob {digest} at {path} is {_file_kind(st.st_mode)}, not a regular file")
        for claimed in (size, st.st_size):
            if claimed is not None and claimed > limit:
                raise BlobError(f"blob {digest} is {claimed} bytes, over the limit of {limit} bytes")
        if size is not None and st.st_size != size:
            raise BlobError(f"blob {digest} is {st.st_size} bytes, but its descriptor says {size}")
        try:
            data = _read_all(fd, limit, st.st_size)
        except OSError as exc:
            raise layout_failure(BlobError, f"blob {digest} at {path} cannot be read: {exc.strerror}", exc) from None
    finally:
        os.close(fd)
    if len(data) > limit or (size is not None and len(data) != size):
        raise BlobError(f"blob {digest} changed size while it was read", transient=True, retry_soon=True)
    if getattr(hashlib, algorithm)(data).hexdigest() != encoded:  # a validated digest: sha256, sha384 or sha512
        raise BlobError(f"blob {digest} does not match its digest (content changed or corrupt)")
    return data


def _inside(layout: str, cache: dict[str, str]) -> str:
    """The layout's real path with a trailing separator: what every blob's real path starts with."""
    inside = cache.get("")
    if inside is None:
        root = os.path.realpath(layout)
        inside = cache[""] = root if root.endswith(os.sep) else root + os.sep
    return inside


def _blob_directory(layout: str, directory: str, cache: dict[str, str]) -> str:
    """``LAYOUT/blobs/ALG`` as a path to open blobs below, ``""`` when it leads outside the layout.

    Neither ``blobs`` nor ``ALG`` a symlink: the directory is inside the layout whatever the
    layout's own path is, and two ``lstat`` calls showed it (resolving the layout and the directory
    instead costs one ``lstat`` per component of each path: a tenth of a nested-index walk). Else
    it is resolved, and must stay inside the layout's real path.
    """
    try:
        blobs_mode, algorithm_mode = os.lstat(os.path.dirname(directory)).st_mode, os.lstat(directory).st_mode
    except OSError:
        pass  # missing (a partial export): resolved below, and the open says so
    else:
        if not (stat.S_ISLNK(blobs_mode) or stat.S_ISLNK(algorithm_mode)):
            return directory
    real = os.path.realpath(directory)
    return real if real.startswith(_inside(layout, cache)) else ""


# -- nested indexes ----------------------------------------------------------------------------


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


# -- discovery ---------------------------------------------------------------------------------


def is_layout_dir(path: str) -> bool:
    """Whether *path* is a directory holding ``oci-layout`` or ``index.json``."""
    return os.path.isdir(path) and (
        os.path.lexists(os.path.join(path, LAYOUT_FILE)) or os.path.lexists(os.path.join(path, INDEX_FILE))
    )


def layout_dir_state(path: str) -> bool | None:
    """:func:`is_layout_dir`, or None when it cannot be told: a ``stat`` failed for a reason other than
    absence (a permission, an I/O error), which proves neither that the layout is there nor gone."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return False
    except OSError as exc:
        return False if exc.errno in (errno.ENOENT, errno.ENOTDIR) else None
    for marker in (LAYOUT_FILE, INDEX_FILE):
        try:
            os.lstat(os.path.join(path, marker))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return None
        else:
            return True
    return False


__all__ = [
    "DEFAULT_LIMITS",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
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
