"""The root daemon must not be a tool for other users: files planted beside the database, symlinks
out of a layout. Real files, real symlinks, real ``ocidx`` processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from harness import FRESH_S, REPO, Daemon, environment, run, wait_for
from layouts import Layout, named

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

VICTIM_TEXT = b"root-only secret: do not truncate\n"


def victim(tmp: str) -> str:
    """A file of another part of the system that a planted symlink points at."""
    path = os.path.join(tmp, "etc", "shadow")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(VICTIM_TEXT)
    os.chmod(path, 0o600)
    return path


def daemon_once(tmp: str, db: str, root: str) -> subprocess.CompletedProcess[bytes]:
    """Start ``ocidx daemon``; it must refuse and exit by itself (the timeout fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", "indexer", "daemon", "--db", db, root],
        capture_output=True,
        env=environment(tmp),
        cwd=REPO,
        timeout=60,
        check=False,
    )


def one_layout(tmp: str) -> str:
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "app"))
    lay.write_index([named(lay.manifest(label="app"), ref="v1")])
    return root


def plant_symlink(target: str) -> Callable[[str], None]:
    return lambda name: os.symlink(target, name)


def plant_hard_link(target: str) -> Callable[[str], None]:
    return lambda name: os.link(target, name)


def plant_foreign(name: str) -> None:
    with open(name, "wb") as fh:
        fh.write(b"someone else's file\n")
    os.chown(name, 65534, 65534)


def plant_fifo(name: str) -> None:
    os.mkfifo(name)


PLANTS: dict[str, Callable[[str], Callable[[str], None]]] = {
    "symlink": plant_symlink,
    "dangling symlink": lambda victim_path: plant_symlink(victim_path + ".created-by-root"),
    "hard link": plant_hard_link,
    "other user's file": lambda _victim: plant_foreign,
    "fifo": lambda _victim: plant_fifo,
}


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize(("suffix", "command"), [(".lock", "daemon"), (".migrate-lock", "scan"), ("", "scan")])
def test_a_file_planted_beside_the_database_is_refused_and_left_alone(
    tmp: str, plant: str, suffix: str, command: str
) -> None:
    root = one_layout(tmp)
    target = victim(tmp)
    dbdir = os.path.join(tmp, "var")
    os.makedirs(dbdir)
    db = os.path.join(dbdir, "index.db")
    planted = db + suffix
    PLANTS[plant](target)(planted)
    before = os.lstat(planted)

    if command == "daemon":
        proc = daemon_once(tmp, db, root)
        rc, err = proc.returncode, proc.stderr.decode("utf-8", "replace")
    else:
        ran = run(tmp, "scan", "--db", db, "--no-progress", root)
        rc, err = ran.rc, ran.err.decode("utf-8", "replace")
    assert rc == 4, err
    assert planted in err and "Traceback" not in err
    with open(target, "rb") as fh:
        assert fh.read() == VICTIM_TEXT  # neither truncated nor written
    assert not os.path.lexists(target + ".created-by-root")  # nor created through a dangling link
    after = os.lstat(planted)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.integration
@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_symlink_planted_at_the_write_ahead_log_is_refused(tmp: str, suffix: str) -> None:
    root = one_layout(tmp)
    target = victim(tmp)
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", root).rc == 0
    for leftover in ("-wal", "-shm"):  # the clean close left none; a user plants one
        if os.path.lexists(db + leftover):
            os.unlink(db + leftover)
    os.symlink(target, db + suffix)
    ran = run(tmp, "scan", "--db", db, "--no-progress", "--full", root)
    assert ran.rc == 4 and (db + suffix).encode() in ran.err, ran
    proc = daemon_once(tmp, db, root)
    assert proc.returncode == 4 and (db + suffix).encode() in proc.stderr, proc.stderr
    with open(target, "rb") as fh:
        assert fh.read() == VICTIM_TEXT


@pytest.mark.integration
def test_the_daemons_own_lock_and_database_are_reused(tmp: str) -> None:
    """The checks do not refuse what ocidx itself left: a second scan and a daemon run on them."""
    root = one_layout(tmp)
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", root).rc == 0
    assert run(tmp, "scan", "--db", db, "--no-progress", "--full", root).rc == 0
    assert os.path.isfile(db + ".migrate-lock") and not os.path.islink(db + ".migrate-lock")


# -- index.json pointing out of its layout ------------------------------------------------------------

TOKEN = "SECRET-TOKEN-7f3a9c"


def private_index(tmp: str) -> tuple[str, str]:
    """A root-only index.json outside every root whose annotation holds a token; (path, its sha256)."""
    import hashlib

    other = Layout(os.path.join(tmp, "private", "layout"))
    other.write_index([named(other.manifest(label="private"), ref="latest", **{"org.example.token": TOKEN})])
    os.chmod(other.index_path, 0o600)
    os.chmod(os.path.dirname(other.path), 0o700)
    with open(other.index_path, "rb") as fh:
        return other.index_path, hashlib.sha256(fh.read()).hexdigest()


