"""Every error ocidx raises, under one root.

::

    OcidxError                      root; never raised itself
    ├── UsageError                  bad command line or query form        exit 2
    ├── InvalidReference            an invalid reference or digest        exit 2
    ├── ConfigError                 a bad config file (names the key)     exit 2
    ├── NotFound                    nothing matches                       exit 1
    │   ├── LayoutNotFound          the PATH does not exist or is not a layout
    │   ├── TagMismatch             --strict: the tag does not point at the digest
    │   ├── PlatformNotFound        --platform: no child for it (lists .platforms)
    │   └── WaitTimeout             ocidx wait: the target did not resolve in time
    ├── Ambiguous                   several digests match (lists .candidates) exit 3
    ├── DatabaseError               no usable index database              exit 4
    │   ├── SchemaTooNew            the database was written by a newer ocidx
    │   ├── UnsafeFile              a file beside the database is a symlink, not ours, ...
    │   └── FleetUnavailable        the fleet's PostgreSQL is unreachable or not set up
    ├── LayoutError                 one layout cannot be read             exit 5
    │   ├── LayoutUnreadable        I/O: missing, permission, not a file, FIFO
    │   ├── IndexParseError         index.json is not a valid image index
    │   ├── TornRead                index.json changed while it was read
    │   └── BlobError               a nested blob is bad (path, size, hash)
    ├── LayoutBusy                  gc --delete: a writer holds index.json.lock too long  exit 1
    ├── ResourceExhausted           out of descriptors (EMFILE, ENFILE)   exit 6
    │   └── OutOfMemory             out of memory (ENOMEM, MemoryError)
    └── DaemonError                 the daemon cannot run (lock held, watch limits), or wait cannot watch

Every error carries a snake_case ``category`` (the ``error`` key of ``--json``
output) and its exit code; the CLI maps them in one place (``cli.main``).
Messages never contain raw control characters taken from a layout: build them
with :func:`printable`.
"""

from __future__ import annotations

import errno

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeVar

    _L = TypeVar("_L", bound="LayoutError")

