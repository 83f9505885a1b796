"""A catalogue of malformed and malicious OCI layouts, placed among good ones.

:func:`build_catalogue` writes, below one scan root, every hostile layout in
:data:`CASES` plus a set of good layouts, and returns what a correct scanner
must make of each:

* ``ok``: indexed in state ``ok``; ``warning`` (when set) is a substring of one
  of its warnings (``ocidx ls PATH --json``); ``good`` refs resolve exactly;
* ``error``: indexed in state ``error`` with error category ``category``;
* ``stale``: was good at the first scan and broken before the second: state
  ``error`` with ``category``, and the ``good`` refs still resolve from the
  last good state (freshness ``stale``);
* ``absent``: never indexed (a symlink out of the root, a vanished layout, a
  root that is a file); ``scan_message`` (when set) is a substring the scan
  prints on stderr.

Some cases break a layout only after the first scan (``after_first_scan``), so
the test scans, calls every ``after_first_scan``, and scans again.

Nothing here is mocked: the layouts are real directories, blobs are real
content-addressed files, FIFOs, sockets, sparse files and symlinks are real.
Running as root bypasses file permissions, so the unreadable cases expect what
root sees (``ok``) when ``os.geteuid() == 0`` and ``error`` otherwise;
:func:`unreadable_catalogue` is the part to scan without the capabilities
that bypass permissions (``setpriv --bounding-set=-dac_override,-dac_read_search``).
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from dataclasses import dataclass, field

from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    Layout,
    canonical_json,
    digest_of,
    named,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from layouts import Descriptor

GIB = 1 << 30
BAD_DIGEST_TRAVERSAL = "sha256:../../../../etc/passwd"
ESCAPES = "\x1b[31mred\x1b[0m\x07\x1b]0;pwned\x07\x9b2J\x7f"
# Invisible and bidirectional format characters: a name holding them can pass for another.
INVISIBLE = "\u200b\u200f\u202e\u061c\ufeff\u00ad\U000e0041\u2066"


@dataclass
class Built:
    """One layout of the catalogue and what a scan must make of it."""

    case: str
    path: str  # the layout's path as ocidx stores it (symlinks resolved)
    expect: str  # ok | error | stale | absent
    category: str | None = None
    warning: str | None = None
    good: dict[str, str] = field(default_factory=dict)  # REF for resolve --layout -> digest
    scan_message: str | None = None
    after_first_scan: Callable[[], None] | None = None


@dataclass(frozen=True)
class Case:
    """A named way to break a layout: ``build(root, outside) -> Built``."""

    name: str
    what: str
    build: Callable[[str, str], Built]


CASES: list[Case] = []


def case(what: str) -> Callable[[Callable[[str, str], Built]], Callable[[str, str], Built]]:
    """Register a builder in :data:`CASES` under its function name."""

    def register(build: Callable[[str, str], Built]) -> Callable[[str, str], Built]:
        CASES.append(Case(build.__name__, what, build))
        return build

    return register


# -- helpers -----------------------------------------------------------------------------------


def _layout(root: str, name: str) -> Layout:
    return Layout(os.path.join(root, name))


def _real(path: str) -> str:
    return os.path.realpath(path)


def _good_image(layout: Layout, tag: str) -> Descriptor:
    """A real image manifest named ``:tag``."""
    return named(layout.manifest(platform=LINUX_AMD64, label=f"{layout.path!a}:{tag}"), ref=tag)


def _raw(root: str, name: str, data: bytes) -> Built:
    layout = _layout(root, name)
    layout.write_index_bytes(data)
    return Built(name, _real(layout.path), "error", "index_invalid")


def _one_good_plus(root: str, name: str, extra: list[object], warning: str) -> Built:
    """A layout with one good image ``:good`` and some bad descriptors beside it."""
    layout = _layout(root, name)
    good = _good_image(layout, "good")
    document = layout.index_document([good, *extra])  # type: ignore[list-item]
    layout.write_index_bytes(canonical_json(document))
    return Built(name, _real(layout.path), "ok", warning=warning, good={":good": str(good["digest"])})


def _nested(layout: Layout, tag: str) -> tuple[Descriptor, Descriptor]:
    """A multi-platform index named ``:tag``; (its descriptor, the arm64 child)."""
    arm = layout.manifest(platform=LINUX_ARM64, label=f"{layout.path!a}:{tag}:arm64")
    amd = layout.manifest(platform=LINUX_AMD64, label=f"{layout.path!a}:{tag}:amd64")
    return named(layout.index([amd, arm]), ref=tag), arm


# -- index.json that is not a valid document ---------------------------------------------------


@case("index.json cut in half (a writer died mid-write)")
def truncated_json(root: str, outside: str) -> Built:
    layout = _layout(root, "truncated_json")
    data = canonical_json(layout.index_document([_good_image(layout, "v1")]))
    layout.write_index_bytes(data[: len(data) // 2])
    return Built("truncated_json", _real(layout.path), "error", "index_invalid")


@case("a valid document followed by the tail of an older, longer one (in-place rewrite without truncate)")
def trailing_bytes(root: str, outside: str) -> Built:
    layout = _layout(root, "trailing_bytes")
    data = canonical_json(layout.index_document([_good_image(layout, "v1")]))
    layout.write_index_bytes(data + b'a","size":12}]}')
    return Built("trailing_bytes", _real(layout.path), "error", "index_invalid", warning="trailing data")


@case("two concatenated JSON documents")
def two_documents(root: str, outside: str) -> Built:
    return _raw(root, "two_documents", b'{"manifests":[]}\n{"manifests":[]}\n')


@case("an empty index.json")
def empty_file(root: str, outside: str) -> Built:
    return _raw(root, "empty_file", b"")


@case("index.json of spaces and newlines only")
def whitespace_only(root: str, outside: str) -> Built:
    return _raw(root, "whitespace_only", b"  \n\t\n  ")


@case("top level is an array")
def top_level_array(root: str, outside: str) -> Built:
    return _raw(root, "top_level_array", b'[{"manifests":[]}]')


@case('"manifests" is a string')
def manifests_wrong_type(root: str, outside: str) -> Built:
    return _raw(root, "manifests_wrong_type", b'{"schemaVersion":2,"manifests":"sha256:abc"}')


@case("a JSON nesting 200,000 levels deep")
def deep_nesting(root: str, outside: str) -> Built:
    depth = 200_000
    return _raw(root, "deep_nesting", b'{"manifests":' + b"[" * depth + b"]" * depth + b"}")


@case("invalid UTF-8 inside a string")
def invalid_utf8(root: str, outside: str) -> Built:
    return _raw(root, "invalid_utf8", b'{"manifests":[],"annotations":{"a":"\xff\xfe\xc3("}}')


@case("a UTF-8 byte-order mark before the document")
def utf8_bom(root: str, outside: str) -> Built:
    return _raw(root, "utf8_bom", b'\xef\xbb\xbf{"manifests":[]}')


@case("raw NUL and ESC bytes inside a JSON string (JSON forbids them unescaped)")
def raw_control_bytes(root: str, outside: str) -> Built:
    return _raw(root, "raw_control_bytes", b'{"manifests":[],"annotations":{"x":"a\x00b\x1b[2Jc"}}')


@case("NaN and Infinity where numbers belong")
def nan_infinity(root: str, outside: str) -> Built:
    layout = _layout(root, "nan_infinity")
    good = _good_image(layout, "v1")
    text = canonical_json(layout.index_document([good])).replace(f'"size":{good["size"]}'.encode(), b'"size":NaN')
    layout.write_index_bytes(text)
    return Built("nan_infinity", _real(layout.path), "error", "index_invalid")


@case("a size with 5,000 digits (over Python's int conversion limit)")
def huge_integer(root: str, outside: str) -> Built:
    layout = _layout(root, "huge_integer")
    good = _good_image(layout, "v1")
    text = canonical_json(layout.index_document([good])).replace(
        f'"size":{good["size"]}'.encode(), b'"size":' + b"9" * 5000
    )
    layout.write_index_bytes(text)
    return Built("huge_integer", _real(layout.path), "error", "index_invalid")


@case("index.json one byte over the 64 MiB limit (sparse)")
def over_size_limit(root: str, outside: str) -> Built:
    layout = _layout(root, "over_size_limit")
    with open(layout.index_path, "wb") as f:
        f.write(b'{"manifests":[]}')
        f.truncate(64 * 1024 * 1024 + 1)
    return Built("over_size_limit", _real(layout.path), "error", "index_invalid", warning="over the limit")


@case("a 1 GiB sparse index.json")
def sparse_1gib(root: str, outside: str) -> Built:
    layout = _layout(root, "sparse_1gib")
    with open(layout.index_path, "wb") as f:
        f.truncate(GIB)
    return Built("sparse_1gib", _real(layout.path), "error", "index_invalid", warning="over the limit")


# -- index.json that is not a regular file ----------------------------------------------------


@case("index.json is a FIFO (a naive open would block forever)")
def index_fifo(root: str, outside: str) -> Built:
    layout = _layout(root, "index_fifo")
    os.mkfifo(layout.index_path)
    return Built("index_fifo", _real(layout.path), "error", "layout_unreadable", warning="FIFO")


@case("index.json is a directory")
def index_directory(root: str, outside: str) -> Built:
    layout = _layout(root, "index_directory")
    os.mkdir(layout.index_path)
    return Built("index_directory", _real(layout.path), "error", "layout_unreadable", warning="directory")


@case("index.json is a socket node")
def index_socket(root: str, outside: str) -> Built:
    layout = _layout(root, "index_socket")
    os.mknod(layout.index_path, stat.S_IFSOCK | 0o600)
    return Built("index_socket", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a symlink to /dev/zero (an endless read)")
def index_dev_zero(root: str, outside: str) -> Built:
    layout = _layout(root, "index_dev_zero")
    os.symlink("/dev/zero", layout.index_path)
    return Built("index_dev_zero", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a dangling symlink")
def index_dangling_symlink(root: str, outside: str) -> Built:
    layout = _layout(root, "index_dangling_symlink")
    os.symlink(os.path.join(outside, "does-not-exist.json"), layout.index_path)
    return Built("index_dangling_symlink", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a symlink to itself (ELOOP)")
def index_symlink_loop(root: str, outside: str) -> Built:
    layout = _layout(root, "index_symlink_loop")
    os.symlink("index.json", layout.index_path)
    return Built("index_symlink_loop", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a symlink to a non-JSON file outside the layout (/etc/passwd-like)")
def index_symlink_outside(root: str, outside: str) -> Built:
    layout = _layout(root, "index_symlink_outside")
    secret = os.path.join(outside, "passwd")
    with open(secret, "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\n")
    os.symlink(secret, layout.index_path)
    return Built("index_symlink_outside", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a symlink to a valid index outside the layout (a root-only file with a token)")
def index_symlink_outside_valid(root: str, outside: str) -> Built:
    layout = _layout(root, "index_symlink_outside_valid")
    other = Layout(os.path.join(outside, "private-layout"))
    image = other.manifest(label="private")
    other.write_index([named(image, ref="latest", **{"org.example.token": "SECRET-TOKEN-index-symlink"})])
    os.chmod(other.index_path, 0o600)
    os.symlink(other.index_path, layout.index_path)
    return Built("index_symlink_outside_valid", _real(layout.path), "error", "layout_unreadable")


@case("index.json is a symlink to a file inside its own layout")
def index_symlink_inside(root: str, outside: str) -> Built:
    layout = _layout(root, "index_symlink_inside")
    image = _good_image(layout, "good")
    layout.write_index([image])
    os.rename(layout.index_path, os.path.join(layout.path, "index.real.json"))
    os.symlink("index.real.json", layout.index_path)
    return Built("index_symlink_inside", _real(layout.path), "ok", good={":good": str(image["digest"])})


@case("oci-layout present, index.json missing")
def no_index_json(root: str, outside: str) -> Built:
    layout = _layout(root, "no_index_json")
    return Built("no_index_json", _real(layout.path), "error", "layout_unreadable")


@case("index.json with mode 000 (root reads it anyway)")
def index_unreadable(root: str, outside: str) -> Built:
    layout = _layout(root, "index_unreadable")
    good = _good_image(layout, "v1")
    layout.write_index([good])
    os.chmod(layout.index_path, 0)
    if os.geteuid() == 0:
        return Built("index_unreadable", _real(layout.path), "ok", good={":v1": str(good["digest"])})
    return Built("index_unreadable", _real(layout.path), "error", "layout_unreadable")


# -- descriptors with wrong types or hostile values -------------------------------------------


@case("descriptors of wrong types beside a good one (number, string, size as string, digest as number)")
def wrong_types(root: str, outside: str) -> Built:
    bad: list[object] = [
        42,
        "sha256:" + "a" * 64,
        None,
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": "12"},
        {"mediaType": OCI_MANIFEST, "digest": 12345, "size": 12},
        {"mediaType": 7, "digest": "sha256:" + "c" * 64, "size": 12},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": -1},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "e" * 64, "size": 1.5},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "f" * 64, "size": True},
    ]
    return _one_good_plus(root, "wrong_types", bad, warning="skipped")


@case("annotations that are not strings (numbers, null, objects, a list instead of an object)")
def non_string_annotations(root: str, outside: str) -> Built:
    layout = _layout(root, "non_string_annotations")
    good = _good_image(layout, "good")
    other = layout.manifest(platform=LINUX_AMD64, label="non-string")
    other = {**other, "annotations": {REF_NAME: 5, "io.containerd.image.name": None, "x": {"y": 1}}}
    third = layout.manifest(platform=LINUX_AMD64, label="list-annotations")
    third = {**third, "annotations": ["a", "b"], "platform": "linux/amd64"}
    layout.write_index([good, other, third])
    return Built(
        "non_string_annotations",
        _real(layout.path),
        "ok",
        warning="not a string",
        good={":good": str(good["digest"]), f"@{other['digest']}": str(other["digest"])},
    )


@case("digests that try to leave blobs/ (sha256:../../etc/passwd, absolute, NUL)")
def digest_traversal(root: str, outside: str) -> Built:
    bad: list[object] = [
        {"mediaType": OCI_INDEX, "digest": BAD_DIGEST_TRAVERSAL, "size": 10},
        {"mediaType": OCI_INDEX, "digest": "sha256:/etc/passwd", "size": 10},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 63 + "\x00", "size": 10},
        {"mediaType": OCI_MANIFEST, "digest": "../" + "a" * 64, "size": 10},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "A" * 64, "size": 10},
    ]
    return _one_good_plus(root, "digest_traversal", bad, warning="invalid")


@case("a nested index whose child digest is sha256:../../etc/passwd")
def child_digest_traversal(root: str, outside: str) -> Built:
    layout = _layout(root, "child_digest_traversal")
    good = _good_image(layout, "good")
    evil = layout.index([{"mediaType": OCI_INDEX, "digest": BAD_DIGEST_TRAVERSAL, "size": 10}, good])
    layout.write_index([good, named(evil, ref="evil")])
    return Built(
        "child_digest_traversal",
        _real(layout.path),
        "ok",
        warning="invalid",
        good={":good": str(good["digest"]), ":evil": str(evil["digest"])},
    )


@case("names and annotations full of terminal escapes, NUL, DEL and C1 controls (JSON-escaped)")
def control_chars_in_names(root: str, outside: str) -> Built:
    layout = _layout(root, "control_chars_in_names")
    good = _good_image(layout, "good")
    evil = layout.manifest(platform=LINUX_AMD64, label="evil")
    evil = {
        **evil,
        "mediaType": OCI_MANIFEST + ESCAPES + INVISIBLE,
        "annotations": {
            REF_NAME: "v1" + ESCAPES,
            "io.containerd.image.name": "docker.io/library/x\x00:1",
            "key" + ESCAPES: "value\r\n" + ESCAPES,
            "org.example.invisible" + INVISIBLE: "val" + INVISIBLE,
        },
        "platform": {"os": "linux\x1b[2J", "architecture": "amd64\u202e"},
    }
    layout.write_index([good, evil])
    return Built(
        "control_chars_in_names",
        _real(layout.path),
        "ok",
        good={":good": str(good["digest"]), f"@{evil['digest']}": str(evil["digest"])},
    )


@case("a lone UTF-16 surrogate, duplicate keys and a 64-hex name")
def odd_strings(root: str, outside: str) -> Built:
    layout = _layout(root, "odd_strings")
    good = _good_image(layout, "good")
    other = layout.manifest(platform=LINUX_AMD64, label="odd")
    body = canonical_json(layout.index_document([good])).decode()
    extra = (
        f'{{"mediaType":"{OCI_MANIFEST}","digest":"{other["digest"]}","size":{other["size"]},'
        f'"annotations":{{"{REF_NAME}":"a","{REF_NAME}":"{"f" * 64}","lone":"\\ud800x"}}}}'
    )
    layout.write_index_bytes(body.replace("]", "," + extra + "]", 1).encode())
    return Built(
        "odd_strings",
        _real(layout.path),
        "ok",
        good={":good": str(good["digest"]), f"@{other['digest']}": str(other["digest"])},
    )


@case("a reference name of 4,000 characters")
def very_long_name(root: str, outside: str) -> Built:
    layout = _layout(root, "very_long_name")
    good = _good_image(layout, "good")
    other = named(layout.manifest(platform=LINUX_AMD64, label="long"), ref="example.com/" + "a/" * 2000 + "x:1")
    layout.write_index([good, other])
    return Built("very_long_name", _real(layout.path), "ok", good={":good": str(good["digest"])})


# -- blobs: escapes, cycles, sizes, special files -----------------------------------------------


@case("a nested index blob that is a symlink to a matching file outside the layout")
def blob_symlink_escape(root: str, outside: str) -> Built:
    layout = _layout(root, "blob_symlink_escape")
    good = _good_image(layout, "good")
    index = layout.index([good])
    blob = layout.blob_path(str(index["digest"]))
    target = os.path.join(outside, "escaped-blob")
    os.replace(blob, target)
    os.symlink(target, blob)
    layout.write_index([named(index, ref="idx")])
    return Built(
        "blob_symlink_escape",
        _real(layout.path),
        "ok",
        warning="outside the layout",
        good={":idx": str(index["digest"])},
    )


@case("blobs/ is a symlink to a directory outside the layout")
def blobs_dir_outside(root: str, outside: str) -> Built:
    layout = _layout(root, "blobs_dir_outside")
    index, _arm = _nested(layout, "multi")
    target = os.path.join(outside, "blobs-elsewhere")
    os.replace(os.path.join(layout.path, "blobs"), target)
    os.symlink(target, os.path.join(layout.path, "blobs"))
    layout.write_index([index])
    return Built(
        "blobs_dir_outside",
        _real(layout.path),
        "ok",
        warning="outside the layout",
        good={":multi": str(index["digest"])},
    )


@case("a forged nested-index cycle: a blob that lists its own digest (content does not hash to it)")
def nested_index_cycle(root: str, outside: str) -> Built:
    layout = _layout(root, "nested_index_cycle")
    fake = "sha256:" + digest_of(b"cycle")[7:]
    document = canonical_json(
        {"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": fake, "size": 400}]}
    )
    padded = document + b" " * (400 - len(document))
    with open(layout.blob_path(fake), "wb") as f:
        f.write(padded)
    layout.write_index([{"mediaType": OCI_INDEX, "digest": fake, "size": 400, "annotations": {REF_NAME: "loop"}}])
    return Built("nested_index_cycle", _real(layout.path), "ok", warning="does not match", good={":loop": fake})


@case("nested indexes 8 levels deep (over the depth limit)")
def nested_too_deep(root: str, outside: str) -> Built:
    layout = _layout(root, "nested_too_deep")
    descriptor = layout.manifest(platform=LINUX_AMD64, label="deep")
    for _ in range(8):
        descriptor = layout.index([descriptor])
    layout.write_index([named(descriptor, ref="deep")])
    return Built(
        "nested_too_deep", _real(layout.path), "ok", warning="deeper than", good={":deep": str(descriptor["digest"])}
    )


@case("a nested index blob that is 1 GiB (sparse), claimed so by its descriptor")
def huge_blob(root: str, outside: str) -> Built:
    layout = _layout(root, "huge_blob")
    digest = "sha256:" + "9" * 64
    with open(layout.blob_path(digest), "wb") as f:
        f.truncate(GIB)
    layout.write_index([{"mediaType": OCI_INDEX, "digest": digest, "size": GIB, "annotations": {REF_NAME: "big"}}])
    return Built("huge_blob", _real(layout.path), "ok", warning="over the limit", good={":big": digest})


@case("nested index blobs that are a FIFO, a directory and the wrong size")
def special_blobs(root: str, outside: str) -> Built:
    layout = _layout(root, "special_blobs")
    fifo, directory = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    os.mkfifo(layout.blob_path(fifo))
    os.mkdir(layout.blob_path(directory))
    real = layout.index([_good_image(layout, "inner")])
    layout.write_index(
        [
            {"mediaType": OCI_INDEX, "digest": fifo, "size": 10, "annotations": {REF_NAME: "fifo"}},
            {"mediaType": OCI_INDEX, "digest": directory, "size": 10, "annotations": {REF_NAME: "dir"}},
            {**real, "size": int(str(real["size"])) + 1, "annotations": {REF_NAME: "wrongsize"}},
        ]
    )
    return Built("special_blobs", _real(layout.path), "ok", warning="not a regular file", good={":fifo": fifo})


@case("blobs/ is a regular file")
def blobs_is_file(root: str, outside: str) -> Built:
    layout = _layout(root, "blobs_is_file")
    index, _arm = _nested(layout, "multi")
    layout.write_index([index])
    blobs = os.path.join(layout.path, "blobs")
    os.rename(blobs, os.path.join(outside, "blobs_is_file-moved"))
    with open(blobs, "w") as f:
        f.write("not a directory\n")
    return Built(
        "blobs_is_file", _real(layout.path), "ok", warning="not in blobs/", good={":multi": str(index["digest"])}
    )


# -- hostile paths and symlinked layouts -----------------------------------------------------------


@case("a layout directory whose name holds terminal escape sequences and a newline")
def escape_in_dir_name(root: str, outside: str) -> Built:
    layout = _layout(root, "esc\x1b[31mred\x1b]0;pwned\x07\nline\x9b")
    good = _good_image(layout, "v1")
    layout.write_index([good])
    return Built("escape_in_dir_name", _real(layout.path), "ok", good={":v1": str(good["digest"])})


@case("a layout directory whose name is not valid UTF-8")
def non_utf8_dir_name(root: str, outside: str) -> Built:
    path = os.fsdecode(os.fsencode(root) + b"/bad\xff\xfename")
    layout = Layout(path)
    good = _good_image(layout, "v1")
    layout.write_index([good])
    return Built("non_utf8_dir_name", _real(layout.path), "ok", good={":v1": str(good["digest"])})


@case("a symlink in the root pointing at a layout outside it (not followed by default)")
def symlink_layout_escape(root: str, outside: str) -> Built:
    target = Layout(os.path.join(outside, "elsewhere"))
    target.write_index([_good_image(target, "v1")])
    link = os.path.join(root, "symlink_layout_escape")
    os.symlink(target.path, link)
    return Built("symlink_layout_escape", _real(target.path), "absent")


@case("a symlink loop between two directories inside the root")
def symlink_dir_loop(root: str, outside: str) -> Built:
    base = os.path.join(root, "symlink_dir_loop")
    os.makedirs(os.path.join(base, "a"))
    os.symlink(base, os.path.join(base, "a", "back"))
    layout = Layout(os.path.join(base, "a", "img"))
    good = _good_image(layout, "v1")
    layout.write_index([good])
    return Built("symlink_dir_loop", _real(layout.path), "ok", good={":v1": str(good["digest"])})


@case("a good layout that is replaced by a regular file after the first scan")
def layout_replaced_by_file(root: str, outside: str) -> Built:
    layout = _layout(root, "layout_replaced_by_file")
    layout.write_index([_good_image(layout, "v1")])
    path = _real(layout.path)

    def replace() -> None:
        os.rename(path, os.path.join(outside, "layout_replaced_by_file-old"))
        with open(path, "w") as f:
            f.write("I used to be a layout\n")

    return Built("layout_replaced_by_file", path, "absent", after_first_scan=replace)


@case("a good layout whose index.json is truncated after the first scan (last good state kept)")
def broken_after_good(root: str, outside: str) -> Built:
    layout = _layout(root, "broken_after_good")
    good = _good_image(layout, "v1")
    data = layout.write_index([good])

    def truncate() -> None:
        with open(layout.index_path, "r+b") as f:
            f.truncate(len(data) // 3)

    return Built(
        "broken_after_good",
        _real(layout.path),
        "stale",
        "index_invalid",
        good={":v1": str(good["digest"])},
        after_first_scan=truncate,
    )


@case("a good layout whose index.json becomes a FIFO after the first scan")
def fifo_after_good(root: str, outside: str) -> Built:
    layout = _layout(root, "fifo_after_good")
    good = _good_image(layout, "v1")
    layout.write_index([good])

    def to_fifo() -> None:
        os.remove(layout.index_path)
        os.mkfifo(layout.index_path)

    return Built(
        "fifo_after_good",
        _real(layout.path),
        "stale",
        "layout_unreadable",
        good={":v1": str(good["digest"])},
        after_first_scan=to_fifo,
    )


# -- the catalogue -----------------------------------------------------------------------------------


def good_layouts(root: str, count: int, *, prefix: str = "good") -> list[Built]:
    """*count* good layouts: tags, full names, a multi-platform index; every ref's exact digest."""
    out = []
    for i in range(count):
        layout = Layout(os.path.join(root, f"{prefix}-{i:04d}"))
        first = named(
            layout.manifest(platform=LINUX_AMD64, label=f"{prefix}{i}a"),
            ref=f"v{i}",
            containerd=f"docker.io/library/app{i}:v{i}",
        )
        second = named(layout.manifest(platform=LINUX_AMD64, label=f"{prefix}{i}b"), ref="latest")
        descriptors = [first, second]
        good = {f":v{i}": str(first["digest"]), ":latest": str(second["digest"]), f"app{i}:v{i}": str(first["digest"])}
        if i % 4 == 0:
            index, _arm = _nested(layout, "multi")
            descriptors.append(index)
            good[":multi"] = str(index["digest"])
        layout.write_index(descriptors)
        out.append(Built(f"{prefix}-{i:04d}", _real(layout.path), "ok", good=good))
    return out


