"""Two writers on one index: every interleaving of scans, reconciles and daemons ends exact.

Each test drives a real interleaving (two writer connections, or real ``ocidx scan`` and
``ocidx daemon`` processes) and compares the final rows with a fresh scan of the same tree.
"""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import anyio
import pytest
from harness import DEADLINE_S, Daemon, environment, integrity, rows, run, scanner_on, select, wait_for, write_config
from layouts import LINUX_AMD64, Layout, churn_corpus, named

from indexer import Index
from indexer.store import open_reader, read

TAG = ":churn"
Corpus = dict[str, dict[str, object]]


def document(corpus: Corpus, path: str, which: int) -> str:
    """The index.json text number *which* (0 or 1) of a churn layout."""
    return cast("list[str]", corpus[path]["documents"])[which]


def churn_digest(corpus: Corpus, path: str, which: int) -> str:
    """The digest ``:churn`` points at in document *which*."""
    return cast("list[str]", corpus[path]["churn"])[which]


def stored_now(db: str) -> dict[str, read.StoredLayout]:
    """The stored state of every layout, as a pass loads it at its start."""
    conn = open_reader(db)
    try:
        return {s.path: s for s in read.layouts(conn)}
    finally:
        conn.close()


def fresh_rows(tmp: str, root: str) -> dict[str, list[tuple[object, ...]]]:
    """The rows a fresh scan of *root* makes."""
    fresh = os.path.join(tmp, f"fresh-{time.monotonic_ns()}.db")
    assert run(tmp, "scan", "--db", fresh, root).rc == 0
    return rows(fresh)


def flip(path: str, text: str, *, rename: bool = True) -> None:
    """Write *text* as the layout's index.json, as umoci (rename) or skopeo (in place) would."""
    target = os.path.join(path, "index.json")
    if rename:
        with open(target + ".tmp", "w") as f:
            f.write(text)
        os.replace(target + ".tmp", target)
    else:
        with open(target, "w") as f:
            f.write(text)


def slow_pass(db: str, paths: list[str], stored: dict[str, read.StoredLayout]) -> None:
    """A pass that loaded *stored* at its start and examines *paths* only now (a long scan's tail)."""
    with scanner_on(db) as scanner:
        anyio.run(functools.partial(scanner.process, paths, stored=stored))


@pytest.mark.parametrize("rename", [True, False], ids=["rename", "in-place"])
def test_a_slow_pass_cannot_bring_back_a_middle_state(tmp_path: Path, rename: bool) -> None:
    # The lost update: a slow pass loads the stored state (A), another writer indexes B, the file is
    # rewritten back to A; the slow pass sees A's content hash equal to its stale snapshot's and, before
    # compare-and-set, only refreshed the identity: the index answered B as "indexed" until scan --full.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 3)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    stale = stored_now(db)
    for path in corpus:
        flip(path, document(corpus, path, 1), rename=rename)
    assert run(tmp, "scan", "--db", db, root).rc == 0  # the other writer: a real process
    for path in corpus:
        flip(path, document(corpus, path, 0), rename=rename)
    slow_pass(db, sorted(corpus), stale)
    with Index(db) as index:
        for path in corpus:
            answer = index.resolve_in(path, TAG)
            assert answer.digest == churn_digest(corpus, path, 0), "the middle state came back"
            assert answer.freshness == "indexed"
    assert rows(db) == fresh_rows(tmp, root)
    # and it stays so: a no-change scan proves the tree settled without writing anything
    assert run(tmp, "scan", "--db", db, root).rc == 0
    assert rows(db) == fresh_rows(tmp, root)


def test_a_slow_pass_does_not_remove_a_layout_another_writer_brought_back(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 2)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    stale = stored_now(db)
    victim = sorted(corpus)[0]
    os.rename(victim, victim + ".away")  # the slow pass's walk finds it missing ...
    os.rename(victim + ".away", victim)  # ... it comes back, changed, and another writer indexes it
    flip(victim, document(corpus, victim, 1))
    assert run(tmp, "scan", "--db", db, root).rc == 0

    from indexer.store.outcomes import Gone

    with scanner_on(db) as scanner:
        # the removal the slow pass decided from its stale walk, written after the other writer
        anyio.run(functools.partial(scanner.process, [], stored=stale, extra=[Gone(victim, stale[victim])]))
    with Index(db) as index:
        assert index.resolve_in(victim, TAG).digest == churn_digest(corpus, victim, 1)
    assert rows(db) == fresh_rows(tmp, root)


