"""The content graph's figures (issue 19), each beside a baseline measured in the same run.

``python -m benchmarks.content_graph --tree TREE [--old-code DIR] [--reps 3] [--data DIR]``

* the cold ``ocidx scan`` of TREE (a tree of ``benchmarks.generate``'s content graphs) beside the
  plain single-threaded script doing the same reads (``benchmarks/baseline_scan.py --graph``), and
  beside the cold scan of the same tree by ocidx before the content graph (``--old-code``: a checkout
  of that ocidx, run with ``PYTHONPATH`` and ``PYTHONSAFEPATH``), interleaved run by run so that
  load on the machine hits them alike; the peak RSS of the scan and its worker processes together (sampled every 10 ms);
* the no-change re-scan beside the same by ocidx before the graph, each on its own database;
* the database's bytes per layout, before the graph (the old code's database) and with it;
* ``ocidx du --json`` of every layout, whole process;
* ``Index.find('@LAYER')`` and ``Index.referrers('@DIGEST')`` in process, CPU time p50 and p99, on
  a database of 1,000 blobs beside one of 1,000,000 (the same real layout answers; the rest of the
  graph's tables is filled with synthetic manifests, layers and referrers around it).

Nothing here rewrites RESULTS.md: the figures are printed as its table rows, to be copied by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import Figure, Proc, percentile, run_process, table, tree_rss_kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(REPO, "benchmarks", "baseline_scan.py")


def _fresh(db: str) -> None:
    for suffix in ("", "-wal", "-shm", ".migrate-lock", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(db + suffix)


def _scan(db: str, tree: str, env: dict[str, str], *, peak: bool = False) -> tuple[Proc, int]:
    """One ``ocidx scan`` as a whole process (its peak RSS with its workers, sampled, when *peak*)."""
    top = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal top
        while not stop.wait(0.01):
            top = max(top, tree_rss_kb(os.getpid(), skip_self=True))

    sampler = threading.Thread(target=sample, daemon=True)
    if peak:
        sampler.start()
    try:
        proc = run_process([sys.executable, "-m", "indexer", "scan", "--db", db, "--no-progress", tree], env=env)
    finally:
        stop.set()
        if peak:
            sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"ocidx scan exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc, top


def cold_scans(
    tree: str, data: str, reps: int, old: str | None, baseline: str = BASELINE
) -> tuple[list[Figure], list[str], str, str | None]:
    """The cold scan beside the baseline script and the old code; the databases it leaves."""
    # PYTHONSAFEPATH: the working directory (a checkout) is not put before PYTHONPATH on sys.path,
    # or `python -m indexer` run from this checkout would measure it under the old code's name.
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONSAFEPATH": "1"}
    old_env = {**os.environ, "PYTHONPATH": old, "PYTHONSAFEPATH": "1"} if old else None
    new_db, old_db, base_db = (os.path.join(data, name) for name in ("new.db", "old.db", "baseline.db"))
    new: list[Proc] = []
    olds: list[Proc] = []
    base: list[Proc] = []
    peaks: list[int] = []
    for _ in range(reps):
        _fresh(new_db)
        proc, peak = _scan(new_db, tree, env, peak=True)
        new.append(proc)
        peaks.append(peak)
        _fresh(base_db)
        proc = run_process([sys.executable, baseline, "--graph", tree, base_db], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the baseline exited {proc.returncode}: {proc.stderr[-2000:]}")
        base.append(proc)
        if old_env is not None:
            _fresh(old_db)
            olds.append(_scan(old_db, tree, old_env)[0])
    layouts = sum(1 for _ in _layouts(tree))
    median = statistics.median
    scan_s = median(p.seconds for p in new)
    figures = [
        Figure(
            f"cold `ocidx scan` with the content graph, {layouts:,} layouts (median of {reps}, 2 cores)",
            scan_s,
            "s",
            "plain single-threaded script doing the same reads (benchmarks/baseline_scan.py --graph)",
            median(p.seconds for p in base),
            "≤ 1.0x",
            scan_s <= median(p.seconds for p in base),
        )
    ]
    if olds:
        figures.append(
            Figure(
                f"cold `ocidx scan` with the content graph, {layouts:,} layouts (median of {reps})",
                scan_s,
                "s",
                "ocidx before the content graph, the same tree",
                median(p.seconds for p in olds),
                "≤ 1.5x",
                scan_s <= 1.5 * median(p.seconds for p in olds),
            )
        )
    figures.append(
        Figure(
            f"peak RSS of the cold scan and its worker processes together, {layouts:,} layouts (sampled every 10 ms)",
            max(peaks) / 1024,
            "MB",
            "none",
            None,
            "< 250 MB",
            max(peaks) / 1024 < 250,
        )
    )
    notes = [
        f"cold scans: ocidx {', '.join(f'{p.seconds:.1f}' for p in new)} s; baseline "
        f"{', '.join(f'{p.seconds:.1f}' for p in base)} s"
        + (f"; ocidx before the graph {', '.join(f'{p.seconds:.1f}' for p in olds)} s" if olds else "")
    ]
    return figures, notes, new_db, (old_db if olds else None)


def _layouts(tree: str) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(tree):
        if "blobs" in subdirs:
            subdirs.remove("blobs")
        if "index.json" in files:
            found.append(directory)
    return found


def rescans(tree: str, new_db: str, old_db: str | None, old: str | None, reps: int) -> list[Figure]:
    """The no-change re-scan, beside the old code's on its own database (interleaved, median)."""
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONSAFEPATH": "1"}
    old_env = {**os.environ, "PYTHONPATH": old or "", "PYTHONSAFEPATH": "1"}
    for _ in range(2):  # settle racily clean identities (a second read a window later) and warm caches
        _scan(new_db, tree, env)
        if old_db is not None:
            _scan(old_db, tree, old_env)
    new: list[float] = []
    olds: list[float] = []
    for _ in range(reps):
        new.append(_scan(new_db, tree, env)[0].seconds)
        if old_db is not None:
            olds.append(_scan(old_db, tree, old_env)[0].seconds)
    value = statistics.median(new)
    baseline = statistics.median(olds) if olds else None
    return [
        Figure(
            f"re-scan, nothing changed (median of {reps})",
            value,
            "s",
            "the same by ocidx before the content graph, its own database",
            baseline,
            "≤ 1.1x",
            None if baseline is None else value <= 1.1 * baseline,
        )
    ]


