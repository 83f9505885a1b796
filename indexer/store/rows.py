"""The rows of one read layout as stored: computed where it was read (a worker process, or a
read-through lookup), compact plain tuples with their JSON already encoded and their row keys taken.

Entry rows are keyed by a hash of their content (:func:`_row_key`), which is what lets a write diff
a layout's rows instead of rewriting them (:mod:`indexer.store.write`).
"""

from __future__ import annotations

import json
import sys

from indexer.errors import printable
from indexer.graph import graph_key, manifest_shape, pack_pairs, unpack_pairs
from indexer.store import read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from indexer.graph import BlobRef, Known, LayoutGraph
    from indexer.layout import Child, Platform, Snapshot


_platform_json: dict[tuple[object, ...], str] = {}


def platform_json(platform: Platform | None) -> str | None:
    """The stored form of a platform: the JSON of ``Platform.to_json()``, or NULL (cached: few distinct)."""
    if platform is None:
        return None
    key = (platform.os, platform.architecture, platform.variant, platform.os_version, platform.os_features)
    text = _platform_json.get(key)
    if text is None:
        if len(_platform_json) > 4096:
            _platform_json.clear()
        text = _platform_json[key] = json.dumps(platform.to_json(), sort_keys=True)
    return text


def _sorted_encoder() -> Callable[[dict[str, str]], str]:
    """``json.dumps(value, sort_keys=True)`` for a dict of strings, without its per-call set-up.

    ``JSONEncoder.encode`` builds a new C encoder on every call, half the cost of encoding a
    descriptor's annotations (measured: 1.6 µs against 0.9 µs); this builds json's C encoder once,
    with the same separators and escaping (ASCII), and no circular-reference check (a parsed
    annotations object holds only strings). Without the C accelerator, the plain encoder.
    """
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(sort_keys=True).encode
    once = make(None, None, encoder.encode_basestring_ascii, None, ": ", ", ", True, False, True)

    def encode(value: dict[str, str]) -> str:
        return "".join(once(value, 0))

    return encode


_encode_sorted = _sorted_encoder()


def _annotations_json(annotations: dict[str, str]) -> str:
    return _encode_sorted(annotations) if annotations else "{}"


if TYPE_CHECKING:
    # What one read layout crosses the process boundary as (plain tuples pickle compactly):
    # (identity (dev, ino, size, mtime_ns, ctime_ns), content_hash, warnings, entries, names, children,
    # depends (read.encode_depends), mnt_id);
    # an entry (row_key, position, digest, media_type, size, platform, annotations, invalid_names, warnings),
    # a name (entry's index in entries, name, tag, how), a child (entry's index in entries, position,
    # parent, depth, digest, media_type, size, platform, annotations); JSON columns already encoded.
    EntryRow = tuple[str, int, str, str, int, str | None, str, str | None, str | None]
    NameRow = tuple[int, str, str, str]
    ChildRow = tuple[int, int, str, int, str, str, int, str | None, str]
    # The content graph of one layout (:func:`graph_rows`), or None when it was not read:
    # (presence, layout_graph row, graph hash, shared rows, claims). Presence: (first directory's name,
    # dev, ino, mtime_ns, ctime_ns, further directories as JSON, blobs/ itself as JSON, listed_ns, the
    # latest mtime or ctime of any directory listed). The layout_graph row: (complete, referenced
    # blobs, referenced bytes, missing blobs, unreferenced blobs, unreferenced bytes, missing, held:
    # the graph keys of the missing blobs, and of the held ones with their sizes, packed as int64s).
    # Shared rows: (manifests, layer_users, configs, attestations) rows, each only the first time its
    # worker sent it in a pass; claims: the graph keys of the manifests and configs this layout
    # references whose rows that worker sent before (with another layout; configs' negated less one).
    PresenceRow = tuple[str, int | None, int | None, int | None, int | None, str | None, str | None, int, int]
    LayoutGraphRow = tuple[int, int, int, int, int, int, bytes | None, bytes]
    SharedRows = tuple[
        list[tuple[object, ...]], list[tuple[int, int]], list[tuple[object, ...]], list[tuple[object, ...]]
    ]
    GraphRows = tuple[PresenceRow, LayoutGraphRow, str, SharedRows, list[int]]
    LayoutRows = tuple[
        tuple[int, int, int, int, int],
        str,
        tuple[str, ...],
        list[EntryRow],
        list[NameRow],
        list[ChildRow],
        GraphRows | None,
        str | None,
        int | None,
    ]


