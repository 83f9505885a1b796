"""docs/json.md is the contract: its key tables and category table match what the code prints and raises."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time

import pytest
from cli_run import ocidx
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named, with_platform

import indexer
from indexer import errors, layout, query, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_MD = os.path.join(ROOT, "docs", "json.md")
# Objects whose keys are data (annotation names), not part of the contract.
OPEN_OBJECTS = {"annotations"}

Capsys = pytest.CaptureFixture[str]


def _sections() -> dict[str, list[list[str]]]:
    """The table rows (cells, backticks kept) of each ``##``/``###`` section of docs/json.md, by heading."""
    with open(JSON_MD, encoding="utf-8") as f:
        text = f.read()
    sections: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            sections[heading] = []
        elif line.startswith("|") and not line.startswith("| ---"):
            sections[heading].append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return sections


def _documented_keys(heading_start: str) -> set[str]:
    (rows,) = [rows for heading, rows in _sections().items() if heading.startswith(heading_start)]
    assert rows[0][:2] == ["key", "value"], heading_start
    keys = {row[0].strip("`") for row in rows[1:]}
    assert keys, heading_start
    return keys


def _documented_categories() -> dict[str, tuple[str, int]]:
    (rows,) = [rows for rows in _sections().values() if rows and rows[0][:3] == ["category", "kind", "exit"]]
    return {row[0].strip("`"): (row[1], int(row[2])) for row in rows[1:]}


def _key_paths(document: object, prefix: str = "") -> set[str]:
    """Every key path of *document*: ``a``, ``a.b``, ``a[].b``."""
    found: set[str] = set()
    if isinstance(document, list):
        for item in document:
            found |= _key_paths(item, prefix + "[]")
    elif isinstance(document, dict):
        for key, value in document.items():
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            if key not in OPEN_OBJECTS:
                found |= _key_paths(value, path)
    return found


def _paths(document: object) -> set[str]:
    """Key paths of a list of objects (or of one object), without the leading ``[].``."""
    return {p.removeprefix("[].") for p in _key_paths(document)}


# -- the categories ----------------------------------------------------------------------------------------


def _code_categories() -> dict[str, int]:
    """Every category the code can put in an error, with its exit code."""
    found: dict[str, int] = {}
    stack: list[type[errors.OcidxError]] = [errors.OcidxError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls is not errors.OcidxError:
            found.setdefault(cls.category, cls.exit_code)
    # Categories given as literals when a InvalidReference is raised (reference.py and the lookups).
    literal = re.compile(
        r'category\s*=\s*"([a-z_]+)"|_error\([^()]*(?:\([^()]*\)[^()]*)*,\s*"([a-z_]+)"\)|_MSG_\w+, "([a-z_]+)"'
    )
    for module in (reference, query):
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as f:
            for match in literal.finditer(f.read()):
                name = next(group for group in match.groups() if group)
                found.setdefault(name, errors.InvalidReference.exit_code)
    return found


def test_every_category_the_code_raises_is_documented_and_no_other() -> None:
    # Importing layout registers its own subclasses (BlobMissing) before the walk.
    assert layout.BlobMissing.category == "blob_missing" and indexer.__version__
    code = _code_categories()
    documented = _documented_categories()
    assert sorted(code) == sorted(documented)
    assert {name: exit_code for name, (_kind, exit_code) in documented.items()} == code


def test_ref_reports_one_category_for_upper_case_as_the_lookups_do(tmp_path: str, capsys: Capsys) -> None:
    _, out, _ = ocidx(capsys, "ref", "--json", "Alpine", "docker.io/Library/alpine", "Foo_Bar/baz")
    assert {item["error"] for item in json.loads(out)} == {"name_contains_uppercase"}
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([])
    _, out, _ = ocidx(capsys, "resolve", "--json", "--layout", lay.path, "Alpine")
    assert json.loads(out)["error"] == "name_contains_uppercase"
    kinds = _documented_categories()
    for text in ("Alpine", "a" * 300, "alpine@sha256:1", "alpine@md5:" + "0" * 32, "0" * 64, "al pine"):
        (item,) = json.loads(ocidx(capsys, "ref", "--json", text)[1])
        assert kinds[item["error"]][0] == "reference", item


# -- the keys ----------------------------------------------------------------------------------------------


@pytest.fixture
def indexed(tmp_path: str, capsys: Capsys) -> tuple[str, Layout]:
    lay = Layout(os.path.join(tmp_path, "root", "lay"))
    index = lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)])
    lay.write_index(
        [
            named(index, ref="v1", containerd="docker.io/library/app:v1"),
            named(with_platform(lay.manifest(label="a"), LINUX_AMD64), ref="alpine:3.16"),
            named(lay.manifest(label="b"), ref="busybox:3.16"),
        ]
    )
    db = os.path.join(tmp_path, "index.db")
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root"))[0] == 0
    return db, lay


