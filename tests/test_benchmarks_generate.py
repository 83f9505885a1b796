"""The benchmark generator: deterministic from its seed, its layouts are ones ocidx reads, and its
content graphs are valid content-addressed storage shaped like a build host's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

from benchmarks import generate as gen
from indexer.layout import read_layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

GRAPH_LAYOUTS = 60
MANIFEST_TYPES = {gen.OCI_MANIFEST, gen.DOCKER_MANIFEST}
FALLBACK_TAG = re.compile(r"sha256-([0-9a-f]{64})(\.sig|\.att|\.sbom)?$")


def _extents(path: str) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    """A file's size and its data extents (offset, bytes): what it reads as, holes being zeros,
    without reading the holes (a generated tree holds terabytes of sparse layers)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here to the end
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, os.pread(fd, end - start, start)))
            offset = end
        return size, tuple(out)
    finally:
        os.close(fd)


def _files(root: str) -> dict[str, tuple[int, tuple[tuple[int, bytes], ...]]]:
    return {
        os.path.relpath(os.path.join(dirpath, name), root): _extents(os.path.join(dirpath, name))
        for dirpath, _dirs, filenames in os.walk(root)
        for name in filenames
    }


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for rel, (size, extents) in sorted(_files(root).items()):
        h.update(f"{rel}\0{size}\0".encode())
        for start, data in extents:
            h.update(f"{start}:{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def graph_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[gen.TreeInfo, int, list[gen.LayoutModel]]:
    """A graph tree written with an mtime, and the models its layouts were built from."""
    mtime_ns = gen.past_mtime_ns()
    info = gen.generate_tree(str(tmp_path_factory.mktemp("graph")), GRAPH_LAYOUTS, "1", mtime_ns=mtime_ns)
    images = gen.ImageCache()
    models = [gen.build_layout("1", number, images) for number in range(GRAPH_LAYOUTS)]
    return info, mtime_ns, models


class Walk:
    """One layout read as a reader of the content graph reads it: index.json, then every held index and
    manifest (config and layers; a ``subject`` keeps nothing alive)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.held = set(os.listdir(os.path.join(path, "blobs", "sha256")))
        self.index = json.loads(_read(os.path.join(path, "index.json")))
        self.referenced: dict[str, set[int]] = {}  # digest -> the sizes descriptors give it
        self.documents: dict[str, dict[str, object]] = {}  # held indexes and manifests, parsed
        self.platforms: dict[str, dict[str, str]] = {}  # manifest digest -> a descriptor's platform
        self.siblings: dict[str, set[str]] = {}  # index digest -> the digests it lists
        self._follow(self.index["manifests"])

    def blob(self, digest: str) -> str:
        """The path of a blob."""
        return os.path.join(self.path, "blobs", "sha256", digest.partition(":")[2])

    def has(self, digest: str) -> bool:
        """Whether the layout holds the blob."""
        return digest.partition(":")[2] in self.held

    def _follow(self, descriptors: list[dict[str, object]]) -> None:
        for descriptor in descriptors:
            digest = str(descriptor["digest"])
            self.referenced.setdefault(digest, set()).add(int(str(descriptor["size"])))
            if isinstance(descriptor.get("platform"), dict):
                self.platforms[digest] = descriptor["platform"]  # type: ignore[assignment]
            media_type = descriptor["mediaType"]
            if digest in self.documents or not self.has(digest):
                continue
            if media_type in gen.INDEX_TYPES:
                document = json.loads(_read(self.blob(digest)))
                self.documents[digest] = document
                self.siblings[digest] = {str(d["digest"]) for d in document["manifests"]}
                self._follow(document["manifests"])
            elif media_type in MANIFEST_TYPES:
                document = json.loads(_read(self.blob(digest)))
                self.documents[digest] = document
                self._follow([document["config"], *document["layers"]])

    def missing(self) -> set[str]:
        """Referenced digests the layout does not hold."""
        return {digest for digest in self.referenced if not self.has(digest)}

    def unreferenced(self) -> set[str]:
        """Held blobs nothing in the layout references."""
        return {"sha256:" + name for name in self.held} - set(self.referenced)

    def listed(self) -> set[str]:
        """Digests of index.json's entries and of every held index's children."""
        out = {str(d["digest"]) for d in self.index["manifests"]}
        for kids in self.siblings.values():
            out |= kids
        return out


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a = gen.generate_tree(str(tmp_path / "a"), 12, "7")
    b = gen.generate_tree(str(tmp_path / "b"), 12, "7")
    c = gen.generate_tree(str(tmp_path / "c"), 12, "8")
    files_a, files_b = _files(a.root), _files(b.root)
    assert files_a == files_b
    assert (a.entries, a.names, a.files, a.blobs, a.blob_bytes) == (b.entries, b.names, b.files, b.blobs, b.blob_bytes)
    assert len(files_a) == a.files
    index = os.path.join("g000", "l00000", "index.json")
    assert _files(c.root)[index] != files_a[index]


def test_a_layout_is_the_same_whatever_the_image_cache_held(tmp_path: Path) -> None:
    # fill_database, the probe layouts and the tree build layouts with caches in different states.
    warm = gen.ImageCache()
    for number in range(20):
        gen.build_layout("3", number, warm)
    for number in (20, 21, 22):
        fresh = gen.build_layout("3", number, gen.ImageCache(graph_limit=1))
        again = gen.build_layout("3", number, warm)
        assert (fresh.index_bytes, fresh.blobs, fresh.sparse) == (again.index_bytes, again.blobs, again.sparse)
        assert (fresh.unreferenced, fresh.missing) == (again.unreferenced, again.missing)


def test_without_the_graph_the_generator_writes_what_it_wrote_before_the_graph(tmp_path: Path) -> None:
    # Digests of what the generator wrote before the content graph (commit 0fe23d4), same sizes and seed:
    # the corpus of the figures in RESULTS.md stays reproducible with --no-graph.
    gen.generate_tree(str(tmp_path / "tree"), 200, "7", graph=False)
    assert _tree_digest(str(tmp_path / "tree")) == "d1acbe0d7ee14fee45376fb817f08585bae244744d9619db09a754a1d92bedb2"
    gen.generate_huge(str(tmp_path / "huge"), 2000, "7", target_tag="bench-target", graph=False)
    assert _tree_digest(str(tmp_path / "huge")) == "33ba8a2b1c14207bd5307c3813d6005adefd4eb830a625af158b492a9ee3ec52"


def test_every_layout_parses_with_the_names_and_children_it_was_built_with(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info, _, models = graph_tree
    hows: set[str] = set()
    nested = children = partial = 0
    for path, model in zip(info.layouts, models, strict=True):
        snapshot = read_layout(path)
        assert len(snapshot.entries) == model.entries
        assert sum(len(e.names) for e in snapshot.entries) == model.expected_names
        assert not any(e.invalid_names for e in snapshot.entries)
        hows.update(n.how for e in snapshot.entries for n in e.names)
        nested += len(model.nested)
        children += len(snapshot.children)
        missing = [w for w in snapshot.warnings if "partial export" in w]
        partial += len(missing)
        # Only missing blobs of partial exports are reported; nothing else is wrong with the layout.
        assert len(missing) == len(snapshot.warnings)
    assert hows == {"containerd", "tag-only", "full", "familiar"}
    assert nested > 0
    assert children >= 2 * nested - 2 * partial
    assert partial > 0
    assert info.names / len(info.layouts) > 5


def test_every_blob_hashes_to_its_name_and_only_big_layers_are_sparse(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info = graph_tree[0]
    hole_sizes: dict[int, set[str]] = {}  # size -> names of blobs that are nothing but a hole
    written = 0
    for path in info.layouts:
        directory = os.path.join(path, "blobs", "sha256")
        for name in os.listdir(directory):
            size, extents = _extents(os.path.join(directory, name))
            written += 1
            if extents:
                # Not a sparse layer: every byte is data, and it hashes to its name.
                assert len(extents) == 1 and extents[0][0] == 0 and len(extents[0][1]) == size, name
                assert hashlib.sha256(extents[0][1]).hexdigest() == name
            else:
                assert size > gen.SMALL_LAYER_MAX, f"{name}: a small blob written as a hole"
                hole_sizes.setdefault(size, set()).add(name)
    assert written == info.blobs
    # Every sparse blob reads as its size in zeros: its name must be the digest of that many zeros
    # (one pass over the zeros, the sizes in order).
    zeros = hashlib.sha256()
    chunk = bytes(1 << 20)
    done = 0
    for size in sorted(hole_sizes):
        while done < size:
            step = min(len(chunk), size - done)
            zeros.update(chunk[:step])
            done += step
        assert hole_sizes[size] == {zeros.copy().hexdigest()}, size
    assert len(hole_sizes) > 100


def test_referenced_blobs_are_held_except_in_partial_exports_and_sizes_match(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info, _, models = graph_tree
    missing_kinds: set[str] = set()
    for path, model in zip(info.layouts, models, strict=True):
        walk = Walk(path)
        missing = walk.missing()
        assert missing == model.missing
        if not model.partial:
            assert not missing, path
        for digest in missing:
            missing_kinds.add("manifest or index" if digest in walk.listed() else "config or layer")
        for digest, sizes in walk.referenced.items():
            if walk.has(digest):
                # du and gc sum sizes from stat: a blob's file is as big as every descriptor says.
                assert sizes == {os.stat(walk.blob(digest)).st_size}, digest
    assert missing_kinds == {"manifest or index", "config or layer"}
    assert info.partial_exports == sum(m.partial for m in models) > 0


def test_every_layout_holds_about_a_fifth_more_blobs_that_nothing_references(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info, mtime_ns, models = graph_tree
    unreferenced = referenced = with_garbage = 0
    for path, model in zip(info.layouts, models, strict=True):
        walk = Walk(path)
        garbage = walk.unreferenced()
        assert garbage == model.unreferenced
        unreferenced += len(garbage)
        referenced += len(walk.held) - len(garbage)
        with_garbage += bool(garbage)
        # Earlier builds' blobs are older than the layout's live content (a gc grace period sees them).
        for digest in walk.referenced:
            if walk.has(digest):
                assert os.stat(walk.blob(digest)).st_mtime_ns == mtime_ns
        for digest in garbage:
            assert os.stat(walk.blob(digest)).st_mtime_ns == mtime_ns - gen.GARBAGE_AGE_NS
        assert os.stat(os.path.join(path, "index.json")).st_mtime_ns == mtime_ns
    assert 0.15 < unreferenced / referenced < 0.25
    assert with_garbage >= 0.9 * len(info.layouts)
    assert info.unreferenced_blobs == unreferenced


def test_referrers_name_images_their_layout_holds(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info = graph_tree[0]
    kinds: dict[str, int] = {}
    artifact_types: set[str] = set()
    images: set[str] = set()
    referred: set[str] = set()
    for path in info.layouts:
        walk = Walk(path)
        listed = walk.listed()
        for digest, document in walk.documents.items():
            subject = document.get("subject")
            if isinstance(subject, dict):
                assert subject["digest"] in listed, f"{path}: {digest} refers to an image the layout does not list"
                config = document["config"]
                assert isinstance(config, dict)
                artifact_types.add(str(document.get("artifactType") or config["mediaType"]))
                kinds["subject"] = kinds.get("subject", 0) + 1
                referred.add(str(subject["digest"]))
            for child in document.get("manifests") or []:  # type: ignore[attr-defined]
                notes = child.get("annotations") or {}
                if notes.get(gen.REFERENCE_TYPE) == "attestation-manifest":
                    assert notes[gen.REFERENCE_DIGEST] in walk.siblings[digest]
                    assert child["platform"] == {"architecture": "unknown", "os": "unknown"}
                    kinds["attestation"] = kinds.get("attestation", 0) + 1
                    referred.add(digest)
        for entry in walk.index["manifests"]:
            notes = entry.get("annotations") or {}
            name = notes.get(gen.CONTAINERD_NAME) or notes.get(gen.REF_NAME) or ""
            found = FALLBACK_TAG.search(name)
            if found is None:
                if "artifactType" not in entry:
                    images.add(entry["digest"])
                continue
            assert "sha256:" + found.group(1) in listed, f"{path}: the fallback tag {name} names nothing"
            kinds[found.group(2) or "tag index"] = kinds.get(found.group(2) or "tag index", 0) + 1
            referred.add("sha256:" + found.group(1))
    assert set(kinds) == {"subject", "attestation", ".sig", ".att", ".sbom", "tag index"}, kinds
    assert {gen.SIGSTORE_BUNDLE, gen.NOTARY_SIGNATURE, gen.SPDX, gen.CYCLONEDX, gen.SARIF} <= artifact_types
    share = len(referred & images) / len(images)
    assert 0.06 < share < 0.16, share


def test_configs_describe_their_images(graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]]) -> None:
    info = graph_tree[0]
    platforms: set[tuple[str, ...]] = set()
    layer_types: set[str] = set()
    manifests = 0
    for path in info.layouts:
        walk = Walk(path)
        for digest, document in walk.documents.items():
            config_descriptor = document.get("config")
            if not isinstance(config_descriptor, dict) or config_descriptor["mediaType"] not in {
                gen.OCI_CONFIG,
                gen.DOCKER_CONFIG,
            }:
                continue
            manifests += 1
            config = json.loads(_read(walk.blob(str(config_descriptor["digest"]))))
            layers = document["layers"]
            assert isinstance(layers, list)
            assert len(config["rootfs"]["diff_ids"]) == len(layers)
            if config["os"] != "unknown":  # BuildKit's attestation configs say no more than rootfs
                assert config["history"]
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", config["created"])
            platform = (config["os"], config["architecture"], config.get("variant", ""), config.get("os.version", ""))
            platforms.add(platform)
            given = walk.platforms.get(digest)
            if given is not None:
                keys = ("os", "architecture", "variant", "os.version")
                assert tuple(given.get(k, "") for k in keys) == platform, digest
            layer_types.update(str(layer["mediaType"]) for layer in layers)
    assert manifests > 1000
    assert {
        ("linux", "amd64", "", ""),
        ("linux", "arm64", "v8", ""),
        ("linux", "arm", "v7", ""),
        ("windows", "amd64", "", "10.0.20348.2227"),
    } <= platforms
    assert {gen.OCI_LAYER, gen.DOCKER_LAYER, gen.OCI_LAYER_ZSTD} <= layer_types


def test_layers_and_configs_are_shared_as_on_a_build_host(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    info = graph_tree[0]
    users: dict[str, set[str]] = {}  # layer or config digest -> manifests using it
    configs: set[str] = set()
    layouts_holding: dict[str, int] = {}
    layer_sizes: list[int] = []
    for path in info.layouts:
        walk = Walk(path)
        for name in walk.held:
            layouts_holding["sha256:" + name] = layouts_holding.get("sha256:" + name, 0) + 1
        for digest, document in walk.documents.items():
            config = document.get("config")
            if not isinstance(config, dict) or config["mediaType"] not in {gen.OCI_CONFIG, gen.DOCKER_CONFIG}:
                continue
            configs.add(str(config["digest"]))
            users.setdefault(str(config["digest"]), set()).add(digest)
            for layer in document["layers"]:  # type: ignore[attr-defined]
                users.setdefault(str(layer["digest"]), set()).add(digest)
                layer_sizes.append(int(layer["size"]))
    shared_layers = [d for d, manifests in users.items() if d not in configs and len(manifests) >= 10]
    assert shared_layers, "no base layer is shared by many images"
    # A Docker image converted to OCI (skopeo --format oci) keeps its config: two manifests, one config.
    assert any(len(users[d]) >= 2 for d in configs)
    # Blob files per distinct blob: popular images and base layers repeat across layouts.
    assert info.blobs / len(layouts_holding) > 1.4
    assert max(layouts_holding.values()) >= len(info.layouts) // 3
    layer_sizes.sort()
    median = layer_sizes[len(layer_sizes) // 2]
    assert 100_000 < median < 50_000_000, median  # compressed layers: most are megabytes, many are tiny
    assert layer_sizes[len(layer_sizes) // 10] < 10_000
    assert layer_sizes[-1] > 100_000_000


def test_huge_layout_has_one_entry_with_the_target_tag_at_its_end(tmp_path: Path) -> None:
    path = str(tmp_path / "huge")
    names = gen.generate_huge(path, 500, "1", target_tag="bench-target")
    snapshot = read_layout(path)
    assert len(snapshot.entries) == 500
    assert sum(len(e.names) for e in snapshot.entries) == names
    assert not snapshot.warnings
    with open(os.path.join(path, "index.json"), "rb") as fh:
        manifests = json.load(fh)["manifests"]
    tagged = [m for m in manifests if m.get("annotations", {}).get(gen.REF_NAME) == "bench-target"]
    assert tagged == [manifests[-1]]
    assert tagged[0]["mediaType"] in MANIFEST_TYPES
    walk = Walk(path)
    assert not walk.missing() and not walk.unreferenced()


def test_the_baseline_script_reads_the_graph_the_generator_wrote(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]], tmp_path: Path
) -> None:
    info, _, models = graph_tree
    script = os.path.join(os.path.dirname(gen.__file__), "baseline_scan.py")
    db = str(tmp_path / "baseline.db")
    done = subprocess.run([sys.executable, script, "--graph", info.root, db], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(GRAPH_LAYOUTS)
    conn = sqlite3.connect(db)
    try:
        paths = dict(conn.execute("SELECT path, id FROM layouts"))
        manifests: set[str] = set()
        for path, model in zip(info.layouts, models, strict=True):
            layout_id = paths[path]
            missing = {
                d for (d,) in conn.execute("SELECT digest FROM baseline_missing WHERE layout_id = ?", (layout_id,))
            }
            assert missing == model.missing, path
            garbage = dict(
                conn.execute("SELECT digest, size FROM baseline_unreferenced WHERE layout_id = ?", (layout_id,))
            )
            assert set(garbage) == model.unreferenced, path
            walk = Walk(path)
            assert all(os.stat(walk.blob(d)).st_size == size for d, size in garbage.items())
            held_manifests = {
                d for d, doc in walk.documents.items() if "layers" in doc and isinstance(doc.get("config"), dict)
            }
            linked = {
                d
                for (d,) in conn.execute(
                    "SELECT digest FROM baseline_layout_manifests WHERE layout_id = ?", (layout_id,)
                )
            }
            assert linked == held_manifests, path
            manifests |= held_manifests
        rows = dict(conn.execute("SELECT digest, layers FROM baseline_manifests"))
        assert set(rows) == manifests
        platforms = {tuple(r) for r in conn.execute("SELECT DISTINCT os, architecture FROM baseline_manifests")}
        assert ("linux", "amd64") in platforms and ("windows", "amd64") in platforms
        subjects = conn.execute("SELECT count(*) FROM baseline_manifests WHERE subject IS NOT NULL").fetchone()[0]
        assert subjects > 0
    finally:
        conn.close()


def test_the_du_reference_walk_counts_what_the_generator_wrote(
    graph_tree: tuple[gen.TreeInfo, int, list[gen.LayoutModel]],
) -> None:
    from benchmarks.graph import walk_tree

    info, _, models = graph_tree
    stats = walk_tree(info.root)
    assert stats.layouts == GRAPH_LAYOUTS and stats.blob_files == info.blobs
    walks = [Walk(path) for path in info.layouts]
    holders: dict[str, int] = {}
    for walk in walks:
        for name in walk.held:
            holders[name] = holders.get(name, 0) + 1
    rows = {str(row["layout"]): row for row in stats.du}
    for walk, model in zip(walks, models, strict=True):
        row = rows[os.path.realpath(walk.path)]
        assert row["unreferenced_blobs"] == len(model.unreferenced)
        assert row["missing_blobs"] == len(model.missing)
        sizes = {name: os.stat(os.path.join(walk.path, "blobs", "sha256", name)).st_size for name in walk.held}
        referenced = {d.partition(":")[2] for d in walk.referenced} & walk.held
        shared = sum(sizes[name] for name in referenced if holders[name] > 1)
        assert row["referenced_bytes"] == sum(sizes[name] for name in referenced)
        assert row["shared_bytes"] == shared
        assert row["unique_bytes"] == sum(sizes[name] for name in referenced) - shared
        assert row["unreferenced_bytes"] == sum(sizes[name] for name in walk.held - referenced)
    assert stats.total()["unreferenced_blobs"] == info.unreferenced_blobs
