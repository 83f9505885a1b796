"""Annotations to names (docs/semantics.md, Names), with the values real writers put in index.json."""

from __future__ import annotations

import pytest

from indexer.names import (
    FAMILIAR_POLICIES,
    HOW_CONTAINERD,
    HOW_FAMILIAR,
    HOW_FULL,
    HOW_TAG,
    Name,
    read_names,
)

C = "io.containerd.image.name"
R = "org.opencontainers.image.ref.name"
HEX = "9b11b8a2a51f5b9ec8e3b6ef5bc1c0f4d5dbd2b5f05b7e5c0f0b5a0e7e6a3d41"
DIGEST = "sha256:" + HEX
ALPINE = "docker.io/library/alpine"

Expected = list[tuple[str, str, str]]


def names_of(annotations: dict[str, object], familiar: str = "normalize") -> Expected:
    return [(n.name, n.tag, n.how) for n in read_names(annotations, familiar=familiar).names]


# (writer, annotations, expected (name, tag, how) in order)
WRITERS: list[tuple[str, dict[str, object], Expected]] = [
    (
        "containerd/nerdctl/docker save: full name in C, tag in R",
        {C: "docker.io/library/alpine:3.16", R: "3.16"},
        [(ALPINE, "3.16", HOW_CONTAINERD)],
    ),
    (
        "docker save of a non-Hub image",
        {C: "ghcr.io/acme/app:v1.2.3", R: "v1.2.3"},
        [("ghcr.io/acme/app", "v1.2.3", HOW_CONTAINERD)],
    ),
    (
        "containerd export of an untagged name: R is empty",
        {C: "docker.io/library/alpine", R: ""},
        [(ALPINE, "", HOW_CONTAINERD)],
    ),
    (
        "containerd export of a tag+digest name: R is tag@digest",
        {C: f"docker.io/library/alpine:3.16@{DIGEST}", R: f"3.16@{DIGEST}"},
        [(ALPINE, "3.16", HOW_CONTAINERD)],
    ),
    (
        "containerd before 2026-04, digest-only name: R is @digest",
        {C: f"docker.io/library/alpine@{DIGEST}", R: f"@{DIGEST}"},
        [(ALPINE, "", HOW_CONTAINERD)],
    ),
    (
        "containerd since 2026-04, digest-only name: R is the full name",
        {C: f"docker.io/library/alpine@{DIGEST}", R: f"docker.io/library/alpine@{DIGEST}"},
        [(ALPINE, "", HOW_CONTAINERD)],
    ),
    (
        "BuildKit type=oci tar exporter (via containerd)",
        {C: "docker.io/myorg/api:sha-4f2a9c1", R: "sha-4f2a9c1"},
        [("docker.io/myorg/api", "sha-4f2a9c1", HOW_CONTAINERD)],
    ),
    (
        "BuildKit tar=false with no name: Tag(latest)",
        {R: "latest"},
        [("", "latest", HOW_TAG)],
    ),
    (
        "BuildKit tar=false before PR #5589: comma-joined raw names",
        {R: "docker.io/myorg/api:v1,myorg/api:latest"},
        [("docker.io/myorg/api", "v1", HOW_FULL), ("docker.io/myorg/api", "latest", HOW_FAMILIAR)],
    ),
    (
        "BuildKit tar=false before PR #5589: registry names with a port",
        {R: "registry.local:5000/team/app:v2,registry.local:5000/team/app:latest"},
        [("registry.local:5000/team/app", "v2", HOW_FULL), ("registry.local:5000/team/app", "latest", HOW_FULL)],
    ),
    ("buildx cache export type=local (default tag)", {R: "latest"}, [("", "latest", HOW_TAG)]),
    ("buildx cache export with tag=buildcache", {R: "buildcache"}, [("", "buildcache", HOW_TAG)]),
    ("skopeo copy ... oci:DIR:latest", {R: "latest"}, [("", "latest", HOW_TAG)]),
    ("skopeo copy ... oci:DIR:alpine:3.16", {R: "alpine:3.16"}, [(ALPINE, "3.16", HOW_FAMILIAR)]),
    (
        "skopeo copy ... oci:DIR:docker.io/library/alpine:3.16",
        {R: "docker.io/library/alpine:3.16"},
        [(ALPINE, "3.16", HOW_FULL)],
    ),
    (
        "skopeo copy ... oci:DIR:localhost:5000/team/app:v2",
        {R: "localhost:5000/team/app:v2"},
        [("localhost:5000/team/app", "v2", HOW_FULL)],
    ),
    ("buildah push ... oci:DIR:team/app:v2", {R: "team/app:v2"}, [("docker.io/team/app", "v2", HOW_FAMILIAR)]),
    (
        "buildah push ... oci:DIR:library/alpine:3.16",
        {R: "library/alpine:3.16"},
        [(ALPINE, "3.16", HOW_FAMILIAR)],
    ),
    (
        "podman save --format oci-dir of a Hub image",
        {R: "docker.io/library/alpine:latest"},
        [(ALPINE, "latest", HOW_FULL)],
    ),
    ("podman save of a local build", {R: "localhost/img:latest"}, [("localhost/img", "latest", HOW_FULL)]),
    (
        "crane pull --format=oci --annotate-ref (ggcr spells Hub index.docker.io)",
        {R: "index.docker.io/library/alpine:3.16"},
        [(ALPINE, "3.16", HOW_FULL)],
    ),
    ("umoci tag", {R: "v1.0"}, [("", "v1.0", HOW_TAG)]),
    ("oras-go store tag", {R: "v1"}, [("", "v1", HOW_TAG)]),
    (
        "regclient ocidir (adds a created annotation)",
        {R: "3.16", "org.opencontainers.image.created": "2026-01-02T03:04:05Z"},
        [("", "3.16", HOW_TAG)],
    ),
    (
        "regctl image export: both annotations, like containerd",
        {C: "docker.io/library/alpine:3.16", R: "3.16"},
        [(ALPINE, "3.16", HOW_CONTAINERD)],
    ),
    (
        "rules_oci legacy: full registry/repo:tag",
        {R: "gcr.io/distroless/static:nonroot"},
        [("gcr.io/distroless/static", "nonroot", HOW_FULL)],
    ),
    (
        "buildx imagetools create to a digest: no name at all",
        {"io.containerd.manifest.subject": DIGEST},
        [],
    ),
    ("crane pull without --annotate-ref: no annotations", {}, []),
]


