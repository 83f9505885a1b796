"""A failure is never a proof: faults of the environment (descriptors used up, permissions, a dead
worker) met while a pass lists or reads layouts leave no wrong answer behind (issue 17).

Every fault is real: a process whose descriptor limit is lowered (``resource.setrlimit``) while it
runs a pass, root without the capabilities that bypass permissions (``setpriv``), worker processes
killed with SIGKILL. What each test checks is what a user sees afterwards: ``ocidx ls``, ``find``
and ``scan`` through real processes, and the rows against a fresh scan.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import DEADLINE_S, NO_DAC, Daemon, environment, rows, run, wait_for, write_config
from layouts import LINUX_AMD64, Layout, named

from indexer.store.read import RACY_WINDOW_NS

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root (setpriv, mounts)")

# One full pass of the scanner with the process's descriptor limit lowered to the descriptors it has
# open once its event loop runs: every open(2), pipe(2) or socket(2) of the pass fails with EMFILE,
# as in a daemon whose descriptors an attacker's idle connections used up. The limit is restored
# after the pass; the pass's counts are printed as JSON.
UNDER_EMFILE = r"""
import hashlib, json, os, resource, sys
import anyio
from indexer.config import Config, DaemonSettings, Root
from indexer.scan.scanner import Scanner
from indexer.store.writer import Store

db, roots = sys.argv[1], sys.argv[2:]
store = Store(db)
scanner = Scanner(store, Config(daemon=DaemonSettings(workers=int(os.environ.get("WORKERS", "1")))))

async def one_pass():
    free = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor: the limit, so none is left
    os.close(free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
    try:
        return await scanner.full_pass([Root(r) for r in roots])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

counts = anyio.run(one_pass)
scanner.close()
store.close()
print(json.dumps(counts.to_json(0)))
"""


def under_emfile(tmp: str, db: str, *roots: str) -> dict[str, object]:
    """Run one full pass (in a process of its own) whose every new descriptor fails with EMFILE."""
    proc = subprocess.run(
        [sys.executable, "-c", UNDER_EMFILE, db, *roots],
        capture_output=True,
        env=environment(tmp),
        cwd=tmp,
        timeout=DEADLINE_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def tagged_tree(root: str, groups: int, per_group: int, tag: str) -> list[Layout]:
    """``groups`` directories of ``per_group`` layouts, each holding one image tagged *tag*, settled
    (older than the racy window), so that the directory cache's listings of them are proofs."""
    made = []
    for group in range(groups):
        for number in range(per_group):
            lay = Layout(os.path.join(root, f"g{group}", f"layout-{number:02d}"))
            lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label=f"{group}-{number}-{tag}"), ref=tag)])
            made.append(lay)
    settle()
    return made


def settle() -> None:
    """Wait until every file written so far is older than the racy window: a stored identity of it
    is then a proof that it is unchanged."""
    settled_at = time.time_ns() + RACY_WINDOW_NS
    wait_for(lambda: time.time_ns() > settled_at, "the files to leave the racy window", timeout=10)


def retag(lay: Layout, tag: str) -> str:
    """Rewrite *lay*'s ``index.json`` in place (its directory unchanged) to one image tagged *tag*; its digest."""
    image = lay.manifest(platform=LINUX_AMD64, label=f"{lay.path}-{tag}")
    lay.write_index([named(image, ref=tag)], rename=False)
    return str(image["digest"])