def db_bytes(new_db: str, old_db: str | None, layouts: int) -> list[Figure]:
    """The database's size per layout, with the graph and before it."""
    for db in (new_db, old_db):
        if db is not None:
            with sqlite3.connect(db) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    value = os.path.getsize(new_db) / layouts / 1024
    baseline = os.path.getsize(old_db) / layouts / 1024 if old_db is not None else None
    return [
        Figure(
            f"database bytes per layout ({layouts:,} layouts; {os.path.getsize(new_db) / 1e6:.0f} MB in all)",
            value,
            "KiB",
            "ocidx before the content graph, the same tree",
            baseline,
            "reported",
            None,
        )
    ]


def du_whole_process(db: str, reps: int) -> list[Figure]:
    """``ocidx du --json`` of every layout, whole process, beside the interpreter starting alone."""
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONSAFEPATH": "1"}
    argv = [sys.executable, "-m", "indexer", "du", "--db", db, "--json"]
    runs = []
    for _ in range(reps + 1):
        proc = run_process(argv, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"ocidx du exited {proc.returncode}: {proc.stderr[-2000:]}")
        runs.append(proc.seconds)
    bare = [run_process([sys.executable, "-c", "import sqlite3, json, argparse"]).seconds for _ in range(reps)]
    layouts = len(json.loads(proc.stdout)["layouts"])
    value = statistics.median(runs[1:])
    return [
        Figure(
            f"`ocidx du --json` over {layouts:,} layouts, whole process (median of {reps})",
            value,
            "s",
            '`python -c "import sqlite3, json, argparse"`',
            statistics.median(bare),
            "≤ 1 s",
            value <= 1.0,
        )
    ]


