"""The content graph's reads: images, their layers and configs, what each layout holds and lacks, who uses
a blob, and referrers."""

from __future__ import annotations

import json
import sys
from array import array

from indexer._record import Record
from indexer.graph import graph_key, unpack_pairs
from indexer.layout import INDEX_MEDIA_TYPES
from indexer.store.read.matcher import _scope
from indexer.store.read.stored import _chunks

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Sequence


def parse_layers(text: str) -> list[tuple[str, str, int, bool]]:
    """``(digest, mediaType, size, external)`` of each layer of a ``manifests.layers`` value."""
    found: list[tuple[str, str, int, bool]] = []
    media_type = ""
    for item in json.loads(text):
        if len(item) > 2:
            media_type = item[2]
        found.append((item[0], media_type, item[1], len(item) > 3))
    return found


class Image(Record):
    """What the content graph holds of one manifest or index digest (host-wide rows), with its config's
    platform and ``created``; ``layers`` is the stored list (:func:`parse_layers`), None for an index."""

    __slots__ = (
        "annotations",
        "artifact_type",
        "complete",
        "config",
        "config_media_type",
        "config_size",
        "created",
        "digest",
        "image_size",
        "kind",
        "layer_count",
        "layers",
        "media_type",
        "platform",
        "size",
        "subject",
    )

    def __init__(
        self,
        *,
        digest: str,
        kind: str,
        media_type: str,
        size: int,
        artifact_type: str,
        subject: str | None,
        annotations: dict[str, str],
        config: str | None,
        config_media_type: str | None,
        config_size: int | None,
        layers: str | None,
        layer_count: int | None,
        image_size: int | None,
        complete: bool,
        created: str | None = None,
        platform: dict[str, object] | None = None,
    ) -> None:
        self.digest = digest
        self.kind = kind
        self.media_type = media_type
        self.size = size
        self.artifact_type = artifact_type
        self.subject = subject
        self.annotations = annotations
        self.config = config
        self.config_media_type = config_media_type
        self.config_size = config_size
        self.layers = layers
        self.layer_count = layer_count
        self.image_size = image_size
        self.complete = complete
        self.created = created
        self.platform = platform

    def blobs(self) -> list[str]:
        """The digests an image is made of: the manifest, its config and its layers."""
        found = [self.digest]
        if self.config is not None:
            found.append(self.config)
        if self.layers:
            found.extend(layer[0] for layer in parse_layers(self.layers))
        return found

    def referrer_type(self) -> str:
        """``artifactType`` as the OCI referrers API gives it: the manifest's, else its config's media type."""
        return self.artifact_type or self.config_media_type or ""


_IMAGE_COLUMNS = (
    "key, digest, kind, media_type, size, artifact_type, subject, annotations, config, config_key, "
    "config_media_type, config_size, layers, layer_count, image_size, complete"
)


def images(conn: sqlite3.Connection, digests: Iterable[str]) -> dict[str, Image]:
    """The content graph's rows of *digests* (manifests and indexes read on this host), by digest."""
    wanted = {graph_key(d): d for d in set(digests)}
    rows: list[Sequence[object]] = []
    for chunk in _chunks(sorted(wanted)):
        marks = ",".join("?" * len(chunk))
        # A row of another digest with the same first 63 bits is not this image.
        found_rows = conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM manifests WHERE key IN ({marks})", chunk)
        rows.extend(row for row in found_rows if wanted.get(row[0]) == row[1])
    configs: dict[str, tuple[str | None, dict[str, object] | None]] = {}
    config_keys = sorted({int(row[9]) for row in rows if row[9] is not None})  # type: ignore[call-overload]
    for chunk in _chunks(config_keys):
        marks = ",".join("?" * len(chunk))
        for digest, os_, arch, variant, created in conn.execute(
            f"SELECT digest, os, architecture, variant, created FROM configs WHERE key IN ({marks})", chunk
        ):
            platform = {"os": os_, "architecture": arch, "variant": variant} if os_ is not None else None
            configs[digest] = (created, platform)
    found: dict[str, Image] = {}
    for row in rows:
        (_key, digest, kind, media_type, size, artifact, subject, notes, config, _config_key, config_type) = row[:11]
        config_size, layers, layer_count, size_of_image, complete = row[11:]
        created, platform = configs.get(config, (None, None)) if isinstance(config, str) else (None, None)
        found[str(digest)] = Image(
            digest=str(digest),
            kind=str(kind),
            media_type=str(media_type),
            size=int(size),  # type: ignore[call-overload]
            artifact_type=str(artifact),
            subject=subject,  # type: ignore[arg-type]
            annotations=json.loads(notes) if notes else {},  # type: ignore[arg-type]
            config=config,  # type: ignore[arg-type]
            config_media_type=config_type,  # type: ignore[arg-type]
            config_size=config_size,  # type: ignore[arg-type]
            layers=layers,  # type: ignore[arg-type]
            layer_count=layer_count,  # type: ignore[arg-type]
            image_size=size_of_image,  # type: ignore[arg-type]
            complete=bool(complete),
            created=created,
            platform=platform,
        )
    return found


