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
with ``linux/amd64``, ``linux/arm64/v8`` and ``linux/arm/v7`` children, some
with BuildKit attestation manifests; the nested index blob and its child
manifest blobs are written, except in partial exports where some child blobs
(rarely the index blob itself) are missing. Image content is a function of
(repository, tag, build): popular images are byte-identical across layouts,
as they are on a real build host, so their digests repeat.

Not written, because ocidx never reads them: config and layer blobs, and the
manifest blobs of single-platform top-level entries (except the target of a
huge layout, which ``skopeo inspect --raw`` reads).

Generation is deterministic: the same seed gives the same bytes, file for
file (each layout draws from its own ``random.Random(f"{seed}:{kind}:{n}")``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field

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
    material = "\0".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


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
    """Images by (repository, tag, build): the same key always gives the same bytes."""

    def __init__(self) -> None:
        self._images: dict[tuple[str, str, int], Image] = {}

    def image(self, repo: str, tag: str, build: int) -> Image:
        """The image for this key, built once."""
        key = (repo, tag, build)
        found = self._images.get(key)
        if found is None:
            found = self._images[key] = _build_image(repo, tag, build)
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


def build_layout(
    seed: int | str, number: int, images: ImageCache, *, kind: str = "tree", names: int | None = None
) -> LayoutModel:
    """Layout *number* of a tree generated from *seed* (about :data:`MEAN_NAMES` names, or *names*)."""
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
        if rng.random() < 0.07:
            annotations: dict[str, str] = {}
            count = 0
            if rng.random() < 0.5:
                annotations[CREATED] = f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T00:00:00Z"
        else:
            writer = primary
            if primary == "mixed" or rng.random() < 0.15:
                writer = rng.choice(_WRITER_NAMES[:-1])
            extra = None
            if writer == "buildkit-list":
                extra = (repo, rng.choice(repo_tags(repo)))
            annotations, count = _annotations(writer, rng, repo, tag, str(descriptor["digest"]), extra)
            if extra is not None and extra[1] == tag:
                annotations, count = {REF_NAME: f"{repo.canonical}:{tag}"}, 1
            key = _name_key(annotations)
            if key in used:
                continue
            used.add(key)
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


def build_huge_layout(seed: int | str, entries: int, images: ImageCache, *, target_tag: str) -> LayoutModel:
    """One layout of *entries* entries (a CI cache or registry mirror), the last one tagged *target_tag*."""
    rng = random.Random(f"{seed}:huge:{entries}")
    manifests: list[dict[str, object]] = []
    blobs: dict[str, bytes] = {}
    nested: list[tuple[int, str, list[dict[str, object]], bool]] = []
    used: set[str] = set()
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
        image = images.image(repo.canonical, tag, build) if rng.random() < 0.1 else _single(repo, tag, number)
        descriptor = dict(image.descriptor)
        writer = rng.choice(("skopeo", "tag-only", "containerd", "podman"))
        annotations, count = _annotations(writer, rng, repo, tag, str(descriptor["digest"]), None)
        key = _name_key(annotations)
        if key in used:
            annotations, count = {REF_NAME: f"{repo.canonical}:build-{number}"}, 1
        used.add(_name_key(annotations))
        descriptor["annotations"] = annotations
        names += count
        if image.nested:
            nested.append((len(manifests), str(descriptor["digest"]), image.children, True))
            blobs.update(image.blobs)
        manifests.append(descriptor)
    target = _single(REPOS[0], target_tag, -1)
    descriptor = dict(target.descriptor)
    descriptor["annotations"] = {REF_NAME: target_tag}
    manifests.append(descriptor)
    blobs.update(target.blobs)  # skopeo inspect --raw reads this manifest
    names += 1
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    model = LayoutModel(document, blobs, names, nested)
    model.index_bytes = _canonical_json(document)
    return model


def _single(repo: Repo, tag: str, number: int) -> Image:
    data, media = _manifest(f"{repo.canonical}:{tag}#{number}", None, False, layers=1 + number % 4)
    return Image({"mediaType": media, "digest": _digest(data), "size": len(data)}, {_digest(data): data})


def write_layout(path: str, model: LayoutModel, *, mtime_ns: int | None = None) -> int:
    """Write *model* as a layout directory at *path*; return how many files were written."""
    blob_dir = os.path.join(path, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "wb") as fh:
        fh.write(OCI_LAYOUT_BYTES)
    for digest, data in model.blobs.items():
        with open(os.path.join(blob_dir, digest.partition(":")[2]), "wb") as fh:
            fh.write(data)
    index_path = os.path.join(path, "index.json")
    with open(index_path, "wb") as fh:
        fh.write(model.index_bytes or _canonical_json(model.index))
    if mtime_ns is not None:
        os.utime(index_path, ns=(mtime_ns, mtime_ns))
    return 2 + len(model.blobs)


@dataclass
class TreeInfo:
    """What :func:`generate_tree` wrote."""

    root: str
    layouts: list[str]
    entries: int
    names: int
    files: int
    seconds: float


def layout_path(root: str, number: int) -> str:
    """Where layout *number* of a tree lives: ``ROOT/gNNN/lNNNNN`` (100 layouts per group)."""
    return os.path.join(root, f"g{number // LAYOUTS_PER_GROUP:03d}", f"l{number:05d}")


def past_mtime_ns(age_seconds: float = 3600.0) -> int:
    """A modification time *age_seconds* in the past."""
    return time.time_ns() - int(age_seconds * 1e9)


def generate_tree(root: str, count: int, seed: int | str, *, mtime_ns: int | None = None) -> TreeInfo:
    """Write *count* layouts below *root*, deterministic from *seed*."""
    started = time.perf_counter()
    images = ImageCache()
    paths: list[str] = []
    entries = names = files = 0
    for number in range(count):
        model = build_layout(seed, number, images)
        path = layout_path(root, number)
        files += write_layout(path, model, mtime_ns=mtime_ns)
        paths.append(path)
        entries += model.entries
        names += model.expected_names
    return TreeInfo(root, paths, entries, names, files, time.perf_counter() - started)


def generate_huge(path: str, entries: int, seed: int | str, *, target_tag: str, mtime_ns: int | None = None) -> int:
    """Write one layout of *entries* entries at *path*; return the number of names written."""
    model = build_huge_layout(seed, entries, ImageCache(), target_tag=target_tag)
    write_layout(path, model, mtime_ns=mtime_ns)
    return model.expected_names


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.generate ROOT COUNT [--seed N]``: write a tree and print what was written."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", default="1")
    args = parser.parse_args(argv)
    info = generate_tree(args.root, args.count, args.seed, mtime_ns=past_mtime_ns())
    print(
        f"{len(info.layouts)} layouts, {info.entries} entries, {info.names} names, "
        f"{info.files} files in {info.seconds:.1f}s under {info.root}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