def stored_state(db: str, path: str) -> str | None:
    """The stored state of the layout at exactly *path* (no symlink resolved), None when not stored."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT state FROM layouts WHERE path = ?", (path,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def database_bytes(db: str) -> bytes:
    out = b""
    for name in (db, db + "-wal"):
        if os.path.exists(name):
            with open(name, "rb") as fh:
                out += fh.read()
    return out


@pytest.mark.integration
def test_index_json_symlinked_out_of_its_layout_is_a_layout_error_and_leaks_nothing(tmp: str) -> None:
    secret, secret_hash = private_index(tmp)
    root = one_layout(tmp)
    evil = Layout(os.path.join(root, "evil"))
    os.symlink(secret, evil.index_path)
    db = os.path.join(tmp, "index.db")
    scanned = run(tmp, "scan", "--db", db, "--no-progress", root)
    assert scanned.rc == 0 and b"outside the layout" in scanned.err, scanned

    shown = run(tmp, "ls", "--db", db, "--json")
    assert shown.rc == 0, shown
    rows = {row["layout"]: row for row in shown.json()}  # type: ignore[attr-defined]
    assert rows[evil.path]["state"] == "error" and rows[evil.path]["error"] == "layout_unreadable", rows
    assert rows[evil.path]["entries"] == 0
    refused = run(tmp, "ls", "--db", db, "--json", evil.path)
    assert refused.rc == 5 and TOKEN.encode() not in refused.out, refused
    assert run(tmp, "resolve", "--db", db, "--layout", evil.path, ":latest").rc != 0
    found = run(tmp, "find", "--db", db, "--json", ":latest")
    assert TOKEN.encode() not in found.out
    stored = database_bytes(db)
    assert TOKEN.encode() not in stored and secret_hash.encode() not in stored


@pytest.mark.integration
def test_the_daemon_refuses_an_index_json_symlinked_out_after_start(tmp: str) -> None:
    secret, secret_hash = private_index(tmp)
    root = one_layout(tmp)
    daemon = Daemon(tmp, [root]).start()
    try:
        daemon.wait_ready()
        evil = Layout(os.path.join(root, "evil"))  # writes oci-layout; index.json comes as a symlink
        os.symlink(secret, evil.index_path)
        wait_for(
            lambda: (s := daemon.stored(evil.path)) is not None and s.state == "error",
            "the symlinked-out layout is stored as an error",
        )
        stored = daemon.stored(evil.path)
        assert stored is not None and stored.error_category == "layout_unreadable"
        assert TOKEN.encode() not in database_bytes(daemon.db)
        assert secret_hash.encode() not in database_bytes(daemon.db)
        assert not daemon.exited()
    finally:
        assert daemon.stop() == 0


@pytest.mark.integration
@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_lookup_refuses_a_symlink_planted_at_the_shared_memory_file(tmp: str, suffix: str) -> None:
    """A lookup opens the database read-only, but SQLite opens (and may truncate) -shm read-write."""
    root = one_layout(tmp)
    target = victim(tmp)
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", root).rc == 0
    for leftover in ("-wal", "-shm"):
        if os.path.lexists(db + leftover):
            os.unlink(db + leftover)
    os.symlink(target, db + suffix)
    found = run(tmp, "find", "--db", db, ":v1")
    assert found.rc == 4 and (db + suffix).encode() in found.err, found
    with open(target, "rb") as fh:
        assert fh.read() == VICTIM_TEXT


@pytest.mark.integration
def test_a_layout_directory_replaced_by_a_symlink_out_leaks_nothing(tmp: str) -> None:
    """``mv app app.old; ln -s /root/private app`` under the daemon: nothing of the target is indexed."""
    secret, secret_hash = private_index(tmp)
    root = one_layout(tmp)
    app = os.path.join(root, "app")
    daemon = Daemon(tmp, [root]).start()
    try:
        daemon.wait_ready()
        wait_for(lambda: daemon.stored(app) is not None, "the layout indexed")
        os.rename(app, app + ".old")
        os.symlink(os.path.dirname(secret), app)
        wait_for(lambda: os.path.join(root, "app.old") in daemon.layouts(), "the moved layout indexed", FRESH_S)
        # the old name is dropped or refused, never read through the link, nor is the link's target indexed
        wait_for(lambda: stored_state(daemon.db, app) in (None, "error"), "the replaced layout refused", FRESH_S)
        assert os.path.dirname(secret) not in daemon.layouts()
        os.utime(os.path.join(app + ".old", "index.json"))  # one more event through the daemon
        wait_for(lambda: not daemon.stored(os.path.join(root, "app.old")).is_racy(), "settled")  # type: ignore[union-attr]
        stored = database_bytes(daemon.db)
        assert TOKEN.encode() not in stored and secret_hash.encode() not in stored
        assert not daemon.exited()
    finally:
        assert daemon.stop() == 0


def test_a_swapped_in_directory_whose_index_json_links_inside_itself_is_refused(tmp: str) -> None:
    """The swapped-in directory's own symlinked index.json resolves "inside" it: still not the layout named."""
    from indexer.errors import LayoutUnreadable
    from indexer.layout import read_layout

    secret, _ = private_index(tmp)
    private = os.path.dirname(secret)
    os.rename(secret, os.path.join(private, "real.json"))
    os.symlink("real.json", secret)
    root = one_layout(tmp)
    app = os.path.join(root, "app")
    assert read_layout(app).entries  # readable at its real path
    os.rename(app, app + ".old")
    os.symlink(private, app)
    with pytest.raises(LayoutUnreadable, match="led outside the layout"):
        read_layout(app)