def test_a_conflict_is_examined_again_against_the_current_row(tmp_path: Path) -> None:
    # The slow pass's outcome for a layout that another writer changed since is not dropped: the
    # layout is examined again, so a change that only the slow pass saw still lands.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 1)
    (path,) = corpus
    assert run(tmp, "scan", "--db", db, root).rc == 0
    stale = stored_now(db)
    flip(path, document(corpus, path, 1))
    assert run(tmp, "scan", "--db", db, root).rc == 0
    layout = Layout(path)
    third = named(layout.manifest(platform=LINUX_AMD64, label="third"), ref="churn")
    layout.write_index([third])
    slow_pass(db, [path], stale)
    with Index(db) as index:
        answer = index.resolve_in(path, TAG)
    assert (answer.digest, answer.freshness) == (third["digest"], "indexed")
    assert rows(db) == fresh_rows(tmp, root)


def scans_beside_a_daemon(tmp: str, *, layouts: int, seconds: float, scans: int, seed: int) -> dict[str, object]:
    """Churn *layouts* (each flips :churn between two documents, back and forth) under a daemon while
    *scans* ``ocidx scan`` processes run one after another; then wait until the index equals a fresh
    scan. Returns figures: flips made, scans run, seconds to converge after the churn stopped."""
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, layouts)
    config = write_config(tmp, "[daemon]\nbatch_size = 16\ndebounce_ms = 20\nreconcile_interval_s = 3600\n")
    rng = random.Random(seed)
    paths = sorted(corpus)
    state = dict.fromkeys(paths, 0)
    flips = 0
    scan_args = [sys.executable, "-m", "indexer", "scan", "--db", db, "--config", config, "--no-progress", root]
    with Daemon(tmp, [root], db=db, config=config).start() as daemon:
        daemon.wait_ready()
        ran = 0
        deadline = time.monotonic() + seconds
        scan: subprocess.Popen[bytes] | None = None
        scan_log = os.path.join(tmp, "scan.log")
        while True:
            if scan is None or scan.poll() is not None:
                if scan is not None:
                    with open(scan_log, "rb") as f:
                        assert scan.returncode == 0, f.read()
                    ran += 1
                scan = None
                if ran < scans:
                    with open(scan_log, "wb") as log:
                        scan = subprocess.Popen(scan_args, stdout=subprocess.DEVNULL, stderr=log, env=environment(tmp))
            churning = time.monotonic() < deadline
            if churning:
                path = rng.choice(paths)
                state[path] = 1 - state[path]
                flip(path, document(corpus, path, state[path]), rename=rng.random() < 0.5)
                flips += 1
            elif scan is None:
                break
            time.sleep(0.002 if churning else 0.01)  # the churn's pace, not a synchronization
        stopped = time.monotonic()
        expected = fresh_rows(tmp, root)
        wait_for(lambda: rows(db) == expected, "the index to equal a fresh scan", timeout=DEADLINE_S)
        converged = time.monotonic() - stopped
        with Index(db) as index:
            for path in paths:
                answer = index.resolve_in(path, TAG)
                assert answer.digest == churn_digest(corpus, path, state[path])
        assert daemon.stop() == 0
    assert integrity(db) == "ok"
    # Once the racy window has passed, a no-change scan proves the tree settled and writes nothing.
    return {"layouts": layouts, "flips": flips, "scans": ran, "converged_s": round(converged, 3)}


def test_scans_beside_a_daemon_under_churn(tmp_path: Path) -> None:
    figures = scans_beside_a_daemon(str(tmp_path), layouts=40, seconds=4, scans=6, seed=9)
    print(figures)
    assert figures["scans"] == 6


def versions(db: str) -> dict[str, int]:
    """Each layout's version."""
    return dict(select(db, "SELECT path, version FROM layouts"))


