"""A generator of realistic OCI image layout trees, deterministic from a seed.

Every layout is written the way real writers leave it: ``oci-layout``, an
``index.json`` whose entries carry each writer's own name annotations
(the writers README.md lists), and nested image indexes under ``blobs/sha256`` with the
child manifests they list:

* **containerd / nerdctl / docker save**: ``io.containerd.image.name`` with the
  full name plus the tag in ``org.opencontainers.image.ref.name`` (sometimes
  ``TAG@sha256:...``, and the older digest-only ``@sha256:...``);
* **skopeo / buildah**: ``ref.name`` exactly as typed: familiar
  (``alpine:3.16``), full (``docker.io/library/alpine:3.16``,
  ``localhost:5000/team/app:v2``) or a bare tag;
* **podman save**: full names (``docker.io/library/x:latest``, ``localhost/img:latest``);
* **crane --annotate-ref**: ``index.docker.io/...``;
* **umoci, oras, regclient, buildx cache**: the tag only;
* **BuildKit tar=false before 2025**: a comma-joined list of names;
* unnamed entries (cache records, attestations).

A writer never leaves two entries with the same name annotation in one layout
(skopeo, umoci and containerd replace the old one), but two entries of
different repositories may share a tag, as in real multi-writer layouts.

Multi-platform images are nested indexes (OCI index or Docker manifest list)
with ``linux/amd64``, ``linux/arm64/v8`` and ``linux/arm/v7`` children (a few
with ``windows/amd64`` and its ``os.version``), some with BuildKit attestation
manifests. Image content is a function of (repository, tag, build): popular
images are byte-identical across layouts, as they are on a real build host, so
their digests repeat (75% of picks are an image's shared build).

Layouts are content graphs (the default): every blob a real writer leaves is
written, as valid content-addressed storage (every blob hashes to its name):

* every manifest, single-platform entries' too, with its config (os,
  architecture, variant, os.version, ``created``, rootfs diff_ids, history)
  and its layers: a base image's (Alpine, Debian, Ubuntu, distroless, and
  bases built on them: python-slim on debian-slim, ...; each rebuilt a few
  times), dependency layers shared by the builds that did not change them, and
  the application's own; about 6 per image, most a few MB, many tiny, a few
  hundreds of MB. Layers up to 16 KiB are real bytes; bigger ones are sparse
  files of zeros whose size is the descriptor's (``du``/``gc`` stat them; their
  digest is that of their zeros, so a 10,000-layout tree holds tens of TB by
  size in a few GB of disk);
* Docker images converted to OCI by skopeo/podman (a new manifest, the same
  config and layers);
* referrers for about 10% of images: OCI 1.1 manifests with ``subject`` and
  ``artifactType`` (cosign bundles, notation signatures, SPDX/CycloneDX SBOMs,
  and the older form that says its type with the config's media type) listed
  unnamed in ``index.json``; cosign's ``sha256-HEX.sig``/``.att``/``.sbom``
  tags; the OCI fallback tag ``sha256-HEX`` on an index listing referrers; and
  the BuildKit attestation manifests inside multi-platform indexes;
* partial exports (15% of layouts) missing child manifests (a single-platform
  export), rarely a nested index, or layers never fetched;
* about 20% more blobs than the referenced ones held, that nothing references:
  earlier builds' manifests, configs and layers, layers first (what a writer
  that replaces ``index.json`` entries without collecting garbage leaves).

With ``graph=False`` (``--no-graph``) layouts hold ``index.json`` and nested
indexes with their child manifests only, byte for byte the corpus from before
the content graph.

Generation is deterministic: the same seed gives the same bytes, file for
file (each layout draws from its own ``random.Random(f"{seed}:{kind}:{n}")``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
CREATED = "org.opencontainers.image.created"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64_V8 = {"architecture": "arm64", "os": "linux", "variant": "v8"}
ARM_V7 = {"architecture": "arm", "os": "linux", "variant": "v7"}
UNKNOWN = {"architecture": "unknown", "os": "unknown"}

LAYOUTS_PER_GROUP = 100
MEAN_NAMES = 20.0

# Writers, with the share of layouts each one mainly wrote.
WRITERS: tuple[tuple[str, float], ...] = (
    ("containerd", 0.30),
    ("skopeo", 0.22),
    ("tag-only", 0.20),
    ("podman", 0.10),
    ("crane", 0.06),
    ("buildkit-list", 0.04),
    ("mixed", 0.08),
)
_WRITER_NAMES = tuple(w for w, _ in WRITERS)
_WRITER_WEIGHTS = tuple(p for _, p in WRITERS)

_HUB_OFFICIAL = (
    "alpine",
    "ubuntu",
    "debian",
    "busybox",
    "nginx",
    "python",
    "golang",
    "node",
    "redis",
    "postgres",
    "httpd",
    "mysql",
    "mariadb",
    "memcached",
    "rabbitmq",
    "traefik",
    "haproxy",
    "eclipse-temurin",
    "openjdk",
    "ruby",
    "php",
    "rust",
    "caddy",
    "registry",
)
_HUB_USERS = ("bitnami/redis", "bitnami/postgresql", "grafana/grafana", "prom/prometheus", "moby/buildkit")
_SUITES = ("bookworm", "bullseye", "jammy", "noble", "alpine", "slim", "alpine3.19")


@dataclass(frozen=True)
class Repo:
    """A repository: its registry domain and path, canonical as ``ParseNormalizedNamed`` gives it."""

    domain: str
    path: str

    @property
    def canonical(self) -> str:
        """``docker.io/library/alpine``."""
        return f"{self.domain}/{self.path}"

    @property
    def hub(self) -> bool:
        """Whether this is a Docker Hub repository (it has a familiar short form)."""
        return self.domain == "docker.io"

    def familiar(self) -> str:
        """``alpine``, ``bitnami/redis``, or the full name for other registries."""
        if not self.hub:
            return self.canonical
        return self.path.removeprefix("library/")


def _repo_pool() -> tuple[Repo, ...]:
    repos = [Repo("docker.io", f"library/{name}") for name in _HUB_OFFICIAL]
    repos += [Repo("docker.io", path) for path in _HUB_USERS]
    repos += [Repo("docker.io", f"team{k}/app{j}") for k in range(20) for j in range(15)]
    repos += [Repo("ghcr.io", f"org{k}/svc{j}") for k in range(40) for j in range(10)]
    repos += [Repo("quay.io", f"org{k}/proj{j}") for k in range(20) for j in range(10)]
    repos += [Repo("registry.example.com:5000", f"group{k}/svc{j}") for k in range(30) for j in range(10)]
    repos += [Repo("localhost:5000", f"team/app{j}") for j in range(100)]
    repos += [Repo("localhost", f"img{j}") for j in range(100)]
    return tuple(repos)


REPOS = _repo_pool()
# Zipf-like popularity: the official images come first and are pulled far more often.
_REPO_WEIGHTS = tuple(1.0 / (rank + 1) ** 0.9 for rank in range(len(REPOS)))
_REPO_CUM = tuple(itertools.accumulate(_REPO_WEIGHTS))


def _stable_int(*parts: object) -> int:
    material = "\0".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


@functools.cache
def repo_tags(repo: Repo) -> tuple[str, ...]:
    """The tags a repository has (stable: a function of its name only)."""
    r = random.Random(_stable_int("tags", repo.canonical))
    major = r.randrange(1, 20)
    tags = ["latest"]
    for _ in range(r.randrange(4, 12)):
        kind = r.random()
        minor, patch = r.randrange(0, 30), r.randrange(0, 15)
        if kind < 0.35:
            tags.append(f"{major}.{minor}")
        elif kind < 0.65:
            tags.append(f"{major}.{minor}.{patch}")
        elif kind < 0.75:
            tags.append(f"v{major}.{minor}.{patch}")
        elif kind < 0.85:
            tags.append(f"{major}.{minor}-{r.choice(_SUITES)}")
        elif kind < 0.92:
            tags.append(f"sha-{r.randrange(16**7):07x}")
        else:
            tags.append(r.choice(("main", "edge", "stable", "nightly", f"pr-{r.randrange(1, 4000)}")))
    return tuple(dict.fromkeys(tags))


def _canonical_json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fake_digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


@dataclass
class Image:
    """One image's top-level descriptor and the blobs that make it up (index and child manifests)."""

    descriptor: dict[str, object]
    blobs: dict[str, bytes]
    children: list[dict[str, object]] = field(default_factory=list)

    @property
    def nested(self) -> bool:
        """Whether the image is a nested index (multi-platform)."""
        return self.descriptor["mediaType"] in INDEX_TYPES


