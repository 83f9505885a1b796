"""Read your own writes: what a lookup's barrier with a live daemon costs, and whether it holds.

``python -m benchmarks.barrier [--layouts 10000] [--reps 15] [--trials 1000]``

A realistic tree (``benchmarks.generate``, modification times an hour old) is indexed by a live
``ocidx daemon``. Then:

* ``find :TAG``, whole process, with the daemon's barrier (what every ``find`` does now) beside the
  baseline measured in the same run: the same command in a process whose barrier is replaced by an
  immediate ``ok``, i.e. a find that trusts the live daemon without asking (what ``find`` did before).
  Median of *--reps* runs each, interleaved;
* the barrier's own round trip (``indexer.sync.barrier``), in-process: p50, p99, max;
* *--trials* times: a new tag written into a layout (the two ways real writers write ``index.json``,
  alternately), 1 ms of sleep, then ``Index.find`` of that tag in-process: how many answers include
  the change (the target: all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.generate import generate_tree, past_mtime_ns
from benchmarks.latency import new_index, percentile, write_in_place, write_renamed
from indexer.config import Config
from indexer.query import Index
from indexer.sync import barrier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The baseline: the same find, its barrier answered at once (a find that trusts the daemon unasked).
UNASKED = (
    "import sys, indexer.sync as s; s.barrier = lambda *a, **k: 'ok'; "
    "from indexer.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _find_seconds(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.barrier", description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, default=10_000, help="layouts in the tree (default 10000)")
    parser.add_argument("--reps", type=int, default=15, help="whole-process finds per variant (default 15)")
    parser.add_argument("--trials", type=int, default=1000, help="writes then finds (default 1000)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    parser.add_argument("--seed", default="barrier")
    parser.add_argument(
        "--graph",
        action="store_true",
        help="layouts with their content graphs (6.6 GB at 10,000; the barrier's cost is the same)",
    )
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="ocidx-barrier-")
    root, db = os.path.join(work, "root"), os.path.join(work, "index.db")
    config, log_path = os.path.join(work, "ocidx.toml"), os.path.join(work, "daemon.log")
    env = {k: v for k, v in os.environ.items() if k not in ("OCIDX_DB", "OCIDX_CONFIG", "OCIDX_WATCH_MODE")}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        tree = generate_tree(root, args.layouts, args.seed, mtime_ns=past_mtime_ns(), graph=args.graph)
        print(f"tree: {len(tree.layouts)} layouts, {tree.entries} entries")
        with open(config, "w", encoding="utf-8") as fh:
            fh.write("[daemon]\ndebounce_ms = 100\n")
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "indexer", "daemon", "--config", config, "--db", db, root],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 600
        while barrier(db, daemon.pid) != "ok":
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not become ready")
            time.sleep(0.05)

        tag = "latest"
        find = ["find", "--db", db, f":{tag}"]
        asked: list[float] = []
        unasked: list[float] = []
        for _ in range(args.reps):
            asked.append(_find_seconds([sys.executable, "-m", "indexer", *find], env))
            unasked.append(_find_seconds([sys.executable, "-c", UNASKED, *find], env))
        with_barrier, without = statistics.median(asked), statistics.median(unasked)
        print(f"find :{tag}, whole process (median of {args.reps}):")
        print(f"  with the barrier      {with_barrier * 1000:8.1f} ms")
        print(f"  baseline (unasked)    {without * 1000:8.1f} ms")
        print(f"  ratio                 {with_barrier / without:8.2f}x   (target <= 1.3x)")

        round_trips = []
        for _ in range(200):
            started = time.perf_counter()
            answer = barrier(db, daemon.pid)
            round_trips.append(time.perf_counter() - started)
            assert answer == "ok", answer
        print(
            f"barrier round trip, idle daemon: p50 {percentile(round_trips, 0.5) * 1000:.2f} ms, "
            f"p99 {percentile(round_trips, 0.99) * 1000:.2f} ms, max {max(round_trips) * 1000:.2f} ms"
        )

        rng = random.Random(args.seed)
        layouts = sorted(tree.layouts)
        seen = 0
        trial_seconds: list[float] = []
        with Index(db, config=Config()) as index:
            for trial in range(args.trials):
                path = rng.choice(layouts)
                index_path = os.path.join(path, "index.json")
                with open(index_path, "rb") as fh:
                    data, _digest = new_index(path, fh.read(), trial)
                wanted = f"trial-{trial}"
                data = data.replace(b'"ocidx-latency"', json.dumps(wanted).encode())
                (write_renamed if trial % 2 else write_in_place)(index_path, data)
                time.sleep(0.001)
                started = time.perf_counter()
                found = index.find(f":{wanted}")
                trial_seconds.append(time.perf_counter() - started)
                seen += any(answer.layout == os.path.realpath(path) for answer in found)
        p50, p99 = percentile(trial_seconds, 0.5) * 1000, percentile(trial_seconds, 0.99) * 1000
        print(
            f"a change made 1 ms before the lookup: included in {seen} of {args.trials} answers "
            f"(find p50 {p50:.1f} ms, p99 {p99:.1f} ms)"
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "layouts": len(tree.layouts),
                        "find_with_barrier_s": with_barrier,
                        "find_unasked_s": without,
                        "ratio": with_barrier / without,
                        "round_trip_p50_ms": percentile(round_trips, 0.5) * 1000,
                        "round_trip_p99_ms": percentile(round_trips, 0.99) * 1000,
                        "trials": args.trials,
                        "seen": seen,
                    }
                )
            )
        return 0 if seen == args.trials else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
