"""The long, benchmark-sized variants of tests/test_reliability.py.

    python scripts/reliability.py crash --layouts 10000 --trials 20          # SIGKILL ocidx scan
    python scripts/reliability.py crash --layouts 10000 --trials 20 --daemon # SIGKILL the daemon
    python scripts/reliability.py torn --seconds 30 --readers 4 [--daemon]
    python scripts/reliability.py load --layouts 2000 --readers 4 --rate 200 --seconds 60 [--daemon]
    python scripts/reliability.py resources --layouts 2000 --rate 100 --seconds 600
    python scripts/reliability.py hostile --good 2000
    python scripts/reliability.py interleave --layouts 2000 --seconds 60 --scans 10  # scans beside a daemon
    python scripts/reliability.py wal --layouts 2000 --seconds 60 --rate 200          # a reader pins the WAL
    python scripts/reliability.py all                                         # each of the above, default sizes

Each command prints its figures as JSON on stdout (``--out FILE`` also writes them)
and exits non-zero when a check fails. The checks are exactly those of the test
suite (the same functions, imported from tests/test_reliability.py); only the
sizes and durations differ. docs/reliability.md records the latest figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]

import hostile  # noqa: E402
import test_interleaving  # noqa: E402
import test_reliability as t  # noqa: E402
import test_wal  # noqa: E402

from indexer.store import maintenance  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def crash(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """SIGKILL scan (or the daemon) at random points of an initial scan; integrity and rows every time."""
    root = os.path.join(tmp, "root")
    started = time.perf_counter()
    built = t.crash_corpus(root, args.layouts)
    built_s = time.perf_counter() - started
    records = t.crash_trials(
        tmp,
        root,
        len(built),
        args.trials,
        daemon=args.daemon,
        rng=random.Random(args.seed),
        jitter=args.jitter,
        batch_size=args.batch_size,
    )
    killed = [r for r in records if r["killed_at"] is not None]
    return {
        "check": "crash",
        "writer": "daemon" if args.daemon else "scan",
        "layouts": len(built),
        "batch_size": args.batch_size,
        "trials": len(records),
        "killed_mid_run": len(killed),
        "integrity_ok": sum(r["integrity"] == "ok" for r in records),
        "rows_equal_fresh_scan": sum(bool(r["rows_equal"]) for r in records),
        "kill_points": sorted(int(str(r["killed_at"])) for r in killed),
        "corpus_build_s": round(built_s, 1),
    }


def torn(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """In-place rewrites of one index.json under concurrent readers: only old or new digests, no errors."""
    out: dict[str, object] = {"check": "torn", "writer": "daemon" if args.daemon else "read-through"}
    failures: list[dict[str, object]] = []
    for same_length in (False, True):
        written, results = t.torn_write_run(
            tmp, seconds=args.seconds, readers=args.readers, same_length=same_length, daemon=args.daemon
        )
        key = "same_length" if same_length else "shorter_rewrite"
        out[key] = {"writer": written, "readers": [_reader_summary(r) for r in results]}
        failures.extend(r for r in results if r["errors"] or r["wrong"])
    out["failures"] = [_reader_summary(r) for r in failures]
    return out


def load(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """Readers in a loop while a churner changes layouts and scan (or the daemon) ingests them."""
    churned, results, writer = t.load_run(
        tmp, layouts=args.layouts, readers=args.readers, rate=args.rate, seconds=args.seconds, daemon=args.daemon
    )
    failures = [r for r in results if r["errors"] or r["wrong"]]
    if writer.get("failed"):
        failures.append(writer)
    return {
        "check": "load",
        "writer": "daemon" if args.daemon else "scan loop",
        "layouts": args.layouts,
        "changes": churned["changes"],
        "change_rate_per_s": round(int(str(churned["changes"])) / float(str(churned["seconds"])), 1),
        "writer_figures": writer,
        "readers": [_reader_summary(r) for r in results],
        "lookups": sum(int(str(r["lookups"])) for r in results),
        "p50_ms_max": max(float(str(r["p50_ms"])) for r in results),
        "p99_ms_max": max(float(str(r["p99_ms"])) for r in results),
        "failures": failures,
    }


def resources(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """The daemon's fds, RSS and threads, sampled while a churner changes layouts for a long time."""
    root, db = os.path.join(tmp, "res-root"), os.path.join(tmp, "res.db")
    corpus = t.churn_corpus(root, args.layouts)
    flag = os.path.join(tmp, "res-done")
    ready = [f"{flag}-reader-0"]
    samples: list[dict[str, int]] = []
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(t.Daemon(tmp, db, root))
        daemon.wait_ready(600)
        reader = t.spawn("reader", db, t.reader_queries(corpus, 0), ready[0], flag, 200, tmp=tmp, stack=stack)
        churn = t.spawn("churner", corpus, args.rate, args.seconds, 11, ready, flag, tmp=tmp, stack=stack)
        started = time.monotonic()
        # Until the churner is done (its done flag: its result is read only afterwards, as it
        # may be larger than a pipe's buffer).
        while not os.path.exists(flag) and churn.poll() is None:
            sample = t.process_resources(daemon.proc.pid)
            sample["t_s"] = round(time.monotonic() - started)
            samples.append(sample)
            time.sleep(args.sample_every)  # sampling period, not a synchronization
        churned = t.result_of(churn)
        reads = t.result_of(reader)
        final: dict[str, int] = churned["final"]  # type: ignore[assignment]
        expected = {path: str(corpus[path]["churn"][n]) for path, n in final.items()}  # type: ignore[index]
        t.wait_for(lambda: t.all_indexed(db, expected), "the daemon to index the final state", 600)
        samples.append({**t.process_resources(daemon.proc.pid), "t_s": round(time.monotonic() - started)})
        alive = daemon.proc.poll() is None
        rc = daemon.stop()
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 10)) :]  # after the first tenth: warmed up
    return {
        "check": "resources",
        "layouts": args.layouts,
        "seconds": args.seconds,
        "changes": churned["changes"],
        "daemon_alive_at_end": alive,
        "daemon_exit": rc,
        "fds": _spread([s["fds"] for s in warm]),
        "rss_kib": _spread([s["rss_kib"] for s in warm]),
        "threads": _spread([s["threads"] for s in warm]),
        "first_sample": samples[0],
        "samples": len(samples),
        "reader": _reader_summary(reads),
        "failures": [] if not (reads["errors"] or reads["wrong"]) and alive and rc == 0 else [_reader_summary(reads)],
    }


