"""The command line as scripts and terminals see it (docs/semantics.md exit codes, docs/json.md output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from cli_run import ANSWER_KEYS, ocidx
from layouts import LINUX_AMD64, Layout, named

REF_KEYS = ["input", "name", "domain", "path", "tag", "digest", "canonical", "familiar", "error"]
# Raw control characters other than newline and tab (which separate lines and fields).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")
ESC = "\x1b[31mRED\x1b[0m"
HEX = "a" * 64


def ocidx_process(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The real ``ocidx`` process, real stdin and streams."""
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- ocidx ref --------------------------------------------------------------------------------------


def test_ref_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ocidx(capsys, "ref", "alpine", "localhost:5000/team/app:v2")
    assert (code, err) == (0, "")
    first, second = out.splitlines()
    assert first.split("\t") == ["alpine", "canonical=docker.io/library/alpine", "familiar=alpine"]
    assert second.split("\t") == [
        "localhost:5000/team/app:v2",
        "canonical=localhost:5000/team/app:v2",
        "familiar=localhost:5000/team/app:v2",
        "tag=v2",
    ]


def test_ref_json_keys_and_values(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ocidx(capsys, "ref", "--json", "index.docker.io/library/alpine:3.16", f"ubuntu@sha256:{HEX}")
    assert code == 0
    results = json.loads(out)
    assert [list(r) for r in results] == [REF_KEYS, REF_KEYS]
    assert results[0] == {
        "input": "index.docker.io/library/alpine:3.16",
        "name": "docker.io/library/alpine",
        "domain": "docker.io",
        "path": "library/alpine",
        "tag": "3.16",
        "digest": None,
        "canonical": "docker.io/library/alpine:3.16",
        "familiar": "alpine:3.16",
        "error": None,
    }
    assert results[1]["digest"] == f"sha256:{HEX}"
    assert results[1]["canonical"] == f"docker.io/library/ubuntu@sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("Alpine", "name_contains_uppercase"),  # the normalizing parse's ad-hoc error, named as docs/json.md does
        ("a" * 256, "name_too_long"),
        (HEX, "hex_name"),  # normalized as docker does; lookups read it as a digest instead
        ("alpine@sha256:abc", "invalid_format"),
        ("alpine@sha256:" + "a" * 32, "digest_invalid_length"),
        ("alpine@md5:" + "0" * 32, "digest_unsupported"),
        ("", "invalid_format"),
    ],
)
def test_ref_error_categories(capsys: pytest.CaptureFixture[str], text: str, category: str | None) -> None:
    code, out, _ = ocidx(capsys, "ref", "--json", text)
    results = json.loads(out)
    assert results[0]["error"] == category
    assert code == (0 if category is None else 2)


def test_ref_exit_0_only_when_every_input_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ocidx(capsys, "ref", "alpine", "Not/Valid")
    assert code == 2
    assert "alpine" in out
    assert "Not/Valid" in err
    assert "Not/Valid" not in out


def test_ref_from_stdin() -> None:
    done = ocidx_process("ref", "--json", "-", stdin="alpine\n\nquay.io/x/y:1\r\nBAD\n")
    assert done.returncode == 2
    results = json.loads(done.stdout)
    assert [(r["input"], r["name"], r["error"]) for r in results] == [
        ("alpine", "docker.io/library/alpine", None),
        ("quay.io/x/y:1", "quay.io/x/y", None),
        ("BAD", None, "name_contains_uppercase"),
    ]
    done = ocidx_process("ref", "-", stdin="busybox:1.36\n")
    assert done.returncode == 0
    assert done.stdout.startswith("busybox:1.36\tcanonical=docker.io/library/busybox:1.36\t")


# -- JSON and exit codes ------------------------------------------------------------------------------


@pytest.fixture
def indexed(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, Layout]:
    lay = Layout(os.path.join(tmp_path, "root", "lay"))
    lay.write_index(
        [
            named(lay.manifest(label="one"), ref="latest"),
            named(lay.manifest(label="two"), ref="docker.io/library/alpine:latest"),
            named(lay.manifest(label="three"), ref="v1"),
        ]
    )
    db = os.path.join(tmp_path, "index.db")
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root"))[0] == 0
    return db, lay


