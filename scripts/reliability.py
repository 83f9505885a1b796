"""The long, benchmark-sized variants of tests/test_reliability.py.

    python scripts/reliability.py crash --layouts 10000 --trials 20          # SIGKILL ocidx scan
    python scripts/reliability.py crash --layouts 10000 --trials 20 --daemon # SIGKILL the daemon
    python scripts/reliability.py torn --seconds 30 --readers 4 [--daemon]
    python scripts/reliability.py load --layouts 2000 --readers 4 --rate 200 --seconds 60 [--daemon]
    python scripts/reliability.py resources --layouts 2000 --rate 100 --seconds 600
    python scripts/reliability.py hostile --good 2000
    python scripts/reliability.py interleave --layouts 2000 --seconds 60 --scans 10  # scans beside a daemon
    python scripts/reliability.py wal --layouts 2000 --seconds 60 --rate 200          # a reader pins the WAL
    python scripts/reliability.py hostile-user --layouts 2000                    # other users and writers
    python scripts/reliability.py faults --layouts 2000                          # faults of the environment
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

import harness  # noqa: E402
import hostile  # noqa: E402
import layouts as layouts_mod  # noqa: E402
import test_faults  # noqa: E402
import test_hostile_user  # noqa: E402
import test_interleaving  # noqa: E402
import test_reliability as t  # noqa: E402
import test_wal  # noqa: E402
import test_workers  # noqa: E402

from indexer.layout import INDEX_MEDIA_TYPES  # noqa: E402
from indexer.store import maintenance, path_of  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


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
    corpus = layouts_mod.churn_corpus(root, args.layouts)
    flag = os.path.join(tmp, "res-done")
    ready = [f"{flag}-reader-0"]
    samples: list[dict[str, int]] = []
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(harness.Daemon(tmp, [root], db=db).start())
        daemon.wait_ready(600)
        reader = t.spawn("reader", db, t.reader_queries(corpus, 0), ready[0], flag, 200, tmp=tmp, stack=stack)
        churn = t.spawn("churner", corpus, args.rate, args.seconds, 11, ready, flag, tmp=tmp, stack=stack)
        started = time.monotonic()
        # Until the churner is done (its done flag: its result is read only afterwards, as it
        # may be larger than a pipe's buffer).
        while not os.path.exists(flag) and churn.poll() is None:
            sample = t.process_resources(daemon.pid)
            sample["t_s"] = round(time.monotonic() - started)
            samples.append(sample)
            time.sleep(args.sample_every)  # sampling period, not a synchronization
        churned = t.result_of(churn)
        reads = t.result_of(reader)
        final: dict[str, int] = churned["final"]  # type: ignore[assignment]
        expected = {path: str(corpus[path]["churn"][n]) for path, n in final.items()}  # type: ignore[index]
        harness.wait_for(lambda: t.all_indexed(db, expected), "the daemon to index the final state", 600)
        samples.append({**t.process_resources(daemon.pid), "t_s": round(time.monotonic() - started)})
        alive = not daemon.exited()
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
    corpus = layouts_mod.churn_corpus(root, args.layouts)
    config = harness.write_config(tmp, "[daemon]\nheartbeat_interval_s = 1\n")
    reading, release = os.path.join(tmp, "reading"), os.path.join(tmp, "release")
    flag = os.path.join(tmp, "wal-done")
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(harness.Daemon(tmp, [root], db=db, config=config).start())
        daemon.wait_ready(600)
        reader = subprocess.Popen([sys.executable, "-c", test_wal.READER, db, reading, release])
        stack.callback(lambda: reader.kill() if reader.poll() is None else None)
        harness.wait_for(lambda: os.path.exists(reading), "the reader to hold its read transaction")
        pinned_from = maintenance.wal_size(db)
        churn = t.spawn("churner", corpus, args.rate, args.seconds, 5, [reading], flag, tmp=tmp, stack=stack)
        churned = t.result_of(churn, timeout=args.seconds + 600)
        pinned_to = maintenance.wal_size(db)
        warned = "cannot be checkpointed" in daemon.log()
        released = time.monotonic()
        open(release, "w").close()
        reader.wait(60)
        harness.wait_for(
            lambda: maintenance.wal_size(db) <= maintenance.WAL_LIMIT_BYTES, "the WAL to come back down", 120
        )
        down_s = time.monotonic() - released
        harness.wait_for(lambda: "checkpointed again" in daemon.log(), "the daemon to say the WAL is released", 120)
        after = maintenance.wal_size(db)
        full_size = os.path.getsize(db)
        for path in sorted(corpus)[1:]:
            shutil.rmtree(path)
        harness.wait_for(lambda: t.layout_count(db) == 1, "the daemon to drop the removed layouts", 600)
        harness.wait_for(
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


def _content_hashes(db: str) -> dict[str, str | None]:
    """Every stored layout's path and content hash, by one query."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {path_of(path): digest for path, digest in conn.execute("SELECT path, content_hash FROM layouts")}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _wait_fresh(db: str, want: Mapping[str, str | None], what: str, timeout: float = 120.0) -> float:
    """Seconds until every path of *want* is stored with its hash (None: not stored at all)."""
    started = time.monotonic()

    def done() -> bool:
        have = _content_hashes(db)
        return all(have.get(path) == digest if digest else path not in have for path, digest in want.items())

    harness.wait_for(done, what, timeout)
    return round(time.monotonic() - started, 3)


