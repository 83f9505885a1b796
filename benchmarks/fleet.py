"""The fleet at scale: simulated hosts publishing into one PostgreSQL through the real publisher.

``python -m benchmarks.fleet [--hosts 10,30,100] [--layouts 1000] [--churn-s 20] [--outage-s 30]``

On a throwaway cluster (``tests/pg_cluster.py``, the tests' own), each simulated host is its
own PostgreSQL role (``ocidx fleet add-host``) with its own connection and its own SQLite index:
a copy of one index built by a real ``ocidx scan`` of ``--layouts`` generated layouts
(``benchmarks.generate``, about 20 entries each), plus a small layout of its own (a marker
named ``fleet.example/hN/marker:v1`` and tagged ``m-hN``) written by the real writer. All
publishers (:class:`indexer.fleet.publisher.Publisher`, the daemon's code) run in this process
on one event loop, as the daemon runs one. Hosts join in stages (10, then 30, then 100) and
each figure is taken at each stage:

* publish throughput (rows per second until every host's watermark reaches its counter), beside
  PostgreSQL's own ``COPY`` of exactly the rows the stage published, as superuser, into an
  empty copy of the schema;
* ``find --fleet`` of a tag, a name:tag and a digest that one host holds, in-process
  (:class:`indexer.fleet.Fleet`) and as a whole ``ocidx`` process, p50/p99, beside
  ``python -c "import sqlite3, json, argparse"``;
* after the last stage: change on a host to visible in PostgreSQL, under churn on every host;
  catch-up after an outage of PostgreSQL with every host churning (time to converge; the rows
  of every host then compared with its SQLite index: layouts, versions and counts for all,
  every row for a sample); database size per entry.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the one throwaway-cluster helper, shared with the tests

import anyio  # noqa: E402
import psycopg  # noqa: E402
from pg_cluster import Cluster, admin_connect, bin_dir, sqlite_rows  # noqa: E402
from pg_cluster import pg_rows as pg_table_rows  # noqa: E402

from benchmarks.generate import generate_tree, past_mtime_ns  # noqa: E402
from benchmarks.run import Figure, percentile, table  # noqa: E402
from indexer import layout as layout_mod  # noqa: E402
from indexer.config import Config, FleetSettings  # noqa: E402
from indexer.fleet import Fleet, admin  # noqa: E402
from indexer.fleet.publisher import Publisher  # noqa: E402
from indexer.store import open_writer  # noqa: E402
from indexer.store import read as db  # noqa: E402
from indexer.store.outcomes import Read  # noqa: E402
from indexer.store.write import apply  # noqa: E402

TABLES = ("layouts", "entries", "names", "children", "layout_warnings")
GRAPH_TABLES = ("graph_manifests", "graph_attestations", "missing_blobs")  # the host's, not per layout: sized only
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


class Host:
    """One simulated build host: a role, an SQLite index, a marker layout it rewrites."""

    def __init__(self, number: int, base: str, template: str, dsn: str) -> None:
        self.number = number
        self.name = f"h{number:03d}"
        self.db = os.path.join(base, "hosts", f"{self.name}.db")
        self.marker = os.path.join(base, "markers", self.name)
        self.dsn = dsn
        shutil.copyfile(template, self.db)
        os.makedirs(os.path.join(self.marker, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(self.marker, "oci-layout"), "w") as fh:
            fh.write('{"imageLayoutVersion":"1.0.0"}')
        self.writer = open_writer(self.db)
        self.lock = threading.Lock()
        self.serial = 0
        self.marker_digest = self.write_marker()
        self.publisher = Publisher(dsn, self.db, heartbeat_s=5.0)

    def write_marker(self) -> str:
        """Rewrite the marker layout (a new churn entry each time) through the real writer; the churn digest."""
        with self.lock:
            self.serial += 1
            marker = f'{{"schemaVersion":2,"host":"{self.name}"}}'.encode()
            churn = f'{{"schemaVersion":2,"host":"{self.name}","serial":{self.serial}}}'.encode()
            manifests = [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": _digest(marker),
                    "size": len(marker),
                    "annotations": {REF_NAME: f"fleet.example/{self.name}/marker:v1"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": _digest(marker),
                    "size": len(marker),
                    "annotations": {REF_NAME: f"m-{self.name}"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": _digest(churn),
                    "size": len(churn),
                    "annotations": {REF_NAME: "churn"},
                },
            ]
            document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
            index = os.path.join(self.marker, "index.json")
            with open(index + ".tmp", "w") as fh:
                json.dump(document, fh)
            os.replace(index + ".tmp", index)
            read_ns = time.time_ns()
            snapshot = layout_mod.read_layout(self.marker)
            expected = db.layout(self.writer, self.marker)
            apply(self.writer, [Read.of(self.marker, snapshot, read_ns, expected)])
            self.churn_digest = _digest(churn)
            return _digest(marker)

    def counter(self) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT value FROM ocidx_counters WHERE name = 'version'").fetchone()[0])
        finally:
            conn.close()

    def caught_up(self) -> bool:
        return self.publisher.state == "connected" and self.publisher.watermark == self.counter()


def pg_rows(conn: psycopg.Connection[tuple[Any, ...]], hosts: list[str]) -> int:
    total = 0
    for name in TABLES:
        row = conn.execute(f"SELECT count(*) FROM {name} WHERE host = ANY(%s)", (hosts,)).fetchone()
        total += int(row[0]) if row else 0
    return total


def copy_baseline(cluster: Cluster, source_db: str, hosts: list[str]) -> float:
    """Seconds PostgreSQL takes to COPY exactly these hosts' rows into an empty copy of the schema."""
    target = "copy_baseline"
    cluster.psql(f"DROP DATABASE IF EXISTS {target}")
    cluster.psql(f"CREATE DATABASE {target}")
    admin.migrate(cluster.dsn(dbname=target))
    dumps: dict[str, bytes] = {}
    with admin_connect(cluster.dsn(dbname=source_db)) as src:
        for table in ("hosts", *TABLES):
            buffer = bytearray()
            query = f"COPY (SELECT * FROM {table} WHERE host = ANY(%s)) TO STDOUT"
            with src.cursor().copy(query, (hosts,)) as copy:
                for chunk in copy:
                    buffer += chunk
            dumps[table] = bytes(buffer)
    with admin_connect(cluster.dsn(dbname=target)) as dst:
        dst.execute("SET row_security = off")  # as superuser, PostgreSQL's own fastest path
        started = time.perf_counter()
        with dst.transaction():
            for table in ("hosts", *TABLES):
                with dst.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write(dumps[table])
        seconds = time.perf_counter() - started
    cluster.psql(f"DROP DATABASE {target}")
    return seconds