def _manifest(key: str, platform: dict[str, str] | None, docker: bool, *, layers: int) -> tuple[bytes, str]:
    media = DOCKER_MANIFEST if docker else OCI_MANIFEST
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": media}
    document["config"] = {
        "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
        "digest": _fake_digest("config", key),
        "size": 1200 + _stable_int("csize", key) % 4000,
    }
    document["layers"] = [
        {
            "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
            "digest": _fake_digest("layer", key, i),
            "size": 100_000 + _stable_int("lsize", key, i) % 40_000_000,
        }
        for i in range(layers)
    ]
    if platform is None and not docker and _stable_int("annot", key) % 3 == 0:
        document["annotations"] = {CREATED: "2024-05-01T12:00:00Z"}
    return _canonical_json(document), media


class ImageCache:
    """Images by (repository, tag, build): the same key always gives the same bytes.

    Graph images are kept for the most recently used *graph_limit* keys (they carry their configs
    and small layers); evicting one only costs building it again.
    """

    def __init__(self, graph_limit: int = 20_000) -> None:
        self._images: dict[tuple[str, str, int], Image] = {}
        self._graph: dict[tuple[str, str, int, bool, bool], GraphImage] = {}
        self._graph_limit = graph_limit

    def image(self, repo: str, tag: str, build: int) -> Image:
        """The image for this key, built once."""
        key = (repo, tag, build)
        found = self._images.get(key)
        if found is None:
            found = self._images[key] = _build_image(repo, tag, build)
        return found

    def graph_image(
        self, repo: str, tag: str, build: int, *, oci: bool = False, single: bool = False, keep: bool = True
    ) -> GraphImage:
        """The graph image for this key (*oci*: a Docker image converted to OCI; *single*: one platform);
        not kept when *keep* is false (an image seen once)."""
        oci = oci and _stable_int("image", f"{repo}:{tag}#{build}") % 10 < 4  # only Docker images convert
        key = (repo, tag, build, oci, single)
        found = self._graph.pop(key, None)
        if found is None:
            found = _build_graph_image(repo, tag, build, oci=oci, single=single)
            if not keep:
                return found
            if len(self._graph) >= self._graph_limit:
                del self._graph[next(iter(self._graph))]
        self._graph[key] = found
        return found


def _build_image(repo: str, tag: str, build: int) -> Image:
    key = f"{repo}:{tag}#{build}"
    h = _stable_int("image", key)
    docker = h % 10 < 4
    layers = 1 + (h >> 4) % 6
    if (h >> 8) % 100 < 30:
        platforms = [AMD64, ARM64_V8, ARM_V7] if (h >> 16) % 3 else [AMD64, ARM64_V8]
        attest = not docker and (h >> 20) % 4 == 0
        blobs: dict[str, bytes] = {}
        children: list[dict[str, object]] = []
        for platform in platforms:
            data, media = _manifest(f"{key}/{platform['architecture']}", platform, docker, layers=layers)
            digest = _digest(data)
            blobs[digest] = data
            children.append({"mediaType": media, "digest": digest, "size": len(data), "platform": dict(platform)})
        if attest:
            for child in list(children):
                data, media = _manifest(f"{key}/att/{child['digest']}", None, False, layers=1)
                digest = _digest(data)
                blobs[digest] = data
                children.append(
                    {
                        "mediaType": media,
                        "digest": digest,
                        "size": len(data),
                        "annotations": {
                            "vnd.docker.reference.digest": str(child["digest"]),
                            "vnd.docker.reference.type": "attestation-manifest",
                        },
                        "platform": dict(UNKNOWN),
                    }
                )
        media = DOCKER_LIST if docker else OCI_INDEX
        index = _canonical_json({"schemaVersion": 2, "mediaType": media, "manifests": children})
        digest = _digest(index)
        blobs = {digest: index, **blobs}
        return Image({"mediaType": media, "digest": digest, "size": len(index)}, blobs, children)
    data, media = _manifest(key, None, docker, layers=layers)
    descriptor: dict[str, object] = {"mediaType": media, "digest": _digest(data), "size": len(data)}
    if (h >> 24) % 2:
        descriptor["platform"] = dict(AMD64)
    return Image(descriptor, {str(descriptor["digest"]): data})


@dataclass
class LayoutModel:
    """One generated layout, before (or without) being written: index.json and the blobs present."""

    index: dict[str, object]
    blobs: dict[str, bytes]
    expected_names: int
    # (position, index digest, child descriptors, whether the index blob is present)
    nested: list[tuple[int, str, list[dict[str, object]], bool]] = field(default_factory=list)
    index_bytes: bytes = b""
    graph: bool = False
    partial: bool = False  # an export that left referenced blobs out
    referrers: int = 0  # entries that are referrers (subject, fallback tag, or a referrers tag index)
    sparse: dict[str, int] = field(default_factory=dict)  # big layers: digest -> size, all zeros
    unreferenced: set[str] = field(default_factory=set)  # blobs held that nothing references
    missing: set[str] = field(default_factory=set)  # blobs named by held content and not held

    @property
    def entries(self) -> int:
        """How many descriptors ``index.json`` lists."""
        manifests = self.index["manifests"]
        assert isinstance(manifests, list)
        return len(manifests)


