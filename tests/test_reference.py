"""Docker reference parsing: every upstream vector, properties, hostile input, ``describe``."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer import reference
from indexer.errors import InvalidReference
from indexer.reference import (
    ANCHORED_IDENTIFIER_RE,
    ANCHORED_NAME_RE,
    DEFAULT_ALGORITHMS,
    DOMAIN_AND_PORT_RE,
    REFERENCE_RE,
    Reference,
    describe,
    familiar_match,
    is_digest,
    is_identifier,
    is_tag,
    parse,
    parse_any_reference,
    parse_docker_ref,
    parse_named,
    parse_normalized_named,
    sort_references,
    tag_name_only,
    trim_named,
    validate_digest,
    with_digest,
    with_name,
    with_tag,
)

REPO = Path(__file__).resolve().parent.parent
HEX64 = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
SHA256 = f"sha256:{HEX64}"
# The Go test binary behind the vectors links only sha256 (reference-spec.md §4).
SHA256_ONLY = frozenset({"sha256"})

# ---------------------------------------------------------------------------
# The upstream vectors (research/reference_vectors.json, 372 objects).
#
# 358 run here. 14 are left out: the 13 containerd.reference.Parse vectors
# (containerd's URL-based splitter, which ocidx does not implement) and
# TestReferenceParse#48, a commented-out FIXME case upstream (from_comment).
# ---------------------------------------------------------------------------
# The vectors ship with the tests; a missing file is a failure, never a silent skip.
VECTOR_FILE = Path(os.environ.get("OCIDX_REFERENCE_VECTORS", REPO / "tests" / "data" / "reference_vectors.json"))
ALL_VECTORS: list[dict[str, Any]] = json.loads(VECTOR_FILE.read_text())
SKIPPED_FUNCS = {"containerd.reference.Parse"}
VECTORS = [v for v in ALL_VECTORS if v["func"] not in SKIPPED_FUNCS and not v.get("from_comment")]

# The vectors' error names (Go sentinels, go-digest's, the ad-hoc texts) -> our categories.
CATEGORY = {
    "ErrReferenceInvalidFormat": "invalid_format",
    "ErrNameContainsUppercase": "name_contains_uppercase",
    "ErrNameEmpty": "name_empty",
    "ErrNameTooLong": "name_too_long",
    "ErrNameNotCanonical": "name_not_canonical",
    "ErrTagInvalidFormat": "tag_invalid_format",
    "ErrDigestInvalidFormat": "digest_invalid_format",
    "digest.ErrDigestInvalidFormat": "digest_invalid_format",
    "digest.ErrDigestInvalidLength": "digest_invalid_length",
    "digest.ErrDigestUnsupported": "digest_unsupported",
    "adhoc:repository-name-must-be-lowercase": "name_contains_uppercase",
    "adhoc:64-hex-name": "hex_name",
    "path.ErrBadPattern": "bad_pattern",
}


def vectors(*funcs: str) -> list[Any]:
    """The vectors of *funcs*, as pytest params named by the vector id."""
    return [pytest.param(v, id=v["id"]) for v in VECTORS if v["func"] in funcs]


def expected_category(vector: dict[str, Any]) -> str | None:
    """The category the vector expects; None for success. ``ANY`` uses the inferred category."""
    err = vector.get("err")
    if err == "ANY":
        return CATEGORY[vector["err_inferred"]]
    return None if err is None else CATEGORY[err]


def check_fields(ref: Reference, vector: dict[str, Any]) -> None:
    """Assert every success field the vector carries."""
    getters: dict[str, Callable[[], object]] = {
        "string": lambda: str(ref),
        "name": lambda: ref.name,
        "domain": lambda: ref.domain,
        "path": lambda: ref.path,
        "tag": lambda: ref.tag,
        "digest": lambda: ref.digest,
        "familiar_name": ref.familiar_name,
        "familiar_string": ref.familiar_string,
        "is_tagged": lambda: ref.tag is not None,
        "is_canonical": lambda: ref.digest is not None,
    }
    checked = 0
    for field, getter in getters.items():
        if field in vector:
            assert getter() == vector[field], field
            checked += 1
    if vector.get("type") == "digestReference":
        assert ref.is_digest_only and ref.name == ""
        checked += 1
    if "equals_Parse_of" in vector:
        assert ref == parse(vector["equals_Parse_of"], algorithms=SHA256_ONLY)
        checked += 1
    assert checked or vector["func"] in {"ParseNormalizedNamed"}, "a success vector with nothing to check"


PARSERS = {
    "Parse": parse,
    "Field.UnmarshalText(Parse)": parse,
    "ParseNormalizedNamed": parse_normalized_named,
    "ParseAnyReference": parse_any_reference,
    "ParseDockerRef": parse_docker_ref,
    "ParseNamed": parse_named,
}


def test_vector_file_is_the_one_described() -> None:
    assert len(ALL_VECTORS) == 372
    assert len(ALL_VECTORS) - len(VECTORS) == 14
    # Every error name the vectors use (apart from containerd's) has a category.
    names = {v.get("err") for v in VECTORS} | {v.get("err_inferred") for v in VECTORS}
    assert names - {None, "ANY"} <= set(CATEGORY)


@pytest.mark.parametrize("vector", vectors(*PARSERS))
def test_parse_vector(vector: dict[str, Any]) -> None:
    parser = PARSERS[vector["func"]]
    category = expected_category(vector)
    if category is not None:
        with pytest.raises(InvalidReference) as caught:
            parser(vector["input"], algorithms=SHA256_ONLY)
        assert caught.value.category == category
        assert caught.value.exit_code == 2
        return
    ref = parser(vector["input"], algorithms=SHA256_ONLY)
    check_fields(ref, vector)
    if vector["func"] == "ParseDockerRef":  # upstream also parses the result back
        assert parse(str(ref), algorithms=SHA256_ONLY) == ref


@pytest.mark.parametrize("vector", vectors("WithName"))
def test_with_name_vector(vector: dict[str, Any]) -> None:
    category = expected_category(vector)
    if category is not None:
        with pytest.raises(InvalidReference) as caught:
            with_name(vector["input"])
        assert caught.value.category == category
        return
    ref = with_name(vector["input"])
    check_fields(ref, vector)
    assert ref.tag is None and ref.digest is None


def run_steps(vector: dict[str, Any]) -> Reference | bool:
    """Run a builder chain such as ``["WithName(input)", "WithTag(_, tag_arg)"]``."""
    value: Reference | bool | None = None
    for step in vector["steps"]:
        func = step.partition("(")[0]
        if func in {"WithName", "ParseNormalizedNamed", "ParseAnyReference"}:
            assert value is None
            if func == "WithName":
                value = with_name(vector["input"])
            elif func == "ParseNormalizedNamed":
                value = parse_normalized_named(vector["input"], algorithms=SHA256_ONLY)
            else:
                value = parse_any_reference(vector["input"], algorithms=SHA256_ONLY)
            continue
        assert isinstance(value, Reference)
        if func == "WithTag":
            value = with_tag(value, vector["tag_arg"])
        elif func == "WithDigest":
            value = with_digest(value, vector["digest_arg"])
        elif func == "FamiliarMatch":
            value = familiar_match(vector["pattern"], value)
        else:
            raise AssertionError(f"unknown step {step}")
    assert value is not None
    return value


@pytest.mark.parametrize("vector", vectors("WithTag", "WithDigest", "FamiliarMatch"))
def test_builder_and_match_vector(vector: dict[str, Any]) -> None:
    category = expected_category(vector)
    if category is not None:
        with pytest.raises(InvalidReference) as caught:
            run_steps(vector)
        assert caught.value.category == category
        return
    result = run_steps(vector)
    if vector["func"] == "FamiliarMatch":
        assert result is vector["expected"]
    else:
        assert isinstance(result, Reference)
        check_fields(result, vector)


@pytest.mark.parametrize("vector", vectors("Sort"))
def test_sort_vector(vector: dict[str, Any]) -> None:
    assert sort_references(vector["input"], algorithms=SHA256_ONLY) == vector["expected"]
    assert sort_references(list(reversed(vector["input"])), algorithms=SHA256_ONLY) == vector["expected"]


REGEXPS = {
    "regexp:^domainAndPort$": DOMAIN_AND_PORT_RE,
    "regexp:anchoredName": ANCHORED_NAME_RE,
    "regexp:reference": REFERENCE_RE,
    "regexp:anchoredIdentifier": ANCHORED_IDENTIFIER_RE,
}


@pytest.mark.parametrize("vector", vectors(*REGEXPS))
def test_regexp_vector(vector: dict[str, Any]) -> None:
    match = REGEXPS[vector["func"]].fullmatch(vector["input"])
    assert (match is not None) is vector["match"]
    if match is not None:
        for group, expected in vector.get("subs", {}).items():
            assert (match[group] or "") == expected, group  # Go reports a missing group as ""


def test_every_vector_has_a_test() -> None:
    handled = set(PARSERS) | set(REGEXPS) | {"WithName", "WithTag", "WithDigest", "FamiliarMatch", "Sort"}
    assert {v["func"] for v in VECTORS} <= handled


def test_regex_constants_are_compiled_ascii_patterns() -> None:
    for pattern in (DOMAIN_AND_PORT_RE, ANCHORED_NAME_RE, REFERENCE_RE, ANCHORED_IDENTIFIER_RE):
        assert isinstance(pattern, re.Pattern)
        assert pattern.flags & re.ASCII
        assert "$" not in pattern.pattern
    assert reference.DIGEST_RE.fullmatch("sha256:" + "A" * 32)
    with pytest.raises(AttributeError):
        missing = "NO_SUCH_PATTERN"
        getattr(reference, missing)  # the lazy loader must not invent attributes


# ---------------------------------------------------------------------------
# The rules a port gets wrong (reference-spec.md §6), pinned one by one.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["alpine\n", "alpine:3.16\n", "docker.io/library/alpine\n", "alpine:\uff13", "\uff41lpine", "alpine:"],
)
def test_no_trailing_newline_or_unicode_digit_gets_through(text: str) -> None:
    for parser in (parse, parse_normalized_named, parse_any_reference):
        with pytest.raises(InvalidReference):
            parser(text)


def test_go_lowercasing_decides_the_uppercase_error() -> None:
    # Go lowercases "İ" (U+0130) to "i", Python to "i" plus a combining dot.
    with pytest.raises(InvalidReference) as caught:
        parse("\u0130")
    assert caught.value.category == "name_contains_uppercase"
    with pytest.raises(InvalidReference) as caught:
        parse("\u212a")  # the Kelvin sign lowercases to "k" in both languages
    assert caught.value.category == "name_contains_uppercase"
    with pytest.raises(InvalidReference) as caught:
        parse("\u00e9")  # é lowercases to itself: plain bad format
    assert caught.value.category == "invalid_format"


@pytest.mark.parametrize(
    ("text", "string", "domain", "path", "tag"),
    [
        ("3.16", "docker.io/library/3.16", "docker.io", "library/3.16", None),
        ("latest", "docker.io/library/latest", "docker.io", "library/latest", None),
        (SHA256, f"docker.io/library/sha256:{HEX64}", "docker.io", "library/sha256", HEX64),
        ("localhost:5000", "docker.io/library/localhost:5000", "docker.io", "library/localhost", "5000"),
        ("example.com", "docker.io/library/example.com", "docker.io", "library/example.com", None),
        ("Docker.io/library/alpine", "Docker.io/library/alpine", "Docker.io", "library/alpine", None),
        ("foo_bar.com/app", "foo_bar.com/app", "", "foo_bar.com/app", None),
        ("index.docker.io:443/app", "index.docker.io:443/app", "index.docker.io:443", "app", None),
        ("docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", None, "docker.io", None, None),
        (HEX64[:63], f"docker.io/library/{HEX64[:63]}", "docker.io", f"library/{HEX64[:63]}", None),
        ("a" * 247, "docker.io/library/" + "a" * 247, "docker.io", "library/" + "a" * 247, None),
        ("example.com/" + "a" * 255, "example.com/" + "a" * 255, "example.com", "a" * 255, None),
    ],
)
def test_normalization_edges(text: str, string: str | None, domain: str, path: str | None, tag: str | None) -> None:
    ref = parse_normalized_named(text)
    if string is not None:
        assert str(ref) == string
    assert ref.domain == domain
    if path is not None:
        assert ref.path == path
    assert ref.tag == tag


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("", "invalid_format"),
        (":3.16", "invalid_format"),
        ("my_registry:5000/app", "invalid_format"),
        ("[::1]", "invalid_format"),
        ("[fe80::1%eth0]:5000/app", "invalid_format"),
        ("a" * 248, "name_too_long"),
        ("alpine@SHA256:" + HEX64, "name_contains_uppercase"),
        (HEX64.upper(), "name_contains_uppercase"),
        ("Alpine", "name_contains_uppercase"),
        ("docker.io/Library/alpine", "name_contains_uppercase"),
        ("Foo_Bar/baz", "name_contains_uppercase"),
        (HEX64, "hex_name"),
        ("alpine@sha256:" + HEX64[:32], "digest_invalid_length"),
        ("alpine@md5:" + HEX64[:32], "digest_unsupported"),
        ("alpine@sha256:" + HEX64.upper(), "digest_invalid_format"),
        ("alpine:" + "t" * 129, "invalid_format"),
        ("alpine:v1.0+build", "invalid_format"),
    ],
)
def test_normalization_errors(text: str, category: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_normalized_named(text)
    assert caught.value.category == category


def test_parse_and_normalization_split_the_domain_differently() -> None:
    assert parse("foo/bar").domain == "foo"
    assert parse_normalized_named("foo/bar").domain == "docker.io"
    assert parse("a" * 248).path == "a" * 248  # Parse adds no library/, so 248 fits
    assert parse("test_com/foo").domain == ""
    with pytest.raises(InvalidReference) as caught:
        parse("domain/" + "a" * 256)
    assert caught.value.category == "name_too_long"


def test_parse_any_reference_turns_near_digests_into_names() -> None:
    assert str(parse_any_reference("sha256:abc")) == "docker.io/library/sha256:abc"
    sha512 = "sha512:" + "f" * 128
    assert parse_any_reference(sha512).is_digest_only
    named = parse_any_reference(sha512, algorithms=SHA256_ONLY)
    assert (named.name, named.tag) == ("docker.io/library/sha512", "f" * 128)
    ident = parse_any_reference(HEX64)
    assert (ident.digest, str(ident), ident.familiar_string()) == (SHA256, SHA256, SHA256)


def test_parse_docker_ref_drops_the_tag_beside_a_digest_and_adds_latest() -> None:
    assert str(parse_docker_ref("alpine")) == "docker.io/library/alpine:latest"
    assert str(parse_docker_ref(f"alpine:3.16@{SHA256}")) == f"docker.io/library/alpine@{SHA256}"
    assert str(parse_docker_ref(f"alpine@{SHA256}")) == f"docker.io/library/alpine@{SHA256}"


@pytest.mark.parametrize(
    ("text", "familiar_name"),
    [
        ("docker.io/library/ubuntu", "ubuntu"),
        ("docker.io/dmcgowan/app", "dmcgowan/app"),
        ("docker.io/library/foo/bar", "library/foo/bar"),
        ("docker.io/library/library", "library"),
        ("localhost/app", "localhost/app"),
        ("Docker.io/library/app", "Docker.io/library/app"),
        ("index.docker.io:443/library/app", "index.docker.io:443/library/app"),
        ("registry-1.docker.io/library/app", "registry-1.docker.io/library/app"),
        ("foo_bar.com/app", "foo_bar.com/app"),
    ],
)
def test_familiar_name(text: str, familiar_name: str) -> None:
    ref = parse_normalized_named(f"{text}:v1@{SHA256}")
    assert ref.familiar_name() == familiar_name
    assert ref.familiar_string() == f"{familiar_name}:v1@{SHA256}"


def test_a_hub_path_that_looks_like_a_host_does_not_survive_familiarization() -> None:
    # Go's behaviour, kept: docker.io/foo.com/bar shortens to foo.com/bar, a different image.
    ref = parse_normalized_named("docker.io/foo.com/bar")
    assert ref.familiar_string() == "foo.com/bar"
    assert parse_normalized_named(ref.familiar_string()).domain == "foo.com"


# ---------------------------------------------------------------------------
# Digests, tags, identifiers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "algorithms", "category"),
    [
        (SHA256, DEFAULT_ALGORITHMS, None),
        ("sha384:" + "a" * 96, DEFAULT_ALGORITHMS, None),
        ("sha512:" + "a" * 128, DEFAULT_ALGORITHMS, None),
        ("sha512:" + "a" * 128, SHA256_ONLY, "digest_unsupported"),
        ("sha256:" + "a" * 63, DEFAULT_ALGORITHMS, "digest_invalid_length"),
        ("sha256:" + "a" * 128, DEFAULT_ALGORITHMS, "digest_invalid_length"),
        ("sha256:" + HEX64.upper(), DEFAULT_ALGORITHMS, "digest_invalid_format"),
        ("sha256:" + "g" * 64, DEFAULT_ALGORITHMS, "digest_invalid_format"),
        ("SHA256:" + HEX64, DEFAULT_ALGORITHMS, "digest_invalid_format"),
        ("md5:" + "a" * 32, DEFAULT_ALGORITHMS, "digest_unsupported"),
        ("md5:a!", DEFAULT_ALGORITHMS, "digest_invalid_format"),
        ("sha256:", DEFAULT_ALGORITHMS, "digest_invalid_format"),
        (":" + HEX64, DEFAULT_ALGORITHMS, "digest_invalid_format"),
        (HEX64, DEFAULT_ALGORITHMS, "digest_invalid_format"),
        ("", DEFAULT_ALGORITHMS, "digest_invalid_format"),
        (SHA256 + "\n", DEFAULT_ALGORITHMS, "digest_invalid_length"),
        ("../../etc:passwd", DEFAULT_ALGORITHMS, "digest_invalid_format"),
    ],
)
def test_validate_digest(text: str, algorithms: frozenset[str], category: str | None) -> None:
    assert is_digest(text, algorithms=algorithms) is (category is None)
    if category is None:
        assert validate_digest(text, algorithms=algorithms) == text
        return
    with pytest.raises(InvalidReference) as caught:
        validate_digest(text, algorithms=algorithms)
    assert caught.value.category == category


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("latest", True),
        ("3.16", True),
        ("_x", True),
        ("TAG5", True),
        ("t" * 128, True),
        ("t" * 129, False),
        ("", False),
        (".x", False),
        ("-x", False),
        ("a/b", False),
        ("a:b", False),
        ("v1.0+build", False),
        ("latest\n", False),
        ("\uff13", False),
    ],
)
def test_is_tag(text: str, valid: bool) -> None:
    assert is_tag(text) is valid


def test_is_identifier() -> None:
    assert is_identifier(HEX64)
    assert not is_identifier(HEX64.upper())
    assert not is_identifier(HEX64[:63])
    assert not is_identifier(HEX64 + "\n")
    assert not is_identifier(SHA256)


# ---------------------------------------------------------------------------
# The value type and the builders.
# ---------------------------------------------------------------------------


def test_reference_is_a_value() -> None:
    ref = parse_normalized_named("alpine:3.16")
    assert ref == Reference("docker.io", "library/alpine", "3.16", None)
    assert hash(ref) == hash(Reference("docker.io", "library/alpine", "3.16"))
    assert ref != parse_normalized_named("alpine:3.17")
    assert repr(ref) == "Reference(domain='docker.io', path='library/alpine', tag='3.16', digest=None)"
    assert {ref, parse_normalized_named("docker.io/library/alpine:3.16")} == {ref}


def test_builders() -> None:
    name = with_name("localhost:5000/team/app")
    assert (name.domain, name.path, str(name)) == ("localhost:5000", "team/app", "localhost:5000/team/app")
    tagged = with_tag(with_digest(name, SHA256), "v2")
    assert str(tagged) == f"localhost:5000/team/app:v2@{SHA256}"
    assert str(with_tag(tagged, "v3")) == f"localhost:5000/team/app:v3@{SHA256}"
    assert trim_named(tagged) == name
    assert tag_name_only(name).tag == "latest"
    assert tag_name_only(tagged) is tagged
    assert tag_name_only(with_digest(name, SHA256)).tag is None
    with pytest.raises(InvalidReference) as caught:
        with_tag(name, "-v2")
    assert caught.value.category == "tag_invalid_format"
    with pytest.raises(InvalidReference) as caught:
        with_digest(name, "sha256:abc")
    assert caught.value.category == "digest_invalid_format"
    with pytest.raises(InvalidReference) as caught:
        with_name("localhost:5000")  # a tag, not a port, when no path follows
    assert caught.value.category == "invalid_format"


def test_builders_refuse_a_bare_digest() -> None:
    bare = parse_any_reference(SHA256)
    builds: list[Callable[[], object]] = [
        lambda: with_tag(bare, "v1"),
        lambda: with_digest(bare, SHA256),
        lambda: trim_named(bare),
    ]
    for build in builds:
        with pytest.raises(InvalidReference):
            build()
    assert tag_name_only(bare) is bare


# ---------------------------------------------------------------------------
# FamiliarMatch (Go path.Match) and Sort.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("*", "alpine", True),
        ("*", "team/app", False),  # * never crosses "/"
        ("*/*", "team/app:v2", True),
        ("a?pine", "alpine", True),
        ("a?pine:*", "alpine:3.16", True),
        ("alp[h-j]ne", "alpine", True),
        ("alp[^h-j]ne", "alpine", False),
        ("[!a]lpine", "alpine", True),  # Go has no "!" negation: the class is "!" or "a"
        ("[!b]lpine", "alpine", False),
        ("library/*", "alpine", False),  # the familiar forms have no library/
        ("docker.io/*", "alpine", False),
        ("localhost:5000/*", "localhost:5000/app:v2", True),
        ("*:v2", "localhost:5000/app:v2", False),
        ("sha256:*", SHA256, True),
        ("*/*/baz", "foo/c/baz:tag", True),
        ("foo/*/ba[rz]", "foo/c/baz:tag", True),
        ("foo*baz", "foo/c/baz", False),
        ("a*b*c", "axxbyyc", True),
        ("a*b*c", "axxbyyc/c", False),
        ("*c", "abc", True),
    ],
)
def test_familiar_match(pattern: str, text: str, expected: bool) -> None:
    assert familiar_match(pattern, parse_any_reference(text)) is expected


@pytest.mark.parametrize("pattern", ["[", "[^", "[]a]", "[-x]", "[x-]", "[a-b-c]", "\\", "a[", "*[x", "ok/\\"])
def test_familiar_match_rejects_a_malformed_pattern_whatever_the_name(pattern: str) -> None:
    for text in ("alpine", "zzz/yyy:x", SHA256):
        with pytest.raises(InvalidReference) as caught:
            familiar_match(pattern, parse_any_reference(text))
        assert caught.value.category == "bad_pattern"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
        ("a*b?c*x", "abxbbxdbxebxczzx", True),
        ("a*b?c*x", "abxbbxdbxebxczzy", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "ab", False),
        ("a?b", "a\u263ab", True),
        ("a???b", "a\u263ab", False),
        ("[\\]a]", "]", True),
        ("[x\\-]", "-", True),
        ("[x\\-]", "z", False),
        ("[b-a]", "a", False),  # an inverted range is legal and matches nothing
        ("[^b-a]", "/", True),  # a negated class may match "/"
        ("a*", "ab/c", False),
        ("*x", "xxx", True),
        ("", "", True),
        ("", "a", False),
    ],
)
def test_go_path_match_semantics(pattern: str, name: str, expected: bool) -> None:
    # Go's own path.Match cases, through the matcher that familiar_match uses.
    assert reference._glob_match(reference._compile_glob(pattern), name) is expected


def test_sort_normalizes_and_puts_the_unparseable_last() -> None:
    refs = ["zz:tag", f"alpine@{SHA256}", "alpine", HEX64, "Bad Name", f"alpine:3@{SHA256}", "alpine:3"]
    assert sort_references(refs) == [
        f"docker.io/library/alpine:3@{SHA256}",
        "docker.io/library/alpine:3",
        "docker.io/library/zz:tag",
        f"docker.io/library/alpine@{SHA256}",
        "docker.io/library/alpine",
        SHA256,
        "Bad Name",
    ]


# ---------------------------------------------------------------------------
# describe(): one object of `ocidx ref --json` (docs/json.md).
# ---------------------------------------------------------------------------

DESCRIBE_KEYS = {"input", "name", "domain", "path", "tag", "digest", "canonical", "familiar", "error"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "alpine",
            {
                "name": "docker.io/library/alpine",
                "domain": "docker.io",
                "path": "library/alpine",
                "tag": None,
                "digest": None,
                "canonical": "docker.io/library/alpine",
                "familiar": "alpine",
            },
        ),
        (
            "alpine:3.16",
            {
                "name": "docker.io/library/alpine",
                "domain": "docker.io",
                "path": "library/alpine",
                "tag": "3.16",
                "digest": None,
                "canonical": "docker.io/library/alpine:3.16",
                "familiar": "alpine:3.16",
            },
        ),
        (
            f"docker.io/library/alpine:3.16@{SHA256}",
            {
                "name": "docker.io/library/alpine",
                "domain": "docker.io",
                "path": "library/alpine",
                "tag": "3.16",
                "digest": SHA256,
                "canonical": f"docker.io/library/alpine:3.16@{SHA256}",
                "familiar": f"alpine:3.16@{SHA256}",
            },
        ),
        (
            "localhost:5000/team/app:v2",
            {
                "name": "localhost:5000/team/app",
                "domain": "localhost:5000",
                "path": "team/app",
                "tag": "v2",
                "digest": None,
                "canonical": "localhost:5000/team/app:v2",
                "familiar": "localhost:5000/team/app:v2",
            },
        ),
        (
            "index.docker.io/library/alpine",
            {
                "name": "docker.io/library/alpine",
                "domain": "docker.io",
                "path": "library/alpine",
                "tag": None,
                "digest": None,
                "canonical": "docker.io/library/alpine",
                "familiar": "alpine",
            },
        ),
        (
            # As docker normalizes it: the repository "sha256" with the hex as its tag.
            SHA256,
            {
                "name": "docker.io/library/sha256",
                "domain": "docker.io",
                "path": "library/sha256",
                "tag": HEX64,
                "digest": None,
                "canonical": f"docker.io/library/sha256:{HEX64}",
                "familiar": f"sha256:{HEX64}",
            },
        ),
    ],
)
def test_describe(text: str, expected: dict[str, object]) -> None:
    described = describe(text)
    assert described == {"input": text, **expected, "error": None}
    assert json.loads(json.dumps(described)) == described


@pytest.mark.parametrize(
    ("text", "category"),
    [
        (":3.16", "invalid_format"),
        ("a//b", "invalid_format"),
        ("alpine\n", "invalid_format"),
        ("Foo_Bar/baz", "name_contains_uppercase"),
        ("a" * 248, "name_too_long"),
        ("Alpine:3.16", "name_contains_uppercase"),  # Docker's ad-hoc lowercase error, as docs/json.md names it
        (HEX64, "hex_name"),
        ("alpine@sha256:" + HEX64[:32], "digest_invalid_length"),
        ("alpine@md5:" + HEX64[:32], "digest_unsupported"),
        ("alpine@sha256:" + HEX64.upper(), "digest_invalid_format"),
    ],
)
def test_describe_error(text: str, category: str) -> None:
    described = describe(text)
    assert set(described) == DESCRIBE_KEYS
    assert described["input"] == text
    assert described["error"] == category
    assert all(described[key] is None for key in DESCRIBE_KEYS - {"input", "error"})


def test_describe_refuses_64_hex_as_docker_does() -> None:
    # docs/json.md lists hex_name: `ocidx ref` normalizes as docker does; lookups (ParseAnyReference)
    # read the same string as a digest instead.
    assert describe(HEX64)["error"] == "hex_name"
    assert parse_any_reference(HEX64).digest == SHA256
    with pytest.raises(InvalidReference) as caught:
        parse_normalized_named(HEX64)
    assert caught.value.category == "hex_name"
    assert caught.value.message == (f"invalid repository name ({HEX64}), cannot specify 64-byte hexadecimal strings")


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (parse, ""),
        (parse, "a//b"),
        (parse, "Uppercase:tag"),
        (parse, "domain/" + "a" * 256),
        (parse, "repo@sha256:" + "f" * 34),
        (parse_named, "alpine"),
    ],
)
def test_messages_are_dockers_and_name_the_input(call: Any, text: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        call(text, algorithms=SHA256_ONLY)
    docker_text = {
        "name_empty": "repository name must have at least one component",
        "invalid_format": "invalid reference format",
        "name_contains_uppercase": "repository name must be lowercase",
        "name_too_long": "repository name must not be more than 255 characters",
        "digest_invalid_length": "invalid checksum digest length",
        "name_not_canonical": "repository name must be canonical",
    }[caught.value.category]
    assert caught.value.message.startswith(docker_text)
    assert f'"{text[:200]}' in caught.value.message


def test_messages_shorten_hostile_input_and_escape_control_characters() -> None:
    with pytest.raises(InvalidReference) as caught:
        parse("a" * 5000 + "\x1b[2J!")
    assert len(caught.value.message) < 400
    assert "5005 characters" in caught.value.message
    with pytest.raises(InvalidReference) as caught:
        parse("alp\x1bine")
    assert "\x1b" not in caught.value.message
    assert "\\x1b" in caught.value.message


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------

LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
HEX = "0123456789abcdef"

components = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    st.text(LOWER_ALNUM, min_size=1, max_size=6),
    st.lists(
        st.tuples(st.sampled_from([".", "_", "__", "-", "--", "---"]), st.text(LOWER_ALNUM, min_size=1, max_size=6)),
        max_size=3,
    ),
)
paths = st.lists(components, min_size=1, max_size=4).map("/".join)
labels = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=3).map(".".join),
    st.sampled_from(["docker.io", "index.docker.io", "localhost", "registry-1.docker.io", "Docker.io"]),
    st.from_regex(r"\[[0-9a-fA-F]{1,4}::[0-9a-fA-F]{0,4}\]", fullmatch=True),
)
domains = st.builds(lambda host, port: host + port, hosts, st.sampled_from(["", ":5000", ":0", ":443"]))
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.one_of(
    st.text(HEX, min_size=64, max_size=64).map("sha256:".__add__),
    st.text(HEX, min_size=128, max_size=128).map("sha512:".__add__),
)


@st.composite
def reference_strings(draw: st.DrawFn) -> str:
    """A string in the reference grammar: ``[domain/]path[:tag][@digest]``."""
    text = draw(paths)
    domain = draw(st.none() | domains)
    if domain is not None:
        text = f"{domain}/{text}"
    tag = draw(st.none() | tags)
    if tag is not None:
        text = f"{text}:{tag}"
    digest = draw(st.none() | digests)
    if digest is not None:
        text = f"{text}@{digest}"
    return text


@given(reference_strings())
def test_parse_round_trips(text: str) -> None:
    ref = parse(text)
    assert str(ref) == text
    assert parse(str(ref)) == ref


@given(reference_strings())
def test_normalization_is_idempotent(text: str) -> None:
    ref = parse_normalized_named(text)
    canonical = str(ref)
    assert parse_normalized_named(canonical) == ref
    assert parse(canonical) == ref  # the canonical string is its own Parse
    assert parse_named(canonical) == ref
    assert parse_any_reference(canonical) == ref
    docker_ref = parse_docker_ref(text)
    assert docker_ref.tag is None if ref.digest else docker_ref.tag == (ref.tag or "latest")


def familiar_reads_as_another_domain(ref: Reference) -> bool:
    """Go's known hole: docker.io/foo.com/bar familiarizes to foo.com/bar, a host."""
    first, slash, _ = ref.familiar_name().partition("/")
    return ref.domain == "docker.io" and bool(slash) and ("." in first or ":" in first or first == "localhost")


