"""The directory cache: a re-scan lists only directories that changed, and still sees every change.

Each test builds a tree, waits until it has left the racy window (so the scan's listings are kept
as proof), scans, changes something deep in the tree and checks that the next ``ocidx scan`` (the
quick no-change proof and the full pass both use the cache) sees exactly that change.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import rows, run, wait_for
from layouts import LINUX_AMD64, Layout, named

from indexer.config import Root
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


def scanned_tree(tmp_path: Path) -> tuple[str, str, str, list[Layout]]:
    """A deep tree below TMP/root, settled and scanned into TMP/index.db: (tmp, root, db, layouts)."""
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = deep_tree(root)
    settle(root)
    scan(tmp, db, root)
    return tmp, root, db, layouts


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
    tmp, root, db, layouts = scanned_tree(tmp_path)
    assert scan(tmp, db, root)["changed"] == 0
    target = layouts[4]
    parent = os.stat(os.path.dirname(target.path))
    target.write_index([named(target.manifest(platform=LINUX_AMD64, label="second"), ref="v2")], rename=False)
    assert os.stat(os.path.dirname(target.path)).st_mtime_ns == parent.st_mtime_ns  # no directory changed
    summary = scan(tmp, db, root)
    assert (summary["changed"], summary["layouts"]) == (1, len(layouts))
    assert rows(db) == fresh(tmp, root)


def test_a_layout_added_or_removed_deep_in_a_cached_tree_is_seen(tmp_path: Path) -> None:
    tmp, root, db, layouts = scanned_tree(tmp_path)
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
    tmp, root, db, layouts = scanned_tree(tmp_path)
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


def _shaped_tree(root: str) -> list[Layout]:
    """deep_tree, plus what the walk treats specially: a layout inside a layout, a symlink to a
    directory inside the root (followed) and to one outside it (followed only by a root that
    follows symlinks), a directory named blobs that is no layout's, a plain file."""
    layouts = deep_tree(root)
    nested = Layout(os.path.join(layouts[0].path, "sub", "inner"))
    nested.write_index([named(nested.manifest(platform=LINUX_AMD64, label="inner"), ref="v1")])
    elsewhere = os.path.join(os.path.dirname(root), "elsewhere")
    outside = Layout(os.path.join(elsewhere, "out"))
    outside.write_index([named(outside.manifest(platform=LINUX_AMD64, label="out"), ref="v1")])
    os.symlink(elsewhere, os.path.join(root, "team-0", "to-elsewhere"))
    os.symlink(os.path.join(root, "team-1"), os.path.join(root, "team-0", "to-team-1"))
    plain = Layout(os.path.join(root, "blobs", "not-a-store"))
    plain.write_index([named(plain.manifest(platform=LINUX_AMD64, label="plain"), ref="v1")])
    with open(os.path.join(root, "team-1", "README"), "w", encoding="utf-8") as fh:
        fh.write("not a layout\n")
    return [*layouts, nested, plain]


def _compare_both_ways(
    db: str, roots: list[Root], monkeypatch: pytest.MonkeyPatch, *, proven: bool
) -> tuple[list[str], list[str], list[str], list[str]]:
    """proof.changes with the planned walk (its stat calls shared among 3 processes) and with
    the walk alone: they must give the same answer; that answer (without the stored rows). *proven*:
    whether the plan is expected to hold (every directory as cached) or to be sent to the walk."""
    from indexer import config as config_mod
    from indexer.scan import proof
    from indexer.store import open_reader

    checked = proof._checked
    outcomes: list[bool] = []

    def spy(*args: object) -> list[str] | None:
        result = checked(*args)  # type: ignore[arg-type]  # the arguments changes() gave
        outcomes.append(result is not None)
        return result

    real_fork, forks = os.fork, []

    def counted_fork() -> int:
        forks.append(1)
        return real_fork()

    conn = open_reader(db)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(proof, "PARALLEL_MIN_STATS", 1)
            patch.setattr(config_mod, "default_workers", lambda: 3)
            patch.setattr(proof, "_checked", spy)
            patch.setattr(os, "fork", counted_fork)
            planned = proof.changes(conn, roots)
        assert outcomes == [proven]
        if outcomes and threading.active_count() == 1:  # (a thread another test left would rule forking out)
            assert len(forks) == 2  # the shares of the plan's proof were checked in 3 processes
        with monkeypatch.context() as patch:
            patch.setattr(proof, "_planned_walk", lambda root, cache: None)
            walked = proof.changes(conn, roots)
    finally:
        conn.close()
    assert planned == walked
    present, changed, gone, errors, _stored = planned
    return present, changed, gone, errors


