"""The test harness every test file shares: running ocidx as a user would, and reading what it wrote.

Every command runs for real (``python -m indexer`` in a subprocess, on real files); every wait polls
a condition a user could observe against a deadline, never a sleep. Fixtures built on it (``tmp``,
``daemons``, the PostgreSQL cluster) live in conftest.py; layout builders in layouts.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import hostile
import pytest

from indexer.config import Config
from indexer.errors import OcidxError
from indexer.query import Index
from indexer.scan.scanner import Scanner
from indexer.store import path_of
from indexer.store import read as db_read
from indexer.store.writer import Store
from indexer.sync import socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# root without the capabilities that bypass file permissions
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
# What a command, a daemon's start or stop, or a polled condition may take before the test fails:
# generous, for a loaded machine; a passing test never waits it out.
DEADLINE_S = 60.0
# docs/operations.md: a change is answered from the index about 0.1 s after it. Changes made while the
# daemon watches get this (generous) deadline, shorter than the 3 s after which the racy-clean
# re-check would find them anyway: so the tests that use it fail if the watch path itself is broken.
FRESH_S = 2.0

needs_inotify = pytest.mark.skipif(not os.path.isdir("/proc/sys/fs/inotify"), reason="needs Linux inotify")


# -- commands ---------------------------------------------------------------------------------------


class Run:
    """One finished ``ocidx`` command."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> None:
        self.args = list(args)
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> object:
        """stdout as the one JSON document a ``--json`` command prints."""
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"ocidx {self.args!r} -> {self.rc}\nstdout: {self.out[-2000:]!r}\nstderr: {self.err[-2000:]!r}"


def environment(tmp: str) -> dict[str, str]:
    """An environment with no user config, database or fleet DSN leaking in."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("OCIDX_")}
    out["XDG_CONFIG_HOME"] = os.path.join(tmp, "xdg-config")
    out["XDG_DATA_HOME"] = os.path.join(tmp, "xdg-data")
    out["PYTHONPATH"] = REPO
    return out


def run(tmp: str, *args: str, timeout: float = DEADLINE_S, prefix: Sequence[str] = ()) -> Run:
    """Run ``ocidx ARGS``; assert that neither stdout nor stderr holds a raw control character."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "indexer", *args],
        capture_output=True,
        env=environment(tmp),
        cwd=tmp,
        timeout=timeout,
        check=False,
    )
    result = Run(args, proc)
    assert "Traceback" not in proc.stderr.decode(errors="replace"), result
    for stream in (proc.stdout, proc.stderr):
        bad = hostile.control_characters(stream)
        assert not bad, f"raw control characters in output of {result!r}: {bad[:5]}"
    return result


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> object:
    """Poll *condition* until it is truthy and return its value; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def write_config(tmp: str, text: str) -> str:
    """A config file holding *text*; its path."""
    path = os.path.join(tmp, "config.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- what a database holds --------------------------------------------------------------------------


def rows(db: str) -> dict[str, list[tuple[object, ...]]]:
    """The whole index as sorted rows keyed by layout path: ids and timestamps left out."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = {
            "layouts": "SELECT path, state, error_category, content_hash FROM layouts",
            "entries": "SELECT l.path, e.position, e.digest, e.media_type, e.size, e.platform, e.annotations, "
            "e.invalid_names, e.warnings FROM entries e JOIN layouts l ON l.id = e.layout_id",
            "names": "SELECT l.path, e.digest, e.position, n.name, n.tag, n.how FROM names n "
            "JOIN entries e ON e.id = n.entry_id JOIN layouts l ON l.id = n.layout_id",
            "children": "SELECT l.path, e.digest, c.position, c.parent, c.depth, c.digest, c.media_type, c.size, "
            "c.platform FROM children c JOIN entries e ON e.id = c.entry_id JOIN layouts l ON l.id = c.layout_id",
            "warnings": "SELECT l.path, w.message FROM layout_warnings w JOIN layouts l ON l.id = w.layout_id",
        }
        return {name: sorted(conn.execute(sql).fetchall(), key=repr) for name, sql in tables.items()}
    finally:
        conn.close()