def layers_json(layers: tuple[BlobRef, ...]) -> str:
    """A manifest's layers as ``manifests.layers`` holds them: ``[digest, size, mediaType, 1]``, the
    media type left out when it is the previous layer's and the last item only for an external one."""
    items: list[list[object]] = []
    previous = None
    for layer in layers:
        item: list[object] = [layer.digest, layer.size]
        if layer.media_type != previous or layer.external:
            item.append(layer.media_type)
        if layer.external:
            item.append(1)
        previous = layer.media_type
        items.append(item)
    return json.dumps(items, separators=(",", ":"))


def graph_rows(graph: LayoutGraph, known: Known | None = None) -> GraphRows:
    """The rows of one layout's content graph as stored (in a parsing worker, or here).

    The shared rows are those of the manifests, indexes and configs parsed for *graph*: each goes
    into *known* (what this process sent in this pass, :class:`~indexer.graph.Known`), so that a
    later layout holding it claims it (``graph.claims``) instead of reading it again.
    """
    from array import array

    found = graph.reach
    # Presence: every blobs/ALG listed, and blobs/ itself when a referenced algorithm has no
    # directory (its creation is then a change) or blobs/ is absent; the first one in columns.
    alg_dirs = [ident for ident in graph.identities if ident[0] != "blobs"]
    root = next((ident for ident in graph.identities if ident[0] == "blobs"), None)
    proof: list[tuple[str, int | None, int | None, int | None, int | None]] = list(alg_dirs)
    if root is None:
        proof = [("blobs", None, None, None, None)]
    else:
        listed = {name.removeprefix("blobs/") for name, *_ in alg_dirs}
        if not alg_dirs or graph.dirs_refused or found.algorithms - listed:
            proof.insert(0, root)
    first, more = proof[0], proof[1:]
    changed = max((max(ident[3], ident[4]) for ident in graph.identities), default=0)
    presence: PresenceRow = (
        *first,
        json.dumps([list(ident) for ident in more]) if more else None,
        json.dumps(list(root[1:])) if root is not None else None,
        graph.listed_ns,
        changed,
    )
    refs, present, unreferenced = found.refs, graph.present, graph.unreferenced
    held_refs = sorted([key for key in refs if key in present])
    held_other = sorted(unreferenced)
    sizes = array("q", [refs[key] for key in held_refs] + [unreferenced[key] for key in held_other])
    if sys.byteorder != "little":
        sizes.byteswap()
    held = pack_pairs(held_refs + held_other) + sizes.tobytes()
    missing = pack_pairs(graph.missing) if graph.missing else None
    figures = (
        int(graph.complete),
        len(held_refs),
        sum(refs[key] for key in held_refs),
        len(graph.missing),
        len(held_other),
        sum(unreferenced.values()),
    )
    layout_row: LayoutGraphRow = (*figures, missing, held)
    import hashlib

    graph_hash = hashlib.blake2b(repr(figures).encode() + (missing or b"") + b"|" + held, digest_size=16).hexdigest()
    manifests: list[tuple[object, ...]] = []
    layer_users: list[tuple[int, int]] = []
    configs: list[tuple[object, ...]] = []
    attestations: list[tuple[object, ...]] = []
    for digest, image_config in graph.configs.items():
        key = graph_key(digest)
        if known is not None:
            known.configs[key] = image_config.warnings
        platform = image_config.platform
        configs.append(
            (
                key,
                digest,
                platform.os if platform is not None else None,
                platform.architecture if platform is not None else None,
                (platform.variant or None) if platform is not None else None,
                (platform.os_version or None) if platform is not None else None,
                json.dumps(list(platform.os_features)) if platform is not None and platform.os_features else None,
                image_config.created,
                json.dumps(list(image_config.warnings)) if image_config.warnings else None,
            )
        )
    shapes = found.shapes
    for manifest in (*found.manifests.values(), *graph.indexes.values()):
        key = graph_key(manifest.digest)
        config, layers = manifest.config, manifest.layers
        shape = shapes.get(manifest.digest) or manifest_shape(manifest)
        if known is not None:
            if shape.config is not None and graph_key(shape.config) in known.configs:
                shape = shape._replace(config=None)  # its config's row is sent: no need of its digest
            known.manifests[key] = shape
        keys = unpack_pairs(shape.pairs)  # the config's key and size first, then each layer's
        manifests.append(
            (
                key,
                manifest.digest,
                manifest.kind,
                manifest.media_type,
                manifest.size,
                manifest.artifact_type,
                manifest.subject,
                _annotations_json(manifest.annotations) if manifest.annotations else None,
                config.digest if config is not None else None,
                keys[0] if config is not None else None,
                config.media_type if config is not None else None,
                config.size if config is not None else None,
                layers_json(layers) if manifest.kind == "manifest" else None,
                len(layers) if manifest.kind == "manifest" else None,
                manifest.image_size,
                int(manifest.complete),
                json.dumps(list(manifest.warnings)) if manifest.warnings else None,
            )
        )
        if layers:
            layer_users.extend((layer_key, key) for layer_key in dict.fromkeys(keys[2::2] if config else keys[::2]))
    for index, digest, target in graph.attestations:
        if index in graph.indexes:  # they go with the index's row, once
            attestations.append((graph_key(target), graph_key(index), digest, target))
    return presence, layout_row, graph_hash, (manifests, layer_users, configs, attestations), list(graph.claims)