@given(reference_strings())
def test_familiar_string_normalizes_back_to_the_canonical(text: str) -> None:
    ref = parse_normalized_named(text)
    familiar = ref.familiar_string()
    if familiar_reads_as_another_domain(ref):
        assert parse_normalized_named(familiar) != ref
        return
    assert parse_normalized_named(familiar) == ref
    assert parse_normalized_named(familiar).familiar_string() == familiar


@given(st.lists(reference_strings(), max_size=6), st.randoms(use_true_random=False))
def test_sort_does_not_depend_on_input_order(texts: list[str], rnd: random.Random) -> None:
    shuffled = list(texts)
    rnd.shuffle(shuffled)
    assert sort_references(shuffled) == sort_references(texts)


# ---------------------------------------------------------------------------
# Hostile input: every parser answers (a result or a InvalidReference) quickly.
# The regexes are linear; an exponential one would take hours on these.
# ---------------------------------------------------------------------------
TIME_BOUND_S = 0.5

HOSTILE = {
    "dash-run": "a" + "-" * 4998 + "!",
    "separator-soup": "a" + "._-" * 1666 + "!",
    "underscores": "a" + "__" * 2499 + "a!",
    "slashes": "a/" * 2500,
    "long-label": "a" * 4999 + "!",
    "many-labels": "a." * 2500,
    "dashed-labels": "a-" * 2500 + "/!",
    "host-labels": ("a" * 60 + ".") * 80 + ":1/b!",
    "long-port": "a:" + "1" * 4997 + "/",
    "colons": "a:" * 2500,
    "ats": "a@" * 2500,
    "brackets": "[" + ":" * 4998 + "]",
    "long-tag": "a:" + "a" * 4998,
    "long-digest": "a@sha256:" + "f" * 4990 + "!",
    "long-algorithm": "a@" + "a." * 2400 + "a:" + "f" * 64 + "!",
    "upper": "A" * 4999 + "!",
    "nested-components": ("a-" * 10 + "a/") * 200 + "!",
    "control": "\x00" * 5000,
    "non-ascii": "\u0130" * 5000,
}


