"""The operator's first hour with the daemon: a missing root says what to do, once, and the log names
the layouts that changed (text and JSON)."""

from __future__ import annotations

import json
import os

import pytest
from layouts import Layout, named
from test_daemon import Daemon, daemons, run_daemon, tmp, wait_until

pytestmark = pytest.mark.integration
__all__ = ["daemons", "tmp"]  # the fixtures of test_daemon, used here by name


def test_a_missing_root_says_what_to_do_once(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "layouts")
    daemon = run_daemon(daemons, tmp, [root])
    log = daemon.log()
    assert log.count("does not exist") == 1, log
    assert f"mkdir -p {root}" in log
    assert f"skopeo copy docker://docker.io/library/alpine:3.16 oci:{root}/alpine:3.16" in log
    lay = Layout(os.path.join(root, "alpine"))
    lay.write_index([named(lay.manifest(), ref="3.16")])
    wait_until(lambda: f"changed: {lay.path}" in daemon.log(), "the log names the new layout")
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
    one = many[5]
    one.write_index([named(one.manifest(label="again"), ref="v1")])
    wait_until(
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

    wait_until(named_in_log, "a JSON line with changed_layouts")
    assert daemon.stop() == 0
