"""Build real OCI image layouts on disk for tests.

A :class:`Layout` writes ``oci-layout``, content-addressed blobs under
``blobs/sha256/`` and an ``index.json`` from a list of descriptors, the way
real writers do. Descriptors are plain dicts (what ends up in the JSON), so a
test can break any field on purpose::

    layout = Layout(tmp_path / "cache")
    amd64 = layout.manifest(platform=LINUX_AMD64)
    arm64 = layout.manifest(platform=LINUX_ARM64)
    index = layout.index([amd64, arm64])
    layout.write_index([named(index, ref="3.16", containerd="docker.io/library/alpine:3.16")])

Blobs are real: an image manifest points at a real config blob and a real
layer blob, so hashes and sizes always check out unless a test breaks them.
"""

from __future__ import annotations

import hashlib
import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

LINUX_AMD64 = {"architecture": "amd64", "os": "linux"}
LINUX_ARM64_V8 = {"architecture": "arm64", "os": "linux", "variant": "v8"}
LINUX_ARM64 = {"architecture": "arm64", "os": "linux"}
LINUX_ARM_V7 = {"architecture": "arm", "os": "linux", "variant": "v7"}
LINUX_ARM_V6 = {"architecture": "arm", "os": "linux", "variant": "v6"}
UNKNOWN_PLATFORM = {"architecture": "unknown", "os": "unknown"}  # BuildKit attestation manifests

Descriptor = dict[str, object]


def digest_of(data: bytes) -> str:
    """The sha256 digest string of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: object) -> bytes:
    """JSON bytes as Go writers produce them: compact, keys in order given."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def named(descriptor: Descriptor, *, ref: str | None = None, containerd: str | None = None, **more: str) -> Descriptor:
    """A copy of *descriptor* with name annotations (``ref.name``, ``io.containerd.image.name``) added."""
    annotations = dict(descriptor.get("annotations") or {})  # type: ignore[call-overload]
    if containerd is not None:
        annotations[CONTAINERD_NAME] = containerd
    if ref is not None:
        annotations[REF_NAME] = ref
    annotations.update(more)
    return {**descriptor, "annotations": annotations}


def with_platform(descriptor: Descriptor, platform: Mapping[str, object]) -> Descriptor:
    """A copy of *descriptor* with ``platform`` set."""
    return {**descriptor, "platform": dict(platform)}


class Layout:
    """An OCI image layout directory under construction."""

    def __init__(self, path: str | os.PathLike[str], *, oci_layout: bool = True) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
        if oci_layout:
            with open(os.path.join(self.path, "oci-layout"), "wb") as f:
                f.write(OCI_LAYOUT)
        self._count = 0

    @property
    def index_path(self) -> str:
        """``PATH/index.json``."""
        return os.path.join(self.path, "index.json")

    def blob_path(self, digest: str) -> str:
        """Where the blob of *digest* lives."""
        algorithm, _, encoded = digest.partition(":")
        return os.path.join(self.path, "blobs", algorithm, encoded)

    def blob(self, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
        """Store *data* as a blob; its descriptor."""
        digest = digest_of(data)
        path = self.blob_path(digest)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def remove_blob(self, descriptor: Descriptor) -> None:
        """Delete a blob, as a partial export leaves it out."""
        os.remove(self.blob_path(str(descriptor["digest"])))

    def manifest(
        self,
        *,
        platform: Mapping[str, object] | None = None,
        label: str = "",
        docker: bool = False,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store a real image manifest (with its config and one layer blob); its descriptor.

        Every call makes a distinct image unless *label* repeats; *docker* uses
        Docker schema 2 media types. *platform* goes into the config and, as an
        index writer does, into the returned descriptor.
        """
        self._count += 1
        label = label or f"image-{self._count}"
        plat = dict(platform or LINUX_AMD64)
        config = canonical_json({**plat, "config": {"Labels": {"test.label": label}}, "rootfs": {"type": "layers"}})
        layer = self.blob(b"\x1f\x8b layer of " + label.encode(), DOCKER_LAYER if docker else OCI_LAYER)
        config_desc = self.blob(config, DOCKER_CONFIG if docker else OCI_CONFIG)
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        document: dict[str, object] = {"schemaVersion": 2, "mediaType": media_type}
        document["config"] = config_desc
        document["layers"] = [layer]
        if annotations:
            document["annotations"] = dict(annotations)
        descriptor = self.blob(canonical_json(document), media_type)
        if platform is not None:
            descriptor["platform"] = dict(platform)
        return descriptor

    def index(
        self,
        manifests: Iterable[Descriptor],
        *,
        docker: bool = False,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store a nested image index (or, with *docker*, a manifest list) blob; its descriptor."""
        media_type = DOCKER_LIST if docker else OCI_INDEX
        document: dict[str, object] = {"schemaVersion": 2, "mediaType": media_type, "manifests": list(manifests)}
        if annotations:
            document["annotations"] = dict(annotations)
        return self.blob(canonical_json(document), media_type)

    def multiarch(self, platforms: Iterable[Mapping[str, object]], *, docker: bool = False) -> Descriptor:
        """A nested index holding one fresh image per platform; its descriptor."""
        return self.index([self.manifest(platform=p, docker=docker) for p in platforms], docker=docker)

    def index_document(self, manifests: Iterable[Descriptor] | None, **extra: object) -> dict[str, object]:
        """The ``index.json`` document a writer would produce for *manifests*."""
        document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX}
        document["manifests"] = None if manifests is None else list(manifests)
        document.update(extra)
        return document

    def write_index(self, manifests: Iterable[Descriptor] | None, *, rename: bool = True, **extra: object) -> bytes:
        """Write ``index.json`` listing *manifests* (``None`` writes ``null``, as umoci does); its bytes.

        ``rename=True`` writes a temporary file and renames it over the old one
        (umoci, regclient); ``rename=False`` rewrites in place (skopeo, oras, crane).
        """
        data = canonical_json(self.index_document(manifests, **extra))
        self.write_index_bytes(data, rename=rename)
        return data

    def write_index_bytes(self, data: bytes, *, rename: bool = True) -> None:
        """Write raw bytes as ``index.json``."""
        if rename:
            tmp = self.index_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.index_path)
        else:
            with open(self.index_path, "wb") as f:
                f.write(data)

    def overwrite_index_at_start(self, data: bytes) -> None:
        """Write *data* at offset 0 without truncating: BuildKit's in-place rewrite, caught mid-way."""
        fd = os.open(self.index_path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


# -- one image by label, and the ways real writers replace index.json ---------------------------------


def image(label: str) -> Descriptor:
    """A manifest descriptor (its blob need not exist for tag lookups)."""
    data = f'{{"schemaVersion":2,"label":"{label}"}}'.encode()
    return {"mediaType": OCI_MANIFEST, "digest": digest_of(data), "size": len(data)}


def index_bytes(tag: str, label: str, **annotations: str) -> bytes:
    """An ``index.json`` naming one image *label* as *tag*."""
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [named(image(label), ref=tag, **annotations)]}
    return json.dumps(document, separators=(",", ":")).encode()


