"""The SQLite index: schema, migrations, and the two ways to open it.

* :func:`open_reader` is for lookups: ``mode=ro``, a busy timeout, and a check
  that the file is an ocidx database of a schema this version knows (exit 4
  otherwise). It never writes and never creates a file.
* :func:`open_writer` is for the one writer (``ocidx scan`` or the daemon):
  it creates the database, applies pending migrations, and sets WAL.

Migrations are the files ``migrations/NNNN_name.sql``, applied in order, each
recorded in ``ocidx_migrations`` in the same transaction as its change. The
count of known migrations is also ``PRAGMA user_version``, so a reader checks
the schema with one pragma instead of a table read.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time

from indexer.errors import DatabaseError, OcidxError, SchemaTooNew, UnsafeFile, exhausted, out_of_descriptors

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Concatenate, ParamSpec, TypeVar

    P = ParamSpec("P")
    T = TypeVar("T")

APPLICATION_ID = 0x6F636478  # "ocdx"
SCHEMA_VERSION = 8  # the number of files in migrations/; a test holds them equal
BUSY_TIMEOUT_MS = 5000


def database_error(message: str, path: str) -> OcidxError:
    """The error for a database that SQLite (or a file beside it) could not open: DatabaseError with
    *message*, unless this process is out of descriptors, which is no fault of the database."""
    return out_of_descriptors(f"opening the index database {path}") or DatabaseError(message)


def path_value(path: str) -> str | bytes:
    """A layout path as the ``layouts.path`` column holds it: text, or its raw bytes when not UTF-8.

    A directory name need not be UTF-8; Python hands it over with surrogate escapes, which
    SQLite text cannot hold. Stored as a BLOB it cannot collide with any text path.
    """
    if path.isascii():
        return path
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def path_of(value: str | bytes) -> str:
    """The layout path back from a ``layouts.path`` value (see :func:`path_value`)."""
    return value if isinstance(value, str) else os.fsdecode(value)


def migrations_dir() -> str:
    """The directory of migration files: inside the package when installed, else the checkout's."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packaged = os.path.join(here, "migrations")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(here), "migrations")


def migration_files(subdir: str = "") -> list[tuple[str, str]]:
    """``(name, path)`` of every migration, in the order they apply.

    *subdir* names another engine's migrations (``postgres`` for the fleet), listed and
    ordered by the same rule: ``NNNN_name.sql``, by number.
    """
    directory = os.path.join(migrations_dir(), subdir) if subdir else migrations_dir()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".sql") and n[:4].isdigit())
    except OSError as exc:
        raise exhausted(exc, "listing the migrations") or DatabaseError(
            f"migrations directory {directory} is unreadable: {exc.strerror}"
        ) from None
    return [(n[:-4], os.path.join(directory, n)) for n in names]


