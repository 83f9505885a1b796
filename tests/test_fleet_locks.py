"""No host and no reader can block a reader or another host; every wait is bounded (docs/fleet.md).

A host role (``mallory``) and a reader role (``snoop``) try, in real PostgreSQL sessions, everything
that takes a lock on the fleet's relations and keeps it (LOCK TABLE in every mode, SELECT ... FOR
UPDATE and its kin, TRUNCATE, writes, transactions left open after calling the fleet's functions,
advisory locks), then, while those that worked are held, everything PostgreSQL lets a role queue a
strong lock with before it checks ownership (CREATE RULE, CREATE TRIGGER, a foreign key from a
temporary table, ALTER TABLE, CREATE INDEX, VACUUM FULL, CLUSTER, REINDEX, DROP, COMMENT). A queued
request holds up every session that asks for a lock after it, so queueing is as bad as holding.
Meanwhile readers (``ocidx find --fleet`` and ``ocidx hosts``, as processes) must answer and other
hosts' daemons must publish.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from cli_run import ocidx
from fleet_hosts import fleet_find, fleet_through, start_host, wait_converged
from harness import REPO, Daemon, wait_for
from layouts import Layout, named, referrer
from needs import module
from pg_cluster import FleetDb, admin_connect, pg_rows, sqlite_rows

from indexer.fleet.admin import MIGRATE_LOCK

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from psycopg import Connection

VICTIM_S = 30.0  # a victim that has not answered by then was blocked: the fix answers in about a second
RELATIONS = [
    "hosts",
    "heartbeats",
    "layouts",
    "entries",
    "names",
    "children",
    "layout_warnings",
    "ocidx_migrations",
    # the content graph's (fleet migration 0003)
    "graph_manifests",
    "graph_attestations",
    "missing_blobs",
]
NAMES = [f"{schema}{table}" for table in [*RELATIONS, "fleet"] for schema in ("", "public.", "ocidx_data.")]
MODES = [
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
]
# Lock modes that conflict with a reader's ACCESS SHARE or a publisher's ROW EXCLUSIVE.
BLOCKING = {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"}
# Old readers look for ocidx_migrations on their search_path: since fleet migration 0002 a view there
# says "upgrade ocidx". A role can queue a lock on the view itself (CREATE RULE), which holds up only
# old readers of that view: no current reader or publisher ever touches it.
COMPATIBILITY_VIEW = {"ocidx_migrations", "public.ocidx_migrations"}  # as the attackers' search_path finds it

_IMAGE, _LAYER, _ATTESTATION = ("sha256:" + c * 64 for c in "bcd")
_IMAGE_JSON = json.dumps({"config": None, "created": None, "image_size": None, "layers": 1, "platform": None})

# Transactions a role opens and keeps open: each list runs in one transaction, which is held if it worked.
HOLDS = [
    *([f"LOCK TABLE {name} IN {mode} MODE"] for name in NAMES for mode in MODES),
    *(
        [f"SELECT * FROM {name} {clause}"]
        for name in NAMES
        for clause in ("FOR UPDATE", "FOR NO KEY UPDATE", "FOR SHARE", "FOR KEY SHARE", "LIMIT 1")
    ),
    *([f"TRUNCATE {name} CASCADE"] for name in NAMES),
    *([f"DELETE FROM {name} WHERE false"] for name in NAMES),
    # the way a fleet migration 1 host wrote its rows
    ["INSERT INTO layouts (id, path, version, state, entry_count) VALUES (8, '/m/8', 1, 'ok', 0)"],
    ["UPDATE hosts SET watermark = 1 WHERE host = session_user"],
    ["INSERT INTO heartbeats (backlog) VALUES (0) ON CONFLICT (host) DO UPDATE SET backlog = 0"],
    # a host publishing through the functions, then keeping the transaction open
    [
        "SELECT ocidx.put_layouts(ARRAY[7]::bigint[], ARRAY['/m/7'::bytea], ARRAY[1]::bigint[], ARRAY['ok'], "
        "ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[1])",
        "SELECT ocidx.put_rows('[[7, 0, \"sha256:" + "a" * 64 + '", "t", 1, null, "{}", null, null]]\', '
        "'[[7, 0, 0, \"\", \"latest\", \"tag-only\"]]', '[]', '[]')",
        "SELECT ocidx.beat(0, 1, 1, 'x')",
    ],
    # ... with the content graph's rows: an image, its manifest with a layer, an attestation, a blob it lacks
    [
        "SELECT ocidx.put_layouts(ARRAY[9]::bigint[], ARRAY['/m/9'::bytea], ARRAY[1]::bigint[], ARRAY['ok'], "
        "ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[1])",
        f"SELECT ocidx.put_rows('{json.dumps([[9, 0, _IMAGE, 't', 1, None, '{}', None, None, _IMAGE_JSON]])}', "
        "'[]', '[]', '[]')",
        f"SELECT ocidx.put_graph('{json.dumps([[_IMAGE, '', None, None, None, None, None, [_LAYER], ['t'], [1]]])}', "
        f"'{json.dumps([[_IMAGE, _ATTESTATION, _LAYER]])}', '{json.dumps([[9, _LAYER]])}', '{{}}')",
        "SELECT ocidx.host_summary()",
    ],
    ["SELECT ocidx.forget_host()"],
    ["SELECT ocidx.remove_layouts(ARRAY['/m/7'::bytea])"],
    [f"SELECT ocidx.put_graph('[]', '[]', '[]', ARRAY['{_IMAGE}'])"],
    # a reader reading through the functions, then keeping the transaction open
    ["SELECT * FROM ocidx.lookup('names', ARRAY['tag'], ARRAY['latest'])", "SELECT * FROM ocidx.hosts()"],
    ["SELECT * FROM ocidx.host_counts()", "SELECT ocidx.applied_migrations()"],
    [
        f"SELECT * FROM ocidx.graph_users('{_LAYER}')",
        f"SELECT * FROM ocidx.referrers(ARRAY['{_IMAGE}'], ARRAY['sha256-{_IMAGE[7:]}'])",
    ],
    # advisory locks: ocidx's own (fleet migrate's) and any other
    [f"SELECT pg_advisory_lock({MIGRATE_LOCK})"],
    ["SELECT pg_advisory_lock(0)", "SELECT pg_advisory_xact_lock(1)", "SELECT pg_advisory_lock_shared(0, 0)"],
]
# Statements that queue a strong lock in some PostgreSQL versions before they check privileges.
QUEUES = [
    (name, statement)
    for name in NAMES
    for statement in (
        f"CREATE RULE r AS ON INSERT TO {name} DO INSTEAD NOTHING",
        f"CREATE TRIGGER t BEFORE UPDATE ON {name} FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        f"CREATE TEMP TABLE pin (host text REFERENCES {name} (host))",
        f"ALTER TABLE {name} ADD COLUMN x integer",
        f"CREATE INDEX ON {name} (host)",
        f"VACUUM FULL {name}",
        f"CLUSTER {name}",
        f"REINDEX TABLE {name}",
        f"DROP TABLE {name}",
        f"COMMENT ON TABLE {name} IS 'x'",
        f"ANALYZE {name}",
    )
]


class Attack:
    """Every hold and queue of HOLDS and QUEUES tried as one role; what worked stays in force until close()."""

    def __init__(self, dsn: str, admin: Connection[tuple[object, ...]]) -> None:
        self.dsn = dsn
        self.admin = admin
        # One transaction holds whatever worked: each attempt runs in a savepoint, and one that failed
        # is rolled back with the locks it took. An attempt that would wait gives up after a second.
        self.session = psycopg.connect(dsn, options="-c lock_timeout=1s")
        self.held: list[list[str]] = []
        self.queued: list[tuple[str, str, Connection[tuple[object, ...]], threading.Thread]] = []

    def hold(self) -> None:
        self.session.execute("SELECT 1")  # the transaction the savepoints nest in
        for statements in HOLDS:
            try:
                with self.session.transaction():
                    for statement in statements:
                        self.session.execute(statement)
            except psycopg.Error:
                continue
            self.held.append(statements)

    def queue(self) -> None:
        for name, statement in QUEUES:
            conn = psycopg.connect(self.dsn, autocommit=True)
            pid = conn.info.backend_pid

            def run(conn: Connection[tuple[object, ...]] = conn, statement: str = statement) -> None:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(statement)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            outcome = wait_for(
                lambda t=thread, p=pid: self._settled(t, p),  # type: ignore[misc]
                f"{statement!r} returns or waits for a lock",
            )
            if outcome == "waiting":
                self.queued.append((name, statement, conn, thread))  # left waiting while the victims run
            else:
                thread.join()
                conn.close()

    def _settled(self, thread: threading.Thread, pid: int) -> str | None:
        if not thread.is_alive():
            return "done"
        row = self.admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        return "waiting" if row is not None and row[0] == "Lock" else None

    def blocking_locks(self) -> list[tuple[str, str]]:
        """(relation, mode) of every lock this role's session holds that a reader or publisher would wait for."""
        rows = self.admin.execute(
            "SELECT l.relation::regclass::text, l.mode FROM pg_locks l WHERE l.pid = %s AND l.granted "
            "AND l.relation IS NOT NULL",
            (self.session.info.backend_pid,),
        ).fetchall()
        return sorted((str(rel), str(mode)) for rel, mode in rows if mode in BLOCKING)

    def close(self) -> None:
        for _name, _statement, conn, thread in self.queued:
            conn.cancel()
            thread.join()
            conn.close()
        self.session.close()


