"""A throwaway PostgreSQL cluster for the fleet tests and the fleet benchmark.

``initdb`` in a temporary directory, owned by an unprivileged user when we run as root
(PostgreSQL refuses to run as root), listening only on a Unix socket in that directory
(``listen_addresses=''``) under a free port number. Every role connects through the socket
with ``trust`` authentication: the cluster lives only as long as the test session, and its
directory is private to the user that runs it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    import psycopg

BIN_DIRS = ("/usr/local/pgsql/bin",)  # besides Debian's /usr/lib/postgresql/VERSION/bin, newest first
PG_USER = "ocidx-pg"  # created (as a system user) when we are root and it is missing
PROGRAMS = ("initdb", "pg_ctl", "postgres")


def bin_dir() -> str | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is not installed."""
    import glob

    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0
    )
    for directory in [*reversed(debian), *BIN_DIRS]:
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in PROGRAMS):
            return directory
    found = shutil.which("pg_ctl")
    if found is not None:
        directory = os.path.dirname(found)
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in PROGRAMS):
            return directory
    return None


def _free_port() -> int:
    """A port number no TCP listener holds (the socket file is named after it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unprivileged() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: our own when not root, else PG_USER (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


class Cluster:
    """One PostgreSQL cluster: ``start()``, ``stop()``, ``restart()``, ``dsn(user, dbname)``."""

    def __init__(self, bindir: str, base: str | None = None) -> None:
        self.bindir = bindir
        self.ids = _unprivileged()
        self.superuser = "postgres"
        self.running = False
        if base is not None:  # a cluster that .ci/run started: adopt it (its port is in its directory)
            self.base = base
            self.data = os.path.join(base, "data")
            self.socket_dir = os.path.join(base, "sock")
            with open(os.path.join(base, "port")) as fh:
                self.port = int(fh.read())
            self.running = True
            return
        self.base = tempfile.mkdtemp(prefix="ocidx-pg-")
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "sock")
        os.mkdir(self.socket_dir, 0o700)
        if self.ids is not None:
            os.chown(self.base, *self.ids)
            os.chown(self.socket_dir, *self.ids)
        self.port = _free_port()
        with open(os.path.join(self.base, "port"), "w") as fh:
            fh.write(str(self.port))
        self._run(
            "initdb",
            "-D",
            self.data,
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"port = {self.port}\n"
                "fsync = off\n"  # a throwaway cluster: durability against power loss is not tested here
                "max_connections = 300\n"
                "shared_buffers = 64MB\n"
            )

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        uid, gid = self.ids if self.ids is not None else (None, None)
        return subprocess.run(
            [os.path.join(self.bindir, program), *args],
            capture_output=True,
            text=True,
            check=check,
            cwd=self.base,
            timeout=120,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = os.path.join(self.base, "server.log")
        done = self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", "start", check=False)
        if done.returncode != 0:
            with open(log, errors="replace") as fh:
                raise RuntimeError(f"PostgreSQL did not start: {done.stderr}\n{fh.read()[-2000:]}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions; ``immediate``: as a crash)."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)
            self.running = False

    def restart(self) -> None:
        """Stop and start again on the same socket."""
        self.stop()
        self.start()

    def dsn(self, user: str | None = None, dbname: str = "postgres") -> str:
        """A libpq connection string for *user* (the superuser by default) to *dbname*."""
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={user or self.superuser}"

    def psql(self, sql: str, dbname: str = "postgres") -> None:
        """Run *sql* as the superuser (autocommit: CREATE DATABASE cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            conn.execute(sql)

    def client(self, program: str, *args: str, dbname: str) -> subprocess.CompletedProcess[bytes]:
        """Run PostgreSQL's client *program* (pg_dump, pg_restore, psql) as the superuser on *dbname*."""
        return subprocess.run(
            [
                os.path.join(self.bindir, program),
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                *args,
            ],
            capture_output=True,
            check=True,
            timeout=300,
        )

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)


# Where .ci/run's throwaway cluster is, when it started one for the whole run.
BASE_ENV = "OCIDX_TEST_PG_BASE"


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """A started cluster: the one named by $OCIDX_TEST_PG_BASE (left running: its starter stops it),
    or a new one, destroyed on exit. RuntimeError when PostgreSQL is not installed."""
    directory = bin_dir()
    if directory is None:
        raise RuntimeError("PostgreSQL is not installed (initdb, pg_ctl, postgres)")
    adopted = os.environ.get(BASE_ENV)
    if adopted:
        cluster = Cluster(directory, base=adopted)
        try:
            yield cluster
        finally:
            if not cluster.running:  # a test stopped it and failed before starting it again
                cluster.start()
        return
    cluster = Cluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def main(argv: list[str]) -> int:
    """``python tests/pg_cluster.py start`` prints the directory of a new running cluster;
    ``python tests/pg_cluster.py stop DIR`` stops it and removes it (what .ci/run does)."""
    directory = bin_dir()
    if directory is None:
        sys.stderr.write("PostgreSQL is not installed (initdb, pg_ctl, postgres)\n")
        return 1
    if argv == ["start"]:
        cluster = Cluster(directory)
        cluster.start()
        sys.stdout.write(cluster.base + "\n")
        return 0
    if len(argv) == 2 and argv[0] == "stop":
        Cluster(directory, base=argv[1]).destroy()
        return 0
    sys.stderr.write("usage: pg_cluster.py start | stop DIR\n")
    return 2


