"""The operator's first hour with the daemon: a missing root says what to do, once, and the log names
the layouts that changed (text and JSON)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest
from harness import Daemon, run_daemon, wait_for
from layouts import Layout, named

from indexer.cli import main

pytestmark = pytest.mark.integration


def test_a_missing_root_says_what_to_do_once(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "layouts")
    daemon = run_daemon(daemons, tmp, [root])
    log = daemon.log()
    assert log.count("does not exist") == 1, log
    assert f"mkdir -p {root}" in log
    assert f"skopeo copy docker://docker.io/library/alpine:3.16 oci:{root}/alpine:3.16" in log
    lay = Layout(os.path.join(root, "alpine"))
    lay.write_index([named(lay.manifest(), ref="3.16")])
    wait_for(lambda: f"changed: {lay.path}" in daemon.log(), "the log names the new layout")
    assert daemon.log().count("does not exist") == 1
    assert daemon.stop() == 0


def test_the_log_names_the_changed_layouts_and_counts_a_big_batch(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "root")
    many = [Layout(os.path.join(root, f"lay{i:02}")) for i in range(12)]
    for lay in many:
        lay.write_index([named(lay.manifest(), ref="v1")])
    daemon = Daemon(tmp, [root])
    daemons.append(daemon)
    daemon.start().wait_ready()
    first = [line for line in daemon.log().splitlines() if "reconcile (start-up)" in line]
    assert len(first) == 1, daemon.log()
    shown = first[0].split("; changed: ")[1].removesuffix(" and 9 more").split(", ")
    assert len(shown) == 3 and set(shown) <= {lay.path for lay in many}, first[0]
    assert "12 layouts looked at" in first[0]
    assert "watching 1 root with inotify (" in daemon.log()  # plurals as a person writes them
    one = many[5]
    one.write_index([named(one.manifest(label="again"), ref="v1")])
    wait_for(
        lambda: f"1 changed, 0 unchanged, 0 with errors, 0 removed; changed: {one.path}" in daemon.log(),
        "one layout named",
    )
    assert daemon.stop() == 0


def test_the_json_log_names_the_changed_layouts(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "root")
    daemon = Daemon(tmp, [root])
    with open(daemon.config, "a", encoding="utf-8") as f:
        f.write('log_format = "json"\n')
    daemons.append(daemon)
    lay = Layout(os.path.join(root, "lay"))
    daemon.start().wait_ready()
    lay.write_index([named(lay.manifest(), ref="v1")])

    def named_in_log() -> bool:
        events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        return any(e.get("event") in ("update", "reconcile") and e.get("changed_layouts") == [lay.path] for e in events)

    wait_for(named_in_log, "a JSON line with changed_layouts")
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_a_root_that_is_a_file_is_said_once(daemons: list[Daemon], tmp: str, mode: str) -> None:
    readme = os.path.join(tmp, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write("# not a directory\n")
    daemon = Daemon(tmp, [readme], env={"OCIDX_WATCH_MODE": mode} if mode == "polling" else None)
    daemons.append(daemon)
    daemon.start().wait_ready()

    def reconciled() -> int:
        with sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT last_reconcile_ns FROM daemon").fetchone()[0] or 0)

    first = reconciled()
    if mode == "polling":  # another pass (every 2 s when polling) must not say it again
        wait_for(lambda: reconciled() > first, "a second polling pass")
    log = daemon.log()
    assert log.count("is not a directory") == 1, log
    assert f"root {readme} is not a directory: point [[roots]] path" in log
    assert "does not exist" not in log
    assert daemon.stop() == 0


def test_find_walks_the_roots_of_earlier_scans_that_the_live_daemon_does_not_watch(
    daemons: list[Daemon], tmp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    watched, scanned = os.path.join(tmp, "watched"), os.path.join(tmp, "scanned")
    Layout(os.path.join(watched, "a")).write_index([])
    Layout(os.path.join(scanned, "b")).write_index([])
    daemon = Daemon(tmp, [watched])
    assert main(["scan", "--db", daemon.db, "--no-progress", scanned]) == 0
    daemons.append(daemon)
    daemon.start().wait_ready()
    late = Layout(os.path.join(scanned, "late"))  # below a root the daemon does not watch
    image = late.manifest()
    late.write_index([named(image, ref="late")])
    capsys.readouterr()
    assert main(["find", "--db", daemon.db, "--json", ":late"]) == 0
    out, err = capsys.readouterr()
    assert [(a["layout"], a["digest"], a["freshness"]) for a in json.loads(out)] == [
        (late.path, image["digest"], "read-through")
    ]
    assert err == ""
    assert daemon.stop() == 0


def test_after_a_reload_drops_a_root_find_walks_it_again(
    daemons: list[Daemon], tmp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = os.path.join(tmp, "first"), os.path.join(tmp, "second")
    Layout(os.path.join(first, "a")).write_index([])
    Layout(os.path.join(second, "b")).write_index([])
    daemon = Daemon(tmp, [])
    with open(daemon.config, encoding="utf-8") as f:
        settings = f.read()
    with open(daemon.config, "a", encoding="utf-8") as f:
        f.write(f'\n[[roots]]\npath = "{first}"\n\n[[roots]]\npath = "{second}"\n')
    daemons.append(daemon)
    daemon.start().wait_ready()
    with open(daemon.config, "w", encoding="utf-8") as f:  # drop the first root
        f.write(settings + f'\n[[roots]]\npath = "{second}"\n')
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log(), "the reload logged")
    late = Layout(os.path.join(first, "late"))  # no daemon watches it now, but its layouts stay indexed
    image = late.manifest()
    late.write_index([named(image, ref="late")])
    capsys.readouterr()
    assert main(["find", "--db", daemon.db, "--json", ":late"]) == 0
    out, _ = capsys.readouterr()
    assert [(a["layout"], a["freshness"]) for a in json.loads(out)] == [(late.path, "read-through")]
    assert daemon.stop() == 0
