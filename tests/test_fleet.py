"""The fleet end to end: real ``ocidx daemon`` processes publishing as real PostgreSQL roles.

Every check waits for a condition with a deadline (nothing sleeps to synchronize), and
"published" always means the rows themselves: the host's rows in PostgreSQL, table by table,
equal the rows of its SQLite index read independently of the publisher's code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from cli_run import ANSWER_KEYS, ocidx
from fleet_hosts import (
    CONVERGE_S,
    alpine,
    churn,
    fleet_api,
    fleet_find,
    local_answers,
    restart,
    start_host,
    wait_converged,
)
from harness import Daemon, wait_for
from layouts import LINUX_ARM64, Layout, named
from needs import module
from pg_cluster import PG_ROWS, FleetDb, admin_connect, pg_rows, sqlite_rows

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]


def test_two_hosts_publish_and_find_fleet_answers_as_find_does_on_each(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    a1 = Layout(os.path.join(h1.roots[0], "a"))
    a1.write_index([alpine(a1, "one")])
    b1 = Layout(os.path.join(h1.roots[0], "b"))
    b1.write_index([named(b1.manifest(label="app"), ref="latest", containerd="registry.example/team/app:latest")])
    a2 = Layout(os.path.join(h2.roots[0], "cache", "a"))
    a2.write_index([alpine(a2, "two"), named(a2.manifest(label="solo"), ref="solo")])
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)

    with fleet_api(fleet_db) as fleet:
        # The same references answer the same on the fleet as find does on each host.
        child = next(iter(local_answers(h2, "alpine:3.16")))
        refs = [
            "alpine:3.16",
            "docker.io/library/alpine:3.16",
            ":3.16",
            ":latest",
            "registry.example/team/app",
            f"@{child['digest']}",
            f"alpine:3.16@{child['digest']}",
            f":solo@{child['digest']}",
            "nosuch:1",
        ]
        for ref in refs:
            fleet_answers = [a.to_json() for a in fleet.find(ref)]
            for host, daemon in (("h1", h1), ("h2", h2)):
                mine = [{k: v for k, v in a.items() if k in ANSWER_KEYS} for a in fleet_answers if a["host"] == host]
                assert mine == local_answers(daemon, ref), (ref, host)
        answers = fleet.find("alpine:3.16")
        assert [(a.host, a.layout) for a in answers] == [("h1", a1.path), ("h2", a2.path)]
        assert all(a.host_state == "live" and a.heartbeat_age_s is not None for a in answers)
        # a child manifest's digest reaches the nested index's child, as find does
        arm = fleet.find(f"@{a2.manifest(platform=LINUX_ARM64, label='two')['digest']}")
        assert [(a.host, a.source, a.to_json()["platform"]) for a in arm] == [
            ("h2", "child", {"os": "linux", "architecture": "arm64", "variant": None})
        ]
        # :TAG@DIGEST is a search, as locally: a layout where the tag points elsewhere is not listed
        assert fleet.find(f":solo@{answers[1].digest}") == []
        (solo,) = fleet.find(f":solo@{a2.manifest(label='solo')['digest']}")
        assert (solo.host, solo.layout, solo.warnings) == ("h2", a2.path, [])

    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", "alpine:3.16")
    assert code == 0, err
    documents = json.loads(out)
    assert [list(d) for d in documents] == [[*ANSWER_KEYS, "host", "host_state", "heartbeat_age_s"]] * 2
    code, out, _err = ocidx(capsys, "find", "--fleet", "alpine:3.16")
    assert [line.split("\t")[0:2] + line.split("\t")[3:] for line in out.splitlines()] == [
        ["h1", a1.path, "docker.io/library/alpine:3.16", "live"],
        ["h2", a2.path, "docker.io/library/alpine:3.16", "live"],
    ]
    code, _out, err = ocidx(capsys, "find", "--fleet", "nosuch:1")
    assert code == 1 and "not found on any host" in err
    code, out, _err = ocidx(capsys, "hosts", "--json")
    hosts = json.loads(out)
    assert [(h["host"], h["host_state"], h["layouts"], h["entries"], h["backlog"]) for h in hosts] == [
        ("h1", "live", 2, 2, 0),
        ("h2", "live", 1, 2, 0),
    ]
    fleet_status = h1.status()["fleet"]
    assert fleet_status["connected"] is True and fleet_status["host"] == "h1"  # type: ignore[index]
    wait_for(lambda: h1.status()["fleet"]["backlog"] == 0, "status says nothing waits")  # type: ignore[index]

    # A change on one host is what the fleet answers next; a removed layout leaves no row.
    b1.write_index([named(b1.manifest(label="app2"), ref="v2", containerd="registry.example/team/app:v2")])
    shutil.rmtree(a1.path)
    wait_for(
        lambda: fleet_find(fleet_db, "registry.example/team/app:v2") == [("h1", b1.path)],
        "the new tag is found across the fleet",
    )
    wait_converged(fleet_db, "h1", h1)
    assert [host for host, _ in fleet_find(fleet_db, "alpine:3.16")] == ["h2"]


def test_postgres_stopped_during_churn_then_restarted_converges_exactly(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    root = h1.roots[0]
    churn(root, 30, "v1")
    wait_converged(fleet_db, "h1", h1)
    cluster = fleet_db.cluster
    cluster.stop()
    try:
        wait_for(lambda: h1.status()["fleet"]["connected"] is False, "status says the fleet is unreachable")  # type: ignore[index]
        monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
        code, _out, err = ocidx(capsys, "find", "--fleet", ":v1")
        assert code == 4 and "unreachable" in err
        churn(root, 20, "v2")
        for i in range(25, 30):  # vanished while PostgreSQL was down: no row may be left behind
            shutil.rmtree(os.path.join(root, f"l{i:03d}"))
        fresh = Layout(os.path.join(root, "new"))
        fresh.write_index([named(fresh.manifest(label="new"), ref="v2")])
        # Indexing goes on locally, and the backlog says what waits.
        wait_for(lambda: len(local_answers(h1, ":v2")) == 21 and len(h1.layouts()) == 26, "local indexing goes on")
        wait_for(lambda: h1.status()["fleet"]["backlog"] >= 26, "the backlog counts the waiting changes")  # type: ignore[index]
    finally:
        cluster.start()
    wait_converged(fleet_db, "h1", h1)
    with admin_connect(fleet_db.admin_dsn) as conn:
        paths = {bytes(r[0]).decode() for r in conn.execute("SELECT path FROM layouts WHERE host = 'h1'")}
    assert paths == h1.layouts()
    wait_for(lambda: h1.status()["fleet"]["connected"] is True, "status says connected again")  # type: ignore[index]
    assert h1.log().count("fleet: not publishing") <= 3  # once per change of state, not once per retry


def test_sigkill_mid_publish_then_restart_converges(fleet_db: FleetDb, daemons: list[Daemon], base: str) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h1.stop()
    root = h1.roots[0]
    churn(root, 300, "v1")

    def published() -> int:
        with admin_connect(fleet_db.admin_dsn) as conn:
            (count,) = conn.execute("SELECT count(*) FROM layouts WHERE host = 'h1'").fetchall()
            return int(count[0])

    h1.start()
    wait_for(lambda: published() > 0 or h1.exited(), "the first batch reaches PostgreSQL")
    h1.kill()
    # While it is dead its layouts change and vanish; the restarted daemon converges all the same.
    churn(root, 10, "v2")
    for i in range(290, 300):
        shutil.rmtree(os.path.join(root, f"l{i:03d}"))
    restart(h1)
    wait_converged(fleet_db, "h1", h1)
    assert published() == 290


def test_a_stale_host_is_listed_and_labelled(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    for daemon in (h1, h2):
        lay = Layout(os.path.join(daemon.roots[0], "a"))
        lay.write_index([named(lay.manifest(label=daemon.tmp), ref="latest")])
        wait_converged(fleet_db, os.path.basename(daemon.tmp), daemon)
    assert h2.stop() == 0
    config = os.path.join(base, "reader.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write("[fleet]\nstale_after_s = 1\n")
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)

    def states() -> list[tuple[str, str]]:
        code, out, _err = ocidx(capsys, "find", "--fleet", "--json", "--config", config, ":latest")
        assert code == 0
        return [(a["host"], a["host_state"]) for a in json.loads(out)]

    wait_for(lambda: states() == [("h1", "live"), ("h2", "stale")], "the stopped host is labelled stale")
    _code, out, _err = ocidx(capsys, "hosts", "--config", config)
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["h1", "live"], ["h2", "stale"]]


def test_a_removed_host_leaves_no_row_and_stops_publishing(
    fleet_db: FleetDb, daemons: list[Daemon], base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    churn(h1.roots[0], 5, "v1")
    wait_converged(fleet_db, "h1", h1, layouts=5)
    code, _out, err = ocidx(capsys, "fleet", "remove-host", "--dsn", fleet_db.admin_dsn, "h1")
    assert code == 0 and "5 layouts removed" in err
    churn(h1.roots[0], 6, "v2")
    wait_for(lambda: "not a host of the fleet" in str(h1.status()["fleet"]["state"]), "the host says why it stopped")  # type: ignore[index]
    assert pg_rows(fleet_db.admin_dsn, "h1") == {t: [] for t in PG_ROWS}
    with admin_connect(fleet_db.admin_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM heartbeats").fetchone() == (0,)


def test_readme_fleet_commands_run_as_shown(fleet_db: FleetDb, daemons: list[Daemon], base: str) -> None:
    """The README's fleet section through the real command line: migrate, add two hosts, find --fleet."""
    env = {**os.environ, "OCIDX_FLEET_DSN": fleet_db.admin_dsn}
    for argv in (["fleet", "migrate"], ["fleet", "add-host", "h1"], ["fleet", "add-host", "h2"]):
        done = subprocess.run(
            [sys.executable, "-m", "indexer", *argv, "--dsn", fleet_db.admin_dsn],
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stderr
    h1 = start_host(daemons, fleet_db, base, "h1")
    lay = Layout(os.path.join(h1.roots[0], "a"))
    lay.write_index([alpine(lay, "x")])
    wait_converged(fleet_db, "h1", h1)
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "find", "--fleet", "alpine:3.16"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.startswith(f"h1\t{lay.path}\t"), done.stderr


def test_a_nul_in_a_media_type_does_not_stop_its_host_publishing(
    fleet_db: FleetDb, daemons: list[Daemon], base: str
) -> None:
    """PostgreSQL text cannot hold NUL: the one column a layout can put one in is published escaped."""
    h1 = start_host(daemons, fleet_db, base, "h1")
    hostile = Layout(os.path.join(h1.roots[0], "hostile"))
    image = hostile.manifest(label="nul")
    more = {"k\x00": "v\x00", "note": "h\u00e9llo \U0001f600 \\u0000"}  # non-ASCII, astral, a literal \u0000
    hostile.write_index([named({**image, "mediaType": "app\x00x"}, ref="v1", **more)])
    fine = Layout(os.path.join(h1.roots[0], "fine"))
    fine.write_index([named(fine.manifest(label="fine"), ref="v1")])

    def expected() -> dict[str, list[tuple[object, ...]]]:
        local = sqlite_rows(h1.db)
        local["entries"] = sorted(
            (*row[:3], str(row[3]).replace("\x00", "\\x00"), *row[4:]) for row in local["entries"]
        )
        return local

    wait_for(
        lambda: len(expected()["layouts"]) == 2 and pg_rows(fleet_db.admin_dsn, "h1") == expected(),
        "both layouts published, the NUL spelled \\x00",
        CONVERGE_S,
    )
    assert sorted(host for host, _ in fleet_find(fleet_db, ":v1")) == ["h1", "h1"]
