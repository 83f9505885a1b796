"""The content graph: image manifests and configs read from a layout's ``blobs/``.

The parsing is pure (:func:`parse_manifest`, :func:`parse_config` take bytes); blobs are read by
:func:`indexer.layout.read_blob`, the one way to read a blob (digest validated before it becomes a
path, containment in the layout, size bounds, hash check). Standard library only: read-through
lookups use it.

This package is the public face of the graph (its ``__all__``); each part lives in one module, with
the choices it makes where the OCI image specification is silent (docs/semantics.md restates them
for users):

* :mod:`indexer.graph.manifests`: manifests and configs parsed, and read from ``blobs/``.
* :mod:`indexer.graph.keys`: graph keys, packed pairs, and what a pass keeps of what it read
  (:class:`Shape`, :class:`Known`).
* :mod:`indexer.graph.blobdirs`: what a layout's ``blobs/`` holds (:class:`BlobDirs`).
* :mod:`indexer.graph.references`: what a layout references (:func:`reach`), and its whole graph
  (:func:`read_layout_graph`).

Code outside the package imports these names from ``indexer.graph``.
"""

from __future__ import annotations

from indexer.graph.blobdirs import BlobDirs
from indexer.graph.keys import Known, Shape, graph_key, hex_keys, manifest_shape, pack_pairs, unpack_pairs
from indexer.graph.manifests import (
    ATTESTATION_MANIFEST,
    DOCKER_CONFIG,
    IMAGE_CONFIG_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_ARTIFACT_MANIFEST,
    OCI_CONFIG,
    REFERENCE_DIGEST,
    REFERENCE_TYPE,
    BlobRef,
    ImageConfig,
    Manifest,
    parse_config,
    parse_index_head,
    parse_manifest,
    read_config,
    read_manifest,
)
from indexer.graph.references import LayoutGraph, Reach, reach, read_layout_graph

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