@pytest.mark.parametrize(("annotations", "expected"), [(a, e) for _, a, e in WRITERS], ids=[w for w, _, _ in WRITERS])
def test_real_writers(annotations: dict[str, object], expected: Expected) -> None:
    reading = read_names(annotations)
    assert [(n.name, n.tag, n.how) for n in reading.names] == expected
    assert reading.invalid == ()
    assert reading.warnings == ()


@pytest.mark.parametrize(
    ("ref_name", "expected"),
    [
        pytest.param("alpine", [("", "alpine", HOW_TAG)], id="bare word is a tag, not a repository"),
        pytest.param("Latest", [("", "Latest", HOW_TAG)], id="upper-case tag is valid and kept as written"),
        pytest.param("_v1", [("", "_v1", HOW_TAG)], id="tag may start with underscore"),
        pytest.param(HEX, [("", HEX, HOW_TAG)], id="64-hex bare word is a tag"),
        pytest.param("t" * 128, [("", "t" * 128, HOW_TAG)], id="128-char tag"),
        pytest.param(f"alpine@{DIGEST}", [(ALPINE, "", HOW_FAMILIAR)], id="familiar name with digest, no C"),
        pytest.param(
            f"docker.io/library/alpine:3.16@{DIGEST}", [(ALPINE, "3.16", HOW_FULL)], id="full name tag and digest"
        ),
        pytest.param("docker.io/library/alpine", [(ALPINE, "", HOW_FULL)], id="full name without tag: tag empty"),
        pytest.param("library/alpine", [(ALPINE, "", HOW_FAMILIAR)], id="familiar name without tag: tag empty"),
        pytest.param("docker.io/alpine:3", [(ALPINE, "3", HOW_FULL)], id="docker.io gets library/"),
        pytest.param(
            "localhost:5000/app:1.0", [("localhost:5000/app", "1.0", HOW_FULL)], id="localhost with port is a domain"
        ),
        pytest.param(
            "localhost:5000", [("docker.io/library/localhost", "5000", HOW_FAMILIAR)], id="host:port alone is name:tag"
        ),
        pytest.param(
            "Docker.io/library/alpine:3.16",
            [("Docker.io/library/alpine", "3.16", HOW_FULL)],
            id="upper-case domain is kept and is not Hub",
        ),
        pytest.param(f"sha256:{HEX}", [], id="a bare digest names nothing"),
        pytest.param(f"@{DIGEST}", [], id="@digest alone names nothing"),
        pytest.param("a:1,a:1", [("docker.io/library/a", "1", HOW_FAMILIAR)], id="duplicates reported once"),
        pytest.param(
            "alpine:3.16, latest ,,",
            [(ALPINE, "3.16", HOW_FAMILIAR), ("", "latest", HOW_TAG)],
            id="list parts stripped, empty parts skipped",
        ),
    ],
)
def test_ref_name_edge_cases(ref_name: str, expected: Expected) -> None:
    reading = read_names({R: ref_name})
    assert [(n.name, n.tag, n.how) for n in reading.names] == expected
    assert reading.warnings == ()