# -- who may read the index -----------------------------------------------------------------------------

OTHER_UID = 65534  # nobody
READERS_GID = 42420  # the group of readers (a number: no account needs to exist for it)


def unit_setting(name: str) -> str:
    """A setting of the documented systemd unit (docs/examples/ocidx.service)."""
    with open(os.path.join(REPO, "docs", "examples", "ocidx.service")) as f:
        for line in f:
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1].strip()
    raise AssertionError(f"{name} is not in docs/examples/ocidx.service")


def state_directory(mode: int) -> str:
    """A directory as systemd makes StateDirectory= (owned by the daemon's user, the readers' group,
    *mode*), below a directory every user may enter, as /var/lib is."""
    import tempfile

    base = tempfile.mkdtemp(prefix="ocidx-state-", dir="/tmp")
    os.chmod(base, 0o755)
    state = os.path.join(base, "ocidx")
    os.mkdir(state)
    os.chown(state, os.geteuid(), READERS_GID)
    os.chmod(state, mode)
    return state


def sqlite_as(uid: int, groups: list[int], uri: str) -> subprocess.CompletedProcess[str]:
    """``sqlite3 URI 'SELECT count(*) FROM layouts'`` as user *uid* with supplementary *groups*."""
    who = ["setpriv", f"--reuid={uid}", f"--regid={uid}"]
    who += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(
        [*who, "sqlite3", uri, "SELECT count(*) FROM layouts"], capture_output=True, text=True, timeout=60
    )


needs_sqlite_cli = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("sqlite3")),
    reason="needs root, setpriv, sqlite3",
)


@needs_sqlite_cli
def test_the_documented_reader_group_set_up_shows_the_index_to_the_group_only(tmp: str) -> None:
    # Before: the recipe (StateDirectoryMode=3775, UMask=0002) left index.db mode 0664 in a directory
    # every user could enter, so any local user read the paths and tags of every layout indexed.
    state = state_directory(int(unit_setting("StateDirectoryMode"), 8))
    umask = int(unit_setting("UMask"), 8)
    root = os.path.join(tmp, "root")
    Layout(os.path.join(root, "app")).write_index([])
    db = os.path.join(state, "index.db")
    with_umask = ["sh", "-c", f'umask {umask:o} && exec "$@"', "sh"]
    try:
        with Daemon(tmp, [root], db=db, prefix=with_umask).start().wait_ready() as daemon:
            files = [db, db + "-wal", db + "-shm", db + ".lock", db + ".migrate-lock"]
            modes = {os.path.basename(f): oct(os.stat(f).st_mode & 0o777) for f in files}
            assert all(not int(m, 8) & 0o007 for m in modes.values()), modes
            outsider = sqlite_as(OTHER_UID, [], f"file:{db}?immutable=1")
            assert outsider.returncode != 0 and outsider.stdout == "", outsider
            member = sqlite_as(OTHER_UID, [READERS_GID], f"file:{db}?mode=ro")
            assert (member.returncode, member.stdout.strip()) == (0, "1"), member
            assert daemon.stop() == 0
        # Stopped cleanly: -wal and -shm are gone, and a reader of the group creates -shm itself.
        assert not os.path.exists(db + "-shm")
        member = sqlite_as(OTHER_UID, [READERS_GID], f"file:{db}?mode=ro")
        assert (member.returncode, member.stdout.strip()) == (0, "1"), member
        assert "readable by every local user" not in daemon.log()
    finally:
        shutil.rmtree(os.path.dirname(state))


@pytest.mark.skipif(os.geteuid() != 0, reason="a state directory owned by another group needs root")
def test_the_daemon_warns_at_start_when_every_user_can_read_its_database(tmp: str) -> None:
    # An index made with the recipe of before (mode 0664 in a directory mode 3775).
    state = state_directory(0o3775)
    root = os.path.join(tmp, "root")
    Layout(os.path.join(root, "app")).write_index([])
    db = os.path.join(state, "index.db")
    try:
        assert run(tmp, "scan", "--db", db, root).rc == 0
        os.chmod(db, 0o664)
        with Daemon(tmp, [root], db=db).start().wait_ready() as daemon:
            assert daemon.stop() == 0
        text = daemon.log()
        assert "WARNING" in text and "readable by every local user" in text and f"{db} (mode 0664)" in text, text
        assert f"chmod o-rwx {db}*" in text
    finally:
        shutil.rmtree(os.path.dirname(state))
