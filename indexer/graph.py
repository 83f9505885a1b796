"""The content graph: image manifests and configs read from a layout's ``blobs/``.

The parsing is pure (:func:`parse_manifest`, :func:`parse_config` take bytes); blobs are read by
:func:`indexer.layout.read_blob`, the one way to read a blob (digest validated before it becomes a
path, containment in the layout, size bounds, hash check). Standard library only: read-through
lookups use it.

Choices where the OCI image specification is silent (docs/semantics.md restates them for users):

* **What is followed.** As containerd's ``images.Children``: a descriptor whose media type is an
  image index or manifest list is an index (:mod:`indexer.layout` follows those); an OCI or Docker
  image manifest, or an OCI artifact manifest (the 1.1 release candidates' ``blobs``), is a
  manifest, read here for its config and layers; anything else (a layer, a config, BuildKit's cache
  config, an unknown type) is a leaf. A manifest's ``subject`` is a link to another image, never a
  reference: it keeps nothing alive (as in the OCI distribution spec's garbage collection).
* **A bad field does not hide the rest.** As for ``index.json``: a layer descriptor that is not
  usable is skipped with a warning, an optional field of the wrong type is dropped with one; but a
  manifest with a skipped ``config`` or layer is not :attr:`Manifest.complete`, because a blob it
  meant to reference cannot be named (``ocidx gc`` then deletes nothing of that layout).
* **The document itself is strict**, with :func:`indexer.layout.parse_index`'s rules (UTF-8, no BOM,
  no ``NaN``, no trailing data, bounded depth): otherwise it is refused (:class:`BlobError`).
* **Configs** are read only when the manifest's config descriptor says it is an image config
  (OCI or Docker): an artifact's config (``application/vnd.oci.empty.v1+json``, a signature's
  payload type) has no platform. The platform is the config's ``os``, ``architecture``,
  ``variant``, ``os.version`` and ``os.features``, checked as a descriptor's platform is;
  ``created`` is kept as written when it is a string of at most :data:`MAX_CREATED` characters.
* **Layers with ``urls``** (Docker's foreign and OCI's non-distributable layers) are ``external``:
  exporters leave them out of a layout, so their absence is not a missing blob.
* **Read once per pass.** In a scan, each worker process reads a manifest or config from the first
  layout of the pass that holds it, sends its rows once (the index stores them once per host), and
  keeps only its :class:`Shape` (what a layout needs of it: the keys and sizes it references) for
  every later layout (:class:`Known`). Only a read whose hash matched is kept, so a forged or
  truncated copy in one layout never reaches another layout's rows; a later layout's copy of a
  digest already read is trusted by its name, as its layers are (they are never read).
* **Keys.** A layout's references, the blobs it holds and what it misses are counted by
  :func:`graph_key` (the first 63 bits of a digest): two digests sharing a key would count as one
  (a chance of 2**-63 per pair, and a forged name can only confuse its own layout's figures);
  ``ocidx gc`` then keeps a blob it could have removed, never the reverse.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import sys
from array import array

from indexer import reference
from indexer._record import Record
from indexer.errors import BlobError, IndexParseError, InvalidReference
from indexer.layout import (
    DEFAULT_LIMITS,
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    OCI_MANIFEST,
    Child,
    Entry,
    Limits,
    Platform,
    Snapshot,
    read_blob,
)
from indexer.layout.parse import _MAX_SIZE, _annotations, _clean, _descriptor, _kind, _load_json, _platform
from indexer.names import quote_value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Container
    from typing import NamedTuple

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT_MANIFEST})

# BuildKit's attestation manifests are listed in the image index beside the images they describe.
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"

MAX_CREATED = 64  # an RFC 3339 time is at most 35 characters; anything much longer is not one
_HEX = "0123456789abcdef"
_CONFIG_PLATFORM_FIELDS = ("os", "architecture", "variant", "os.version", "os.features")


if TYPE_CHECKING:

    class BlobRef(NamedTuple):
        """A descriptor a manifest lists (its config or a layer)."""

        digest: str
        media_type: str
        size: int
        external: bool = False

else:
    # A named tuple made in C: a manifest lists about six layers, and a pass parses a hundred thousand
    # manifests (a Record's __init__ was a tenth of a worker's time). typing stays off the lookup path.
    BlobRef = collections.namedtuple("BlobRef", ("digest", "media_type", "size", "external"), defaults=(False,))

if TYPE_CHECKING:

    class Shape(NamedTuple):
        """What a layout needs of a manifest or index whose rows are sent (:class:`Known`)."""

        pairs: bytes
        config: str | None
        image_config: bool
        external: tuple[int, ...]
        algorithms: tuple[str, ...]
        complete: bool
        warnings: tuple[str, ...]

else:
    # ``pairs``: the graph key and size of its config (first) and each layer, packed (:func:`pack_pairs`);
    # ``config``: the digest of its image config while that config's rows are not sent (then None);
    # ``image_config``: whether its config is an image config (OCI or Docker); ``external``: the keys
    # of its layers with ``urls``; ``algorithms``: those of the digests it references. A hundred
    # thousand of these per worker in a pass: a few hundred bytes each, where a parse took 2.8 KB.
    Shape = collections.namedtuple(
        "Shape", ("pairs", "config", "image_config", "external", "algorithms", "complete", "warnings")
    )


class Manifest(Record):
    """What an image manifest or index blob says of itself and what it references.

    For an index, ``config`` is None and ``layers`` is empty: its descriptors are the layout's
    children (:class:`indexer.layout.Child`). ``size`` is the blob's.
    """

    __slots__ = (
        "annotations",
        "artifact_type",
        "complete",
        "config",
        "digest",
        "kind",
        "layers",
        "media_type",
        "size",
        "subject",
        "warnings",
    )

    digest: str
    kind: str
    media_type: str
    size: int
    artifact_type: str
    subject: str | None
    annotations: dict[str, str]
    config: BlobRef | None
    layers: tuple[BlobRef, ...]
    complete: bool
    warnings: tuple[str, ...]

    def __init__(
        self,
        digest: str,
        kind: str,
        media_type: str,
        size: int,
        *,
        artifact_type: str = "",
        subject: str | None = None,
        annotations: dict[str, str] | None = None,
        config: BlobRef | None = None,
        layers: tuple[BlobRef, ...] = (),
        complete: bool = True,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.digest = digest
        self.kind = kind
        self.media_type = media_type
        self.size = size
        self.artifact_type = artifact_type
        self.subject = subject
        self.annotations = annotations if annotations is not None else {}
        self.config = config
        self.layers = layers
        self.complete = complete
        self.warnings = warnings

    @property
    def image_size(self) -> int | None:
        """The manifest, its config and its layers, in bytes; None for an index."""
        if self.kind != "manifest":
            return None
        return self.size + (self.config.size if self.config is not None else 0) + sum(x.size for x in self.layers)

    @property
    def referrer_type(self) -> str:
        """``artifactType`` as the OCI referrers API gives it: the manifest's, else its config's media type."""
        if self.artifact_type:
            return self.artifact_type
        return self.config.media_type if self.config is not None else ""


class ImageConfig(Record):
    """What an image config says of the platform it runs on and when it was made."""

    __slots__ = ("created", "digest", "platform", "warnings")

    digest: str
    platform: Platform | None
    created: str | None
    warnings: tuple[str, ...]

    def __init__(
        self, digest: str, platform: Platform | None, created: str | None, warnings: tuple[str, ...] = ()
    ) -> None:
        self.digest = digest
        self.platform = platform
        self.created = created
        self.warnings = warnings


# -- parsing (pure) ----------------------------------------------------------------------------


def parse_manifest(data: bytes, digest: str, size: int, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Parse an image manifest blob; :class:`BlobError` if unusable (not JSON, not an object, an index)."""
    what = f"manifest {digest}"
    document = _document(data, what)
    warnings: list[str] = []
    # Interned: a few distinct values, one object each in a worker's rows, sent once (marshal refs).
    media_type = sys.intern(_string(document, "mediaType", warnings))
    artifact_type = sys.intern(_string(document, "artifactType", warnings))
    annotations = _annotations(document.get("annotations"), warnings)
    subject = _subject(document.get("subject"), warnings)
    if media_type in INDEX_MEDIA_TYPES:
        # Its descriptor said manifest: what it lists would not be followed as an index's children.
        raise BlobError(f"{what} is an image index ({media_type}), not a manifest")
    complete = True
    config = None
    if "config" in document:
        config = _blob_ref(document["config"], "config", warnings)
        complete = config is not None
    layers: list[BlobRef] = []
    field = "blobs" if media_type == OCI_ARTIFACT_MANIFEST else "layers"
    items = document.get(field)
    if items is not None and not isinstance(items, list):
        warnings.append(f'"{field}" is a JSON {_kind(items)}, not a list; ignored')
        complete = False
    for number, item in enumerate(items if isinstance(items, list) else ()):
        if number >= limits.max_children:
            warnings.append(f"more than {limits.max_children} {field}; the rest are not read")
            complete = False
            break
        layer = _blob_ref(item, f"{field}[{number}]", warnings)
        if layer is None:
            complete = False
        else:
            layers.append(layer)
    return Manifest(
        digest,
        "manifest",
        media_type,
        size,
        artifact_type=artifact_type,
        subject=subject,
        annotations=annotations,
        config=config,
        layers=tuple(layers),
        complete=complete,
        warnings=tuple(f"{what}: {text}" for text in warnings),
    )