def _pick_repo(rng: random.Random) -> Repo:
    x = rng.random() * _REPO_CUM[-1]
    lo, hi = 0, len(_REPO_CUM) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _REPO_CUM[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return REPOS[lo]


def _pick_tag(rng: random.Random, repo: Repo) -> str:
    tags = repo_tags(repo)
    return "latest" if rng.random() < 0.3 else rng.choice(tags)


def _annotations(
    writer: str, rng: random.Random, repo: Repo, tag: str, digest: str, extra: tuple[Repo, str] | None
) -> tuple[dict[str, str], int]:
    """The annotations *writer* leaves for (repo, tag), and how many names ocidx should read from them."""
    full = f"{repo.canonical}:{tag}"
    if writer == "containerd":
        roll = rng.random()
        notes = {f"containerd.io/distribution.source.{repo.domain}": repo.path} if rng.random() < 0.5 else {}
        if roll < 0.03:
            return {CONTAINERD_NAME: f"{repo.canonical}@{digest}", REF_NAME: f"@{digest}", **notes}, 1
        if roll < 0.10:
            return {CONTAINERD_NAME: full, REF_NAME: f"{tag}@{digest}", **notes}, 1
        return {CONTAINERD_NAME: full, REF_NAME: tag, **notes}, 1
    if writer == "skopeo":
        roll = rng.random()
        if roll < 0.4 and repo.hub:
            return {REF_NAME: f"{repo.familiar()}:{tag}"}, 1
        if roll < 0.7:
            return {REF_NAME: full}, 1
        return {REF_NAME: tag}, 1
    if writer == "podman":
        return {REF_NAME: full}, 1
    if writer == "crane":
        return {REF_NAME: f"index.docker.io/{repo.path}:{tag}" if repo.hub else full}, 1
    if writer == "buildkit-list":
        if extra is not None:
            other_repo, other_tag = extra
            return {REF_NAME: f"{full},{other_repo.canonical}:{other_tag}"}, 2
        return {REF_NAME: full}, 1
    return {REF_NAME: tag}, 1  # tag-only writers: umoci, oras, regclient, buildx cache


def _name_key(annotations: dict[str, str]) -> str:
    return annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME) or ""


def _entry_names(
    rng: random.Random, primary: str, repo: Repo, tag: str, digest: str, used: set[str]
) -> tuple[dict[str, str], int, str] | None:
    """An entry's annotations, how many names ocidx should read from them, and the writer that left
    them ("" when unnamed); ``None`` when the name is already in *used* (a writer replaces it)."""
    if rng.random() < 0.07:
        annotations: dict[str, str] = {}
        if rng.random() < 0.5:
            annotations[CREATED] = f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T00:00:00Z"
        return annotations, 0, ""
    writer = primary
    if primary == "mixed" or rng.random() < 0.15:
        writer = rng.choice(_WRITER_NAMES[:-1])
    extra = None
    if writer == "buildkit-list":
        extra = (repo, rng.choice(repo_tags(repo)))
    annotations, count = _annotations(writer, rng, repo, tag, digest, extra)
    if extra is not None and extra[1] == tag:
        annotations, count = {REF_NAME: f"{repo.canonical}:{tag}"}, 1
    key = _name_key(annotations)
    if key in used:
        return None
    used.add(key)
    return annotations, count, writer


def build_layout(
    seed: int | str,
    number: int,
    images: ImageCache,
    *,
    kind: str = "tree",
    names: int | None = None,
    graph: bool = True,
) -> LayoutModel:
    """Layout *number* of a tree generated from *seed* (about :data:`MEAN_NAMES` names, or *names*);
    with *graph* false, index.json and nested indexes only, as before the content graph."""
    if graph:
        return _build_graph_layout(seed, number, images, kind=kind, names=names)
    rng = random.Random(f"{seed}:{kind}:{number}")
    if names is None:
        # Lognormal: many small layouts, a few large ones; the mean is MEAN_NAMES.
        names = max(1, min(400, round(rng.lognormvariate(2.676, 0.8))))
    primary = rng.choices(_WRITER_NAMES, _WRITER_WEIGHTS)[0]
    partial_export = rng.random() < 0.15
    manifests: list[dict[str, object]] = []
    blobs: dict[str, bytes] = {}
    nested: list[tuple[int, str, list[dict[str, object]], bool]] = []
    used: set[str] = set()
    got = 0
    attempts = 0
    while got < names and attempts < names * 20:
        attempts += 1
        repo = _pick_repo(rng)
        tag = _pick_tag(rng, repo)
        build = 0 if rng.random() < 0.75 else rng.randrange(1 << 30)
        image = images.image(repo.canonical, tag, build)
        descriptor = dict(image.descriptor)
        named = _entry_names(rng, primary, repo, tag, str(descriptor["digest"]), used)
        if named is None:
            continue
        annotations, count, _writer = named
        if annotations:
            descriptor["annotations"] = annotations
        position = len(manifests)
        manifests.append(descriptor)
        got += count
        present = dict(image.blobs)
        if image.nested:
            index_present = True
            if partial_export and rng.random() < 0.5:
                for child in image.children[1:]:
                    if rng.random() < 0.5:
                        present.pop(str(child["digest"]), None)
                if rng.random() < 0.1:
                    present.pop(str(descriptor["digest"]), None)
                    index_present = False
            nested.append((position, str(descriptor["digest"]), image.children, index_present))
        else:
            present.clear()  # single-platform manifest blobs are not written (ocidx never reads them)
        blobs.update(present)
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    model = LayoutModel(document, blobs, got, nested)
    model.index_bytes = _canonical_json(document)
    return model


def build_huge_layout(
    seed: int | str, entries: int, images: ImageCache, *, target_tag: str, graph: bool = True
) -> LayoutModel:
    """One layout of *entries* entries (a CI cache or registry mirror), the last one tagged *target_tag*;
    with *graph*, every image's blobs are held (no referrers, no garbage)."""
    rng = random.Random(f"{seed}:huge:{entries}")
    manifests: list[dict[str, object]] = []
    blobs: dict[str, bytes] = {}
    nested: list[tuple[int, str, list[dict[str, object]], bool]] = []
    used: set[str] = set()
    content = _LayoutContent()
    names = 0
    for number in range(entries - 1):
        repo = _pick_repo(rng)
        roll = rng.random()
        if roll < 0.5:
            tag = f"build-{number}"
        elif roll < 0.8:
            tag = f"sha-{rng.randrange(16**12):012x}"
        else:
            tag = _pick_tag(rng, repo)
        build = 0 if tag in repo_tags(repo) else number
        cached = rng.random() < 0.1
        graph_image = None
        if graph:
            graph_image = (
                images.graph_image(repo.canonical, tag, build)
                if cached
                else images.graph_image(repo.canonical, tag, number, single=True, keep=False)
            )
            descriptor = dict(graph_image.descriptor)
        else:
            image = images.image(repo.canonical, tag, build) if cached else _single(repo, tag, number)
            descriptor = dict(image.descriptor)
        writer = rng.choice(("skopeo", "tag-only", "containerd", "podman"))
        annotations, count = _annotations(writer, rng, repo, tag, str(descriptor["digest"]), None)
        key = _name_key(annotations)
        if key in used:
            annotations, count = {REF_NAME: f"{repo.canonical}:build-{number}"}, 1
        used.add(_name_key(annotations))
        descriptor["annotations"] = annotations
        names += count
        if graph_image is not None:
            content.place(graph_image, rng, False)
            if graph_image.nested:
                nested.append((len(manifests), str(descriptor["digest"]), graph_image.children, True))
        elif image.nested:
            nested.append((len(manifests), str(descriptor["digest"]), image.children, True))
            blobs.update(image.blobs)
        manifests.append(descriptor)
    if graph:
        graph_target = images.graph_image(REPOS[0].canonical, target_tag, -1, single=True, keep=False)
        descriptor = dict(graph_target.descriptor)
        content.place(graph_target, rng, False)
    else:
        target = _single(REPOS[0], target_tag, -1)
        descriptor = dict(target.descriptor)
        blobs.update(target.blobs)  # skopeo inspect --raw reads this manifest
    descriptor["annotations"] = {REF_NAME: target_tag}
    manifests.append(descriptor)
    names += 1
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    model = LayoutModel(document, blobs, names, nested, graph=graph)
    model.index_bytes = _canonical_json(document)
    _hold_blobs(model, content.present.values())
    return model