def removals(db: str) -> dict[str, int]:
    """The removals kept for followers of the index."""
    return dict(select(db, "SELECT path, version FROM layout_removals"))


def counter(db: str, name: str) -> int:
    """A value of ocidx_counters."""
    return int(select(db, "SELECT value FROM ocidx_counters WHERE name = ?", name)[0][0])


def test_every_change_gets_a_new_version_and_nothing_else_does(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 3)
    a, b, c = sorted(corpus)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    first = versions(db)
    assert len(set(first.values())) == 1 and min(first.values()) > 0  # one transaction, one version
    os.utime(os.path.join(a, "index.json"))  # a touch: same content, nothing a follower needs to know
    assert run(tmp, "scan", "--db", db, root).rc == 0
    assert versions(db) == first
    flip(b, document(corpus, b, 1))
    assert run(tmp, "scan", "--db", db, root).rc == 0
    second = versions(db)
    assert second[b] > first[b] and second[a] == first[a] and second[c] == first[c]
    flip(a, "{broken")  # a broken file: its state is news, its last good rows stay
    assert run(tmp, "scan", "--db", db, root).rc == 0  # a broken layout is reported, not a failed scan
    third = versions(db)
    assert third[a] > second[b] and third[b] == second[b]
    flip(a, document(corpus, a, 0))  # restored to the content of its rows: the state is news again
    assert run(tmp, "scan", "--db", db, root).rc == 0
    fourth = versions(db)
    assert fourth[a] > third[a]
    away = os.path.join(tmp, "away")
    os.rename(c, away)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    assert c not in versions(db)
    assert removals(db) == {c: counter(db, "version")}
    os.rename(away, c)  # back again: no longer a removal
    assert run(tmp, "scan", "--db", db, root).rc == 0
    assert removals(db) == {} and versions(db)[c] == counter(db, "version")


def test_versions_follow_commit_order_across_writers(tmp_path: Path) -> None:
    # Two writer processes at once: versions are handed out under the write lock, so a follower that
    # has read everything up to version W has seen every change committed before it.
    tmp = str(tmp_path)
    root_a, root_b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    db = os.path.join(tmp, "index.db")
    churn_corpus(root_a, 60)
    churn_corpus(root_b, 60)
    config = write_config(tmp, "[daemon]\nbatch_size = 5\n")
    os.makedirs(os.path.join(tmp, "empty"))
    assert run(tmp, "scan", "--db", db, os.path.join(tmp, "empty")).rc == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "indexer", "scan", "--db", db, "--config", config, "--no-progress", root],
            stderr=subprocess.PIPE,
            env=environment(tmp),
        )
        for root in (root_a, root_b)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, err
    got = versions(db)
    assert len(got) == 120
    assert max(got.values()) == counter(db, "version")
    # 24 transactions of 5 layouts: each transaction's layouts share one version, no two share one.
    by_version: dict[int, int] = {}
    for version in got.values():
        by_version[version] = by_version.get(version, 0) + 1
    assert sorted(by_version.values()) == [5] * 24


def test_removals_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.store import write

    monkeypatch.setattr(write, "MAX_REMOVALS", 4)
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 10)
    with scanner_on(db) as scanner:
        anyio.run(scanner.process, sorted(corpus))
        for number, path in enumerate(sorted(corpus)):
            os.rename(path, os.path.join(tmp, f"away-{number}"))
            anyio.run(scanner.process, [path])  # one removal per transaction
    kept = removals(db)
    assert len(kept) == 4
    assert counter(db, "removals_pruned_through") == min(kept.values()) - 1


