"""What the content graph answers: resolve/ls fields, find @LAYER, referrers, du (docs/semantics.md).

Layouts are real directories with real blobs; they are indexed with ``ocidx scan`` into a real SQLite
file (or read through, with no scan) and asked through the command line, in process.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    UNKNOWN_PLATFORM,
    Layout,
    built_image,
    document,
    named,
    referrer,
    with_platform,
)

from indexer.cli import main
from indexer.query import Index

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from layouts import Descriptor


class Run:
    def __init__(self, tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = os.path.join(tmp_path, "index.db")
        self.root = os.path.join(tmp_path, "root")
        self.capsys = capsys
        os.makedirs(self.root, exist_ok=True)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([args[0], "--db", self.db, *args[1:]])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str, code: int = 0) -> Any:
        """``ocidx ARGS --json``, which must exit *code*: its document."""
        got, out, err = self(*args, "--json")
        assert got == code and out, err
        return json.loads(out)

    def scan(self) -> None:
        code, _, err = self("scan", "--no-progress", self.root)
        assert code == 0, err

    def layout(self, name: str) -> Layout:
        return Layout(os.path.join(self.root, name))


@pytest.fixture
def ocidx(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(str(tmp_path), capsys)


def image_bytes(layout: Layout, descriptor: Descriptor) -> int:
    manifest = document(layout, descriptor)
    return (
        int(str(descriptor["size"])) + int(manifest["config"]["size"]) + sum(int(x["size"]) for x in manifest["layers"])
    )


# -- resolve and ls --------------------------------------------------------------------------------


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "read-through"])
def test_resolve_json_tells_config_layers_size_created_and_the_configs_platform(ocidx: Run, indexed: bool) -> None:
    lay = ocidx.layout("app")
    image = built_image(lay, LINUX_ARM64, "app", [b"base layer", b"app layer"])
    lay.write_index([named(image, ref="v1")])
    if indexed:
        ocidx.scan()
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    manifest = document(lay, image)
    assert answer["platform"] == {"os": "linux", "architecture": "arm64", "variant": None}
    assert (answer["config"], answer["layers"], answer["image_size"], answer["created"]) == (
        manifest["config"]["digest"],
        2,
        image_bytes(lay, image),
        "2025-03-04T05:06:07Z",
    )
    assert answer["freshness"] == ("indexed" if indexed else "read-through")


def test_a_descriptors_platform_wins_over_its_configs(ocidx: Run) -> None:
    lay = ocidx.layout("odd")
    image = built_image(lay, LINUX_AMD64, "odd", [b"x"])
    lay.write_index([named(with_platform(image, LINUX_ARM64), ref="v1")])
    ocidx.scan()
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert answer["platform"] == {"os": "linux", "architecture": "arm64", "variant": None}


def test_an_index_has_no_config_layers_or_size_and_its_children_do(ocidx: Run) -> None:
    lay = ocidx.layout("multi")
    amd, arm = built_image(lay, LINUX_AMD64, "a", [b"a"]), built_image(lay, LINUX_ARM64, "b", [b"b", b"c"])
    index = lay.index([with_platform(amd, LINUX_AMD64), with_platform(arm, LINUX_ARM64)])
    lay.write_index([named(index, ref="v1")])
    ocidx.scan()
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert (answer["config"], answer["layers"], answer["image_size"], answer["created"]) == (None, None, None, None)
    child = ocidx.json("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}:v1")
    assert (child["source"], child["layers"], child["image_size"]) == ("child", 2, image_bytes(lay, arm))
    (detail,) = ocidx.json("ls", lay.path)
    (entry,) = detail["entries"]
    assert entry["layers"] is None and [c["layers"] for c in entry["children"]] == [1, 2]
    assert [c["image_size"] for c in entry["children"]] == [image_bytes(lay, amd), image_bytes(lay, arm)]
    out = ocidx("ls", lay.path)[1]
    lines = out.splitlines()
    assert any(
        line.startswith("    linux/arm64\t" + str(arm["digest"])) and line.endswith("\t2 layers") for line in lines
    )


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "read-through"])
def test_image_size_is_null_when_one_of_its_blobs_is_absent(ocidx: Run, indexed: bool) -> None:
    lay = ocidx.layout("partial")
    image = built_image(lay, LINUX_AMD64, "p", [b"kept", b"left out of the export"])
    lay.write_index([named(image, ref="v1")])
    lay.remove_blob(document(lay, image)["layers"][1])
    if indexed:
        ocidx.scan()
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert (answer["layers"], answer["image_size"]) == (2, None)
    out = ocidx("ls", lay.path)[1]
    assert "\tincomplete\t2 layers" in out


def test_a_blob_removed_after_indexing_is_seen_by_the_next_answer(ocidx: Run) -> None:
    lay = ocidx.layout("later")
    image = built_image(lay, LINUX_AMD64, "l", [b"one"])
    lay.write_index([named(image, ref="v1")])
    ocidx.scan()
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert answer["image_size"] == image_bytes(lay, image)
    lay.remove_blob(document(lay, image)["layers"][0])  # no scan, no daemon: the lookup sees it itself
    answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert (answer["image_size"], answer["freshness"]) == (None, "indexed")


def test_ls_text_shows_platform_size_and_layers(ocidx: Run) -> None:
    lay = ocidx.layout("text")
    image = built_image(lay, LINUX_ARM64, "t", [b"l" * 1500])
    lay.write_index([named(image, ref="v1")])
    ocidx.scan()
    out = ocidx("ls", lay.path)[1]
    line = next(line for line in out.splitlines() if str(image["digest"]) in line)
    size = image_bytes(lay, image)
    assert line.split("\t")[2:] == ["linux/arm64", f"{size / 1000:.1f} kB", "1 layer"]


# -- find @LAYER, @CONFIG ------------------------------------------------------------------------


def test_find_a_layer_lists_the_layouts_whose_images_use_it(ocidx: Run) -> None:
    base = b"the vulnerable base layer"
    one, two, holder = ocidx.layout("one"), ocidx.layout("two"), ocidx.layout("holder")
    a = built_image(one, LINUX_AMD64, "a", [base, b"a's own"])
    b = built_image(two, LINUX_AMD64, "b", [base])
    c = built_image(two, LINUX_ARM64, "c", [b"c", base])
    one.write_index([named(a, ref="v1")])
    two.write_index([named(b, ref="v1"), named(lay_index := two.index([c]), ref="v2")])
    layer = holder.blob(base, OCI_LAYER)  # held, but nothing in that layout references it
    holder.write_index([])
    ocidx.scan()
    found = ocidx.json("find", f"@{layer['digest']}")
    assert [(f["layout"], f["source"], f["used_by"]) for f in found] == [
        (os.path.realpath(one.path), "layer", [a["digest"]]),
        (os.path.realpath(two.path), "layer", sorted([str(b["digest"]), str(c["digest"])])),
    ]
    assert all(f["mediaType"] == OCI_LAYER and f["size"] == len(base) and f["names"] == [] for f in found)
    answer = ocidx.json("resolve", f"oci-layout://{holder.path}@{layer['digest']}")
    assert answer["source"] == "blob"  # resolve in one layout keeps answering a bare blob
    del lay_index


def test_find_a_config_lists_its_images(ocidx: Run) -> None:
    lay = ocidx.layout("lay")
    image = built_image(lay, LINUX_AMD64, "c", [b"x"])
    lay.write_index([named(image, ref="v1")])
    ocidx.scan()
    config = document(lay, image)["config"]
    found = ocidx.json("find", f"@{config['digest']}")
    assert [(f["source"], f["used_by"], f["mediaType"], f["size"]) for f in found] == [
        ("config", [image["digest"]], OCI_CONFIG, config["size"])
    ]


def test_find_a_layer_verifies_every_layout_it_answers(ocidx: Run) -> None:
    base = b"shared base"
    kept, dropped, added = ocidx.layout("kept"), ocidx.layout("dropped"), ocidx.layout("added")
    image = built_image(kept, LINUX_AMD64, "k", [base])
    kept.write_index([named(image, ref="v1")])
    other = built_image(dropped, LINUX_AMD64, "d", [base])
    dropped.write_index([named(other, ref="v1")])
    added.write_index([])
    ocidx.scan()
    dropped.write_index([])  # no longer references the layer (no scan since)
    fresh = built_image(added, LINUX_ARM64, "n", [b"own", base])
    added.write_index([named(fresh, ref="v1")])  # now references it (no scan since)
    layer = document(kept, image)["layers"][0]["digest"]
    found = ocidx.json("find", f"@{layer}")
    assert [(os.path.basename(f["layout"]), f["freshness"], f["used_by"]) for f in found] == [
        ("added", "read-through", [fresh["digest"]]),
        ("kept", "indexed", [image["digest"]]),
    ]


def test_find_a_layer_absent_from_a_partial_export_warns(ocidx: Run) -> None:
    lay = ocidx.layout("partial")
    image = built_image(lay, LINUX_AMD64, "p", [b"missing here"])
    lay.write_index([named(image, ref="v1")])
    layer = document(lay, image)["layers"][0]
    lay.remove_blob(layer)
    ocidx.scan()
    found = ocidx.json("find", f"@{layer['digest']}")
    (match,) = found
    assert match["source"] == "layer" and any("not in" in w for w in match["warnings"])


# -- referrers -----------------------------------------------------------------------------------


SBOM = "application/spdx+json"


def test_referrers_by_subject_across_layouts(ocidx: Run) -> None:
    one, two = ocidx.layout("one"), ocidx.layout("two")
    image = built_image(one, LINUX_AMD64, "signed", [b"x"])
    built_image(two, LINUX_AMD64, "signed", [b"x"])
    sbom = referrer(one, image, SBOM, b"the sbom", **{"org.opencontainers.image.created": "2025-01-01T00:00:00Z"})
    one.write_index([named(image, ref="v1"), sbom])  # the OCI layout way: referrers listed in index.json
    signature = referrer(two, image, "application/vnd.dev.sigstore.bundle.v0.3+json", b"sig")
    two.write_index([named(image, ref="v1"), signature])
    ocidx.scan()
    for target in (f"oci-layout://{one.path}:v1", f"@{image['digest']}", str(image["digest"]).split(":")[1]):
        found = ocidx.json("referrers", target)
        assert [(os.path.basename(r["layout"]), r["digest"], r["artifactType"], r["how"]) for r in found] == [
            ("one", sbom["digest"], SBOM, "subject"),
            ("two", signature["digest"], "application/vnd.dev.sigstore.bundle.v0.3+json", "subject"),
        ]
        assert found[0]["subject"] == image["digest"] and found[0]["mediaType"] == OCI_MANIFEST
        assert found[0]["annotations"] == {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}
        assert list(found[0]) == ["layout", "digest", "mediaType", "artifactType", "subject", "annotations", "how"]


def test_referrers_of_a_buildkit_image_are_its_attestation_manifests(ocidx: Run) -> None:
    lay = ocidx.layout("buildx")
    amd = built_image(lay, LINUX_AMD64, "amd", [b"amd"])
    arm = built_image(lay, LINUX_ARM64, "arm", [b"arm"])
    attestations = []
    for image in (amd, arm):
        statement = built_image(
            lay, UNKNOWN_PLATFORM, f"provenance of {image['digest']}", [b"in-toto " + str(image["digest"]).encode()]
        )
        attestations.append(
            {
                **with_platform(statement, UNKNOWN_PLATFORM),
                "annotations": {
                    "vnd.docker.reference.digest": str(image["digest"]),
                    "vnd.docker.reference.type": "attestation-manifest",
                },
            }
        )
    index = lay.index([with_platform(amd, LINUX_AMD64), with_platform(arm, LINUX_ARM64), *attestations])
    lay.write_index([named(index, ref="latest")])
    ocidx.scan()
    found = ocidx.json("referrers", f"@{arm['digest']}")
    assert [(r["digest"], r["how"], r["subject"]) for r in found] == [
        (attestations[1]["digest"], "attestation", arm["digest"])
    ]
    found = ocidx.json("referrers", f"oci-layout://{lay.path}")  # the index: every attestation it lists
    assert sorted((r["digest"], r["subject"]) for r in found) == sorted(
        (str(a["digest"]), str(image["digest"])) for a, image in zip(attestations, (amd, arm), strict=True)
    )
    assert {r["artifactType"] for r in found} == {OCI_CONFIG}  # no artifactType: the config's media type


def test_referrers_under_fallback_tags(ocidx: Run) -> None:
    lay = ocidx.layout("cosign")
    image = built_image(lay, LINUX_AMD64, "app", [b"app"])
    hexes = str(image["digest"]).split(":")[1]
    signature = built_image(lay, {"os": "", "architecture": ""}, "cosign signature", [b"sig payload"])
    sbom = referrer(lay, image, SBOM, b"spdx")
    fallback_index = lay.index([sbom])  # the OCI spec's fallback: an index of the referrers, tagged sha256-HEX
    lay.write_index(
        [
            named(image, ref="v1"),
            named(signature, ref=f"sha256-{hexes}.sig"),
            named(fallback_index, ref=f"sha256-{hexes}"),
        ]
    )
    ocidx.scan()
    found = ocidx.json("referrers", "--db", ocidx.db, f"oci-layout://{lay.path}:v1")
    assert [(r["digest"], r["how"]) for r in found] == sorted(
        [(sbom["digest"], "fallback-tag"), (signature["digest"], "fallback-tag"), (sbom["digest"], "subject")],
        key=lambda x: (x[1], x[0]),
    )


def test_referrers_of_an_image_nothing_refers_to(ocidx: Run) -> None:
    lay = ocidx.layout("lonely")
    image = built_image(lay, LINUX_AMD64, "l", [b"l"])
    lay.write_index([named(image, ref="v1")])
    ocidx.scan()
    code, out, err = ocidx("referrers", f"oci-layout://{lay.path}:v1")
    assert (code, out) == (1, "") and "nothing refers to" in err
    assert ocidx.json("referrers", f"@{image['digest']}", code=1) == []


def test_referrers_by_name_and_a_referrer_added_since_the_scan(ocidx: Run) -> None:
    lay = ocidx.layout("named")
    image = built_image(lay, LINUX_AMD64, "n", [b"n"])
    lay.write_index([named(image, ref="docker.io/library/app:1.0")])
    ocidx.scan()
    sbom = referrer(lay, image, SBOM, b"added later")
    lay.write_index([named(image, ref="docker.io/library/app:1.0"), sbom])  # no scan since
    found = ocidx.json("referrers", "app:1.0")
    assert [(r["digest"], r["how"]) for r in found] == [(sbom["digest"], "subject")]


# -- du ------------------------------------------------------------------------------------------


def sizes(layout: Layout) -> dict[str, int]:
    directory = os.path.join(layout.path, "blobs", "sha256")
    return {"sha256:" + name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}


def test_du_counts_referenced_unique_shared_unreferenced_and_missing(ocidx: Run) -> None:
    one, two = ocidx.layout("one"), ocidx.layout("two")
    shared = built_image(one, LINUX_AMD64, "shared", [b"base"])
    built_image(two, LINUX_AMD64, "shared", [b"base"])
    own = built_image(two, LINUX_ARM64, "own", [b"base", b"own layer"])
    one.write_index([named(shared, ref="v1")])
    two.write_index([named(shared, ref="v1"), named(own, ref="v2")])
    junk = two.blob(b"an aborted export's blob", OCI_LAYER)
    missing = document(two, own)["config"]
    two.remove_blob(missing)
    ocidx.scan()
    usage = ocidx.json("du")
    rows = {os.path.basename(r["layout"]): r for r in usage["layouts"]}
    one_sizes, two_sizes = sizes(one), sizes(two)
    assert rows["one"]["referenced_bytes"] == sum(one_sizes.values())
    assert rows["one"]["shared_bytes"] == sum(one_sizes.values())  # every blob of it is also in two
    assert rows["one"]["unique_bytes"] == 0
    referenced_two = sum(two_sizes.values()) - two_sizes[str(junk["digest"])]
    own_manifest = document(two, own)
    unique_two = int(str(own["size"])) + own_manifest["layers"][1]["size"]  # the manifest and its own layer
    assert (rows["two"]["referenced_bytes"], rows["two"]["unique_bytes"]) == (referenced_two, unique_two)
    assert rows["two"]["shared_bytes"] == referenced_two - unique_two
    assert (rows["two"]["unreferenced_blobs"], rows["two"]["unreferenced_bytes"]) == (1, two_sizes[str(junk["digest"])])
    assert rows["two"]["missing_blobs"] == 1
    assert usage["total"] == {
        key: rows["one"][key] + rows["two"][key]
        for key in (
            "referenced_bytes",
            "unique_bytes",
            "shared_bytes",
            "unreferenced_bytes",
            "unreferenced_blobs",
            "missing_blobs",
        )
    }
    scoped = ocidx.json("du", two.path)
    assert [r["layout"] for r in scoped["layouts"]] == [os.path.realpath(two.path)]
    assert scoped["layouts"][0] == rows["two"]  # shared still counts the layouts outside the scope
    code, out, _ = ocidx("du")
    assert code == 0 and out.splitlines()[-1].endswith("\ttotal")


def test_du_is_exact_after_a_change_no_scan_has_seen(ocidx: Run) -> None:
    lay = ocidx.layout("lay")
    image = built_image(lay, LINUX_AMD64, "i", [b"i"])
    lay.write_index([named(image, ref="v1")])
    ocidx.scan()
    junk = lay.blob(b"junk", OCI_LAYER)
    usage = ocidx.json("du")
    assert usage["layouts"][0]["unreferenced_blobs"] == 1
    os.makedirs(os.path.join(lay.path, "blobs", "sha512"))  # a new algorithm's directory: blobs/ itself changed
    with open(os.path.join(lay.path, "blobs", "sha512", "f" * 128), "wb") as f:
        f.write(b"not even its digest")
    usage = ocidx.json("du")
    assert usage["layouts"][0]["unreferenced_blobs"] == 2
    shutil.rmtree(os.path.join(lay.path, "blobs", "sha512"))
    lay.remove_blob(junk)
    lay.write_index([])
    usage = ocidx.json("du")
    assert usage["layouts"][0]["referenced_bytes"] == 0
    assert usage["layouts"][0]["unreferenced_blobs"] == len(sizes(lay))


def test_du_says_each_warning_once_with_the_first_layouts_it_concerns(ocidx: Run) -> None:
    for number in range(7):  # seven partial exports: each lacks its manifest, so its graph is not wholly known
        lay = ocidx.layout(f"partial-{number}")
        image = built_image(lay, LINUX_AMD64, f"p{number}", [b"p"])
        lay.write_index([named(image, ref="v1")])
        lay.remove_blob(image)
    ocidx.scan()
    code, out, err = ocidx("du")
    assert code == 0 and len(out.splitlines()) == 8  # every layout and the total on stdout
    (line,) = err.splitlines()
    assert line.startswith("ocidx: warning: 7 layouts (") and ", and 2 more): what it references" not in line
    assert " and 2 more): what it references is not wholly known" in line
    usage = ocidx.json("du")
    assert all(row["warnings"] for row in usage["layouts"])  # --json keeps each layout's


def test_du_of_a_path_with_no_layout(ocidx: Run, tmp_path: str) -> None:
    ocidx.layout("lay").write_index([])
    ocidx.scan()
    ocidx.json("du", str(tmp_path))  # the root holds the layout
    failure = ocidx.json("du", os.path.join(str(tmp_path), "elsewhere"), code=1)
    assert failure["error"] == "not_found"


def test_the_python_api_answers_the_same(ocidx: Run) -> None:
    lay = ocidx.layout("api")
    image = built_image(lay, LINUX_AMD64, "api", [b"a"])
    sbom = referrer(lay, image, SBOM, b"s")
    lay.write_index([named(image, ref="v1"), sbom])
    ocidx.scan()
    with Index(ocidx.db) as index:
        answer = index.resolve(f"oci-layout://{lay.path}:v1")
        assert answer.layers == 1 and answer.config == document(lay, image)["config"]["digest"]
        (found,) = index.referrers(f"@{image['digest']}")
        assert (found.digest, found.how) == (sbom["digest"], "subject")
        usage = index.du()
        assert usage["total"]["referenced_bytes"] == sum(sizes(lay).values())  # type: ignore[index]
        layer = document(lay, image)["layers"][0]["digest"]
        (match,) = index.find(f"@{layer}")
        assert (match.source, match.used_by) == ("layer", [image["digest"]])
    assert OCI_INDEX  # the module's constants: an index media type is what the referrers fallback reads