# C0 controls and DEL as \xNN, C1 controls as \u00NN.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F)}
_CONTROL.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})
# Invisible and bidirectional format characters (Unicode category Cf, as of Unicode 15) and the
# line and paragraph separators (Zl, Zp): they hide, reorder or break what a terminal shows, so a
# name holding one could pass for another. The whole tag block U+E0000-U+E007F is included.
_FORMAT_RANGES = (
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE007F),
)
_CONTROL.update(
    {c: (f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}") for low, high in _FORMAT_RANGES for c in range(low, high + 1)}
)
_REVERSIBLE = {**_CONTROL, ord("\\"): "\\\\"}


def printable(text: str, *, reversible: bool = False) -> str:
    """Return *text* with every control and invisible format character escaped, safe for a terminal.

    Escapes are Python's: ``\\xNN`` (C0, DEL), ``\\uNNNN`` (C1, format characters, separators),
    ``\\UNNNNNNNN`` (tag characters), and ``\\udc80``-``\\udcff`` for the raw bytes of a non-UTF-8
    file name (Python's surrogate escapes; they cannot be written to a UTF-8 terminal or stored
    as text). With *reversible* (the value fields of text output: paths, names, digests) a
    backslash is written ``\\\\`` too, so the output decodes back to exactly the value
    (docs/json.md). Messages are escaped without it: they embed values escaped already, and
    escaping twice would double every backslash.
    """
    if text.isprintable() and (not reversible or "\\" not in text):
        return text  # the common case (isprintable is false for every character escaped here)
    text = text.translate(_REVERSIBLE if reversible else _CONTROL)
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


class OcidxError(Exception):
    """Root of every ocidx error."""

    category = "error"
    exit_code = 1

    def __init__(self, message: str, *, category: str | None = None) -> None:
        super().__init__(printable(message))
        if category is not None:
            self.category = category

    @property
    def message(self) -> str:
        """The human message, already free of control characters."""
        return str(self)

    def to_json(self) -> dict[str, object]:
        """The ``{"error", "message", ...}`` object printed with ``--json``."""
        return {"error": self.category, "message": self.message}


class UsageError(OcidxError):
    """The command line or the query form is wrong."""

    category = "usage"
    exit_code = 2


class InvalidReference(OcidxError):
    """A reference or digest that Docker's grammar rejects; ``category`` says why."""

    category = "invalid_format"
    exit_code = 2


class ConfigError(OcidxError):
    """The configuration file is unreadable or has a bad key."""

    category = "config"
    exit_code = 2


class NotFound(OcidxError):
    """Nothing matches the query."""

    category = "not_found"
    exit_code = 1


class LayoutNotFound(NotFound):
    """The layout PATH of a lookup does not exist, or is not an OCI layout (no ``index.json`` nor ``oci-layout``)."""

    category = "layout_not_found"


class TagMismatch(NotFound):
    """Under ``--strict``, the tag or name given with a digest does not point at it."""

    category = "tag_mismatch"


class PlatformNotFound(NotFound):
    """No child manifest matches ``--platform``, or its blob is absent."""

    category = "platform_not_found"

    def __init__(self, message: str, platforms: Sequence[dict[str, object]]) -> None:
        super().__init__(message)
        self.platforms = list(platforms)

    def to_json(self) -> dict[str, object]:
        """Adds the platforms that are present."""
        return {**super().to_json(), "platforms": self.platforms}


class WaitTimeout(NotFound):
    """``ocidx wait``: the target did not resolve within the timeout (the message says why not)."""

    category = "timeout"


class Ambiguous(OcidxError):
    """Several entries with different digests match; never a silent pick."""

    category = "ambiguous"
    exit_code = 3

    def __init__(self, message: str, candidates: Sequence[dict[str, object]]) -> None:
        super().__init__(message)
        self.candidates = list(candidates)

    def to_json(self) -> dict[str, object]:
        """Adds every candidate digest with its names."""
        return {**super().to_json(), "candidates": self.candidates}


class DatabaseError(OcidxError):
    """No usable index database: missing, not an ocidx database, or unreadable."""

    category = "database"
    exit_code = 4


class SchemaTooNew(DatabaseError):
    """The database has migrations this version of ocidx does not know."""

    category = "schema_too_new"


class UnsafeFile(DatabaseError):
    """A file beside the database (the lock, the database, its -wal) is not one ocidx may write."""

    category = "unsafe_file"


class FleetUnavailable(DatabaseError):
    """The fleet database (PostgreSQL) is not configured, unreachable, or not an ocidx fleet."""

    category = "fleet_unavailable"


class LayoutError(OcidxError):
    """One layout cannot be read; other layouts are unaffected.

    ``transient`` is true when the cause is the environment, not the layout's own bytes: descriptors
    or memory used up, an I/O error, a permission, a worker process that died, a writer mid-rewrite.
    Such a failure is never stored as a proof: the layout is read again (docs/reliability.md).
    ``retry_soon`` is true for such a cause that usually passes within a second (descriptors or
    memory used up for a moment, a worker killed, a writer mid-rewrite): a pass reads the layout
    again before it ends. A permission does not pass by waiting: the next pass reads it again.
    """

    category = "layout_unreadable"
    exit_code = 5
    transient = False
    retry_soon = False

    def __init__(
        self,
        message: str,
        *,
        category: str | None = None,
        transient: bool | None = None,
        retry_soon: bool | None = None,
    ) -> None:
        super().__init__(message, category=category)
        if transient is not None:
            self.transient = transient
        if retry_soon is not None:
            self.retry_soon = retry_soon


class LayoutUnreadable(LayoutError):
    """``index.json`` is missing, not a regular file, or cannot be opened."""

    category = "layout_unreadable"


class IndexParseError(LayoutError):
    """``index.json`` is not a valid OCI image index (JSON, types, limits)."""

    category = "index_invalid"


class TornRead(LayoutError):
    """``index.json`` kept changing while it was read (a writer is mid-rewrite)."""

    category = "torn_read"
    transient = True
    retry_soon = True


class BlobError(LayoutError):
    """A blob referenced from the index is unsafe, too large, or fails its hash."""

    category = "blob_invalid"


class LayoutBusy(OcidxError):
    """``gc --delete`` could not take a layout's ``index.json.lock``: a writer kept it."""

    category = "layout_busy"
    exit_code = 1


class ResourceExhausted(OcidxError):
    """This process or the system ran out of open files (or memory): nothing is wrong with the index
    or the layouts, and the same command succeeds once the limit is raised or the load is gone."""

    category = "too_many_open_files"
    exit_code = 6


class OutOfMemory(ResourceExhausted):
    """This process or the system ran out of memory."""

    category = "out_of_memory"


# What a failed system call says about a layout's own files: missing, a symlink, not a regular
# file or directory, a name too long. Any other errno (EMFILE, ENFILE, ENOMEM, EIO, EACCES, ...)
# is the environment's, so the failure proves nothing about the layout.
_FILE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENAMETOOLONG})
_EXHAUSTED = {
    errno.EMFILE: ResourceExhausted.category,
    errno.ENFILE: ResourceExhausted.category,
    errno.ENOMEM: OutOfMemory.category,
}