def call_everything(text: str) -> None:
    """Feed *text* to every entry point; each must answer within the bound."""
    entry_points: list[Callable[[], object]] = [
        lambda: parse(text),
        lambda: parse_normalized_named(text),
        lambda: parse_any_reference(text),
        lambda: parse_docker_ref(text),
        lambda: parse_named(text),
        lambda: with_name(text),
        lambda: validate_digest(text),
        lambda: describe(text),
        lambda: familiar_match("*" + text[:50] + "*", Reference("docker.io", "library/" + "a" * 200)),
        lambda: sort_references([text, text]),
    ]
    for index, call in enumerate(entry_points):
        start = time.perf_counter()
        with suppress(InvalidReference):
            call()
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_BOUND_S, f"entry point {index} took {elapsed:.3f} s on {text[:40]!r}..."
    for predicate in (is_tag, is_digest, is_identifier):
        start = time.perf_counter()
        predicate(text)
        assert time.perf_counter() - start < TIME_BOUND_S


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_is_answered_quickly(text: str) -> None:
    call_everything(text)


@settings(max_examples=60, deadline=None)
@given(
    st.text("a-_./:@[]A0!", min_size=1, max_size=4),
    st.sampled_from(["", "a", "a/", "localhost:5000/", "[::1]/"]),
    st.sampled_from(["", "!", "/", ":", "@", "-", ":tag", "@sha256:" + "f" * 64]),
)
def test_repeated_hostile_units_are_answered_quickly(unit: str, prefix: str, suffix: str) -> None:
    body = (unit * (5000 // len(unit) + 1))[: 5000 - len(prefix) - len(suffix)]
    call_everything(prefix + body + suffix)


def test_glob_matching_is_not_quadratic_in_python() -> None:
    ref = Reference("example.com", "/".join(["a" * 100] * 2))
    start = time.perf_counter()
    assert not familiar_match("*" + "a" * 2000 + "b*", Reference("", "a" * 5000))
    assert not familiar_match("*" + "?" * 2500 + "x", ref)
    assert time.perf_counter() - start < TIME_BOUND_S


# ---------------------------------------------------------------------------
# The lookup path's import budget.
# ---------------------------------------------------------------------------


def test_import_pulls_in_no_heavy_module() -> None:
    code = (
        "import sys; before = set(sys.modules); import indexer.reference; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO
    ).stdout.split()
    assert "indexer.reference" in out
    heavy = {"typing", "dataclasses", "logging", "asyncio", "pathlib", "inspect"}
    assert heavy.isdisjoint(out), sorted(heavy & set(out))
    ours = {name for name in out if name.startswith("indexer")}
    assert ours == {"indexer", "indexer._record", "indexer.errors", "indexer.reference"}


def test_hostile_input_cannot_hang_the_suite() -> None:
    # A backtracking blow-up holds the GIL inside re and cannot be interrupted, so the
    # same inputs also run in a child process that is killed if it does not finish.
    code = (
        "import json, sys\n"
        "from indexer import reference as r\n"
        "for text in json.load(sys.stdin):\n"
        "    for call in (r.parse, r.parse_normalized_named, r.parse_any_reference, r.with_name):\n"
        "        try:\n"
        "            call(text)\n"
        "        except r.InvalidReference:\n"
        "            pass\n"
        "print('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(list(HOSTILE.values())),
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=REPO,
            timeout=30,
        ).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("parsing the hostile inputs did not finish in 30 s: a regex backtracks")
    assert out.strip() == "done"