def test_a_follower_reads_a_consistent_state(tmp_path: Path) -> None:
    # What a follower does: in one read transaction, the counter and every row changed after its
    # watermark. While a writer churns, each such read must see each layout's rows as one document.
    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 20)
    assert run(tmp, "scan", "--db", db, root).rc == 0
    digests = {path: {churn_digest(corpus, path, 0), churn_digest(corpus, path, 1)} for path in corpus}
    config = write_config(tmp, "[daemon]\nbatch_size = 4\ndebounce_ms = 0\n")
    watermark = 0
    seen_versions: list[int] = []
    with Daemon(tmp, [root], db=db, config=config).start() as daemon:
        daemon.wait_ready()
        rng = random.Random(3)
        state = dict.fromkeys(corpus, 0)
        for _ in range(60):
            path = rng.choice(sorted(corpus))
            state[path] = 1 - state[path]
            flip(path, document(corpus, path, state[path]))
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                conn.execute("BEGIN")
                top = conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0]
                changed = conn.execute(
                    "SELECT l.path, n.tag, e.digest FROM layouts l JOIN entries e ON e.layout_id = l.id "
                    "JOIN names n ON n.entry_id = e.id WHERE l.version > ? AND l.version <= ?",
                    (watermark, top),
                ).fetchall()
                conn.execute("COMMIT")
            finally:
                conn.close()
            churn_of: dict[str, list[str]] = {}
            for path_value, tag, digest in changed:
                if tag == "churn":
                    churn_of.setdefault(path_value, []).append(digest)
            for path_value, found in churn_of.items():
                assert len(found) == 1 and found[0] in digests[path_value], (path_value, found)
            assert top >= watermark
            seen_versions.append(top)
            watermark = top
        assert daemon.stop() == 0
    assert seen_versions == sorted(seen_versions)


def test_future_timestamps_settle_after_a_second_read(tmp_path: Path) -> None:
    # An index.json whose mtime lies in the future (a file server's skewed clock, touch -d) can never
    # have "changed well before it was read": before, every lookup and every re-scan hashed it again,
    # forever. Two reads a racy window apart that see the same identity now prove it settled.
    from indexer.config import Root
    from indexer.scan.proof import settled
    from indexer.store.state import racy_layouts

    tmp = str(tmp_path)
    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    corpus = churn_corpus(root, 2)
    future = time.time_ns() + 365 * 24 * 3600 * 10**9
    for path in corpus:
        os.utime(os.path.join(path, "index.json"), ns=(future, future))
    assert run(tmp, "scan", "--db", db, root).rc == 0
    first_read = time.time_ns()
    assert settled(db, [Root(root)]) is None  # one read proves nothing about a future timestamp
    wait_for(lambda: time.time_ns() > first_read + read.RACY_WINDOW_NS, "the racy window to pass")
    assert run(tmp, "scan", "--db", db, root).rc == 0  # the second read: the same identity
    assert settled(db, [Root(root)]) == (2, 0)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert racy_layouts(conn) == {}
    finally:
        conn.close()
    with Index(db) as index:
        for path in corpus:
            assert index.view(path).freshness == "indexed"
    # and a rewrite keeping the future mtime is still seen: ctime moves
    path = sorted(corpus)[0]
    flip(path, document(corpus, path, 1), rename=False)
    os.utime(os.path.join(path, "index.json"), ns=(future, future))
    with Index(db) as index:
        answer = index.resolve_in(path, TAG)
    assert (answer.digest, answer.freshness) == (churn_digest(corpus, path, 1), "read-through")


def test_settles_at() -> None:
    window = read.RACY_WINDOW_NS
    # changed long before the read: settled by the change time
    assert read.settles_at(1_000, 1_000, 10 * window, None) == 1_000 + window + 1
    # a future change time: only a second read a window after the first settles it
    future = 100 * window
    assert read.settles_at(future, future, 10 * window, 10 * window) == 11 * window
    assert read.settles_at(future, future, 10 * window, None) == future + window + 1


def test_settles_at_sql_is_the_same_rule() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE layouts (mtime_ns INTEGER, ctime_ns INTEGER, read_ns INTEGER, identity_since_ns INTEGER)"
    )
    window = read.RACY_WINDOW_NS
    cases = [
        (1_000, 2_000, 10 * window, None),
        (1_000, 2_000, 10 * window, 9 * window),
        (100 * window, 100 * window, 10 * window, 10 * window),
        (100 * window, 5, 10 * window, None),
        (5, 100 * window, 12 * window, 8 * window),
    ]
    conn.executemany("INSERT INTO layouts VALUES (?, ?, ?, ?)", cases)
    got = [row[0] for row in conn.execute(f"SELECT {read.SETTLES_AT_SQL} FROM layouts ORDER BY rowid")]
    assert got == [read.settles_at(*case) for case in cases]
