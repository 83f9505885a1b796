"""ocidx against layouts written by the real skopeo and umoci, offline.

A source image is made locally (``umoci init`` + ``umoci new`` + ``umoci
config``), then copied with ``skopeo copy oci:SRC:... oci:DIR:REF`` under the
names users type. ``ocidx`` must agree with ``skopeo inspect --raw`` on every
reference skopeo resolves, and find by canonical name what skopeo only finds
by the exact string. Skipped when the tools are missing, except under CI,
where a missing tool is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from harness import must, skopeo_copy, skopeo_digest
from needs import require

from indexer.cli import main

pytestmark = pytest.mark.interop

TOOLS = ("skopeo", "umoci")


@pytest.fixture(autouse=True)
def _tools_and_isolation(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    require([tool for tool in TOOLS if shutil.which(tool) is None], "install them")
    monkeypatch.setenv("XDG_CONFIG_HOME", os.path.join(tmp_path, "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", os.path.join(tmp_path, "xdg-data"))
    monkeypatch.delenv("OCIDX_CONFIG", raising=False)
    monkeypatch.delenv("OCIDX_DB", raising=False)
    monkeypatch.chdir(tmp_path)


class Ocidx:
    def __init__(self, db: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = db
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([args[0], "--db", self.db, *args[1:]])
        out, err = self.capsys.readouterr()
        return code, out, err

    def digest(self, *args: str) -> str | None:
        code, out, err = self("resolve", *args)
        assert code in (0, 1), err
        return out.strip() if code == 0 else None


@pytest.fixture
def source(tmp_path: str) -> dict[str, str]:
    """A local source layout with four distinct images; tag -> digest."""
    src = os.path.join(tmp_path, "src")
    must("umoci", "init", "--layout", src)
    must("umoci", "new", "--image", f"{src}:base")
    for name in ("one", "two", "three", "four"):
        must("umoci", "config", "--image", f"{src}:base", "--tag", name, "--config.label", f"image={name}")
    tags = {t: skopeo_digest(src, t) for t in ("base", "one", "two", "three", "four")}
    assert None not in tags.values()
    assert len(set(tags.values())) == 5
    return {"path": src, **{t: str(d) for t, d in tags.items()}}


@pytest.fixture
def ocidx(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> Ocidx:
    return Ocidx(os.path.join(tmp_path, "index.db"), capsys)


@pytest.fixture
def written(tmp_path: str, source: dict[str, str], ocidx: Ocidx) -> str:
    """DIR written by skopeo and umoci under the names users type, then scanned."""
    src = source["path"]
    layout = os.path.join(tmp_path, "root", "dir")
    os.makedirs(os.path.dirname(layout))
    skopeo_copy(f"{src}:base", f"{layout}:latest")
    skopeo_copy(f"{src}:one", f"{layout}:alpine:3.16")
    skopeo_copy(f"{src}:two", f"{layout}:docker.io/library/busybox:1.36")
    skopeo_copy(f"{src}:three", f"{layout}:localhost:5000/team/app:v2")
    must("umoci", "tag", "--image", f"{layout}:latest", "v9")
    must("umoci", "tag", "--image", f"{layout}:latest", "temp")
    must("umoci", "rm", "--image", f"{layout}:temp")
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(layout))
    assert code == 0, err
    return os.path.realpath(layout)


# Each ref as skopeo takes it, and the ocidx forms that must agree with it.
AGREEMENT = [
    ("latest", ["oci-layout://{dir}", "oci-layout://{dir}:latest", "--layout={dir} :latest"]),
    ("v9", ["oci-layout://{dir}:v9", "--layout={dir} :v9"]),
    ("alpine:3.16", ["oci-layout://{dir}/alpine:3.16", "--layout={dir} alpine:3.16"]),
    (
        "docker.io/library/busybox:1.36",
        ["oci-layout://{dir}/docker.io/library/busybox:1.36", "--layout={dir} docker.io/library/busybox:1.36"],
    ),
    (
        "localhost:5000/team/app:v2",
        ["oci-layout://{dir}/localhost:5000/team/app:v2", "--layout={dir} localhost:5000/team/app:v2"],
    ),
]


def _args(form: str, layout: str) -> list[str]:
    return form.format(dir=layout).split(" ")


@pytest.mark.parametrize(("ref", "forms"), AGREEMENT)
def test_ocidx_agrees_with_skopeo(written: str, ocidx: Ocidx, ref: str, forms: list[str]) -> None:
    expected = skopeo_digest(written, ref)
    assert expected is not None
    for form in forms:
        assert ocidx.digest(*_args(form, written)) == expected, form


def test_removed_tag_is_gone_for_both(written: str, ocidx: Ocidx) -> None:
    assert skopeo_digest(written, "temp") is None
    assert ocidx.digest(f"oci-layout://{written}:temp") is None


def test_ocidx_finds_by_canonical_name_what_skopeo_finds_only_by_exact_string(
    written: str, ocidx: Ocidx, source: dict[str, str]
) -> None:
    # written as "alpine:3.16": skopeo misses the canonical spelling
    assert skopeo_digest(written, "docker.io/library/alpine:3.16") is None
    assert ocidx.digest(f"oci-layout://{written}/docker.io/library/alpine:3.16") == source["one"]
    assert ocidx.digest(f"oci-layout://{written}/library/alpine:3.16") == source["one"]
    # written as "docker.io/library/busybox:1.36": skopeo misses the familiar spelling
    assert skopeo_digest(written, "busybox:1.36") is None
    assert ocidx.digest(f"oci-layout://{written}/busybox:1.36") == source["two"]
    assert ocidx.digest("--layout", written, "busybox:1.36") == source["two"]


def test_json_names_say_how_each_was_read(written: str, ocidx: Ocidx) -> None:
    code, out, _ = ocidx("ls", "--json", written)
    assert code == 0
    (detail,) = json.loads(out)
    names = {(n["name"], n["tag"], n["how"]) for entry in detail["entries"] for n in entry["names"]}
    assert names == {
        ("", "latest", "tag-only"),
        ("", "v9", "tag-only"),
        ("docker.io/library/alpine", "3.16", "familiar"),
        ("docker.io/library/busybox", "1.36", "full"),
        ("localhost:5000/team/app", "v2", "full"),
    }


def test_resolve_right_after_skopeo_copy_without_a_daemon(written: str, ocidx: Ocidx, source: dict[str, str]) -> None:
    skopeo_copy(f"{source['path']}:four", f"{written}:latest")  # into the already-scanned layout
    code, out, err = ocidx("resolve", "--json", f"oci-layout://{written}")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["digest"] == source["four"] == skopeo_digest(written, "latest")
    assert answer["freshness"] == "read-through"
    skopeo_copy(f"{source['path']}:four", f"{written}:brand-new")
    assert ocidx.digest(f"oci-layout://{written}:brand-new") == source["four"]
    assert ocidx.digest(f"oci-layout://{written}/alpine:3.16") == source["one"]


def test_skopeo_copy_into_a_new_layout_is_read_through(tmp_path: str, ocidx: Ocidx, source: dict[str, str]) -> None:
    os.makedirs(os.path.join(tmp_path, "root"))
    code, _, err = ocidx("scan", "--no-progress", os.path.join(tmp_path, "root"))
    assert code == 0, err
    fresh = os.path.join(tmp_path, "root", "fresh")
    skopeo_copy(f"{source['path']}:two", f"{fresh}:v1")
    assert ocidx.digest(f"oci-layout://{fresh}:v1") == source["two"] == skopeo_digest(fresh, "v1")


def test_umoci_empty_layout_with_null_manifests(tmp_path: str, ocidx: Ocidx) -> None:
    empty = os.path.join(tmp_path, "root", "empty")
    must("umoci", "init", "--layout", empty)
    with open(os.path.join(empty, "index.json")) as f:
        assert json.load(f)["manifests"] is None
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(empty))
    assert code == 0, err
    code, out, err = ocidx("resolve", f"oci-layout://{empty}")
    assert (code, out) == (1, "")
    assert "no named images" in err
    code, out, _ = ocidx("ls", "--json")
    assert [(row["state"], row["entries"]) for row in json.loads(out)] == [("ok", 0)]


def test_every_ref_name_skopeo_resolves_agrees(written: str, ocidx: Ocidx) -> None:
    with open(os.path.join(written, "index.json")) as f:
        refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in json.load(f)["manifests"]]
    assert len(refs) == 5
    for ref in refs:
        expected = skopeo_digest(written, ref)
        assert expected is not None, ref
        # a bare word is a tag for skopeo (oci:DIR:latest) and ':latest' for ocidx, as for buildx
        form = ref if ("/" in ref or ":" in ref) else f":{ref}"
        assert ocidx.digest("--layout", written, form) == expected, ref


def test_two_spellings_of_one_name(tmp_path: str, ocidx: Ocidx, source: dict[str, str]) -> None:
    src = source["path"]
    same = os.path.join(tmp_path, "root", "same")
    os.makedirs(os.path.dirname(same))
    skopeo_copy(f"{src}:one", f"{same}:alpine:3.16")
    skopeo_copy(f"{src}:one", f"{same}:docker.io/library/alpine:3.16")
    differ = os.path.join(tmp_path, "root", "differ")
    skopeo_copy(f"{src}:one", f"{differ}:alpine:3.16")
    skopeo_copy(f"{src}:two", f"{differ}:docker.io/library/alpine:3.16")
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(same))
    assert code == 0, err
    # the same image under both spellings: one answer
    assert ocidx.digest(f"oci-layout://{same}/alpine:3.16") == source["one"] == skopeo_digest(same, "alpine:3.16")
    # two images that skopeo keeps apart by spelling are one name for Docker: an ambiguity, never a pick
    code, out, _ = ocidx("resolve", "--json", f"oci-layout://{differ}/alpine:3.16")
    assert code == 3
    candidates = {c["digest"] for c in json.loads(out)["candidates"]}
    assert candidates == {
        skopeo_digest(differ, "alpine:3.16"),
        skopeo_digest(differ, "docker.io/library/alpine:3.16"),
    }
    assert candidates == {source["one"], source["two"]}


def test_the_readme_first_lookup_needs_no_database(
    tmp_path: str, source: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """README "First lookup": skopeo copies into layouts/, resolve answers before any scan or daemon."""
    os.mkdir("layouts")  # mkdir -p layouts: skopeo creates the layout, not its parent
    skopeo_copy(f"{source['path']}:one", "layouts/alpine:3.16")  # relative, as the README types it
    code = main(["resolve", "--json", "oci-layout://layouts/alpine:3.16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["digest"], answer["freshness"]) == (skopeo_digest("layouts/alpine", "3.16"), "read-through")
    assert answer["digest"] == source["one"]
    assert not os.path.exists(os.path.join(tmp_path, "xdg-data", "ocidx"))  # no database was created
    code = main(["find", ":3.16"])
    _, err = capsys.readouterr()
    assert code == 4 and "ocidx scan ROOT" in err


@pytest.mark.integration
def test_find_right_after_skopeo_copy_with_a_live_daemon(tmp_path: str, ocidx: Ocidx, source: dict[str, str]) -> None:
    # The README's way, tried as a new user would, with the daemon running: `skopeo copy ... && ocidx
    # find :v9` missed the new image 5 times in 5 before lookups asked the daemon for a barrier.
    from harness import Daemon, wait_for

    from indexer.sync import barrier

    root = os.path.join(tmp_path, "layouts")
    os.makedirs(root)
    daemon = Daemon(str(tmp_path), [root])
    with open(daemon.config, encoding="utf-8") as fh:
        text = fh.read().replace("debounce_ms = 20", "debounce_ms = 500")  # a slow daemon makes it plain
    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write(text)
    daemon.start().wait_ready()
    try:
        wait_for(lambda: barrier(daemon.db, daemon.pid) == "ok", "the daemon answers barriers")
        for trial, image in enumerate(("one", "two", "three", "four", "base")):
            app = os.path.join(root, f"app{trial}")
            skopeo_copy(f"{source['path']}:{image}", f"{app}:v9")
            code, out, err = ocidx("find", "--db", daemon.db, "--json", ":v9")
            assert code == 0, err
            assert os.path.realpath(app) in {answer["layout"] for answer in json.loads(out)}, f"trial {trial}"
    finally:
        assert daemon.stop() == 0


@pytest.fixture
def platforms(tmp_path: str) -> dict[str, str]:
    """A local source layout with one image per platform, each config saying its own: tag -> digest."""
    src = os.path.join(tmp_path, "platform-src")
    must("umoci", "init", "--layout", src)
    must("umoci", "new", "--image", f"{src}:base")
    for arch in ("amd64", "arm64"):
        must("umoci", "config", "--image", f"{src}:base", "--tag", arch, "--os", "linux", "--architecture", arch)
    tags = {arch: skopeo_digest(src, arch) for arch in ("amd64", "arm64")}
    assert None not in tags.values()
    return {"path": src, **{t: str(d) for t, d in tags.items()}}


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "read-through"])
def test_platform_of_a_single_manifest_copied_by_skopeo_without_all(
    tmp_path: str, ocidx: Ocidx, platforms: dict[str, str], indexed: bool
) -> None:
    """`skopeo copy` without --all (what the README does) writes one manifest and no platform on its
    descriptor: --platform is checked against the config, as containerd and BuildKit check it."""
    app = os.path.join(tmp_path, "root", "app")
    os.makedirs(os.path.dirname(app))
    skopeo_copy(f"{platforms['path']}:amd64", f"{app}:v1")
    with open(os.path.join(app, "index.json")) as f:
        (descriptor,) = json.load(f)["manifests"]
    assert "platform" not in descriptor  # what made the old answer wrong
    if indexed:
        code, _, err = ocidx("scan", "--no-progress", os.path.dirname(app))
        assert code == 0, err
    code, out, err = ocidx("resolve", "--json", "--platform", "linux/arm64", f"oci-layout://{app}:v1")
    failure = json.loads(out)
    assert (code, failure["error"]) == (1, "platform_not_found"), err
    assert failure["platforms"] == [{"os": "linux", "architecture": "amd64", "variant": None}]
    code, out, err = ocidx("resolve", "--json", "--platform", "linux/amd64", f"oci-layout://{app}:v1")
    answer = json.loads(out)
    assert code == 0, err
    assert (answer["digest"], answer["warnings"]) == (platforms["amd64"], [])
    assert answer["platform"] == {"os": "linux", "architecture": "amd64", "variant": None}


def test_platform_of_a_single_manifest_whose_config_skopeo_did_not_copy(
    tmp_path: str, ocidx: Ocidx, platforms: dict[str, str]
) -> None:
    app = os.path.join(tmp_path, "app")
    skopeo_copy(f"{platforms['path']}:arm64", f"{app}:v1")
    manifest = os.path.join(app, "blobs", "sha256", platforms["arm64"].split(":")[1])
    with open(manifest) as f:
        config = json.load(f)["config"]["digest"]
    os.remove(os.path.join(app, "blobs", "sha256", config.split(":")[1]))  # a partial export
    code, out, err = ocidx("resolve", "--platform", "linux/amd64", f"oci-layout://{app}:v1")
    assert (code, out.strip()) == (0, platforms["arm64"])
    assert "could not be checked" in err and config in err


# -- the content graph, on layouts written by skopeo and umoci -------------------------------------

OCI_INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _put(layout: str, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def _tagged(layout: str, descriptor: dict[str, object], tag: str) -> None:
    """List *descriptor* in *layout*'s index.json under *tag*, as a writer of the source would."""
    path = os.path.join(layout, "index.json")
    with open(path) as f:
        index = json.load(f)
    index["manifests"].append({**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(path, "w") as f:
        json.dump(index, f)


def _blob_sizes(layout: str) -> dict[str, int]:
    directory = os.path.join(layout, "blobs", "sha256")
    return {"sha256:" + name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}


@pytest.fixture
def graph_source(tmp_path: str) -> dict[str, str]:
    """A local source: umoci images for linux/amd64 and linux/arm64 with a real layer each, a two-platform
    index of them with BuildKit-style attestation manifests, and an SBOM whose subject is that index."""
    src = os.path.join(tmp_path, "graph-src")
    must("umoci", "init", "--layout", src)
    must("umoci", "new", "--image", f"{src}:base")
    payload = os.path.join(tmp_path, "payload")
    with open(payload, "w") as f:
        f.write("a file in a layer\n")
    must("umoci", "insert", "--image", f"{src}:base", payload, "/etc/payload")
    images: dict[str, dict[str, object]] = {}
    for arch in ("amd64", "arm64"):
        must("umoci", "config", "--image", f"{src}:base", "--tag", arch, "--os", "linux", "--architecture", arch)
        with open(os.path.join(src, "index.json")) as f:
            (descriptor,) = [m for m in json.load(f)["manifests"] if m["annotations"][REF] == arch]
        images[arch] = {k: descriptor[k] for k in ("mediaType", "digest", "size")}
        images[arch]["platform"] = {"os": "linux", "architecture": arch}
    attestations = []
    for image in images.values():
        statement = _put(src, json.dumps({"subject": str(image["digest"])}).encode(), "application/vnd.in-toto+json")
        config = _put(
            src,
            json.dumps({"architecture": "unknown", "os": "unknown", "rootfs": {"type": "layers"}}).encode(),
            "application/vnd.oci.image.config.v1+json",
        )
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST_TYPE, "config": config, "layers": [statement]}
        manifest = _put(src, json.dumps(document).encode(), OCI_MANIFEST_TYPE)
        manifest["platform"] = {"os": "unknown", "architecture": "unknown"}
        manifest["annotations"] = {
            "vnd.docker.reference.digest": str(image["digest"]),
            "vnd.docker.reference.type": "attestation-manifest",
        }
        attestations.append(manifest)
    index_doc = {"schemaVersion": 2, "mediaType": OCI_INDEX_TYPE, "manifests": [*images.values(), *attestations]}
    index = _put(src, json.dumps(index_doc).encode(), OCI_INDEX_TYPE)
    _tagged(src, index, "multi")
    empty = _put(src, b"{}", "application/vnd.oci.empty.v1+json")
    spdx = _put(src, b'{"spdxVersion":"SPDX-2.3"}', "application/spdx+json")
    sbom_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_TYPE,
        "artifactType": "application/spdx+json",
        "config": empty,
        "layers": [spdx],
        "subject": {k: index[k] for k in ("mediaType", "digest", "size")},
    }
    sbom = _put(src, json.dumps(sbom_doc).encode(), OCI_MANIFEST_TYPE)
    _tagged(src, sbom, "sbom")
    return {
        "path": src,
        "index": str(index["digest"]),
        "amd64": str(images["amd64"]["digest"]),
        "arm64": str(images["arm64"]["digest"]),
        "sbom": str(sbom["digest"]),
        "attestations": ",".join(str(a["digest"]) for a in attestations),
    }


