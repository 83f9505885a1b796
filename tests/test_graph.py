"""The content graph's parsers and reads: manifests, configs, hostile blobs (indexer/graph/)."""

from __future__ import annotations

import json
import os

import pytest
from layouts import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    LINUX_AMD64,
    LINUX_ARM64_V8,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Layout,
    canonical_json,
    digest_of,
)

from indexer import graph
from indexer.errors import BlobError
from indexer.graph import (
    OCI_ARTIFACT_MANIFEST,
    BlobRef,
    Known,
    LayoutGraph,
    graph_key,
    parse_config,
    parse_index_head,
    parse_manifest,
    read_config,
    read_layout_graph,
    read_manifest,
)
from indexer.layout import BlobMissing, Limits, Platform, read_layout
from indexer.store.rows import graph_rows

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from indexer.store.rows import GraphRows

HEX = "a" * 64
DIGEST = "sha256:" + HEX
LAYER = {"mediaType": OCI_LAYER, "digest": "sha256:" + "b" * 64, "size": 1000}
CONFIG = {"mediaType": OCI_CONFIG, "digest": "sha256:" + "c" * 64, "size": 300}
SUBJECT = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": 500}


def manifest_bytes(**fields: object) -> bytes:
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CONFIG, "layers": [LAYER]}
    document.update(fields)
    return canonical_json({k: v for k, v in document.items() if v is not None})


def parse(data: bytes) -> graph.Manifest:
    return parse_manifest(data, DIGEST, len(data))


def no_control_characters(text: str) -> bool:
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "layout")


# -- manifests ---------------------------------------------------------------------------------


def test_an_image_manifest_gives_config_layers_and_size() -> None:
    data = manifest_bytes(layers=[LAYER, {**LAYER, "digest": "sha256:" + "e" * 64, "size": 24}])
    found = parse(data)
    assert found.kind == "manifest" and found.media_type == OCI_MANIFEST and found.complete
    assert found.config == BlobRef(str(CONFIG["digest"]), OCI_CONFIG, 300)
    assert [layer.digest for layer in found.layers] == [LAYER["digest"], "sha256:" + "e" * 64]
    assert found.image_size == len(data) + 300 + 1000 + 24
    assert found.subject is None and found.artifact_type == "" and found.warnings == ()


def test_a_docker_manifest() -> None:
    config = {**CONFIG, "mediaType": DOCKER_CONFIG}
    found = parse(
        manifest_bytes(mediaType=DOCKER_MANIFEST, config=config, layers=[{**LAYER, "mediaType": DOCKER_LAYER}])
    )
    assert found.media_type == DOCKER_MANIFEST and found.config is not None
    assert found.config.media_type == DOCKER_CONFIG and found.layers[0].media_type == DOCKER_LAYER


def test_a_referrer_keeps_subject_artifact_type_and_annotations() -> None:
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2}
    found = parse(
        manifest_bytes(
            config=empty,
            artifactType="application/vnd.dev.sigstore.bundle.v0.3+json",
            subject=SUBJECT,
            annotations={"org.opencontainers.image.created": "2025-01-01T00:00:00Z"},
        )
    )
    assert found.subject == SUBJECT["digest"]
    assert found.referrer_type == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert found.annotations == {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}


def test_referrer_type_falls_back_to_the_config_media_type() -> None:
    found = parse(manifest_bytes(config={**CONFIG, "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json"}))
    assert found.referrer_type == "application/vnd.dev.cosign.simplesigning.v1+json"


def test_an_artifact_manifest_lists_blobs() -> None:
    found = parse(
        canonical_json({"mediaType": OCI_ARTIFACT_MANIFEST, "artifactType": "application/x-sbom", "blobs": [LAYER]})
    )
    assert found.config is None and [b.digest for b in found.layers] == [LAYER["digest"]] and found.complete


def test_layers_with_urls_are_external() -> None:
    foreign = {**LAYER, "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "urls": ["https://x"]}
    found = parse(manifest_bytes(layers=[LAYER, foreign]))
    assert [layer.external for layer in found.layers] == [False, True]


def test_an_index_document_is_not_a_manifest() -> None:
    with pytest.raises(BlobError, match="is an image index"):
        parse(canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}))