def cli(*argv: str, dsn: str) -> subprocess.Popen[str]:
    """``ocidx ARGV`` as a process of its own, reading the fleet as *dsn*."""
    env = {**os.environ, "OCIDX_FLEET_DSN": dsn}
    return subprocess.Popen(
        [sys.executable, "-m", "indexer", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def finished(proc: subprocess.Popen[str], timeout: float = VICTIM_S) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of *proc*; exit code None (and the process killed) when it hung."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def _publishes(fleet_db: FleetDb, host: str, daemon: Daemon, layouts: int) -> bool:
    """Whether *host*'s rows in PostgreSQL come to equal its SQLite index of *layouts* layouts within VICTIM_S."""
    deadline = time.monotonic() + VICTIM_S
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):  # a read held up by a lock (10 s) counts as not yet
            local = sqlite_rows(daemon.db)
            if len(local["layouts"]) == layouts and pg_rows(fleet_db.admin_dsn, host) == local:
                return True
        time.sleep(0.05)
    return False


def test_no_host_and_no_reader_can_block_readers_or_other_hosts(
    fleet_db: FleetDb, daemons: list[Daemon], base: str
) -> None:
    h2 = start_host(daemons, fleet_db, base, "h2")
    lay = Layout(os.path.join(h2.roots[0], "a"))
    image = lay.manifest(label="a")
    signature = referrer(lay, image, "application/vnd.dev.cosign.artifact.sig.v1+json", b"a signature")
    lay.write_index([named(image, ref="latest"), signature])
    with open(lay.blob_path(str(image["digest"])), "rb") as f:
        layer = json.load(f)["layers"][0]["digest"]  # what the content graph's lookups are asked for
    wait_converged(fleet_db, "h2", h2)
    attackers = {"mallory": fleet_db.add_host("mallory"), "snoop": fleet_db.add_reader("snoop")}
    dash = fleet_db.add_reader("dash")
    h3_dsn = fleet_db.add_host("h3")  # its daemon starts, connects and reconciles while the attacks are in force
    with admin_connect(fleet_db.admin_dsn, autocommit=True) as admin:
        attacks = {role: Attack(dsn, admin) for role, dsn in attackers.items()}
        try:
            for attack in attacks.values():
                attack.hold()
            for attack in attacks.values():
                attack.queue()
            held = {role: a.held for role, a in attacks.items()}
            blocking = {role: a.blocking_locks() for role, a in attacks.items()}
            queued = {role: [(n, s) for n, s, _, _ in a.queued] for role, a in attacks.items()}

            # The victims, while everything that worked is held and everything that queued waits.
            find = cli("find", "--fleet", "--json", ":latest", dsn=dash)
            hosts = cli("hosts", "--json", dsn=dash)
            find_layer = cli("find", "--fleet", "--json", f"@{layer}", dsn=dash)
            referrers = cli("referrers", "--fleet", "--json", f"@{image['digest']}", dsn=dash)
            second = Layout(os.path.join(h2.roots[0], "b"))
            second.write_index([named(second.manifest(label="b"), ref="latest")])
            os.makedirs(os.path.join(base, "h3", "root"))
            h3 = Daemon(os.path.join(base, "h3"), [os.path.join(base, "h3", "root")], env={"OCIDX_FLEET_DSN": h3_dsn})
            daemons.append(h3)
            h3.start().wait_ready()
            third = Layout(os.path.join(h3.roots[0], "c"))
            third.write_index([named(third.manifest(label="c"), ref="latest")])
            find_result = finished(find)
            hosts_result = finished(hosts)
            layer_result = finished(find_layer)
            referrers_result = finished(referrers)
            published = {"h2": _publishes(fleet_db, "h2", h2, 2), "h3": _publishes(fleet_db, "h3", h3, 1)}
        finally:
            for attack in attacks.values():
                attack.close()

    # Nothing either role could do holds a lock a reader or a publisher would wait for, or queues one
    # (but on the compatibility view, which they never read).
    assert blocking == {"mallory": [], "snoop": []}, held
    assert [s for role in queued for n, s in queued[role] if n not in COMPATIBILITY_VIEW] == [], queued
    # The host's writes through the functions worked (on its own rows), as did reading through them.
    assert any("ocidx.put_layouts" in statements[0] for statements in held["mallory"])
    assert any("ocidx.put_graph" in statement for statements in held["mallory"] for statement in statements)
    assert any("ocidx.lookup" in statements[0] for statements in held["snoop"])
    assert any("ocidx.graph_users" in statements[0] for statements in held["snoop"])
    # And the victims were not held up.
    code, out, err = find_result
    assert code == 0, f"find --fleet: exit {code} (None: blocked for {VICTIM_S}s); {err}"
    assert lay.path in {a["layout"] for a in json.loads(out) if a["host"] == "h2"}
    code, out, err = layer_result
    assert code == 0, f"find --fleet @LAYER: exit {code} (None: blocked for {VICTIM_S}s); {err}"
    assert [(a["host"], a["layout"], a["source"]) for a in json.loads(out)] == [("h2", lay.path, "layer")]
    code, out, err = referrers_result
    assert code == 0, f"referrers --fleet: exit {code} (None: blocked for {VICTIM_S}s); {err}"
    assert [(r["host"], r["digest"], r["how"]) for r in json.loads(out)] == [("h2", signature["digest"], "subject")]
    code, out, err = hosts_result
    assert code == 0, f"hosts: exit {code} (None: blocked for {VICTIM_S}s); {err}"
    assert {"h2", "mallory"} <= {h["host"] for h in json.loads(out)}
    assert published == {"h2": True, "h3": True}, f"hosts that did not publish within {VICTIM_S}s"
    latest = fleet_find(fleet_db, ":latest")
    assert sorted(host for host, _ in latest if host != "mallory") == ["h2", "h2", "h3"], latest


def _lock_layouts(fleet_db: FleetDb) -> Connection[tuple[object, ...]]:
    """The administrator's session holding ACCESS EXCLUSIVE on the layouts table (a migration in progress)."""
    conn = admin_connect(fleet_db.admin_dsn)
    conn.execute("LOCK TABLE layouts IN ACCESS EXCLUSIVE MODE")
    return conn


def test_readers_and_publishers_give_up_on_a_held_lock_with_a_clear_message(
    fleet_db: FleetDb, daemons: list[Daemon], base: str
) -> None:
    """Only the administrator can hold a lock that readers and publishers wait for; they wait a bounded time."""
    h1 = start_host(daemons, fleet_db, base, "h1")
    lay = Layout(os.path.join(h1.roots[0], "a"))
    lay.write_index([named(lay.manifest(label="a"), ref="latest")])
    wait_converged(fleet_db, "h1", h1)
    dash = fleet_db.add_reader("dash")
    lock = _lock_layouts(fleet_db)
    try:
        started = time.monotonic()
        find = cli("find", "--fleet", ":latest", dsn=dash)
        hosts = cli("hosts", dsn=dash)
        changed = Layout(os.path.join(h1.roots[0], "b"))
        changed.write_index([named(changed.manifest(label="b"), ref="latest")])
        for what, (code, out, err) in (("find --fleet", finished(find)), ("hosts", finished(hosts))):
            assert code == 4, f"{what}: exit {code} (None: still waiting after {VICTIM_S}s); {out}{err}"
            assert "lock_timeout" in err and "Traceback" not in err, err
        assert time.monotonic() - started < VICTIM_S
        wait_for(
            lambda: "lock_timeout" in str(h1.status()["fleet"]["state"]),  # type: ignore[index]
            "the publisher says it gave up waiting for a lock",
            VICTIM_S,
        )
        assert h1.status()["fleet"]["connected"] is False  # type: ignore[index]
    finally:
        lock.close()
    wait_converged(fleet_db, "h1", h1)
    wait_for(lambda: h1.status()["fleet"]["connected"] is True, "the publisher is connected again")  # type: ignore[index]
    assert len(sqlite_rows(h1.db)["layouts"]) == 2


def test_fleet_commands_give_up_on_a_held_lock_with_a_clear_message(
    fleet_db: FleetDb, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host holding migrate's advisory lock or its own rows makes migrate and remove-host fail, not hang."""
    mallory = fleet_db.add_host("mallory")
    fleet_db.add_host("h2")
    advisory = psycopg.connect(mallory)
    advisory.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    rows = psycopg.connect(mallory)
    rows.execute("SELECT ocidx.beat(0, 1, 1, 'x')")  # its host row and heartbeat, locked until it commits
    try:
        for argv in (["fleet", "migrate"], ["fleet", "remove-host", "mallory"]):
            done = subprocess.run(
                [sys.executable, "-m", "indexer", *argv, "--dsn", fleet_db.admin_dsn],
                capture_output=True,
                text=True,
                timeout=VICTIM_S,
                cwd=REPO,
            )
            assert done.returncode == 4, (argv, done.stderr)
            assert "lock_timeout" in done.stderr and "pg_stat_activity" in done.stderr, done.stderr
        code, _out, err = ocidx(capsys, "fleet", "remove-host", "--dsn", fleet_db.admin_dsn, "h2")
        assert code == 0, err  # another host's rows are not in the way
    finally:
        advisory.close()
        rows.close()
    code, _out, err = ocidx(capsys, "fleet", "remove-host", "--dsn", fleet_db.admin_dsn, "mallory")
    assert code == 0, err


def test_upgrade_from_the_first_schema_keeps_the_rows_and_closes_the_locks(
    pg_cluster: object, daemons: list[Daemon], base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pg_cluster import Cluster

    assert isinstance(pg_cluster, Cluster)
    fleet_db = fleet_through(pg_cluster, f"upgrade_from_0001_{os.getpid()}", "0001_fleet")
    with psycopg.connect(fleet_db.admin_dsn, autocommit=True) as conn:  # add-host as it was
        if conn.execute("SELECT FROM pg_roles WHERE rolname = 'oldhost'").fetchone() is None:
            conn.execute("CREATE ROLE oldhost LOGIN")
        conn.execute("GRANT ocidx_publisher TO oldhost")
        conn.execute("INSERT INTO hosts (host) VALUES ('oldhost')")
    old = fleet_db.dsn("oldhost")
    digest = "sha256:" + "b" * 64
    with psycopg.connect(old, autocommit=True) as conn, conn.transaction():  # rows as a version 1 publisher wrote them
        conn.execute("INSERT INTO layouts (id, path, version, state, entry_count) VALUES (1, '/srv/old', 3, 'ok', 1)")
        conn.execute(
            "INSERT INTO entries (layout_id, position, digest, media_type, size, annotations) "
            "VALUES (1, 0, %s, 'application/vnd.oci.image.manifest.v1+json', 7, "
            '\'{"org.opencontainers.image.ref.name": "3.16"}\')',
            (digest,),
        )
        conn.execute(
            "INSERT INTO names (layout_id, entry_position, ordinal, name, tag, how) "
            "VALUES (1, 0, 0, '', '3.16', 'tag-only')"
        )
        conn.execute("INSERT INTO heartbeats (backlog) VALUES (0)")
    with psycopg.connect(old) as conn:  # what the upgrade is for: a host could lock every reader out
        conn.execute("LOCK TABLE layouts IN ACCESS EXCLUSIVE MODE")
        conn.rollback()

    code, out, err = ocidx(capsys, "fleet", "migrate", "--dsn", fleet_db.admin_dsn, "--json")
    assert code == 0, err
    assert json.loads(out)["applied"] == ["0002_functions_only", "0003_content_graph"]

    dash = fleet_db.add_reader("dash")
    found, out, err = finished(cli("find", "--fleet", "--json", ":3.16", dsn=dash))
    assert found == 0, err
    assert [(a["host"], a["layout"], a["digest"]) for a in json.loads(out)] == [("oldhost", "/srv/old", digest)]
    for statement in (
        "LOCK TABLE layouts IN ACCESS EXCLUSIVE MODE",
        "LOCK TABLE ocidx_data.layouts IN ACCESS SHARE MODE",
    ):
        with psycopg.connect(old) as conn, pytest.raises(psycopg.Error):
            conn.execute(statement)
    with psycopg.connect(old) as conn:  # what a version 1 reader reads tells it to upgrade
        assert [r[0] for r in conn.execute("SELECT name FROM ocidx_migrations ORDER BY name")] == [
            "0001_fleet",
            "0002_functions_only",
            "0003_content_graph",
        ]

    # The host's daemon (this ocidx) replaces the old rows with its index, every one.
    tmp = os.path.join(base, "oldhost")
    os.makedirs(os.path.join(tmp, "root"))
    daemon = Daemon(tmp, [os.path.join(tmp, "root")], env={"OCIDX_FLEET_DSN": old})
    daemons.append(daemon)
    daemon.start().wait_ready()
    lay = Layout(os.path.join(daemon.roots[0], "new"))
    lay.write_index([named(lay.manifest(label="new"), ref="3.16")])
    wait_converged(fleet_db, "oldhost", daemon)
    assert "/srv/old" not in {a for _h, a in fleet_find(fleet_db, ":3.16")}