def parse_index_head(digest: str, size: int, media_type: str, head: dict[str, object]) -> Manifest:
    """The :class:`Manifest` of a nested index blob from its head (:attr:`indexer.layout.IndexBlob.head`)."""
    what = f"nested index {digest}"
    warnings: list[str] = []
    written = _string(head, "mediaType", warnings)
    return Manifest(
        digest,
        "index",
        written or media_type,
        size,
        artifact_type=_string(head, "artifactType", warnings),
        subject=_subject(head.get("subject"), warnings),
        annotations=_annotations(head.get("annotations"), warnings),
        warnings=tuple(f"{what}: {text}" for text in warnings),
    )


def parse_config(data: bytes, digest: str) -> ImageConfig:
    """Parse an image config blob's platform and ``created``; :class:`BlobError` if unusable."""
    what = f"config {digest}"
    document = _document(data, what)
    warnings: list[str] = []
    fields = {key: document[key] for key in _CONFIG_PLATFORM_FIELDS if key in document}
    platform = _platform(fields, warnings) if fields else None
    if platform is not None and not platform.os and not platform.architecture:
        platform = None
    created = document.get("created")
    if created is not None and not isinstance(created, str):
        warnings.append(f'"created" is a JSON {_kind(created)}, not a string; ignored')
        created = None
    elif isinstance(created, str) and len(created) > MAX_CREATED:
        warnings.append(f'"created" is {len(created)} characters long, not a time; ignored')
        created = None
    return ImageConfig(
        digest,
        platform,
        _clean(created) if created else None,
        tuple(f"{what}: {text}" for text in warnings),
    )