def layout_rows(db: str) -> dict[str, dict[str, object]]:
    """What the index stores for each layout (its state and error category), as the scan or the
    daemon wrote it: ``ls`` without a live daemon reads the layouts again, so it cannot show this."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        stored = conn.execute("SELECT path, state, error_category FROM layouts").fetchall()
    finally:
        conn.close()
    return {path: {"state": state, "error": error} for path, state, error in stored}


def found(tmp: str, db: str, ref: str) -> tuple[set[tuple[str, str]], bytes, int]:
    """``ocidx find --json REF``: the (layout, digest) pairs, stderr, and the exit code."""
    result = run(tmp, "find", "--db", db, "--json", ref)
    pairs = {(a["layout"], a["digest"]) for a in result.json()} if result.out else set()  # type: ignore[attr-defined]
    return pairs, result.err, result.rc


# -- reads that fail for a reason outside the layout's bytes --------------------------------------------


def test_reads_that_fail_with_emfile_are_not_stored_as_a_proof(tmp_path: Path) -> None:
    # Before: each layout whose read failed with EMFILE was stored failed *with its identity*, so a
    # no-change scan kept it "with errors" until its file changed, and find answered without it.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    made = tagged_tree(root, 2, 10, "v1")
    assert run(tmp, "scan", "--db", db, root).rc == 0
    rewritten = {lay.path: retag(lay, "v2") for lay in made[:8]}
    settle()  # a failure stored with an identity would now be trusted as proof (it was, before)
    counts = under_emfile(tmp, db, root)
    assert (counts["errors"], counts["removed"]) == (8, 0), counts
    listed = layout_rows(db)
    assert len(listed) == len(made)
    assert all(listed[path]["state"] == "error" for path in rewritten), listed
    # find reads them again now that descriptors are free: every layout tagged v2, and nothing stale.
    pairs, err, rc = found(tmp, db, ":v2")
    assert rc == 0 and pairs == set(rewritten.items()), err
    # A scan with nothing changed since re-reads them (nothing was proven) and leaves no error.
    again = run(tmp, "scan", "--db", db, "--json", root)
    assert again.rc == 0, again
    summary = again.json()
    assert (summary["changed"], summary["errors"], summary["still_broken"]) == (8, 0, 0), summary  # type: ignore[index]
    # What the pass said: read again later, for want of descriptors.
    assert counts["read_again"] == 8
    assert {listed[path]["error"] for path in rewritten} == {"too_many_open_files"}
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


@needs_root
def test_find_says_so_when_layouts_in_its_scope_cannot_be_read(tmp_path: Path) -> None:
    # Before: a layout whose every read failed (here: a permission) was simply absent from find's
    # answer, with no warning, while find claimed to be exact.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    made = tagged_tree(root, 1, 4, "v1")
    locked = made[0]
    os.chmod(locked.index_path, 0o000)
    try:
        scan = run(tmp, "scan", "--db", db, "--json", root, prefix=NO_DAC)
        assert scan.rc == 0, scan
        assert scan.json()["errors"] == 1  # type: ignore[index]
        result = run(tmp, "find", "--db", db, "--json", ":v1", prefix=NO_DAC)
        assert result.rc == 0, result
        answers = result.json()
        assert {a["layout"] for a in answers} == {lay.path for lay in made[1:]}  # type: ignore[attr-defined]
        assert b"1 indexed layout could not be read now" in result.err, result
        assert locked.path.encode() in result.err
        assert all(any("could not be read now" in w for w in a["warnings"]) for a in answers)  # type: ignore[attr-defined]
    finally:
        os.chmod(locked.index_path, 0o644)
    # Readable again: the next find answers it, with no warning (nothing was pinned).
    pairs, err, rc = found(tmp, db, ":v1")
    assert rc == 0 and {p for p, _ in pairs} == {lay.path for lay in made}, err
    assert b"warning" not in err


@needs_root
def test_the_daemon_reads_again_what_failed_for_the_environment_after_a_backoff(tmp_path: Path) -> None:
    # The daemon runs as root without the capabilities that bypass permissions; a layout rewritten
    # while its index.json is unreadable fails for a reason outside its bytes. Before: it stayed
    # failed until the next reconcile (here 300 s away); now it is read again after a backoff.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    (lay,) = tagged_tree(root, 1, 1, "v1")
    config = write_config(tmp, "[daemon]\nreconcile_interval_s = 300\n")
    with Daemon(tmp, [root], db=db, config=config, prefix=NO_DAC).start().wait_ready() as daemon:
        os.chmod(lay.index_path, 0o000)
        digest = retag(lay, "v2")  # as root: the daemon is told, and cannot read it
        wait_for(lambda: layout_rows(db)[lay.path]["state"] == "error", "the failed read to be stored")
        os.chmod(lay.index_path, 0o644)  # no event: only the daemon's retry can notice
        wait_for(lambda: layout_rows(db)[lay.path]["state"] == "ok", "the layout to be read again", timeout=15)
        answer = run(tmp, "resolve", "--db", db, "--json", "--layout", lay.path, ":v2")
        assert answer.rc == 0 and answer.json()["digest"] == digest, answer  # type: ignore[index]
        assert answer.json()["freshness"] == "indexed"  # type: ignore[index]
        assert daemon.stop() == 0


# -- listings that fail ----------------------------------------------------------------------------------


def test_a_root_that_cannot_be_listed_for_want_of_descriptors_loses_no_layout(tmp_path: Path) -> None:
    # Before: the pass logged "Too many open files" for the root and removed every layout below it
    # (the daemon's reconcile does the same pass: ls showed 0 layouts until the next good reconcile).
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    made = tagged_tree(root, 2, 5, "v1")
    assert run(tmp, "scan", "--db", db, root).rc == 0
    # A new directory in the root: the root's listing is no longer the cached one, so the pass lists it.
    added = Layout(os.path.join(root, "g9", "new"))
    added.write_index([named(added.manifest(platform=LINUX_AMD64, label="new"), ref="v1")])
    counts = under_emfile(tmp, db, root)
    assert counts["removed"] == 0, counts
    assert counts["unlisted"] == 1, counts
    assert set(layout_rows(db)) == {lay.path for lay in made}
    # find without a daemon walks the roots: exact again once descriptors are free.
    pairs, err, rc = found(tmp, db, ":v1")
    assert rc == 0 and {p for p, _ in pairs} == {lay.path for lay in [*made, added]}, err
    assert run(tmp, "scan", "--db", db, root).rc == 0
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


@needs_root
def test_a_directory_that_cannot_be_listed_keeps_its_layouts_and_find_says_unverified(tmp_path: Path) -> None:
    # Before: a scan that could not list a directory (EACCES) removed every layout indexed below it,
    # and find then answered without them.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    made = tagged_tree(root, 2, 3, "v1")
    assert run(tmp, "scan", "--db", db, root).rc == 0
    locked = os.path.join(root, "g1")
    os.chmod(locked, 0o311)  # searchable, not listable: each layout's own path still leads to it
    try:
        scan = run(tmp, "scan", "--db", db, "--json", root, prefix=NO_DAC)
        assert scan.rc == 0, scan
        summary = scan.json()
        assert summary["removed"] == 0, summary  # type: ignore[index]
        listed = layout_rows(db)
        assert set(listed) == {lay.path for lay in made}
        assert all(row["state"] == "ok" for row in listed.values())  # read by their own paths
        assert summary["unlisted"] == 1, summary  # type: ignore[index]
        result = run(tmp, "find", "--db", db, "--json", ":v1", prefix=NO_DAC)
        assert result.rc == 0, result
        assert {a["layout"] for a in result.json()} == {lay.path for lay in made}  # type: ignore[attr-defined]
        assert b"could not all be read" in result.err and b"Permission denied" in result.err, result
    finally:
        os.chmod(locked, 0o755)
    pairs, err, rc = found(tmp, db, ":v1")
    assert rc == 0 and {p for p, _ in pairs} == {lay.path for lay in made} and b"warning" not in err, err


# Steps run in a private mount namespace (unshare -m): ["mount", IMAGE, DIR] mounts an image through
# a loop device, ["umount", DIR], ["chmod", PATH, MODE]; any other step is a command, whose exit
# code, stdout and stderr are printed (as JSON, with the device number of each mount point mounted).
IN_NAMESPACE = r"""
import json, os, subprocess, sys
steps = json.loads(sys.argv[1])
results, mounted = [], []
try:
    for step in steps:
        if step[0] == "mount":
            subprocess.run(["mount", "-o", "loop", step[1], step[2]], check=True)
            mounted.append(step[2])
            results.append(["mounted", os.stat(step[2]).st_dev])
        elif step[0] == "umount":
            subprocess.run(["umount", step[1]], check=True)
            mounted.remove(step[1])
        elif step[0] == "chmod":
            os.chmod(step[1], int(step[2], 8))
        else:
            proc = subprocess.run(step, capture_output=True)
            out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
            results.append([proc.returncode, out, err])