def _single(repo: Repo, tag: str, number: int) -> Image:
    data, media = _manifest(f"{repo.canonical}:{tag}#{number}", None, False, layers=1 + number % 4)
    return Image({"mediaType": media, "digest": _digest(data), "size": len(data)}, {_digest(data): data})


# -- the content graph -------------------------------------------------------------------------
#
# Graph layouts (the default) hold every blob a real writer leaves: each manifest, single-platform
# entries' too, with its config and layers; referrers; the blobs of earlier builds nothing
# references any more. What follows builds them; build_layout assembles a layout from them.

GRAPH_VERSION = 2  # bumped whenever graph layouts' bytes change (the runner names its trees after it)
SMALL_LAYER_MAX = 16 * 1024  # layers up to this size are real bytes; larger ones are sparse files of zeros
REFERRER_SHARE = 0.06  # images with referrers outside themselves (BuildKit attestations come on top)
REFERRERS_KEPT = 0.8  # how often a layout holding an image holds its referrers too
GARBAGE_SHARE = 0.2  # unreferenced blobs per layout, as a share of the referenced blobs it holds
GARBAGE_AGE_NS = 86_400 * 10**9  # garbage is older than the live blobs (by a day) when mtimes are set

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
IN_TOTO = "application/vnd.in-toto+json"
COSIGN_SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
NOTARY_SIGNATURE = "application/vnd.cncf.notary.signature"
SPDX = "application/spdx+json"
CYCLONEDX = "application/vnd.cyclonedx+json"
SARIF = "application/sarif+json"
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
PREDICATE_TYPE = "in-toto.io/predicate-type"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = _digest(EMPTY_JSON)
WINDOWS = {"architecture": "amd64", "os": "windows", "os.version": "10.0.20348.2227"}

_GZIP_MAGIC = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZERO_STEP = 16 * 1024
_ZERO_CHUNK = bytes(_ZERO_STEP)
_EPOCH = 1_672_531_200  # 2023-01-01T00:00:00Z
_DAY = 86_400


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob of a graph layout: its bytes, or ``None`` for a big layer written as *size* zero bytes
    (a sparse file: its size is real, its disk use nothing)."""

    digest: str
    size: int
    data: bytes | None


def _blob(data: bytes) -> Blob:
    return Blob(_digest(data), len(data), data)


EMPTY_BLOB = _blob(EMPTY_JSON)


class _ZeroDigests:
    """The sha256 of N zero bytes for any N, from the hash states saved every 16 KiB of zeros: a big
    layer's digest costs at most 16 KiB of hashing, however big it is."""

    def __init__(self) -> None:
        self._states = [hashlib.sha256()]
        self._known: dict[int, str] = {}

    def digest(self, size: int) -> str:
        """``sha256:`` of *size* zero bytes."""
        found = self._known.get(size)
        if found is None:
            step, rest = divmod(size, _ZERO_STEP)
            states = self._states
            while len(states) <= step:
                state = states[-1].copy()
                state.update(_ZERO_CHUNK)
                states.append(state)
            state = states[step].copy()
            state.update(_ZERO_CHUNK[:rest])
            if len(self._known) >= 1_000_000:
                self._known.clear()
            found = self._known[size] = "sha256:" + state.hexdigest()
        return found


_ZEROS = _ZeroDigests()


def _layer_blob(key: str, size: int, zstd: bool) -> Blob:
    """Layer *key*'s blob: real bytes (a compressor's magic, then noise) when small, else a sparse file.

    Two big layers of the same size are the same blob. Sizes are drawn to the byte, which keeps that
    rare but not absent: in 2,000 layouts, 585 sizes were drawn for two of 84,000 distinct big layers
    (0.7%; most below 1 MB, where sizes are densest), which then count as one blob, shared."""
    if size > SMALL_LAYER_MAX:
        return Blob(_ZEROS.digest(size), size, None)
    magic = _ZSTD_MAGIC if zstd else _GZIP_MAGIC
    return _blob(magic + hashlib.shake_128(key.encode()).digest(max(0, size - len(magic))))