def build_catalogue(root: str, outside: str, *, good: int = 20, skip: frozenset[str] = frozenset()) -> list[Built]:
    """Every case of :data:`CASES` (but *skip*) below *root*, helpers in *outside*, among good layouts."""
    os.makedirs(root, exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    built = good_layouts(root, good // 2, prefix="good-a")
    built.extend(case.build(root, outside) for case in CASES if case.name not in skip)
    built.extend(good_layouts(root, good - good // 2, prefix="good-z"))
    return built


def root_that_is_a_file(directory: str) -> str:
    """A path to pass as a scan root that is a regular file."""
    path = os.path.join(directory, "root-is-a-file")
    with open(path, "w") as f:
        f.write(json.dumps({"manifests": []}))
    return path


def unreadable_catalogue(root: str) -> list[Built]:
    """Layouts only an unprivileged scanner finds unreadable (mode 000 file and directory)."""
    built = good_layouts(root, 2, prefix="readable")
    layout = Layout(os.path.join(root, "index_mode_000"))
    layout.write_index([_good_image(layout, "v1")])
    os.chmod(layout.index_path, 0)
    built.append(Built("index_mode_000", _real(layout.path), "error", "layout_unreadable"))
    hidden = Layout(os.path.join(root, "dir_mode_000"))
    hidden.write_index([_good_image(hidden, "v1")])
    os.chmod(hidden.path, 0)
    built.append(Built("dir_mode_000", _real(hidden.path), "absent", scan_message="Permission denied"))
    return built


RAW_CONTROL = frozenset([*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]) - {0x0A, 0x09}


def is_invisible(ch: str) -> bool:
    """A format character (Unicode Cf: bidi controls, zero-width ones, the BOM, soft hyphen, tags) or a
    line/paragraph separator: shown raw, it hides or reorders what a terminal shows."""
    return unicodedata.category(ch) in ("Cf", "Zl", "Zp") or 0xE0000 <= ord(ch) <= 0xE007F


def control_characters(output: bytes) -> list[str]:
    """The raw control and invisible characters in *output* (UTF-8; undecodable bytes count), with context."""
    text = output.decode("utf-8", errors="surrogateescape")
    found = []
    for i, ch in enumerate(text):
        code = ord(ch)
        # raw C1 bytes outside UTF-8 decode to U+DC80-U+DC9F
        if code in RAW_CONTROL or 0xDC80 <= code <= 0xDC9F or (code > 0x7F and is_invisible(ch)):
            found.append(repr(text[max(0, i - 30) : i + 10]))
    return found