def schema_script() -> str:
    """All migrations as one script: the schema of an in-memory read-through database."""
    parts = []
    for _name, path in migration_files():
        with open(path, encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


def open_reader(path: str, *, any_thread: bool = False) -> sqlite3.Connection:
    """Open the index read-only for lookups, or raise DatabaseError (exit 4); with *any_thread*, the
    connection may be used from one thread after another (never from two at once)."""
    try:
        kind = os.stat(path).st_mode
    except OSError:
        raise DatabaseError(
            f"no index database at {path}: run 'ocidx scan ROOT' or start 'ocidx daemon' first"
        ) from None
    if not stat.S_ISREG(kind):  # opening a FIFO would block every lookup; a device has effects
        raise DatabaseError(f"{path} is not a regular file, so not an index database")
    check_database_files(path, reader=True)
    conn = _connect_reader(path, "mode=ro", any_thread)
    try:
        conn.execute("PRAGMA application_id").fetchone()
    except sqlite3.DatabaseError as exc:  # OperationalError is one; "file is not a database" another
        conn.close()
        if not isinstance(exc, sqlite3.OperationalError) or not _shm_refused(path, exc):
            raise database_error(f"{path} is not a usable ocidx database: {exc}", path) from None
        # A WAL database needs its -shm file, which this user cannot create: the database
        # belongs to another user (a root daemon, a user's query) or its directory is read-only.
        # No writer has it open (there is no WAL content), so the file is whole as it stands:
        # read it as immutable. Answers are still checked against the layouts (docs/semantics.md, Freshness).
        conn = _connect_reader(path, "mode=ro&immutable=1", any_thread)
    try:
        check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_reader(path: str, options: str, any_thread: bool) -> sqlite3.Connection:
    try:
        return sqlite3.connect(
            f"file:{_uri_path(path)}?{options}",
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=not any_thread,
        )
    except sqlite3.Error as exc:
        raise database_error(f"cannot open index database {path}: {exc}", path) from None


def _shm_refused(path: str, exc: sqlite3.OperationalError) -> bool:
    """Whether *exc* is SQLite failing to create the -shm file of a WAL database nobody is writing."""
    text = str(exc)
    if "readonly" not in text and "unable to open" not in text:
        return False
    try:
        return os.path.getsize(path + "-wal") == 0
    except OSError:
        return True  # no -wal file: the last writer closed cleanly


def check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Raise DatabaseError unless *conn* is an ocidx database of exactly our schema."""
    try:
        app_id, version = (
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
        )
    except sqlite3.DatabaseError as exc:
        raise database_error(f"{path} is not a usable ocidx database: {exc}", path) from None
    if app_id != APPLICATION_ID:
        raise DatabaseError(f"{path} is not an ocidx database")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path} has schema version {version}, newer than this ocidx knows ({SCHEMA_VERSION}): "
            "upgrade ocidx, or use another index database"
        )
    if version < SCHEMA_VERSION:
        raise DatabaseError(
            f"{path} has schema version {version}, older than this ocidx ({SCHEMA_VERSION}): "
            "run 'ocidx scan' or restart the daemon to migrate it"
        )


# -- files beside the database ----------------------------------------------------------------
#
# The writer may run as root while other users can write the database's directory (the
# group-writable set-up of docs/operations.md). Every file ocidx opens or creates there is opened
# as if such a user prepared the name: a symlink is refused, never followed; anything but a
# regular file with one link owned by this process's user is refused; nothing is truncated that
# this user did not create. SQLite opens the database and its -wal/-shm itself (following
# symlinks): those are checked just before it does (check_database_files); the window left
# between the check and SQLite's open is described in docs/reliability.md.

_BESIDE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# The files SQLite keeps beside a database (a reader may create -shm: it need not be ours).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def _refuse_unsafe(path: str, st: os.stat_result, *, owned: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFile(f"{path} is a symbolic link: refusing to follow it (remove it; ocidx creates its own file)")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file: refusing to open it")
    if st.st_nlink != 1:
        raise UnsafeFile(f"{path} has {st.st_nlink} hard links: refusing to write a file linked elsewhere")
    if owned and st.st_uid != os.geteuid():
        raise UnsafeFile(
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): refusing to write it"
        )


def open_beside_database(path: str) -> tuple[int, bool]:
    """Open *path* (a lock file beside the database) read-write, creating it if absent, safely.

    Returns the descriptor and whether this call created the file. A symlink (dangling or not),
    a FIFO, a device, a hard-linked file or another user's file raises :class:`UnsafeFile`
    naming the path; other failures (a read-only directory) raise the OSError.
    """
    try:
        # 0600: only the writer's user opens a lock (another user's is refused below); nobody else reads it.
        return os.open(path, _BESIDE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    _refuse_unsafe(path, os.lstat(path), owned=True)  # before the open: opening a device has effects
    try:
        fd = os.open(path, _BESIDE_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} became a symbolic link while it was opened: refusing to follow it") from None
        raise
    try:
        _refuse_unsafe(path, os.fstat(fd), owned=True)  # swapped between the lstat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def check_database_files(path: str, *, reader: bool = False) -> None:
    """Raise :class:`UnsafeFile` unless the database at *path* (when present) is a regular file of this
    user with one link, and its -wal, -shm and -journal (when present) are single-link regular files.

    A *reader* opens another user's database read-only, but SQLite still opens (and, first, may
    create or truncate) its -shm read-write: only the side files are checked, beside the real path
    of the database, where SQLite keeps them.
    """
    if reader:
        try:  # symlinked parent directories lead lstat to the same side files: only a final link matters
            base = os.path.realpath(path) if stat.S_ISLNK(os.lstat(path).st_mode) else path
        except OSError:
            base = path
        names = [(base + suffix, False) for suffix in SQLITE_SIDE_FILES]
    else:
        names = [(path, True), *((path + suffix, False) for suffix in SQLITE_SIDE_FILES)]
    for name, owned in names:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DatabaseError(f"cannot examine {name}: {exc.strerror}") from None
        _refuse_unsafe(name, st, owned=owned)


def open_writer(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the index for the single writer, migrated to our schema."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot open index database {path} for writing: {exc}") from None
    # Two writers opening a new database at once (a scan and a daemon starting together) must not
    # see each other's half-applied migrations: the checks and migrations run under a lock file of
    # their own (not the daemon's lock, which a scan beside a running daemon must not wait for).
    guard = _exclusive(path + ".migrate-lock")
    try:
        check_database_files(path)
        created = not os.path.lexists(path)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        if created:
            _apply_umask(path)
    except sqlite3.Error as exc:
        if guard is not None:
            os.close(guard)
        raise database_error(f"cannot open index database {path} for writing: {exc}", path) from None
    except BaseException:
        if guard is not None:
            os.close(guard)
        raise
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and has_tables:
            raise DatabaseError(f"{path} is a SQLite database but not an ocidx one: refusing to touch it")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{path} has schema version {version}, newer than this ocidx knows ({SCHEMA_VERSION}): "
                "upgrade ocidx, or point --db at another file"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        from indexer.store import maintenance  # writers only: off the lookup path

        maintenance.prepare(conn, new=not has_tables)
        migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise database_error(f"{path} is not a usable ocidx database: {exc}", path) from None
    except BaseException:
        conn.close()
        raise
    finally:
        if guard is not None:
            os.close(guard)  # closing the descriptor releases the lock
    return conn


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread at once)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


# A new database is at most readable and writable by its owner and group: the paths and tags of the
# layouts below the roots are in it, and only the documented group of readers may see them.
DATABASE_MODE = 0o660


def _apply_umask(path: str) -> None:
    """Give a database the writer just created mode 0660 less the umask (SQLite creates it 0644 whatever
    the umask), before its -wal and -shm exist: SQLite creates those with the database's mode, so a
    daemon run with ``UMask=0007`` makes all three group-readable and -writable, as readers in its
    group need, and other users can read none of them (docs/operations.md, Permissions)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # SQLite has not created it (it does so lazily on some systems): nothing to set
    try:
        os.fchmod(fd, DATABASE_MODE & ~_umask())
    finally:
        os.close(fd)