def _json(capsys: Capsys, *args: str) -> object:
    return json.loads(ocidx(capsys, *args, "--json")[1])


def test_ref_keys(capsys: Capsys) -> None:
    assert _paths(_json(capsys, "ref", "alpine:3.16")) == _documented_keys("`ocidx ref --json")


def test_resolve_and_find_keys(capsys: Capsys, indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    answer = _json(capsys, "resolve", "--db", db, "--platform", "linux/arm64", f"oci-layout://{lay.path}:v1")
    assert _paths(answer) == _documented_keys("`ocidx resolve")
    found = _json(capsys, "find", "--db", db, ":v1")
    assert isinstance(found, list) and found
    assert _paths(found) - {"platform.os", "platform.architecture", "platform.variant"} <= _documented_keys(
        "`ocidx resolve"
    )


def test_ls_keys(capsys: Capsys, indexed: tuple[str, Layout], tmp_path: str) -> None:
    db, lay = indexed
    assert _paths(_json(capsys, "ls", "--db", db)) == _documented_keys("`ocidx ls --json`")
    detail = _documented_keys("`ocidx ls --json PATH`")
    assert _paths(_json(capsys, "ls", "--db", db, lay.path)) == detail
    elsewhere = Layout(os.path.join(tmp_path, "elsewhere"))  # not indexed: read through, the same keys
    index = elsewhere.index([elsewhere.manifest(platform=LINUX_AMD64)])
    arm = with_platform(elsewhere.manifest(platform=LINUX_ARM64), LINUX_ARM64)
    elsewhere.write_index([named(index, ref="v1"), named(arm, ref="v2")])
    assert _paths(_json(capsys, "ls", "--db", db, elsewhere.path)) == detail


def test_status_keys(capsys: Capsys, indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    with sqlite3.connect(db) as conn:  # the row a daemon leaves behind when it stops
        now = time.time_ns()
        conn.execute(
            "UPDATE daemon SET pid = 1, started_ns = ?, heartbeat_ns = ?, stopped_ns = ?, watch_mode = 'inotify'",
            (now, now, now),
        )
        # ... and the row of a daemon that published to a fleet (docs/fleet.md)
        conn.execute(
            "INSERT INTO fleet_publisher (id, host, state, since_ns, watermark, published_ns) "
            "VALUES (1, 'build-17', 'connected', ?, 0, ?)",
            (now, now),
        )
    assert _paths(_json(capsys, "status", "--db", db)) == _documented_keys("`ocidx status")


def test_scan_keys(capsys: Capsys, indexed: tuple[str, Layout], tmp_path: str) -> None:
    db, _ = indexed
    summary = _json(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root"))
    assert _paths(summary) == _documented_keys("`ocidx scan")


def test_referrers_du_and_gc_keys(capsys: Capsys, indexed: tuple[str, Layout], tmp_path: str) -> None:
    db, lay = indexed
    image = lay.manifest(platform=LINUX_AMD64, label="signed")
    empty = lay.blob(b"{}", "application/vnd.oci.empty.v1+json")
    sbom = lay.blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/spdx+json",
                "config": empty,
                "layers": [lay.blob(b"sbom", "application/spdx+json")],
                "subject": image,
                "annotations": {"a": "b"},
            }
        ).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    with open(lay.index_path) as f:
        manifests = json.load(f)["manifests"]
    lay.write_index([*manifests, named(image, ref="signed"), sbom])
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root"))[0] == 0
    found = _json(capsys, "referrers", "--db", db, f"oci-layout://{lay.path}:signed")
    assert isinstance(found, list) and found
    assert _paths(found) == _documented_keys("`ocidx referrers --json")
    lay.blob(b"nothing references this", "application/octet-stream")
    assert _paths(_json(capsys, "du", "--db", db)) == _documented_keys("`ocidx du")
    old = time.time() - 7200
    for name in os.listdir(os.path.join(lay.path, "blobs", "sha256")):
        os.utime(os.path.join(lay.path, "blobs", "sha256", name), (old, old))
    os.mkfifo(os.path.join(lay.path, "blobs", "sha256", "0" * 64))
    assert _paths(_json(capsys, "gc", lay.path)) == _documented_keys("`ocidx gc")


def test_error_keys(capsys: Capsys, indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    ambiguous = _json(capsys, "resolve", "--db", db, f"oci-layout://{lay.path}:3.16")
    platform = _json(capsys, "resolve", "--db", db, "--platform", "linux/s390x", f"oci-layout://{lay.path}:v1")
    assert isinstance(ambiguous, dict) and isinstance(platform, dict)
    assert (ambiguous["error"], platform["error"]) == ("ambiguous", "platform_not_found")
    documented = _documented_keys("Errors")
    # The names of a candidate and the platforms are shaped as in `resolve` (documented there).
    found = {
        p for p in _paths(ambiguous) | _paths(platform) if not p.startswith(("candidates[].names[].", "platforms[]."))
    }
    assert found == documented


def test_nothing_cites_a_contract_outside_the_repository() -> None:
    """docs/semantics.md and docs/json.md are the contract: no file cites one that is not shipped."""
    outside = re.compile("SP" + r"EC(\.md| §)|\.\./sha" + "red")  # spelled apart: this file is scanned too
    cited: list[str] = []
    for top in ("indexer", "tests", "docs", "benchmarks", "migrations", "scripts"):
        for directory, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".md", ".sql", ".toml", ".service", ".sh")):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8", errors="replace") as f:
                        cited.extend(f"{path}:{n}" for n, line in enumerate(f, 1) if outside.search(line))
    for name in ("README.md", "config.example.toml", "pyproject.toml"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            cited.extend(f"{name}:{n}" for n, line in enumerate(f, 1) if outside.search(line))
    assert cited == []


def test_batch_keys(capsys: Capsys, indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    batch = _documented_keys("Batches")
    _code, out, _ = ocidx(capsys, "resolve", "--db", db, "--json", f"oci-layout://{lay.path}:v1", "oci-layout://x")
    found, failed = (json.loads(line) for line in out.splitlines())
    assert _paths(found) - {"target"} <= _documented_keys("`ocidx resolve") and "digest" in found
    assert set(failed) == {"target", "error", "message"} <= batch
    _code, out, _ = ocidx(capsys, "find", "--db", db, "--json", ":v1", "Bad")
    found, failed = (json.loads(line) for line in out.splitlines())
    assert set(found) | set(failed) == batch


def test_lint_keys(capsys: Capsys, indexed: tuple[str, Layout], tmp_path: str) -> None:
    _db, lay = indexed
    _code, out, _ = ocidx(capsys, "lint", "--json", lay.path, os.path.join(tmp_path, "nothing"))
    linted, failed = json.loads(out)
    assert linted["findings"], "the fixture's layout has findings (familiar names in ref.name)"
    readers = re.compile(r"\.readers\.(buildkit|containerd|skopeo|regclient|zot|ocidx)")
    found = {readers.sub(".readers.READER", p) for p in _paths(linted) | _paths(failed)}
    assert found == _documented_keys("`ocidx lint")