def _document(data: bytes, what: str) -> dict[str, object]:
    try:
        document = _load_json(data, what)
    except IndexParseError as exc:
        raise BlobError(exc.message) from None
    if not isinstance(document, dict):
        raise BlobError(f"{what} is a JSON {_kind(document)}, not an object")
    return document


def _string(document: dict[str, object], key: str, warnings: list[str]) -> str:
    value = document.get(key, "")
    if isinstance(value, str):
        return _clean(value)
    warnings.append(f'"{key}" is a JSON {_kind(value)}, not a string; ignored')
    return ""


def _blob_ref(item: object, where: str, warnings: list[str]) -> BlobRef | None:
    if type(item) is dict:
        # The common case first: a sha256 digest of lowercase hex, a size, an ASCII media type. A
        # layer's or config's annotations are not kept, so they need no checking here.
        digest, size, media_type = item.get("digest"), item.get("size"), item.get("mediaType", "")
        if (
            type(digest) is str
            and len(digest) == 71
            and digest.startswith("sha256:")
            and not digest[7:].strip(_HEX)
            and type(size) is int
            and 0 <= size <= _MAX_SIZE
            and type(media_type) is str
            and media_type.isascii()
        ):
            urls = item.get("urls")
            return BlobRef(digest, sys.intern(media_type), size, bool(urls) and isinstance(urls, list))
    own: list[str] = []
    descriptor = _descriptor(item, own)
    warnings.extend(f"{where}: {text}" for text in own)
    if descriptor is None:
        return None
    assert isinstance(item, dict)
    urls = item.get("urls")
    external = isinstance(urls, list) and bool(urls)
    return BlobRef(descriptor[0], descriptor[1], descriptor[2], external)