@pytest.mark.parametrize(
    "ref_name",
    [
        pytest.param("v1.0+build", id="plus sign: valid OCI ref.name, not a docker tag"),
        pytest.param("t" * 129, id="129-char bare word: too long for a tag, never a repository"),
        pytest.param("ALPINE:3.16", id="upper-case repository"),
        pytest.param("a:b:c", id="two colons"),
        pytest.param("latest\n", id="trailing newline"),
        pytest.param(" latest", id="leading blank"),
        pytest.param(":3.16", id="tag with empty name"),
        pytest.param("@sha256:abc", id="short digest"),
        pytest.param(f"alpine@sha256:{HEX.upper()}", id="upper-case digest hex"),
        pytest.param(f"alpine@md5:{HEX}", id="unsupported algorithm"),
        pytest.param("[::1]:5000", id="bare IPv6 host"),
        pytest.param("app\x00evil", id="NUL"),
    ],
)
def test_invalid_ref_names_are_kept_raw_and_warned(ref_name: str) -> None:
    reading = read_names({R: ref_name})
    assert reading.names == ()
    assert reading.invalid == (ref_name,)
    assert len(reading.warnings) == 1
    assert R in reading.warnings[0]


def test_empty_and_non_string_annotations_are_absent() -> None:
    assert read_names({R: "", C: ""}) == read_names({})
    assert read_names({R: 5, C: ["docker.io/library/alpine:3.16"]}).names == ()
    assert read_names({}).invalid == () and read_names({}).warnings == ()


def test_tag_joins_containerd_repository_only_when_tags_agree() -> None:
    assert names_of({C: "docker.io/library/alpine:3.16", R: "latest"}) == [
        (ALPINE, "3.16", HOW_CONTAINERD),
        ("", "latest", HOW_TAG),
    ]
    # C without a tag: R's tag does not join it.
    assert names_of({C: "docker.io/library/alpine", R: "3.16"}) == [(ALPINE, "", HOW_CONTAINERD), ("", "3.16", HOW_TAG)]


def test_tag_at_digest_with_containerd_name_is_a_tag() -> None:
    # containerd writes the object part; a different tag stays a bare tag.
    assert names_of({C: "docker.io/library/alpine:3.16", R: f"edge@{DIGEST}"}) == [
        (ALPINE, "3.16", HOW_CONTAINERD),
        ("", "edge", HOW_TAG),
    ]


def test_word_at_digest_without_containerd_name_is_familiar() -> None:
    # Documented choice: without C, WORD@DIGEST is what a skopeo user typed.
    assert names_of({R: f"3.16@{DIGEST}"}) == [("docker.io/library/3.16", "", HOW_FAMILIAR)]


def test_comma_list_parts_join_containerd_name_each_on_its_own() -> None:
    assert names_of({C: "docker.io/library/app:v1", R: "v1,v2"}) == [
        ("docker.io/library/app", "v1", HOW_CONTAINERD),
        ("", "v2", HOW_TAG),
    ]