def make_layout(path: str, tag: str = "v1", label: str = "one") -> Layout:
    """A layout at *path* whose ``index.json`` names image *label* as *tag*."""
    lay = Layout(path)
    lay.write_index_bytes(index_bytes(tag, label))
    return lay


def rewrite_in_place(path: str, data: bytes) -> None:
    """BuildKit's and skopeo's way: open the existing file, write at 0, truncate the tail."""
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()


def replace_atomically(path: str, data: bytes) -> None:
    """umoci's and regclient's way: a temporary file beside it, renamed over it."""
    tmp = os.path.join(os.path.dirname(path), f".index.json.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def churn_corpus(root: str, count: int) -> dict[str, dict[str, object]]:
    """*count* layouts, each with a fixed ``:latest`` and a ``:churn`` that flips between two images.

    Returns, per layout path, ``latest`` (its digest), ``churn`` (the two digests) and
    ``documents`` (the two ``index.json`` texts); the first document is written.
    """
    out: dict[str, dict[str, object]] = {}
    for i in range(count):
        layout = Layout(os.path.join(root, f"churn-{i:04d}"))
        latest = named(layout.manifest(platform=LINUX_AMD64, label=f"latest{i}"), ref="latest")
        flips = [named(layout.manifest(platform=LINUX_AMD64, label=f"churn{i}-{j}"), ref="churn") for j in range(2)]
        texts = [json.dumps(layout.index_document([latest, flip]), separators=(",", ":")) for flip in flips]
        layout.write_index_bytes(texts[0].encode())
        out[os.path.realpath(layout.path)] = {
            "latest": latest["digest"],
            "churn": [f["digest"] for f in flips],
            "documents": texts,
        }
    return out


# -- content graphs: images with configs and layers, referrers ---------------------------------------


def document(layout: Layout, descriptor: Descriptor) -> dict[str, Any]:
    with open(layout.blob_path(str(descriptor["digest"])), "rb") as f:
        found: dict[str, Any] = json.load(f)
    return found


def built_image(layout: Layout, platform: Mapping[str, object], label: str, layers: list[bytes]) -> Descriptor:
    """An image with a config saying *platform* and ``created``, and the given layers."""
    config = layout.blob(
        canonical_json({**platform, "created": "2025-03-04T05:06:07Z", "config": {"Labels": {"l": label}}}),
        OCI_CONFIG,
    )
    descriptors = [layout.blob(data, OCI_LAYER) for data in layers]
    return layout.blob(
        canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": descriptors}),
        OCI_MANIFEST,
    )


def referrer(layout: Layout, subject: Descriptor, artifact_type: str, payload: bytes, **notes: str) -> Descriptor:
    """An OCI 1.1 referrer (a signature, an SBOM) of *subject*."""
    empty = layout.blob(b"{}", "application/vnd.oci.empty.v1+json")
    document_ = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty,
        "layers": [layout.blob(payload, artifact_type)],
        "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
    }
    if notes:
        document_["annotations"] = notes
    return layout.blob(canonical_json(document_), OCI_MANIFEST)
