"""Image manifests and configs: parsed (pure, bytes in) and read from a layout's ``blobs/``.

Blobs are read by :func:`indexer.layout.read_blob`, the one way to read a blob (digest validated
before it becomes a path, containment in the layout, size bounds, hash check).

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
"""

from __future__ import annotations

import collections
import sys

from indexer import reference
from indexer._record import Record
from indexer.errors import BlobError, IndexParseError, InvalidReference
from indexer.layout import DEFAULT_LIMITS, DOCKER_MANIFEST, INDEX_MEDIA_TYPES, OCI_MANIFEST, Limits, Platform, read_blob
from indexer.layout.parse import _MAX_SIZE, _annotations, _clean, _descriptor, _kind, _load_json, _platform
from indexer.names import quote_value

TYPE_CHECKING = False
if TYPE_CHECKING:
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