def exposure_warning(path: str) -> str | None:
    """What to say when the database at *path*, or its -wal or -shm, can be read by every local user:
    its mode lets others read it and every directory above it lets them through. None otherwise."""
    exposed = []
    for name in (path, *(path + suffix for suffix in SQLITE_SIDE_FILES)):
        try:
            mode = os.lstat(name).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and mode & stat.S_IROTH:
            exposed.append(f"{name} (mode {stat.S_IMODE(mode):04o})")
    if not exposed:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    while True:  # a directory others may not enter hides everything below it
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return None
        except OSError:
            return None
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return (
        f"the index is readable by every local user: {', '.join(exposed)}; it holds the paths and names of "
        f"every layout indexed. Run chmod o-rwx {path}*, and give the daemon UMask=0007 (and its directory "
        "mode 3770) so that only its group reads it (docs/operations.md, Permissions)"
    )


def _exclusive(lock_path: str) -> int | None:
    """An open descriptor holding an exclusive flock on *lock_path*, or None where none can be had."""
    import fcntl

    try:
        fd, _created = open_beside_database(lock_path)
    except OSError:
        return None  # a read-only directory: the open that follows reports the real problem
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def migrate(conn: sqlite3.Connection, path: str = ":memory:") -> list[str]:
    """Apply pending migrations, each in its own transaction with its record; return their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS ocidx_migrations (name TEXT PRIMARY KEY, applied_ns INTEGER NOT NULL)")
    applied = {row[0] for row in conn.execute("SELECT name FROM ocidx_migrations")}
    files = migration_files()
    known = {name for name, _ in files}
    unknown = sorted(applied - known)
    if unknown:
        raise SchemaTooNew(f"{path} has migrations this ocidx does not know ({', '.join(unknown)}): upgrade ocidx")
    done = []
    for number, (name, file_path) in enumerate(files, start=1):
        if name in applied:
            continue
        with open(file_path, encoding="utf-8") as fh:
            script = fh.read()
        # executescript() commits first, so the BEGIN is part of the script itself.
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n"
                + script
                + f"\nINSERT INTO ocidx_migrations (name, applied_ns) VALUES ('{name}', {time.time_ns()});"
                + f"\nPRAGMA user_version = {number};"
                + f"\nPRAGMA application_id = {APPLICATION_ID};"
                + "\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        done.append(name)
    return done


def transaction(
    conn: sqlite3.Connection, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs
) -> T:
    """Run ``fn(conn, ...)`` inside ``BEGIN IMMEDIATE ... COMMIT``; roll back whatever it raises.

    The one way a change reaches the index: :meth:`Store.unit` runs it on the writer's thread, and
    ``ocidx scan``'s no-change path (which starts no event loop) calls it directly.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args, **kw)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _uri_path(path: str) -> str:
    """Quote a file path for a ``file:`` URI (only these three characters mean something there)."""
    return os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
