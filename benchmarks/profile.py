"""Profiles behind the benchmark figures: where the time of each missed target goes.

``python -m benchmarks.profile scan ROOT`` runs the scanner's own steps
(discover, ``examine_batch``, ``apply``) single-threaded under cProfile, so
the work that ``ocidx scan`` does in worker threads is visible (cProfile sees
one thread only); ``rescan ROOT DB`` does the same for a pass where nothing
changed; ``resolve DB TARGET`` and ``find DB REF`` profile the CLI in-process;
``digest DB LAYOUT DIGEST`` shows the query plans of a digest lookup;
``memory ROOT`` reports the peak of Python allocations of a scan's steps;
``shares ROOT`` prints (as JSON) the CPU time of the cold scan's parse, transfer and write steps,
each run alone in this process, for the runner's estimate of how the scan scales with cores.
Each other profile prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def _top(profiler: cProfile.Profile, limit: int, sort: str = "cumulative") -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(sort).print_stats(limit)
    text = out.getvalue()
    # Keep the table, drop pstats' preamble of file names.
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


def _profiled(label: str, func: Callable[[], object], limit: int) -> object:
    # CPU time of this thread, not wall time: on a shared machine, preemption would be charged
    # to whatever function happened to be running.
    profiler = cProfile.Profile(time.thread_time)
    started = time.perf_counter()
    profiler.enable()
    result = func()
    profiler.disable()
    print(f"== {label}: {time.perf_counter() - started:.3f}s wall under cProfile, times below are thread CPU time")
    print(_top(profiler, limit))
    print(f"== {label}: by own time")
    print(_top(profiler, limit // 2, "tottime"))
    return result


def profile_scan(root: str, limit: int) -> None:
    """The cold scan's three steps, one after the other, each under cProfile."""
    from indexer.config import Config, Root
    from indexer.scan.decide import examine_batch
    from indexer.scan.discovery import discover
    from indexer.store import open_writer
    from indexer.store.deferred import defer_indexes, restore_indexes
    from indexer.store.write import apply

    config = Config()
    with tempfile.TemporaryDirectory() as tmp:
        conn = open_writer(os.path.join(tmp, "profile.db"))
        paths = _profiled("discover", lambda: list(discover(Root(os.path.abspath(root)))), limit)
        assert isinstance(paths, list)
        size = config.daemon.batch_size
        batches = [paths[i : i + size] for i in range(0, len(paths), size)]
        outcomes = _profiled(
            "examine_batch (read + parse, the worker thread's part)",
            lambda: [examine_batch(b, {}, config=config, full=False) for b in batches],
            limit,
        )
        assert isinstance(outcomes, list)

        def write() -> None:
            defer_indexes(conn)  # as Scanner.process does for a cold build
            for batch in outcomes:
                apply(conn, batch)
            restore_indexes(conn)

        _profiled("apply (the writer's part, indexes deferred as in a cold build)", write, limit)
        conn.close()


def profile_rescan(root: str, db: str, limit: int) -> None:
    """A pass where nothing changed: load the stored state, discover, stat."""
    from indexer.config import Config, Root
    from indexer.scan.decide import examine_batch
    from indexer.scan.discovery import discover
    from indexer.store import open_writer
    from indexer.store import read as db_read

    config = Config()
    conn = _profiled("open_writer (migrations check)", lambda: open_writer(db), limit)
    stored = _profiled("load stored layouts", lambda: {s.path: s for s in db_read.layouts(conn)}, limit)  # type: ignore[arg-type]
    assert isinstance(stored, dict)
    paths = _profiled("discover", lambda: list(discover(Root(os.path.abspath(root)))), limit)
    assert isinstance(paths, list)
    outcomes = _profiled(
        "examine_batch (stat only)", lambda: examine_batch(paths, stored, config=config, full=False), limit
    )
    assert outcomes == [], f"{len(outcomes)} layouts changed"  # type: ignore[arg-type]


def profile_cli(argv: list[str], limit: int) -> None:
    """One CLI command in-process (after its imports: see ``python -X importtime`` for those)."""
    from indexer import cli

    def quiet() -> int:
        saved = sys.stdout
        sys.stdout = io.StringIO()
        try:
            return cli.main(argv)
        finally:
            sys.stdout = saved

    code = _profiled(f"ocidx {' '.join(argv)}", quiet, limit)
    print(f"exit {code}")