finally:
    for directory in reversed(mounted):
        subprocess.run(["umount", directory])
print(json.dumps(results))
"""


def in_namespace(tmp: str, steps: list[list[str]]) -> list[list[object]]:
    """Run *steps* (IN_NAMESPACE) in a private mount namespace; what each mount or command gave."""
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", IN_NAMESPACE, json.dumps(steps)],
        capture_output=True,
        env=environment(tmp),
        cwd=tmp,
        timeout=DEADLINE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    results: list[list[object]] = json.loads(done.stdout)
    return results


def ext4_image(path: str, *features: str) -> str:
    """An empty 32 MiB ext4 file system image at *path*."""
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", *features, "-E", "root_owner=0:0", path], check=True)
    return path


def sleep_step(seconds: float) -> list[str]:
    """A step that waits out the racy window (files written in the namespace settle meanwhile)."""
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


SETTLE_STEP = sleep_step(RACY_WINDOW_NS / 1e9 + 0.5)
OCIDX = [sys.executable, "-m", "indexer"]
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@needs_root
@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("unshare")), reason="needs mkfs.ext4, unshare")
def test_a_listing_with_an_entry_of_unknown_type_is_not_cached_as_settled(tmp_path: Path) -> None:
    # On a file system whose directory entries carry no type (ext4 without "filetype", as some
    # network and older file systems), the walk learns each entry's type with an lstat; when that
    # failed (EACCES for a scan without CAP_DAC_OVERRIDE), the entry was skipped, the layout below it
    # removed, and the listing cached as settled: a later scan as full root kept using it and never
    # found the layout again until the directory itself changed.
    tmp = str(tmp_path)
    image, mnt = ext4_image(os.path.join(tmp, "fs.ext4"), "-O", "^filetype"), os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    root, db, fresh = os.path.join(mnt, "root"), os.path.join(tmp, "index.db"), os.path.join(tmp, "fresh.db")
    build = (
        "import os, sys; sys.path[:0] = sys.argv[1:3]\n"
        "from layouts import LINUX_AMD64, Layout, named\n"
        "lay = Layout(os.path.join(sys.argv[3], 'd', 'sub', 'app'))\n"
        "lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label='deep'), ref='v1')])\n"
    )
    results = in_namespace(
        tmp,
        [
            ["mount", image, mnt],
            [sys.executable, "-c", build, TESTS, REPO, root],
            SETTLE_STEP,
            [*OCIDX, "scan", "--db", db, "--json", root],  # as root: the layout is indexed
            ["chmod", os.path.join(root, "d"), "644"],  # listable, not searchable: no entry's type is known
            [*NO_DAC, *OCIDX, "scan", "--db", db, "--json", root],
            ["chmod", os.path.join(root, "d"), "755"],
            [*OCIDX, "ls", "--db", db, "--json"],
            SETTLE_STEP,
            [*OCIDX, "scan", "--db", db, "--json", root],
            [*OCIDX, "ls", "--db", db, "--json"],
            [*OCIDX, "scan", "--db", fresh, "--json", root],
        ],
    )
    assert all(r[0] in ("mounted", 0) for r in results), results
    first, limited, after_limited, _sleep, _again, at_end, _fresh = results[3:]
    assert json.loads(str(first[1]))["changed"] == 1, first
    assert json.loads(str(limited[1]))["removed"] == 0, limited
    app = os.path.join(root, "d", "sub", "app")
    assert [row["layout"] for row in json.loads(str(after_limited[1]))] == [app], after_limited
    assert [row["layout"] for row in json.loads(str(at_end[1]))] == [app], at_end
    assert rows(db) == rows(fresh)


# -- out of descriptors ----------------------------------------------------------------------------------

# Run the command in sys.argv[2:] with at most sys.argv[1] open files (the soft limit; ulimit -n).
WITH_FD_LIMIT = (
    "import os, resource, sys\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def with_fd_limit(limit: int) -> list[str]:
    return [sys.executable, "-c", WITH_FD_LIMIT, str(limit)]


def test_running_out_of_descriptors_is_said_as_such_everywhere(tmp_path: Path) -> None:
    # Before: at ulimit -n 10-12 ocidx scan died with a raw traceback (a worker's pipe, a lazily
    # imported module), at 9 it said the database "is not a usable ocidx database" (exit 4), and at
    # some limits it hung (a worker process that could not be started).
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    made = tagged_tree(root, 7, 10, "v1")  # 70 layouts: enough for the worker processes
    config = os.path.join(tmp, "config.toml")
    with open(config, "w") as f:
        f.write("[daemon]\nworkers = 2\n")
    said: dict[int, set[str]] = {}

    def limited(limit: int, *args: str) -> int:
        result = run(tmp, *args, prefix=with_fd_limit(limit))  # no traceback, no control character
        assert result.rc in (0, 6), (limit, result)
        assert b"not a usable ocidx database" not in result.err and b"unable to open" not in result.err, result
        if result.rc == 6:
            assert b"too many open files" in result.err, (limit, result)
        said.setdefault(result.rc, set()).add(args[0])
        return result.rc

    for limit in range(6, 31, 3):  # a new database each time, read by worker processes
        cold = os.path.join(tmp, f"cold-{limit}.db")
        limited(limit, "scan", "--db", cold, "--config", config, "--no-progress", root)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    for limit in range(7, 31, 3):  # an existing one, a new layout each time (a listing, a read)
        extra = Layout(os.path.join(root, f"extra-{limit}"))
        extra.write_index([named(extra.manifest(platform=LINUX_AMD64, label=f"x{limit}"), ref="v1")])
        limited(limit, "scan", "--db", db, "--config", config, "--no-progress", root)
    for limit in range(5, 13):
        for args in (
            ["resolve", "--layout", made[0].path, ":v1"],
            ["find", ":v1"],
            ["ls"],
            ["ls", made[0].path],
            ["status"],
        ):
            limited(limit, args[0], "--db", db, *args[1:])
    assert said[6] >= {"scan", "find"} and said[0] >= {"scan", "resolve", "find", "ls", "status"}, said
    # Nothing a limited scan met was stored as a proof: one scan with descriptors to spare, and the
    # index is what a fresh scan makes of the tree.
    assert run(tmp, "scan", "--db", db, root).rc == 0
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


# -- what an answer depends on besides index.json ---------------------------------------------------------


@pytest.mark.parametrize("first", ["absent", "truncated"])
def test_a_nested_index_blob_that_arrives_later_is_seen_with_index_json_untouched(tmp_path: Path, first: str) -> None:
    # A partial export (or a writer that writes index.json before its blobs) leaves the nested index
    # blob absent, or half written, at the first scan; it arrives later and index.json is untouched.
    # Before: the no-change proof said "nothing changed", so ocidx scan did nothing and find without
    # a daemon did not see the child manifests the layout now has.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    lay = Layout(os.path.join(root, "partial"))
    arm64 = lay.manifest(platform={"architecture": "arm64", "os": "linux"}, label="arm64")
    nested = lay.index([lay.manifest(platform=LINUX_AMD64, label="amd64"), arm64])
    blob = lay.blob_path(str(nested["digest"]))
    with open(blob, "rb") as f:
        complete = f.read()
    if first == "absent":
        os.remove(blob)
    else:
        with open(blob, "r+b") as f:
            f.truncate(len(complete) // 2)
    lay.write_index([named(nested, ref="v1")])
    settle()  # index.json and the blob's state then are older than the racy window: proofs
    assert run(tmp, "scan", "--db", db, root).rc == 0
    detail = run(tmp, "ls", "--db", db, "--json", lay.path).json()[0]  # type: ignore[index]
    assert detail["entries"][0]["children"] == [], detail
    # The blob arrives, whole; index.json is not touched.
    with open(blob, "wb") as f:
        f.write(complete)
    child = str(arm64["digest"])
    pairs, err, rc = found(tmp, db, "@" + child)
    assert rc == 0 and pairs == {(lay.path, child)}, err
    detail = run(tmp, "ls", "--db", db, "--json", lay.path).json()[0]  # type: ignore[index]
    assert detail["freshness"] == "read-through" and len(detail["entries"][0]["children"]) == 2, detail
    platform = run(tmp, "resolve", "--db", db, "--layout", lay.path, ":v1", "--platform", "linux/arm64")
    assert platform.rc == 0 and platform.out.decode().strip() == child, platform
    again = run(tmp, "scan", "--db", db, "--json", root)
    assert again.json()["changed"] == 1, again  # type: ignore[index]
    detail = run(tmp, "ls", "--db", db, "--json", lay.path).json()[0]  # type: ignore[index]
    assert detail["freshness"] == "indexed" and len(detail["entries"][0]["children"]) == 2, detail
    fresh = os.path.join(tmp, "fresh.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    assert rows(db) == rows(fresh)


# -- the mount a layout was read on ----------------------------------------------------------------------


@needs_root
@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("unshare")), reason="needs mkfs.ext4, unshare")
def test_a_copy_with_identical_metadata_mounted_in_place_is_not_answered_from_the_first(tmp_path: Path) -> None:
    # Two file systems with identical metadata (a copied image; a reproducible build of one) mounted
    # one after the other at the same place: the same loop device, inode numbers, sizes and times.
    # Before: every (dev, ino, size, mtime, ctime) matched, and the first one's digest was answered
    # "indexed" from the rows; ocidx scan proved "nothing changed".
    tmp = str(tmp_path)
    first, mnt = ext4_image(os.path.join(tmp, "first.ext4")), os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    root, db = os.path.join(mnt, "root"), os.path.join(tmp, "index.db")
    app = os.path.join(root, "app")
    build = (
        "import os, sys; sys.path[:0] = sys.argv[1:3]\n"
        "from layouts import LINUX_AMD64, Layout, named\n"
        "lay = Layout(sys.argv[3])\n"
        "lay.write_index([named(lay.manifest(platform=LINUX_AMD64, label='first'), ref='v1')])\n"
        "print(lay.manifest(platform=LINUX_AMD64, label='first')['digest'])\n"
    )
    built = in_namespace(tmp, [["mount", first, mnt], [sys.executable, "-c", build, TESTS, REPO, app]])
    old_digest = str(built[1][1]).strip()
    # The second file system: a byte copy in which index.json names another digest of the same length.
    new_digest = "sha256:" + "e" * 64
    with open(first, "rb") as f:
        data = f.read()
    assert data.count(old_digest.encode()) >= 1
    second = os.path.join(tmp, "second.ext4")
    with open(second, "wb") as f:
        f.write(data.replace(old_digest.encode(), new_digest.encode()))
    stat_app = [
        sys.executable,
        "-c",
        "import os, sys; s = os.stat(sys.argv[1]); "
        "print([s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns])",
        os.path.join(app, "index.json"),
    ]
    results = in_namespace(
        tmp,
        [
            ["mount", first, mnt],
            SETTLE_STEP,
            [*OCIDX, "scan", "--db", db, root],
            stat_app,
            [*OCIDX, "resolve", "--db", db, "--json", "--layout", app, ":v1"],
            ["umount", mnt],
            ["mount", second, mnt],
            stat_app,
            [*OCIDX, "resolve", "--db", db, "--json", "--layout", app, ":v1"],
            [*OCIDX, "find", "--db", db, "--json", ":v1"],
            [*OCIDX, "scan", "--db", db, "--json", root],
            [*OCIDX, "resolve", "--db", db, "--json", "--layout", app, ":v1"],
        ],
    )
    assert all(r[0] in ("mounted", 0) for r in results), results
    (_, dev_first), _sleep, _scan, stat_first, on_first, (_, dev_second), stat_second = results[:7]
    on_second, found_second, rescan, after = results[7:]
    assert dev_first == dev_second and stat_first[1] == stat_second[1], "the premise: identical metadata"
    assert json.loads(str(on_first[1]))["digest"] == old_digest
    answer = json.loads(str(on_second[1]))
    assert answer["digest"] == new_digest and answer["freshness"] == "read-through", answer
    assert [a["digest"] for a in json.loads(str(found_second[1]))] == [new_digest], found_second
    assert json.loads(str(rescan[1]))["changed"] == 1, rescan
    answer = json.loads(str(after[1]))
    assert (answer["digest"], answer["freshness"]) == (new_digest, "indexed"), answer


# -- nested indexes that list the same child many times --------------------------------------------------


def test_nested_indexes_listing_one_child_many_times_are_walked_and_stored_once(tmp_path: Path) -> None:
    # A 4-level chain of nested indexes, each listing the next one 17 times (the last: one manifest
    # 17 times), about 12 KB. Before: the scan stored 17+17^2+17^3+17^4 = 88,740 children rows
    # (33 MB of SQLite), and resolve --platform walked 17^10 paths (it would run for days), with or
    # without an index.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    lay = Layout(os.path.join(root, "fanout"))
    fan = 17
    arm64 = lay.manifest(platform={"architecture": "arm64", "os": "linux"}, label="leaf")
    level = arm64
    for _ in range(4):
        level = lay.index([level] * fan)
    lay.write_index([named(level, ref="v1"), named(level, ref="v2")])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(lay.path) for f in files)
    assert size < 16_000
    leaf = str(arm64["digest"])
    # Read through, no index at all: the platform search follows each distinct index once.
    nowhere = os.path.join(tmp, "no.db")
    for tag in ("v1", "v2"):
        answer = run(tmp, "resolve", "--db", nowhere, "--layout", lay.path, f":{tag}", "--platform", "linux/arm64")
        assert answer.rc == 0 and answer.out.decode().strip() == leaf, answer
    # A platform that is not there: every index is looked into (once each), the platforms present listed.
    absent = run(tmp, "resolve", "--db", nowhere, "--json", "--layout", lay.path, ":v1", "--platform", "linux/s390x")
    assert absent.rc == 1 and absent.json()["platforms"] == [  # type: ignore[index]
        {"os": "linux", "architecture": "arm64", "variant": None}
    ], absent
    assert not os.path.exists(nowhere)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    conn = sqlite3.connect(db)
    try:
        children = conn.execute("SELECT count(*) FROM children").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    assert children == 4, children  # one row per distinct edge: what the layout's bytes say
    assert pages < 1 << 20, pages
    for tag in ("v1", "v2"):  # the rows are under the first entry; the second reaches them by digest
        answer = run(tmp, "resolve", "--db", db, "--json", "--layout", lay.path, f":{tag}", "--platform", "linux/arm64")
        assert answer.rc == 0, answer
        assert (answer.json()["digest"], answer.json()["freshness"]) == (leaf, "indexed")  # type: ignore[index]
    absent = run(tmp, "resolve", "--db", db, "--layout", lay.path, ":v2", "--platform", "linux/s390x")
    assert absent.rc == 1 and b"linux/arm64" in absent.err, absent
    detail = run(tmp, "ls", "--db", db, "--json", lay.path).json()[0]  # type: ignore[index]
    assert [len(entry["children"]) for entry in detail["entries"]] == [4, 4], detail
    pairs, err, rc = found(tmp, db, "@" + leaf)
    assert rc == 0 and pairs == {(lay.path, leaf)}, err