class Usage(Record):
    """What one layout's ``blobs/`` holds (``layout_graph``): figures, missing keys, held set."""

    __slots__ = (
        "complete",
        "held",
        "layout_id",
        "missing",
        "missing_blobs",
        "referenced_blobs",
        "referenced_bytes",
        "unreferenced_blobs",
        "unreferenced_bytes",
    )

    def __init__(self, row: Sequence[object]) -> None:
        (
            self.layout_id,
            self.complete,
            self.referenced_blobs,
            self.referenced_bytes,
            self.missing_blobs,
            self.unreferenced_blobs,
            self.unreferenced_bytes,
            self.missing,
            self.held,
        ) = row

    def missing_keys(self) -> set[int]:
        """The graph keys of the referenced blobs absent from the layout."""
        return set(unpack_pairs(self.missing)) if self.missing else set()  # type: ignore[arg-type]

    def held_arrays(self) -> tuple[array[int], array[int]]:
        """The keys of the blobs present (referenced ones first, :func:`graph_key`) and their sizes, as
        int64 arrays."""
        held: bytes = self.held  # type: ignore[assignment]
        half = len(held) // 2
        keys, sizes = array("q"), array("q")
        keys.frombytes(held[:half])
        sizes.frombytes(held[half:])
        if sys.byteorder != "little":
            sizes.byteswap()  # stored little-endian (the keys are only compared)
        return keys, sizes


_USAGE_COLUMNS = (
    "layout_id, complete, referenced_blobs, referenced_bytes, missing_blobs, unreferenced_blobs, "
    "unreferenced_bytes, missing, held"
)


def usage(conn: sqlite3.Connection, layout_ids: Iterable[int] | None = None) -> dict[int, Usage]:
    """What the ``blobs/`` of each layout (of *layout_ids*, or all) holds, by layout id."""
    if layout_ids is None:
        return {row[0]: Usage(row) for row in conn.execute(f"SELECT {_USAGE_COLUMNS} FROM layout_graph")}
    found: dict[int, Usage] = {}
    for chunk in _chunks(sorted(set(layout_ids))):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_USAGE_COLUMNS} FROM layout_graph WHERE layout_id IN ({marks})", chunk):
            found[row[0]] = Usage(row)
    return found


def missing(conn: sqlite3.Connection, layout_ids: Iterable[int]) -> dict[int, set[int]]:
    """The keys (:func:`graph_key`) of the referenced blobs absent from each layout (of *layout_ids*) whose
    ``blobs/`` the index knows (a layout with no entry here: not known)."""
    found: dict[int, set[int]] = {}
    for chunk in _chunks(sorted(set(layout_ids))):
        marks = ",".join("?" * len(chunk))
        for lid, keys in conn.execute(
            f"SELECT layout_id, missing FROM layout_graph WHERE layout_id IN ({marks})", chunk
        ):
            found[lid] = set(unpack_pairs(keys)) if keys else set()
    return found


