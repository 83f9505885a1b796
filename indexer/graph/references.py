"""What a layout references, from ``index.json`` through its indexes and manifests, and its graph:
what its ``blobs/`` holds beside what it references."""

from __future__ import annotations

from indexer import reference
from indexer._record import Record
from indexer.errors import BlobError
from indexer.graph.blobdirs import BlobDirs
from indexer.graph.keys import Known, Shape, graph_key, manifest_shape, unpack_pairs
from indexer.graph.manifests import (
    ATTESTATION_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    REFERENCE_DIGEST,
    REFERENCE_TYPE,
    ImageConfig,
    Manifest,
    parse_index_head,
    read_config,
    read_manifest,
)
from indexer.layout import DEFAULT_LIMITS, Child, Entry, Limits, Snapshot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Container


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