def _payload_blob(key: str, size: int) -> Blob:
    """A referrer's or attestation's payload: JSON-looking real bytes when small, else a sparse file."""
    if size > SMALL_LAYER_MAX:
        return Blob(_ZEROS.digest(size), size, None)
    noise = hashlib.shake_128(key.encode()).hexdigest(max(0, size - 14) // 2 + 1).encode()
    return _blob(b'{"payload":"' + noise[: max(0, size - 14)] + b'"}')


def _unit(h: int, slot: int) -> float:
    """The *slot*-th (0, 1 or 2) uniform draw in (0, 1) that the 64-bit hash *h* carries."""
    return (((h >> (21 * slot)) & 0x1FFFFF) + 0.5) / 0x200000


def _lognormal(h: int, median: float, sigma: float, low: int, high: int) -> int:
    """A lognormal size drawn from the hash *h* (Box-Muller on two of its draws), within [low, high].

    A draw beyond a bound lands at a byte-exact place near it, not on it: big layers of one size
    are one blob (all zeros), so sizes must stay as varied as the draws."""
    z = math.sqrt(-2.0 * math.log(_unit(h, 0))) * math.cos(2.0 * math.pi * _unit(h, 1))
    size = round(median * math.exp(sigma * z))
    if size < low:
        return low + round(low * _unit(h, 2))
    if size > high:
        return high - round(high * 0.1 * _unit(h, 2))
    return size


def _timestamp(seconds: int, nanos: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos % 1_000_000_000:09d}Z"


def _platform_key(platform: dict[str, str]) -> str:
    return "/".join(platform.get(k, "") for k in ("os", "architecture", "variant", "os.version"))


@dataclass(frozen=True, slots=True)
class _Layer:
    blob: Blob
    diff_id: str
    created_by: str
    created: int
    stamp: str  # created, as the config's history says it


def _new_layer(key: str, size: int, zstd: bool, created_by: str, created: int) -> _Layer:
    diff_id = _fake_digest("diff", key)
    stamp = _timestamp(created, int(diff_id[7:15], 16))
    return _Layer(_layer_blob(key, size, zstd), diff_id, created_by, created, stamp)


# Base images: (parent, the compressed sizes of its own layers for linux/amd64, share of images on it).
# A base is rebuilt BASE_VERSIONS times (new layer digests each time); images built on the same
# version share its layers, as every image FROM python:3.12-slim shares Debian's.
_BASES: dict[str, tuple[str | None, tuple[int, ...], float]] = {
    "scratch": (None, (), 0.03),
    "alpine": (None, (3_420_000,), 0.21),
    "busybox": (None, (2_150_000,), 0.03),
    "debian": (None, (49_560_000,), 0.10),
    "debian-slim": (None, (29_150_000,), 0.14),
    "ubuntu": (None, (29_750_000,), 0.11),
    "distroless": (None, (103_900, 21_200, 536, 68, 440, 122, 5_300, 129_400), 0.06),
    "python-slim": ("debian-slim", (3_510_000, 12_590_000, 250, 3_120_000), 0.10),
    "node-alpine": ("alpine", (42_300_000, 1_390_000, 450), 0.07),
    "golang": ("debian", (24_050_000, 64_150_000, 92_300_000, 126), 0.05),
    "temurin": ("ubuntu", (17_460_000, 53_900_000, 160, 2_280), 0.05),
    "nginx": ("debian-slim", (41_810_000, 628, 956, 405, 1_210, 1_400), 0.05),
    "nanoserver": (None, (121_300_000,), 0.0),  # the base of every windows child
}
_BASE_NAMES = tuple(name for name, (_, _, share) in _BASES.items() if share)
_BASE_CUM = tuple(itertools.accumulate(_BASES[name][2] for name in _BASE_NAMES))
BASE_VERSIONS = 4
_BASE_COMMANDS = (
    "/bin/sh -c #(nop) ADD file:{hex} in / ",
    "RUN /bin/sh -c set -eux; apt-get update; apt-get install -y --no-install-recommends ca-certificates; "
    "rm -rf /var/lib/apt/lists/* # buildkit",
    "ENV LANG=C.UTF-8",
    'RUN /bin/sh -c set -eux; wget -O runtime.tar.gz "$URL"; tar -xzf runtime.tar.gz -C /usr/local # buildkit',
    "COPY docker-entrypoint.sh /usr/local/bin/ # buildkit",
)
_base_memo: dict[tuple[str, int, str, bool], tuple[_Layer, ...]] = {}


def _base_layers(name: str, version: int, platform_key: str, zstd: bool) -> tuple[_Layer, ...]:
    """The layers of base *name* at *version* for one platform, its parent's first."""
    memo = (name, version, platform_key, zstd)
    found = _base_memo.get(memo)
    if found is None:
        parent, sizes, _share = _BASES[name]
        layers = list(_base_layers(parent, version, platform_key, zstd)) if parent else []
        created = _EPOCH + version * 90 * _DAY + _stable_int("base-created", name, version) % (30 * _DAY)
        for i, median in enumerate(sizes):
            key = f"base/{name}/{version}/{platform_key}/{i}/{int(zstd)}"
            size = max(32, round(median * (0.9 + 0.2 * _stable_int("jitter", key) / 2**64)))
            command = _BASE_COMMANDS[0 if not i and not parent else 1 + _stable_int("cmd", key) % 4]
            layers.append(_new_layer(key, size, zstd, command.format(hex=_fake_digest("file", key)[7:]), created + i))
        found = _base_memo[memo] = tuple(layers)
    return found


def _own_layers(repo: str, tag: str, build: int, platform_key: str, zstd: bool, base_version: int) -> list[_Layer]:
    """An image's layers above its base: dependencies (shared by the builds and tags that did not
    change them, as BuildKit's cache shares them) and the application's own (new every build)."""
    layers = []
    generation: object = _stable_int("deps-gen", repo, tag) % 3
    if build and _stable_int("deps-new", repo, tag, build) % 10 < 3:
        generation = f"b{build}"
    created = _EPOCH + _stable_int("created", repo, tag, build) % (3 * 365 * _DAY)
    for i in range(_stable_int("deps", repo) % 4):
        key = f"deps/{repo}/{generation}/{base_version}/{platform_key}/{i}/{int(zstd)}"
        size = _lognormal(_stable_int(key), 12e6, 1.2, 65_536, 1_200_000_000)
        command = f"RUN /bin/sh -c install dependencies, step {i + 1} # buildkit"
        layers.append(_new_layer(key, size, zstd, command, created + i))
    for i in range(1 + _stable_int("apps", repo) % 3):
        key = f"app/{repo}/{tag}/{build}/{platform_key}/{i}/{int(zstd)}"
        h = _stable_int(key)
        kind = (h >> 42) % 100
        if kind < 35:  # a config file, a mkdir, a chmod: 120 bytes to 8 KiB
            size = round(120 * (8192 / 120) ** _unit(h, 0))
        elif kind < 80:
            size = _lognormal(h, 300e3, 1.4, 4096, 200_000_000)
        else:
            size = _lognormal(h, 10e6, 1.0, 65_536, 1_200_000_000)
        command = f"COPY {'. /app' if i == 0 else f'config/{i} /etc/app/'} # buildkit"
        layers.append(_new_layer(key, size, zstd, command, created + 10 + i))
    return layers


def _config_bytes(platform: dict[str, str], created: str, layers: list[_Layer], repo: str, tag: str) -> bytes:
    """An image config as BuildKit writes it: platform, ``created``, rootfs diff_ids and history."""
    history: list[dict[str, object]] = [
        {
            "created": layer.stamp,
            "created_by": layer.created_by,
            "comment": "buildkit.dockerfile.v0",
        }
        for layer in layers
    ]
    history.extend(
        {"created": created, "created_by": command, "comment": "buildkit.dockerfile.v0", "empty_layer": True}
        for command in ("WORKDIR /app", f"ENV APP_VERSION={tag}", 'CMD ["/app/run"]')
    )
    document: dict[str, object] = {
        "architecture": platform["architecture"],
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"APP_VERSION={tag}"],
            "Cmd": ["/app/run"],
            "WorkingDir": "/app",
            "Labels": {
                "org.opencontainers.image.source": f"https://{repo}",
                "org.opencontainers.image.revision": _fake_digest("rev", repo, tag, created)[7:47],
                "org.opencontainers.image.version": tag,
            },
        },
        "created": created,
        "history": history,
        "os": platform["os"],
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    if "os.version" in platform:
        document["os.version"] = platform["os.version"]
    if "variant" in platform:
        document["variant"] = platform["variant"]
    return _canonical_json(document)


@dataclass(frozen=True)
class Referrer:
    """An image's referrer as a layout lists it: its ``index.json`` descriptor, the fallback tag naming
    it (``None`` when listed unnamed), the blobs it brings, and the referrers a tag index lists."""

    descriptor: dict[str, object]
    tag: str | None
    blobs: tuple[Blob, ...]
    children: list[dict[str, object]]

    @property
    def digest(self) -> str:
        """The digest of the listed manifest or index."""
        return str(self.descriptor["digest"])


@dataclass
class GraphImage:
    """One image of a graph layout: its top-level descriptor, its index blob (nested images), and per
    part (a platform's manifest, an attestation, or the single manifest) its descriptor in the index
    and the blobs it brings (manifest, config, layers); its referrers."""

    descriptor: dict[str, object]
    index: Blob | None
    parts: list[tuple[dict[str, object] | None, tuple[Blob, ...]]]
    referrers: list[Referrer]

    @property
    def nested(self) -> bool:
        """Whether the image is a nested index (multi-platform)."""
        return self.index is not None

    @property
    def children(self) -> list[dict[str, object]]:
        """The descriptors its index lists."""
        return [descriptor for descriptor, _ in self.parts if descriptor is not None]

    def blobs(self) -> list[Blob]:
        """Every blob of the image, its index first; referrers not included."""
        out = [self.index] if self.index is not None else []
        for _, blobs in self.parts:
            out.extend(blobs)
        return out


def _descriptor(media_type: str, blob: Blob, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size, **extra}


def _manifest_blob(
    media_type: str, config_type: str, config: Blob, layers: list[dict[str, object]], **extra: object
) -> Blob:
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": media_type}
    if "artifactType" in extra:
        document["artifactType"] = extra.pop("artifactType")
    document["config"] = _descriptor(config_type, config)
    document["layers"] = layers
    document.update(extra)
    return _blob(_canonical_json(document))