def image_size(image: Image, absent: set[int] | None) -> int | None:
    """The bytes of *image* in a layout whose absent blobs are *absent* (:func:`graph_key`): None for an
    index, for an image whose blobs are not all in that layout, or when what it holds is not known."""
    if image.kind != "manifest" or image.image_size is None or absent is None:
        return None
    if absent and any(graph_key(d) in absent for d in image.blobs()):
        return None
    return image.image_size


class GraphHit(Record):
    """A layout that references a digest as a layer or a config (``find @DIGEST``)."""

    __slots__ = ("digest", "layout_id", "media_type", "size", "source", "used_by")

    def __init__(
        self, *, layout_id: int, digest: str, source: str, media_type: str, size: int, used_by: list[str]
    ) -> None:
        self.layout_id = layout_id
        self.digest = digest
        self.source = source
        self.media_type = media_type
        self.size = size
        self.used_by = used_by


def users(conn: sqlite3.Connection, digest: str) -> list[tuple[str, str, str, int]]:
    """The manifests (read on this host) that use *digest* as a layer or as their config:
    ``(manifest digest, "layer" or "config", mediaType, size)``."""
    key = graph_key(digest)
    found: list[tuple[str, str, str, int]] = []
    for manifest, layers in conn.execute(
        "SELECT m.digest, m.layers FROM layer_users u JOIN manifests m ON m.key = u.manifest WHERE u.layer = ?",
        (key,),
    ):
        for layer, media_type, size, _external in parse_layers(layers or "[]"):
            if layer == digest:
                found.append((manifest, "layer", media_type, size))
                break
    for manifest, media_type, size in conn.execute(
        "SELECT digest, config_media_type, config_size FROM manifests WHERE config_key = ? AND config = ?",
        (key, digest),
    ):
        found.append((manifest, "config", media_type, size))
    return found


def referencing(conn: sqlite3.Connection, digests: Iterable[str], layout_id: int | None = None) -> dict[int, set[str]]:
    """The layouts whose entries or children name any of *digests*: layout id to the digests it names."""
    found: dict[int, set[str]] = {}
    where, args = _scope(layout_id, "layout_id")
    for digest in set(digests):
        for table in ("entries", "children"):
            for (lid,) in conn.execute(
                f"SELECT DISTINCT layout_id FROM {table} WHERE digest = ?{where}", (digest, *args)
            ):
                found.setdefault(lid, set()).add(digest)
    return found


def graph_hits(conn: sqlite3.Connection, digest: str, layout_id: int | None = None) -> list[GraphHit]:
    """The layouts (or layout *layout_id*) that reference *digest* as a layer or a config of a manifest
    they reference, each with those manifests (``used_by``), by layout then source."""
    used = users(conn, digest)
    if not used:
        return []
    by_manifest: dict[str, tuple[str, str, int]] = {m: (source, mt, size) for m, source, mt, size in used}
    return blob_uses(digest, referencing(conn, by_manifest, layout_id), by_manifest)


def blob_uses(
    digest: str, referencing: dict[int, set[str]], by_manifest: dict[str, tuple[str, str, int]]
) -> list[GraphHit]:
    """The hits of :func:`graph_hits`: for each layout of *referencing* (layout id to the manifests it
    references that use *digest*), by layout, the config use then the layer use, each with its manifests
    sorted and the media type and size the first of them gives (*by_manifest*: manifest to ``(source,
    mediaType, size)``)."""
    hits: list[GraphHit] = []
    for lid, manifests in sorted(referencing.items()):
        for source in ("config", "layer"):
            mine = sorted(m for m in manifests if by_manifest[m][0] == source)
            if mine:
                _source, media_type, size = by_manifest[mine[0]]
                hits.append(
                    GraphHit(
                        layout_id=lid, digest=digest, source=source, media_type=media_type, size=size, used_by=mine
                    )
                )
    return hits


