"""Batch lookups: ``resolve`` and ``find`` with several targets or ``-`` (stdin), one answer each, in
order, the exit code the highest of the targets' (docs/semantics.md, Batches)."""

from __future__ import annotations

import io
import json
import os
import selectors
import subprocess
import sys
import time
from typing import Any, NamedTuple

import pytest
from cli_run import ANSWER_KEYS, ocidx
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named

Capsys = pytest.CaptureFixture[str]
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Setup(NamedTuple):
    db: str
    app: str
    base: str
    app_index: dict[str, object]
    base_image: dict[str, object]


@pytest.fixture
def layouts(tmp_path: str, capsys: Capsys) -> Setup:
    """Two layouts below a scanned root: ``app`` (v1, an index for two platforms; 3.16 held by two
    different images: ambiguous) and ``base`` (v1), and the database."""
    root = os.path.join(tmp_path, "root")
    app = Layout(os.path.join(root, "app"))
    index = app.index([app.manifest(platform=LINUX_AMD64), app.manifest(platform=LINUX_ARM64)])
    alpine, busybox = app.manifest(label="alpine"), app.manifest(label="busybox")
    app.write_index([named(index, ref="v1"), named(alpine, ref="alpine:3.16"), named(busybox, ref="busybox:3.16")])
    base = Layout(os.path.join(root, "base"))
    base_image = base.manifest(label="base")
    base.write_index([named(base_image, ref="v1")])
    db = os.path.join(tmp_path, "index.db")
    assert ocidx(capsys, "scan", "--db", db, "--no-progress", root)[0] == 0
    return Setup(db, app.path, base.path, index, base_image)


def _lines(out: str) -> list[dict[str, Any]]:
    """JSON Lines: one compact object per line."""
    return [json.loads(line) for line in out.splitlines()]


def test_resolve_answers_each_target_in_order_and_one_failure_never_stops_the_others(
    layouts: Setup, capsys: Capsys, tmp_path: str
) -> None:
    db, app, base = layouts.db, layouts.app, layouts.base
    targets = [
        f"oci-layout://{app}:v1",
        f"oci-layout://{app}:nosuch",
        f"oci-layout://{tmp_path}/not-there:v1",
        f"oci-layout://{app}:3.16",
        "Bad:Ref",
        f"oci-layout://{base}:v1",
    ]
    code, out, err = ocidx(capsys, "resolve", "--db", str(db), "--json", *targets)
    lines = _lines(out)
    assert [line["target"] for line in lines] == targets
    assert [line.get("error") for line in lines] == [
        None,
        "not_found",
        "layout_not_found",
        "ambiguous",
        "usage",
        None,
    ]
    assert code == 3  # the highest: ambiguous (3) above bad usage (2) and not found (1)
    single = json.loads(ocidx(capsys, "resolve", "--db", str(db), "--json", targets[0])[1])
    assert lines[0] == {"target": targets[0], **single}  # the object a single lookup prints, plus target
    assert list(lines[5])[1:] == ANSWER_KEYS
    assert lines[5]["digest"] == layouts.base_image["digest"]
    assert len(lines[3]["candidates"]) == 2
    assert all("\n" not in line for line in out.splitlines())  # one object per line, not indented
    assert f"{targets[1]}: " in err and "Bad:Ref" in err


@pytest.mark.parametrize(
    ("tail", "expected"),
    [(["v1"], 0), (["v1", "nosuch"], 1), (["nosuch", "v1"], 1), (["v1", "3.16", "nosuch"], 3)],
)
def test_the_exit_code_is_the_highest_of_the_targets(
    layouts: Setup, capsys: Capsys, monkeypatch: pytest.MonkeyPatch, tail: list[str], expected: int
) -> None:
    targets = [f"oci-layout://{layouts.app}:{tag}" for tag in tail]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{t}\n" for t in targets)))
    code, out, _ = ocidx(capsys, "resolve", "--db", layouts.db, "--json", "-")
    assert code == expected
    assert len(out.splitlines()) == len(targets)