def snapshot_rows(snapshot: Snapshot, graph: LayoutGraph | None = None, known: Known | None = None) -> LayoutRows:
    """The rows of *snapshot* (and its *graph*) as stored: row keys taken, JSON encoded (in a parsing
    worker, or here); *known* as :func:`graph_rows` takes it."""
    children_of: dict[int, list[Child]] = {}
    for child in snapshot.children:
        children_of.setdefault(child.entry_position, []).append(child)
    entries: list[EntryRow] = []
    names: list[NameRow] = []
    children: list[ChildRow] = []
    occurrences: dict[str, int] = {}  # identical descriptors are numbered: linear however many repeat
    for index, entry in enumerate(snapshot.entries):
        platform = platform_json(entry.platform)
        annotations = _annotations_json(entry.annotations)
        invalid = json.dumps(list(entry.invalid_names)) if entry.invalid_names else None
        warnings = json.dumps(list(entry.warnings)) if entry.warnings else None
        entry_names = [(n.name, n.tag, n.how) for n in entry.names]
        kids = children_of.get(entry.position)
        kid_rows = (
            [
                (
                    c.parent,
                    c.depth,
                    c.digest,
                    c.media_type,
                    c.size,
                    platform_json(c.platform),
                    _annotations_json(c.annotations),
                )
                for c in kids
            ]
            if kids
            else []
        )
        key = _row_key(
            (
                entry.digest,
                entry.media_type,
                entry.size,
                platform,
                annotations,
                entry_names,
                invalid,
                warnings,
                kid_rows,
            )
        )
        occurrence = occurrences.get(key, 0)
        occurrences[key] = occurrence + 1
        entries.append(
            (
                f"{key}#{occurrence}",
                entry.position,
                entry.digest,
                entry.media_type,
                entry.size,
                platform,
                annotations,
                invalid,
                warnings,
            )
        )
        if entry_names:
            names.extend((index, name, tag, how) for name, tag, how in entry_names)
        if kid_rows:
            children.extend(
                (index, i, parent, depth, digest, media_type, size, platform_text, annotations_text)
                for i, (parent, depth, digest, media_type, size, platform_text, annotations_text) in enumerate(kid_rows)
            )
    identity = snapshot.identity
    layout_warnings = snapshot.warnings if graph is None else (*snapshot.warnings, *graph.warnings)
    return (
        (identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns),
        snapshot.content_hash,
        tuple(dict.fromkeys(printable(w) for w in layout_warnings)),
        entries,
        names,
        children,
        graph_rows(graph, known) if graph is not None else None,
        read.encode_depends(snapshot.depends),
        snapshot.mnt_id,
    )


def _row_key(stored: tuple[object, ...]) -> str:
    """A hash of everything stored for one entry (its columns, names and children, JSON already
    encoded); ``repr`` of plain strings and numbers is exact and cheaper than encoding them again."""
    import hashlib

    return hashlib.blake2b(repr(stored).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