def test_the_planned_walk_answers_as_the_walk_does_whatever_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The no-change proof plans its walk from the directory cache and shares its stat calls among
    forked processes; after each kind of change its answer is the one the walk of discover gives."""

    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    layouts = _shaped_tree(root)
    settle(root)
    scan(tmp, db, root)
    # Overlapping roots: one shallow, one following symlinks out of the tree (to a layout not indexed).
    followed = os.path.join(os.path.dirname(root), "elsewhere", "out")
    roots = [Root(root), Root(os.path.join(root, "team-0"), max_depth=2), Root(root, follow_symlinks=True)]
    scan(tmp, db, os.path.dirname(followed))  # the link's target listed and indexed as a root of its own
    present, changed, gone, errors = _compare_both_ways(db, roots, monkeypatch, proven=True)
    assert sorted(present) == sorted([*(lay.path for lay in layouts), followed])
    assert (changed, gone, errors) == ([], [], [])

    # Rewritten in place (no directory changes), deep and nested in another layout.
    for lay in (layouts[4], layouts[6]):
        lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label="again"), ref="v2")], rename=False)
    _present, changed, _gone, _errors = _compare_both_ways(db, roots, monkeypatch, proven=True)
    assert sorted(changed) == sorted([layouts[4].path, layouts[6].path])

    # A layout added deep, one removed, a symlink retargeted: directories change, the walk lists them.
    added = Layout(os.path.join(root, "team-1", "project", "p0", "cache", "late"))
    added.write_index([named(added.manifest(platform=LINUX_AMD64, label="late"), ref="v1")])
    os.rename(layouts[2].path, os.path.join(tmp, "away"))
    link = os.path.join(root, "team-0", "to-team-1")
    os.unlink(link)
    os.symlink(os.path.join(root, "team-0", "project"), link)
    present, changed, gone, _errors = _compare_both_ways(db, roots, monkeypatch, proven=False)
    assert added.path in changed and added.path in present
    assert gone == [layouts[2].path]

    # Once scanned and settled again, the plan holds once more, and proves nothing changed.
    settle(root)
    scan(tmp, db, root)
    scan(tmp, db, root)  # the listings of the changed directories, now settled, are kept
    _present, changed, gone, errors = _compare_both_ways(db, roots, monkeypatch, proven=True)
    assert (changed, gone, errors) == ([], [], [])

    # A root that vanished: the walk reports it.
    os.rename(root, os.path.join(tmp, "root-gone"))
    _present, _changed, _gone, errors = _compare_both_ways(db, roots, monkeypatch, proven=False)
    assert errors and all("No such file" in message for message in errors)


def test_forked_shares_come_back_whole_even_when_a_child_dies() -> None:
    """forking.forked: a share per process, each result back in order, a child that dies has its
    share done by the parent, no process is left behind, and a process with threads never forks."""

    from indexer.scan.forking import forked

    parent = os.getpid()

    def which(share: int) -> tuple[int, int]:
        if share == 2 and os.getpid() != parent:
            os._exit(7)  # a child that dies before it answers
        return share * 10, os.getpid()

    results = forked(which, [0, 1, 2, 3])
    assert [value for value, _pid in results] == [0, 10, 20, 30]
    pids = [pid for _value, pid in results]
    assert pids[0] == parent and pids[2] == parent  # the dead child's share, done here
    assert parent not in (pids[1], pids[3]) and pids[1] != pids[3]
    for pid in (pids[1], pids[3]):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        assert {pid for _value, pid in forked(which, [0, 1, 3])} == {parent}
    finally:
        stop.set()
        other.join()


def test_the_plan_takes_no_listing_made_in_the_racy_window(tmp_path: Path) -> None:
    """A listing made less than the racy window after its directory changed proves nothing (a change
    in the same timestamp tick would leave the identity as it was): the plan refuses it, so the
    proof falls back to the walk, which lists that directory again."""
    from indexer.scan.discovery import load_cache
    from indexer.scan.proof import _planned_walk
    from indexer.store import open_reader

    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    deep_tree(root)
    scan(tmp, db, root)  # at once: every listing is within the racy window of its directory's change
    conn = open_reader(db)
    try:
        assert _planned_walk(Root(root), load_cache(conn)) is None
    finally:
        conn.close()
    settle(root)
    scan(tmp, db, root)
    conn = open_reader(db)
    try:
        assert _planned_walk(Root(root), load_cache(conn)) is not None
    finally:
        conn.close()


def test_workers_1_proves_no_change_without_forking(tmp_path: Path) -> None:
    """``[daemon] workers = 1`` keeps everything in the command's own process: ``ocidx scan`` and
    ``find`` prove nothing changed without forking, however large the tree (checked with a fork
    that fails, at a threshold every tree passes)."""
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    deep_tree(root)
    settle(root)
    scan(tmp, db, root)
    config = os.path.join(tmp, "ocidx.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write("[daemon]\nworkers = 1\n")
    probe = (
        "import os, sys\n"
        "from indexer import config\n"
        "from indexer.scan import proof\n"
        "proof.PARALLEL_MIN_STATS = 1\n"
        "config.default_workers = lambda: 4\n"
        "def no_fork():\n"
        "    raise AssertionError('forked')\n"
        "os.fork = no_fork\n"
        "from indexer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for argv in (["scan", "--db", db, "--json", root], ["find", "--db", db, ":v1"]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv, "--config", config], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        # Without the setting, the same probe does fork (so the check above can fail).
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=False)
        assert done.returncode != 0 and "forked" in done.stderr, done.stderr


def test_a_cached_entry_out_of_date_that_names_a_walked_directory_is_still_proven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan skips a directory whose cached device and inode it already walked, as the walk does
    with the live ones; an entry out of date can name another directory's inode (an entry outside
    the roots, reached through a symlink, is never forgotten, and inodes are reused), so even a
    skipped path is proven, and here the proof falls back to the walk, which finds the layout."""
    from indexer.scan import discovery, proof
    from indexer.store import open_reader

    _tmp, root, db, layouts = scanned_tree(tmp_path)
    conn = open_reader(db)
    try:
        cache = discovery.load_cache(conn)
    finally:
        conn.close()
    # The entry of one layout's directory now names the inode of the tree's first directory walked
    # (the root): the plan, taking it at its word, would skip that layout as walked already.
    target = layouts[3].path
    top = cache[root]
    cache[target] = (top[0], top[1], *cache[target][2:])
    monkeypatch.setattr(proof, "load_cache", lambda conn: cache)
    present, changed, gone, errors = _compare_both_ways(db, [Root(root)], monkeypatch, proven=False)
    assert target in present
    assert (changed, gone, errors) == ([], [], [])


def test_forked_shares_are_done_here_when_no_process_can_be_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork that fails (a process limit, no memory) costs speed, not the answer: the shares no
    process could take are done in this process, and no pipe is left open."""
    from indexer.scan.forking import forked

    real_fork, calls = os.fork, []

    def fork_once() -> int:
        calls.append(1)
        if len(calls) > 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", fork_once)
    parent = os.getpid()
    results = forked(lambda share: (share * 2, os.getpid()), [1, 2, 3, 4])
    monkeypatch.undo()
    assert [value for value, _pid in results] == [2, 4, 6, 8]
    assert results[1][1] != parent and {pid for _value, pid in (results[0], *results[2:])} == {parent}
    assert len(os.listdir("/proc/self/fd")) == before