@pytest.mark.parametrize(
    ("args", "code", "category"),
    [
        (["resolve", "oci-layout://root/lay:nosuch"], 1, "not_found"),
        (["resolve", "oci-layout://root/lay:"], 2, "tag_invalid_format"),
        (["resolve", "oci-layout://root/lay@sha256:1"], 2, "digest_invalid_length"),
        (["resolve", "--layout", "root/lay", "UPPER"], 2, "name_contains_uppercase"),
        (["resolve", "root/lay"], 2, "usage"),
        (["resolve", "oci-layout://root/lay"], 3, "ambiguous"),
        (["find", ":nosuch"], 1, None),
        (["resolve", "--no-such-option", "x"], 2, "usage"),
    ],
)
def test_errors_with_json_are_one_document_on_stdout(
    capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout], args: list[str], code: int, category: str | None
) -> None:
    db, _ = indexed
    got, out, err = ocidx(capsys, *args, "--db", db, "--json")
    assert got == code
    document = json.loads(out)
    if category is None:
        assert document == []
    else:
        assert isinstance(document, dict)
        assert document["error"] == category
        assert isinstance(document["message"], str)
        assert document["message"]
        assert document["message"] in err  # the same message for people, on stderr


def test_ambiguity_json_lists_candidates(capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout]) -> None:
    db, _ = indexed
    code, out, _ = ocidx(capsys, "resolve", "--db", db, "--json", "oci-layout://root/lay:latest")
    assert code == 3
    document = json.loads(out)
    assert list(document) == ["error", "message", "candidates"]
    assert len(document["candidates"]) == 2
    assert all(list(c) == ["digest", "names", "pick"] for c in document["candidates"])


def test_success_json_and_warnings_are_separated(
    capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout]
) -> None:
    db, lay = indexed
    with open(lay.index_path) as f:
        v1 = next(m["digest"] for m in json.load(f)["manifests"] if m["annotations"].get(REF) == "v1")
    one = _digest_of(lay, "latest")
    code, out, err = ocidx(capsys, "resolve", "--db", db, "--json", f"oci-layout://root/lay:v1@{one}")
    assert code == 0
    document = json.loads(out)  # stdout is exactly one JSON document
    assert list(document) == ANSWER_KEYS
    assert document["digest"] == one != v1
    assert document["warnings"] and document["warnings"][0] in err
    assert err.startswith("ocidx: warning: ")


REF = "org.opencontainers.image.ref.name"


def _digest_of(lay: Layout, ref: str) -> str:
    with open(lay.index_path) as f:
        return str(next(m["digest"] for m in json.load(f)["manifests"] if m["annotations"].get(REF) == ref))


