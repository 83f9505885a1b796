"""The first hour of a new user: lookups that just work, and errors that say what to do next."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time

import pytest
from cli_run import ocidx
from harness import barrier_answering
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named

from indexer.cli import build_parser
from indexer.config import Root
from indexer.store import state as roots_mod

Capsys = pytest.CaptureFixture[str]


def _digest(descriptor: dict[str, object]) -> str:
    return str(descriptor["digest"])


def _scan(capsys: Capsys, db: str, *roots: str) -> None:
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", *roots)
    assert code == 0, err


# -- no database at all ------------------------------------------------------------------------------


def test_a_single_layout_is_answered_without_any_database(tmp_path: str, capsys: Capsys) -> None:
    lay = Layout(os.path.join(tmp_path, "app"))
    image = lay.manifest()
    lay.write_index([named(image, ref="v1")])
    default_db = os.path.join(tmp_path, "xdg-data", "ocidx", "index.db")
    code, out, err = ocidx(capsys, "resolve", "--json", f"oci-layout://{lay.path}:v1")
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["digest"], answer["freshness"]) == (_digest(image), "read-through")
    code, out, err = ocidx(capsys, "ls", "--json", lay.path)
    assert code == 0, err
    assert json.loads(out)[0]["state"] == "not-indexed"
    assert not os.path.exists(default_db)  # a lookup never creates the index
    assert not os.path.exists(os.path.dirname(default_db))


@pytest.mark.parametrize("command", [["find", ":v1"], ["ls"], ["status"]])
def test_lookups_across_layouts_without_a_database_say_what_to_run(
    tmp_path: str, capsys: Capsys, command: list[str]
) -> None:
    code, out, err = ocidx(capsys, *command)
    assert (code, out) == (4, "")
    assert "no index database at" in err
    assert "ocidx scan ROOT" in err and "ocidx daemon" in err


# -- find is exact without a daemon ----------------------------------------------------------------------


def test_find_without_a_daemon_sees_layouts_that_appeared_or_changed_since_the_scan(
    tmp_path: str, capsys: Capsys
) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    old = Layout(os.path.join(root, "old"))
    old_image = old.manifest()
    old.write_index([named(old_image, ref="v1")])
    _scan(capsys, db, root)
    new = Layout(os.path.join(root, "deep", "new"))  # appeared after the scan, no daemon running
    new_image = new.manifest()
    new.write_index([named(new_image, ref="v2")])
    retagged = old.manifest(label="retagged")
    old.write_index([named(old_image, ref="v1"), named(retagged, ref="v2")])  # changed after the scan

    code, out, err = ocidx(capsys, "find", "--db", db, "--json", ":v2")
    assert code == 0, err
    assert err == ""  # exact: nothing to warn about
    found = json.loads(out)
    assert [(a["layout"], a["digest"], a["freshness"]) for a in found] == [
        (os.path.realpath(new.path), _digest(new_image), "read-through"),
        (os.path.realpath(old.path), _digest(retagged), "read-through"),
    ]
    assert not any(a["warnings"] for a in found)
    code, out, _ = ocidx(capsys, "status", "--db", db, "--json")
    assert json.loads(out)["roots"] == [os.path.realpath(root)]


@pytest.mark.parametrize(
    ("row", "answer", "walks"),
    [
        ("alive", "ok", False),  # the daemon took every change made before the lookup: find trusts it
        ("alive", None, True),  # it does not answer the barrier (hung, or gone): not live
        ("alive", "inexact the daemon is polling: OCIDX_WATCH_MODE=polling", True),
        ("alive", "inexact events were lost and the reconcile pass that finds them is not done", True),
        ("stopped", "ok", True),
        ("pid gone", "ok", True),
    ],
)
def test_find_trusts_the_index_only_when_a_live_daemon_answers_its_barrier(
    tmp_path: str, capsys: Capsys, row: str, answer: str | None, walks: bool
) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    Layout(os.path.join(root, "old")).write_index([])
    _scan(capsys, db, root)
    now = time.time_ns()
    pid, stopped = os.getpid(), None  # this process stands for the daemon
    if row == "stopped":
        stopped = now
    elif row == "pid gone":
        pid = 2**22 + 12345  # above pid_max's default: no such process
    watching = roots_mod.to_json([(Root(os.path.realpath(root)), True)])  # as the daemon records its roots
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE daemon SET pid = ?, heartbeat_ns = ?, stopped_ns = ?, watch_mode = 'inotify', roots = ?",
            (pid, now, stopped, watching),
        )
    new = Layout(os.path.join(root, "new"))
    new.write_index([named(new.manifest(), ref="v9")])
    with barrier_answering(db, answer):
        code, out, _ = ocidx(capsys, "find", "--db", db, "--json", ":v9")
    assert (code, len(json.loads(out))) == ((0, 1) if walks else (1, 0))


def test_find_says_when_it_cannot_prove_the_index_exact(tmp_path: str, capsys: Capsys) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    lay = Layout(os.path.join(root, "lay"))
    image = lay.manifest()
    lay.write_index([named(image, ref="v1")])
    _scan(capsys, db, root)
    with sqlite3.connect(db) as conn:  # an index built by an ocidx that recorded no roots
        conn.execute("UPDATE daemon SET roots = NULL")
    code, out, err = ocidx(capsys, "find", "--db", db, "--json", ":v1")
    assert code == 0
    assert "records no roots" in err and "ocidx scan ROOT" in err
    (answer,) = json.loads(out)
    assert any("records no roots" in w for w in answer["warnings"])
    assert err.count("records no roots") == 1  # said once, not once per answer


def test_scanning_a_second_root_keeps_the_first_one_known(tmp_path: str, capsys: Capsys) -> None:
    db = os.path.join(tmp_path, "index.db")
    first, second = os.path.join(tmp_path, "one"), os.path.join(tmp_path, "two")
    Layout(os.path.join(first, "a")).write_index([])
    Layout(os.path.join(second, "b")).write_index([])
    _scan(capsys, db, first)
    _scan(capsys, db, second)
    _scan(capsys, db, second)  # nothing changed: the quick path records nothing new
    late = Layout(os.path.join(first, "late"))
    late_image = late.manifest()
    late.write_index([named(late_image, ref="late")])
    code, out, err = ocidx(capsys, "find", "--db", db, "--json", ":late")
    assert code == 0, err
    assert [a["digest"] for a in json.loads(out)] == [_digest(late_image)]


def test_find_name_at_digest_lists_only_the_layouts_where_the_name_points_there(tmp_path: str, capsys: Capsys) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    right, wrong = Layout(os.path.join(root, "right")), Layout(os.path.join(root, "wrong"))
    image = right.manifest(label="shared")
    other = wrong.manifest(label="other")
    shared = wrong.manifest(label="shared")
    assert shared == image
    right.write_index([named(image, ref="alpine:3.16")])
    wrong.write_index([named(shared, ref="busybox:1"), named(other, ref="alpine:3.16")])
    _scan(capsys, db, root)
    for ref in (f"alpine:3.16@{_digest(image)}", f":3.16@{_digest(image)}"):
        code, out, err = ocidx(capsys, "find", "--db", db, "--json", ref)
        assert code == 0, err
        assert [a["layout"] for a in json.loads(out)] == [os.path.realpath(right.path)], ref
        assert "does not point at" not in err
    code, out, _ = ocidx(capsys, "find", "--db", db, "--json", "@" + _digest(image))
    assert len(json.loads(out)) == 2  # a digest alone is still found everywhere


# -- errors that say what happened and what to do -----------------------------------------------------------


def test_an_ambiguity_lists_the_candidates_and_how_to_pick_each(tmp_path: str, capsys: Capsys) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    alpine, busybox = lay.manifest(label="alpine"), lay.manifest(label="busybox")
    lay.write_index([named(alpine, ref="alpine:3.16"), named(busybox, ref="busybox:3.16")])
    code, out, err = ocidx(capsys, "resolve", f"oci-layout://{lay.path}:3.16")
    assert (code, out) == (3, "")
    lines = err.splitlines()
    assert "2 different digests match" in lines[0]
    picks = {}
    for line in lines[1:]:
        digest = line.split()[0]
        picks[digest] = line.split("(pick it: ")[1].rstrip(")")
    assert picks == {
        _digest(alpine): f"oci-layout://{lay.path}/alpine:3.16",
        _digest(busybox): f"oci-layout://{lay.path}/busybox:3.16",
    }
    for digest, pick in picks.items():  # each pick resolves to its candidate
        assert ocidx(capsys, "resolve", pick)[1].strip() == digest


@pytest.mark.parametrize(
    ("args", "looked_for"),
    [
        (["find", "v1"], "docker.io/library/v1:latest"),
        (["find", "latest"], "docker.io/library/latest:latest"),
        (["resolve", "oci-layout://root/lay/v1"], "docker.io/library/v1:latest"),
        (["resolve", "--layout", "root/lay", "v1"], "docker.io/library/v1:latest"),
    ],
)
def test_a_bare_word_that_is_a_tag_gets_the_hint(
    tmp_path: str, capsys: Capsys, args: list[str], looked_for: str
) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "lay"))
    lay.write_index([named(lay.manifest(), ref="v1"), named(lay.manifest(), ref="latest")])
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    code, _, err = ocidx(capsys, *args, "--db", db)
    assert code == 1
    word = looked_for.split("/")[-1].split(":")[0]
    assert looked_for in err
    assert f"did you mean the tag ':{word}'?" in err
    code, _, err = ocidx(capsys, "find", "--db", db, "nosuch")
    assert code == 1 and "did you mean" not in err


def test_not_found_says_how_many_more_names_the_layout_holds(tmp_path: str, capsys: Capsys) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(), ref=f"t{i}") for i in range(8)])
    code, _, err = ocidx(capsys, "resolve", f"oci-layout://{lay.path}:nosuch")
    assert code == 1
    assert ":t4 and 3 more" in err
    assert f"ocidx ls {os.path.realpath(lay.path)}" in err


def test_a_missing_relative_path_names_the_absolute_path_tried(tmp_path: str, capsys: Capsys) -> None:
    code, _, err = ocidx(capsys, "resolve", "oci-layout://app:v1")
    assert code == 1
    assert f"{os.path.join(tmp_path, 'app')} does not exist" in err
    os.mkdir(os.path.join(tmp_path, "plain"))
    code, _, err = ocidx(capsys, "resolve", "oci-layout://plain:v1")
    assert f"{os.path.join(tmp_path, 'plain')} is not an OCI layout" in err


def test_one_slash_short_is_pointed_out(tmp_path: str, capsys: Capsys) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    relative = lay.path.lstrip("/")  # oci-layout://tmp/... : relative to the cwd, where it does not exist
    code, _, err = ocidx(capsys, "resolve", f"oci-layout://{relative}:v1")
    assert code == 1
    assert f"did you mean /{relative}?" in err
    code, _, err = ocidx(capsys, "ls", relative)
    assert code == 1
    assert f"did you mean /{relative}?" in err


def test_ls_of_a_path_that_does_not_exist_says_so(tmp_path: str, capsys: Capsys) -> None:
    db = os.path.join(tmp_path, "index.db")
    Layout(os.path.join(tmp_path, "root", "lay")).write_index([])
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    missing = os.path.join(tmp_path, "nonexistent")
    code, _, err = ocidx(capsys, "ls", "--db", db, missing)
    assert code == 1
    assert f"{missing} does not exist" in err
    assert "is not an OCI layout" not in err


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_scan_of_a_bad_root_is_exit_2_and_counted(tmp_path: str, capsys: Capsys, kind: str) -> None:
    bad = os.path.join(tmp_path, "README.md")
    if kind == "file":
        with open(bad, "w") as f:
            f.write("# not a directory\n")
    code, out, err = ocidx(capsys, "scan", "--db", os.path.join(tmp_path, "index.db"), "--json", bad)
    assert code == 2
    summary = json.loads(out)
    assert (summary["errors"], summary["bad_roots"]) == (1, [bad])
    assert bad in err and "1 with errors" in err


# -- the command line itself ------------------------------------------------------------------------------


def test_ocidx_alone_lists_the_commands(capsys: Capsys) -> None:
    code, out, err = ocidx(capsys)
    assert (code, out) == (2, "")
    for command in ("ref", "resolve", "find", "ls", "status", "scan", "daemon"):
        assert f"    {command}" in err
    assert "ocidx: ocidx" not in err


def _actions(parser: argparse.ArgumentParser, prefix: str = "ocidx") -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_actions(sub, f"{prefix} {name}"))
        else:
            found.append((prefix, action))
    return found


def test_every_option_and_argument_has_help_text() -> None:
    missing = [f"{where} {action.dest}" for where, action in _actions(build_parser()) if not action.help]
    assert missing == []


@pytest.mark.parametrize(
    "args",
    [
        ["ref", "--db", "x.db", "alpine"],
        ["ref", "--config", "x.toml", "alpine"],
        ["daemon", "--json"],
        ["resolve", "--json", "--format", "context", "oci-layout://x"],
        ["resolve", "--json", "--format", "digest", "oci-layout://x"],
    ],
)
def test_options_that_would_do_nothing_are_refused(capsys: Capsys, args: list[str]) -> None:
    code, _, err = ocidx(capsys, *args)
    assert code == 2
    assert "ocidx: ocidx" not in err


def test_status_speaks_in_words_and_ages(tmp_path: str, capsys: Capsys) -> None:
    db = os.path.join(tmp_path, "index.db")
    Layout(os.path.join(tmp_path, "root", "lay")).write_index([])
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    code, out, _ = ocidx(capsys, "status", "--db", db)
    assert code == 0
    assert "None" not in out and "_ns" not in out
    assert "daemon: not running" in out
    assert "layouts: 1 (0 with errors), 0 entries" in out
    with sqlite3.connect(db) as conn:  # a daemon that stopped 90 s ago
        now = time.time_ns()
        conn.execute(
            "UPDATE daemon SET pid = 1, started_ns = ?, heartbeat_ns = ?, stopped_ns = ?, "
            "last_reconcile_ns = ?, watch_mode = 'inotify'",
            (now - 200 * 10**9, now - 90 * 10**9, now - 90 * 10**9, now - 95 * 10**9),
        )
    code, out, _ = ocidx(capsys, "status", "--db", db)
    assert "daemon: not running, heartbeat 1m 30s ago" in out
    assert "last reconcile: 1m 35s ago" in out


def test_plurals_and_platforms_in_ls(tmp_path: str, capsys: Capsys) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    lay = Layout(os.path.join(root, "lay"))
    index = lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)])
    lay.write_index([named(index, ref="v1")])
    code, _, err = ocidx(capsys, "scan", "--db", db, "--no-progress", root)
    assert code == 0 and "scanned 1 layout in" in err
    code, out, _ = ocidx(capsys, "ls", "--db", db)
    assert out.rstrip("\n").split("\t")[1:] == ["ok", "1 entry"]
    code, out, _ = ocidx(capsys, "ls", "--db", db, lay.path)
    children = [line.split("\t")[0].strip() for line in out.splitlines() if line.startswith("    linux/")]
    assert children == ["linux/amd64", "linux/arm64"]


def test_ls_json_keys_are_the_same_indexed_or_not(tmp_path: str, capsys: Capsys) -> None:
    root, db = os.path.join(tmp_path, "root"), os.path.join(tmp_path, "index.db")
    indexed = Layout(os.path.join(root, "indexed"))
    indexed.write_index([named(indexed.manifest(), ref="v1")])
    _scan(capsys, db, root)
    fresh = Layout(os.path.join(tmp_path, "elsewhere"))
    fresh.write_index([named(fresh.manifest(), ref="v1")])
    documents = []
    for path in (indexed.path, fresh.path):
        code, out, err = ocidx(capsys, "ls", "--db", db, "--json", path)
        assert code == 0, err
        documents.append(json.loads(out)[0])
    assert list(documents[0]) == list(documents[1])
    assert (documents[0]["state"], documents[1]["state"]) == ("ok", "not-indexed")
    assert len(documents[1]["entries"]) == 1 and documents[1]["content_hash"]


@pytest.mark.parametrize("what", ["missing", "plain directory", "file"])
def test_a_missing_layout_has_its_own_category_apart_from_a_missing_tag(
    tmp_path: str, capsys: Capsys, what: str
) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    code, out, _ = ocidx(capsys, "resolve", "--json", f"oci-layout://{lay.path}:v2")
    assert (code, json.loads(out)["error"]) == (1, "not_found")  # the layout is there, the tag is not
    path = os.path.join(tmp_path, "export")
    if what == "plain directory":
        os.mkdir(path)
    elif what == "file":
        with open(path, "w") as f:
            f.write("not a layout\n")
    for args in (
        ["resolve", f"oci-layout://{path}:v1"],
        ["resolve", "--layout", path, ":v1"],
        ["ls", path],
    ):
        code, out, err = ocidx(capsys, *args, "--db", db, "--json")
        assert code == 1, args
        assert json.loads(out)["error"] == "layout_not_found", args
        assert path in err


def test_a_missing_database_says_how_to_name_a_daemons_database(tmp_path: str, capsys: Capsys) -> None:
    code, _, err = ocidx(capsys, "find", ":v1")
    assert code == 4
    assert "--db PATH or $OCIDX_DB" in err  # a user on a host whose daemon keeps its index elsewhere
    from indexer import DatabaseError, Index

    with Index(os.path.join(tmp_path, "none.db")) as index, pytest.raises(DatabaseError) as raised:
        index.find(":v1")
    assert "db_path or $OCIDX_DB" in raised.value.message and "--db" not in raised.value.message


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("oci:/srv/app:v1", "oci-layout:///srv/app:v1"),
        ("oci:layouts/alpine:3.16", "oci-layout://layouts/alpine:3.16"),
        ("oci:/srv/app:docker.io/library/alpine:3.16", "oci-layout:///srv/app/docker.io/library/alpine:3.16"),
        ("oci:/srv/app", "oci-layout:///srv/app"),
    ],
)
def test_skopeos_oci_syntax_is_answered_with_the_target_it_means(capsys: Capsys, typed: str, meant: str) -> None:
    code, _, err = ocidx(capsys, "resolve", typed)
    assert code == 2
    assert f"here it is written {meant}" in err and "--layout" not in err


def test_status_shows_the_fleet_and_no_watch_mode_for_a_stopped_daemon(tmp_path: str, capsys: Capsys) -> None:
    db = os.path.join(tmp_path, "index.db")
    Layout(os.path.join(tmp_path, "root", "lay")).write_index([])
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    now = time.time_ns()
    with sqlite3.connect(db) as conn:  # a daemon that published as build-17, then stopped
        conn.execute(
            "UPDATE daemon SET pid = 1, started_ns = ?, heartbeat_ns = ?, stopped_ns = ?, watch_mode = 'inotify'",
            (now - 100 * 10**9, now - 10 * 10**9, now - 10 * 10**9),
        )
        conn.execute(
            "INSERT INTO fleet_publisher (id, host, state, since_ns, watermark, published_ns) "
            "VALUES (1, 'build-17', 'connected', ?, 0, ?)",
            (now - 90 * 10**9, now - 12 * 10**9),
        )
    code, out, _ = ocidx(capsys, "status", "--db", db)
    assert code == 0
    assert "watch mode" not in out  # it watches nothing now
    assert "fleet: host build-17, not publishing (the daemon is not running), 1 change not yet published" in out
    with sqlite3.connect(db) as conn:  # the same daemon alive (this process stands for it)
        conn.execute("UPDATE daemon SET pid = ?, stopped_ns = NULL, heartbeat_ns = ?", (os.getpid(), now))
    code, out, _ = ocidx(capsys, "status", "--db", db)
    assert "watch mode: inotify" in out
    assert "fleet: publishing as host build-17 (connected 1m 30s ago), 1 change not yet published, last " in out


@pytest.mark.parametrize(
    ("args", "helps"),
    [
        (["resolve", "--bogus", "oci-layout://x"], "ocidx resolve --help"),
        (["fleet", "migrate", "--bogus"], "ocidx fleet migrate --help"),
        (["--bogus"], "ocidx --help"),
    ],
)
def test_an_unrecognized_argument_points_at_the_help_of_its_command(
    capsys: Capsys, args: list[str], helps: str
) -> None:
    code, _, err = ocidx(capsys, *args)
    assert code == 2
    assert f"unrecognized arguments: --bogus (see '{helps}')" in err


def test_a_name_that_finds_nothing_where_its_tag_is_held_says_how_to_find_it(tmp_path: str, capsys: Capsys) -> None:
    """skopeo copy ... oci:DIR:3.16 writes the tag only: alpine:3.16 finds nothing, :3.16 does."""
    lay = Layout(os.path.join(tmp_path, "root", "alpine"))
    lay.write_index([named(lay.manifest(), ref="3.16")])
    db = os.path.join(tmp_path, "index.db")
    _scan(capsys, db, os.path.join(tmp_path, "root"))
    code, _, err = ocidx(capsys, "find", "--db", db, "alpine:3.16")
    assert code == 1
    assert "a layout holds the tag 3.16 without that name" in err and "ocidx find :3.16" in err
    code, _, err = ocidx(capsys, "resolve", "--db", db, f"oci-layout://{lay.path}/alpine:3.16")
    assert code == 1
    assert f"oci-layout://{lay.path}:3.16)" in err
    assert ocidx(capsys, "find", "--db", db, ":3.16")[0] == 0  # the command the hint gives finds it
    code, _, err = ocidx(capsys, "find", "--db", db, "alpine:3.17")
    assert code == 1 and "without that name" not in err  # no hint where the tag is not held either