def test_stdin_targets_mix_with_arguments_and_blank_lines_are_skipped(
    layouts: Setup, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, base = layouts.app, layouts.base
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"oci-layout://{base}:v1\n\noci-layout://{app}:v1\r\n"))
    code, out, _ = ocidx(capsys, "resolve", "--db", layouts.db, f"oci-layout://{app}:v1", "-")
    assert code == 0
    index, image = layouts.app_index, layouts.base_image
    assert [line.split("\t") for line in out.splitlines()] == [
        [f"oci-layout://{app}:v1", index["digest"]],
        [f"oci-layout://{base}:v1", image["digest"]],
        [f"oci-layout://{app}:v1", index["digest"]],
    ]


def test_a_batch_of_refs_in_one_layout_with_a_platform_and_a_context(
    layouts: Setup, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = layouts.app
    monkeypatch.setattr(sys, "stdin", io.StringIO(":v1\nalpine:3.16\n"))
    code, out, err = ocidx(capsys, "resolve", "--db", layouts.db, "--layout", app, "--platform", "linux/arm64", "-")
    # alpine:3.16 is a single manifest whose config says linux/amd64: that target fails (exit 1, as
    # containerd's matcher), the other is answered, and the batch exits with the worst code.
    assert code == 1, err
    assert "alpine:3.16: " in err and "not linux/arm64" in err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [row[0] for row in rows] == [":v1"]
    index = layouts.app_index
    assert rows[0][1] != index["digest"]  # the arm64 child, not the index
    code, out, _ = ocidx(
        capsys, "resolve", "--db", layouts.db, "--layout", app, "--format", "context", ":v1", "busybox:3.16"
    )
    assert code == 0
    assert [line.split("\t")[1].split("@")[0] for line in out.splitlines()] == [f"oci-layout://{app}"] * 2


def test_a_bad_platform_is_one_usage_error_before_any_target(layouts: Setup, capsys: Capsys) -> None:
    app = layouts.app
    code, out, _err = ocidx(
        capsys, "resolve", "--db", layouts.db, "--json", "--platform", "linux/", f"oci-layout://{app}:v1", "x"
    )
    assert code == 2
    assert json.loads(out)["error"] == "usage"  # one document, not one line per target


def test_find_answers_each_ref_with_its_matches(
    layouts: Setup, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(":v1\n:nosuch\nBad:Ref\nalpine:3.16\n"))
    code, out, _err = ocidx(capsys, "find", "--db", layouts.db, "--json", "-")
    lines = _lines(out)
    assert [line["target"] for line in lines] == [":v1", ":nosuch", "Bad:Ref", "alpine:3.16"]
    assert [len(line["matches"]) if "matches" in line else line["error"] for line in lines] == [
        2,
        0,
        "name_contains_uppercase",
        1,
    ]
    assert set(lines[2]) == {"target", "error", "message"}
    assert code == 2
    assert [m["layout"] for m in lines[0]["matches"]] == [layouts.app, layouts.base]
    code, out, _ = ocidx(capsys, "find", "--db", layouts.db, ":v1", "busybox:3.16")
    assert code == 0
    assert [line.split("\t")[:2] for line in out.splitlines()] == [
        [":v1", layouts.app],
        [":v1", layouts.base],
        ["busybox:3.16", layouts.app],
    ]


def test_find_in_a_batch_sees_a_layout_that_appeared_after_the_scan(
    layouts: Setup, capsys: Capsys, tmp_path: str
) -> None:
    late = Layout(os.path.join(tmp_path, "root", "late"))
    image = late.manifest(label="late")
    late.write_index([named(image, ref="v1"), named(image, ref="v9")])
    code, out, err = ocidx(capsys, "find", "--db", layouts.db, "--json", ":v9", ":v1")
    assert code == 0, err
    v9, v1 = _lines(out)
    assert [m["layout"] for m in v9["matches"]] == [late.path]
    assert late.path in [m["layout"] for m in v1["matches"]]


def test_a_script_gets_each_answer_as_it_feeds_the_target(layouts: Setup) -> None:
    """stdin is read a line at a time and each answer flushed: a co-process can ask, read, ask again."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer", "resolve", "--db", layouts.db, "--json", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": CHECKOUT},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            for layout in (layouts.app, layouts.base):
                proc.stdin.write(f"oci-layout://{layout}:v1\n")
                proc.stdin.flush()
                deadline = time.monotonic() + 30
                assert selector.select(timeout=max(0.0, deadline - time.monotonic())), "no answer while stdin is open"
                line = json.loads(proc.stdout.readline())
                assert (line["target"], line["layout"]) == (f"oci-layout://{layout}:v1", layout)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()