@pytest.mark.parametrize(
    ("fields", "warning"),
    [
        pytest.param({"config": "sha256:x"}, "config: descriptor is a JSON string", id="config a string"),
        pytest.param({"config": {**CONFIG, "size": -1}}, 'config: "size" is -1', id="config negative size"),
        pytest.param({"config": {**CONFIG, "size": True}}, 'config: "size" is a JSON boolean', id="config bool size"),
        pytest.param({"layers": {"0": LAYER}}, '"layers" is a JSON object, not a list', id="layers an object"),
        pytest.param({"layers": [LAYER, 7]}, "layers[1]: descriptor is a JSON number", id="a layer a number"),
        pytest.param(
            {"layers": [{**LAYER, "digest": "sha256:../../../etc/passwd"}]},
            "layers[0]: digest",
            id="a layer digest escaping blobs/",
        ),
        pytest.param({"layers": [{**LAYER, "mediaType": 3}]}, '"mediaType" is a JSON number', id="layer media type"),
    ],
)
def test_an_unusable_reference_is_skipped_and_leaves_the_manifest_incomplete(
    fields: dict[str, object], warning: str
) -> None:
    found = parse(manifest_bytes(**fields))
    assert not found.complete
    assert any(warning in text for text in found.warnings), found.warnings
    assert all(text.startswith(f"manifest {DIGEST}: ") for text in found.warnings)
    for blob in (found.config, *found.layers):
        assert blob is None or ".." not in blob.digest


@pytest.mark.parametrize(
    ("fields", "warning"),
    [
        pytest.param({"artifactType": 7}, '"artifactType" is a JSON number', id="artifactType"),
        pytest.param({"mediaType": ["x"]}, '"mediaType" is a JSON array', id="mediaType"),
        pytest.param({"annotations": [1]}, '"annotations" is a JSON array', id="annotations"),
        pytest.param({"subject": "sha256:" + "d" * 64}, '"subject" is not a descriptor', id="subject a string"),
        pytest.param({"subject": {"digest": "sha256:ZZ"}}, "subject digest", id="subject bad digest"),
    ],
)
def test_a_bad_optional_field_is_dropped_with_a_warning(fields: dict[str, object], warning: str) -> None:
    found = parse(manifest_bytes(**fields))
    assert found.complete  # nothing it references was lost
    assert any(warning in text for text in found.warnings), found.warnings
    assert found.subject is None


def test_no_config_and_no_layers_is_an_empty_complete_manifest() -> None:
    found = parse(canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST}))
    assert found.config is None and found.layers == () and found.complete


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(manifest_bytes()[:-7], "truncated", id="truncated"),
        pytest.param(b"[1,2]", "JSON array, not an object", id="a list"),
        pytest.param(b'"manifest"', "JSON string, not an object", id="a string"),
        pytest.param(b'{"layers":[NaN]}', "NaN", id="NaN"),
        pytest.param(b'\xef\xbb\xbf{"layers":[]}', "BOM", id="BOM"),
        pytest.param(b'{"annotations":{"a":"\xff"}}', "not valid UTF-8", id="invalid UTF-8"),
        pytest.param(manifest_bytes() + b"{}", "trailing data", id="trailing data"),
        pytest.param(b'{"layers":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply", id="100k deep"),
    ],
)
def test_an_unusable_manifest_document_is_a_blob_error(data: bytes, needle: str) -> None:
    with pytest.raises(BlobError) as info:
        parse(data)
    assert needle in info.value.message and DIGEST in info.value.message
    assert info.value.category == "blob_invalid"


def test_control_characters_never_reach_a_warning() -> None:
    hostile = "\x1b[31mred\x1b]0;pwned\x07\x9b"
    found = parse(manifest_bytes(layers=[{**LAYER, "mediaType": 1, "annotations": {hostile: hostile}}]))
    assert found.warnings and all(no_control_characters(text) for text in found.warnings)
    with pytest.raises(BlobError) as info:
        parse(manifest_bytes(mediaType=OCI_INDEX + hostile)[:-1])
    assert no_control_characters(info.value.message)


def test_lone_surrogates_become_replacement_characters() -> None:
    found = parse(b'{"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"x\\ud800",'
                  b'"annotations":{"k\\udfff":"v\\ud800"}}')  # fmt: skip
    assert found.artifact_type == "x\ufffd" and found.annotations == {"k\ufffd": "v\ufffd"}
    json.dumps(found.annotations).encode("utf-8")