REF = "org.opencontainers.image.ref.name"


def test_skopeo_copy_all_of_a_multi_platform_image_is_indexed_with_its_graph(
    tmp_path: str, ocidx: Ocidx, graph_source: dict[str, str]
) -> None:
    dest = os.path.join(tmp_path, "root", "app")
    os.makedirs(os.path.dirname(dest))
    skopeo_copy(f"{graph_source['path']}:multi", f"{dest}:v1", "--all")
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(dest))
    assert code == 0, err
    for arch in ("amd64", "arm64"):
        code, out, err = ocidx("resolve", "--json", "--platform", f"linux/{arch}", f"oci-layout://{dest}:v1")
        assert code == 0, err
        answer = json.loads(out)
        seen = json.loads(must("skopeo", "inspect", "--override-arch", arch, f"oci:{dest}:v1"))
        config = json.loads(must("skopeo", "inspect", "--override-arch", arch, "--config", f"oci:{dest}:v1"))
        assert answer["digest"] == graph_source[arch]
        assert (answer["layers"], answer["created"]) == (len(seen["Layers"]), config["created"])
        with open(os.path.join(dest, "blobs", "sha256", answer["digest"].split(":")[1])) as f:
            manifest = json.load(f)
        sizes = _blob_sizes(dest)
        parts = [answer["digest"], manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]
        assert answer["image_size"] == sum(sizes[d] for d in parts)
        assert answer["config"] == manifest["config"]["digest"]
    code, out, _ = ocidx("du", "--json", dest)
    (row,) = json.loads(out)["layouts"]
    assert (row["referenced_bytes"], row["unreferenced_blobs"], row["missing_blobs"]) == (
        sum(_blob_sizes(dest).values()),
        0,
        0,
    )
    layer = seen["Layers"][0]
    code, out, _ = ocidx("find", "--json", f"@{layer}")
    (match,) = json.loads(out)
    assert (match["source"], match["layout"]) == ("layer", os.path.realpath(dest))
    assert graph_source["arm64"] in match["used_by"]