class ReferrerHit(Record):
    """A manifest or index in a layout that refers to a target digest, and how (``referrers``)."""

    __slots__ = ("digest", "how", "layout_id", "media_type", "subject")

    def __init__(self, *, layout_id: int, digest: str, media_type: str, subject: str, how: str) -> None:
        self.layout_id = layout_id
        self.digest = digest
        self.media_type = media_type
        self.subject = subject
        self.how = how


FALLBACK_SUFFIXES = ("", ".sig", ".att", ".sbom")


def fallback_tags(digest: str) -> list[str]:
    """The tags that registries without the referrers API give a digest's referrers: the OCI
    distribution spec's ``ALG-HEX`` (an index of referrers; HEX cut at 64 characters) and cosign's
    ``ALG-HEX.sig``, ``.att`` and ``.sbom``."""
    algorithm, _, encoded = digest.partition(":")
    base = f"{algorithm}-{encoded[:64]}"
    return [base + suffix for suffix in FALLBACK_SUFFIXES]


def referrer_hits(conn: sqlite3.Connection, target: str, layout_id: int | None = None) -> list[ReferrerHit]:
    """Every manifest or index, in every layout (or layout *layout_id*), that refers to *target*: by its
    ``subject``, as a BuildKit attestation manifest listed for it (or listed in it, for an index), or
    under a fallback tag."""
    found: dict[tuple[int, str, str], ReferrerHit] = {}

    def add(lid: int, digest: str, media_type: str, how: str, subject: str = target) -> None:
        found.setdefault(
            (lid, digest, how),
            ReferrerHit(layout_id=lid, digest=digest, media_type=media_type, subject=subject, how=how),
        )

    where, args = _scope(layout_id, "layout_id")
    referrers = [row[0] for row in conn.execute("SELECT digest FROM manifests WHERE subject = ?", (target,))]
    for digest in referrers:
        for table in ("entries", "children"):
            for lid, media_type in conn.execute(
                f"SELECT DISTINCT layout_id, media_type FROM {table} WHERE digest = ?{where}", (digest, *args)
            ):
                add(lid, digest, media_type, "subject")
    key = graph_key(target)
    # Attestation manifests listed for the target (beside it, in the index that lists it) ...
    listed = conn.execute(
        "SELECT a.digest, m.digest, a.target FROM attestations a JOIN manifests m ON m.key = a.index_key "
        "WHERE a.target_key = ? AND a.target = ?",
        (key, target),
    ).fetchall()
    # ... and, when the target is an index, those it lists (for the images of its platforms).
    own = conn.execute("SELECT digest FROM manifests WHERE key = ? AND digest = ? AND kind = 'index'", (key, target))
    if own.fetchone() is not None:
        rows = conn.execute("SELECT digest, target FROM attestations WHERE index_key = ?", (key,))
        listed += [(digest, target, subject) for digest, subject in rows]
    for digest, index, subject in listed:
        for lid, media_type in conn.execute(
            f"SELECT DISTINCT layout_id, media_type FROM children WHERE digest = ? AND parent = ?{where}",
            (digest, index, *args),
        ):
            add(lid, digest, media_type, "attestation", subject)
    tags = fallback_tags(target)
    marks = ",".join("?" * len(tags))
    where_n, args_n = _scope(layout_id, "n.layout_id")
    for entry_id, lid, digest, media_type, tag in conn.execute(
        f"SELECT e.id, e.layout_id, e.digest, e.media_type, n.tag FROM names n JOIN entries e ON e.id = n.entry_id "
        f"WHERE n.tag IN ({marks}){where_n}",
        (*tags, *args_n),
    ):
        if tag == tags[0] and media_type in INDEX_MEDIA_TYPES:
            # The OCI fallback tag names an index whose descriptors are the referrers themselves.
            for child_digest, child_type in conn.execute(
                "SELECT digest, media_type FROM children WHERE entry_id = ? AND depth = 1 ORDER BY position",
                (entry_id,),
            ):
                add(lid, child_digest, child_type, "fallback-tag")
        else:
            add(lid, digest, media_type, "fallback-tag")
    return sorted(found.values(), key=lambda h: (h.layout_id, h.how, h.digest))