def environmental(exc: OSError) -> bool:
    """Whether a failed system call says nothing about the file it was made on (see _FILE_ERRNOS)."""
    return exc.errno not in _FILE_ERRNOS


# Failures of the environment that usually pass within a second (LayoutError.retry_soon).
_PASSING = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.EIO}
)


def layout_failure(cls: type[_L], message: str, exc: OSError) -> _L:
    """The *cls* error for a system call on a layout's file that failed with *exc*: ``transient`` unless
    it says something about the file itself (``retry_soon`` when it usually passes within a second),
    and of category ``too_many_open_files`` or ``out_of_memory`` when descriptors or memory ran out
    (so ``ls`` and ``ocidx scan`` say so)."""
    return cls(
        message,
        category=_EXHAUSTED.get(exc.errno or 0),
        transient=environmental(exc),
        retry_soon=exc.errno in _PASSING,
    )


def exhausted(exc: BaseException, what: str) -> ResourceExhausted | None:
    """The :class:`ResourceExhausted` that *exc* is (descriptors or memory used up while doing *what*:
    an OSError, a MemoryError, or a LayoutError of such a category), or None."""
    if isinstance(exc, MemoryError) or getattr(exc, "category", None) == "out_of_memory":
        return OutOfMemory(f"out of memory while {what}: run it again when memory is free")
    code = getattr(exc, "errno", None)
    if isinstance(exc, LayoutError) and exc.category == "too_many_open_files":
        code = errno.ENFILE if "in system" in exc.message else errno.EMFILE
    if code == errno.EMFILE:
        try:
            import resource  # an extension module: its import needs a descriptor too

            allowed = f" (this process may have {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} open)"
        except (ImportError, OSError):
            allowed = ""
        return ResourceExhausted(
            f"too many open files while {what}{allowed}: raise the limit (ulimit -n 4096 in a shell, "
            "LimitNOFILE= in a systemd unit) and run it again"
        )
    if code == errno.ENFILE:
        return ResourceExhausted(
            f"the system's table of open files is full (sysctl fs.file-max) while {what}: run it again "
            "once files are closed, or raise fs.file-max"
        )
    if code == errno.ENOMEM:
        return OutOfMemory(f"out of memory while {what}: run it again when memory is free")
    return None


def out_of_descriptors(what: str, needed: int = 4) -> ResourceExhausted | None:
    """The :class:`ResourceExhausted` to raise when this process cannot open *needed* more files now
    (EMFILE, ENFILE), else None: asked after a failure that does not say why, such as SQLite's "unable
    to open database file" (SQLite keeps the errno to itself, and closes what it had opened: a
    database in WAL mode needs its file, -wal and -shm, so one free descriptor is no answer)."""
    import os

    opened: list[int] = []
    try:
        for _ in range(needed):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))  # noqa: PERF401 - each kept if the next fails
    except OSError as exc:
        return exhausted(exc, what)
    finally:
        for fd in opened:
            os.close(fd)
    return None


class DaemonError(OcidxError):
    """The daemon cannot start or go on (another holds the lock, and so on)."""

    category = "daemon"
    exit_code = 1
