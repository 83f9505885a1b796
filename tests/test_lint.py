"""``ocidx lint``: each reader's rule on layouts written the way each writer writes them (docs/lint.md).

Layouts of skopeo and umoci are written by the real tools, and the skopeo reader is checked against
the real ``skopeo inspect`` on every layout here: what lint says skopeo reaches, skopeo reaches.
The other writers' layouts are built by hand as their source writes them (docs/lint.md cites it).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
from cli_run import ocidx
from harness import must, skopeo_copy, skopeo_digest
from layouts import DOCKER_LIST, LINUX_AMD64, LINUX_ARM64, Layout, named
from needs import require

Capsys = pytest.CaptureFixture[str]
READERS = ["buildkit", "containerd", "skopeo", "regclient", "zot", "ocidx"]


def lint(capsys: Capsys, *paths: str) -> tuple[int, list[dict[str, Any]]]:
    code, out, _err = ocidx(capsys, "lint", "--json", *paths)
    return code, json.loads(out)


def refs(document: dict[str, Any]) -> list[dict[str, str | None]]:
    """Each entry's reference per reader (None: that reader cannot name it)."""
    return [
        {reader: (None if got is None else got["ref"]) for reader, got in entry["readers"].items()}
        for entry in document["entries"]
    ]


def codes(document: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(f["code"], f["digest"]) for f in document["findings"]]