def explain_digest(db: str, layout: str, digest: str) -> None:
    """Query plans and timings of the two statements of a layout-scoped digest lookup."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (layout_id,) = conn.execute("SELECT id FROM layouts WHERE path = ?", (os.path.realpath(layout),)).fetchone()
    statements = {
        "entries": "SELECT e.id FROM entries e WHERE e.digest = ? AND e.layout_id = ? ORDER BY e.layout_id, e.position",
        "children": "SELECT c.entry_id FROM children c WHERE c.digest = ? AND c.layout_id = ? "
        "ORDER BY c.layout_id, c.entry_id, c.position",
    }
    for table, sql in statements.items():
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, (digest, layout_id))]
        (rows_with_digest,) = conn.execute(f"SELECT count(*) FROM {table} WHERE digest = ?", (digest,)).fetchone()
        started = time.perf_counter()
        for _ in range(200):
            conn.execute(sql, (digest, layout_id)).fetchall()
        took = (time.perf_counter() - started) / 200 * 1e6
        print(f"{table}: plan {plan}; {rows_with_digest} rows hold this digest; {took:.1f} µs per query")


def profile_memory(root: str) -> None:
    """Peak Python allocations of the scanner's steps (tracemalloc), largest allocation sites."""
    import tracemalloc

    from indexer.config import Config, Root
    from indexer.scan.decide import examine_batch
    from indexer.scan.discovery import discover
    from indexer.store import open_writer
    from indexer.store.write import apply

    config = Config()
    tracemalloc.start(10)
    with tempfile.TemporaryDirectory() as tmp:
        conn = open_writer(os.path.join(tmp, "profile.db"))
        paths = list(discover(Root(os.path.abspath(root))))
        size = config.daemon.batch_size
        peak_batch = 0
        for i in range(0, len(paths), size):
            tracemalloc.reset_peak()
            outcomes = examine_batch(paths[i : i + size], {}, config=config, full=False)
            apply(conn, outcomes)
            peak_batch = max(peak_batch, tracemalloc.get_traced_memory()[1])
        current, _ = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
        conn.close()
    held, peak = current / 2**20, peak_batch / 2**20
    print(f"traced Python memory: {held:.1f} MB held at the end, peak within one batch {peak:.1f} MB")
    for stat in snapshot.statistics("traceback")[:8]:
        print(f"{stat.size / 2**20:.1f} MB in {stat.count} blocks")
        for line in stat.traceback.format()[-6:]:
            print("   ", line)


def shares(root: str) -> dict[str, float]:
    """CPU seconds of the cold scan's steps over *root*: parse (what the workers do), transfer (packing
    in a worker, unpacking in the parent), write (deciding and applying, the one writer's part)."""
    import marshal

    from indexer.config import Config, Root
    from indexer.scan import workers
    from indexer.scan.decide import decide
    from indexer.scan.discovery import discover
    from indexer.store import open_writer
    from indexer.store.deferred import defer_indexes, restore_indexes
    from indexer.store.write import apply

    config = Config()
    paths = list(discover(Root(os.path.abspath(root))))
    size = config.daemon.batch_size
    batches = [paths[i : i + size] for i in range(0, len(paths), size)]
    started = time.process_time()
    results = [workers.read_batch(b, config.familiar, config.limits) for b in batches]
    parse = time.process_time() - started
    started = time.process_time()
    blobs = [marshal.dumps(r) for r in results]
    pack = time.process_time() - started
    started = time.process_time()
    results = [workers.unpack(b) for b in blobs]
    unpack = time.process_time() - started
    with tempfile.TemporaryDirectory() as tmp:
        conn = open_writer(os.path.join(tmp, "shares.db"))
        started = time.process_time()
        defer_indexes(conn)
        for batch in results:
            apply(conn, [o for r in batch if (o := decide(r, None, full=False)) is not None])
        restore_indexes(conn)
        write = time.process_time() - started
        conn.close()
    return {
        "layouts": len(paths),
        "parse_s": parse,
        "pack_s": pack,
        "unpack_s": unpack,
        "write_s": write,
        "transfer_bytes": sum(map(len, blobs)),
    }


def main(argv: list[str] | None = None) -> int:
    """Dispatch one profile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=30, help="rows of each table")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("scan").add_argument("root")
    p = sub.add_parser("rescan")
    p.add_argument("root")
    p.add_argument("db")
    p = sub.add_parser("resolve")
    p.add_argument("db")
    p.add_argument("target")
    p = sub.add_parser("find")
    p.add_argument("db")
    p.add_argument("ref")
    p = sub.add_parser("digest")
    p.add_argument("db")
    p.add_argument("layout")
    p.add_argument("digest")
    sub.add_parser("memory").add_argument("root")
    sub.add_parser("shares").add_argument("root")
    args = parser.parse_args(argv)
    os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="ocidx-profile-"))
    if args.what == "scan":
        profile_scan(args.root, args.limit)
    elif args.what == "rescan":
        profile_rescan(args.root, args.db, args.limit)
    elif args.what == "resolve":
        profile_cli(["resolve", "--db", args.db, args.target], args.limit)
    elif args.what == "find":
        profile_cli(["find", "--db", args.db, args.ref], args.limit)
    elif args.what == "digest":
        explain_digest(args.db, args.layout, args.digest)
    elif args.what == "shares":
        import json

        print(json.dumps(shares(args.root)))
    else:
        profile_memory(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