def test_plain_output_is_the_digest_alone(capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    code, out, err = ocidx(capsys, "resolve", "--db", db, "oci-layout://root/lay:v1")
    assert (code, out, err) == (0, _digest_of(lay, "v1") + "\n", "")


def test_ls_status_and_find_json_shapes(capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    code, out, _ = ocidx(capsys, "ls", "--db", db, "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["layout"] == os.path.realpath(lay.path)
    assert (row["state"], row["entries"]) == ("ok", 3)
    code, out, _ = ocidx(capsys, "ls", "--db", db, "--json", "root/lay")
    assert code == 0
    (detail,) = json.loads(out)
    assert [[(n["name"], n["tag"], n["how"]) for n in e["names"]] for e in detail["entries"]] == [
        [("", "latest", "tag-only")],
        [("docker.io/library/alpine", "latest", "full")],
        [("", "v1", "tag-only")],
    ]
    code, out, _ = ocidx(capsys, "status", "--db", db, "--json")
    assert code == 0
    status = json.loads(out)
    assert (status["layouts"], status["entries"], status["layouts_with_errors"]) == (1, 3, 0)
    code, out, _ = ocidx(capsys, "find", "--db", db, "--json", ":latest")
    assert code == 0
    assert [list(a) for a in json.loads(out)] == [ANSWER_KEYS, ANSWER_KEYS]


def test_usage_error_without_json_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ocidx(capsys, "resolve")
    assert (code, out) == (2, "")
    assert "ocidx" in err


def test_real_process_streams_and_exit_code(tmp_path: str, indexed: tuple[str, Layout]) -> None:
    db, lay = indexed
    done = ocidx_process("resolve", "--db", db, "--json", f"oci-layout://{lay.path}:nosuch")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"] == "not_found"
    assert done.stderr.startswith("ocidx: ")
    done = ocidx_process("resolve", "--db", db, f"oci-layout://{lay.path}:v1")
    assert (done.returncode, done.stdout, done.stderr) == (0, _digest_of(lay, "v1") + "\n", "")


# -- control characters from layouts never reach a terminal ---------------------------------------------


@pytest.fixture
def hostile(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """A layout whose directory name, annotations, names and platform carry escape sequences."""
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, f"evil{ESC}dir"))
    bad_platform = {**LINUX_AMD64, "os": f"linux{ESC}"}
    image = lay.manifest(label="evil")
    lay.write_index(
        [
            named(
                {**image, "platform": bad_platform},
                ref=f"latest,{ESC},alpine:{ESC}",
                containerd=f"docker.io/{ESC}",
                **{"org.opencontainers.image.description": f"hello {ESC}\x07\x9b31m"},
            ),
            named(lay.manifest(label="plain"), ref="v1"),
        ]
    )
    db = os.path.join(tmp_path, "index.db")
    code, out, err = ocidx(capsys, "scan", "--db", db, "--no-progress", root)
    assert code == 0
    assert not CONTROL.search(out + err), (out + err).encode()
    return db, os.path.realpath(lay.path)


@pytest.mark.parametrize(
    "args",
    [
        ["resolve", "oci-layout://{path}"],
        ["resolve", "oci-layout://{path}:nosuch"],
        ["resolve", "--platform", "linux/arm64", "oci-layout://{path}"],
        ["resolve", "--platform", "linux/arm64", "oci-layout://{path}:v1"],
        ["resolve", "--strict", "oci-layout://{path}:v1@sha256:" + HEX],
        ["resolve", "oci-layout://{path}:v1@{digest}"],
        ["resolve", "--format", "context", "oci-layout://{path}"],
        ["resolve", "--layout", "{path}", "nosuch"],
        ["find", ":latest"],
        ["find", ":nosuch"],
        ["ls"],
        ["ls", "{path}"],
        ["status"],
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_no_raw_control_characters_in_any_output(
    capsys: pytest.CaptureFixture[str], hostile: tuple[str, str], args: list[str], as_json: bool
) -> None:
    db, path = hostile
    with open(os.path.join(path, "index.json")) as f:
        first = json.load(f)["manifests"][0]["digest"]
    argv = [a.format(path=path, digest=first) for a in args]
    _code, out, err = ocidx(capsys, *argv, "--db", db, *(["--json"] if as_json else []))
    assert not CONTROL.search(out), out.encode()
    assert not CONTROL.search(err), err.encode()
    assert out or err
    if as_json and out:
        json.loads(out)  # escaped, still one valid document


def test_hostile_values_survive_in_json(capsys: pytest.CaptureFixture[str], hostile: tuple[str, str]) -> None:
    db, path = hostile
    code, out, _ = ocidx(capsys, "resolve", "--db", db, "--json", f"oci-layout://{path}")
    assert code == 0
    answer = json.loads(out)
    # JSON escapes them (\u001b) without losing them: a script gets the annotation as written
    assert answer["annotations"]["org.opencontainers.image.description"] == f"hello {ESC}\x07\x9b31m"
    assert answer["layout"] == path
    assert answer["platform"]["os"] == f"linux{ESC}"


def test_ls_of_a_directory_holding_layouts(
    tmp_path: str, capsys: pytest.CaptureFixture[str], indexed: tuple[str, Layout]
) -> None:
    db, lay = indexed
    other = Layout(os.path.join(tmp_path, "elsewhere", "other"))
    other.write_index([])
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", os.path.join(tmp_path, "elsewhere"))[0] == 0
    code, out, _ = ocidx(capsys, "ls", "--db", db, "--json", "root")
    assert code == 0
    assert [row["layout"] for row in json.loads(out)] == [os.path.realpath(lay.path)]
    code, out, _ = ocidx(capsys, "ls", "--db", db, "root")
    assert code == 0
    assert out.split("\t")[:3] == [os.path.realpath(lay.path), "ok", "3 entries\n"]
    code, out, err = ocidx(capsys, "ls", "--db", db, "nowhere")
    assert (code, out) == (1, "")
    assert "nowhere" in err