def agrees_with_skopeo(document: dict[str, Any]) -> None:
    """Every skopeo reading is what skopeo resolves; every ref.name skopeo cannot reach is None."""
    if shutil.which("skopeo") is None:
        return
    layout = document["layout"]
    with open(os.path.join(layout, "index.json"), encoding="utf-8") as f:
        manifests = json.load(f)["manifests"] or []
    shadowed = {f["digest"] for f in document["findings"] if f["code"] == "ambiguous" and "skopeo" in f["readers"]}
    for entry, descriptor in zip(document["entries"], manifests, strict=True):
        ref_name = (descriptor.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        reading = entry["readers"]["skopeo"]
        if reading is not None and entry["digest"] not in shadowed:
            assert skopeo_digest(layout, reading["ref"].split(":", 2)[2]) == entry["digest"], reading
        elif reading is None and ref_name and ":" not in layout:
            assert skopeo_digest(layout, ref_name) != entry["digest"], ref_name


@pytest.fixture
def source(tmp_path: str) -> str:
    """A local image (umoci), tags v1 and v2, no network."""
    require([t for t in ("skopeo", "umoci") if shutil.which(t) is None], "install them")
    src = os.path.join(tmp_path, "src")
    must("umoci", "init", "--layout", src)
    must("umoci", "new", "--image", f"{src}:v1")
    must("umoci", "config", "--image", f"{src}:v1", "--tag", "v2", "--config.label", "v=2")
    return src


# -- layouts written by the real tools ------------------------------------------------------------------


@pytest.mark.interop
def test_skopeo_with_a_tag_every_reader_names_it_but_no_repository(tmp_path: str, capsys: Capsys, source: str) -> None:
    lay = os.path.join(tmp_path, "lay")
    skopeo_copy(f"{source}:v1", f"{lay}:3.16")
    code, (document,) = lint(capsys, lay)
    assert refs(document) == [
        {
            "buildkit": f"oci-layout://{lay}:3.16",
            "containerd": "BASE:3.16",
            "skopeo": f"oci:{lay}:3.16",
            "regclient": f"ocidir://{lay}:3.16",
            "zot": "REPO:3.16",
            "ocidx": f"oci-layout://{lay}:3.16",
        }
    ]
    assert [c for c, _ in codes(document)] == ["tag_without_name"]
    assert code == 1
    agrees_with_skopeo(document)


@pytest.mark.interop
@pytest.mark.parametrize("written", ["alpine:3.16", "docker.io/library/alpine:3.16"])
def test_skopeo_with_a_name_in_ref_name_buildkit_and_zot_cannot_name_it(
    tmp_path: str, capsys: Capsys, source: str, written: str
) -> None:
    """skopeo writes what the user typed (podman save writes the full name): not a tag (zot #2860)."""
    lay = os.path.join(tmp_path, "lay")
    skopeo_copy(f"{source}:v1", f"{lay}:{written}")
    code, (document,) = lint(capsys, lay)
    (reading,) = refs(document)
    assert (reading["buildkit"], reading["zot"]) == (None, None)
    assert reading["skopeo"] == f"oci:{lay}:{written}"
    assert reading["regclient"] == f"ocidir://{lay}:3.16"  # its fallback: ref.name ending in :3.16
    assert reading["containerd"] == written  # kept as written, not normalized
    assert reading["ocidx"] == f"oci-layout://{lay}/alpine:3.16"
    (finding,) = document["findings"]
    assert finding["code"] == "readers_disagree" and set(finding["readers"]) == {"buildkit", "zot"}
    assert "io.containerd.image.name" in finding["fix"]
    assert code == 1
    agrees_with_skopeo(document)


@pytest.mark.interop
def test_skopeo_retagging_leaves_the_old_image_unnamed(tmp_path: str, capsys: Capsys, source: str) -> None:
    """containers/image removes ref.name from the older entry of the same name and keeps the entry."""
    lay = os.path.join(tmp_path, "lay")
    skopeo_copy(f"{source}:v1", f"{lay}:latest")
    skopeo_copy(f"{source}:v2", f"{lay}:latest")
    _code, (document,) = lint(capsys, lay)
    old, new = document["entries"]
    assert all(got is None for got in old["readers"].values())
    assert ("unaddressable", old["digest"]) in codes(document)
    assert new["readers"]["skopeo"]["ref"] == f"oci:{lay}:latest"
    agrees_with_skopeo(document)


@pytest.mark.interop
def test_umoci_tags_are_read_alike(tmp_path: str, capsys: Capsys, source: str) -> None:
    lay = os.path.join(tmp_path, "lay")
    must("umoci", "init", "--layout", lay)
    must("umoci", "new", "--image", f"{lay}:v1")
    must("umoci", "tag", "--image", f"{lay}:v1", "v2")
    _code, (document,) = lint(capsys, lay)
    assert [r["zot"] for r in refs(document)] == ["REPO:v1", "REPO:v2"]
    assert {c for c, _ in codes(document)} == {"tag_without_name"}  # same digest twice: no ambiguity
    agrees_with_skopeo(document)


# -- layouts as the other writers write them --------------------------------------------------------------


def test_containerd_and_docker_save_are_clean(tmp_path: str, capsys: Capsys) -> None:
    """containerd's exporter (core/images/archive/exporter.go): the full name in io.containerd.image.name,
    the tag alone in ref.name. Every reader names it, and no finding: exit 0."""
    lay = Layout(os.path.join(tmp_path, "saved"))
    image = lay.manifest()
    lay.write_index([named(image, ref="3.16", containerd="docker.io/library/alpine:3.16")])
    code, (document,) = lint(capsys, lay.path)
    assert (code, document["findings"]) == (0, [])
    (reading,) = refs(document)
    assert reading["containerd"] == "docker.io/library/alpine:3.16"
    assert reading["ocidx"] == f"oci-layout://{lay.path}/alpine:3.16"
    agrees_with_skopeo(document)


def test_an_old_containerd_by_digest_export_has_an_invalid_ref_name(tmp_path: str, capsys: Capsys) -> None:
    """containerd before #13167 wrote '@sha256:...' in ref.name for a digest-only name (#10681)."""
    lay = Layout(os.path.join(tmp_path, "bydigest"))
    image = lay.manifest()
    digest = str(image["digest"])
    lay.write_index([named(image, ref=f"@{digest}", containerd=f"docker.io/library/alpine@{digest}")])
    code, (document,) = lint(capsys, lay.path)
    assert ("invalid_ref_name", digest) in codes(document)
    (reading,) = refs(document)
    assert reading["skopeo"] is None and reading["containerd"] == f"docker.io/library/alpine@{digest}"
    assert code == 1
    agrees_with_skopeo(document)


def test_the_same_tag_on_two_images_is_named_a_different_way_by_each_reader(tmp_path: str, capsys: Capsys) -> None:
    """Writers that append (crane, oras, buildx imagetools) leave two entries tagged latest: BuildKit,
    skopeo, regclient and zot take the first, containerd's import the last, ocidx refuses to pick."""
    lay = Layout(os.path.join(tmp_path, "appended"))
    first, second = lay.manifest(label="one"), lay.manifest(label="two")
    lay.write_index([named(first, ref="latest"), named(second, ref="latest")])
    code, (document,) = lint(capsys, lay.path)
    found = {(f["readers"][0], f["digest"]) for f in document["findings"] if f["code"] == "ambiguous"}
    assert found == {
        ("buildkit", second["digest"]),
        ("skopeo", second["digest"]),
        ("regclient", second["digest"]),
        ("zot", second["digest"]),
        ("containerd", first["digest"]),
        ("ocidx", first["digest"]),
    }
    assert code == 1
    agrees_with_skopeo(document)


def test_regclient_falls_back_to_the_tag_of_a_full_name_and_picks_the_first(tmp_path: str, capsys: Capsys) -> None:
    """scheme/ocidir indexGet: ref.name equal to the tag, else ending in ':TAG'; the first match."""
    lay = Layout(os.path.join(tmp_path, "names"))
    alpine, busybox = lay.manifest(label="alpine"), lay.manifest(label="busybox")
    lay.write_index([named(alpine, ref="alpine:1"), named(busybox, ref="busybox:1")])
    _code, (document,) = lint(capsys, lay.path)
    assert [r["regclient"] for r in refs(document)] == [f"ocidir://{lay.path}:1"] * 2
    ambiguous = {(f["readers"][0], f["digest"]) for f in document["findings"] if f["code"] == "ambiguous"}
    assert ("regclient", busybox["digest"]) in ambiguous and ("regclient", alpine["digest"]) not in ambiguous
    assert ("ocidx", alpine["digest"]) in ambiguous  # oci-layout://PATH:1 is ambiguous there
    agrees_with_skopeo(document)


def test_buildkit_comma_joined_names_before_its_fix(tmp_path: str, capsys: Capsys) -> None:
    """BuildKit tar=false before PR #5589 put every name, comma-joined, in ref.name (#5572)."""
    lay = Layout(os.path.join(tmp_path, "comma"))
    image = lay.manifest()
    lay.write_index([named(image, ref="docker.io/library/a:1,docker.io/library/b:2")])
    _code, (document,) = lint(capsys, lay.path)
    (reading,) = refs(document)
    assert reading["skopeo"] is None and reading["buildkit"] is None
    assert reading["ocidx"] == f"oci-layout://{lay.path}/a:1"
    assert ("invalid_ref_name", image["digest"]) in codes(document)
    agrees_with_skopeo(document)


def test_a_docker_manifest_list_is_out_of_skopeos_reach_by_name(tmp_path: str, capsys: Capsys) -> None:
    """containers/image matches ref.name only on OCI manifests and indexes, not Docker media types."""
    lay = Layout(os.path.join(tmp_path, "docker"))
    listed = lay.index([lay.manifest(platform=LINUX_AMD64, docker=True)], docker=True)
    assert listed["mediaType"] == DOCKER_LIST
    lay.write_index([named(listed, ref="3.16", containerd="docker.io/library/alpine:3.16")])
    _code, (document,) = lint(capsys, lay.path)
    (reading,) = refs(document)
    assert reading["skopeo"] is None and reading["buildkit"] == f"oci-layout://{lay.path}:3.16"
    ((code, _),) = codes(document)
    assert code == "readers_disagree"
    agrees_with_skopeo(document)


def test_regclient_needs_the_oci_layout_file_and_skopeo_a_path_without_colon(tmp_path: str, capsys: Capsys) -> None:
    bare = Layout(os.path.join(tmp_path, "bare"), oci_layout=False)
    bare.write_index([named(bare.manifest(), ref="v1", containerd="docker.io/library/app:v1")])
    colon = Layout(os.path.join(tmp_path, "with:colon"))
    colon.write_index([named(colon.manifest(), ref="v1", containerd="docker.io/library/app:v1")])
    _code, (no_file, with_colon) = lint(capsys, bare.path, colon.path)
    assert [r["regclient"] for r in refs(no_file)] == [None]
    assert codes(no_file)[0] == ("no_oci_layout_file", None)
    assert [r["skopeo"] for r in refs(with_colon)] == [None]
    assert codes(with_colon)[0] == ("colon_in_path", None)


def test_an_unnamed_image_is_unaddressable_but_a_referrer_is_expected_unnamed(tmp_path: str, capsys: Capsys) -> None:
    """crane pull writes no name by default; buildx imagetools writes referrers with a subject, unnamed."""
    lay = Layout(os.path.join(tmp_path, "crane"))
    image, signature = lay.manifest(label="image"), lay.manifest(label="sig")
    subject = {"io.containerd.manifest.subject": str(image["digest"])}
    lay.write_index([image, {**signature, "annotations": subject}])
    _code, (document,) = lint(capsys, lay.path)
    assert codes(document) == [("unaddressable", image["digest"])]


def test_text_output_and_a_missing_path(tmp_path: str, capsys: Capsys) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    index = lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)])
    lay.write_index([named(index, ref="v1", containerd="docker.io/library/app:v1")])
    code, out, err = ocidx(capsys, "lint", lay.path)
    assert code == 0
    assert "    zot\tREPO:v1\n" in out and f"    buildkit\toci-layout://{lay.path}:v1\n" in out
    assert "0 findings in 1 layout" in err
    missing = os.path.join(tmp_path, "nothing")
    code, out, err = ocidx(capsys, "lint", "--json", lay.path, missing)
    assert code == 1
    clean, gone = json.loads(out)
    assert clean["findings"] == [] and (gone["layout"], gone["error"]) == (missing, "layout_not_found")
    assert f"{missing} does not exist" in err


def test_the_clean_example_of_docs_lint_md_is_what_lint_prints(tmp_path: str, capsys: Capsys) -> None:
    """docs/lint.md shows the text output for a layout as containerd and docker save write it."""
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "lint.md")) as f:
        (shown,) = re.findall(r"^```text\n(.*?)^```$", f.read(), re.S | re.M)
    lay = Layout(os.path.join(tmp_path, "alpine"))
    index = lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)])
    lay.write_index([named(index, ref="3.16", containerd="docker.io/library/alpine:3.16")])
    code, out, _err = ocidx(capsys, "lint", lay.path)
    assert code == 0
    assert out.replace(lay.path, "/srv/exports/alpine").replace(str(index["digest"]), "sha256:...") == shown