def select(db: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """The rows of one read-only query on *db*."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def integrity(db: str) -> str:
    """``PRAGMA integrity_check`` of *db*."""
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- the daemon as a real process -------------------------------------------------------------------

# The daemon's settings for tests that watch changes: short debounce and heartbeat, small batches.
FAST_CONFIG = (
    "[daemon]\ndebounce_ms = 20\nreconcile_interval_s = {reconcile_s}\nheartbeat_interval_s = 0.2\nbatch_size = 50\n"
)


class Daemon:
    """One ``ocidx daemon`` subprocess with its database, config and log file (stdout and stderr).

    *config* is a config file of the test's own; without one the daemon runs on :data:`FAST_CONFIG`.
    *env* adds to :func:`environment`; *prefix* runs the daemon under another program (``setpriv``, ``unshare``).
    """

    def __init__(
        self,
        tmp: str,
        roots: Sequence[str],
        *,
        db: str | None = None,
        config: str | None = None,
        reconcile_s: float = 300.0,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.tmp = tmp
        self.db = db or os.path.join(tmp, "index.db")
        self.roots = list(roots)
        if config is None:
            config = os.path.join(tmp, "ocidx.toml")
            with open(config, "w", encoding="utf-8") as fh:
                fh.write(FAST_CONFIG.format(reconcile_s=reconcile_s))
        self.config = config
        self.log_path = os.path.join(tmp, f"daemon-{time.monotonic_ns()}.log")
        self.env = {**environment(tmp), **(env or {})}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that runs this daemon."""
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "indexer",
            "daemon",
            "--config",
            self.config,
            "--db",
            self.db,
            *self.roots,
        ]

    def start(self) -> Daemon:
        """Start the process (not waiting for it to be ready); self."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=self.tmp, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """Everything the daemon has logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_ready(self, timeout: float = DEADLINE_S) -> Daemon:
        """Wait for the start-up reconcile to finish (the ``ready:`` line); self."""
        wait_for(lambda: "ready:" in self.log() or self.exited(), "the daemon says ready", timeout)
        assert not self.exited(), self.log()[-3000:]
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send *sig* and wait for the exit (:meth:`wait`); the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(f"on {signal.Signals(sig).name}")

    def wait(self, what: str = "by itself") -> int:
        """Wait for the process to exit; the exit code. The log holds no traceback and no raw control character."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the daemon did not exit within the deadline {what}")
        log = self.log()
        assert "Traceback" not in log, log
        assert not hostile.control_characters(log.encode()), hostile.control_characters(log.encode())[:5]
        return rc

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(DEADLINE_S)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # -- observations through the public lookup API --

    def answer(self, layout: str, ref: str) -> object:
        try:
            with Index(self.db, config=Config()) as index:
                return index.resolve_in(layout, ref)
        except OcidxError:
            return None

    def indexed(self, layout: str, ref: str, label: str, **annotations: str) -> bool:
        """The index itself (not a read-through) answers *ref* in *layout* with image *label*."""
        from layouts import image

        answer = self.answer(layout, ref)
        if answer is None:
            return False
        want = str(image(label)["digest"])
        got_annotations = answer.annotations  # type: ignore[attr-defined]
        return (
            answer.digest == want  # type: ignore[attr-defined]
            and answer.freshness == "indexed"  # type: ignore[attr-defined]
            and all(got_annotations.get(k) == v for k, v in annotations.items())
        )

    def layouts(self) -> set[str]:
        """The layouts the daemon's index holds (its rows, not what a lookup would read through)."""
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        except sqlite3.Error:
            return set()
        try:
            return {path_of(row[0]) for row in conn.execute("SELECT path FROM layouts")}
        except sqlite3.Error:
            return set()
        finally:
            conn.close()

    def status(self) -> dict[str, object]:
        with Index(self.db, config=Config()) as index:
            return index.status()

    def stored(self, layout: str) -> db_read.StoredLayout | None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return db_read.layout(conn, os.path.realpath(layout))
        finally:
            conn.close()


def workers_of(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """The worker processes of process *pid* (with ``marker=b"multiprocessing"``, its resource tracker too)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == pid and marker in cmdline:
            out.append(int(entry))
    return out


def indexed(db: str) -> int:
    """How many layouts *db* holds so far (0 while it does not exist yet)."""
    if not os.path.exists(db):
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM layouts").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not migrated yet
    finally:
        conn.close()


def run_daemon(daemons: list[Daemon], tmp: str, roots: list[str], **options: object) -> Daemon:
    """Start a daemon on *roots* that the ``daemons`` fixture stops at the end; ready."""
    daemon = Daemon(tmp, roots, **options)  # type: ignore[arg-type]
    daemons.append(daemon)
    return daemon.start().wait_ready()


# -- the real tools (skopeo, umoci) ------------------------------------------------------------------


def tool(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a real tool (``skopeo``, ``umoci``, ...) to the end, its output captured."""
    return subprocess.run(list(args), capture_output=True, timeout=120, check=False)


def must(*args: str) -> bytes:
    """Run a real tool that must succeed; its stdout."""
    done = tool(*args)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.decode(errors='replace')}"
    return done.stdout


def skopeo_digest(layout: str, ref: str) -> str | None:
    """What skopeo resolves ``oci:LAYOUT:REF`` to (sha256 of the raw manifest), or None."""
    done = tool("skopeo", "inspect", "--raw", f"oci:{layout}:{ref}")
    if done.returncode != 0:
        return None
    return "sha256:" + hashlib.sha256(done.stdout).hexdigest()


def skopeo_copy(src: str, dest: str, *options: str) -> None:
    """``skopeo copy [OPTIONS] oci:SRC oci:DEST`` (--insecure-policy: a local copy between two
    directories needs no /etc/containers/policy.json)."""
    must("skopeo", "--insecure-policy", "copy", *options, "--quiet", f"oci:{src}", f"oci:{dest}")


# -- in-process stand-ins -----------------------------------------------------------------------------


@contextlib.contextmanager
def scanner_on(db: str, config: Config | None = None) -> Iterator[Scanner]:
    """A scanner writing the database at *db* through a store of its own (both closed at the end)."""
    store = Store(db)
    scanner = Scanner(store, config or Config())
    try:
        yield scanner
    finally:
        try:
            scanner.close()
        finally:
            store.close()


@contextlib.contextmanager
def barrier_answering(db: str, answer: str | None) -> Iterator[None]:
    """A stand-in daemon's barrier socket beside *db* that answers every request with *answer*
    (None: no socket at all), served by a thread until the block ends."""
    if answer is None:
        yield
        return
    path = socket_path(db)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            with client:
                client.recv(64)
                client.sendall(answer.encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()
        os.unlink(path)
