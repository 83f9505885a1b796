"""Lookups (docs/semantics.md) and fresh answers without rescanning (Freshness), on real layouts and a real index.

Every test builds layouts on disk, indexes them with ``ocidx scan`` into a real
SQLite file and asks ``ocidx`` (in-process ``main``) what a user would ask.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time

import pytest
from cli_run import ANSWER_KEYS
from harness import barrier_answering
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    LINUX_ARM64_V8,
    LINUX_ARM_V7,
    OCI_MANIFEST,
    Descriptor,
    Layout,
    named,
)

from indexer.cli import main
from indexer.config import Root
from indexer.errors import Ambiguous, NotFound, UsageError
from indexer.query import Index
from indexer.store import state as roots_mod


class Run:
    """``ocidx`` run in-process against one database, with its exit code and both streams."""

    def __init__(self, db: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = db
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        command, *rest = args
        code = main([command, "--db", self.db, *rest])
        out, err = self.capsys.readouterr()
        return code, out, err

    def scan(self, *roots: str) -> None:
        code, _, err = self("scan", "--no-progress", *roots)
        assert code == 0, err

    def json(self, *args: str) -> tuple[int, object]:
        code, out, _ = self(*args, "--json")
        return code, json.loads(out)


@pytest.fixture
def ocidx(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(os.path.join(tmp_path, "index.db"), capsys)


class Cache:
    """One realistic layout: a tag-only image, a multi-arch alpine, a full and a familiar name."""

    def __init__(self, root: str) -> None:
        self.layout = Layout(os.path.join(root, "cache"))
        self.path = os.path.realpath(self.layout.path)
        lay = self.layout
        self.latest = lay.manifest(label="latest")
        self.amd64 = lay.manifest(platform=LINUX_AMD64, label="alpine-amd64")
        self.arm64 = lay.manifest(platform=LINUX_ARM64_V8, label="alpine-arm64")
        self.armv7 = lay.manifest(platform=LINUX_ARM_V7, label="alpine-armv7")
        self.alpine = lay.index([self.amd64, self.arm64, self.armv7])
        self.app = lay.manifest(label="app")
        self.familiar = lay.manifest(label="alpine-3.15")
        lay.write_index(
            [
                named(self.latest, ref="latest"),
                named(self.alpine, ref="3.16", containerd="docker.io/library/alpine:3.16"),
                named(self.app, ref="localhost:5000/team/app:v2"),
                named(self.familiar, ref="alpine:3.15"),
            ]
        )


@pytest.fixture
def cache(tmp_path: str, ocidx: Run) -> Cache:
    made = Cache(os.path.join(tmp_path, "root"))
    ocidx.scan(os.path.join(tmp_path, "root"))
    return made


def digest(descriptor: Descriptor) -> str:
    return str(descriptor["digest"])


# -- the target forms of docs/semantics.md ---------------------------------------------------------------


def test_path_tag_is_tag_only_whatever_the_repository(ocidx: Run, cache: Cache) -> None:
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert list(answer) == ANSWER_KEYS
    assert answer["digest"] == digest(cache.alpine)
    assert answer["layout"] == cache.path
    assert answer["source"] == "entry"
    assert answer["names"] == [{"name": "docker.io/library/alpine", "tag": "3.16", "how": "containerd"}]
    assert answer["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert answer["size"] == cache.alpine["size"]


def test_path_alone_means_latest(ocidx: Run, cache: Cache) -> None:
    code, out, _ = ocidx("resolve", f"oci-layout://{cache.path}")
    assert (code, out) == (0, digest(cache.latest) + "\n")


def test_path_alone_never_falls_back_to_a_single_entry(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "one"))
    lay.write_index([named(lay.manifest(), ref="v1.2")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, err = ocidx("resolve", f"oci-layout://{lay.path}")
    assert code == 1
    assert out == ""
    assert "latest" in err
    assert ":v1.2" in err  # the message lists what the layout does hold
    assert os.path.realpath(lay.path) in err


def test_digest_form(ocidx: Run, cache: Cache) -> None:
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}@{digest(cache.app)}")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(cache.app)
    assert answer["source"] == "entry"
    assert answer["names"] == [{"name": "localhost:5000/team/app", "tag": "v2", "how": "full"}]
    assert answer["warnings"] == []


def test_tag_and_matching_digest_has_no_warning(ocidx: Run, cache: Cache) -> None:
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}:latest@{digest(cache.latest)}")
    assert (code, out, err) == (0, digest(cache.latest) + "\n", "")


def test_tag_with_other_digest_answers_the_digest_with_a_warning(ocidx: Run, cache: Cache) -> None:
    target = f"oci-layout://{cache.path}:latest@{digest(cache.app)}"
    code, out, err = ocidx("resolve", target)
    assert code == 0
    assert out == digest(cache.app) + "\n"
    assert "warning" in err
    assert "latest" in err
    assert digest(cache.latest) in err  # where the tag points now

    code, answer = ocidx.json("resolve", target)
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(cache.app)
    assert len(answer["warnings"]) == 1


def test_tag_with_other_digest_is_an_error_under_strict(ocidx: Run, cache: Cache) -> None:
    target = f"oci-layout://{cache.path}:latest@{digest(cache.app)}"
    code, out, err = ocidx("resolve", "--strict", target)
    assert code == 1
    assert out == ""
    assert "latest" in err
    code, failure = ocidx.json("resolve", "--strict", target)
    assert code == 1
    assert isinstance(failure, dict)
    assert failure["error"] == "tag_mismatch"
    assert failure["message"]


@pytest.mark.parametrize(
    ("name", "which"),
    [
        ("alpine:3.16", "alpine"),
        ("library/alpine:3.16", "alpine"),
        ("docker.io/library/alpine:3.16", "alpine"),
        ("index.docker.io/library/alpine:3.16", "alpine"),
        ("localhost:5000/team/app:v2", "app"),
        ("alpine:3.15", "familiar"),
        ("docker.io/library/alpine:3.15", "familiar"),
    ],
)
def test_full_name_form_is_normalized(ocidx: Run, cache: Cache, name: str, which: str) -> None:
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}/{name}")
    assert code == 0, err
    assert out == digest(getattr(cache, which)) + "\n"


def test_full_name_with_digest(ocidx: Run, cache: Cache) -> None:
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}/alpine:3.16@{digest(cache.alpine)}")
    assert (code, out, err) == (0, digest(cache.alpine) + "\n", "")
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}/alpine:3.15@{digest(cache.alpine)}")
    assert code == 0
    assert out == digest(cache.alpine) + "\n"
    assert "docker.io/library/alpine:3.15" in err


def test_full_name_does_not_match_a_tag_without_repository(ocidx: Run, cache: Cache) -> None:
    # 'latest' is held only as a bare tag: the name docker.io/library/alpine:latest is not there.
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}/alpine")
    assert code == 1
    assert out == ""
    assert "docker.io/library/alpine:latest" in err


def test_bare_name_is_latest_of_that_repository(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "podman"))
    alpine, img = lay.manifest(), lay.manifest()
    lay.write_index([named(alpine, ref="docker.io/library/alpine:latest"), named(img, ref="localhost/img:latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    assert ocidx("resolve", f"oci-layout://{lay.path}/alpine")[:2] == (0, digest(alpine) + "\n")
    assert ocidx("resolve", f"oci-layout://{lay.path}/localhost/img")[:2] == (0, digest(img) + "\n")


def test_store_name_from_config(tmp_path: str, ocidx: Run, cache: Cache) -> None:
    config = os.path.join(tmp_path, "etc", "ocidx.toml")
    os.makedirs(os.path.dirname(config))
    with open(config, "w") as f:
        f.write('[stores]\ncache = "../root/cache"\n')  # relative to the config file
    code, out, err = ocidx("resolve", "--config", config, "oci-layout://cache:3.16")
    assert (code, out) == (0, digest(cache.alpine) + "\n"), err
    code, out, err = ocidx("resolve", "--config", config, "oci-layout://cache")
    assert (code, out) == (0, digest(cache.latest) + "\n"), err
    code, answer = ocidx.json("resolve", "--config", config, f"oci-layout://cache@{digest(cache.app)}")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["layout"] == cache.path


def test_relative_path(ocidx: Run, cache: Cache) -> None:
    code, answer = ocidx.json("resolve", "oci-layout://root/cache:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["layout"] == cache.path
    assert answer["digest"] == digest(cache.alpine)
    code, out, _ = ocidx("resolve", "oci-layout://./root/../root/cache/alpine:3.15")
    assert (code, out) == (0, digest(cache.familiar) + "\n")


def test_symlinked_path_finds_the_indexed_layout(tmp_path: str, ocidx: Run, cache: Cache) -> None:
    link = os.path.join(tmp_path, "link")
    os.symlink(cache.path, link)
    code, answer = ocidx.json("resolve", f"oci-layout://{link}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["layout"] == cache.path
    assert answer["digest"] == digest(cache.alpine)
    assert answer["freshness"] == "indexed"


def test_format_context_is_a_build_context_that_resolves_again(ocidx: Run, cache: Cache) -> None:
    code, out, _ = ocidx("resolve", "--format", "context", "oci-layout://root/cache:3.16")
    assert code == 0
    assert out == f"oci-layout://{cache.path}@{digest(cache.alpine)}\n"
    code, again, _ = ocidx("resolve", out.strip())
    assert (code, again) == (0, digest(cache.alpine) + "\n")


def test_format_json_equals_json_flag(ocidx: Run, cache: Cache) -> None:
    code, out, _ = ocidx("resolve", "--format", "json", "oci-layout://root/cache:3.16")
    assert code == 0
    assert list(json.loads(out)) == ANSWER_KEYS


# -- resolve --layout PATH REF ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "which"),
    [
        (":3.16", "alpine"),
        (":latest", "latest"),
        ("alpine:3.16", "alpine"),
        ("docker.io/library/alpine:3.16", "alpine"),
        ("localhost:5000/team/app:v2", "app"),
        ("alpine:3.15", "familiar"),
    ],
)
def test_layout_ref_forms(ocidx: Run, cache: Cache, ref: str, which: str) -> None:
    code, out, err = ocidx("resolve", "--layout", "root/cache", ref)
    assert code == 0, err
    assert out == digest(getattr(cache, which)) + "\n"


def test_layout_ref_digest_and_bare_hex(ocidx: Run, cache: Cache) -> None:
    wanted = digest(cache.app)
    assert ocidx("resolve", "--layout", "root/cache", "@" + wanted)[:2] == (0, wanted + "\n")
    # ParseAnyReference: a bare 64-hex string is a digest, not a repository name
    assert ocidx("resolve", "--layout", "root/cache", wanted.removeprefix("sha256:"))[:2] == (0, wanted + "\n")


def test_layout_ref_bare_word_hints_at_the_tag(ocidx: Run, cache: Cache) -> None:
    code, out, err = ocidx("resolve", "--layout", "root/cache", "latest")
    assert code == 1
    assert out == ""
    assert "did you mean" in err
    assert "':latest'" in err
    # and the hint is right: the tag form finds it
    assert ocidx("resolve", "--layout", "root/cache", ":latest")[:2] == (0, digest(cache.latest) + "\n")


def test_layout_ref_bare_word_without_tag_gives_no_hint(ocidx: Run, cache: Cache) -> None:
    code, _, err = ocidx("resolve", "--layout", "root/cache", "nosuch")
    assert code == 1
    assert "did you mean" not in err


@pytest.mark.parametrize(
    "ref",
    [
        ":",
        "",
        "@sha256:abc",
        "@sha256:" + "A" * 64,
        "@md5:" + "0" * 32,
        "Alpine:3.16",
        "alpine:",
        "alpine:3.16@sha256:12",
    ],
)
def test_layout_ref_invalid_is_usage_error(ocidx: Run, cache: Cache, ref: str) -> None:
    code, out, err = ocidx("resolve", "--layout", "root/cache", ref)
    assert code == 2
    assert out == ""
    assert err.startswith("ocidx:")


@pytest.mark.parametrize("suffix", [":", "@sha256:abc", "@sha256:" + "g" * 64, ":latest@sha256:1"])
def test_target_invalid_is_usage_error(ocidx: Run, cache: Cache, suffix: str) -> None:
    code, out, _ = ocidx("resolve", f"oci-layout://{cache.path}{suffix}")
    assert code == 2
    assert out == ""


@pytest.mark.parametrize(("suffix", "category"), [(":bad~tag", "tag_invalid_format"), ("@sha256:1", None)])
def test_target_errors_name_the_target(ocidx: Run, cache: Cache, suffix: str, category: str | None) -> None:
    target = f"oci-layout://{cache.path}{suffix}"
    code, failure = ocidx.json("resolve", target)
    assert code == 2  # an invalid tag on an existing layout is a bad reference, not a missing layout
    assert isinstance(failure, dict)
    assert target in str(failure["message"])
    if category is not None:
        assert failure["error"] == category


@pytest.mark.parametrize("tag", ["", "bad~tag", "a/b"])
def test_store_with_invalid_tag_is_usage_error(tmp_path: str, ocidx: Run, cache: Cache, tag: str) -> None:
    config = os.path.join(tmp_path, "c.toml")
    with open(config, "w") as f:
        f.write(f'[stores]\ncache = "{cache.path}"\n')
    code, _, err = ocidx("resolve", "--config", config, f"oci-layout://cache:{tag}")
    assert code == 2, err


def test_target_without_scheme_is_usage_error(ocidx: Run, cache: Cache) -> None:
    code, _, err = ocidx("resolve", cache.path)
    assert code == 2
    assert "--layout" in err


def test_not_a_layout(tmp_path: str, ocidx: Run, cache: Cache) -> None:
    os.makedirs(os.path.join(tmp_path, "plain", "dir"))
    code, _, err = ocidx("resolve", "oci-layout://plain/dir:latest")
    assert code == 1
    assert "plain/dir" in err


# -- ambiguity -------------------------------------------------------------------------------------


def test_different_digests_are_ambiguous_with_every_candidate(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "two"))
    alpine, img = lay.manifest(), lay.manifest()
    lay.write_index([named(alpine, ref="docker.io/library/alpine:latest"), named(img, ref="localhost/img:latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, err = ocidx("resolve", f"oci-layout://{lay.path}")
    assert code == 3
    assert out == ""
    assert digest(alpine) in err or "ambiguous" in err
    code, failure = ocidx.json("resolve", f"oci-layout://{lay.path}:latest")
    assert code == 3
    assert isinstance(failure, dict)
    assert failure["error"] == "ambiguous"
    candidates = {c["digest"]: c["names"] for c in failure["candidates"]}
    assert candidates == {
        digest(alpine): [{"name": "docker.io/library/alpine", "tag": "latest", "how": "full"}],
        digest(img): [{"name": "localhost/img", "tag": "latest", "how": "full"}],
    }
    with Index(ocidx.db) as index, pytest.raises(Ambiguous) as caught:
        index.resolve(f"oci-layout://{lay.path}")
    assert len(caught.value.candidates) == 2
    # find lists both, it never reports an ambiguity
    code, found = ocidx.json("find", ":latest")
    assert code == 0
    assert isinstance(found, list)
    assert sorted(item["digest"] for item in found) == sorted([digest(alpine), digest(img)])


def test_same_digest_through_two_entries_is_one_answer(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "dup"))
    image = lay.manifest()
    lay.write_index(
        [
            named(image, ref="v1", containerd="docker.io/library/x:v1"),
            named(image, ref="v1"),
            named(image, ref="docker.io/library/y:v1"),
        ]
    )
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(image)
    assert {(n["name"], n["tag"]) for n in answer["names"]} == {
        ("docker.io/library/x", "v1"),
        ("", "v1"),
        ("docker.io/library/y", "v1"),
    }


# -- digest lookups: entry, then child, then blob ------------------------------------------------------


def test_digest_of_a_child_manifest(ocidx: Run, cache: Cache) -> None:
    code, answer = ocidx.json("resolve", "--layout", "root/cache", "@" + digest(cache.arm64))
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(cache.arm64)
    assert answer["source"] == "child"
    assert answer["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}


def test_digest_of_a_bare_blob(ocidx: Run, cache: Cache) -> None:
    config_blob = cache.layout.blob(b'{"not":"listed anywhere"}')
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}@{digest(config_blob)}")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["source"] == "blob"
    assert answer["digest"] == digest(config_blob)
    assert answer["size"] == config_blob["size"]
    # find is across layouts: it never answers from bare blobs
    code, _, _ = ocidx("find", "@" + digest(config_blob))
    assert code == 1


def test_entry_wins_over_child_with_the_same_digest(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "both"))
    image = lay.manifest(platform=LINUX_AMD64)
    wrapper = lay.index([image])
    lay.write_index([named(wrapper, ref="multi"), named(image, ref="single")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, answer = ocidx.json("resolve", f"oci-layout://{lay.path}@{digest(image)}")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["source"] == "entry"
    assert answer["names"] == [{"name": "", "tag": "single", "how": "tag-only"}]


def test_unknown_digest_is_not_found(ocidx: Run, cache: Cache) -> None:
    code, _, err = ocidx("resolve", f"oci-layout://{cache.path}@sha256:{'0' * 64}")
    assert code == 1
    assert cache.path in err


# -- platforms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "which"),
    [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),  # descriptor says arm64/v8: containerd normalizes v8 away
        ("linux/arm64/v8", "arm64"),
        ("linux/arm", "armv7"),  # arm means arm/v7
        ("linux/arm/v7", "armv7"),
    ],
)
def test_platform_follows_the_nested_index(ocidx: Run, cache: Cache, platform: str, which: str) -> None:
    code, answer = ocidx.json("resolve", "--platform", platform, f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(getattr(cache, which))
    assert answer["source"] == "child"
    assert answer["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_platform_arm64_descriptor_matches_arm64_v8_request(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "plain-arm64"))
    arm = lay.manifest(platform=LINUX_ARM64)
    lay.write_index([named(lay.index([lay.manifest(platform=LINUX_AMD64), arm]), ref="latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, _ = ocidx("resolve", "--platform", "linux/arm64/v8", f"oci-layout://{lay.path}")
    assert (code, out) == (0, digest(arm) + "\n")


def test_platform_with_no_match_lists_the_platforms(ocidx: Run, cache: Cache) -> None:
    target = f"oci-layout://{cache.path}:3.16"
    code, out, err = ocidx("resolve", "--platform", "linux/s390x", target)
    assert code == 1
    assert out == ""
    assert "linux/arm64" in err
    code, failure = ocidx.json("resolve", "--platform", "linux/s390x", target)
    assert code == 1
    assert isinstance(failure, dict)
    assert failure["error"] == "platform_not_found"
    assert failure["platforms"] == [
        {"os": "linux", "architecture": "amd64", "variant": None},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
    ]


def test_platform_whose_child_blob_is_absent(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "partial"))
    amd, arm = lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)
    lay.write_index([named(lay.index([amd, arm]), ref="latest")])
    lay.remove_blob(arm)  # a partial export: only amd64 was pulled
    ocidx.scan(os.path.join(tmp_path, "root"))
    assert ocidx("resolve", "--platform", "linux/amd64", f"oci-layout://{lay.path}")[:2] == (0, digest(amd) + "\n")
    code, failure = ocidx.json("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}")
    assert code == 1
    assert isinstance(failure, dict)
    assert failure["error"] == "platform_not_found"
    assert "absent" in str(failure["message"])
    assert {"os": "linux", "architecture": "arm64", "variant": None} in failure["platforms"]


def test_platform_on_a_single_manifest(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "single"))
    bare = lay.manifest()  # descriptor without platform
    arm = lay.manifest(platform=LINUX_ARM64)
    lay.write_index([named(bare, ref="bare"), named(arm, ref="arm")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    # a manifest whose descriptor names no platform is matched by its config's (linux/amd64)
    assert ocidx("resolve", "--platform", "linux/amd64", f"oci-layout://{lay.path}:bare")[:2] == (
        0,
        digest(bare) + "\n",
    )
    assert ocidx("resolve", "--platform", "linux/arm64/v8", f"oci-layout://{lay.path}:arm")[:2] == (
        0,
        digest(arm) + "\n",
    )
    code, failure = ocidx.json("resolve", "--platform", "linux/amd64", f"oci-layout://{lay.path}:arm")
    assert code == 1
    assert isinstance(failure, dict)
    assert failure["error"] == "platform_not_found"
    assert failure["platforms"] == [{"os": "linux", "architecture": "arm64", "variant": None}]


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "read-through"])
def test_platform_of_a_single_manifest_comes_from_its_config(tmp_path: str, ocidx: Run, indexed: bool) -> None:
    """What `skopeo copy` without --all leaves: one manifest entry, no platform on its descriptor."""
    lay = Layout(os.path.join(tmp_path, "root", "single"))
    amd = lay.manifest()  # its config says linux/amd64; its descriptor says nothing
    lay.write_index([named(amd, ref="app")])
    if indexed:
        ocidx.scan(os.path.join(tmp_path, "root"))
    target = f"oci-layout://{lay.path}:app"
    code, failure = ocidx.json("resolve", "--platform", "linux/arm64", target)
    assert code == 1 and isinstance(failure, dict)
    assert failure["error"] == "platform_not_found"
    assert failure["platforms"] == [{"os": "linux", "architecture": "amd64", "variant": None}]
    assert "single manifest for linux/amd64, not linux/arm64" in str(failure["message"])
    code, answer = ocidx.json("resolve", "--platform", "linux/amd64", target)
    assert code == 0 and isinstance(answer, dict)
    assert (answer["digest"], answer["platform"], answer["warnings"]) == (
        digest(amd),
        {"os": "linux", "architecture": "amd64", "variant": None},
        [],
    )


def test_platform_of_a_single_manifest_whose_config_is_absent(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "partial"))
    amd = lay.manifest()
    with open(lay.blob_path(digest(amd)), "rb") as f:
        config = json.loads(f.read())["config"]
    lay.remove_blob(config)
    lay.write_index([named(amd, ref="app")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, err = ocidx("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}:app")
    assert (code, out) == (0, digest(amd) + "\n")
    assert "could not be checked" in err and str(config["digest"]) in err
    code, answer = ocidx.json("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}:app")
    assert code == 0 and isinstance(answer, dict)
    assert answer["platform"] is None
    assert [w for w in answer["warnings"] if "could not be checked" in w]


def test_platform_of_an_artifact_manifest_is_none(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "artifacts"))
    empty = lay.blob(b"{}", "application/vnd.oci.empty.v1+json")
    payload = lay.blob(b"signature", "application/vnd.dev.cosign.simplesigning.v1+json")
    artifact = lay.blob(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": empty, "layers": [payload]}).encode(),
        OCI_MANIFEST,
    )
    lay.write_index([named(artifact, ref="sig")])
    code, failure = ocidx.json("resolve", "--platform", "linux/amd64", f"oci-layout://{lay.path}:sig")
    assert code == 1 and isinstance(failure, dict)
    assert failure["error"] == "platform_not_found" and failure["platforms"] == []
    assert "an artifact with no platform" in str(failure["message"])


def test_platform_of_a_child_without_a_descriptor_platform_comes_from_its_config(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "unlabelled"))
    amd = {k: v for k, v in lay.manifest(platform=LINUX_AMD64).items() if k != "platform"}
    arm = {k: v for k, v in lay.manifest(platform=LINUX_ARM64).items() if k != "platform"}
    lay.write_index([named(lay.index([amd, arm]), ref="latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, answer = ocidx.json("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}")
    assert code == 0 and isinstance(answer, dict)
    assert answer["digest"] == digest(arm)
    assert answer["platform"] == {"os": "linux", "architecture": "arm64", "variant": None}
    code, failure = ocidx.json("resolve", "--platform", "linux/s390x", f"oci-layout://{lay.path}")
    assert code == 1 and isinstance(failure, dict)
    assert {"os": "linux", "architecture": "amd64", "variant": None} in failure["platforms"]


def test_platform_through_two_levels_of_nested_indexes(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "deep"))
    arm = lay.manifest(platform=LINUX_ARM64)
    inner = lay.index([lay.manifest(platform=LINUX_AMD64), arm])
    outer = lay.index([inner])  # an index inside an index, no platform on the inner descriptor
    lay.write_index([named(outer, ref="latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, err = ocidx("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}")
    assert (code, out) == (0, digest(arm) + "\n"), err


def test_invalid_platform_is_usage_error(ocidx: Run, cache: Cache) -> None:
    assert ocidx("resolve", "--platform", "linux", f"oci-layout://{cache.path}:3.16")[0] == 2


def test_manifests_null_is_an_empty_layout(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "umoci-empty"))
    lay.write_index(None)
    with open(lay.index_path, "rb") as f:
        assert b'"manifests":null' in f.read()
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, _, err = ocidx("resolve", f"oci-layout://{lay.path}")
    assert code == 1
    assert "no named images" in err
    code, listing = ocidx.json("ls")
    assert code == 0
    assert isinstance(listing, list)
    assert [(row["state"], row["entries"]) for row in listing] == [("ok", 0)]


# -- find ---------------------------------------------------------------------------------------------


def _two_layouts(tmp_path: str, ocidx: Run) -> tuple[Layout, Descriptor, Layout, Descriptor]:
    a = Layout(os.path.join(tmp_path, "root", "a"))
    b = Layout(os.path.join(tmp_path, "root", "b"))
    image_a, image_b = a.manifest(label="in-a"), b.manifest(label="in-b")
    a.write_index([named(image_a, ref="latest", containerd="docker.io/library/alpine:latest")])
    b.write_index([named(image_b, ref="latest")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    return a, image_a, b, image_b


def test_find_lists_every_match_never_ambiguity(tmp_path: str, ocidx: Run) -> None:
    a, image_a, b, image_b = _two_layouts(tmp_path, ocidx)
    code, out, err = ocidx("find", ":latest")
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert lines == [
        [os.path.realpath(a.path), digest(image_a), "docker.io/library/alpine:latest"],
        [os.path.realpath(b.path), digest(image_b), ":latest"],
    ]
    code, found = ocidx.json("find", ":latest")
    assert code == 0
    assert isinstance(found, list)
    assert [list(item) for item in found] == [ANSWER_KEYS, ANSWER_KEYS]
    code, found = ocidx.json("find", "alpine")
    assert isinstance(found, list)
    assert [item["digest"] for item in found] == [digest(image_a)]
    code, found = ocidx.json("find", "@" + digest(image_b))
    assert isinstance(found, list)
    assert [(item["layout"], item["source"]) for item in found] == [(os.path.realpath(b.path), "entry")]


def test_find_nothing_is_exit_1(tmp_path: str, ocidx: Run) -> None:
    _two_layouts(tmp_path, ocidx)
    code, out, err = ocidx("find", ":nosuch")
    assert (code, out) == (1, "")
    assert "nosuch" in err
    code, found = ocidx.json("find", ":nosuch")
    assert (code, found) == (1, [])


def test_find_verifies_the_layouts_in_its_answer(tmp_path: str, ocidx: Run) -> None:
    a, image_a, b, _ = _two_layouts(tmp_path, ocidx)
    moved = b.manifest()
    b.write_index([named(moved, ref="latest")])  # after the scan, no daemon
    a.write_index([named(image_a, ref="old")])  # 'latest' no longer in a
    code, found = ocidx.json("find", ":latest")
    assert code == 0
    assert isinstance(found, list)
    assert [(item["layout"], item["digest"], item["freshness"]) for item in found] == [
        (os.path.realpath(b.path), digest(moved), "read-through")
    ]


def test_find_verify_all_sees_matches_the_index_does_not_hold(tmp_path: str, ocidx: Run) -> None:
    a, image_a, _, _ = _two_layouts(tmp_path, ocidx)
    # A live daemon (this process, answering its barrier) that says it took every change, yet has not
    # seen this one (a daemon's bug, or a change it cannot see): find trusts it; --verify-all does not.
    with sqlite3.connect(ocidx.db) as conn:
        conn.execute(
            "UPDATE daemon SET pid = ?, heartbeat_ns = ?, stopped_ns = NULL, watch_mode = 'inotify', roots = ?",
            (os.getpid(), time.time_ns(), roots_mod.to_json([(Root(os.path.realpath(tmp_path) + "/root"), True)])),
        )
    a.write_index([named(image_a, ref="latest"), named(image_a, ref="fresh")])
    with barrier_answering(ocidx.db, "ok"):
        assert ocidx("find", ":fresh")[0] == 1
        code, found = ocidx.json("find", "--verify-all", ":fresh")
    assert code == 0
    assert isinstance(found, list)
    assert [(item["layout"], item["digest"]) for item in found] == [(os.path.realpath(a.path), digest(image_a))]


def test_find_drops_matches_of_a_layout_that_is_gone(tmp_path: str, ocidx: Run) -> None:
    a, _, b, image_b = _two_layouts(tmp_path, ocidx)
    shutil.rmtree(a.path)  # after the scan, no daemon to notice
    code, found = ocidx.json("find", ":latest")
    assert code == 0
    assert isinstance(found, list)
    assert [(item["layout"], item["digest"]) for item in found] == [(os.path.realpath(b.path), digest(image_b))]
    assert ocidx.json("find", "alpine") == (1, [])


def test_find_answers_from_the_last_good_state_when_index_json_is_unreadable(tmp_path: str, ocidx: Run) -> None:
    a, image_a, _, _ = _two_layouts(tmp_path, ocidx)
    os.remove(a.index_path)
    code, found = ocidx.json("find", "alpine")
    assert code == 0
    assert isinstance(found, list)
    assert [item["digest"] for item in found] == [digest(image_a)]
    assert found[0]["freshness"] == "stale"
    assert found[0]["warnings"]


# -- freshness (§5) -------------------------------------------------------------------------------------


def test_in_place_rewrite_is_read_through(ocidx: Run, cache: Cache) -> None:
    newer = cache.layout.manifest(label="newer")
    data = cache.layout.index_document([named(newer, ref="latest")])
    encoded = json.dumps(data).encode()
    with open(cache.layout.index_path, "r+b") as f:  # as skopeo does: no rename
        f.write(encoded)
        f.truncate()
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(newer)
    assert answer["freshness"] == "read-through"
    assert ocidx("resolve", f"oci-layout://{cache.path}:3.16")[0] == 1


def test_atomic_rename_is_read_through(ocidx: Run, cache: Cache) -> None:
    newer = cache.layout.manifest(label="newer")
    cache.layout.write_index([named(newer, ref="latest")], rename=True)
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["freshness"]) == (digest(newer), "read-through")


def test_layout_created_after_the_scan_is_read_through(tmp_path: str, ocidx: Run, cache: Cache) -> None:
    late = Layout(os.path.join(tmp_path, "root", "late"))
    image = late.manifest()
    late.write_index([named(image, ref="v1", containerd="example.com/late:v1")])
    code, answer = ocidx.json("resolve", "oci-layout://root/late:v1")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["freshness"]) == (digest(image), "read-through")
    assert ocidx("resolve", "oci-layout://root/late/example.com/late:v1")[:2] == (0, digest(image) + "\n")
    assert ocidx("resolve", "--layout", "root/late", "example.com/late:v1")[:2] == (0, digest(image) + "\n")


def test_racily_clean_rewrite_keeping_size_and_mtime_is_seen(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "racy"))
    one, two = lay.manifest(), lay.manifest()
    before = lay.write_index([named(one, ref="v1"), named(two, ref="v2")], rename=False)
    ocidx.scan(os.path.join(tmp_path, "root"))
    old = os.stat(lay.index_path)
    after = lay.write_index([named(one, ref="v2"), named(two, ref="v1")], rename=False)
    assert len(after) == len(before)
    os.utime(lay.index_path, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = os.stat(lay.index_path)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    code, answer = ocidx.json("resolve", f"oci-layout://{lay.path}:v1")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(two)
    assert answer["freshness"] == "read-through"


def _torn(lay: Layout) -> None:
    with open(lay.index_path, "rb") as f:
        whole = f.read()
    with open(lay.index_path, "r+b") as f:  # a writer caught mid-rewrite: the JSON ends early
        f.truncate(len(whole) // 2)


def test_torn_index_answers_last_good_state_as_stale(ocidx: Run, cache: Cache) -> None:
    _torn(cache.layout)
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert out == digest(cache.alpine) + "\n"
    assert "warning" in err
    assert cache.path in err
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["freshness"] == "stale"
    assert answer["digest"] == digest(cache.alpine)
    assert answer["warnings"]


def test_torn_index_under_strict_is_exit_5(ocidx: Run, cache: Cache) -> None:
    _torn(cache.layout)
    code, out, err = ocidx("resolve", "--strict", f"oci-layout://{cache.path}:3.16")
    assert (code, out) == (5, "")
    assert cache.path in err
    code, failure = ocidx.json("resolve", "--strict", f"oci-layout://{cache.path}:3.16")
    assert code == 5
    assert isinstance(failure, dict)
    assert failure["error"] == "index_invalid"


def test_torn_index_stays_stale_after_a_rescan(ocidx: Run, cache: Cache, tmp_path: str) -> None:
    _torn(cache.layout)
    ocidx.scan(os.path.join(tmp_path, "root"))  # the scan flags the layout but keeps its rows
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["freshness"]) == (digest(cache.alpine), "stale")


def test_torn_index_without_last_good_state_is_exit_5(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "torn"))
    lay.write_index([named(lay.manifest(), ref="latest")])
    _torn(lay)
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, out, err = ocidx("resolve", f"oci-layout://{lay.path}")
    assert (code, out) == (5, "")
    assert os.path.realpath(lay.path) in err
    # never indexed at all: the same
    other = Layout(os.path.join(tmp_path, "elsewhere"))
    other.write_index([named(other.manifest(), ref="latest")])
    _torn(other)
    assert ocidx("resolve", f"oci-layout://{other.path}")[0] == 5


def test_python_api_returns_answers_and_raises(ocidx: Run, cache: Cache) -> None:
    with Index(ocidx.db) as index:
        answer = index.resolve(f"oci-layout://{cache.path}:3.16", platform="linux/arm64")
        assert answer.digest == digest(cache.arm64)
        assert list(answer.to_json()) == ANSWER_KEYS
        assert [a.digest for a in index.find("alpine:3.16")] == [digest(cache.alpine)]
        with pytest.raises(NotFound) as caught:
            index.resolve_in(cache.path, ":nosuch")
        assert caught.value.exit_code == 1


def test_answers_carry_the_same_warnings_indexed_or_read_through(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "warned"))
    image = lay.manifest()
    lay.write_index([named(image, ref="latest"), named(lay.manifest(), ref="not a tag!")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, indexed = ocidx.json("resolve", f"oci-layout://{lay.path}")
    assert code == 0
    assert isinstance(indexed, dict)
    assert (indexed["freshness"], indexed["warnings"]) == ("indexed", [])
    code, detail = ocidx.json("ls", lay.path)
    assert isinstance(detail, list)
    assert len(detail[0]["warnings"]) == 1
    assert "not a tag!" in detail[0]["warnings"][0]

    lay.write_index([named(image, ref="latest"), named(lay.manifest(), ref="not a tag!"), named(image, ref="x")])
    code, out, err = ocidx("resolve", "--json", f"oci-layout://{lay.path}")
    assert code == 0
    through = json.loads(out)
    assert through["freshness"] == "read-through"
    assert through["warnings"] == []  # the bad name of another entry is not this answer's warning
    assert err == ""
    code, detail = ocidx.json("ls", lay.path)
    assert isinstance(detail, list)
    assert detail[0]["freshness"] == "read-through"
    assert len(detail[0]["warnings"]) == 1  # listed once, not once per source


def _scanned_long_after_last_change(db_path: str) -> None:
    """Make the stored reads look 10 s later than they were, instead of sleeping past the racy window.

    A stored identity is trusted without reading index.json only when the file had not changed for
    a while when it was read (git's racily-clean rule); this moves the recorded read time, not the file.
    """
    conn = sqlite3.connect(db_path)
    try:
        conn.execute(
            "UPDATE layouts SET read_ns = read_ns + 10000000000, blobs_listed_ns = blobs_listed_ns + 10000000000"
        )
        conn.commit()
    finally:
        conn.close()


def test_missing_index_json_with_last_good_state_is_stale(ocidx: Run, cache: Cache) -> None:
    os.remove(cache.layout.index_path)  # oci-layout is still there: a writer between unlink and create
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}:3.16")
    assert (code, out) == (0, digest(cache.alpine) + "\n")
    assert "warning" in err
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert isinstance(answer, dict)
    assert answer["freshness"] == "stale"
    code, failure = ocidx.json("resolve", "--strict", f"oci-layout://{cache.path}:3.16")
    assert code == 5
    assert isinstance(failure, dict)
    assert failure["error"] == "layout_unreadable"


def test_layout_without_index_json_and_no_last_good_state_is_exit_5(tmp_path: str, ocidx: Run, cache: Cache) -> None:
    Layout(os.path.join(tmp_path, "root", "marker-only"))
    code, out, err = ocidx("resolve", "oci-layout://root/marker-only")
    assert (code, out) == (5, "")
    assert "index.json" in err


def test_a_layout_removed_after_the_scan_is_not_found(ocidx: Run, cache: Cache) -> None:
    shutil.rmtree(cache.path)
    code, out, err = ocidx("resolve", f"oci-layout://{cache.path}:3.16")
    assert (code, out) == (1, "")
    assert cache.path in err


def test_broken_layout_keeps_its_error_category_when_unchanged(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "never-good"))
    lay.write_index_bytes(b'{"schemaVersion": 2, "manifests": {}}')
    ocidx.scan(os.path.join(tmp_path, "root"))
    for trusted in (False, True):
        if trusted:
            _scanned_long_after_last_change(ocidx.db)  # now answered from the stored state alone
        code, failure = ocidx.json("resolve", f"oci-layout://{lay.path}")
        assert code == 5, trusted
        assert isinstance(failure, dict)
        assert failure["error"] == "index_invalid", trusted


def test_trusted_identity_answers_from_the_index(ocidx: Run, cache: Cache) -> None:
    _scanned_long_after_last_change(ocidx.db)
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["freshness"]) == (digest(cache.alpine), "indexed")
    newer = cache.layout.manifest(label="newer")
    cache.layout.write_index([named(newer, ref="3.16")], rename=False)  # any change of identity is seen
    code, answer = ocidx.json("resolve", f"oci-layout://{cache.path}:3.16")
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["freshness"]) == (digest(newer), "read-through")


def test_a_name_without_tag_matches_digest_lookups_not_latest(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "untagged"))
    image = lay.manifest()
    lay.write_index([named(image, ref="docker.io/library/alpine")])  # docs/semantics.md, Names: tag empty
    ocidx.scan(os.path.join(tmp_path, "root"))
    assert ocidx("resolve", f"oci-layout://{lay.path}/alpine")[0] == 1  # not alpine:latest
    assert ocidx("resolve", f"oci-layout://{lay.path}")[0] == 1
    code, out, err = ocidx("resolve", f"oci-layout://{lay.path}/alpine@{digest(image)}")
    assert (code, out, err) == (0, digest(image) + "\n", "")  # the name points there: no warning
    code, out, err = ocidx("resolve", f"oci-layout://{lay.path}/busybox@{digest(image)}")
    assert (code, out) == (0, digest(image) + "\n")
    assert "docker.io/library/busybox" in err  # that name does not point there: a warning
    code, found = ocidx.json("find", f"alpine@{digest(image)}")
    assert isinstance(found, list)
    assert [(item["digest"], item["warnings"]) for item in found] == [(digest(image), [])]


def test_docker_manifest_list_and_platform(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "docker"))
    amd, arm = lay.manifest(platform=LINUX_AMD64, docker=True), lay.manifest(platform=LINUX_ARM_V7, docker=True)
    listing = lay.index([amd, arm], docker=True)
    lay.write_index([named(listing, ref="1.0", containerd="docker.io/library/app:1.0")])
    ocidx.scan(os.path.join(tmp_path, "root"))
    code, answer = ocidx.json("resolve", "--platform", "linux/arm", f"oci-layout://{lay.path}/app:1.0")
    assert code == 0
    assert isinstance(answer, dict)
    assert answer["digest"] == digest(arm)
    assert answer["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert answer["platform"] == {"os": "linux", "architecture": "arm", "variant": "v7"}
    assert answer["names"] == [{"name": "docker.io/library/app", "tag": "1.0", "how": "containerd"}]


def test_platform_in_a_read_through_layout(ocidx: Run, cache: Cache) -> None:
    arm = cache.layout.manifest(platform=LINUX_ARM64, label="new-arm")
    amd = cache.layout.manifest(platform=LINUX_AMD64, label="new-amd")
    cache.layout.write_index([named(cache.layout.index([amd, arm]), ref="3.17")])
    code, answer = ocidx.json("resolve", "--platform", "linux/arm64/v8", f"oci-layout://{cache.path}:3.17")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["source"], answer["freshness"]) == (digest(arm), "child", "read-through")


@pytest.mark.parametrize(
    "call",
    [
        lambda index: index.resolve("oci-layout://root/cache\0x:3.16"),
        lambda index: index.resolve_in("root/cache\0", ":3.16"),
        lambda index: index.layout_detail("root/\0"),
        lambda index: index.layouts("root/\0"),
    ],
)
def test_python_api_refuses_nul_in_paths_as_usage_error(ocidx: Run, cache: Cache, call: object) -> None:
    with Index(ocidx.db) as index, pytest.raises(UsageError, match="NUL"):
        call(index)  # type: ignore[operator]


def test_platform_under_a_nested_index_whose_blob_arrived_after_the_scan(tmp_path: str, ocidx: Run) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "late-blob"))
    arm = lay.manifest(platform=LINUX_ARM64)
    listing = lay.index([lay.manifest(platform=LINUX_AMD64), arm])
    with open(lay.blob_path(digest(listing)), "rb") as f:
        listing_bytes = f.read()
    lay.write_index([named(listing, ref="latest")])
    lay.remove_blob(listing)  # index.json names it, blobs/ does not have it yet
    ocidx.scan(os.path.join(tmp_path, "root"))
    _scanned_long_after_last_change(ocidx.db)  # index.json does not change again: the index is trusted
    assert ocidx("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}")[0] == 1
    lay.blob(listing_bytes, str(listing["mediaType"]))  # the writer finishes copying blobs
    code, answer = ocidx.json("resolve", "--platform", "linux/arm64", f"oci-layout://{lay.path}")
    assert code == 0
    assert isinstance(answer, dict)
    assert (answer["digest"], answer["source"]) == (digest(arm), "child")


TAG_TEXT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tags=st.lists(TAG_TEXT, min_size=1, max_size=6, unique=True), through=st.booleans())
def test_every_tag_resolves_to_its_own_entry(
    capsys: pytest.CaptureFixture[str], tags: list[str], through: bool
) -> None:
    with tempfile.TemporaryDirectory() as base:
        lay = Layout(os.path.join(base, "root", "prop"))
        images = [lay.manifest(label=f"prop-{tag}") for tag in tags]
        db_path = os.path.join(base, "index.db")
        run = Run(db_path, capsys)
        if through:  # index an older state, then answer the current one by reading it through
            lay.write_index([named(images[0], ref="older")])
            run.scan(os.path.join(base, "root"))
        lay.write_index([named(image, ref=tag) for image, tag in zip(images, tags, strict=True)])
        if not through:
            run.scan(os.path.join(base, "root"))
        for image, tag in zip(images, tags, strict=True):
            code, answer = run.json("resolve", f"oci-layout://{lay.path}:{tag}")
            assert code == 0, tag
            assert isinstance(answer, dict)
            assert answer["digest"] == image["digest"]
            assert answer["freshness"] == ("read-through" if through else "indexed")
            assert run("resolve", "--layout", lay.path, f":{tag}")[:2] == (0, f"{image['digest']}\n")


COMPONENT = st.from_regex(r"[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?", fullmatch=True)
DOMAIN = st.sampled_from(["localhost", "localhost:5000", "example.com", "registry.example.com:443", "docker.io"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    refs=st.lists(
        st.tuples(DOMAIN, st.lists(COMPONENT, min_size=1, max_size=3), TAG_TEXT),
        min_size=1,
        max_size=4,
        unique_by=lambda r: (r[0], tuple(r[1]), r[2]),
    )
)
def test_full_names_resolve_through_the_path_form(
    capsys: pytest.CaptureFixture[str], refs: list[tuple[str, list[str], str]]
) -> None:
    texts = [f"{domain}/{'/'.join(path)}:{tag}" for domain, path, tag in refs]
    with tempfile.TemporaryDirectory() as base:
        lay = Layout(os.path.join(base, "root", "names"))
        images = [lay.manifest(label=f"name-{text}") for text in texts]
        lay.write_index([named(image, ref=text) for image, text in zip(images, texts, strict=True)])
        run = Run(os.path.join(base, "index.db"), capsys)
        run.scan(os.path.join(base, "root"))
        with Index(run.db) as index:
            for image, text in zip(images, texts, strict=True):
                # docker.io/x and docker.io/library/x are one name: only then may two refs collide
                try:
                    answer = index.resolve(f"oci-layout://{lay.path}/{text}")
                except Ambiguous:
                    assert text.startswith("docker.io/")
                    continue
                assert answer.digest == image["digest"], text
                assert index.resolve_in(lay.path, text).digest == image["digest"], text