# -- lookups flat in the number of blobs ---------------------------------------------------------------


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _graph_db(source: str, target: str, blobs: int) -> None:
    """*source* (a database of a real layout) copied to *target* with the graph's tables grown to about
    *blobs* blobs: synthetic manifests of 9 layers and a config each, every tenth a referrer."""
    from indexer.graph import graph_key

    shutil.copy(source, target)
    manifests = max(1, blobs // 10)
    conn = sqlite3.connect(target)
    try:
        conn.execute("BEGIN")
        rows: list[tuple[object, ...]] = []
        users: list[tuple[int, int]] = []
        configs: list[tuple[object, ...]] = []
        for n in range(manifests):
            digest = _digest(f"manifest {n}")
            config = _digest(f"config {n}")
            layers = [
                [_digest(f"layer {n % 5000} {k}" if k < 4 else f"layer {n} {k}"), 1000 + k, "x"] for k in range(9)
            ]
            subject = _digest(f"manifest {n - 1}") if n % 10 == 9 else None
            rows.append(
                (graph_key(digest), digest, "manifest", "application/vnd.oci.image.manifest.v1+json", 500, "",
                 subject, None, config, graph_key(config), "application/vnd.oci.image.config.v1+json", 300,
                 json.dumps(layers), 9, 100_000, 1, None)
            )  # fmt: skip
            users.extend((graph_key(str(layer[0])), graph_key(digest)) for layer in layers)
            configs.append((graph_key(config), config, "linux", "amd64", None, None, None, None, None))
            if len(rows) >= 50_000:
                _flush(conn, rows, users, configs)
        _flush(conn, rows, users, configs)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()


def _flush(
    conn: sqlite3.Connection,
    rows: list[tuple[object, ...]],
    users: list[tuple[int, int]],
    configs: list[tuple[object, ...]],
) -> None:
    conn.executemany("INSERT OR IGNORE INTO manifests VALUES (" + ",".join("?" * 17) + ")", rows)
    conn.executemany("INSERT OR IGNORE INTO layer_users VALUES (?, ?)", users)
    conn.executemany("INSERT OR IGNORE INTO configs VALUES (" + ",".join("?" * 9) + ")", configs)
    rows.clear()
    users.clear()
    configs.clear()


def _probe_layout(root: str) -> tuple[str, str]:
    """A real layout: one image and a referrer of it; (the image's base layer, the image's digest)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from layouts import LINUX_AMD64, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Layout, canonical_json, named

    lay = Layout(os.path.join(root, "probe"))
    config = lay.blob(canonical_json({**LINUX_AMD64, "created": "2025-01-01T00:00:00Z"}), OCI_CONFIG)
    layer = lay.blob(b"the probe's base layer", OCI_LAYER)
    image = lay.blob(
        canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}),
        OCI_MANIFEST,
    )
    empty = lay.blob(b"{}", "application/vnd.oci.empty.v1+json")
    referrer = lay.blob(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/spdx+json",
                "config": empty,
                "layers": [lay.blob(b"spdx", "application/spdx+json")],
                "subject": image,
            }
        ),
        OCI_MANIFEST,
    )
    lay.write_index([named(image, ref="v1"), referrer])
    old = time.time() - 3600  # settled: no lookup has to read it through
    for directory, _dirs, files in os.walk(lay.path):
        for name in [*files, "."]:
            os.utime(os.path.join(directory, name), (old, old))
    return str(layer["digest"]), str(image["digest"])


def _cpu_percentiles(fn: object, iterations: int) -> tuple[float, float]:
    samples = []
    for _ in range(iterations):
        started = time.process_time()
        fn()  # type: ignore[operator]
        samples.append((time.process_time() - started) * 1e6)
    samples.sort()
    return percentile(samples, 0.5), percentile(samples, 0.99)


def flat_lookups(data: str, iterations: int) -> list[Figure]:
    """``find @LAYER`` and ``referrers @DIGEST`` in process, at 1,000 and 1,000,000 blobs."""
    from indexer.query import Index

    root = os.path.join(data, "probe-root")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    layer, image = _probe_layout(root)
    seed = os.path.join(data, "probe.db")
    _fresh(seed)
    proc = run_process([sys.executable, "-m", "indexer", "scan", "--db", seed, "--no-progress", root])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    results: dict[int, dict[str, tuple[float, float]]] = {}
    for blobs in (1_000, 1_000_000):
        db = os.path.join(data, f"probe-{blobs}.db")
        _fresh(db)
        _graph_db(seed, db, blobs)
        with Index(db) as index:
            assert [a.source for a in index.find(f"@{layer}")] == ["layer"]
            assert [r.how for r in index.referrers(f"@{image}")] == ["subject"]
            results[blobs] = {
                "find": _cpu_percentiles(lambda index=index: index.find(f"@{layer}"), iterations),
                "referrers": _cpu_percentiles(lambda index=index: index.referrers(f"@{image}"), iterations),
            }
    figures = []
    for what, label in (("find", "Index.find('@LAYER')"), ("referrers", "Index.referrers('@DIGEST')")):
        for at, name in ((0, "p50"), (1, "p99")):
            value, baseline = results[1_000_000][what][at], results[1_000][what][at]
            figures.append(
                Figure(
                    f"{label}, {name}, 1M blobs, CPU time",
                    value,
                    "µs",
                    "same at 1k blobs",
                    baseline,
                    "≤ 1.3x",
                    value <= 1.3 * baseline,
                )
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    """Print the content graph's figures as RESULTS.md rows."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.content_graph", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", required=True, help="a generated tree of content graphs")
    parser.add_argument("--old-code", help="a checkout of ocidx before the content graph, for the old figures")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--baseline", default=BASELINE, help="the baseline script (default: benchmarks/baseline_scan.py)"
    )
    parser.add_argument("--data", help="where the databases go (default: a temporary directory)")
    parser.add_argument("--iterations", type=int, default=300, help="lookups per in-process figure")
    parser.add_argument("--only", default="scan,rescan,bytes,du,lookups")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    data = args.data or tempfile.mkdtemp(prefix="ocidx-graph-bench-")
    os.makedirs(data, exist_ok=True)
    figures: list[Figure] = []
    notes: list[str] = []
    started = time.perf_counter()
    new_db, old_db = os.path.join(data, "new.db"), os.path.join(data, "old.db") if args.old_code else None
    if "scan" in only:
        scanned, said, new_db, old_db = cold_scans(args.tree, data, args.reps, args.old_code, args.baseline)
        figures += scanned
        notes += said
    if "rescan" in only:
        figures += rescans(args.tree, new_db, old_db, args.old_code, max(5, args.reps))
    if "bytes" in only:
        figures += db_bytes(new_db, old_db, len(_layouts(args.tree)))
    if "du" in only:
        figures += du_whole_process(new_db, max(5, args.reps))
    if "lookups" in only:
        figures += flat_lookups(data, args.iterations)
    print("\n".join(table(figures)))
    for note in notes:
        print(f"- {note}")
    print(f"- {time.perf_counter() - started:.0f} s in all; load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