def test_the_layers_of_one_manifest_are_bounded() -> None:
    data = manifest_bytes(layers=[LAYER] * 5)
    found = parse_manifest(data, DIGEST, len(data), limits=Limits(max_children=3))
    assert len(found.layers) == 3 and not found.complete
    assert any("more than 3 layers" in text for text in found.warnings)


def test_an_index_head() -> None:
    head: dict[str, object] = {
        "mediaType": OCI_INDEX,
        "artifactType": "application/x",
        "subject": SUBJECT,
        "annotations": {"a": "b"},
    }
    found = parse_index_head(DIGEST, 100, OCI_INDEX, head)
    assert (found.kind, found.subject, found.artifact_type, found.annotations) == (
        "index",
        SUBJECT["digest"],
        "application/x",
        {"a": "b"},
    )
    assert found.image_size is None and found.config is None
    bad = parse_index_head(DIGEST, 100, OCI_INDEX, {"artifactType": 1, "subject": [1], "annotations": "x"})
    assert bad.subject is None and len(bad.warnings) == 3 and bad.media_type == OCI_INDEX


# -- configs -----------------------------------------------------------------------------------


def config(**fields: object) -> graph.ImageConfig:
    return parse_config(canonical_json(fields), DIGEST)


def test_a_config_gives_the_platform_and_created() -> None:
    found = config(
        architecture="arm64",
        os="linux",
        variant="v8",
        created="2024-05-01T12:00:00.123456789Z",
        config={"Env": ["PATH=/bin"]},
        rootfs={"type": "layers", "diff_ids": []},
    )
    assert found.platform == Platform("linux", "arm64", "v8")
    assert found.created == "2024-05-01T12:00:00.123456789Z" and found.warnings == ()


def test_a_windows_config_keeps_os_version_and_features() -> None:
    found = config(architecture="amd64", os="windows", **{"os.version": "10.0.17763.1", "os.features": ["win32k"]})
    assert found.platform == Platform("windows", "amd64", "", "10.0.17763.1", ("win32k",))


def test_a_config_without_os_or_architecture_has_no_platform() -> None:
    assert config(created="2024-01-01T00:00:00Z").platform is None
    assert config(os="", architecture="").platform is None


@pytest.mark.parametrize(
    ("fields", "warning"),
    [
        pytest.param({"os": "linux", "architecture": 64}, 'platform "architecture" is a JSON number', id="arch"),
        pytest.param({"os": ["linux"], "architecture": "amd64"}, 'platform "os" is a JSON array', id="os"),
        pytest.param({"os": "linux", "architecture": "amd64", "os.features": "x"}, "os.features", id="features"),
        pytest.param({"os": "linux", "architecture": "amd64", "variant": None}, '"variant" is a JSON null', id="null"),
    ],
)
def test_a_bad_platform_field_drops_the_platform(fields: dict[str, object], warning: str) -> None:
    found = config(**fields)
    assert found.platform is None
    assert any(warning in text for text in found.warnings), found.warnings


@pytest.mark.parametrize(
    ("created", "warning"),
    [(1714564800, "a JSON number"), ({"t": 1}, "a JSON object"), ("2024" * 100, "400 characters long")],
)
def test_a_created_that_is_not_a_time_is_dropped(created: object, warning: str) -> None:
    found = config(os="linux", architecture="amd64", created=created)
    assert found.created is None and found.platform is not None
    assert any(warning in text for text in found.warnings)


