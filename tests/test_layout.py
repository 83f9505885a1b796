"""One layout on disk: index.json parsing, hostile input, torn reads, blobs, nested indexes, platforms."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import stat

import pytest
from layouts import (
    CONTAINERD_NAME,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    LINUX_AMD64,
    LINUX_ARM64_V8,
    LINUX_ARM_V6,
    LINUX_ARM_V7,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    UNKNOWN_PLATFORM,
    Layout,
    canonical_json,
    digest_of,
    named,
)

from indexer.errors import BlobError, IndexParseError, LayoutError, LayoutUnreadable, TornRead, UsageError
from indexer.layout import (
    DEFAULT_LIMITS,
    BlobMissing,
    Child,
    FileIdentity,
    Limits,
    Platform,
    blob_path,
    is_layout_dir,
    normalize_platform,
    parse_index,
    parse_platform_spec,
    platform_matches,
    read_blob,
    read_index_bytes,
    read_layout,
)
from indexer.layout.files import _read_index, _read_index_once
from indexer.names import HOW_CONTAINERD, HOW_FAMILIAR, HOW_FULL, HOW_TAG

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from indexer.layout import Entry

HEX = "e" * 64
GOOD = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + HEX, "size": 528}
ALPINE = "docker.io/library/alpine"


def doc(manifests: object) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def parse(manifests: object, **kwargs: object) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    return parse_index(doc(manifests), **kwargs)  # type: ignore[arg-type]


def names(entry: Entry) -> list[tuple[str, str, str]]:
    return [(n.name, n.tag, n.how) for n in entry.names]


def no_control_characters(text: str) -> bool:
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "layout")


# -- parse_index: the document -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"schemaVersion":2,"manifests":null}', id="null (umoci)"),
        pytest.param(b'{"schemaVersion":2}', id="missing"),
        pytest.param(b'{"schemaVersion":2,"manifests":[]}', id="empty list"),
        pytest.param(b"{}", id="empty object"),
    ],
)
def test_no_manifests_is_an_empty_layout(data: bytes) -> None:
    assert parse_index(data) == ((), ())


def test_entry_keeps_every_field_and_reads_names() -> None:
    descriptor = {
        **GOOD,
        "annotations": {CONTAINERD_NAME: "docker.io/library/alpine:3.16", REF_NAME: "3.16", "x": "y"},
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8", "os.features": ["f"]},
    }
    (entry,), warnings = parse([descriptor])
    assert warnings == ()
    assert (entry.position, entry.digest, entry.media_type, entry.size) == (0, GOOD["digest"], OCI_MANIFEST, 528)
    assert entry.annotations == descriptor["annotations"]
    assert entry.platform == Platform("linux", "arm64", "v8", "", ("f",))
    assert names(entry) == [(ALPINE, "3.16", HOW_CONTAINERD)]
    assert entry.invalid_names == () and entry.warnings == ()


def test_media_type_may_be_missing() -> None:
    (entry,), warnings = parse([{"digest": GOOD["digest"], "size": 1}])
    assert entry.media_type == "" and warnings == ()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        pytest.param(b"[]", "array, not an object", id="top-level list"),
        pytest.param(b'"index"', "string, not an object", id="top-level string"),
        pytest.param(b"null", "null, not an object", id="top-level null"),
        pytest.param(b"2", "number, not an object", id="top-level number"),
        pytest.param(b'{"manifests":{}}', '"manifests" is a JSON object', id="manifests object"),
        pytest.param(b'{"manifests":"a,b"}', '"manifests" is a JSON string', id="manifests string"),
        pytest.param(b'{"manifests":7}', '"manifests" is a JSON number', id="manifests number"),
        pytest.param(b"", "empty", id="empty file"),
        pytest.param(b" \n\t", "empty", id="only blanks"),
        pytest.param(b'{"manifests":[NaN]}', "NaN", id="NaN"),
        pytest.param(b'{"manifests":[{"size":Infinity}]}', "Infinity", id="Infinity"),
        pytest.param(b'{"manifests":[{"size":-Infinity}]}', "Infinity", id="-Infinity"),
        pytest.param(b'\xef\xbb\xbf{"manifests":[]}', "BOM", id="UTF-8 BOM"),
        pytest.param(b'{"manifests":[{"digest":"\xff\xfe"}]}', "not valid UTF-8 (byte 25)", id="invalid UTF-8"),
        pytest.param(b'{"manifests":[{"digest":"\xc0\xaf"}]}', "UTF-8", id="overlong UTF-8"),
        pytest.param(b'{"manifests":[{"size":1' + b"0" * 5000 + b"}]}", "not valid JSON", id="5000-digit number"),
        pytest.param(b"{'manifests': []}", "not valid JSON", id="single quotes"),
        pytest.param(b'{"manifests":[],}', "not valid JSON", id="trailing comma"),
    ],
)
def test_unusable_documents_are_index_parse_errors(data: bytes, needle: str) -> None:
    with pytest.raises(IndexParseError, match=r"index\.json") as info:
        parse_index(data)
    assert needle in info.value.message
    assert info.value.category == "index_invalid"


@pytest.mark.parametrize("cut", [1, 10, 50, -30, -2, -1])
def test_truncated_json_is_reported_as_truncated(cut: int) -> None:
    data = doc([named(GOOD, ref="latest"), named(GOOD, ref="v2")])
    with pytest.raises(IndexParseError, match="truncated"):
        parse_index(data[:cut])


def test_trailing_bytes_after_a_valid_document_are_refused() -> None:
    # BuildKit writes the new document at offset 0, then truncates: caught in
    # between, a shorter new document is followed by the old one's tail.
    old = doc([named(GOOD, ref="latest"), named(GOOD, ref="v2"), named(GOOD, ref="v3")])
    new = doc([named(GOOD, ref="latest")])
    with pytest.raises(IndexParseError, match="trailing data"):
        parse_index(new + old[len(new) :])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="arrays"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="objects"),
        pytest.param(b'{"manifests":[{"annotations":' + b"[" * 100_000, id="inside a descriptor, truncated"),
    ],
)
def test_100k_deep_nesting_is_an_error_not_a_crash(data: bytes) -> None:
    with pytest.raises(IndexParseError, match=r"nested too deeply|truncated"):
        parse_index(data)


def test_duplicate_keys_keep_the_last_value_like_go() -> None:
    data = b'{"manifests":[{"digest":"sha256:' + b"a" * 64 + b'","size":1,"size":2,"mediaType":"x"}]}'
    (entry,), _ = parse_index(data)
    assert entry.size == 2


def test_over_max_index_bytes_is_refused() -> None:
    data = doc([GOOD] * 10)
    with pytest.raises(IndexParseError, match="over the limit"):
        parse_index(data, limits=Limits(max_index_bytes=len(data) - 1))
    assert len(parse_index(data, limits=Limits(max_index_bytes=len(data)))[0]) == 10


def test_over_max_entries_is_refused() -> None:
    with pytest.raises(IndexParseError, match="3 manifests, over the limit of 2"):
        parse([GOOD] * 3, limits=Limits(max_entries=2))


# -- parse_index: one bad descriptor does not hide the good ones -------------------------------


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        pytest.param("sha256:" + HEX, "not an object", id="string item"),
        pytest.param(None, "not an object", id="null item"),
        pytest.param([GOOD], "not an object", id="list item"),
        pytest.param({"size": 1}, '"digest" is a JSON null', id="digest missing"),
        pytest.param({**GOOD, "digest": 5}, '"digest" is a JSON number', id="digest number"),
        pytest.param({**GOOD, "digest": "sha256:../../etc/passwd"}, "digest_invalid_length", id="escaping digest"),
        pytest.param({**GOOD, "digest": "sha256:" + "E" * 64}, "digest_invalid_format", id="upper-case hex"),
        pytest.param({**GOOD, "digest": "md5:" + "e" * 32}, "digest_unsupported", id="md5"),
        pytest.param({**GOOD, "digest": "sha256:" + HEX + "\n"}, "invalid", id="digest with newline"),
        pytest.param({**GOOD, "size": "528"}, "JSON string", id="size string"),
        pytest.param({**GOOD, "size": True}, "JSON boolean", id="size boolean"),
        pytest.param({**GOOD, "size": 528.0}, "JSON number", id="size float"),
        pytest.param({**GOOD, "size": -1}, "is -1", id="size negative"),
        pytest.param({**GOOD, "size": 2**63}, "not an integer from 0", id="size over int64"),
        pytest.param({"digest": GOOD["digest"]}, "JSON null", id="size missing"),
        pytest.param({**GOOD, "mediaType": 1}, '"mediaType" is a JSON number', id="mediaType number"),
    ],
)
def test_bad_descriptor_is_skipped_with_a_warning(bad: object, needle: str) -> None:
    entries, warnings = parse([named(GOOD, ref="before"), bad, named(GOOD, ref="after")])
    assert [(e.position, names(e)) for e in entries] == [
        (0, [("", "before", HOW_TAG)]),
        (2, [("", "after", HOW_TAG)]),
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith("manifests[1]: ")
    assert needle in warnings[0]
    assert "skipped" in warnings[0]


def test_non_string_annotations_are_dropped_and_the_entry_kept() -> None:
    descriptor = {
        **GOOD,
        "annotations": {REF_NAME: 3.16, CONTAINERD_NAME: None, "keep": "yes", "list": ["a"], "obj": {}},
    }
    (entry,), warnings = parse([descriptor])
    assert entry.annotations == {"keep": "yes"}
    assert entry.names == ()
    assert len(entry.warnings) == 4
    assert all(w.startswith("manifests[0]: annotation ") for w in warnings)
    assert [w.removeprefix("manifests[0]: ") for w in warnings] == list(entry.warnings)


@pytest.mark.parametrize("annotations", [[REF_NAME, "latest"], "latest", 7, True])
def test_annotations_of_the_wrong_type_are_ignored(annotations: object) -> None:
    (entry,), warnings = parse([{**GOOD, "annotations": annotations}])
    assert entry.annotations == {} and entry.names == ()
    assert len(warnings) == 1 and '"annotations" is a JSON' in warnings[0]


@pytest.mark.parametrize(
    "platform",
    [
        "linux/amd64",
        ["linux", "amd64"],
        {"os": "linux", "architecture": 64},
        {"os": None, "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": 7},
        {"os": "linux", "architecture": "amd64", "os.features": "sse4"},
        {"os": "windows", "architecture": "amd64", "os.features": [1]},
    ],
)
def test_platform_of_the_wrong_type_is_ignored(platform: object) -> None:
    (entry,), warnings = parse([{**GOOD, "platform": platform}])
    assert entry.platform is None
    assert len(warnings) == 1 and "platform" in warnings[0]


def test_platform_keeps_os_version_and_features() -> None:
    platform = {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.5576", "os.features": ["win32k"]}
    (entry,), _ = parse([{**GOOD, "platform": platform}])
    assert entry.platform == Platform("windows", "amd64", "", "10.0.17763.5576", ("win32k",))
    assert entry.platform.to_json() == {"os": "windows", "architecture": "amd64", "variant": None}


def test_control_characters_are_kept_raw_in_data_and_escaped_in_warnings() -> None:
    evil = "v1\x1b]0;pwned\x07\x00\u202e"
    descriptor = {**GOOD, "annotations": {REF_NAME: evil, "note": "line1\nline2", f"k\x1b{evil}": 5}}
    (entry,), warnings = parse([descriptor])
    assert entry.annotations == {REF_NAME: evil, "note": "line1\nline2"}
    assert entry.invalid_names == (evil,)
    assert len(warnings) == 2
    for warning in warnings:
        assert no_control_characters(warning) and "\u202e" not in warning
    assert "\\x1b]0;pwned\\x07\\x00\\u202e" in warnings[0]


def test_nul_in_a_containerd_name_is_a_warning() -> None:
    (entry,), warnings = parse([named(GOOD, containerd="docker.io/library/alpine\x00:3.16", ref="3.16")])
    assert names(entry) == [("", "3.16", HOW_TAG)]
    assert len(warnings) == 1 and "\\x00" in warnings[0] and no_control_characters(warnings[0])


def test_lone_surrogates_become_replacement_characters_like_go() -> None:
    data = b'{"manifests":[{"digest":"sha256:' + HEX.encode() + b'","size":1,"mediaType":"a\\ud800",'
    data += b'"annotations":{"k\\udfff":"v\\ud83d","pair":"\\ud83d\\ude00"}}]}'
    (entry,), _ = parse_index(data)
    assert entry.media_type == "a\ufffd"
    assert entry.annotations == {"k\ufffd": "v\ufffd", "pair": "\U0001f600"}
    for text in (entry.media_type, *entry.annotations, *entry.annotations.values()):
        text.encode("utf-8")  # storable


@pytest.mark.parametrize(
    "descriptor",
    [
        pytest.param(named(GOOD, containerd="docker.io/library/alpine:3.16", ref="3.16"), id="plain"),
        pytest.param({**GOOD, "platform": LINUX_ARM_V7, "annotations": {"a": "b"}}, id="platform"),
        pytest.param({**GOOD, "annotations": {REF_NAME: "v1", "note": "caf\u00e9"}}, id="non-ASCII value"),
        pytest.param({**GOOD, "annotations": {"caf\u00e9": "v"}}, id="non-ASCII key"),
        pytest.param({**GOOD, "annotations": {"k": "\ud800"}}, id="lone surrogate"),
        pytest.param({**GOOD, "annotations": {"k\udfff": "v"}}, id="lone surrogate key"),
        pytest.param({**GOOD, "annotations": {"k": 1, REF_NAME: "v1"}}, id="non-string value"),
        pytest.param({**GOOD, "annotations": None}, id="null annotations"),
        pytest.param({**GOOD, "annotations": []}, id="list annotations"),
        pytest.param({**GOOD, "mediaType": "application/\u00e9"}, id="non-ASCII media type"),
        pytest.param({**GOOD, "mediaType": "a\ud800"}, id="surrogate media type"),
        pytest.param({**GOOD, "size": True}, id="boolean size"),
        pytest.param({**GOOD, "size": -1}, id="negative size"),
        pytest.param({**GOOD, "platform": {"os": "linux", "architecture": "\u00e9"}}, id="non-ASCII platform"),
        pytest.param({**GOOD, "platform": {"os": "linux", "architecture": "x\ud800"}}, id="surrogate platform"),
        pytest.param({**GOOD, "platform": {"os": ["linux"], "architecture": "amd64"}}, id="list os"),
        pytest.param(
            {**GOOD, "platform": {"os": "linux", "architecture": "amd64", "variant": None}}, id="null variant"
        ),
        pytest.param({**GOOD, "platform": {"os": "windows", "architecture": "amd64", "os.features": ["win32k"]}}),
        pytest.param({**GOOD, "platform": {"os": "linux", "architecture": "amd64", "os.features": None}}),
        pytest.param({**GOOD, "platform": None}, id="null platform"),
        pytest.param({**GOOD, "platform": "linux/amd64"}, id="string platform"),
    ],
)
def test_the_fast_path_for_seen_digests_reads_every_descriptor_as_the_full_checks_do(descriptor: object) -> None:
    """A digest seen before skips its re-check; the descriptor must still read exactly the same."""
    from indexer import reference

    data = json.dumps({"manifests": [descriptor]}).encode()  # ASCII: lone surrogates as \\ud800 escapes
    reference.VALID_DIGESTS.clear()  # the full checks, for a digest not seen yet
    checked = parse_index(data)
    assert GOOD["digest"] in reference.VALID_DIGESTS
    assert parse_index(data) == checked  # the fast path, for a digest seen before
    for entry in checked[0]:  # and whichever path a field took, what is kept can be stored as UTF-8
        platform = entry.platform
        fields = (platform.os, platform.architecture, platform.variant, platform.os_version) if platform else ()
        for text in (entry.media_type, *entry.annotations, *entry.annotations.values(), *fields):
            text.encode("utf-8")


def test_familiar_policy_is_passed_through() -> None:
    manifests = [named(GOOD, ref="alpine:3.16")]
    assert names(parse(manifests)[0][0]) == [(ALPINE, "3.16", HOW_FAMILIAR)]
    assert names(parse(manifests, familiar="tag-only")[0][0]) == [("", "3.16", HOW_TAG)]
    assert parse(manifests, familiar="ignore")[0][0].names == ()


# -- reading index.json ------------------------------------------------------------------------


def test_read_layout_of_a_real_multi_writer_layout(layout: Layout) -> None:
    alpine = layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8, LINUX_ARM_V7])
    app = layout.manifest(platform=LINUX_AMD64)
    cache = layout.manifest()
    data = layout.write_index(
        [
            named(alpine, containerd="docker.io/library/alpine:3.16", ref="3.16"),
            named(app, ref="localhost:5000/team/app:v2"),
            named(cache, ref="buildcache"),
        ]
    )
    snapshot = read_layout(layout.path)
    assert snapshot.warnings == ()
    assert snapshot.content_hash == digest_of(data)
    assert snapshot.identity == FileIdentity.of(os.stat(layout.index_path))
    assert [names(e) for e in snapshot.entries] == [
        [(ALPINE, "3.16", HOW_CONTAINERD)],
        [("localhost:5000/team/app", "v2", HOW_FULL)],
        [("", "buildcache", HOW_TAG)],
    ]
    assert snapshot.entries[1].platform == Platform("linux", "amd64")
    assert [(c.parent, c.entry_position, c.depth, c.media_type) for c in snapshot.children] == [
        (alpine["digest"], 0, 1, OCI_MANIFEST)
    ] * 3
    assert [c.platform for c in snapshot.children] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
        Platform("linux", "arm", "v7"),
    ]


def test_read_index_bytes_returns_the_bytes_and_identity(layout: Layout) -> None:
    data = layout.write_index([GOOD])
    got, identity = read_index_bytes(layout.path)
    assert got == data
    st = os.stat(layout.index_path)
    assert identity == FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_missing_index_json_is_unreadable(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(LayoutUnreadable, match="does not exist"):
        read_layout(layout.path)
    with pytest.raises(LayoutUnreadable, match="does not exist"):
        read_layout(str(tmp_path / "no-such-layout"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LayoutUnreadable, match="not a directory"):
        read_layout(str(tmp_path / "file"))


def test_index_json_directory_is_unreadable(layout: Layout) -> None:
    os.mkdir(layout.index_path)
    with pytest.raises(LayoutUnreadable, match="is a directory, not a regular file") as info:
        read_layout(layout.path)
    assert info.value.exit_code == 5


def test_index_json_fifo_is_refused_without_blocking(layout: Layout) -> None:
    # No writer ever opens the FIFO: a blocking open would hang this test.
    os.mkfifo(layout.index_path)
    with pytest.raises(LayoutUnreadable, match="a FIFO"):
        read_layout(layout.path)


def test_index_json_socket_is_refused(tmp_path: Path) -> None:
    short = os.path.join("/tmp", f"ocidx-sock-{os.getpid()}")  # AF_UNIX paths are short
    os.makedirs(short, exist_ok=True)
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(os.path.join(short, "index.json"))
        with pytest.raises(LayoutUnreadable, match="socket"):
            read_layout(short)
    finally:
        server.close()
        os.remove(os.path.join(short, "index.json"))
        os.rmdir(short)


def test_index_json_symlink_to_a_device_is_refused(layout: Layout) -> None:
    os.symlink("/dev/zero", layout.index_path)
    with pytest.raises(LayoutUnreadable, match="outside the layout"):
        read_layout(layout.path)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not apply to root")
def test_unreadable_index_json(layout: Layout) -> None:
    layout.write_index([GOOD])
    os.chmod(layout.index_path, 0)
    try:
        with pytest.raises(LayoutUnreadable, match="Permission denied"):
            read_layout(layout.path)
    finally:
        os.chmod(layout.index_path, 0o644)


def test_huge_index_json_is_refused_before_reading(layout: Layout) -> None:
    with open(layout.index_path, "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte that is never read
    with pytest.raises(IndexParseError, match="1073741824 bytes, over the limit of 67108864"):
        read_layout(layout.path)
    with pytest.raises(IndexParseError, match="over the limit of 100 bytes"):
        read_index_bytes(layout.path, Limits(max_index_bytes=100))


def test_errors_name_the_layout_without_control_characters(tmp_path: Path) -> None:
    evil = tmp_path / "lay\x1bout"
    Layout(evil).write_index_bytes(b"[")
    with pytest.raises(IndexParseError) as info:
        read_layout(str(evil))
    assert "lay\\x1bout" in info.value.message and no_control_characters(info.value.message)


# -- torn reads: a writer is rewriting index.json in place -------------------------------------


class ScriptedWriter:
    """Performs one real write to index.json before each read: a writer racing the reader, in order."""

    def __init__(self, layout: Layout, steps: list[Callable[[], None] | None]) -> None:
        self.layout = layout
        self.steps = steps
        self.reads = 0

    def read(self, path: str, limits: Limits) -> tuple[bytes, FileIdentity] | None:
        step = self.steps[self.reads] if self.reads < len(self.steps) else None
        self.reads += 1
        if step is not None:
            step()
        return _read_index_once(path, limits)


def parse_entries(data: bytes) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    return parse_index(data)


def test_half_done_in_place_rewrite_is_retried_until_complete(layout: Layout) -> None:
    old = layout.write_index([named(GOOD, ref=f"v{i}") for i in range(5)], rename=False)
    new = canonical_json(layout.index_document([named(GOOD, ref="new")]))
    writer = ScriptedWriter(
        layout,
        [
            lambda: layout.overwrite_index_at_start(new),  # new bytes over the old, not truncated yet
            lambda: os.truncate(layout.index_path, len(new)),  # BuildKit's truncate lands
        ],
    )
    assert len(old) > len(new)
    data, _, parsed = _read_index(layout.index_path, DEFAULT_LIMITS, parse_entries, writer.read)
    assert data == new
    assert parsed is not None
    assert [names(e) for e in parsed[0]] == [[("", "new", HOW_TAG)]]
    assert writer.reads == 3  # torn read, confirming re-read (changed), clean read


def test_truncating_writer_caught_empty_is_retried(layout: Layout) -> None:
    layout.write_index([GOOD], rename=False)
    final = canonical_json(layout.index_document([named(GOOD, ref="latest")]))
    writer = ScriptedWriter(
        layout,
        [lambda: os.truncate(layout.index_path, 0), lambda: layout.write_index_bytes(final, rename=False)],
    )
    data, _, _ = _read_index(layout.index_path, DEFAULT_LIMITS, parse_entries, writer.read)
    assert data == final


def test_writer_that_never_settles_gives_torn_read(layout: Layout) -> None:
    layout.write_index([GOOD], rename=False)
    limits = Limits(torn_retries=3)
    base = canonical_json(layout.index_document([GOOD] * 3))
    steps: list[Callable[[], None] | None] = [
        functools.partial(layout.write_index_bytes, base[: 20 + n], rename=False) for n in range(20)
    ]
    writer = ScriptedWriter(layout, steps)
    with pytest.raises(TornRead, match="kept changing") as info:
        _read_index(layout.index_path, limits, parse_entries, writer.read)
    assert info.value.category == "torn_read"
    assert writer.reads == limits.torn_retries + 1


def test_stat_change_during_every_read_gives_torn_read(layout: Layout) -> None:
    layout.write_index([GOOD])
    calls: list[str] = []

    def changed_while_read(path: str, limits: Limits) -> None:
        calls.append(path)
        return None

    with pytest.raises(TornRead):
        _read_index(layout.index_path, Limits(torn_retries=2), None, changed_while_read)
    assert len(calls) == 3


def test_stable_broken_index_is_a_parse_error_after_one_confirming_read(layout: Layout) -> None:
    layout.write_index_bytes(b'{"manifests":[')
    writer = ScriptedWriter(layout, [])
    with pytest.raises(IndexParseError, match="truncated"):
        _read_index(layout.index_path, DEFAULT_LIMITS, parse_entries, writer.read)
    assert writer.reads == 2


def test_rename_replace_between_reads_is_not_torn(layout: Layout) -> None:
    layout.write_index([named(GOOD, ref="old")])
    before = os.stat(layout.index_path).st_ino
    layout.write_index([named(GOOD, ref="new")])  # umoci/regclient: temp file + rename
    snapshot = read_layout(layout.path)
    assert snapshot.identity.ino == os.stat(layout.index_path).st_ino != before
    assert [names(e) for e in snapshot.entries] == [[("", "new", HOW_TAG)]]


# -- blobs -------------------------------------------------------------------------------------


def test_blob_path_of_a_valid_digest(layout: Layout) -> None:
    assert blob_path(layout.path, "sha256:" + HEX) == os.path.join(layout.path, "blobs", "sha256", HEX)
    assert blob_path("L", "sha512:" + "a" * 128) == os.path.join("L", "blobs", "sha512", "a" * 128)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../etc/passwd",
        "sha256:../../../../../../etc/shadow",
        "../../sha256:" + HEX,
        "sha256:" + HEX[:-1] + "/",
        "sha256/../..:" + HEX,
        "sha256:" + HEX + "/../../x",
        "sha256:" + HEX + "\x00",
        "SHA256:" + HEX,
        "md5:" + "a" * 32,
        "sha256:",
        ":" + HEX,
        "",
    ],
)
def test_digests_that_try_to_escape_blobs_never_become_paths(layout: Layout, digest: str) -> None:
    with pytest.raises(BlobError, match="invalid digest") as info:
        blob_path(layout.path, digest)
    assert no_control_characters(info.value.message)
    with pytest.raises(BlobError):
        read_blob(layout.path, digest, None)


def test_read_blob_checks_size_and_hash(layout: Layout) -> None:
    descriptor = layout.blob(b'{"hello":"world"}')
    digest = str(descriptor["digest"])
    assert read_blob(layout.path, digest, 17) == b'{"hello":"world"}'
    assert read_blob(layout.path, digest, None) == b'{"hello":"world"}'
    with pytest.raises(BlobError, match="descriptor says 18"):
        read_blob(layout.path, digest, 18)
    with open(layout.blob_path(digest), "wb") as f:
        f.write(b'{"hello":"World"}')  # same size, other content
    with pytest.raises(BlobError, match="does not match its digest"):
        read_blob(layout.path, digest, 17)


def test_missing_blob_is_blob_missing(layout: Layout) -> None:
    with pytest.raises(BlobMissing, match="not in") as info:
        read_blob(layout.path, "sha256:" + HEX, 10)
    assert isinstance(info.value, BlobError)
    assert info.value.category == "blob_missing"
    os.rmdir(os.path.join(layout.path, "blobs", "sha256"))
    with pytest.raises(BlobMissing):
        read_blob(layout.path, "sha256:" + HEX, 10)


def test_blob_over_the_limit_is_refused_without_reading(layout: Layout) -> None:
    digest = str(layout.blob(b"x" * 100)["digest"])
    limits = Limits(max_blob_bytes=99)
    with pytest.raises(BlobError, match="100 bytes, over the limit of 99"):
        read_blob(layout.path, digest, None, limits)
    with pytest.raises(BlobError, match="over the limit"):
        read_blob(layout.path, digest, 10**12, limits)  # a descriptor claiming a terabyte


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_blob_that_is_not_a_regular_file(layout: Layout, kind: str) -> None:
    path = layout.blob_path("sha256:" + HEX)
    os.mkdir(path) if kind == "directory" else os.mkfifo(path)
    with pytest.raises(BlobError, match="not a regular file"):
        read_blob(layout.path, "sha256:" + HEX, None)


def test_blob_symlinked_outside_the_layout_is_refused(layout: Layout, tmp_path: Path) -> None:
    content = b"secret but hash-correct"
    digest = digest_of(content)
    outside = tmp_path / "outside"
    outside.write_bytes(content)
    os.symlink(outside, layout.blob_path(digest))
    with pytest.raises(BlobError, match="leads outside the layout"):
        read_blob(layout.path, digest, len(content))


def test_blobs_directory_symlinked_outside_is_refused(tmp_path: Path) -> None:
    content = b"elsewhere"
    digest = digest_of(content)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sha256").mkdir(parents=True)
    (elsewhere / "sha256" / digest.split(":")[1]).write_bytes(content)
    root = tmp_path / "layout"
    root.mkdir()
    os.symlink(elsewhere, root / "blobs")
    with pytest.raises(BlobError, match="leads outside the layout"):
        read_blob(str(root), digest, None)


@pytest.mark.parametrize("inside", [True, False], ids=["inside", "outside"])
def test_an_algorithm_directory_symlinked_is_followed_only_inside_the_layout(tmp_path: Path, inside: bool) -> None:
    content = b"in a symlinked blobs/sha256"
    digest = digest_of(content)
    root = tmp_path / "layout"
    (root / "blobs").mkdir(parents=True)
    store = (root / "store") if inside else (tmp_path / "store")
    store.mkdir()
    (store / digest.split(":")[1]).write_bytes(content)
    os.symlink(store, root / "blobs" / "sha256")
    if inside:
        assert read_blob(str(root), digest, len(content)) == content
    else:
        with pytest.raises(BlobError, match="leads outside the layout"):
            read_blob(str(root), digest, len(content))


def test_blob_symlink_inside_the_layout_is_followed(layout: Layout) -> None:
    content = b"deduplicated"
    digest = digest_of(content)
    shared = os.path.join(layout.path, "shared")
    os.mkdir(shared)
    with open(os.path.join(shared, "blob"), "wb") as f:
        f.write(content)
    os.symlink(os.path.join("..", "..", "shared", "blob"), layout.blob_path(digest))
    assert read_blob(layout.path, digest, len(content)) == content


def test_layout_reached_through_a_symlink_reads_its_blobs(layout: Layout, tmp_path: Path) -> None:
    content = b"via a symlinked layout"
    digest = str(layout.blob(content)["digest"])
    alias = tmp_path / "alias"
    os.symlink(layout.path, alias)
    assert read_blob(str(alias), digest, None) == content


def test_sha512_blob(layout: Layout) -> None:
    content = b"sha512 content"
    encoded = hashlib.sha512(content).hexdigest()
    os.makedirs(os.path.join(layout.path, "blobs", "sha512"))
    with open(os.path.join(layout.path, "blobs", "sha512", encoded), "wb") as f:
        f.write(content)
    assert read_blob(layout.path, "sha512:" + encoded, len(content)) == content


# -- nested indexes ----------------------------------------------------------------------------


def test_nested_index_three_levels_deep(layout: Layout) -> None:
    leaf = layout.manifest(platform=LINUX_ARM64_V8)
    level3 = layout.index([leaf])
    level2 = layout.index([level3, layout.manifest(platform=LINUX_AMD64)])
    level1 = layout.index([level2])
    layout.write_index([named(level1, ref="deep")])
    snapshot = read_layout(layout.path)
    assert snapshot.warnings == ()
    # A level at a time (each index expanded at the smallest depth that reaches it).
    assert [(c.parent, c.depth, c.digest) for c in snapshot.children] == [
        (level1["digest"], 1, level2["digest"]),
        (level2["digest"], 2, level3["digest"]),
        (level2["digest"], 2, snapshot.children[2].digest),
        (level3["digest"], 3, leaf["digest"]),
    ]
    assert all(c.entry_position == 0 for c in snapshot.children)
    assert snapshot.children[3].platform == Platform("linux", "arm64", "v8")


def test_nesting_deeper_than_max_depth_is_cut_with_a_warning(layout: Layout) -> None:
    descriptor = layout.manifest()
    chain = [descriptor]
    for _ in range(4):
        descriptor = layout.index([descriptor])
        chain.append(descriptor)
    layout.write_index([descriptor])
    snapshot = read_layout(layout.path, limits=Limits(max_depth=2))
    assert [c.depth for c in snapshot.children] == [1, 2]
    assert len(snapshot.warnings) == 1
    assert "deeper than 2 levels" in snapshot.warnings[0]
    assert str(chain[2]["digest"]) in snapshot.warnings[0]  # listed at depth 2, its own children at 3
    assert len(read_layout(layout.path).children) == 4


def test_index_that_lists_itself_cannot_loop(layout: Layout) -> None:
    # A blob cannot contain its own sha256, so a self-listing index is always
    # a forged blob: its hash check refuses it, and nothing is followed twice.
    fake = "sha256:" + "c" * 64
    forged = canonical_json({"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": fake, "size": 99}]})
    with open(layout.blob_path(fake), "wb") as f:
        f.write(forged)
    layout.write_index([{"mediaType": OCI_INDEX, "digest": fake, "size": len(forged)}])
    snapshot = read_layout(layout.path)
    assert snapshot.children == ()
    assert len(snapshot.warnings) == 1 and "does not match its digest" in snapshot.warnings[0]


def test_same_nested_index_under_two_entries_is_recorded_once(layout: Layout) -> None:
    # Under the first entry that reaches it; lookups follow it by digest from either (test_faults.py).
    index = layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8])
    layout.write_index([named(index, ref="3.16"), named(index, ref="3")])
    snapshot = read_layout(layout.path)
    assert [c.entry_position for c in snapshot.children] == [0, 0]
    assert snapshot.warnings == ()


def test_child_hash_mismatch_is_a_warning(layout: Layout) -> None:
    index = layout.multiarch([LINUX_AMD64])
    path = layout.blob_path(str(index["digest"]))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data.replace(b"amd64", b"arm64"))
    layout.write_index([named(index, ref="latest"), named(layout.manifest(), ref="other")])
    snapshot = read_layout(layout.path)
    assert len(snapshot.entries) == 2
    assert snapshot.children == ()
    assert len(snapshot.warnings) == 1
    assert "does not match its digest" in snapshot.warnings[0]
    assert "children are unknown" in snapshot.warnings[0]


def test_missing_child_blob_is_reported_not_fatal(layout: Layout) -> None:
    index = layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8])
    layout.remove_blob(index)
    layout.write_index([named(index, containerd="docker.io/library/alpine:3.16", ref="3.16")])
    snapshot = read_layout(layout.path)
    assert [names(e) for e in snapshot.entries] == [[(ALPINE, "3.16", HOW_CONTAINERD)]]
    assert snapshot.children == ()
    assert snapshot.warnings == (
        f"nested index {index['digest']} is not in blobs/ (a partial export?); its children are unknown",
    )


def test_missing_child_manifest_blob_keeps_the_child_listed(layout: Layout) -> None:
    amd64 = layout.manifest(platform=LINUX_AMD64)
    arm64 = layout.manifest(platform=LINUX_ARM64_V8)
    index = layout.index([amd64, arm64])
    layout.remove_blob(arm64)  # a partial export: one platform only
    layout.write_index([index])
    snapshot = read_layout(layout.path)
    assert [c.digest for c in snapshot.children] == [amd64["digest"], arm64["digest"]]
    assert snapshot.warnings == ()


def test_docker_manifest_list_children(layout: Layout) -> None:
    manifest_list = layout.multiarch([LINUX_AMD64, LINUX_ARM_V6, LINUX_ARM_V7], docker=True)
    assert manifest_list["mediaType"] == DOCKER_LIST
    layout.write_index([named(manifest_list, containerd="docker.io/library/busybox:1.36", ref="1.36")])
    snapshot = read_layout(layout.path)
    assert [(c.media_type, c.platform) for c in snapshot.children] == [
        (DOCKER_MANIFEST, Platform("linux", "amd64")),
        (DOCKER_MANIFEST, Platform("linux", "arm", "v6")),
        (DOCKER_MANIFEST, Platform("linux", "arm", "v7")),
    ]


def test_children_keep_annotations_but_names_inside_nested_indexes_are_not_names(layout: Layout) -> None:
    inner = named(layout.manifest(platform=LINUX_AMD64), ref="inner-tag", containerd="docker.io/x/y:z")
    attestation = named(
        layout.manifest(platform=UNKNOWN_PLATFORM),
        **{"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": str(inner["digest"])},
    )
    index = layout.index([inner, attestation])
    layout.write_index([named(index, ref="outer")])
    snapshot = read_layout(layout.path)
    assert [names(e) for e in snapshot.entries] == [[("", "outer", HOW_TAG)]]
    assert snapshot.children[0].annotations == inner["annotations"]
    assert snapshot.children[1].annotations["vnd.docker.reference.type"] == "attestation-manifest"
    assert not hasattr(snapshot.children[0], "names")


def test_bad_descriptors_inside_a_nested_index_are_skipped(layout: Layout) -> None:
    good = layout.manifest(platform=LINUX_AMD64)
    escaping = {"mediaType": OCI_INDEX, "digest": "sha256:../../../etc/passwd", "size": 1}
    index = layout.index([escaping, good, {"digest": 5}])
    layout.write_index([index])
    snapshot = read_layout(layout.path)
    assert [c.digest for c in snapshot.children] == [good["digest"]]
    assert len(snapshot.warnings) == 2
    assert "manifests[0]: digest" in snapshot.warnings[0] and "manifests[2]:" in snapshot.warnings[1]


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1,2]", b'{"manifests":{}}', b"[" * 50_000, b'{"manifests":[' + b"\xff" + b"]}"],
)
def test_nested_blob_that_is_not_an_index_is_a_warning(layout: Layout, content: bytes) -> None:
    blob = layout.blob(content, OCI_INDEX)
    layout.write_index([named(blob, ref="x")])
    snapshot = read_layout(layout.path)
    assert len(snapshot.entries) == 1 and snapshot.children == ()
    assert len(snapshot.warnings) == 1 and f"nested index {blob['digest']}" in snapshot.warnings[0]


def test_nested_null_manifests_is_an_empty_index(layout: Layout) -> None:
    blob = layout.blob(b'{"schemaVersion":2,"manifests":null}', OCI_INDEX)
    layout.write_index([blob])
    snapshot = read_layout(layout.path)
    assert snapshot.children == () and snapshot.warnings == ()


def test_max_children_bounds_the_walk(layout: Layout) -> None:
    first, second = (layout.index([layout.manifest() for _ in range(5)]) for _ in range(2))
    layout.write_index([first, second])
    snapshot = read_layout(layout.path, limits=Limits(max_children=7))
    assert len(snapshot.children) == 7
    assert snapshot.warnings == ("more than 7 nested descriptors; the rest are not read",)


def test_nested_blob_over_max_blob_bytes_is_a_warning(layout: Layout) -> None:
    index = layout.multiarch([LINUX_AMD64, LINUX_ARM64_V8])
    layout.write_index([index])
    snapshot = read_layout(layout.path, limits=Limits(max_blob_bytes=10))
    assert snapshot.children == ()
    assert "over the limit of 10 bytes" in snapshot.warnings[0]


def test_only_index_media_types_are_followed(layout: Layout) -> None:
    index = layout.multiarch([LINUX_AMD64])
    layout.write_index([{**index, "mediaType": OCI_MANIFEST}, {**index, "mediaType": ""}])
    assert read_layout(layout.path).children == ()


# -- platforms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        (("linux", "amd64", ""), ("linux", "amd64", "")),
        (("linux", "x86_64", ""), ("linux", "amd64", "")),
        (("linux", "x86-64", "v1"), ("linux", "amd64", "")),
        (("linux", "amd64", "v3"), ("linux", "amd64", "v3")),
        (("linux", "aarch64", ""), ("linux", "arm64", "")),
        (("linux", "arm64", "v8"), ("linux", "arm64", "")),
        (("linux", "arm64", "8"), ("linux", "arm64", "")),
        (("linux", "arm64", "v8.0"), ("linux", "arm64", "")),
        (("linux", "arm64", "9"), ("linux", "arm64", "v9")),
        (("linux", "arm", ""), ("linux", "arm", "v7")),
        (("linux", "arm", "7"), ("linux", "arm", "v7")),
        (("linux", "arm", "6"), ("linux", "arm", "v6")),
        (("linux", "armhf", ""), ("linux", "arm", "v7")),
        (("linux", "armel", ""), ("linux", "arm", "v6")),
        (("linux", "i386", "whatever"), ("linux", "386", "")),
        (("Linux", "AMD64", ""), ("linux", "amd64", "")),
        (("macOS", "arm64", ""), ("darwin", "arm64", "")),
        (("linux", "riscv64", ""), ("linux", "riscv64", "")),
        (("", "", ""), ("", "", "")),
    ],
)
def test_normalize_platform_like_containerd(given: tuple[str, str, str], normalized: tuple[str, str, str]) -> None:
    assert normalize_platform(*given) == normalized


@pytest.mark.parametrize(
    ("want", "have", "match"),
    [
        ("linux/arm64", Platform("linux", "arm64", "v8"), True),
        ("linux/arm64/v8", Platform("linux", "arm64"), True),
        ("linux/arm64/v8", Platform("linux", "aarch64"), True),
        ("linux/arm", Platform("linux", "arm", "v7"), True),
        ("linux/arm/v7", Platform("linux", "arm"), True),
        ("linux/arm/v6", Platform("linux", "arm", "v7"), False),
        ("linux/arm", Platform("linux", "arm", "v6"), False),
        ("linux/amd64", Platform("linux", "amd64"), True),
        ("linux/x86_64", Platform("linux", "amd64"), True),
        ("linux/amd64", Platform("linux", "amd64", "v3"), False),
        ("linux/amd64", Platform("linux", "arm64"), False),
        ("linux/amd64", Platform("windows", "amd64", "", "10.0.17763.1"), False),
        ("LINUX/AMD64", Platform("linux", "amd64"), True),
        ("linux/arm64", Platform("unknown", "unknown"), False),
    ],
)
def test_platform_matches(want: str, have: Platform, match: bool) -> None:
    assert platform_matches(parse_platform_spec(want), have) is match


def test_parse_platform_spec() -> None:
    assert parse_platform_spec("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert parse_platform_spec("linux/amd64") == Platform("linux", "amd64")
    assert str(parse_platform_spec("linux/arm/v7")) == "linux/arm/v7"


@pytest.mark.parametrize(
    "spec", ["", "linux", "amd64", "linux/", "/amd64", "linux/arm/v7/x", "linux//v7", "linux/amd 64", "linux/\x1b[1m"]
)
def test_parse_platform_spec_refuses_malformed(spec: str) -> None:
    with pytest.raises(UsageError, match="expected OS/ARCH") as info:
        parse_platform_spec(spec)
    assert info.value.exit_code == 2 and no_control_characters(info.value.message)


def test_platform_json_and_normalized() -> None:
    arm64 = Platform("linux", "arm64", "v8")
    assert arm64.to_json() == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert arm64.normalized() == Platform("linux", "arm64")
    assert arm64.normalized().to_json() == {"os": "linux", "architecture": "arm64", "variant": None}


# -- discovery and records ---------------------------------------------------------------------


def test_is_layout_dir(tmp_path: Path) -> None:
    assert is_layout_dir(Layout(tmp_path / "a").path)  # oci-layout, no index.json yet
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "index.json").write_bytes(b"{}")
    assert is_layout_dir(str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    assert not is_layout_dir(str(tmp_path / "c"))
    assert not is_layout_dir(str(tmp_path / "b" / "index.json"))
    assert not is_layout_dir(str(tmp_path / "missing"))


def test_records_are_values() -> None:
    st = os.stat(__file__)
    assert FileIdentity.of(st) == FileIdentity.of(os.stat(__file__))
    assert stat.S_ISREG(st.st_mode)
    child = Child("sha256:" + HEX, 0, 1, "sha256:" + "f" * 64, OCI_MANIFEST, 1)
    assert child.annotations == {} and child.platform is None
    assert hash(child) == hash(Child("sha256:" + HEX, 0, 1, "sha256:" + "f" * 64, OCI_MANIFEST, 1, None, {}))
    assert Limits() == DEFAULT_LIMITS
    assert (DEFAULT_LIMITS.max_index_bytes, DEFAULT_LIMITS.max_blob_bytes, DEFAULT_LIMITS.max_depth) == (
        64 << 20,
        16 << 20,
        4,
    )


def test_every_layout_error_is_a_layout_error() -> None:
    for cls in (LayoutUnreadable, IndexParseError, TornRead, BlobError, BlobMissing):
        assert issubclass(cls, LayoutError)
    assert json.loads(json.dumps(BlobMissing("x").to_json())) == {"error": "blob_missing", "message": "x"}