def _write_layout(path: str, tag: str, label: str) -> str:
    """A layout naming one image *label* as *tag*; the sha256 content hash of its index.json."""
    import hashlib

    data = layouts_mod.index_bytes(tag, label)
    layouts_mod.Layout(path).write_index_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rewrite(path: str, tag: str, label: str) -> str:
    import hashlib

    data = layouts_mod.index_bytes(tag, label)
    layouts_mod.rewrite_in_place(os.path.join(path, "index.json"), data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _planted_files(tmp: str) -> dict[str, object]:
    """Every way of planting a file beside the database, at every name ocidx opens there."""
    names = [(".lock", "daemon"), (".migrate-lock", "scan"), ("", "scan"), ("-wal", "scan"), ("-shm", "daemon")]
    tried = refused = intact = 0
    failures = []
    for plant, make in test_hostile_user.PLANTS.items():
        for suffix, command in names:
            if plant == "other user's file" and suffix in ("-wal", "-shm"):
                continue  # a reader of the group may create -shm: only its type and links are checked
            here = tempfile.mkdtemp(dir=tmp)
            root = test_hostile_user.one_layout(here)
            target = test_hostile_user.victim(here)
            db = os.path.join(here, "var", "index.db")
            os.makedirs(os.path.dirname(db))
            make(target)(db + suffix)
            if command == "daemon":
                proc = test_hostile_user.daemon_once(here, db, root)
                rc, err = proc.returncode, proc.stderr
            else:
                ran = harness.run(here, "scan", "--db", db, "--no-progress", root)
                rc, err = ran.rc, ran.err
            tried += 1
            ok = rc == 4 and (db + suffix).encode() in err
            refused += ok
            with open(target, "rb") as fh:
                kept = fh.read() == test_hostile_user.VICTIM_TEXT and not os.path.lexists(target + ".created-by-root")
            intact += kept
            if not (ok and kept):
                failures.append(f"{plant} at <db>{suffix} ({command}): rc {rc}")
    return {"plants_tried": tried, "refused_naming_the_path": refused, "victim_intact": intact, "failures": failures}


def hostile_user(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """What other users and other writers can do to a root daemon, at benchmark size: files planted beside
    the database, index.json symlinked out of its layout, non-UTF-8 names, hard links, mounts."""
    n = args.layouts
    figures: dict[str, object] = {"check": "hostile-user", "layouts": n}
    failures: list[str] = []
    planted = _planted_files(tmp)
    failures += planted.pop("failures")  # type: ignore[arg-type]
    figures["planted"] = planted

    root = os.path.join(tmp, "root")
    started = time.perf_counter()
    good = {
        os.path.join(root, "good", f"{i:05d}"): _write_layout(os.path.join(root, "good", f"{i:05d}"), "v1", "g")
        for i in range(n)
    }
    secret, secret_hash = test_hostile_user.private_index(tmp)
    evil = [os.path.join(root, "evil", f"{i:04d}") for i in range(max(10, n // 20))]
    for path in evil:
        layouts_mod.Layout(path)
        os.symlink(secret, os.path.join(path, "index.json"))
    sharers = [os.path.join(root, "linked", f"{i:04d}") for i in range(max(10, n // 100))]
    first = _write_layout(sharers[0], "v1", "linked")
    for path in sharers[1:]:
        layouts_mod.Layout(path)
        os.link(os.path.join(sharers[0], "index.json"), os.path.join(path, "index.json"))
    figures["corpus_build_s"] = round(time.perf_counter() - started, 1)

    db = os.path.join(tmp, "scan.db")
    started = time.perf_counter()
    scanned = harness.run(tmp, "scan", "--db", db, "--no-progress", root, timeout=600)
    figures["scan_s"] = round(time.perf_counter() - started, 2)
    stored = test_hostile_user.database_bytes(db)
    states = {str(r["layout"]): r for r in harness.run(tmp, "ls", "--db", db, "--json").json()}  # type: ignore[attr-defined]
    refused = sum(states[p]["error"] == "layout_unreadable" for p in evil)
    leaked = test_hostile_user.TOKEN.encode() in stored or secret_hash.encode() in stored
    figures["symlinked_out"] = {"layouts": len(evil), "refused": refused, "token_or_hash_in_database": leaked}
    if scanned.rc != 0 or refused != len(evil) or leaked:
        failures.append("index.json symlinked out of its layout: see symlinked_out")

    daemon = harness.Daemon(tmp, [root])
    try:
        daemon.start()
        harness.wait_for(lambda: "ready:" in daemon.log() or daemon.exited(), "the daemon to be ready", 600)
        want = {**good, **dict.fromkeys(sharers, first)}
        _wait_fresh(daemon.db, want, "the corpus indexed", 600)

        # hard links: one in-place rewrite, every sharer fresh
        second = _rewrite(sharers[0], "v2", "linked-two")
        figures["hard_links"] = {
            "layouts_sharing_one_index_json": len(sharers),
            "seconds_until_all_fresh": _wait_fresh(daemon.db, dict.fromkeys(sharers, second), "hard-linked sharers"),
        }

        # non-UTF-8 names: a tree of layouts created, then renamed
        count = max(20, n // 20)
        base = os.fsencode(root) + b"/odd\xff"
        made = {os.fsdecode(base + b"/app\xfe%05d" % i): "" for i in range(count)}
        started_ns = time.monotonic()
        for path in made:
            made[path] = _write_layout(path, "v1", "odd")
        created_s = _wait_fresh(daemon.db, made, "non-UTF-8 layouts indexed")
        moved_base = os.fsencode(root) + b"/moved\xfd"
        os.rename(base, moved_base)
        moved = {path.replace(os.fsdecode(base), os.fsdecode(moved_base), 1): h for path, h in made.items()}
        renamed_s = _wait_fresh(daemon.db, {**moved, **dict.fromkeys(made)}, "non-UTF-8 tree renamed")
        figures["non_utf8"] = {
            "layouts": count,
            "seconds_until_indexed": created_s,
            "seconds_until_rename_seen": renamed_s,
            "wall_s": round(time.monotonic() - started_ns, 2),
            "daemon_alive": not daemon.exited(),
        }
        if daemon.exited():
            failures.append("the daemon died on non-UTF-8 names")

        # a tmpfs mounted below the root after start
        point = os.path.join(root, "mnt")
        os.makedirs(point)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", point], check=False).returncode
        if mounted == 0:
            try:
                on_mount = {os.path.join(point, f"{i:04d}"): "" for i in range(max(20, n // 20))}
                for path in on_mount:
                    on_mount[path] = _write_layout(path, "v1", "mounted")
                mount_s = _wait_fresh(daemon.db, on_mount, "layouts on the new mount")
            finally:
                subprocess.run(["umount", point], check=False)
            unmount_s = _wait_fresh(daemon.db, dict.fromkeys(on_mount), "layouts of the unmounted file system dropped")
            figures["mount"] = {
                "layouts": len(on_mount),
                "seconds_until_indexed": mount_s,
                "seconds_until_dropped_after_umount": unmount_s,
                "reconcile_interval_s": 300,
            }
        else:
            figures["mount"] = "skipped: cannot mount a tmpfs here"
        rc = daemon.stop()
        log = daemon.log()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    figures["daemon_exit"] = rc
    warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    figures["daemon_warnings"] = len(warnings)
    figures["daemon_log_clean"] = "Traceback" not in log and not hostile.control_characters(log.encode())
    if rc != 0 or not figures["daemon_log_clean"]:
        failures.append("the daemon did not stop cleanly or its log is not clean")
    figures["failures"] = failures
    return figures


def _spread(values: list[int]) -> dict[str, int]:
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}


def _reader_summary(result: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in result.items() if k not in ("stale_warnings", "answers")}


# -- faults of the environment (issue 17): each injected at benchmark size, then the index after recovery
# compared with a fresh scan of the same tree, table by table ---------------------------------------------


def _differences(db: str, fresh: str) -> int:
    """Rows in one index and not the other (ids and timestamps aside): 0 when they hold the same."""
    mine, theirs = harness.rows(db), harness.rows(fresh)
    return sum(len(set(mine[table]) ^ set(theirs[table])) for table in mine)


def _fresh_differences(tmp: str, db: str, root: str, *prefix: str) -> int:
    """Scan *root* into a new database, and count the rows by which *db* differs from it."""
    fresh = tempfile.mkdtemp(dir=tmp)
    fresh_db = os.path.join(fresh, "fresh.db")
    scan = harness.run(tmp, "scan", "--db", fresh_db, root, prefix=prefix)
    assert scan.rc == 0, scan
    return _differences(db, fresh_db)


def _scan(tmp: str, db: str, root: str, *extra: str, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    started = time.perf_counter()
    result = harness.run(tmp, "scan", "--db", db, "--json", *extra, root, prefix=prefix)
    assert result.rc in (0, 6), result
    summary = result.json()
    assert isinstance(summary, dict)
    summary["exit"] = result.rc
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return summary


def _retag(path: str, tag: str) -> None:
    """Rewrite a generated layout's index.json in place (its directory untouched): its first entry named *tag*."""
    index = os.path.join(path, "index.json")
    with open(index, "rb") as f:
        document = json.load(f)
    first = document["manifests"][0]
    first.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = tag
    with open(index, "r+b") as f:
        f.write(json.dumps(document).encode())
        f.truncate()


def _nested(path: str) -> list[str]:
    """The blobs of the nested indexes *path*'s index.json lists that are there."""
    with open(os.path.join(path, "index.json"), "rb") as f:
        document = json.load(f)
    found = []
    for item in document.get("manifests") or []:
        if item.get("mediaType") in INDEX_MEDIA_TYPES:
            blob = os.path.join(path, "blobs", *str(item["digest"]).split(":", 1))
            if os.path.exists(blob) and blob not in found:
                found.append(blob)
    return found


def faults(args: argparse.Namespace, tmp: str) -> dict[str, object]:
    """Each fault of the environment ocidx must not take for a proof, injected at benchmark size."""
    from benchmarks import generate as gen

    root, db = os.path.join(tmp, "root"), os.path.join(tmp, "index.db")
    started = time.perf_counter()
    info = gen.generate_tree(root, args.layouts, args.seed)
    layouts = sorted(info.layouts)
    test_faults.settle()
    out: dict[str, object] = {
        "check": "faults",
        "layouts": len(layouts),
        "corpus_build_s": round(time.perf_counter() - started, 1),
    }
    failures: list[str] = []
    first = _scan(tmp, db, root)
    out["cold_scan_s"] = first["wall_s"]

    def recovered(name: str, figures: dict[str, object], *prefix: str) -> None:
        """Recovery: one ordinary scan; then the index must be what a fresh scan makes of the tree."""
        figures["recovery_scan"] = {
            k: v for k, v in _scan(tmp, db, root, prefix=tuple(prefix)).items() if k != "error_messages"
        }
        figures["differences_after_recovery"] = diff = _fresh_differences(tmp, db, root, *prefix)
        if diff:
            failures.append(f"{name}: {diff} rows differ from a fresh scan after recovery")
        out[name] = figures

    # 1. The root cannot be listed for want of descriptors (the daemon's reconcile meets it when idle
    #    connections use up its descriptors): nothing may be removed.
    added = os.path.join(root, "zz-new", "layout")
    layouts_mod.Layout(added).write_index([])
    counts = test_faults.under_emfile(tmp, db, root)
    kept = len(test_reliability_layouts(db))
    figures: dict[str, object] = {"removed": counts["removed"], "unlisted": counts["unlisted"], "layouts_kept": kept}
    if counts["removed"] or kept != len(layouts):
        failures.append(f"unlistable root: {counts['removed']} removed, {kept} of {len(layouts)} kept")
    recovered("root_unlistable_emfile", figures)

    # 2. A directory of 100 layouts that cannot be listed (a permission; root without DAC override).
    if os.geteuid() == 0 and shutil.which("setpriv"):
        locked = os.path.dirname(layouts[0])
        below = [p for p in layouts if p.startswith(locked + "/")]
        os.chmod(locked, 0o311)
        try:
            limited = _scan(tmp, db, root, prefix=harness.NO_DAC)
            found = harness.run(tmp, "find", "--db", db, "--json", ":latest", prefix=harness.NO_DAC)
        finally:
            os.chmod(locked, 0o755)
        figures = {
            "layouts_below": len(below),
            "removed": limited["removed"],
            "unlisted": limited["unlisted"],
            "find_says_unverified": b"could not all be read" in found.err,
        }
        if limited["removed"] or not figures["find_says_unverified"]:
            failures.append(f"unlistable directory: {figures}")
        recovered("directory_unlistable_eacces", figures)

    # 3. Reads that fail with EMFILE: 200 layouts rewritten in place, read by a pass with no descriptor left.
    rewritten = layouts[100:300]
    for path in rewritten:
        _retag(path, "fault-v2")
    test_faults.settle()
    counts = test_faults.under_emfile(tmp, db, root)
    found = harness.run(tmp, "find", "--db", db, "--json", ":fault-v2")
    answered = {a["layout"] for a in found.json()} if found.out else set()  # type: ignore[attr-defined]
    figures = {
        "rewritten": len(rewritten),
        "failed_reads": counts["errors"],
        "stored_to_read_again": counts["read_again"],
        "find_answers_after": len(answered),
    }
    if counts["read_again"] != len(rewritten) or answered != set(rewritten):
        failures.append(f"reads under EMFILE: {figures}")
    recovered("reads_emfile", figures)

    # 4. Worker processes killed while they answer (the OOM killer): the pass must end, nothing lost.
    killed_db = os.path.join(tmp, "killed.db")
    config = harness.write_config(tmp, "[daemon]\nworkers = 2\n")
    with test_workers.AnswerKiller(kills=4, seed=args.seed) as killer:
        started = time.perf_counter()
        scan = subprocess.Popen(
            [sys.executable, "-m", "indexer", "scan", "--db", killed_db, "--config", config, "--json", root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=harness.environment(tmp),
            cwd=tmp,
        )
        killer.parent = scan.pid
        try:
            _out, err = scan.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            scan.kill()
            scan.communicate()
            failures.append(f"killed workers: the scan hung ({killer.killed})")
            err = b""
    figures = {
        "kills": len(killer.killed),
        "kills_while_answering": sum(1 for _, how in killer.killed if how == "while answering"),
        "exit": scan.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "differences_from_fresh": _fresh_differences(tmp, killed_db, root),
    }
    if scan.returncode != 0 or figures["differences_from_fresh"] or b"Traceback" in err:
        failures.append(f"killed workers: {figures}")
    out["workers_killed"] = figures

    # 5. Nested index blobs absent when read, that arrive later with index.json untouched.
    partial = [(path, _nested(path)) for path in layouts[300:]]
    partial = [(path, blobs) for path, blobs in partial if blobs][:100]
    aside = os.path.join(tmp, "aside")
    os.mkdir(aside)
    moved: list[tuple[str, str]] = []
    for path, blobs in partial:
        for blob in blobs:
            target = os.path.join(aside, f"{len(moved)}")
            os.rename(blob, target)
            moved.append((target, blob))
        os.utime(os.path.join(path, "index.json"))  # read again now: its blobs absent
    test_faults.settle()
    read_absent = _scan(tmp, db, root)
    for target, blob in moved:
        os.rename(target, blob)
    arrived = _scan(tmp, db, root)
    figures = {
        "layouts": len(partial),
        "blobs_absent_then_back": len(moved),
        "read_while_absent": read_absent["changed"],
        "read_again_when_back": arrived["changed"],
    }
    if arrived["changed"] != len(partial):
        failures.append(f"blobs that arrive later: {figures}")
    recovered("blobs_arrive_later", figures)

    # 6. Two file systems with identical metadata mounted one after the other below the root.
    if os.geteuid() == 0 and shutil.which("mkfs.ext4") and shutil.which("unshare"):
        out["mount_swap"] = _mount_swap(tmp, db, root, layouts[:200], failures)

    # 7. Nested indexes that list the same child many times (F=17 at 4 levels), among the others.
    lay = layouts_mod.Layout(os.path.join(root, "zz-fanout", "layout"))
    level = lay.manifest(platform={"architecture": "arm64", "os": "linux"}, label="leaf")
    for _ in range(4):
        level = lay.index([level] * 17)
    lay.write_index([layouts_mod.named(level, ref="v1")])
    fan = _scan(tmp, db, root)
    conn_rows = harness.rows(db)["children"]
    started = time.perf_counter()
    absent = harness.run(tmp, "resolve", "--db", db, "--layout", lay.path, ":v1", "--platform", "linux/s390x")
    figures = {
        "children_rows_of_the_layout": sum(1 for row in conn_rows if row[0] == lay.path),
        "scan_s": fan["wall_s"],
        "resolve_absent_platform_s": round(time.perf_counter() - started, 3),
        "resolve_exit": absent.rc,
    }
    if figures["children_rows_of_the_layout"] != 4 or absent.rc != 1:
        failures.append(f"fan-out: {figures}")
    recovered("nested_fanout", figures)

    # 8. ocidx scan at descriptor limits from 8 to 30, a new layout before each.
    outcomes: dict[str, int] = {}
    for limit in range(8, 31, 2):
        extra = layouts_mod.Layout(os.path.join(root, "zz-limits", f"l{limit}"))
        extra.write_index([])
        result = harness.run(tmp, "scan", "--db", db, "--no-progress", root, prefix=test_faults.with_fd_limit(limit))
        key = f"exit {result.rc}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if result.rc not in (0, 6) or (result.rc == 6 and b"too many open files" not in result.err):
            failures.append(f"ulimit -n {limit}: {result!r}")
    recovered("descriptor_limits", {"limits": "8-30 step 2", "outcomes": outcomes})

    # 9. Who may read the index the recipe makes (UMask from the unit) and what the daemon would say of a 0664 one.
    umask = int(test_hostile_user.unit_setting("UMask"), 8)
    probe = os.path.join(tmp, "perm", "index.db")
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; os.umask({umask}); from indexer.store import open_writer; open_writer({probe!r}).close()",
        ],
        env=harness.environment(tmp),
        cwd=tmp,
        capture_output=True,
        check=False,
    )
    mode = oct(os.stat(probe).st_mode & 0o777) if made.returncode == 0 else "failed"
    out["permissions"] = {"umask": oct(umask), "database_mode": mode}
    if mode != "0o660":
        failures.append(f"permissions: {out['permissions']}")
    shutil.rmtree(os.path.dirname(probe), ignore_errors=True)
    out["failures"] = failures
    return out


def test_reliability_layouts(db: str) -> list[str]:
    """The layout paths *db* holds."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [path_of(row[0]) for row in conn.execute("SELECT path FROM layouts")]
    finally:
        conn.close()


def _mount_swap(tmp: str, db: str, root: str, chosen: list[str], failures: list[str]) -> dict[str, object]:
    """200 of the layouts on an ext4 image mounted below the root; then a byte copy of it in which every
    tag 'latest' reads 'lat3st' (sizes and every timestamp the same) mounted in its place. Only each
    layout's ``oci-layout`` and ``index.json`` go on the image (the content graph's blobs, layers of
    their full size, would not fit a small image): what the swap tests is the proof of index.json."""
    first = test_faults.ext4_image(os.path.join(tmp, "first.ext4"))
    mnt = os.path.join(root, "zz-mounted")
    os.mkdir(mnt)
    copy = (
        "import os, shutil, sys\n"
        "for source in sys.argv[2:]:\n"
        "    target = os.path.join(sys.argv[1], os.path.basename(source))\n"
        "    os.mkdir(target)\n"
        "    for name in ('oci-layout', 'index.json'):\n"
        "        shutil.copy2(os.path.join(source, name), target)\n"
    )
    test_faults.in_namespace(tmp, [["mount", first, mnt], [sys.executable, "-c", copy, mnt, *chosen]])
    with open(first, "rb") as f:
        data = f.read()
    second = os.path.join(tmp, "second.ext4")
    with open(second, "wb") as f:
        f.write(data.replace(b'"latest"', b'"lat3st"'))
    fresh = os.path.join(tmp, "fresh-mounted.db")
    ocidx = [sys.executable, "-m", "indexer"]
    results = test_faults.in_namespace(
        tmp,
        [
            ["mount", first, mnt],
            test_faults.SETTLE_STEP,
            [*ocidx, "scan", "--db", db, "--json", root],
            ["umount", mnt],
            ["mount", second, mnt],
            [*ocidx, "find", "--db", db, "--json", ":lat3st"],
            [*ocidx, "scan", "--db", db, "--json", root],
            [*ocidx, "scan", "--db", fresh, "--json", root],
        ],
    )
    (_, dev_first), _sleep, _scan_first, (_, dev_second), found, rescan, _fresh = results
    answered = len(json.loads(str(found[1]))) if found[0] == 0 else 0
    changed = json.loads(str(rescan[1]))["changed"]
    diff = _differences(db, fresh)
    figures = {
        "layouts_on_the_image": len(chosen),
        "same_device_number": dev_first == dev_second,
        "find_lat3st_answers": answered,
        "rescan_changed": changed,
        "differences_from_fresh": diff,
    }
    if not answered or not changed or diff:
        failures.append(f"mount swap: {figures}")
    return figures


COMMANDS: dict[str, Callable[[argparse.Namespace, str], dict[str, object]]] = {
    "crash": crash,
    "torn": torn,
    "load": load,
    "resources": resources,
    "hostile": hostile_check,
    "interleave": interleave,
    "wal": wal_check,
    "hostile-user": hostile_user,
    "faults": faults,
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
    ("hostile-user", True),
    ("faults", False),
]

DEFAULTS: dict[str, dict[str, object]] = {
    "crash": {"layouts": 10000},
    "load": {"layouts": 2000, "seconds": 60.0, "rate": 200.0},
    "torn": {"seconds": 30.0},
    "resources": {"layouts": 2000, "seconds": 600.0, "rate": 100.0},
    "interleave": {"layouts": 2000, "seconds": 60.0},
    "wal": {"layouts": 2000, "seconds": 60.0, "rate": 200.0},
    "hostile-user": {"layouts": 2000},
    "faults": {"layouts": 2000},
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