def hostile_check(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """The hostile catalogue among many good layouts, through scan and through the daemon."""
    started = time.perf_counter()
    t.scan_and_check(os.path.join(tmp, "scan"), good=args.good)
    scan_s = time.perf_counter() - started
    started = time.perf_counter()
    t.daemon_and_check(os.path.join(tmp, "daemon"), good=args.good, timeout=600)
    return {
        "check": "hostile",
        "cases": len(hostile.CASES),
        "good_layouts": args.good,
        "scan_check_s": round(scan_s, 1),
        "daemon_check_s": round(time.perf_counter() - started, 1),
        "failures": [],
    }


def interleave(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """``ocidx scan`` processes one after another beside a churned daemon; then the index must equal a fresh
    scan (the compare-and-set writes of docs/design.md)."""
    figures = test_interleaving.scans_beside_a_daemon(
        tmp, layouts=args.layouts, seconds=args.seconds, scans=args.scans, seed=args.seed
    )
    return {"check": "interleave", **figures, "failures": []}


def wal_check(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """A reader pins the WAL while the daemon ingests churn: how fast the WAL grows, that the daemon warns,
    and how soon after the reader goes the WAL is back down; then the file after most layouts go."""
    root, db = os.path.join(tmp, "wal-root"), os.path.join(tmp, "wal.db")
    corpus = t.churn_corpus(root, args.layouts)
    config = t.write_config(tmp, "[daemon]\nheartbeat_interval_s = 1\n")
    reading, release = os.path.join(tmp, "reading"), os.path.join(tmp, "release")
    flag = os.path.join(tmp, "wal-done")
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(t.Daemon(tmp, db, root, config=config))
        daemon.wait_ready(600)
        reader = subprocess.Popen([sys.executable, "-c", test_wal.READER, db, reading, release])
        stack.callback(lambda: reader.poll() is None and reader.kill())
        t.wait_for(lambda: os.path.exists(reading), "the reader to hold its read transaction")
        pinned_from = maintenance.wal_size(db)
        churn = t.spawn("churner", corpus, args.rate, args.seconds, 5, [reading], flag, tmp=tmp, stack=stack)
        churned = t.result_of(churn, timeout=args.seconds + 600)
        pinned_to = maintenance.wal_size(db)
        warned = b"cannot be checkpointed" in daemon.log()
        released = time.monotonic()
        open(release, "w").close()
        reader.wait(60)
        t.wait_for(lambda: maintenance.wal_size(db) <= maintenance.WAL_LIMIT_BYTES, "the WAL to come back down", 120)
        down_s = time.monotonic() - released
        t.wait_for(lambda: b"checkpointed again" in daemon.log(), "the daemon to say the WAL is released", 120)
        after = maintenance.wal_size(db)
        full_size = os.path.getsize(db)
        for path in sorted(corpus)[1:]:
            shutil.rmtree(path)
        t.wait_for(lambda: t.layout_count(db) == 1, "the daemon to drop the removed layouts", 600)
        t.wait_for(
            lambda: test_wal.page_counts(db)[1] < maintenance.VACUUM_MIN_FREE_PAGES,
            "the free pages to go back",
            600,
        )
        rc = daemon.stop()
    mib = 1024 * 1024
    return {
        "check": "wal",
        "layouts": args.layouts,
        "changes_while_pinned": churned["changes"],
        "wal_mib_while_pinned": round(pinned_to / mib, 1),
        "wal_growth_mib_per_s": round((pinned_to - pinned_from) / mib / args.seconds, 2),
        "daemon_warned": warned,
        "seconds_to_come_down": round(down_s, 2),
        "wal_mib_after": round(after / mib, 2),
        "db_mib_before_removals": round(full_size / mib, 1),
        "db_mib_after_removals": round(os.path.getsize(db) / mib, 2),
        "daemon_exit": rc,
        "failures": [] if warned and rc == 0 and after <= maintenance.WAL_LIMIT_BYTES else ["see figures"],
    }


def _spread(values: list[int]) -> dict[str, int]:
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}


def _reader_summary(result: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in result.items() if k not in ("stale_warnings", "answers")}


COMMANDS: dict[str, Callable[[argparse.Namespace, str], dict[str, object]]] = {
    "crash": crash,
    "torn": torn,
    "load": load,
    "resources": resources,
    "hostile": hostile_check,
    "interleave": interleave,
    "wal": wal_check,
}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=[*COMMANDS, "all"])
    p.add_argument("--layouts", type=int, default=None, help="crash: 10000; load: 2000; resources: 2000")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--daemon", action="store_true", help="the daemon is the writer (crash, torn, load)")
    p.add_argument("--batch-size", type=int, default=500, help="crash: [daemon] batch_size (500 is the default)")
    p.add_argument("--jitter", type=float, default=0.05, help="crash: random delay after the target row count (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=float, default=None, help="torn: 30; load: 60; resources: 600")
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--rate", type=float, default=None, help="changes per second (load: 200, resources: 100)")
    p.add_argument("--sample-every", type=float, default=5.0, help="resources: seconds between samples")
    p.add_argument("--good", type=int, default=2000, help="hostile: good layouts among the hostile ones")
    p.add_argument("--scans", type=int, default=10, help="interleave: ocidx scan runs beside the daemon")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", help="also write the JSON figures to this file")
    return p


# ``all``: each check with ``ocidx scan`` as the writer, then with the daemon (resources: the daemon only).
ALL = [
    ("crash", False),
    ("crash", True),
    ("torn", False),
    ("torn", True),
    ("load", False),
    ("load", True),
    ("resources", True),
    ("hostile", False),
    ("interleave", True),
    ("wal", True),
]

DEFAULTS: dict[str, dict[str, object]] = {
    "crash": {"layouts": 10000},
    "load": {"layouts": 2000, "seconds": 60.0, "rate": 200.0},
    "torn": {"seconds": 30.0},
    "resources": {"layouts": 2000, "seconds": 600.0, "rate": 100.0},
    "interleave": {"layouts": 2000, "seconds": 60.0},
    "wal": {"layouts": 2000, "seconds": 60.0, "rate": 200.0},
}


def run_one(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one command in a temporary directory of its own; its figures."""
    own = argparse.Namespace(**vars(args))
    for key, value in DEFAULTS.get(name, {}).items():
        if getattr(own, key) is None:
            setattr(own, key, value)
    tmp = tempfile.mkdtemp(prefix=f"ocidx-reliability-{name}-")
    started = time.perf_counter()
    try:
        try:
            figures = COMMANDS[name](own, tmp)
        except AssertionError as exc:
            figures = {"check": name, "failures": [str(exc)[:4000]]}
        figures["wall_s"] = round(time.perf_counter() - started, 1)
        return figures
    finally:
        if args.keep:
            sys.stderr.write(f"kept {tmp}\n")
        else:
            _remove(tmp)


def _remove(path: str) -> None:
    for directory, dirs, _files in os.walk(path):  # mode-000 directories from the hostile catalogue
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(directory, name), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    """Run the command(s); 0 when every check held."""
    args = parser().parse_args()
    plan = ALL if args.command == "all" else [(args.command, args.daemon)]
    results = []
    for name, daemon in plan:
        args.daemon = daemon
        figures = run_one(name, args)
        results.append(figures)
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
        sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r.get("failures") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