def _platform_manifest(
    repo: str, tag: str, build: int, platform: dict[str, str], *, docker: bool, oci: bool, zstd: bool, single: bool
) -> tuple[Blob, tuple[Blob, ...], str]:
    """One platform's manifest, the blobs it brings (manifest, config, layers), and its media type.

    *docker* is the format the image was built in; *oci* converts it as ``skopeo copy --format oci``
    does (new manifest, the same config and layer blobs)."""
    key = f"{repo}:{tag}#{build}"
    platform_key = _platform_key(platform)
    if platform["os"] == "windows":
        base, version = "nanoserver", _stable_int("winver", key) % BASE_VERSIONS
    else:
        x = (_stable_int("base", repo) % 10_000) / 10_000 * _BASE_CUM[-1]
        base = _BASE_NAMES[next(i for i, cum in enumerate(_BASE_CUM) if x < cum)]
        version = _stable_int("base-version", repo, tag, build) % BASE_VERSIONS
    layers = [
        *_base_layers(base, version, platform_key, zstd),
        *_own_layers(repo, tag, build, platform_key, zstd, version),
    ]
    created_s = max(layer.created for layer in layers) + 60 if layers else _EPOCH
    created = _timestamp(created_s, _stable_int("created", key, platform_key))
    config = _blob(_config_bytes(platform, created, layers, repo, tag))
    as_docker = docker and not oci
    layer_type = DOCKER_LAYER if as_docker else OCI_LAYER_ZSTD if zstd else OCI_LAYER
    media_type = DOCKER_MANIFEST if as_docker else OCI_MANIFEST
    config_type = DOCKER_CONFIG if as_docker else OCI_CONFIG
    extra: dict[str, object] = {}
    if single and not docker and _stable_int("annot", key) % 3 == 0:
        extra["annotations"] = {CREATED: created}
    manifest = _manifest_blob(
        media_type, config_type, config, [_descriptor(layer_type, layer.blob) for layer in layers], **extra
    )
    brought = {manifest.digest: manifest, config.digest: config}
    for layer in layers:
        brought.setdefault(layer.blob.digest, layer.blob)
    return manifest, tuple(brought.values()), media_type


def _attestation(key: str, subject: str) -> tuple[dict[str, object], tuple[Blob, ...]]:
    """A BuildKit attestation manifest for the platform manifest *subject*: provenance, sometimes an SBOM."""
    layers = [
        (
            _payload_blob(f"prov/{key}", _lognormal(_stable_int("prov", key), 6000, 0.5, 1500, 14_000)),
            "https://slsa.dev/provenance/v0.2",
        )
    ]
    if _stable_int("sbom", key) % 2:
        layers.append(
            (
                _payload_blob(f"sbom/{key}", _lognormal(_stable_int("sbom", key), 300e3, 1.0, 20_000, 8_000_000)),
                "https://spdx.dev/Document",
            )
        )
    config = _blob(
        _canonical_json(
            {
                "architecture": "unknown",
                "config": {},
                "os": "unknown",
                "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob, _ in layers]},
            }
        )
    )
    descriptors = [_descriptor(IN_TOTO, blob, annotations={PREDICATE_TYPE: predicate}) for blob, predicate in layers]
    manifest = _manifest_blob(OCI_MANIFEST, OCI_CONFIG, config, descriptors)
    descriptor = _descriptor(
        OCI_MANIFEST,
        manifest,
        annotations={REFERENCE_DIGEST: subject, REFERENCE_TYPE: "attestation-manifest"},
        platform=dict(UNKNOWN),
    )
    return descriptor, (manifest, config, *(blob for blob, _ in layers))


# Artifacts attached with a subject: (artifactType, or None for the form before OCI 1.1 that says
# it with the config's media type; the payload's media type; its median size).
_ARTIFACTS: tuple[tuple[str | None, str, float], ...] = (
    (SIGSTORE_BUNDLE, SIGSTORE_BUNDLE, 4500),
    (NOTARY_SIGNATURE, "application/jose+json", 2200),
    (SPDX, SPDX, 400e3),
    (CYCLONEDX, CYCLONEDX, 250e3),
    (None, SARIF, 60e3),
)


def _artifact(
    key: str, kind: tuple[str | None, str, float], subject: dict[str, object], created: str
) -> tuple[dict[str, object], tuple[Blob, ...]]:
    """An OCI 1.1 referrer of *subject* (``oras attach``, ``cosign`` in referrers mode, ``notation``):
    its descriptor as the referrers API lists it, and its blobs."""
    artifact_type, payload_type, median = kind
    payload = _payload_blob(f"artifact/{key}", _lognormal(_stable_int("artifact", key), median, 0.6, 400, 20_000_000))
    annotations = {CREATED: created}
    extra: dict[str, object] = {"subject": subject, "annotations": annotations}
    if artifact_type is not None:
        extra["artifactType"] = artifact_type
        config_type = OCI_EMPTY
    else:
        config_type = payload_type
    manifest = _manifest_blob(OCI_MANIFEST, config_type, EMPTY_BLOB, [_descriptor(payload_type, payload)], **extra)
    descriptor = _descriptor(OCI_MANIFEST, manifest)
    descriptor["artifactType"] = artifact_type if artifact_type is not None else config_type
    descriptor["annotations"] = annotations
    return descriptor, (manifest, EMPTY_BLOB, payload)


def _cosign(key: str, suffix: str, repo: str, subject: str, created: str) -> tuple[Blob, tuple[Blob, ...]]:
    """What ``cosign sign``/``attest``/``attach sbom`` push under the tag ``sha256-HEX.SUFFIX``."""
    if suffix == ".sig":
        payload = _blob(
            _canonical_json(
                {
                    "critical": {
                        "identity": {"docker-reference": repo},
                        "image": {"docker-manifest-digest": subject},
                        "type": "cosign container image signature",
                    },
                    "optional": None,
                }
            )
        )
        signature = hashlib.sha512(f"sig/{key}".encode()).digest()
        notes = {"dev.cosignproject.cosign/signature": base64.b64encode(signature).decode()}
        layer = _descriptor(COSIGN_SIGNATURE, payload, annotations=notes)
    elif suffix == ".att":
        payload = _payload_blob(f"att/{key}", _lognormal(_stable_int("att", key), 7000, 0.5, 1500, 16_000))
        layer = _descriptor(DSSE_ENVELOPE, payload, annotations={"predicateType": "https://slsa.dev/provenance/v1"})
    else:
        payload = _payload_blob(f"sbom/{key}", _lognormal(_stable_int("csbom", key), 400e3, 0.8, 20_000, 20_000_000))
        layer = _descriptor("text/spdx+json", payload)
    config = _blob(
        _canonical_json(
            {
                "architecture": "",
                "config": {},
                "created": created,
                "history": [{"created": created}],
                "os": "",
                "rootfs": {"type": "layers", "diff_ids": [payload.digest]},
            }
        )
    )
    manifest = _manifest_blob(OCI_MANIFEST, OCI_CONFIG, config, [layer])
    return manifest, (manifest, config, payload)


