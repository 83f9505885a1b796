"""The directory cache: a re-scan lists only directories that changed, and still sees every change.

Each test builds a tree, waits until it has left the racy window (so the scan's listings are kept
as proof), scans, changes something deep in the tree and checks that the next ``ocidx scan`` (the
quick no-change proof and the full pass both use the cache) sees exactly that change.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from layouts import LINUX_AMD64, Layout, named
from test_reliability import rows, run, wait_for

from indexer.store.read import RACY_WINDOW_NS


def deep_tree(root: str, count: int = 6) -> list[Layout]:
    """Layouts four directories below *root*, in a few branches."""
    out = []
    for number in range(count):
        lay = Layout(os.path.join(root, f"team-{number % 2}", "project", f"p{number % 3}", "cache", f"img-{number}"))
        lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label=f"first-{number}"), ref="v1")])
        out.append(lay)
    return out


def settle(root: str) -> None:
    """Wait until everything below *root* last changed more than the racy window ago."""
    newest = max(
        max(os.stat(os.path.join(d, name)).st_ctime_ns for name in [".", *names]) for d, _dirs, names in os.walk(root)
    )
    wait_for(lambda: time.time_ns() > newest + RACY_WINDOW_NS, "the tree to leave the racy window", 10)


def cached(db: str) -> dict[str, tuple[int, bytes]]:
    """The directory cache: path -> (holds a layout, subdirectory names)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            path: (layout, subdirs)
            for path, layout, subdirs in conn.execute("SELECT path, layout, subdirs FROM directories")
        }
    finally:
        conn.close()


def scan(tmp: str, db: str, root: str) -> dict[str, object]:
    done = run(tmp, "scan", "--db", db, "--json", root)
    assert done.rc == 0, done
    summary = done.json()
    assert isinstance(summary, dict)
    return summary


def fresh(tmp: str, root: str) -> dict[str, list[tuple[object, ...]]]:
    other = os.path.join(tmp, f"fresh-{time.monotonic_ns()}.db")
    scan(tmp, other, root)
    return rows(other)


def test_the_scan_keeps_every_directory_it_listed(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = deep_tree(root)
    settle(root)  # so that the second scan takes the settled directories from the cache
    scan(tmp, db, root)
    kept = cached(db)
    for lay in layouts:
        assert kept[lay.path][0] == 1  # a layout directory (blobs/ is never listed as a subdirectory)
        assert kept[lay.path][1] == b""
    assert sorted(kept[os.path.join(root, "team-0", "project")][1].split(b"\0")) == [b"p0", b"p1", b"p2"]
    # a removed branch is forgotten by the next full pass
    gone = os.path.join(root, "team-1")
    os.rename(gone, os.path.join(tmp, "away"))
    summary = scan(tmp, db, root)
    assert summary["removed"] == 3
    now = cached(db)
    assert not [path for path in now if path.startswith(gone)]
    # every directory still there is still kept (those the walk took from the cache too)
    assert {path for path in kept if not path.startswith(gone)} <= now.keys()


def test_a_file_rewritten_in_place_deep_in_a_cached_tree_is_seen(tmp_path: Path) -> None:
    # Rewriting index.json in place changes no directory's mtime: the cache must not hide it.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = deep_tree(root)
    settle(root)
    scan(tmp, db, root)
    assert scan(tmp, db, root)["changed"] == 0
    target = layouts[4]
    parent = os.stat(os.path.dirname(target.path))
    target.write_index([named(target.manifest(platform=LINUX_AMD64, label="second"), ref="v2")], rename=False)
    assert os.stat(os.path.dirname(target.path)).st_mtime_ns == parent.st_mtime_ns  # no directory changed
    summary = scan(tmp, db, root)
    assert (summary["changed"], summary["layouts"]) == (1, len(layouts))
    assert rows(db) == fresh(tmp, root)


def test_a_layout_added_or_removed_deep_in_a_cached_tree_is_seen(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = deep_tree(root)
    settle(root)
    scan(tmp, db, root)
    added = Layout(os.path.join(root, "team-0", "project", "p0", "cache", "new-one", "deeper"))
    added.write_index([named(added.manifest(platform=LINUX_AMD64, label="added"), ref="v1")])
    summary = scan(tmp, db, root)
    assert (summary["changed"], summary["layouts"]) == (1, len(layouts) + 1)
    assert rows(db) == fresh(tmp, root)
    settle(root)
    scan(tmp, db, root)  # the cache now holds the new directories as settled
    os.rename(layouts[2].path, os.path.join(tmp, "moved-away"))
    summary = scan(tmp, db, root)
    assert (summary["removed"], summary["layouts"]) == (1, len(layouts))
    assert rows(db) == fresh(tmp, root)


def test_a_directory_that_becomes_a_layout_is_found(tmp_path: Path) -> None:
    # An existing, cached, directory gains an oci-layout and index.json: its mtime changes.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    deep_tree(root)
    plain = os.path.join(root, "team-0", "project", "p1", "cache", "not-yet")
    os.makedirs(plain)
    settle(root)
    scan(tmp, db, root)
    assert cached(db)[plain] == (0, b"")
    lay = Layout(plain)
    lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label="late"), ref="v1")])
    summary = scan(tmp, db, root)
    assert summary["changed"] == 1
    assert rows(db) == fresh(tmp, root)


def test_find_without_a_daemon_walks_the_cached_tree_and_still_sees_every_change(tmp_path: Path) -> None:
    # find, like the re-scan, takes settled listings from the cache; what changed must still show.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = deep_tree(root)
    settle(root)
    scan(tmp, db, root)
    assert cached(db)  # the walk below has listings to take
    rewritten = layouts[3]
    rewritten.write_index([named(rewritten.manifest(platform=LINUX_AMD64, label="again"), ref="v9")], rename=False)
    added = Layout(os.path.join(root, "team-1", "project", "p2", "cache", "late", "deeper"))
    added.write_index([named(added.manifest(platform=LINUX_AMD64, label="late"), ref="v9")])
    done = run(tmp, "find", "--db", db, "--json", ":v9")
    assert done.rc == 0, done
    found = done.json()
    assert isinstance(found, list)
    assert sorted(answer["layout"] for answer in found) == sorted([rewritten.path, added.path])
    assert all(answer["freshness"] == "read-through" for answer in found)