class FleetDb:
    """A fresh fleet database in the session's cluster, migrated, with DSNs for any role."""

    def __init__(self, cluster: Cluster, dbname: str) -> None:
        self.cluster = cluster
        self.dbname = dbname
        self.admin_dsn = cluster.dsn(dbname=dbname)

    def dsn(self, role: str) -> str:
        """The DSN a host or reader role connects with."""
        return self.cluster.dsn(role, self.dbname)

    def add_host(self, name: str) -> str:
        """Register host *name* (ocidx fleet add-host); its DSN."""
        from indexer.fleet import admin

        admin.add_host(self.admin_dsn, name)
        return self.dsn(name)

    def add_reader(self, name: str) -> str:
        """A login role *name* that is a member of ocidx_reader, as docs/fleet.md's recipe makes one; its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            conn.execute(sql.SQL("GRANT ocidx_reader TO {}").format(sql.Identifier(name)))
        return self.dsn(name)


# Each table as both sides hold it, keyed the same way; SQLite's side is computed here in SQL,
# not by the publisher's code, so that a publisher bug cannot hide in both.
SQLITE_ROWS = {
    "layouts": "SELECT id, CAST(path AS BLOB), version, state, error_category, error, content_hash, entry_count "
    "FROM layouts",
    "entries": "SELECT layout_id, position, digest, media_type, size, platform, annotations, invalid_names, warnings "
    "FROM entries",
    "names": "SELECT n.layout_id, e.position, row_number() OVER (PARTITION BY n.entry_id ORDER BY n.rowid) - 1, "
    "n.name, n.tag, n.how FROM names n JOIN entries e ON e.id = n.entry_id",
    "children": "SELECT c.layout_id, e.position, c.position, c.parent, c.depth, c.digest, c.media_type, c.size, "
    "c.platform, c.annotations FROM children c JOIN entries e ON e.id = c.entry_id",
    "layout_warnings": "SELECT layout_id, row_number() OVER (PARTITION BY layout_id ORDER BY rowid) - 1, message "
    "FROM layout_warnings",
    # The content graph (fleet migration 0003): every manifest and index read on the host, with its
    # layers' digests and sizes; the attestation links of its indexes; per layout, how many of the
    # blobs it references it lacks (SQLite keeps their keys, not their digests).
    "graph_manifests": "SELECT m.digest, m.artifact_type, m.subject, m.annotations, m.config, m.config_media_type, "
    "m.config_size, (SELECT group_concat(json_extract(l.value, '$[0]'), ',') FROM json_each(m.layers) l), "
    "(SELECT group_concat(json_extract(l.value, '$[1]'), ',') FROM json_each(m.layers) l) FROM manifests m",
    "graph_attestations": "SELECT m.digest, a.digest, a.target FROM attestations a "
    "JOIN manifests m ON m.key = a.index_key",
    "missing_blobs": "SELECT layout_id, missing_blobs FROM layout_graph WHERE missing_blobs > 0",
}
# The tables whose rows are the host's, not a layout's (their first column is not a layout id).
HOST_TABLES = ("graph_manifests", "graph_attestations")
PG_ROWS = {
    "layouts": "SELECT id, path, version, state, error_category, error, content_hash, entry_count FROM layouts",
    "entries": "SELECT layout_id, position, digest, media_type, size, platform, annotations, invalid_names, warnings "
    "FROM entries",
    "names": "SELECT layout_id, entry_position, ordinal, name, tag, how FROM names",
    "children": "SELECT layout_id, entry_position, position, parent, depth, digest, media_type, size, platform, "
    "annotations FROM children",
    "layout_warnings": "SELECT layout_id, ordinal, message FROM layout_warnings",
    "graph_manifests": "SELECT digest, artifact_type, subject, annotations, config, config_media_type, config_size, "
    "nullif(array_to_string(layers, ','), ''), nullif(array_to_string(layer_sizes, ','), '') FROM graph_manifests",
    "graph_attestations": "SELECT index_digest, digest, target FROM graph_attestations",
    "missing_blobs": "SELECT layout_id, count FROM (SELECT host, layout_id, count(*) FROM missing_blobs "
    "GROUP BY host, layout_id) AS per_layout",
}


def sqlite_rows(db: str) -> dict[str, list[tuple[object, ...]]]:
    """A host's SQLite index as the fleet should hold it, table by table, sorted."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        return {t: sorted(tuple(r) for r in conn.execute(sql)) for t, sql in SQLITE_ROWS.items()}
    finally:
        conn.close()


def admin_connect(admin_dsn: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection as the fleet's administrator that finds the tables by their names (in schema
    ocidx_data since fleet migration 0002, where only the administrator may look), and gives up
    waiting for a lock after 10 s (a test never waits for one but where something is wrong)."""
    import psycopg

    conn = psycopg.connect(admin_dsn, autocommit=autocommit, options="-c lock_timeout=10s")
    conn.execute("SELECT set_config('search_path', 'ocidx_data, ' || current_setting('search_path'), false)")
    if not autocommit:
        conn.commit()
    return conn


def pg_rows(admin_dsn: str, host: str) -> dict[str, list[tuple[object, ...]]]:
    """The host's rows in the fleet database, table by table, sorted."""
    with admin_connect(admin_dsn) as conn:
        return {
            t: sorted(tuple(r) for r in conn.execute(f"{sql} WHERE host = %s", (host,))) for t, sql in PG_ROWS.items()
        }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