def _subject(value: object, warnings: list[str]) -> str | None:
    """The digest of a ``subject`` descriptor; only the digest matters for a link."""
    if value is None:
        return None
    digest = value.get("digest") if isinstance(value, dict) else None
    if not isinstance(digest, str):
        warnings.append(f'"subject" is not a descriptor with a digest; ignored ({_kind(value)})')
        return None
    try:
        return reference.validate_digest(digest)
    except InvalidReference as exc:
        warnings.append(f"subject digest {quote_value(digest)} is invalid ({exc.category}); ignored")
        return None


# -- reading blobs -----------------------------------------------------------------------------


def graph_key(digest: str) -> int:
    """The key of *digest* in the graph's tables and a layout's figures: its first 63 bits (the rows
    keep the digest, which every lookup compares, so two digests sharing a key can cost an answer its
    graph, never mix)."""
    if digest.startswith("sha256:"):
        return int(digest[7:23], 16) >> 1
    return int(digest[digest.index(":") + 1 :][:16], 16) >> 1


def hex_keys(hexes: list[str]) -> list[int]:
    """:func:`graph_key` of each digest's hex part (a listing's names), in a few C calls."""
    packed = array("Q", bytes.fromhex("".join([text[:16] for text in hexes])))
    if sys.byteorder == "little":
        packed.byteswap()  # the hex is big-endian: its first 16 digits read as one number
    return [key >> 1 for key in packed]


def pack_pairs(pairs: list[int]) -> bytes:
    """Integers (keys, sizes) as native int64s; :func:`unpack_pairs` reads them back."""
    return array("q", pairs).tobytes()


def unpack_pairs(data: bytes | None) -> list[int]:
    """The integers :func:`pack_pairs` packed (none for None)."""
    found = array("q")
    if data:
        found.frombytes(data)
    return found.tolist()


class Known(Record):
    """What one process has read and sent in one pass, by :func:`graph_key`: the :class:`Shape` of each
    manifest and index whose row it sent, and the warnings of each config whose row it sent.

    Filled only where the rows are made (``store.write.graph_rows``), so a key here is a row sent:
    a later layout holding that digest claims the row instead of reading the blob again.
    """

    __slots__ = ("configs", "manifests")

    manifests: dict[int, Shape]
    configs: dict[int, tuple[str, ...]]

    def __init__(self) -> None:
        self.manifests = {}
        self.configs = {}


def read_manifest(
    layout: str,
    digest: str,
    size: int | None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    resolved: dict[str, str] | None = None,
) -> Manifest:
    """Manifest *digest* read from *layout*'s ``blobs/`` (:class:`~indexer.layout.BlobMissing` when
    absent, :class:`BlobError` when refused)."""
    data = read_blob(layout, digest, size, limits, resolved=resolved)
    return parse_manifest(data, digest, len(data), limits=limits)


def read_config(
    layout: str,
    digest: str,
    size: int | None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    resolved: dict[str, str] | None = None,
) -> ImageConfig:
    """Config *digest*, as :func:`read_manifest` reads a manifest."""
    data = read_blob(layout, digest, size, limits, resolved=resolved)
    return parse_config(data, digest)


_SHA256 = ("sha256",)


def manifest_shape(manifest: Manifest) -> Shape:
    """The :class:`Shape` of a parsed manifest or index."""
    config = manifest.config
    refs = (config, *manifest.layers) if config is not None else manifest.layers
    pairs: list[int] = []
    external: list[int] = []
    algorithms: tuple[str, ...] = _SHA256
    for ref in refs:
        key = graph_key(ref.digest)
        pairs += (key, ref.size)
        if ref.external:
            external.append(key)
        if not ref.digest.startswith("sha256:"):
            algorithms = tuple(sorted({*algorithms, ref.digest.partition(":")[0]}))
    image_config = config is not None and config.media_type in IMAGE_CONFIG_TYPES
    return Shape(
        pack_pairs(pairs),
        config.digest if image_config and config is not None else None,
        image_config,
        tuple(external),
        algorithms if refs else (),
        manifest.complete,
        manifest.warnings,
    )


# -- what a layout's blobs/ holds ---------------------------------------------------------------

_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}  # the algorithms a digest may name (go-digest)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