def test_referrers_in_layouts_written_by_skopeo(tmp_path: str, ocidx: Ocidx, graph_source: dict[str, str]) -> None:
    """The OCI way (a referrer with subject, listed untagged in index.json: skopeo copy to oci:DIR with no
    tag), BuildKit's attestation manifests (kept by copy --all) and cosign's fallback tag."""
    src, index = graph_source["path"], graph_source["index"]
    dest = os.path.join(tmp_path, "root", "signed")
    os.makedirs(os.path.dirname(dest))
    skopeo_copy(f"{src}:multi", f"{dest}:v1", "--all")
    skopeo_copy(f"{src}:sbom", dest)
    fallback = f"sha256-{index.split(':')[1]}.sig"
    skopeo_copy(f"{src}:amd64", f"{dest}:{fallback}")
    with open(os.path.join(dest, "index.json")) as f:
        untagged = [m for m in json.load(f)["manifests"] if REF not in (m.get("annotations") or {})]
    assert [m["digest"] for m in untagged] == [graph_source["sbom"]]
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(dest))
    assert code == 0, err
    code, out, err = ocidx("referrers", "--json", f"oci-layout://{dest}:v1")
    assert code == 0, err
    found = sorted((r["how"], r["digest"], r["subject"]) for r in json.loads(out))
    attestations = graph_source["attestations"].split(",")
    assert found == sorted(
        [
            ("subject", graph_source["sbom"], index),
            ("fallback-tag", graph_source["amd64"], index),
            ("attestation", attestations[0], graph_source["amd64"]),
            ("attestation", attestations[1], graph_source["arm64"]),
        ]
    )
    code, out, _ = ocidx("referrers", "--json", f"@{graph_source['sbom']}")
    assert (code, json.loads(out)) == (1, [])


