"""``ocidx scan``: discovery below roots, skipping the unchanged, broken and vanished layouts, the summary."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import sqlite3
import subprocess
import sys

import anyio
import pytest
from harness import scanner_on
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named

from indexer.cli import main
from indexer.config import Root
from indexer.scan.discovery import discover


def make(path: str, tag: str = "latest") -> Layout:
    lay = Layout(path)
    lay.write_index([named(lay.manifest(label=path), ref=tag)])
    return lay


def found(root: str, **options: object) -> list[str]:
    return sorted(discover(Root(root, **options)))  # type: ignore[arg-type]


class Scan:
    def __init__(self, tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = os.path.join(tmp_path, "index.db")
        self.root = os.path.join(tmp_path, "root")
        self.capsys = capsys
        os.makedirs(self.root, exist_ok=True)

    def run(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([args[0], "--db", self.db, *args[1:]])
        out, err = self.capsys.readouterr()
        return code, out, err

    def scan(self, *extra: str) -> tuple[dict[str, object], str]:
        code, out, err = self.run("scan", "--no-progress", "--json", *extra, self.root)
        assert code == 0, err
        summary = json.loads(out)
        assert isinstance(summary, dict)
        return summary, err

    def layouts(self) -> dict[str, dict[str, object]]:
        code, out, _ = self.run("ls", "--json")
        assert code == 0
        return {row["layout"]: row for row in json.loads(out)}


@pytest.fixture
def scan(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> Scan:
    return Scan(str(tmp_path), capsys)


# -- discovery --------------------------------------------------------------------------------------


def test_discovers_layouts_at_any_depth_up_to_the_limit(tmp_path: str) -> None:
    root = os.path.join(tmp_path, "root")
    shallow = make(os.path.join(root, "a"))
    deep = make(os.path.join(root, "x", "y", "z", "deep"))
    at_root = make(root)
    assert found(root) == sorted(os.path.realpath(p) for p in (root, shallow.path, deep.path))
    assert found(root, max_depth=3) == sorted(os.path.realpath(p) for p in (root, shallow.path))
    assert found(root, max_depth=4) == sorted(os.path.realpath(p) for p in (root, shallow.path, deep.path))
    assert found(root, max_depth=0) == [os.path.realpath(at_root.path)]


def test_a_directory_with_only_oci_layout_or_only_index_json_is_a_layout(tmp_path: str) -> None:
    root = os.path.join(tmp_path, "root")
    Layout(os.path.join(root, "marker-only"))  # oci-layout, no index.json yet
    no_marker = Layout(os.path.join(root, "index-only"), oci_layout=False)
    no_marker.write_index([])
    os.makedirs(os.path.join(root, "neither", "blobs"))
    assert found(root) == [os.path.join(root, "index-only"), os.path.join(root, "marker-only")]


def test_never_descends_into_blobs(tmp_path: str) -> None:
    root = os.path.join(tmp_path, "root")
    lay = make(os.path.join(root, "lay"))
    make(os.path.join(lay.path, "blobs", "sha256", "decoy"))  # looks like a layout, is inside blobs/
    assert found(root) == [lay.path]


def test_symlinks_out_of_the_root_are_not_followed_unless_configured(tmp_path: str) -> None:
    root = os.path.join(tmp_path, "root")
    inside = make(os.path.join(root, "inside"))
    outside = make(os.path.join(tmp_path, "elsewhere", "outside"))
    os.symlink(os.path.dirname(outside.path), os.path.join(root, "link-out"))
    assert found(root) == [inside.path]
    assert found(root, follow_symlinks=True) == sorted([inside.path, outside.path])


def test_symlinks_inside_the_root_are_followed_once(tmp_path: str) -> None:
    root = os.path.join(tmp_path, "root")
    real = make(os.path.join(root, "real", "lay"))
    os.symlink(os.path.join(root, "real"), os.path.join(root, "alias"))
    os.symlink(real.path, os.path.join(root, "direct-alias"))
    os.symlink(root, os.path.join(root, "real", "loop"))  # a cycle terminates
    assert found(root) == [real.path]


def test_scan_config_roots_depth_and_symlinks(scan: Scan, tmp_path: str) -> None:
    make(os.path.join(scan.root, "a"))
    make(os.path.join(scan.root, "1", "2", "3", "too-deep"))
    outside = make(os.path.join(tmp_path, "elsewhere", "outside"))
    os.symlink(os.path.dirname(outside.path), os.path.join(scan.root, "link-out"))
    config = os.path.join(tmp_path, "config.toml")
    with open(config, "w") as f:
        f.write('[[roots]]\npath = "root"\nmax_depth = 2\nfollow_symlinks = true\n')
    code, out, err = scan.run("scan", "--no-progress", "--json", "--config", config)
    assert code == 0, err
    assert json.loads(out)["layouts"] == 2
    assert sorted(scan.layouts()) == sorted([os.path.join(scan.root, "a"), outside.path])


def test_scan_without_roots_is_usage_error(scan: Scan) -> None:
    code, _, err = scan.run("scan", "--no-progress")
    assert code == 2
    assert "root" in err


# -- re-scans, broken and vanished layouts -----------------------------------------------------------


def test_unchanged_layouts_are_skipped_on_rescan(scan: Scan) -> None:
    a = make(os.path.join(scan.root, "a"))
    make(os.path.join(scan.root, "b"))
    first, _ = scan.scan()
    assert (first["layouts"], first["changed"], first["unchanged"]) == (2, 2, 0)
    again, _ = scan.scan()
    assert (again["layouts"], again["changed"], again["unchanged"]) == (2, 0, 2)
    a.write_index([named(a.manifest(label="new"), ref="latest")])
    third, _ = scan.scan()
    assert (third["changed"], third["unchanged"]) == (1, 1)
    full, _ = scan.scan("--full")
    assert full["changed"] == 2


def test_one_broken_layout_does_not_stop_the_rest(scan: Scan) -> None:
    good = [make(os.path.join(scan.root, name)) for name in ("a", "b", "d")]
    broken = Layout(os.path.join(scan.root, "c"))
    broken.write_index_bytes(b'{"schemaVersion": 2, "manifests": [')
    summary, err = scan.scan()
    assert (summary["layouts"], summary["changed"], summary["errors"]) == (4, 3, 1)
    assert os.path.join(scan.root, "c") in err
    rows = scan.layouts()
    assert rows[broken.path]["state"] == "error"
    assert rows[broken.path]["error"] == "index_invalid"
    assert "truncated" in str(rows[broken.path]["message"])
    for lay in good:
        assert rows[lay.path]["state"] == "ok"
        assert scan.run("resolve", f"oci-layout://{lay.path}")[0] == 0
    code, _, _ = scan.run("resolve", f"oci-layout://{broken.path}")
    assert code == 5


def test_a_vanished_layout_is_removed(scan: Scan) -> None:
    a = make(os.path.join(scan.root, "a"))
    b = make(os.path.join(scan.root, "b"))
    scan.scan()
    shutil.rmtree(b.path)
    summary, err = scan.scan()
    assert summary["removed"] == 1
    assert "1 removed" in err
    assert list(scan.layouts()) == [a.path]
    code, _, _ = scan.run("find", ":latest")
    assert code == 0
    code, found_, _ = scan.run("find", "--json", ":latest")
    assert [item["layout"] for item in json.loads(found_)] == [a.path]


def test_layouts_outside_the_scanned_roots_are_kept(scan: Scan, tmp_path: str) -> None:
    other_root = os.path.join(tmp_path, "other")
    other = make(os.path.join(other_root, "o"))
    scan.scan()
    code, _, err = scan.run("scan", "--no-progress", other_root)
    assert code == 0, err
    make(os.path.join(scan.root, "a"))
    scan.scan()
    assert sorted(scan.layouts()) == sorted([other.path, os.path.join(scan.root, "a")])


def test_a_layout_that_breaks_keeps_its_last_good_rows_flagged(scan: Scan) -> None:
    lay = make(os.path.join(scan.root, "a"), tag="v1")
    image = lay.manifest(label="second")
    lay.write_index([named(lay.manifest(label=lay.path), ref="v1"), named(image, ref="v2")])
    scan.scan()
    lay.write_index_bytes(b"\x00\x00garbage")
    summary, _ = scan.scan()
    assert summary["errors"] == 1
    row = scan.layouts()[lay.path]
    assert (row["state"], row["entries"], row["error"]) == ("error", 2, "index_invalid")
    assert row["last_good_ns"] is not None
    code, out, err = scan.run("resolve", "--json", f"oci-layout://{lay.path}:v2")
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["digest"], answer["freshness"]) == (image["digest"], "stale")
    # repaired: the error clears
    lay.write_index([named(image, ref="v2")])
    scan.scan()
    row = scan.layouts()[lay.path]
    assert (row["state"], row["entries"], row["error"]) == ("ok", 1, None)


def test_missing_index_json_is_an_error_not_a_removal(scan: Scan) -> None:
    lay = make(os.path.join(scan.root, "a"))
    scan.scan()
    os.remove(lay.index_path)  # oci-layout is still there: a writer between steps, or damage
    summary, _ = scan.scan()
    assert (summary["errors"], summary["removed"]) == (1, 0)
    assert scan.layouts()[lay.path]["state"] == "error"


def test_summary_line(scan: Scan) -> None:
    make(os.path.join(scan.root, "a"))
    Layout(os.path.join(scan.root, "broken")).write_index_bytes(b"[]")
    code, out, err = scan.run("scan", "--no-progress", scan.root)
    assert code == 0
    assert out == ""  # the summary is for people: stderr
    last = err.splitlines()[-1]
    assert re.fullmatch(
        r"ocidx: scanned 2 layouts in \d+\.\d\ds: 1 changed, 0 unchanged, 1 with errors, 0 removed", last
    ), last
    _, err = scan.scan()
    assert err.splitlines()[-1].endswith("0 changed, 1 unchanged, 1 with errors, 0 removed")


def test_summary_counts_a_broken_layout_that_the_rescan_skips(scan: Scan) -> None:
    make(os.path.join(scan.root, "a"))
    Layout(os.path.join(scan.root, "broken")).write_index_bytes(b"[]")
    scan.scan()
    # As if that scan had run 10 s after the files last changed (instead of sleeping): their
    # stored identities are then trusted and the re-scan reads neither file again.
    conn = sqlite3.connect(scan.db)
    conn.execute("UPDATE layouts SET read_ns = read_ns + 10000000000, blobs_listed_ns = blobs_listed_ns + 10000000000")
    conn.commit()
    conn.close()
    summary, err = scan.scan()
    assert (summary["changed"], summary["unchanged"], summary["errors"], summary["still_broken"]) == (0, 2, 0, 1)
    assert err.splitlines()[-1].endswith("0 changed, 2 unchanged, 1 with errors, 0 removed")


def test_missing_root_is_an_error_counted_and_exit_2(scan: Scan, tmp_path: str) -> None:
    absent = os.path.join(tmp_path, "absent")
    code, out, err = scan.run("scan", "--no-progress", "--json", absent)
    assert code == 2
    assert absent in err
    summary = json.loads(out)
    assert any(absent in message for message in summary["error_messages"])
    assert (summary["errors"], summary["bad_roots"]) == (1, [absent])


# -- the writer's own failures, and the daemon's single-layout path -------------------------------------


def _fat(root: str, count: int) -> None:
    for i in range(count):
        lay = Layout(os.path.join(root, f"fat-{i:03d}"))
        lay.write_index([named(lay.manifest(label=f"fat-{i}-{j}"), ref=f"t{j}", pad="x" * 3000) for j in range(4)])


def test_a_full_database_is_the_sqlite_error_not_an_exception_group(scan: Scan) -> None:
    _fat(scan.root, 40)

    def full_disk(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 20}")  # the disk fills up mid-scan

    with scanner_on(scan.db) as scanner, pytest.raises(sqlite3.OperationalError, match="full"):
        scanner.store.run_now(full_disk)
        anyio.run(
            scanner.full_pass, [Root(scan.root)]
        )  # the daemon retries (or rebuilds) on exactly this; run_scan makes it exit 4
    code, out, _ = scan.run("ls", "--json")
    assert code == 0
    rows = json.loads(out)
    assert all(row["state"] == "ok" for row in rows)  # whole batches or nothing: no half-written layout
    assert len(rows) < 40


def test_processing_a_layout_replaced_by_a_file_removes_it(scan: Scan, tmp_path: str) -> None:
    lay = make(os.path.join(scan.root, "a"))
    keep = make(os.path.join(scan.root, "b"))
    scan.scan()
    os.rename(lay.path, os.path.join(tmp_path, "moved-away"))
    with open(lay.path, "w") as f:
        f.write("I used to be a layout\n")

    with scanner_on(scan.db) as scanner:
        counts = anyio.run(scanner.process, [lay.path])  # what the daemon does on an inotify event
    assert (counts.removed, counts.errors) == (1, 0)
    assert list(scan.layouts()) == [keep.path]


def test_a_layout_path_that_is_not_utf8_is_indexed_with_the_rest(scan: Scan, tmp_path: str) -> None:
    odd = Layout(os.fsdecode(os.fsencode(scan.root) + b"/bad\xff\xfename"))
    image = odd.manifest(label="odd")
    odd.write_index([named(image, ref="v1")])
    broken = Layout(os.fsdecode(os.fsencode(scan.root) + b"/broken\xfe"))
    broken.write_index_bytes(b"{")
    good = make(os.path.join(scan.root, "good"))
    summary, _ = scan.scan()
    assert (summary["layouts"], summary["changed"], summary["errors"]) == (3, 2, 1)
    rows = scan.layouts()
    assert sorted(rows) == sorted([odd.path, broken.path, good.path])
    assert rows[odd.path]["state"] == "ok"
    assert rows[broken.path]["state"] == "error"
    assert scan.scan()[0]["changed"] == 0  # found again by its stored path, not re-added

    # a real process, a UTF-8 locale, the path as raw bytes on the command line
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    env.pop("PYTHONIOENCODING", None)
    for argv, expected in (
        ([b"resolve", b"--layout", os.fsencode(odd.path), b":v1"], f"{image['digest']}\n".encode()),
        ([b"resolve", os.fsencode(f"oci-layout://{odd.path}:v1")], f"{image['digest']}\n".encode()),
        ([b"ls"], None),
        ([b"ls", os.fsencode(odd.path)], None),
        ([b"find", b":v1"], None),
    ):
        done = subprocess.run(
            [os.fsencode(sys.executable), b"-m", b"indexer", argv[0], b"--db", os.fsencode(scan.db), *argv[1:]],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, (argv, done.stderr)
        if expected is not None:
            assert done.stdout == expected
        assert b"\\udcff" in done.stdout or expected is not None, done.stdout  # the odd byte, spelled out

    shutil.rmtree(odd.path)
    summary, _ = scan.scan()
    assert summary["removed"] == 1
    assert odd.path not in scan.layouts()


def _tree(path: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    out["."] = (os.lstat(path).st_mode, 0, os.lstat(path).st_mtime_ns)
    return out


def test_scanning_and_lookups_never_write_into_a_layout(scan: Scan) -> None:
    lay = Layout(os.path.join(scan.root, "a"))
    lay.write_index([named(lay.multiarch([LINUX_AMD64, LINUX_ARM64]), ref="latest")])
    before = _tree(scan.root)
    scan.scan()
    lay_path = os.path.realpath(lay.path)
    for args in (
        ["resolve", f"oci-layout://{lay_path}"],
        ["resolve", "--platform", "linux/amd64", f"oci-layout://{lay_path}"],
        ["find", "--verify-all", ":latest"],
        ["ls", lay_path],
    ):
        assert scan.run(*args)[0] == 0, args
    scan.scan("--full")
    assert _tree(scan.root) == before  # no lock file (index.json.lock), no temporary file, nothing touched


def test_progress_bar_only_on_a_terminal(scan: Scan) -> None:
    for i in range(3):
        make(os.path.join(scan.root, f"l{i}"))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    command = [sys.executable, "-m", "indexer", "scan", "--db", scan.db, scan.root]
    master, slave = pty.openpty()
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert child.wait(timeout=60) == 0
        assert child.stdout is not None
        child.stdout.close()
    finally:
        os.close(master)
    assert b"3/3 layouts" in seen
    assert b"[" + b"#" * 30 + b"]" in seen
    piped = subprocess.run(command, capture_output=True, env=env, timeout=60)
    assert piped.returncode == 0
    assert b"layouts\r" not in piped.stderr and b"#" not in piped.stderr  # not on a pipe
    assert piped.stderr.startswith(b"ocidx: scanned 3 layouts")


def test_a_layout_reached_through_a_followed_symlink_is_removed_when_it_vanishes(scan: Scan, tmp_path: str) -> None:
    outside = make(os.path.join(tmp_path, "elsewhere", "outside"))
    os.symlink(os.path.dirname(outside.path), os.path.join(scan.root, "link-out"))
    config = os.path.join(tmp_path, "config.toml")
    with open(config, "w") as f:
        f.write('[[roots]]\npath = "root"\nfollow_symlinks = true\n')
    assert scan.run("scan", "--no-progress", "--config", config)[0] == 0
    assert list(scan.layouts()) == [outside.path]
    shutil.rmtree(os.path.dirname(outside.path))
    code, out, err = scan.run("scan", "--no-progress", "--json", "--config", config)
    assert code == 0, err
    assert json.loads(out)["removed"] == 1
    assert scan.layouts() == {}


def test_settled_proves_an_unchanged_tree_and_refuses_any_change(scan: Scan) -> None:
    from indexer.scan.proof import settled

    a = make(os.path.join(scan.root, "a"))
    make(os.path.join(scan.root, "b"))
    scan.scan()
    roots = [Root(scan.root)]
    assert settled(scan.db, roots) is None  # just written: racily clean, not yet proof
    conn = sqlite3.connect(scan.db)
    conn.execute(
        "UPDATE layouts SET read_ns = read_ns + 10000000000, blobs_listed_ns = blobs_listed_ns + 10000000000"
    )  # as if read 10 s later
    conn.commit()
    conn.close()
    assert settled(scan.db, roots) == (2, 0)
    summary, _ = scan.scan()
    assert (summary["layouts"], summary["unchanged"], summary["changed"]) == (2, 2, 0)

    make(os.path.join(scan.root, "c"))  # a new layout
    assert settled(scan.db, roots) is None
    shutil.rmtree(os.path.join(scan.root, "c"))
    assert settled(scan.db, roots) == (2, 0)
    a.write_index([named(a.manifest(label="other"), ref="latest")])  # a changed index.json
    assert settled(scan.db, roots) is None
    shutil.rmtree(a.path)  # a vanished layout
    assert settled(scan.db, roots) is None
    summary, _ = scan.scan()
    assert summary["removed"] == 1