class BlobDirs:
    """A layout's ``blobs/ALG`` directories, opened, and the blobs they hold (one listing each).

    Each directory is opened with ``O_NOFOLLOW | O_DIRECTORY`` below a descriptor of the layout, so
    what is listed (and what :mod:`indexer.gc` unlinks, relative to these descriptors) is inside
    the layout whatever is renamed meanwhile. With *follow*, a ``blobs`` or ``blobs/ALG`` that is a
    symlink is followed when it resolves inside the layout, the rule :func:`indexer.layout.read_blob`
    applies; without it (``ocidx gc``), such a directory is refused and not listed.

    ``files`` are the digests of the regular files named like a blob (``sha256:HEX``), ``keys`` the
    same by :func:`graph_key`; ``odd``
    the other entries named like one (a symlink, a FIFO, a directory, a device) with what they
    are; names that are not a blob's (a writer's temporary file) are ignored. With *follow*, a
    symlink that resolves to a regular file inside the layout counts as a file. ``identities``
    holds each directory listed, as ``(name, dev, ino, mtime_ns, ctime_ns)`` (``blobs`` itself
    first, then each ``blobs/ALG``), taken before its listing began at ``listed_ns``.
    """

    def __init__(self, layout: str, *, follow: bool = True) -> None:
        import time

        self.layout = layout
        self.follow = follow
        self.files: set[str] = set()
        self.keys: dict[int, str] = {}
        self.odd: dict[str, str] = {}
        self.problems: list[str] = []
        self.identities: list[tuple[str, int, int, int, int]] = []
        self.fds: dict[str, int] = {}
        self.listed_ns = time.time_ns()
        self.exists = False
        self._layout_fd = -1
        try:
            self._list()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BlobDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the directories (a listing's results stay)."""
        for fd in [*self.fds.values(), self._layout_fd]:
            if fd >= 0:
                os.close(fd)
        self.fds = {}
        self._layout_fd = -1

    def _open(self, name: str, parent: int, shown: str) -> int | None:
        """A descriptor of directory *name* below *parent*, or None (absent, or refused with a problem)."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            # The layout's own permissions: its blobs are not counted, and the graph says so. Any
            # other failure (EMFILE, EIO, ENOMEM) is the environment's and is raised: never a proof.
            self.problems.append(f"{shown} cannot be listed: {exc.strerror}; its blobs are not counted")
            return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        if not self.follow or not stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
            self.problems.append(f"{shown} is not a directory; its blobs are not counted")
            return None
        real = os.path.realpath(os.path.join(self.layout, shown))
        inside = os.path.realpath(self.layout).rstrip(os.sep) + os.sep
        if not real.startswith(inside) or not os.path.isdir(real):
            self.problems.append(f"{shown} is a symlink leading outside the layout (to {real}); refused")
            return None
        return os.open(real, _DIR_FLAGS)

    def _list(self) -> None:
        # The layout path is resolved by the caller. Without *follow* it must not have become a
        # symlink since, nor lead elsewhere through a directory swapped on the way (/proc/self/fd).
        self._layout_fd = os.open(self.layout, _DIR_FLAGS if not self.follow else _DIR_FLAGS & ~os.O_NOFOLLOW)
        if not self.follow:
            try:
                opened = os.readlink(f"/proc/self/fd/{self._layout_fd}")
            except OSError:
                opened = self.layout
            if opened != self.layout:
                raise BlobError(f"{self.layout} led elsewhere when opened (to {opened}); refused")
        blobs = self._open("blobs", self._layout_fd, "blobs")
        if blobs is None:
            return
        self.exists = True
        self.fds[""] = blobs
        st = os.fstat(blobs)
        self.identities.append(("blobs", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
        for algorithm in sorted(os.listdir(blobs)):
            length = _HEX_LENGTHS.get(algorithm)
            if length is None:
                continue  # not a digest algorithm: nothing in it can be named by a descriptor
            fd = self._open(algorithm, blobs, f"blobs/{algorithm}")
            if fd is None:
                continue
            self.fds[algorithm] = fd
            st = os.fstat(fd)
            self.identities.append((f"blobs/{algorithm}", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
            prefix = algorithm + ":"
            with os.scandir(fd) as listing:
                entries = list(listing)
            # Names of other lengths are not blobs' (a writer's temporary files); the rest is checked
            # in a few C calls: every name hex (per name only when one is not), every entry a file.
            regular = [e.name for e in entries if e.is_file(follow_symlinks=False) and len(e.name) == length]
            if "".join(regular).strip(_HEX):
                regular = [name for name in regular if not name.strip(_HEX)]
            digests = [prefix + name for name in regular]
            self.files.update(digests)
            self.keys.update(zip(hex_keys(regular), digests, strict=True))
            if len(regular) != len(entries):
                for entry in entries:
                    name = entry.name
                    if len(name) != length or name.strip(_HEX) or entry.is_file(follow_symlinks=False):
                        continue
                    if entry.is_symlink():
                        self._symlink(prefix + name, algorithm, name)
                    else:
                        self.odd[prefix + name] = _entry_kind(entry)

    def _symlink(self, digest: str, algorithm: str, name: str) -> None:
        if self.follow:
            real = os.path.realpath(os.path.join(self.layout, "blobs", algorithm, name))
            inside = os.path.realpath(self.layout).rstrip(os.sep) + os.sep
            if real.startswith(inside) and os.path.isfile(real):
                self.files.add(digest)
                self.keys[graph_key(digest)] = digest
                return
            self.problems.append(f"blob {digest} is a symlink leading outside the layout or to no file; refused")
        self.odd[digest] = "a symlink"

    def stat(self, digest: str) -> os.stat_result | None:
        """``lstat`` of a listed blob, relative to its directory (None when it is gone since)."""
        algorithm, _, name = digest.partition(":")
        try:
            return os.stat(name, dir_fd=self.fds[algorithm], follow_symlinks=self.follow)
        except (OSError, KeyError):
            return None


def _entry_kind(entry: os.DirEntry[str]) -> str:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "gone"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


# -- what a layout references --------------------------------------------------------------------


class Reach(Record):
    """Everything a layout references, from ``index.json`` through its indexes and manifests.

    ``refs`` maps the :func:`graph_key` of each referenced blob to its size (index blobs, manifests,
    configs and layers; a ``subject`` is a link, not a reference); ``external`` holds the keys of
    the layers that exporters leave out (``urls``); ``algorithms`` those of the referenced digests;
    ``shapes`` the :class:`Shape` of every manifest present, by digest, and ``manifests`` those
    parsed here (the others were :class:`Known`); ``unknown`` says why what it references is not
    wholly known (a manifest or index absent or refused, a descriptor skipped), so that no present
    blob can be proven unreferenced while it is not empty; ``refused`` holds the messages of the
    manifests that were present but refused (a bad hash, too big, not JSON).
    """

    __slots__ = ("algorithms", "external", "manifests", "refs", "refused", "shapes", "unknown")

    refs: dict[int, int]
    external: set[int]
    algorithms: set[str]
    shapes: dict[str, Shape]
    manifests: dict[str, Manifest]
    unknown: list[str]
    refused: list[str]

    def __init__(
        self,
        refs: dict[int, int],
        external: set[int],
        algorithms: set[str],
        shapes: dict[str, Shape],
        manifests: dict[str, Manifest],
        unknown: list[str],
        refused: list[str],
    ) -> None:
        self.refs = refs
        self.external = external
        self.algorithms = algorithms
        self.shapes = shapes
        self.manifests = manifests
        self.unknown = unknown
        self.refused = refused


def reach(
    layout: str,
    snapshot: Snapshot,
    present: Container[str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    resolved: dict[str, str] | None = None,
    known: Known | None = None,
) -> Reach:
    """What *snapshot*'s layout references (:class:`Reach`); *present* holds the digests its ``blobs/`` holds.

    A manifest is read only when present (an absent one is a reason in ``unknown``, with no open
    attempted) and not in *known* (read before in this pass: its shape is taken instead).
    """
    refs: dict[int, int] = {}
    external: set[int] = set()
    algorithms: set[str] = set()
    shapes: dict[str, Shape] = {}
    manifests: dict[str, Manifest] = {}
    unknown: list[str] = []
    if snapshot.skipped:
        unknown.append(f"{snapshot.skipped} descriptor(s) of index.json could not be read")
    if snapshot.truncated:
        unknown.append(f"more than {limits.max_children} nested descriptors; the rest were not read")
    for blob in snapshot.indexes:
        if blob.state == "missing":
            unknown.append(f"nested index {blob.digest} is not in blobs/")
        elif blob.state == "invalid":
            unknown.append(f"nested index {blob.digest} was refused")
        elif blob.state == "deep":
            unknown.append(f"nested index {blob.digest} is deeper than {limits.max_depth} levels")
        elif blob.skipped:
            unknown.append(f"{blob.skipped} descriptor(s) of nested index {blob.digest} could not be read")
    cache = resolved if resolved is not None else {}
    shapes_known = known.manifests if known is not None else {}
    refused: list[str] = []
    looked: set[str] = set()
    descriptors: list[Entry | Child] = [*snapshot.entries, *snapshot.children]
    for descriptor in descriptors:
        digest = descriptor.digest
        key = graph_key(digest)
        if key not in refs:
            refs[key] = descriptor.size
            algorithms.add(digest[: digest.index(":")])
        if descriptor.media_type not in MANIFEST_MEDIA_TYPES or digest in looked:
            continue
        looked.add(digest)
        if digest not in present:
            unknown.append(f"manifest {digest} is not in blobs/")
            continue
        shape = shapes_known.get(key)
        if shape is None:
            try:
                manifest = read_manifest(layout, digest, descriptor.size, limits, resolved=cache)
            except BlobError as exc:
                unknown.append(exc.message)
                refused.append(exc.message)
                continue
            manifests[digest] = manifest
            shape = manifest_shape(manifest)
        shapes[digest] = shape
        if not shape.complete:
            unknown.append(f"manifest {digest} lists a descriptor that could not be read")
        pairs = unpack_pairs(shape.pairs)
        for number in range(0, len(pairs), 2):
            if pairs[number] not in refs:
                refs[pairs[number]] = pairs[number + 1]
        external.update(shape.external)
        algorithms.update(shape.algorithms)
    return Reach(refs, external, algorithms, shapes, manifests, unknown, refused)


class LayoutGraph(Record):
    """What one layout's ``blobs/`` holds and what it references, read beside its snapshot.

    ``reach`` is what it references; ``indexes`` the heads of its nested index blobs parsed here
    (those :class:`Known` are claimed); ``configs`` the image configs read (by digest); ``present``
    the blobs its ``blobs/`` holds (by :func:`graph_key`); ``unreferenced`` the sizes of those
    nothing references (by key); ``missing`` the keys of the referenced blobs absent (external
    layers left out); ``claims`` the keys of the manifests and indexes (and, negated less one, of
    the configs) whose rows this process sent before, with another layout (:class:`Known`);
    ``identities`` and ``listed_ns`` what the listing was made of, and when (:class:`BlobDirs`);
    ``attestations`` the ``(index, manifest, target)`` links BuildKit's attestation descriptors
    make; ``warnings`` what a person should know (refused blobs, entries of ``blobs/`` that are not
    files, manifests' and configs' own warnings).
    """

    __slots__ = (
        "attestations",
        "claims",
        "configs",
        "dirs_refused",
        "exists",
        "identities",
        "indexes",
        "listed_ns",
        "missing",
        "present",
        "reach",
        "unreferenced",
        "warnings",
    )

    def __init__(
        self,
        *,
        reach: Reach,
        indexes: dict[str, Manifest],
        configs: dict[str, ImageConfig],
        present: dict[int, str],
        unreferenced: dict[int, int],
        missing: list[int],
        claims: list[int],
        identities: list[tuple[str, int, int, int, int]],
        exists: bool,
        listed_ns: int,
        attestations: list[tuple[str, str, str]],
        warnings: list[str],
        dirs_refused: bool = False,
    ) -> None:
        self.dirs_refused = dirs_refused
        self.reach = reach
        self.indexes = indexes
        self.configs = configs
        self.present = present
        self.unreferenced = unreferenced
        self.missing = missing
        self.claims = claims
        self.identities = identities
        self.exists = exists
        self.listed_ns = listed_ns
        self.attestations = attestations
        self.warnings = warnings

    @property
    def complete(self) -> bool:
        """Whether everything the layout references is known (so the unreferenced are proven so)."""
        return not self.reach.unknown


def read_layout_graph(
    layout: str, snapshot: Snapshot, limits: Limits = DEFAULT_LIMITS, known: Known | None = None
) -> LayoutGraph:
    """List *layout*'s ``blobs/`` once and read what its *snapshot* references (manifests, configs),
    but for what *known* holds (sent before in this pass: claimed)."""
    resolved: dict[str, str] = {}  # the layout's blobs/ALG directories, resolved once for every read
    with BlobDirs(layout, follow=True) as dirs:
        found = reach(layout, snapshot, dirs.files, limits, resolved=resolved, known=known)
        present, refs = dirs.keys, found.refs
        unreferenced: dict[int, int] = {}
        for key, digest in present.items():
            if key not in refs:
                st = dirs.stat(digest)
                unreferenced[key] = st.st_size if st is not None else 0
        warnings = list(dirs.problems)
        warnings.extend(
            f"blob {digest} is {kind}, not a regular file; not counted" for digest, kind in dirs.odd.items()
        )
        identities, exists, listed_ns, refused = list(dirs.identities), dirs.exists, dirs.listed_ns, dirs.problems
        files = dirs.files
    warnings.extend(f"{message}; what it references is unknown" for message in found.refused)
    configs_known = known.configs if known is not None else {}
    configs: dict[str, ImageConfig] = {}
    claims: list[int] = []
    seen: set[int] = set()
    for digest, shape in found.shapes.items():
        warnings.extend(shape.warnings)
        if digest not in found.manifests:
            claims.append(graph_key(digest))
        if not shape.image_config:
            continue
        config_key, config_size = unpack_pairs(shape.pairs[:16])  # the config is the first pair
        if config_key in seen:
            continue
        seen.add(config_key)
        if config_key in configs_known:
            claims.append(-config_key - 1)  # configs' claims are negative: one list for both tables
            warnings.extend(configs_known[config_key])
            continue
        config = shape.config
        if config is None or config not in files:
            continue
        try:
            image_config = read_config(layout, config, config_size, limits, resolved=resolved)
        except BlobError as exc:
            warnings.append(exc.message)
            continue
        configs[config] = image_config
        warnings.extend(image_config.warnings)
    indexes: dict[str, Manifest] = {}
    for blob in snapshot.indexes:
        if blob.state != "ok" or blob.digest in indexes:
            continue
        key = graph_key(blob.digest)
        sent = known.manifests.get(key) if known is not None else None
        if sent is not None:  # an index's head is as content-addressed as a manifest
            claims.append(key)
            warnings.extend(sent.warnings)
            continue
        written = next((e.media_type for e in snapshot.entries if e.digest == blob.digest), None)
        if written is None:
            written = next((c.media_type for c in snapshot.children if c.digest == blob.digest), "")
        indexes[blob.digest] = head = parse_index_head(blob.digest, blob.size, written, blob.head)
        warnings.extend(head.warnings)
    attestations: list[tuple[str, str, str]] = []
    for child in snapshot.children:
        target = child.annotations.get(REFERENCE_DIGEST)
        if child.annotations.get(REFERENCE_TYPE) == ATTESTATION_MANIFEST and target and reference.is_digest(target):
            attestations.append((child.parent, child.digest, target))
    external = found.external
    missing = sorted(key for key in refs if key not in present and key not in external)
    return LayoutGraph(
        reach=found,
        indexes=indexes,
        configs=configs,
        present=present,
        unreferenced=unreferenced,
        missing=missing,
        claims=claims,
        identities=identities,
        exists=exists,
        listed_ns=listed_ns,
        attestations=attestations,
        warnings=list(dict.fromkeys(warnings)),
        dirs_refused=bool(refused),
    )


__all__ = [
    "ATTESTATION_MANIFEST",
    "DOCKER_CONFIG",
    "IMAGE_CONFIG_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_ARTIFACT_MANIFEST",
    "OCI_CONFIG",
    "REFERENCE_DIGEST",
    "REFERENCE_TYPE",
    "BlobDirs",
    "BlobRef",
    "ImageConfig",
    "Known",
    "LayoutGraph",
    "Manifest",
    "Reach",
    "Shape",
    "graph_key",
    "hex_keys",
    "manifest_shape",
    "pack_pairs",
    "parse_config",
    "parse_index_head",
    "parse_manifest",
    "reach",
    "read_config",
    "read_layout_graph",
    "read_manifest",
    "unpack_pairs",
]