def test_ocidx_gc_deletes_what_umoci_gc_deletes(tmp_path: str, source: dict[str, str]) -> None:
    src = source["path"]
    ours, theirs = os.path.join(tmp_path, "ours"), os.path.join(tmp_path, "theirs")
    skopeo_copy(f"{src}:one", f"{ours}:one")
    skopeo_copy(f"{src}:two", f"{ours}:two")
    skopeo_copy(f"{src}:three", f"{ours}:three")
    must("umoci", "rm", "--image", f"{ours}:two")  # its blobs stay: garbage until a gc
    shutil.copytree(ours, theirs, symlinks=True)
    must("umoci", "gc", "--layout", theirs)
    code = main(["gc", "--delete", "--grace", "0", "--json", ours])
    assert code == 0
    assert sorted(os.listdir(os.path.join(ours, "blobs", "sha256"))) == sorted(
        os.listdir(os.path.join(theirs, "blobs", "sha256"))
    )
    assert skopeo_digest(ours, "one") == source["one"] and skopeo_digest(ours, "three") == source["three"]


def test_a_partial_export_of_a_multi_platform_image(tmp_path: str, ocidx: Ocidx, graph_source: dict[str, str]) -> None:
    dest = os.path.join(tmp_path, "root", "partial")
    os.makedirs(os.path.dirname(dest))
    skopeo_copy(f"{graph_source['path']}:multi", f"{dest}:v1", "--all")
    os.remove(os.path.join(dest, "blobs", "sha256", graph_source["arm64"].split(":")[1]))
    code, _, err = ocidx("scan", "--no-progress", os.path.dirname(dest))
    assert code == 0, err
    code, out, _ = ocidx("resolve", "--json", "--platform", "linux/arm64", f"oci-layout://{dest}:v1")
    assert (code, json.loads(out)["error"]) == (1, "platform_not_found")
    code, out, _ = ocidx("du", "--json", dest)
    (row,) = json.loads(out)["layouts"]
    # its manifest missing, the arm64 image's config looks unreferenced (its layer is amd64's too)
    assert row["missing_blobs"] == 1 and row["unreferenced_blobs"] == 1
    assert row["warnings"]  # they may be referenced: its manifest is the one missing
    code = main(["gc", "--delete", "--grace", "0", "--json", dest])
    result = json.loads(ocidx.capsys.readouterr().out)
    assert (code, result["deleted"], result["blobs"]) == (0, 0, [])
    assert any("is not in blobs/" in why for why in result["unproven"])