def _referrers(key: str, repo: str, subject: dict[str, object]) -> list[Referrer]:
    """The referrers of the image *subject* (none for most): OCI 1.1 referrers listed in index.json,
    cosign's ``sha256-HEX.sig``/``.att``/``.sbom`` tags, or the OCI fallback tag ``sha256-HEX``."""
    r = random.Random(_stable_int("referrers", key))
    if r.random() >= REFERRER_SHARE:
        return []
    link = {name: subject[name] for name in ("mediaType", "digest", "size")}
    hex_ = str(subject["digest"]).partition(":")[2]
    signed = _stable_int("signed", key)
    created = _timestamp(_EPOCH + signed % (3 * 365 * _DAY), signed >> 32)
    form = r.random()
    out: list[Referrer] = []
    if form < 0.45:
        for n, kind in enumerate(r.sample(_ARTIFACTS, r.randint(1, 3))):
            descriptor, blobs = _artifact(f"{key}/{n}", kind, link, created)
            listed = {name: descriptor[name] for name in ("mediaType", "digest", "size", "artifactType")}
            out.append(Referrer(listed, None, blobs, []))
    elif form < 0.8:
        suffixes = [".sig"] + [s for s, p in ((".att", 0.5), (".sbom", 0.3)) if r.random() < p]
        for suffix in suffixes:
            manifest, blobs = _cosign(f"{key}/{suffix}", suffix, repo, str(subject["digest"]), created)
            out.append(Referrer(_descriptor(OCI_MANIFEST, manifest), f"sha256-{hex_}{suffix}", blobs, []))
    else:
        tagged: list[dict[str, object]] = []
        brought: dict[str, Blob] = {}
        for n, kind in enumerate(r.sample(_ARTIFACTS, r.randint(1, 2))):
            descriptor, blobs = _artifact(f"{key}/tag/{n}", kind, link, created)
            tagged.append(descriptor)
            brought.update((blob.digest, blob) for blob in blobs)
        index = _blob(_canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": tagged}))
        out.append(Referrer(_descriptor(OCI_INDEX, index), f"sha256-{hex_}", (index, *brought.values()), tagged))
    return out


def _build_graph_image(repo: str, tag: str, build: int, *, oci: bool, single: bool) -> GraphImage:
    key = f"{repo}:{tag}#{build}"
    h = _stable_int("image", key)
    docker = h % 10 < 4
    zstd = not docker and (h >> 40) % 20 == 0
    if not single and (h >> 8) % 100 < 30:
        platforms = [AMD64, ARM64_V8, ARM_V7] if (h >> 16) % 3 else [AMD64, ARM64_V8]
        if (h >> 28) % 20 == 0:
            platforms.append(WINDOWS)
        parts: list[tuple[dict[str, object] | None, tuple[Blob, ...]]] = []
        for platform in platforms:
            manifest, blobs, media = _platform_manifest(
                repo, tag, build, platform, docker=docker, oci=oci, zstd=zstd, single=False
            )
            parts.append((_descriptor(media, manifest, platform=dict(platform)), blobs))
        if not docker and (h >> 20) % 4 == 0:
            for descriptor, _ in list(parts):
                assert descriptor is not None
                parts.append(_attestation(f"{key}/{descriptor['digest']}", str(descriptor["digest"])))
        media = DOCKER_LIST if docker and not oci else OCI_INDEX
        index = _blob(_canonical_json({"schemaVersion": 2, "mediaType": media, "manifests": [d for d, _ in parts]}))
        descriptor = _descriptor(media, index)
        return GraphImage(descriptor, index, parts, _referrers(key, repo, descriptor))
    roll = (h >> 16) % 100
    platform = AMD64 if roll < 85 else ARM64_V8 if roll < 98 else ARM_V7
    manifest, blobs, media = _platform_manifest(
        repo, tag, build, platform, docker=docker, oci=oci, zstd=zstd, single=True
    )
    descriptor = _descriptor(media, manifest)
    if (h >> 24) % 2:
        descriptor["platform"] = dict(platform)
    return GraphImage(descriptor, None, [(None, blobs)], _referrers(key, repo, descriptor))


class _LayoutContent:
    """The blobs a graph layout holds, and what its content references, while it is assembled."""

    def __init__(self) -> None:
        self.present: dict[str, Blob] = {}
        self.referenced: set[str] = set()  # everything the layout's images are made of, held or not
        self.wanted: set[str] = set()  # digests named by what the layout holds (missing when not held)

    def _hold(self, blobs: tuple[Blob, ...] | list[Blob]) -> None:
        for blob in blobs:
            self.present.setdefault(blob.digest, blob)

    def place(self, image: GraphImage, rng: random.Random, partial: bool) -> bool:
        """Hold *image*, all of it unless *partial* (an export that left parts out); whether its index
        blob (or its manifest) is held."""
        self.referenced.update(blob.digest for blob in image.blobs())
        if image.index is None:
            blobs = image.parts[0][1]
            self.wanted.update(blob.digest for blob in blobs)
            if partial and rng.random() < 0.2 and len(blobs) > 2:
                # Layers never fetched (a lazily pulled image, non-distributable layers): the
                # manifest and config are there, some layers are not.
                kept = [blob for blob in blobs[2:] if rng.random() < 0.5]
                if len(kept) == len(blobs) - 2:
                    kept.pop()
                blobs = (*blobs[:2], *kept)
            self._hold(blobs)
            return True
        dropped = set()
        held = True
        if partial:  # a single-platform export of a multi-platform image, as the plain generator does it
            dropped = {i for i in range(1, len(image.parts)) if rng.random() < 0.5}
            held = rng.random() >= 0.1
        self.wanted.add(image.index.digest)
        if not held:
            return False
        self._hold([image.index])
        for i, (_, blobs) in enumerate(image.parts):
            self.wanted.add(blobs[0].digest)
            if i not in dropped:
                self.wanted.update(blob.digest for blob in blobs)
                self._hold(blobs)
        return True

    def add_referrer(self, referrer: Referrer) -> None:
        """Hold a referrer and what it brings."""
        self.referenced.update(blob.digest for blob in referrer.blobs)
        self.wanted.update(blob.digest for blob in referrer.blobs)
        self._hold(referrer.blobs)

    def missing(self) -> set[str]:
        """Digests named by what the layout holds that it does not hold."""
        return {digest for digest in self.wanted if digest not in self.present}


EARLIER_BUILDS = 3


def _earlier_build(repo: str, tag: str, k: int) -> int:
    """The *k*-th earlier build of repo:tag (never build 0, the shared current one)."""
    return 1 + _stable_int("earlier", repo, tag, k) % ((1 << 30) - 1)


def _hold_blobs(model: LayoutModel, blobs: Iterable[Blob]) -> None:
    for blob in blobs:
        if blob.data is None:
            model.sparse[blob.digest] = blob.size
        else:
            model.blobs[blob.digest] = blob.data


def _build_graph_layout(
    seed: int | str, number: int, images: ImageCache, *, kind: str, names: int | None
) -> LayoutModel:
    rng = random.Random(f"{seed}:{kind}:{number}")
    if names is None:
        names = max(1, min(400, round(rng.lognormvariate(2.676, 0.8))))
    primary = rng.choices(_WRITER_NAMES, _WRITER_WEIGHTS)[0]
    partial_export = rng.random() < 0.15
    manifests: list[dict[str, object]] = []
    nested: list[tuple[int, str, list[dict[str, object]], bool]] = []
    used: set[str] = set()
    content = _LayoutContent()
    placed: list[tuple[str, str]] = []
    got = attempts = referrers = 0
    while got < names and attempts < names * 20:
        attempts += 1
        repo = _pick_repo(rng)
        tag = _pick_tag(rng, repo)
        build = 0 if rng.random() < 0.75 else rng.randrange(1 << 30)
        # skopeo and podman convert Docker images to OCI when asked: a new manifest, the same config.
        converted = primary in ("skopeo", "podman") and rng.random() < 0.3
        image = images.graph_image(repo.canonical, tag, build, oci=converted)
        descriptor = dict(image.descriptor)
        named = _entry_names(rng, primary, repo, tag, str(descriptor["digest"]), used)
        if named is None:
            continue
        annotations, count, writer = named
        if annotations:
            descriptor["annotations"] = annotations
        position = len(manifests)
        manifests.append(descriptor)
        got += count
        placed.append((repo.canonical, tag))
        held = content.place(image, rng, partial_export and rng.random() < 0.5)
        if image.nested:
            nested.append((position, str(descriptor["digest"]), image.children, held))
        if not image.referrers or rng.random() >= REFERRERS_KEPT:
            continue
        for referrer in image.referrers:
            if referrer.digest in content.referenced:
                continue  # the same image twice in the layout: its referrers are listed once
            listed = dict(referrer.descriptor)
            if referrer.tag is not None:
                notes, count = _annotations(writer or primary, rng, repo, referrer.tag, referrer.digest, None)
                if _name_key(notes) in used:
                    continue
                used.add(_name_key(notes))
                listed["annotations"] = notes
                got += count
            if referrer.children:
                nested.append((len(manifests), referrer.digest, referrer.children, True))
            manifests.append(listed)
            content.add_referrer(referrer)
            referrers += 1
    # Earlier builds of the layout's images, as a writer that never collects garbage leaves them
    # (skopeo, BuildKit's exporter replace index.json entries, not blobs); layers first, as an
    # interrupted copy leaves them. An image has a few earlier builds, the same in every layout
    # that pulled it before (last month's alpine:3.19 lingers in many).
    target = round(len(content.present) * GARBAGE_SHARE * rng.uniform(0.5, 1.5))
    garbage: dict[str, Blob] = {}
    tries = 0
    while len(garbage) < target and placed and tries < 50:
        tries += 1
        repo_name, tag = rng.choice(placed)
        older = images.graph_image(repo_name, tag, _earlier_build(repo_name, tag, rng.randrange(EARLIER_BUILDS)))
        for blob in reversed(older.blobs()):
            if len(garbage) >= target:
                break
            if blob.digest not in content.referenced:
                garbage.setdefault(blob.digest, blob)
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    model = LayoutModel(document, {}, got, nested, graph=True, partial=partial_export, referrers=referrers)
    model.index_bytes = _canonical_json(document)
    _hold_blobs(model, content.present.values())
    _hold_blobs(model, garbage.values())
    model.unreferenced = set(garbage)
    model.missing = content.missing()
    return model


def write_layout(path: str, model: LayoutModel, *, mtime_ns: int | None = None) -> int:
    """Write *model* as a layout directory at *path*; return how many files were written.

    Blobs first, ``index.json`` last, as every writer does. With *mtime_ns*, ``index.json`` gets it, and
    in a graph layout every blob too (its garbage a day older, as earlier builds' blobs are).
    """
    blob_dir = os.path.join(path, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "wb") as fh:
        fh.write(OCI_LAYOUT_BYTES)
    if model.graph:
        _write_blobs(blob_dir, model, mtime_ns)
    else:
        for digest, data in model.blobs.items():
            with open(os.path.join(blob_dir, digest.partition(":")[2]), "wb") as fh:
                fh.write(data)
    index_path = os.path.join(path, "index.json")
    with open(index_path, "wb") as fh:
        fh.write(model.index_bytes or _canonical_json(model.index))
    if mtime_ns is not None:
        os.utime(index_path, ns=(mtime_ns, mtime_ns))
    return 2 + len(model.blobs) + len(model.sparse)


_BLOB_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_blobs(blob_dir: str, model: LayoutModel, mtime_ns: int | None) -> None:
    # os-level calls: a tree has millions of blobs, and a file object costs more than its syscalls.
    garbage = model.unreferenced
    contents: list[tuple[str, bytes | int]] = [*model.blobs.items(), *model.sparse.items()]
    for digest, content in contents:
        fd = os.open(os.path.join(blob_dir, digest.partition(":")[2]), _BLOB_FLAGS, 0o644)
        try:
            if isinstance(content, bytes):
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
            else:
                os.ftruncate(fd, content)  # a hole: the file reads as *content* zero bytes
            if mtime_ns is not None:
                when = mtime_ns - GARBAGE_AGE_NS if digest in garbage else mtime_ns
                os.utime(fd, ns=(when, when))
        finally:
            os.close(fd)


@dataclass
class TreeInfo:
    """What :func:`generate_tree` wrote."""

    root: str
    layouts: list[str]
    entries: int
    names: int
    files: int
    seconds: float
    graph: bool = False
    blobs: int = 0  # blob files written, over all layouts
    blob_bytes: int = 0  # their sizes summed (sparse layers at their full size)
    unreferenced_blobs: int = 0
    missing_blobs: int = 0
    referrers: int = 0
    partial_exports: int = 0


def layout_path(root: str, number: int) -> str:
    """Where layout *number* of a tree lives: ``ROOT/gNNN/lNNNNN`` (100 layouts per group)."""
    return os.path.join(root, f"g{number // LAYOUTS_PER_GROUP:03d}", f"l{number:05d}")


def past_mtime_ns(age_seconds: float = 3600.0) -> int:
    """A modification time *age_seconds* in the past."""
    return time.time_ns() - int(age_seconds * 1e9)


def generate_tree(
    root: str, count: int, seed: int | str, *, mtime_ns: int | None = None, graph: bool = True
) -> TreeInfo:
    """Write *count* layouts below *root*, deterministic from *seed*."""
    started = time.perf_counter()
    images = ImageCache()
    info = TreeInfo(root, [], 0, 0, 0, 0.0, graph)
    for number in range(count):
        model = build_layout(seed, number, images, graph=graph)
        path = layout_path(root, number)
        info.files += write_layout(path, model, mtime_ns=mtime_ns)
        info.layouts.append(path)
        info.entries += model.entries
        info.names += model.expected_names
        info.blobs += len(model.blobs) + len(model.sparse)
        info.blob_bytes += sum(map(len, model.blobs.values())) + sum(model.sparse.values())
        info.unreferenced_blobs += len(model.unreferenced)
        info.missing_blobs += len(model.missing)
        info.referrers += model.referrers
        info.partial_exports += model.partial
    info.seconds = time.perf_counter() - started
    return info


def generate_huge(
    path: str, entries: int, seed: int | str, *, target_tag: str, mtime_ns: int | None = None, graph: bool = True
) -> int:
    """Write one layout of *entries* entries at *path*; return the number of names written."""
    model = build_huge_layout(seed, entries, ImageCache(), target_tag=target_tag, graph=graph)
    write_layout(path, model, mtime_ns=mtime_ns)
    return model.expected_names


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.generate ROOT COUNT [--seed N] [--no-graph]``: write a tree and print what was
    written."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", default="1")
    parser.add_argument(
        "--no-graph", action="store_true", help="index.json and nested indexes only (the corpus before the graph)"
    )
    args = parser.parse_args(argv)
    info = generate_tree(args.root, args.count, args.seed, mtime_ns=past_mtime_ns(), graph=not args.no_graph)
    print(
        f"{len(info.layouts)} layouts, {info.entries} entries, {info.names} names, "
        f"{info.files} files in {info.seconds:.1f}s under {info.root}"
    )
    if info.graph:
        print(
            f"{info.blobs} blobs ({info.blob_bytes / 1e9:.1f} GB by size), {info.unreferenced_blobs} unreferenced, "
            f"{info.missing_blobs} referenced and missing in {info.partial_exports} partial exports, "
            f"{info.referrers} referrer entries"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