def test_comma_list_keeps_good_parts_beside_invalid_ones() -> None:
    reading = read_names({R: "alpine:3.16,bad name,v1.0+build"})
    assert [(n.name, n.tag, n.how) for n in reading.names] == [(ALPINE, "3.16", HOW_FAMILIAR)]
    assert reading.invalid == ("bad name", "v1.0+build")
    assert len(reading.warnings) == 2


def test_invalid_containerd_name_is_warned_and_ignored() -> None:
    reading = read_names({C: "Docker.IO/Library/Alpine:Latest", R: "Latest"})
    assert [(n.name, n.tag, n.how) for n in reading.names] == [("", "Latest", HOW_TAG)]
    assert reading.invalid == ()
    assert len(reading.warnings) == 1
    assert C in reading.warnings[0]
    assert "Docker.IO/Library/Alpine:Latest" in reading.warnings[0]


def test_valid_containerd_name_survives_invalid_ref_name() -> None:
    reading = read_names({C: "docker.io/library/alpine:3.16", R: "3.16 "})
    assert [(n.name, n.tag) for n in reading.names] == [(ALPINE, "3.16")]
    assert reading.invalid == ("3.16 ",)


def test_familiar_policy_tag_only_keeps_the_tag() -> None:
    policy = "tag-only"
    assert names_of({R: "alpine:3.16"}, policy) == [("", "3.16", HOW_TAG)]
    assert names_of({R: "library/alpine"}, policy) == []
    assert names_of({R: f"alpine@{DIGEST}"}, policy) == []
    # Only familiar references are affected.
    assert names_of({R: "docker.io/library/alpine:3.16"}, policy) == [(ALPINE, "3.16", HOW_FULL)]
    assert names_of({R: "latest"}, policy) == [("", "latest", HOW_TAG)]
    assert names_of({C: "docker.io/library/alpine:3.16", R: "alpine:3.16"}, policy) == [
        (ALPINE, "3.16", HOW_CONTAINERD),
        ("", "3.16", HOW_TAG),
    ]


def test_familiar_policy_ignore_drops_familiar_references() -> None:
    policy = "ignore"
    assert names_of({R: "alpine:3.16"}, policy) == []
    assert names_of({R: "team/app:v2,localhost/img:1,v3"}, policy) == [
        ("localhost/img", "1", HOW_FULL),
        ("", "v3", HOW_TAG),
    ]
    assert read_names({R: "alpine:3.16"}, familiar=policy).warnings == ()


def test_unknown_familiar_policy_is_refused() -> None:
    assert FAMILIAR_POLICIES == ("normalize", "tag-only", "ignore")
    with pytest.raises(ValueError, match="familiar"):
        read_names({R: "latest"}, familiar="loose")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("evil\x1b[31mred", "evil\\x1b[31mred"),
        ("a\x00b", "a\\x00b"),
        ("line\nbreak", "line\\x0abreak"),
        ("bidi\u202etxt", "bidi\\u202etxt"),
    ],
)
def test_warnings_escape_control_characters(raw: str, escaped: str) -> None:
    reading = read_names({R: raw, C: raw})
    assert reading.invalid == (raw,)
    assert len(reading.warnings) == 2
    for warning in reading.warnings:
        assert escaped in warning
        assert not any(ord(c) < 0x20 or c == "\u202e" for c in warning)


def test_long_values_are_shortened_in_warnings_not_in_invalid() -> None:
    raw = "x" * 5000 + "+"
    reading = read_names({R: raw})
    assert reading.invalid == (raw,)
    assert len(reading.warnings[0]) < 400
    assert "5001 chars" in reading.warnings[0]


def test_name_to_json_and_value_semantics() -> None:
    name = Name(ALPINE, "3.16", HOW_CONTAINERD)
    assert name.to_json() == {"name": ALPINE, "tag": "3.16", "how": "containerd"}
    assert name == Name(ALPINE, "3.16", HOW_CONTAINERD)
    assert len({name, Name(ALPINE, "3.16", HOW_CONTAINERD)}) == 1
    assert name != Name(ALPINE, "latest", HOW_CONTAINERD)