@pytest.mark.parametrize(
    "data",
    [b"[]", b"null", b"", b'{"os":"linux"', b'{"history":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"\xc0\xaf"],
    ids=["list", "null", "empty", "truncated", "deep", "invalid UTF-8"],
)
def test_an_unusable_config_is_a_blob_error(data: bytes) -> None:
    with pytest.raises(BlobError, match=f"config {DIGEST}"):
        parse_config(data, DIGEST)


def test_a_config_string_with_control_characters_is_kept_as_written() -> None:
    found = config(os="linux", architecture="amd64", created="2024\x1b[2J")
    assert found.created == "2024\x1b[2J"  # exact in JSON; text output escapes it (errors.printable)


# -- reading blobs -----------------------------------------------------------------------------


def test_read_manifest_and_config_from_a_layout(layout: Layout) -> None:
    descriptor = layout.manifest(platform=LINUX_ARM64_V8)
    found = read_manifest(layout.path, str(descriptor["digest"]), int(str(descriptor["size"])))
    assert found.config is not None and len(found.layers) == 1
    conf = read_config(layout.path, found.config.digest, found.config.size)
    assert conf.platform == Platform("linux", "arm64", "v8")


def test_a_missing_manifest_is_blob_missing(layout: Layout) -> None:
    with pytest.raises(BlobMissing):
        read_manifest(layout.path, DIGEST, 10)


def hostile_copy(layout: Layout, good: bytes, how: str, tmp_path: Path) -> str:
    """Put a hostile blob where *good*'s digest names it in *layout*; its digest."""
    digest = digest_of(good)
    path = layout.blob_path(digest)
    if how == "bad hash":
        with open(path, "wb") as f:
            f.write(good[:-1] + b" ")
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(1 << 30)  # sparse: a gigabyte that costs nothing on disk
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        os.mkdir(path)
    elif how == "symlink outside":
        outside = tmp_path / f"outside-{len(os.listdir(tmp_path))}"
        outside.write_bytes(good)
        os.symlink(outside, path)
    else:
        raise AssertionError(how)
    return digest


HOSTILE = ["bad hash", "huge", "fifo", "directory", "symlink outside"]


LINUX_ARM64 = {"os": "linux", "architecture": "arm64"}


def config_of(layout: Layout, descriptor: dict[str, object]) -> str:
    """The config digest of the manifest *descriptor* names in *layout*."""
    with open(layout.blob_path(str(descriptor["digest"])), "rb") as f:
        return str(json.load(f)["config"]["digest"])


def read_pass(layouts: list[Layout], known: Known) -> list[tuple[LayoutGraph, GraphRows]]:
    """Each layout's graph and rows as one worker makes them in one pass (*known* shared)."""
    found = []
    for lay in layouts:
        lay_graph = read_layout_graph(lay.path, read_layout(lay.path), Limits(max_blob_bytes=1 << 20), known)
        found.append((lay_graph, graph_rows(lay_graph, known)))
    return found


def sent_digests(rows: GraphRows) -> list[str]:
    """The digests of the manifests' and configs' rows sent with one layout."""
    manifests, _users, configs, _attestations = rows[3]
    return sorted([str(row[1]) for row in manifests] + [str(row[1]) for row in configs])


@pytest.mark.parametrize("how", HOSTILE)
def test_a_hostile_manifest_blob_is_refused_and_poisons_no_other_layout(tmp_path: Path, how: str) -> None:
    good_layout = Layout(tmp_path / "good")
    descriptor = good_layout.manifest(platform=LINUX_AMD64)
    good_layout.write_index([descriptor])
    digest, size = str(descriptor["digest"]), int(str(descriptor["size"]))
    with open(good_layout.blob_path(digest), "rb") as f:
        good = f.read()
    bad_layout = Layout(tmp_path / "bad")
    hostile_copy(bad_layout, good, how, tmp_path)
    bad_layout.write_index([descriptor])
    with pytest.raises(BlobError) as info:
        read_manifest(bad_layout.path, digest, size, Limits(max_blob_bytes=1 << 20))
    assert not isinstance(info.value, BlobMissing)
    known = Known()
    (bad, bad_rows), (good_graph, good_rows) = read_pass([bad_layout, good_layout], known)  # the bad one first
    assert not bad.complete and digest not in bad.reach.shapes
    assert digest not in sent_digests(bad_rows) and graph_key(digest) not in bad_rows[4]
    # The good layout's copy is read and sent with it: nothing of the bad copy was kept.
    assert good_graph.complete and digest in sent_digests(good_rows)
    assert good_graph.reach.manifests[digest] == parse_manifest(good, digest, len(good))


@pytest.mark.parametrize("how", HOSTILE)
def test_a_hostile_config_blob_is_refused_and_poisons_no_other_layout(tmp_path: Path, how: str) -> None:
    good_layout = Layout(tmp_path / "good")
    descriptor = good_layout.manifest(platform=LINUX_ARM64, label="configured")
    good_layout.write_index([descriptor])
    config_digest = config_of(good_layout, descriptor)
    with open(good_layout.blob_path(config_digest), "rb") as f:
        data = f.read()
    bad_layout = Layout(tmp_path / "bad")
    bad_layout.manifest(platform=LINUX_ARM64, label="configured")
    os.remove(bad_layout.blob_path(config_digest))
    hostile_copy(bad_layout, data, how, tmp_path)
    bad_layout.write_index([descriptor])
    with pytest.raises(BlobError):
        read_config(bad_layout.path, config_digest, len(data), Limits(max_blob_bytes=1 << 20))
    known = Known()
    (bad, bad_rows), (good_graph, good_rows) = read_pass([bad_layout, good_layout], known)
    assert config_digest not in bad.configs and config_digest not in sent_digests(bad_rows)
    assert any(config_digest in w for w in bad.warnings)
    # The manifest was sent with the bad layout; its config is read from the good one, and sent with it.
    assert str(descriptor["digest"]) in sent_digests(bad_rows)
    assert good_graph.configs[config_digest].platform == Platform("linux", "arm64")
    assert config_digest in sent_digests(good_rows)


def test_a_manifest_is_read_once_per_pass_and_its_rows_sent_once(tmp_path: Path) -> None:
    first, second = Layout(tmp_path / "first"), Layout(tmp_path / "second")
    descriptor = first.manifest(platform=LINUX_AMD64, label="shared")
    second.manifest(platform=LINUX_AMD64, label="shared")  # the same bytes, so the same digest
    first.write_index([descriptor])
    second.write_index([descriptor])
    digest = str(descriptor["digest"])
    config_digest = config_of(first, descriptor)
    known = Known()
    ((first_graph, first_rows),) = read_pass([first], known)
    assert sent_digests(first_rows) == sorted([digest, config_digest]) and first_rows[4] == []
    with open(second.blob_path(digest), "wb") as f:
        f.write(b"not read again: the digest names the content")
    ((second_graph, second_rows),) = read_pass([second], known)
    assert sent_digests(second_rows) == [] and sorted(second_rows[4]) == sorted(
        [graph_key(digest), -graph_key(config_digest) - 1]
    )  # claimed, not sent again
    assert second_graph.reach.refs == first_graph.reach.refs and second_graph.complete
    assert second_rows[1] == first_rows[1]  # the same figures, held set and missing list
    # A new pass (a new Known) reads it again, and refuses what the second layout now holds.
    ((again, again_rows),) = read_pass([second], Known())
    assert not again.complete and digest not in sent_digests(again_rows)


def test_a_manifest_whose_blob_is_too_big_for_the_limits(layout: Layout) -> None:
    descriptor = layout.manifest()
    with pytest.raises(BlobError, match="over the limit of 64 bytes"):
        read_manifest(layout.path, str(descriptor["digest"]), None, Limits(max_blob_bytes=64))


# -- nested indexes as the graph sees them (indexer.layout.Snapshot) ----------------------------


def test_a_snapshot_records_each_nested_index_blob_and_is_complete(layout: Layout) -> None:
    inner = layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8])
    outer = layout.index([inner], annotations={"x": "y"})
    layout.write_index([outer])
    snapshot = read_layout(layout.path)
    assert [(b.digest, b.state, b.skipped) for b in snapshot.indexes] == [
        (outer["digest"], "ok", 0),
        (inner["digest"], "ok", 0),
    ]
    assert snapshot.indexes[0].head == {"mediaType": OCI_INDEX, "annotations": {"x": "y"}}
    assert snapshot.complete


@pytest.mark.parametrize("how", ["missing", "bad descriptor", "deep", "skipped entry", "truncated", "bad hash"])
def test_a_snapshot_that_does_not_know_everything_it_references_is_incomplete(layout: Layout, how: str) -> None:
    limits = Limits()
    index = layout.multiarch([LINUX_AMD64])
    entries: list[dict[str, object]] = [index]
    if how == "missing":
        layout.remove_blob(index)
    elif how == "bad descriptor":
        entries = [layout.index([layout.manifest(), {"digest": 7}])]
    elif how == "deep":
        for _ in range(3):
            index = layout.index([index])
        entries, limits = [index], Limits(max_depth=2)
    elif how == "skipped entry":
        entries.append({"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": "1"})
    elif how == "truncated":
        entries, limits = [layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8])], Limits(max_children=1)
    else:
        with open(layout.blob_path(str(index["digest"])), "ab") as f:
            f.write(b" ")
    layout.write_index(entries)
    assert not read_layout(layout.path, limits=limits).complete
