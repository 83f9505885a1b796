"""The daemon against what other users and other writers can do to a watched tree and its config.

Real daemon processes, real inotify, real mounts (tmpfs, as root), real hard links and
real non-UTF-8 names; every wait polls a condition a user could observe against a deadline.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import pytest
from harness import FRESH_S, REPO, Daemon, needs_inotify, run, run_daemon, wait_for
from hostile import control_characters
from layouts import Layout, index_bytes, rewrite_in_place

integration = pytest.mark.integration


# -- config numbers ------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("reconcile_interval_s = nan", "daemon.reconcile_interval_s"),
        ("heartbeat_interval_s = nan", "daemon.heartbeat_interval_s"),
        ("heartbeat_interval_s = 1e-9", "daemon.heartbeat_interval_s"),
        ("reconcile_interval_s = 1e-9", "daemon.reconcile_interval_s"),
    ],
)
def test_a_daemon_with_a_nan_or_tiny_interval_exits_2_naming_the_key(tmp: str, line: str, key: str) -> None:
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    config = os.path.join(tmp, "bad.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(f"[daemon]\n{line}\n")
    env = Daemon(tmp, [root]).env
    proc = subprocess.run(
        [sys.executable, "-m", "indexer", "daemon", "--config", config, "--db", os.path.join(tmp, "i.db"), root],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(tmp, "i.db"))


# -- directories named blobs, symlinks followed out of a root -------------------------------------


def _layout(path: str, tag: str = "v1", label: str = "one") -> Layout:
    lay = Layout(path)
    lay.write_index_bytes(index_bytes(tag, label))
    return lay


def _stored_paths(tmp: str, db: str) -> set[str]:
    listed = run(tmp, "ls", "--db", db, "--json")
    assert listed.rc == 0, listed
    return {str(row["layout"]) for row in listed.json()}  # type: ignore[attr-defined]


@integration
def test_a_directory_named_blobs_outside_a_layout_is_searched(tmp: str) -> None:
    root = os.path.join(tmp, "root")
    top = _layout(os.path.join(root, "blobs", "app"))
    deep = _layout(os.path.join(root, "x", "blobs", "y", "app"))
    owner = _layout(os.path.join(root, "lay"))
    _layout(os.path.join(owner.path, "blobs", "sha256", "decoy"))  # inside a layout's own blobs/: not one
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", root).rc == 0
    assert _stored_paths(tmp, db) == {top.path, deep.path, owner.path}


@integration
@needs_inotify
def test_layouts_below_a_directory_named_blobs_are_indexed_as_they_appear(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    owner = _layout(os.path.join(root, "lay"))
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(owner.path, ":v1", "one"), "first layout indexed")
    top = _layout(os.path.join(root, "blobs", "app"), "v2", "two")
    deep = _layout(os.path.join(root, "x", "blobs", "y", "app"), "v3", "three")
    wait_for(lambda: daemon.indexed(top.path, ":v2", "two"), "ROOT/blobs/app indexed", FRESH_S)
    wait_for(lambda: daemon.indexed(deep.path, ":v3", "three"), "ROOT/x/blobs/y/app indexed", FRESH_S)
    rewrite_in_place(deep.index_path, index_bytes("v4", "four"))
    wait_for(lambda: daemon.indexed(deep.path, ":v4", "four"), "a rewrite below blobs/ indexed", FRESH_S)
    _layout(os.path.join(owner.path, "blobs", "sha256", "decoy"))
    rewrite_in_place(owner.index_path, index_bytes("v5", "five"))  # answered after the decoy's events
    wait_for(lambda: daemon.indexed(owner.path, ":v5", "five"), "a later change indexed", FRESH_S)
    assert os.path.join(owner.path, "blobs", "sha256", "decoy") not in daemon.layouts()


@integration
def test_a_layout_reached_through_a_followed_symlink_is_dropped_when_the_symlink_goes(tmp: str) -> None:
    root = os.path.join(tmp, "root")
    _layout(os.path.join(root, "own"))
    outside = _layout(os.path.join(tmp, "elsewhere", "app"))
    link = os.path.join(root, "link")
    os.symlink(os.path.dirname(outside.path), link)
    config = os.path.join(tmp, "follow.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(f'[[roots]]\npath = "{root}"\nfollow_symlinks = true\n')
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--config", config, "--no-progress").rc == 0
    assert outside.path in _stored_paths(tmp, db)
    os.unlink(link)  # the layout itself is still there, but nothing below the root leads to it
    assert run(tmp, "scan", "--db", db, "--config", config, "--no-progress").rc == 0
    assert outside.path not in _stored_paths(tmp, db)


@integration
@needs_inotify
def test_the_daemon_drops_a_symlinked_layout_at_its_next_reconcile(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    own = _layout(os.path.join(root, "own"))
    outside = _layout(os.path.join(tmp, "elsewhere", "app"), "v9", "nine")
    link = os.path.join(root, "link")
    os.symlink(os.path.dirname(outside.path), link)
    daemon = Daemon(tmp, [], reconcile_s=0.5)
    with open(daemon.config, "a", encoding="utf-8") as fh:
        fh.write(f'\n[[roots]]\npath = "{root}"\nfollow_symlinks = true\n')
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_for(lambda: daemon.indexed(outside.path, ":v9", "nine"), "the symlinked layout indexed")
    os.unlink(link)
    wait_for(lambda: outside.path not in daemon.layouts(), "the symlinked layout dropped")
    assert own.path in daemon.layouts()


# -- names that are not UTF-8 ---------------------------------------------------------------------


@integration
@needs_inotify
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_non_utf8_names_under_a_running_daemon_never_stop_it(tmp: str, daemons: list[Daemon], log_format: str) -> None:
    root = os.path.join(tmp, "root")
    plain = _layout(os.path.join(root, "plain"))
    odd_root = os.fsdecode(os.fsencode(tmp) + b"/root-\xff")  # a root named on the command line
    odd = _layout(os.path.join(odd_root, "app"))
    daemon = Daemon(tmp, [root, odd_root])
    with open(daemon.config, "a", encoding="utf-8") as fh:
        fh.write(f'log_format = "{log_format}"\n')
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_for(lambda: daemon.indexed(plain.path, ":v1", "one"), "first layout indexed")
    wait_for(lambda: daemon.indexed(odd.path, ":v1", "one"), "layout in a non-UTF-8 root indexed")

    broot = os.fsencode(root)
    os.makedirs(broot + b"/empty\xff/sub\xfe")  # a tree with no layout
    bad = _layout(os.fsdecode(broot + b"/team\xff/app\xfe"), "v2", "two")  # a layout in a new bad tree
    wait_for(lambda: daemon.indexed(bad.path, ":v2", "two"), "layout below a non-UTF-8 tree indexed", FRESH_S)
    rewrite_in_place(bad.index_path, index_bytes("v3", "three"))
    wait_for(lambda: daemon.indexed(bad.path, ":v3", "three"), "rewrite in a non-UTF-8 layout", FRESH_S)
    moved = os.fsdecode(broot + b"/moved\xfd")
    os.rename(os.fsdecode(broot + b"/team\xff"), moved)  # the tree renamed: old rows go, new ones come
    wait_for(lambda: bad.path not in daemon.layouts(), "the renamed-away layout dropped", FRESH_S)
    wait_for(
        lambda: daemon.indexed(os.path.join(moved, os.fsdecode(b"app\xfe")), ":v3", "three"),
        "renamed-in non-UTF-8 layout indexed",
        FRESH_S,
    )
    os.rename(os.fsdecode(broot + b"/empty\xff"), os.fsdecode(broot + b"/empty\xfc"))
    os.rmdir(os.fsdecode(broot + b"/empty\xfc/sub\xfe"))
    wait_for(lambda: daemon.indexed(plain.path, ":v1", "one") and not daemon.exited(), "daemon alive")
    rewrite_in_place(plain.index_path, index_bytes("v5", "five"))  # still answering events
    wait_for(lambda: daemon.indexed(plain.path, ":v5", "five"), "a later change indexed", FRESH_S)

    assert not daemon.exited(), daemon.log()
    status = run(tmp, "status", "--db", daemon.db, "--json")
    assert status.rc == 0, status
    assert status.json()["daemon"]["running"] is True, status  # type: ignore[index]
    assert run(tmp, "status", "--db", daemon.db).rc == 0
    listed = run(tmp, "ls", "--db", daemon.db)
    assert b"app\\udcfe" in listed.out, listed
    assert daemon.stop() == 0
    log = daemon.log()
    assert "Traceback" not in log, log
    with open(daemon.log_path, "rb") as fh:
        assert not control_characters(fh.read())
    if log_format == "json":
        levels = {json.loads(line)["level"] for line in log.splitlines()}
    else:
        levels = {line.split(" ")[2] for line in log.splitlines()}
    assert levels <= {"info", "INFO"}, log  # nothing went wrong: no warning, no error


# -- SIGHUP ---------------------------------------------------------------------------------------


@integration
@needs_inotify
def test_sighup_reloads_the_config_and_watches_a_new_root_at_once(tmp: str, daemons: list[Daemon]) -> None:
    first = os.path.join(tmp, "first")
    second = os.path.join(tmp, "second")
    a = _layout(os.path.join(first, "a"))
    b = _layout(os.path.join(second, "b"), "v2", "two")
    daemon = Daemon(tmp, [])
    with open(daemon.config, encoding="utf-8") as fh:
        settings = fh.read()
    with open(daemon.config, "a", encoding="utf-8") as fh:
        fh.write(f'\n[[roots]]\npath = "{first}"\n')
    daemons.append(daemon)
    daemon.start().wait_ready()
    wait_for(lambda: daemon.indexed(a.path, ":v1", "one"), "the first root indexed")
    assert daemon.stored(b.path) is None

    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write(settings + f'\n[[roots]]\npath = "{first}"\n\n[[roots]]\npath = "{second}"\n')
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: daemon.indexed(b.path, ":v2", "two"), "the added root indexed after SIGHUP")
    wait_for(lambda: "configuration reloaded" in daemon.log(), "the reload logged")
    rewrite_in_place(b.index_path, index_bytes("v3", "three"))  # the new root is watched, not polled
    wait_for(lambda: daemon.indexed(b.path, ":v3", "three"), "a change in the added root", FRESH_S)

    with open(daemon.config, "w", encoding="utf-8") as fh:  # drop the first root
        fh.write(settings + f'\n[[roots]]\npath = "{second}"\n')
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "1 roots (0 added, 1 removed)" in daemon.log(), "the second reload logged")
    rewrite_in_place(b.index_path, index_bytes("v4", "four"))
    wait_for(lambda: daemon.indexed(b.path, ":v4", "four"), "still watching the kept root", FRESH_S)
    assert not daemon.exited()
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


@integration
@needs_inotify
def test_sighup_with_an_invalid_config_keeps_the_running_one(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = _layout(os.path.join(root, "a"))
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":v1", "one"), "first state indexed")
    with open(daemon.config, "a", encoding="utf-8") as fh:
        fh.write("reconcile_interval_s = nan\n")  # a second key in [daemon]: invalid TOML, then a bad value
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "not reloading" in daemon.log(), "the refused reload logged")
    with open(daemon.config, "w", encoding="utf-8") as fh:
        fh.write("[daemon]\nheartbeat_interval_s = nan\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "daemon.heartbeat_interval_s" in daemon.log(), "the bad key named")
    rewrite_in_place(lay.index_path, index_bytes("v2", "two"))
    wait_for(lambda: daemon.indexed(lay.path, ":v2", "two"), "still indexing with the old config", FRESH_S)
    heartbeat = daemon.status()["daemon"]
    assert isinstance(heartbeat, dict) and heartbeat["running"] is True
    assert not daemon.exited()
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


# -- hard links -----------------------------------------------------------------------------------


@integration
@needs_inotify
def test_a_hard_linked_index_json_rewritten_through_one_layout_refreshes_the_others(
    tmp: str, daemons: list[Daemon]
) -> None:
    root = os.path.join(tmp, "root")
    a = _layout(os.path.join(root, "a"))
    b = Layout(os.path.join(root, "team", "b"))
    c = Layout(os.path.join(root, "c"))
    os.link(a.index_path, b.index_path)  # one file, three layouts (cp -al, a hard-linked cache copy)
    os.link(a.index_path, c.index_path)
    daemon = run_daemon(daemons, tmp, [root])
    for lay in (a, b, c):
        wait_for(functools.partial(daemon.indexed, lay.path, ":v1", "one"), f"{lay.path} indexed")

    rewrite_in_place(a.index_path, index_bytes("v2", "two"))  # inotify reports it for a/ only
    for lay in (a, b, c):
        wait_for(functools.partial(daemon.indexed, lay.path, ":v2", "two"), f"{lay.path} refreshed", FRESH_S)
    rewrite_in_place(b.index_path, index_bytes("v3", "three"))
    for lay in (a, b, c):
        wait_for(functools.partial(daemon.indexed, lay.path, ":v3", "three"), f"{lay.path} refreshed", FRESH_S)
    assert daemon.stop() == 0


# -- file systems mounted below a root --------------------------------------------------------------


def _mount_tmpfs(point: str) -> None:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", point], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")


def _umount(point: str) -> None:
    subprocess.run(["umount", point], capture_output=True, check=False)


@integration
@needs_inotify
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_file_system_mounted_below_a_root_after_start_is_watched_at_once(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    first = _layout(os.path.join(root, "a"))
    point = os.path.join(root, "team", "mnt")
    os.makedirs(point)
    daemon = run_daemon(daemons, tmp, [root])  # reconcile_interval_s = 300: only the watch can see it
    wait_for(lambda: daemon.indexed(first.path, ":v1", "one"), "first layout indexed")
    _mount_tmpfs(point)
    try:
        made = _layout(os.path.join(point, "cache", "app"), "v2", "two")  # written into the new mount
        wait_for(lambda: daemon.indexed(made.path, ":v2", "two"), "layout on the new mount indexed", FRESH_S)
        rewrite_in_place(made.index_path, index_bytes("v3", "three"))
        wait_for(lambda: daemon.indexed(made.path, ":v3", "three"), "a change on the mount indexed", FRESH_S)
        inner = os.path.join(point, "inner")
        os.makedirs(inner)
        _mount_tmpfs(inner)  # a mount inside the new mount
        try:
            deeper = _layout(os.path.join(inner, "app"), "v4", "four")
            wait_for(lambda: daemon.indexed(deeper.path, ":v4", "four"), "a nested mount indexed", FRESH_S)
        finally:
            _umount(inner)
        wait_for(lambda: deeper.path not in daemon.layouts(), "the nested mount's layout dropped", FRESH_S)
    finally:
        _umount(point)
    wait_for(lambda: made.path not in daemon.layouts(), "the unmounted layout dropped", FRESH_S)
    rewrite_in_place(first.index_path, index_bytes("v5", "five"))
    wait_for(lambda: daemon.indexed(first.path, ":v5", "five"), "the root still watched", FRESH_S)
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


@integration
@needs_inotify
def test_sighup_with_a_new_names_policy_re_reads_every_layout(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "skopeo"))
    lay.write_index_bytes(index_bytes("alpine:3.15", "one"))  # skopeo copy ... oci:DIR:alpine:3.15
    daemon = run_daemon(daemons, tmp, [root])
    wait_for(lambda: daemon.indexed(lay.path, ":3.15", "one"), "the familiar name's tag indexed")
    with open(daemon.config, "a", encoding="utf-8") as fh:
        fh.write('\n[names]\nfamiliar_ref_names = "ignore"\n')
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "re-reading every layout" in daemon.log(), "the policy change logged")
    # index.json did not change: only re-reading it under the new policy drops the name's rows
    wait_for(lambda: daemon.answer(lay.path, ":3.15") is None, "the name dropped under the new policy")
    assert daemon.stop() == 0


@integration
@needs_inotify
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_point_whose_name_the_kernel_escapes_is_watched_too(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    point = os.path.join(root, "m nt\t\\x\n" + os.fsdecode(b"\xff"))  # /proc/self/mountinfo writes \040 \011 \134 \012
    os.makedirs(point)
    daemon = run_daemon(daemons, tmp, [root])
    _mount_tmpfs(point)
    try:
        made = _layout(os.path.join(point, "app"), "v2", "two")
        wait_for(lambda: daemon.indexed(made.path, ":v2", "two"), "layout on the oddly named mount", FRESH_S)
    finally:
        _umount(point)
    wait_for(lambda: made.path not in daemon.layouts(), "dropped after umount", FRESH_S)
    assert daemon.stop() == 0


@integration
@needs_inotify
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_file_system_mounted_before_start_is_watched(tmp: str, daemons: list[Daemon]) -> None:
    root = os.path.join(tmp, "root")
    point = os.path.join(root, "mnt")
    os.makedirs(point)
    _mount_tmpfs(point)
    try:
        daemon = run_daemon(daemons, tmp, [root])
        made = _layout(os.path.join(point, "app"), "v2", "two")  # after start, on a mount older than the watch
        wait_for(lambda: daemon.indexed(made.path, ":v2", "two"), "layout on the earlier mount", FRESH_S)
    finally:
        _umount(point)
    wait_for(lambda: made.path not in daemon.layouts(), "dropped after umount", FRESH_S)
    assert daemon.stop() == 0