def timed(fn: object, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - started)
    return out


def process_times(argv: list[str], env: dict[str, str], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, check=False)
        out.append(time.perf_counter() - started)
        if done.returncode not in (0, 1):
            raise RuntimeError(f"{argv}: exit {done.returncode}: {done.stderr.decode(errors='replace')}")
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.figures: list[Figure] = []
        self.notes: list[str] = []
        self.hosts: list[Host] = []
        self.template = ""  # the index every host starts from

    def fig(
        self,
        name: str,
        value: float,
        unit: str,
        baseline_name: str,
        baseline: float | None,
        target: str,
        met: bool | None,
        note: str = "",
    ) -> None:
        self.figures.append(Figure(name, value, unit, baseline_name, baseline, target, met, note))
        ratio = f" ({value / baseline:.2f}x of {baseline_name})" if baseline else ""
        print(f"  {name}: {value:.4g} {unit}{ratio}", flush=True)

    async def wait_caught_up(self, hosts: list[Host], deadline_s: float) -> float:
        started = time.perf_counter()
        while not all(h.caught_up() for h in hosts):
            if time.perf_counter() - started > deadline_s:
                raise RuntimeError("hosts did not catch up: " + ", ".join(h.name for h in hosts if not h.caught_up()))
            await anyio.sleep(0.05)
        return time.perf_counter() - started

    def find_figures(self, stage: int, admin_dsn: str, reader_dsn: str) -> None:
        last = self.hosts[stage - 1]
        probes = [
            (":TAG", f":m-{last.name}"),
            ("NAME:TAG", f"fleet.example/{last.name}/marker:v1"),
            ("@DIGEST", f"@{last.marker_digest}"),
        ]
        config = Config(fleet=FleetSettings(dsn=reader_dsn))
        env = {**os.environ, "OCIDX_FLEET_DSN": reader_dsn, "PYTHONPATH": REPO}
        base = process_times([sys.executable, "-c", "import sqlite3, json, argparse"], env, self.args.process_reps)
        with Fleet(config=config) as fleet:
            for label, ref in probes:
                answers = fleet.find(ref)
                assert [a.host for a in answers] == [last.name], (ref, [a.host for a in answers])
                times = timed(lambda ref=ref: fleet.find(ref), self.args.reps)
                p50, p99 = percentile(sorted(times), 0.5), percentile(sorted(times), 0.99)
                self.fig(
                    f"find --fleet {label}, in-process p50, {stage} hosts", p50 * 1000, "ms", "none", None, "-", None
                )
                self.fig(
                    f"find --fleet {label}, in-process p99, {stage} hosts",
                    p99 * 1000,
                    "ms",
                    "none",
                    None,
                    "< 20 ms at 100 hosts",
                    p99 < 0.020 if stage >= 100 else None,
                )
                whole = process_times(
                    [sys.executable, "-m", "indexer", "find", "--fleet", ref], env, self.args.process_reps
                )
                for name, q in (("p50", 0.5), ("p99", 0.99)):
                    self.fig(
                        f"`ocidx find --fleet {label}`, whole process {name}, {stage} hosts",
                        percentile(sorted(whole), q) * 1000,
                        "ms",
                        '`python -c "import sqlite3, json, argparse"`',
                        percentile(sorted(base), q) * 1000,
                        "-",
                        None,
                    )
            popular = fleet.find(self.args.popular)
            times = timed(lambda: fleet.find(self.args.popular), 5)
            self.fig(
                f"find --fleet {self.args.popular} (held by every host: {len(popular)} answers), in-process p50, "
                f"{stage} hosts",
                percentile(sorted(times), 0.5) * 1000,
                "ms",
                "none",
                None,
                "-",
                None,
            )
            # The content graph: a layer and an image with referrers, which every host holds.
            layer, subject = graph_probes(self.template)
            for label, lookup in (
                ("find --fleet @LAYER", lambda: fleet.find(f"@{layer}")),
                ("referrers --fleet @DIGEST", lambda: fleet.referrers(f"@{subject}")),
            ):
                found = lookup()
                times = timed(lookup, self.args.reps)
                for name, q in (("p50", 0.5), ("p99", 0.99)):
                    self.fig(
                        f"{label} (every host: {len(found)} answers), in-process {name}, {stage} hosts",
                        percentile(sorted(times), q) * 1000,
                        "ms",
                        "none",
                        None,
                        "-",
                        None,
                    )
        del admin_dsn

    async def run(self, cluster: Cluster, base: str, template: str) -> None:
        args = self.args
        self.template = template
        dbname = "fleet"
        cluster.psql(f"CREATE DATABASE {dbname}")
        admin_dsn = cluster.dsn(dbname=dbname)
        admin.migrate(admin_dsn)
        cluster.psql("DROP ROLE IF EXISTS bench_reader", dbname)
        cluster.psql("CREATE ROLE bench_reader LOGIN IN ROLE ocidx_reader", dbname)
        reader_dsn = cluster.dsn("bench_reader", dbname)
        stages = [int(s) for s in args.hosts.split(",")]
        async with anyio.create_task_group() as tg:
            for stage in stages:
                new = []
                for number in range(len(self.hosts), stage):
                    name = f"h{number:03d}"
                    admin.add_host(admin_dsn, name)
                    new.append(Host(number, base, template, cluster.dsn(name, dbname)))
                self.hosts.extend(new)
                names = [h.name for h in new]
                print(f"stage {stage} hosts: {len(new)} hosts join", flush=True)
                started = time.perf_counter()
                for host in new:
                    tg.start_soon(host.publisher.run)
                await self.wait_caught_up(new, deadline_s=3600)
                seconds = time.perf_counter() - started
                with admin_connect(admin_dsn) as conn:
                    rows = pg_rows(conn, names)
                copy_s = copy_baseline(cluster, dbname, names)
                self.fig(
                    f"publish throughput, {len(new)} hosts joining at once ({rows:,} rows)",
                    rows / seconds,
                    "rows/s",
                    "PostgreSQL COPY of the same rows",
                    rows / copy_s,
                    "≥ 0.5x",
                    rows / seconds >= 0.5 * rows / copy_s,
                )
                self.find_figures(stage, admin_dsn, reader_dsn)
            await self.churn_and_outage(cluster, admin_dsn)
            tg.cancel_scope.cancel()
        self.size_figures(admin_dsn)

    async def churn_and_outage(self, cluster: Cluster, admin_dsn: str) -> None:
        args = self.args
        rng = random.Random(7)
        latencies: list[float] = []
        pending: dict[str, float] = {}
        stop = threading.Event()
        lock = threading.Lock()

        latest: dict[str, str] = {}  # host -> its churn digest still awaited
        superseded = [0]

        def churner(outage: bool) -> None:
            interval = 1.0 / args.rate
            while not stop.is_set():
                host = rng.choice(self.hosts)
                host.write_marker()
                if not outage:
                    with lock:
                        # A host rewritten again before its last change was published never shows that
                        # change: it is not measured (counted as superseded).
                        old = latest.get(host.name)
                        if old is not None and pending.pop(old, None) is not None:
                            superseded[0] += 1
                        latest[host.name] = host.churn_digest
                        pending[host.churn_digest] = time.perf_counter()
                stop.wait(interval)

        def poller() -> None:
            give_up = None
            with admin_connect(admin_dsn, autocommit=True) as conn:
                while not stop.is_set() or pending:
                    if stop.is_set():
                        give_up = give_up or time.perf_counter() + 60
                        if time.perf_counter() > give_up:
                            raise RuntimeError(f"changes never became visible: {sorted(pending)[:3]}")
                    with lock:
                        wanted = list(pending)
                    if wanted:
                        for (digest,) in conn.execute("SELECT digest FROM entries WHERE digest = ANY(%s)", (wanted,)):
                            with lock:
                                seen = pending.pop(digest, None)
                                if seen is not None:
                                    latencies.append(time.perf_counter() - seen)
                    time.sleep(0.01)  # the poll period bounds the resolution: 10 ms

        print(f"churn: {args.rate} changes/s across {len(self.hosts)} hosts for {args.churn_s}s", flush=True)
        threads = [threading.Thread(target=churner, args=(False,)), threading.Thread(target=poller)]
        for t in threads:
            t.start()
        await anyio.sleep(args.churn_s)
        stop.set()
        for t in threads:
            await anyio.to_thread.run_sync(t.join)
        lat = sorted(latencies)
        self.fig(
            f"change on a host → visible in PostgreSQL, p50 ({len(lat)} changes, {args.rate:g}/s over "
            f"{len(self.hosts)} hosts, {superseded[0]} superseded before publishing)",
            percentile(lat, 0.5) * 1000,
            "ms",
            "none",
            None,
            "-",
            None,
        )
        self.fig(
            "change on a host → visible in PostgreSQL, p99",
            percentile(lat, 0.99) * 1000,
            "ms",
            "none",
            None,
            "< 1 s",
            percentile(lat, 0.99) < 1.0,
        )

        print(f"outage: PostgreSQL stopped for {args.outage_s}s while every host churns", flush=True)
        stop.clear()
        cluster.stop()
        churning = threading.Thread(target=churner, args=(True,))
        churning.start()
        await anyio.sleep(args.outage_s)
        stop.set()
        await anyio.to_thread.run_sync(churning.join)
        backlog = sum(h.publisher.backlog for h in self.hosts)
        cluster.start()
        restarted = time.perf_counter()
        await self.wait_caught_up(self.hosts, deadline_s=3600)
        converge = time.perf_counter() - restarted
        exact = self.verify(admin_dsn)
        self.fig(
            f"catch-up after a {args.outage_s:g} s outage, every host churning (backlog {backlog} changes); "
            f"rows exact: {exact}",
            converge,
            "s",
            "none",
            None,
            "-",
            exact,
        )

    def verify(self, admin_dsn: str) -> bool:
        """Every host's layouts (path, version, entry count) equal SQLite's; every row for a sample of hosts."""
        with admin_connect(admin_dsn) as conn:
            for host in self.hosts:
                local = sqlite3.connect(f"file:{host.db}?mode=ro", uri=True)
                try:
                    mine = sorted(
                        (lid, v, n) for lid, v, n in local.execute("SELECT id, version, entry_count FROM layouts")
                    )
                    entries = local.execute("SELECT count(*) FROM entries").fetchone()[0]
                    names = local.execute("SELECT count(*) FROM names").fetchone()[0]
                finally:
                    local.close()
                theirs = sorted(
                    conn.execute(
                        "SELECT id, version, entry_count FROM layouts WHERE host = %s", (host.name,)
                    ).fetchall()
                )
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM entries WHERE host = %s), "
                    "(SELECT count(*) FROM names WHERE host = %s)",
                    (host.name, host.name),
                ).fetchone()
                if mine != theirs or counts != (entries, names):
                    print(f"  host {host.name} differs", flush=True)
                    return False
        sample = self.hosts[:: max(1, len(self.hosts) // 5)]
        return all(pg_table_rows(admin_dsn, h.name) == sqlite_rows(h.db) for h in sample)

    def size_figures(self, admin_dsn: str) -> None:
        with admin_connect(admin_dsn) as conn:
            entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]  # type: ignore[index]
            per_table = conn.execute(
                "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname = ANY(%s) ORDER BY 2 DESC",
                ([*TABLES, *GRAPH_TABLES],),
            ).fetchall()
        size = sum(s for _n, s in per_table)
        self.fig(
            f"fleet tables' size per entry, with indexes ({entries:,} entries, {size / 2**20:.0f} MiB in all)",
            size / entries,
            "B",
            "none",
            None,
            "-",
            None,
        )
        self.notes.append("table sizes (with indexes): " + ", ".join(f"{n} {s / 2**20:.0f} MiB" for n, s in per_table))


def popular_tag(template: str) -> str:
    """A tag of about ten layouts of one host's index (so every host holds it about ten times)."""
    conn = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT tag FROM names WHERE tag <> '' GROUP BY tag HAVING count(DISTINCT layout_id) BETWEEN 8 AND 12 "
            "ORDER BY tag LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    return str(row[0]) if row else "latest"


def graph_probes(template: str) -> tuple[str, str]:
    """A layer that about ten manifests of one host's index use, and an image that has referrers."""
    conn = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
    try:
        users: dict[str, int] = {}
        for (layers,) in conn.execute("SELECT layers FROM manifests WHERE layers IS NOT NULL"):
            for digest, _media_type, _size, _external in db.parse_layers(layers):
                users[digest] = users.get(digest, 0) + 1
        subject = conn.execute("SELECT subject FROM manifests WHERE subject IS NOT NULL ORDER BY digest").fetchone()
    finally:
        conn.close()
    return min(users, key=lambda digest: (abs(users[digest] - 10), digest)), str(subject[0])


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the cluster is stopped and the data removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,30,100", help="host counts of the stages")
    parser.add_argument("--layouts", type=int, default=1000, help="layouts per host")
    parser.add_argument("--reps", type=int, default=200, help="in-process repetitions per lookup")
    parser.add_argument("--process-reps", type=int, default=20, help="whole-process repetitions per lookup")
    parser.add_argument("--churn-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0, help="changes per second across all hosts")
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--popular", default=None, help="a reference every host holds (default: a tag in ~10 layouts)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    import logging
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.ERROR)  # the publishers' state changes are expected here (the outage)
    if bin_dir() is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="ocidx-fleet-bench-")
    cluster = Cluster(bin_dir())  # type: ignore[arg-type]
    started = time.time()
    try:
        os.makedirs(os.path.join(base, "hosts"))
        root = os.path.join(base, "tree")
        info = generate_tree(root, args.layouts, "fleet", mtime_ns=past_mtime_ns())
        template = os.path.join(base, "template.db")
        subprocess.run(
            [sys.executable, "-m", "indexer", "scan", "--db", template, "--no-progress", root],
            check=True,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        print(f"template index: {args.layouts} layouts, {info.entries} entries, {info.names} names", flush=True)
        if args.popular is None:
            args.popular = ":" + popular_tag(template)
        cluster.start()
        bench = Bench(args)
        anyio.run(bench.run, cluster, base, template, backend="asyncio")
        for host in bench.hosts:
            host.writer.close()
    finally:
        cluster.destroy()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(
        f"- Command: `python -m benchmarks.fleet {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({time.time() - started:.0f} s in all)"
    )
    print(f"- Per host: {args.layouts} layouts, {info.entries} entries, {info.names} names (benchmarks.generate)")
    print()
    for line in table(bench.figures):
        print(line)
    for note in bench.notes:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
